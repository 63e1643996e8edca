//! The EWS simulator end to end: real sockets on 127.0.0.1 port 0, a real HTTPS callback with
//! an rcgen certificate, and the crate's own client-side builders and parsers on the other
//! side of every exchange, so both halves of the SOAP layer check each other.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use ews::{
    build_get_user_settings, build_subscribe, parse_get_user_settings_response,
    parse_send_notification, parse_subscribe_response, send_notification_result, EventType,
    EwsError, Folders, GetUserSettingsRequest, Redirect, ResponseClass, SubscribeRequest,
    SubscriptionStatus,
};
use ews_sim::{
    Auth, CallbackTrust, EndReason, MailboxConfig, MailboxRedirect, SimConfig, SimHandle,
    SubscriptionState,
};

const ROOM: &str = "room-4.12@contoso.example";
const OTHER: &str = "room-4.14@contoso.example";
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A running simulator.
struct Sim {
    handle: SimHandle,
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ews_sim::SimError>>>,
}

impl Sim {
    async fn start(config: SimConfig) -> Sim {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = SimHandle::new(config).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(handle.clone().serve(listener, async {
            let _ = rx.await;
        }));
        Sim {
            handle,
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Defaults for tests: fast keep-alives and retries, trusting the callback's cert.
    fn config(callback: &Callback) -> SimConfig {
        let mut config = SimConfig::new([ROOM, OTHER]);
        config.status_period = Duration::from_secs(3600);
        config.time_factor = 0.001;
        config.push_timeout = Duration::from_secs(2);
        config.callback_trust = CallbackTrust::Roots(vec![callback.cert.clone()]);
        config
    }

    async fn post(&self, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
        http_post(self.addr, path, headers, body.into()).await
    }

    async fn get_json(&self, path: &str) -> serde_json::Value {
        let reply = http_request(self.addr, "GET", path, &[], Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        serde_json::from_slice(&reply.body).unwrap()
    }

    async fn control(&self, route: &str, body: serde_json::Value) -> Reply {
        self.post(
            &format!("/_sim/{route}"),
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }

    /// A Subscribe for `mailbox` with the right anchor header.
    async fn subscribe(&self, mailbox: &str, url: &str, watermark: Option<&str>) -> Reply {
        let body = subscribe_body(mailbox, url, watermark);
        self.post(EWS, &[("x-anchormailbox", mailbox)], body).await
    }

    /// Subscribes and returns (id, watermark), asserting success.
    async fn subscribed(
        &self,
        mailbox: &str,
        url: &str,
        watermark: Option<&str>,
    ) -> (String, String) {
        let reply = self.subscribe(mailbox, url, watermark).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let parsed = parse_subscribe_response(&reply.body).unwrap();
        assert_eq!(
            parsed.status.class,
            ResponseClass::Success,
            "{}",
            reply.text()
        );
        (
            parsed.subscription_id.unwrap().into_owned(),
            parsed.watermark.unwrap().into_owned(),
        )
    }

    async fn wait_state(&self, id: &str, want: SubscriptionState) {
        let id = id.to_owned();
        let found = self
            .handle
            .wait_until(WAIT, |h| h.subscription(&id).filter(|s| s.state == want))
            .await;
        assert!(
            found.is_some(),
            "{id} never reached {want:?}: {:?}",
            self.handle.subscription(&id)
        );
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("simulator stopped in time")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

const EWS: &str = "/EWS/Exchange.asmx";

fn subscribe_body(mailbox: &str, url: &str, watermark: Option<&str>) -> String {
    build_subscribe(&SubscribeRequest {
        server_version: "Exchange2013",
        mailbox,
        folders: Folders::Distinguished(&["calendar", "inbox"]),
        event_types: &[EventType::NewMail, EventType::Created, EventType::Modified],
        watermark,
        status_frequency: 1,
        url,
    })
    .unwrap()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    /// The fault code of a SOAP fault answer (HTTP 500).
    fn fault_code(&self) -> String {
        assert_eq!(
            self.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{}",
            self.text()
        );
        match parse_subscribe_response(&self.body) {
            Err(EwsError::Fault(fault)) => fault.response_code.unwrap(),
            other => panic!("not a fault: {other:?}"),
        }
    }

    /// The response code of a SubscribeResponse message.
    fn subscribe_code(&self) -> String {
        assert_eq!(self.status, StatusCode::OK, "{}", self.text());
        let parsed = parse_subscribe_response(&self.body).unwrap();
        parsed.status.code.unwrap().into_owned()
    }
}

async fn http_post(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let mut all = headers.to_vec();
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        all.push(("content-type", "text/xml; charset=utf-8"));
    }
    http_request(addr, "POST", path, &all, body).await
}

async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "ews-sim");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// How the callback answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    Ok,
    Unsubscribe,
    Fail,
    /// Wait, then OK.
    SlowOk(Duration),
}

/// An HTTPS callback with an rcgen certificate for `localhost`, like the relay's.
struct Callback {
    url: String,
    cert: rustls_pki_types::CertificateDer<'static>,
    answer: Arc<Mutex<Answer>>,
    pushes: mpsc::UnboundedReceiver<Bytes>,
    task: tokio::task::JoinHandle<()>,
}

impl Callback {
    async fn start() -> Callback {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().clone();
        let private = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], private)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let answer = Arc::new(Mutex::new(Answer::Ok));
        let (tx, pushes) = mpsc::unbounded_channel();
        let answer2 = answer.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, tx, answer) = (acceptor.clone(), tx.clone(), answer2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (tx, answer) = (tx.clone(), answer.clone());
                            async move {
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let _ = tx.send(body);
                                let mode = *answer.lock().unwrap();
                                let (status, text) = match mode {
                                    Answer::Ok => {
                                        (200, send_notification_result(SubscriptionStatus::Ok))
                                    }
                                    Answer::Unsubscribe => (
                                        200,
                                        send_notification_result(SubscriptionStatus::Unsubscribe),
                                    ),
                                    Answer::Fail => (500, "receiver down"),
                                    Answer::SlowOk(d) => {
                                        tokio::time::sleep(d).await;
                                        (200, send_notification_result(SubscriptionStatus::Ok))
                                    }
                                };
                                Ok::<_, std::convert::Infallible>(
                                    Response::builder()
                                        .status(status)
                                        .header("content-type", "text/xml; charset=utf-8")
                                        .body(Full::new(Bytes::from_static(text.as_bytes())))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Callback {
            url: format!("https://localhost:{port}/ews/k7QeX2vT9mRw"),
            cert: der,
            answer,
            pushes,
            task,
        }
    }

    fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// The next push, parsed into (subscription id, previous watermark, events as
    /// (kind, watermark)), or the raw body for an error push.
    async fn next(&mut self) -> Bytes {
        tokio::time::timeout(WAIT, self.pushes.recv())
            .await
            .expect("a push in time")
            .expect("callback running")
    }

    async fn next_notification(&mut self) -> Push {
        let body = self.next().await;
        let parsed = parse_send_notification(&body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
        let message = &parsed.messages[0];
        assert_eq!(message.status.class, ResponseClass::Success);
        let n = message.notification.as_ref().unwrap();
        Push {
            id: n.subscription_id.to_string(),
            previous: n.previous_watermark.as_deref().unwrap().to_owned(),
            more: n.more_events,
            events: n
                .events
                .iter()
                .map(|e| (e.kind, e.watermark.as_deref().unwrap().to_owned()))
                .collect(),
        }
    }

    fn nothing_pending(&mut self) -> bool {
        self.pushes.try_recv().is_err()
    }
}

impl Drop for Callback {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct Push {
    id: String,
    previous: String,
    more: bool,
    events: Vec<(EventType, String)>,
}

impl Push {
    fn kinds(&self) -> Vec<EventType> {
        self.events.iter().map(|e| e.0).collect()
    }

    fn last_watermark(&self) -> &str {
        &self.events.last().unwrap().1
    }
}

// ---------------------------------------------------------------------------------------
// Subscribe validation
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn subscribe_is_validated_like_exchange() {
    let cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    let good = subscribe_body(ROOM, &cb.url, None);

    // The good request.
    let (id, watermark) = sim.subscribed(ROOM, &cb.url, None).await;
    assert!(id.len() >= 60, "opaque id as long as Exchange's: {id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
        "{id}"
    );
    assert!(
        watermark.starts_with("AQAAA"),
        "looks like Exchange's: {watermark}"
    );

    // Anchor header missing, or naming another mailbox.
    let reply = sim.post(EWS, &[], good.clone()).await;
    assert_eq!(reply.fault_code(), "ErrorInvalidRequest");
    let reply = sim
        .post(EWS, &[("x-anchormailbox", OTHER)], good.clone())
        .await;
    assert_eq!(reply.fault_code(), "ErrorInvalidRequest");
    // Case does not matter.
    let reply = sim
        .post(
            EWS,
            &[("x-anchormailbox", &ROOM.to_uppercase())],
            good.clone(),
        )
        .await;
    assert_eq!(reply.subscribe_code(), "NoError");

    let sim_ref = &sim;
    let anchored =
        |body: String| async move { sim_ref.post(EWS, &[("x-anchormailbox", ROOM)], body).await };
    // Schema order: URL before StatusFrequency.
    let freq = "<t:StatusFrequency>1</t:StatusFrequency>";
    let url = format!("<t:URL>{}</t:URL>", cb.url);
    let swapped = good
        .replace(freq, "FREQ")
        .replace(&url, freq)
        .replace("FREQ", &url);
    assert_ne!(swapped, good);
    assert_eq!(
        anchored(swapped).await.fault_code(),
        "ErrorSchemaValidation"
    );
    // Watermark after StatusFrequency.
    let with_wm = subscribe_body(ROOM, &cb.url, Some(&watermark));
    let wm = format!("<t:Watermark>{watermark}</t:Watermark>");
    let misplaced = with_wm
        .replace(&wm, "")
        .replace(freq, &format!("{freq}{wm}"));
    assert_eq!(
        anchored(misplaced).await.fault_code(),
        "ErrorSchemaValidation"
    );
    // StatusEvent cannot be subscribed to.
    let status = good.replace(
        "<t:EventType>CreatedEvent</t:EventType>",
        "<t:EventType>StatusEvent</t:EventType>",
    );
    assert_eq!(anchored(status).await.fault_code(), "ErrorSchemaValidation");
    // StatusFrequency outside 1..=1440, or not a number.
    for bad in ["0", "1441", "ten"] {
        let body = good.replace(
            freq,
            &format!("<t:StatusFrequency>{bad}</t:StatusFrequency>"),
        );
        assert_eq!(
            anchored(body).await.fault_code(),
            "ErrorSchemaValidation",
            "{bad}"
        );
    }
    assert_eq!(
        anchored(good.replace(freq, "<t:StatusFrequency>1440</t:StatusFrequency>"))
            .await
            .subscribe_code(),
        "NoError"
    );
    // No RequestServerVersion; no impersonation.
    let no_version = good.replace(r#"<t:RequestServerVersion Version="Exchange2013"/>"#, "");
    assert_eq!(
        anchored(no_version).await.fault_code(),
        "ErrorInvalidServerVersion"
    );
    let start = good.find("<t:ExchangeImpersonation>").unwrap();
    let end = good.find("</t:ExchangeImpersonation>").unwrap() + "</t:ExchangeImpersonation>".len();
    let no_impersonation = format!("{}{}", &good[..start], &good[end..]);
    assert_eq!(
        anchored(no_impersonation).await.fault_code(),
        "ErrorInvalidExchangeImpersonationHeaderData"
    );
    // Not SOAP at all.
    assert_eq!(
        anchored("{\"json\":1}".into()).await.fault_code(),
        "ErrorSchemaValidation"
    );
    // A URL that is not http(s).
    let ftp = good.replace(&url, "<t:URL>ftp://relay.example/cb</t:URL>");
    assert_eq!(
        anchored(ftp).await.subscribe_code(),
        "ErrorInvalidPushSubscriptionUrl"
    );
    // Unknown mailbox; unknown watermark.
    let ghost = "ghost@contoso.example";
    assert_eq!(
        sim.subscribe(ghost, &cb.url, None).await.subscribe_code(),
        "ErrorNonExistentMailbox"
    );
    let forged = sim
        .subscribe(
            ROOM,
            &cb.url,
            Some("AQAAAOpvG0LURVdOhQkPOWZLPcJGVQUAAAAAAAE="),
        )
        .await;
    assert_eq!(forged.subscribe_code(), "ErrorInvalidWatermark");
    // Another mailbox's watermark is not this one's.
    assert_eq!(
        sim.subscribe(OTHER, &cb.url, Some(&watermark))
            .await
            .subscribe_code(),
        "ErrorInvalidWatermark"
    );

    // Every request was recorded with headers and body.
    let requests = sim.handle.requests();
    assert!(requests.len() >= 15);
    let first = &requests[0];
    assert!(first.body.contains("PushSubscriptionRequest"));
    assert!(first
        .headers
        .iter()
        .any(|(n, v)| n == "x-anchormailbox" && v == ROOM));
    assert_eq!(
        (first.status, first.response_code.as_deref()),
        (200, Some("NoError"))
    );
    assert!(requests
        .iter()
        .any(|r| r.response_code.as_deref() == Some("ErrorInvalidRequest")));
    let json = sim.get_json("/_sim/requests").await;
    assert_eq!(json.as_array().unwrap().len(), requests.len());
    sim.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    let reply = sim
        .post(EWS, &[("x-anchormailbox", ROOM)], vec![b'x'; 300 * 1024])
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    let reply = http_request(sim.addr, "GET", EWS, &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// Pushes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn pushes_status_keepalives_and_events_until_unsubscribe() {
    let mut cb = Callback::start().await;
    let mut config = Sim::config(&cb);
    config.status_period = Duration::from_millis(150);
    let sim = Sim::start(config).await;
    let (id, start_watermark) = sim.subscribed(ROOM, &cb.url, None).await;

    // At once: a StatusEvent whose PreviousWatermark is the one Subscribe returned.
    let first = cb.next_notification().await;
    assert_eq!(first.id, id);
    assert_eq!(first.kinds(), [EventType::Status]);
    assert_eq!(first.previous, start_watermark);
    let mut previous = first.last_watermark().to_owned();

    // Keep-alives while idle, each chained to the last watermark delivered.
    for _ in 0..2 {
        let started = Instant::now();
        let keepalive = cb.next_notification().await;
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "keep-alive too early"
        );
        assert_eq!(keepalive.kinds(), [EventType::Status]);
        assert_eq!(keepalive.previous, previous);
        assert_ne!(keepalive.last_watermark(), previous, "watermarks advance");
        previous = keepalive.last_watermark().to_owned();
    }

    // Events on demand, through the control API.
    let reply = sim
        .control(
            "events",
            serde_json::json!({"mailbox": ROOM, "type": "NewMailEvent", "count": 3}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let created: Vec<String> = serde_json::from_value(reply.json()["watermarks"].clone()).unwrap();
    assert_eq!(created.len(), 3);
    let mut got = Vec::new();
    while got.len() < 3 {
        let push = cb.next_notification().await;
        if push.kinds() == [EventType::Status] {
            previous = push.last_watermark().to_owned();
            continue;
        }
        assert_eq!(push.previous, previous);
        previous = push.last_watermark().to_owned();
        got.extend(push.events);
    }
    assert!(got.iter().all(|(kind, _)| *kind == EventType::NewMail));
    assert_eq!(
        got.iter().map(|e| e.1.clone()).collect::<Vec<_>>(),
        created,
        "in order, with their watermarks"
    );

    // Event types it did not ask for are not pushed.
    sim.handle
        .create_events(ROOM, EventType::Deleted, 1)
        .unwrap();
    sim.handle
        .create_events(ROOM, EventType::Created, 1)
        .unwrap();
    loop {
        let push = cb.next_notification().await;
        if push.kinds() != [EventType::Status] {
            assert_eq!(push.kinds(), [EventType::Created]);
            break;
        }
    }

    let info = sim
        .handle
        .wait_until(WAIT, |h| {
            h.subscription(&id)
                .filter(|s| s.counters.events_delivered == 4)
        })
        .await
        .unwrap();
    assert!(info.counters.status_events >= 3);
    assert_eq!(info.state, SubscriptionState::Active);

    // Answering Unsubscribe ends it; nothing more is pushed.
    cb.answer(Answer::Unsubscribe);
    sim.handle
        .create_events(ROOM, EventType::NewMail, 1)
        .unwrap();
    sim.wait_state(&id, SubscriptionState::Ended(EndReason::Unsubscribed))
        .await;
    while cb.pushes.try_recv().is_ok() {}
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(cb.nothing_pending(), "no push after Unsubscribe");
    let listed = sim.get_json("/_sim/subscriptions").await;
    assert_eq!(listed[0]["state"], "ended");
    assert_eq!(listed[0]["reason"], "unsubscribed");
    sim.stop().await;
}

#[tokio::test]
async fn events_queued_during_an_outstanding_push_follow_in_order() {
    let mut cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    let (id, _) = sim.subscribed(ROOM, &cb.url, None).await;
    assert_eq!(cb.next_notification().await.kinds(), [EventType::Status]);

    cb.answer(Answer::SlowOk(Duration::from_millis(300)));
    let first = sim
        .handle
        .create_events(ROOM, EventType::NewMail, 1)
        .unwrap();
    let push = cb.next_notification().await;
    assert_eq!(
        push.events.iter().map(|e| e.1.clone()).collect::<Vec<_>>(),
        first
    );
    // The first push is still waiting for its answer: these queue behind it.
    let mut later = sim
        .handle
        .create_events(ROOM, EventType::Created, 2)
        .unwrap();
    later.extend(
        sim.handle
            .create_events(ROOM, EventType::Modified, 1)
            .unwrap(),
    );
    cb.answer(Answer::Ok);
    let mut got = Vec::new();
    let mut previous = push.last_watermark().to_owned();
    while got.len() < 3 {
        let push = cb.next_notification().await;
        assert_eq!(push.previous, previous);
        previous = push.last_watermark().to_owned();
        got.extend(push.events.into_iter().map(|e| e.1));
    }
    assert_eq!(got, later);
    let delivered = sim
        .handle
        .wait_until(WAIT, |h| {
            h.subscription(&id)
                .filter(|s| s.counters.events_delivered == 4)
        })
        .await;
    assert!(delivered.is_some(), "{:?}", sim.handle.subscription(&id));
    sim.stop().await;
}

#[tokio::test]
async fn many_events_come_in_batches_with_more_events() {
    let mut cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    sim.subscribed(ROOM, &cb.url, None).await;
    assert_eq!(cb.next_notification().await.kinds(), [EventType::Status]);
    let created = sim
        .handle
        .create_events(ROOM, EventType::NewMail, 120)
        .unwrap();
    let mut got = Vec::new();
    let mut mores = Vec::new();
    while got.len() < 120 {
        let push = cb.next_notification().await;
        mores.push(push.more);
        got.extend(push.events.into_iter().map(|e| e.1));
    }
    assert_eq!(got, created);
    assert!(mores.len() >= 3 && mores[0], "{mores:?}");
    assert!(!mores.last().unwrap());
    sim.stop().await;
}

#[tokio::test]
async fn silent_callback_kills_the_subscription_on_exchanges_schedule() {
    let mut cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    cb.answer(Answer::Fail);
    let (id, _) = sim.subscribed(ROOM, &cb.url, None).await;
    sim.wait_state(&id, SubscriptionState::Ended(EndReason::RetriesExhausted))
        .await;
    // StatusFrequency 1 min at factor 0.001: the first try, a retry 30 ms later, and then the
    // next wait (60 ms, total 90 ms) would pass the 60 ms budget: dead.
    let info = sim.handle.subscription(&id).unwrap();
    assert_eq!(info.counters.pushes_failed, 2, "{info:?}");
    cb.next().await;
    cb.next().await;
    assert!(cb.nothing_pending());

    // A callback that recovers within the budget keeps the subscription.
    let (id, _) = sim.subscribed(ROOM, &cb.url, None).await;
    cb.next().await; // the first, failed, push
    cb.answer(Answer::Ok);
    sim.wait_state(&id, SubscriptionState::Active).await;
    let info = sim
        .handle
        .wait_until(WAIT, |h| {
            h.subscription(&id).filter(|s| s.counters.pushes_ok == 1)
        })
        .await
        .unwrap();
    assert_eq!(info.counters.pushes_failed, 1);
    assert_eq!(info.counters.status_events, 1);
    sim.stop().await;
}

#[tokio::test]
async fn resubscribing_with_the_last_watermark_replays_missed_events() {
    let mut cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    let (id, _) = sim.subscribed(ROOM, &cb.url, None).await;
    cb.next_notification().await;
    sim.handle
        .create_events(ROOM, EventType::NewMail, 1)
        .unwrap();
    let push = cb.next_notification().await;
    let stored = push.last_watermark().to_owned();

    // Exchange drops the subscription without a word (fault via the control API).
    let reply = sim
        .control(
            "faults/stop-keepalives",
            serde_json::json!({"subscription_id": id}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    sim.wait_state(&id, SubscriptionState::Ended(EndReason::Dropped))
        .await;
    let missed = sim
        .handle
        .create_events(ROOM, EventType::Created, 2)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(cb.nothing_pending(), "a dropped subscription gets nothing");

    // Resubscribe from the stored watermark: a new id, the status, then the missed events.
    let (new_id, _) = sim.subscribed(ROOM, &cb.url, Some(&stored)).await;
    assert_ne!(new_id, id);
    assert_eq!(cb.next_notification().await.kinds(), [EventType::Status]);
    let mut replayed = Vec::new();
    while replayed.len() < 2 {
        let push = cb.next_notification().await;
        assert_eq!(push.id, new_id);
        replayed.extend(push.events.into_iter().map(|e| e.1));
    }
    assert_eq!(replayed, missed);

    // After invalidation the stored watermark is refused; without one it works.
    let reply = sim
        .control(
            "faults/invalidate-watermarks",
            serde_json::json!({"mailbox": ROOM}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = sim.subscribe(ROOM, &cb.url, Some(&stored)).await;
    assert_eq!(reply.subscribe_code(), "ErrorInvalidWatermark");
    assert_eq!(
        sim.subscribe(ROOM, &cb.url, None).await.subscribe_code(),
        "NoError"
    );
    let mailboxes = sim.get_json("/_sim/mailboxes").await;
    let room = mailboxes
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["smtp"] == ROOM)
        .unwrap();
    assert_eq!(room["watermark_generation"], 1);
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn throttling_faults_answer_the_next_requests() {
    let cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;

    // ErrorServerBusy with BackOffMilliseconds, for exactly the next two Subscribes.
    let reply = sim
        .control(
            "faults/server-busy",
            serde_json::json!({"count": 2, "back_off_ms": 1234}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        sim.get_json("/_sim/state").await["faults"]["server_busy_remaining"],
        2
    );
    for _ in 0..2 {
        let reply = sim.subscribe(ROOM, &cb.url, None).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        let Err(EwsError::Fault(fault)) = parse_subscribe_response(&reply.body) else {
            panic!("{}", reply.text())
        };
        assert_eq!(fault.response_code.as_deref(), Some("ErrorServerBusy"));
        assert_eq!(fault.back_off, Some(Duration::from_millis(1234)));
    }
    assert_eq!(
        sim.subscribe(ROOM, &cb.url, None).await.subscribe_code(),
        "NoError"
    );

    // HTTP 503 with Retry-After, then without.
    sim.control(
        "faults/unavailable",
        serde_json::json!({"count": 1, "retry_after_secs": 7}),
    )
    .await;
    let reply = sim.subscribe(ROOM, &cb.url, None).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "7");
    sim.handle.unavailable(1, None);
    let reply = sim.subscribe(ROOM, &cb.url, None).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!reply.headers.contains_key("retry-after"));
    assert_eq!(
        sim.subscribe(ROOM, &cb.url, None).await.subscribe_code(),
        "NoError"
    );

    // Slow responses.
    sim.control("faults/delay", serde_json::json!({"ms": 250}))
        .await;
    assert_eq!(
        sim.get_json("/_sim/state").await["faults"]["response_delay_ms"],
        250
    );
    let started = Instant::now();
    assert_eq!(
        sim.subscribe(ROOM, &cb.url, None).await.subscribe_code(),
        "NoError"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    sim.control("faults/clear", serde_json::json!({})).await;
    assert_eq!(sim.handle.snapshot().faults.response_delay_ms, 0);

    // Unknown routes and bad bodies are refused with a reason.
    assert_eq!(
        sim.control("faults/nope", serde_json::json!({}))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let reply = sim
        .control(
            "events",
            serde_json::json!({"mailbox": ROOM, "type": "StatusEvent"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let reply = sim
        .control(
            "events",
            serde_json::json!({"mailbox": "ghost@x.example", "type": "NewMailEvent"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = sim
        .control(
            "events",
            serde_json::json!({"mailbox": ROOM, "type": "NewMailEvent", "count": 0}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = sim
        .control("faults/server-busy", serde_json::json!({"count": "many"}))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    sim.stop().await;
}

#[tokio::test]
async fn moved_mailbox_needs_autodiscover_before_subscribe_works() {
    let cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    let reply = sim
        .control("faults/move-mailbox", serde_json::json!({"mailbox": ROOM}))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        sim.subscribe(ROOM, &cb.url, None).await.subscribe_code(),
        "ErrorProxyRequestNotAllowed"
    );
    assert_eq!(
        sim.subscribe(ROOM, &cb.url, None).await.subscribe_code(),
        "ErrorProxyRequestNotAllowed"
    );
    assert!(sim
        .handle
        .mailboxes()
        .iter()
        .any(|m| m.smtp == ROOM && m.moved));
    // Other mailboxes are not affected.
    assert_eq!(
        sim.subscribe(OTHER, &cb.url, None).await.subscribe_code(),
        "NoError"
    );

    let url = sim.handle.autodiscover_url();
    let body = build_get_user_settings(&GetUserSettingsRequest {
        server_version: "Exchange2013",
        url: &url,
        mailboxes: &[ROOM],
    })
    .unwrap();
    let reply = sim.post("/autodiscover/autodiscover.svc", &[], body).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        sim.subscribe(ROOM, &cb.url, None).await.subscribe_code(),
        "NoError"
    );
    sim.stop().await;
}

#[tokio::test]
async fn error_notification_and_drop_all() {
    let mut cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    let (id, _) = sim.subscribed(ROOM, &cb.url, None).await;
    cb.next_notification().await;

    let reply = sim
        .control(
            "faults/error-notification",
            serde_json::json!({"subscription_id": id}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let body = cb.next().await;
    let parsed = parse_send_notification(&body).unwrap();
    let message = &parsed.messages[0];
    assert_eq!(message.status.class, ResponseClass::Error);
    assert_eq!(
        message.status.code.as_deref(),
        Some("ErrorReadEventsFailed")
    );
    assert!(message.notification.is_none());
    assert_eq!(message.subscription_id.as_deref(), Some(id.as_str()));
    sim.wait_state(&id, SubscriptionState::Ended(EndReason::ReadEventsFailed))
        .await;
    // An ended subscription takes no more faults.
    let reply = sim
        .control(
            "faults/error-notification",
            serde_json::json!({"subscription_id": id}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);

    // Drop all: every live subscription ends silently.
    let (a, _) = sim.subscribed(ROOM, &cb.url, None).await;
    let (b, _) = sim.subscribed(OTHER, &cb.url, None).await;
    cb.next().await;
    cb.next().await;
    let reply = sim.control("faults/drop-all", serde_json::json!({})).await;
    assert_eq!(reply.json()["dropped"], 2);
    for id in [&a, &b] {
        assert_eq!(
            sim.handle.subscription(id).unwrap().state,
            SubscriptionState::Ended(EndReason::Dropped)
        );
    }
    sim.handle
        .create_events(ROOM, EventType::NewMail, 1)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(cb.nothing_pending());
    let state = sim.get_json("/_sim/state").await;
    assert!(state["mailboxes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["live_subscriptions"] == 0));
    sim.stop().await;
}

#[tokio::test]
async fn at_most_twenty_live_subscriptions_per_mailbox() {
    let cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    for _ in 0..20 {
        assert_eq!(
            sim.subscribe(ROOM, &cb.url, None).await.subscribe_code(),
            "NoError"
        );
    }
    assert_eq!(
        sim.subscribe(ROOM, &cb.url, None).await.subscribe_code(),
        "ErrorExceededSubscriptionCount"
    );
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// Affinity, Autodiscover, authentication
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn affinity_cookie_is_issued_and_its_return_recorded() {
    let cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    let body = subscribe_body(ROOM, &cb.url, None);
    let reply = sim
        .post(
            EWS,
            &[
                ("x-anchormailbox", ROOM),
                ("x-preferserveraffinity", "true"),
            ],
            body,
        )
        .await;
    assert_eq!(reply.subscribe_code(), "NoError");
    let cookie = reply.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("X-BackEndOverrideCookie="), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_owned();

    // The group's next mailbox, anchored on the first, with the cookie.
    let body = subscribe_body(OTHER, &cb.url, None);
    let reply = sim
        .post(
            EWS,
            &[
                ("x-anchormailbox", ROOM),
                ("x-preferserveraffinity", "true"),
                ("cookie", &pair),
            ],
            body,
        )
        .await;
    assert_eq!(reply.subscribe_code(), "NoError");
    assert!(!reply.headers.contains_key("set-cookie"));
    let requests = sim.handle.requests();
    assert_eq!(
        requests
            .iter()
            .map(|r| r.carried_affinity_cookie)
            .collect::<Vec<_>>(),
        [false, true]
    );
    sim.stop().await;
}

#[tokio::test]
async fn autodiscover_answers_settings_invalid_users_and_redirects() {
    let mut config = SimConfig::new([ROOM]);
    config
        .mailboxes
        .push(MailboxConfig::new(OTHER).grouping("AM3PR05"));
    config.mailboxes.push(
        MailboxConfig::new("old@contoso.example")
            .redirect(MailboxRedirect::Address("new@fabrikam.example".into())),
    );
    let sim = Sim::start(config).await;
    let url = sim.handle.autodiscover_url();
    let users = [ROOM, OTHER, "ghost@contoso.example", "old@contoso.example"];
    let body = build_get_user_settings(&GetUserSettingsRequest {
        server_version: "Exchange2013",
        url: &url,
        mailboxes: &users,
    })
    .unwrap();
    let reply = sim.post("/autodiscover/autodiscover.svc", &[], body).await;
    assert_eq!(reply.status, StatusCode::OK);
    let parsed = parse_get_user_settings_response(&reply.body).unwrap();
    assert_eq!(parsed.users.len(), 4);
    let ews = format!("http://{}/EWS/Exchange.asmx", sim.addr);
    assert_eq!(
        parsed.users[0].external_ews_url.as_deref(),
        Some(ews.as_str())
    );
    assert_eq!(
        parsed.users[0].grouping_information.as_deref(),
        Some("SIMPR01")
    );
    assert_eq!(
        parsed.users[1].grouping_information.as_deref(),
        Some("AM3PR05")
    );
    assert_eq!(parsed.users[2].error_code.as_deref(), Some("InvalidUser"));
    assert_eq!(
        parsed.users[3].redirect,
        Some(Redirect::Address("new@fabrikam.example".into()))
    );
    // A mailbox added at run time through the control API.
    let reply = sim
        .control(
            "mailboxes",
            serde_json::json!({"smtp": "late@contoso.example", "grouping": "X1"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(sim
        .handle
        .mailboxes()
        .iter()
        .any(|m| m.smtp == "late@contoso.example" && m.grouping == "X1"));
    sim.stop().await;
}

#[tokio::test]
async fn oauth_tokens_are_issued_expire_and_can_be_revoked() {
    let cb = Callback::start().await;
    let mut config = Sim::config(&cb);
    config.auth = Auth::OAuth {
        client_id: "app-1".into(),
        client_secret: "s3cret".into(),
        token_lifetime: Duration::from_millis(400),
    };
    let sim = Sim::start(config).await;
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let good = "grant_type=client_credentials&client_id=app-1&client_secret=s3cret&scope=https%3A%2F%2Foutlook.office365.com%2F.default";

    let reply = sim
        .post("/oauth2/v2.0/token", &form, good.replace("s3cret", "wrong"))
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()["error"], "invalid_client");
    let reply = sim
        .post(
            "/oauth2/v2.0/token",
            &form,
            good.replace("client_credentials", "password"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    let reply = sim
        .post("/contoso.onmicrosoft.com/oauth2/v2.0/token", &form, good)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["expires_in"], 1);
    let bearer = format!("Bearer {}", json["access_token"].as_str().unwrap());

    let body = subscribe_body(ROOM, &cb.url, None);
    let reply = sim
        .post(EWS, &[("x-anchormailbox", ROOM)], body.clone())
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let reply = sim
        .post(
            EWS,
            &[("x-anchormailbox", ROOM), ("authorization", &bearer)],
            body.clone(),
        )
        .await;
    assert_eq!(reply.subscribe_code(), "NoError");
    // Autodiscover wants the token too.
    let ad = build_get_user_settings(&GetUserSettingsRequest {
        server_version: "Exchange2013",
        url: &sim.handle.autodiscover_url(),
        mailboxes: &[ROOM],
    })
    .unwrap();
    assert_eq!(
        sim.post("/autodiscover/autodiscover.svc", &[], ad.clone())
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        sim.post(
            "/autodiscover/autodiscover.svc",
            &[("authorization", &bearer)],
            ad
        )
        .await
        .status,
        StatusCode::OK
    );

    // Expired.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let reply = sim
        .post(
            EWS,
            &[("x-anchormailbox", ROOM), ("authorization", &bearer)],
            body.clone(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    // Revoked.
    let reply = sim.post("/oauth2/v2.0/token", &form, good).await;
    let bearer = format!("Bearer {}", reply.json()["access_token"].as_str().unwrap());
    let reply = sim
        .post(
            EWS,
            &[("x-anchormailbox", ROOM), ("authorization", &bearer)],
            body.clone(),
        )
        .await;
    assert_eq!(reply.subscribe_code(), "NoError");
    let reply = sim
        .control("faults/revoke-tokens", serde_json::json!({}))
        .await;
    assert_eq!(reply.json()["revoked"], 1);
    let reply = sim
        .post(
            EWS,
            &[("x-anchormailbox", ROOM), ("authorization", &bearer)],
            body,
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let recorded = sim.handle.requests();
    assert_eq!(
        recorded.last().unwrap().response_code.as_deref(),
        Some("HTTP 401")
    );
    assert_eq!(sim.handle.snapshot().tokens_issued, 2);
    let token_requests: Vec<_> = recorded
        .iter()
        .filter(|r| r.path.ends_with("/token"))
        .collect();
    assert!(!token_requests.is_empty());
    assert!(token_requests
        .iter()
        .all(|r| !r.body.contains("s3cret") && !r.body.contains("wrong")));
    assert!(token_requests[0].body.contains("client_secret=REDACTED"));
    sim.stop().await;
}

#[tokio::test]
async fn basic_auth_checks_user_and_password() {
    let cb = Callback::start().await;
    let mut config = Sim::config(&cb);
    config.auth = Auth::Basic {
        user: "svc".into(),
        password: "pw".into(),
    };
    let sim = Sim::start(config).await;
    let body = subscribe_body(ROOM, &cb.url, None);
    // "svc:pw" and "svc:no".
    let reply = sim
        .post(
            EWS,
            &[
                ("x-anchormailbox", ROOM),
                ("authorization", "Basic c3ZjOnB3"),
            ],
            body.clone(),
        )
        .await;
    assert_eq!(reply.subscribe_code(), "NoError");
    let reply = sim
        .post(
            EWS,
            &[
                ("x-anchormailbox", ROOM),
                ("authorization", "Basic c3ZjOm5v"),
            ],
            body,
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    sim.stop().await;
}

#[tokio::test]
async fn shutdown_stops_serving_and_pushing() {
    let mut cb = Callback::start().await;
    let mut config = Sim::config(&cb);
    config.status_period = Duration::from_millis(50);
    let sim = Sim::start(config).await;
    let (id, _) = sim.subscribed(ROOM, &cb.url, None).await;
    cb.next().await;
    let (handle, addr) = (sim.handle.clone(), sim.addr);
    sim.stop().await;
    assert_eq!(
        handle.subscription(&id).unwrap().state,
        SubscriptionState::Ended(EndReason::Shutdown)
    );
    while cb.pushes.try_recv().is_ok() {}
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(cb.nothing_pending(), "no keep-alive after shutdown");
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
}

#[test]
fn unusable_configurations_are_refused() {
    let mut config = SimConfig::new([ROOM]);
    config.time_factor = 0.0;
    assert!(SimHandle::new(config.clone()).is_err());
    config.time_factor = f64::NAN;
    assert!(SimHandle::new(config.clone()).is_err());
    config.time_factor = 1.0;
    config.status_period = Duration::ZERO;
    assert!(SimHandle::new(config).is_err());
}

#[tokio::test]
async fn serves_https_when_given_a_certificate() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().clone();
    let private = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], private)
        .unwrap();
    let mut config = SimConfig::new([ROOM]);
    config.tls = Some(Arc::new(server));
    let sim = Sim::start(config).await;
    let base = sim.handle.base_url();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    assert!(sim.handle.ews_url().ends_with("/EWS/Exchange.asmx"));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(sim.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/_sim/state")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let state: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(state["mailboxes"][0]["smtp"], ROOM);
    // Plain HTTP on the TLS port gets nowhere.
    let plain = tokio::time::timeout(WAIT, async {
        let tcp = TcpStream::connect(sim.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
            .send_request(
                Request::get("/_sim/state")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
    })
    .await
    .unwrap();
    assert!(plain.is_err());
    sim.stop().await;
}
