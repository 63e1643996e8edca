//! Value parsers shared by the flags: durations, sizes, URLs, addresses, host names, prefixes.

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};

use super::{ConfigError, Upstream};

pub(super) fn parse_event_types(list: &str) -> Result<Vec<ews::EventType>, ConfigError> {
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
pub(super) fn parse_https_url(
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

pub(super) fn parse_socket_addr(
    flag: &'static str,
    value: &str,
) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError::new(
            flag,
            format!("'{value}' is not an address:port (e.g. 0.0.0.0:443 or [::]:443)"),
        )
    })
}

pub(super) fn parse_upstream(value: &str) -> Result<Upstream, ConfigError> {
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

pub(super) fn validate_hostname(name: &str) -> Result<(), ConfigError> {
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

pub(super) fn normalise_prefix(flag: &'static str, value: &str) -> Result<String, ConfigError> {
    if !value.starts_with('/') || value.contains(['?', '#', ' ']) {
        return Err(ConfigError::new(
            flag,
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

/// Whether `path` has no `.` or `..` segment (also percent-encoded), no encoded `/` or `\\`, no
/// `\\` and no path parameter (`;`, also encoded): so the prefix check sees the path every
/// receiver would see.
///
/// Path parameters are refused wherever they are: servlet containers (Tomcat, Jetty) strip
/// `;...` from each segment before resolving dot segments, so `/ews/..;/admin` is `/admin` to
/// them, and `/ews/notify;x` another resource than the one the prefix names. EWS callback URLs
/// carry none (Exchange posts to the URL a subscription gave, which the relay's operator
/// chooses).
pub fn plain_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    if !bytes
        .iter()
        .any(|&b| matches!(b, b'.' | b'%' | b'\\' | b';'))
    {
        return true; // the usual case, in one pass
    }
    if bytes.contains(&b'\\') || bytes.contains(&b';') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%3b") {
        return false;
    }
    !lower
        .split('/')
        .map(|segment| segment.replace("%2e", "."))
        .any(|segment| segment == "." || segment == "..")
}
