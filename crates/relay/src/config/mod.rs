//! Command line → validated, immutable runtime [`Config`].
//!
//! Every flag is also read from `EWS_RELAY_<FLAG>`; every value is parsed once here, so the rest
//! of the relay works with typed values and a bad value stops start-up with a message that names
//! the flag (exit code 64, see `main.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};

use crate::allow::{AllowList, AllowListError};

mod acme;
mod args;
mod auth;
mod graph;
mod managed;
mod parse;

pub use acme::{Acme, EabKey};
pub use args::{Args, AuthKind, LogFormat, Transport};
use auth::auth;
pub use auth::{ClientCertificate, ClientCredential};
use graph::graph;
pub use graph::{read_resources_file, Graph, ManagedGraph};
use managed::managed;
pub use managed::{parse_mailbox, read_mailboxes_file};
use parse::*;
pub use parse::{parse_duration, parse_size, plain_path, under_prefix};

/// `--max-body-buffer` when not given (or `--max-body`, if larger): 64 MiB holds 16 bodies of
/// the default `--max-body` (4 MiB) at once, or thousands of notifications of a few KiB (their
/// usual size), and is small next to the memory of the smallest machine a relay runs on. A
/// burst of slow large bodies then costs at most this much, not `--max-body` × connections
/// (16 GiB at the defaults).
const DEFAULT_MAX_BODY_BUFFER: u64 = 64 << 20;

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
        /// Client secret or certificate.
        credential: ClientCredential,
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
    /// The public callback URL (push); `None` with streaming.
    pub callback_url: Option<String>,
    /// Push or streaming.
    pub transport: Transport,
    /// Streaming's connection timing (used with `--transport streaming`).
    pub stream: StreamTiming,
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
    /// `--spool-max-bytes` and `--spool-max-age`.
    pub spool: SpoolLimits,
}

/// Streaming connections' timing.
#[derive(Debug, Clone, Copy)]
pub struct StreamTiming {
    /// `--stream-connection-timeout`: the `ConnectionTimeout` asked for, minutes.
    pub connection_timeout_minutes: u8,
    /// `--stream-reconnect-after`: when a connection is replaced by an overlapping new one.
    pub reconnect_after: Duration,
    /// `--stream-silence-timeout`: silence after which a connection is taken as broken.
    pub silence_timeout: Duration,
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
    /// TLS listener; `None` with `--listen none` (managed EWS streaming only: nothing
    /// listens for Exchange).
    pub listen: Option<SocketAddr>,
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
    /// `--max-body-buffer`: request body bytes buffered at once over all connections.
    pub max_body_buffer: u64,
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
    /// Microsoft Graph change notifications, when `--graph-path-prefix` is given.
    pub graph: Option<Graph>,
    /// Log format.
    pub log_format: LogFormat,
    /// `--acme-domain`: the certificate comes from an ACME CA (the self-signed one in `tls`
    /// serves until it is issued).
    pub acme: Option<Acme>,
}

impl Config {
    /// Parse the process's command line and environment.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let ews_prefix = normalise_prefix("--path-prefix", &args.path_prefix)?;
        let managed = managed(&args, &ews_prefix)?;
        let graph = graph(&args, &ews_prefix)?;
        let listen = listen(&args, managed.as_ref(), graph.is_some())?;
        let admin_listen = parse_socket_addr("--admin-listen", &args.admin_listen)?;
        let upstream = parse_upstream(&args.upstream)?;
        let acme = acme::acme(&args)?;
        let tls = match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            (None, None) => {
                validate_hostname(&args.hostname)?;
                TlsSource::SelfSigned {
                    // Until the CA issues, the placeholder names the host it will be for.
                    hostname: acme
                        .as_ref()
                        .map_or(args.hostname, |a| a.domains[0].clone()),
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
        if let Some(host) = managed.as_ref().and_then(exchange_online_host) {
            if !allow_source.uses_exchange_online() {
                tracing::warn!(
                    "managed mode subscribes at Exchange Online ({host}), whose callbacks come from Exchange Online's networks, but the allow-list does not admit them: add --allow-preset exchange-online (unless a load balancer in front hides the client addresses and --allow names it)"
                );
            }
        }
        let graph_host = graph
            .as_ref()
            .and_then(|g| g.managed.as_ref())
            .and_then(|m| m.url.parse::<Uri>().ok())
            .and_then(|u| u.host().map(str::to_ascii_lowercase));
        if let Some(host) = graph_host.filter(|h| h == "graph.microsoft.com") {
            if !allow_source.uses_microsoft_graph() {
                tracing::warn!(
                    "managed Graph mode subscribes at {host}, whose notifications come from Microsoft Graph's networks, but the allow-list does not admit them: add --allow-preset microsoft-graph (unless a load balancer in front hides the client addresses and --allow names it)"
                );
            }
        }
        let path_prefix = normalise_prefix("--path-prefix", &args.path_prefix)?;
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
        let max_body_buffer = match args.max_body_buffer {
            Some(n) if n < args.max_body => {
                return Err(ConfigError::new(
                    "--max-body-buffer",
                    format!(
                        "must be at least --max-body ({} bytes), or no body of that size could ever be admitted",
                        args.max_body
                    ),
                ))
            }
            Some(n) => n,
            None => DEFAULT_MAX_BODY_BUFFER.max(args.max_body),
        };
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
            max_body_buffer,
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
            graph,
            log_format: args.log_format,
            acme,
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

/// The host of a managed-mode endpoint in Exchange Online (`outlook.office365.com`,
/// `autodiscover-s.outlook.com`, …), whose callbacks come from the `exchange-online` networks.
fn exchange_online_host(m: &Managed) -> Option<String> {
    let url = match &m.endpoint {
        EwsEndpoint::Direct(u) | EwsEndpoint::Autodiscover(u) => u,
    };
    let host = url.parse::<Uri>().ok()?.host()?.to_ascii_lowercase();
    let online = ["office365.com", "outlook.com", "office.com"]
        .iter()
        .any(|d| host == *d || host.ends_with(&format!(".{d}")));
    online.then_some(host)
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

/// Default `--spool-max-bytes`: 1 GiB of notification bodies, about 250 000 typical 4 KB
/// notifications (hours of a busy tenant's traffic), small enough for a modest VM's disk. The
/// redb file needs somewhat more than the bodies (keys, pages, copy-on-write).
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
/// Default `--spool-max-age`: a week covers a receiver down over a long weekend, and is well
/// inside the ~30 days Exchange keeps a watermark resumable, so refusing after it still lets the
/// keeper's resubscribe bring the rest once the backlog has drained.
pub const DEFAULT_SPOOL_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How much the spool may hold before notifications are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Body bytes of all waiting notifications together (`--spool-max-bytes`).
    pub max_bytes: u64,
    /// Age of a mailbox's oldest waiting notification (`--spool-max-age`).
    pub max_age: Duration,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            max_age: DEFAULT_SPOOL_MAX_AGE,
        }
    }
}

/// `--listen`: an address, or `none` when nothing needs to reach the relay: managed EWS mode
/// with `--transport streaming`, no Graph and no ACME (both need Microsoft or the CA to call in).
fn listen(
    args: &Args,
    managed: Option<&Managed>,
    graph: bool,
) -> Result<Option<SocketAddr>, ConfigError> {
    if !args.listen.trim().eq_ignore_ascii_case("none") {
        return parse_socket_addr("--listen", &args.listen).map(Some);
    }
    let streaming = managed.is_some_and(|m| m.transport == Transport::Streaming);
    if !streaming {
        return Err(ConfigError::new(
            "--listen",
            "'none' only with managed EWS mode and --transport streaming (push and passthrough need Exchange to reach the relay)",
        ));
    }
    if graph {
        return Err(ConfigError::new(
            "--listen",
            "'none' leaves Microsoft Graph no way to deliver: give an address, or leave out the --graph-* flags",
        ));
    }
    if !args.acme_domain.is_empty() {
        return Err(ConfigError::new(
            "--listen",
            "'none' leaves the ACME CA no port to check --acme-domain on: give an address, or leave out --acme-domain",
        ));
    }
    Ok(None)
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
        assert_eq!(normalise_prefix("--path-prefix", "/").unwrap(), "/");
        assert_eq!(normalise_prefix("--path-prefix", "/ews/").unwrap(), "/ews");
        assert!(normalise_prefix("--path-prefix", "ews").is_err());
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
        assert_eq!(c.listen.map(|l| l.port()), Some(443));
        assert_eq!(c.max_body, 4 << 20);
        assert!(matches!(c.tls, TlsSource::SelfSigned { .. }));
        assert!(c.allow.describe().contains("exchange-online"));
    }

    const STREAMING: [&str; 9] = [
        "ews-relay",
        "--ews-url",
        "http://127.0.0.1:1/EWS/Exchange.asmx",
        "--mailbox",
        "a@contoso.example",
        "--auth",
        "none",
        "--transport",
        "streaming",
    ];

    #[test]
    fn streaming_needs_no_callback_and_may_listen_nowhere() {
        let mut words = STREAMING.to_vec();
        words.extend(["--listen", "none"]);
        let c = Config::parse_from(words).unwrap();
        assert_eq!(c.listen, None);
        let m = c.managed.unwrap();
        assert_eq!(m.transport, Transport::Streaming);
        assert_eq!(m.callback_url, None);
        // Defaults: 30 min asked, renewed a minute before, silence after 75 s.
        assert_eq!(m.stream.connection_timeout_minutes, 30);
        assert_eq!(m.stream.reconnect_after, Duration::from_secs(29 * 60));
        assert_eq!(m.stream.silence_timeout, Duration::from_secs(75));
        // With a listener, pushes are still served beside the streams.
        let c = Config::parse_from(STREAMING).unwrap();
        assert!(c.listen.is_some());
    }

    #[test]
    fn streaming_timing_flags() {
        let mut words = STREAMING.to_vec();
        words.extend([
            "--stream-connection-timeout",
            "1",
            "--stream-silence-timeout",
            "5s",
        ]);
        let m = Config::parse_from(words).unwrap().managed.unwrap();
        assert_eq!(m.stream.reconnect_after, Duration::from_secs(50));
        assert_eq!(m.stream.silence_timeout, Duration::from_secs(5));
        let mut words = STREAMING.to_vec();
        words.extend(["--stream-reconnect-after", "10s"]);
        let m = Config::parse_from(words).unwrap().managed.unwrap();
        assert_eq!(m.stream.reconnect_after, Duration::from_secs(10));
        // Too short to be useful, or too late for an overlap before Exchange's timeout.
        for (extra, flag) in [
            (
                ["--stream-silence-timeout", "500ms"],
                "--stream-silence-timeout",
            ),
            (
                ["--stream-reconnect-after", "500ms"],
                "--stream-reconnect-after",
            ),
            (
                ["--stream-reconnect-after", "51s"],
                "--stream-reconnect-after",
            ),
        ] {
            let mut words = STREAMING.to_vec();
            words.extend(["--stream-connection-timeout", "1"]);
            words.extend(extra);
            match Config::parse_from(words).unwrap_err() {
                CliError::Config(e) => assert_eq!(e.flag, flag, "{extra:?}: {e}"),
                e => panic!("{extra:?}: {e}"),
            }
        }
    }

    #[test]
    fn listen_none_is_refused_where_something_must_reach_the_relay() {
        for extra in [
            vec![],
            vec![
                "--ews-url",
                "http://x/EWS/Exchange.asmx",
                "--mailbox",
                "a@b.example",
                "--auth",
                "none",
                "--callback-url",
                "https://relay.example/ews/x",
            ],
        ] {
            let mut words = vec!["ews-relay", "--listen", "none"];
            words.extend(extra);
            let e = Config::parse_from(words).unwrap_err();
            assert!(e.to_string().contains("--listen"), "{e}");
        }
        let mut words = STREAMING.to_vec();
        words.extend(["--listen", "none", "--graph-path-prefix", "/graph"]);
        let e = Config::parse_from(words).unwrap_err();
        assert!(e.to_string().contains("--listen"), "{e}");
    }

    #[test]
    fn body_buffer() {
        let c = Config::parse_from(["ews-relay"]).unwrap();
        assert_eq!(c.max_body_buffer, 64 << 20);
        // A --max-body above the default budget raises it: one such body must fit.
        let c = Config::parse_from(["ews-relay", "--max-body", "100MiB"]).unwrap();
        assert_eq!(c.max_body_buffer, 100 << 20);
        let c = Config::parse_from(["ews-relay", "--max-body-buffer", "4MiB"]).unwrap();
        assert_eq!(c.max_body_buffer, 4 << 20);
        let e = Config::parse_from(["ews-relay", "--max-body-buffer", "1MiB"]).unwrap_err();
        assert!(e.to_string().contains("--max-body-buffer"), "{e}");
        let e = Config::parse_from(["ews-relay", "--max-body-buffer", "lots"]).unwrap_err();
        assert!(e.to_string().contains("--max-body-buffer"), "{e}");
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
    fn exchange_online_endpoints_are_recognised() {
        let host = |url: &str| {
            let c = managed_args(&["--ews-url", url]).unwrap();
            exchange_online_host(c.managed.as_ref().unwrap())
        };
        assert_eq!(
            host("https://outlook.office365.com/EWS/Exchange.asmx").as_deref(),
            Some("outlook.office365.com")
        );
        assert_eq!(host("https://mail.contoso.com/EWS/Exchange.asmx"), None);
        assert_eq!(host("https://notoutlook.com/EWS/Exchange.asmx"), None);
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
                token_url,
                credential: ClientCredential::Secret(secret),
                ..
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
    fn spool_limits_default_and_are_validated() {
        let m = managed_args(&[]).unwrap().managed.unwrap();
        assert_eq!(m.spool, SpoolLimits::default());
        let m = managed_args(&[
            "--spool-max-bytes",
            "64KiB",
            "--max-body",
            "64KiB",
            "--spool-max-age",
            "2h",
        ])
        .unwrap()
        .managed
        .unwrap();
        assert_eq!(m.spool.max_bytes, 64 << 10);
        assert_eq!(m.spool.max_age, Duration::from_secs(7200));
        let e = managed_args(&["--spool-max-bytes", "1KiB"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--spool-max-bytes") && e.contains("--max-body"),
            "{e}"
        );
        let e = managed_args(&["--spool-max-age", "0s"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--spool-max-age"), "{e}");
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
