//! Subscriptions: the bodies the relay sends to create and renew one, Graph's answers and
//! refusals, how long a subscription may live, and checks on configured resource paths.

use crate::notification::ParseError;
use crate::time::{format_time, parse_time};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::{Duration, SystemTime};

/// Shortest lifetime worth asking for: Graph raises an `expirationDateTime` under 45 minutes
/// from the request to 45 minutes (`subscription` resource type, `expirationDateTime`).
pub const MIN_LIFETIME: Duration = Duration::from_secs(45 * 60);

/// The change types an Outlook subscription can ask for (comma-separated in `changeType`).
pub const CHANGE_TYPES: [&str; 3] = ["created", "updated", "deleted"];

/// Longest resource path accepted from configuration. Graph documents no limit; real paths
/// (`users/{upn}/mailFolders('{id}')/messages`) stay well under 300 bytes, and a bound keeps a
/// mistyped value from reaching logs and requests whole.
pub const MAX_RESOURCE_LEN: usize = 1024;

/// How far under Microsoft's stated maximum the relay asks: Graph checks the expiration against
/// its own clock when the request arrives, so asking for exactly the maximum can be refused.
const MARGIN_MINUTES: u64 = 10;

/// `POST /subscriptions` body.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSubscription<'a> {
    /// Comma-separated subset of [`CHANGE_TYPES`].
    pub change_type: &'a str,
    /// Where Graph POSTs notifications (https).
    pub notification_url: &'a str,
    /// Where Graph POSTs lifecycle notifications (https); cannot be added later.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle_notification_url: Option<&'a str>,
    /// The watched resource, relative to Graph's base URL.
    pub resource: &'a str,
    /// When the subscription ends; at most [`max_lifetime`] away.
    #[serde(serialize_with = "serialize_time")]
    pub expiration_date_time: SystemTime,
    /// The secret Graph echoes in every notification; at most
    /// [`MAX_CLIENT_STATE`](crate::MAX_CLIENT_STATE) characters.
    pub client_state: &'a str,
}

/// `PATCH /subscriptions/{id}` body: renewal.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Renewal {
    /// The new end of the subscription.
    #[serde(serialize_with = "serialize_time")]
    pub expiration_date_time: SystemTime,
}

/// A subscription as Graph returns it (create, get, renew). Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    /// Graph's identifier; notifications carry it as `subscriptionId`.
    pub id: String,
    /// The watched resource.
    pub resource: Option<String>,
    /// The change types, comma-separated.
    pub change_type: Option<String>,
    /// Where notifications go.
    pub notification_url: Option<String>,
    /// Where lifecycle notifications go.
    pub lifecycle_notification_url: Option<String>,
    /// When it ends, as Graph granted it.
    #[serde(deserialize_with = "deserialize_time")]
    pub expiration_date_time: SystemTime,
    /// The secret (Graph returns it on create; may be null elsewhere).
    pub client_state: Option<String>,
}

fn serialize_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*t))
}

fn deserialize_time<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    parse_time(&s).ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {s:?}")))
}

/// Graph's answer to create, get or renew.
pub fn parse_subscription(body: &[u8]) -> Result<Subscription, ParseError> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ParseError::NotASubscription(e.to_string())
        } else {
            ParseError::not_json(&e)
        }
    })
}

/// The `error` object of a Graph refusal.
#[derive(Debug, Clone)]
pub struct ErrorBody {
    /// Graph's code, e.g. "InvalidRequest", "ExtensionError", "ResourceNotFound".
    pub code: String,
    /// The human-readable message, e.g. "Subscription expiration can only be 10070 minutes in
    /// the future."
    pub message: String,
}

/// Graph's `{"error": {"code", "message", "innerError"...}}`; None if the body is not that.
pub fn parse_error(body: &[u8]) -> Option<ErrorBody> {
    #[derive(Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        code: String,
        #[serde(default)]
        message: String,
    }
    let e: Envelope = serde_json::from_slice(body).ok()?;
    Some(ErrorBody {
        code: e.error.code,
        message: e.error.message,
    })
}

/// The longest lifetime Graph states in a refusal, in minutes. Wordings seen from Graph:
/// "Subscription expiration can only be 4230 minutes in the future." (code `ExtensionError` or
/// `InvalidRequest`), and the same with other numbers (10070, 43200, 60). Any message that talks
/// about expiration and names a number of minutes is read the same way, so a reworded refusal
/// still yields its limit.
pub fn max_minutes_in_error(message: &str) -> Option<u64> {
    let lower = message.to_ascii_lowercase();
    if !lower.contains("expir") {
        return None;
    }
    let bytes = lower.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b',') {
            i += 1;
        }
        let rest = lower[i..].trim_start();
        if rest.starts_with("minute") && (start == 0 || !bytes[start - 1].is_ascii_alphanumeric()) {
            let digits: String = lower[start..i].chars().filter(|c| *c != ',').collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

/// The kinds of resource with a documented lifetime ("Subscription lifetime" table of the
/// `subscription` resource type and "Change notifications overview", checked December 2026),
/// as (maximum minutes, what the path looks like). Subscriptions with resource data
/// (`includeResourceData`) have shorter limits (Outlook: 1440 minutes); the relay does not use
/// them.
const LIFETIMES: &[(u64, &str)] = &[
    (10080, "Outlook message, event, contact"),
    (42300, "OneDrive driveItem, SharePoint list"),
    (41760, "user, group, other directory resources"),
    (43200, "security alert"),
    (60, "presence, Teams chatMessage"),
    (
        4230,
        "group conversation, callRecord, printer, todoTask, others",
    ),
];

/// Minutes to assume for resources not in the table: the smallest multi-day maximum Microsoft
/// documents, so an unknown resource is not refused for asking too much.
const DEFAULT_MAX_MINUTES: u64 = 4230;

/// The longest expiration to ask for `resource`, just under Microsoft's documented maximum
/// (e.g. Outlook messages, events, contacts: 10080 minutes, ask 10070), with a conservative
/// default (4230 minutes, ask 4220) for unknown kinds.
pub fn max_lifetime(resource: &str) -> Duration {
    let minutes = documented_max_minutes(resource).saturating_sub(MARGIN_MINUTES);
    Duration::from_secs(minutes * 60).max(MIN_LIFETIME)
}

/// Microsoft's documented maximum for the kind of `resource`, in minutes.
pub fn documented_max_minutes(resource: &str) -> u64 {
    let path = normalise_resource(resource).to_ascii_lowercase();
    // Segment names without key predicates: `mailFolders('inbox')` → `mailfolders`.
    let segments: Vec<&str> = path
        .split('/')
        .map(|s| s.split('(').next().unwrap_or(s))
        .filter(|s| !s.is_empty())
        .collect();
    let first = segments.first().copied().unwrap_or("");
    let last = segments.last().copied().unwrap_or("");
    let has = |name: &str| segments.contains(&name);
    let table = |kind: &str| {
        LIFETIMES
            .iter()
            .find(|(_, k)| k.starts_with(kind))
            .map_or(DEFAULT_MAX_MINUTES, |(m, _)| *m)
    };
    if has("presence") || has("presences") || first == "chats" || first == "teams" || has("chats") {
        return table("presence");
    }
    if first == "security" {
        return table("security");
    }
    if has("conversations") || has("threads") || first == "communications" || first == "print" {
        return DEFAULT_MAX_MINUTES;
    }
    if has("todo") {
        return DEFAULT_MAX_MINUTES;
    }
    if matches!(last, "messages" | "events" | "contacts")
        && matches!(first, "users" | "me" | "groups")
    {
        return table("Outlook");
    }
    if has("drive") || has("drives") || (first == "sites" && has("lists")) {
        return table("OneDrive");
    }
    if matches!(first, "users" | "groups") && segments.len() <= 2 {
        return table("user");
    }
    if matches!(
        first,
        "directoryobjects" | "contacts" | "organization" | "serviceprincipals" | "applications"
    ) && segments.len() <= 2
    {
        return table("user");
    }
    DEFAULT_MAX_MINUTES
}

/// The mailbox a resource path names: `users/{id or upn}/...` or `/users/...`, case-insensitive
/// `users`; None for `me/...` or others.
pub fn mailbox_of(resource: &str) -> Option<&str> {
    let path = resource.trim_start_matches('/');
    let (first, rest) = path.split_once('/')?;
    if !first.eq_ignore_ascii_case("users") {
        return None;
    }
    let mailbox = rest.split('/').next().unwrap_or("");
    (!mailbox.is_empty()).then_some(mailbox)
}

/// Checks a configured resource path (e.g. `users/room@contoso.example/events`,
/// `users/x/mailFolders('inbox')/messages`): non-empty, relative (no scheme), no whitespace or
/// control characters, no `?` or `#`, at most [`MAX_RESOURCE_LEN`] bytes. Err(reason) otherwise.
/// A leading `/` is allowed (see [`normalise_resource`]).
pub fn valid_resource(resource: &str) -> Result<(), &'static str> {
    if resource.len() > MAX_RESOURCE_LEN {
        return Err("longer than 1024 bytes");
    }
    if normalise_resource(resource).is_empty() {
        return Err("empty");
    }
    if resource
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("contains whitespace or a control character");
    }
    if resource.contains('?') || resource.contains('#') {
        return Err("contains `?` or `#` (a query or fragment is not part of a resource)");
    }
    if resource.contains("://") || resource.to_ascii_lowercase().starts_with("https:") {
        return Err("is a URL; give the path relative to https://graph.microsoft.com/v1.0/");
    }
    Ok(())
}

/// `resource` without leading `/`: Graph accepts both spellings, the relay stores one.
pub fn normalise_resource(resource: &str) -> String {
    resource.trim_start_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lookup_finds_each_row() {
        assert_eq!(documented_max_minutes("users/x/events"), 10080);
        assert_eq!(documented_max_minutes("drives/x/root"), 42300);
        assert_eq!(documented_max_minutes("users"), 41760);
        assert_eq!(documented_max_minutes("security/alerts"), 43200);
        assert_eq!(documented_max_minutes("communications/presences/x"), 60);
        assert_eq!(documented_max_minutes("something/else"), 4230);
    }
}
