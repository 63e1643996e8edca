//! Streaming notifications end to end: real sockets on 127.0.0.1 port 0, the `ews` crate's
//! request builders on the way in and its `EnvelopeSplitter` and `parse_streaming_events` on
//! the way out, so both halves of the streaming protocol check each other.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use ews::{
    build_get_user_settings, get_streaming_events_request, parse_streaming_events,
    parse_subscribe_response, parse_unsubscribe_response, streaming_subscribe_request,
    unsubscribe_request, ConnectionStatus, EnvelopeSplitter, EventType, Folders,
    GetUserSettingsRequest, ResponseClass, StreamingBatch, StreamingSubscribeRequest,
    DEFAULT_MAX_ENVELOPE, DEFAULT_SERVER_VERSION,
};
use ews_sim::{ConnectionEnd, MailboxConfig, SimConfig, SimHandle, StreamingEnd};

const EWS: &str = "/EWS/Exchange.asmx";
const A: &str = "a@contoso.example";
const B: &str = "b@contoso.example";
const C: &str = "c@contoso.example";
const WAIT: Duration = Duration::from_secs(10);
const EVENTS: &[EventType] = &[EventType::NewMail, EventType::Created, EventType::Moved];

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

struct Sim {
    handle: SimHandle,
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A, B in group G1; C in group G2. Keep-alives every 100 ms; connections last 1.5 s.
fn config() -> SimConfig {
    let mut config = SimConfig::new(Vec::<String>::new());
    config.mailboxes = vec![
        MailboxConfig::new(A).grouping("G1"),
        MailboxConfig::new(B).grouping("G1"),
        MailboxConfig::new(C).grouping("G2"),
    ];
    config.streaming_keepalive = Duration::from_millis(100);
    config.streaming_connection_timeout = Some(Duration::from_millis(1500));
    config.status_period = Duration::from_secs(3600);
    config
}

impl Sim {
    async fn start(config: SimConfig) -> Sim {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = SimHandle::new(config).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(handle.clone().serve(listener, async {
            let _ = rx.await;
        }));
        Sim {
            handle,
            addr,
            stop: Some(tx),
        }
    }

    async fn post(&self, headers: &[(&str, &str)], body: String) -> (StatusCode, HeaderMap, Bytes) {
        let response = send(self.addr, EWS, headers, body).await;
        let (parts, body) = response.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    }

    /// A streaming Subscribe for `mailbox` anchored on itself; returns the id.
    async fn subscribe(&self, mailbox: &str) -> String {
        self.subscribe_with(mailbox, &[("x-anchormailbox", mailbox)])
            .await
            .0
    }

    /// A streaming Subscribe with these headers; returns the id and the `Set-Cookie`, if any.
    async fn subscribe_with(
        &self,
        mailbox: &str,
        headers: &[(&str, &str)],
    ) -> (String, Option<String>) {
        let body = streaming_subscribe_request(&StreamingSubscribeRequest {
            server_version: DEFAULT_SERVER_VERSION,
            mailbox,
            folders: Folders::Distinguished(&["inbox", "calendar"]),
            event_types: EVENTS,
        })
        .unwrap();
        let (status, headers, body) = self.post(headers, body).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let parsed = parse_subscribe_response(&body).unwrap();
        assert_eq!(parsed.status.class, ResponseClass::Success, "{parsed:?}");
        assert!(
            parsed.watermark.is_none(),
            "streaming subscriptions have no watermark"
        );
        let cookie = headers
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
        (parsed.subscription_id.unwrap().into_owned(), cookie)
    }

    /// Opens a `GetStreamingEvents` for `ids` with these headers.
    async fn stream(&self, ids: &[&str], headers: &[(&str, &str)]) -> Stream {
        self.stream_as(ids, None, headers).await
    }

    async fn stream_as(
        &self,
        ids: &[&str],
        impersonate: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Stream {
        let body =
            get_streaming_events_request(ids, 1, impersonate, DEFAULT_SERVER_VERSION).unwrap();
        let response = send(self.addr, EWS, headers, body).await;
        let (parts, body) = response.into_parts();
        assert_eq!(parts.status, StatusCode::OK);
        Stream {
            headers: parts.headers,
            body,
            splitter: EnvelopeSplitter::new(DEFAULT_MAX_ENVELOPE),
            opened: Instant::now(),
        }
    }

    async fn events(&self, mailbox: &str, kind: EventType, count: usize) {
        self.handle.create_events(mailbox, kind, count).unwrap();
    }

    /// Waits until streaming connection `id` has ended; returns how.
    async fn connection_end(&self, id: u64) -> ConnectionEnd {
        self.handle
            .wait_until(WAIT, |h| h.streaming_connection(id).and_then(|c| c.end))
            .await
            .expect("connection did not end")
    }
}

async fn send(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> http::Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request = Request::post(path)
        .header("host", "ews-sim")
        .header("content-type", "text/xml; charset=utf-8");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    sender
        .send_request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap()
}

/// The client side of one `GetStreamingEvents` answer.
struct Stream {
    headers: HeaderMap,
    body: Incoming,
    splitter: EnvelopeSplitter,
    opened: Instant,
}

/// What came next on a stream.
#[derive(Debug)]
enum Next {
    Envelope(Vec<u8>),
    /// The body ended properly (its last chunk).
    End,
    /// The connection broke mid-body.
    Broken,
    /// Nothing within the wait.
    Silent,
}

impl Stream {
    async fn next(&mut self, wait: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(envelope) = self.splitter.next_envelope().unwrap() {
                return Next::Envelope(envelope);
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return Next::Silent,
                Ok(None) => {
                    self.splitter.finish().unwrap();
                    return Next::End;
                }
                Ok(Some(Err(_))) => return Next::Broken,
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.splitter.feed(&data);
                    }
                }
            }
        }
    }

    /// The next envelope, which must come within the wait.
    async fn envelope(&mut self) -> Vec<u8> {
        match self.next(WAIT).await {
            Next::Envelope(envelope) => envelope,
            other => panic!("expected an envelope, got {other:?}"),
        }
    }

    /// Envelopes until one that is not a keep-alive.
    async fn non_keepalive(&mut self) -> Vec<u8> {
        loop {
            let envelope = self.envelope().await;
            if !parse_streaming_events(&envelope).unwrap().is_keep_alive() {
                return envelope;
            }
        }
    }

    /// Reads to the end; returns every envelope.
    async fn rest(&mut self) -> (Vec<Vec<u8>>, Next) {
        let mut envelopes = Vec::new();
        loop {
            match self.next(WAIT).await {
                Next::Envelope(e) => envelopes.push(e),
                other => return (envelopes, other),
            }
        }
    }
}

fn parse(envelope: &[u8]) -> StreamingBatch<'_> {
    parse_streaming_events(envelope)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(envelope)))
}

/// `(code, ids)` of every error message of an envelope.
fn errors(batch: &StreamingBatch<'_>) -> Vec<(String, Vec<String>)> {
    batch
        .messages
        .iter()
        .filter(|m| m.status.class == ResponseClass::Error)
        .map(|m| {
            (
                m.status.code.as_deref().unwrap_or_default().to_owned(),
                m.error_subscription_ids
                    .iter()
                    .map(|id| id.to_string())
                    .collect(),
            )
        })
        .collect()
}

fn anchored(mailbox: &str) -> [(&str, &str); 1] {
    [("x-anchormailbox", mailbox)]
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn subscribe_and_stream_events_without_watermarks() {
    let sim = Sim::start(config()).await;
    let id = sim.subscribe(A).await;
    let mut stream = sim.stream(&[&id], &anchored(A)).await;
    assert_eq!(
        stream.headers.get("transfer-encoding").unwrap(),
        "chunked",
        "{:?}",
        stream.headers
    );
    sim.events(A, EventType::NewMail, 2).await;
    let envelope = stream.non_keepalive().await;
    let batch = parse(&envelope);
    let notifications: Vec<_> = batch.notifications().collect();
    assert_eq!(notifications.len(), 1);
    assert_eq!(notifications[0].subscription_id, id.as_str());
    assert_eq!(notifications[0].events.len(), 2);
    for event in &notifications[0].events {
        assert_eq!(event.kind, EventType::NewMail);
        assert!(
            event.watermark.is_none(),
            "streamed events carry no watermark"
        );
        assert!(event.timestamp.is_some() && event.object.is_some());
        assert!(event.parent_folder_id.is_some());
    }
    assert_eq!(
        batch.messages[0].connection_status,
        Some(ConnectionStatus::Ok)
    );
    // Event types not asked for are not streamed; moves carry their old ids.
    sim.events(A, EventType::Deleted, 1).await;
    sim.events(A, EventType::Moved, 1).await;
    let batch_bytes = stream.non_keepalive().await;
    let batch = parse(&batch_bytes);
    let kinds: Vec<EventType> = batch
        .notifications()
        .flat_map(|n| n.events.iter().map(|e| e.kind))
        .collect();
    assert_eq!(kinds, [EventType::Moved]);
    let info = sim.handle.streaming_subscription(&id).unwrap();
    assert_eq!(info.events_delivered, 3);
    assert_eq!(info.connection, Some(1));
}

#[tokio::test]
async fn keepalives_at_the_period_then_closed_at_the_timeout() {
    let sim = Sim::start(config()).await;
    let id = sim.subscribe(A).await;
    let mut stream = sim.stream(&[&id], &anchored(A)).await;
    let (envelopes, end) = stream.rest().await;
    let elapsed = stream.opened.elapsed();
    assert!(matches!(end, Next::End), "{end:?}");
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    let (last, keepalives) = envelopes.split_last().unwrap();
    assert!(parse(last).is_closed());
    // 1.5 s at 100 ms: about 14 keep-alives (timers are loose; no busy loop either).
    assert!(
        (8..=16).contains(&keepalives.len()),
        "{} keep-alives",
        keepalives.len()
    );
    for envelope in keepalives {
        let batch = parse(envelope);
        assert!(batch.is_keep_alive());
        assert_eq!(
            batch.messages[0].connection_status,
            Some(ConnectionStatus::Ok)
        );
    }
    let connection = sim.handle.streaming_connection(1).unwrap();
    assert_eq!(connection.end, Some(ConnectionEnd::Closed));
    assert_eq!(connection.keepalives as usize, keepalives.len());
    assert_eq!(connection.envelopes as usize, envelopes.len());
    // The subscription outlives its connection.
    assert!(sim.handle.streaming_subscription(&id).unwrap().live);
}

#[tokio::test]
async fn connection_timeout_follows_the_minutes_times_the_time_factor() {
    let mut config = config();
    config.streaming_connection_timeout = None;
    config.time_factor = 0.01; // 1 minute: 600 ms
    let sim = Sim::start(config).await;
    let id = sim.subscribe(A).await;
    let mut stream = sim.stream(&[&id], &anchored(A)).await;
    let (envelopes, end) = stream.rest().await;
    assert!(matches!(end, Next::End));
    assert!(parse(envelopes.last().unwrap()).is_closed());
    let elapsed = stream.opened.elapsed();
    assert!(
        elapsed >= Duration::from_millis(550) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert_eq!(sim.handle.streaming_connection(1).unwrap().timeout_ms, 600);
}

#[tokio::test]
async fn events_wait_for_a_connection_and_unsubscribe_ends_it() {
    let sim = Sim::start(config()).await;
    let id = sim.subscribe(A).await;
    sim.events(A, EventType::Created, 3).await;
    assert_eq!(
        sim.handle
            .streaming_subscription(&id)
            .unwrap()
            .pending_events,
        3
    );
    let mut stream = sim.stream(&[&id], &anchored(A)).await;
    let batch_bytes = stream.non_keepalive().await;
    assert_eq!(
        parse(&batch_bytes)
            .notifications()
            .next()
            .unwrap()
            .events
            .len(),
        3
    );

    let body = unsubscribe_request(&id, Some(A), DEFAULT_SERVER_VERSION).unwrap();
    let (status, _, answer) = sim.post(&anchored(A), body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let parsed = parse_unsubscribe_response(&answer).unwrap();
    assert_eq!(parsed.class, ResponseClass::Success);
    // Its connection has nothing left to serve: Closed.
    let (envelopes, end) = stream.rest().await;
    assert!(matches!(end, Next::End));
    assert!(parse(envelopes.last().unwrap()).is_closed());
    assert_eq!(sim.connection_end(1).await, ConnectionEnd::NoSubscriptions);
    assert_eq!(
        sim.handle.streaming_subscription(&id).unwrap().end,
        Some(StreamingEnd::Unsubscribed)
    );
    // Again: not found.
    let (_, _, answer) = sim.post(&anchored(A), body).await;
    let parsed = parse_unsubscribe_response(&answer).unwrap();
    assert_eq!(parsed.code.as_deref(), Some("ErrorSubscriptionNotFound"));
}

#[tokio::test]
async fn idle_subscriptions_expire() {
    let mut config = config();
    config.time_factor = 0.0001; // 30 minutes: 180 ms
    let sim = Sim::start(config).await;
    let id = sim.subscribe(A).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut stream = sim.stream(&[&id], &anchored(A)).await;
    let (envelopes, end) = stream.rest().await;
    assert!(matches!(end, Next::End));
    assert_eq!(envelopes.len(), 1);
    assert_eq!(
        errors(&parse(&envelopes[0])),
        [("ErrorSubscriptionNotFound".to_owned(), vec![id.clone()])]
    );
    assert_eq!(
        sim.handle.streaming_subscription(&id).unwrap().end,
        Some(StreamingEnd::Expired)
    );
}

#[tokio::test]
async fn old_server_versions_and_bad_timeouts_are_refused() {
    let sim = Sim::start(config()).await;
    let id = sim.subscribe(A).await;
    let body = get_streaming_events_request(&[&id], 1, None, DEFAULT_SERVER_VERSION)
        .unwrap()
        .replace("Exchange2013", "Exchange2010");
    let (status, _, answer) = sim.post(&anchored(A), body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(String::from_utf8_lossy(&answer).contains("ErrorInvalidServerVersion"));
    let body = get_streaming_events_request(&[&id], 1, None, DEFAULT_SERVER_VERSION)
        .unwrap()
        .replace(">1</m:ConnectionTimeout>", ">31</m:ConnectionTimeout>");
    let (status, _, answer) = sim.post(&anchored(A), body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(String::from_utf8_lossy(&answer).contains("ErrorSchemaValidation"));
}

#[tokio::test]
async fn more_than_200_ids_are_refused() {
    let sim = Sim::start(config()).await;
    let id = sim.subscribe(A).await;
    let mut ids: Vec<String> = (0..200).map(|i| format!("bogus-{i}")).collect();
    ids.push(id);
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    // The ews builder refuses 201 ids; build 200 and add one by hand.
    let body = get_streaming_events_request(&refs[..200], 1, None, DEFAULT_SERVER_VERSION)
        .unwrap()
        .replace(
            "</m:SubscriptionIds>",
            &format!(
                "<t:SubscriptionId>{}</t:SubscriptionId></m:SubscriptionIds>",
                refs[200]
            ),
        );
    let (status, headers, answer) = sim.post(&anchored(A), body).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("transfer-encoding").is_none());
    let batch = parse(&answer);
    assert_eq!(errors(&batch)[0].0, "ErrorInvalidArgument");
    assert_eq!(
        sim.handle.streaming_connection(1).unwrap().end,
        Some(ConnectionEnd::Refused)
    );
}

#[tokio::test]
async fn unknown_ids_are_reported_while_the_others_stream() {
    let sim = Sim::start(config()).await;
    let id = sim.subscribe(A).await;
    let mut stream = sim.stream(&[&id, "no-such-id"], &anchored(A)).await;
    let first = stream.envelope().await;
    assert_eq!(
        errors(&parse(&first)),
        [(
            "ErrorSubscriptionNotFound".to_owned(),
            vec!["no-such-id".to_owned()]
        )]
    );
    sim.events(A, EventType::NewMail, 1).await;
    let batch_bytes = stream.non_keepalive().await;
    assert_eq!(
        parse(&batch_bytes)
            .notifications()
            .next()
            .unwrap()
            .subscription_id,
        id.as_str()
    );
}

#[tokio::test]
async fn connection_limit_per_account() {
    let mut config = config();
    config.streaming_connection_limit = 2;
    let sim = Sim::start(config).await;
    let a = sim.subscribe(A).await;
    let b = sim.subscribe(B).await;
    let c = sim.subscribe(C).await;
    // No impersonation: all three are charged to the caller.
    let _one = sim.stream(&[&a], &anchored(A)).await;
    let _two = sim.stream(&[&b], &anchored(B)).await;
    let mut three = sim.stream(&[&c], &anchored(C)).await;
    let (envelopes, end) = three.rest().await;
    assert!(matches!(end, Next::End));
    assert_eq!(
        errors(&parse(&envelopes[0]))[0].0,
        "ErrorExceededConnectionCount"
    );
    // Impersonating the mailbox charges its own account instead.
    let mut four = sim.stream_as(&[&c], Some(C), &anchored(C)).await;
    sim.events(C, EventType::NewMail, 1).await;
    let batch_bytes = four.non_keepalive().await;
    assert_eq!(parse(&batch_bytes).notifications().count(), 1);
    let connections = sim.handle.streaming_connections();
    assert_eq!(
        connections[2].refused_code.as_deref(),
        Some("ErrorExceededConnectionCount")
    );
    assert_eq!(connections[3].account, C);
    assert!(connections[3].open);

    // The fault: the next one is refused whatever the count.
    sim.handle.streaming_refuse_connections(1);
    let mut five = sim.stream_as(&[&a], Some(A), &anchored(A)).await;
    let (envelopes, _) = five.rest().await;
    assert_eq!(
        errors(&parse(&envelopes[0]))[0].0,
        "ErrorExceededConnectionCount"
    );
}

#[tokio::test]
async fn affinity_group_shares_one_connection_and_needs_anchor_and_cookie() {
    let sim = Sim::start(config()).await;
    // A is the group's anchor: its Subscribe asks for affinity and gets the cookie.
    let (a, cookie) = sim
        .subscribe_with(
            A,
            &[("x-anchormailbox", A), ("x-preferserveraffinity", "true")],
        )
        .await;
    let cookie = cookie.expect("the first Subscribe of a group sets X-BackEndOverrideCookie");
    assert!(cookie.starts_with("X-BackEndOverrideCookie="));
    let (b, again) = sim
        .subscribe_with(
            B,
            &[
                ("x-anchormailbox", A),
                ("x-preferserveraffinity", "true"),
                ("cookie", &cookie),
            ],
        )
        .await;
    assert!(again.is_none());
    let c = sim.subscribe(C).await;

    // Without the cookie the request may reach another mailbox server: not found there.
    let mut stream = sim.stream(&[&a, &b], &anchored(A)).await;
    let (envelopes, _) = stream.rest().await;
    assert_eq!(errors(&parse(&envelopes[0]))[0].1.len(), 2);
    // The cookie without X-PreferServerAffinity does not route either (the anchor of another
    // group does).
    let mut stream = sim
        .stream(&[&a, &b], &[("x-anchormailbox", C), ("cookie", &cookie)])
        .await;
    let (envelopes, _) = stream.rest().await;
    assert_eq!(envelopes.len(), 1);
    assert_eq!(
        errors(&parse(&envelopes[0])),
        [(
            "ErrorSubscriptionNotFound".to_owned(),
            vec![a.clone(), b.clone()]
        )]
    );
    // Without X-AnchorMailbox: the same.
    let mut stream = sim.stream(&[&a], &[("cookie", &cookie)]).await;
    let (envelopes, _) = stream.rest().await;
    assert_eq!(
        errors(&parse(&envelopes[0]))[0].0,
        "ErrorSubscriptionNotFound"
    );

    // Anchor and cookie: both stream on one connection; C (another group) is not found.
    let headers = [
        ("x-anchormailbox", A),
        ("x-preferserveraffinity", "true"),
        ("cookie", cookie.as_str()),
    ];
    let mut stream = sim.stream_as(&[&a, &b, &c], Some(A), &headers).await;
    let first = stream.envelope().await;
    assert_eq!(
        errors(&parse(&first)),
        [("ErrorSubscriptionNotFound".to_owned(), vec![c.clone()])]
    );
    sim.events(A, EventType::NewMail, 1).await;
    sim.events(B, EventType::NewMail, 1).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let envelope = stream.non_keepalive().await;
        for n in parse(&envelope).notifications() {
            seen.push(n.subscription_id.to_string());
        }
    }
    seen.sort();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(seen, want);
}

#[tokio::test]
async fn a_new_connection_takes_over_and_the_old_one_is_told() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    let mut old = sim.stream(&[&a], &anchored(A)).await;
    let mut new = sim.stream(&[&a], &anchored(A)).await;
    let (envelopes, end) = old.rest().await;
    assert!(matches!(end, Next::End));
    let last = parse(envelopes.last().unwrap());
    assert_eq!(
        errors(&last),
        [(
            "ErrorNewEventStreamConnectionOpened".to_owned(),
            vec![a.clone()]
        )]
    );
    assert!(last.is_closed());
    assert_eq!(sim.connection_end(1).await, ConnectionEnd::Replaced);
    sim.events(A, EventType::NewMail, 1).await;
    let batch_bytes = new.non_keepalive().await;
    assert_eq!(parse(&batch_bytes).notifications().count(), 1);
}

#[tokio::test]
async fn fault_cut_drops_the_connection_without_closed() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    let mut stream = sim.stream(&[&a], &anchored(A)).await;
    let _ = stream.envelope().await;
    assert_eq!(sim.handle.streaming_cut(None), 1);
    let (envelopes, end) = stream.rest().await;
    assert!(matches!(end, Next::Broken), "{end:?}");
    assert!(envelopes.iter().all(|e| !parse(e).is_closed()));
    assert_eq!(sim.connection_end(1).await, ConnectionEnd::Cut);
    // Events made meanwhile wait for the next connection.
    sim.events(A, EventType::NewMail, 2).await;
    let mut next = sim.stream(&[&a], &anchored(A)).await;
    let batch_bytes = next.non_keepalive().await;
    assert_eq!(
        parse(&batch_bytes)
            .notifications()
            .next()
            .unwrap()
            .events
            .len(),
        2
    );
}

#[tokio::test]
async fn fault_stall_stops_keepalives_but_keeps_the_socket() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    let mut stream = sim.stream(&[&a], &anchored(A)).await;
    let _ = stream.envelope().await;
    assert_eq!(sim.handle.streaming_stall(Some(1)), 1);
    // Past the timeout: silence, not Closed, not the end.
    assert!(matches!(
        stream.next(Duration::from_secs(2)).await,
        Next::Silent | Next::Envelope(_)
    ));
    assert!(matches!(
        stream.next(Duration::from_millis(500)).await,
        Next::Silent
    ));
    let info = sim.handle.streaming_connection(1).unwrap();
    assert!(info.stalled && info.open);
    drop(stream);
    assert_eq!(sim.connection_end(1).await, ConnectionEnd::ClientGone);
}

#[tokio::test]
async fn fault_expire_reports_subscription_not_found() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    let b = sim.subscribe(B).await;
    let mut stream = sim.stream_as(&[&a, &b], None, &anchored(A)).await;
    sim.handle.streaming_expire(&a).unwrap();
    let envelope = stream.non_keepalive().await;
    assert_eq!(
        errors(&parse(&envelope)),
        [("ErrorSubscriptionNotFound".to_owned(), vec![a.clone()])]
    );
    // B streams on.
    sim.events(B, EventType::NewMail, 1).await;
    let batch_bytes = stream.non_keepalive().await;
    assert_eq!(
        parse(&batch_bytes)
            .notifications()
            .next()
            .unwrap()
            .subscription_id,
        b.as_str()
    );
    // And a new connection for A is told the same.
    let mut again = sim.stream(&[&a], &anchored(A)).await;
    let (envelopes, _) = again.rest().await;
    assert_eq!(
        errors(&parse(&envelopes[0]))[0].0,
        "ErrorSubscriptionNotFound"
    );
}

#[tokio::test]
async fn fault_missed_events_keeps_the_subscription() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    sim.events(A, EventType::NewMail, 3).await;
    sim.handle.streaming_missed_events(&a).unwrap();
    let mut stream = sim.stream(&[&a], &anchored(A)).await;
    let envelope = stream.non_keepalive().await;
    assert_eq!(
        errors(&parse(&envelope)),
        [("ErrorMissedNotificationEvents".to_owned(), vec![a.clone()])]
    );
    // The three waiting events were lost; new ones flow.
    sim.events(A, EventType::NewMail, 1).await;
    let batch_bytes = stream.non_keepalive().await;
    assert_eq!(
        parse(&batch_bytes)
            .notifications()
            .next()
            .unwrap()
            .events
            .len(),
        1
    );
}

#[tokio::test]
async fn fault_move_mailbox_until_autodiscover() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    let b = sim.subscribe(B).await;
    let mut stream = sim.stream(&[&a, &b], &anchored(A)).await;
    sim.handle.move_mailbox(A).unwrap();
    let envelope = stream.non_keepalive().await;
    assert_eq!(
        errors(&parse(&envelope)),
        [("ErrorProxyRequestNotAllowed".to_owned(), vec![a.clone()])]
    );
    let mut again = sim.stream(&[&a], &anchored(A)).await;
    let (envelopes, _) = again.rest().await;
    assert_eq!(
        errors(&parse(&envelopes[0]))[0].0,
        "ErrorProxyRequestNotAllowed"
    );
    // Autodiscover is asked: the mailbox answers again; the old subscription is gone.
    let url = format!("http://{}/autodiscover/autodiscover.svc", sim.addr);
    let body = build_get_user_settings(&GetUserSettingsRequest {
        server_version: DEFAULT_SERVER_VERSION,
        url: &url,
        mailboxes: &[A],
    })
    .unwrap();
    let response = send(sim.addr, "/autodiscover/autodiscover.svc", &[], body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut after = sim.stream(&[&a], &anchored(A)).await;
    let (envelopes, _) = after.rest().await;
    assert_eq!(
        errors(&parse(&envelopes[0]))[0].0,
        "ErrorSubscriptionNotFound"
    );
    let fresh = sim.subscribe(A).await;
    assert_ne!(fresh, a);
}

#[tokio::test]
async fn control_routes_list_and_inject() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    let _stream = sim.stream(&[&a], &anchored(A)).await;
    let get = |path: &'static str| {
        let addr = sim.addr;
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let request = Request::get(path)
                .header("host", "ews-sim")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        }
    };
    let subs = get("/_sim/streaming/subscriptions").await;
    assert_eq!(subs[0]["id"], a.as_str());
    let connections = get("/_sim/streaming/connections").await;
    assert_eq!(connections[0]["open"], true);
    assert_eq!(connections[0]["anchor"], A);
    let control = |route: &'static str, body: serde_json::Value| {
        let addr = sim.addr;
        async move {
            let response = send(
                addr,
                route,
                &[("content-type", "application/json")],
                body.to_string(),
            )
            .await;
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            )
        }
    };
    let (status, _) = control(
        "/_sim/faults/streaming/missed-events",
        serde_json::json!({"subscription_id": a}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = control(
        "/_sim/faults/streaming/expire",
        serde_json::json!({"subscription_id": "nope"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, body) = control(
        "/_sim/faults/streaming/refuse-connections",
        serde_json::json!({"count": 2}),
    )
    .await;
    assert_eq!(body["ok"], true);
    assert_eq!(sim.handle.snapshot().faults.streaming_refuse_remaining, 2);
    let (_, body) = control("/_sim/faults/streaming/stall", serde_json::json!({})).await;
    assert_eq!(body["stalled"], 1);
    let (_, body) = control(
        "/_sim/faults/streaming/cut",
        serde_json::json!({"connection": 1}),
    )
    .await;
    assert_eq!(body["cut"], 1);
    assert_eq!(sim.connection_end(1).await, ConnectionEnd::Cut);

    // The faults for half envelopes, malformed envelopes, slow heads and deleted mailboxes.
    sim.handle.clear_faults();
    let _again = sim.stream(&[&a], &anchored(A)).await;
    let (_, body) = control(
        "/_sim/faults/streaming/malformed-envelope",
        serde_json::json!({}),
    )
    .await;
    assert_eq!(body["armed"], 1);
    let (_, body) = control(
        "/_sim/faults/streaming/cut-mid-envelope",
        serde_json::json!({}),
    )
    .await;
    assert_eq!(body["cut"], 1);
    let (_, body) = control(
        "/_sim/faults/streaming/delay-head",
        serde_json::json!({"count": 3, "ms": 10}),
    )
    .await;
    assert_eq!(body["ok"], true);
    let faults = sim.handle.snapshot().faults;
    assert_eq!(
        (
            faults.streaming_head_delay_remaining,
            faults.streaming_head_delay_ms
        ),
        (3, 10)
    );
    let (status, _) = control(
        "/_sim/faults/delete-mailbox",
        serde_json::json!({"mailbox": "nobody@contoso.example"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, body) = control(
        "/_sim/faults/delete-mailbox",
        serde_json::json!({"mailbox": B}),
    )
    .await;
    assert_eq!(body["ok"], true);
    assert!(sim
        .handle
        .mailboxes()
        .iter()
        .any(|m| m.smtp == B && m.deleted));
}

#[tokio::test]
async fn thousand_mailboxes_in_five_groups() {
    const GROUPS: usize = 5;
    const PER_GROUP: usize = 200;
    let mut config = config();
    config.streaming_connection_timeout = Some(Duration::from_secs(30));
    config.streaming_keepalive = Duration::from_millis(200);
    config.mailboxes = (0..GROUPS * PER_GROUP)
        .map(|i| {
            MailboxConfig::new(format!("m{i:04}@contoso.example"))
                .grouping(format!("G{}", i % GROUPS))
        })
        .collect();
    let sim = Sim::start(config).await;
    let started = Instant::now();
    let mut groups: Vec<(String, String, Vec<String>)> = Vec::new();
    for g in 0..GROUPS {
        let members: Vec<String> = (0..GROUPS * PER_GROUP)
            .filter(|i| i % GROUPS == g)
            .map(|i| format!("m{i:04}@contoso.example"))
            .collect();
        let anchor = members[0].clone();
        let (first, cookie) = sim
            .subscribe_with(
                &anchor,
                &[
                    ("x-anchormailbox", &anchor),
                    ("x-preferserveraffinity", "true"),
                ],
            )
            .await;
        let cookie = cookie.unwrap();
        let mut ids = vec![first];
        for member in &members[1..] {
            let (id, _) = sim
                .subscribe_with(
                    member,
                    &[
                        ("x-anchormailbox", &anchor),
                        ("x-preferserveraffinity", "true"),
                        ("cookie", &cookie),
                    ],
                )
                .await;
            ids.push(id);
        }
        groups.push((anchor, cookie, ids));
    }
    let mut streams = Vec::new();
    for (anchor, cookie, ids) in &groups {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let headers = [
            ("x-anchormailbox", anchor.as_str()),
            ("x-preferserveraffinity", "true"),
            ("cookie", cookie.as_str()),
        ];
        streams.push(sim.stream_as(&refs, Some(anchor), &headers).await);
    }
    // One event in every mailbox: each group's connection carries its 200.
    for i in 0..GROUPS * PER_GROUP {
        sim.events(&format!("m{i:04}@contoso.example"), EventType::NewMail, 1)
            .await;
    }
    for stream in &mut streams {
        let mut seen = 0;
        while seen < PER_GROUP {
            let envelope = stream.non_keepalive().await;
            let batch = parse(&envelope);
            assert!(errors(&batch).is_empty());
            seen += batch.notifications().map(|n| n.events.len()).sum::<usize>();
        }
        assert_eq!(seen, PER_GROUP);
    }
    let connections = sim.handle.streaming_connections();
    assert_eq!(connections.len(), GROUPS);
    assert!(connections
        .iter()
        .all(|c| c.open && c.serving.len() == PER_GROUP));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn server_busy_refuses_get_streaming_events_with_a_fault() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    sim.handle.server_busy(1, Duration::from_millis(1500));
    let body = get_streaming_events_request(&[&a], 1, None, DEFAULT_SERVER_VERSION).unwrap();
    let (status, _, answer) = sim.post(&anchored(A), body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    match parse_streaming_events(&answer) {
        Err(ews::EwsError::Fault(fault)) => {
            assert_eq!(fault.response_code.as_deref(), Some("ErrorServerBusy"));
            assert_eq!(fault.back_off, Some(Duration::from_millis(1500)));
        }
        other => panic!("expected a fault, got {other:?}"),
    }
    // The next one streams.
    let mut stream = sim.stream(&[&a], &anchored(A)).await;
    assert!(parse(&stream.envelope().await).is_keep_alive());
}

#[tokio::test]
async fn fault_cut_mid_envelope_writes_half_an_envelope_then_drops_it() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    let mut stream = sim.stream(&[&a], &anchored(A)).await;
    let _ = stream.envelope().await;
    // Frozen first, so the events are still waiting when the cut is armed: they go into the
    // envelope that is cut in half.
    assert_eq!(sim.handle.streaming_stall(Some(1)), 1);
    sim.events(A, EventType::NewMail, 2).await;
    assert_eq!(sim.handle.streaming_cut_mid_envelope(Some(1)), 1);
    let (envelopes, end) = stream.rest().await;
    assert!(matches!(end, Next::Broken), "{end:?}");
    assert!(
        envelopes
            .iter()
            .all(|e| parse(e).notifications().next().is_none()),
        "no whole envelope carried the events"
    );
    assert!(
        stream.splitter.buffered() > 0,
        "part of an envelope was written before the cut"
    );
    assert_eq!(sim.connection_end(1).await, ConnectionEnd::Cut);
    let info = sim.handle.streaming_connection(1).unwrap();
    assert!(info.cut_mid_envelope.is_some_and(|n| n > 0), "{info:?}");
    // The events were "sent": the subscription does not have them any more.
    let sub = sim.handle.streaming_subscription(&a).unwrap();
    assert_eq!(sub.pending_events, 0);
    assert!(sub.live);
    // An idle connection is cut inside a keep-alive.
    let mut next = sim.stream(&[&a], &anchored(A)).await;
    let _ = next.envelope().await;
    assert_eq!(sim.handle.streaming_cut_mid_envelope(None), 1);
    let (_, end) = next.rest().await;
    assert!(matches!(end, Next::Broken), "{end:?}");
    assert!(next.splitter.buffered() > 0);
}

#[tokio::test]
async fn fault_malformed_envelope_is_well_framed_and_the_stream_goes_on() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    let mut stream = sim.stream(&[&a], &anchored(A)).await;
    let _ = stream.envelope().await;
    assert_eq!(sim.handle.streaming_malformed_envelope(None), 1);
    // Keep-alives may come before it; the malformed one is a whole envelope that does not
    // parse as a GetStreamingEventsResponse.
    loop {
        let envelope = stream.envelope().await;
        match parse_streaming_events(&envelope) {
            Ok(batch) => assert!(batch.is_keep_alive()),
            Err(e) => {
                assert!(!matches!(e, ews::EwsError::Fault(_)), "{e}");
                let text = String::from_utf8(envelope).unwrap();
                assert!(
                    ews_sim::streaming::MALFORMED_ENVELOPE.ends_with(&text),
                    "{text}"
                );
                break;
            }
        }
    }
    // The connection stays open and streams on.
    sim.events(A, EventType::NewMail, 1).await;
    let batch_bytes = stream.non_keepalive().await;
    assert_eq!(parse(&batch_bytes).notifications().count(), 1);
    let info = sim.handle.streaming_connection(1).unwrap();
    assert!(info.open);
    assert_eq!(info.malformed, 1);
}

#[tokio::test]
async fn fault_delay_head_keeps_the_old_connection_serving_until_answered() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    let mut old = sim.stream(&[&a], &anchored(A)).await;
    let _ = old.envelope().await;
    sim.handle
        .streaming_delay_head(1, Duration::from_millis(800));
    let started = Instant::now();
    let check = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // While the new request waits, the old connection still has the subscription.
        let sub = sim.handle.streaming_subscription(&a).unwrap();
        assert_eq!(sub.connection, Some(1));
        sim.events(A, EventType::NewMail, 1).await;
        let batch_bytes = old.non_keepalive().await;
        assert_eq!(parse(&batch_bytes).notifications().count(), 1);
    };
    let (ids, headers) = ([a.as_str()], anchored(A));
    let (mut new, ()) = tokio::join!(sim.stream(&ids, &headers), check);
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    // Answered: it takes over; only the next one is delayed no more.
    assert!(parse(&new.envelope().await).is_keep_alive());
    assert_eq!(sim.connection_end(1).await, ConnectionEnd::Replaced);
    let started = Instant::now();
    let _third = sim.stream(&[&a], &anchored(A)).await;
    assert!(started.elapsed() < Duration::from_millis(800));
}

#[tokio::test]
async fn moved_anchor_refuses_the_whole_connection() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    let b = sim.subscribe(B).await;
    sim.handle.move_mailbox(A).unwrap();
    let mut stream = sim.stream(&[&a, &b], &anchored(A)).await;
    let (envelopes, end) = stream.rest().await;
    assert!(matches!(end, Next::End));
    assert_eq!(envelopes.len(), 1);
    assert_eq!(
        errors(&parse(&envelopes[0])),
        [("ErrorProxyRequestNotAllowed".to_owned(), vec![])],
        "a connection-level error: no ErrorSubscriptionIds"
    );
    let info = sim.handle.streaming_connection(1).unwrap();
    assert_eq!(
        info.refused_code.as_deref(),
        Some("ErrorProxyRequestNotAllowed")
    );
    // The moved mailbox's subscription is gone; anchored elsewhere, B streams.
    assert_eq!(
        sim.handle.streaming_subscription(&a).unwrap().end,
        Some(StreamingEnd::Moved)
    );
    let mut other = sim.stream(&[&b], &anchored(B)).await;
    assert!(parse(&other.envelope().await).is_keep_alive());
}

#[tokio::test]
async fn fault_delete_mailbox_fails_its_subscribe_and_its_anchoring() {
    let sim = Sim::start(config()).await;
    let a = sim.subscribe(A).await;
    let mut stream = sim.stream(&[&a], &anchored(A)).await;
    let _ = stream.envelope().await;
    sim.handle.delete_mailbox(A).unwrap();
    // The connection serving it reports the subscription gone.
    let envelope = stream.non_keepalive().await;
    assert_eq!(
        errors(&parse(&envelope)),
        [("ErrorSubscriptionNotFound".to_owned(), vec![a.clone()])]
    );
    let sim = &sim;
    let subscribe_code = |mailbox: &'static str, anchor: &'static str| async move {
        let body = streaming_subscribe_request(&StreamingSubscribeRequest {
            server_version: DEFAULT_SERVER_VERSION,
            mailbox,
            folders: Folders::All,
            event_types: EVENTS,
        })
        .unwrap();
        let headers = [
            ("x-anchormailbox", anchor),
            ("x-preferserveraffinity", "true"),
        ];
        let (status, _, body) = sim.post(&headers, body).await;
        assert_eq!(status, StatusCode::OK);
        let parsed = parse_subscribe_response(&body).unwrap();
        parsed.status.code.map(|c| c.into_owned())
    };
    // Permanently: its own Subscribe, and B's anchored on it.
    assert_eq!(
        subscribe_code(A, A).await.as_deref(),
        Some("ErrorNonExistentMailbox")
    );
    assert_eq!(
        subscribe_code(B, A).await.as_deref(),
        Some("ErrorNonExistentMailbox")
    );
    assert_eq!(subscribe_code(B, B).await.as_deref(), Some("NoError"));
    let b = sim.subscribe(B).await;
    // A GetStreamingEvents anchored on it fails as a whole; anchored on B it streams.
    let mut refused = sim.stream(&[&b], &anchored(A)).await;
    let (envelopes, _) = refused.rest().await;
    assert_eq!(
        errors(&parse(&envelopes[0])),
        [("ErrorNonExistentMailbox".to_owned(), vec![])]
    );
    let mut ok = sim.stream(&[&b], &anchored(B)).await;
    assert!(parse(&ok.envelope().await).is_keep_alive());
    // Autodiscover still answers for it.
    assert!(sim
        .handle
        .mailboxes()
        .iter()
        .any(|m| m.smtp == A && m.deleted));
}
