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

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::subscriptions::abbreviate;

use ews::{NotificationSummary, ResponseClass, SubscriptionStatus};

/// A subscription unseen for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Subscriptions tracked at most; when full, the least recently seen is forgotten first. Far
/// above any real deployment (Exchange Online allows 20 per mailbox) yet a hard bound on memory.
pub const MAX_TRACKED: usize = 100_000;

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
}

impl State {
    /// Every state, for metrics.
    pub const ALL: [State; 5] = [
        State::Alive,
        State::Stale,
        State::Unsubscribed,
        State::Error,
        State::Replaced,
    ];

    /// Label/JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Alive => "alive",
            State::Stale => "stale",
            State::Unsubscribed => "unsubscribed",
            State::Error => "error",
            State::Replaced => "replaced",
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

/// Says whether the relay's keeper has retired a subscription id (managed mode).
pub type RetiredCheck = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// The subscription table.
pub struct Tracker {
    stale_after: Duration,
    subs: Mutex<HashMap<Box<str>, Subscription>>,
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
                        evict_oldest(&mut subs);
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

    /// Record a Graph change notification collection (passthrough) and the receiver's answer.
    pub fn record_graph(
        &self,
        _c: &graph::Collection,
        _peer: IpAddr,
        _answer: ReceiverAnswer,
        _now: Instant,
    ) {
        // Graph rows in the tracker: next commit.
    }

    /// Mark silent subscriptions stale (logging each once) and forget long-gone ones; returns
    /// how many subscriptions are in each state, in [`State::ALL`] order.
    pub fn sweep(&self) -> [usize; State::ALL.len()] {
        let now = Instant::now();
        let mut counts = [0usize; State::ALL.len()];
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
            counts[state as usize] += 1;
        }
        counts
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

fn evict_oldest(subs: &mut HashMap<Box<str>, Subscription>) {
    if let Some(oldest) = subs
        .iter()
        .min_by_key(|(_, s)| s.last_seen_at)
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

    fn state_after(answer: ReceiverAnswer, retired: bool) -> (State, [usize; 5]) {
        // Stale at once: every silent subscription would be.
        let tracker = Tracker::new(Duration::ZERO);
        if retired {
            tracker.set_retired_check(|id| id == STATUS_SUB);
        }
        let n = ews::summarize_send_notification(STATUS).unwrap();
        let peer: IpAddr = "40.92.1.2".parse().unwrap();
        tracker.record(&n, peer, answer, Instant::now());
        let counts = tracker.sweep();
        (tracker.snapshot()[0].2, counts)
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
        assert_eq!(counts, [0, 0, 0, 0, 1]);
        // The relay answered Unsubscribe to it: replaced even without the keeper's word.
        assert_eq!(state_after(relay_unsub, false).0, State::Replaced);
        // The receiver's own Unsubscribe stays the receiver's.
        assert_eq!(
            state_after(ReceiverAnswer::Unsubscribe, false).0,
            State::Unsubscribed
        );
    }
}
