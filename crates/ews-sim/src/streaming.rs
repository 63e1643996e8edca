//! EWS streaming notifications, server side: streaming subscriptions, the long-lived
//! `GetStreamingEvents` connections that carry their events, and the faults tests inject into
//! them.
//!
//! A streaming subscription is a cursor into its mailbox's event log (the same log push
//! subscriptions read), so events that happen while no connection serves it wait in the log
//! and go out when one opens. A connection is a task writing SOAP envelopes into a chunked
//! HTTP body: events as they happen, a keep-alive every [`crate::SimConfig::streaming_keepalive`],
//! and `ConnectionStatus` `Closed` when its `ConnectionTimeout` runs out. The task sleeps on a
//! `Notify` between envelopes: nothing polls.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hyper::body::Frame;
use serde::Serialize;
use tokio::sync::{mpsc, Notify};

use super::soap::FolderSpec;
use super::state::{Mailbox, MAX_EVENTS_PER_PUSH};
use super::stream_soap::{self, Envelope, StreamError, StreamEvent};
use super::Shared;
use ews::EventType;

/// Most events in one envelope over all its notifications, so an envelope stays far below the
/// 4 MiB a client's splitter accepts; more follow in the next envelope at once.
pub const MAX_EVENTS_PER_ENVELOPE: usize = 1_000;

/// Ended connections kept for inspection; the oldest are forgotten first.
pub const MAX_RECORDED_CONNECTIONS: usize = 1_000;

/// Envelopes buffered between a connection's task and the socket. A client that stops reading
/// fills it and the task waits, as a server's send buffer would.
const BODY_BUFFER: usize = 8;

/// How long the mid-envelope cut waits between writing its partial envelope and dropping the
/// socket, so the partial bytes are on the wire first.
const PARTIAL_FLUSH: Duration = Duration::from_millis(100);

/// How long a write may wait on a client that does not read before it counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a streaming subscription is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamingEnd {
    /// `Unsubscribe`.
    Unsubscribed,
    /// No connection served it for the subscription lifetime, or the expire fault.
    Expired,
    /// Its mailbox moved (reported as `ErrorProxyRequestNotAllowed`).
    Moved,
}

/// A streaming subscription.
#[derive(Debug)]
pub struct StreamingSubscription {
    /// The opaque id.
    pub id: String,
    /// The mailbox key (lower-case address).
    pub mailbox: String,
    /// The mailbox server it lives on: its mailbox's `GroupingInformation` when created.
    pub grouping: String,
    /// The `X-BackEndOverrideCookie` of its affinity group, when created with affinity: a
    /// `GetStreamingEvents` for it must carry it.
    pub cookie: Option<String>,
    /// The event types streamed.
    pub event_types: Vec<EventType>,
    /// The folders asked for (simulated events have no folder: not used to filter).
    pub folders: FolderSpec,
    /// Created.
    pub created: SystemTime,
    /// The seq of the last event delivered or skipped.
    pub cursor: u64,
    /// The connection serving it, if one is open.
    pub connection: Option<u64>,
    /// Since when no connection serves it (creation, or the last connection's end).
    pub idle_since: Instant,
    /// Why it is over, if it is.
    pub end: Option<StreamingEnd>,
    /// The missed-events fault: report `ErrorMissedNotificationEvents` next.
    pub missed_requested: bool,
    /// Events delivered.
    pub events_delivered: u64,
    /// Connections that served it.
    pub connections: u64,
}

/// How a streaming connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionEnd {
    /// Its `ConnectionTimeout` ran out: `ConnectionStatus` `Closed` was sent.
    Closed,
    /// Every subscription it served went away (unsubscribed, expired, moved): `Closed` sent.
    NoSubscriptions,
    /// Newer connections took every subscription it served: `Closed` sent after
    /// `ErrorNewEventStreamConnectionOpened`.
    Replaced,
    /// The cut fault: the TCP connection was dropped without a `Closed` envelope.
    Cut,
    /// The client went away (closed the socket, or stopped reading).
    ClientGone,
    /// Refused at once (an error answer, no stream); `refused_code` says why.
    Refused,
    /// The simulator shut down.
    Shutdown,
}

/// A fault armed on an open connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Cut,
    Stall,
    /// Write the first part of the next envelope (events or a keep-alive), then cut.
    CutMidEnvelope,
    /// Write one well-framed envelope that is not a `GetStreamingEventsResponse`, then go on.
    Malformed,
}

/// The envelope the malformed-envelope fault writes: complete, well-formed XML a splitter
/// takes as one envelope, whose body is no `GetStreamingEventsResponse`.
pub const MALFORMED_ENVELOPE: &str = concat!(
    r#"<?xml version="1.0" encoding="utf-8"?>"#,
    r#"<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">"#,
    r#"<soap:Body><m:GetItemResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">"#,
    r#"<m:NotWhatWasAskedFor/></m:GetItemResponse></soap:Body></soap:Envelope>"#,
);

/// One `GetStreamingEvents` connection, open or ended.
#[derive(Debug)]
pub struct StreamingConnection {
    /// Order of arrival, from 1.
    pub id: u64,
    /// The subscription ids asked for.
    pub requested: Vec<String>,
    /// The ids it still serves.
    pub serving: Vec<String>,
    /// `X-AnchorMailbox`.
    pub anchor: Option<String>,
    /// The account its connection limit is charged to.
    pub account: String,
    /// Whether it carried the affinity cookie.
    pub carried_cookie: bool,
    /// Opened.
    pub opened: SystemTime,
    /// Ended.
    pub closed: Option<SystemTime>,
    /// How long it stays open.
    pub timeout: Duration,
    /// Envelopes written (keep-alives and `Closed` included).
    pub envelopes: u64,
    /// Keep-alive envelopes written.
    pub keepalives: u64,
    /// Events written.
    pub events: u64,
    /// Error messages written, in order: `(code, ids)`.
    pub errors: Vec<(String, Vec<String>)>,
    /// How it ended.
    pub end: Option<ConnectionEnd>,
    /// The code it was refused with.
    pub refused_code: Option<String>,
    /// Whether the stall fault froze it.
    pub stalled: bool,
    /// Malformed envelopes written by the malformed-envelope fault.
    pub malformed: u64,
    /// Bytes of an unfinished envelope written before the mid-envelope cut.
    pub cut_mid_envelope: Option<usize>,
    command: Option<Command>,
    pending_errors: Vec<StreamError>,
    /// A newer connection took some of its subscriptions.
    replaced_some: bool,
    wake: Arc<Notify>,
}

impl StreamingConnection {
    fn is_open(&self) -> bool {
        self.end.is_none()
    }
}

/// The streaming side of the simulator's memory.
#[derive(Debug, Default)]
pub struct StreamingState {
    /// By id.
    pub subscriptions: HashMap<String, StreamingSubscription>,
    /// By id (arrival order).
    pub connections: BTreeMap<u64, StreamingConnection>,
    /// Ended connections, oldest first, to forget them in order.
    ended: VecDeque<u64>,
    /// The last connection id given.
    next_connection: u64,
}

/// What a connection's task does next.
enum Step {
    /// Write this envelope; `end` when it is the last; `more` when more is waiting.
    Send {
        envelope: String,
        end: Option<ConnectionEnd>,
        more: bool,
    },
    /// Drop the socket.
    Cut,
    /// Write these bytes (part of an envelope), then drop the socket.
    CutPartial(String),
    /// Say nothing ever again.
    Stall,
    /// Nothing to say.
    Idle,
    /// The record is gone or ended.
    Gone,
}

impl StreamingState {
    /// Live (not ended) streaming subscriptions of a mailbox.
    pub fn live_count(&self, mailbox: &str) -> usize {
        self.subscriptions
            .values()
            .filter(|s| s.mailbox == mailbox && s.end.is_none())
            .count()
    }

    /// Ends every subscription no connection served for `lifetime`.
    pub fn expire_idle(&mut self, now: Instant, lifetime: Duration) {
        for sub in self.subscriptions.values_mut() {
            if sub.end.is_none()
                && sub.connection.is_none()
                && now.saturating_duration_since(sub.idle_since) >= lifetime
            {
                sub.end = Some(StreamingEnd::Expired);
            }
        }
    }

    /// Wakes the connections serving a mailbox's subscriptions (new events, a move).
    pub fn wake_mailbox(&self, mailbox: &str) {
        for sub in self.subscriptions.values() {
            if sub.mailbox != mailbox {
                continue;
            }
            if let Some(conn) = sub.connection.and_then(|c| self.connections.get(&c)) {
                conn.wake.notify_one();
            }
        }
    }

    /// Wakes the connection serving a subscription, if any.
    fn wake_subscription(&self, id: &str) {
        if let Some(conn) = self
            .subscriptions
            .get(id)
            .and_then(|s| s.connection)
            .and_then(|c| self.connections.get(&c))
        {
            conn.wake.notify_one();
        }
    }

    /// Open connections charged to `account`.
    pub fn open_connections(&self, account: &str) -> usize {
        self.connections
            .values()
            .filter(|c| c.is_open() && c.account == account)
            .count()
    }

    fn new_connection(&mut self) -> u64 {
        self.next_connection += 1;
        self.next_connection
    }

    fn remember_ended(&mut self, id: u64) {
        self.ended.push_back(id);
        while self.ended.len() > MAX_RECORDED_CONNECTIONS {
            if let Some(old) = self.ended.pop_front() {
                self.connections.remove(&old);
            }
        }
    }

    /// Ends a connection's record and frees its subscriptions.
    fn finish(&mut self, id: u64, end: ConnectionEnd) {
        let Some(conn) = self.connections.get_mut(&id) else {
            return;
        };
        if conn.end.is_some() {
            return;
        }
        conn.end = Some(end);
        conn.closed = Some(SystemTime::now());
        let now = Instant::now();
        for sub in self.subscriptions.values_mut() {
            if sub.connection == Some(id) {
                sub.connection = None;
                sub.idle_since = now;
            }
        }
        self.remember_ended(id);
    }

    /// Arms a fault on open connections (one, or all): how many.
    fn command(&mut self, connection: Option<u64>, command: Command) -> usize {
        let mut n = 0;
        for conn in self.connections.values_mut() {
            if conn.is_open() && connection.is_none_or(|id| id == conn.id) {
                conn.command = Some(command);
                conn.wake.notify_one();
                n += 1;
            }
        }
        n
    }

    /// Decides a connection's next envelope under the lock: faults first, then errors and
    /// events of the subscriptions it serves.
    fn step(&mut self, id: u64, mailboxes: &BTreeMap<String, Mailbox>) -> Step {
        let Some(conn) = self.connections.get_mut(&id) else {
            return Step::Gone;
        };
        if conn.end.is_some() {
            return Step::Gone;
        }
        match conn.command {
            Some(Command::Cut) => return Step::Cut,
            Some(Command::Stall) => return Step::Stall,
            Some(Command::Malformed) => {
                conn.command = None;
                conn.envelopes += 1;
                conn.malformed += 1;
                return Step::Send {
                    envelope: MALFORMED_ENVELOPE.to_owned(),
                    end: None,
                    // Whatever else is waiting goes out right after.
                    more: true,
                };
            }
            Some(Command::CutMidEnvelope) => {
                // The envelope it would have written (events leave the log for good, as on a
                // server that wrote them into a socket that then died), cut in half.
                conn.command = None;
                let envelope = match self.step(id, mailboxes) {
                    Step::Send { envelope, .. } => envelope,
                    Step::Idle => stream_soap::streaming_envelope(&Envelope {
                        success: true,
                        ..Envelope::default()
                    }),
                    other => return other,
                };
                let mut half = envelope.len() / 2;
                while !envelope.is_char_boundary(half) {
                    half -= 1;
                }
                let part = envelope[..half].to_owned();
                if let Some(conn) = self.connections.get_mut(&id) {
                    conn.cut_mid_envelope = Some(part.len());
                }
                return Step::CutPartial(part);
            }
            None => {}
        }
        let mut errors = std::mem::take(&mut conn.pending_errors);
        let serving = conn.serving.clone();
        let mut keep = Vec::with_capacity(serving.len());
        let mut notifications = Vec::new();
        let (mut total, mut more) = (0, false);
        for sub_id in serving {
            let Some(sub) = self.subscriptions.get_mut(&sub_id) else {
                continue;
            };
            if sub.connection != Some(id) {
                continue;
            }
            match sub.end {
                Some(StreamingEnd::Unsubscribed) => {
                    sub.connection = None;
                    continue;
                }
                Some(StreamingEnd::Expired) => {
                    add_error(&mut errors, "ErrorSubscriptionNotFound", &sub_id);
                    sub.connection = None;
                    continue;
                }
                Some(StreamingEnd::Moved) => {
                    add_error(&mut errors, "ErrorProxyRequestNotAllowed", &sub_id);
                    sub.connection = None;
                    continue;
                }
                None => {}
            }
            let Some(mailbox) = mailboxes.get(&sub.mailbox) else {
                continue;
            };
            if mailbox.moved {
                sub.end = Some(StreamingEnd::Moved);
                sub.connection = None;
                add_error(&mut errors, "ErrorProxyRequestNotAllowed", &sub_id);
                continue;
            }
            keep.push(sub_id.clone());
            // Events older than the log are lost: that is a missed-events report too.
            let oldest = mailbox.log.front().map_or(mailbox.head + 1, |e| e.seq);
            if sub.missed_requested || (sub.cursor < mailbox.head && oldest > sub.cursor + 1) {
                sub.missed_requested = false;
                sub.cursor = mailbox.head;
                add_error(&mut errors, "ErrorMissedNotificationEvents", &sub_id);
                continue;
            }
            if sub.cursor >= mailbox.head {
                continue;
            }
            if total >= MAX_EVENTS_PER_ENVELOPE {
                more = true;
                continue;
            }
            let mut events = Vec::new();
            let mut cursor = sub.cursor;
            let start = mailbox.log.partition_point(|e| e.seq <= sub.cursor);
            for event in mailbox.log.range(start..) {
                if events.len() == MAX_EVENTS_PER_PUSH || total >= MAX_EVENTS_PER_ENVELOPE {
                    more = true;
                    break;
                }
                cursor = event.seq;
                if sub.event_types.contains(&event.kind) {
                    events.push(StreamEvent {
                        kind: event.kind,
                        timestamp: event.timestamp.clone(),
                        item_id: event.item_id.clone(),
                        parent_folder_id: super::state::folder_id(&mailbox.salt),
                    });
                    total += 1;
                }
            }
            sub.cursor = cursor;
            if !events.is_empty() {
                sub.events_delivered += events.len() as u64;
                notifications.push((sub_id, events));
            }
        }
        let conn = self.connections.get_mut(&id).expect("checked above");
        conn.serving = keep;
        if errors.is_empty() && notifications.is_empty() && !conn.serving.is_empty() {
            return Step::Idle;
        }
        let closing = conn.serving.is_empty();
        let end = closing.then_some(if conn.replaced_some {
            ConnectionEnd::Replaced
        } else {
            ConnectionEnd::NoSubscriptions
        });
        let envelope = stream_soap::streaming_envelope(&Envelope {
            errors: &errors,
            notifications: &notifications,
            success: !notifications.is_empty() || closing,
            closed: closing,
        });
        conn.envelopes += 1;
        conn.events += total as u64;
        for error in errors {
            conn.errors.push((error.code.to_owned(), error.ids));
        }
        Step::Send {
            envelope,
            end,
            more,
        }
    }

    /// A keep-alive (or, at the timeout, `Closed`) envelope, counted.
    fn status_envelope(&mut self, id: u64, closed: bool) -> Option<String> {
        let conn = self.connections.get_mut(&id).filter(|c| c.is_open())?;
        if conn.command.is_some() {
            return None;
        }
        conn.envelopes += 1;
        if !closed {
            conn.keepalives += 1;
        }
        Some(stream_soap::streaming_envelope(&Envelope {
            success: true,
            closed,
            ..Envelope::default()
        }))
    }
}

fn add_error(errors: &mut Vec<StreamError>, code: &'static str, id: &str) {
    match errors.iter_mut().find(|e| e.code == code) {
        Some(error) => error.ids.push(id.to_owned()),
        None => errors.push(StreamError {
            code,
            ids: vec![id.to_owned()],
        }),
    }
}

/// A new streaming subscription's record.
pub(crate) fn new_subscription(
    id: String,
    mailbox: String,
    grouping: String,
    cookie: Option<String>,
    event_types: Vec<EventType>,
    folders: FolderSpec,
    cursor: u64,
) -> StreamingSubscription {
    StreamingSubscription {
        id,
        mailbox,
        grouping,
        cookie,
        event_types,
        folders,
        created: SystemTime::now(),
        cursor,
        connection: None,
        idle_since: Instant::now(),
        end: None,
        missed_requested: false,
        events_delivered: 0,
        connections: 0,
    }
}

/// How a `GetStreamingEvents` is routed: what the request carried.
pub(crate) struct Route<'a> {
    /// `X-AnchorMailbox`, lower-cased.
    pub anchor: Option<&'a str>,
    /// The `X-BackEndOverrideCookie` carried.
    pub cookie: Option<&'a str>,
    /// `X-PreferServerAffinity: true`: with it, a valid cookie routes the request.
    pub prefer_affinity: bool,
    /// The account the connection is charged to.
    pub account: String,
}

/// What the handler answers.
pub(crate) enum Opened {
    /// An envelope answered at once, with its code for the record (no stream).
    Refused(String, String),
    /// The stream: its body.
    Stream(StreamBody),
}

/// Opens a `GetStreamingEvents` connection: checks the limits and every id's routing, takes
/// over ids other connections serve, and starts the task writing the stream.
pub(crate) fn open(
    shared: &Arc<Shared>,
    request: stream_soap::GetStreamingEvents,
    route: Route<'_>,
) -> Opened {
    let config = &shared.config;
    let mut guard = shared.lock();
    let state = &mut *guard;
    let now = Instant::now();
    let lifetime = config.streaming_subscription_lifetime_scaled();
    state.streaming.expire_idle(now, lifetime);

    let refuse = |state: &mut super::state::State, code: &'static str, ids: Vec<String>| {
        let id = state.streaming.new_connection();
        let errors = [StreamError { code, ids }];
        let body = stream_soap::streaming_envelope(&Envelope {
            errors: &errors,
            ..Envelope::default()
        });
        state.streaming.connections.insert(
            id,
            StreamingConnection {
                id,
                requested: request.ids.clone(),
                serving: Vec::new(),
                anchor: route.anchor.map(str::to_owned),
                account: route.account.clone(),
                carried_cookie: route.cookie.is_some(),
                opened: SystemTime::now(),
                closed: Some(SystemTime::now()),
                timeout: Duration::ZERO,
                envelopes: 1,
                keepalives: 0,
                events: 0,
                errors: vec![(code.to_owned(), errors[0].ids.clone())],
                end: Some(ConnectionEnd::Refused),
                refused_code: Some(code.to_owned()),
                stalled: false,
                malformed: 0,
                cut_mid_envelope: None,
                command: None,
                pending_errors: Vec::new(),
                replaced_some: false,
                wake: Arc::new(Notify::new()),
            },
        );
        state.streaming.remember_ended(id);
        Opened::Refused(body, code.to_owned())
    };

    if state.faults.streaming_refuse_remaining > 0 {
        state.faults.streaming_refuse_remaining -= 1;
        return refuse(state, "ErrorExceededConnectionCount", Vec::new());
    }
    // The front end routes by X-AnchorMailbox before it looks at any id: an anchor that is
    // gone or has moved fails the whole request (no ErrorSubscriptionIds).
    if let Some(key) = route.anchor {
        match state.mailboxes.get(key) {
            Some(m) if m.deleted => {
                return refuse(state, "ErrorNonExistentMailbox", Vec::new());
            }
            Some(m) if m.moved => {
                // Its subscriptions moved with it: gone from the server that had them.
                for sub in state.streaming.subscriptions.values_mut() {
                    if sub.mailbox == key && sub.end.is_none() {
                        sub.end = Some(StreamingEnd::Moved);
                    }
                }
                return refuse(state, "ErrorProxyRequestNotAllowed", Vec::new());
            }
            _ => {}
        }
    }
    if request.ids.len() > stream_soap::MAX_IDS_PER_CONNECTION {
        return refuse(state, "ErrorInvalidArgument", Vec::new());
    }
    if state.streaming.open_connections(&route.account) >= config.streaming_connection_limit {
        return refuse(state, "ErrorExceededConnectionCount", Vec::new());
    }

    // Where the front end sends the request ("Maintain affinity between a group of
    // subscriptions and the Mailbox server"): X-PreferServerAffinity and a valid
    // X-BackEndOverrideCookie route it to the cookie's mailbox server; without the cookie,
    // X-AnchorMailbox does. X-AnchorMailbox is required either way: without it the request
    // lands on any server, which does not have the subscriptions.
    let cookie_group = route
        .cookie
        .filter(|_| route.prefer_affinity)
        .and_then(|cookie| {
            state
                .affinity_cookies
                .iter()
                .find(|(_, value)| value.as_str() == cookie)
                .map(|(group, _)| group.clone())
        });
    let anchor_group = route
        .anchor
        .and_then(|a| state.mailboxes.get(a))
        .map(|m| m.grouping.clone());
    let routed = route.anchor.and(cookie_group.or(anchor_group));

    let mut errors: Vec<StreamError> = Vec::new();
    let mut valid = Vec::new();
    for sub_id in &request.ids {
        let Some(sub) = state.streaming.subscriptions.get_mut(sub_id) else {
            add_error(&mut errors, "ErrorSubscriptionNotFound", sub_id);
            continue;
        };
        let moved = state.mailboxes.get(&sub.mailbox).is_none_or(|m| m.moved);
        if moved || sub.end == Some(StreamingEnd::Moved) {
            // Until Autodiscover is asked again the request is proxied nowhere; after, the
            // subscription is simply gone from the server that had it.
            if moved {
                sub.end = Some(StreamingEnd::Moved);
                add_error(&mut errors, "ErrorProxyRequestNotAllowed", sub_id);
            } else {
                add_error(&mut errors, "ErrorSubscriptionNotFound", sub_id);
            }
            continue;
        }
        let routed_here = routed.as_deref() == Some(sub.grouping.as_str());
        let cookie_ok = sub
            .cookie
            .as_deref()
            .is_none_or(|c| route.cookie == Some(c));
        if sub.end.is_some() || !routed_here || !cookie_ok {
            add_error(&mut errors, "ErrorSubscriptionNotFound", sub_id);
            continue;
        }
        valid.push(sub_id.clone());
    }
    if valid.is_empty() {
        // Nothing to stream: one envelope with the errors, as a plain answer.
        let code = errors
            .first()
            .map_or("ErrorSubscriptionNotFound", |e| e.code);
        let ids = errors.first().map(|e| e.ids.clone()).unwrap_or_default();
        if errors.len() <= 1 {
            return refuse(state, code, ids);
        }
        // Several codes: keep them all in the one envelope.
        let body = stream_soap::streaming_envelope(&Envelope {
            errors: &errors,
            ..Envelope::default()
        });
        let Opened::Refused(_, code) = refuse(state, code, ids) else {
            unreachable!("refuse always refuses")
        };
        return Opened::Refused(body, code);
    }

    let id = state.streaming.new_connection();
    // Ids another connection serves move here; that one is told so.
    for sub_id in &valid {
        let Some(sub) = state.streaming.subscriptions.get_mut(sub_id) else {
            continue;
        };
        if let Some(old) = sub
            .connection
            .replace(id)
            .and_then(|old| state.streaming.connections.get_mut(&old))
        {
            old.serving.retain(|s| s != sub_id);
            old.replaced_some = true;
            add_error(
                &mut old.pending_errors,
                "ErrorNewEventStreamConnectionOpened",
                sub_id,
            );
            old.wake.notify_one();
        }
        if let Some(sub) = state.streaming.subscriptions.get_mut(sub_id) {
            sub.connections += 1;
        }
    }
    let timeout = config.streaming_connection_timeout.unwrap_or_else(|| {
        Duration::from_secs(60 * u64::from(request.timeout_minutes)).mul_f64(config.time_factor)
    });
    let wake = Arc::new(Notify::new());
    state.streaming.connections.insert(
        id,
        StreamingConnection {
            id,
            requested: request.ids.clone(),
            serving: valid,
            anchor: route.anchor.map(str::to_owned),
            account: route.account,
            carried_cookie: route.cookie.is_some(),
            opened: SystemTime::now(),
            closed: None,
            timeout,
            envelopes: 0,
            keepalives: 0,
            events: 0,
            errors: Vec::new(),
            end: None,
            refused_code: None,
            stalled: false,
            malformed: 0,
            cut_mid_envelope: None,
            command: None,
            pending_errors: errors,
            replaced_some: false,
            wake: wake.clone(),
        },
    );
    drop(guard);

    let (tx, rx) = mpsc::channel(BODY_BUFFER);
    let task_shared = shared.clone();
    let mut tasks = shared.lock_tasks();
    while tasks.try_join_next().is_some() {}
    tasks.spawn(connection_loop(task_shared, id, timeout, wake, tx));
    Opened::Stream(StreamBody { rx })
}

/// What travels to the body: bytes, or an error that makes hyper drop the connection.
type Chunk = Result<Bytes, io::Error>;

/// Writes one connection's stream until it ends.
async fn connection_loop(
    shared: Arc<Shared>,
    id: u64,
    timeout: Duration,
    wake: Arc<Notify>,
    tx: mpsc::Sender<Chunk>,
) {
    let end = run_connection(&shared, id, timeout, &wake, &tx).await;
    shared.lock().streaming.finish(id, end);
    shared.changed();
    if end == ConnectionEnd::Cut {
        // An error frame makes hyper close the socket without the last chunk.
        let cut = Err(io::Error::other("cut by the simulator"));
        let _ = tokio::time::timeout(WRITE_TIMEOUT, tx.send(cut)).await;
    }
    // Dropping the sender ends the body (with its last chunk unless cut).
}

async fn run_connection(
    shared: &Arc<Shared>,
    id: u64,
    timeout: Duration,
    wake: &Notify,
    tx: &mpsc::Sender<Chunk>,
) -> ConnectionEnd {
    let mut shutdown = shared.shutdown.subscribe();
    if *shutdown.borrow() {
        return ConnectionEnd::Shutdown;
    }
    let keepalive = shared.config.streaming_keepalive;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut next_keepalive = tokio::time::Instant::now() + keepalive;
    loop {
        let step = {
            let mut guard = shared.lock();
            let state = &mut *guard;
            state.streaming.step(id, &state.mailboxes)
        };
        match step {
            Step::Gone => return ConnectionEnd::Shutdown,
            Step::Cut => return ConnectionEnd::Cut,
            Step::CutPartial(part) => {
                shared.changed();
                if !write(tx, part).await {
                    return ConnectionEnd::ClientGone;
                }
                // Let the partial chunk reach the socket before it is dropped.
                tokio::time::sleep(PARTIAL_FLUSH).await;
                return ConnectionEnd::Cut;
            }
            Step::Stall => {
                if let Some(conn) = shared.lock().streaming.connections.get_mut(&id) {
                    conn.stalled = true;
                }
                shared.changed();
                // Silent until the client gives up, the simulator stops, or a cut is armed.
                tokio::select! {
                    _ = tx.closed() => return ConnectionEnd::ClientGone,
                    _ = shutdown.changed() => return ConnectionEnd::Shutdown,
                    _ = wake.notified() => continue,
                }
            }
            Step::Send {
                envelope,
                end,
                more,
            } => {
                shared.changed();
                if !write(tx, envelope).await {
                    return ConnectionEnd::ClientGone;
                }
                next_keepalive = tokio::time::Instant::now() + keepalive;
                if let Some(end) = end {
                    return end;
                }
                if more {
                    continue;
                }
            }
            Step::Idle => {}
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(next_keepalive) => {
                let envelope = shared.lock().streaming.status_envelope(id, false);
                if let Some(envelope) = envelope {
                    shared.changed();
                    if !write(tx, envelope).await {
                        return ConnectionEnd::ClientGone;
                    }
                }
                next_keepalive = tokio::time::Instant::now() + keepalive;
            }
            _ = tokio::time::sleep_until(deadline) => {
                let envelope = shared.lock().streaming.status_envelope(id, true);
                match envelope {
                    Some(envelope) => {
                        if !write(tx, envelope).await {
                            return ConnectionEnd::ClientGone;
                        }
                        return ConnectionEnd::Closed;
                    }
                    // A fault was armed at the same moment: let it act.
                    None => continue,
                }
            }
            _ = tx.closed() => return ConnectionEnd::ClientGone,
            _ = shutdown.changed() => return ConnectionEnd::Shutdown,
        }
    }
}

async fn write(tx: &mpsc::Sender<Chunk>, envelope: String) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, tx.send(Ok(Bytes::from(envelope)))).await,
        Ok(Ok(()))
    )
}

/// The chunked body of a `GetStreamingEvents` answer: whatever its connection's task sends.
pub(crate) struct StreamBody {
    rx: mpsc::Receiver<Chunk>,
}

impl hyper::body::Body for StreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| c.map(Frame::data)))
    }
}

/// Arms the cut fault on one open connection, or all: how many.
pub(crate) fn cut(state: &mut super::state::State, connection: Option<u64>) -> usize {
    state.streaming.command(connection, Command::Cut)
}

/// Arms the mid-envelope cut on one open connection, or all: how many.
pub(crate) fn cut_mid_envelope(state: &mut super::state::State, connection: Option<u64>) -> usize {
    state.streaming.command(connection, Command::CutMidEnvelope)
}

/// Arms the malformed-envelope fault on one open connection, or all: how many.
pub(crate) fn malformed(state: &mut super::state::State, connection: Option<u64>) -> usize {
    state.streaming.command(connection, Command::Malformed)
}

/// Arms the stall fault on one open connection, or all: how many.
pub(crate) fn stall(state: &mut super::state::State, connection: Option<u64>) -> usize {
    state.streaming.command(connection, Command::Stall)
}

/// The expire fault: the subscription is gone; its connection reports it.
pub(crate) fn expire(state: &mut super::state::State, id: &str) -> bool {
    let Some(sub) = state
        .streaming
        .subscriptions
        .get_mut(id)
        .filter(|s| s.end.is_none())
    else {
        return false;
    };
    sub.end = Some(StreamingEnd::Expired);
    state.streaming.wake_subscription(id);
    true
}

/// The missed-events fault: the subscription's next envelope reports
/// `ErrorMissedNotificationEvents` (and the events waiting are lost).
pub(crate) fn miss_events(state: &mut super::state::State, id: &str) -> bool {
    let Some(sub) = state
        .streaming
        .subscriptions
        .get_mut(id)
        .filter(|s| s.end.is_none())
    else {
        return false;
    };
    sub.missed_requested = true;
    state.streaming.wake_subscription(id);
    true
}

/// `Unsubscribe`: the EWS response code.
pub(crate) fn unsubscribe(state: &mut super::state::State, id: &str) -> &'static str {
    match state
        .streaming
        .subscriptions
        .get_mut(id)
        .filter(|s| s.end.is_none())
    {
        Some(sub) => {
            sub.end = Some(StreamingEnd::Unsubscribed);
            state.streaming.wake_subscription(id);
            "NoError"
        }
        None => "ErrorSubscriptionNotFound",
    }
}
