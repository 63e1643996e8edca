//! Which subscriptions are alive, learned from the traffic alone.
//!
//! Every forwarded `SendNotification` updates its subscription's record under one short lock:
//! a hash lookup and a few assignments. A periodic sweep marks silent subscriptions stale (logged
//! once) and forgets those unseen for a day, so the map stays bounded whatever Exchange sends.
//!
//! In managed mode the relay answers Exchange itself for the subscriptions it owns
//! ([`ReceiverAnswer::Relay`]), and replaces them as a matter of course (a resubscribe after lost
//! keep-alives, a removed mailbox). A subscription the relay has retired is [`State::Replaced`],
//! never [`State::Stale`]: its silence is expected, and an alert on stale must not fire after
//! every normal resubscribe. The tracker learns that from the relay's own `Unsubscribe` to it
//! and, for ids that simply fall silent, from the keeper through [`Tracker::set_retired_check`].
//!
//! Microsoft Graph subscriptions seen in passthrough ([`Tracker::record_graph`]) live in a map
//! of their own ([`GraphSubscription`], same [`MAX_TRACKED`] bound and [`FORGET_AFTER`]
//! sweep), so the EWS hot path does not pay for them. Graph sends no keep-alives: a quiet Graph
//! subscription is not a stale one. What can be told from the traffic is its expiry
//! (`subscriptionExpirationDateTime`, in every item), its lifecycle events and the receiver's
//! answers; see [`GraphSubscription::state`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::source::Source;
use crate::subscriptions::abbreviate;

use ews::{NotificationSummary, ResponseClass, SubscriptionStatus};

/// A subscription unseen for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Subscriptions tracked at most; when full, the least recently seen is forgotten first. Far
/// above any real deployment (Exchange Online allows 20 per mailbox) yet a hard bound on memory.
pub const MAX_TRACKED: usize = 100_000;
/// A Graph subscription with no renewal seen yet turns [`State::Expiring`] with less than this
/// left. An hour: Graph's shortest lifetime is 45 minutes, and a receiver that renews at all
/// renews well before the last hour of a longer one.
pub const GRAPH_EXPIRING_WITHIN: Duration = Duration::from_secs(3600);
/// A Graph subscription whose renewal was seen turns [`State::Expiring`] when less than this
/// share (one in ten) of its current lifetime (from when its latest expiration was first seen
/// to that expiration) is left: the renewal that receivers make at half time or so is late.
/// The managed keeper uses the same share.
pub const GRAPH_EXPIRING_SHARE: u32 = 10;
/// A Graph subscription is kept at most this long after its last notification even if its
/// expiration is later (Graph's longest lifetimes are just under 30 days); otherwise it is
/// forgotten [`FORGET_AFTER`] after both its last notification and its expiration, so a quiet
/// subscription with days left is not dropped and an expired one stays red for a day.
pub const GRAPH_KEEP_AT_MOST: Duration = Duration::from_secs(31 * 86_400);

/// What the receiver answered the latest notification with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverAnswer {
    /// `SendNotificationResult` OK.
    Ok,
    /// `SendNotificationResult` Unsubscribe: the subscription is being ended.
    Unsubscribe,
    /// A 2xx answer that was not a `SendNotificationResult`.
    Unparsed,
    /// A non-2xx status from the receiver.
    HttpError(u16),
    /// The receiver could not be reached or did not answer (the relay answered 502/504).
    Unreachable,
    /// Managed mode: the relay answered Exchange itself with this status (the receiver gets the
    /// notification's events from the relay, and never sees keep-alives).
    Relay(SubscriptionStatus),
}

impl ReceiverAnswer {
    /// Label/JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiverAnswer::Ok => "OK",
            ReceiverAnswer::Unsubscribe => "Unsubscribe",
            ReceiverAnswer::Unparsed => "unparsed",
            ReceiverAnswer::HttpError(_) => "http_error",
            ReceiverAnswer::Unreachable => "unreachable",
            ReceiverAnswer::Relay(SubscriptionStatus::Ok) => "relay_ok",
            ReceiverAnswer::Relay(SubscriptionStatus::Unsubscribe) => "relay_unsubscribe",
        }
    }

    /// Whether the relay answered Exchange itself (managed mode) rather than the receiver.
    pub fn by_relay(self) -> bool {
        matches!(self, ReceiverAnswer::Relay(_))
    }

    /// Its index in [`crate::metrics::ANSWER_LABELS`].
    pub fn metric_index(self) -> usize {
        match self {
            ReceiverAnswer::Ok => 0,
            ReceiverAnswer::Unsubscribe => 1,
            ReceiverAnswer::Unparsed => 2,
            ReceiverAnswer::HttpError(_) => 3,
            ReceiverAnswer::Unreachable => 4,
            ReceiverAnswer::Relay(SubscriptionStatus::Ok) => 5,
            ReceiverAnswer::Relay(SubscriptionStatus::Unsubscribe) => 6,
        }
    }

    /// Classify a receiver answer from its status and body.
    pub fn from_response(status: http::StatusCode, body: &[u8]) -> Self {
        if !status.is_success() {
            return ReceiverAnswer::HttpError(status.as_u16());
        }
        match ews::parse_send_notification_result(body) {
            Ok(SubscriptionStatus::Ok) => ReceiverAnswer::Ok,
            Ok(SubscriptionStatus::Unsubscribe) => ReceiverAnswer::Unsubscribe,
            Err(_) => ReceiverAnswer::Unparsed,
        }
    }
}

/// The last receiver answer body classified, and its class: a receiver answers with the same
/// bytes nearly every time, so the SOAP parse runs once per distinct body instead of once per
/// request. Classification is a function of status and bytes alone, so a hit is exact.
#[derive(Debug, Default)]
pub struct AnswerCache {
    last: arc_swap::ArcSwapOption<(bytes::Bytes, ReceiverAnswer)>,
}

impl AnswerCache {
    /// Bodies above this are classified without caching.
    const MAX_CACHED: usize = 4096;

    /// As [`ReceiverAnswer::from_response`].
    pub fn classify(&self, status: http::StatusCode, body: &bytes::Bytes) -> ReceiverAnswer {
        if !status.is_success() {
            return ReceiverAnswer::HttpError(status.as_u16());
        }
        if let Some(hit) = &*self.last.load() {
            if hit.0 == body {
                return hit.1;
            }
        }
        let answer = ReceiverAnswer::from_response(status, body);
        if body.len() <= Self::MAX_CACHED {
            self.last
                .store(Some(std::sync::Arc::new((body.clone(), answer))));
        }
        answer
    }
}

/// A subscription's state as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Notifications keep arriving.
    Alive,
    /// Nothing arrived for `--stale-after`.
    Stale,
    /// The receiver answered `Unsubscribe`.
    Unsubscribed,
    /// Exchange reported an error for it, or the receiver failed to answer.
    Error,
    /// Managed mode: the relay retired it (replaced it with a new subscription, or its mailbox
    /// was removed) and answers `Unsubscribe` to it; its silence is expected.
    Replaced,
    /// Graph: its expiration is near and no renewal was seen (see [`GraphSubscription::state`]).
    Expiring,
    /// Graph: its expiration has passed with no later one seen.
    Expired,
    /// Graph: a `subscriptionRemoved` lifecycle event was seen; Graph sends nothing more for it.
    Removed,
}

impl State {
    /// Every state, for metrics.
    pub const ALL: [State; 8] = [
        State::Alive,
        State::Stale,
        State::Unsubscribed,
        State::Error,
        State::Replaced,
        State::Expiring,
        State::Expired,
        State::Removed,
    ];

    /// Label/JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Alive => "alive",
            State::Stale => "stale",
            State::Unsubscribed => "unsubscribed",
            State::Error => "error",
            State::Replaced => "replaced",
            State::Expiring => "expiring",
            State::Expired => "expired",
            State::Removed => "removed",
        }
    }
}

/// What the relay knows about one subscription.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// When its first notification passed.
    pub first_seen: SystemTime,
    /// When its latest notification passed, as of the [`Tracker::snapshot`] it comes from.
    pub last_seen: SystemTime,
    last_seen_at: Instant,
    /// Watermark of its latest event (StatusEvents included): where a new subscription resumes.
    pub last_watermark: Option<String>,
    /// Events seen, by type, in [`ews::EventType::ALL`] order.
    pub events: [u64; 8],
    /// `ResponseClass` of its latest response message.
    pub last_response_class: ResponseClass,
    /// `ResponseCode` of its latest response message.
    pub last_response_code: Option<String>,
    /// The receiver's latest answer; `None` until one came back.
    pub receiver_answer: Option<ReceiverAnswer>,
    /// Address the latest notification came from.
    pub peer: IpAddr,
    stale_logged: bool,
}

impl Subscription {
    /// Its state now, given the staleness threshold; `retired`: the relay's keeper has retired
    /// this id (managed mode).
    pub fn state(&self, now: Instant, stale_after: Duration, retired: bool) -> State {
        match self.receiver_answer {
            Some(ReceiverAnswer::Unsubscribe) => return State::Unsubscribed,
            Some(ReceiverAnswer::HttpError(_) | ReceiverAnswer::Unreachable) => {
                return State::Error
            }
            _ => {}
        }
        if self.last_response_class == ResponseClass::Error {
            State::Error
        } else if retired
            || self.receiver_answer == Some(ReceiverAnswer::Relay(SubscriptionStatus::Unsubscribe))
        {
            // The relay ended it itself (an error push is `Error` above, not this).
            State::Replaced
        } else if now.duration_since(self.last_seen_at) >= stale_after {
            State::Stale
        } else {
            State::Alive
        }
    }
}

/// Graph `changeType` values counted per subscription, in [`GraphSubscription::changes`] order
/// (`other`: a value Microsoft added later).
pub const GRAPH_CHANGE_TYPES: [&str; 4] = ["created", "updated", "deleted", "other"];
/// Graph lifecycle events counted per subscription, in [`GraphSubscription::lifecycle`] order.
pub const GRAPH_LIFECYCLE_EVENTS: [&str; 4] = [
    "reauthorizationRequired",
    "subscriptionRemoved",
    "missed",
    "other",
];

/// The index of a `changeType` in [`GRAPH_CHANGE_TYPES`].
pub fn change_type_index(change_type: &str) -> usize {
    match change_type {
        "created" => 0,
        "updated" => 1,
        "deleted" => 2,
        _ => 3,
    }
}

/// The index of a lifecycle event in [`GRAPH_LIFECYCLE_EVENTS`].
pub fn lifecycle_index(event: &graph::LifecycleEvent) -> usize {
    match event {
        graph::LifecycleEvent::ReauthorizationRequired => 0,
        graph::LifecycleEvent::SubscriptionRemoved => 1,
        graph::LifecycleEvent::Missed => 2,
        graph::LifecycleEvent::Other(_) => 3,
    }
}

/// What the relay knows about one Microsoft Graph subscription (passthrough), learned from the
/// change and lifecycle notifications that name it.
#[derive(Debug, Clone)]
pub struct GraphSubscription {
    /// When its first notification passed.
    pub first_seen: SystemTime,
    /// When its latest notification passed.
    pub last_seen: SystemTime,
    last_seen_at: Instant,
    /// The collection its changes happen in, derived from the items' `resource` paths (Graph
    /// does not send the subscription's own `resource`): the latest item's path without its
    /// last key (`Users/{id}/Messages/{id}` → `Users/{id}/Messages`), narrowed to what the
    /// paths of all its items have in common. A subscription on one mail folder shows the
    /// mailbox's `Messages`, as the items' paths do not name the folder.
    pub resource: Option<String>,
    /// The `resource` of its latest change notification, as Graph sent it.
    pub last_resource: Option<String>,
    /// Change notifications seen, by `changeType`, in [`GRAPH_CHANGE_TYPES`] order.
    pub changes: [u64; 4],
    /// The latest `subscriptionExpirationDateTime` seen (the greatest: a retried notification
    /// carries the expiration of its first attempt, which must not undo a renewal).
    pub expiration: Option<SystemTime>,
    /// When [`Self::expiration`] was first seen: the start of its current lifetime.
    pub expiration_seen: Option<SystemTime>,
    /// Renewals seen: times a later expiration than before was observed.
    pub renewals: u64,
    /// Lifecycle events seen, in [`GRAPH_LIFECYCLE_EVENTS`] order.
    pub lifecycle: [u64; 4],
    /// The latest lifecycle event, as Graph spells it, and when it passed.
    pub last_lifecycle: Option<(String, SystemTime)>,
    /// The receiver's latest answer (`Ok` for any 2xx); `None` until one came back.
    pub receiver_answer: Option<ReceiverAnswer>,
    /// The tenant of its latest item.
    pub tenant_id: Option<String>,
    /// Address the latest notification came from.
    pub peer: IpAddr,
    /// The alarm state last logged, so each is logged once.
    logged: Option<State>,
}

impl GraphSubscription {
    fn new(wall: SystemTime, now: Instant, peer: IpAddr) -> Self {
        GraphSubscription {
            first_seen: wall,
            last_seen: wall,
            last_seen_at: now,
            resource: None,
            last_resource: None,
            changes: [0; 4],
            expiration: None,
            expiration_seen: None,
            renewals: 0,
            lifecycle: [0; 4],
            last_lifecycle: None,
            receiver_answer: None,
            tenant_id: None,
            peer,
            logged: None,
        }
    }

    /// Whether `subscriptionRemoved` was seen.
    pub fn removed(&self) -> bool {
        self.lifecycle[1] > 0
    }

    /// Its state at wall-clock `now`. Graph sends no keep-alives, so silence never makes it
    /// [`State::Stale`]; in order:
    /// - [`State::Removed`]: `subscriptionRemoved` was seen (Graph sends nothing more for it);
    /// - [`State::Expired`]: the latest expiration seen has passed;
    /// - [`State::Error`]: the receiver failed to answer its latest notification;
    /// - [`State::Expiring`]: the expiration is near: with no renewal seen yet, less than
    ///   [`GRAPH_EXPIRING_WITHIN`] or a tenth of the lifetime seen so far is left; once renewals
    ///   are seen, less than a tenth ([`GRAPH_EXPIRING_SHARE`]) of the current lifetime (from
    ///   when its expiration was first seen) is left, i.e. the next renewal is late;
    /// - [`State::Alive`] otherwise.
    ///
    /// The relay learns of a renewal only from a notification carrying the new expiration: a
    /// subscription renewed by the receiver whose resource stays quiet looks expiring, then
    /// expired.
    pub fn state(&self, now: SystemTime) -> State {
        if self.removed() {
            return State::Removed;
        }
        if self.expiration.is_some_and(|e| e <= now) {
            return State::Expired;
        }
        if matches!(
            self.receiver_answer,
            Some(ReceiverAnswer::HttpError(_) | ReceiverAnswer::Unreachable)
        ) {
            return State::Error;
        }
        if self.expiring(now) {
            State::Expiring
        } else {
            State::Alive
        }
    }

    fn expiring(&self, now: SystemTime) -> bool {
        let Some(exp) = self.expiration else {
            return false;
        };
        let left = exp.duration_since(now).unwrap_or_default();
        let lifetime = self
            .expiration_seen
            .and_then(|seen| exp.duration_since(seen).ok())
            .unwrap_or_default();
        let share = lifetime / GRAPH_EXPIRING_SHARE;
        if self.renewals == 0 {
            left < share.max(GRAPH_EXPIRING_WITHIN)
        } else {
            left < share
        }
    }

    /// Whether the sweep may forget it at `now` (see [`GRAPH_KEEP_AT_MOST`]).
    fn forgettable(&self, now: Instant, wall: SystemTime) -> bool {
        let silent = now.duration_since(self.last_seen_at);
        if silent < FORGET_AFTER {
            return false;
        }
        if silent >= GRAPH_KEEP_AT_MOST {
            return true;
        }
        match self.expiration.and_then(|e| e.checked_add(FORGET_AFTER)) {
            Some(until) => until <= wall,
            None => true,
        }
    }

    /// Record one item of a collection.
    fn record(&mut self, n: &graph::Notification, wall: SystemTime) {
        if let Some(t) = &n.tenant_id {
            if self.tenant_id.as_deref() != Some(t) {
                self.tenant_id = Some(t.clone());
            }
        }
        if let Some(exp) = n.subscription_expiration {
            match self.expiration {
                Some(old) if exp <= old => {}
                old => {
                    if old.is_some() {
                        self.renewals += 1;
                    }
                    self.expiration = Some(exp);
                    self.expiration_seen = Some(wall);
                }
            }
        }
        if let Some(ct) = &n.change_type {
            self.changes[change_type_index(ct)] += 1;
            if let Some(r) = &n.resource {
                let collection = collection_of(r);
                let narrowed = match &self.resource {
                    Some(kept) => common_segments(kept, collection),
                    None => collection,
                };
                if self.resource.as_deref() != Some(narrowed) {
                    self.resource = Some(narrowed.to_owned());
                }
                if self.last_resource.as_deref() != Some(r) {
                    self.last_resource = Some(r.clone());
                }
            }
        }
        if let Some(ev) = &n.lifecycle_event {
            self.lifecycle[lifecycle_index(ev)] += 1;
            self.last_lifecycle = Some((ev.as_str().to_owned(), wall));
        }
    }
}

/// The collection an item's resource path is in: the path without its last key, in either of
/// Graph's spellings (`Users/{id}/Messages/{id}` → `Users/{id}/Messages`,
/// `Users('{id}')/Messages('{id}')` → `Users('{id}')/Messages`).
pub fn collection_of(resource: &str) -> &str {
    let r = resource.trim_end_matches('/');
    let last = r.rfind('/').map_or(0, |i| i + 1);
    if r.ends_with("')") {
        if let Some(open) = r[last..].find("('") {
            return &r[..last + open];
        }
    }
    match r.rfind('/') {
        Some(i) => &r[..i],
        None => r,
    }
}

/// The longest leading run of whole `/`-separated segments `a` and `b` share (compared without
/// regard to ASCII case, as Graph's paths are), in `a`'s spelling.
pub fn common_segments<'a>(a: &'a str, b: &str) -> &'a str {
    let mut end = 0;
    let mut bs = b.split('/');
    for seg in a.split('/') {
        match bs.next() {
            Some(other) if other.eq_ignore_ascii_case(seg) => {
                end = if end == 0 {
                    seg.len()
                } else {
                    end + 1 + seg.len()
                };
            }
            _ => break,
        }
    }
    &a[..end]
}

/// Subscriptions in each state, by source: `counts[source as usize][state as usize]`, in
/// [`Source::ALL`] and [`State::ALL`] order.
pub type StateCounts = [[usize; State::ALL.len()]; Source::ALL.len()];

/// Says whether the relay's keeper has retired a subscription id (managed mode).
pub type RetiredCheck = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// The subscription table.
pub struct Tracker {
    stale_after: Duration,
    subs: Mutex<HashMap<Box<str>, Subscription>>,
    /// Graph subscriptions seen in passthrough, apart from the EWS ones (see the module doc).
    graph: Mutex<HashMap<Box<str>, GraphSubscription>>,
    /// Managed mode: which ids the keeper retired (see [`Tracker::set_retired_check`]).
    retired: std::sync::OnceLock<RetiredCheck>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("stale_after", &self.stale_after)
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// An empty table; `stale_after` is `--stale-after`.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            stale_after,
            subs: Mutex::new(HashMap::new()),
            graph: Mutex::new(HashMap::new()),
            retired: std::sync::OnceLock::new(),
        }
    }

    /// Managed mode: `check(id)` says whether the relay's keeper has retired `id`, so such a
    /// subscription shows as [`State::Replaced`] instead of going stale. Set once; later calls
    /// are ignored. The check runs under the tracker's lock, so it must be quick and must not
    /// call back into the tracker.
    pub fn set_retired_check(&self, check: impl Fn(&str) -> bool + Send + Sync + 'static) {
        let _ = self.retired.set(Box::new(check));
    }

    fn is_retired(&self, id: &str) -> bool {
        self.retired.get().is_some_and(|check| check(id))
    }

    /// `--stale-after`.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// Record one forwarded notification and the receiver's answer to it.
    /// `now` is when the exchange ended; the wall clock is read only for a new subscription
    /// ([`Tracker::snapshot`] derives `last_seen` from `now`).
    pub fn record(
        &self,
        msg: &NotificationSummary<'_>,
        peer: IpAddr,
        answer: ReceiverAnswer,
        now: Instant,
    ) {
        let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        for m in &msg.messages {
            let Some(id) = m.subscription_id.as_deref() else {
                continue;
            };
            let sub = match subs.get_mut(id) {
                Some(s) => s,
                None => {
                    if subs.len() >= MAX_TRACKED {
                        evict_oldest(&mut subs, |s| s.last_seen_at);
                    }
                    let wall = SystemTime::now();
                    subs.entry(Box::from(id)).or_insert_with(|| Subscription {
                        first_seen: wall,
                        last_seen: wall,
                        last_seen_at: now,
                        last_watermark: None,
                        events: [0; 8],
                        last_response_class: m.class,
                        last_response_code: None,
                        receiver_answer: None,
                        peer,
                        stale_logged: false,
                    })
                }
            };
            sub.last_seen_at = now;
            sub.peer = peer;
            sub.stale_logged = false;
            sub.last_response_class = m.class;
            if sub.last_response_code.as_deref() != m.code.as_deref() {
                sub.last_response_code = m.code.as_deref().map(str::to_owned);
            }
            sub.receiver_answer = Some(answer);
            for (seen, &count) in sub.events.iter_mut().zip(&m.event_counts) {
                *seen += u64::from(count);
            }
            if let Some(w) = m.last_watermark.as_deref() {
                match &mut sub.last_watermark {
                    Some(kept) if kept == w => {}
                    // Each notification brings a new one: the old allocation is reused.
                    Some(kept) => {
                        kept.clear();
                        kept.push_str(w);
                    }
                    None => sub.last_watermark = Some(w.to_owned()),
                }
            }
        }
    }

    /// Record a Graph change notification collection (passthrough) and the receiver's answer:
    /// every item updates its subscription's record, under one lock for the collection. Not
    /// on the EWS path; the wall clock is read once per collection.
    pub fn record_graph(
        &self,
        c: &graph::Collection,
        peer: IpAddr,
        answer: ReceiverAnswer,
        now: Instant,
    ) {
        let wall = SystemTime::now();
        let mut subs = self.graph.lock().unwrap_or_else(|e| e.into_inner());
        for n in &c.items {
            let id = n.subscription_id.as_str();
            let sub = match subs.get_mut(id) {
                Some(s) => s,
                None => {
                    if subs.len() >= MAX_TRACKED {
                        evict_oldest(&mut subs, |s| s.last_seen_at);
                    }
                    subs.entry(Box::from(id))
                        .or_insert_with(|| GraphSubscription::new(wall, now, peer))
                }
            };
            sub.last_seen_at = now;
            sub.last_seen = wall;
            sub.peer = peer;
            sub.receiver_answer = Some(answer);
            sub.record(n, wall);
        }
    }

    /// Mark silent EWS subscriptions stale (logging each once), log Graph subscriptions turning
    /// expiring, expired or removed (once each), and forget long-gone ones; returns how many
    /// subscriptions are in each state, by source.
    pub fn sweep(&self) -> StateCounts {
        let now = Instant::now();
        let mut counts: StateCounts = [[0; State::ALL.len()]; Source::ALL.len()];
        self.sweep_graph(now, &mut counts[Source::Graph as usize]);
        let counts_ews = &mut counts[Source::Ews as usize];
        let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|_, s| now.duration_since(s.last_seen_at) < FORGET_AFTER);
        for (id, s) in subs.iter_mut() {
            let state = s.state(now, self.stale_after, self.is_retired(id));
            if state == State::Stale && !s.stale_logged {
                s.stale_logged = true;
                tracing::warn!(
                    subscription = %abbreviate(id),
                    silent_for = ?now.duration_since(s.last_seen_at),
                    "subscription stale: no notification or keep-alive within --stale-after"
                );
            }
            counts_ews[state as usize] += 1;
        }
        drop(subs);
        counts
    }

    fn sweep_graph(&self, now: Instant, counts: &mut [usize; State::ALL.len()]) {
        let wall = SystemTime::now();
        let mut subs = self.graph.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|_, s| !s.forgettable(now, wall));
        for (id, s) in subs.iter_mut() {
            let state = s.state(wall);
            counts[state as usize] += 1;
            let alarm = matches!(state, State::Expiring | State::Expired | State::Removed);
            if alarm && s.logged != Some(state) {
                s.logged = Some(state);
                tracing::warn!(
                    subscription = %abbreviate(id),
                    resource = s.resource.as_deref().unwrap_or(""),
                    expiration = ?s.expiration.map(humantime::format_rfc3339_seconds),
                    state = state.as_str(),
                    "Graph subscription {}",
                    match state {
                        State::Expiring => "expires soon and no renewal was seen",
                        State::Expired => "expired: no later expiration was seen",
                        _ => "removed by Graph (subscriptionRemoved): the receiver must create a new one",
                    }
                );
            } else if !alarm {
                s.logged = None;
            }
        }
    }

    /// A copy of every Graph record with its state, most recently seen first, for the admin
    /// API and the status page.
    pub fn graph_snapshot(&self) -> Vec<(String, GraphSubscription, State)> {
        let wall = SystemTime::now();
        let subs = self.graph.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = subs
            .iter()
            .map(|(id, s)| (id.to_string(), s.clone(), s.state(wall)))
            .collect();
        drop(subs);
        out.sort_by_key(|e| std::cmp::Reverse(e.1.last_seen));
        out
    }

    /// A copy of every record with its state, for the admin API.
    pub fn snapshot(&self) -> Vec<(String, Subscription, State)> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = subs
            .iter()
            .map(|(id, s)| {
                let mut copy = s.clone();
                // Kept as a monotonic time on the hot path, told in wall-clock time here.
                copy.last_seen = wall
                    .checked_sub(now.saturating_duration_since(s.last_seen_at))
                    .unwrap_or(s.first_seen)
                    .max(s.first_seen);
                let state = s.state(now, self.stale_after, self.is_retired(id));
                (id.to_string(), copy, state)
            })
            .collect();
        drop(subs);
        out.sort_by_key(|e| std::cmp::Reverse(e.1.last_seen));
        out
    }
}

fn evict_oldest<T>(subs: &mut HashMap<Box<str>, T>, seen: impl Fn(&T) -> Instant) {
    if let Some(oldest) = subs
        .iter()
        .min_by_key(|(_, s)| seen(s))
        .map(|(k, _)| k.clone())
    {
        subs.remove(&oldest);
    }
}

#[cfg(test)]
mod answer_cache_tests {
    use super::*;

    #[test]
    fn cache_hits_are_exact() {
        let cache = AnswerCache::default();
        let ok = bytes::Bytes::from_static(
            ews::send_notification_result(SubscriptionStatus::Ok).as_bytes(),
        );
        let unsub = bytes::Bytes::from_static(
            ews::send_notification_result(SubscriptionStatus::Unsubscribe).as_bytes(),
        );
        let s200 = http::StatusCode::OK;
        for _ in 0..2 {
            assert_eq!(cache.classify(s200, &ok), ReceiverAnswer::Ok);
        }
        assert_eq!(cache.classify(s200, &unsub), ReceiverAnswer::Unsubscribe);
        assert_eq!(cache.classify(s200, &ok), ReceiverAnswer::Ok);
        assert_eq!(
            cache.classify(http::StatusCode::BAD_GATEWAY, &ok),
            ReceiverAnswer::HttpError(502)
        );
        assert_eq!(
            cache.classify(s200, &bytes::Bytes::from_static(b"nope")),
            ReceiverAnswer::Unparsed
        );
    }
}

#[cfg(test)]
mod labels {
    use super::*;

    #[test]
    fn metric_labels_match() {
        use crate::metrics::{ANSWER_LABELS, SUBSCRIPTION_STATES};
        for a in [
            ReceiverAnswer::Ok,
            ReceiverAnswer::Unsubscribe,
            ReceiverAnswer::Unparsed,
            ReceiverAnswer::HttpError(500),
            ReceiverAnswer::Unreachable,
            ReceiverAnswer::Relay(SubscriptionStatus::Ok),
            ReceiverAnswer::Relay(SubscriptionStatus::Unsubscribe),
        ] {
            assert_eq!(ANSWER_LABELS[a.metric_index()], a.as_str());
        }
        assert_eq!(ANSWER_LABELS.len(), 7, "every answer kind is listed above");
        assert_eq!(State::ALL.map(State::as_str), SUBSCRIPTION_STATES);
    }
}

#[cfg(test)]
mod replaced {
    use super::*;

    const STATUS: &[u8] =
        include_bytes!("../../../ews/tests/fixtures/send-notification-status.xml");
    const STATUS_SUB: &str =
        "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAACkGm2Fhz9CTYx5mQ9Xh3l0";

    fn state_after(answer: ReceiverAnswer, retired: bool) -> (State, [usize; 8]) {
        // Stale at once: every silent subscription would be.
        let tracker = Tracker::new(Duration::ZERO);
        if retired {
            tracker.set_retired_check(|id| id == STATUS_SUB);
        }
        let n = ews::summarize_send_notification(STATUS).unwrap();
        let peer: IpAddr = "40.92.1.2".parse().unwrap();
        tracker.record(&n, peer, answer, Instant::now());
        let counts = tracker.sweep();
        assert_eq!(counts[Source::Graph as usize], [0; 8]);
        (tracker.snapshot()[0].2, counts[Source::Ews as usize])
    }

    #[test]
    fn retired_ids_are_replaced_never_stale() {
        let relay_ok = ReceiverAnswer::Relay(SubscriptionStatus::Ok);
        let relay_unsub = ReceiverAnswer::Relay(SubscriptionStatus::Unsubscribe);
        // Silent and not retired: stale, whoever answered.
        assert_eq!(state_after(ReceiverAnswer::Ok, false).0, State::Stale);
        assert_eq!(state_after(relay_ok, false).0, State::Stale);
        // The keeper retired it: replaced, counted as such, not as stale.
        let (state, counts) = state_after(relay_ok, true);
        assert_eq!(state, State::Replaced);
        assert_eq!(counts, [0, 0, 0, 0, 1, 0, 0, 0]);
        // The relay answered Unsubscribe to it: replaced even without the keeper's word.
        assert_eq!(state_after(relay_unsub, false).0, State::Replaced);
        // The receiver's own Unsubscribe stays the receiver's.
        assert_eq!(
            state_after(ReceiverAnswer::Unsubscribe, false).0,
            State::Unsubscribed
        );
    }
}

#[cfg(test)]
mod graph_rows {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn record(tracker: &Tracker, id: &str, exp: SystemTime, extra: &str, answer: ReceiverAnswer) {
        let body = format!(
            r#"{{"value":[{{"subscriptionId":"{id}","subscriptionExpirationDateTime":"{}","tenantId":"t1",{extra}}}]}}"#,
            graph::format_time(exp)
        );
        let c = graph::parse_collection(body.as_bytes()).unwrap();
        tracker.record_graph(&c, "52.1.2.3".parse().unwrap(), answer, Instant::now());
    }

    fn row(tracker: &Tracker, id: &str) -> (GraphSubscription, State) {
        let (_, s, st) = tracker
            .graph_snapshot()
            .into_iter()
            .find(|(i, _, _)| i == id)
            .unwrap();
        (s, st)
    }

    const CREATED: &str = r#""changeType":"created","resource":"Users/u1/Messages/m1""#;

    #[test]
    fn expiring_until_a_renewal_then_alive() {
        let tracker = Tracker::new(Duration::ZERO);
        let now = SystemTime::now();
        record(&tracker, "s", now + HOUR / 2, CREATED, ReceiverAnswer::Ok);
        let (s, st) = row(&tracker, "s");
        assert_eq!(st, State::Expiring, "{s:?}");
        assert_eq!(s.renewals, 0);
        // A later expiration: renewed, alive; never stale although --stale-after is zero.
        record(&tracker, "s", now + 72 * HOUR, CREATED, ReceiverAnswer::Ok);
        let (s, st) = row(&tracker, "s");
        assert_eq!((st, s.renewals), (State::Alive, 1));
        // A retried notification with the old expiration does not undo the renewal.
        record(&tracker, "s", now + HOUR / 2, CREATED, ReceiverAnswer::Ok);
        assert!(row(&tracker, "s").0.expiration.unwrap() > now + 71 * HOUR);
        // After a renewal, the share of the lifetime rules: 72 h lifetime, 7.2 h warning.
        let (s, _) = row(&tracker, "s");
        assert_eq!(s.state(now + 65 * HOUR), State::Expiring);
        assert_eq!(s.state(now + 60 * HOUR), State::Alive);
        assert_eq!(s.state(now + 73 * HOUR), State::Expired);
        assert_eq!(s.changes, [3, 0, 0, 0]);
        assert_eq!(s.resource.as_deref(), Some("Users/u1/Messages"));
        assert_eq!(s.tenant_id.as_deref(), Some("t1"));
        let counts = tracker.sweep();
        assert_eq!(counts[Source::Graph as usize][State::Alive as usize], 1);
        assert_eq!(counts[Source::Ews as usize], [0; 8]);
    }

    #[test]
    fn expired_removed_and_error() {
        let tracker = Tracker::new(Duration::from_secs(60));
        let now = SystemTime::now();
        record(&tracker, "old", now - HOUR, CREATED, ReceiverAnswer::Ok);
        record(
            &tracker,
            "gone",
            now + 48 * HOUR,
            r#""lifecycleEvent":"subscriptionRemoved""#,
            ReceiverAnswer::Ok,
        );
        record(
            &tracker,
            "err",
            now + 48 * HOUR,
            CREATED,
            ReceiverAnswer::HttpError(500),
        );
        assert_eq!(row(&tracker, "old").1, State::Expired);
        let (gone, st) = row(&tracker, "gone");
        assert_eq!(st, State::Removed);
        assert_eq!(gone.lifecycle, [0, 1, 0, 0]);
        assert_eq!(gone.last_lifecycle.unwrap().0, "subscriptionRemoved");
        assert_eq!(row(&tracker, "err").1, State::Error);
        let counts = tracker.sweep()[Source::Graph as usize];
        assert_eq!(
            (
                counts[State::Expired as usize],
                counts[State::Removed as usize],
                counts[State::Error as usize]
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn resource_is_the_collection_the_items_share() {
        assert_eq!(collection_of("Users/u1/Messages/m1"), "Users/u1/Messages");
        assert_eq!(
            collection_of("Users('u1')/Messages('m1')"),
            "Users('u1')/Messages"
        );
        assert_eq!(collection_of("me/events/e1/"), "me/events");
        assert_eq!(collection_of("single"), "single");
        assert_eq!(
            common_segments("Users/u1/Messages", "users/u1/messages"),
            "Users/u1/Messages"
        );
        assert_eq!(
            common_segments("Users/u1/Messages", "Users/u1/Events"),
            "Users/u1"
        );
        assert_eq!(common_segments("a/b", "x/b"), "");
    }

    #[test]
    fn forgotten_a_day_after_both_last_notification_and_expiry() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut s = GraphSubscription::new(wall, now, "52.1.2.3".parse().unwrap());
        let later = now + FORGET_AFTER + HOUR;
        assert!(
            s.forgettable(later, wall + FORGET_AFTER + HOUR),
            "no expiry known"
        );
        s.expiration = Some(wall + 72 * HOUR);
        assert!(
            !s.forgettable(later, wall + FORGET_AFTER + HOUR),
            "still valid"
        );
        assert!(s.forgettable(now + 97 * HOUR, wall + 97 * HOUR));
        s.expiration = Some(wall + 365 * 24 * HOUR);
        assert!(s.forgettable(now + GRAPH_KEEP_AT_MOST, wall + GRAPH_KEEP_AT_MOST));
    }
}
