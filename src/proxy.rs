//! One request: route, bound, rewrite headers, forward to the receiver, answer, log.
//!
//! The relay is not an open proxy: the target is always `--upstream`; only POSTs under
//! `--path-prefix` leave the relay, everything else is answered here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use crate::ews::{self, EventType};
use crate::http1::{self, HeaderBlock, Reply, RequestHead};
use crate::metrics::Metrics;
use crate::timer::Deadline;
use crate::tracker::{AnswerCache, ReceiverAnswer, Tracker};
use crate::upstream::{self, Receiver};

/// What the relay knows about the client connection, computed once per connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// The client address.
    pub peer_ip: std::net::IpAddr,
    /// The client address as written in logs and `X-Forwarded-For`.
    pub peer: String,
    /// The TCP peer is a trusted proxy that names the client in `--client-ip-header`.
    pub via_trusted_proxy: bool,
}

impl ConnInfo {
    /// Describe a client at `ip` (IPv4-mapped IPv6 shown as IPv4).
    pub fn new(ip: std::net::IpAddr) -> Self {
        let ip = ip.to_canonical();
        Self {
            peer_ip: ip,
            peer: ip.to_string(),
            via_trusted_proxy: false,
        }
    }
}

/// The request handler shared by all connections.
///
/// A request goes through [`Proxy::admit`] once its head is read (routing, size, the client a
/// trusted proxy names), then, once the connection has the body, [`Proxy::relay`], and last
/// [`Proxy::log`]. The connection code (HTTP/1.1 in [`crate::http1::server`], HTTP/2 in
/// [`crate::server`]) owns framing, limits and timeouts.
#[derive(Debug)]
pub struct Proxy {
    path_prefix: String,
    max_body: u64,
    body_timeout: Duration,
    accept_any_body: bool,
    receiver: Arc<Receiver>,
    tracker: Arc<Tracker>,
    /// Managed mode: the relay answers Exchange itself for the subscriptions it owns.
    manager: Option<Arc<crate::subscriptions::Manager>>,
    /// `--client-ip-header`: where a trusted proxy names the client.
    client_ip_header: Option<http::HeaderName>,
    /// The allow-list, applied per request to the client named by a trusted proxy.
    allow: Arc<arc_swap::ArcSwap<crate::filter::AllowList>>,
    metrics: Arc<Metrics>,
    /// The receiver's usual answer, classified once.
    answers: AnswerCache,
}

/// What [`Proxy::relay`] produced.
#[derive(Debug)]
pub struct Relayed {
    /// The answer for the client.
    pub reply: Reply,
    /// The time with the receiver, if the request went to it.
    pub upstream: Option<UpstreamTime>,
}

/// How long the receiver took, and when its exchange ended: the answer is ready then, and the
/// caller stamps it with that time rather than reading the clock again.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamTime {
    /// Milliseconds from sending the request to the complete answer (or the failure).
    pub ms: f64,
    /// When the exchange ended.
    pub done: Instant,
}

/// Request header fields never forwarded besides the hop-by-hop ones: the relay frames the body
/// itself (`Content-Length`), already has it (`Expect`), names the receiver (`Host`) and writes
/// the `X-Forwarded-*` fields itself. [`request_field`] knows them by length; a test holds it to
/// this list.
#[cfg(test)]
const NOT_FORWARDED: [&str; 6] = [
    "content-length",
    "expect",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

impl Proxy {
    /// A handler forwarding to `receiver`.
    pub fn new(
        config: &crate::Config,
        receiver: Arc<Receiver>,
        tracker: Arc<Tracker>,
        manager: Option<Arc<crate::subscriptions::Manager>>,
        allow: Arc<arc_swap::ArcSwap<crate::filter::AllowList>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            path_prefix: config.path_prefix.clone(),
            max_body: config.max_body,
            body_timeout: config.timeouts.body,
            accept_any_body: config.accept_any_body,
            receiver,
            tracker,
            manager,
            client_ip_header: config.client_ip_header.clone(),
            allow,
            metrics,
            answers: AnswerCache::default(),
        }
    }

    /// `--max-body`.
    pub fn max_body(&self) -> u64 {
        self.max_body
    }

    /// `--body-timeout`.
    pub fn body_timeout(&self) -> Duration {
        self.body_timeout
    }

    /// `--upstream-timeout`.
    pub fn upstream_timeout(&self) -> Duration {
        self.receiver.timeout()
    }

    /// Decides on a request from its head, before a byte of its body is read: 404 outside the
    /// prefix, 405 for methods other than POST, 413 for a declared length above `--max-body`,
    /// 403 for a client a trusted proxy names outside the allow-list. `Ok(Some(client))` when
    /// the request is to be treated as coming from the client a trusted proxy named.
    pub fn admit(
        &self,
        head: &RequestHead<'_>,
        conn: &ConnInfo,
        declared_length: Option<u64>,
    ) -> Result<Option<ConnInfo>, Refusal> {
        // Behind a trusted CDN, the client is the one its header names, and the allow-list
        // applies to that address.
        let mut named = None;
        if let (Some(name), true) = (&self.client_ip_header, conn.via_trusted_proxy) {
            match client_from_header(head, name.as_str()) {
                Some(ip) if self.allow.load().allows(ip) => named = Some(ConnInfo::new(ip)),
                found => {
                    self.metrics
                        .denied(crate::metrics::DenyReason::ClientIpHeader);
                    tracing::info!(proxy = %conn.peer, client = ?found, header = %name, "client named by the trusted proxy is missing or outside the allow-list");
                    return Err(Refusal::Forbidden);
                }
            }
        }
        if !plain_path(head.path()) {
            return Err(Refusal::BadTarget);
        }
        if !under_prefix(head.path(), &self.path_prefix) {
            return Err(Refusal::NotFound);
        }
        if head.method != "POST" {
            return Err(Refusal::MethodNotAllowed);
        }
        if declared_length.is_some_and(|n| n > self.max_body) {
            // Refused before reading a byte; with `Expect: 100-continue` the client never
            // even sends the body.
            return Err(Refusal::TooLarge);
        }
        Ok(named)
    }

    /// Everything after the body is read: the EWS check, managed mode, the receiver, tracking.
    /// Never fails: every outcome is an answer. `state` is the connection's timer and buffers.
    pub async fn relay(
        &self,
        head: &RequestHead<'_>,
        body: &[u8],
        conn: &ConnInfo,
        state: &mut ConnState,
    ) -> Relayed {
        // Parsed once, borrowing from the body; the receiver gets the same bytes.
        let notification = match ews::summarize_send_notification(body) {
            Ok(n) => Some(n),
            Err(_) if self.accept_any_body => None,
            Err(e) => {
                self.metrics.rejected_bodies.inc();
                tracing::debug!(peer = %conn.peer, error = %e, "not a SendNotification; answered 400");
                return Relayed {
                    reply: Refusal::NotNotification.reply(),
                    upstream: None,
                };
            }
        };
        if let (Some(manager), Some(n)) = (&self.manager, &notification) {
            if let Some(reply) = Box::pin(self.managed(manager, n, head, body, conn)).await {
                return Relayed {
                    reply,
                    upstream: None,
                };
            }
        }
        state.fields.clear();
        self.forwarded_fields(head, conn, &mut state.fields);
        state.head.clear();
        upstream::write_request_head(
            &mut state.head,
            head.method,
            head.path_and_query,
            self.receiver.host_header().as_bytes(),
            &state.fields,
            body.len(),
        );
        let start = Instant::now();
        let result = self
            .receiver
            .send_by(&state.head, body, &mut state.deadline, start)
            .await;
        let (reply, answer, done) = match result {
            Ok((reply, done)) => {
                let answer = notification
                    .as_ref()
                    .map(|_| self.answers.classify(reply.status, &reply.body));
                (reply, answer, done)
            }
            Err(e) => {
                self.metrics.upstream_error(e.kind);
                tracing::warn!(
                    peer = %conn.peer,
                    receiver = self.receiver.authority(),
                    error = %e,
                    status = e.status().as_u16(),
                    "receiver exchange failed"
                );
                (
                    Reply::plain(e.status(), upstream_message(e.status())),
                    Some(ReceiverAnswer::Unreachable),
                    Instant::now(),
                )
            }
        };
        if let (Some(n), Some(answer)) = (&notification, answer) {
            self.observe(n, conn, answer, done);
        }
        Relayed {
            reply,
            upstream: Some(UpstreamTime {
                ms: millis(done.saturating_duration_since(start)),
                done,
            }),
        }
    }

    /// Counts a finished request and writes its access log line.
    #[allow(clippy::too_many_arguments)]
    pub fn log(
        &self,
        conn: &ConnInfo,
        head: &RequestHead<'_>,
        status: StatusCode,
        bytes_in: usize,
        bytes_out: usize,
        elapsed: Duration,
        upstream_ms: Option<f64>,
    ) {
        self.metrics.request(status);
        self.metrics.request_duration.observe(elapsed.as_secs_f64());
        tracing::info!(
            target: "ews_relay::access",
            peer = %conn.peer,
            method = head.method,
            path = head.path(),
            status = status.as_u16(),
            bytes_in,
            bytes_out,
            total_ms = millis(elapsed),
            upstream_ms,
        );
    }

    /// Counts a request refused before its head could be parsed, and logs it.
    pub fn log_unparsed(&self, conn: &ConnInfo, status: StatusCode) {
        self.metrics.request(status);
        tracing::info!(
            target: "ews_relay::access",
            peer = %conn.peer,
            method = "-",
            path = "-",
            status = status.as_u16(),
            bytes_in = 0,
            bytes_out = 0,
        );
    }

    /// Managed mode: answer Exchange for a subscription the relay owns, or `None` to pass the
    /// notification through (an id the relay never created).
    async fn managed(
        &self,
        manager: &crate::subscriptions::Manager,
        n: &ews::NotificationSummary<'_>,
        head: &RequestHead<'_>,
        body: &[u8],
        conn: &ConnInfo,
    ) -> Option<Reply> {
        use crate::subscriptions::Owner;
        let message = n.messages.first()?;
        let id = message.subscription_id.as_deref()?;
        let status = match manager.owner(id).await? {
            Owner::Retired(mailbox) => {
                tracing::info!(%mailbox, subscription = %crate::tracker::abbreviate(id), "notification on a replaced or removed subscription: answering Unsubscribe");
                ews::SubscriptionStatus::Unsubscribe
            }
            Owner::Current(mailbox) => {
                let error = message.class == ews::ResponseClass::Error;
                let watermark = message.last_watermark.as_deref();
                let events = EventType::ALL
                    .iter()
                    .zip(message.event_counts)
                    .any(|(kind, n)| *kind != EventType::Status && n > 0);
                // The heartbeat counts at once; the watermark only moves once the notification
                // is safe (delivered or spooled), so a resubscribe after a failed spool replays
                // it instead of skipping it.
                manager.notified(&mailbox, None, false, error);
                if error {
                    // The server already dropped it (e.g. ErrorReadEventsFailed); the manager
                    // resubscribes from the last good watermark.
                    ews::SubscriptionStatus::Unsubscribe
                } else if !events {
                    // A keep-alive: nothing for the receiver, its watermark is safe to keep.
                    manager.notified(&mailbox, watermark, false, false);
                    ews::SubscriptionStatus::Ok
                } else {
                    let mut headers = HeaderBlock::with_capacity(256);
                    self.forwarded_fields(head, conn, &mut headers);
                    match manager
                        .delivery()
                        .accept(&mailbox, id, headers, Bytes::copy_from_slice(body))
                        .await
                    {
                        Ok(_) => {
                            manager.notified(&mailbox, watermark, true, false);
                            ews::SubscriptionStatus::Ok
                        }
                        Err(e) => {
                            // Neither delivered nor stored: Exchange must retry.
                            tracing::error!(%mailbox, error = %e, "cannot spool a notification; answering 503 so Exchange retries");
                            return Some(Reply::plain(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "notification not stored; retry\n",
                            ));
                        }
                    }
                }
            }
        };
        let answer = match status {
            ews::SubscriptionStatus::Ok => ReceiverAnswer::Ok,
            ews::SubscriptionStatus::Unsubscribe => ReceiverAnswer::Unsubscribe,
        };
        self.observe(n, conn, answer, Instant::now());
        let mut headers = HeaderBlock::with_capacity(40);
        headers.push(b"content-type", b"text/xml; charset=utf-8");
        Some(Reply {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(ews::send_notification_result(status).as_bytes()),
        })
    }

    /// Record a notification and the answer Exchange got in the tracker and the metrics.
    fn observe(
        &self,
        n: &ews::NotificationSummary<'_>,
        conn: &ConnInfo,
        answer: ReceiverAnswer,
        now: Instant,
    ) {
        self.tracker.record(n, conn.peer_ip, answer, now);
        self.metrics.answer(answer);
        for m in &n.messages {
            for (counter, &count) in self.metrics.events.iter().zip(&m.event_counts) {
                if count > 0 {
                    counter.inc_by(u64::from(count));
                }
            }
        }
    }

    /// Appends to `out` the request's header fields as the receiver gets them (`Host` aside):
    /// hop-by-hop fields, those `Connection` names, framing and `X-Forwarded-*` fields dropped;
    /// `X-Forwarded-For` (appended to), `X-Forwarded-Proto: https` and `X-Forwarded-Host` (the
    /// original host) written by the relay.
    fn forwarded_fields(&self, head: &RequestHead<'_>, conn: &ConnInfo, out: &mut HeaderBlock) {
        let mut named: Vec<&[u8]> = Vec::new();
        let mut prior_xff: Vec<&[u8]> = Vec::new();
        let mut host = head.authority.map(str::as_bytes);
        for (name, value) in head.fields() {
            match request_field(name) {
                RequestField::Connection => named.extend(http1::list_elements(value)),
                RequestField::ForwardedFor => prior_xff.push(value.trim_ascii()),
                RequestField::Host => host = host.or(Some(value)),
                RequestField::Dropped | RequestField::Forwarded => {}
            }
        }
        for (name, value) in head.fields() {
            if request_field(name) != RequestField::Forwarded
                || named.iter().any(|t| name.eq_ignore_ascii_case(t))
            {
                continue;
            }
            // Fields of a parsed request head: httparse (HTTP/1.1) or http (HTTP/2) checked them.
            out.push_parsed(name, value);
        }
        // Values already checked: an address the relay formatted, earlier values of parsed
        // fields, a constant, and the parsed Host or target authority.
        if prior_xff.is_empty() {
            out.push_parsed(b"x-forwarded-for", conn.peer.as_bytes());
        } else {
            let mut xff = prior_xff.join(&b", "[..]);
            xff.extend_from_slice(b", ");
            xff.extend_from_slice(conn.peer.as_bytes());
            out.push_parsed(b"x-forwarded-for", &xff);
        }
        out.push_parsed(b"x-forwarded-proto", b"https");
        if let Some(host) = host {
            out.push_parsed(b"x-forwarded-host", host);
        }
    }
}

/// What the relay does with a request header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestField {
    /// Passed on to the receiver, unless `Connection` names it.
    Forwarded,
    /// Hop-by-hop or never forwarded (`Content-Length`, `Expect`, `X-Forwarded-Host` and
    /// `-Proto`), and no input to what is forwarded.
    Dropped,
    /// `Connection`: dropped, and names more fields to drop.
    Connection,
    /// `X-Forwarded-For`: dropped, its value carried into the relay's own.
    ForwardedFor,
    /// `Host`: dropped, its value sent as `X-Forwarded-Host`.
    Host,
}

/// Classifies a request field name: hop-by-hop names, those never forwarded and the three the
/// relay reads. By length first, so that most names cost one comparison or none; a unit test
/// checks it against the two lists.
fn request_field(name: &[u8]) -> RequestField {
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    let dropped = match name.len() {
        4 if is("host") => return RequestField::Host,
        10 if is("connection") => return RequestField::Connection,
        15 if is("x-forwarded-for") => return RequestField::ForwardedFor,
        2 => is("te"),
        6 => is("expect"),
        7 => is("upgrade") || is("trailer"),
        10 => is("keep-alive"),
        14 => is("content-length"),
        16 => is("proxy-connection") || is("x-forwarded-host"),
        17 => is("transfer-encoding") || is("x-forwarded-proto"),
        18 => is("proxy-authenticate"),
        19 => is("proxy-authorization"),
        _ => false,
    };
    if dropped {
        RequestField::Dropped
    } else {
        RequestField::Forwarded
    }
}

/// What a client connection keeps from one request to the next for [`Proxy::relay`]: its
/// timer, and the buffers a forwarded request is written in.
#[derive(Debug)]
pub struct ConnState {
    /// The connection's one timer (see [`crate::timer`]).
    pub deadline: Deadline,
    fields: HeaderBlock,
    head: Vec<u8>,
}

impl ConnState {
    /// Fresh state around `deadline`; the buffers are allocated by the first request.
    pub fn new(deadline: Deadline) -> Self {
        Self {
            deadline,
            fields: HeaderBlock::default(),
            head: Vec::new(),
        }
    }
}

/// A request the relay answers itself, without involving the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Path outside `--path-prefix`.
    NotFound,
    /// Not a POST.
    MethodNotAllowed,
    /// Body above `--max-body`.
    TooLarge,
    /// Body not complete within `--body-timeout`.
    BodyTimeout,
    /// The body could not be read (client reset, bad chunking).
    BadBody,
    /// The body is not an EWS SendNotification SOAP message.
    NotNotification,
    /// Behind a trusted proxy, the client it names is missing or not admitted.
    Forbidden,
    /// A path with dot segments or encoded separators, which a receiver normalising paths
    /// could resolve outside `--path-prefix`.
    BadTarget,
}

impl Refusal {
    /// The answer to send.
    pub fn reply(self) -> Reply {
        let (status, text) = match self {
            Refusal::NotFound => (StatusCode::NOT_FOUND, "not found\n"),
            Refusal::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "only POST is relayed\n"),
            Refusal::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body larger than --max-body\n",
            ),
            Refusal::BodyTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request body not received within --body-timeout\n",
            ),
            Refusal::BadBody => (StatusCode::BAD_REQUEST, "malformed request body\n"),
            Refusal::Forbidden => (StatusCode::FORBIDDEN, "client not admitted\n"),
            Refusal::BadTarget => (
                StatusCode::BAD_REQUEST,
                "dot segments and encoded separators are not accepted in the path\n",
            ),
            Refusal::NotNotification => (
                StatusCode::BAD_REQUEST,
                "not an EWS SendNotification SOAP message\n",
            ),
        };
        let mut r = Reply::plain(status, text);
        if self == Refusal::MethodNotAllowed {
            r.headers.push(b"allow", b"POST");
        }
        r
    }
}

/// The address in `--client-ip-header` (its first value if a list).
fn client_from_header(head: &RequestHead<'_>, name: &str) -> Option<std::net::IpAddr> {
    let v = std::str::from_utf8(head.field(name)?).ok()?;
    let first = v.split(',').next()?.trim();
    first
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
}

/// Whether `path` has no `.` or `..` segment (also percent-encoded), no encoded `/` or `\\` and
/// no `\\`: so the prefix check sees the path every receiver would see.
pub fn plain_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    if !bytes.iter().any(|&b| matches!(b, b'.' | b'%' | b'\\')) {
        return true; // the usual case, in one pass
    }
    if bytes.contains(&b'\\') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return false;
    }
    !lower
        .split('/')
        .map(|segment| segment.replace("%2e", "."))
        .any(|segment| segment == "." || segment == "..")
}

/// Whether `path` is `prefix` or lies below it (`/ews` admits `/ews` and `/ews/x`, not `/ewsx`).
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Milliseconds with microsecond resolution, for log lines people read.
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1e3
}

fn upstream_message(status: StatusCode) -> &'static str {
    if status == StatusCode::GATEWAY_TIMEOUT {
        "receiver did not answer in time\n"
    } else {
        "receiver unreachable or failed\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_fields_follow_the_lists() {
        for name in http1::HOP_BY_HOP.iter().chain(&NOT_FORWARDED) {
            for spelled in [name.to_string(), name.to_ascii_uppercase()] {
                let kind = request_field(spelled.as_bytes());
                assert_ne!(kind, RequestField::Forwarded, "{spelled}");
                let expected = match *name {
                    "connection" => RequestField::Connection,
                    "x-forwarded-for" => RequestField::ForwardedFor,
                    "host" => RequestField::Host,
                    _ => RequestField::Dropped,
                };
                assert_eq!(kind, expected, "{spelled}");
            }
        }
        for name in [
            "content-type",
            "soapaction",
            "user-agent",
            "x-forwarded",
            "tee",
            "hosts",
        ] {
            assert_eq!(
                request_field(name.as_bytes()),
                RequestField::Forwarded,
                "{name}"
            );
        }
    }

    #[test]
    fn prefixes() {
        assert!(under_prefix("/anything", "/"));
        assert!(under_prefix("/ews", "/ews"));
        assert!(under_prefix("/ews/push", "/ews"));
        assert!(!under_prefix("/ewsx", "/ews"));
        assert!(!under_prefix("/", "/ews"));
    }

    #[test]
    fn plain_paths() {
        for ok in ["/", "/ews/notify", "/a.b/c..d/.e", "/x%20y", "/ews/..."] {
            assert!(plain_path(ok), "{ok}");
        }
        for bad in [
            "/ews/../admin",
            "/ews/./x",
            "/ews/..",
            "/ews/%2e%2E/admin",
            "/ews/.%2e",
            "/ews%2fadmin",
            "/ews%5C..",
            "/ews\\..",
        ] {
            assert!(!plain_path(bad), "{bad}");
        }
    }
}
