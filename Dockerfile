# ews-relay container image: the workspace's relay binary, stripped, on Debian bookworm-slim,
# running as uid/gid 10001 with no file capabilities. How to run it: README, section "Container".
#
#   docker build -t ews-relay .
#
# Build arguments (all optional):
#   RUST_IMAGE, RUNTIME_IMAGE  the two base images, e.g. from a registry mirror:
#                              --build-arg RUNTIME_IMAGE=registry.example/library/debian:bookworm-slim
#   APT_MIRROR                 Debian mirror replacing http://deb.debian.org/debian
#   CARGO_REGISTRY             crates.io mirror (sparse index): sparse+https://crates.example/index/
#   EXTRA_CA                   PEM certificate(s) to trust in addition, in both stages, for networks
#                              that re-sign TLS: --build-arg EXTRA_CA="$(cat corp-ca.pem)"
#   CARGO_PROFILE_RELEASE_STRIP  `symbols` (default): stripped; `none`: a debug variant keeping the
#                              line tables the workspace's release profile builds, for backtraces
#   RELAY_BINARY_IMAGE         where /out/ews-relay comes from: the `build` stage below, or an image
#                              holding a binary built elsewhere (.ci/container does that); with
#                              BuildKit the Rust stage is then skipped
#
# No `# syntax=` line and no RUN --mount (BuildKit-only syntax), so the classic builder takes it too.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
ARG RELAY_BINARY_IMAGE=build

FROM ${RUST_IMAGE} AS build
ARG EXTRA_CA=""
ARG CARGO_REGISTRY=""
ARG CARGO_PROFILE_RELEASE_STRIP=symbols
ENV CARGO_HOME=/usr/local/cargo CARGO_INCREMENTAL=0
RUN set -eu; \
    if [ -n "$EXTRA_CA" ]; then \
        printf '%s\n' "$EXTRA_CA" | awk '/BEGIN CERTIFICATE/ { n++ } n { print > ("/usr/local/share/ca-certificates/extra-" n ".crt") }'; \
        update-ca-certificates; \
    fi; \
    if [ -n "$CARGO_REGISTRY" ]; then \
        mkdir -p "$CARGO_HOME"; \
        printf '[source.crates-io]\nreplace-with = "mirror"\n[source.mirror]\nregistry = "%s"\n' "$CARGO_REGISTRY" \
            >> "$CARGO_HOME/config.toml"; \
    fi
WORKDIR /src
# Dependencies first, in their own layer: the manifests with empty targets, so a change to the
# relay's code does not download and compile every crate again.
COPY Cargo.toml Cargo.lock ./
COPY crates/ews/Cargo.toml crates/ews/
COPY crates/http1/Cargo.toml crates/http1/
COPY crates/relay/Cargo.toml crates/relay/
COPY crates/ews-sim/Cargo.toml crates/ews-sim/
RUN set -eu; \
    for c in ews http1 relay ews-sim; do mkdir -p crates/$c/src; : > crates/$c/src/lib.rs; done; \
    echo 'fn main() {}' > crates/relay/src/main.rs; cp crates/relay/src/main.rs crates/ews-sim/src/main.rs; \
    cargo build --release --locked -p ews-relay --bin ews-relay; \
    rm -rf crates
COPY crates ./crates
# touch: the real sources may be older than the placeholder build, and cargo compares mtimes.
RUN set -eu; \
    find crates -name '*.rs' -exec touch {} +; \
    cargo build --release --locked -p ews-relay --bin ews-relay; \
    mkdir /out; cp target/release/ews-relay /out/ews-relay

# The binary's source: `build` above unless RELAY_BINARY_IMAGE names another image with /out/ews-relay.
FROM ${RELAY_BINARY_IMAGE} AS binary

FROM ${RUNTIME_IMAGE} AS runtime
ARG APT_MIRROR=""
ARG EXTRA_CA=""
ARG DEBIAN_FRONTEND=noninteractive
# ca-certificates: the system roots for outbound HTTPS in managed mode (Exchange, OAuth, the
# endpoint list), plus EXTRA_CA. One user and group with fixed ids (10001) owning only the two
# data directories; no setcap: the relay listens on 8443 inside the container (publish it as
# 443), so it needs no capability at all and runs under --cap-drop ALL.
RUN set -eu; \
    if [ -n "$APT_MIRROR" ]; then \
        sed -i "s#http://deb.debian.org/debian#${APT_MIRROR%/}#g" \
            $(ls /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null); \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    if [ -n "$EXTRA_CA" ]; then \
        printf '%s\n' "$EXTRA_CA" | awk '/BEGIN CERTIFICATE/ { n++ } n { print > ("/usr/local/share/ca-certificates/extra-" n ".crt") }'; \
        update-ca-certificates; \
    fi; \
    apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log; \
    groupadd --gid 10001 ews-relay; \
    useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/ews-relay \
        --shell /usr/sbin/nologin ews-relay; \
    install -d -o 10001 -g 10001 -m 0750 /var/lib/ews-relay /var/lib/ews-relay/certs /var/lib/ews-relay/state
COPY --from=binary /out/ews-relay /usr/local/bin/ews-relay
USER 10001:10001
WORKDIR /var/lib/ews-relay
# The admin endpoint must be reachable from the host for monitoring: publish 9090 to loopback or
# the inside network only. Shutdown grace 8 s: Docker's default stop timeout is 10 s, so even a
# plain `docker stop` leaves the relay time to finish requests in flight and exit 0 (the README's
# run line gives 15 s).
ENV EWS_RELAY_LISTEN=0.0.0.0:8443 \
    EWS_RELAY_ADMIN_LISTEN=0.0.0.0:9090 \
    EWS_RELAY_CERT_DIR=/var/lib/ews-relay/certs \
    EWS_RELAY_STATE_DIR=/var/lib/ews-relay/state \
    EWS_RELAY_SHUTDOWN_GRACE=8s \
    EWS_RELAY_LOG_FORMAT=json
VOLUME ["/var/lib/ews-relay/certs", "/var/lib/ews-relay/state"]
EXPOSE 8443 9090
# GET /healthz on the port EWS_RELAY_ADMIN_LISTEN names (change the admin address through that
# variable, not --admin-listen, so the check follows); bash's /dev/tcp keeps curl out of the image.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "h=${EWS_RELAY_ADMIN_LISTEN%:*}; h=${h#[}; h=${h%]}; case $h in 0.0.0.0|::|'') h=127.0.0.1;; esac; exec 3<>/dev/tcp/$h/${EWS_RELAY_ADMIN_LISTEN##*:} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r -t 2 _ code _ <&3 && [ \"$code\" = 200 ]"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ews-relay"]
