//! The `changeNotificationCollection` Graph POSTs to a notification (or lifecycle) URL: parsed
//! strictly, each item kept as its exact text so the relay can pass it on without `clientState`.

use crate::json::{self, Entries};
use serde_json::value::RawValue;
use std::time::SystemTime;

/// Most items accepted in one POST. Graph batches notifications but documents no batch size;
/// a thousand is far above any batch in Microsoft's examples (one to a few items) while bounding
/// the work one request can cause (each item is checked, routed and possibly forwarded).
pub const MAX_ITEMS: usize = 1000;

/// One POST body: the items of its `value` array, in order.
#[derive(Debug, Clone)]
pub struct Collection {
    /// The notifications, at least one, at most [`MAX_ITEMS`]; possibly for several subscriptions.
    pub items: Vec<Notification>,
}

/// One `changeNotification` (or lifecycle notification) of a collection.
#[derive(Debug, Clone)]
pub struct Notification {
    /// The subscription that produced it: how the relay finds the receiver and the secret.
    pub subscription_id: String,
    /// The secret given at creation; must match the subscription's before the item is trusted.
    pub client_state: Option<String>,
    /// As sent: "created" | "updated" | "deleted" (absent on lifecycle notifications).
    pub change_type: Option<String>,
    /// The changed resource's path relative to Graph's base URL, e.g. `Users/{id}/Messages/{id}`.
    pub resource: Option<String>,
    /// When the subscription expires, as Graph sees it.
    pub subscription_expiration: Option<SystemTime>,
    /// Set on lifecycle notifications (sent to the lifecycle URL) instead of `changeType`.
    pub lifecycle_event: Option<LifecycleEvent>,
    /// The tenant the change happened in.
    pub tenant_id: Option<String>,
    /// The item's exact JSON text, for [`Notification::for_receiver`].
    raw: String,
}

impl Notification {
    /// The item as JSON with `clientState` removed (a secret the receiver must never see), other
    /// keys in Graph's order with their values exactly as Graph wrote them.
    pub fn for_receiver(&self) -> String {
        let raw: &RawValue = serde_json::from_str(&self.raw).expect("kept only after parsing");
        let entries = Entries::of(raw).expect("kept only after parsing as an object");
        let mut out = String::with_capacity(self.raw.len());
        out.push('{');
        for (key, value) in entries.entries.iter().filter(|(k, _)| k != "clientState") {
            if out.len() > 1 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(key).expect("a string serialises"));
            out.push(':');
            out.push_str(value.get());
        }
        out.push('}');
        out
    }

    /// The item's exact JSON text as Graph sent it (including `clientState`).
    pub fn raw(&self) -> &str {
        &self.raw
    }
}

/// What a lifecycle notification announces ("Reduce missing subscriptions and change
/// notifications").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// The access behind the subscription needs refreshing: reauthorize or renew soon, or the
    /// subscription is removed.
    ReauthorizationRequired,
    /// The subscription is gone; create a new one.
    SubscriptionRemoved,
    /// Some notifications were not delivered; resynchronise the resource.
    Missed,
    /// A value Microsoft added after this code was written, kept as sent.
    Other(String),
}

impl LifecycleEvent {
    /// The value as Graph spells it, e.g. "reauthorizationRequired".
    pub fn as_str(&self) -> &str {
        match self {
            LifecycleEvent::ReauthorizationRequired => "reauthorizationRequired",
            LifecycleEvent::SubscriptionRemoved => "subscriptionRemoved",
            LifecycleEvent::Missed => "missed",
            LifecycleEvent::Other(s) => s,
        }
    }

    /// Reads Graph's spelling; unknown values become [`LifecycleEvent::Other`].
    pub fn from_graph(s: &str) -> LifecycleEvent {
        match s {
            "reauthorizationRequired" => LifecycleEvent::ReauthorizationRequired,
            "subscriptionRemoved" => LifecycleEvent::SubscriptionRemoved,
            "missed" => LifecycleEvent::Missed,
            other => LifecycleEvent::Other(other.to_owned()),
        }
    }
}

/// Why a body is not an acceptable notification collection (the relay answers 400).
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not well-formed JSON, or something after the JSON value.
    #[error("not JSON at line {line} column {column}: {detail}")]
    NotJson {
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// serde_json's description, e.g. "trailing characters".
        detail: String,
    },
    /// Arrays and objects nested deeper than serde_json's limit.
    #[error("nested deeper than {} levels", json::MAX_DEPTH)]
    TooDeep,
    /// The top-level value is not an object.
    #[error("not a JSON object")]
    NotObject,
    /// A key appears twice in the top-level object.
    #[error("duplicate key `{0}`")]
    DuplicateKey(String),
    /// No `value` key.
    #[error("no `value` array")]
    NoValue,
    /// `value` is not an array.
    #[error("`value` is not an array")]
    ValueNotArray,
    /// `value` is an empty array.
    #[error("`value` is empty")]
    EmptyValue,
    /// More than [`MAX_ITEMS`] items.
    #[error("{0} items, more than {MAX_ITEMS}")]
    TooManyItems(usize),
    /// One item is wrong.
    #[error("item {item}: {problem}")]
    Item {
        /// Which item, counting from 1.
        item: usize,
        /// What is wrong with it.
        problem: ItemProblem,
    },
    /// A subscription body (Graph's answer to create, get or renew) lacks or mistypes a field.
    #[error("not a subscription: {0}")]
    NotASubscription(String),
}

/// What is wrong with one item of a collection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemProblem {
    /// The item is not an object.
    #[error("not an object")]
    NotObject,
    /// A key appears twice in the item.
    #[error("duplicate key `{0}`")]
    DuplicateKey(String),
    /// `subscriptionId` is missing or not a string.
    #[error("no subscriptionId")]
    NoSubscriptionId,
    /// Neither `changeType` nor `lifecycleEvent`.
    #[error("neither changeType nor lifecycleEvent")]
    NoChangeTypeOrLifecycleEvent,
    /// A field that must be a string (or null) is not.
    #[error("`{0}` is not a string")]
    NotAString(&'static str),
    /// `subscriptionExpirationDateTime` is not a timestamp.
    #[error("`subscriptionExpirationDateTime` is not an RFC 3339 time")]
    BadTime,
}

impl ParseError {
    /// The error for serde_json's `e`, with the position split from the description.
    pub(crate) fn not_json(e: &serde_json::Error) -> ParseError {
        let text = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let detail = text.strip_suffix(&suffix).unwrap_or(&text).to_owned();
        ParseError::NotJson {
            line: e.line(),
            column: e.column(),
            detail,
        }
    }
}

/// A `changeNotificationCollection` POST body: a JSON object with a non-empty `value` array of
/// objects, each with a string `subscriptionId` and either `changeType` or `lifecycleEvent`.
/// Anything else is an error (the relay answers 400). Refuses ambiguity: duplicate keys (at the
/// top level and in each item), more than [`MAX_ITEMS`] items, nesting deeper than serde_json's
/// default. Allows unknown extra keys (Graph adds fields; e.g. top-level `validationTokens` for
/// rich notifications).
pub fn parse_collection(body: &[u8]) -> Result<Collection, ParseError> {
    // Syntax first (including trailing garbage), over the whole body, before any structure.
    let top: &RawValue = serde_json::from_slice(body).map_err(|e| ParseError::not_json(&e))?;
    if json::too_deep(top.get().as_bytes()) {
        return Err(ParseError::TooDeep);
    }
    let top = Entries::of(top).ok_or(ParseError::NotObject)?;
    if let Some(key) = top.duplicate {
        return Err(ParseError::DuplicateKey(key));
    }
    let value = top.get("value").ok_or(ParseError::NoValue)?;
    let (raw_items, count) = json::elements(value, MAX_ITEMS).ok_or(ParseError::ValueNotArray)?;
    if count == 0 {
        return Err(ParseError::EmptyValue);
    }
    if count > MAX_ITEMS {
        return Err(ParseError::TooManyItems(count));
    }
    let items = raw_items
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            parse_item(raw).map_err(|problem| ParseError::Item {
                item: i + 1,
                problem,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Collection { items })
}

fn parse_item(raw: &RawValue) -> Result<Notification, ItemProblem> {
    let item = Entries::of(raw).ok_or(ItemProblem::NotObject)?;
    if let Some(key) = item.duplicate {
        return Err(ItemProblem::DuplicateKey(key));
    }
    let subscription_id = item
        .get("subscriptionId")
        .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
        .ok_or(ItemProblem::NoSubscriptionId)?;
    let change_type = optional_string(&item, "changeType")?;
    let lifecycle_event =
        optional_string(&item, "lifecycleEvent")?.map(|s| LifecycleEvent::from_graph(&s));
    if change_type.is_none() && lifecycle_event.is_none() {
        return Err(ItemProblem::NoChangeTypeOrLifecycleEvent);
    }
    let subscription_expiration = optional_string(&item, "subscriptionExpirationDateTime")?
        .map(|s| crate::time::parse_time(&s).ok_or(ItemProblem::BadTime))
        .transpose()?;
    Ok(Notification {
        client_state: optional_string(&item, "clientState")?,
        resource: optional_string(&item, "resource")?,
        tenant_id: optional_string(&item, "tenantId")?,
        subscription_id,
        change_type,
        subscription_expiration,
        lifecycle_event,
        raw: raw.get().to_owned(),
    })
}

/// The string at `key`; absent and `null` are both `None`, any other kind of value an error.
fn optional_string(item: &Entries<'_>, key: &'static str) -> Result<Option<String>, ItemProblem> {
    match item.get(key) {
        None => Ok(None),
        Some(v) => serde_json::from_str::<Option<String>>(v.get())
            .map_err(|_| ItemProblem::NotAString(key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_event_round_trips_its_spelling() {
        for s in [
            "reauthorizationRequired",
            "subscriptionRemoved",
            "missed",
            "somethingNew",
        ] {
            assert_eq!(LifecycleEvent::from_graph(s).as_str(), s);
        }
        assert_eq!(LifecycleEvent::from_graph("missed"), LifecycleEvent::Missed);
    }

    #[test]
    fn not_json_splits_position() {
        let e = parse_collection(b"{\"value\" [").unwrap_err();
        match e {
            ParseError::NotJson {
                line,
                column,
                ref detail,
            } => {
                assert_eq!((line, column), (1, 10));
                assert!(!detail.contains("line"), "{detail}");
            }
            other => panic!("{other}"),
        }
    }
}
