//! Managed EWS mode with `--transport streaming`: the relay follows the mailboxes over
//! long-lived `GetStreamingEvents` connections it opens to Exchange, instead of waiting for
//! Exchange to call back, and delivers what they carry exactly as push notifications are
//! delivered (plus `X-EWS-Transport: streaming`).
//!
//! [`Streams`] owns the mailbox set: it Autodiscovers each mailbox, places it in a group of at
//! most 200 sharing an EWS URL and `GroupingInformation` ([`group`]), and moves mailboxes that
//! Exchange says have moved. Each group runs its own task with one connection ([`connection`])
//! at a time, two during a renewal's overlap.
//!
//! # Deliveries
//! Streaming has no callback URL: deliveries go to the receiver at `--path-prefix`'s path, with
//! `X-EWS-Mailbox`, `X-EWS-Subscription-Id` and a `SendNotification` body built from the
//! streamed events, through the same spool as push (order per mailbox, replay, limits).
//!
//! # Restarts
//! Subscription ids (and the group's backend cookie) are stored per mailbox, so a restarted
//! relay reopens the same subscriptions: Exchange keeps a streaming subscription and its events
//! for a while without a connection (how long is not documented; an expired one is reported as
//! `ErrorSubscriptionNotFound` and repaired with a resync). Events read from a stream but not yet spooled are
//! lost if the process dies; so while a group's stream is open, its mailboxes' records say so
//! (`stream_open`), a clean stop reads what is on its way, spools it and clears the mark, and a
//! start that finds the mark sends those mailboxes the resync signal.

mod connection;
mod group;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::{EwsEndpoint, Managed};
use crate::metrics::Metrics;
use crate::spool::Delivery;
use crate::store::{self, MailboxRecord, MailboxState, StoreError, StoreWriter};
use crate::subscriptions::client::EwsClient;
use crate::subscriptions::manager::{publish_mailbox_states, MailboxView};
use group::{Command, GroupHandle};

/// Autodiscover groups hold at most this many mailboxes (Microsoft's guidance, and the most
/// subscription ids one `GetStreamingEvents` may carry).
pub const MAX_GROUP: usize = ews::MAX_STREAMING_SUBSCRIPTIONS;
/// Mailboxes Autodiscover could not place are asked about again this often.
const DISCOVERY_RETRY: Duration = Duration::from_secs(30);
/// A clean stop waits this long at most for every group (each reads for at most a few
/// seconds more).
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(15);
/// Gauges are published this often.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(5);

/// What the groups share.
pub(crate) struct Ctx {
    cfg: Managed,
    client: Arc<EwsClient>,
    writer: Arc<StoreWriter>,
    delivery: Arc<Delivery>,
    metrics: Arc<Metrics>,
    /// Set by [`Streams::shutdown`]: no new Subscribe or connection starts.
    stopping: AtomicBool,
    /// Mailboxes a group gave back (moved): to be discovered and placed again.
    regroup: mpsc::UnboundedSender<MailboxRecord>,
    /// Moves per mailbox in a row, and when the last was (for [`Ctx::move_delay`]).
    moves: Mutex<HashMap<String, (u32, std::time::Instant)>>,
}

/// Moves further apart than this do not count as "in a row".
const MOVE_MEMORY: Duration = Duration::from_secs(600);

impl Ctx {
    /// How long to wait before discovering `address` again after it moved: at once the first
    /// time, then with growing back-off (an Autodiscover answer that keeps sending it back to
    /// where it is refused must not become a loop).
    fn move_delay(&self, address: &str) -> Duration {
        let now = std::time::Instant::now();
        let mut moves = lock(&self.moves);
        moves.retain(|_, (_, at)| now.duration_since(*at) < MOVE_MEMORY);
        let n = moves
            .entry(address.to_owned())
            .and_modify(|(n, at)| {
                *n += 1;
                *at = now;
            })
            .or_insert((1, now))
            .0;
        if n <= 1 {
            Duration::ZERO
        } else {
            crate::subscriptions::backoff::delay(
                n - 1,
                crate::subscriptions::backoff::TRANSIENT_BASE,
                crate::subscriptions::backoff::TRANSIENT_CAP,
                crate::subscriptions::backoff::random(),
            )
        }
    }

    async fn save(&self, record: MailboxRecord) {
        if let Err(e) = self.writer.put_mailbox(record, store::now_millis()).await {
            tracing::error!(error = %e, "cannot write mailbox state");
        }
    }

    /// Write records concurrently (the store writer commits them together).
    async fn save_all(self: &Arc<Self>, records: Vec<MailboxRecord>) {
        let mut set = tokio::task::JoinSet::new();
        for r in records {
            let writer = self.writer.clone();
            set.spawn(async move { writer.put_mailbox(r, store::now_millis()).await });
        }
        while let Some(joined) = set.join_next().await {
            if let Ok(Err(e)) = joined {
                tracing::error!(error = %e, "cannot write mailbox state");
            }
        }
    }
}

/// One group's connection, as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupView {
    /// EWS URL.
    pub ews_url: String,
    /// Autodiscover's `GroupingInformation`.
    pub grouping: String,
    /// The anchor mailbox.
    pub anchor: String,
    /// Members.
    pub mailboxes: usize,
    /// RFC 3339 time the current connection opened; `None` while not connected.
    pub open_since: Option<String>,
    /// The same instant, for the status page's "open for".
    #[serde(skip)]
    pub opened: Option<std::time::SystemTime>,
    /// Seconds since the latest keep-alive or event.
    pub seconds_since_keepalive: Option<u64>,
    /// Connections replaced or reopened since start.
    pub reconnects: u64,
    /// Connections open now (2 during a renewal's overlap).
    pub connections: u8,
    /// The last connection problem.
    pub last_error: Option<String>,
}

/// Everything streaming shows: `streaming_groups` and the mailbox rows (same shape as push's).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamingViews {
    /// One entry per group.
    pub streaming_groups: Vec<GroupView>,
    /// One row per mailbox; problems first.
    pub mailboxes: Vec<MailboxView>,
}

/// The streaming keeper.
pub struct Streams {
    ctx: Arc<Ctx>,
    /// The groups, in creation order.
    groups: Mutex<Vec<Arc<GroupHandle>>>,
    /// Which group follows each mailbox.
    placement: Mutex<HashMap<String, Arc<GroupHandle>>>,
    /// Mailboxes waiting for Autodiscover to succeed, with the last error.
    unplaced: Mutex<HashMap<String, (MailboxRecord, String)>>,
    regroup_rx: Mutex<Option<mpsc::UnboundedReceiver<MailboxRecord>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Autodiscover's answer for one mailbox: (EWS URL, GroupingInformation), or why none.
type Discovery = Result<(String, String), String>;

/// Where streamed notifications go on the receiver: `--path-prefix` itself.
pub fn delivery_path(path_prefix: &str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::try_from(path_prefix)
        .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"))
}

impl Streams {
    /// A keeper over the stored state; nothing is subscribed until [`Streams::start`].
    pub async fn new(
        cfg: Managed,
        client: EwsClient,
        writer: Arc<StoreWriter>,
        delivery: Arc<Delivery>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let streams = Arc::new(Self {
            ctx: Arc::new(Ctx {
                cfg,
                client: Arc::new(client),
                writer,
                delivery,
                metrics,
                stopping: AtomicBool::new(false),
                regroup: tx,
                moves: Mutex::new(HashMap::new()),
            }),
            groups: Mutex::new(Vec::new()),
            placement: Mutex::new(HashMap::new()),
            unplaced: Mutex::new(HashMap::new()),
            regroup_rx: Mutex::new(Some(rx)),
            tasks: Mutex::new(Vec::new()),
        });
        // `resync_pending` ends when the receiver has acknowledged the signal.
        let weak = Arc::downgrade(&streams);
        streams.ctx.delivery.on_resync(move |mailbox, pending| {
            let Some(me) = weak.upgrade() else { return };
            let Some(g) = lock(&me.placement).get(mailbox).cloned() else {
                return;
            };
            let mut state = lock(&g.state);
            if let Some(m) = state.members.get_mut(mailbox) {
                m.record.resync_pending = pending;
            }
        });
        Ok(streams)
    }

    /// Resync the mailboxes an unclean stop left with an open stream, then follow the
    /// configured mailboxes and start the background work (regrouping, gauges).
    pub async fn start(self: &Arc<Self>) -> Result<(), StoreError> {
        let stored = self.ctx.writer.store().blocking(|s| s.mailboxes()).await?;
        let unclean: Vec<MailboxRecord> = stored.into_iter().filter(|r| r.stream_open).collect();
        if !unclean.is_empty() {
            tracing::warn!(
                mailboxes = unclean.len(),
                "the relay did not stop cleanly while streaming: events read but not spooled may be lost; telling the receiver to resynchronise those mailboxes"
            );
        }
        for mut r in unclean {
            if let Err(e) = self.ctx.delivery.request_resync(&r.address).await {
                tracing::error!(mailbox = %r.address, error = %e, "cannot queue the resync signal");
                continue;
            }
            r.stream_open = false;
            r.resync_pending = true;
            self.ctx.save(r).await;
        }
        let wanted = self.configured_mailboxes();
        self.apply_mailbox_set(&wanted).await?;
        let rx = lock(&self.regroup_rx).take();
        let me = self.clone();
        let background = tokio::spawn(async move {
            let Some(mut rx) = rx else { return };
            let mut retry = tokio::time::interval(DISCOVERY_RETRY);
            let mut publish = tokio::time::interval(PUBLISH_INTERVAL);
            loop {
                tokio::select! {
                    Some(r) = rx.recv() => {
                        let mut batch = vec![r];
                        while let Ok(r) = rx.try_recv() {
                            batch.push(r);
                        }
                        // A mailbox removed from the set while it was on its way back is not
                        // placed again (removal forgets its placement).
                        {
                            let placement = lock(&me.placement);
                            batch.retain(|r| placement.contains_key(&r.address));
                        }
                        me.place(batch).await;
                    }
                    _ = retry.tick() => {
                        let waiting: Vec<MailboxRecord> =
                            lock(&me.unplaced).drain().map(|(_, (r, _))| r).collect();
                        if !waiting.is_empty() {
                            me.place(waiting).await;
                        }
                    }
                    _ = publish.tick() => me.publish_gauges(),
                }
            }
        });
        lock(&self.tasks).push(background);
        Ok(())
    }

    /// Stop every group cleanly (what the streams already carry is spooled first).
    pub async fn shutdown(&self) {
        self.ctx
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        let groups: Vec<_> = lock(&self.groups).clone();
        let mut waits = Vec::new();
        for g in groups {
            let (tx, rx) = oneshot::channel();
            if g.commands.send(Command::Stop(tx)).is_ok() {
                waits.push(rx);
            }
        }
        // Bounded: a group stuck (a spool refusing to the end) must not hold the process; it
        // keeps its mailboxes marked as streaming, so the next start resyncs them.
        let all = async {
            for w in waits {
                let _ = w.await;
            }
        };
        if tokio::time::timeout(SHUTDOWN_LIMIT, all).await.is_err() {
            tracing::warn!("streaming groups did not stop in time; their mailboxes are resynchronised at the next start");
        }
    }

    /// The mailboxes from `--mailbox` and `--mailboxes-file` now.
    pub fn configured_mailboxes(&self) -> Vec<String> {
        let mut all = self.ctx.cfg.mailboxes.clone();
        if let Some(path) = &self.ctx.cfg.mailboxes_file {
            match crate::config::read_mailboxes_file(path) {
                Ok(list) => all.extend(list),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the mailboxes file; keeping the current set");
                    let mut now: Vec<String> = lock(&self.placement).keys().cloned().collect();
                    now.extend(lock(&self.unplaced).keys().cloned());
                    now.sort();
                    return now;
                }
            }
        }
        all.sort();
        all.dedup();
        all
    }

    /// Make the followed set equal `wanted`: place new mailboxes, unsubscribe removed ones.
    pub async fn apply_mailbox_set(self: &Arc<Self>, wanted: &[String]) -> Result<(), StoreError> {
        let stored = self.ctx.writer.store().blocking(|s| s.mailboxes()).await?;
        let mut stored: HashMap<String, MailboxRecord> =
            stored.into_iter().map(|r| (r.address.clone(), r)).collect();
        let running: Vec<String> = {
            let mut v: Vec<String> = lock(&self.placement).keys().cloned().collect();
            v.extend(lock(&self.unplaced).keys().cloned());
            v
        };
        for m in running.iter().chain(stored.keys()) {
            if wanted.contains(m) {
                continue;
            }
            lock(&self.unplaced).remove(m);
            let placed = lock(&self.placement).remove(m);
            match placed {
                Some(g) => {
                    let _ = g.commands.send(Command::Remove(m.clone()));
                }
                None => {
                    let a = m.clone();
                    let now = store::now_millis();
                    self.ctx
                        .writer
                        .store()
                        .blocking(move |s| s.remove_mailbox(&a, now))
                        .await?;
                }
            }
            tracing::info!(mailbox = %m, "mailbox removed; its streaming subscription is ended");
        }
        let new: Vec<MailboxRecord> = wanted
            .iter()
            .filter(|m| !running.contains(m))
            .map(|m| stored.remove(m).unwrap_or_else(|| MailboxRecord::new(m)))
            .collect();
        self.place(new).await;
        Ok(())
    }

    /// Find each mailbox's EWS URL and grouping and hand it to a group with room.
    async fn place(&self, records: Vec<MailboxRecord>) {
        if records.is_empty() {
            return;
        }
        let found: Vec<(MailboxRecord, Discovery)> = match &self.ctx.cfg.endpoint {
            EwsEndpoint::Direct(url) => records
                .into_iter()
                .map(|r| (r, Ok((url.clone(), String::new()))))
                .collect(),
            EwsEndpoint::Autodiscover(url) => {
                let addresses: Vec<String> = records.iter().map(|r| r.address.clone()).collect();
                match self.ctx.client.discover(url, &addresses).await {
                    Ok(found) => {
                        let mut by: HashMap<String, Result<(String, String), String>> =
                            found.into_iter().map(|d| (d.mailbox, d.result)).collect();
                        records
                            .into_iter()
                            .map(|r| {
                                let res = by.remove(&r.address).unwrap_or_else(|| {
                                    Err("Autodiscover did not answer for it".into())
                                });
                                (r, res)
                            })
                            .collect()
                    }
                    Err(f) => {
                        let why = format!("Autodiscover failed: {}: {}", f.code, f.detail);
                        records.into_iter().map(|r| (r, Err(why.clone()))).collect()
                    }
                }
            }
        };
        for (mut record, result) in found {
            let (ews_url, grouping) = match result {
                Ok(found) => found,
                Err(why) => {
                    tracing::warn!(mailbox = %record.address, error = %why, "no EWS URL; trying again later");
                    record.state = MailboxState::BackingOff;
                    record.last_error = Some(why.clone());
                    lock(&self.unplaced).insert(record.address.clone(), (record, why));
                    continue;
                }
            };
            if record.ews_url.as_deref().is_some_and(|u| u != ews_url)
                || record.grouping.as_deref().is_some_and(|g| g != grouping)
            {
                // Moved since the id was made: it lives on another server, and the events
                // it held since the last stream are out of reach.
                if record.subscription_id.is_some() {
                    tracing::warn!(mailbox = %record.address, "the mailbox's EWS URL or grouping changed; subscribing it anew and asking the receiver to resynchronise");
                    match self.ctx.delivery.request_resync(&record.address).await {
                        Ok(()) => record.resync_pending = true,
                        Err(e) => {
                            tracing::error!(mailbox = %record.address, error = %e, "cannot queue the resync signal")
                        }
                    }
                }
                record.subscription_id = None;
                record.stream_cookie = None;
            }
            record.ews_url = Some(ews_url.clone());
            record.grouping = Some(grouping.clone());
            let group = self.group_with_room(&ews_url, &grouping, &record.address);
            lock(&self.placement).insert(record.address.clone(), group.clone());
            let _ = group.commands.send(Command::Add(Box::new(record)));
        }
    }

    /// The first group at `ews_url`/`grouping` with room, or a new one anchored on `anchor`.
    fn group_with_room(&self, ews_url: &str, grouping: &str, anchor: &str) -> Arc<GroupHandle> {
        let mut groups = lock(&self.groups);
        for g in groups.iter() {
            let (url, grp) = {
                let s = lock(&g.state);
                (s.ews_url.clone(), s.grouping.clone())
            };
            if url != ews_url || grp != grouping {
                continue;
            }
            // Placed but not yet added count too (the Add may still be queued).
            if g.len() < MAX_GROUP {
                g.reserve();
                return g.clone();
            }
        }
        let g = Arc::new(GroupHandle::spawn(
            self.ctx.clone(),
            ews_url.to_owned(),
            grouping.to_owned(),
            anchor.to_owned(),
        ));
        g.reserve();
        groups.push(g.clone());
        g
    }

    /// The delivery spool the streams feed (the admin endpoint shows its depth and alarms).
    pub fn delivery(&self) -> &Arc<Delivery> {
        &self.ctx.delivery
    }

    /// Every group and mailbox, for the admin API.
    pub fn views(&self) -> StreamingViews {
        let now = store::now_millis();
        let groups: Vec<_> = lock(&self.groups).clone();
        let mut streaming_groups = Vec::new();
        let mut mailboxes = Vec::new();
        for g in &groups {
            let s = lock(&g.state);
            if s.members.is_empty() && s.connections == 0 {
                continue;
            }
            let seen = s
                .last_seen
                .as_ref()
                .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
                .filter(|t| *t > 0);
            streaming_groups.push(GroupView {
                ews_url: s.ews_url.clone(),
                grouping: s.grouping.clone(),
                anchor: s.anchor.clone(),
                mailboxes: s.members.len(),
                open_since: s.open_since.map(|t| {
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_millis(t),
                    )
                    .to_string()
                }),
                opened: s
                    .open_since
                    .map(|t| std::time::UNIX_EPOCH + Duration::from_millis(t)),
                seconds_since_keepalive: seen.map(|t| now.saturating_sub(t) / 1000),
                reconnects: s.reconnects,
                connections: s.connections,
                last_error: s.last_error.clone(),
            });
            for m in s.members.values() {
                let r = &m.record;
                mailboxes.push(MailboxView {
                    mailbox: r.address.clone(),
                    state: r.state,
                    subscription_id: r.subscription_id.clone(),
                    seconds_since_heartbeat: seen
                        .filter(|_| r.subscription_id.is_some())
                        .map(|t| now.saturating_sub(t) / 1000),
                    seconds_since_event: r.last_event.map(|t| now.saturating_sub(t) / 1000),
                    last_watermark: None,
                    last_error: r.last_error.clone(),
                    spool_depth: self.ctx.delivery.waiting_for(&r.address),
                    resync_pending: r.resync_pending,
                });
            }
        }
        for (r, why) in lock(&self.unplaced).values() {
            mailboxes.push(MailboxView {
                mailbox: r.address.clone(),
                state: MailboxState::BackingOff,
                subscription_id: None,
                seconds_since_heartbeat: None,
                seconds_since_event: None,
                last_watermark: None,
                last_error: Some(why.clone()),
                spool_depth: self.ctx.delivery.waiting_for(&r.address),
                resync_pending: r.resync_pending,
            });
        }
        mailboxes.sort_by_key(|v| (v.state == MailboxState::Active, v.mailbox.clone()));
        StreamingViews {
            streaming_groups,
            mailboxes,
        }
    }

    fn publish_gauges(&self) {
        let views = self.views();
        publish_mailbox_states(&self.ctx.metrics, &views.mailboxes);
        let oldest = views
            .streaming_groups
            .iter()
            .filter(|g| g.open_since.is_some())
            .filter_map(|g| g.seconds_since_keepalive)
            .max()
            .unwrap_or(0);
        self.ctx
            .metrics
            .set_stream_groups(views.streaming_groups.len(), Duration::from_secs(oldest));
    }
}

/// Re-read the mailboxes file when it changes or on SIGHUP, and apply the new set.
pub async fn watch_mailboxes(streams: Arc<Streams>) {
    let Some(file) = streams.ctx.cfg.mailboxes_file.clone() else {
        return std::future::pending().await;
    };
    crate::reload::watch(vec![file], "mailboxes file", || {
        let streams = streams.clone();
        async move {
            let wanted = streams.configured_mailboxes();
            tracing::info!(
                mailboxes = wanted.len(),
                "applying the mailbox set (streaming)"
            );
            if let Err(e) = streams.apply_mailbox_set(&wanted).await {
                tracing::error!(error = %e, "cannot apply the new mailbox set");
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_go_to_the_path_prefix() {
        assert_eq!(delivery_path("/ews").as_str(), "/ews");
        assert_eq!(delivery_path("/").as_str(), "/");
    }
}
