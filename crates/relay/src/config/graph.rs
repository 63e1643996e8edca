//! Microsoft Graph's flags → [`Graph`]: the path its notifications arrive under and, in managed
//! Graph mode, the resources the relay keeps subscribed and the URLs Graph calls back.

use std::path::PathBuf;

use super::parse::*;
use super::*;

/// Graph change notifications: their path and, when the relay owns the subscriptions, how.
#[derive(Debug, Clone)]
pub struct Graph {
    /// `--graph-path-prefix`, normalised like `--path-prefix`.
    pub path_prefix: String,
    /// Managed Graph mode, when `--graph-resource` (or its file) and `--graph-callback-url` are
    /// given.
    pub managed: Option<ManagedGraph>,
}

/// Managed Graph mode: the relay creates, renews and replaces the subscriptions itself.
#[derive(Debug, Clone)]
pub struct ManagedGraph {
    /// `--graph-url` without a trailing `/`.
    pub url: String,
    /// `--graph-resource`, normalised (no leading `/`).
    pub resources: Vec<String>,
    /// `--graph-resources-file`, re-read on change.
    pub resources_file: Option<PathBuf>,
    /// `--graph-change-types`, normalised (`created,updated,deleted`).
    pub change_types: String,
    /// `--graph-callback-url`.
    pub callback_url: String,
    /// `--graph-lifecycle-url`, or the callback URL.
    pub lifecycle_url: String,
    /// Credentials (`--auth` and its companions, shared with managed EWS).
    pub auth: Auth,
    /// `--ews-ca-file`: an extra CA for outbound HTTPS.
    pub ca_file: Option<PathBuf>,
    /// `--spool-max-bytes` and `--spool-max-age` (one spool for EWS and Graph).
    pub spool: SpoolLimits,
}

impl ManagedGraph {
    /// The resources from `--graph-resource` and `--graph-resources-file` now, sorted and
    /// without duplicates; `Err` when the file cannot be read or holds a bad line.
    pub fn configured_resources(&self) -> Result<Vec<String>, ConfigError> {
        let mut all = self.resources.clone();
        if let Some(path) = &self.resources_file {
            all.extend(read_resources_file(path)?);
        }
        all.sort();
        all.dedup();
        Ok(all)
    }
}

/// Validate the Graph flags; `None` when `--graph-path-prefix` is not given (and no other Graph
/// flag is).
pub(super) fn graph(args: &Args, ews_prefix: &str) -> Result<Option<Graph>, ConfigError> {
    let wants_managed = !args.graph_resource.is_empty()
        || args.graph_resources_file.is_some()
        || args.graph_callback_url.is_some()
        || args.graph_lifecycle_url.is_some();
    let Some(prefix) = &args.graph_path_prefix else {
        if wants_managed {
            return Err(ConfigError::new(
                "--graph-path-prefix",
                "managed Graph mode needs the path Graph's notifications arrive under (e.g. /graph)",
            ));
        }
        return Ok(None);
    };
    let path_prefix = normalise_prefix("--graph-path-prefix", prefix)?;
    // One request goes to one of the two: Graph's prefix must be a distinct, deeper path, so
    // that the EWS prefix (often `/`) keeps everything else.
    if path_prefix == "/" || under_prefix(ews_prefix, &path_prefix) {
        return Err(ConfigError::new(
            "--graph-path-prefix",
            format!(
                "'{path_prefix}' must be a path of its own, not '/' and not above --path-prefix {ews_prefix} (e.g. /graph)"
            ),
        ));
    }
    if let Some(cb) = &args.callback_url {
        if let Ok(uri) = cb.parse::<Uri>() {
            if under_prefix(uri.path(), &path_prefix) {
                return Err(ConfigError::new(
                    "--callback-url",
                    format!("EWS's callback is under --graph-path-prefix {path_prefix}: give it a path of its own"),
                ));
            }
        }
    }
    if !wants_managed {
        return Ok(Some(Graph {
            path_prefix,
            managed: None,
        }));
    }
    let mut resources = Vec::new();
    for r in &args.graph_resource {
        resources.push(parse_resource("--graph-resource", r)?);
    }
    if let Some(path) = &args.graph_resources_file {
        read_resources_file(path)?;
    }
    if resources.is_empty() && args.graph_resources_file.is_none() {
        return Err(ConfigError::new(
            "--graph-resource",
            "managed Graph mode needs at least one resource (--graph-resource or --graph-resources-file)",
        ));
    }
    let callback_url = args.graph_callback_url.as_deref().ok_or_else(|| {
        ConfigError::new(
            "--graph-callback-url",
            "managed Graph mode needs the public https URL Graph posts notifications to",
        )
    })?;
    let callback_url = graph_callback("--graph-callback-url", callback_url, &path_prefix)?;
    let lifecycle_url = match &args.graph_lifecycle_url {
        Some(u) => graph_callback("--graph-lifecycle-url", u, &path_prefix)?,
        None => callback_url.clone(),
    };
    let url = parse_https_url("--graph-url", &args.graph_url, true)?
        .trim_end_matches('/')
        .to_owned();
    let change_types = parse_change_types(&args.graph_change_types)?;
    if let Some(ca) = &args.ews_ca_file {
        if !ca.is_file() {
            return Err(ConfigError::new(
                "--ews-ca-file",
                format!("{}: not a readable file", ca.display()),
            ));
        }
    }
    if args.spool_max_bytes < args.max_body {
        return Err(ConfigError::new(
            "--spool-max-bytes",
            format!(
                "{} bytes is less than --max-body ({} bytes): one notification would not fit",
                args.spool_max_bytes, args.max_body
            ),
        ));
    }
    Ok(Some(Graph {
        path_prefix,
        managed: Some(ManagedGraph {
            url,
            resources,
            resources_file: args.graph_resources_file.clone(),
            change_types,
            callback_url,
            lifecycle_url,
            auth: auth(args)?,
            ca_file: args.ews_ca_file.clone(),
            spool: SpoolLimits {
                max_bytes: args.spool_max_bytes,
                max_age: args.spool_max_age,
            },
        }),
    }))
}

/// Longest callback URL: Graph's `notificationUrl` is a URL in a JSON string; 2048 is what
/// browsers and most proxies still carry, far above any real callback.
const MAX_CALLBACK_URL: usize = 2048;

/// A public https callback URL under `--graph-path-prefix`, without a query (the validation
/// handshake adds `?validationToken=`).
fn graph_callback(flag: &'static str, value: &str, prefix: &str) -> Result<String, ConfigError> {
    let uri: Uri = value
        .parse()
        .map_err(|_| ConfigError::new(flag, format!("'{value}' is not a URL")))?;
    if uri.scheme() != Some(&Scheme::HTTPS) || uri.host().is_none() {
        return Err(ConfigError::new(
            flag,
            format!("'{value}' must be an https:// URL with a host (Graph calls only https)"),
        ));
    }
    if uri.query().is_some() {
        return Err(ConfigError::new(
            flag,
            format!("'{value}' has a query; Graph adds its own (?validationToken=)"),
        ));
    }
    if !under_prefix(uri.path(), prefix) {
        return Err(ConfigError::new(
            flag,
            format!(
                "path '{}' is not under --graph-path-prefix {prefix}",
                uri.path()
            ),
        ));
    }
    if !plain_path(uri.path()) {
        return Err(ConfigError::new(
            flag,
            format!(
                "path '{}' has dot segments, path parameters or encoded separators, which the relay refuses",
                uri.path()
            ),
        ));
    }
    if value.len() > MAX_CALLBACK_URL {
        return Err(ConfigError::new(
            flag,
            format!("longer than {MAX_CALLBACK_URL} characters"),
        ));
    }
    Ok(value.to_owned())
}

/// The change types Graph knows for Outlook resources.
const CHANGE_TYPES: [&str; 3] = ["created", "updated", "deleted"];

/// `created,updated,deleted` in any order and case, without duplicates, in Graph's order.
fn parse_change_types(list: &str) -> Result<String, ConfigError> {
    let mut wanted = [false; CHANGE_TYPES.len()];
    for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let Some(i) = CHANGE_TYPES.iter().position(|c| c.eq_ignore_ascii_case(t)) else {
            return Err(ConfigError::new(
                "--graph-change-types",
                format!("'{t}' is not a change type (created, updated, deleted)"),
            ));
        };
        wanted[i] = true;
    }
    let out: Vec<&str> = CHANGE_TYPES
        .iter()
        .zip(wanted)
        .filter_map(|(t, w)| w.then_some(*t))
        .collect();
    if out.is_empty() {
        return Err(ConfigError::new("--graph-change-types", "empty list"));
    }
    Ok(out.join(","))
}

/// Longest resource path: Graph's resource paths are short (`users/{upn}/events`); a bound
/// keeps a bad file line from becoming a huge request.
const MAX_RESOURCE: usize = 1024;

/// A Graph resource path as Graph takes it in a subscription: relative, no query or fragment,
/// no spaces or control characters; a leading `/` is dropped.
pub fn parse_resource(flag: &'static str, value: &str) -> Result<String, ConfigError> {
    let v = value.trim().trim_start_matches('/');
    let problem = if v.is_empty() {
        Some("empty")
    } else if v.len() > MAX_RESOURCE {
        Some("longer than 1024 characters")
    } else if v.contains("://") {
        Some("a resource path (users/{id or upn}/events), not a URL")
    } else if v.contains(['?', '#']) {
        Some("a resource path without a query or fragment")
    } else if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("a resource path without spaces or control characters")
    } else {
        None
    };
    match problem {
        None => Ok(v.to_owned()),
        Some(p) => Err(ConfigError::new(
            flag,
            format!("'{value}' is not a Graph resource: {p}"),
        )),
    }
}

/// Resources from a file: one per line, `#` comments, blank lines ignored, duplicates removed.
pub fn read_resources_file(path: &std::path::Path) -> Result<Vec<String>, ConfigError> {
    super::managed::read_list_file("--graph-resources-file", path, parse_resource)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_types_are_normalised() {
        assert_eq!(
            parse_change_types("Deleted, created").unwrap(),
            "created,deleted"
        );
        assert_eq!(
            parse_change_types("created,created,updated").unwrap(),
            "created,updated"
        );
        assert_eq!(
            parse_change_types("created,moved").unwrap_err().flag,
            "--graph-change-types"
        );
        assert!(parse_change_types(" , ").is_err());
    }

    #[test]
    fn resources() {
        assert_eq!(
            parse_resource("--graph-resource", "/users/a@b.example/events").unwrap(),
            "users/a@b.example/events"
        );
        assert_eq!(
            parse_resource("--graph-resource", "users/x/mailFolders('inbox')/messages").unwrap(),
            "users/x/mailFolders('inbox')/messages"
        );
        for bad in [
            "",
            "/",
            "https://graph.microsoft.com/v1.0/users/x/events",
            "users/x/events?$top=1",
            "users/a b/events",
            "users/x/events#f",
        ] {
            assert!(parse_resource("--graph-resource", bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod flag_errors {
    use crate::config::{CliError, Config};

    /// The flag a Graph command line is refused for (each bad combination names its flag).
    fn refused(extra: &[&str]) -> &'static str {
        let mut words = vec!["ews-relay", "--auth", "none"];
        words.extend_from_slice(extra);
        match Config::parse_from(words) {
            Err(CliError::Config(e)) => e.flag,
            other => panic!("{extra:?} was not refused by validation: {other:?}"),
        }
    }

    const MANAGED: [&str; 6] = [
        "--graph-path-prefix",
        "/graph",
        "--graph-resource",
        "users/a@b.example/events",
        "--graph-callback-url",
        "https://relay.example/graph/notify",
    ];

    #[test]
    fn bad_graph_flags_are_refused_naming_the_flag() {
        let with = |more: &[&'static str]| -> Vec<&'static str> {
            let mut w = MANAGED.to_vec();
            w.extend_from_slice(more);
            w
        };
        assert!(
            Config::parse_from(["ews-relay", "--auth", "none"].into_iter().chain(MANAGED)).is_ok()
        );
        assert_eq!(
            refused(&["--graph-resource", "users/a@b.example/events"]),
            "--graph-path-prefix"
        );
        assert_eq!(
            refused(&["--graph-path-prefix", "/"]),
            "--graph-path-prefix"
        );
        assert_eq!(
            refused(&[
                "--path-prefix",
                "/graph/ews",
                "--graph-path-prefix",
                "/graph"
            ]),
            "--graph-path-prefix"
        );
        assert_eq!(
            refused(&[
                "--graph-path-prefix",
                "/graph",
                "--graph-resource",
                "users/a/events"
            ]),
            "--graph-callback-url"
        );
        assert_eq!(
            refused(&[
                "--graph-path-prefix",
                "/graph",
                "--graph-callback-url",
                "https://relay.example/graph/notify"
            ]),
            "--graph-resource"
        );
        let mut bad_url = MANAGED;
        bad_url[5] = "http://relay.example/graph/notify";
        assert_eq!(refused(&bad_url), "--graph-callback-url");
        bad_url[5] = "https://relay.example/ews/notify";
        assert_eq!(refused(&bad_url), "--graph-callback-url");
        bad_url[5] = "https://relay.example/graph/notify?x=1";
        assert_eq!(refused(&bad_url), "--graph-callback-url");
        bad_url[5] = "https://relay.example/graph/..;/notify";
        assert_eq!(refused(&bad_url), "--graph-callback-url");
        assert_eq!(
            refused(&with(&[
                "--graph-lifecycle-url",
                "https://relay.example/other"
            ])),
            "--graph-lifecycle-url"
        );
        assert_eq!(
            refused(&with(&["--graph-change-types", "created,moved"])),
            "--graph-change-types"
        );
        assert_eq!(refused(&with(&["--graph-url", "ftp://x"])), "--graph-url");
        assert_eq!(
            refused(&with(&[
                "--graph-resource",
                "https://graph.microsoft.com/v1.0/users"
            ])),
            "--graph-resource"
        );
        assert_eq!(
            refused(&with(&["--graph-resources-file", "/nonexistent/resources"])),
            "--graph-resources-file"
        );
    }
}
