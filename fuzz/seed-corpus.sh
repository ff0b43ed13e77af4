#!/usr/bin/env bash
# fuzz/seed-corpus.sh: writes the seed corpora in fuzz/corpus/<target>/ from the
# captured pgoutput fixtures, rules.toml and the README's examples.
#
# Usage: fuzz/seed-corpus.sh
#
# pgoutput_decode    every distinct message of tests/fixtures/pgoutput/{text,binary}.hex
# replication_frame  XLogData frames (the captured LSN as start and WAL end) around the
#                    text stream's messages, keepalives, and a short header
# template_parse     key and tag templates from rules.toml and the README, good and bad
# config_parse       rules.toml and each ```toml block of the README (with a [source]
#                    url when the block has none, so validation gets past it)
#
# Files are named after where they came from; inputs libFuzzer finds are named by their
# SHA-1 and are not written here. Rerunning overwrites the seeds and leaves other files.

set -euo pipefail

FUZZ_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname -- "$FUZZ_DIR")
CORPUS=$FUZZ_DIR/corpus
FIXTURES=$ROOT/tests/fixtures/pgoutput

mkdir -p "$CORPUS"/{pgoutput_decode,replication_frame,template_parse,config_parse}

# `0/19677C0` -> 16 hex digits.
lsn_hex() {
  printf '%08x%08x' "0x${1%/*}" "0x${1#*/}"
}

# Server time of an XLogData header: a real commit time from the fixtures.
SERVER_TIME=000304250da73581

declare -A seen=()
for stream in text binary; do
  n=0
  while read -r lsn hex; do
    n=$((n + 1))
    tag=$(printf '%s' "${hex:0:2}" | xxd -r -p)
    name=$(printf '%s-%02d-%s' "$stream" "$n" "$tag")
    if [[ -z ${seen[$hex]:-} ]]; then
      seen[$hex]=1
      printf '%s' "$hex" | xxd -r -p >"$CORPUS/pgoutput_decode/$name"
    fi
    # Frames: every message but the repeated Begin/Commit pairs (their shape is in the
    # first pair already); the binary stream's frames would repeat the text stream's.
    if [[ $stream == text && ($n -le 6 || ($tag != B && $tag != C)) ]]; then
      printf '77%s%s%s%s' "$(lsn_hex "$lsn")" "$(lsn_hex "$lsn")" "$SERVER_TIME" "$hex" |
        xxd -r -p >"$CORPUS/replication_frame/w-$name"
    fi
  done <"$FIXTURES/$stream.hex"
done

frames=$CORPUS/replication_frame
printf '6b%s%s00' "$(lsn_hex 0/196D550)" "$SERVER_TIME" | xxd -r -p >"$frames/k-no-reply"
printf '6b%s%s01' "$(lsn_hex 0/196D550)" "$SERVER_TIME" | xxd -r -p >"$frames/k-reply"
printf '77%s%s' "$(lsn_hex 0/196D550)" "$(lsn_hex 0/196D550)" | xxd -r -p >"$frames/w-short-header"
printf '77%s%s%s' "$(lsn_hex 0/196D550)" "$(lsn_hex 0/196D550)" "$SERVER_TIME" |
  xxd -r -p >"$frames/w-empty-payload"

templates=(
  # rules.toml and the README
  'user:{id}' 'user_full:{id}' 'post:{id}' 'user_posts:{author_id}'
  'category:{category_id}' 'product:{id}' 'product_sku:{sku}' 'category:{id}'
  'category_slug:{slug}' 'user_permissions:{id}' 'user_directory' 'user:{id}:*'
  'cache_tag:{tag}' 'user_posts:{old.author_id}'
  # every syntax form, and every error
  'user_posts:{author_id}:{new.id}' '{{x}}:{id}' 'q[1]*:{id}:{old.x}' '{ id }'
  'user:{id' 'user:id}' 'user:{}' 'user:{old.}' 'user:{older.id}' 'user:{a b}'
  'user:{a"b}' 'user:{a{b}' 'ключ:{ид}:{{}}'
)
i=0
for t in "${templates[@]}"; do
  i=$((i + 1))
  printf '%s' "$t" >"$CORPUS/template_parse/$(printf 't%02d' "$i")"
done

configs=$CORPUS/config_parse
cp "$ROOT/rules.toml" "$configs/rules.toml"
awk -v out="$configs/readme" '
  /^```toml$/ { n++; file = sprintf("%s-%02d.toml", out, n); inblock = 1; next }
  /^```$/ && inblock { inblock = 0; close(file); next }
  inblock { print > file }
' "$ROOT/README.md"
for f in "$configs"/readme-*.toml; do
  if ! grep -q '^\[source\]' "$f"; then
    { printf '[source]\nurl = "postgres://postgres@127.0.0.1:5432/app"\n\n'; cat "$f"; } >"$f.tmp"
    mv "$f.tmp" "$f"
  fi
done
cat >"$configs/layouts-and-limits.toml" <<'TOML'
[source]
url = "host=127.0.0.1 port=5432 user=pginval dbname=app sslmode=disable"
slot = "pginval_app"
publication = "pginval_app"
status_interval_secs = 5
on_slot_lost = "fail"
heartbeat_secs = 30

[redis]
url = "redis://:secret@127.0.0.1:6380/2"

[tags]
layout = "symfony"
prefix = "app:"
namespace = "cache"

[limits]
max_keys_per_transaction = 500

[metrics]
listen = "127.0.0.1:9187"
max_lag_secs = 10

[[rules]]
table = "blog.posts"
keys = ["post:{new.id}", "post:{old.id}"]
tags = ["author:{author_id}"]
on = ["update", "delete"]
columns = ["title"]
TOML
cat >"$configs/problems.toml" <<'TOML'
[source]
url = "postgres://[::1"
slot = "Bad-Slot"
status_interval_secs = 0
on_slot_lost = "maybe"

[redis]
url = "http://nope"

[tags]
layout = "laravel"
key = "no_placeholder"

[limits]
max_keys_per_transaction = 0

[metrics]
listen = "nowhere"

[events]

[[rules]]
tabel = "users"

[[rules]]
table = "posts"
keys = ["post:{id"]
action = "expire"
expire_in = "soon"
redelete_after = "-1s"
on = ["upsert"]
fallback = { tags = ["all_posts"], patterns = ["post:*"], extra = 1 }

[unknown]
TOML
