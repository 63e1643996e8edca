//! The simulated Exchange's memory: mailboxes with their event logs, subscriptions with their
//! delivery cursors, issued tokens, armed faults and the record of every request. One mutex
//! guards it all; every critical section is short and does no I/O.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::Notify;

use super::soap::{FolderSpec, PushEvent};
use super::util::{base64, random_bytes, unbase64};
use super::{MailboxConfig, MailboxRedirect};
use ews::EventType;

use crate::graph_state::GraphState;
use crate::streaming::StreamingState;

/// Events kept per mailbox for resuming from a watermark. Exchange keeps about 30 days; a
/// simulator only needs enough for tests and demos, and a watermark older than the log is
/// refused with `ErrorInvalidWatermark`, as Exchange refuses one older than 30 days.
pub const MAX_EVENT_LOG: usize = 10_000;

/// Requests remembered for inspection; older ones are forgotten first.
pub const MAX_RECORDED_REQUESTS: usize = 1_000;

/// Ended subscriptions kept for inspection; the oldest ended ones are forgotten first.
pub const MAX_ENDED_SUBSCRIPTIONS: usize = 1_000;

/// Live subscriptions allowed per mailbox: Exchange Online's limit (PROTOCOL.md), so a client
/// that piles up stale subscriptions meets `ErrorExceededSubscriptionCount` here too.
pub const MAX_SUBSCRIPTIONS_PER_MAILBOX: usize = 20;

/// Most events in one push; more set `MoreEvents` and follow in the next push, as Exchange
/// batches them.
pub const MAX_EVENTS_PER_PUSH: usize = 50;

/// Most events created by one control call, so a typo cannot fill memory.
pub const MAX_EVENTS_PER_CALL: usize = 10_000;

/// First bytes of every watermark: a format version (and, as a side effect, the `AQAAA…`
/// look of Exchange's watermarks), so foreign strings decode as unknown.
const WATERMARK_PREFIX: [u8; 4] = [1, 0, 0, 0];

/// Bytes in a watermark: prefix, mailbox salt, generation, seq, nonce.
const WATERMARK_LEN: usize = 4 + 8 + 4 + 8 + 4;

/// One event in a mailbox's log.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    /// Position in the mailbox's log, from 1.
    pub seq: u64,
    /// What happened.
    pub kind: EventType,
    /// The watermark after this event.
    pub watermark: String,
    /// When (RFC 3339).
    pub timestamp: String,
    /// The item it is about.
    pub item_id: String,
}

/// A mailbox the simulator hosts.
#[derive(Debug)]
pub struct Mailbox {
    /// The address as configured.
    pub smtp: String,
    /// `GroupingInformation`.
    pub grouping: String,
    /// Autodiscover redirect, if configured.
    pub redirect: Option<MailboxRedirect>,
    /// Identifies the mailbox inside its watermarks.
    pub salt: [u8; 8],
    /// Bumped by the invalidate-watermarks fault: older watermarks no longer resolve.
    pub generation: u32,
    /// Recent events, oldest first.
    pub log: VecDeque<LoggedEvent>,
    /// The seq of the newest event (0: none yet).
    pub head: u64,
    /// Set by the move-mailbox fault; cleared when Autodiscover is asked about the mailbox.
    pub moved: bool,
    /// Set by the delete-mailbox fault: Subscribe for it, and any request anchored on it
    /// (`X-AnchorMailbox`), answer `ErrorNonExistentMailbox`; Autodiscover still answers.
    pub deleted: bool,
    /// Events created so far.
    pub events_created: u64,
    /// Subscriptions created so far.
    pub subscriptions_created: u64,
}

/// Why a subscription ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The callback answered `Unsubscribe`.
    Unsubscribed,
    /// No good answer within the retry budget (StatusFrequency).
    RetriesExhausted,
    /// Dropped silently by a fault (stop keep-alives, drop all): no message is sent.
    Dropped,
    /// An `ErrorReadEventsFailed` push was sent for it.
    ReadEventsFailed,
    /// The simulator shut down.
    Shutdown,
}

/// Where a subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum SubscriptionState {
    /// Pushing normally.
    Active,
    /// The last push got no good answer; retrying on Exchange's schedule.
    Retrying,
    /// Over.
    Ended(EndReason),
}

/// Counters of one subscription.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SubscriptionCounters {
    /// POSTs answered `OK` or `Unsubscribe`.
    pub pushes_ok: u64,
    /// POSTs that failed (no answer, error status, unparsable answer, timeout).
    pub pushes_failed: u64,
    /// StatusEvents delivered (the initial one included).
    pub status_events: u64,
    /// Other events delivered.
    pub events_delivered: u64,
}

/// A push subscription.
#[derive(Debug)]
pub struct Subscription {
    /// The opaque id.
    pub id: String,
    /// The mailbox key (lower-case address).
    pub mailbox: String,
    /// The callback URL.
    pub url: String,
    /// The event types pushed.
    pub event_types: Vec<EventType>,
    /// The folders asked for (not used for filtering: simulated events have no folder).
    pub folders: FolderSpec,
    /// Minutes; sets the retry budget.
    pub status_frequency: u16,
    /// Where it stands.
    pub state: SubscriptionState,
    /// The seq of the last event delivered or skipped.
    pub cursor: u64,
    /// The last watermark delivered (or returned by Subscribe): the next `PreviousWatermark`.
    pub previous_watermark: String,
    /// Whether the first push (a StatusEvent) went out.
    pub initial_sent: bool,
    /// An `ErrorReadEventsFailed` push is wanted.
    pub error_requested: bool,
    /// When it was created.
    pub created: SystemTime,
    /// When the last push was answered well.
    pub last_push_ok: Option<SystemTime>,
    /// Counters.
    pub counters: SubscriptionCounters,
    /// Wakes the push task: new events, a fault, an end.
    pub wake: Arc<Notify>,
}

/// A request as received, for tests to inspect.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedRequest {
    /// Arrival order, from 1.
    pub seq: u64,
    /// Arrival time (RFC 3339).
    pub time: String,
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers, in arrival order (values lossily decoded).
    pub headers: Vec<(String, String)>,
    /// The body (lossily decoded).
    pub body: String,
    /// Whether the request carried the `X-BackEndOverrideCookie` cookie.
    pub carried_affinity_cookie: bool,
    /// The HTTP status answered (0 while the request is being handled).
    pub status: u16,
    /// The EWS response code or fault code answered, when there was one.
    pub response_code: Option<String>,
}

/// Faults armed through the control API.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Faults {
    /// Next EWS requests to answer with an `ErrorServerBusy` fault.
    pub server_busy_remaining: u32,
    /// `BackOffMilliseconds` of those faults.
    pub server_busy_back_off_ms: u64,
    /// Next EWS requests to answer with HTTP 503.
    pub unavailable_remaining: u32,
    /// `Retry-After` seconds sent with the 503, if any.
    pub unavailable_retry_after: Option<u32>,
    /// Delay added before every EWS response.
    pub response_delay_ms: u64,
    /// Next `GetStreamingEvents` to refuse with `ErrorExceededConnectionCount`.
    pub streaming_refuse_remaining: u32,
    /// Next `GetStreamingEvents` whose response head waits [`Faults::streaming_head_delay_ms`]
    /// (the subscriptions move to the new connection only when it is answered).
    pub streaming_head_delay_remaining: u32,
    /// How long those wait.
    pub streaming_head_delay_ms: u64,
}

/// Everything the simulator remembers.
#[derive(Debug, Default)]
pub struct State {
    /// By lower-case address.
    pub mailboxes: BTreeMap<String, Mailbox>,
    /// By id; ended ones stay for inspection up to [`MAX_ENDED_SUBSCRIPTIONS`].
    pub subscriptions: BTreeMap<String, Subscription>,
    /// Ids of ended subscriptions, oldest first, to forget them in order.
    pub ended: VecDeque<String>,
    /// Bearer tokens: when each expires and what it is for.
    pub tokens: HashMap<String, IssuedToken>,
    /// Tokens issued so far.
    pub tokens_issued: u64,
    /// Armed faults.
    pub faults: Faults,
    /// Recent requests.
    pub requests: VecDeque<RecordedRequest>,
    /// Requests received so far.
    pub request_seq: u64,
    /// Affinity cookie value per grouping.
    pub affinity_cookies: HashMap<String, String>,
    /// Distinguishes watermarks made at the same position.
    pub nonce: u32,
    /// The Microsoft Graph side.
    pub graph: GraphState,
    /// Streaming subscriptions and connections.
    pub streaming: StreamingState,
}

/// A bearer token the token endpoint issued.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// When it stops working.
    pub expires: Instant,
    /// The `scope` it was asked for (`https://outlook.office365.com/.default`, or Graph's):
    /// Graph routes check it as Graph checks a token's audience.
    pub scope: String,
}

impl IssuedToken {
    /// Whether it still works.
    pub fn is_valid(&self, now: Instant) -> bool {
        self.expires > now
    }
}

impl State {
    /// A state hosting `mailboxes`.
    pub fn new(mailboxes: &[MailboxConfig]) -> Self {
        let mut state = State::default();
        for mailbox in mailboxes {
            state.add_mailbox(mailbox);
        }
        state
    }

    /// Adds (or replaces the settings of) a mailbox.
    pub fn add_mailbox(&mut self, config: &MailboxConfig) {
        let key = config.smtp.to_ascii_lowercase();
        if let Some(existing) = self.mailboxes.get_mut(&key) {
            existing.grouping = config.grouping.clone();
            existing.redirect = config.redirect.clone();
            return;
        }
        let mut salt = [0; 8];
        salt.copy_from_slice(&random_bytes(8));
        self.mailboxes.insert(
            key,
            Mailbox {
                smtp: config.smtp.clone(),
                grouping: config.grouping.clone(),
                redirect: config.redirect.clone(),
                salt,
                generation: 0,
                log: VecDeque::new(),
                head: 0,
                moved: false,
                deleted: false,
                events_created: 0,
                subscriptions_created: 0,
            },
        );
    }

    /// A new watermark for `mailbox` at position `seq`.
    pub fn watermark(&mut self, mailbox: &str, seq: u64) -> String {
        self.nonce = self.nonce.wrapping_add(1);
        let Some(m) = self.mailboxes.get(mailbox) else {
            return String::new();
        };
        let mut bytes = Vec::with_capacity(WATERMARK_LEN);
        bytes.extend_from_slice(&WATERMARK_PREFIX);
        bytes.extend_from_slice(&m.salt);
        bytes.extend_from_slice(&m.generation.to_le_bytes());
        bytes.extend_from_slice(&seq.to_le_bytes());
        bytes.extend_from_slice(&self.nonce.to_le_bytes());
        base64(&bytes)
    }

    /// The position a watermark stands for in `mailbox`, if it is one of this mailbox's,
    /// of the current generation, and not older than the log.
    pub fn resolve_watermark(&self, mailbox: &str, watermark: &str) -> Option<u64> {
        let bytes = unbase64(watermark)?;
        if bytes.len() != WATERMARK_LEN || bytes[..4] != WATERMARK_PREFIX {
            return None;
        }
        let m = self.mailboxes.get(mailbox)?;
        let generation = u32::from_le_bytes(bytes[12..16].try_into().ok()?);
        let seq = u64::from_le_bytes(bytes[16..24].try_into().ok()?);
        if bytes[4..12] != m.salt || generation != m.generation || seq > m.head {
            return None;
        }
        let oldest_resumable = m.log.front().map_or(m.head, |e| e.seq.saturating_sub(1));
        (seq >= oldest_resumable).then_some(seq)
    }

    /// Appends `count` events of `kind` to a mailbox's log and wakes its subscriptions.
    /// Returns the new events' watermarks.
    pub fn create_events(&mut self, mailbox: &str, kind: EventType, count: usize) -> Vec<String> {
        let mut watermarks = Vec::with_capacity(count);
        for _ in 0..count {
            let Some(head) = self.mailboxes.get(mailbox).map(|m| m.head + 1) else {
                return watermarks;
            };
            let watermark = self.watermark(mailbox, head);
            let item_id = format!("AAMkAD{}", base64(&random_bytes(30)));
            let Some(m) = self.mailboxes.get_mut(mailbox) else {
                return watermarks;
            };
            m.head = head;
            m.events_created += 1;
            m.log.push_back(LoggedEvent {
                seq: head,
                kind,
                watermark: watermark.clone(),
                timestamp: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                item_id,
            });
            if m.log.len() > MAX_EVENT_LOG {
                m.log.pop_front();
            }
            watermarks.push(watermark);
        }
        self.wake_mailbox(mailbox);
        watermarks
    }

    /// Wakes the push task of every live subscription of a mailbox, and the streaming
    /// connections serving its streaming subscriptions.
    pub fn wake_mailbox(&self, mailbox: &str) {
        self.streaming.wake_mailbox(mailbox);
        for sub in self.subscriptions.values() {
            if sub.mailbox == mailbox && !matches!(sub.state, SubscriptionState::Ended(_)) {
                sub.wake.notify_one();
            }
        }
    }

    /// Live subscriptions of a mailbox, push and streaming (Exchange counts both against
    /// the per-mailbox limit).
    pub fn live_count(&self, mailbox: &str) -> usize {
        self.subscriptions
            .values()
            .filter(|s| s.mailbox == mailbox && !matches!(s.state, SubscriptionState::Ended(_)))
            .count()
            + self.streaming.live_count(mailbox)
    }

    /// Ends a subscription (if live), wakes its task, and forgets the oldest ended ones.
    pub fn end(&mut self, id: &str, reason: EndReason) -> bool {
        let Some(sub) = self.subscriptions.get_mut(id) else {
            return false;
        };
        if matches!(sub.state, SubscriptionState::Ended(_)) {
            return false;
        }
        sub.state = SubscriptionState::Ended(reason);
        sub.wake.notify_one();
        self.ended.push_back(id.to_owned());
        while self.ended.len() > MAX_ENDED_SUBSCRIPTIONS {
            if let Some(old) = self.ended.pop_front() {
                self.subscriptions.remove(&old);
            }
        }
        true
    }

    /// The next batch of events for a subscription after its cursor: the events, the cursor
    /// after them, and whether more are waiting. Events of types it did not ask for are
    /// skipped (the cursor passes them).
    pub fn next_events(&self, id: &str) -> Option<(Vec<PushEvent>, u64, bool)> {
        let sub = self.subscriptions.get(id)?;
        let m = self.mailboxes.get(&sub.mailbox)?;
        if sub.cursor >= m.head {
            return None;
        }
        let mut events = Vec::new();
        let mut cursor = sub.cursor;
        let mut more = false;
        for event in m.log.iter().filter(|e| e.seq > sub.cursor) {
            if events.len() == MAX_EVENTS_PER_PUSH {
                more = true;
                break;
            }
            cursor = event.seq;
            if sub.event_types.contains(&event.kind) {
                events.push(PushEvent {
                    kind: event.kind,
                    watermark: event.watermark.clone(),
                    timestamp: Some(event.timestamp.clone()),
                    item_id: Some(event.item_id.clone()),
                    parent_folder_id: Some(folder_id(&m.salt)),
                });
            }
        }
        Some((events, cursor, more))
    }

    /// Records a request; returns its seq for [`State::finish_request`].
    pub fn record(&mut self, mut request: RecordedRequest) -> u64 {
        self.request_seq += 1;
        request.seq = self.request_seq;
        self.requests.push_back(request);
        while self.requests.len() > MAX_RECORDED_REQUESTS {
            self.requests.pop_front();
        }
        self.request_seq
    }

    /// Notes what a recorded request was answered.
    pub fn finish_request(&mut self, seq: u64, status: u16, code: Option<String>) {
        if let Some(r) = self.requests.iter_mut().rev().find(|r| r.seq == seq) {
            r.status = status;
            r.response_code = code;
        }
    }
}

/// A stable fake folder id for a mailbox's events.
pub(crate) fn folder_id(salt: &[u8; 8]) -> String {
    format!(
        "AAMkADk0ZTI3{}AAuAAAAAAA",
        base64(salt).trim_end_matches('=')
    )
}

/// Rounds a duration to whole milliseconds for JSON.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
