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

use crate::filter::{AllowList, AllowListError};

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

    /// Time allowed to receive a request's head (on HTTP/1.1 keep-alive this includes the
    /// wait for the next request).
    #[arg(long, env = "EWS_RELAY_HEADER_TIMEOUT", default_value = "30s", value_name = "DUR", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Time allowed to receive a request's whole body once its head has arrived.
    #[arg(long, env = "EWS_RELAY_BODY_TIMEOUT", default_value = "30s", value_name = "DUR", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// A client connection with no bytes moving either way for this long is closed.
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

    /// Log format; filter with RUST_LOG (default `info`).
    #[arg(
        long,
        env = "EWS_RELAY_LOG_FORMAT",
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
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
    /// Log format.
    pub log_format: LogFormat,
}

impl Config {
    /// Parse the process's command line and environment.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
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
        let allow = AllowList::build(&args.allow, args.allow_file.as_deref(), &args.allow_preset)
            .map_err(|e| match e {
            AllowListError::Cidr(m) => ConfigError::new("--allow", m),
            AllowListError::File(m) => ConfigError::new("--allow-file", m),
            AllowListError::Preset(m) => ConfigError::new("--allow-preset", m),
        })?;
        let path_prefix = normalise_prefix(&args.path_prefix)?;
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
}
