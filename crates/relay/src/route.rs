//! Route: from a request's head and the client's address to a [`Route`] or a [`Refusal`],
//! before a byte of the body is read. The relay is not an open proxy: the target is always
//! `--upstream`; only POSTs under a notification prefix leave the relay, everything else is
//! answered here.

use std::sync::Arc;

use http::StatusCode;
use http1::{Reply, RequestHead};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::allow::AllowList;
pub use crate::client::ConnInfo;
use crate::config::Config;
use crate::metrics::{BodyBudgetScope, DenyReason, Metrics};
pub use crate::source::Source;

/// Where an admitted request goes.
#[derive(Debug)]
pub struct Route {
    /// The client a trusted proxy named in `--client-ip-header`, when there is one: the request
    /// is treated as coming from it.
    pub named_client: Option<ConnInfo>,
    /// Its share of `--max-body-buffer`, given back when the route is dropped: after the
    /// request is answered and logged.
    pub body: BodyReservation,
    /// EWS (`--path-prefix`) or Graph (`--graph-path-prefix`).
    pub source: Source,
}

/// The routing rules, from the configuration.
#[derive(Debug)]
pub struct Router {
    path_prefix: String,
    /// `--graph-path-prefix`: checked first, as it may lie under `--path-prefix`.
    graph_prefix: Option<String>,
    max_body: u64,
    /// `--client-ip-header`: where a trusted proxy names the client.
    client_ip_header: Option<http::HeaderName>,
    /// The allow-list, applied per request to the client named by a trusted proxy.
    allow: Arc<arc_swap::ArcSwap<AllowList>>,
    metrics: Arc<Metrics>,
    /// `--max-body-buffer`: body bytes the relay buffers at once, over all connections.
    bodies: BodyBudget,
}

impl Router {
    /// The rules of `config`, with the live allow-list.
    pub fn new(
        config: &Config,
        allow: Arc<arc_swap::ArcSwap<AllowList>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            path_prefix: config.path_prefix.clone(),
            graph_prefix: config.graph.as_ref().map(|g| g.path_prefix.clone()),
            max_body: config.max_body,
            client_ip_header: config.client_ip_header.clone(),
            bodies: BodyBudget::new(config.max_body_buffer)
                .reported_in(metrics.body_buffer_reserved.clone()),
            allow,
            metrics,
        }
    }

    /// Decides on a request from its head: 404 outside the prefix, 405 for methods other than
    /// POST, 413 for a declared length above `--max-body`, 403 for a client a trusted proxy
    /// names outside the allow-list, 400 for a path that could escape the prefix, 503 when the
    /// body would not fit in what is left of `--max-body-buffer`.
    pub fn route(
        &self,
        head: &RequestHead<'_>,
        conn: &ConnInfo,
        declared_length: Option<u64>,
    ) -> Result<Route, Refusal> {
        // Behind a trusted CDN, the client is the one its header names, and the allow-list
        // applies to that address.
        let mut named_client = None;
        if let (Some(name), true) = (&self.client_ip_header, conn.via_trusted_proxy) {
            match client_from_header(head, name.as_str()) {
                Some(ip) if self.allow.load().allows(ip) => named_client = Some(ConnInfo::new(ip)),
                found => {
                    self.metrics.denied(DenyReason::ClientIpHeader);
                    tracing::info!(proxy = %conn.peer, client = ?found, header = %name, "client named by the trusted proxy is missing or outside the allow-list");
                    return Err(Refusal::Forbidden);
                }
            }
        }
        if !plain_path(head.path()) {
            return Err(Refusal::BadTarget);
        }
        let source = match &self.graph_prefix {
            Some(g) if under_prefix(head.path(), g) => Source::Graph,
            _ if under_prefix(head.path(), &self.path_prefix) => Source::Ews,
            _ => return Err(Refusal::NotFound),
        };
        if head.method != "POST" {
            return Err(Refusal::MethodNotAllowed);
        }
        if declared_length.is_some_and(|n| n > self.max_body) {
            // Refused before reading a byte; with `Expect: 100-continue` the client never
            // even sends the body.
            return Err(Refusal::TooLarge);
        }
        // Last, so that only a request about to be read takes a share: the declared length,
        // or as much as a body of unknown length may grow to.
        let Some(body) = self
            .bodies
            .try_reserve(declared_length.unwrap_or(self.max_body))
        else {
            self.metrics.body_budget_refused(BodyBudgetScope::Process);
            return Err(Refusal::BodyBufferFull);
        };
        Ok(Route {
            named_client,
            body,
            source,
        })
    }
}

/// The unit body budgets count in. A semaphore hands out at most `u32::MAX` permits at once;
/// counted in KiB, one reservation covers a body of up to 4 TiB, so any `--max-body` fits, and
/// a budget of 64 MiB is 65536 permits.
const BUDGET_UNIT: u64 = 1024;

/// A budget of request body bytes being buffered, shared by the requests that reserve from it
/// (the whole relay's, or one HTTP/2 connection's). Reservations never wait: one that does not
/// fit is refused, and the client retries.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    units: Arc<Semaphore>,
    /// Where the bytes reserved are published, if anywhere.
    reserved: Option<Gauge>,
}

impl BodyBudget {
    /// A budget of `bytes` (rounded up to [`BUDGET_UNIT`]).
    pub fn new(bytes: u64) -> Self {
        let units = usize::try_from(bytes.div_ceil(BUDGET_UNIT))
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            units: Arc::new(Semaphore::new(units)),
            reserved: None,
        }
    }

    /// Publishes the bytes reserved in `gauge`.
    pub fn reported_in(mut self, gauge: Gauge) -> Self {
        self.reserved = Some(gauge);
        self
    }

    /// Reserves room for a body of `bytes` (rounded up to [`BUDGET_UNIT`]); `None` when the
    /// budget has not that much left.
    pub fn try_reserve(&self, bytes: u64) -> Option<BodyReservation> {
        let units = u32::try_from(bytes.div_ceil(BUDGET_UNIT)).unwrap_or(u32::MAX);
        let permit = self.units.clone().try_acquire_many_owned(units).ok()?;
        let bytes = i64::from(units) * BUDGET_UNIT as i64;
        if let Some(g) = &self.reserved {
            g.inc_by(bytes);
        }
        Some(BodyReservation {
            _permit: permit,
            reported: self.reserved.clone().map(|g| (g, bytes)),
        })
    }
}

/// Room for one request's body in a [`BodyBudget`], given back on drop.
#[derive(Debug)]
pub struct BodyReservation {
    _permit: OwnedSemaphorePermit,
    reported: Option<(Gauge, i64)>,
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        if let Some((g, bytes)) = &self.reported {
            g.dec_by(*bytes);
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
    /// Under `--graph-path-prefix`: the body is not a Graph change notification collection.
    NotGraphNotification,
    /// Under `--graph-path-prefix`: a malformed `validationToken` query.
    BadValidationToken,
    /// Managed Graph mode: a validation request on the relay's own callback URL while no
    /// subscription is being created.
    UnexpectedValidation,
    /// Behind a trusted proxy, the client it names is missing or not admitted.
    Forbidden,
    /// A path with dot segments, path parameters or encoded separators, which a receiver
    /// normalising paths could resolve outside `--path-prefix`.
    BadTarget,
    /// The body does not fit in what is left of `--max-body-buffer`.
    BodyBufferFull,
    /// HTTP/2: the body does not fit in what is left of its connection's share.
    ConnectionBodiesFull,
}

/// `Retry-After` of a 503 for a full body budget, in seconds: bodies in flight are usually
/// through in milliseconds, and a second lets a burst pass without inviting a tight retry loop
/// (the worst case, a slow client, is bounded by `--body-timeout`).
const BODY_BUDGET_RETRY_AFTER: &[u8] = b"1";

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
                "dot segments, path parameters and encoded separators are not accepted in the path\n",
            ),
            Refusal::NotNotification => (
                StatusCode::BAD_REQUEST,
                "not an EWS SendNotification SOAP message\n",
            ),
            Refusal::NotGraphNotification => (
                StatusCode::BAD_REQUEST,
                "not a Microsoft Graph change notification collection\n",
            ),
            Refusal::BadValidationToken => (
                StatusCode::BAD_REQUEST,
                "malformed validationToken in the query\n",
            ),
            Refusal::UnexpectedValidation => (
                StatusCode::BAD_REQUEST,
                "no subscription is being created for this URL\n",
            ),
            Refusal::BodyBufferFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many request bodies in flight (--max-body-buffer); retry\n",
            ),
            Refusal::ConnectionBodiesFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many request bodies in flight on this connection; retry\n",
            ),
        };
        let mut r = Reply::plain(status, text);
        match self {
            Refusal::MethodNotAllowed => {
                r.headers.push(b"allow", b"POST");
            }
            Refusal::BodyBufferFull | Refusal::ConnectionBodiesFull => {
                r.headers.push(b"retry-after", BODY_BUDGET_RETRY_AFTER);
            }
            _ => {}
        }
        r
    }

    /// Whether the body is worth reading (and dropping) to keep the connection: not when it
    /// is too large, nor when the relay has no room for bodies.
    pub fn drain(self) -> bool {
        !matches!(
            self,
            Refusal::TooLarge | Refusal::BodyBufferFull | Refusal::ConnectionBodiesFull
        )
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

pub use crate::config::{plain_path, under_prefix};

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

    /// Servlet containers strip `;params` from each segment before resolving dot segments, so
    /// `/ews/..;/admin` is `/admin` to them; the relay refuses any path parameter (EWS callback
    /// URLs have none), encoded or not.
    #[test]
    fn path_parameters_are_refused() {
        for bad in [
            "/ews/..;/admin",
            "/ews/%2e%2e;/admin",
            "/ews/.;/admin",
            "/ews/..;x=1/admin",
            "/ews;/../admin",
            "/ews/notify;jsessionid=1",
            "/ews/%3b",
            "/ews/..%3B/admin",
            ";",
        ] {
            assert!(!plain_path(bad), "{bad}");
        }
        // Only the path: a query may hold `;` (head.path() leaves it out).
        assert!(plain_path("/ews/notify"));
    }
}
