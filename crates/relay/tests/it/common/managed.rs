//! Managed-mode lab: the EWS simulator, a relay in managed mode and a switchable test receiver,
//! all on loopback ephemeral ports with real TLS (the simulator trusts the relay's rcgen
//! certificate, as Exchange trusts a public one).
//!
//! The relay's callback URL must name its own port, so its TLS listener is bound before the
//! command line is built; a restart binds the same port again, which Exchange's pushes (here
//! the simulator's) keep calling.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use ews::{parse_send_notification, EventType};
use ews_sim::soap::{parse_subscribe, ParsedSubscribe};
use ews_sim::{CallbackTrust, RecordedRequest, SimConfig, SimHandle, SubscriptionInfo};

use crate::common::{admin_get, test_cert, Seen, TestCert, TestReceiver};

/// The relay's path prefix, and the callback path under it.
pub const PREFIX: &str = "/ews";
pub const CALLBACK_PATH: &str = "/ews/push";
/// The relay's Graph path prefix, and the Graph callback paths under it.
pub const GRAPH_PREFIX: &str = "/graph";
pub const GRAPH_CALLBACK_PATH: &str = "/graph/notify";
pub const GRAPH_LIFECYCLE_PATH: &str = "/graph/lifecycle";
/// Keep-alive period of the simulator: Exchange's StatusFrequency, scaled down.
pub const STATUS_PERIOD: Duration = Duration::from_millis(200);
/// The relay's `--heartbeat-timeout` unless a test says otherwise: several keep-alive periods,
/// so a slow CI machine does not lose a subscription by accident.
pub const HEARTBEAT: Duration = Duration::from_millis(1500);
/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running simulator.
pub struct Sim {
    pub handle: SimHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ews_sim::SimError>>>,
}

impl Sim {
    pub async fn start(config: SimConfig) -> Sim {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = SimHandle::new(config).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(handle.clone().serve(listener, async {
            let _ = rx.await;
        }));
        Sim {
            handle,
            stop: Some(tx),
            task: Some(task),
        }
    }
}

impl std::ops::Deref for Sim {
    type Target = SimHandle;
    fn deref(&self) -> &SimHandle {
        &self.handle
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The simulator set-up the tests start from: `mailboxes`, fast keep-alives, Exchange's retry
/// schedule scaled down 100 times (a StatusFrequency of 1 minute gives 0.6 s of retries),
/// trusting the relay's certificate.
pub fn sim_config(mailboxes: &[&str], relay_cert: &CertificateDer<'static>) -> SimConfig {
    let mut c = SimConfig::new(mailboxes.iter().copied());
    c.status_period = STATUS_PERIOD;
    c.time_factor = 0.01;
    c.push_timeout = Duration::from_secs(3);
    c.callback_trust = CallbackTrust::Roots(vec![relay_cert.clone()]);
    c
}

/// A receiver that answers `OK` (a SendNotificationResult, so pass-through works too) or,
/// while switched down, 503; it keeps what it accepted apart from what it refused.
pub struct Receiver {
    pub inner: TestReceiver,
    down: Arc<AtomicBool>,
    /// Mailboxes (`X-EWS-Mailbox`) whose deliveries are answered 503 while the rest are not.
    refused: Arc<Mutex<Vec<String>>>,
    /// Milliseconds to wait before answering OK (0: at once).
    delay_ms: Arc<AtomicU64>,
    accepted: Arc<Mutex<Vec<Seen>>>,
}

const RESULT_OK: &str = r#"<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><m:SendNotificationResult xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"><m:SubscriptionStatus>OK</m:SubscriptionStatus></m:SendNotificationResult></soap:Body></soap:Envelope>"#;

impl Receiver {
    pub async fn start() -> Receiver {
        let down = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(Vec::<String>::new()));
        let (d, slow, a, r) = (
            down.clone(),
            delay_ms.clone(),
            accepted.clone(),
            refused.clone(),
        );
        let inner = TestReceiver::with(Arc::new(move |seen: Seen| {
            let refuse = d.load(Ordering::SeqCst)
                || header(&seen, "x-ews-mailbox")
                    .is_some_and(|m| r.lock().unwrap().iter().any(|x| x == m));
            let delay = Duration::from_millis(slow.load(Ordering::SeqCst));
            let a = a.clone();
            if !refuse && delay.is_zero() {
                a.lock().unwrap().push(seen.clone());
            }
            Box::pin(async move {
                if !refuse && !delay.is_zero() {
                    // Counted as accepted once it has taken its time (whether or not the
                    // relay still waits for the answer).
                    tokio::time::sleep(delay).await;
                    a.lock().unwrap().push(seen);
                }
                let (status, body) = if refuse {
                    (StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"down"))
                } else {
                    (StatusCode::OK, Bytes::from_static(RESULT_OK.as_bytes()))
                };
                Response::builder()
                    .status(status)
                    .header("content-type", "text/xml; charset=utf-8")
                    .body(Full::new(body))
                    .unwrap()
            })
        }))
        .await;
        Receiver {
            inner,
            down,
            refused,
            delay_ms,
            accepted,
        }
    }

    /// Take `delay` before answering OK from now on (zero: answer at once).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Answer 503 (`true`) or OK (`false`) from now on.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Answer 503 (`true`) or as usual (`false`) from now on to deliveries for `mailbox` (by
    /// `X-EWS-Mailbox`), whatever the others get.
    pub fn set_refused(&self, mailbox: &str, refused: bool) {
        let mut list = self.refused.lock().unwrap();
        list.retain(|m| m != mailbox);
        if refused {
            list.push(mailbox.to_owned());
        }
    }

    /// Everything answered 2xx, in arrival order.
    pub fn accepted(&self) -> Vec<Seen> {
        self.accepted.lock().unwrap().clone()
    }

    /// Everything that reached the receiver, refused or not.
    pub fn all(&self) -> Vec<Seen> {
        self.inner.seen()
    }

    /// Accepted deliveries for `mailbox` (by `X-EWS-Mailbox`).
    pub fn accepted_for(&self, mailbox: &str) -> Vec<Seen> {
        self.accepted()
            .into_iter()
            .filter(|s| header(s, "x-ews-mailbox") == Some(mailbox))
            .collect()
    }

    /// Event watermarks accepted for `mailbox`, in arrival order (duplicates kept).
    pub fn event_watermarks(&self, mailbox: &str) -> Vec<String> {
        self.accepted_for(mailbox)
            .iter()
            .flat_map(|s| event_watermarks(&s.body))
            .collect()
    }

    /// Waits until every watermark in `want` was accepted for `mailbox`; returns the accepted
    /// event watermarks.
    pub async fn wait_events(
        &self,
        mailbox: &str,
        want: &[String],
        timeout: Duration,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.event_watermarks(mailbox);
            if want.iter().all(|w| got.contains(w)) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "receiver did not get all events of {mailbox} within {timeout:?}: want {want:?}, got {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A header of a received request as text.
pub fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The watermarks of the non-status events of a SendNotification body.
pub fn event_watermarks(body: &[u8]) -> Vec<String> {
    let Ok(n) = parse_send_notification(body) else {
        return Vec::new();
    };
    n.messages
        .iter()
        .flat_map(|m| m.notification.iter().flat_map(|n| &n.events))
        .filter(|e| e.kind != EventType::Status)
        .filter_map(|e| e.watermark.as_deref().map(str::to_owned))
        .collect()
}

/// `got` with repeats removed, first occurrences kept in order.
pub fn first_occurrences(got: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for w in got {
        if !out.contains(w) {
            out.push(w.clone());
        }
    }
    out
}

/// Asserts at-least-once, in-order delivery: every created event arrived, first arrivals in
/// the order they were created, and nothing arrived that was not created.
pub fn assert_in_order_none_lost(created: &[String], got: &[String]) {
    assert_eq!(
        first_occurrences(got),
        created,
        "events lost, reordered or invented"
    );
}

/// Recorded EWS Subscribe requests with their parsed bodies.
pub fn subscribes(sim: &SimHandle) -> Vec<(RecordedRequest, ParsedSubscribe)> {
    sim.requests()
        .into_iter()
        .filter(|r| r.path.eq_ignore_ascii_case("/EWS/Exchange.asmx"))
        .filter_map(|r| parse_subscribe(r.body.as_bytes()).ok().map(|p| (r, p)))
        .collect()
}

/// Recorded Subscribe requests for one mailbox.
pub fn subscribes_for(sim: &SimHandle, mailbox: &str) -> Vec<(RecordedRequest, ParsedSubscribe)> {
    subscribes(sim)
        .into_iter()
        .filter(|(_, p)| p.mailbox.eq_ignore_ascii_case(mailbox))
        .collect()
}

/// Recorded Autodiscover requests.
pub fn autodiscovers(sim: &SimHandle) -> Vec<RecordedRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| {
            r.path
                .eq_ignore_ascii_case("/autodiscover/autodiscover.svc")
        })
        .collect()
}

/// A header of a recorded request.
pub fn req_header<'a>(r: &'a RecordedRequest, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Server-side arrival time of a recorded request.
pub fn req_time(r: &RecordedRequest) -> std::time::SystemTime {
    humantime::parse_rfc3339(&r.time).expect("recorded time is RFC 3339")
}

/// The live subscription of `mailbox` in the simulator (the newest if several).
pub fn live_subscription(sim: &SimHandle, mailbox: &str) -> Option<SubscriptionInfo> {
    sim.subscriptions()
        .into_iter()
        .rfind(|s| s.mailbox.eq_ignore_ascii_case(mailbox) && s.is_live())
}

/// How the relay reaches Exchange.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Ews,
    Autodiscover,
}

/// What differs between tests' relays.
#[derive(Debug, Clone)]
pub struct Setup {
    pub endpoint: Endpoint,
    pub mailboxes: Vec<String>,
    pub mailboxes_file: Option<PathBuf>,
    pub heartbeat: Duration,
    /// `--auth …` and its companions; `--auth none` when empty.
    pub auth: Vec<String>,
    pub extra: Vec<String>,
    /// Managed Graph mode's `--graph-resource`s; Graph is off when empty and no file is given.
    pub graph_resources: Vec<String>,
    /// `--graph-resources-file`.
    pub graph_resources_file: Option<PathBuf>,
}

impl Setup {
    pub fn new(mailboxes: &[&str]) -> Setup {
        Setup {
            endpoint: Endpoint::Ews,
            mailboxes: mailboxes.iter().map(|m| m.to_string()).collect(),
            mailboxes_file: None,
            heartbeat: HEARTBEAT,
            auth: Vec::new(),
            extra: Vec::new(),
            graph_resources: Vec::new(),
            graph_resources_file: None,
        }
    }

    /// Managed Graph mode only (no EWS mailboxes), following `resources`.
    pub fn graph(resources: &[&str]) -> Setup {
        let mut s = Setup::new(&[]);
        s.graph_resources = resources.iter().map(|r| r.to_string()).collect();
        s
    }

    fn has_graph(&self) -> bool {
        !self.graph_resources.is_empty() || self.graph_resources_file.is_some()
    }

    fn has_ews(&self) -> bool {
        !self.mailboxes.is_empty() || self.mailboxes_file.is_some()
    }
}

/// A relay started in-process with `ews_relay::run`.
pub struct ManagedRelay {
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ews_relay::StartError>>>,
}

impl ManagedRelay {
    /// Stop it through the shutdown future (as SIGTERM does) and wait until `run` returns.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(15), h)
                .await
                .expect("relay stopped in time")
                .expect("relay task")
                .expect("relay run");
        }
    }
}

impl Drop for ManagedRelay {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Simulator, receiver, certificate and state directory of one test, and its relay.
pub struct Lab {
    pub sim: Sim,
    pub receiver: Receiver,
    pub cert: TestCert,
    pub state: tempfile::TempDir,
    pub port: u16,
    pub setup: Setup,
    pub relay: Option<ManagedRelay>,
    listener: Option<TcpListener>,
}

impl Lab {
    /// Start the simulator (with `sim_config` adjusted by `tune`), the receiver, and a relay.
    pub async fn start(hosted: &[&str], tune: impl FnOnce(&mut SimConfig), setup: Setup) -> Lab {
        let mut lab = Lab::prepare(hosted, tune, setup).await;
        lab.launch().await;
        lab
    }

    /// Like [`Lab::start`] but without the relay, so faults can be armed before it subscribes;
    /// the relay's port is already reserved. Start it with [`Lab::launch`].
    pub async fn prepare(hosted: &[&str], tune: impl FnOnce(&mut SimConfig), setup: Setup) -> Lab {
        let cert = test_cert();
        let mut config = sim_config(hosted, &cert.der);
        tune(&mut config);
        let sim = Sim::start(config).await;
        let receiver = Receiver::start().await;
        let state = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        Lab {
            sim,
            receiver,
            cert,
            state,
            port,
            setup,
            relay: None,
            listener: Some(listener),
        }
    }

    /// Start the relay on the reserved port.
    pub async fn launch(&mut self) {
        let listener = self.listener.take().expect("prepared, not launched");
        self.relay = Some(self.start_relay(listener).await);
    }

    pub fn callback_url(&self) -> String {
        format!("https://localhost:{}{CALLBACK_PATH}", self.port)
    }

    pub fn graph_callback_url(&self) -> String {
        format!("https://localhost:{}{GRAPH_CALLBACK_PATH}", self.port)
    }

    pub fn graph_lifecycle_url(&self) -> String {
        format!("https://localhost:{}{GRAPH_LIFECYCLE_PATH}", self.port)
    }

    /// The command line of this lab's relay (without `--listen`/`--admin-listen`).
    pub fn words(&self) -> Vec<String> {
        let s = &self.setup;
        let mut w: Vec<String> = vec![
            "ews-relay".into(),
            "--upstream".into(),
            format!("http://{}", self.receiver.addr()),
            "--tls-cert".into(),
            self.cert.cert_path.display().to_string(),
            "--tls-key".into(),
            self.cert.key_path.display().to_string(),
            "--allow".into(),
            "127.0.0.0/8".into(),
            "--path-prefix".into(),
            PREFIX.into(),
            "--state-dir".into(),
            self.state.path().display().to_string(),
            "--status-frequency".into(),
            "1".into(),
            "--heartbeat-timeout".into(),
            format!("{}ms", s.heartbeat.as_millis()),
            "--shutdown-grace".into(),
            "1s".into(),
        ];
        // Streaming (`--transport streaming` in `extra`) has no callback URL.
        let streaming = s
            .extra
            .windows(2)
            .any(|w| w[0] == "--transport" && w[1] == "streaming");
        if s.has_ews() && !streaming {
            w.extend(["--callback-url".into(), self.callback_url()]);
        }
        if s.has_ews() {
            match s.endpoint {
                Endpoint::Ews => w.extend(["--ews-url".into(), self.sim.ews_url()]),
                Endpoint::Autodiscover => {
                    w.extend(["--autodiscover-url".into(), self.sim.autodiscover_url()])
                }
            }
        }
        if s.has_graph() {
            w.extend([
                "--graph-path-prefix".into(),
                GRAPH_PREFIX.into(),
                "--graph-url".into(),
                self.sim.graph_url(),
                "--graph-callback-url".into(),
                self.graph_callback_url(),
                "--graph-lifecycle-url".into(),
                self.graph_lifecycle_url(),
            ]);
            for r in &s.graph_resources {
                w.extend(["--graph-resource".into(), r.clone()]);
            }
            if let Some(f) = &s.graph_resources_file {
                w.extend(["--graph-resources-file".into(), f.display().to_string()]);
            }
        }
        for m in &s.mailboxes {
            w.extend(["--mailbox".into(), m.clone()]);
        }
        if let Some(f) = &s.mailboxes_file {
            w.extend(["--mailboxes-file".into(), f.display().to_string()]);
        }
        if s.auth.is_empty() {
            w.extend(["--auth".into(), "none".into()]);
        } else {
            w.extend(s.auth.iter().cloned());
        }
        w.extend(s.extra.iter().cloned());
        w
    }

    async fn start_relay(&self, listener: TcpListener) -> ManagedRelay {
        let config = ews_relay::Config::parse_from(self.words()).expect("test command line");
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        // `--listen none`: the reserved port stays unused.
        let relay = config.listen.map(|_| listener);
        let handle = tokio::spawn(ews_relay::run(
            ews_relay::Listeners { relay, admin },
            config,
            async {
                let _ = rx.await;
            },
        ));
        let deadline = Instant::now() + WAIT;
        while !matches!(
            admin_get(admin_addr, "/healthz").await,
            Ok((StatusCode::OK, _))
        ) {
            if handle.is_finished() {
                panic!("the relay stopped while starting: {:?}", handle.await);
            }
            assert!(Instant::now() < deadline, "relay never became healthy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ManagedRelay {
            admin: admin_addr,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Stop the relay through its shutdown future.
    pub async fn stop_relay(&mut self) {
        if let Some(r) = self.relay.take() {
            r.stop().await;
        }
    }

    /// Start a relay again on the same port, state directory and command line.
    pub async fn start_again(&mut self) {
        assert!(self.relay.is_none(), "stop the relay first");
        // `run` has returned, but the old store writer thread lets go of the file a moment
        // later (a new process would not meet it: the old one is gone).
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = ews_relay::store::Store::open(self.state.path()) {
            assert!(Instant::now() < deadline, "state dir still in use: {e}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let listener = bind_port(self.port).await;
        self.relay = Some(self.start_relay(listener).await);
    }

    /// Start the real binary (`ews-relay`) on the reserved port instead of `run` in-process,
    /// logging to `relay.log` in the certificate's directory; for `kill -9`.
    pub async fn spawn_binary(&mut self) -> BinaryRelay {
        self.spawn_binary_with(false, &[]).await
    }

    /// Like [`Lab::spawn_binary`], but the log also gets the relay's tracing output (stdout),
    /// with `env` (e.g. `RUST_LOG`) set for the child: for checking what the relay logs.
    pub async fn spawn_binary_logging(&mut self, env: &[(&str, &str)]) -> BinaryRelay {
        self.spawn_binary_with(true, env).await
    }

    async fn spawn_binary_with(&mut self, log_stdout: bool, env: &[(&str, &str)]) -> BinaryRelay {
        // Free the reserved port just before the child binds it.
        drop(self.listener.take());
        let admin = crate::common::closed_port().await;
        let log_path = self.cert.dir.path().join("relay.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let stdout = if log_stdout {
            std::process::Stdio::from(log.try_clone().unwrap())
        } else {
            std::process::Stdio::null()
        };
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ews-relay"))
            .args(&self.words()[1..])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--admin-listen", &admin.to_string()])
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .expect("start the ews-relay binary");
        let mut relay = BinaryRelay {
            child,
            admin,
            log: log_path,
        };
        let deadline = Instant::now() + WAIT;
        while admin_get(admin, "/healthz").await.is_err() {
            if let Ok(Some(exit)) = relay.child.try_wait() {
                panic!("binary exited while starting ({exit}):\n{}", relay.log());
            }
            assert!(
                Instant::now() < deadline,
                "binary never healthy:\n{}",
                relay.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        relay
    }

    pub fn admin(&self) -> SocketAddr {
        self.relay.as_ref().expect("relay running").admin
    }

    /// The relay's `GET /api/subscriptions`.
    pub async fn api(&self) -> serde_json::Value {
        api(self.admin()).await
    }

    /// Polls the relay's `/api/subscriptions` until `check` gives `Some`.
    pub async fn wait_relay<T>(
        &self,
        timeout: Duration,
        what: &str,
        check: impl FnMut(&serde_json::Value) -> Option<T>,
    ) -> T {
        wait_api(self.admin(), timeout, what, check).await
    }

    /// Waits until the relay shows every mailbox in `mailboxes` active, with the subscription
    /// id the simulator has live for it; returns the ids in the same order.
    pub async fn wait_active(&self, mailboxes: &[&str]) -> Vec<String> {
        let sim = self.sim.handle.clone();
        self.wait_relay(WAIT, "every mailbox active", |v| {
            mailboxes
                .iter()
                .map(|m| {
                    let view = mailbox_view(v, m)?;
                    let id = view["subscription_id"].as_str()?;
                    let live = live_subscription(&sim, m)?;
                    (view["state"] == "active" && live.id == id).then(|| id.to_owned())
                })
                .collect()
        })
        .await
    }
}

/// The relay binary running as a child process.
pub struct BinaryRelay {
    pub child: std::process::Child,
    pub admin: SocketAddr,
    log: PathBuf,
}

impl BinaryRelay {
    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown path runs, nothing is flushed.
    pub fn kill_9(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }
}

impl Drop for BinaryRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Binds `127.0.0.1:port` again, retrying briefly while the old socket lets go.
pub async fn bind_port(port: u16) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot bind port {port} again: {e}"),
        }
    }
}

/// `GET /api/subscriptions` as JSON.
pub async fn api(admin: SocketAddr) -> serde_json::Value {
    let (status, body) = admin_get(admin, "/api/subscriptions")
        .await
        .expect("admin API");
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).expect("admin API JSON")
}

/// Polls `/api/subscriptions` at `admin` until `check` gives `Some`.
pub async fn wait_api<T>(
    admin: SocketAddr,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut(&serde_json::Value) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        // The admin endpoint may be between relays (restart): keep polling.
        if let Ok((StatusCode::OK, body)) = admin_get(admin, "/api/subscriptions").await {
            let v: serde_json::Value = serde_json::from_str(&body).expect("admin API JSON");
            if let Some(found) = check(&v) {
                return found;
            }
            if Instant::now() >= deadline {
                panic!("relay never showed {what} within {timeout:?}; last: {v:#}");
            }
        } else if Instant::now() >= deadline {
            panic!("relay admin API unreachable while waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One mailbox of an `/api/subscriptions` answer.
pub fn mailbox_view<'a>(v: &'a serde_json::Value, mailbox: &str) -> Option<&'a serde_json::Value> {
    v["mailboxes"]
        .as_array()?
        .iter()
        .find(|m| m["mailbox"].as_str() == Some(mailbox))
}

/// Waits until `sim` satisfies `check`, or fails the test saying `what`.
pub async fn sim_wait<T>(
    sim: &SimHandle,
    timeout: Duration,
    what: &str,
    check: impl FnMut(&SimHandle) -> Option<T>,
) -> T {
    match sim.wait_until(timeout, check).await {
        Some(t) => t,
        None => panic!(
            "simulator never showed {what} within {timeout:?}; subscriptions: {:#?}",
            sim.subscriptions()
        ),
    }
}

/// A file holding one mailbox per line.
pub fn write_mailboxes(path: &Path, mailboxes: &[&str]) {
    let text: String = mailboxes.iter().map(|m| format!("{m}\n")).collect();
    // Write then rename, as configuration tools do, so the relay never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
