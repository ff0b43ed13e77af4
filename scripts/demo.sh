#!/usr/bin/env bash
# scripts/demo.sh: watch pginval keep a Redis cache in step with PostgreSQL.
#
# Usage: scripts/demo.sh [--keep]
#
# With no environment set, the demo starts a throwaway PostgreSQL (wal_level=logical)
# and a throwaway redis-server on free local ports, all under one temporary directory
# that is removed on exit. It then:
#   1. builds pginval (cargo build --release), unless PGINVAL_BIN names a binary;
#   2. creates the database pginval_example and loads sql/example-schema.sql;
#   3. runs `pginval check --config rules.toml`, then `pginval run` in the background;
#   4. plays a short story: cache a few keys the way an application would, change rows
#      with psql, and show which cached keys pginval deleted after each commit.
#
# Options:
#   --keep     after the story, leave pginval running in the foreground (its log is
#              shown) so you can try your own changes; Ctrl-C stops and cleans up.
#   -h, --help show this help.
#
# Environment:
#   PGINVAL_BIN         use this pginval binary instead of building one.
#   PGINVAL_SOURCE_URL  use this PostgreSQL database instead of a throwaway server. It
#                       must exist and run with wal_level=logical; the demo creates the
#                       example tables in it and writes to them. A slot or publication
#                       the demo had to create is dropped again on exit.
#   PGINVAL_REDIS_URL   use this Redis instead of a throwaway server (redis://host:port/db).
#                       The demo overwrites keys such as user:1 and page:home in it.
#   PG_BINDIR           where initdb and pg_ctl are (default: pg_config --bindir, then
#                       the newest /usr/lib/postgresql/*/bin).
#   PGINVAL_DEMO_TIMEOUT  seconds to wait for each invalidation (default 10).
#   PGINVAL_DEMO_KEEP_FILES=1  keep the temporary directory (logs) when the demo fails.
#
# Run as root, the throwaway PostgreSQL runs as the `postgres` user (PostgreSQL refuses
# to run as root).

set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG="$ROOT/rules.toml"
SCHEMA="$ROOT/sql/example-schema.sql"
DB_NAME=pginval_example
TIMEOUT=${PGINVAL_DEMO_TIMEOUT:-10}
START_TIMEOUT=30 # first start: connect, create slot and publication
KEEP=false

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

while (($#)); do
  case $1 in
    --keep) KEEP=true ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'demo: unknown argument: %s (see --help)\n' "$1" >&2; exit 2 ;;
  esac
  shift
done

# ----------------------------------------------------------------------------- output

if [[ -t 1 ]]; then
  BOLD=$'\e[1m' DIM=$'\e[2m' RED=$'\e[31m' GREEN=$'\e[32m' YELLOW=$'\e[33m' RESET=$'\e[0m'
else
  BOLD='' DIM='' RED='' GREEN='' YELLOW='' RESET=''
fi

say() { printf '%s\n' "$*"; }
info() { printf '%s-- %s%s\n' "$DIM" "$*" "$RESET"; }
heading() { printf '\n%s%s%s\n' "$BOLD" "$*" "$RESET"; }
warn() { printf '%sdemo: %s%s\n' "$YELLOW" "$*" "$RESET" >&2; }
die() { printf '%sdemo: %s%s\n' "$RED" "$*" "$RESET" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found. $2"; }
list() { local out='' w; for w in "$@"; do out+="${out:+, }$w"; done; printf '%s' "$out"; }

# Milliseconds since the epoch (bash 5's EPOCHREALTIME; whole seconds otherwise).
now_ms() {
  if [[ -n ${EPOCHREALTIME:-} ]]; then
    local t=${EPOCHREALTIME/[.,]/}
    printf '%s' $((10#$t / 1000))
  else
    printf '%s' $(($(date +%s) * 1000))
  fi
}

# ---------------------------------------------------------------------- state, cleanup

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pginval-demo.XXXXXX")
PG_DIR=''          # throwaway PostgreSQL: $PG_DIR/data, socket, log
PG_BINDIR=${PG_BINDIR:-}
REDIS_PID=''       # throwaway redis-server
PGINVAL_PID=''
PGINVAL_LOG="$WORK/pginval.log"
DROP_SLOT=''       # external database: slot/publication created by this demo
DROP_PUBLICATION=''
FINISHED=false     # the story ran to its end
SURPRISES=0        # keys invalidated that the story did not expect

stop_pginval() {
  [[ -n $PGINVAL_PID ]] || return 0
  if kill -0 "$PGINVAL_PID" 2>/dev/null; then
    kill -TERM "$PGINVAL_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
      kill -0 "$PGINVAL_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$PGINVAL_PID" 2>/dev/null; then
      warn "pginval did not stop within 10 s of SIGTERM; killing it"
      kill -KILL "$PGINVAL_PID" 2>/dev/null || true
    fi
  fi
  wait "$PGINVAL_PID" 2>/dev/null || true
  PGINVAL_PID=''
}

# Drop what the demo created in a database it was given (a slot keeps WAL forever).
drop_external_objects() {
  local i
  if [[ -n $DROP_SLOT ]]; then
    for ((i = 0; i < 20; i++)); do # the walsender may need a moment to let go of it
      case $(q "SELECT pg_drop_replication_slot(slot_name) IS NULL FROM pg_replication_slots
                WHERE slot_name = '$DROP_SLOT'" 2>/dev/null || echo busy) in
        '') DROP_SLOT='' ;; # never created
        busy) sleep 0.25; continue ;;
        *) info "dropped replication slot $DROP_SLOT (created by this demo)"; DROP_SLOT='' ;;
      esac
      break
    done
    [[ -z $DROP_SLOT ]] || warn "could not drop replication slot $DROP_SLOT: drop it with
    SELECT pg_drop_replication_slot('$DROP_SLOT');"
  fi
  if [[ -n $DROP_PUBLICATION && $(q "SELECT count(*) FROM pg_publication WHERE pubname = '$DROP_PUBLICATION'") != 0 ]]; then
    if q "DROP PUBLICATION \"$DROP_PUBLICATION\"" >/dev/null 2>&1; then
      info "dropped publication $DROP_PUBLICATION (created by this demo)"
    else
      warn "could not drop publication $DROP_PUBLICATION"
    fi
  fi
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if ((rc != 0)) && ! $FINISHED && [[ -s $PGINVAL_LOG ]]; then
    printf '\n%s-- last lines of the pginval log:%s\n' "$DIM" "$RESET" >&2
    tail -n 30 "$PGINVAL_LOG" >&2
  fi
  stop_pginval
  [[ -n $DROP_SLOT$DROP_PUBLICATION ]] && drop_external_objects
  if [[ -n $REDIS_PID ]]; then
    kill -TERM "$REDIS_PID" 2>/dev/null
    wait "$REDIS_PID" 2>/dev/null
  fi
  if [[ -n $PG_DIR && -f $PG_DIR/data/postmaster.pid ]]; then
    as_pg "$PG_BINDIR/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 \
      || warn "could not stop the throwaway PostgreSQL in $PG_DIR"
  fi
  if ((rc == 0)) || [[ ${PGINVAL_DEMO_KEEP_FILES:-} != 1 ]]; then
    rm -rf "$WORK"
  else
    warn "logs kept in $WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'if $FINISHED; then exit 0; else exit 130; fi' INT
trap 'exit 143' TERM

# Run a PostgreSQL server program as the postgres user when we are root.
as_pg() {
  if ((EUID == 0)); then
    (cd "$PG_DIR" && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# A TCP port on 127.0.0.1 that nothing listens on (a connection attempt is refused).
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

# The first `NAME = "value"` in rules.toml (good enough for slot, publication, key).
toml_string() {
  sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*\"\([^\"]*\)\".*/\1/p" "$CONFIG" | head -n 1
}

# ------------------------------------------------------------------- PostgreSQL, Redis

q() { psql "$PGINVAL_SOURCE_URL" -X -q -A -t -v ON_ERROR_STOP=1 -c "$1"; }
rcli() { redis-cli -u "$PGINVAL_REDIS_URL" --no-auth-warning "$@"; }

find_pg_bindir() {
  [[ -n $PG_BINDIR ]] && return 0
  if command -v pg_config >/dev/null 2>&1; then
    PG_BINDIR=$(pg_config --bindir)
    [[ -x $PG_BINDIR/initdb ]] && return 0
  fi
  local d
  d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
  if [[ -n $d && -x $d/initdb ]]; then PG_BINDIR=$d; return 0; fi
  if command -v initdb >/dev/null 2>&1; then PG_BINDIR=$(dirname -- "$(command -v initdb)"); return 0; fi
  die "initdb not found: install the PostgreSQL server (e.g. apt-get install postgresql),
set PG_BINDIR, or set PGINVAL_SOURCE_URL to use an existing database."
}

start_postgres() {
  find_pg_bindir
  [[ -x $PG_BINDIR/pg_ctl ]] || die "pg_ctl not found in $PG_BINDIR (set PG_BINDIR)"
  PG_DIR="$WORK/postgres"
  mkdir -p "$PG_DIR"
  if ((EUID == 0)); then
    id postgres >/dev/null 2>&1 || die "running as root, but there is no postgres user to run PostgreSQL as"
    command -v runuser >/dev/null 2>&1 || die "running as root needs runuser (util-linux) to start PostgreSQL as postgres"
    chmod 711 "$WORK" # let postgres reach its directory, nothing else
    chown postgres: "$PG_DIR"
  fi
  local port
  port=$(free_port)
  info "starting a throwaway PostgreSQL ($("$PG_BINDIR/postgres" --version | awk '{print $3}')) on 127.0.0.1:$port"
  as_pg "$PG_BINDIR/initdb" -D "$PG_DIR/data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
    >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
  cat >>"$PG_DIR/data/postgresql.conf" <<EOF

# scripts/demo.sh
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$PG_DIR'
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
fsync = off
EOF
  as_pg "$PG_BINDIR/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 start >/dev/null \
    || { tail -n 20 "$PG_DIR/postgres.log" >&2; die "PostgreSQL did not start"; }
  psql "postgres://postgres@127.0.0.1:$port/postgres" -X -q -v ON_ERROR_STOP=1 \
    -c "CREATE DATABASE $DB_NAME" >/dev/null
  PGINVAL_SOURCE_URL="postgres://postgres@127.0.0.1:$port/$DB_NAME"
}

start_redis() {
  need redis-server "Install Redis (e.g. apt-get install redis-server) or set PGINVAL_REDIS_URL."
  local port i
  port=$(free_port)
  info "starting a throwaway redis-server ($(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')) on 127.0.0.1:$port"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
  REDIS_PID=$!
  PGINVAL_REDIS_URL="redis://127.0.0.1:$port/0"
  for ((i = 0; i < 100; i++)); do
    [[ $(rcli PING 2>/dev/null) == PONG ]] && return 0
    kill -0 "$REDIS_PID" 2>/dev/null || break
    sleep 0.1
  done
  tail -n 20 "$WORK/redis.log" >&2
  die "redis-server did not start"
}

# --------------------------------------------------------------------- cache helpers

TAG_TEMPLATE=$(toml_string key)
TAG_TEMPLATE=${TAG_TEMPLATE:-'cache_tag:{tag}'}
declare -A TAGS_OF=() # cache key -> "tag a, tag b" (for display)

tag_key() { printf '%s' "${TAG_TEMPLATE//'{tag}'/$1}"; }

# label KEY: the key, with the tags it was cached under.
label() {
  if [[ -n ${TAGS_OF[$1]:-} ]]; then
    printf '%s (tag %s)' "$1" "${TAGS_OF[$1]}"
  else
    printf '%s' "$1"
  fi
}

# cache KEY VALUE [TAG...]: what a cache-aside application does after a miss:
# store the value with a TTL and add the key to each tag's SET.
cache() {
  local key=$1 value=$2 tag
  shift 2
  rcli SET "$key" "$value" EX 3600 >/dev/null
  for tag in "$@"; do
    rcli SADD "$(tag_key "$tag")" "$key" >/dev/null
  done
  if (($#)); then TAGS_OF[$key]=$(list "$@"); fi
}

# cached KEY: true while KEY exists in Redis.
cached() {
  local reply
  reply=$(rcli EXISTS "$1" 2>&1) || die "redis-cli EXISTS $1 failed: $reply"
  case $reply in
    1) return 0 ;;
    0) return 1 ;;
    *) die "unexpected reply from Redis to EXISTS $1: $reply" ;;
  esac
}

show_cached() {
  local k labels=()
  for k in "$@"; do labels+=("$(label "$k")"); done
  say "   cached: $(list "${labels[@]}")"
}

pginval_alive() {
  local rc
  kill -0 "$PGINVAL_PID" 2>/dev/null && return 0
  wait "$PGINVAL_PID" 2>/dev/null && rc=0 || rc=$?
  PGINVAL_PID=''
  die "pginval exited (status $rc); its log is shown below"
}

# wait_gone TIMEOUT KEY...: poll until every KEY is gone; false on timeout.
wait_gone() {
  local timeout_ms=$(($1 * 1000)) start k left
  shift
  start=$(now_ms)
  while :; do
    left=()
    for k in "$@"; do cached "$k" && left+=("$k"); done
    ((${#left[@]} == 0)) && return 0
    (($(now_ms) - start >= timeout_ms)) && { STILL_CACHED=("${left[@]}"); return 1; }
    pginval_alive
    sleep 0.02
  done
}

# A no-op write pginval must see: once the key it invalidates is gone, pginval has
# applied every transaction committed before it. The story never uses the music
# category, so this cannot disturb it. Repeated until seen (the first ones may be
# written before pginval has created its slot).
sync_with_pginval() {
  local timeout=$1 start
  start=$(now_ms)
  while :; do
    rcli SET category_slug:music '{"probe":true}' >/dev/null
    q "UPDATE categories SET name = name WHERE slug = 'music'" >/dev/null
    wait_gone 1 category_slug:music && return 0
    (($(now_ms) - start < timeout * 1000)) || return 1
  done
}

print_sql() {
  local line
  while IFS= read -r line; do printf '   %spsql>%s %s\n' "$DIM" "$RESET" "$line"; done <<<"$1"
}

# expect KEPT...: report keys that should still be cached; count surprises.
expect_kept() {
  local k kept=() lost=()
  for k in "$@"; do
    if cached "$k"; then kept+=("$(label "$k")"); else lost+=("$(label "$k")"); fi
  done
  if ((${#kept[@]})); then
    say "   ${GREEN}→ still cached:${RESET} $(list "${kept[@]}")"
  fi
  if ((${#lost[@]})); then
    SURPRISES=$((SURPRISES + ${#lost[@]}))
    say "   ${YELLOW}→ unexpectedly invalidated:${RESET} $(list "${lost[@]}")"
  fi
}

# step SQL GONE... -- KEPT...: run SQL, wait until every GONE key is invalidated, then
# check that the KEPT keys are still there.
step() {
  local sql=$1 gone=() k labels=() start
  shift
  while (($#)) && [[ $1 != -- ]]; do gone+=("$1"); shift; done
  (($#)) && shift # the --
  print_sql "$sql"
  start=$(now_ms)
  q "$sql" >/dev/null
  if ! wait_gone "$TIMEOUT" "${gone[@]}"; then
    die "after ${TIMEOUT} s these keys are still cached: ${STILL_CACHED[*]}"
  fi
  for k in "${gone[@]}"; do labels+=("$(label "$k")"); done
  say "   ${RED}→ gone${RESET} after $(($(now_ms) - start)) ms: $(list "${labels[@]}")"
  expect_kept "$@"
}

# ====================================================================== the demo

[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "PGINVAL_DEMO_TIMEOUT must be a whole number of seconds"
need psql "Install the PostgreSQL client (e.g. apt-get install postgresql-client)."
need redis-cli "Install the Redis tools (e.g. apt-get install redis-tools)."
[[ -f $CONFIG ]] || die "$CONFIG not found"
[[ -f $SCHEMA ]] || die "$SCHEMA not found"

heading "pginval demo"

# 1. pginval ---------------------------------------------------------------------
if [[ -n ${PGINVAL_BIN:-} ]]; then
  [[ -x $PGINVAL_BIN ]] || die "PGINVAL_BIN=$PGINVAL_BIN is not an executable"
  BIN=$PGINVAL_BIN
else
  need cargo "Install Rust (https://rustup.rs) or set PGINVAL_BIN to a pginval binary."
  info "building pginval: cargo build --release (the first build takes a few minutes)"
  (cd "$ROOT" && cargo build --release) || die "cargo build failed"
  BIN="$ROOT/target/release/pginval"
fi

# 2. PostgreSQL and Redis --------------------------------------------------------
if [[ -n ${PGINVAL_SOURCE_URL:-} ]]; then
  info "using the database in PGINVAL_SOURCE_URL"
  q 'SELECT 1' >/dev/null || die "cannot connect to PGINVAL_SOURCE_URL"
else
  start_postgres
fi
if [[ -n ${PGINVAL_REDIS_URL:-} ]]; then
  info "using the Redis in PGINVAL_REDIS_URL"
  [[ $(rcli PING 2>&1) == PONG ]] || die "cannot reach PGINVAL_REDIS_URL (redis-cli -u ... PING)"
else
  start_redis
fi
export PGINVAL_SOURCE_URL PGINVAL_REDIS_URL

wal_level=$(q 'SHOW wal_level')
[[ $wal_level == logical ]] || die "the database runs with wal_level=$wal_level; pginval needs logical:
    ALTER SYSTEM SET wal_level = logical;  -- then restart PostgreSQL"

info "loading sql/example-schema.sql"
psql "$PGINVAL_SOURCE_URL" -X -q -v ON_ERROR_STOP=1 -c "SET client_min_messages = warning" -f "$SCHEMA" >/dev/null

if [[ -z $PG_DIR ]]; then # remember what to drop again in a database we were given
  slot=$(toml_string slot) publication=$(toml_string publication)
  slot=${slot:-pginval} publication=${publication:-pginval}
  [[ $(q "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$slot'") == 0 ]] && DROP_SLOT=$slot
  [[ $(q "SELECT count(*) FROM pg_publication WHERE pubname = '$publication'") == 0 ]] && DROP_PUBLICATION=$publication
fi

# 3. pginval check, pginval run --------------------------------------------------
heading "\$ pginval check --config rules.toml"
rc=0
"$BIN" check --config "$CONFIG" || rc=$?
case $rc in
  0) ;;
  2) die "pginval check found configuration problems in rules.toml (see above)" ;;
  *) die "pginval check failed (exit status $rc)" ;;
esac

heading "\$ pginval run --config rules.toml &"
"$BIN" run --config "$CONFIG" >"$PGINVAL_LOG" 2>&1 &
PGINVAL_PID=$!
info "pginval is running (pid $PGINVAL_PID); waiting until it follows the database"
sync_with_pginval "$START_TIMEOUT" || die "pginval did not invalidate a test key within ${START_TIMEOUT} s"
info "pginval is streaming"

# 4. The story -------------------------------------------------------------------
# Ids are looked up by natural key, so the story also works on a database where it ran before.
ALICE=$(q "SELECT id FROM users WHERE email = 'alice@example.com'")
BOB=$(q "SELECT id FROM users WHERE email = 'bob@example.com'")
CAROL=$(q "SELECT id FROM users WHERE email = 'carol@example.com'")
BOOKS=$(q "SELECT id FROM categories WHERE slug = 'books'")
GAMES=$(q "SELECT id FROM categories WHERE slug = 'games'")
HELLO=$(q "SELECT id FROM posts WHERE title = 'Hello, world' ORDER BY id LIMIT 1")
BOOK=$(q "SELECT id FROM products WHERE sku = 'BOOK-001'")
GAME=$(q "SELECT id FROM products WHERE sku = 'GAME-001'")
row() { q "SELECT row_to_json(t) FROM $1 t WHERE id = $2"; } # row TABLE ID: the cached value

heading "1. A user renames themselves (users: REPLICA IDENTITY DEFAULT, rule uses only {id})"
cache "user:$ALICE" "$(row users "$ALICE")"
cache "user_full:$ALICE" "$(q "SELECT json_build_object('user', u, 'posts', (SELECT json_agg(p) FROM posts p WHERE p.author_id = u.id)) FROM users u WHERE id = $ALICE")"
cache page:home '<html>… latest posts by Alice …</html>' "user:$ALICE"
cache page:profile:alice '<html>… Alice …</html>' "user:$ALICE"
cache "user:$BOB" "$(row users "$BOB")"
cache "post:$HELLO" "$(row posts "$HELLO")"
show_cached "user:$ALICE" "user_full:$ALICE" page:home page:profile:alice "user:$BOB" "post:$HELLO"
step "UPDATE users SET name = 'Alice Liddell' WHERE id = $ALICE" \
  "user:$ALICE" "user_full:$ALICE" page:home page:profile:alice -- "user:$BOB" "post:$HELLO"

FROM=$(q "SELECT author_id FROM posts WHERE id = $HELLO")
if [[ $FROM == "$ALICE" ]]; then TO=$BOB; else TO=$ALICE; fi
heading "2. A post moves to another author (posts: REPLICA IDENTITY FULL, so the old author is known)"
cache "post:$HELLO" "$(row posts "$HELLO")"
cache "user_posts:$FROM" "$(q "SELECT json_agg(p) FROM posts p WHERE author_id = $FROM")"
cache "user_posts:$TO" "$(q "SELECT json_agg(p) FROM posts p WHERE author_id = $TO")"
cache page:category:books '<html>… posts and products in Books …</html>' "category:$BOOKS"
cache "user:$BOB" "$(row users "$BOB")"
cache "product:$BOOK" "$(row products "$BOOK")"
show_cached "post:$HELLO" "user_posts:$FROM" "user_posts:$TO" page:category:books "user:$BOB" "product:$BOOK"
step "UPDATE posts SET author_id = $TO, updated_at = now() WHERE id = $HELLO" \
  "post:$HELLO" "user_posts:$FROM" "user_posts:$TO" page:category:books -- "user:$BOB" "product:$BOOK"
info "user_posts:$FROM was rendered from the old row, user_posts:$TO from the new one"

heading "3. A product is deleted (products: REPLICA IDENTITY FULL, so the DELETE still carries sku)"
cache "product:$GAME" "$(row products "$GAME")"
cache product_sku:GAME-001 "$(row products "$GAME")"
cache page:category:games '<html>… Games …</html>' "category:$GAMES"
cache "product:$BOOK" "$(row products "$BOOK")"
cache product_sku:BOOK-001 "$(row products "$BOOK")"
show_cached "product:$GAME" product_sku:GAME-001 page:category:games "product:$BOOK" product_sku:BOOK-001
step "DELETE FROM products WHERE sku = 'GAME-001'" \
  "product:$GAME" product_sku:GAME-001 page:category:games -- "product:$BOOK" product_sku:BOOK-001

heading "4. A transaction that rolls back invalidates nothing"
cache "user:$BOB" "$(row users "$BOB")"
cache "user_full:$BOB" "$(row users "$BOB")"
cache "product:$BOOK" "$(row products "$BOOK")"
cache product_sku:BOOK-001 "$(row products "$BOOK")"
show_cached "user:$BOB" "user_full:$BOB" "product:$BOOK" product_sku:BOOK-001
rollback_sql="BEGIN;
UPDATE users SET name = 'Robert' WHERE id = $BOB;
DELETE FROM products WHERE sku = 'BOOK-001';
ROLLBACK;"
print_sql "$rollback_sql"
psql "$PGINVAL_SOURCE_URL" -X -q -v ON_ERROR_STOP=1 >/dev/null <<<"$rollback_sql"
# No key can be awaited here; a later committed write proves pginval got past it.
sync_with_pginval "$TIMEOUT" || die "pginval did not catch up within ${TIMEOUT} s"
expect_kept "user:$BOB" "user_full:$BOB" "product:$BOOK" product_sku:BOOK-001

heading "5. Keys are deleted after COMMIT, not before (a reader could re-cache the old row)"
cache "user_posts:$CAROL" "$(q "SELECT coalesce(json_agg(p), '[]') FROM posts p WHERE author_id = $CAROL")"
cache page:category:books '<html>… posts and products in Books …</html>' "category:$BOOKS"
cache "user:$CAROL" "$(row users "$CAROL")"
show_cached "user_posts:$CAROL" page:category:books "user:$CAROL"
# One psql session holds the transaction open while we look at Redis.
coproc TX { psql "$PGINVAL_SOURCE_URL" -X -q -A -t -v ON_ERROR_STOP=1 2>&1; }
tx_in=${TX[1]} tx_out=${TX[0]}
insert_sql="INSERT INTO posts (author_id, category_id, title, body, published)
VALUES ($CAROL, $BOOKS, 'Carol''s first post', 'Hi!', true);"
print_sql "BEGIN;"
print_sql "$insert_sql"
printf '%s\n%s\n%s\n' 'BEGIN;' "$insert_sql" '\echo in-transaction' >&"$tx_in"
while IFS= read -r -t "$TIMEOUT" line <&"$tx_out"; do
  [[ $line == in-transaction ]] && break
  say "   $line"
done
[[ ${line:-} == in-transaction ]] || die "psql did not run the INSERT"
# Everything committed so far has been applied by pginval; the open INSERT has not.
sync_with_pginval "$TIMEOUT" || die "pginval did not catch up within ${TIMEOUT} s"
expect_kept "user_posts:$CAROL" page:category:books
info "the transaction is still open: nothing was invalidated yet"
print_sql "COMMIT;"
start=$(now_ms)
printf '%s\n' 'COMMIT;' '\q' >&"$tx_in"
wait "$TX_PID" || die "psql failed to commit"
wait_gone "$TIMEOUT" "user_posts:$CAROL" page:category:books \
  || die "after ${TIMEOUT} s these keys are still cached: ${STILL_CACHED[*]}"
say "   ${RED}→ gone${RESET} after $(($(now_ms) - start)) ms: $(label "user_posts:$CAROL"), $(label page:category:books)"
expect_kept "user:$CAROL"

FINISHED=true
heading "Done."
if ((SURPRISES)); then
  warn "$SURPRISES cached key(s) were invalidated although the rules do not name them (see above)"
fi
say "The application never deleted a key: pginval did, from the WAL, after each commit."
$KEEP || say "Run scripts/demo.sh --keep to keep pginval running and try your own changes."

if $KEEP; then
  heading "pginval keeps running. Try it from another terminal:"
  say "   psql '$PGINVAL_SOURCE_URL' -c \"UPDATE users SET bio = 'hi' WHERE id = $CAROL\""
  say "   redis-cli -u '$PGINVAL_REDIS_URL' SET user:$CAROL cached   # before the UPDATE"
  say "   redis-cli -u '$PGINVAL_REDIS_URL' EXISTS user:$CAROL        # after it: 0"
  say "Press Ctrl-C to stop pginval and remove the throwaway servers. pginval's log:"
  tail -n +1 -f --pid="$PGINVAL_PID" "$PGINVAL_LOG" || true
  pginval_alive
fi
((SURPRISES == 0))
