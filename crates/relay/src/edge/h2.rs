//! HTTP/2 (negotiated by ALPN) served by hyper, its requests handed to the same
//! [`Pipeline`] as HTTP/1.1's through the [`http1::Handler`] steps.

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
use crate::pipeline::Pipeline;

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
    });
    let pipeline = edge.pipeline.clone();
    let svc_activity = activity.clone();
    let service = service_fn(move |req| {
        let pipeline = pipeline.clone();
        let info = info.clone();
        let activity = svc_activity.clone();
        async move {
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            let reply = h2_request(&pipeline, req, &info).await;
            activity.in_flight.fetch_sub(1, Ordering::Relaxed);
            activity.touch();
            Ok::<_, Infallible>(reply)
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let idle = edge.idle_timeout;
    let mut closing = *shutdown.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let idle_deadline = activity.last() + idle;
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
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// One HTTP/2 request, through the same [`Handler`] steps as HTTP/1.1.
async fn h2_request(
    pipeline: &Pipeline,
    req: http::Request<Incoming>,
    conn: &ConnInfo,
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
    let route = match pipeline.admit(&head, conn, declared) {
        Ok(route) => route,
        Err(Refused { reply, .. }) => {
            log(None, reply.status, 0, reply.body.len(), None);
            return reply.into_response();
        }
    };
    let limits = pipeline.limits();
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
/// watchdog closes a connection only when both say it is unused.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that records activity on every successful read or write.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
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
            self.activity.touch();
        }
        res
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
