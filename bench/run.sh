#!/usr/bin/env bash
# ews-relay benchmark: the relay vs nginx vs HAProxy as TLS-terminating reverse
# proxies in front of the same backend, on loopback only.
#
#   bash bench/run.sh                   # all three (relay skipped if not built)
#   bash bench/run.sh nginx haproxy     # a subset
#   BIN=/path/to/ews-relay DURATION=20s CONNS=100 bash bench/run.sh relay nginx
#
# For each proxy, on a freshly started process:
#   1. check       two keep-alive POSTs through it must return 200 + SendNotificationResult OK
#   2. idle        open IDLE_CONNS idle TLS connections (handshake done, no request) from
#                  python3; VmRSS (summed over the proxy's processes) before/after, / N
#   3. keep-alive  wrk, CONNS keep-alive connections POSTing the SendNotification fixture
#   4. new-conn    wrk with "Connection: close": one full TLS handshake + 1 request per connection
# CPU per request/handshake = utime+stime delta of all the proxy's processes/threads
# (/proc/<pid>/stat, clock ticks = getconf CLK_TCK) over the wrk run / requests wrk completed.
#
# Fairness (also printed in the results):
#   * same ECDSA P-256 certificate, TLS 1.2 and 1.3 enabled on all three, same client
#     (wrk + OpenSSL 3), which negotiates TLS 1.3 / X25519 / AES-256-GCM unless TLS_MAX=1.2.
#   * wrk would silently resume TLS sessions on reconnect (it only SSL_clear()s its SSL
#     objects), which each proxy honours differently; an LD_PRELOAD shim (wrk-tls-shim.c)
#     forces a full handshake on every connection. RESUME=1 restores wrk's behaviour.
#   * one core for the proxy: nginx worker_processes 1, HAProxy nbthread 1, and (PIN=1,
#     default) every proxy is pinned with taskset to PROXY_CPU, wrk + backend + python
#     clients to CLIENT_CPU. The relay (tokio multi-thread) is run as is; tokio sizes its
#     worker pool from the CPU affinity, so pinned it gets 1 worker. Its thread count is
#     reported; RELAY_THREADS=n sets TOKIO_WORKER_THREADS. We compare CPU per request,
#     not raw throughput (which is bounded by the client sharing a core with the backend).
#   * same backend: one nginx (worker_processes 1) answering every POST with 200 and a
#     SendNotificationResult OK body; it is a separate process, outside the proxy's CPU
#     accounting. Proxies keep upstream connections alive (nginx upstream keepalive,
#     HAProxy http-reuse always, relay: its own pool); "upstream conns opened" is reported
#     from the backend's stub_status so pooling can be checked. nginx gets keepalive
#     max(32, CONNS) (NGINX_KEEPALIVE): with fewer idle slots than concurrent requests
#     it churns upstream connections.
#   * no access logs by default. ACCESS_LOG=1 enables them for all three: nginx access_log
#     to a file, HAProxy "log stdout" (stdout redirected to a file), relay RUST_LOG=info
#     (stdout to a file). Default relay RUST_LOG=warn.
#   * no request/connection limits that would add reconnects: keepalive_requests raised in
#     nginx (default 1000 would close wrk's connections), long idle timeouts everywhere.
#
# Environment knobs (defaults): DURATION (10s) CONNS (50) THREADS (1, wrk threads)
#   WARMUP (2s, unmeasured keep-alive wrk run) IDLE_CONNS (1000) PIN (1) CLIENT_CPU (0)
#   PROXY_CPU (1) ACCESS_LOG (0) RESUME (0) TLS_MAX (1.3 | 1.2) URL_PATH (/ews/notify)
#   SNI_HOST (localhost) PERF (0) WAIT_QUIET (120: seconds to wait, per proxy, for the host to be
#   < 10% busy; 0 = don't wait) NGINX_KEEPALIVE (max(32, CONNS))
#   BIN (target/release/ews-relay) RELAY_ARGS (below) RELAY_EXTRA_ARGS () RELAY_THREADS ()
#   OUT (bench/out)
#
# Noise: each run reports "other processes" = host CPU busy time (/proc/stat) minus the
# proxy, backend and wrk; runs above 15% of a core are flagged NOISY in the results.
#
# Everything listens on 127.0.0.1 on free ports picked at start; all processes started
# here are stopped on exit (trap). Results: stdout, OUT/results.txt, OUT/results.json,
# and a timestamped copy in OUT/history/.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT=${OUT:-$HERE/out}
BIN=${BIN:-$REPO/target/release/ews-relay}

# The relay command line. $PORT $BACKEND_PORT $ADMIN_PORT $CERT $KEY are expanded when it
# starts. Adjust here (or override RELAY_ARGS / append RELAY_EXTRA_ARGS) as flags change.
RELAY_ARGS=${RELAY_ARGS:-'--listen 127.0.0.1:$PORT --upstream http://127.0.0.1:$BACKEND_PORT --tls-cert $CERT --tls-key $KEY --allow 127.0.0.0/8 --admin-listen 127.0.0.1:$ADMIN_PORT --path-prefix / --max-connections 20000'}
RELAY_EXTRA_ARGS=${RELAY_EXTRA_ARGS:-}
RELAY_THREADS=${RELAY_THREADS:-}

DURATION=${DURATION:-10s}
CONNS=${CONNS:-50}
THREADS=${THREADS:-1}
WARMUP=${WARMUP:-2s}
IDLE_CONNS=${IDLE_CONNS:-1000}
PIN=${PIN:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
ACCESS_LOG=${ACCESS_LOG:-0}
RESUME=${RESUME:-0}
TLS_MAX=${TLS_MAX:-1.3}
URL_PATH=${URL_PATH:-/ews/notify}
# PERF=1: perf record -g each proxy during the measured runs, into OUT/work/NAME-{ka,nc}.perf.data
# (read with: perf report -i FILE --no-children). Profiling adds some CPU to the proxies.
PERF=${PERF:-0}
# Before each proxy, wait up to this many seconds for the (shared) host to be < 10% busy.
WAIT_QUIET=${WAIT_QUIET:-120}
# Host name in wrk's URL, hence its SNI (python clients send the same). Not an IP address:
# wrk puts the URL host in SNI verbatim and rustls logs a WARN line per handshake for an IP
# SNI, which would bill the relay for logging. Must resolve to loopback only.
SNI_HOST=${SNI_HOST:-localhost}
# nginx "keepalive N" caps the *idle* upstream connections kept per worker; with N < CONNS
# nginx closes and reopens upstream connections all the time (seen: 23k opened in 3 s with
# keepalive 32 and CONNS=50), which the relay and HAProxy (unbounded idle pools) don't do.
NGINX_KEEPALIVE=${NGINX_KEEPALIVE:-$((CONNS > 32 ? CONNS : 32))}

BODY=$HERE/send-notification-events.xml
OKBODY=$HERE/send-notification-result-ok.xml
PY=(python3 "$HERE/bench.py")
WORK=$OUT/work
CLK_TCK=$(getconf CLK_TCK)

log() { printf '%s\n' "$*" >&2; }
die() { log "run.sh: $*"; exit 1; }

# ------------------------------------------------------------------ which proxies
ALL=(relay nginx haproxy)
if (($# == 0)); then
    PROXIES=("${ALL[@]}")
    if [[ ! -x $BIN ]]; then
        log "relay binary $BIN not found (cargo build --release, or BIN=...): benchmarking nginx and haproxy only"
        PROXIES=(nginx haproxy)
    fi
else
    PROXIES=()
    for p in "$@"; do
        case $p in
            relay | nginx | haproxy) PROXIES+=("$p") ;;
            -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
            *) die "unknown proxy '$p' (relay | nginx | haproxy)" ;;
        esac
    done
    [[ " ${PROXIES[*]} " == *" relay "* && ! -x $BIN ]] && die "relay binary $BIN not found"
fi

for tool in wrk openssl python3 getconf; do command -v $tool >/dev/null || die "$tool not installed"; done
command -v nginx >/dev/null || die "nginx not installed (also used as the backend)"
[[ " ${PROXIES[*]} " == *" haproxy "* ]] && { command -v haproxy >/dev/null || die "haproxy not installed"; }

# ------------------------------------------------------------------ cleanup
STARTED=()
stop_pid() {
    local p=$1 i
    kill -TERM "$p" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        [[ -e /proc/$p ]] && ! grep -q ') Z' "/proc/$p/stat" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
    return 0
}
cleanup() {
    local p
    for p in "${STARTED[@]}"; do stop_pid "$p"; done
    STARTED=()
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------ setup
mkdir -p "$OUT/history"
rm -rf "$WORK"
mkdir -p "$WORK"

ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE=$(ulimit -n)
if ((NOFILE < IDLE_CONNS + 500)); then
    log "open-files limit $NOFILE: lowering IDLE_CONNS from $IDLE_CONNS to $((NOFILE - 500))"
    IDLE_CONNS=$((NOFILE - 500))
fi

if [[ $PIN == 1 ]] && (($(nproc) >= 2)); then
    PIN_CLIENT=(taskset -c "$CLIENT_CPU")
    PIN_PROXY=(taskset -c "$PROXY_CPU")
    PINNING="proxy on CPU $PROXY_CPU; wrk, backend, python clients on CPU $CLIENT_CPU"
else
    PIN_CLIENT=()
    PIN_PROXY=()
    PINNING="no CPU pinning"
fi

CERT=$WORK/cert.pem
KEY=$WORK/key.pem
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
    -keyout "$KEY" -out "$CERT" -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" >/dev/null 2>&1 || die "openssl req failed"
cat "$CERT" "$KEY" >"$WORK/haproxy-bundle.pem"

# wrk LD_PRELOAD shim: full handshake on every new connection (see wrk-tls-shim.c)
SHIM=$WORK/wrk-tls-shim.so
if ! ${CC:-cc} -O2 -shared -fPIC -o "$SHIM" "$HERE/wrk-tls-shim.c" -ldl 2>"$WORK/shim-build.log"; then
    log "could not build wrk-tls-shim.so (no C compiler?): new-connection runs may RESUME sessions"
    SHIM=
    RESUMPTION="NOT controlled (shim not built): wrk resumes sessions where the proxy allows"
elif [[ $RESUME == 1 ]]; then
    RESUMPTION="allowed (RESUME=1, wrk default: reconnects offer the previous session)"
else
    RESUMPTION="off (every connection is a full handshake)"
fi
export BENCH_TLS_RESUME=$RESUME BENCH_TLS_MAX=$TLS_MAX WRK_BODY=$BODY BENCH_SNI=$SNI_HOST
python3 -c '
import ipaddress, socket, sys
addrs = {ai[4][0] for ai in socket.getaddrinfo(sys.argv[1], 443, proto=socket.IPPROTO_TCP)}
bad = [a for a in addrs if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
sys.exit(f"SNI_HOST {sys.argv[1]} resolves to non-loopback {bad}" if bad else 0)' "$SNI_HOST" || die "refusing to run"

read -r BACKEND_PORT NGINX_PORT HAPROXY_PORT RELAY_PORT ADMIN_PORT < <("${PY[@]}" ports 5)

[[ $PERF == 1 ]] && { command -v perf >/dev/null || die "PERF=1 needs perf"; }
SETTINGS="$([[ $PERF == 1 ]] && echo 'PROFILED (PERF=1, CPU figures include perf overhead); ')wrk -t$THREADS -c$CONNS -d$DURATION (warm-up $WARMUP), POST $(wc -c <"$BODY") B SendNotification to $URL_PATH; idle conns $IDLE_CONNS; TLS max $TLS_MAX; resumption $RESUMPTION; $PINNING; access logs $([[ $ACCESS_LOG == 1 ]] && echo on || echo off)"
python3 -c 'import json, sys; json.dump(dict(zip(("when", "host", "settings", "git"), sys.argv[1:])), sys.stdout)' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), Linux $(uname -r), load avg $(cut -d' ' -f1-3 /proc/loadavg)" \
    "$SETTINGS" "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)" >"$WORK/meta.json"
log "settings: $SETTINGS"

# ------------------------------------------------------------------ backend
# nginx static responder: 200 + SendNotificationResult OK for any POST. "return" makes nginx
# discard (read) the request body first, so keep-alive POSTs work (checked below).
start_backend() {
    local d=$WORK/backend ok
    mkdir -p "$d"
    ok=$(tr -d '\n' <"$OKBODY" | sed 's/> *</></g')
    [[ $ok == *"'"* ]] && die "backend body must not contain a single quote"
    cat >"$d/nginx.conf" <<EOF
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 8000; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_buffer_size 64k;
    server {
        listen 127.0.0.1:$BACKEND_PORT;
        location = /__bench_status { stub_status; }
        location / {
            default_type "text/xml; charset=utf-8";
            return 200 '$ok';
        }
    }
}
EOF
    "${PIN_CLIENT[@]}" nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf" -g 'daemon off;' >"$d/stdout.log" 2>&1 &
    BACKEND_PID=$!
    STARTED+=("$BACKEND_PID")
    "${PY[@]}" wait-tcp "$BACKEND_PORT" "$BACKEND_PID" || die "backend nginx did not start: $(cat "$d/error.log")"
}

# ------------------------------------------------------------------ proxies
# Each start_* sets PID, PORT, VERSION, CONFIG and returns non-zero on failure.

start_nginx() {
    local d=$WORK/nginx al="access_log off;"
    mkdir -p "$d"
    [[ $ACCESS_LOG == 1 ]] && al="access_log $d/access.log;"
    cat >"$d/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections $((NOFILE / 2)); }
http {
    $al
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_header_timeout 300s;
    client_body_buffer_size 64k;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ecdh_curve X25519:prime256v1;
    upstream backend {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive $NGINX_KEEPALIVE;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT ssl;
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    PORT=$NGINX_PORT
    VERSION="$(nginx -v 2>&1 | sed 's/^nginx version: //'), $(nginx -V 2>&1 | grep -o 'OpenSSL [0-9.a-z]*' | tail -1) (running)"
    CONFIG="worker_processes 1, upstream keepalive $NGINX_KEEPALIVE, proxy_http_version 1.1"
    "${PIN_PROXY[@]}" nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf" -g 'daemon off;' >"$d/stdout.log" 2>&1 &
    PID=$!
    STARTED+=("$PID")
    "${PY[@]}" wait-tcp "$PORT" "$PID" || { log "$(cat "$d/error.log")"; return 1; }
}

start_haproxy() {
    local d=$WORK/haproxy glog="" dlog=""
    mkdir -p "$d"
    if [[ $ACCESS_LOG == 1 ]]; then
        glog="log stdout format raw local0"
        dlog=$'log global\n    option httplog'
    fi
    cat >"$d/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $(((NOFILE - 100) / 2))
    ssl-default-bind-options ssl-min-ver TLSv1.2
    $glog
defaults
    mode http
    $dlog
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 30s
    timeout http-request 300s
    timeout http-keep-alive 300s
frontend fe
    bind 127.0.0.1:$HAPROXY_PORT ssl crt $WORK/haproxy-bundle.pem curves X25519:P-256
    default_backend be
backend be
    server backend 127.0.0.1:$BACKEND_PORT
EOF
    PORT=$HAPROXY_PORT
    VERSION="HAProxy $(haproxy -v | head -1 | awk '{print $3}'), $(haproxy -vv 2>/dev/null | grep -m1 'Running on OpenSSL version' | sed 's/.*: //')"
    CONFIG="nbthread 1, http-reuse always"
    "${PIN_PROXY[@]}" haproxy -db -f "$d/haproxy.cfg" >"$d/stdout.log" 2>&1 &
    PID=$!
    STARTED+=("$PID")
    "${PY[@]}" wait-tcp "$PORT" "$PID" || { log "$(cat "$d/stdout.log")"; return 1; }
}

start_relay() {
    local d=$WORK/relay lvl=warn args
    mkdir -p "$d"
    [[ $ACCESS_LOG == 1 ]] && lvl=info
    PORT=$RELAY_PORT
    # expand $PORT $BACKEND_PORT $ADMIN_PORT $CERT $KEY in RELAY_ARGS
    eval "args=($RELAY_ARGS $RELAY_EXTRA_ARGS)"
    VERSION=$(timeout 5 "$BIN" --version 2>/dev/null | head -1)
    VERSION="${VERSION:-ews-relay} (rustls+ring)"
    CONFIG="RUST_LOG=$lvl${RELAY_THREADS:+, TOKIO_WORKER_THREADS=$RELAY_THREADS}; ${args[*]}"
    echo "$BIN ${args[*]}" >"$d/cmdline"
    "${PIN_PROXY[@]}" env RUST_LOG=$lvl ${RELAY_THREADS:+TOKIO_WORKER_THREADS=$RELAY_THREADS} \
        "$BIN" "${args[@]}" >"$d/stdout.log" 2>&1 &
    PID=$!
    STARTED+=("$PID")
    "${PY[@]}" wait-http "http://127.0.0.1:$ADMIN_PORT/healthz" "$PID" || { log "$(tail -20 "$d/stdout.log")"; return 1; }
}

write_info() { # name error
    # lines the proxy logged during the whole run (to spot per-request/per-handshake logging)
    local lines
    lines=$(cat "$WORK/$1"/*.log 2>/dev/null | wc -l)
    python3 -c 'import json,sys; json.dump(dict(version=sys.argv[1], config=sys.argv[2], error=sys.argv[3], log_lines=int(sys.argv[5])), open(sys.argv[4], "w"))' \
        "${VERSION:-}" "${CONFIG:-}" "$2" "$WORK/$1-info.json" "$lines"
}

run_wrk() { # name mode json [extra wrk args...]
    local name=$1 mode=$2 json=$3 perf=""
    shift 3
    [[ $PERF == 1 && $mode != warm-up ]] && perf=${json%.json}.perf.data
    "${PY[@]}" wrk --mode "$mode" --proxy-pid "$PID" --backend-pid "$BACKEND_PID" --perf "$perf" \
        --backend-port "$BACKEND_PORT" --clk-tck "$CLK_TCK" --out "$json" -- \
        "${PIN_CLIENT[@]}" env ${SHIM:+LD_PRELOAD=$SHIM} \
        wrk -t"$THREADS" -c"$CONNS" --latency -s "$HERE/wrk-post.lua" "$@" \
        "https://$SNI_HOST:$PORT$URL_PATH"
}

bench_one() {
    local name=$1
    PID= PORT= VERSION= CONFIG=
    log ""
    log "== $name"
    [[ $WAIT_QUIET != 0 ]] && "${PY[@]}" wait-quiet "$WAIT_QUIET"
    if ! "start_$name"; then
        write_info "$name" "failed to start"
        log "  $name failed to start; skipped"
        [[ -n $PID ]] && stop_pid "$PID"
        return
    fi
    log "  pid $PID, port $PORT, threads $(awk '{print $20}' "/proc/$PID/stat")"
    if ! "${PY[@]}" check --port "$PORT" --cafile "$CERT" --path "$URL_PATH" --body "$BODY" \
        --out "$WORK/$name-check.json"; then
        write_info "$name" "functional check failed (see $name-check.json)"
        stop_pid "$PID"
        return
    fi
    "${PIN_CLIENT[@]}" "${PY[@]}" idle --port "$PORT" --cafile "$CERT" --path "$URL_PATH" --body "$BODY" \
        --n "$IDLE_CONNS" --proxy-pid "$PID" --clk-tck "$CLK_TCK" --out "$WORK/$name-idle.json"
    sleep 1
    if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
        run_wrk "$name" warm-up "$WORK/$name-warmup.json" -d"$WARMUP" >/dev/null
    fi
    run_wrk "$name" keep-alive "$WORK/$name-ka.json" -d"$DURATION"
    sleep 1
    run_wrk "$name" new-conn "$WORK/$name-nc.json" -d"$DURATION" -H "Connection: close"
    stop_pid "$PID"
    write_info "$name" ""
    sleep 1
}

start_backend
log "backend nginx pid $BACKEND_PID port $BACKEND_PORT"
for p in "${PROXIES[@]}"; do
    bench_one "$p"
done
cleanup

log ""
cp "$WORK/meta.json" "$OUT/meta.json"
"${PY[@]}" report "$WORK" "${PROXIES[@]}" || die "report failed"
mv "$WORK/results.txt" "$WORK/results.json" "$OUT/"
stamp=$(date +%Y%m%d-%H%M%S)
cp "$OUT/results.txt" "$OUT/history/results-$stamp.txt"
cp "$OUT/results.json" "$OUT/history/results-$stamp.json"
log ""
log "written: $OUT/results.txt, $OUT/results.json (per-run logs and configs in $WORK)"
