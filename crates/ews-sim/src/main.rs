//! ews_sim: a fake Exchange for exercising ews-relay's subscription manager on one machine.
//!
//! Serves EWS push and streaming `Subscribe`, `GetStreamingEvents` (chunked streams with
//! keep-alives and `Closed` at the timeout), `Unsubscribe`, SOAP Autodiscover, an OAuth
//! client-credentials token endpoint
//! and Microsoft Graph's subscription API (`/v1.0/subscriptions`) on one listener, pushes
//! `SendNotification` and Graph change notifications to the subscriptions' callbacks, and
//! takes orders on `/_sim/…` (events, Graph changes, faults, state). See the `ews_sim` library for the behaviour.
//!
//! Usage: `cargo run -p ews-sim -- --help`. Exits 64 on a bad flag.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ews_sim::{self as sim, Auth, CallbackTrust, MailboxConfig, MailboxRedirect, SimConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Mailboxes hosted when no `--mailbox` is given.
const DEMO_MAILBOXES: [&str; 3] = [
    "room-4.12@contoso.example",
    "room-4.14@contoso.example",
    "alice@contoso.example",
];

/// Exit code for a configuration error (BSD `EX_USAGE`).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuthMode {
    /// Bearer tokens from the simulator's own token endpoint (Exchange Online).
    Oauth,
    /// Basic user:password (on-premises).
    Basic,
    /// No authentication.
    None,
}

/// A fake Exchange (EWS push subscriptions, Autodiscover, OAuth) for testing ews-relay.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A hosted mailbox, `SMTP` or `SMTP=GROUPING` (Autodiscover's GroupingInformation).
    /// Repeatable; default: three demo mailboxes in group SIMPR01.
    #[arg(long = "mailbox", value_name = "SMTP[=GROUPING]")]
    mailboxes: Vec<String>,
    /// Make Autodiscover redirect a mailbox: `SMTP=OTHER-SMTP` (RedirectAddress) or
    /// `SMTP=https://…` (RedirectUrl). Repeatable.
    #[arg(long = "redirect", value_name = "SMTP=TARGET")]
    redirects: Vec<String>,
    /// Period of StatusEvent keep-alives on idle subscriptions (e.g. 60s, 500ms).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    status_period: Duration,
    /// How EWS and Autodiscover requests authenticate.
    #[arg(long, value_enum, default_value = "oauth")]
    auth: AuthMode,
    /// Client id the token endpoint accepts (--auth oauth).
    #[arg(long, env = "EWS_SIM_CLIENT_ID", default_value = "ews-sim-client")]
    client_id: String,
    /// File holding the client secret (--auth oauth); or set EWS_SIM_CLIENT_SECRET.
    #[arg(long)]
    client_secret_file: Option<PathBuf>,
    /// Lifetime of issued access tokens.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,
    /// Basic auth user (--auth basic).
    #[arg(long, env = "EWS_SIM_BASIC_USER", default_value = "svc-ews")]
    basic_user: String,
    /// File holding the Basic auth password (--auth basic); or set EWS_SIM_BASIC_PASSWORD.
    #[arg(long)]
    basic_password_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust when pushing to HTTPS callbacks, in addition to the
    /// system roots; needed for a private CA or a self-signed relay. Repeatable.
    #[arg(long = "callback-ca", value_name = "PATH")]
    callback_cas: Vec<PathBuf>,
    /// Accept any certificate from HTTPS callbacks. Lab use only.
    #[arg(long, conflicts_with = "callback_cas")]
    callback_insecure: bool,
    /// Scale of Exchange's retry schedule (30 s doubling within StatusFrequency minutes):
    /// 1 is real time, 0.01 makes it 100 times faster.
    #[arg(long, default_value_t = 1.0)]
    time_factor: f64,
    /// Limit on one push, connect to answer.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    push_timeout: Duration,
    /// Base URL Autodiscover hands out (default: from --listen and --tls-cert).
    #[arg(long)]
    public_url: Option<String>,
    /// Graph: longest subscription lifetime a create or renewal may ask (Graph's for Outlook
    /// resources is 10080 minutes); beyond is 400.
    #[arg(long, default_value = "10080m", value_parser = humantime::parse_duration)]
    graph_max_lifetime: Duration,
    /// Graph: grant at most this lifetime whatever is asked (the answered
    /// expirationDateTime, and the real expiry), to see renewals quickly in a lab.
    #[arg(long, value_parser = humantime::parse_duration)]
    graph_lifetime_cap: Option<Duration>,
    /// Graph: limit on the validation handshake (real time).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    graph_validation_timeout: Duration,
    /// Graph: limit on one notification POST (real time).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    graph_notification_timeout: Duration,
    /// Graph: most items in one notification POST.
    #[arg(long, default_value_t = sim::DEFAULT_GRAPH_MAX_BATCH)]
    graph_max_batch: usize,
    /// Graph: time to answer reauthorizationRequired before the subscription is removed.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    graph_reauthorization_grace: Duration,
    /// Streaming: period of keep-alive envelopes on an idle GetStreamingEvents connection
    /// (real time).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    streaming_keepalive: Duration,
    /// Streaming: keep every connection open this long whatever ConnectionTimeout it asked
    /// (real time); default: its ConnectionTimeout minutes times --time-factor.
    #[arg(long, value_parser = humantime::parse_duration)]
    streaming_connection_timeout: Option<Duration>,
    /// Streaming: open GetStreamingEvents connections allowed per account (Exchange Online:
    /// 10; on-premises default: 3); one more gets ErrorExceededConnectionCount.
    #[arg(long, default_value_t = sim::DEFAULT_STREAMING_CONNECTION_LIMIT)]
    streaming_connection_limit: usize,
    /// Streaming: how long a subscription survives with no connection, before --time-factor.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    streaming_subscription_lifetime: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let (config, secret_hint) = match config(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("ews_sim: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("ews_sim: --listen {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    let handle = match sim::SimHandle::new(config) {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("ews_sim: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let serving = handle.clone().serve(listener, shutdown_signal());
    eprintln!("EWS simulator listening on {}", handle.base_url());
    eprintln!("  EWS (Subscribe):  POST {}", handle.ews_url());
    eprintln!("  Autodiscover:     POST {}", handle.autodiscover_url());
    eprintln!(
        "  OAuth token:      POST {} (or /{{tenant}}/oauth2/v2.0/token)",
        handle.token_url()
    );
    eprintln!(
        "  control API:      {}/_sim/state, /_sim/subscriptions, /_sim/events, /_sim/faults/…",
        handle.base_url()
    );
    eprintln!(
        "  Graph:            {}/subscriptions (control: /_sim/graph/…)",
        handle.graph_url()
    );
    eprintln!("  auth:             {secret_hint}");
    for mailbox in handle.mailboxes() {
        eprintln!(
            "  mailbox:          {} (group {})",
            mailbox.smtp, mailbox.grouping
        );
    }
    let result = serving.await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ews_sim: {e}");
            ExitCode::from(1)
        }
    }
}

/// Turns the flags into a validated configuration, or a message naming the flag to fix.
fn config(args: &Args) -> Result<(SimConfig, String), String> {
    let mut mailboxes: Vec<MailboxConfig> = if args.mailboxes.is_empty() {
        DEMO_MAILBOXES
            .iter()
            .map(|m| MailboxConfig::new(*m))
            .collect()
    } else {
        args.mailboxes
            .iter()
            .map(|spec| {
                let (smtp, group) = spec.split_once('=').unwrap_or((spec, ""));
                check_smtp("--mailbox", smtp)?;
                let mailbox = MailboxConfig::new(smtp);
                Ok(if group.is_empty() {
                    mailbox
                } else {
                    mailbox.grouping(group)
                })
            })
            .collect::<Result<_, String>>()?
    };
    for spec in &args.redirects {
        let (smtp, target) = spec
            .split_once('=')
            .ok_or_else(|| format!("--redirect {spec}: expected SMTP=TARGET"))?;
        let mailbox = mailboxes
            .iter_mut()
            .find(|m| m.smtp.eq_ignore_ascii_case(smtp))
            .ok_or_else(|| format!("--redirect {spec}: {smtp} is not a --mailbox"))?;
        mailbox.redirect = Some(
            if target.starts_with("http://") || target.starts_with("https://") {
                MailboxRedirect::Url(target.to_owned())
            } else {
                check_smtp("--redirect", target)?;
                MailboxRedirect::Address(target.to_owned())
            },
        );
    }
    if !(args.time_factor > 0.0 && args.time_factor <= 1000.0) {
        return Err(format!(
            "--time-factor {}: must be above 0 and at most 1000",
            args.time_factor
        ));
    }
    if args.status_period < Duration::from_millis(10) {
        return Err("--status-period: at least 10ms".into());
    }
    if args.streaming_keepalive < Duration::from_millis(10) {
        return Err("--streaming-keepalive: at least 10ms".into());
    }
    if args
        .streaming_connection_timeout
        .is_some_and(|t| t < Duration::from_millis(10))
    {
        return Err("--streaming-connection-timeout: at least 10ms".into());
    }
    let (auth, hint) = match args.auth {
        AuthMode::None => (Auth::None, "none (any request accepted)".to_owned()),
        AuthMode::Basic => {
            let password = secret(
                args.basic_password_file.as_deref(),
                "EWS_SIM_BASIC_PASSWORD",
                "--basic-password-file",
            )?;
            let hint = format!("Basic, user {}", args.basic_user);
            (
                Auth::Basic {
                    user: args.basic_user.clone(),
                    password,
                },
                hint,
            )
        }
        AuthMode::Oauth => {
            let client_secret = secret(
                args.client_secret_file.as_deref(),
                "EWS_SIM_CLIENT_SECRET",
                "--client-secret-file",
            )?;
            let hint = format!("OAuth client credentials, client_id {}", args.client_id);
            let auth = Auth::OAuth {
                client_id: args.client_id.clone(),
                client_secret,
                token_lifetime: args.token_lifetime,
            };
            (auth, hint)
        }
    };
    let callback_trust = if args.callback_insecure {
        eprintln!("ews_sim: WARNING: --callback-insecure: pushes accept ANY certificate; never point this at a network you do not control");
        CallbackTrust::InsecureAcceptAny
    } else {
        let mut roots: Vec<CertificateDer<'static>> =
            rustls_native_certs::load_native_certs().certs;
        for path in &args.callback_cas {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--callback-ca {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "--callback-ca {}: no PEM certificate in it",
                    path.display()
                ));
            }
            roots.extend(certs);
        }
        CallbackTrust::Roots(roots)
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
            let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("--tls-cert: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
            // The simulator speaks HTTP/1.1 only.
            server.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(Arc::new(server))
        }
        _ => None,
    };
    let config = SimConfig {
        mailboxes,
        status_period: args.status_period,
        auth,
        callback_trust,
        time_factor: args.time_factor,
        tls,
        public_url: args.public_url.clone(),
        push_timeout: args.push_timeout,
        graph: graph_config(args)?,
        streaming_keepalive: args.streaming_keepalive,
        streaming_connection_timeout: args.streaming_connection_timeout,
        streaming_connection_limit: args.streaming_connection_limit,
        streaming_subscription_lifetime: args.streaming_subscription_lifetime,
    };
    Ok((config, hint))
}

/// The Graph flags, checked.
fn graph_config(args: &Args) -> Result<sim::GraphConfig, String> {
    if args.graph_max_lifetime < sim::graph::MIN_LIFETIME {
        return Err("--graph-max-lifetime: at least 45m (Graph's minimum lifetime)".into());
    }
    if args.graph_max_batch == 0 {
        return Err("--graph-max-batch: at least 1".into());
    }
    Ok(sim::GraphConfig {
        max_lifetime: args.graph_max_lifetime,
        lifetime_cap: args.graph_lifetime_cap,
        validation_timeout: args.graph_validation_timeout,
        notification_timeout: args.graph_notification_timeout,
        max_batch: args.graph_max_batch,
        reauthorization_grace: args.graph_reauthorization_grace,
        ..sim::GraphConfig::default()
    })
}

fn check_smtp(flag: &str, smtp: &str) -> Result<(), String> {
    match smtp.split_once('@') {
        Some((local, domain)) if !local.is_empty() && domain.contains('.') => Ok(()),
        _ => Err(format!("{flag} {smtp}: not an SMTP address")),
    }
}

/// A secret from a file (trimmed) or an environment variable.
fn secret(file: Option<&Path>, env: &str, flag: &str) -> Result<String, String> {
    let value = match file {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?
        }
        None => std::env::var(env).map_err(|_| format!("{flag} or {env} is required"))?,
    };
    let value = value.trim().to_owned();
    if value.is_empty() {
        return Err(format!("{flag}: the secret is empty"));
    }
    Ok(value)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("ews_sim: shutting down");
}
