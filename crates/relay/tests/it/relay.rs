//! The relay core end to end: real TLS, real sockets on ephemeral loopback ports.

use crate::common;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const EVENTS: &str = "send-notification-events.xml";
const RESULT_OK: &str = "send-notification-result-ok.xml";
const STATUS: &str = "send-notification-status.xml";

#[tokio::test]
async fn notification_and_answer_pass_byte_for_byte() {
    let receiver = TestReceiver::answering(fixture(RESULT_OK)).await;
    let relay = Relay::start(receiver.addr, &["--path-prefix", "/ews"]).await;
    let mut c = relay.client().await;
    let (status, headers, body) = send(&mut c, post("/ews/listener?x=1", fixture(EVENTS))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        Bytes::from(fixture(RESULT_OK)),
        "answer returned unchanged"
    );
    assert_eq!(headers["content-type"], "text/xml; charset=utf-8");
    assert_eq!(headers["x-receiver"], "test", "receiver headers returned");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        seen[0].path, "/ews/listener?x=1",
        "path and query forwarded as received"
    );
    assert_eq!(
        seen[0].body,
        Bytes::from(fixture(EVENTS)),
        "notification forwarded unchanged"
    );
    assert_eq!(seen[0].headers["content-type"], "text/xml; charset=utf-8");
    assert_eq!(
        seen[0].headers["content-length"],
        fixture(EVENTS).len().to_string().as_str()
    );
    // A second request on the same client connection (keep-alive on both sides).
    let (status, _, _) = send(&mut c, post("/ews", fixture(EVENTS))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        receiver.connections.load(Ordering::SeqCst),
        1,
        "pooled receiver connection reused"
    );
    assert_eq!(
        relay
            .metric("ews_relay_requests_total{class=\"2xx\"}")
            .await,
        2.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_removed() {
    let receiver = TestReceiver::answering(fixture(RESULT_OK)).await;
    let relay = Relay::start(receiver.addr, &[]).await;
    let mut c = relay.client().await;
    let req = Request::post("/")
        .header("host", "relay.example.com")
        .header("x-forwarded-for", "203.0.113.7")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header(
            "soapaction",
            "\"http://schemas.microsoft.com/exchange/services/2006/messages/SendNotification\"",
        )
        .body(Full::new(Bytes::from(fixture(EVENTS))))
        .unwrap();
    let (status, _, _) = send(&mut c, req).await;
    assert_eq!(status, StatusCode::OK);
    let h = &receiver.seen()[0].headers;
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "relay.example.com");
    assert_eq!(
        h["host"],
        receiver.addr.to_string().as_str(),
        "Host is the receiver's"
    );
    assert!(
        h.get("x-hop").is_none(),
        "header named in Connection removed"
    );
    assert!(h.get("keep-alive").is_none());
    assert!(h.get("soapaction").is_some(), "end-to-end headers kept");
    // Without a previous X-Forwarded-For the peer alone is written.
    let (status, _, _) = send(&mut c, post("/", fixture(STATUS))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(receiver.seen()[1].headers["x-forwarded-for"], "127.0.0.1");
    relay.stop().await;
}

#[tokio::test]
async fn peer_outside_allow_list_gets_no_handshake() {
    let receiver = TestReceiver::answering(fixture(RESULT_OK)).await;
    let relay = Relay::start(receiver.addr, &["--allow", "127.0.0.1/32"]).await;
    let outsider: IpAddr = "127.0.0.2".parse().unwrap();
    // Raw TCP from 127.0.0.2: the relay closes without sending a byte.
    let mut raw = tcp_from(relay.addr, Some(outsider)).await.unwrap();
    let _ = raw.write_all(b"\x16\x03\x01\x00\x05hello").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "no byte from the relay");
    // A real TLS client from 127.0.0.2 fails its handshake.
    assert!(tls_connect(relay.addr, &relay.cert, Some(outsider))
        .await
        .is_err());
    // The allowed address still works.
    let mut c = relay.client().await;
    assert_eq!(
        send(&mut c, post("/", fixture(STATUS))).await.0,
        StatusCode::OK
    );
    assert_eq!(
        receiver.seen().len(),
        1,
        "receiver saw only the allowed client"
    );
    assert_eq!(
        relay
            .metric("ews_relay_connections_denied_total{reason=\"source\"}")
            .await,
        2.0
    );
    assert_eq!(
        relay
            .metric("ews_relay_tls_handshake_failures_total{reason=\"error\"}")
            .await,
        0.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn relay_answers_404_405_413_itself() {
    let receiver = TestReceiver::answering(fixture(RESULT_OK)).await;
    let relay = Relay::start(
        receiver.addr,
        &["--path-prefix", "/ews/", "--max-body", "2KiB"],
    )
    .await;
    let mut c = relay.client().await;
    let (s, _, _) = send(&mut c, post("/other", fixture(STATUS))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = send(&mut c, post("/ewsx", fixture(STATUS))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "prefix matches whole segments");
    let get = Request::get("/ews")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (s, h, _) = send(&mut c, get).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h["allow"], "POST");
    let mut c = relay.client().await;
    let (s, _, _) = send(&mut c, post("/ews", vec![b'a'; 2049])).await;
    assert_eq!(
        s,
        StatusCode::PAYLOAD_TOO_LARGE,
        "declared length over the limit"
    );
    // Chunked, no Content-Length: counted while reading.
    let mut tls = tls_connect(relay.addr, &relay.cert, None).await.unwrap();
    let mut req =
        b"POST /ews HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..2 {
        req.extend_from_slice(b"44c\r\n");
        req.extend_from_slice(&[b'a'; 1100]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    tls.write_all(&req).await.unwrap();
    let mut head = [0u8; 12];
    tls.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 413", "streamed body over the limit");
    // Exactly at the limit passes (a notification padded with trailing XML whitespace).
    let mut at_limit = fixture(STATUS);
    at_limit.resize(2048, b'\n');
    let mut c = relay.client().await;
    let (s, _, _) = send(&mut c, post("/ews", at_limit)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        receiver.seen().len(),
        1,
        "only the valid request reached the receiver"
    );
    assert_eq!(
        relay
            .metric("ews_relay_requests_total{class=\"4xx\"}")
            .await,
        5.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn receiver_down_is_502() {
    let down = closed_port().await;
    let relay = Relay::start(down, &[]).await;
    let mut c = relay.client().await;
    let (s, _, body) = send(&mut c, post("/", fixture(EVENTS))).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert!(String::from_utf8_lossy(&body).contains("receiver"));
    assert_eq!(
        relay
            .metric("ews_relay_upstream_errors_total{kind=\"connect\"}")
            .await,
        1.0
    );
    let (s, body) = admin_get(relay.admin, "/readyz").await.unwrap();
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    relay.stop().await;
}

#[tokio::test]
async fn silent_receiver_is_504() {
    let receiver = TestReceiver::with(Arc::new(|_| Box::pin(std::future::pending()))).await;
    let relay = Relay::start(receiver.addr, &["--upstream-timeout", "300ms"]).await;
    let mut c = relay.client().await;
    let t = Instant::now();
    let (s, _, _) = send(&mut c, post("/", fixture(EVENTS))).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT);
    assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(5));
    assert_eq!(
        relay
            .metric("ews_relay_upstream_errors_total{kind=\"timeout\"}")
            .await,
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn request_on_closed_pooled_connection_is_retried_on_a_fresh_one() {
    // A receiver that answers the first request on each connection, then closes the connection
    // when the next request arrives without answering it: what a receiver does when its
    // keep-alive timer fires just as the relay reuses the connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (c2, r2) = (conns.clone(), requests.clone());
    let answer = fixture(RESULT_OK);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            c2.fetch_add(1, Ordering::SeqCst);
            let r = r2.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                if read_raw_request(&mut s).await.is_some() {
                    r.fetch_add(1, Ordering::SeqCst);
                    write_raw_ok(&mut s, &answer).await;
                }
                if read_raw_request(&mut s).await.is_some() {
                    r.fetch_add(1, Ordering::SeqCst);
                }
                drop(s); // close without answering
            });
        }
    });
    let relay = Relay::start(addr, &[]).await;
    let mut c = relay.client().await;
    let (s, _, _) = send(&mut c, post("/", fixture(EVENTS))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, body) = send(&mut c, post("/", fixture(EVENTS))).await;
    assert_eq!(s, StatusCode::OK, "second request retried: {body:?}");
    assert_eq!(body, Bytes::from(fixture(RESULT_OK)));
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "the retry used a fresh connection"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 3);
    assert_eq!(relay.metric("ews_relay_upstream_retries_total").await, 1.0);
    relay.stop().await;
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let receiver = TestReceiver::answering(fixture(RESULT_OK)).await;
    let relay = Relay::start(receiver.addr, &["--header-timeout", "300ms"]).await;
    let mut tls = tls_connect(relay.addr, &relay.cert, None).await.unwrap();
    let t = Instant::now();
    tls.write_all(b"POST / HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    // Keep trickling a header byte every 100 ms: activity alone must not extend the deadline.
    let mut closed = false;
    for _ in 0..50 {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {} // a 408 or similar before close is fine
            Err(_) => {
                let _ = tls.write_all(b"X").await;
                let _ = tls.flush().await;
            }
        }
    }
    assert!(closed, "connection closed");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(receiver.seen().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn slow_handshake_is_cut_off() {
    let receiver = TestReceiver::answering(fixture(RESULT_OK)).await;
    let relay = Relay::start(receiver.addr, &["--handshake-timeout", "300ms"]).await;
    let mut raw = tcp_from(relay.addr, None).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
        .await
        .expect("closed by the relay")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(
        relay
            .metric("ews_relay_tls_handshake_failures_total{reason=\"timeout\"}")
            .await,
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn tls_1_1_is_refused() {
    let receiver = TestReceiver::answering(fixture(RESULT_OK)).await;
    let relay = Relay::start(receiver.addr, &[]).await;
    // A genuine TLS 1.1 client sends no signature_algorithms (a TLS 1.2 extension): rustls
    // refuses with handshake_failure. One that sends it is refused with protocol_version.
    for (with_sig_algs, expected_alert) in [(false, 40u8), (true, 70u8)] {
        let mut raw = tcp_from(relay.addr, None).await.unwrap();
        raw.write_all(&tls11_client_hello(with_sig_algs))
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf)).await;
        // Exactly one record: a fatal alert; no ServerHello (handshake record, type 22).
        assert_eq!(buf.len(), 7, "one alert record, then close: {buf:?}");
        assert_eq!(buf[0], 21, "alert record: {buf:?}");
        assert_eq!(buf[5], 2, "fatal: {buf:?}");
        assert_eq!(buf[6], expected_alert, "alert description: {buf:?}");
    }
    assert_eq!(
        relay
            .metric("ews_relay_tls_handshake_failures_total{reason=\"error\"}")
            .await,
        2.0
    );
    assert!(receiver.seen().is_empty());
    relay.stop().await;
}

/// A TLS 1.1 ClientHello (no supported_versions extension, so 1.1 is the highest offered)
/// with the TLS 1.1-era suites ECDHE-ECDSA-AES128-SHA and AES128-SHA.
fn tls11_client_hello(with_sig_algs: bool) -> Vec<u8> {
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x09, 0x00, 0x2f]); // cipher suites
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    if with_sig_algs {
        // extensions: signature_algorithms (13) = [ecdsa_secp256r1_sha256]
        body.extend_from_slice(&[0x00, 0x08, 0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]);
    }
    let mut hs = vec![0x01, 0x00, 0x00, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01, 0x00, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight() {
    let receiver = TestReceiver::with(Arc::new(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            http::Response::new(Full::new(Bytes::from_static(b"late but complete")))
        })
    }))
    .await;
    let mut relay = Relay::start(receiver.addr, &["--shutdown-grace", "5s"]).await;
    let mut c = relay.client().await;
    let in_flight = tokio::spawn(async move { send(&mut c, post("/", fixture(STATUS))).await });
    // Wait until the request has reached the receiver, then shut down.
    for _ in 0..200 {
        if !receiver.seen().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    relay.stop_signal();
    let (s, _, body) = in_flight.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(&body[..], b"late but complete");
    let addr = relay.addr;
    relay.join().await;
    assert!(tcp_from(addr, None).await.is_err(), "no longer accepting");
}

/// A keep-alive connection waiting for its next request is closed as shutdown begins, not
/// left to the grace deadline: the wait for shutdown spans all of a connection's requests.
#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let receiver = TestReceiver::answering(fixture(RESULT_OK)).await;
    let mut relay = Relay::start(receiver.addr, &["--shutdown-grace", "30s"]).await;
    let mut c = relay.client().await;
    for _ in 0..2 {
        assert_eq!(
            send(&mut c, post("/", fixture(STATUS))).await.0,
            StatusCode::OK
        );
    }
    let t = Instant::now();
    relay.stop_signal();
    relay.join().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "idle connection kept the relay up for {:?}",
        t.elapsed()
    );
    assert!(
        c.send_request(post("/", fixture(STATUS))).await.is_err(),
        "the idle connection was closed"
    );
}

#[tokio::test]
async fn shutdown_grace_cuts_what_does_not_finish() {
    let receiver = TestReceiver::with(Arc::new(|_| Box::pin(std::future::pending()))).await;
    let mut relay = Relay::start(receiver.addr, &["--shutdown-grace", "300ms"]).await;
    let mut c = relay.client().await;
    let in_flight = tokio::spawn(async move {
        c.ready().await.unwrap();
        c.send_request(post("/", fixture(STATUS))).await
    });
    for _ in 0..200 {
        if !receiver.seen().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    relay.stop_signal();
    relay.join().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "grace deadline honoured"
    );
    assert!(
        in_flight.await.unwrap().is_err(),
        "the stuck request was cut"
    );
}

#[tokio::test]
async fn connection_limit_makes_new_connections_wait() {
    let receiver = TestReceiver::answering(fixture(RESULT_OK)).await;
    let relay = Relay::start(receiver.addr, &["--max-connections", "1"]).await;
    let mut first = relay.client().await;
    assert_eq!(
        send(&mut first, post("/", fixture(STATUS))).await.0,
        StatusCode::OK
    );
    // The second connection is queued: its handshake cannot finish while the first is open.
    let (cert, addr) = (relay.cert.clone(), relay.addr);
    let second = tokio::spawn(async move {
        let mut c = https_client(addr, &cert, None).await.unwrap();
        send(&mut c, post("/", fixture(STATUS))).await.0
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "second connection waits at the limit"
    );
    drop(first);
    let s = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s, StatusCode::OK, "served once a slot was free");
    relay.stop().await;
}

#[tokio::test]
async fn admin_health_ready_and_metrics() {
    let receiver = TestReceiver::answering(fixture(RESULT_OK)).await;
    let relay = Relay::start(receiver.addr, &[]).await;
    assert_eq!(
        admin_get(relay.admin, "/healthz").await.unwrap().0,
        StatusCode::OK
    );
    let (s, body) = admin_get(relay.admin, "/readyz").await.unwrap();
    assert_eq!(s, StatusCode::OK, "receiver accepts connections: {body}");
    let mut c = relay.client().await;
    send(&mut c, post("/", fixture(EVENTS))).await;
    let m = relay.metrics().await;
    for name in [
        "ews_relay_connections_accepted_total",
        "ews_relay_connections_denied_total{reason=\"source\"}",
        "ews_relay_tls_handshake_failures_total{reason=\"error\"}",
        "ews_relay_requests_total{class=\"2xx\"}",
        "ews_relay_upstream_errors_total{kind=\"connect\"}",
        "ews_relay_request_duration_seconds_count",
        "ews_relay_open_connections",
    ] {
        assert!(m.contains(name), "{name} missing from\n{m}");
    }
    assert_eq!(metric_value(&m, "ews_relay_open_connections"), 1.0);
    assert_eq!(
        metric_value(&m, "ews_relay_request_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        admin_get(relay.admin, "/nope").await.unwrap().0,
        StatusCode::NOT_FOUND
    );
    relay.stop().await;
}

#[tokio::test]
async fn ipv6_listener_serves() {
    let Ok(probe) = TcpListener::bind("[::1]:0").await else {
        eprintln!("SKIPPED: no IPv6 loopback on this machine");
        return;
    };
    drop(probe);
    let receiver = TestReceiver::answering(fixture(RESULT_OK)).await;
    let cert = test_cert();
    let words: Vec<String> = [
        "ews-relay",
        "--upstream",
        &format!("http://{}", receiver.addr),
        "--tls-cert",
        &cert.cert_path.display().to_string(),
        "--tls-key",
        &cert.key_path.display().to_string(),
        "--allow",
        "::1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let relay = Relay::start_words(&words, "[::1]:0").await;
    let mut c = https_client(relay.addr, &cert.der, None).await.unwrap();
    let (s, _, _) = send(&mut c, post("/", fixture(EVENTS))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(receiver.seen()[0].headers["x-forwarded-for"], "::1");
    relay.stop().await;
}
