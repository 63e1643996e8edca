//! What a request body may cost, over both protocols: `--max-body-buffer` (the relay's budget
//! for bodies in flight, reserved at admission), an HTTP/2 connection's own share, and HTTP/2's
//! request-head timeout (`--header-timeout`, as HTTP/1.1's).
//!
//! Slow bodies are held open by the client: over HTTP/1.1 with `Expect: 100-continue` (the
//! relay's `100 Continue` says the request was admitted), over HTTP/2 with a body fed through a
//! channel (the reserved-bytes gauge says when the relay admitted it).

use crate::common;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{fixture, Relay, TestReceiver};
use http::{HeaderMap, Request, StatusCode};
use hyper::body::Frame;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

const EVENTS: &str = "send-notification-events.xml";
const RESULT_OK: &str = "send-notification-result-ok.xml";

/// `--max-body` in these tests, and the length every held body declares.
const BODY: usize = 16 << 10;
const MAX_BODY: &str = "16KiB";
/// Room for two held bodies.
const BUFFER: &str = "32KiB";

/// Longest wait for anything the relay should do promptly; longer is a hang.
const DEADLINE: Duration = Duration::from_secs(5);

const RESERVED: &str = "ews_relay_body_buffer_reserved_bytes";
const REFUSED_PROCESS: &str = "ews_relay_body_budget_refusals_total{budget=\"process\"}";
const REFUSED_CONNECTION: &str = "ews_relay_body_budget_refusals_total{budget=\"connection\"}";

async fn receiver() -> TestReceiver {
    TestReceiver::answering(fixture(RESULT_OK)).await
}

/// Waits until `series` reads `value`.
async fn wait_metric(relay: &Relay, series: &str, value: f64) {
    let start = Instant::now();
    loop {
        let now = relay.metric(series).await;
        if now == value {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{series} stayed at {now}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1, raw over TLS.
// ---------------------------------------------------------------------------------------------

/// Reads up to the end of a head (byte by byte: nothing after it is taken).
async fn read_head(s: &mut TlsStream<TcpStream>) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut b))
            .await
            .expect("relay answered in time")
            .expect("read");
        assert!(
            n == 1,
            "closed inside a head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

/// One answer: status, head (lower case), body.
async fn read_answer(s: &mut TlsStream<TcpStream>) -> (u16, String, Vec<u8>) {
    let head = read_head(s).await;
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.unwrap();
    (status, head, body)
}

/// An HTTP/1.1 POST whose body is held back: returns once the relay said `100 Continue`, that
/// is, admitted it.
async fn h1_held(relay: &Relay) -> TlsStream<TcpStream> {
    let mut s = common::tls_connect(relay.addr, &relay.cert, None)
        .await
        .unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/xml\r\ncontent-length: {BODY}\r\nexpect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let interim = read_head(&mut s).await;
    assert!(interim.starts_with("http/1.1 100"), "{interim}");
    s
}

/// Sends the held body (not a notification: the answer is 400) and reads the answer.
async fn h1_finish(mut s: TlsStream<TcpStream>) -> u16 {
    s.write_all(&[b'x'; BODY]).await.unwrap();
    read_answer(&mut s).await.0
}

/// A notification POSTed over a new HTTP/1.1 connection.
async fn h1_notification(relay: &Relay) -> (u16, String) {
    let mut s = common::tls_connect(relay.addr, &relay.cert, None)
        .await
        .unwrap();
    let body = fixture(EVENTS);
    let head = format!(
        "POST / HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/xml; charset=utf-8\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body).await.unwrap();
    let (status, head, _) = read_answer(&mut s).await;
    (status, head)
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 through hyper's client.
// ---------------------------------------------------------------------------------------------

/// A request body the test feeds (and holds) through a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// TLS to the relay offering only `h2`.
async fn h2_tls(relay: &Relay) -> TlsStream<TcpStream> {
    let mut config = (*common::client_tls(&relay.cert)).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// A new HTTP/2 connection.
async fn h2_client(relay: &Relay) -> SendRequest<ChannelBody> {
    let tls = h2_tls(relay).await;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

type H2Answer = JoinHandle<(StatusCode, HeaderMap)>;

/// Starts a POST declaring `length` bytes; its body goes through the sender returned.
fn h2_post(client: &SendRequest<ChannelBody>, length: usize) -> (mpsc::Sender<Bytes>, H2Answer) {
    let (tx, rx) = mpsc::channel(4);
    let req = Request::post("https://localhost/")
        .header("content-type", "text/xml; charset=utf-8")
        .header("content-length", length)
        .body(ChannelBody(rx))
        .unwrap();
    let mut client = client.clone();
    let answer = tokio::spawn(async move {
        client.ready().await.unwrap();
        let resp = client.send_request(req).await.unwrap();
        (resp.status(), resp.headers().clone())
    });
    (tx, answer)
}

/// A notification POSTed on `client`.
async fn h2_notification(client: &SendRequest<ChannelBody>) -> (StatusCode, HeaderMap) {
    let body = fixture(EVENTS);
    let (tx, answer) = h2_post(client, body.len());
    tx.send(Bytes::from(body)).await.unwrap();
    drop(tx);
    tokio::time::timeout(DEADLINE, answer)
        .await
        .expect("answer in time")
        .unwrap()
}

/// Sends a held body (not a notification: the answer is 400) and waits for the answer.
async fn h2_finish(tx: mpsc::Sender<Bytes>, answer: H2Answer) -> StatusCode {
    tx.send(Bytes::from(vec![b'x'; BODY])).await.unwrap();
    drop(tx);
    tokio::time::timeout(DEADLINE, answer)
        .await
        .expect("answer in time")
        .unwrap()
        .0
}

fn retry_after(headers: &HeaderMap) -> Option<&str> {
    headers.get("retry-after").and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------------------------
// --max-body-buffer
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn http1_bodies_in_flight_fill_the_budget_and_both_protocols_get_503() {
    let rx = receiver().await;
    let relay = Relay::start(
        rx.addr,
        &["--max-body", MAX_BODY, "--max-body-buffer", BUFFER],
    )
    .await;
    assert_eq!(relay.metric(RESERVED).await, 0.0);

    // Two slow bodies of --max-body each, admitted: the budget is spent.
    let first = h1_held(&relay).await;
    let second = h1_held(&relay).await;
    assert_eq!(relay.metric(RESERVED).await, (2 * BODY) as f64);

    // A third request, however small, waits for nothing: 503, come back later.
    let (status, head) = h1_notification(&relay).await;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    let (status, headers) = h2_notification(&h2_client(&relay).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after(&headers), Some("1"));
    assert_eq!(relay.metric(REFUSED_PROCESS).await, 2.0);
    assert!(rx.seen().is_empty(), "nothing refused reached the receiver");

    // Once the slow bodies are answered their room is given back.
    assert_eq!(h1_finish(first).await, 400);
    assert_eq!(h1_finish(second).await, 400);
    wait_metric(&relay, RESERVED, 0.0).await;
    assert_eq!(h1_notification(&relay).await.0, 200);
    assert_eq!(
        h2_notification(&h2_client(&relay).await).await.0,
        StatusCode::OK
    );
    assert_eq!(rx.seen().len(), 2);
    assert_eq!(relay.metric(REFUSED_PROCESS).await, 2.0);
    relay.stop().await;
}

#[tokio::test]
async fn http2_bodies_in_flight_fill_the_budget_and_both_protocols_get_503() {
    let rx = receiver().await;
    let relay = Relay::start(
        rx.addr,
        &["--max-body", MAX_BODY, "--max-body-buffer", BUFFER],
    )
    .await;
    // One slow body on each of two connections (a connection's own share is two bodies, so
    // only the relay's budget can refuse here).
    let a = h2_client(&relay).await;
    let b = h2_client(&relay).await;
    let (tx_a, answer_a) = h2_post(&a, BODY);
    let (tx_b, answer_b) = h2_post(&b, BODY);
    wait_metric(&relay, RESERVED, (2 * BODY) as f64).await;

    let (status, headers) = h2_notification(&h2_client(&relay).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after(&headers), Some("1"));
    let (status, head) = h1_notification(&relay).await;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");
    assert_eq!(relay.metric(REFUSED_PROCESS).await, 2.0);
    assert_eq!(relay.metric(REFUSED_CONNECTION).await, 0.0);

    assert_eq!(h2_finish(tx_a, answer_a).await, StatusCode::BAD_REQUEST);
    assert_eq!(h2_finish(tx_b, answer_b).await, StatusCode::BAD_REQUEST);
    wait_metric(&relay, RESERVED, 0.0).await;
    assert_eq!(h2_notification(&a).await.0, StatusCode::OK);
    assert_eq!(h1_notification(&relay).await.0, 200);
    relay.stop().await;
}

#[tokio::test]
async fn http2_connection_buffers_at_most_two_bodies() {
    let rx = receiver().await;
    // The relay's budget is the default (64 MiB): only the connection's share can refuse.
    let relay = Relay::start(rx.addr, &["--max-body", MAX_BODY]).await;
    let a = h2_client(&relay).await;
    let (tx1, answer1) = h2_post(&a, BODY);
    let (tx2, answer2) = h2_post(&a, BODY);
    wait_metric(&relay, RESERVED, (2 * BODY) as f64).await;

    // A third body on the same connection: 503.
    let (status, headers) = h2_notification(&a).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after(&headers), Some("1"));
    assert_eq!(relay.metric(REFUSED_CONNECTION).await, 1.0);
    assert_eq!(relay.metric(REFUSED_PROCESS).await, 0.0);
    // Another connection has its own share.
    let b = h2_client(&relay).await;
    assert_eq!(h2_notification(&b).await.0, StatusCode::OK);

    // The held bodies answered, the connection takes bodies again.
    assert_eq!(h2_finish(tx1, answer1).await, StatusCode::BAD_REQUEST);
    assert_eq!(h2_finish(tx2, answer2).await, StatusCode::BAD_REQUEST);
    assert_eq!(h2_notification(&a).await.0, StatusCode::OK);
    wait_metric(&relay, RESERVED, 0.0).await;
    assert_eq!(relay.metric(REFUSED_CONNECTION).await, 1.0);
    relay.stop().await;
}

#[test]
fn max_body_buffer_below_max_body_exits_64_naming_the_flag() {
    let bin = env!("CARGO_BIN_EXE_ews-relay");
    let local = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
    let run = |args: &[&str], env: Option<(&str, &str)>| {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(local).args(args).env_remove("RUST_LOG");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.code(), text)
    };
    let (code, text) = run(&["--max-body", "1MiB", "--max-body-buffer", "512KiB"], None);
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("--max-body-buffer"), "{text}");
    let (code, text) = run(&[], Some(("EWS_RELAY_MAX_BODY_BUFFER", "1KiB")));
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("--max-body-buffer"), "{text}");
    let (code, text) = run(&["--max-body-buffer", "lots"], None);
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("--max-body-buffer"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 head timeout, with raw frames.
// ---------------------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for `POST https://localhost/`: `:method POST`, `:scheme https`, `:path /` from the
/// static table, `:authority` as a literal with its name from the static table.
fn request_head() -> Vec<u8> {
    let mut h = vec![0x83, 0x87, 0x84, 0x01, 9];
    h.extend_from_slice(b"localhost");
    h
}

/// A raw HTTP/2 connection: preface and empty SETTINGS sent.
async fn h2_raw(relay: &Relay) -> TlsStream<TcpStream> {
    let mut s = h2_tls(relay).await;
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    s
}

/// Reads the relay's frames until it closes the connection; when it did, and the streams it
/// sent HEADERS on. Fails after `limit`.
async fn until_closed(s: &mut TlsStream<TcpStream>, limit: Duration) -> (Instant, Vec<u32>) {
    let mut answered = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout(limit, s.read(&mut chunk)).await {
            Err(_) => panic!("the relay did not close the connection within {limit:?}"),
            Ok(Ok(n)) => n,
            Ok(Err(_)) => 0,
        };
        if n == 0 {
            return (Instant::now(), answered);
        }
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == HEADERS {
                answered.push(u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff);
            }
            buf.drain(..9 + len);
        }
    }
}

#[tokio::test]
async fn http2_connection_without_a_request_head_is_cut_after_the_header_timeout() {
    let rx = receiver().await;
    let relay = Relay::start(
        rx.addr,
        &["--header-timeout", "1s", "--idle-timeout", "60s"],
    )
    .await;
    // Preface and SETTINGS, then nothing.
    let start = Instant::now();
    let mut s = h2_raw(&relay).await;
    let (closed, _) = until_closed(&mut s, DEADLINE).await;
    let after = closed - start;
    assert!(after >= Duration::from_millis(900), "cut after {after:?}");

    // A head started and never finished: HEADERS without END_HEADERS.
    let start = Instant::now();
    let mut s = h2_raw(&relay).await;
    s.write_all(&frame(HEADERS, END_STREAM, 1, &request_head()[..3]))
        .await
        .unwrap();
    let (closed, answered) = until_closed(&mut s, DEADLINE).await;
    let after = closed - start;
    assert!(after >= Duration::from_millis(900), "cut after {after:?}");
    assert!(answered.is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn http2_head_trickled_after_a_request_is_cut_after_the_header_timeout() {
    let rx = receiver().await;
    let relay = Relay::start(
        rx.addr,
        &["--header-timeout", "1s", "--idle-timeout", "60s"],
    )
    .await;
    let mut s = h2_raw(&relay).await;
    // A whole request (no body: the relay answers 400, not a notification).
    s.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &request_head(),
    ))
    .await
    .unwrap();
    // Between requests the connection is idle, not late: longer than the header timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The next head, its CONTINUATION frames trickled and never finished.
    let start = Instant::now();
    let head = request_head();
    s.write_all(&frame(HEADERS, END_STREAM, 3, &head[..1]))
        .await
        .unwrap();
    let trickle = async {
        for b in &head[1..head.len() - 1] {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if s.write_all(&frame(CONTINUATION, 0, 3, &[*b]))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    // The trickle ends before the relay's deadline would if it counted from the last byte
    // only; the connection must be cut anyway.
    tokio::time::timeout(Duration::from_millis(1200), trickle)
        .await
        .ok();
    let (closed, answered) = until_closed(&mut s, DEADLINE).await;
    let after = closed - start;
    assert!(after >= Duration::from_millis(900), "cut after {after:?}");
    assert!(after < Duration::from_secs(3), "cut after {after:?}");
    assert_eq!(
        answered,
        [1],
        "the first request was answered, not the trickled one"
    );
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// :authority and Host over HTTP/2 (the HTTP/1.1 engine's Host rule, RFC 9112 §3.2)
// ---------------------------------------------------------------------------------------------

/// A malformed `:authority` or `Host` over HTTP/2 is refused with 400 as HTTP/1.1's engine
/// refuses a malformed Host, so it never reaches the receiver as `X-Forwarded-Host`.
#[tokio::test]
async fn http2_malformed_authority_or_host_is_400() {
    let rx = receiver().await;
    let relay = Relay::start(rx.addr, &[]).await;
    let client = h2_client(&relay).await;
    let body = fixture(EVENTS);
    for (uri, host) in [
        ("https://user@localhost/", None),
        ("https://localhost/", Some("a/b@evil")),
        ("https://localhost/", Some("a b")),
    ] {
        let (tx, rx_body) = mpsc::channel(1);
        let mut req = Request::post(uri)
            .header("content-type", "text/xml; charset=utf-8")
            .header("content-length", body.len());
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let req = req.body(ChannelBody(rx_body)).unwrap();
        tx.send(Bytes::from(body.clone())).await.unwrap();
        drop(tx);
        let mut c = client.clone();
        c.ready().await.unwrap();
        let resp = tokio::time::timeout(DEADLINE, c.send_request(req))
            .await
            .expect("answer in time")
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::BAD_REQUEST,
            "{uri} host={host:?}"
        );
    }
    // A well-formed one still passes.
    assert_eq!(h2_notification(&client).await.0, StatusCode::OK);
}
