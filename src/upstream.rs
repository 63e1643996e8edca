//! The receiver: HTTP/1.1 over a small keep-alive pool.
//!
//! A hand-made pool rather than hyper-util's client because the relay needs to know whether a
//! failed request went out on a reused connection: only then is it retried once on a fresh one
//! (the receiver closed an idle keep-alive connection just as the request left), while a failure
//! on a fresh connection is the receiver's answer and is reported as such.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::Upstream;
use crate::metrics::{Metrics, UpstreamErrorKind};

/// An idle connection is dropped after this long: shorter than the keep-alive timeouts of
/// common receivers (Node.js 5 s, Go 90 s, HTTP.sys 120 s), so the relay rarely sends on a
/// connection the receiver is closing.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Idle connections kept at most; above it a finished connection is closed instead.
const POOL_MAX_IDLE: usize = 256;
/// The receiver's answer is buffered (it is a few hundred bytes of SOAP); anything larger than
/// this is not an EWS answer and becomes a 502.
pub const MAX_RESPONSE_BODY: usize = 1 << 20;
/// Largest response head accepted from the receiver.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A failed exchange with the receiver.
#[derive(Debug, thiserror::Error)]
#[error("{}: {detail}", kind.as_str())]
pub struct UpstreamError {
    /// What kind of failure, for metrics and the status code.
    pub kind: UpstreamErrorKind,
    /// Human-readable detail for the log.
    pub detail: String,
}

impl UpstreamError {
    fn new(kind: UpstreamErrorKind, detail: impl ToString) -> Self {
        Self {
            kind,
            detail: detail.to_string(),
        }
    }

    /// The status the client gets: 504 when the receiver did not answer in time, else 502.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            UpstreamErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// A request ready to go to the receiver.
#[derive(Debug)]
pub struct Outgoing {
    /// Method (always POST today; kept general for the admin side and tests).
    pub method: Method,
    /// Path and query as received.
    pub path_and_query: http::uri::PathAndQuery,
    /// Headers after hop-by-hop removal and X-Forwarded-* rewriting; `Host` is set here.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

/// The receiver and its connection pool.
pub struct Receiver {
    upstream: Upstream,
    connect_timeout: Duration,
    timeout: Duration,
    idle: Mutex<VecDeque<Idle>>,
    metrics: Arc<Metrics>,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last time the receiver accepted a connection or
    /// answered a request; 0 = never.
    last_reachable_ms: AtomicU64,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("upstream", &self.upstream.authority)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// A receiver with an empty pool.
    pub fn new(
        upstream: Upstream,
        connect_timeout: Duration,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            upstream,
            connect_timeout,
            timeout,
            idle: Mutex::new(VecDeque::new()),
            metrics,
            epoch: Instant::now(),
            last_reachable_ms: AtomicU64::new(0),
        }
    }

    /// The receiver's `host:port`.
    pub fn authority(&self) -> &str {
        self.upstream.authority.as_str()
    }

    /// The `Host` header value to send.
    pub fn host_header(&self) -> &http::HeaderValue {
        &self.upstream.host_header
    }

    /// Send `req` and buffer the answer, within `--upstream-timeout` in all.
    pub async fn send(&self, req: Outgoing) -> Result<Response<Bytes>, UpstreamError> {
        match tokio::time::timeout(self.timeout, self.send_with_retry(req)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::new(
                UpstreamErrorKind::Timeout,
                format!("no complete answer within {:?}", self.timeout),
            )),
        }
    }

    async fn send_with_retry(&self, req: Outgoing) -> Result<Response<Bytes>, UpstreamError> {
        let (mut sender, reused) = match self.checkout().await {
            Some(s) => (s, true),
            None => (self.connect().await?, false),
        };
        if !reused {
            return self.exchange(sender, build(req)).await;
        }
        // Reused: keep a copy to send again if the receiver had closed the connection.
        let copy = Outgoing {
            method: req.method.clone(),
            path_and_query: req.path_and_query.clone(),
            headers: req.headers.clone(),
            body: req.body.clone(),
        };
        match sender.send_request(build(req)).await {
            Ok(resp) => self.finish(sender, resp).await,
            Err(e) if retryable(&e) => {
                self.metrics.upstream_retries.inc();
                tracing::debug!(error = %e, "pooled receiver connection failed before answering; retrying on a fresh one");
                let sender = self.connect().await?;
                self.exchange(sender, build(copy)).await
            }
            Err(e) => Err(UpstreamError::new(UpstreamErrorKind::Protocol, e)),
        }
    }

    async fn exchange(
        &self,
        mut sender: SendRequest<Full<Bytes>>,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Bytes>, UpstreamError> {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::new(UpstreamErrorKind::Protocol, e))?;
        self.finish(sender, resp).await
    }

    async fn finish(
        &self,
        sender: SendRequest<Full<Bytes>>,
        resp: Response<hyper::body::Incoming>,
    ) -> Result<Response<Bytes>, UpstreamError> {
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    UpstreamError::new(
                        UpstreamErrorKind::ResponseTooLarge,
                        format!("answer larger than {MAX_RESPONSE_BODY} bytes"),
                    )
                } else {
                    UpstreamError::new(UpstreamErrorKind::Protocol, e)
                }
            })?
            .to_bytes();
        self.mark_reachable();
        self.checkin(sender);
        Ok(Response::from_parts(parts, body))
    }

    /// Take the most recently used live connection, dropping stale ones.
    async fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        loop {
            let idle = {
                let mut pool = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                pool.pop_back()
            }?;
            if idle.since.elapsed() >= POOL_IDLE_TIMEOUT || idle.sender.is_closed() {
                continue;
            }
            let mut sender = idle.sender;
            // Normally ready at once; an error means the receiver closed it meanwhile.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn checkin(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut pool = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX_IDLE {
            pool.push_back(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Close idle connections older than [`POOL_IDLE_TIMEOUT`]; called periodically so that
    /// a quiet relay does not hold connections the receiver has given up on.
    pub fn reap_idle(&self) {
        let mut pool = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Oldest at the front.
        while pool
            .front()
            .is_some_and(|i| i.since.elapsed() >= POOL_IDLE_TIMEOUT || i.sender.is_closed())
        {
            pool.pop_front();
        }
    }

    /// Open a new connection to the receiver.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, UpstreamError> {
        let stream = self.tcp_connect().await?;
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(MAX_RESPONSE_HEAD.max(8192))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::new(UpstreamErrorKind::Protocol, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "receiver connection ended");
            }
        });
        Ok(sender)
    }

    async fn tcp_connect(&self) -> Result<TcpStream, UpstreamError> {
        let connect = async {
            let addrs = self.resolve().await?;
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(UpstreamError::new(
                UpstreamErrorKind::Connect,
                last.map_or_else(|| "no address".to_owned(), |e| e.to_string()),
            ))
        };
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| {
                UpstreamError::new(
                    UpstreamErrorKind::ConnectTimeout,
                    format!("connect not finished within {:?}", self.connect_timeout),
                )
            })??;
        let _ = stream.set_nodelay(true);
        self.mark_reachable();
        Ok(stream)
    }

    async fn resolve(&self) -> Result<Vec<SocketAddr>, UpstreamError> {
        let authority = self.upstream.authority.as_str();
        if let Ok(addr) = authority.parse::<SocketAddr>() {
            return Ok(vec![addr]);
        }
        tokio::net::lookup_host(authority)
            .await
            .map(Iterator::collect)
            .map_err(|e| {
                UpstreamError::new(
                    UpstreamErrorKind::Connect,
                    format!("resolve {authority}: {e}"),
                )
            })
    }

    fn mark_reachable(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_reachable_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// How long ago the receiver last accepted a connection or answered; `None` if never.
    pub fn since_reachable(&self) -> Option<Duration> {
        match self.last_reachable_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }

    /// Check that the receiver accepts TCP connections now (for `/readyz`).
    pub async fn probe(&self) -> bool {
        self.tcp_connect().await.is_ok()
    }
}

/// A failure that shows the request never reached a receiver willing to answer it on this
/// connection: the connection was closed before or while the request went out, with no answer.
fn retryable(e: &hyper::Error) -> bool {
    if e.is_canceled() || e.is_incomplete_message() || e.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

fn build(req: Outgoing) -> Request<Full<Bytes>> {
    let mut out = Request::new(Full::new(req.body));
    *out.method_mut() = req.method;
    *out.uri_mut() = http::Uri::from(req.path_and_query);
    *out.headers_mut() = req.headers;
    out
}
