//! Scale benchmark of managed mode, everything in one process on 127.0.0.1: the EWS simulator
//! (plain-HTTP EWS, HTTPS pushes trusting the relay's rcgen certificate), the relay in managed
//! mode (`ews_relay::run`, state directory on real disk), a switchable hyper receiver, and a
//! second relay in passthrough mode as the yardstick.
//!
//! ```sh
//! cargo run --release --example managed_scale                      # 10,000 mailboxes, ~3-4 min
//! cargo run --release --example managed_scale -- --mailboxes 2000 --notifications 5000
//! cargo run --release --example managed_scale -- --help            # every knob
//! ```
//!
//! Phases, timed by polling state (never by sleeping for a guessed time):
//!
//! 1. **subscribe**: a fresh relay with `--mailboxes-file` of N mailboxes; time until the
//!    simulator has a live subscription for every mailbox ("live"), and until every one has had
//!    its first push (the StatusEvent, over HTTPS) answered `OK` by the relay ("confirmed").
//!    Run once per `--also-ews` value (subscribe only, then that relay is stopped and its
//!    subscriptions dropped), then with `--max-concurrent-ews`, which the other phases use.
//! 2. **recovery**: `drop_all_subscriptions()` (Exchange silently forgets every subscription);
//!    time until every mailbox is live and confirmed again. The relay only notices after
//!    `--heartbeat-timeout` of silence, so the time after that timeout is reported too.
//! 3. **notifications**: M SendNotification bodies (one NewMailEvent each, carrying the relay's
//!    live subscription ids and valid watermarks), POSTed over `--connections` HTTPS keep-alive
//!    connections (each connection owns a disjoint set of mailboxes, so per-mailbox order is the
//!    client's), to (a) the managed relay with the receiver up (direct delivery), (c) a
//!    passthrough relay (no managed flags) in front of the same receiver, with the same bodies
//!    and the same client, and (b) the managed relay with the receiver down (every
//!    notification spooled, fsync group commit), then the replay rate once it is back up.
//!    Direct POSTs rather than simulator pushes: the simulator opens one TLS connection per
//!    push, as Exchange does, so its throughput measures handshakes, and it cannot push to a
//!    relay that did not subscribe, so it could not drive the passthrough yardstick at all.
//!    (d) `--sim-events` adds the realistic path: one event created in each of K mailboxes at
//!    once, so K pushes (K new TLS connections) are in flight; time until the receiver has
//!    them all.
//!
//! The keep-alive load is the simulator's `--status-period` (one new TLS connection per
//! mailbox per period), not `--status-frequency` (which only sets Exchange's retry budget and
//! the relay's default heartbeat timeout); the period must stay below `--heartbeat-timeout`
//! or the relay resubscribes everything. The machine is shared: compare the ratios (managed
//! over passthrough, same client, same moment), and run it more than once.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use ews::EventType;
use ews_sim::soap::{send_notification, PushEvent};
use ews_sim::{CallbackTrust, SimConfig, SimHandle};

const PREFIX: &str = "/ews";
const CALLBACK_PATH: &str = "/ews/push";
/// How often phase conditions are polled.
const POLL: Duration = Duration::from_millis(100);
/// How often progress is printed while waiting.
const PROGRESS: Duration = Duration::from_secs(5);

const RESULT_OK: &str = r#"<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><m:SendNotificationResult xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"><m:SubscriptionStatus>OK</m:SubscriptionStatus></m:SendNotificationResult></soap:Body></soap:Envelope>"#;

#[derive(Debug, Parser)]
#[command(about = "Scale benchmark of ews-relay's managed mode against the EWS simulator")]
struct Args {
    /// Mailboxes to keep subscribed.
    #[arg(long, default_value_t = 10_000)]
    mailboxes: usize,
    /// Notifications per throughput run (a, b, c).
    #[arg(long, default_value_t = 20_000)]
    notifications: usize,
    /// Client HTTPS keep-alive connections for the throughput runs.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// `--max-concurrent-ews` of the relay used for every phase.
    #[arg(long, default_value_t = 8)]
    max_concurrent_ews: usize,
    /// Other `--max-concurrent-ews` values to time the subscribe phase with first
    /// (comma-separated; empty to skip).
    #[arg(long, default_value = "27", value_parser = parse_list)]
    also_ews: std::vec::Vec<usize>,
    /// The relay's `--status-frequency` (minutes): Exchange's retry budget.
    #[arg(long, default_value_t = 30)]
    status_frequency: u16,
    /// The relay's `--heartbeat-timeout`: the floor of the recovery time.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// The simulator's keep-alive period (sets the keep-alive load: N / period new TLS
    /// connections per second); must be below --heartbeat-timeout.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    status_period: Duration,
    /// Mailboxes that get one simulator-created event each in phase (d); 0 skips it.
    #[arg(long, default_value_t = 2_000)]
    sim_events: usize,
    /// Where the state directories go (must be real disk for fsync to mean anything); a
    /// temporary directory under it is removed at the end.
    #[arg(long, default_value = "target")]
    state_parent: PathBuf,
    /// Longest wait for any one phase.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    phase_timeout: Duration,
    /// Skip the recovery phase.
    #[arg(long)]
    skip_recovery: bool,
}

fn parse_list(s: &str) -> Result<Vec<usize>, std::num::ParseIntError> {
    s.split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::parse)
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.status_period >= args.heartbeat_timeout {
        bail!(
            "--status-period must be below --heartbeat-timeout, or every subscription looks lost"
        );
    }
    if args.mailboxes == 0 || args.connections == 0 || args.notifications == 0 {
        bail!("--mailboxes, --connections and --notifications must be positive");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();

    std::fs::create_dir_all(&args.state_parent)?;
    let work = tempfile::Builder::new()
        .prefix("managed-scale-")
        .tempdir_in(&args.state_parent)?;
    let n = args.mailboxes;
    let mailboxes: Vec<String> = (0..n)
        .map(|i| format!("user{i:05}@scale.example"))
        .collect();
    let mailboxes_file = work.path().join("mailboxes.txt");
    std::fs::write(&mailboxes_file, mailboxes.join("\n") + "\n")?;
    let cert = Cert::generate(work.path())?;

    println!("managed-mode scale benchmark: {}", now_rfc3339());
    println!(
        "host: {} CPUs, load avg {}; state on {} ",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        work.path().display(),
    );
    println!(
        "settings: {n} mailboxes, {} notifications x {} connections, --max-concurrent-ews {} (also {:?} for subscribe), --status-frequency {}, --heartbeat-timeout {:?}, simulator keep-alive every {:?} (= {:.0} TLS connections/s)",
        args.notifications,
        args.connections,
        args.max_concurrent_ews,
        args.also_ews,
        args.status_frequency,
        args.heartbeat_timeout,
        args.status_period,
        n as f64 / args.status_period.as_secs_f64(),
    );

    // The simulator.
    let mut sim_config = SimConfig::new(mailboxes.iter().cloned());
    sim_config.status_period = args.status_period;
    // Exchange's retry schedule (30 s doubling within StatusFrequency minutes) scaled down, so
    // subscriptions of a stopped relay end within seconds.
    sim_config.time_factor = 0.01;
    sim_config.push_timeout = Duration::from_secs(30);
    sim_config.callback_trust = CallbackTrust::Roots(vec![cert.der.clone()]);
    let sim = SimHandle::new(sim_config)?;
    let sim_listener = TcpListener::bind("127.0.0.1:0").await?;
    let (sim_stop, sim_stop_rx) = oneshot::channel::<()>();
    let sim_task = tokio::spawn(sim.clone().serve(sim_listener, async {
        let _ = sim_stop_rx.await;
    }));

    let receiver = Receiver::start().await?;
    let mut report = Report::default();

    // 1. Subscribe, once per extra concurrency, then with the main one (which stays).
    for &c in &args.also_ews {
        let relay = Relay::start_managed(
            &args,
            c,
            &cert,
            &sim,
            &receiver,
            &mailboxes_file,
            work.path(),
        )
        .await?;
        let r = subscribe_phase(&sim, n, c, args.phase_timeout).await;
        print_metrics(&relay, "after subscribe").await;
        report.subscribe.push((c, r));
        let t = Instant::now();
        relay.stop().await;
        let dropped = sim.drop_all_subscriptions();
        println!(
            "  relay (--max-concurrent-ews {c}) stopped in {:.1} s; {dropped} of its subscriptions dropped in the simulator",
            t.elapsed().as_secs_f64()
        );
    }
    let c = args.max_concurrent_ews;
    let relay = Relay::start_managed(
        &args,
        c,
        &cert,
        &sim,
        &receiver,
        &mailboxes_file,
        work.path(),
    )
    .await?;
    let r = subscribe_phase(&sim, n, c, args.phase_timeout).await;
    print_metrics(&relay, "after subscribe").await;
    report.subscribe.push((c, r));

    // 2. Recovery.
    if !args.skip_recovery {
        report.recovery = Some(
            recovery_phase(
                &sim,
                n,
                args.heartbeat_timeout,
                args.phase_timeout + args.heartbeat_timeout,
            )
            .await,
        );
        print_metrics(&relay, "after recovery").await;
    }

    // 3. Notifications.
    let live = live_by_mailbox(&sim);
    let covered = mailboxes.iter().filter(|m| live.contains_key(*m)).count();
    println!("\n[3] notifications: {covered}/{n} mailboxes have a live subscription to address");
    let bodies = build_bodies(&mailboxes, &live, args.notifications, args.connections);
    let passthrough = Relay::start_passthrough(&cert, &receiver, work.path()).await?;

    receiver.set_down(false);
    let before = receiver.ok();
    let a = drive("(a) managed, receiver up", relay.addr, &cert.der, &bodies).await;
    let delivered = receiver.ok() - before;
    println!("    receiver got {delivered} (direct deliveries)");
    report.managed_up = Some(a);

    let before = receiver.ok();
    let cpass = drive("(c) passthrough", passthrough.addr, &cert.der, &bodies).await;
    println!("    receiver got {}", receiver.ok() - before);
    report.passthrough = Some(cpass);

    if args.sim_events > 0 {
        report.sim_events = Some(
            sim_events_phase(
                &sim,
                &receiver,
                &mailboxes,
                args.sim_events,
                args.phase_timeout,
            )
            .await,
        );
    }

    receiver.set_down(true);
    let spooled_before = metric(&relay, "ews_relay_deliveries_total{outcome=\"spooled\"}").await;
    let b = drive(
        "(b) managed, receiver down (spooled)",
        relay.addr,
        &cert.der,
        &bodies,
    )
    .await;
    let spooled =
        metric(&relay, "ews_relay_deliveries_total{outcome=\"spooled\"}").await - spooled_before;
    println!("    relay spooled {spooled:.0}");
    report.managed_down = Some(b);
    report.replay = Some(replay_phase(&relay, &receiver, spooled as u64, args.phase_timeout).await);
    print_metrics(&relay, "after replay").await;

    passthrough.stop().await;
    let t = Instant::now();
    relay.stop().await;
    println!(
        "\nmanaged relay stopped in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = sim_stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), sim_task).await;

    report.print(&args);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Phases

/// What a subscribe or recovery phase measured.
#[derive(Debug, Clone, Default)]
struct Coverage {
    /// Every mailbox had a live subscription.
    live: Option<Duration>,
    /// Every mailbox's subscription had a push answered OK.
    confirmed: Option<Duration>,
    /// The first new subscription appeared.
    first: Option<Duration>,
    /// Reached at the end (when it timed out).
    final_live: usize,
    final_confirmed: usize,
    cpu: CpuUse,
}

/// Mailboxes with a live subscription, and with a live one whose push was answered OK.
fn coverage(sim: &SimHandle) -> (usize, usize) {
    let mut live = std::collections::HashSet::new();
    let mut confirmed = std::collections::HashSet::new();
    for s in sim.subscriptions() {
        if s.is_live() {
            if s.counters.pushes_ok > 0 {
                confirmed.insert(s.mailbox.clone());
            }
            live.insert(s.mailbox);
        }
    }
    (live.len(), confirmed.len())
}

async fn wait_coverage(sim: &SimHandle, n: usize, timeout: Duration, label: &str) -> Coverage {
    let start = Instant::now();
    let cpu = CpuMark::now();
    let mut out = Coverage::default();
    let mut last_print = Instant::now();
    loop {
        let (live, confirmed) = coverage(sim);
        let t = start.elapsed();
        if out.first.is_none() && live > 0 {
            out.first = Some(t);
        }
        if out.live.is_none() && live >= n {
            out.live = Some(t);
        }
        if confirmed >= n {
            out.confirmed = Some(t);
        }
        out.final_live = live;
        out.final_confirmed = confirmed;
        if out.confirmed.is_some() || t >= timeout {
            break;
        }
        if last_print.elapsed() >= PROGRESS {
            last_print = Instant::now();
            println!(
                "    {label}: {:5.1} s  live {live}/{n}  confirmed {confirmed}/{n}",
                t.as_secs_f64()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    out.cpu = cpu.since();
    if out.confirmed.is_none() {
        println!(
            "    {label}: TIMED OUT after {:?}: live {}/{n}, confirmed {}/{n}",
            timeout, out.final_live, out.final_confirmed
        );
    }
    out
}

async fn subscribe_phase(sim: &SimHandle, n: usize, c: usize, timeout: Duration) -> Coverage {
    println!("\n[1] subscribe {n} mailboxes, --max-concurrent-ews {c}");
    let r = wait_coverage(sim, n, timeout, "subscribe").await;
    println!(
        "    all live after {}, all confirmed after {} ({}), {}",
        secs(r.live),
        secs(r.confirmed),
        rate(n, r.confirmed, "subscribes/s"),
        r.cpu
    );
    r
}

async fn recovery_phase(
    sim: &SimHandle,
    n: usize,
    heartbeat: Duration,
    timeout: Duration,
) -> Coverage {
    println!(
        "\n[2] recovery: simulator drops all subscriptions; --heartbeat-timeout {heartbeat:?}"
    );
    let dropped = sim.drop_all_subscriptions();
    println!("    dropped {dropped}");
    let r = wait_coverage(sim, n, timeout, "recovery").await;
    println!(
        "    first resubscribe after {}, all live after {}, all confirmed after {} ({} after the heartbeat timeout), {}",
        secs(r.first),
        secs(r.live),
        secs(r.confirmed),
        secs(r.confirmed.map(|t| t.saturating_sub(heartbeat))),
        r.cpu
    );
    r
}

/// Mailbox → (live subscription id, its last watermark).
fn live_by_mailbox(sim: &SimHandle) -> HashMap<String, (String, String)> {
    sim.subscriptions()
        .into_iter()
        .filter(|s| s.is_live())
        .map(|s| (s.mailbox, (s.id, s.previous_watermark)))
        .collect()
}

/// The notification bodies per client connection: connection j owns mailboxes j, j + C, …
/// and sends its share of M round-robin over them.
fn build_bodies(
    mailboxes: &[String],
    live: &HashMap<String, (String, String)>,
    m: usize,
    conns: usize,
) -> Vec<Vec<Bytes>> {
    let usable: Vec<(&String, &(String, String))> = mailboxes
        .iter()
        .filter_map(|mb| live.get(mb).map(|l| (mb, l)))
        .collect();
    let conns = conns.min(usable.len().max(1));
    let mut out = vec![Vec::new(); conns];
    if usable.is_empty() {
        return out;
    }
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    for i in 0..m {
        let (_, (id, watermark)) = usable[i % usable.len()];
        let event = PushEvent {
            kind: EventType::NewMail,
            watermark: watermark.clone(),
            timestamp: Some(stamp.clone()),
            item_id: Some(format!("AAMkADscale{i:08}")),
            parent_folder_id: Some("AAMkADscaleInbox".into()),
        };
        let body = send_notification(id, watermark, false, &[event]);
        out[(i % usable.len()) % conns].push(Bytes::from(body));
    }
    out
}

/// What one client run measured.
#[derive(Debug, Clone, Default)]
struct Throughput {
    sent: usize,
    ok: usize,
    errors: usize,
    elapsed: Duration,
    cpu: CpuUse,
    p50_ms: f64,
    p99_ms: f64,
}

impl Throughput {
    fn per_sec(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// POST every body over one keep-alive HTTPS connection per list, all lists at once.
async fn drive(
    label: &str,
    addr: SocketAddr,
    cert: &CertificateDer<'static>,
    bodies: &[Vec<Bytes>],
) -> Throughput {
    let total: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "\n  {label}: {total} notifications over {} connections",
        bodies.len()
    );
    let tls = client_tls(cert);
    // Connect everything first: the handshakes are not what is measured.
    let mut senders = Vec::new();
    for _ in bodies {
        match https_connect(addr, tls.clone()).await {
            Ok(s) => senders.push(s),
            Err(e) => {
                println!("    connect failed: {e}");
                return Throughput::default();
            }
        }
    }
    let done = Arc::new(AtomicU64::new(0));
    let cpu = CpuMark::now();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (mut sender, list) in senders.into_iter().zip(bodies.iter().cloned()) {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            let mut errors = 0usize;
            let mut lat = Vec::with_capacity(list.len());
            for body in list {
                let t = Instant::now();
                let req = Request::post(CALLBACK_PATH)
                    .header("host", "localhost")
                    .header("content-type", "text/xml; charset=utf-8")
                    .body(Full::new(body))
                    .expect("request");
                let good = async {
                    sender.ready().await.ok()?;
                    let resp = sender.send_request(req).await.ok()?;
                    let status = resp.status();
                    let body = resp.into_body().collect().await.ok()?.to_bytes();
                    Some(status == StatusCode::OK && memchr_ok(&body))
                }
                .await;
                lat.push(t.elapsed());
                match good {
                    Some(true) => ok += 1,
                    Some(false) => errors += 1,
                    None => {
                        errors += 1;
                        break;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (ok, errors, lat)
        }));
    }
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROGRESS).await;
                println!(
                    "    {:5.1} s  {}/{total}",
                    start.elapsed().as_secs_f64(),
                    done.load(Ordering::Relaxed)
                );
            }
        })
    };
    let mut out = Throughput {
        sent: total,
        ..Default::default()
    };
    let mut lat = Vec::new();
    for t in tasks {
        if let Ok((ok, errors, l)) = t.await {
            out.ok += ok;
            out.errors += errors;
            lat.extend(l);
        }
    }
    out.elapsed = start.elapsed();
    progress.abort();
    out.cpu = cpu.since();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    out.p50_ms = pct(0.50);
    out.p99_ms = pct(0.99);
    println!(
        "    {} OK, {} errors in {:.2} s: {:.0} notifications/s, p50/p99 {:.1}/{:.1} ms, {}",
        out.ok,
        out.errors,
        out.elapsed.as_secs_f64(),
        out.per_sec(),
        out.p50_ms,
        out.p99_ms,
        out.cpu
    );
    out
}

fn memchr_ok(body: &[u8]) -> bool {
    body.windows(b">OK<".len()).any(|w| w == b">OK<")
}

/// What the spool replay measured.
#[derive(Debug, Clone, Default)]
struct Replay {
    expected: u64,
    delivered: u64,
    /// Receiver back up → first replayed delivery (the replay task's back-off).
    first: Option<Duration>,
    /// Receiver back up → all delivered.
    all: Option<Duration>,
    cpu: CpuUse,
}

impl Replay {
    /// Drain rate from the first to the last replayed delivery.
    fn per_sec(&self) -> Option<f64> {
        let span = self.all?.saturating_sub(self.first?);
        Some(self.delivered as f64 / span.as_secs_f64().max(1e-3))
    }
}

async fn replay_phase(
    relay: &Relay,
    receiver: &Receiver,
    expected: u64,
    timeout: Duration,
) -> Replay {
    println!("\n  replay: receiver back up, waiting for {expected} spooled notifications");
    let before = receiver.ok();
    let cpu = CpuMark::now();
    receiver.set_down(false);
    let start = Instant::now();
    let mut out = Replay {
        expected,
        ..Default::default()
    };
    let mut last_print = Instant::now();
    loop {
        let got = receiver.ok() - before;
        let t = start.elapsed();
        if got > 0 && out.first.is_none() {
            out.first = Some(t);
        }
        out.delivered = got;
        if got >= expected {
            out.all = Some(t);
            break;
        }
        if t >= timeout {
            println!("    TIMED OUT after {timeout:?}: {got}/{expected} replayed");
            break;
        }
        if last_print.elapsed() >= PROGRESS {
            last_print = Instant::now();
            let depth = metric(relay, "ews_relay_spool_depth").await;
            println!(
                "    {:5.1} s  replayed {got}/{expected}, spool depth gauge {depth:.0}",
                t.as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out.cpu = cpu.since();
    println!(
        "    first replayed after {}, all after {}: {} (first to last), {}",
        secs(out.first),
        secs(out.all),
        out.per_sec()
            .map_or("-".into(), |r| format!("{r:.0} notifications/s")),
        out.cpu
    );
    out
}

/// What the simulator-driven run measured.
#[derive(Debug, Clone, Default)]
struct SimEvents {
    pushes: usize,
    delivered: u64,
    elapsed: Option<Duration>,
    cpu: CpuUse,
}

async fn sim_events_phase(
    sim: &SimHandle,
    receiver: &Receiver,
    mailboxes: &[String],
    k: usize,
    timeout: Duration,
) -> SimEvents {
    let k = k.min(mailboxes.len());
    println!("\n  (d) simulator: one NewMailEvent in each of {k} mailboxes at once ({k} pushes, each a new TLS connection)");
    let before = receiver.ok();
    let cpu = CpuMark::now();
    let start = Instant::now();
    for m in &mailboxes[..k] {
        if let Err(e) = sim.create_events(m, EventType::NewMail, 1) {
            println!("    create_events({m}): {e}");
        }
    }
    let created = start.elapsed();
    let mut out = SimEvents {
        pushes: k,
        ..Default::default()
    };
    let mut last_print = Instant::now();
    loop {
        let got = receiver.ok() - before;
        out.delivered = got;
        if got >= k as u64 {
            out.elapsed = Some(start.elapsed());
            break;
        }
        if start.elapsed() >= timeout {
            println!("    TIMED OUT: {got}/{k}");
            break;
        }
        if last_print.elapsed() >= PROGRESS {
            last_print = Instant::now();
            println!("    {:5.1} s  {got}/{k}", start.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out.cpu = cpu.since();
    println!(
        "    events created in {:.2} s; all {} at the receiver after {}: {}, {}",
        created.as_secs_f64(),
        out.delivered,
        secs(out.elapsed),
        rate(k, out.elapsed, "pushes/s"),
        out.cpu
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Debug, Default)]
struct Report {
    subscribe: Vec<(usize, Coverage)>,
    recovery: Option<Coverage>,
    managed_up: Option<Throughput>,
    passthrough: Option<Throughput>,
    managed_down: Option<Throughput>,
    replay: Option<Replay>,
    sim_events: Option<SimEvents>,
}

impl Report {
    fn print(&self, args: &Args) {
        let n = args.mailboxes;
        println!("\n==================== summary ====================");
        println!(
            "{n} mailboxes, heartbeat timeout {:?}, simulator keep-alive period {:?}",
            args.heartbeat_timeout, args.status_period
        );
        for (c, r) in &self.subscribe {
            println!(
                "subscribe (--max-concurrent-ews {c:>2}): all live {:>8}, all confirmed {:>8}  {:>18}  {}",
                secs(r.live),
                secs(r.confirmed),
                rate(n, r.confirmed, "subscribes/s"),
                r.cpu
            );
        }
        if let Some(r) = &self.recovery {
            println!(
                "recovery after drop-all:           all confirmed {:>8} = heartbeat timeout + {}; first resubscribe at {}, {} from first to last; {}",
                secs(r.confirmed),
                secs(r.confirmed.map(|t| t.saturating_sub(args.heartbeat_timeout))),
                secs(r.first),
                rate(n, r.confirmed.zip(r.first).map(|(c, f)| c.saturating_sub(f)), "resubscribes/s"),
                r.cpu
            );
        }
        let base = self.passthrough.as_ref().map(Throughput::per_sec);
        let ratio = |v: f64| base.map_or("-".into(), |b| format!("{:.2}x", v / b));
        println!("\nthroughput ({} connections, same bodies)   notif/s   vs passthrough   p50/p99 ms   not OK", args.connections);
        let line = |name: &str, t: &Option<Throughput>| {
            if let Some(t) = t {
                println!(
                    "  {name:<38} {:>8.0}   {:>14}   {:>5.1}/{:<6.1} {}",
                    t.per_sec(),
                    ratio(t.per_sec()),
                    t.p50_ms,
                    t.p99_ms,
                    t.sent - t.ok
                );
            }
        };
        line("(c) passthrough", &self.passthrough);
        line("(a) managed, receiver up (direct)", &self.managed_up);
        line("(b) managed, receiver down (spooled)", &self.managed_down);
        if let Some(r) = &self.replay {
            let v = r.per_sec().unwrap_or(0.0);
            println!(
                "  {:<38} {:>8.0}   {:>14}   first replay {} after the receiver came back; {}/{} replayed",
                "replay of the spool",
                v,
                ratio(v),
                secs(r.first),
                r.delivered,
                r.expected
            );
        }
        if let Some(s) = &self.sim_events {
            println!(
                "  (d) simulator pushes, 1 TLS conn each: {} ({} pushes, {} at the receiver)",
                rate(s.pushes, s.elapsed, "pushes/s"),
                s.pushes,
                s.delivered
            );
        }
        println!("\nCPU = this process (client, simulator, relays, receiver) as % of one core; host = all CPUs busy, % of one core. The machine is shared: compare ratios, rerun.");
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

fn rate(n: usize, d: Option<Duration>, unit: &str) -> String {
    d.map_or("-".into(), |d| {
        format!("{:.0} {unit}", n as f64 / d.as_secs_f64().max(1e-3))
    })
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// CPU used by this process and by the whole host between two marks.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    process_pct: f64,
    host_pct: f64,
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPU: process {:.0}%, host {:.0}%",
            self.process_pct, self.host_pct
        )
    }
}

struct CpuMark {
    at: Instant,
    process: u64,
    host: u64,
}

impl CpuMark {
    fn now() -> Self {
        Self {
            at: Instant::now(),
            process: process_ticks(),
            host: host_busy_ticks(),
        }
    }

    fn since(&self) -> CpuUse {
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        // Linux's USER_HZ is 100 on every architecture that matters here.
        let pct = |ticks: u64| ticks as f64 / 100.0 / wall * 100.0;
        CpuUse {
            process_pct: pct(process_ticks().saturating_sub(self.process)),
            host_pct: pct(host_busy_ticks().saturating_sub(self.host)),
        }
    }
}

/// utime + stime of this process, in clock ticks.
fn process_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// Busy ticks of all CPUs (everything but idle and iowait).
fn host_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    v.iter().sum::<u64>() - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Relay, receiver, certificate, clients

struct Cert {
    cert_path: PathBuf,
    key_path: PathBuf,
    der: CertificateDer<'static>,
}

impl Cert {
    fn generate(dir: &Path) -> anyhow::Result<Cert> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        let cert = params.self_signed(&key)?;
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(Cert {
            cert_path,
            key_path,
            der: cert.der().clone(),
        })
    }
}

/// A receiver answering `OK`, or 503 while switched down; counts both.
struct Receiver {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
}

impl Receiver {
    async fn start() -> anyhow::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let down = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (d, o) = (down.clone(), ok.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (d, o) = (d.clone(), o.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (d, o) = (d.clone(), o.clone());
                        async move {
                            let _ = req.into_body().collect().await;
                            let resp = if d.load(Ordering::Relaxed) {
                                Response::builder()
                                    .status(StatusCode::SERVICE_UNAVAILABLE)
                                    .body(Full::new(Bytes::from_static(b"down")))
                            } else {
                                o.fetch_add(1, Ordering::Relaxed);
                                Response::builder()
                                    .header("content-type", "text/xml; charset=utf-8")
                                    .body(Full::new(Bytes::from_static(RESULT_OK.as_bytes())))
                            };
                            Ok::<_, Infallible>(resp.expect("response"))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Receiver { addr, down, ok })
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }
}

/// A relay running in-process with `ews_relay::run`.
struct Relay {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), ews_relay::StartError>>,
}

impl Relay {
    async fn start_managed(
        args: &Args,
        max_concurrent_ews: usize,
        cert: &Cert,
        sim: &SimHandle,
        receiver: &Receiver,
        mailboxes_file: &Path,
        work: &Path,
    ) -> anyhow::Result<Relay> {
        let state = tempfile::Builder::new()
            .prefix("state-")
            .tempdir_in(work)?
            .keep();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let words: Vec<String> = [
            "--ews-url",
            &sim.ews_url(),
            "--auth",
            "none",
            "--mailboxes-file",
            &mailboxes_file.display().to_string(),
            "--callback-url",
            &format!("https://localhost:{port}{CALLBACK_PATH}"),
            "--state-dir",
            &state.display().to_string(),
            "--status-frequency",
            &args.status_frequency.to_string(),
            "--heartbeat-timeout",
            &format!("{}ms", args.heartbeat_timeout.as_millis()),
            "--max-concurrent-ews",
            &max_concurrent_ews.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        println!(
            "\nmanaged relay on 127.0.0.1:{port}, state {}",
            state.display()
        );
        Self::start(listener, cert, receiver, &words).await
    }

    async fn start_passthrough(
        cert: &Cert,
        receiver: &Receiver,
        work: &Path,
    ) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let state = work.join("passthrough-state");
        let words = vec!["--state-dir".to_owned(), state.display().to_string()];
        Self::start(listener, cert, receiver, &words).await
    }

    async fn start(
        listener: TcpListener,
        cert: &Cert,
        receiver: &Receiver,
        extra: &[String],
    ) -> anyhow::Result<Relay> {
        let addr = listener.local_addr()?;
        let mut words: Vec<String> = [
            "ews-relay",
            "--upstream",
            &format!("http://{}", receiver.addr),
            "--tls-cert",
            &cert.cert_path.display().to_string(),
            "--tls-key",
            &cert.key_path.display().to_string(),
            "--allow",
            "127.0.0.0/8",
            "--path-prefix",
            PREFIX,
            "--shutdown-grace",
            "1s",
            "--max-connections",
            "20000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        words.extend(extra.iter().cloned());
        let config = ews_relay::Config::parse_from(&words).map_err(|e| anyhow::anyhow!("{e}"))?;
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        let admin_addr = admin.local_addr()?;
        let (stop, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(ews_relay::run(
            ews_relay::Listeners {
                relay: Some(listener),
                admin,
            },
            config,
            async {
                let _ = rx.await;
            },
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(
            admin_get(admin_addr, "/healthz").await,
            Ok((StatusCode::OK, _))
        ) {
            if handle.is_finished() {
                bail!("the relay stopped while starting: {:?}", handle.await);
            }
            if Instant::now() > deadline {
                bail!("the relay never became healthy");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Relay {
            addr,
            admin: admin_addr,
            stop,
            handle,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(120), self.handle).await {
            Ok(Ok(Ok(()))) => {}
            Ok(r) => println!("  relay ended badly: {r:?}"),
            Err(_) => println!("  relay did not stop within 120 s"),
        }
    }
}

/// One sample from the relay's `/metrics` (exact series name with labels), 0 when absent.
async fn metric(relay: &Relay, series: &str) -> f64 {
    let Ok((_, text)) = admin_get(relay.admin, "/metrics").await else {
        return 0.0;
    };
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Print the managed-mode metrics that tell what the relay did.
async fn print_metrics(relay: &Relay, when: &str) {
    let Ok((_, text)) = admin_get(relay.admin, "/metrics").await else {
        println!("    (metrics unavailable)");
        return;
    };
    let wanted = [
        "ews_relay_mailboxes{",
        "ews_relay_subscribes_total",
        "ews_relay_resubscribes_total",
        "ews_relay_deliveries_total",
        "ews_relay_spool_depth",
        "ews_relay_upstream_errors_total",
        "ews_relay_open_connections",
        "ews_relay_tls_handshake_failures_total",
    ];
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && wanted.iter().any(|w| l.starts_with(w)))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    println!(
        "    relay metrics {when} (mailbox gauges refresh every 5 s): {}",
        lines.join("; ")
    );
}

async fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(StatusCode, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .map_err(std::io::Error::other)?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn client_tls(cert: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).expect("certificate");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn https_connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addr).await.context("connect")?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await
        .context("TLS")?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
