//! Managed mode's flags → [`Managed`]: the EWS endpoint, credentials, mailboxes, folders and
//! event types, callback URL and timing.

use std::time::Duration;

use super::parse::*;
use super::*;

/// Every DistinguishedFolderIdNameType value in Microsoft's types.xsd.
pub(super) const DISTINGUISHED_FOLDERS: &[&str] = &[
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
pub(super) const DEFAULT_EVENT_TYPES: [ews::EventType; 6] = [
    ews::EventType::Copied,
    ews::EventType::Created,
    ews::EventType::Deleted,
    ews::EventType::Modified,
    ews::EventType::Moved,
    ews::EventType::NewMail,
];

/// Validate the managed-mode flags; `None` means passthrough mode.
pub(super) fn managed(args: &Args, path_prefix: &str) -> Result<Option<Managed>, ConfigError> {
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
    let callback_url =
        match args.transport {
            Transport::Push => Some(push_callback(args, path_prefix)?),
            Transport::Streaming if args.callback_url.is_some() => return Err(ConfigError::new(
                "--callback-url",
                "not used with --transport streaming (Exchange is not called back): leave it out",
            )),
            Transport::Streaming => None,
        };
    let stream = stream_timing(args)?;
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
    let auth = auth(args)?;
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
    // A notification the relay accepts (up to --max-body) must fit in an empty spool, or it
    // would be refused for ever while the receiver is down.
    if args.spool_max_bytes < args.max_body {
        return Err(ConfigError::new(
            "--spool-max-bytes",
            format!(
                "{} bytes is less than --max-body ({} bytes): one notification would not fit",
                args.spool_max_bytes, args.max_body
            ),
        ));
    }
    Ok(Some(Managed {
        endpoint,
        mailboxes,
        mailboxes_file: args.mailboxes_file.clone(),
        callback_url,
        transport: args.transport,
        stream,
        folders,
        event_types,
        status_frequency: args.status_frequency,
        heartbeat_timeout,
        auth,
        ews_ca_file: args.ews_ca_file.clone(),
        max_concurrent_ews: args.max_concurrent_ews,
        trace_dir: args.trace_dir.clone(),
        spool: SpoolLimits {
            max_bytes: args.spool_max_bytes,
            max_age: args.spool_max_age,
        },
    }))
}

/// `--callback-url`: a public https URL under `--path-prefix` that EWS accepts.
fn push_callback(args: &Args, path_prefix: &str) -> Result<String, ConfigError> {
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
    Ok(callback_url.to_owned())
}

/// The longest ConnectionTimeout EWS accepts for `GetStreamingEvents`, in minutes.
const MAX_STREAM_CONNECTION_TIMEOUT: u8 = 30;
/// Exchange writes keep-alive envelopes (`ConnectionStatus` `OK`) into an idle streaming
/// connection; Microsoft's EWS Managed API and its Java port expect one at least every 45 s
/// (their heartbeat frequency). 75 s leaves a margin over that; the period Exchange Online
/// uses is not documented, so the flag exists for a server that is quieter.
const DEFAULT_STREAM_SILENCE: Duration = Duration::from_secs(75);
/// The shortest silence window and renewal period accepted (shorter ones only churn).
const MIN_STREAM_PERIOD: Duration = Duration::from_secs(1);
/// A renewal opens the new connection at least this long before Exchange's timeout, so the
/// overlap has room to hand the subscriptions over.
const MIN_STREAM_OVERLAP: Duration = Duration::from_secs(10);

/// The streaming flags, checked against each other.
fn stream_timing(args: &Args) -> Result<StreamTiming, ConfigError> {
    let minutes = args.stream_connection_timeout;
    if !(1..=MAX_STREAM_CONNECTION_TIMEOUT).contains(&minutes) {
        return Err(ConfigError::new(
            "--stream-connection-timeout",
            "must be 1..30 minutes (EWS's ConnectionTimeout)",
        ));
    }
    let timeout = Duration::from_secs(60 * u64::from(minutes));
    let reconnect_after = match args.stream_reconnect_after {
        Some(d) if d + MIN_STREAM_OVERLAP > timeout => {
            return Err(ConfigError::new(
                "--stream-reconnect-after",
                format!(
                    "must be at least {}s shorter than --stream-connection-timeout ({minutes} min), or Exchange closes the connection before the new one has taken over",
                    MIN_STREAM_OVERLAP.as_secs()
                ),
            ))
        }
        Some(d) if d < MIN_STREAM_PERIOD => {
            return Err(ConfigError::new(
                "--stream-reconnect-after",
                "must be at least 1s",
            ))
        }
        Some(d) => d,
        None if minutes > 1 => timeout - Duration::from_secs(60),
        None => timeout - MIN_STREAM_OVERLAP,
    };
    let silence_timeout = args
        .stream_silence_timeout
        .unwrap_or(DEFAULT_STREAM_SILENCE);
    if silence_timeout < MIN_STREAM_PERIOD {
        return Err(ConfigError::new(
            "--stream-silence-timeout",
            "must be at least 1s",
        ));
    }
    Ok(StreamTiming {
        connection_timeout_minutes: minutes,
        reconnect_after,
        silence_timeout,
    })
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
    read_list_file("--mailboxes-file", path, parse_mailbox)
}

/// A file of one value per line (`#` comments, blank lines ignored, duplicates removed), each
/// checked by `parse`; an error names `flag`, the file and the line.
pub(super) fn read_list_file(
    flag: &'static str,
    path: &std::path::Path,
    parse: impl Fn(&'static str, &str) -> Result<String, ConfigError>,
) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(flag, format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let value = parse(flag, line).map_err(|e| {
            ConfigError::new(
                flag,
                format!("{}: line {}: {}", path.display(), i + 1, e.message),
            )
        })?;
        if !out.contains(&value) {
            out.push(value);
        }
    }
    Ok(out)
}
