//! The command line: every flag, its environment variable and its help text. Values are only
//! parsed here as far as clap types them; [`super::Config::from_args`] validates them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use super::parse::{parse_duration, parse_size};

/// Output format of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for container log collectors.
    Json,
}

/// Microsoft Graph v1.0, the default of `--graph-url`.
pub const DEFAULT_GRAPH_URL: &str = "https://graph.microsoft.com/v1.0";

/// Shown at the end of `--help`.
const AFTER_HELP: &str = "\
Allow-list: the union of every --allow, --allow-file and --allow-preset. With none of them the
exchange-online preset applies; --allow or --allow-file replace that default, so for
on-premises servers plus Exchange Online give both: --allow-preset exchange-online --allow CIDR.

Exit codes: 0 clean shutdown (SIGTERM/SIGINT), --help, --version; 1 start-up failed for another
reason than a flag's value (port taken or below 1024 without CAP_NET_BIND_SERVICE, state store
unusable or from a newer version); 64 a flag's value is wrong (the message names the flag).
Start-up errors go to stderr, once; logs go to stdout.";

/// ews-relay: a TLS edge for Exchange Web Services push notifications.
///
/// Accepts Exchange's HTTPS POSTs, admits only allowed source networks, and forwards each
/// notification in plain HTTP to the internal receiver.
#[derive(Debug, Parser)]
#[command(name = "ews-relay", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Args {
    /// TLS listener address (IPv4 or IPv6, e.g. `[::]:443`), or `none` (managed EWS mode with
    /// `--transport streaming` only: nothing listens for Exchange).
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

    /// Get the certificate from an ACME CA (Let's Encrypt by default) for this name, with the
    /// TLS-ALPN-01 challenge answered on --listen (repeatable; the first is the subject).
    #[arg(
        long,
        env = "EWS_RELAY_ACME_DOMAIN",
        value_name = "NAME",
        value_delimiter = ',',
        help_heading = "ACME certificates"
    )]
    pub acme_domain: Vec<String>,

    /// Contact address given to the ACME CA (expiry and policy mail).
    #[arg(
        long,
        env = "EWS_RELAY_ACME_EMAIL",
        value_name = "ADDRESS",
        help_heading = "ACME certificates"
    )]
    pub acme_email: Option<String>,

    /// ACME directory URL (Let's Encrypt staging:
    /// https://acme-staging-v02.api.letsencrypt.org/directory).
    #[arg(
        long,
        env = "EWS_RELAY_ACME_DIRECTORY",
        default_value = "https://acme-v02.api.letsencrypt.org/directory",
        value_name = "URL",
        help_heading = "ACME certificates"
    )]
    pub acme_directory: String,

    /// PEM CA certificate(s) to trust for the ACME server's HTTPS, besides the system's.
    #[arg(
        long,
        env = "EWS_RELAY_ACME_CA_FILE",
        value_name = "PATH",
        help_heading = "ACME certificates"
    )]
    pub acme_ca_file: Option<PathBuf>,

    /// External account binding key id, for CAs that require one.
    #[arg(
        long,
        env = "EWS_RELAY_ACME_EAB_KID",
        value_name = "KID",
        help_heading = "ACME certificates"
    )]
    pub acme_eab_kid: Option<String>,

    /// File holding the external account binding HMAC key (base64url, as CAs hand it out).
    #[arg(
        long,
        env = "EWS_RELAY_ACME_EAB_HMAC_FILE",
        value_name = "PATH",
        help_heading = "ACME certificates"
    )]
    pub acme_eab_hmac_file: Option<PathBuf>,

    /// Admitted source network (repeatable; IPv4 or IPv6 CIDR, or a single address). Replaces the
    /// exchange-online default: add --allow-preset exchange-online to keep it.
    #[arg(
        long,
        env = "EWS_RELAY_ALLOW",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub allow: Vec<String>,

    /// File with one admitted CIDR per line; `#` starts a comment. Replaces the exchange-online
    /// default, as --allow does.
    #[arg(long, env = "EWS_RELAY_ALLOW_FILE", value_name = "PATH")]
    pub allow_file: Option<PathBuf>,

    /// Built-in network list: `exchange-online` (the default when no --allow* flag is given),
    /// `microsoft-graph`, `cloudflare` (repeatable; added to --allow and --allow-file).
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

    /// Request body bytes buffered at once over all connections; a request that would go over
    /// gets 503 with Retry-After. Each request reserves its Content-Length (or --max-body when
    /// it declares none) from its head until it is answered. Default 64MiB, or --max-body if
    /// larger: 16 bodies at the default --max-body, thousands of notifications of a few KiB.
    #[arg(long, env = "EWS_RELAY_MAX_BODY_BUFFER", value_name = "BYTES", value_parser = parse_size)]
    pub max_body_buffer: Option<u64>,

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
    /// sends nothing is closed after the shorter of this and --idle-timeout). HTTP/2: the first
    /// head from the connection's start, later ones from their first frame's first byte.
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

    /// How managed EWS mode follows mailboxes: push (Exchange calls --callback-url) or
    /// streaming (the relay holds GetStreamingEvents connections open to Exchange; no inbound
    /// path needed).
    #[arg(
        long,
        env = "EWS_RELAY_TRANSPORT",
        default_value = "push",
        value_name = "push|streaming",
        help_heading = "Managed mode"
    )]
    pub transport: Transport,

    /// Streaming: the ConnectionTimeout asked of Exchange for each GetStreamingEvents
    /// connection, 1..30 minutes.
    #[arg(
        long,
        env = "EWS_RELAY_STREAM_CONNECTION_TIMEOUT",
        default_value_t = 30,
        value_name = "MIN",
        help_heading = "Managed mode"
    )]
    pub stream_connection_timeout: u8,

    /// Streaming: a group's connection is replaced by a new one (overlapping) after this long,
    /// before Exchange closes it (default: the connection timeout less one minute, or 90% of
    /// it); shorter values suit middleboxes that cut long connections.
    #[arg(long, env = "EWS_RELAY_STREAM_RECONNECT_AFTER", value_name = "DUR", value_parser = parse_duration, help_heading = "Managed mode")]
    pub stream_reconnect_after: Option<Duration>,

    /// Streaming: a connection with no event and no keep-alive for this long is taken as broken
    /// and replaced (default: Exchange's keep-alive period plus a margin).
    #[arg(long, env = "EWS_RELAY_STREAM_SILENCE_TIMEOUT", value_name = "DUR", value_parser = parse_duration, help_heading = "Managed mode")]
    pub stream_silence_timeout: Option<Duration>,

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

    /// OAuth: the application's certificate (PEM), as uploaded to its Entra ID registration;
    /// used instead of a client secret, with --client-certificate-key.
    #[arg(
        long,
        env = "EWS_RELAY_CLIENT_CERTIFICATE",
        value_name = "PATH",
        help_heading = "Managed mode"
    )]
    pub client_certificate: Option<PathBuf>,

    /// OAuth: the --client-certificate's RSA private key (PEM, PKCS#8 or PKCS#1).
    #[arg(
        long,
        env = "EWS_RELAY_CLIENT_CERTIFICATE_KEY",
        value_name = "PATH",
        help_heading = "Managed mode"
    )]
    pub client_certificate_key: Option<PathBuf>,

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

    /// Most body bytes the delivery spool holds (e.g. 512MiB, 2GiB); beyond it, notifications
    /// that need the spool are refused with 503 so Exchange retries them: never dropped.
    #[arg(
        long,
        env = "EWS_RELAY_SPOOL_MAX_BYTES",
        default_value = "1GiB",
        value_name = "BYTES",
        value_parser = parse_size,
        help_heading = "Managed mode"
    )]
    pub spool_max_bytes: u64,

    /// A mailbox whose oldest spooled notification is older than this has its new notifications
    /// refused with 503 until the backlog drains; spooled ones are never dropped.
    #[arg(
        long,
        env = "EWS_RELAY_SPOOL_MAX_AGE",
        default_value = "7d",
        value_name = "DUR",
        value_parser = parse_duration,
        help_heading = "Managed mode"
    )]
    pub spool_max_age: Duration,

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

    /// Requests under this path are Microsoft Graph change notifications (e.g. `/graph`): JSON
    /// bodies checked as such, and in managed Graph mode answered by the relay. Off without it.
    #[arg(
        long,
        env = "EWS_RELAY_GRAPH_PATH_PREFIX",
        value_name = "PATH",
        help_heading = "Microsoft Graph"
    )]
    pub graph_path_prefix: Option<String>,

    /// Microsoft Graph's base URL for managed Graph mode (`http://` only for lab servers and the
    /// simulator).
    #[arg(
        long,
        env = "EWS_RELAY_GRAPH_URL",
        default_value = DEFAULT_GRAPH_URL,
        value_name = "URL",
        help_heading = "Microsoft Graph"
    )]
    pub graph_url: String,

    /// A Graph resource the relay keeps subscribed (repeatable), e.g.
    /// `users/room-4.12@contoso.example/events`.
    #[arg(
        long,
        env = "EWS_RELAY_GRAPH_RESOURCE",
        value_name = "RESOURCE",
        value_delimiter = ',',
        help_heading = "Microsoft Graph"
    )]
    pub graph_resource: Vec<String>,

    /// File of Graph resources, one per line (`#` comments); re-read when it changes or on SIGHUP.
    #[arg(
        long,
        env = "EWS_RELAY_GRAPH_RESOURCES_FILE",
        value_name = "PATH",
        help_heading = "Microsoft Graph"
    )]
    pub graph_resources_file: Option<PathBuf>,

    /// Change types the Graph subscriptions ask for (comma-separated: created, updated, deleted).
    #[arg(
        long,
        env = "EWS_RELAY_GRAPH_CHANGE_TYPES",
        default_value = "created,updated,deleted",
        value_name = "LIST",
        help_heading = "Microsoft Graph"
    )]
    pub graph_change_types: String,

    /// The public https URL Graph posts notifications to; under --graph-path-prefix.
    #[arg(
        long,
        env = "EWS_RELAY_GRAPH_CALLBACK_URL",
        value_name = "URL",
        help_heading = "Microsoft Graph"
    )]
    pub graph_callback_url: Option<String>,

    /// The public https URL for lifecycle notifications (default: --graph-callback-url); under
    /// --graph-path-prefix.
    #[arg(
        long,
        env = "EWS_RELAY_GRAPH_LIFECYCLE_URL",
        value_name = "URL",
        help_heading = "Microsoft Graph"
    )]
    pub graph_lifecycle_url: Option<String>,

    /// Log format; filter with RUST_LOG (default `info`).
    #[arg(
        long,
        env = "EWS_RELAY_LOG_FORMAT",
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
}

/// How managed EWS mode hears of mailbox events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Transport {
    /// Push notifications: Exchange POSTs to `--callback-url`.
    #[default]
    Push,
    /// Streaming notifications: the relay holds `GetStreamingEvents` connections open.
    Streaming,
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
