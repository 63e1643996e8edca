//! How many mailboxes one relay follows by EWS streaming on this machine, and what each
//! `GetStreamingEvents` connection costs in CPU and memory.
//!
//! The EWS simulator and a counting receiver run in this process on 127.0.0.1; the relay runs
//! as its own process (the release binary, `--transport streaming --listen none`), so its CPU
//! ticks and resident memory are read from `/proc/<pid>` alone. Two runs: one mailbox (the
//! baseline: runtime, store, TLS roots), then N; memory per connection and per mailbox is the
//! difference over the difference.
//!
//! ```sh
//! cargo build --release && cargo run --release --example stream_scale -- 5000
//! EWS_RELAY_BIN=target/release/ews-relay cargo run --release --example stream_scale -- 1000 20
//! ```
//! Arguments: mailboxes (default 2000), idle seconds measured (default 20).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use ews::EventType;
use ews_sim::{SimConfig, SimHandle};

/// Linux's USER_HZ.
const TICKS_PER_SEC: f64 = 100.0;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(2000), |a| a.parse())?;
    let idle: u64 = args.next().map_or(Ok(20), |a| a.parse())?;
    let bin = std::env::var("EWS_RELAY_BIN").unwrap_or_else(|_| "target/release/ews-relay".into());
    let received = Arc::new(AtomicU64::new(0));
    let receiver = receiver(received.clone()).await?;

    let base = run(&bin, 1, idle.min(10), receiver, &received).await?;
    let full = run(&bin, n, idle, receiver, &received).await?;
    let d_rss = full.rss_kib.saturating_sub(base.rss_kib) as f64;
    println!("\n# EWS streaming: {n} mailboxes, one relay process ({bin})");
    println!("host: {} CPUs", std::thread::available_parallelism()?.get());
    println!(
        "all {n} mailboxes streamed after {:.1}s, over {} connections (groups of <= 200)",
        full.ready.as_secs_f64(),
        full.connections
    );
    println!(
        "resident memory: {} KiB with 1 mailbox, {} KiB with {n} → {:.0} KiB per connection, {:.1} KiB per mailbox",
        base.rss_kib,
        full.rss_kib,
        d_rss / (full.connections.saturating_sub(base.connections)).max(1) as f64,
        d_rss / (n.saturating_sub(1)).max(1) as f64
    );
    println!(
        "idle (keep-alives only) for {idle}s: {:.2}% of one CPU → {:.3} ms CPU per connection per minute",
        full.idle_cpu_pct,
        full.idle_cpu_pct / 100.0 * 60_000.0 / full.connections.max(1) as f64
    );
    println!(
        "one event in each of the {n} mailboxes: delivered in {:.2}s, {:.3} ms relay CPU per event",
        full.events_time.as_secs_f64(),
        full.events_cpu_ms / n as f64
    );
    Ok(())
}

struct Measured {
    ready: Duration,
    connections: usize,
    rss_kib: u64,
    idle_cpu_pct: f64,
    events_time: Duration,
    events_cpu_ms: f64,
}

async fn run(
    bin: &str,
    n: usize,
    idle: u64,
    receiver: SocketAddr,
    received: &AtomicU64,
) -> anyhow::Result<Measured> {
    let names: Vec<String> = (0..n)
        .map(|i| format!("user{i:05}@contoso.example"))
        .collect();
    let mut config = SimConfig::new(names.iter().cloned());
    config.streaming_keepalive = Duration::from_secs(5);
    let sim = SimHandle::new(config)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let (stop_sim, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(sim.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("mailboxes.txt");
    std::fs::write(&file, names.join("\n"))?;
    let admin = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let started = Instant::now();
    let mut child = std::process::Command::new(bin)
        .args([
            "--transport",
            "streaming",
            "--listen",
            "none",
            "--auth",
            "none",
        ])
        .args(["--autodiscover-url", &sim.autodiscover_url()])
        .args(["--mailboxes-file", file.to_str().unwrap_or_default()])
        .args(["--state-dir", dir.path().to_str().unwrap_or_default()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--upstream", &format!("http://{receiver}")])
        .args(["--max-concurrent-ews", "16", "--log-format", "json"])
        .stdout(std::fs::File::create(dir.path().join("relay.log"))?)
        .spawn()?;
    let pid = child.id();
    let all_served = |h: &SimHandle| {
        let conns = h.streaming_connections();
        let serving: usize = conns
            .iter()
            .filter(|c| c.open)
            .map(|c| c.serving.len())
            .sum();
        (serving >= n).then(|| conns.iter().filter(|c| c.open).count())
    };
    let Some(connections) = sim.wait_until(Duration::from_secs(300), all_served).await else {
        let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default();
        let _ = child.kill();
        anyhow::bail!("not every mailbox streamed within 5 minutes; relay log:\n{log}");
    };
    let ready = started.elapsed();

    // Settle, then idle: only keep-alives flow.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = ticks(pid);
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let idle_cpu_pct =
        (ticks(pid) - t0) as f64 / TICKS_PER_SEC / w0.elapsed().as_secs_f64() * 100.0;
    let rss_kib = rss_kib(pid);

    // One event in every mailbox.
    let before = received.load(Ordering::Relaxed);
    let t0 = ticks(pid);
    let w0 = Instant::now();
    for m in &names {
        sim.create_events(m, EventType::NewMail, 1)?;
    }
    while received.load(Ordering::Relaxed) < before + n as u64 {
        anyhow::ensure!(
            w0.elapsed() < Duration::from_secs(600),
            "events not delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events_time = w0.elapsed();
    let events_cpu_ms = (ticks(pid) - t0) as f64 / TICKS_PER_SEC * 1000.0;

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    let _ = stop_sim.send(());
    let _ = served.await;
    Ok(Measured {
        ready,
        connections,
        rss_kib,
        idle_cpu_pct,
        events_time,
        events_cpu_ms,
    })
}

/// utime + stime of `pid`, in clock ticks.
fn ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// VmRSS of `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A receiver that answers 200 to everything and counts the notifications with events.
async fn receiver(count: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let count = count.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        if body.is_ok_and(|b| !b.is_empty()) {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}
