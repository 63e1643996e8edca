#!/usr/bin/env bash
# Keep-alive CPU per request of the relay, nginx and HAProxy taking turns under the same load,
# round after round, so that a noisy neighbour's burst spreads over all three instead of
# landing on the one proxy `run.sh` happened to be measuring. On a shared host this is the
# fairer keep-alive comparison; `run.sh` measures more (handshakes, idle memory) once each.
#
#   bash bench/run.sh                 # first: it leaves certificate, configs and wrk shim
#   bash bench/interleave.sh          # then: 4 rounds, 8 s per proxy per round
#   ROUNDS=6 DURATION=10s CONNS=50 BIN=target/release/ews-relay bash bench/interleave.sh
#
# Same pinning and load as run.sh: proxy on PROXY_CPU (1), wrk and the backend on CLIENT_CPU
# (0); wrk POSTs send-notification-events.xml over CONNS keep-alive connections after a 2 s
# warm-up. CPU = utime+stime of the proxy's processes over the run / requests wrk completed.
# Everything listens on 127.0.0.1 on fresh free ports; every process started here is stopped
# on exit.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
WORK=${OUT:-$HERE/out}/work
BIN=${BIN:-$REPO/target/release/ews-relay}
ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-8s}
CONNS=${CONNS:-50}
PROXY_CPU=${PROXY_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
TCK=$(getconf CLK_TCK)

die() { echo "interleave.sh: $*" >&2; exit 1; }
for f in cert.pem key.pem haproxy-bundle.pem backend/nginx.conf nginx/nginx.conf haproxy/haproxy.cfg; do
    [[ -e $WORK/$f ]] || die "$WORK/$f missing: run bench/run.sh first"
done
[[ -x $BIN ]] || die "$BIN not built (cargo build --release)"
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
BACKEND_PORT=$(port)
PROXY_PORT=$(port)
ADMIN_PORT=$(port)

D=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT
mkdir -p "$D/backend" "$D/nginx"

# run.sh's configs, moved to fresh ports and this run's directory.
sed -e "s#$WORK/backend#$D/backend#g" -e "s#listen 127.0.0.1:[0-9]*;#listen 127.0.0.1:$BACKEND_PORT;#" \
    "$WORK/backend/nginx.conf" >"$D/backend/nginx.conf"
sed -e "s#$WORK/nginx#$D/nginx#g" -e "s#server 127.0.0.1:[0-9]*;#server 127.0.0.1:$BACKEND_PORT;#" \
    -e "s#listen 127.0.0.1:[0-9]* ssl;#listen 127.0.0.1:$PROXY_PORT ssl;#" \
    "$WORK/nginx/nginx.conf" >"$D/nginx/nginx.conf"
sed -e "s#bind 127.0.0.1:[0-9]* ssl#bind 127.0.0.1:$PROXY_PORT ssl#" \
    -e "s#server backend 127.0.0.1:[0-9]*#server backend 127.0.0.1:$BACKEND_PORT#" \
    "$WORK/haproxy/haproxy.cfg" >"$D/haproxy.cfg"

taskset -c "$CLIENT_CPU" nginx -p "$D/backend" -e "$D/backend/error.log" -c "$D/backend/nginx.conf" \
    -g 'daemon off;' >/dev/null 2>&1 &
PIDS+=($!)

start() {
    case $1 in
    relay) RUST_LOG=warn taskset -c "$PROXY_CPU" "$BIN" --listen "127.0.0.1:$PROXY_PORT" \
        --upstream "http://127.0.0.1:$BACKEND_PORT" --tls-cert "$WORK/cert.pem" \
        --tls-key "$WORK/key.pem" --allow 127.0.0.0/8 --admin-listen "127.0.0.1:$ADMIN_PORT" \
        --path-prefix / --max-connections 20000 >/dev/null 2>&1 & ;;
    nginx) taskset -c "$PROXY_CPU" nginx -p "$D/nginx" -e "$D/nginx/error.log" \
        -c "$D/nginx/nginx.conf" -g 'daemon off;' >/dev/null 2>&1 & ;;
    haproxy) taskset -c "$PROXY_CPU" haproxy -f "$D/haproxy.cfg" >/dev/null 2>&1 & ;;
    esac
    PID=$!
    for _ in $(seq 50); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $PROXY_PORT), 0.2)" \
            2>/dev/null && return 0
        sleep 0.1
    done
    die "$1 did not start listening"
}

# utime+stime, in ticks, of $PID and its children (nginx's workers).
cpu() {
    local t=0 p
    for p in $PID $(pgrep -P "$PID" || true); do
        t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo $t
}

load() { # duration -> requests completed
    WRK_BODY="$HERE/send-notification-events.xml" LD_PRELOAD="$WORK/wrk-tls-shim.so" \
        taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"$1" -s "$HERE/wrk-post.lua" \
        "https://127.0.0.1:$PROXY_PORT/ews/notify" | awk '/requests in/ {print $1}'
}

echo "interleaved keep-alive CPU us/request: $ROUNDS rounds, $DURATION per proxy, $CONNS connections"
printf '%-6s %8s %8s %8s %11s\n' round relay nginx haproxy relay/best
RATIOS=()
for round in $(seq "$ROUNDS"); do
    declare -A US=()
    for proxy in relay nginx haproxy; do
        start $proxy
        load 2s >/dev/null
        before=$(cpu)
        requests=$(load "$DURATION")
        after=$(cpu)
        kill "$PID"; wait "$PID" 2>/dev/null || true
        sleep 0.5
        US[$proxy]=$(python3 -c "print(f'{($after - $before) / $TCK * 1e6 / $requests:.2f}')")
    done
    ratio=$(python3 -c "print(f'{${US[relay]} / min(${US[nginx]}, ${US[haproxy]}):.2f}')")
    RATIOS+=("$ratio")
    printf '%-6s %8s %8s %8s %10sx\n' "$round" "${US[relay]}" "${US[nginx]}" "${US[haproxy]}" "$ratio"
done
python3 -c "import statistics; r = [${RATIOS[*]/%/,}]; print(f'relay/best median {statistics.median(r):.2f}x (min {min(r):.2f}x, max {max(r):.2f}x)')"
