#!/usr/bin/env bash
# scripts/install-deps.sh: installs what the tests need on a fresh Debian machine:
# PostgreSQL server binaries (initdb, pg_ctl, postgres, pgbench, pg_recvlogical) and
# redis-server; RabbitMQ and nats-server for the event-sink tests (RabbitMQ is started
# when installed but stopped). Installs nothing when they are already there. Needs root
# (apt-get).
set -euo pipefail

missing=()
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && [[ -z ${PGINVAL_TEST_PG_BIN:-} ]]; then
  missing+=(postgresql postgresql-contrib)
fi
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)   # the cluster tests create their clusters with it
command -v psql >/dev/null || missing+=(postgresql-client)
command -v openssl >/dev/null || missing+=(openssl)   # the TLS tests make their certificates
command -v rabbitmq-server >/dev/null || [[ -x /usr/sbin/rabbitmq-server ]] || missing+=(rabbitmq-server)
command -v nats-server >/dev/null || [[ -x /usr/sbin/nats-server ]] || missing+=(nats-server)

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
id postgres >/dev/null 2>&1 || { echo "the postgres user is missing (PostgreSQL refuses to run as root)" >&2; exit 1; }
# The AMQP tests use the machine's RabbitMQ on 127.0.0.1:5672 (guest/guest); the NATS
# tests start a nats-server of their own.
if ! (echo >/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "starting RabbitMQ"
  PATH="$PATH:/usr/sbin" rabbitmq-server -detached
  for _ in $(seq 1 120); do
    (echo >/dev/tcp/127.0.0.1/5672) 2>/dev/null && break
    sleep 0.5
  done
  (echo >/dev/tcp/127.0.0.1/5672) 2>/dev/null || { echo "RabbitMQ did not start on 127.0.0.1:5672" >&2; exit 1; }
fi
pg_dirs=(/usr/lib/postgresql/*/bin)
echo "test dependencies: ok (${PGINVAL_TEST_PG_BIN:-${pg_dirs[-1]}}, $(redis-server --version | cut -d' ' -f3))"
