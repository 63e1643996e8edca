//! Client side: accept, source filter, TLS handshake, HTTP/1.1 and HTTP/2 serving, connection
//! limit, timeouts and graceful shutdown.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::filter::{AllowList, DeniedLog};
use crate::http1::server::{self as h1, MAX_REQUEST_HEAD};
use crate::http1::OwnedFields;
use crate::metrics::{DenyReason, HandshakeFailure, Metrics};
use crate::proxy::{ConnInfo, ConnState, Proxy, Refusal};
use crate::timer::Deadline;
/// Concurrent HTTP/2 streams per connection; Exchange sends one notification at a time per
/// subscription.
const MAX_H2_STREAMS: u32 = 64;
/// Pause after an accept error such as EMFILE, so a full fd table does not become a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Everything a client connection needs, shared by all of them.
pub struct Edge {
    /// TLS server side.
    pub acceptor: TlsAcceptor,
    /// Source filter, swapped whole when `--allow-file` changes.
    pub allow: Arc<arc_swap::ArcSwap<AllowList>>,
    /// Denied-address log limiter and recent denied addresses (shared with the status page).
    pub denied: Arc<DeniedLog>,
    /// Peers trusted to state the client address (`--trusted-proxy`).
    pub trusted: Option<AllowList>,
    /// Read a PROXY protocol header first (`--proxy-protocol`).
    pub proxy_protocol: bool,
    /// A trusted proxy names the client in a request header (`--client-ip-header`): the
    /// allow-list is then applied per request to that address.
    pub client_ip_header: bool,
    /// The request handler.
    pub proxy: Arc<Proxy>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// `--max-connections`.
    pub max_connections: usize,
    /// `--handshake-timeout`.
    pub handshake_timeout: Duration,
    /// `--header-timeout`.
    pub header_timeout: Duration,
    /// `--idle-timeout`.
    pub idle_timeout: Duration,
}

/// Accept and serve until `shutdown` turns true; then stop accepting, let open connections
/// finish their requests for up to `grace`, and cut what is left.
pub async fn serve(
    listener: TcpListener,
    edge: Arc<Edge>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let limit = Arc::new(Semaphore::new(edge.max_connections));
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_header_list_size(MAX_REQUEST_HEAD as u32);
    let builder = Arc::new(builder);
    let mut tasks = JoinSet::new();

    loop {
        // Reap finished connections so the set holds only live ones.
        while tasks.try_join_next().is_some() {}
        // At the limit, wait here: new connections queue in the kernel's backlog.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Cheap check first: no TLS work, not a byte read, for a peer outside the allow-list.
        let ip = peer.ip().to_canonical();
        let trusted = edge.trusted.as_ref().is_some_and(|t| t.allows(ip));
        if edge.proxy_protocol {
            // The client's address comes in the PROXY header, read in the connection task.
            if !trusted {
                edge.deny(DenyReason::UntrustedProxy, ip);
                continue;
            }
        } else if !edge.admits(ip, trusted) {
            edge.deny(DenyReason::Source, ip);
            drop(stream);
            continue;
        }
        edge.metrics.accepted.inc();
        let edge = edge.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            serve_connection(stream, peer, &edge, &builder, shutdown).await;
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(
        open = tasks.len(),
        ?grace,
        "stopped accepting; draining connections"
    );
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!(
            cut = tasks.len(),
            "shutdown grace expired; closing remaining connections"
        );
        tasks.shutdown().await;
    }
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("allow", &self.allow.load().describe())
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

impl Edge {
    /// Whether a connection from `ip` may go on to TLS: it is admitted, or it is a trusted proxy
    /// that names the client per request (the allow-list then applies to that name).
    fn admits(&self, ip: std::net::IpAddr, trusted: bool) -> bool {
        (trusted && self.client_ip_header) || self.allow.load().allows(ip)
    }

    /// Count and (rate-limited) log a refused connection.
    fn deny(&self, reason: DenyReason, ip: std::net::IpAddr) {
        self.metrics.denied(reason);
        if self.denied.record(ip) {
            tracing::info!(peer = %ip, ?reason, "connection refused before TLS (logged at most once a minute per address)");
        }
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    edge: &Edge,
    builder: &http2::Builder<TokioExecutor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _open = OpenGuard::new(&edge.metrics);
    let _ = stream.set_nodelay(true);
    if edge.proxy_protocol {
        use crate::filter::proxy_protocol::{self, Header};
        match Box::pin(proxy_protocol::read(&mut stream)).await {
            Ok(Header::Proxied(client)) => peer = client,
            // The load balancer's own connection (health check): keep its address.
            Ok(Header::Local) => {}
            Err(e) => {
                tracing::debug!(%peer, error = %e, "PROXY header refused");
                edge.deny(DenyReason::ProxyHeader, peer.ip());
                return;
            }
        }
        let ip = peer.ip().to_canonical();
        let trusted = edge.trusted.as_ref().is_some_and(|t| t.allows(ip));
        if !edge.admits(ip, trusted) {
            edge.deny(DenyReason::Source, ip);
            return;
        }
    }
    // Boxed, as is the HTTP/2 path: the connection's task is sized by its largest state, and
    // every idle connection holds that much.
    let handshake = Box::pin(tokio::time::timeout(
        edge.handshake_timeout,
        edge.acceptor.accept(stream),
    ));
    // The stream is borrowed here (for its ALPN protocol) in a scope of its own: a local that
    // was ever borrowed keeps its place in the task until its scope ends, and the TLS stream is
    // over a kilobyte that would then be held twice by every connection.
    let (tls, h2) = {
        let tls = match handshake.await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                edge.metrics.handshake_failed(HandshakeFailure::Error);
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                edge.metrics.handshake_failed(HandshakeFailure::Timeout);
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        (tls, h2)
    };
    let mut info = ConnInfo::new(peer.ip());
    info.via_trusted_proxy = edge.client_ip_header
        && edge
            .trusted
            .as_ref()
            .is_some_and(|t| t.allows(info.peer_ip));
    if !h2 {
        let timeouts = h1::Timeouts {
            header: edge.header_timeout,
            idle: edge.idle_timeout,
            period: edge
                .header_timeout
                .min(edge.idle_timeout)
                .min(edge.proxy.body_timeout())
                .min(edge.proxy.upstream_timeout()),
        };
        h1::serve(tls, &edge.proxy, &info, timeouts, &mut shutdown).await;
        return;
    }
    // Boxed: HTTP/2 is rare (Exchange speaks HTTP/1.1) and its future is large.
    Box::pin(serve_h2(tls, peer, edge, builder, Arc::new(info), shutdown)).await;
}

/// HTTP/2 (negotiated by ALPN), served by hyper.
async fn serve_h2(
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
    let proxy = edge.proxy.clone();
    let svc_activity = activity.clone();
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        let info = info.clone();
        let activity = svc_activity.clone();
        async move {
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            let reply = h2_request(&proxy, req, &info).await;
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

/// One HTTP/2 request, through the same [`Proxy`] steps as HTTP/1.1.
async fn h2_request(
    proxy: &Proxy,
    req: http::Request<Incoming>,
    base: &ConnInfo,
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
    let named = match proxy.admit(&head, base, declared) {
        Ok(named) => named,
        Err(refusal) => {
            let reply = refusal.reply();
            proxy.log(
                base,
                &head,
                reply.status,
                0,
                reply.body.len(),
                start.elapsed(),
                None,
            );
            return reply.into_response();
        }
    };
    let info = named.as_ref().unwrap_or(base);
    let limit = usize::try_from(proxy.max_body()).unwrap_or(usize::MAX);
    let collected =
        tokio::time::timeout(proxy.body_timeout(), Limited::new(body, limit).collect()).await;
    let body = match collected {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Err(_) => Err(Refusal::BodyTimeout),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(Refusal::TooLarge)
        }
        Ok(Err(_)) => Err(Refusal::BadBody),
    };
    let (reply, bytes_in, upstream_ms) = match body {
        Ok(body) => {
            let bytes_in = body.len();
            let mut state = ConnState::new(Deadline::new(
                tokio::time::Instant::now(),
                proxy.upstream_timeout(),
            ));
            let relayed = proxy.relay(&head, &body, info, &mut state).await;
            (relayed.reply, bytes_in, relayed.upstream.map(|u| u.ms))
        }
        Err(refusal) => (refusal.reply(), 0, None),
    };
    proxy.log(
        info,
        &head,
        reply.status,
        bytes_in,
        reply.body.len(),
        start.elapsed(),
        upstream_ms,
    );
    reply.into_response()
}

/// Keeps the open-connections gauge right on every exit path.
struct OpenGuard<'a>(&'a Metrics);

impl<'a> OpenGuard<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.open_connections.inc();
        Self(m)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
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
