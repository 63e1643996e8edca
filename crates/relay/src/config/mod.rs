//! Command line → validated, immutable runtime [`Config`].
//!
//! Every flag is also read from `EWS_RELAY_<FLAG>`; every value is parsed once here, so the rest
//! of the relay works with typed values and a bad value stops start-up with a message that names
//! the flag (exit code 64, see `main.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};

use crate::allow::{AllowList, AllowListError};

/// A configuration error: which flag, and what is wrong with its value.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct ConfigError {
    /// The flag as the user types it, e.g. `--upstream`.
    pub flag: &'static str,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl ConfigError {
    fn new(flag: &'static str, message: impl Into<String>) -> Self {
        Self {
            flag,
            message: message.into(),
        }
    }
}

/// Output format of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for container log collectors.
    Json,
}

/// ews-relay: a TLS edge for Exchange Web Services push notifications.
///
/// Accepts Exchange's HTTPS POSTs, admits only allowed source networks, and forwards each
/// notification in plain HTTP to the internal receiver.
#[derive(Debug, Parser)]
#[command(name = "ews-relay", version, about, long_about = None)]
pub struct Args {
    /// TLS listener address (IPv4 or IPv6, e.g. `[::]:443`).
    #[arg(
        long,
        env = "EWS_RELAY_LISTEN",
        default_value = "0.0.0.0:443",
        value_name = "ADDR"
    )]
    pub listen: String,

    /// The internal receiver, plain HTTP (`http://host:port`).
    #[arg(
        long,
        env = "EWS_RELAY_UPSTREAM",
        default_value = "http://127.0.0.1:10002",
        value_name = "URL"
    )]
    pub upstream: String,

    /// PEM certificate chain (leaf first). Without it a self-signed certificate is used.
    #[arg(
        long,
        env = "EWS_RELAY_TLS_CERT",
        value_name = "PATH",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, RSA or SEC1) matching --tls-cert.
    #[arg(
        long,
        env = "EWS_RELAY_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Host name for the generated self-signed certificate.
    #[arg(
        long,
        env = "EWS_RELAY_HOSTNAME",
        default_value = "localhost",
        value_name = "NAME"
    )]
    pub hostname: String,

    /// Directory where the self-signed certificate and key are generated and reused.
    #[arg(
        long,
        env = "EWS_RELAY_CERT_DIR",
        default_value = "certs",
        value_name = "DIR"
    )]
    pub cert_dir: PathBuf,

    /// Admitted source network (repeatable; IPv4 or IPv6 CIDR, or a single address).
    #[arg(
        long,
        env = "EWS_RELAY_ALLOW",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub allow: Vec<String>,

    /// File with one admitted CIDR per line; `#` starts a comment.
    #[arg(long, env = "EWS_RELAY_ALLOW_FILE", value_name = "PATH")]
    pub allow_file: Option<PathBuf>,

    /// Built-in network list: `exchange-online`, `cloudflare` (repeatable).
    #[arg(
        long,
        env = "EWS_RELAY_ALLOW_PRESET",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub allow_preset: Vec<String>,

    /// Only POSTs whose path lies under this prefix are forwarded.
    #[arg(
        long,
        env = "EWS_RELAY_PATH_PREFIX",
        default_value = "/",
        value_name = "PATH"
    )]
    pub path_prefix: String,

    /// Largest request body accepted; larger ones get 413 (e.g. `4096`, `64KiB`, `4MiB`).
    #[arg(long, env = "EWS_RELAY_MAX_BODY", default_value = "4MiB", value_name = "BYTES", value_parser = parse_size)]
    pub max_body: u64,

    /// Concurrent client connections; further ones wait in the listen backlog.
    #[arg(
        long,
        env = "EWS_RELAY_MAX_CONNECTIONS",
        default_value_t = 4096,
        value_name = "N"
    )]
    pub max_connections: usize,

    /// Time allowed for a client's TLS handshake.
    #[arg(long, env = "EWS_RELAY_HANDSHAKE_TIMEOUT", default_value = "10s", value_name = "DUR", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Time allowed to receive a request's head, from its first byte (a new connection that
    /// sends nothing is closed after the shorter of this and --idle-timeout).
    #[arg(long, env = "EWS_RELAY_HEADER_TIMEOUT", default_value = "30s", value_name = "DUR", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Time allowed to receive a request's whole body once its head has arrived.
    #[arg(long, env = "EWS_RELAY_BODY_TIMEOUT", default_value = "30s", value_name = "DUR", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// HTTP/1.1: the longest wait for the next request on a kept-alive connection, and for a
    /// client to take an answer (one that stops reading is dropped); HTTP/2: a connection with
    /// no bytes moving and no request in flight for this long is closed.
    #[arg(long, env = "EWS_RELAY_IDLE_TIMEOUT", default_value = "120s", value_name = "DUR", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Time allowed to open a TCP connection to the receiver.
    #[arg(long, env = "EWS_RELAY_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s", value_name = "DUR", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Time allowed for the receiver's complete answer; after it the client gets 504.
    #[arg(long, env = "EWS_RELAY_UPSTREAM_TIMEOUT", default_value = "60s", value_name = "DUR", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// Drain time on SIGTERM/SIGINT before open connections are cut.
    #[arg(long, env = "EWS_RELAY_SHUTDOWN_GRACE", default_value = "10s", value_name = "DUR", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Plain-HTTP admin endpoint (/healthz, /readyz, /metrics). Keep it off the internet.
    #[arg(
        long,
        env = "EWS_RELAY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090",
        value_name = "ADDR"
    )]
    pub admin_listen: String,

    /// Forward POST bodies that are not EWS SendNotification messages instead of answering 400.
    #[arg(long, env = "EWS_RELAY_ACCEPT_ANY_BODY")]
    pub accept_any_body: bool,

    /// A subscription with no notification or keep-alive for this long is shown as stale
    /// (default fits the usual StatusFrequency of 1 minute).
    #[arg(long, env = "EWS_RELAY_STALE_AFTER", default_value = "2m", value_name = "DUR", value_parser = parse_duration)]
    pub stale_after: Duration,

    /// Keep the exchange-online preset current from Microsoft 365's endpoint web service.
    #[arg(long, env = "EWS_RELAY_REFRESH_RANGES")]
    pub refresh_ranges: bool,

    /// The endpoint web service (override for sovereign clouds and tests).
    #[arg(long, env = "EWS_RELAY_RANGES_URL", value_name = "URL", default_value = crate::allow::ranges::DEFAULT_SERVICE)]
    pub ranges_url: String,

    /// How often the service's version is checked (at least 1h against Microsoft's service).
    #[arg(long, env = "EWS_RELAY_RANGES_INTERVAL", value_name = "DUR", default_value = "1h", value_parser = parse_duration)]
    pub ranges_interval: Duration,

    /// Expect a PROXY protocol v1/v2 header from --trusted-proxy peers (load balancer).
    #[arg(long, env = "EWS_RELAY_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,

    /// Load balancer or CDN allowed to state the client address: CIDR or preset (repeatable).
    #[arg(
        long,
        env = "EWS_RELAY_TRUSTED_PROXY",
        value_name = "CIDR|PRESET",
        value_delimiter = ','
    )]
    pub trusted_proxy: Vec<String>,

    /// Header carrying the client address from a --trusted-proxy (e.g. CF-Connecting-IP).
    #[arg(long, env = "EWS_RELAY_CLIENT_IP_HEADER", value_name = "NAME")]
    pub client_ip_header: Option<String>,

    /// Managed mode: the EWS endpoint, e.g. https://outlook.office365.com/EWS/Exchange.asmx.
    #[arg(
        long,
        env = "EWS_RELAY_EWS_URL",
        value_name = "URL",
        help_heading = "Managed mode"
    )]
    pub ews_url: Option<String>,

    /// Managed mode: SOAP Autodiscover endpoint; each mailbox's EWS URL and grouping come from it.
    #[arg(
        long,
        env = "EWS_RELAY_AUTODISCOVER_URL",
        value_name = "URL",
        help_heading = "Managed mode"
    )]
    pub autodiscover_url: Option<String>,

    /// Mailbox to keep subscribed (repeatable).
    #[arg(
        long,
        env = "EWS_RELAY_MAILBOX",
        value_name = "SMTP",
        value_delimiter = ',',
        help_heading = "Managed mode"
    )]
    pub mailbox: Vec<String>,

    /// File with one mailbox per line (`#` comments); re-read when it changes and on SIGHUP.
    #[arg(
        long,
        env = "EWS_RELAY_MAILBOXES_FILE",
        value_name = "PATH",
        help_heading = "Managed mode"
    )]
    pub mailboxes_file: Option<PathBuf>,

    /// The public URL Exchange calls back (https, path under --path-prefix).
    #[arg(
        long,
        env = "EWS_RELAY_CALLBACK_URL",
        value_name = "URL",
        help_heading = "Managed mode"
    )]
    pub callback_url: Option<String>,

    /// Distinguished folder to watch (repeatable; default: all folders).
    #[arg(
        long,
        env = "EWS_RELAY_FOLDER",
        value_name = "ID",
        value_delimiter = ',',
        help_heading = "Managed mode"
    )]
    pub folder: Vec<String>,

    /// Comma-separated EWS event types (default: all but FreeBusyChangedEvent).
    #[arg(
        long,
        env = "EWS_RELAY_EVENT_TYPES",
        value_name = "LIST",
        help_heading = "Managed mode"
    )]
    pub event_types: Option<String>,

    /// StatusFrequency in minutes (1..1440): how often Exchange sends a keep-alive.
    #[arg(
        long,
        env = "EWS_RELAY_STATUS_FREQUENCY",
        default_value_t = 1,
        value_name = "MIN",
        help_heading = "Managed mode"
    )]
    pub status_frequency: u16,

    /// Silence after which a subscription is declared lost (default 2 x status frequency).
    #[arg(long, env = "EWS_RELAY_HEARTBEAT_TIMEOUT", value_name = "DUR", value_parser = parse_duration, help_heading = "Managed mode")]
    pub heartbeat_timeout: Option<Duration>,

    /// How the relay authenticates to EWS: oauth, basic, none (lab servers only).
    #[arg(
        long,
        env = "EWS_RELAY_AUTH",
        default_value = "oauth",
        value_name = "KIND",
        help_heading = "Managed mode"
    )]
    pub auth: AuthKind,

    /// OAuth: the Entra ID tenant (id or domain).
    #[arg(
        long,
        env = "EWS_RELAY_TENANT_ID",
        value_name = "TENANT",
        help_heading = "Managed mode"
    )]
    pub tenant_id: Option<String>,

    /// OAuth: the application (client) id.
    #[arg(
        long,
        env = "EWS_RELAY_CLIENT_ID",
        value_name = "ID",
        help_heading = "Managed mode"
    )]
    pub client_id: Option<String>,

    /// OAuth: file holding the client secret (or set EWS_RELAY_CLIENT_SECRET; never a flag).
    #[arg(
        long,
        env = "EWS_RELAY_CLIENT_SECRET_FILE",
        value_name = "PATH",
        help_heading = "Managed mode"
    )]
    pub client_secret_file: Option<PathBuf>,

    /// OAuth: token endpoint (default Microsoft's for the tenant; for sovereign clouds and tests).
    #[arg(
        long,
        env = "EWS_RELAY_OAUTH_TOKEN_URL",
        value_name = "URL",
        help_heading = "Managed mode"
    )]
    pub oauth_token_url: Option<String>,

    /// Basic auth: the service account (on-premises Exchange).
    #[arg(
        long,
        env = "EWS_RELAY_USERNAME",
        value_name = "USER",
        help_heading = "Managed mode"
    )]
    pub username: Option<String>,

    /// Basic auth: file holding the password (or set EWS_RELAY_PASSWORD; never a flag).
    #[arg(
        long,
        env = "EWS_RELAY_PASSWORD_FILE",
        value_name = "PATH",
        help_heading = "Managed mode"
    )]
    pub password_file: Option<PathBuf>,

    /// Extra CA certificate (PEM) trusted for EWS/Autodiscover/OAuth, e.g. an internal CA.
    #[arg(
        long,
        env = "EWS_RELAY_EWS_CA_FILE",
        value_name = "PATH",
        help_heading = "Managed mode"
    )]
    pub ews_ca_file: Option<PathBuf>,

    /// Directory of the embedded store (subscriptions, watermarks, delivery spool).
    #[arg(
        long,
        env = "EWS_RELAY_STATE_DIR",
        default_value = "state",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,

    /// EWS requests in flight at most (Exchange allows about 27 per account).
    #[arg(
        long,
        env = "EWS_RELAY_MAX_CONCURRENT_EWS",
        default_value_t = 8,
        value_name = "N",
        help_heading = "Managed mode"
    )]
    pub max_concurrent_ews: usize,

    /// Write full EWS requests/responses here (credentials redacted, size-capped rotation).
    #[arg(
        long,
        env = "EWS_RELAY_TRACE_DIR",
        value_name = "DIR",
        help_heading = "Managed mode"
    )]
    pub trace_dir: Option<PathBuf>,

    /// Log format; filter with RUST_LOG (default `info`).
    #[arg(
        long,
        env = "EWS_RELAY_LOG_FORMAT",
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
}

/// How the relay authenticates to EWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthKind {
    /// OAuth 2.0 client credentials (Exchange Online).
    Oauth,
    /// Basic over HTTPS with a service account (on-premises).
    Basic,
    /// No credentials: lab servers and the simulator only.
    None,
}

/// A secret value: never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Credentials for EWS.
#[derive(Debug, Clone)]
pub enum Auth {
    /// OAuth 2.0 client credentials.
    OAuth {
        /// Token endpoint.
        token_url: String,
        /// Application id.
        client_id: String,
        /// Client secret.
        secret: Secret,
    },
    /// Basic authentication.
    Basic {
        /// Account name.
        username: String,
        /// Password.
        password: Secret,
    },
    /// None.
    None,
}

/// Where EWS is found.
#[derive(Debug, Clone)]
pub enum EwsEndpoint {
    /// One EWS URL for every mailbox.
    Direct(String),
    /// SOAP Autodiscover, per mailbox.
    Autodiscover(String),
}

/// Managed mode: the relay owns the subscriptions.
#[derive(Debug, Clone)]
pub struct Managed {
    /// EWS or Autodiscover.
    pub endpoint: EwsEndpoint,
    /// Mailboxes from `--mailbox`, lower-cased.
    pub mailboxes: Vec<String>,
    /// `--mailboxes-file`, re-read on change.
    pub mailboxes_file: Option<PathBuf>,
    /// The public callback URL.
    pub callback_url: String,
    /// Distinguished folder ids; empty means all folders.
    pub folders: Vec<String>,
    /// Event types to subscribe to.
    pub event_types: Vec<ews::EventType>,
    /// StatusFrequency, minutes.
    pub status_frequency: u16,
    /// Silence after which a subscription is lost.
    pub heartbeat_timeout: Duration,
    /// Credentials.
    pub auth: Auth,
    /// Extra trusted CA.
    pub ews_ca_file: Option<PathBuf>,
    /// EWS requests in flight at most.
    pub max_concurrent_ews: usize,
    /// Request/response trace directory.
    pub trace_dir: Option<PathBuf>,
}

/// Where the receiver is and how requests to it are addressed.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `host:port` to connect to (resolved at connect time, so a DNS change is followed).
    pub authority: Authority,
    /// The `Host` header sent to the receiver: the upstream's own authority, as nginx does by
    /// default, so that receivers bound to a host name (.NET HttpListener prefixes) match.
    pub host_header: HeaderValue,
}

/// Where the server certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// Operator-supplied PEM files.
    Files {
        /// Certificate chain, leaf first.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// A self-signed ECDSA P-256 certificate generated once under `dir` and reused.
    SelfSigned {
        /// Name in the certificate's subject and SAN.
        hostname: String,
        /// Directory that holds it.
        dir: PathBuf,
    },
}

/// Client-side and receiver-side time limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TLS handshake.
    pub handshake: Duration,
    /// Request head (hyper's header read timer).
    pub header: Duration,
    /// Request body.
    pub body: Duration,
    /// No I/O on a client connection.
    pub idle: Duration,
    /// TCP connect to the receiver.
    pub upstream_connect: Duration,
    /// The receiver's whole answer.
    pub upstream: Duration,
    /// Drain on shutdown.
    pub shutdown_grace: Duration,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// TLS listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// The receiver.
    pub upstream: Upstream,
    /// Certificate source.
    pub tls: TlsSource,
    /// Admitted source networks.
    pub allow: AllowList,
    /// `--refresh-ranges`: the endpoint service and how often to ask it.
    pub refresh_ranges: Option<(String, Duration)>,
    /// Peers allowed to state the client address (`--trusted-proxy`).
    pub trusted_proxies: Option<AllowList>,
    /// Read PROXY protocol headers from trusted peers.
    pub proxy_protocol: bool,
    /// Header naming the client behind a trusted proxy.
    pub client_ip_header: Option<http::HeaderName>,
    /// What the allow-list was built from, to rebuild it when `--allow-file` or the
    /// refreshed Exchange Online list changes.
    pub allow_source: std::sync::Arc<crate::allow::AllowSource>,
    /// Normalised path prefix: `/` or `/something` without a trailing slash.
    pub path_prefix: String,
    /// Largest accepted request body in bytes.
    pub max_body: u64,
    /// Concurrent client connections.
    pub max_connections: usize,
    /// Time limits.
    pub timeouts: Timeouts,
    /// Forward bodies that are not SendNotification messages.
    pub accept_any_body: bool,
    /// Silence after which a subscription is stale.
    pub stale_after: Duration,
    /// The embedded store's directory.
    pub state_dir: PathBuf,
    /// Managed mode, when configured.
    pub managed: Option<Managed>,
    /// Log format.
    pub log_format: LogFormat,
}

impl Config {
    /// Parse the process's command line and environment.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let managed = managed(&args, &normalise_prefix(&args.path_prefix)?)?;
        let listen = parse_socket_addr("--listen", &args.listen)?;
        let admin_listen = parse_socket_addr("--admin-listen", &args.admin_listen)?;
        let upstream = parse_upstream(&args.upstream)?;
        let tls = match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            (None, None) => {
                validate_hostname(&args.hostname)?;
                TlsSource::SelfSigned {
                    hostname: args.hostname,
                    dir: args.cert_dir,
                }
            }
            (Some(_), None) => {
                return Err(ConfigError::new("--tls-key", "required with --tls-cert"))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new("--tls-cert", "required with --tls-key"))
            }
        };
        let allow_source = std::sync::Arc::new(crate::allow::AllowSource {
            cidrs: args.allow.clone(),
            file: args.allow_file.clone(),
            presets: args.allow_preset.clone(),
            exchange_online: Default::default(),
        });
        let allow = allow_source.build().map_err(|e| match e {
            AllowListError::Cidr(m) => ConfigError::new("--allow", m),
            AllowListError::File(m) => ConfigError::new("--allow-file", m),
            AllowListError::Preset(m) => ConfigError::new("--allow-preset", m),
        })?;
        let path_prefix = normalise_prefix(&args.path_prefix)?;
        let trusted_proxies = trusted_proxies(&args.trusted_proxy)?;
        let refresh_ranges = if args.refresh_ranges {
            let url = parse_https_url("--ranges-url", &args.ranges_url, true)?;
            let microsoft = url.trim_end_matches('/') == crate::allow::ranges::DEFAULT_SERVICE;
            if microsoft && args.ranges_interval < crate::allow::ranges::MIN_INTERVAL_MICROSOFT {
                return Err(ConfigError::new(
                    "--ranges-interval",
                    "Microsoft asks clients to check at most hourly: use 1h or more",
                ));
            }
            if !allow_source.uses_exchange_online() {
                return Err(ConfigError::new(
                    "--refresh-ranges",
                    "refreshes the exchange-online preset, which is not in use (add --allow-preset exchange-online)",
                ));
            }
            Some((url, args.ranges_interval))
        } else {
            None
        };
        let client_ip_header = match &args.client_ip_header {
            None => None,
            Some(h) => Some(
                http::HeaderName::from_bytes(h.trim().as_bytes()).map_err(|_| {
                    ConfigError::new("--client-ip-header", format!("'{h}' is not a header name"))
                })?,
            ),
        };
        if (args.proxy_protocol || client_ip_header.is_some()) && trusted_proxies.is_none() {
            return Err(ConfigError::new(
                "--trusted-proxy",
                "--proxy-protocol and --client-ip-header need the proxies trusted to state the client address (e.g. --trusted-proxy cloudflare)",
            ));
        }
        if trusted_proxies.is_some() && !args.proxy_protocol && client_ip_header.is_none() {
            return Err(ConfigError::new(
                "--trusted-proxy",
                "only used with --proxy-protocol or --client-ip-header",
            ));
        }
        if args.max_body == 0 {
            return Err(ConfigError::new("--max-body", "must be at least 1 byte"));
        }
        if args.max_connections == 0 {
            return Err(ConfigError::new("--max-connections", "must be at least 1"));
        }
        Ok(Config {
            listen,
            admin_listen,
            upstream,
            tls,
            allow,
            trusted_proxies,
            refresh_ranges,
            proxy_protocol: args.proxy_protocol,
            client_ip_header,
            allow_source,
            path_prefix,
            max_body: args.max_body,
            max_connections: args.max_connections,
            timeouts: Timeouts {
                handshake: args.handshake_timeout,
                header: args.header_timeout,
                body: args.body_timeout,
                idle: args.idle_timeout,
                upstream_connect: args.upstream_connect_timeout,
                upstream: args.upstream_timeout,
                shutdown_grace: args.shutdown_grace,
            },
            accept_any_body: args.accept_any_body,
            stale_after: args.stale_after,
            state_dir: args.state_dir,
            managed,
            log_format: args.log_format,
        })
    }

    /// Parse a command line given as a list of words (the first is the program name); used by
    /// tests and by `main` alike, so both go through the same validation.
    pub fn parse_from<I, T>(words: I) -> Result<Self, CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args = Args::try_parse_from(words).map_err(CliError::Clap)?;
        Config::from_args(args).map_err(CliError::Config)
    }
}

/// Either clap's own error (unknown flag, unparsable value, `--help`) or a validation error.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// From clap: its message already names the flag.
    #[error("{0}")]
    Clap(clap::Error),
    /// From validation.
    #[error("{0}")]
    Config(ConfigError),
}

/// `--trusted-proxy` values: CIDRs and preset names; `None` when none are given.
fn trusted_proxies(values: &[String]) -> Result<Option<AllowList>, ConfigError> {
    if values.is_empty() {
        return Ok(None);
    }
    let (presets, cidrs): (Vec<String>, Vec<String>) = values
        .iter()
        .map(|v| v.trim().to_owned())
        .partition(|v| crate::allow::presets::by_name(v).is_some());
    // Never empty here, so `build` applies no default preset.
    AllowList::build(&cidrs, None, &presets)
        .map(Some)
        .map_err(|e| {
            ConfigError::new(
                "--trusted-proxy",
                format!("{e}; or a preset (cloudflare, exchange-online)"),
            )
        })
}

/// Every DistinguishedFolderIdNameType value in Microsoft's types.xsd.
const DISTINGUISHED_FOLDERS: &[&str] = &[
    "calendar",
    "contacts",
    "deleteditems",
    "drafts",
    "inbox",
    "journal",
    "notes",
    "outbox",
    "sentitems",
    "tasks",
    "msgfolderroot",
    "publicfoldersroot",
    "root",
    "junkemail",
    "searchfolders",
    "voicemail",
    "recoverableitemsroot",
    "recoverableitemsdeletions",
    "recoverableitemsversions",
    "recoverableitemspurges",
    "recoverableitemsdiscoveryholds",
    "archiveroot",
    "archivemsgfolderroot",
    "archivedeleteditems",
    "archiveinbox",
    "archiverecoverableitemsroot",
    "archiverecoverableitemsdeletions",
    "archiverecoverableitemsversions",
    "archiverecoverableitemspurges",
    "archiverecoverableitemsdiscoveryholds",
    "syncissues",
    "conflicts",
    "localfailures",
    "serverfailures",
    "recipientcache",
    "quickcontacts",
    "conversationhistory",
    "adminauditlogs",
    "todosearch",
    "mycontacts",
    "directory",
    "imcontactlist",
    "peopleconnect",
    "favorites",
    "mecontact",
    "personmetadata",
    "teamspaceactivity",
    "teamspacemessaging",
    "teamspaceworkitems",
    "scheduled",
    "orionnotes",
    "tagitems",
    "alltaggeditems",
    "externalcontacts",
    "teamchat",
    "teamchathistory",
    "yammerroot",
    "yammerinbound",
    "yammeroutbound",
    "yammerfeeds",
    "onedriveroot",
    "onedriverecylebin",
    "onedrivesystem",
    "onedrivevolume",
    "important",
    "starred",
    "archive",
];

/// Default event types: everything but FreeBusyChanged (noisy, rarely wanted) and Status
/// (never subscribable).
const DEFAULT_EVENT_TYPES: [ews::EventType; 6] = [
    ews::EventType::Copied,
    ews::EventType::Created,
    ews::EventType::Deleted,
    ews::EventType::Modified,
    ews::EventType::Moved,
    ews::EventType::NewMail,
];

/// Validate the managed-mode flags; `None` means passthrough mode.
fn managed(args: &Args, path_prefix: &str) -> Result<Option<Managed>, ConfigError> {
    let mut mailboxes = Vec::new();
    for m in &args.mailbox {
        mailboxes.push(parse_mailbox("--mailbox", m)?);
    }
    if let Some(path) = &args.mailboxes_file {
        read_mailboxes_file(path)?;
    }
    let have_mailboxes = !mailboxes.is_empty() || args.mailboxes_file.is_some();
    let endpoint = match (&args.ews_url, &args.autodiscover_url) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "--autodiscover-url",
                "give either --ews-url or --autodiscover-url, not both",
            ))
        }
        (Some(u), None) => EwsEndpoint::Direct(parse_https_url("--ews-url", u, true)?),
        (None, Some(u)) => {
            EwsEndpoint::Autodiscover(parse_https_url("--autodiscover-url", u, true)?)
        }
        (None, None) => {
            if have_mailboxes {
                return Err(ConfigError::new(
                    "--ews-url",
                    "mailboxes are given but no --ews-url or --autodiscover-url to subscribe them with",
                ));
            }
            if args.callback_url.is_some() {
                return Err(ConfigError::new(
                    "--callback-url",
                    "only used in managed mode: give --ews-url or --autodiscover-url and --mailbox too",
                ));
            }
            return Ok(None);
        }
    };
    if !have_mailboxes {
        return Err(ConfigError::new(
            "--mailbox",
            "managed mode needs at least one mailbox (--mailbox or --mailboxes-file)",
        ));
    }
    let callback_url = args.callback_url.as_deref().ok_or_else(|| {
        ConfigError::new(
            "--callback-url",
            "managed mode needs the public https URL Exchange calls back",
        )
    })?;
    let callback: Uri = callback_url.parse().map_err(|_| {
        ConfigError::new("--callback-url", format!("'{callback_url}' is not a URL"))
    })?;
    if callback.scheme() != Some(&Scheme::HTTPS) || callback.host().is_none() {
        return Err(ConfigError::new(
            "--callback-url",
            format!("'{callback_url}' must be an https:// URL with a host (the relay serves TLS)"),
        ));
    }
    if !under_prefix(callback.path(), path_prefix) {
        return Err(ConfigError::new(
            "--callback-url",
            format!(
                "path '{}' is not under --path-prefix {path_prefix}",
                callback.path()
            ),
        ));
    }
    if callback_url.len() >= ews::MAX_URL_LEN {
        return Err(ConfigError::new(
            "--callback-url",
            "longer than EWS accepts (2083 characters)",
        ));
    }
    let mut folders = Vec::new();
    for f in &args.folder {
        let f = f.trim().to_ascii_lowercase();
        if !DISTINGUISHED_FOLDERS.contains(&f.as_str()) {
            return Err(ConfigError::new(
                "--folder",
                format!("'{f}' is not a distinguished folder id (e.g. calendar, inbox, contacts)"),
            ));
        }
        if !folders.contains(&f) {
            folders.push(f);
        }
    }
    let event_types = match &args.event_types {
        None => DEFAULT_EVENT_TYPES.to_vec(),
        Some(list) => parse_event_types(list)?,
    };
    if !(1..=ews::MAX_STATUS_FREQUENCY).contains(&args.status_frequency) {
        return Err(ConfigError::new(
            "--status-frequency",
            "must be 1..1440 minutes",
        ));
    }
    let heartbeat_timeout = args
        .heartbeat_timeout
        .unwrap_or(Duration::from_secs(120 * u64::from(args.status_frequency)));
    let auth = match args.auth {
        AuthKind::None => Auth::None,
        AuthKind::Basic => {
            let username = args
                .username
                .clone()
                .ok_or_else(|| ConfigError::new("--username", "required with --auth basic"))?;
            let password = secret(
                "--password-file",
                args.password_file.as_deref(),
                "EWS_RELAY_PASSWORD",
            )?
            .ok_or_else(|| {
                ConfigError::new(
                    "--password-file",
                    "--auth basic needs the password in --password-file or EWS_RELAY_PASSWORD",
                )
            })?;
            Auth::Basic { username, password }
        }
        AuthKind::Oauth => {
            let client_id = args.client_id.clone().ok_or_else(|| {
                ConfigError::new("--client-id", "required with --auth oauth (the default)")
            })?;
            let token_url = match (&args.oauth_token_url, &args.tenant_id) {
                (Some(u), _) => parse_https_url("--oauth-token-url", u, true)?,
                (None, Some(t))
                    if !t.is_empty()
                        && t.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) =>
                {
                    format!("https://login.microsoftonline.com/{t}/oauth2/v2.0/token")
                }
                (None, Some(t)) => {
                    return Err(ConfigError::new(
                        "--tenant-id",
                        format!("'{t}' is not a tenant id or domain"),
                    ))
                }
                (None, None) => {
                    return Err(ConfigError::new(
                        "--tenant-id",
                        "required with --auth oauth (or give --oauth-token-url)",
                    ))
                }
            };
            let secret = secret(
                "--client-secret-file",
                args.client_secret_file.as_deref(),
                "EWS_RELAY_CLIENT_SECRET",
            )?
            .ok_or_else(|| {
                ConfigError::new(
                    "--client-secret-file",
                    "--auth oauth needs the client secret in --client-secret-file or EWS_RELAY_CLIENT_SECRET",
                )
            })?;
            Auth::OAuth {
                token_url,
                client_id,
                secret,
            }
        }
    };
    if let Some(ca) = &args.ews_ca_file {
        if !ca.is_file() {
            return Err(ConfigError::new(
                "--ews-ca-file",
                format!("{}: not a readable file", ca.display()),
            ));
        }
    }
    if args.max_concurrent_ews == 0 || args.max_concurrent_ews > 27 {
        return Err(ConfigError::new(
            "--max-concurrent-ews",
            "must be 1..27 (Exchange throttles at about 27 concurrent requests per account)",
        ));
    }
    Ok(Some(Managed {
        endpoint,
        mailboxes,
        mailboxes_file: args.mailboxes_file.clone(),
        callback_url: callback_url.to_owned(),
        folders,
        event_types,
        status_frequency: args.status_frequency,
        heartbeat_timeout,
        auth,
        ews_ca_file: args.ews_ca_file.clone(),
        max_concurrent_ews: args.max_concurrent_ews,
        trace_dir: args.trace_dir.clone(),
    }))
}

/// A secret from a file (first line, trailing newline removed) or, failing that, from an
/// environment variable; never from a flag, which would show in `ps`.
fn secret(
    flag: &'static str,
    file: Option<&std::path::Path>,
    env: &str,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(flag, format!("{}: {e}", path.display())))?;
        let value = text.trim_end_matches(['\r', '\n']).to_owned();
        if value.is_empty() {
            return Err(ConfigError::new(flag, format!("{}: empty", path.display())));
        }
        return Ok(Some(Secret::new(value)));
    }
    Ok(std::env::var(env)
        .ok()
        .filter(|v| !v.is_empty())
        .map(Secret::new))
}

/// An SMTP address, lower-cased (Exchange compares them case-insensitively).
pub fn parse_mailbox(flag: &'static str, value: &str) -> Result<String, ConfigError> {
    let v = value.trim();
    let ok = v.len() <= 320
        && v.split('@').count() == 2
        && v.split('@').all(|p| !p.is_empty())
        && !v.contains(|c: char| c.is_whitespace() || c.is_control() || "<>\"(),;:[]".contains(c));
    if ok {
        Ok(v.to_ascii_lowercase())
    } else {
        Err(ConfigError::new(
            flag,
            format!("'{value}' is not an SMTP address"),
        ))
    }
}

/// Mailboxes from a file: one per line, `#` comments, blank lines ignored, duplicates removed.
pub fn read_mailboxes_file(path: &std::path::Path) -> Result<Vec<String>, ConfigError> {
    const FLAG: &str = "--mailboxes-file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(FLAG, format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let m = parse_mailbox(FLAG, line).map_err(|e| {
            ConfigError::new(
                FLAG,
                format!("{}: line {}: {}", path.display(), i + 1, e.message),
            )
        })?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

fn parse_event_types(list: &str) -> Result<Vec<ews::EventType>, ConfigError> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let full = if name.ends_with("Event") {
            name.to_owned()
        } else {
            format!("{name}Event")
        };
        let t = ews::EventType::from_name(&full).ok_or_else(|| {
            ConfigError::new(
                "--event-types",
                format!("'{name}' is not an EWS event type (NewMailEvent, CreatedEvent, DeletedEvent, ModifiedEvent, MovedEvent, CopiedEvent, FreeBusyChangedEvent)"),
            )
        })?;
        if t == ews::EventType::Status {
            return Err(ConfigError::new(
                "--event-types",
                "StatusEvent cannot be subscribed to (keep-alives come anyway)",
            ));
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err(ConfigError::new("--event-types", "empty list"));
    }
    Ok(out)
}

/// An http(s) URL; plain http only for lab servers, with a warning.
fn parse_https_url(
    flag: &'static str,
    value: &str,
    allow_http: bool,
) -> Result<String, ConfigError> {
    let uri: Uri = value
        .parse()
        .map_err(|_| ConfigError::new(flag, format!("'{value}' is not a URL")))?;
    match uri.scheme() {
        Some(s) if *s == Scheme::HTTPS => {}
        Some(s) if *s == Scheme::HTTP && allow_http => {
            tracing::warn!("{flag} {value}: plain http sends credentials and mail data unencrypted; use it only for lab servers");
        }
        _ => {
            return Err(ConfigError::new(
                flag,
                format!("'{value}' must be an https:// URL"),
            ))
        }
    }
    if uri.host().is_none() {
        return Err(ConfigError::new(flag, format!("'{value}' has no host")));
    }
    Ok(value.to_owned())
}

fn parse_socket_addr(flag: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError::new(
            flag,
            format!("'{value}' is not an address:port (e.g. 0.0.0.0:443 or [::]:443)"),
        )
    })
}

fn parse_upstream(value: &str) -> Result<Upstream, ConfigError> {
    const FLAG: &str = "--upstream";
    let uri: Uri = value
        .parse()
        .map_err(|_| ConfigError::new(FLAG, format!("'{value}' is not a URL")))?;
    if uri.scheme() != Some(&Scheme::HTTP) {
        return Err(ConfigError::new(
            FLAG,
            format!("'{value}': only http:// receivers are supported (the relay terminates TLS)"),
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| ConfigError::new(FLAG, format!("'{value}' has no host")))?
        .clone();
    if authority.as_str().contains('@') {
        return Err(ConfigError::new(
            FLAG,
            "credentials in the URL are not supported",
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(ConfigError::new(
            FLAG,
            format!("'{value}': give only scheme, host and port; the request path is forwarded as received"),
        ));
    }
    let authority: Authority = if authority.port().is_some() {
        authority
    } else {
        format!("{}:80", authority.host())
            .parse()
            .map_err(|_| ConfigError::new(FLAG, format!("'{value}' has an invalid host")))?
    };
    let host_header = HeaderValue::from_str(authority.as_str())
        .map_err(|_| ConfigError::new(FLAG, format!("'{value}' has an invalid host")))?;
    Ok(Upstream {
        authority,
        host_header,
    })
}

fn validate_hostname(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && (name.parse::<std::net::IpAddr>().is_ok()
            || name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            }));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            "--hostname",
            format!("'{name}' is not a DNS name or IP address"),
        ))
    }
}

fn normalise_prefix(value: &str) -> Result<String, ConfigError> {
    if !value.starts_with('/') || value.contains(['?', '#', ' ']) {
        return Err(ConfigError::new(
            "--path-prefix",
            format!("'{value}' must be a path starting with '/' (e.g. /ews)"),
        ));
    }
    let trimmed = value.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    })
}

/// Parse `500ms`, `10s`, `2m`, `1h` (any humantime form); zero is refused because every
/// duration here is a limit that must be able to expire.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(value.trim())
        .map_err(|_| format!("'{value}' is not a duration (use e.g. 500ms, 10s, 2m)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}

/// Parse `4096`, `64KiB`, `4MiB`, `1GiB` (also `K`, `M`, `G` as the same binary multiples).
pub fn parse_size(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let err = || format!("'{value}' is not a size (use e.g. 4096, 64KiB, 4MiB)");
    let n: u64 = digits.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// Whether `path` is `prefix` or lies below it (`/ews` admits `/ews` and `/ews/x`, not `/ewsx`).
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("4MB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
    }

    #[test]
    fn prefixes() {
        assert_eq!(normalise_prefix("/").unwrap(), "/");
        assert_eq!(normalise_prefix("/ews/").unwrap(), "/ews");
        assert!(normalise_prefix("ews").is_err());
    }

    #[test]
    fn upstreams() {
        let u = parse_upstream("http://127.0.0.1:10002").unwrap();
        assert_eq!(u.authority.as_str(), "127.0.0.1:10002");
        let u = parse_upstream("http://receiver/").unwrap();
        assert_eq!(u.authority.as_str(), "receiver:80");
        assert!(parse_upstream("https://x:1").is_err());
        assert!(parse_upstream("http://x:1/path").is_err());
        assert!(parse_upstream("http://u:p@x:1").is_err());
    }

    #[test]
    fn defaults_parse() {
        let c = Config::parse_from(["ews-relay"]).unwrap();
        assert_eq!(c.listen.port(), 443);
        assert_eq!(c.max_body, 4 << 20);
        assert!(matches!(c.tls, TlsSource::SelfSigned { .. }));
        assert!(c.allow.describe().contains("exchange-online"));
    }

    #[test]
    fn bad_flag_names_itself() {
        let e = Config::parse_from(["ews-relay", "--upstream", "https://x"]).unwrap_err();
        assert!(e.to_string().contains("--upstream"), "{e}");
        let e = Config::parse_from(["ews-relay", "--max-body", "lots"]).unwrap_err();
        assert!(e.to_string().contains("--max-body"), "{e}");
        let e = Config::parse_from(["ews-relay", "--allow", "10.0.0.0/33"]).unwrap_err();
        assert!(e.to_string().contains("--allow"), "{e}");
    }

    /// A managed-mode command line; `extra` flag/value pairs replace the base ones.
    fn managed_args(extra: &[&str]) -> Result<Config, CliError> {
        let mut pairs: Vec<(&str, &str)> = vec![
            ("--ews-url", "https://ews.example.com/EWS/Exchange.asmx"),
            ("--mailbox", "Room1@Example.com"),
            ("--callback-url", "https://relay.example.com/ews/push"),
            ("--path-prefix", "/ews"),
            ("--auth", "none"),
        ];
        for kv in extra.chunks(2) {
            match pairs.iter_mut().find(|(k, _)| *k == kv[0]) {
                Some(p) => p.1 = kv[1],
                None => pairs.push((kv[0], kv[1])),
            }
        }
        let mut words = vec!["ews-relay"];
        for (k, v) in pairs {
            words.push(k);
            words.push(v);
        }
        Config::parse_from(words)
    }

    #[test]
    fn managed_mode_is_detected_and_validated() {
        let c = managed_args(&[]).unwrap();
        let m = c.managed.expect("managed");
        assert_eq!(m.mailboxes, vec!["room1@example.com"]);
        assert_eq!(m.heartbeat_timeout, Duration::from_secs(120));
        assert_eq!(m.event_types.len(), 6);
        assert!(m.folders.is_empty(), "all folders by default");
        let c = managed_args(&[
            "--status-frequency",
            "5",
            "--folder",
            "Calendar,inbox",
            "--event-types",
            "NewMail,CreatedEvent",
        ])
        .unwrap();
        let m = c.managed.unwrap();
        assert_eq!(m.heartbeat_timeout, Duration::from_secs(600));
        assert_eq!(m.folders, vec!["calendar", "inbox"]);
        assert_eq!(m.event_types.len(), 2);
        assert!(
            Config::parse_from(["ews-relay"]).unwrap().managed.is_none(),
            "passthrough by default"
        );
    }

    #[test]
    fn incomplete_or_contradictory_managed_flags_name_the_problem() {
        let cases: &[(&[&str], &str)] = &[
            (
                &[
                    "--autodiscover-url",
                    "https://a.example.com/autodiscover/autodiscover.svc",
                ],
                "not both",
            ),
            (
                &["--callback-url", "http://relay.example.com/ews/push"],
                "https://",
            ),
            (
                &["--callback-url", "https://relay.example.com/other"],
                "--path-prefix",
            ),
            (&["--folder", "kalender"], "--folder"),
            (&["--event-types", "StatusEvent"], "StatusEvent"),
            (&["--event-types", "Teleported"], "--event-types"),
            (&["--status-frequency", "0"], "1..1440"),
            (&["--status-frequency", "1441"], "1..1440"),
            (&["--max-concurrent-ews", "40"], "--max-concurrent-ews"),
            (&["--mailbox", "not-an-address"], "--mailbox"),
            (&["--auth", "basic"], "--username"),
            (&["--auth", "basic", "--username", "svc"], "--password-file"),
            (&["--auth", "oauth"], "--client-id"),
            (&["--auth", "oauth", "--client-id", "abc"], "--tenant-id"),
            (
                &[
                    "--auth",
                    "oauth",
                    "--client-id",
                    "abc",
                    "--tenant-id",
                    "contoso.onmicrosoft.com",
                    "--client-secret-file",
                    "/nonexistent",
                ],
                "--client-secret-file",
            ),
        ];
        for (extra, needle) in cases {
            let e = managed_args(extra).unwrap_err().to_string();
            assert!(e.contains(needle), "{extra:?}: {e}");
        }
        let e = Config::parse_from(["ews-relay", "--mailbox", "a@b.c"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--ews-url"), "{e}");
        let e = Config::parse_from([
            "ews-relay",
            "--ews-url",
            "https://x.example.com/EWS/Exchange.asmx",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--mailbox"), "{e}");
        let e = Config::parse_from([
            "ews-relay",
            "--ews-url",
            "https://x.example.com/EWS/Exchange.asmx",
            "--mailbox",
            "a@b.c",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--callback-url"), "{e}");
    }

    #[test]
    fn secrets_come_from_files_and_are_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "s3cr3t-value\n").unwrap();
        let c = managed_args(&[
            "--auth",
            "oauth",
            "--client-id",
            "app",
            "--tenant-id",
            "contoso.onmicrosoft.com",
            "--client-secret-file",
            f.to_str().unwrap(),
        ])
        .unwrap();
        let m = c.managed.clone().unwrap();
        match &m.auth {
            Auth::OAuth {
                token_url, secret, ..
            } => {
                assert_eq!(secret.expose(), "s3cr3t-value");
                assert_eq!(
                    token_url,
                    "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            !format!("{c:?}").contains("s3cr3t"),
            "Debug output redacts secrets"
        );
    }

    #[test]
    fn mailboxes_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("mailboxes.txt");
        std::fs::write(
            &f,
            "# rooms\nRoom1@Example.com\nroom1@example.com # dup\n\nroom2@example.com\n",
        )
        .unwrap();
        assert_eq!(
            read_mailboxes_file(&f).unwrap(),
            vec!["room1@example.com", "room2@example.com"]
        );
        std::fs::write(&f, "room1@example.com\nbroken\n").unwrap();
        let e = read_mailboxes_file(&f).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
