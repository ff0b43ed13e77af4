#!/usr/bin/env bash
# scripts/bench.sh: pginval against pg_recvlogical, side by side, on a throwaway
# PostgreSQL and Redis. See docs/performance.md for what it measures and the targets.
#
# Usage: scripts/bench.sh [options]
#
#   --runs N          catch-up and big-transaction runs; medians are reported (default 5)
#   --quick           smoke run: 1 run, 4,000-transaction backlog, 5 s per latency rate,
#                     a 100,000-row big transaction (scale 1)
#   --backlog N       pgbench TPC-B transactions per catch-up run (default 40000)
#   --latency-secs S  seconds of fixed-rate load per rate (default 15)
#   --rates LIST      fixed pgbench rates for the latency test (default 2000,5000)
#   --big-scale S     pgbench scale of the big-transaction database (default 10: 1,000,000 rows)
#   --big-runs N      big-transaction runs (default: --runs)
#   --only LIST       phases to run, of catchup,cluster,events,latency,clusterlatency,race,big,
#                     bigcommit
#                     (default all; cluster and clusterlatency start a 3-primary Redis Cluster
#                     (redis-cli --cluster create) and compare pginval against it with pginval
#                     against one Redis, same runs; race: cache-aside readers against writers,
#                     TTL only / the app deleting / pginval / pginval + redelete_after; events
#                     needs RabbitMQ, --amqp-url, default amqp://guest:guest@127.0.0.1:5672/%2f)
#   --race-secs S     seconds of load per race run (default 10)
#   --race-runs N     race runs per mode and reader delay (default 3)
#   --race-delays L   the race readers' processing delays in ms (default 0,10)
#   --confirm-wait S  after the last key is deleted, how long to watch the slot's
#                     confirmed_flush_lsn reach the end (diagnostic; default 1)
#   --perf            profile pginval's catch-up and big-transaction runs (perf record
#                     -e cpu-clock), print the hottest symbols; timings are then not comparable
#   --json FILE       also write every measurement as JSON
#   --keep-files      keep the temporary directory (server logs, pginval logs)
#   -h, --help        show this help
#
# What it does:
#   1. builds pginval (cargo build --release) unless PGINVAL_BIN names a binary;
#   2. starts PostgreSQL (wal_level=logical, fsync=off: a throwaway server, nothing here
#      needs durability; autovacuum=off so no background backends come and go while
#      the walsender's CPU is read) and redis-server (no persistence), each on a free
#      127.0.0.1 port, under one temporary directory removed on exit;
#   3. pgbench -i -s 1 into database `bench` (catch-up, latency) and -s 10 into `bigtx`
#      (big transaction); publications bench_all / bench_big FOR TABLE pgbench_accounts,
#      pgbench_tellers, pgbench_branches (whole tables);
#   4. runs scripts/bench/bench.py, which measures and prints the result table.
#
# Environment:
#   PGINVAL_BIN         pginval binary to measure (default: build target/release/pginval)
#   PG_BINDIR           PostgreSQL binaries (default /usr/lib/postgresql/15/bin, else the
#                       newest /usr/lib/postgresql/*/bin; 15 or later is needed)
#   PGINVAL_BENCH_VENV  virtualenv used when python3 lacks psycopg2; created with
#                       `pip install psycopg2-binary` when missing
#                       (default ${XDG_CACHE_HOME:-~/.cache}/pginval-bench/venv)
#
# Run as root, PostgreSQL runs as the `postgres` user (it refuses to run as root).

set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=5
BIG_RUNS=''
BACKLOG=40000
LATENCY_SECS=15
RATES=2000,5000
BIG_SCALE=10
ONLY=catchup,cluster,events,latency,clusterlatency,race,big,bigcommit
JSON=''
CONFIRM_WAIT=1
RACE_SECS=10
RACE_RUNS=3
RACE_DELAYS=0,10
KEEP_FILES=false
PERF=false

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }
info() { printf -- '-- %s\n' "$*" >&2; }
number() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive whole number, not '$2'"; }

while (($#)); do
  case $1 in
    --runs) number "$1" "${2:-}"; RUNS=$2; shift ;;
    --big-runs) number "$1" "${2:-}"; BIG_RUNS=$2; shift ;;
    --backlog) number "$1" "${2:-}"; BACKLOG=$2; shift ;;
    --latency-secs) number "$1" "${2:-}"; LATENCY_SECS=$2; shift ;;
    --rates) [[ ${2:-} =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--rates needs a list like 2000,5000"; RATES=$2; shift ;;
    --big-scale) number "$1" "${2:-}"; BIG_SCALE=$2; shift ;;
    --only) [[ ${2:-} =~ ^(catchup|cluster|events|latency|clusterlatency|race|big|bigcommit)(,(catchup|cluster|events|latency|clusterlatency|race|big|bigcommit))*$ ]] || die "--only needs a list of catchup,cluster,events,latency,clusterlatency,race,big,bigcommit"; ONLY=$2; shift ;;
    --race-secs) number "$1" "${2:-}"; RACE_SECS=$2; shift ;;
    --race-runs) number "$1" "${2:-}"; RACE_RUNS=$2; shift ;;
    --race-delays) [[ ${2:-} =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--race-delays needs a list like 0,10"; RACE_DELAYS=$2; shift ;;
    --confirm-wait) number "$1" "${2:-}"; CONFIRM_WAIT=$2; shift ;;
    --json) [[ -n ${2:-} ]] || die "--json needs a file name"; JSON=$(realpath -m -- "$2"); shift ;;
    --quick) RUNS=1 BACKLOG=4000 LATENCY_SECS=5 BIG_SCALE=1 ;;
    --keep-files) KEEP_FILES=true ;;
    --perf) PERF=true ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done
BIG_RUNS=${BIG_RUNS:-$RUNS}
((BACKLOG >= 4)) || die "--backlog must be at least 4 (4 pgbench clients)"

# ------------------------------------------------------------------ tools and pginval

PG_BINDIR=${PG_BINDIR:-}
if [[ -z $PG_BINDIR ]]; then
  if [[ -x /usr/lib/postgresql/15/bin/initdb ]]; then
    PG_BINDIR=/usr/lib/postgresql/15/bin
  else
    PG_BINDIR=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
  fi
fi
for tool in initdb pg_ctl postgres psql pgbench pg_recvlogical; do
  [[ -x $PG_BINDIR/$tool ]] || die "$tool not found in '${PG_BINDIR}' (install PostgreSQL 15+, or set PG_BINDIR)"
done
PG_MAJOR=$("$PG_BINDIR/postgres" --version | sed -n 's/.* \([0-9][0-9]*\)\..*/\1/p')
((PG_MAJOR >= 15)) || die "PostgreSQL $PG_MAJOR is too old: column lists need 15 or later (set PG_BINDIR)"
command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"
command -v python3 >/dev/null || die "python3 not found"
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) not found: apt-get install time"

PYTHON=python3
if ! python3 -c 'import psycopg2, pika' 2>/dev/null; then
  VENV=${PGINVAL_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pginval-bench/venv}
  if ! "$VENV/bin/python" -c 'import psycopg2, pika' 2>/dev/null; then
    info "python3 lacks psycopg2 or pika: installing psycopg2-binary and pika into $VENV"
    python3 -m venv "$VENV" || die "could not create a virtualenv in $VENV"
    "$VENV/bin/pip" install -q psycopg2-binary pika || die "pip install psycopg2-binary pika failed"
  fi
  PYTHON=$VENV/bin/python
fi

if [[ -n ${PGINVAL_BIN:-} ]]; then
  [[ -x $PGINVAL_BIN ]] || die "PGINVAL_BIN=$PGINVAL_BIN is not an executable"
  BIN=$(realpath -- "$PGINVAL_BIN")
else
  command -v cargo >/dev/null || die "cargo not found: install Rust or set PGINVAL_BIN"
  info "building pginval: cargo build --release"
  (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
  BIN=$ROOT/target/release/pginval
fi
CEILING=
if [[ $ONLY == *events* ]]; then
  command -v cargo >/dev/null || die "the events phase builds examples/amqp_ceiling.rs: cargo not found"
  info "building the RabbitMQ reference client: cargo build --release --example amqp_ceiling"
  (cd "$ROOT" && cargo build --release --example amqp_ceiling) || die "building examples/amqp_ceiling.rs failed"
  CEILING=$ROOT/target/release/examples/amqp_ceiling
fi

# ---------------------------------------------------------------------- state, cleanup

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pginval-bench.XXXXXX")
PG_DIR=$WORK/postgres
REDIS_PID=''
PG_STARTED=false
BENCH_PID=''

as_pg() {
  if ((EUID == 0)); then
    (cd "$PG_DIR" && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [[ -n $BENCH_PID ]] && kill -0 "$BENCH_PID" 2>/dev/null; then
    kill -TERM "$BENCH_PID" 2>/dev/null
    wait "$BENCH_PID" 2>/dev/null
  fi
  if [[ -n $REDIS_PID ]]; then
    kill -TERM "$REDIS_PID" 2>/dev/null
    wait "$REDIS_PID" 2>/dev/null
  fi
  if $PG_STARTED; then
    as_pg "$PG_BINDIR/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 \
      || printf 'bench: could not stop the PostgreSQL in %s\n' "$PG_DIR" >&2
  fi
  if $KEEP_FILES || { ((rc != 0)) && [[ ${PGINVAL_BENCH_KEEP_FILES:-} == 1 ]]; }; then
    info "files kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A TCP port on 127.0.0.1 that nothing listens on.
free_port() {
  local port i
  for ((i = 0; i < 100; i++)); do
    port=$((20000 + RANDOM % 40000))
    if ! (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
      printf '%s' "$port"
      return 0
    fi
  done
  die "no free TCP port found"
}

# --------------------------------------------------------------- PostgreSQL and Redis

mkdir -p "$PG_DIR"
if ((EUID == 0)); then
  id postgres >/dev/null 2>&1 || die "running as root, but there is no postgres user to run PostgreSQL as"
  chmod 711 "$WORK"
  chown postgres: "$PG_DIR"
fi
PG_PORT=$(free_port)
info "starting PostgreSQL $("$PG_BINDIR/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT ($PG_DIR)"
as_pg "$PG_BINDIR/initdb" -D "$PG_DIR/data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
  >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
cat >>"$PG_DIR/data/postgresql.conf" <<EOF

# scripts/bench.sh: a throwaway server for measurements
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
wal_level = logical
max_wal_senders = 10
max_replication_slots = 20
shared_buffers = 256MB
fsync = off                 # no durability needed; commits still wait for the WAL write
max_wal_size = 8GB          # no checkpoint in the middle of a measurement (one runs before each)
checkpoint_timeout = 1h
autovacuum = off            # no backends coming and going while the walsender's CPU is read
EOF
as_pg "$PG_BINDIR/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 start >/dev/null \
  || { tail -n 20 "$PG_DIR/postgres.log" >&2; die "PostgreSQL did not start"; }
PG_STARTED=true

REDIS_PORT=$(free_port)
info "starting redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on 127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$WORK" --logfile "$WORK/redis.log" &
REDIS_PID=$!
for ((i = 0; i < 100; i++)); do
  [[ $(redis-cli -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]] && break
  kill -0 "$REDIS_PID" 2>/dev/null || break
  sleep 0.1
done
[[ $(redis-cli -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]] || { tail -n 20 "$WORK/redis.log" >&2; die "redis-server did not start"; }

psql_() { "$PG_BINDIR/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -X -q -v ON_ERROR_STOP=1 "$@"; }
pgbench_init() { # DB SCALE
  psql_ -d postgres -c "CREATE DATABASE $1" >/dev/null
  info "pgbench -i -s $2 $1"
  "$PG_BINDIR/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -q -s "$2" "$1" >"$WORK/pgbench-init-$1.log" 2>&1 \
    || { cat "$WORK/pgbench-init-$1.log" >&2; die "pgbench -i failed"; }
  psql_ -d "$1" -c "CREATE PUBLICATION $3 FOR TABLE pgbench_accounts, pgbench_tellers, pgbench_branches" >/dev/null
}
if [[ $ONLY == *catchup* || $ONLY == *cluster* || $ONLY == *events* || $ONLY == *latency* ]]; then pgbench_init bench 1 bench_all; fi
if [[ $ONLY == *big* ]]; then pgbench_init bigtx "$BIG_SCALE" bench_big; fi

# ------------------------------------------------------------------------------ run

mem_gb=$(awk '/MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then rev+=" + uncommitted changes"; fi
if [[ -n ${PGINVAL_BIN:-} ]]; then rev="PGINVAL_BIN; work tree at $rev"; else rev="built from $rev"; fi
printf 'pginval benchmark  %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
printf 'machine: %s cores, %s, %s GB RAM; PostgreSQL %s (fsync=off), Redis %s\n' \
  "$(nproc)" "$cpu_model" "$mem_gb" "$("$PG_BINDIR/postgres" --version | awk '{print $3}')" \
  "$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')"
busy_pct() { # the machine's CPU use over 2 s, in % of all cores
  local a b
  read -r -a a < <(sed -n 's/^cpu  //p' /proc/stat)
  sleep 2
  read -r -a b < <(sed -n 's/^cpu  //p' /proc/stat)
  local busy=0 total=0 i d
  for i in "${!a[@]}"; do
    ((i < 8)) || break
    d=$((b[i] - a[i]))
    total=$((total + d))
    ((i == 3 || i == 4)) || busy=$((busy + d))
  done
  printf '%s' $((total ? 100 * busy / total : 0))
}
printf 'machine load before the run: %s%% of all cores busy (other programs; the benchmark assumes an idle machine)\n' "$(busy_pct)"
printf 'pginval: %s (%s); runs %s, backlog %s transactions, big transaction scale %s\n\n' \
  "$BIN" "$rev" "$RUNS" "$BACKLOG" "$BIG_SCALE"

args=(--pg-bindir "$PG_BINDIR" --pg-data "$PG_DIR/data" --pg-port "$PG_PORT" --redis-port "$REDIS_PORT" --redis-pid "$REDIS_PID"
  --pginval "$BIN" --work "$WORK" --runs "$RUNS" --big-runs "$BIG_RUNS" --backlog "$BACKLOG"
  --latency-secs "$LATENCY_SECS" --rates "$RATES" --only "$ONLY" --confirm-wait "$CONFIRM_WAIT"
  --race-secs "$RACE_SECS" --race-runs "$RACE_RUNS" --race-delays "$RACE_DELAYS")
[[ -n $JSON ]] && args+=(--json "$JSON")
[[ -n $CEILING ]] && args+=(--amqp-ceiling "$CEILING")
if $PERF; then
  command -v perf >/dev/null || die "--perf needs perf (apt-get install linux-perf)"
  args+=(--perf)
fi
"$PYTHON" "$ROOT/scripts/bench/bench.py" "${args[@]}" &
BENCH_PID=$!
wait "$BENCH_PID"
