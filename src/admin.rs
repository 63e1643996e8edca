//! The plain-HTTP admin endpoint: `/healthz`, `/readyz`, `/metrics`.
//!
//! Meant for the container runtime and the monitoring system on the inside network; it never
//! relays anything and is bound to loopback by default.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::tls::CertResolver;
use crate::upstream::Receiver;

/// The receiver counts as reachable for `/readyz` if it accepted a connection or answered
/// within this window; otherwise `/readyz` probes it with a fresh TCP connect.
const READY_WINDOW: Duration = Duration::from_secs(30);
/// An admin request's head must arrive within this (it is a local monitoring client).
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent admin connections; monitoring needs a handful.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// What the admin endpoint reports on.
#[derive(Debug)]
pub struct AdminState {
    /// All metrics.
    pub metrics: Arc<Metrics>,
    /// The receiver, for readiness.
    pub receiver: Arc<Receiver>,
    /// The served certificate.
    pub certs: Arc<CertResolver>,
    /// Set once the TLS listener is accepting.
    pub listening: AtomicBool,
    /// Process start, for uptime.
    pub started: Instant,
}

/// Serve admin requests until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(permit);
        });
    }
}

async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => readyz(state).await,
        "/metrics" => {
            let mut r = text(StatusCode::OK, state.metrics.encode());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics\n".into(),
        ),
    }
}

async fn readyz(state: &AdminState) -> Response<Full<Bytes>> {
    if !state.listening.load(Ordering::Relaxed) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not listening yet\n".into(),
        );
    }
    let recent = state
        .receiver
        .since_reachable()
        .is_some_and(|d| d < READY_WINDOW);
    if recent || state.receiver.probe().await {
        text(StatusCode::OK, "ready\n".into())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "receiver {} not accepting connections\n",
                state.receiver.authority()
            ),
        )
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
