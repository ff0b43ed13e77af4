# syntax=docker/dockerfile:1
#
# pginval container image.
#
#   docker build -t pginval .
#   docker run --rm -v "$PWD/rules.toml:/etc/pginval/rules.toml:ro" \
#     -e PGINVAL_SOURCE_URL=postgres://pginval:secret@db:5432/app \
#     -e PGINVAL_REDIS_URL=redis://cache:6379/0 \
#     pginval run --config /etc/pginval/rules.toml
#
# docker-compose.yml builds and runs it next to PostgreSQL and Redis.

# ---- build ------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# Everything the build needs (.dockerignore keeps target/ and .git/ out).
COPY . .
# The cache mounts keep downloaded crates and compiled dependencies between builds;
# the binary is copied out because target/ lives only in the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -m 0755 target/release/pginval /usr/local/bin/pginval

# ---- runtime ----------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: TLS connections to PostgreSQL and Redis (sslmode=require, rediss://).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# pginval needs no privileges: run it as an unprivileged system user.
RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pginval
COPY --from=builder /usr/local/bin/pginval /usr/local/bin/pginval
# Mount the rules here (read-only is enough).
WORKDIR /etc/pginval
USER pginval
ENTRYPOINT ["pginval"]
CMD ["run", "--config", "/etc/pginval/rules.toml"]
