//! Client side: accept, source filter, TLS handshake, HTTP/1.1 and HTTP/2 serving, connection
//! limit, timeouts and graceful shutdown.

pub mod acme;
pub mod h2;
pub mod proxy_protocol;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http1::server::{self as h1, MAX_REQUEST_HEAD};
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::allow::{AllowList, DeniedLog};
use crate::client::ConnInfo;
use crate::metrics::{DenyReason, HandshakeFailure, Metrics};
use crate::pipeline::Pipeline;
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
    pub pipeline: Arc<Pipeline>,
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
    /// `--acme-domain`: TLS-ALPN-01 challenges to answer while an order is pending.
    pub challenges: Option<Arc<acme::Challenges>>,
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
            if edge.acme_pending() {
                // Maybe the CA validating: see `edge::acme` for why and what is answered.
                let edge = edge.clone();
                tasks.spawn(async move {
                    answer_challenge(stream, ip, &edge).await;
                    drop(permit);
                });
                continue;
            }
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

    /// Whether an ACME authorization waits for the CA to connect.
    fn acme_pending(&self) -> bool {
        self.challenges.as_ref().is_some_and(|c| c.pending())
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
        use proxy_protocol::Header;
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
            if edge.acme_pending() {
                answer_challenge(stream, ip, edge).await;
                return;
            }
            edge.deny(DenyReason::Source, ip);
            return;
        }
    }
    // Boxed, as is the HTTP/2 path: the connection's task is sized by its largest state, and
    // every idle connection holds that much.
    let handshake = Box::pin(tokio::time::timeout(
        edge.handshake_timeout,
        handshake(stream, edge),
    ));
    // The stream is borrowed here (for its ALPN protocol) in a scope of its own: a local that
    // was ever borrowed keeps its place in the task until its scope ends, and the TLS stream is
    // over a kilobyte that would then be held twice by every connection.
    let (tls, h2) = {
        let tls = match handshake.await {
            Ok(Ok(Some(tls))) => tls,
            // A validation server's handshake, answered.
            Ok(Ok(None)) => return,
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
                .min(http1::Handler::limits(&*edge.pipeline).body_timeout)
                .min(edge.pipeline.upstream_timeout()),
        };
        h1::serve(tls, &*edge.pipeline, &info, timeouts, &mut shutdown).await;
        return;
    }
    // Boxed: HTTP/2 is rare (Exchange speaks HTTP/1.1) and its future is large.
    Box::pin(h2::serve_h2(
        tls,
        peer,
        edge,
        builder,
        Arc::new(info),
        shutdown,
    ))
    .await;
}

/// The TLS handshake of an admitted connection. While an ACME authorization is pending the
/// ClientHello is read first, so a validation server is answered with the challenge
/// certificate (`None`); otherwise, and for every other client, the usual handshake.
async fn handshake(
    stream: TcpStream,
    edge: &Edge,
) -> std::io::Result<Option<tokio_rustls::server::TlsStream<TcpStream>>> {
    match &edge.challenges {
        Some(challenges) if challenges.pending() => {
            match acme::accept(stream, challenges, edge.acceptor.config(), true).await? {
                acme::Handshake::Served(tls) => Ok(Some(*tls)),
                acme::Handshake::Answered => {
                    edge.metrics.acme_challenge();
                    Ok(None)
                }
                // Not returned for an admitted peer; closing is the safe answer anyway.
                acme::Handshake::Refused => Ok(None),
            }
        }
        _ => edge.acceptor.accept(stream).await.map(Some),
    }
}

/// A connection from outside the allow-list while an ACME authorization is pending: answered
/// only if it is a validation server's handshake, else refused before any certificate is sent.
async fn answer_challenge(stream: TcpStream, ip: std::net::IpAddr, edge: &Edge) {
    let Some(challenges) = &edge.challenges else {
        edge.deny(DenyReason::Source, ip);
        return;
    };
    let _open = OpenGuard::new(&edge.metrics);
    let answer = tokio::time::timeout(
        edge.handshake_timeout,
        acme::accept(stream, challenges, edge.acceptor.config(), false),
    )
    .await;
    match answer {
        Ok(Ok(acme::Handshake::Answered)) => {
            edge.metrics.acme_challenge();
            tracing::info!(peer = %ip, "ACME validation handshake answered");
        }
        // Not a validation server, or not a complete ClientHello in time: the peer is
        // outside the allow-list, and refused like any other.
        Ok(Ok(_)) => edge.deny(DenyReason::Source, ip),
        Ok(Err(e)) => {
            tracing::debug!(peer = %ip, error = %e, "refused: not a complete ACME validation handshake");
            edge.deny(DenyReason::Source, ip);
        }
        Err(_) => edge.deny(DenyReason::Source, ip),
    }
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
