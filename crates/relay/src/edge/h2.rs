//! HTTP/2 (negotiated by ALPN) served by hyper, its requests handed to the same
//! [`Pipeline`] as HTTP/1.1's through the [`http1::Handler`] steps.
//!
//! HTTP/2 gets HTTP/1.1's limits. hyper and h2 bound a request head's size
//! (`max_header_list_size`), the streams (`max_concurrent_streams`) and the unread DATA
//! (flow-control windows), but have no timeout for a request head: a client could open a
//! connection and never finish a HEADERS block, or trickle its CONTINUATION frames. So the
//! connection's reader watches frame boundaries on the way in ([`FrameScan`]) and the
//! connection is cut when a head has been incomplete for `--header-timeout`: the first from the
//! connection's start, the later ones from their first byte, as HTTP/1.1 does. What a body may
//! cost is bounded per request by `--max-body` and `--body-timeout`, per connection by
//! [`H2_BODIES_PER_CONNECTION`], and over the relay by `--max-body-buffer` (in admission).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http1::timer::Deadline;
use http1::{BodyError, Exchange, Handler, OwnedFields, Refused};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::Edge;
use crate::client::ConnInfo;
use crate::metrics::{BodyBudgetScope, Metrics};
use crate::pipeline::Pipeline;
use crate::route::{BodyBudget, Refusal};

/// Request bodies one HTTP/2 connection may buffer at once, in `--max-body`s. HTTP/1.1 buffers
/// one body per connection at most; Exchange sends one notification at a time per
/// subscription, so a second lets a retry or a second subscription overlap, and more is a
/// client multiplying `--max-body` by its streams (64 × 4 MiB at the defaults). Streams over it
/// get 503, as over `--max-body-buffer`.
const H2_BODIES_PER_CONNECTION: u64 = 2;

/// HTTP/2 (negotiated by ALPN), served by hyper.
pub(super) async fn serve_h2(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    edge: &Edge,
    builder: &http2::Builder<TokioExecutor>,
    info: Arc<ConnInfo>,
    mut shutdown: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: tls,
        activity: activity.clone(),
        frames: FrameScan::new(),
    });
    let pipeline = edge.pipeline.clone();
    let metrics = edge.metrics.clone();
    let bodies = BodyBudget::new(
        pipeline
            .limits()
            .max_body
            .saturating_mul(H2_BODIES_PER_CONNECTION),
    );
    let svc_activity = activity.clone();
    let service = service_fn(move |req| {
        let pipeline = pipeline.clone();
        let metrics = metrics.clone();
        let bodies = bodies.clone();
        let info = info.clone();
        let activity = svc_activity.clone();
        async move {
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            let reply = h2_request(&pipeline, req, &info, &bodies, &metrics).await;
            activity.in_flight.fetch_sub(1, Ordering::Relaxed);
            activity.touch();
            Ok::<_, Infallible>(reply)
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let idle = edge.idle_timeout;
    let header_timeout = edge.header_timeout;
    let mut closing = *shutdown.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    // Closed for idleness, the connection still waits for the client to acknowledge GOAWAY's
    // PING (h2 waits a round trip before the final GOAWAY); one that never does is cut after
    // another idle period instead of being held until it goes.
    let mut cut_at: Option<Instant> = None;
    loop {
        let idle_deadline = activity.last() + idle;
        // While no head is pending, look again in a header timeout: a head that starts in
        // between is then seen no later than its own deadline.
        let head_deadline = activity.head_since().unwrap_or_else(Instant::now) + header_timeout;
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(idle_deadline.into()), if !closing => {
                if activity.last().elapsed() >= idle && activity.in_flight.load(Ordering::Relaxed) == 0 {
                    tracing::debug!(%peer, "idle timeout");
                    closing = true;
                    cut_at = Some(Instant::now() + idle);
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = tokio::time::sleep_until(head_deadline.into()) => {
                if activity.head_since().is_some_and(|t| t.elapsed() >= header_timeout) {
                    // Cut, not GOAWAY: with a header block open no other frame can come (RFC
                    // 9113, 6.10), so nothing on the connection could finish anyway.
                    tracing::debug!(%peer, "HTTP/2 request head not received within --header-timeout");
                    return;
                }
            }
            _ = tokio::time::sleep_until(cut_at.unwrap_or_else(Instant::now).into()), if cut_at.is_some() => {
                tracing::debug!(%peer, "client did not finish closing an idle connection");
                return;
            }
        }
    }
}

/// One HTTP/2 request, through the same [`Handler`] steps as HTTP/1.1.
async fn h2_request(
    pipeline: &Pipeline,
    req: http::Request<Incoming>,
    conn: &ConnInfo,
    bodies: &BodyBudget,
    metrics: &Metrics,
) -> http::Response<Full<Bytes>> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let fields = OwnedFields::from_header_map(&parts.headers);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let head = fields.head(
        parts.method.as_str(),
        path,
        parts.uri.authority().map(|a| a.as_str()),
    );
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let log = |admitted, status, bytes_in, bytes_out, detail| {
        pipeline.log(
            conn,
            admitted,
            Exchange {
                head: Some(&head),
                status,
                bytes_in,
                bytes_out,
                elapsed: start.elapsed(),
                detail,
            },
        )
    };
    // The HTTP/1.1 engine refuses a malformed Host (RFC 9112 §3.2); `:authority` and `Host`
    // reach the receiver the same way (`X-Forwarded-Host`), so HTTP/2 refuses them alike.
    let authority_ok = parts
        .uri
        .authority()
        .is_none_or(|a| http1::valid_authority(a.as_str().as_bytes()))
        && parts
            .headers
            .get_all(http::header::HOST)
            .iter()
            .all(|h| http1::valid_authority(h.as_bytes()));
    if !authority_ok {
        let reply = http1::Reply::plain(
            http::StatusCode::BAD_REQUEST,
            "invalid :authority or Host\n",
        );
        log(None, reply.status, 0, reply.body.len(), None);
        return reply.into_response();
    }
    let route = match pipeline.admit(&head, conn, declared) {
        Ok(route) => route,
        Err(Refused { reply, .. }) => {
            log(None, reply.status, 0, reply.body.len(), None);
            return reply.into_response();
        }
    };
    let limits = pipeline.limits();
    // The connection's share, after admission (which took the relay's): held, as that one,
    // until the request is answered.
    let Some(_share) = bodies.try_reserve(declared.unwrap_or(limits.max_body)) else {
        metrics.body_budget_refused(BodyBudgetScope::Connection);
        drop(route);
        let reply = Refusal::ConnectionBodiesFull.reply();
        log(None, reply.status, 0, reply.body.len(), None);
        return reply.into_response();
    };
    let limit = usize::try_from(limits.max_body).unwrap_or(usize::MAX);
    let collected =
        tokio::time::timeout(limits.body_timeout, Limited::new(body, limit).collect()).await;
    let body = match collected {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Err(_) => Err(BodyError::Timeout),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(BodyError::TooLarge)
        }
        Ok(Err(_)) => Err(BodyError::Malformed),
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            let reply = pipeline.body_refused(e);
            log(Some(&route), reply.status, 0, reply.body.len(), None);
            return reply.into_response();
        }
    };
    let mut buffers = Default::default();
    let mut deadline = Deadline::new(tokio::time::Instant::now(), pipeline.upstream_timeout());
    let answer = pipeline
        .respond(&head, &body, conn, &route, &mut buffers, &mut deadline)
        .await;
    log(
        Some(&route),
        answer.reply.status,
        body.len(),
        answer.reply.body.len(),
        Some(&answer.detail),
    );
    answer.reply.into_response()
}

/// When bytes last moved on a connection, and how many requests it has in flight; the idle
/// watchdog closes a connection only when both say it is unused. Also since when a request
/// head has been pending, for the head timeout.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds after `epoch` at which the pending request head began; [`NO_HEAD`] when
    /// none is pending. Starts at 0: a new connection owes its first head.
    head_since_ms: AtomicU64,
}

/// [`Activity::head_since_ms`] when no request head is pending.
const NO_HEAD: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            head_since_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Since when a request head has been pending, if one is.
    fn head_since(&self) -> Option<Instant> {
        match self.head_since_ms.load(Ordering::Relaxed) {
            NO_HEAD => None,
            ms => Some(self.epoch + Duration::from_millis(ms)),
        }
    }

    fn set_head_pending(&self, pending: bool) {
        let ms = if pending { self.now_ms() } else { NO_HEAD };
        self.head_since_ms.store(ms, Ordering::Relaxed);
    }
}

/// A stream that records activity on every successful read or write, and watches the frames
/// read for request heads.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    frames: FrameScan,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let this = &mut *self;
            this.activity.touch();
            let was = this.frames.head_pending();
            this.frames.scan(&buf.filled()[before..]);
            let now = this.frames.head_pending();
            if now != was {
                this.activity.set_head_pending(now);
            }
        }
        res
    }
}

/// The HTTP/2 client connection preface (RFC 9113, 3.4), before the first frame.
const PREFACE_LEN: usize = 24;
/// Octets of a frame header: length (3), type, flags, stream id (4).
const FRAME_HEADER_LEN: usize = 9;
/// Frame types that carry a header block (RFC 9113, 6.2 and 6.10).
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
/// The flag that ends a header block.
const FLAG_END_HEADERS: u8 = 0x4;

/// Where the client's byte stream is in HTTP/2's framing: only frame boundaries and header
/// blocks, passively (h2 parses and checks everything; a client that breaks the framing is
/// closed by it). A request head is pending from the connection's start until its first
/// header block ends, and later from the first byte of a frame that may start one (a frame
/// header still incomplete, or a HEADERS frame) until the header block ends.
#[derive(Debug)]
struct FrameScan {
    /// Octets of the connection preface still to come.
    preface: usize,
    /// The frame header being read, and how much of it is.
    header: [u8; FRAME_HEADER_LEN],
    filled: usize,
    /// Payload octets of the current frame still to come.
    payload: usize,
    /// Inside a header block: from a HEADERS frame to the end of the frame with END_HEADERS.
    in_block: bool,
    /// The current frame has END_HEADERS.
    ends_block: bool,
    /// No header block has ended yet: the connection still owes its first request head.
    first: bool,
}

impl FrameScan {
    fn new() -> Self {
        Self {
            preface: PREFACE_LEN,
            header: [0; FRAME_HEADER_LEN],
            filled: 0,
            payload: 0,
            in_block: false,
            ends_block: false,
            first: true,
        }
    }

    /// Whether a request head is pending.
    fn head_pending(&self) -> bool {
        self.first || self.in_block || self.filled > 0
    }

    /// Follows `bytes`, the next ones read from the client.
    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
                if self.payload == 0 {
                    self.frame_done();
                }
            } else {
                let n = (FRAME_HEADER_LEN - self.filled).min(bytes.len());
                self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
                self.filled += n;
                bytes = &bytes[n..];
                if self.filled == FRAME_HEADER_LEN {
                    self.filled = 0;
                    let [l0, l1, l2, kind, flags, ..] = self.header;
                    self.payload =
                        (usize::from(l0) << 16) | (usize::from(l1) << 8) | usize::from(l2);
                    if kind == FRAME_HEADERS || kind == FRAME_CONTINUATION {
                        self.in_block = true;
                        self.ends_block = flags & FLAG_END_HEADERS != 0;
                    }
                    if self.payload == 0 {
                        self.frame_done();
                    }
                }
            }
        }
    }

    fn frame_done(&mut self) {
        if self.ends_block {
            self.in_block = false;
            self.ends_block = false;
            self.first = false;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8; PREFACE_LEN] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const SETTINGS: u8 = 0x4;
    const DATA: u8 = 0x0;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len().to_be_bytes();
        let mut f = vec![len[5], len[6], len[7], kind, flags, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn the_first_head_is_owed_from_the_start() {
        let mut scan = FrameScan::new();
        assert!(scan.head_pending());
        scan.scan(PREFACE);
        scan.scan(&frame(SETTINGS, 0, &[]));
        assert!(scan.head_pending(), "preface and SETTINGS are no head");
        scan.scan(&frame(FRAME_HEADERS, 0, b"abc"));
        assert!(scan.head_pending(), "HEADERS without END_HEADERS");
        scan.scan(&frame(FRAME_CONTINUATION, FLAG_END_HEADERS, b"de"));
        assert!(!scan.head_pending());
    }

    #[test]
    fn a_later_head_is_pending_from_its_first_byte_to_its_end() {
        let mut scan = FrameScan::new();
        scan.scan(PREFACE);
        scan.scan(&frame(FRAME_HEADERS, FLAG_END_HEADERS, b"abc"));
        assert!(!scan.head_pending());
        scan.scan(&frame(DATA, 0, &[0; 100]));
        assert!(!scan.head_pending(), "DATA is no head");
        // A HEADERS frame a byte at a time: pending from its first byte to its last.
        let headers = frame(FRAME_HEADERS, FLAG_END_HEADERS, b"xyz");
        for b in &headers[..headers.len() - 1] {
            scan.scan(std::slice::from_ref(b));
            assert!(scan.head_pending());
        }
        scan.scan(&headers[headers.len() - 1..]);
        assert!(!scan.head_pending());
        // Frames split anywhere, several in one read.
        let mut bytes = frame(DATA, 0, &[1; 20]);
        bytes.extend(frame(FRAME_HEADERS, 0, b"a"));
        scan.scan(&bytes[..5]);
        scan.scan(&bytes[5..]);
        assert!(scan.head_pending(), "inside a header block");
        scan.scan(&frame(FRAME_CONTINUATION, FLAG_END_HEADERS, &[]));
        assert!(!scan.head_pending());
    }
}
