#!/usr/bin/env bash
# scripts/install-deps.sh: installs what the tests need on a fresh Debian machine:
# PostgreSQL server binaries (initdb, pg_ctl, postgres, pgbench, pg_recvlogical) and
# redis-server. Installs nothing when they are already there. Needs root (apt-get).
set -euo pipefail

missing=()
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && [[ -z ${PGINVAL_TEST_PG_BIN:-} ]]; then
  missing+=(postgresql postgresql-contrib)
fi
command -v redis-server >/dev/null || missing+=(redis-server)
command -v psql >/dev/null || missing+=(postgresql-client)
command -v openssl >/dev/null || missing+=(openssl)   # the TLS tests make their certificates

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
id postgres >/dev/null 2>&1 || { echo "the postgres user is missing (PostgreSQL refuses to run as root)" >&2; exit 1; }
pg_dirs=(/usr/lib/postgresql/*/bin)
echo "test dependencies: ok (${PGINVAL_TEST_PG_BIN:-${pg_dirs[-1]}}, $(redis-server --version | cut -d' ' -f3))"
