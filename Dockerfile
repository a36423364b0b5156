# keygate container image.
#
#   docker build -t keygate .
#
# The baked-in config expects the services of docker-compose.yml (Redis at redis:6379, the backend
# at upstream:8000). To run the image alone, override with KEYGATE_<SECTION>_<FIELD> variables, e.g.
#   docker run --rm -p 8443:8443 -e KEYGATE_STORE_BACKEND=sqlite \
#     -e KEYGATE_STORE_PATH=/var/lib/keygate/keygate.db -e KEYGATE_UPSTREAM_URL=http://10.0.0.5:8000 keygate
#
# The image runs as the unprivileged user `keygate` (uid/gid 10001). Its config is
# /etc/keygate/gateway.toml (from deploy/docker/gateway.toml); mount your own over it to change it.
# /var/lib/keygate is the writable data directory (the development certificate is generated there).

# ---- build ------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first: this layer is rebuilt only when Cargo.toml or Cargo.lock change.
# Dummy crate roots: Cargo.toml declares the binary src/main.rs and the bench target
# benches/auth.rs (cargo rejects the manifest if either is missing); src/lib.rs is the library.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/auth.rs \
    && cargo build --release --locked --bin keygate \
    && rm -rf src benches

# The real sources. COPY keeps the files' original modification times, which can be older than
# the dummy build's outputs: touch the crate roots so cargo rebuilds keygate itself.
COPY src ./src
COPY benches ./benches
COPY gateway.toml ./
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin keygate \
    && install -m 0755 target/release/keygate /usr/local/bin/keygate

# ---- runtime ----------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 keygate \
    && useradd --system --uid 10001 --gid keygate --home-dir /var/lib/keygate \
       --no-create-home --shell /usr/sbin/nologin keygate \
    && install -d -m 0750 -o keygate -g keygate /var/lib/keygate \
    && install -d -m 0755 /etc/keygate

COPY --from=builder /usr/local/bin/keygate /usr/local/bin/keygate
COPY deploy/docker/gateway.toml /etc/keygate/gateway.toml

USER keygate:keygate
WORKDIR /var/lib/keygate

# 8443 HTTPS (authenticated pipeline), 8080 plain HTTP (308 redirect to HTTPS),
# 9090 admin (/metrics, /healthz, /readyz): publish it on a private interface only.
EXPOSE 8443 8080 9090

# No HEALTHCHECK: the image has no HTTP client (no curl or wget, to keep it small) and keygate has
# no self-probe subcommand. Probe GET /healthz (alive) or /readyz (store and upstream reachable)
# on port 9090 from the orchestrator instead (Kubernetes httpGet probes, a load balancer check).

# keygate drains in-flight requests for up to server.shutdown_grace (30 s) after SIGTERM: give it
# longer than that before SIGKILL (docker stop -t 35, compose stop_grace_period: 35s).
ENTRYPOINT ["keygate", "--config", "/etc/keygate/gateway.toml"]
CMD ["serve"]
