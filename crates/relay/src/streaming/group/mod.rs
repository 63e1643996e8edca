//! One group of at most 200 mailboxes sharing an EWS URL and `GroupingInformation`, and the
//! task that keeps them subscribed and streamed: streaming `Subscribe` per mailbox (the first
//! alone, for the `X-BackEndOverrideCookie` the others send), one `GetStreamingEvents` for all
//! the group's subscription ids, renewed before its `ConnectionTimeout` by an overlapping
//! connection, reopened at once when it closes, breaks or goes silent, and every envelope turned
//! into deliveries or per-mailbox repairs.
//!
//! # Overlap
//! A renewal opens the new connection while the old one still reads. Exchange moves each
//! subscription to the newest connection (telling the old one
//! `ErrorNewEventStreamConnectionOpened`, then `Closed`), so an event travels on exactly one
//! of them. The task keeps delivering the old connection's envelopes and holds the new one's
//! until the old one has ended (at most [`DRAIN_LIMIT`] after the new one's first envelope;
//! the old one keeps serving for as long as the new one takes to open): events reach the
//! receiver in Exchange's order, none lost, none twice. If the new connection ends during the
//! overlap after carrying events, its end waits for the old one too, so the order holds.
//!
//! # Gaps
//! A connection that breaks, goes silent, or loses part of an envelope after it opened may
//! have carried events the relay never read; streaming subscriptions have no watermark to
//! resume from, so each of its mailboxes (but those Exchange had already moved to a newer
//! connection) gets the resync signal. A connection Exchange closed (`Closed`) or never
//! opened needs none.
//!
//! # Layout
//! This file holds the group's state, its task's loop, commands and timers, and the clean
//! stop; the task's methods are spread by concern: [`subscribe`] (Subscribes and moves),
//! [`stream`] (connections, overlap, ends), [`repair`] (errors in a stream, resync, anchor),
//! [`deliver`] (notifications into the spool).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::connection::{self, ConnEvent, Connection, End, Route};
use super::Ctx;
use crate::store::{self, MailboxRecord, UnixMillis};

mod deliver;
mod repair;
mod stream;
mod subscribe;

use repair::elect_anchor;

/// The old connection of an overlap is given this long to end by itself after the new one
/// opened; then it is stopped (Exchange has moved every subscription to the new one by then).
pub(super) const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// A clean stop waits this long at most for the connections to hand over what they read.
const STOP_LIMIT: Duration = Duration::from_secs(5);
/// A connection ending sooner than this after it opened counts as a failure for back-off, so a
/// server that closes at once is not hammered.
pub(super) const MIN_HEALTHY: Duration = Duration::from_secs(5);

/// What the keeper tells a group.
#[derive(Debug)]
pub(super) enum Command {
    /// Follow this mailbox (its stored subscription id, if any, is tried first).
    Add(Box<MailboxRecord>),
    /// Stop following it, `Unsubscribe` it and forget it.
    Remove(String),
    /// Stop cleanly; answer when done.
    Stop(oneshot::Sender<()>),
}

/// A group's state as the views and the group's task share it.
#[derive(Debug)]
pub(super) struct GroupState {
    /// EWS URL of the group.
    pub ews_url: String,
    /// Autodiscover's `GroupingInformation` (empty with `--ews-url`).
    pub grouping: String,
    /// `X-AnchorMailbox` and impersonated mailbox of the group's connections.
    pub anchor: String,
    /// `X-BackEndOverrideCookie` from the group's first Subscribe.
    pub cookie: Option<String>,
    /// The members, by address.
    pub members: BTreeMap<String, Member>,
    /// Unix ms when the current connection opened.
    pub open_since: Option<UnixMillis>,
    /// Connections replaced or reopened.
    pub reconnects: u64,
    /// Connections open now (2 during an overlap).
    pub connections: u8,
    /// The last connection-level problem.
    pub last_error: Option<String>,
    /// Unix ms of the latest envelope of the current connection (shared with it).
    pub last_seen: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Mailboxes placed here whose `Add` is still queued (they count against the 200).
    pub pending_adds: usize,
}

/// One mailbox of a group.
#[derive(Debug, Clone)]
pub(super) struct Member {
    /// What the store keeps (subscription id, state, last error …).
    pub record: MailboxRecord,
    /// When to try subscribing again after a failure.
    retry_at: Option<Instant>,
    /// Failures in a row, for back-off.
    failures: u32,
    /// Subscriptions lost in a row (each followed by a successful Subscribe), and when the
    /// last was: a subscription that keeps getting lost is made again with back-off, not in
    /// a loop.
    losses: u32,
    last_loss: Option<Instant>,
}

/// Losses further apart than this do not count as "in a row".
pub(super) const LOSS_MEMORY: Duration = Duration::from_secs(600);

/// A group as the keeper holds it.
#[derive(Debug)]
pub(super) struct GroupHandle {
    pub state: Arc<Mutex<GroupState>>,
    pub commands: mpsc::UnboundedSender<Command>,
}

impl GroupHandle {
    /// Start a group's task at `ews_url` anchored on `anchor`.
    pub(super) fn spawn(ctx: Arc<Ctx>, ews_url: String, grouping: String, anchor: String) -> Self {
        let state = Arc::new(Mutex::new(GroupState {
            ews_url,
            grouping,
            anchor,
            cookie: None,
            members: BTreeMap::new(),
            open_since: None,
            reconnects: 0,
            connections: 0,
            last_error: None,
            last_seen: None,
            pending_adds: 0,
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        let (conn_tx, conn_rx) = mpsc::channel(connection::READ_AHEAD);
        let task = GroupTask {
            ctx,
            state: state.clone(),
            commands: rx,
            conn_tx,
            conn_rx,
            current: None,
            draining: None,
            held: VecDeque::new(),
            next_id: 1,
            conn_failures: 0,
            conn_retry_at: None,
            renew_at: None,
            drain_until: None,
            reconnect: None,
            current_end: None,
            unclean: false,
        };
        tokio::spawn(task.run());
        Self {
            state,
            commands: tx,
        }
    }

    /// Members now, with those placed here and not yet added.
    pub(super) fn len(&self) -> usize {
        let s = lock(&self.state);
        s.members.len() + s.pending_adds
    }

    /// Reserve a place for a mailbox about to be sent an `Add`.
    pub(super) fn reserve(&self) {
        lock(&self.state).pending_adds += 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct GroupTask {
    ctx: Arc<Ctx>,
    state: Arc<Mutex<GroupState>>,
    commands: mpsc::UnboundedReceiver<Command>,
    conn_tx: mpsc::Sender<(u64, ConnEvent)>,
    conn_rx: mpsc::Receiver<(u64, ConnEvent)>,
    /// The connection whose events are current.
    current: Option<Connection>,
    /// The connection being replaced by `current` (overlap).
    draining: Option<Connection>,
    /// Envelopes of `current` held until `draining` has ended.
    held: VecDeque<Vec<u8>>,
    next_id: u64,
    /// Connection failures in a row, and when to try again.
    conn_failures: u32,
    conn_retry_at: Option<Instant>,
    /// When the current connection is to be renewed.
    renew_at: Option<Instant>,
    /// When the draining connection is stopped if it has not ended.
    drain_until: Option<Instant>,
    /// A new connection is wanted, and why (reason label).
    reconnect: Option<&'static str>,
    /// The new connection of an overlap ended after carrying events: how, processed once
    /// the old one has ended (its envelopes come first).
    current_end: Option<End>,
    /// A delivery was given up while stopping: the next start must resync.
    unclean: bool,
}

impl GroupTask {
    async fn run(mut self) {
        loop {
            // Take every queued command first: a start-up burst of Adds becomes one round
            // of Subscribes and one connection.
            while let Ok(cmd) = self.commands.try_recv() {
                if let Some(done) = self.command(cmd).await {
                    return self.stop(done).await;
                }
            }
            self.subscribe_due().await;
            self.connect_if_needed();
            let wake = self.next_wake();
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => {
                        if let Some(done) = self.command(cmd).await {
                            return self.stop(done).await;
                        }
                    }
                    None => {
                        let (done, _) = oneshot::channel();
                        return self.stop(done).await;
                    }
                },
                Some((id, event)) = self.conn_rx.recv() => self.connection_event(id, event).await,
                _ = sleep_until(wake) => self.timers(),
            }
        }
    }

    /// Apply a command; `Some` when it is Stop.
    async fn command(&mut self, cmd: Command) -> Option<oneshot::Sender<()>> {
        match cmd {
            Command::Add(record) => {
                let mut s = lock(&self.state);
                s.pending_adds = s.pending_adds.saturating_sub(1);
                if s.cookie.is_none() {
                    s.cookie = record.stream_cookie.clone();
                }
                let had_id = record.subscription_id.is_some();
                if !s.members.contains_key(&s.anchor) {
                    // The anchor left an emptied group: the newcomer anchors it.
                    s.anchor = record.address.clone();
                }
                s.members.insert(
                    record.address.clone(),
                    Member {
                        record: *record,
                        retry_at: None,
                        failures: 0,
                        losses: 0,
                        last_loss: None,
                    },
                );
                drop(s);
                if had_id && self.current.is_some() {
                    self.want_reconnect("membership");
                }
                None
            }
            Command::Remove(address) => {
                let removed = {
                    let mut s = lock(&self.state);
                    let removed = s.members.remove(&address);
                    if s.anchor == address {
                        elect_anchor(&mut s, None);
                    }
                    removed
                };
                if let Some(id) = removed.and_then(|m| m.record.subscription_id) {
                    self.unsubscribe(&address, id);
                    if self.current.is_some() {
                        self.want_reconnect("membership");
                    }
                }
                let a = address.clone();
                let now = store::now_millis();
                if let Err(e) = self
                    .ctx
                    .writer
                    .store()
                    .blocking(move |s| s.remove_mailbox(&a, now))
                    .await
                {
                    tracing::error!(mailbox = %address, error = %e, "cannot forget a removed mailbox");
                }
                None
            }
            Command::Stop(done) => Some(done),
        }
    }

    /// `Unsubscribe` in the background (best effort: a streaming subscription no connection
    /// serves expires by itself after a while).
    fn unsubscribe(&self, address: &str, id: String) {
        let route = self.route();
        let client = self.ctx.client.clone();
        let address = address.to_owned();
        tokio::spawn(async move {
            let mut route = route;
            route.anchor = address.clone();
            match client.unsubscribe(route.target(), &address, &id).await {
                Ok(()) => tracing::info!(mailbox = %address, "removed mailbox unsubscribed"),
                Err(f) => {
                    tracing::info!(mailbox = %address, code = %f.code, "Unsubscribe of a removed mailbox failed; the subscription expires by itself")
                }
            }
        });
    }

    fn route(&self) -> Route {
        let s = lock(&self.state);
        Route {
            ews_url: s.ews_url.clone(),
            anchor: s.anchor.clone(),
            affinity: true,
            cookie: s.cookie.clone(),
        }
    }

    fn want_reconnect(&mut self, reason: &'static str) {
        if self.reconnect.is_none() {
            self.reconnect = Some(reason);
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let s = lock(&self.state);
        let member_retry = s
            .members
            .values()
            .filter(|m| m.record.subscription_id.is_none())
            .filter_map(|m| m.retry_at)
            .min();
        // A retry time already past is not a reason to wake: it only gates the next
        // connection, which opens as soon as one is wanted (waking for it would spin).
        let conn_retry = self.conn_retry_at.filter(|t| *t > Instant::now());
        [self.renew_at, self.drain_until, conn_retry, member_retry]
            .into_iter()
            .flatten()
            .min()
    }

    fn timers(&mut self) {
        let now = Instant::now();
        if self.renew_at.is_some_and(|t| t <= now) {
            self.renew_at = None;
            self.want_reconnect("renew");
        }
        if self.drain_until.is_some_and(|t| t <= now) {
            self.drain_until = None;
            if let Some(old) = &self.draining {
                tracing::debug!(
                    connection = old.id,
                    "old connection still open after the overlap; stopping it"
                );
                old.stop();
            }
        }
    }

    /// Stop cleanly: the connections read what Exchange already sent, it is delivered or
    /// spooled, then the store learns that no stream is open any more.
    async fn stop(mut self, done: oneshot::Sender<()>) {
        for c in self.current.iter().chain(self.draining.iter()) {
            c.stop();
        }
        let deadline = Instant::now() + STOP_LIMIT;
        let mut clean = !self.unclean;
        while self.current.is_some() || self.draining.is_some() {
            let Ok(Some((id, event))) =
                tokio::time::timeout_at(deadline, self.conn_rx.recv()).await
            else {
                clean = false;
                break;
            };
            if matches!(event, ConnEvent::Ended(End::Stopped { partial: true })) {
                clean = false;
            }
            // The same path as while running: an overlap's order holds to the end.
            self.connection_event(id, event).await;
        }
        while let Some(envelope) = self.held.pop_front() {
            self.envelope(0, &envelope).await;
        }
        clean &= !self.unclean;
        if clean {
            let records: Vec<MailboxRecord> = lock(&self.state)
                .members
                .values_mut()
                .filter(|m| m.record.stream_open)
                .map(|m| {
                    m.record.stream_open = false;
                    m.record.clone()
                })
                .collect();
            self.ctx.save_all(records).await;
        } else {
            tracing::warn!("a stream did not stop cleanly; its mailboxes get the resync signal at the next start");
            let records: Vec<MailboxRecord> = lock(&self.state)
                .members
                .values()
                .map(|m| m.record.clone())
                .collect();
            self.ctx.save_all(records).await;
        }
        let _ = done.send(());
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
