//! One request: route, bound, rewrite headers, forward to the receiver, answer, log.
//!
//! The relay is not an open proxy: the target is always `--upstream`; only POSTs under
//! `--path-prefix` leave the relay, everything else is answered here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::ews::{self, EventType};
use crate::metrics::Metrics;
use crate::tracker::{ReceiverAnswer, Tracker};
use crate::upstream::{Outgoing, Receiver};

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
    client_ip_header: Option<HeaderName>,
    /// The allow-list, applied per request to the client named by a trusted proxy.
    allow: Arc<arc_swap::ArcSwap<crate::filter::AllowList>>,
    metrics: Arc<Metrics>,
}

/// A request that reached the receiver (or tried to).
struct Forwarded {
    reply: Reply,
    bytes_in: usize,
    upstream_ms: f64,
}

/// The response type of every request.
pub type Reply = Response<Full<Bytes>>;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static HTTPS: HeaderValue = HeaderValue::from_static("https");
static TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus `Expect` (the relay
/// already has the body) and `Content-Length` (recomputed from the buffered body).
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
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
        }
    }

    /// Handle one request end to end. Never fails: every outcome is an HTTP answer.
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Reply {
        let start = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        // Behind a trusted CDN, the client is the one its header names, and the allow-list
        // applies to that address.
        let named;
        let conn = match (&self.client_ip_header, conn.via_trusted_proxy) {
            (Some(name), true) => match client_from_header(req.headers(), name) {
                Some(ip) if self.allow.load().allows(ip) => {
                    named = ConnInfo::new(ip);
                    &named
                }
                found => {
                    self.metrics
                        .denied(crate::metrics::DenyReason::ClientIpHeader);
                    tracing::info!(proxy = %conn.peer, client = ?found, header = %name, "client named by the trusted proxy is missing or outside the allow-list");
                    let reply = Refusal::Forbidden.reply();
                    self.metrics.request(reply.status());
                    return reply;
                }
            },
            _ => conn,
        };
        let (reply, bytes_in, upstream_ms) = match self.forward(req, conn).await {
            Ok(f) => (f.reply, f.bytes_in, Some(f.upstream_ms)),
            Err(refusal) => (refusal.reply(), 0, None),
        };
        let status = reply.status();
        let elapsed = start.elapsed();
        self.metrics.request(status);
        self.metrics.request_duration.observe(elapsed.as_secs_f64());
        tracing::info!(
            target: "ews_relay::access",
            peer = %conn.peer,
            method = %method,
            path = %path,
            status = status.as_u16(),
            bytes_in,
            bytes_out = hyper::body::Body::size_hint(reply.body()).exact().unwrap_or(0),
            total_ms = millis(elapsed),
            upstream_ms,
        );
        reply
    }

    /// Everything between routing and the receiver's answer.
    async fn forward(&self, req: Request<Incoming>, conn: &ConnInfo) -> Result<Forwarded, Refusal> {
        self.route(req.method(), req.uri().path())?;
        let (parts, body) = self.read_body(req).await?;
        // Parsed once, borrowing from the body; the receiver gets the same bytes.
        let notification = match ews::summarize_send_notification(&body) {
            Ok(n) => Some(n),
            Err(_) if self.accept_any_body => None,
            Err(e) => {
                self.metrics.rejected_bodies.inc();
                tracing::debug!(peer = %conn.peer, error = %e, "not a SendNotification; answered 400");
                return Err(Refusal::NotNotification);
            }
        };
        let bytes_in = body.len();
        if let (Some(manager), Some(n)) = (&self.manager, &notification) {
            if let Some(reply) = self.managed(manager, n, &parts, &body, conn).await {
                return Ok(Forwarded {
                    reply,
                    bytes_in,
                    upstream_ms: 0.0,
                });
            }
        }
        let out = self.outgoing(parts, body.clone(), conn);
        let start = Instant::now();
        let result = self.receiver.send(out).await;
        let upstream_ms = millis(start.elapsed());
        let (reply, answer) = match result {
            Ok(resp) => {
                let answer = notification
                    .as_ref()
                    .map(|_| ReceiverAnswer::from_response(resp.status(), resp.body()));
                (answer_unchanged(resp), answer)
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
                    plain(e.status(), upstream_message(e.status())),
                    Some(ReceiverAnswer::Unreachable),
                )
            }
        };
        if let (Some(n), Some(answer)) = (&notification, answer) {
            self.observe(n, conn, answer);
        }
        Ok(Forwarded {
            reply,
            bytes_in,
            upstream_ms,
        })
    }

    /// Managed mode: answer Exchange for a subscription the relay owns, or `None` to pass the
    /// notification through (an id the relay never created).
    async fn managed(
        &self,
        manager: &crate::subscriptions::Manager,
        n: &ews::NotificationSummary<'_>,
        parts: &http::request::Parts,
        body: &Bytes,
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
                    let mut headers = self.outgoing(parts.clone(), Bytes::new(), conn).headers;
                    headers.remove(header::HOST);
                    match manager
                        .delivery()
                        .accept(&mailbox, id, headers, body.clone())
                        .await
                    {
                        Ok(_) => {
                            manager.notified(&mailbox, watermark, true, false);
                            ews::SubscriptionStatus::Ok
                        }
                        Err(e) => {
                            // Neither delivered nor stored: Exchange must retry.
                            tracing::error!(%mailbox, error = %e, "cannot spool a notification; answering 503 so Exchange retries");
                            return Some(plain(
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
        self.observe(n, conn, answer);
        let mut r = Response::new(Full::new(Bytes::from_static(
            ews::send_notification_result(status).as_bytes(),
        )));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/xml; charset=utf-8"),
        );
        Some(r)
    }

    /// Record a notification and the answer Exchange got in the tracker and the metrics.
    fn observe(&self, n: &ews::NotificationSummary<'_>, conn: &ConnInfo, answer: ReceiverAnswer) {
        self.tracker.record(n, conn.peer_ip, answer);
        self.metrics.answer(answer);
        for m in &n.messages {
            for (counter, &count) in self.metrics.events.iter().zip(&m.event_counts) {
                if count > 0 {
                    counter.inc_by(u64::from(count));
                }
            }
        }
    }

    /// 404 outside the prefix, 405 for methods other than POST.
    fn route(&self, method: &Method, path: &str) -> Result<(), Refusal> {
        if !under_prefix(path, &self.path_prefix) {
            return Err(Refusal::NotFound);
        }
        if method != Method::POST {
            return Err(Refusal::MethodNotAllowed);
        }
        Ok(())
    }

    /// Buffer the body within `--max-body` and `--body-timeout`.
    async fn read_body(
        &self,
        req: Request<Incoming>,
    ) -> Result<(http::request::Parts, Bytes), Refusal> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body) {
            // Refused before reading a byte; with `Expect: 100-continue` the client never
            // even sends the body.
            return Err(Refusal::TooLarge);
        }
        let (parts, body) = req.into_parts();
        let limit = usize::try_from(self.max_body).unwrap_or(usize::MAX);
        let collected =
            tokio::time::timeout(self.body_timeout, Limited::new(body, limit).collect());
        match collected.await {
            Err(_) => Err(Refusal::BodyTimeout),
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(Refusal::TooLarge)
            }
            Ok(Err(_)) => Err(Refusal::BadBody),
            Ok(Ok(c)) => Ok((parts, c.to_bytes())),
        }
    }

    /// The request as the receiver gets it.
    fn outgoing(&self, parts: http::request::Parts, body: Bytes, conn: &ConnInfo) -> Outgoing {
        let mut headers = parts.headers;
        // The original host: Host on HTTP/1.1, :authority on HTTP/2.
        let original_host = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| headers.get(header::HOST).cloned());
        strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(header::HOST, self.receiver.host_header().clone());
        let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {}", conn.peer),
            None => conn.peer.clone(),
        };
        if let Ok(v) = HeaderValue::try_from(xff) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        headers.insert(X_FORWARDED_PROTO.clone(), HTTPS.clone());
        match original_host {
            Some(h) => headers.insert(X_FORWARDED_HOST.clone(), h),
            None => headers.remove(&X_FORWARDED_HOST),
        };
        Outgoing {
            method: parts.method,
            path_and_query: parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            headers,
            body,
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
            Refusal::NotNotification => (
                StatusCode::BAD_REQUEST,
                "not an EWS SendNotification SOAP message\n",
            ),
        };
        let mut r = plain(status, text);
        if self == Refusal::MethodNotAllowed {
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        r
    }
}

/// The receiver's answer, unchanged but for hop-by-hop headers.
fn answer_unchanged(resp: Response<Bytes>) -> Reply {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Full::new(body))
}

/// Remove hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The address in `--client-ip-header` (its first value if a list).
fn client_from_header(headers: &HeaderMap, name: &HeaderName) -> Option<std::net::IpAddr> {
    let v = headers.get(name)?.to_str().ok()?;
    let first = v.split(',').next()?.trim();
    first
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
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

/// A short plain-text answer from the relay itself.
pub fn plain(status: StatusCode, text: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, TEXT_PLAIN.clone());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(under_prefix("/anything", "/"));
        assert!(under_prefix("/ews", "/ews"));
        assert!(under_prefix("/ews/push", "/ews"));
        assert!(!under_prefix("/ewsx", "/ews"));
        assert!(!under_prefix("/", "/ews"));
    }

    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("soapaction", HeaderValue::from_static("x"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("soapaction"));
    }
}
