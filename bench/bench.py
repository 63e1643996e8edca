#!/usr/bin/env python3
"""Helpers for bench/run.sh (stdlib only, loopback only).

Subcommands:
  ports N                         print N currently free TCP ports on 127.0.0.1
  wait-tcp PORT PID [TIMEOUT]     wait until 127.0.0.1:PORT accepts (PID must stay alive)
  wait-http URL PID [TIMEOUT]     wait until GET URL answers 200 (PID must stay alive)
  wait-quiet MAX [BUSY]           wait up to MAX s until the host's CPUs are <= BUSY (0.10) busy
  check ...                       two keep-alive TLS POSTs through a proxy; verify 200 + SOAP OK body
  wrk ...                         run one wrk command, sample the proxy's CPU around it
  idle ...                        open N idle TLS connections, measure the proxy's RSS delta
  report OUTDIR NAME...           print/write the comparison table

CPU accounting: utime+stime from /proc/<pid>/stat (fields 14+15, in clock ticks),
summed over the proxy's whole process tree (nginx master + workers; the
process-level line already includes all threads, also exited ones).
Memory: VmRSS from /proc/<pid>/status summed over the same tree.
"""
import argparse
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time

HOST = "127.0.0.1"
# SNI sent by the python clients (wrk sends the URL's host, run.sh uses the same name):
# a host name as a real client would send; an IP address in SNI is illegal (RFC 6066) and
# rustls logs a warning for every such handshake.
SNI = os.environ.get("BENCH_SNI", "localhost")


class Conn(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 with SNI/verification against SNI."""

    def connect(self):
        raw = socket.create_connection((HOST, self.port), self.timeout)
        # as http.client does: it sends head and body in separate writes
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(raw, server_hostname=SNI)


# ---------------------------------------------------------------- /proc sampling

def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm (field 2) is in parentheses and may contain spaces
    return data[data.rindex(")") + 2:].split()


def tree_pids(root):
    """root and all its descendants (by ppid)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(_stat_fields(d)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [int(root)]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def sample(root):
    """{'ticks', 'threads', 'rss_kb', 'fds', 'pids'} summed over the tree of root."""
    ticks = sys_ticks = threads = rss = fds = 0
    pids = tree_pids(root) if root else []
    alive = []
    for p in pids:
        try:
            f = _stat_fields(p)
            ticks += int(f[11]) + int(f[12])     # utime + stime
            sys_ticks += int(f[12])
            threads += int(f[17])                # num_threads
            with open(f"/proc/{p}/status") as s:
                for line in s:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
            alive.append(p)
        except (OSError, ValueError, IndexError):
            continue
    return {"ticks": ticks, "sys_ticks": sys_ticks, "threads": threads, "rss_kb": rss, "fds": fds, "pids": alive}


def host_busy_ticks():
    """Busy clock ticks of the whole host (all CPUs) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal. "nice" (user time of niced processes,
    # e.g. a background `nice cargo build`) is left out: at nice 19 such work only soaks up
    # idle time and barely competes with the benchmark.
    return v[0] + v[2] + v[5] + v[6] + v[7]


def backend_status(port):
    """nginx stub_status of the backend: (accepted connections, requests)."""
    if not port:
        return None
    c = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        c.request("GET", "/__bench_status")
        body = c.getresponse().read().decode()
    finally:
        c.close()
    nums = body.splitlines()[2].split()
    return int(nums[0]), int(nums[2])


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------- TLS client

def client_ctx(cafile):
    ctx = ssl.create_default_context(cafile=cafile)   # verifies our bench certificate
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if os.environ.get("BENCH_TLS_MAX") == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def post(conn, path, body):
    conn.request("POST", path, body=body, headers={
        "Content-Type": "text/xml; charset=utf-8",
        "SOAPAction": '"http://schemas.microsoft.com/exchange/services/2006/messages/SendNotification"',
    })
    r = conn.getresponse()
    return r.status, r.getheader("Content-Type"), r.read()


# ---------------------------------------------------------------- subcommands

def cmd_ports(a):
    socks = []
    for _ in range(a.n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def cmd_wait_tcp(a):
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        if not pid_alive(a.pid):
            sys.exit(f"process {a.pid} exited before port {a.port} opened")
        try:
            socket.create_connection((HOST, a.port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"port {a.port} not accepting after {a.timeout}s")


def cmd_wait_http(a):
    deadline = time.monotonic() + a.timeout
    hp, _, path = a.url.split("://", 1)[1].partition("/")
    host, port = hp.rsplit(":", 1)
    last = None
    while time.monotonic() < deadline:
        if not pid_alive(a.pid):
            sys.exit(f"process {a.pid} exited before {a.url} answered")
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=1)
            c.request("GET", "/" + path)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == 200:
                return
            last = r.status
        except OSError as e:
            last = e
        time.sleep(0.05)
    sys.exit(f"{a.url} not healthy after {a.timeout}s (last: {last})")


def cmd_wait_quiet(a):
    """Wait (at most a.max seconds) until the host is nearly idle over a 2 s window."""
    deadline = time.monotonic() + a.max
    next_note = 0
    while True:
        def snap():
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            return sum(v), v[1] + v[3] + v[4]     # nice + idle + iowait count as quiet
        t0, i0 = snap()
        time.sleep(2)
        t1, i1 = snap()
        busy = 1 - (i1 - i0) / max(1, t1 - t0)
        if busy <= a.busy:
            return
        if time.monotonic() > deadline:
            print(f"  host still {busy*100:.0f}% busy after waiting {a.max:.0f}s; running anyway",
                  file=sys.stderr)
            return
        if time.monotonic() >= next_note:
            print(f"  host {busy*100:.0f}% busy (other workloads); waiting up to "
                  f"{deadline - time.monotonic():.0f}s more for it to calm down", file=sys.stderr)
            next_note = time.monotonic() + 30


def cmd_check(a):
    """Two POSTs over one keep-alive TLS connection; both must be 200 + SOAP OK."""
    body = open(a.body, "rb").read()
    res = {"ok": False}
    try:
        c = Conn(HOST, a.port, timeout=10, context=client_ctx(a.cafile))
        c.connect()
        res["tls_version"] = c.sock.version()
        res["cipher"] = c.sock.cipher()[0]
        statuses = []
        for _ in range(2):
            st, ct, rb = post(c, a.path, body)
            statuses.append(st)
            res["content_type"] = ct
            res["body_ok"] = b"SendNotificationResult" in rb and b">OK<" in rb
            if st != 200:
                res["body"] = rb[:300].decode(errors="replace")
        res["statuses"] = statuses
        # a keep-alive reuse would fail on the 2nd request if the proxy closed the connection
        res["ok"] = statuses == [200, 200] and res["body_ok"]
        c.close()
    except Exception as e:  # noqa: BLE001 - report anything
        res["error"] = repr(e)
    json.dump(res, open(a.out, "w"))
    print(f"  check: {json.dumps(res)}", file=sys.stderr)
    sys.exit(0 if res["ok"] else 1)


def cmd_wrk(a):
    """Run the wrk command after '--', sampling proxy/backend CPU right around it."""
    clk = a.clk_tck
    env = dict(os.environ, WRK_JSON=a.out + ".wrk.json")
    try:
        os.unlink(env["WRK_JSON"])
    except FileNotFoundError:
        pass
    bs0 = backend_status(a.backend_port)
    p0, b0 = sample(a.proxy_pid), sample(a.backend_pid)
    h0 = host_busy_ticks()
    t0 = time.monotonic()
    perf = None
    if a.perf:   # profile the proxy's processes (all threads) while wrk runs
        perf = subprocess.Popen(["perf", "record", "-q", "-F", "499", "-g", "-o", a.perf,
                                 "-p", ",".join(map(str, p0["pids"]))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(a.out + ".wrk.txt", "w") as log:
        log.write("$ " + " ".join(a.command) + "\n")
        log.flush()
        proc = subprocess.Popen(a.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    if perf:
        perf.send_signal(2)   # SIGINT: perf writes its file and exits
        perf.wait(timeout=60)
    h1 = host_busy_ticks()
    p1, b1 = sample(a.proxy_pid), sample(a.backend_pid)
    bs1 = backend_status(a.backend_port)
    try:
        w = json.load(open(env["WRK_JSON"]))
    except (OSError, ValueError):
        sys.exit(f"wrk produced no summary (exit {proc.returncode}); see {a.out}.wrk.txt")
    proxy_us = (p1["ticks"] - p0["ticks"]) * 1e6 / clk
    backend_us = (b1["ticks"] - b0["ticks"]) * 1e6 / clk
    n = w["requests"]
    res = {
        "mode": a.mode,
        "requests": n,
        "rps": n / (w["duration_us"] / 1e6),
        "errors": w["errors"],
        "latency_us": w["latency_us"],
        "proxy_cpu_us": proxy_us,
        "proxy_cpu_ticks": p1["ticks"] - p0["ticks"],
        "proxy_sys_frac": ((p1["sys_ticks"] - p0["sys_ticks"]) / (p1["ticks"] - p0["ticks"])
                           if p1["ticks"] > p0["ticks"] else None),
        "cpu_us_per_req": proxy_us / n if n else None,
        "proxy_util": proxy_us / 1e6 / wall,
        "proxy_threads": max(p0["threads"], p1["threads"]),
        "proxy_processes": len(p1["pids"]),
        "backend_util": backend_us / 1e6 / wall,
        "wrk_util": (ru.ru_utime + ru.ru_stime) / wall,
        # CPU used on the host by anything but proxy, backend and wrk (noise), in cores;
        # niced processes not counted
        "other_util": ((h1 - h0) / clk - proxy_us / 1e6 - backend_us / 1e6
                       - (ru.ru_utime + ru.ru_stime)) / wall,
        "upstream_conns_opened": (bs1[0] - bs0[0]) if bs0 and bs1 else None,
        "backend_requests": (bs1[1] - bs0[1] - 1) if bs0 and bs1 else None,
        "wall_s": wall,
        "wrk_exit": proc.returncode,
    }
    json.dump(res, open(a.out, "w"), indent=1)
    e = w["errors"]
    errs = sum(e.values())
    print(f"  {a.mode}: {res['rps']:.0f} req/s, {res['cpu_us_per_req']:.1f} CPU us/req, "
          f"proxy {res['proxy_util']*100:.0f}% ({res['proxy_threads']} threads), "
          f"backend {res['backend_util']*100:.0f}%, wrk {res['wrk_util']*100:.0f}%, "
          f"other {max(0, res['other_util'])*100:.0f}%, upstream conns opened {res['upstream_conns_opened']}, "
          f"errors {errs}" + (f" {e}" if errs else ""), file=sys.stderr)


def _sock_open(s):
    """True if the server has not closed this (idle) connection."""
    dup = socket.socket(fileno=os.dup(s.fileno()))
    try:
        dup.setblocking(False)
        return dup.recv(1, socket.MSG_PEEK) != b""   # data (e.g. TLS 1.3 tickets) = still open
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        dup.close()


def cmd_idle(a):
    """Open N idle TLS connections (handshake done, no request); RSS delta / N."""
    ctx = client_ctx(a.cafile)
    body = open(a.body, "rb").read()
    clk = a.clk_tck
    # warm-up: a few complete requests so lazy one-time allocations are not counted
    for _ in range(a.warmup):
        c = Conn(HOST, a.port, timeout=10, context=ctx)
        post(c, a.path, body)
        c.close()
    time.sleep(a.settle)
    s0 = sample(a.proxy_pid)
    conns, failed = [], 0
    t0 = time.monotonic()
    for _ in range(a.n):
        try:
            raw = socket.create_connection((HOST, a.port), timeout=10)
            conns.append(ctx.wrap_socket(raw, server_hostname=SNI))   # blocking handshake
        except OSError as e:
            failed += 1
            if failed == 1:
                print(f"  idle: connection failed: {e!r}", file=sys.stderr)
            if failed > 20:
                break
    t_open = time.monotonic() - t0
    s_open = sample(a.proxy_pid)
    time.sleep(a.settle)      # let the proxy finish the last handshakes (TLS 1.3 Finished, tickets)
    s1 = sample(a.proxy_pid)
    alive = sum(1 for s in conns if _sock_open(s))
    n = len(conns)
    tls = (conns[0].version(), conns[0].cipher()[0]) if conns else (None, None)
    for s in conns:
        s.close()
    res = {
        "n_requested": a.n,
        "n_open": n,
        "n_alive_at_measure": alive,
        "failed": failed,
        "rss_before_kb": s0["rss_kb"],
        "rss_after_kb": s1["rss_kb"],
        "kib_per_conn": (s1["rss_kb"] - s0["rss_kb"]) / n if n else None,
        "fds_before": s0["fds"],
        "fds_after": s1["fds"],
        "open_seconds": t_open,
        # second, rough estimate of handshake cost: proxy CPU while python opened the conns
        # (sequential, unloaded; 1 tick = 10 ms so +-1 tick quantisation)
        "open_cpu_us_per_conn": (s_open["ticks"] - s0["ticks"]) * 1e6 / clk / n if n else None,
        "tls_version": tls[0],
        "cipher": tls[1],
    }
    json.dump(res, open(a.out, "w"), indent=1)
    print(f"  idle: {n} conns open ({alive} alive at measurement, fds {s0['fds']}->{s1['fds']}), "
          f"RSS {s0['rss_kb']} -> {s1['rss_kb']} KiB = {res['kib_per_conn']:.1f} KiB/conn; "
          f"opened in {t_open:.1f}s, ~{res['open_cpu_us_per_conn']:.0f} proxy CPU us/handshake", file=sys.stderr)
    if alive < n:
        print(f"  idle: WARNING {n - alive} connections were closed by the proxy before measurement",
              file=sys.stderr)


# ---------------------------------------------------------------- report

METRICS = [
    # key, label, fmt, better ("hi"/"lo")
    ("ka_rps", "keep-alive req/s", "{:.0f}", "hi"),
    ("ka_cpu", "keep-alive CPU us/request", "{:.1f}", "lo"),
    ("nc_rps", "new-conn req/s (1 req/conn)", "{:.0f}", "hi"),
    ("nc_cpu", "new-conn CPU us/handshake (+1 req)", "{:.1f}", "lo"),
    ("hs_cpu", "  handshake alone (new-conn - ka)", "{:.1f}", "lo"),
    ("idle_kib", "idle TLS conn RSS KiB/conn", "{:.1f}", "lo"),
]


def _load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def cmd_report(a):
    out = a.outdir
    rows, details, meta = {}, [], _load(os.path.join(out, "meta.json")) or {}
    noisy = []
    for name in a.names:
        ka = _load(os.path.join(out, f"{name}-ka.json"))
        nc = _load(os.path.join(out, f"{name}-nc.json"))
        idle = _load(os.path.join(out, f"{name}-idle.json"))
        chk = _load(os.path.join(out, f"{name}-check.json"))
        info = _load(os.path.join(out, f"{name}-info.json")) or {}
        r = {
            "ka_rps": ka and ka["rps"], "ka_cpu": ka and ka["cpu_us_per_req"],
            "nc_rps": nc and nc["rps"], "nc_cpu": nc and nc["cpu_us_per_req"],
            "idle_kib": idle and idle["kib_per_conn"],
        }
        r["hs_cpu"] = (r["nc_cpu"] - r["ka_cpu"]) if r["nc_cpu"] and r["ka_cpu"] else None
        rows[name] = r
        d = [f"{name}: {info.get('version', '?')}; {info.get('config', '')}"]
        if chk:
            d.append(f"  TLS {chk.get('tls_version')} {chk.get('cipher')}; check "
                     f"{'OK' if chk.get('ok') else 'FAILED ' + json.dumps(chk)}")
        if "log_lines" in info:
            d.append(f"  log lines written by the proxy during the run: {info['log_lines']}")
        if info.get("error"):
            d.append(f"  ERROR: {info['error']}")
        for run in (ka, nc):
            if not run:
                continue
            if run["other_util"] > 0.15:
                noisy.append(f"{name} {run['mode']} ({run['other_util']*100:.0f}%)")
            e = run["errors"]
            if sum(e.values()):
                noisy.append(f"{name} {run['mode']} had wrk errors {e}")
            d.append(
                f"  {run['mode']}: {run['requests']} requests, proxy CPU {run['proxy_util']*100:.0f}% "
                f"of one core ({run['proxy_processes']} proc, {run['proxy_threads']} threads, "
                f"{run['proxy_sys_frac']*100:.0f}% of it in kernel), "
                f"backend {run['backend_util']*100:.0f}%, wrk {run['wrk_util']*100:.0f}%, "
                f"other processes {max(0, run['other_util'])*100:.0f}%{' (NOISY)' if run['other_util'] > 0.15 else ''}, "
                f"p50/p99 {run['latency_us']['p50']/1000:.2f}/{run['latency_us']['p99']/1000:.2f} ms, "
                f"upstream conns opened {run['upstream_conns_opened']}, "
                f"errors {'none' if not sum(e.values()) else e}")
        if idle:
            d.append(f"  idle: {idle['n_open']}/{idle['n_requested']} conns "
                     f"({idle['n_alive_at_measure']} still open at measurement), RSS "
                     f"{idle['rss_before_kb']} -> {idle['rss_after_kb']} KiB, "
                     f"~{idle['open_cpu_us_per_conn']:.0f} CPU us/handshake while opening them unloaded")
        details.append("\n".join(d))

    def fmt(v, f):
        return f.format(v) if isinstance(v, (int, float)) else "-"

    names = list(rows)
    peers = [n for n in names if n != "relay"]
    have_relay = "relay" in rows and any(v is not None for v in rows["relay"].values())
    hdr = ["metric"] + names
    if have_relay:
        hdr += [f"relay/{p}" for p in peers]
        if len(peers) > 1:
            hdr += ["relay/best"]
    table = [hdr]
    ratios = {}
    for key, label, f, better in METRICS:
        line = [label] + [fmt(rows[n][key], f) for n in names]
        if have_relay:
            rv = rows["relay"][key]
            vals = [rows[p][key] for p in peers]
            for p, v in zip(peers, vals):
                ratio = rv / v if rv and v else None
                ratios.setdefault(key, {})[p] = ratio
                line.append(fmt(ratio, "{:.2f}x"))
            if len(peers) > 1:
                good = [v for v in vals if v]
                best = (max(good) if better == "hi" else min(good)) if good else None
                ratio = rv / best if rv and best else None
                ratios.setdefault(key, {})["best"] = ratio
                line.append(fmt(ratio, "{:.2f}x"))
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(hdr))]
    lines = []
    for i, r in enumerate(table):
        lines.append("  ".join(c.ljust(widths[0]) if j == 0 else c.rjust(widths[j])
                               for j, c in enumerate(r)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))

    text = []
    text.append("ews-relay bench: " + meta.get("when", ""))
    text.append("host: " + meta.get("host", ""))
    text.append("settings: " + meta.get("settings", ""))
    text.append("")
    text.extend(lines)
    text.append("")
    if have_relay:
        text.append("ratios are relay/peer: for req/s above 1 means the relay is faster; for CPU and "
                    "memory below 1 means the relay uses less. 'best' = the better of the peers per metric.")
    text.append("CPU = utime+stime of the proxy's processes (/proc/<pid>/stat) during the wrk run / "
                "requests wrk completed. new-conn = one full TLS handshake (no resumption) + 1 request "
                "per connection; 'handshake alone' = new-conn minus keep-alive. idle = VmRSS delta / N "
                "idle TLS connections.")
    text.append("Fairness: one core each where pinned, 1 nginx worker, 1 HAProxy thread, same cert "
                "(ECDSA P-256), TLS 1.2+1.3, same backend with upstream keep-alive, no access logs "
                "unless ACCESS_LOG=1. req/s depends on client/backend sharing a core: compare CPU/req.")
    if noisy:
        text.append("WARNING: other processes used > 15% of a core (or wrk saw errors) during: "
                    + "; ".join(noisy) + ". Numbers from these runs are unreliable; rerun.")
    text.append("")
    text.extend(details)
    report = "\n".join(text) + "\n"
    print(report, end="")
    with open(os.path.join(out, "results.txt"), "w") as f:
        f.write(report)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": rows, "ratios": ratios}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ports"); p.add_argument("n", type=int); p.set_defaults(f=cmd_ports)
    p = sub.add_parser("wait-tcp"); p.add_argument("port", type=int); p.add_argument("pid", type=int)
    p.add_argument("timeout", type=float, nargs="?", default=30); p.set_defaults(f=cmd_wait_tcp)
    p = sub.add_parser("wait-http"); p.add_argument("url"); p.add_argument("pid", type=int)
    p.add_argument("timeout", type=float, nargs="?", default=30); p.set_defaults(f=cmd_wait_http)
    p = sub.add_parser("wait-quiet"); p.add_argument("max", type=float)
    p.add_argument("busy", type=float, nargs="?", default=0.10); p.set_defaults(f=cmd_wait_quiet)
    for name, fn in (("check", cmd_check), ("idle", cmd_idle)):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--cafile", required=True)
        p.add_argument("--path", default="/")
        p.add_argument("--body", required=True)
        p.add_argument("--out", required=True)
        p.set_defaults(f=fn)
        if name == "idle":
            p.add_argument("--n", type=int, default=1000)
            p.add_argument("--proxy-pid", type=int, required=True)
            p.add_argument("--clk-tck", type=int, default=os.sysconf("SC_CLK_TCK"))
            p.add_argument("--warmup", type=int, default=10)
            p.add_argument("--settle", type=float, default=2.0)
    p = sub.add_parser("wrk")
    p.add_argument("--mode", required=True)
    p.add_argument("--proxy-pid", type=int, required=True)
    p.add_argument("--backend-pid", type=int, default=0)
    p.add_argument("--backend-port", type=int, default=0)
    p.add_argument("--clk-tck", type=int, default=os.sysconf("SC_CLK_TCK"))
    p.add_argument("--out", required=True)
    p.add_argument("--perf", default="", help="perf record the proxy into this file")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(f=cmd_wrk)
    p = sub.add_parser("report"); p.add_argument("outdir"); p.add_argument("names", nargs="+")
    p.set_defaults(f=cmd_report)
    a = ap.parse_args()
    if getattr(a, "command", None) and a.command[0] == "--":
        a.command = a.command[1:]
    a.f(a)


if __name__ == "__main__":
    main()
