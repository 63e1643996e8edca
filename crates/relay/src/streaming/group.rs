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

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::connection::{self, ConnEvent, Connection, End, Route};
use super::Ctx;
use crate::spool::NotAccepted;
use crate::store::{self, MailboxRecord, MailboxState, UnixMillis};
use crate::subscriptions::backoff;
use crate::subscriptions::client::Failure;
use ews::{Action, Folders};

/// The old connection of an overlap is given this long to end by itself after the new one
/// opened; then it is stopped (Exchange has moved every subscription to the new one by then).
pub(super) const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// A clean stop waits this long at most for the connections to hand over what they read.
const STOP_LIMIT: Duration = Duration::from_secs(5);
/// Delivery refused (spool full, disk full): retry this often, reading paused meanwhile.
const ACCEPT_RETRY_MIN: Duration = Duration::from_millis(200);
/// ... at most this far apart.
const ACCEPT_RETRY_MAX: Duration = Duration::from_secs(10);
/// A connection ending sooner than this after it opened counts as a failure for back-off, so a
/// server that closes at once is not hammered.
const MIN_HEALTHY: Duration = Duration::from_secs(5);

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
const LOSS_MEMORY: Duration = Duration::from_secs(600);

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
        [
            self.renew_at,
            self.drain_until,
            self.conn_retry_at,
            member_retry,
        ]
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

    /// Subscribe members without a subscription whose retry time has come. The first
    /// Subscribe of a group without a cookie runs alone: it brings the cookie.
    async fn subscribe_due(&mut self) {
        if self.ctx.stopping.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        let (mut due, has_cookie): (Vec<String>, bool) = {
            let s = lock(&self.state);
            (
                s.members
                    .iter()
                    .filter(|(_, m)| {
                        m.record.subscription_id.is_none() && m.retry_at.is_none_or(|t| t <= now)
                    })
                    .map(|(a, _)| a.clone())
                    .collect(),
                s.cookie.is_some(),
            )
        };
        if due.is_empty() {
            return;
        }
        let mut subscribed_any = false;
        if !has_cookie {
            // Until one Subscribe has succeeded the group has no backend to be sent to: the
            // others wait (the next round tries the next member alone).
            let first = due.remove(0);
            subscribed_any |= self.subscribe_one(first).await;
            if !subscribed_any {
                return;
            }
        }
        let mut set = tokio::task::JoinSet::new();
        for address in due {
            let ctx = self.ctx.clone();
            let route = self.route();
            set.spawn(async move {
                let r = subscribe(&ctx, &route, &address).await;
                (address, r)
            });
        }
        while let Some(joined) = set.join_next().await {
            if let Ok((address, result)) = joined {
                subscribed_any |= self.after_subscribe(&address, result).await;
            }
        }
        if subscribed_any && (self.current.is_some() || self.reconnect.is_some()) {
            self.want_reconnect("membership");
        }
    }

    async fn subscribe_one(&mut self, address: String) -> bool {
        let route = self.route();
        let result = subscribe(&self.ctx, &route, &address).await;
        self.after_subscribe(&address, result).await
    }

    /// Record a Subscribe's outcome; true when the member now has a subscription.
    async fn after_subscribe(
        &mut self,
        address: &str,
        result: Result<(String, Option<String>), Failure>,
    ) -> bool {
        let record = {
            let mut s = lock(&self.state);
            if let Ok((_, Some(cookie))) = &result {
                if s.cookie.is_none() {
                    s.cookie = Some(cookie.clone());
                }
            }
            let cookie = s.cookie.clone();
            let Some(m) = s.members.get_mut(address) else {
                return false;
            };
            match &result {
                Ok((id, _)) => {
                    m.record.subscription_id = Some(id.clone());
                    m.record.stream_cookie = cookie;
                    m.record.state = MailboxState::Active;
                    m.record.last_error = None;
                    m.failures = 0;
                    m.retry_at = None;
                    self.ctx.metrics.subscribe("success");
                }
                Err(f) => {
                    m.failures += 1;
                    let r = backoff::random();
                    let wait = match f.action {
                        Action::BackOff(d) => d.max(Duration::from_millis(100)),
                        Action::Permanent => backoff::delay(
                            m.failures,
                            backoff::PERMANENT_BASE,
                            backoff::PERMANENT_CAP,
                            r,
                        ),
                        _ => backoff::delay(
                            m.failures,
                            backoff::TRANSIENT_BASE,
                            backoff::TRANSIENT_CAP,
                            r,
                        ),
                    };
                    m.retry_at = Some(Instant::now() + wait);
                    m.record.state = if f.action == Action::Permanent {
                        MailboxState::Failed
                    } else {
                        MailboxState::BackingOff
                    };
                    m.record.last_error = Some(format!("{}: {}", f.code, f.detail));
                    self.ctx.metrics.subscribe("failure");
                }
            }
            let record = m.record.clone();
            if matches!(&result, Err(f) if f.action == Action::Permanent) && s.anchor == address {
                // The anchor cannot be subscribed (deleted, no licence, impersonation
                // refused): the group's connection impersonates it, so it must not stay the
                // anchor.
                elect_anchor(&mut s, Some(address));
            }
            record
        };
        match result {
            Ok(_) => {
                tracing::info!(mailbox = address, "streaming subscription made");
                self.ctx.save(record).await;
                true
            }
            Err(f) if f.action == Action::Rediscover => {
                tracing::warn!(mailbox = address, code = %f.code, "mailbox moved; Autodiscover again");
                self.moved(address).await;
                false
            }
            Err(f) => {
                tracing::warn!(mailbox = address, code = %f.code, detail = %f.detail, "streaming Subscribe failed");
                self.ctx.save(record).await;
                false
            }
        }
    }

    /// The mailbox moved: hand it back to the keeper to be discovered and placed again
    /// (after a back-off when it keeps moving, so a stale answer cannot make a loop).
    async fn moved(&mut self, address: &str) {
        let member = {
            let mut s = lock(&self.state);
            let m = s.members.remove(address);
            if s.anchor == address {
                elect_anchor(&mut s, Some(address));
            }
            m
        };
        let Some(mut m) = member else { return };
        let had_id = m.record.subscription_id.is_some();
        m.record.subscription_id = None;
        m.record.stream_cookie = None;
        m.record.state = MailboxState::Subscribing;
        m.record.ews_url = None;
        let wait = self.ctx.move_delay(address);
        let regroup = self.ctx.regroup.clone();
        if wait.is_zero() {
            let _ = regroup.send(m.record);
        } else {
            tracing::info!(mailbox = address, wait = ?wait, "mailbox moved again; discovering it after a back-off");
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = regroup.send(m.record);
            });
        }
        if had_id && self.current.is_some() {
            self.want_reconnect("regroup");
        }
    }

    /// Open a connection when none is open, or an overlapping one when a reconnect is wanted.
    fn connect_if_needed(&mut self) {
        if self.ctx.stopping.load(Ordering::Acquire) || self.draining.is_some() {
            return;
        }
        if self.conn_retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        if self.current.is_some() && self.reconnect.is_none() {
            return;
        }
        let (ids, route): (Vec<String>, Route) = {
            let s = lock(&self.state);
            (
                s.members
                    .values()
                    .filter_map(|m| m.record.subscription_id.clone())
                    .collect(),
                Route {
                    ews_url: s.ews_url.clone(),
                    anchor: s.anchor.clone(),
                    affinity: true,
                    cookie: s.cookie.clone(),
                },
            )
        };
        if ids.is_empty() {
            // Nothing to stream: let any connection run out.
            if let Some(c) = self.current.take() {
                c.stop();
                self.draining = Some(c);
                self.drain_until = Some(Instant::now() + DRAIN_LIMIT);
            }
            self.reconnect = None;
            return;
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let timing = self.ctx.cfg.stream;
        let body = match ews::get_streaming_events_request(
            &refs,
            timing.connection_timeout_minutes,
            Some(&route.anchor),
            ews::DEFAULT_SERVER_VERSION,
        ) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot build GetStreamingEvents");
                self.conn_retry_at = Some(Instant::now() + backoff::TRANSIENT_CAP);
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let conn = connection::open(
            id,
            ids,
            self.ctx.client.clone(),
            route,
            body,
            Duration::from_secs(60 * u64::from(timing.connection_timeout_minutes)),
            timing.silence_timeout,
            self.conn_tx.clone(),
            self.ctx.metrics.clone(),
        );
        if let Some(reason) = self.reconnect.take() {
            if self.current.is_some() {
                self.ctx.metrics.stream_reconnect(reason);
                lock(&self.state).reconnects += 1;
            }
        }
        let mut s = lock(&self.state);
        s.last_seen = Some(conn.last_seen.clone());
        s.connections = 1 + u8::from(self.current.is_some());
        drop(s);
        if let Some(old) = self.current.replace(conn) {
            // The old one serves until the new one has opened: the drain limit starts with
            // the new one's first envelope (see `connection_event`).
            self.draining = Some(old);
            self.drain_until = None;
        }
        // Up to a tenth earlier, at random: groups started together do not all renew (and
        // briefly double their connections against the account's limit) at the same moment.
        let early = backoff::random() % (timing.reconnect_after.as_millis() as u64 / 10 + 1);
        self.renew_at =
            Some(Instant::now() + timing.reconnect_after - Duration::from_millis(early));
    }

    fn is_draining(&self, id: u64) -> bool {
        self.draining.as_ref().is_some_and(|c| c.id == id)
    }

    fn conn_mut(&mut self, id: u64) -> Option<&mut Connection> {
        if self.current.as_ref().is_some_and(|c| c.id == id) {
            self.current.as_mut()
        } else if self.draining.as_ref().is_some_and(|c| c.id == id) {
            self.draining.as_mut()
        } else {
            None
        }
    }

    async fn connection_event(&mut self, id: u64, event: ConnEvent) {
        match event {
            ConnEvent::Envelope(envelope) => {
                let overlap = self.draining.is_some() && !self.is_draining(id);
                if let Some(c) = self.conn_mut(id) {
                    if !c.heard && overlap {
                        // The new connection is open: the old one gets its limit now.
                        self.drain_until = Some(Instant::now() + DRAIN_LIMIT);
                    }
                }
                if let Some(c) = self.conn_mut(id) {
                    c.heard = true;
                }
                if overlap {
                    // The new connection of an overlap: after the old one's last envelope.
                    self.held.push_back(envelope);
                } else {
                    self.envelope(id, &envelope).await;
                }
            }
            ConnEvent::Ended(end) => self.ended(id, end).await,
        }
    }

    async fn ended(&mut self, id: u64, end: End) {
        if self.is_draining(id) {
            return self.old_ended(end).await;
        }
        let Some(current) = self.current.as_ref().filter(|c| c.id == id) else {
            return;
        };
        if self.draining.is_some() && current.heard {
            // The new connection of an overlap ended after carrying events: they (and its
            // end) follow the old connection's last envelope.
            self.current_end = Some(end);
            if self.drain_until.is_none() {
                self.drain_until = Some(Instant::now() + DRAIN_LIMIT);
            }
            return;
        }
        self.current_ended(end).await;
    }

    /// The old connection of an overlap has ended: resync what it may have lost, then deliver
    /// what the new one carried meanwhile (and its end, if it came too).
    async fn old_ended(&mut self, end: End) {
        self.drain_until = None;
        let Some(old) = self.draining.take() else {
            return;
        };
        lock(&self.state).connections = u8::from(self.current.is_some());
        tracing::debug!(
            connection = old.id,
            end = end.label(),
            "old connection ended"
        );
        self.resync_gap(&old, &end).await;
        let current = self.current.as_ref().map_or(0, |c| c.id);
        while let Some(envelope) = self.held.pop_front() {
            self.envelope(current, &envelope).await;
        }
        if let Some(end) = self.current_end.take() {
            self.current_ended(end).await;
        }
    }

    /// Resync the mailboxes of `conn` whose events it may have lost (see the module's "Gaps").
    async fn resync_gap(&mut self, conn: &Connection, end: &End) {
        if self.ctx.stopping.load(Ordering::Acquire) || !conn.may_have_lost(end) {
            // A stop leaves `stream_open` set when it is not clean: the next start resyncs.
            return;
        }
        let affected: Vec<String> = {
            let s = lock(&self.state);
            s.members
                .iter()
                .filter(|(_, m)| {
                    m.record
                        .subscription_id
                        .as_ref()
                        .is_some_and(|id| conn.ids.contains(id) && !conn.moved.contains(id))
                })
                .map(|(a, _)| a.clone())
                .collect()
        };
        if affected.is_empty() {
            return;
        }
        tracing::warn!(
            connection = conn.id,
            end = end.label(),
            mailboxes = affected.len(),
            "a streaming connection ended without Closed after it had opened; events in flight may be lost, so its mailboxes get the resync signal"
        );
        for address in affected {
            self.resync(&address, "stream gap").await;
        }
    }

    /// The current connection has ended (and no overlap waits for it).
    async fn current_ended(&mut self, end: End) {
        // Its held envelopes first, while it is still registered (their `Closed` and errors
        // count for it).
        let id = self.current.as_ref().map_or(0, |c| c.id);
        while let Some(envelope) = self.held.pop_front() {
            self.envelope(id, &envelope).await;
        }
        let Some(conn) = self.current.take() else {
            return;
        };
        let lived = conn.opened.elapsed();
        // A failure the server wrote into the stream, or its refusal to open one (HTTP 503,
        // a ServerBusy fault with BackOffMilliseconds).
        let failed = conn.failure.clone().or(match &end {
            End::Refused(f) => Some(f.clone()),
            _ => None,
        });
        let label = match (&end, conn.closed_seen, &failed) {
            (End::Refused(_), _, _) => "refused",
            (_, _, Some(_)) => "error",
            (End::BodyEnded, true, _) => "closed",
            (e, _, _) => e.label(),
        };
        self.resync_gap(&conn, &end).await;
        let restored = match self.draining.take() {
            Some(old) => {
                // The new connection failed before it carried anything while the old one
                // still reads: keep the old one, and try the renewal again (below).
                self.current = Some(old);
                self.drain_until = None;
                true
            }
            None => {
                self.renew_at = None;
                let mut s = lock(&self.state);
                s.open_since = None;
                s.connections = 0;
                false
            }
        };
        lock(&self.state).connections = u8::from(self.current.is_some());
        if matches!(end, End::Stopped { .. }) && failed.is_none() {
            return;
        }
        if let Some(f) = &failed {
            self.anchor_trouble(f).await;
        }
        // Back off after an error or a connection that died young; else reconnect at once.
        let healthy = failed.is_none() && (conn.closed_seen || lived >= MIN_HEALTHY);
        if healthy {
            self.conn_failures = 0;
            self.conn_retry_at = None;
        } else {
            self.conn_failures += 1;
            let r = backoff::random();
            let wait = match failed.as_ref() {
                Some(f) if matches!(f.action, Action::BackOff(_)) => match f.action {
                    Action::BackOff(d) => d.max(Duration::from_millis(100)),
                    _ => unreachable!("matched above"),
                },
                // The account's connections are all taken (ours overlapping, or another
                // application's): retrying at once cannot help.
                Some(f) if f.code == "ErrorExceededConnectionCount" => backoff::delay(
                    self.conn_failures,
                    backoff::TRANSIENT_BASE,
                    backoff::TRANSIENT_CAP,
                    r,
                )
                .max(backoff::TRANSIENT_BASE),
                _ if self.conn_failures <= 1 => Duration::ZERO,
                _ => backoff::delay(
                    self.conn_failures - 1,
                    backoff::TRANSIENT_BASE,
                    backoff::TRANSIENT_CAP,
                    r,
                ),
            };
            self.conn_retry_at = Some(Instant::now() + wait);
        }
        if restored {
            self.renew_at = Some(self.conn_retry_at.unwrap_or_else(Instant::now));
        }
        let detail = match (&failed, &end) {
            (Some(f), _) => Some(format!("{}: {}", f.code, f.detail)),
            (None, End::Broken { why, .. }) => Some(format!("connection broken: {why}")),
            (None, End::Silent(d)) => Some(format!(
                "no event or keep-alive for {}s (--stream-silence-timeout)",
                d.as_secs()
            )),
            _ => None,
        };
        match &detail {
            Some(d) => {
                tracing::warn!(group_anchor = %lock(&self.state).anchor, reason = label, detail = %d, "streaming connection lost; reconnecting")
            }
            None => {
                tracing::debug!(
                    reason = label,
                    "streaming connection closed by Exchange; reconnecting"
                )
            }
        }
        if let Some(d) = detail {
            lock(&self.state).last_error = Some(d);
        }
        if self.current.is_none() {
            // Counted here, not at open: `connect_if_needed` counts replacements only.
            self.ctx.metrics.stream_reconnect(label);
            lock(&self.state).reconnects += 1;
        }
    }

    /// A connection refused for a reason that concerns its anchor mailbox: the anchor moved
    /// (Autodiscover it again; another member anchors), or cannot be impersonated or does not
    /// exist (another member anchors). Without this one bad mailbox would keep its whole group
    /// from streaming.
    async fn anchor_trouble(&mut self, f: &Failure) {
        let anchor = lock(&self.state).anchor.clone();
        if f.action == Action::Rediscover {
            tracing::warn!(anchor = %anchor, code = %f.code, "the group's anchor mailbox moved; discovering it again, another member anchors");
            self.moved(&anchor).await;
            return;
        }
        if ANCHOR_CODES.contains(&f.code.as_str()) {
            let mut s = lock(&self.state);
            if elect_anchor(&mut s, Some(&anchor)) {
                tracing::warn!(old = %anchor, new = %s.anchor, code = %f.code, "the group's anchor mailbox cannot carry the connection; another member anchors");
            }
        }
    }

    /// One envelope of connection `id`: deliver its events, repair what its errors name.
    async fn envelope(&mut self, id: u64, envelope: &[u8]) {
        let batch = match ews::parse_streaming_events(envelope) {
            Ok(b) => b,
            Err(ews::EwsError::Fault(f)) => {
                let failure = Failure::new(
                    f.action(),
                    f.response_code.clone().unwrap_or_else(|| f.code.clone()),
                    f.message.clone(),
                );
                if let Some(c) = self.conn_mut(id) {
                    c.failure = Some(failure);
                    c.stop();
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "unreadable streaming envelope; reconnecting, its mailboxes get the resync signal");
                if let Some(c) = self.conn_mut(id) {
                    c.lost_data = true;
                    c.failure = Some(Failure::new(
                        Action::Transient,
                        "MalformedEnvelope",
                        e.to_string(),
                    ));
                    c.stop();
                }
                return;
            }
        };
        tracing::trace!(
            connection = id,
            keep_alive = batch.is_keep_alive(),
            notifications = batch.notifications().count(),
            "envelope"
        );
        let first = self.conn_mut(id).map(|c| {
            c.envelopes += 1;
            c.envelopes == 1
        });
        if first == Some(true) && !self.is_draining(id) {
            self.connected().await;
        }
        for message in &batch.messages {
            for n in &message.notifications {
                self.deliver(n).await;
            }
            if message.status.class == ews::ResponseClass::Success {
                continue;
            }
            let code = message.status.code.as_deref().unwrap_or("Error").to_owned();
            if message.error_subscription_ids.is_empty() {
                let action = connection_action(&code, message.status.back_off);
                let text = message.status.message_text.as_deref().unwrap_or("");
                tracing::warn!(code = %code, detail = text, "GetStreamingEvents refused");
                let failure = Failure::new(action, code.clone(), text);
                if let Some(c) = self.conn_mut(id) {
                    c.failure = Some(failure);
                    c.stop();
                }
                continue;
            }
            for sub in &message.error_subscription_ids {
                self.subscription_error(id, &code, sub).await;
            }
        }
        if batch.is_closed() {
            if let Some(c) = self.conn_mut(id) {
                c.closed_seen = true;
            }
        }
    }

    /// The first envelope of a new current connection: it is open. Record in the store that a
    /// stream was open for these mailboxes (cleared by a clean stop).
    async fn connected(&mut self) {
        let records: Vec<MailboxRecord> = {
            let mut s = lock(&self.state);
            s.open_since = Some(store::now_millis());
            s.last_error = None;
            s.members
                .values_mut()
                .filter(|m| m.record.subscription_id.is_some() && !m.record.stream_open)
                .map(|m| {
                    m.record.stream_open = true;
                    m.record.clone()
                })
                .collect()
        };
        self.ctx.save_all(records).await;
    }

    fn member_of(&self, subscription_id: &str) -> Option<String> {
        lock(&self.state)
            .members
            .iter()
            .find(|(_, m)| m.record.subscription_id.as_deref() == Some(subscription_id))
            .map(|(a, _)| a.clone())
    }

    async fn subscription_error(&mut self, conn: u64, code: &str, subscription_id: &str) {
        let Some(address) = self.member_of(subscription_id) else {
            tracing::debug!(
                code,
                "streaming error for a subscription no member has (removed?)"
            );
            return;
        };
        match code {
            "ErrorNewEventStreamConnectionOpened" if self.is_draining(conn) => {
                // Our renewal took it over: from here its events travel on the new connection.
                if let Some(c) = self.conn_mut(conn) {
                    c.moved.insert(subscription_id.to_owned());
                }
            }
            "ErrorNewEventStreamConnectionOpened" => {
                // Someone else opened a stream for our subscription: its events went there.
                tracing::warn!(mailbox = %address, "another connection took this mailbox's subscription; reconnecting and asking the receiver to resynchronise");
                self.resync(&address, "taken by another connection").await;
                self.want_reconnect("taken");
            }
            "ErrorMissedNotificationEvents" => {
                tracing::warn!(mailbox = %address, "Exchange dropped events (ErrorMissedNotificationEvents); receiver told to resynchronise");
                self.resync(&address, "ErrorMissedNotificationEvents").await;
            }
            "ErrorProxyRequestNotAllowed" | "ErrorReadEventsFailed" => {
                tracing::warn!(mailbox = %address, code, "mailbox moved; Autodiscover again, regroup, resynchronise");
                self.resync(&address, code).await;
                self.moved(&address).await;
            }
            _ => {
                // ErrorSubscriptionNotFound, ErrorExpiredSubscription, ErrorInvalidSubscription
                // and anything unknown: the subscription is gone, and with it any events since.
                tracing::warn!(mailbox = %address, code, "streaming subscription lost; subscribing again, receiver told to resynchronise");
                self.resync(&address, code).await;
                let record = {
                    let mut s = lock(&self.state);
                    s.members.get_mut(&address).map(|m| {
                        let now = Instant::now();
                        let in_a_row = m.last_loss.is_some_and(|t| now - t < LOSS_MEMORY);
                        m.losses = if in_a_row { m.losses + 1 } else { 1 };
                        m.last_loss = Some(now);
                        m.record.subscription_id = None;
                        m.record.state = MailboxState::Lost;
                        m.record.last_error = Some(code.to_owned());
                        // The first loss is repaired at once; one that keeps coming back
                        // (an affinity problem, a server that forgets) waits longer each time.
                        m.retry_at = (m.losses > 1).then(|| {
                            now + backoff::delay(
                                m.losses - 1,
                                backoff::TRANSIENT_BASE,
                                backoff::TRANSIENT_CAP,
                                backoff::random(),
                            )
                        });
                        m.record.clone()
                    })
                };
                if let Some(r) = record {
                    self.ctx.save(r).await;
                }
                self.ctx.metrics.resubscribe("stream_error");
                self.want_reconnect("resubscribed");
            }
        }
    }

    /// Queue the resync signal for `address` behind what is waiting for it.
    async fn resync(&mut self, address: &str, why: &str) {
        if let Err(e) = self.ctx.delivery.request_resync(address).await {
            tracing::error!(mailbox = address, error = %e, why, "cannot queue the resync signal");
        }
        let record = {
            let mut s = lock(&self.state);
            s.members.get_mut(address).map(|m| {
                m.record.resync_pending = true;
                m.record.clone()
            })
        };
        if let Some(r) = record {
            self.ctx.save(r).await;
        }
    }

    /// Deliver one notification as a push `SendNotification`; retried until accepted (the
    /// stream waits meanwhile: Exchange cannot be asked to send it again).
    async fn deliver(&mut self, n: &ews::Notification<'_>) {
        if n.events.iter().all(|e| e.kind == ews::EventType::Status) {
            return;
        }
        let Some(address) = self.member_of(&n.subscription_id) else {
            tracing::debug!("events for a subscription no member has (removed?); dropped");
            return;
        };
        let body = match ews::send_notification_from_stream(n, ews::DEFAULT_SERVER_VERSION) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(mailbox = %address, error = %e, "streamed events cannot be written as a SendNotification; receiver told to resynchronise");
                self.resync(&address, "unwritable events").await;
                return;
            }
        };
        let mut wait = ACCEPT_RETRY_MIN;
        loop {
            match self
                .ctx
                .delivery
                .accept(
                    &address,
                    &n.subscription_id,
                    http1::HeaderBlock::default(),
                    body.clone(),
                    None,
                )
                .await
            {
                Ok(_) => break,
                Err(e @ NotAccepted::OverAge { .. }) => {
                    // This mailbox's backlog is too old (its receiver keeps refusing it): the
                    // spool refuses only it. Holding the stream for it would stop the whole
                    // group, so the notification is dropped and the mailbox resynchronised.
                    tracing::warn!(mailbox = %address, error = %e, "streamed notification dropped; receiver told to resynchronise the mailbox");
                    self.resync(&address, "spool over age").await;
                    return;
                }
                Err(e) if self.ctx.stopping.load(Ordering::Acquire) => {
                    // Stopping with the spool refusing: the stream stays marked open in the
                    // store, so the next start resyncs these mailboxes.
                    tracing::warn!(mailbox = %address, error = %e, "stopping while the spool refuses; the mailbox is resynchronised at the next start");
                    self.unclean = true;
                    return;
                }
                Err(e) => {
                    tracing::debug!(mailbox = %address, error = %e, "streamed notification not accepted; retrying, stream paused");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(ACCEPT_RETRY_MAX);
                }
            }
        }
        let now = store::now_millis();
        if let Some(m) = lock(&self.state).members.get_mut(&address) {
            m.record.last_event = Some(now);
            m.record.last_heartbeat = Some(now);
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
            match event {
                ConnEvent::Ended(End::Stopped { partial: true }) => {
                    clean = false;
                    self.ended(id, End::Stopped { partial: true }).await;
                }
                ConnEvent::Ended(end) => self.ended(id, end).await,
                ConnEvent::Envelope(e) => self.envelope(id, &e).await,
            }
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

/// Connection-level refusals that concern the anchor mailbox itself, not the group.
const ANCHOR_CODES: [&str; 4] = [
    "ErrorNonExistentMailbox",
    "ErrorImpersonateUserDenied",
    "ErrorImpersonationFailed",
    "ErrorMailboxMoveInProgress",
];

/// Make another member the anchor instead of `not` (a member with a subscription first: it is
/// known to work with this backend); true when the anchor changed.
fn elect_anchor(s: &mut GroupState, not: Option<&str>) -> bool {
    let next = s
        .members
        .iter()
        .filter(|(a, _)| Some(a.as_str()) != not)
        .max_by_key(|(_, m)| m.record.subscription_id.is_some())
        .map(|(a, _)| a.clone());
    match next {
        Some(a) if a != s.anchor => {
            s.anchor = a;
            true
        }
        _ => false,
    }
}

/// What a connection-level error code asks for. `ews::classify` does not know the streaming
/// codes (it calls them permanent); they are handled here by name.
fn connection_action(code: &str, back_off: Option<Duration>) -> Action {
    match code {
        // The per-account limit on open connections: others of ours (or an overlap) hold them.
        "ErrorExceededConnectionCount" => Action::Transient,
        "ErrorServerBusy" => back_off.map_or(Action::Transient, Action::BackOff),
        other => match ews::classify(other, back_off) {
            Action::Permanent => Action::Transient,
            a => a,
        },
    }
}

/// One streaming Subscribe of `address` at `route`.
async fn subscribe(
    ctx: &Ctx,
    route: &Route,
    address: &str,
) -> Result<(String, Option<String>), Failure> {
    let folders: Vec<&str> = ctx.cfg.folders.iter().map(String::as_str).collect();
    let request = ews::StreamingSubscribeRequest {
        server_version: ews::DEFAULT_SERVER_VERSION,
        mailbox: address,
        folders: if folders.is_empty() {
            Folders::All
        } else {
            Folders::Distinguished(&folders)
        },
        event_types: &ctx.cfg.event_types,
    };
    ctx.client
        .subscribe_streaming(route.target(), &request)
        .await
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_codes_are_not_permanent() {
        assert_eq!(
            connection_action("ErrorExceededConnectionCount", None),
            Action::Transient
        );
        assert_eq!(
            connection_action("ErrorServerBusy", Some(Duration::from_secs(3))),
            Action::BackOff(Duration::from_secs(3))
        );
        assert_eq!(
            connection_action("ErrorSomethingNew", None),
            Action::Transient
        );
    }
}
