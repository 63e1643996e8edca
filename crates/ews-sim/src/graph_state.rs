//! What the simulated Microsoft Graph remembers: subscriptions, the per-callback-URL queues
//! of change and lifecycle notifications waiting to be POSTed, the record of every exchange
//! with a callback, armed faults. Lives inside the simulator's one [`crate::state::State`],
//! under the same lock, so a test sees EWS and Graph change together.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::util::guid;

/// Callback exchanges remembered for inspection; older ones are forgotten first. Enough for a
/// test run of a few thousand notifications; a lab soak test reads the counters instead.
pub const MAX_RECORDED_DELIVERIES: usize = 10_000;

/// Items waiting per callback URL. A callback that is down for the whole retry budget while
/// a test creates changes in a loop must not fill memory; beyond this, new items are dropped
/// (and counted), as Graph drops what it cannot deliver.
pub const MAX_QUEUED_PER_URL: usize = 100_000;

/// A `changeType` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ChangeType {
    /// An item was created.
    Created,
    /// An item was updated.
    Updated,
    /// An item was deleted.
    Deleted,
}

impl ChangeType {
    /// Graph's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Created => "created",
            ChangeType::Updated => "updated",
            ChangeType::Deleted => "deleted",
        }
    }

    /// Graph's spelling back (exact, as Graph compares it).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "created" => Some(ChangeType::Created),
            "updated" => Some(ChangeType::Updated),
            "deleted" => Some(ChangeType::Deleted),
            _ => None,
        }
    }
}

/// A `lifecycleEvent` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LifecycleEvent {
    /// Access must be refreshed: reauthorize or renew, or the subscription is removed.
    ReauthorizationRequired,
    /// The subscription is gone; create a new one.
    SubscriptionRemoved,
    /// Some notifications were not delivered; resynchronise.
    Missed,
}

impl LifecycleEvent {
    /// Graph's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleEvent::ReauthorizationRequired => "reauthorizationRequired",
            LifecycleEvent::SubscriptionRemoved => "subscriptionRemoved",
            LifecycleEvent::Missed => "missed",
        }
    }
}

/// What one exchange with a callback was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryKind {
    /// The `?validationToken=` handshake of a create.
    Validation,
    /// Change notifications to `notificationUrl`.
    Notification,
    /// Lifecycle notifications to `lifecycleNotificationUrl`.
    Lifecycle,
}

/// Why a subscription is gone (other than by expiring).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovalReason {
    /// `DELETE /subscriptions/{id}`.
    Deleted,
    /// Removed by a fault, with a `subscriptionRemoved` lifecycle notification when it has a
    /// lifecycle URL.
    Removed,
    /// Removed by a fault without a word.
    RemovedSilently,
    /// `reauthorizationRequired` went unanswered for the grace period.
    NotReauthorized,
    /// Expired by a fault (its expiration was moved to now).
    ExpiredByFault,
}

/// How Graph describes the resource a subscription watches, in its notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    /// Outlook events (`…/events`), the relay's first Graph use.
    Event,
    /// Outlook messages (`…/messages`).
    Message,
    /// Outlook personal contacts (`…/contacts`).
    Contact,
}

impl ResourceKind {
    /// Guessed from the subscription's `resource`, as Graph knows it from its route table.
    pub fn of(resource: &str) -> Self {
        let lower = resource.to_ascii_lowercase();
        if lower.contains("messages") {
            ResourceKind::Message
        } else if lower.contains("contacts") {
            ResourceKind::Contact
        } else {
            ResourceKind::Event
        }
    }

    /// `@odata.type` of the resource data.
    fn odata_type(self) -> &'static str {
        match self {
            ResourceKind::Event => "#Microsoft.Graph.Event",
            ResourceKind::Message => "#Microsoft.Graph.Message",
            ResourceKind::Contact => "#Microsoft.Graph.Contact",
        }
    }

    /// The collection segment in `resource` and `@odata.id`.
    fn segment(self) -> &'static str {
        match self {
            ResourceKind::Event => "Events",
            ResourceKind::Message => "Messages",
            ResourceKind::Contact => "Contacts",
        }
    }
}

/// A Graph subscription.
#[derive(Debug)]
pub struct GraphSubscription {
    /// The id (a GUID).
    pub id: String,
    /// `resource` as given.
    pub resource: String,
    /// `changeType` as given, parsed.
    pub change_types: Vec<ChangeType>,
    /// `notificationUrl`.
    pub notification_url: String,
    /// `lifecycleNotificationUrl`; none means no lifecycle notifications, ever.
    pub lifecycle_url: Option<String>,
    /// When it expires.
    pub expiration: SystemTime,
    /// `clientState`, echoed in every notification.
    pub client_state: Option<String>,
    /// When it was created.
    pub created: SystemTime,
    /// Successful PATCHes with a new expiration.
    pub renewed: u64,
    /// Successful reauthorize calls.
    pub reauthorized: u64,
    /// Set once it is gone for a reason other than expiry.
    pub removal: Option<RemovalReason>,
    /// A `reauthorizationRequired` is outstanding; its number, so the grace timer of an
    /// older one does not remove a subscription reauthorized since.
    pub reauthorization_pending: Option<u64>,
    /// The GUID of the mailbox owner in notification resources.
    pub user_id: String,
    /// What its notifications describe.
    pub kind: ResourceKind,
    /// Change items made so far; the next resource id is `evt-{n+1:06}`.
    pub changes_made: u64,
    /// Items (change and lifecycle) a callback acknowledged.
    pub delivered: u64,
    /// Items given up on (retry budget spent, or queued for a subscription that ended).
    pub dropped: u64,
}

impl GraphSubscription {
    /// Whether Graph still knows it: not removed, not expired.
    pub fn is_live(&self, now: SystemTime) -> bool {
        self.removal.is_none() && self.expiration > now
    }
}

/// One item waiting for its callback.
#[derive(Debug, Clone)]
pub struct QueuedItem {
    /// The subscription it belongs to.
    pub subscription_id: String,
    /// Change or lifecycle notification.
    pub kind: DeliveryKind,
    /// The JSON element of `value`.
    pub item: Value,
}

/// The items for one callback URL and the wake-up of its delivery task.
#[derive(Debug, Default)]
pub struct UrlQueue {
    /// Oldest first; the front ones are in flight while a delivery is being tried.
    pub items: VecDeque<QueuedItem>,
    /// Wakes the URL's delivery task when items arrive.
    pub wake: Arc<Notify>,
    /// Whether a delivery task runs for the URL (one per URL keeps items in order).
    pub task_running: bool,
}

/// One exchange with a callback, for tests to assert on (latency, status, batching).
#[derive(Debug, Clone, Serialize)]
pub struct GraphDelivery {
    /// Order, from 1.
    pub seq: u64,
    /// When it started (RFC 3339).
    pub time: String,
    /// The URL POSTed to (without the validation query).
    pub url: String,
    /// What it was.
    pub kind: DeliveryKind,
    /// Items in the `value` array (0 for a validation).
    pub items: usize,
    /// The subscriptions the items belong to (or the one being created).
    pub subscription_ids: Vec<String>,
    /// The HTTP status answered, if any.
    pub status: Option<u16>,
    /// Why it failed: connection error, timeout, wrong validation answer.
    pub error: Option<String>,
    /// Whether Graph counted it as a success.
    pub ok: bool,
    /// Request to answer (or failure), in milliseconds.
    pub elapsed_ms: u64,
    /// For a failed delivery whose retry budget is spent: the items were dropped.
    pub dropped: bool,
}

/// Graph faults armed through the control API.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GraphFaults {
    /// Next Graph API calls to refuse as throttled.
    pub throttle_remaining: u32,
    /// The status they get: 429 (Graph's throttling) or 503 (service unavailable).
    pub throttle_status: u16,
    /// `Retry-After` seconds sent with them.
    pub throttle_retry_after_secs: u32,
}

/// Everything the Graph side remembers.
#[derive(Debug, Default)]
pub struct GraphState {
    /// By id; removed and expired ones stay for inspection.
    pub subscriptions: BTreeMap<String, GraphSubscription>,
    /// Waiting items by callback URL.
    pub queues: HashMap<String, UrlQueue>,
    /// Recent callback exchanges.
    pub deliveries: VecDeque<GraphDelivery>,
    /// Callback exchanges so far.
    pub delivery_seq: u64,
    /// Armed faults.
    pub faults: GraphFaults,
    /// Graph API requests received so far (`/v1.0/…`).
    pub requests: u64,
    /// Outstanding reauthorization requests so far (numbers them).
    pub reauthorization_seq: u64,
    /// A stable GUID per mailbox named in a resource, as Graph names users by object id.
    pub user_ids: HashMap<String, String>,
}

impl GraphState {
    /// The GUID standing for the user of `resource` (`users/{id or upn}/…`, `me/…`).
    pub fn user_id(&mut self, resource: &str) -> String {
        let user = resource
            .trim_start_matches('/')
            .split('/')
            .collect::<Vec<_>>()
            .get(..2)
            .filter(|p| p[0].eq_ignore_ascii_case("users"))
            .map_or_else(|| "me".to_owned(), |p| p[1].to_ascii_lowercase());
        self.user_ids.entry(user).or_insert_with(guid).clone()
    }

    /// Queues `item` for `url`. Returns the URL when its delivery task must be started.
    pub fn enqueue(&mut self, url: &str, item: QueuedItem) -> Option<String> {
        let queue = self.queues.entry(url.to_owned()).or_default();
        if queue.items.len() >= MAX_QUEUED_PER_URL {
            if let Some(sub) = self.subscriptions.get_mut(&item.subscription_id) {
                sub.dropped += 1;
            }
            return None;
        }
        queue.items.push_back(item);
        queue.wake.notify_one();
        if queue.task_running {
            None
        } else {
            queue.task_running = true;
            Some(url.to_owned())
        }
    }

    /// Makes `count` change items for a live subscription and queues them. Returns their
    /// resource ids, and the URL whose delivery task must be started, if any.
    pub fn make_changes(
        &mut self,
        id: &str,
        change: ChangeType,
        count: usize,
        tenant_id: &str,
        wrong_client_state: bool,
    ) -> Option<(Vec<String>, Option<String>)> {
        let now = SystemTime::now();
        let sub = self.subscriptions.get_mut(id).filter(|s| s.is_live(now))?;
        let mut items = Vec::with_capacity(count);
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            sub.changes_made += 1;
            let item_id = format!("evt-{:06}", sub.changes_made);
            let path = format!("Users/{}/{}/{item_id}", sub.user_id, sub.kind.segment());
            // A wrong clientState is what a forged POST carries: the relay must refuse it.
            let client_state = if wrong_client_state {
                Some(format!("not-{}", sub.client_state.as_deref().unwrap_or("")))
            } else {
                sub.client_state.clone()
            };
            items.push(QueuedItem {
                subscription_id: id.to_owned(),
                kind: DeliveryKind::Notification,
                item: json!({
                    "subscriptionId": id,
                    "subscriptionExpirationDateTime": graph_time(sub.expiration),
                    "changeType": change.as_str(),
                    "resource": path,
                    "resourceData": {
                        "@odata.type": sub.kind.odata_type(),
                        "@odata.id": path,
                        "@odata.etag": format!("W/\"DwAAABYAAAA{:06}\"", sub.changes_made),
                        "id": item_id,
                    },
                    "clientState": client_state,
                    "tenantId": tenant_id,
                }),
            });
            ids.push(item_id);
        }
        let url = sub.notification_url.clone();
        let mut start = None;
        for item in items {
            start = start.or(self.enqueue(&url, item));
        }
        Some((ids, start))
    }

    /// Queues a lifecycle notification for a subscription that has a lifecycle URL (Graph
    /// sends none otherwise). Returns the URL whose delivery task must be started, if any.
    pub fn lifecycle(
        &mut self,
        id: &str,
        event: LifecycleEvent,
        tenant_id: &str,
    ) -> Option<String> {
        let sub = self.subscriptions.get(id)?;
        let url = sub.lifecycle_url.clone()?;
        let item = QueuedItem {
            subscription_id: id.to_owned(),
            kind: DeliveryKind::Lifecycle,
            item: json!({
                "subscriptionId": id,
                "subscriptionExpirationDateTime": graph_time(sub.expiration),
                "clientState": sub.client_state,
                "tenantId": tenant_id,
                "lifecycleEvent": event.as_str(),
            }),
        };
        self.enqueue(&url, item)
    }

    /// Records a callback exchange; returns its seq.
    pub fn record(&mut self, mut delivery: GraphDelivery) -> u64 {
        self.delivery_seq += 1;
        delivery.seq = self.delivery_seq;
        self.deliveries.push_back(delivery);
        while self.deliveries.len() > MAX_RECORDED_DELIVERIES {
            self.deliveries.pop_front();
        }
        self.delivery_seq
    }
}

/// Graph's timestamp form: UTC with seven fraction digits (`2016-11-20T18:23:45.9356913Z`).
pub fn graph_time(time: SystemTime) -> String {
    let nanos = humantime::format_rfc3339_nanos(time).to_string();
    // `…:45.935691300Z` → `…:45.9356913Z`
    format!("{}Z", &nanos[..nanos.len() - 3])
}

/// Parses an ISO 8601 timestamp as Graph accepts it in `expirationDateTime`: any number of
/// fraction digits, `Z`, no zone (UTC), or a `±hh:mm` offset.
pub fn parse_graph_time(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let (base, offset_secs) = split_offset(text)?;
    let time = humantime::parse_rfc3339_weak(base).ok()?;
    // An offset east of UTC means the UTC instant is earlier.
    let shift = std::time::Duration::from_secs(offset_secs.unsigned_abs());
    if offset_secs >= 0 {
        time.checked_sub(shift)
    } else {
        time.checked_add(shift)
    }
}

/// Splits a trailing `±hh:mm` off (after the time part, so the date's dashes are not taken).
fn split_offset(text: &str) -> Option<(&str, i64)> {
    let time_start = text.find(['T', 't', ' '])?;
    let Some(pos) = text[time_start..].rfind(['+', '-']).map(|p| p + time_start) else {
        return Some((text, 0));
    };
    let zone = &text[pos + 1..];
    let (h, m) = zone
        .split_once(':')
        .unwrap_or((zone.get(..2)?, zone.get(2..)?));
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    if h > 23 || m > 59 {
        return None;
    }
    let secs = h * 3600 + m * 60;
    Some((
        &text[..pos],
        if text.as_bytes()[pos] == b'-' {
            -secs
        } else {
            secs
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn graph_times_have_seven_fraction_digits_and_parse_back() {
        let t = UNIX_EPOCH + Duration::new(1_479_666_225, 935_691_300);
        assert_eq!(graph_time(t), "2016-11-20T18:23:45.9356913Z");
        assert_eq!(parse_graph_time("2016-11-20T18:23:45.9356913Z"), Some(t));
        assert_eq!(parse_graph_time("2016-11-20T18:23:45.9356913"), Some(t));
        assert_eq!(
            parse_graph_time("2016-11-20T20:23:45.9356913+02:00"),
            Some(t)
        );
        assert_eq!(
            parse_graph_time("2016-11-20T17:23:45.9356913-01:00"),
            Some(t)
        );
        assert_eq!(parse_graph_time("tomorrow"), None);
    }

    #[test]
    fn users_get_stable_guids() {
        let mut g = GraphState::default();
        let a = g.user_id("users/Room@contoso.example/events");
        assert_eq!(a, g.user_id("/users/room@contoso.example/calendar/events"));
        assert_ne!(a, g.user_id("users/other@contoso.example/events"));
    }
}
