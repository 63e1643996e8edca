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
pub mod managed_graph;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod receiver;
pub mod reload;
pub mod route;
pub mod source;
pub mod spool;
pub mod store;
pub mod streaming;
pub mod subscriptions;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;

pub use config::{Config, TlsSource};

/// How often idle receiver connections past their timeout are closed.
const POOL_REAP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the subscription table is swept for stale and forgotten subscriptions; stale ones
/// are noticed within this of `--stale-after`.
const TRACKER_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the relay could not start.
///
/// Each variant's message includes its cause's, so `main` prints one line; the cause is also
/// kept as the error's `source()` for callers that walk the chain.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("{flag} {addr}: cannot listen: {source}{hint}")]
    Bind {
        /// `--listen` or `--admin-listen`.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
        /// What to do about it, when the OS error has a usual cause (`; …`), else empty.
        hint: String,
    },
    /// The embedded store could not be opened, read or written.
    #[error("--state-dir: {0}")]
    Store(#[source] store::StoreError),
    /// `--callback-url` does not parse as a URI (validated in config, so only a bug gets here).
    #[error("--callback-url {url}: {source}")]
    CallbackUrl {
        /// The URL.
        url: String,
        /// Why it does not parse.
        source: http::uri::InvalidUri,
    },
    /// The `--trace-dir` could not be prepared.
    #[error("--trace-dir {dir}: {source}")]
    TraceDir {
        /// The directory.
        dir: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Outbound HTTPS could not be set up.
    #[error("{flag}: {source}")]
    Outbound {
        /// The flag at fault or whose calls need the client (`--ews-ca-file`, `--refresh-ranges`).
        flag: &'static str,
        /// What went wrong.
        source: subscriptions::auth::HttpClientError,
    },
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
            StartError::Tls { .. } | StartError::CallbackUrl { .. } => 64,
            StartError::Outbound { source, .. } if source.is_ca_file() => 64,
            StartError::Outbound { .. }
            | StartError::Bind { .. }
            | StartError::Store(_)
            | StartError::TraceDir { .. } => 1,
        }
    }
}

/// What usually causes a bind error, and what to do about it; empty when nothing useful is known.
fn bind_hint(addr: SocketAddr, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            // Linux's limit for unprivileged binds; other systems use 1024.
            let first_free =
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
                    .ok()
                    .and_then(|s| s.trim().parse::<u16>().ok())
                    .unwrap_or(1024);
            if addr.port() < first_free {
                format!(
                    "; ports below {first_free} need root or the CAP_NET_BIND_SERVICE capability: \
                     `sudo setcap cap_net_bind_service=+ep {}` (again after each upgrade of the binary), \
                     or AmbientCapabilities=CAP_NET_BIND_SERVICE in the systemd unit (see the README), \
                     or listen on a port from {first_free} up and forward {} to it",
                    std::env::current_exe()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|_| "/usr/local/bin/ews-relay".into()),
                    addr.port()
                )
            } else {
                "; not a privileged port: a security module (SELinux, AppArmor) or a seccomp \
                 policy refused it"
                    .into()
            }
        }
        std::io::ErrorKind::AddrInUse => format!(
            "; another process listens there (find it with `ss -ltnp 'sport = :{}'`), or another \
             ews-relay is already running",
            addr.port()
        ),
        std::io::ErrorKind::AddrNotAvailable => {
            "; the address is not one of this host's (use 0.0.0.0 or [::] for all)".into()
        }
        _ => String::new(),
    }
}

/// The relay's listening sockets.
#[derive(Debug)]
pub struct Listeners {
    /// The TLS listener Exchange connects to; `None` with `--listen none`.
    pub relay: Option<TcpListener>,
    /// The admin listener.
    pub admin: TcpListener,
}

impl Listeners {
    /// Bind both listeners from the configuration.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let relay = match config.listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| StartError::Bind {
                            flag: "--listen",
                            addr,
                            hint: bind_hint(addr, &source),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| StartError::Bind {
                flag: "--admin-listen",
                addr: config.admin_listen,
                hint: bind_hint(config.admin_listen, &source),
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
                    edge::tls::TlsError::Key { .. } | edge::tls::TlsError::EncryptedKey { .. } => {
                        "--tls-key"
                    }
                    edge::tls::TlsError::Read { ref path, .. }
                    | edge::tls::TlsError::Empty { ref path, .. }
                    | edge::tls::TlsError::WrongKind { ref path, .. }
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
        log_certificate(&cert);
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
    let keepers = keepers(&config, receiver.clone(), metrics.clone()).await?;
    let manager = keepers.ews.clone();
    let allow = Arc::new(arc_swap::ArcSwap::from_pointee(config.allow.clone()));
    let pipeline = Arc::new(pipeline::Pipeline::new(
        route::Router::new(&config, allow.clone(), metrics.clone()),
        notify::Notifications::new(config.accept_any_body, tracker.clone(), metrics.clone()),
        receiver.clone(),
        manager.clone(),
        keepers.graph.clone(),
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
    edge::tls::report_expiry(&certs.current(), &metrics);
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
        let http =
            subscriptions::auth::http_client(None).map_err(|source| StartError::Outbound {
                flag: "--refresh-ranges",
                source,
            })?;
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
        streams: keepers.streams.clone(),
        graph: keepers.graph.clone(),
        graph_path_prefix: config.graph.as_ref().map(|g| g.path_prefix.clone()),
        denied,
        allow: allow.clone(),
        path_prefix: config.path_prefix.clone(),
        receiver: receiver.clone(),
        certs,
        listening: Default::default(),
        started,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_addr = listeners
        .admin
        .local_addr()
        .map_or(config.admin_listen, |a| a);
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

    if let Some(note) = config.allow_source.default_note() {
        tracing::info!("{note}");
    }
    tracing::info!(
        listen = %listeners.relay.as_ref().and_then(|l| l.local_addr().ok()).or(config.listen).map_or("none".into(), |a| a.to_string()),
        admin = %admin_addr,
        mode = if config.managed.is_some() { "managed" } else { "passthrough" },
        upstream = %config.upstream.authority,
        path_prefix = %config.path_prefix,
        admitted = %config.allow.describe(),
        "ews-relay listening"
    );
    admin_state.listening.store(true, Ordering::Relaxed);
    // Exchange calls back at once after a Subscribe: subscribe only now that we listen.
    let mut managed_tasks = Vec::new();
    if let Some(d) = &keepers.delivery {
        managed_tasks.push(tokio::spawn(d.clone().replay()));
    }
    if let Some(s) = &keepers.streams {
        s.start().await.map_err(StartError::Store)?;
        managed_tasks.push(tokio::spawn(streaming::watch_mailboxes(s.clone())));
    }
    if let Some(m) = &manager {
        m.start().await.map_err(StartError::Store)?;
        managed_tasks.push(tokio::spawn(watch_mailboxes(
            m.clone(),
            config
                .managed
                .as_ref()
                .and_then(|c| c.mailboxes_file.clone()),
        )));
    }
    if let Some(g) = &keepers.graph {
        g.start().await.map_err(StartError::Store)?;
        let file = config
            .graph
            .as_ref()
            .and_then(|g| g.managed.as_ref())
            .and_then(|m| m.resources_file.clone());
        managed_tasks.push(tokio::spawn(watch_resources(g.clone(), file)));
    }
    // With `--listen none` only the shutdown trigger ends the wait.
    let serving = async move {
        match listeners.relay {
            Some(relay) => {
                edge::serve(relay, edge, stop_rx, config.timeouts.shutdown_grace).await;
            }
            None => {
                let mut stop = stop_rx;
                let _ = stop.wait_for(|stop| *stop).await;
            }
        }
    };
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
    if let Some(s) = &keepers.streams {
        s.shutdown().await;
    }
    if let Some(g) = &keepers.graph {
        g.shutdown().await;
    }
    admin_task.abort();
    tracing::info!("ews-relay stopped");
    Ok(())
}

/// The keepers of managed mode (EWS, Graph, or both) and the delivery spool they share.
#[derive(Default)]
struct Keepers {
    ews: Option<Arc<subscriptions::Manager>>,
    /// Managed EWS mode with `--transport streaming` (then `ews` is `None`).
    streams: Option<Arc<streaming::Streams>>,
    graph: Option<Arc<managed_graph::GraphKeeper>>,
    delivery: Option<Arc<spool::Delivery>>,
}

/// Where deliveries of one source go on the receiver: its callback URL's path and query.
fn callback_path(url: &str) -> Result<http::uri::PathAndQuery, StartError> {
    let callback: http::Uri = url.parse().map_err(|source| StartError::CallbackUrl {
        url: url.to_owned(),
        source,
    })?;
    Ok(callback
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")))
}

/// Open the store and build the keepers managed mode asks for (nothing is subscribed yet).
async fn keepers(
    config: &Config,
    receiver: Arc<receiver::Receiver>,
    metrics: Arc<metrics::Metrics>,
) -> Result<Keepers, StartError> {
    let ews = config.managed.as_ref();
    let graph = config.graph.as_ref().and_then(|g| g.managed.as_ref());
    let (spool_limits, ca_file) = match (ews, graph) {
        (Some(m), _) => (m.spool, m.ews_ca_file.clone()),
        (None, Some(g)) => (g.spool, g.ca_file.clone()),
        (None, None) => return Ok(Keepers::default()),
    };
    let dir = config.state_dir.clone();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&dir))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(StartError::Store)?;
    let writer = Arc::new(store::StoreWriter::start(
        Arc::new(store),
        Default::default(),
    ));
    let root = || http::uri::PathAndQuery::from_static("/");
    let paths = spool::Paths {
        // Streaming has no callback URL: deliveries go to --path-prefix.
        ews: ews
            .map(|m| match &m.callback_url {
                Some(url) => callback_path(url),
                None => Ok(streaming::delivery_path(&config.path_prefix)),
            })
            .transpose()?
            .unwrap_or_else(root),
        graph: graph
            .map(|g| callback_path(&g.callback_url))
            .transpose()?
            .unwrap_or_else(root),
        ews_transport: ews
            .filter(|m| m.transport == config::Transport::Streaming)
            .map(|_| "streaming"),
    };
    let delivery = spool::Delivery::new(
        receiver,
        paths,
        writer.clone(),
        spool_limits,
        metrics.clone(),
    )
    .await
    .map_err(StartError::Store)?;
    let http = subscriptions::auth::http_client(ca_file.as_deref()).map_err(|source| {
        StartError::Outbound {
            flag: if ca_file.is_some() {
                "--ews-ca-file"
            } else {
                "managed mode's outbound HTTPS"
            },
            source,
        }
    })?;
    let mut keepers = Keepers {
        delivery: Some(delivery.clone()),
        ..Keepers::default()
    };
    if let Some(m) = ews {
        let credentials = subscriptions::auth::Credentials::new(
            m.auth.clone(),
            http.clone(),
            subscriptions::auth::EWS_SCOPE,
        );
        let trace = match &m.trace_dir {
            Some(dir) => Some(subscriptions::trace::Tracer::new(dir).map_err(|source| {
                StartError::TraceDir {
                    dir: dir.clone(),
                    source,
                }
            })?),
            None => None,
        };
        let client = subscriptions::client::EwsClient::new(
            http.clone(),
            credentials,
            m.max_concurrent_ews,
            trace,
        );
        if m.transport == config::Transport::Streaming {
            let streams = streaming::Streams::new(
                m.clone(),
                client,
                writer.clone(),
                delivery.clone(),
                metrics.clone(),
            )
            .await
            .map_err(StartError::Store)?;
            tracing::info!(
                mailboxes = m.mailboxes.len(),
                mailboxes_file = ?m.mailboxes_file,
                "managed mode, streaming: the relay follows the mailboxes over GetStreamingEvents"
            );
            keepers.streams = Some(streams);
        } else {
            let manager = subscriptions::Manager::new(
                m.clone(),
                client,
                writer.clone(),
                delivery.clone(),
                metrics.clone(),
            )
            .await
            .map_err(StartError::Store)?;
            tracing::info!(
                mailboxes = m.mailboxes.len(),
                mailboxes_file = ?m.mailboxes_file,
                callback = m.callback_url.as_deref().unwrap_or(""),
                "managed mode: the relay keeps the mailboxes subscribed"
            );
            keepers.ews = Some(manager);
        }
    }
    if let Some(g) = graph {
        let credentials = subscriptions::auth::Credentials::new(
            g.auth.clone(),
            http.clone(),
            subscriptions::auth::GRAPH_SCOPE,
        );
        let client = managed_graph::client::GraphClient::new(http, &g.url, credentials);
        let keeper = managed_graph::GraphKeeper::new(g.clone(), client, writer, delivery, metrics)
            .await
            .map_err(StartError::Store)?;
        tracing::info!(
            resources = g.resources.len(),
            resources_file = ?g.resources_file,
            callback = %g.callback_url,
            lifecycle = %g.lifecycle_url,
            graph = %g.url,
            "managed Graph mode: the relay keeps the Graph resources subscribed"
        );
        keepers.graph = Some(keeper);
    }
    Ok(keepers)
}

/// Re-read the Graph resources file when it changes or on SIGHUP, and apply the new set.
async fn watch_resources(
    keeper: Arc<managed_graph::GraphKeeper>,
    file: Option<std::path::PathBuf>,
) {
    let Some(file) = file else {
        return std::future::pending().await;
    };
    reload::watch(vec![file], "Graph resources file", || {
        let keeper = keeper.clone();
        async move {
            let wanted = keeper.configured_resources();
            tracing::info!(resources = wanted.len(), "applying the Graph resource set");
            if let Err(e) = keeper.apply_resource_set(&wanted).await {
                tracing::error!(error = %e, "cannot apply the new Graph resource set");
            }
        }
    })
    .await;
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

/// One line saying which certificate is served, from which files, and how they came to be.
/// Expiry problems are reported right after by [`edge::tls::report_expiry`].
fn log_certificate(cert: &edge::tls::LoadedCert) {
    let info = &cert.info;
    // Absolute, so an operator knows where `certs/` ended up (the working directory of a
    // service is often not where they think).
    let cert_file = std::path::absolute(&cert.origin.cert).unwrap_or(cert.origin.cert.clone());
    let key_file = std::path::absolute(&cert.origin.key).unwrap_or(cert.origin.key.clone());
    let expires = humantime::format_rfc3339_seconds(info.not_after);
    if info.self_signed {
        tracing::warn!(
            cert_file = %cert_file.display(),
            key_file = %key_file.display(),
            origin = cert.origin.kind.as_str(),
            subject = %info.subject,
            sha256 = %info.sha256,
            expires = %expires,
            "serving a SELF-SIGNED certificate: Exchange Online will not call back to it; give --tls-cert/--tls-key from a public CA"
        );
    } else {
        tracing::info!(
            cert_file = %cert_file.display(),
            key_file = %key_file.display(),
            origin = cert.origin.kind.as_str(),
            subject = %info.subject,
            sha256 = %info.sha256,
            expires = %expires,
            "serving certificate"
        );
    }
}
