//! ews-relay: a TLS edge for Exchange Web Services push notifications.
//!
//! [`run`] takes already-bound listeners, a validated [`Config`] and a shutdown future, so the
//! binary and the tests start the relay the same way.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod ews;
pub mod filter;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod tracker;
pub mod upstream;
// The EWS simulator (examples/ews_sim.rs, tests/sim.rs); last so it merges cleanly.
pub mod sim;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::net::TcpListener;

pub use config::{Config, TlsSource};

/// How often idle receiver connections past their timeout are closed.
const POOL_REAP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the subscription table is swept for stale and forgotten subscriptions; stale ones
/// are noticed within this of `--stale-after`.
const TRACKER_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("{flag} {addr}: cannot listen: {source}")]
    Bind {
        /// `--listen` or `--admin-listen`.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The certificate could not be loaded or generated.
    #[error("{flag}: {source}")]
    Tls {
        /// The flag whose value is at fault.
        flag: &'static str,
        /// What went wrong.
        source: tls::TlsError,
    },
}

impl StartError {
    /// Exit code for `main`: 64 (usage) when a flag's value is at fault, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Tls { .. } => 64,
            StartError::Bind { .. } => 1,
        }
    }
}

/// The relay's listening sockets.
#[derive(Debug)]
pub struct Listeners {
    /// The TLS listener Exchange connects to.
    pub relay: TcpListener,
    /// The admin listener.
    pub admin: TcpListener,
}

impl Listeners {
    /// Bind both listeners from the configuration.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let relay = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                flag: "--listen",
                addr: config.listen,
                source,
            })?;
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| StartError::Bind {
                flag: "--admin-listen",
                addr: config.admin_listen,
                source,
            })?;
        Ok(Self { relay, admin })
    }
}

/// Load or generate the server certificate named by the configuration.
pub async fn load_certificate(source: &TlsSource) -> Result<tls::LoadedCert, StartError> {
    let source = source.clone();
    // File I/O and key generation stay off the async workers.
    tokio::task::spawn_blocking(move || match &source {
        TlsSource::Files { cert, key } => tls::load_pem(cert, key).map_err(|e| StartError::Tls {
            flag: match e {
                tls::TlsError::Key { .. } => "--tls-key",
                tls::TlsError::Read { ref path, .. }
                | tls::TlsError::Empty { ref path, .. }
                | tls::TlsError::Pem { ref path, .. }
                    if path == key =>
                {
                    "--tls-key"
                }
                _ => "--tls-cert",
            },
            source: e,
        }),
        TlsSource::SelfSigned { hostname, dir } => {
            tls::self_signed(dir, hostname).map_err(|e| StartError::Tls {
                flag: "--cert-dir",
                source: e,
            })
        }
    })
    .await
    .expect("certificate loading panicked")
}

/// Run the relay until `shutdown` completes, then drain for `--shutdown-grace` and return.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let started = Instant::now();
    let cert = load_certificate(&config.tls).await?;
    log_certificate(&cert.info);
    let certs = Arc::new(tls::CertResolver::new(cert));
    let server_config = tls::server_config(certs.clone()).map_err(|e| StartError::Tls {
        flag: "--tls-cert",
        source: e,
    })?;

    let metrics = Arc::new(metrics::Metrics::new());
    let receiver = Arc::new(upstream::Receiver::new(
        config.upstream.clone(),
        config.timeouts.upstream_connect,
        config.timeouts.upstream,
        metrics.clone(),
    ));
    let tracker = Arc::new(tracker::Tracker::new(config.stale_after));
    let proxy = Arc::new(proxy::Proxy::new(
        &config,
        receiver.clone(),
        tracker.clone(),
        metrics.clone(),
    ));
    let edge = Arc::new(server::Edge {
        acceptor: tokio_rustls::TlsAcceptor::from(server_config),
        allow: config.allow.clone(),
        denied: filter::DeniedLog::default(),
        proxy,
        metrics: metrics.clone(),
        max_connections: config.max_connections,
        handshake_timeout: config.timeouts.handshake,
        header_timeout: config.timeouts.header,
        idle_timeout: config.timeouts.idle,
    });
    let admin_state = Arc::new(admin::AdminState {
        metrics: metrics.clone(),
        tracker: tracker.clone(),
        receiver: receiver.clone(),
        certs,
        listening: Default::default(),
        started,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_task = tokio::spawn(admin::serve(
        listeners.admin,
        admin_state.clone(),
        stop_rx.clone(),
    ));
    let reaper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(POOL_REAP_INTERVAL);
        loop {
            tick.tick().await;
            receiver.reap_idle();
        }
    });
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRACKER_SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            metrics.set_subscriptions(tracker.sweep());
        }
    });

    tracing::info!(
        listen = %listeners.relay.local_addr().map_or(config.listen, |a| a),
        upstream = %config.upstream.authority,
        path_prefix = %config.path_prefix,
        admitted = %config.allow.describe(),
        "ews-relay listening"
    );
    admin_state.listening.store(true, Ordering::Relaxed);
    let serving = server::serve(
        listeners.relay,
        edge,
        stop_rx,
        config.timeouts.shutdown_grace,
    );
    let trigger = async move {
        shutdown.await;
        tracing::info!("shutdown requested");
        let _ = stop_tx.send(true);
        // Keep the sender alive until the server has drained.
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = serving => {}
        _ = trigger => {}
    }
    admin_state.listening.store(false, Ordering::Relaxed);
    reaper.abort();
    sweeper.abort();
    admin_task.abort();
    tracing::info!("ews-relay stopped");
    Ok(())
}

fn log_certificate(info: &tls::CertInfo) {
    let days = info
        .not_after
        .duration_since(SystemTime::now())
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0);
    if info.self_signed {
        tracing::warn!(
            subject = %info.subject,
            sha256 = %info.sha256,
            expires_in_days = days,
            "serving a SELF-SIGNED certificate: Exchange Online will not call back to it; give --tls-cert/--tls-key from a public CA"
        );
    } else {
        tracing::info!(subject = %info.subject, sha256 = %info.sha256, expires_in_days = days, "serving certificate");
    }
}
