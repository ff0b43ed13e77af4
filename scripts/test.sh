#!/usr/bin/env bash
# scripts/test.sh: runs every test — unit tests (decoder, templates, config) and the
# end-to-end suite, which starts its own PostgreSQL (wal_level=logical, one server for
# the run, a database per test) and a redis-server per test on free ports.
#
# Extra arguments go to `cargo test` (e.g. a test name filter).
# PGINVAL_TEST_PG_BIN selects another PostgreSQL bin directory (another major version).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && [[ -z ${PGINVAL_TEST_PG_BIN:-} ]]; then
  echo "PostgreSQL server binaries not found: run scripts/install-deps.sh (as root)" >&2
  exit 1
fi
command -v redis-server >/dev/null || { echo "redis-server not found: run scripts/install-deps.sh" >&2; exit 1; }

cargo test --all-targets "$@"
