//! ews-relay: a TLS edge for Exchange Web Services push notifications.
//!
//! [`run`] takes already-bound listeners, a validated [`Config`] and a shutdown future, so the
//! binary and the tests start the relay the same way.
#![forbid(unsafe_code)]

// In the order of a notification's path; `config`, `allow` and `metrics` are read by all.
pub mod admin;
pub mod allow;
pub mod client;
pub mod config;
pub mod crypto;
pub mod deliver;
pub mod edge;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod receiver;
pub mod reload;
pub mod route;
pub mod spool;
pub mod store;
pub mod subscriptions;

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
    /// The embedded store could not be opened.
    #[error("--state-dir: {0}")]
    State(String),
    /// Outbound HTTPS could not be set up.
    #[error("--ews-ca-file: {0}")]
    Outbound(String),
    /// The certificate could not be loaded or generated.
    #[error("{flag}: {source}")]
    Tls {
        /// The flag whose value is at fault.
        flag: &'static str,
        /// What went wrong.
        source: edge::tls::TlsError,
    },
}

impl StartError {
    /// Exit code for `main`: 64 (usage) when a flag's value is at fault, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Tls { .. } | StartError::Outbound(_) => 64,
            StartError::Bind { .. } | StartError::State(_) => 1,
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
pub async fn load_certificate(source: &TlsSource) -> Result<edge::tls::LoadedCert, StartError> {
    let source = source.clone();
    // File I/O and key generation stay off the async workers.
    tokio::task::spawn_blocking(move || match &source {
        TlsSource::Files { cert, key } => {
            edge::tls::load_pem(cert, key).map_err(|e| StartError::Tls {
                flag: match e {
                    edge::tls::TlsError::Key { .. } => "--tls-key",
                    edge::tls::TlsError::Read { ref path, .. }
                    | edge::tls::TlsError::Empty { ref path, .. }
                    | edge::tls::TlsError::Pem { ref path, .. }
                        if path == key =>
                    {
                        "--tls-key"
                    }
                    _ => "--tls-cert",
                },
                source: e,
            })
        }
        TlsSource::SelfSigned { hostname, dir } => {
            edge::tls::self_signed(dir, hostname).map_err(|e| StartError::Tls {
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
    if config.acme.is_none() {
        log_certificate(&cert.info);
    } else {
        tracing::info!(subject = %cert.info.subject, "ACME: the self-signed certificate serves until a stored or newly issued one replaces it");
    }
    let certs = Arc::new(edge::tls::CertResolver::new(cert));
    let server_config = edge::tls::server_config(certs.clone()).map_err(|e| StartError::Tls {
        flag: "--tls-cert",
        source: e,
    })?;

    let metrics = Arc::new(metrics::Metrics::new());
    // A stored ACME certificate replaces the self-signed one before the first handshake.
    let acme = match &config.acme {
        Some(a) => Some(
            edge::acme::Acme::new(a.clone(), certs.clone(), metrics.clone()).map_err(|e| {
                StartError::Tls {
                    flag: "--acme-domain",
                    source: e.into(),
                }
            })?,
        ),
        None => None,
    };
    let receiver = Arc::new(receiver::Receiver::new(
        config.upstream.clone(),
        config.timeouts.upstream_connect,
        config.timeouts.upstream,
        metrics.clone(),
    ));
    let tracker = Arc::new(notify::Tracker::new(config.stale_after));
    let manager = match &config.managed {
        Some(m) => Some(managed_mode(m, &config, receiver.clone(), metrics.clone()).await?),
        None => None,
    };
    let allow = Arc::new(arc_swap::ArcSwap::from_pointee(config.allow.clone()));
    let pipeline = Arc::new(pipeline::Pipeline::new(
        route::Router::new(&config, allow.clone(), metrics.clone()),
        notify::Notifications::new(config.accept_any_body, tracker.clone(), metrics.clone()),
        receiver.clone(),
        manager.clone(),
        http1::BodyLimits {
            max_body: config.max_body,
            body_timeout: config.timeouts.body,
        },
        metrics.clone(),
    ));
    let denied = Arc::new(allow::DeniedLog::default());
    let edge = Arc::new(edge::Edge {
        acceptor: tokio_rustls::TlsAcceptor::from(server_config),
        allow: allow.clone(),
        denied: denied.clone(),
        trusted: config.trusted_proxies.clone(),
        proxy_protocol: config.proxy_protocol,
        client_ip_header: config.client_ip_header.is_some(),
        pipeline,
        metrics: metrics.clone(),
        max_connections: config.max_connections,
        handshake_timeout: config.timeouts.handshake,
        header_timeout: config.timeouts.header,
        idle_timeout: config.timeouts.idle,
        challenges: acme.as_ref().map(|a| a.challenges()),
    });
    // Live reloads: the certificate pair (operator files only) and the allow-list file.
    let mut reloaders = Vec::new();
    reload::report_expiry(&certs.current(), &metrics);
    if let TlsSource::Files { cert, key } = &config.tls {
        reloaders.push(tokio::spawn(reload::watch_certificate(
            certs.clone(),
            cert.clone(),
            key.clone(),
            metrics.clone(),
        )));
    }
    if let Some(acme) = acme {
        reloaders.push(tokio::spawn(acme.run()));
    }
    let allow_source = config.allow_source.clone();
    if let Some(file) = &allow_source.file {
        reloaders.push(tokio::spawn(reload::watch_allow_list(
            allow.clone(),
            allow_source.clone(),
            file.clone(),
            metrics.clone(),
        )));
    }
    if let Some((url, interval)) = &config.refresh_ranges {
        let http = subscriptions::auth::http_client(None).map_err(StartError::Outbound)?;
        reloaders.push(tokio::spawn(reload::refresh_ranges(
            allow.clone(),
            allow_source.clone(),
            allow::ranges::Service::new(http, url),
            config.state_dir.clone(),
            *interval,
            metrics.clone(),
        )));
    }
    let admin_state = Arc::new(admin::AdminState {
        metrics: metrics.clone(),
        tracker: tracker.clone(),
        manager: manager.clone(),
        denied,
        allow: allow.clone(),
        path_prefix: config.path_prefix.clone(),
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
    // Exchange calls back at once after a Subscribe: subscribe only now that we listen.
    let mut managed_tasks = Vec::new();
    if let Some(m) = &manager {
        m.start()
            .await
            .map_err(|e| StartError::State(e.to_string()))?;
        managed_tasks.push(tokio::spawn(m.delivery().clone().replay()));
        managed_tasks.push(tokio::spawn(watch_mailboxes(
            m.clone(),
            config
                .managed
                .as_ref()
                .and_then(|c| c.mailboxes_file.clone()),
        )));
    }
    let serving = edge::serve(
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
    for t in reloaders {
        t.abort();
    }
    for t in managed_tasks {
        t.abort();
    }
    if let Some(m) = &manager {
        m.shutdown().await;
    }
    admin_task.abort();
    tracing::info!("ews-relay stopped");
    Ok(())
}

/// Open the store and build the subscription manager (nothing is subscribed yet).
async fn managed_mode(
    m: &config::Managed,
    config: &Config,
    receiver: Arc<receiver::Receiver>,
    metrics: Arc<metrics::Metrics>,
) -> Result<Arc<subscriptions::Manager>, StartError> {
    let dir = config.state_dir.clone();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&dir))
        .await
        .map_err(|e| StartError::State(e.to_string()))?
        .map_err(|e| StartError::State(e.to_string()))?;
    let writer = Arc::new(store::StoreWriter::start(
        Arc::new(store),
        Default::default(),
    ));
    let callback: http::Uri = m
        .callback_url
        .parse()
        .map_err(|_| StartError::State("callback URL".into()))?;
    let path = callback
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let delivery = spool::Delivery::new(receiver, path, writer.clone(), metrics.clone())
        .await
        .map_err(|e| StartError::State(e.to_string()))?;
    let http =
        subscriptions::auth::http_client(m.ews_ca_file.as_deref()).map_err(StartError::Outbound)?;
    let credentials = subscriptions::auth::Credentials::new(m.auth.clone(), http.clone());
    let trace = match &m.trace_dir {
        Some(dir) => Some(
            subscriptions::trace::Tracer::new(dir)
                .map_err(|e| StartError::State(format!("--trace-dir {}: {e}", dir.display())))?,
        ),
        None => None,
    };
    let client =
        subscriptions::client::EwsClient::new(http, credentials, m.max_concurrent_ews, trace);
    let manager = subscriptions::Manager::new(m.clone(), client, writer, delivery, metrics)
        .await
        .map_err(|e| StartError::State(e.to_string()))?;
    tracing::info!(
        mailboxes = m.mailboxes.len(),
        mailboxes_file = ?m.mailboxes_file,
        callback = %m.callback_url,
        "managed mode: the relay keeps the mailboxes subscribed"
    );
    Ok(manager)
}

/// Re-read the mailboxes file when it changes or on SIGHUP, and apply the new set.
async fn watch_mailboxes(manager: Arc<subscriptions::Manager>, file: Option<std::path::PathBuf>) {
    let Some(file) = file else {
        return std::future::pending().await;
    };
    reload::watch(vec![file], "mailboxes file", || {
        let manager = manager.clone();
        async move {
            let wanted = manager.configured_mailboxes();
            tracing::info!(mailboxes = wanted.len(), "applying the mailbox set");
            if let Err(e) = manager.apply_mailbox_set(&wanted).await {
                tracing::error!(error = %e, "cannot apply the new mailbox set");
            }
        }
    })
    .await;
}

fn log_certificate(info: &edge::tls::CertInfo) {
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
