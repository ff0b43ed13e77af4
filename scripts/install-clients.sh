#!/usr/bin/env bash
# scripts/install-clients.sh: installs the Redis clients the fence snippets of
# examples/fence/ are tested with: redis-py (PyPI) into a virtualenv, ioredis (npm), and
# PHP with phpredis (Debian's php-cli, php-redis; needs root). Prints the directory to
# give the tests as PGINVAL_TEST_CLIENTS. Installs nothing already there.
# (go-redis comes from the Go module proxy, which this machine cannot reach: the Go
# snippet is not tested here.)
#
# The directory is PGINVAL_CLIENTS_DIR, default /var/tmp/pginval-clients.
set -euo pipefail

root=${PGINVAL_CLIENTS_DIR:-/var/tmp/pginval-clients}
mkdir -p "$root"
if ! "$root/venv/bin/python" -c 'import redis' 2>/dev/null; then
  rm -rf "$root/venv"
  python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q 'redis>=5,<9' >&2
fi
if [[ ! -d $root/node/node_modules/ioredis ]]; then
  mkdir -p "$root/node"
  npm install --silent --no-audit --no-fund --prefix "$root/node" 'ioredis@5' >&2
fi
if ! php -m 2>/dev/null | grep -qx redis; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends php-cli php-redis >/dev/null
fi
echo "$root"
