# ews-relay container: multi-stage build, small non-root runtime image.
#
#   docker build -t ews-relay .
#   docker run -d --name ews-relay -p 443:443 \
#     -v /etc/ews-relay/tls:/tls:ro -v ews-relay-state:/var/lib/ews-relay/state \
#     -e EWS_RELAY_TLS_CERT=/tls/fullchain.pem -e EWS_RELAY_TLS_KEY=/tls/privkey.pem \
#     -e EWS_RELAY_UPSTREAM=http://10.0.0.5:10002 ews-relay
#
# Every flag is also an EWS_RELAY_* environment variable (see README).

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so code changes do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN cargo build --release --locked -p ews-relay --bin ews-relay

FROM debian:bookworm-slim
# ca-certificates: outbound HTTPS (Exchange, OAuth, endpoint lists) in managed mode.
# libcap2-bin: only to grant the binary the right to bind port 443 as a non-root user.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libcap2-bin \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/ews-relay --shell /usr/sbin/nologin ews-relay \
    && mkdir -p /var/lib/ews-relay/certs /var/lib/ews-relay/state \
    && chown -R ews-relay:ews-relay /var/lib/ews-relay
COPY --from=build /src/target/release/ews-relay /usr/local/bin/ews-relay
RUN setcap cap_net_bind_service=+ep /usr/local/bin/ews-relay \
    && apt-get purge -y libcap2-bin && apt-get autoremove -y
USER ews-relay
WORKDIR /var/lib/ews-relay
# Inside the container the admin endpoint must be reachable from the host for monitoring;
# publish 9090 only to the inside network, never to the internet.
ENV EWS_RELAY_ADMIN_LISTEN=0.0.0.0:9090 \
    EWS_RELAY_LOG_FORMAT=json \
    EWS_RELAY_CERT_DIR=/var/lib/ews-relay/certs
VOLUME ["/var/lib/ews-relay/certs", "/var/lib/ews-relay/state"]
EXPOSE 443 9090
# bash's /dev/tcp keeps the image free of curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ews-relay"]
