//! The mailbox set and one task per mailbox that keeps it subscribed.
//!
//! Each mailbox task loops: subscribe (from the last watermark), then watch the heartbeat the
//! request path records; when keep-alives stop for `--heartbeat-timeout`, or Exchange reports
//! the subscription broken, subscribe again. Errors follow PROTOCOL.md: back off as told,
//! rediscover moved mailboxes, drop a refused watermark and ask the receiver to resync, retry
//! permanent errors rarely. Every change of a mailbox's record is written to the store, so a
//! restarted relay knows every id it created and resumes from the stored watermarks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;

use super::backoff;
use super::client::{EwsClient, Failure, Target};
use crate::config::{EwsEndpoint, Managed};
use crate::metrics::Metrics;
use crate::spool::Delivery;
use crate::store::{self, MailboxRecord, MailboxState, StoreError, StoreWriter};
use ews::{self, Action, Folders};

/// Autodiscover groups hold at most this many mailboxes (Microsoft's guidance).
const MAX_GROUP: usize = 200;
/// Dirty mailbox records (new watermarks, heartbeats) are written at most this often; a crash
/// loses at most this much watermark progress, which means redelivered events, never lost ones.
const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Retired subscription ids are remembered this long, to answer `Unsubscribe` to them.
const RETIRED_ID_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Exchange pushes its first StatusEvent as soon as it has created a subscription, which can be
/// before the relay has read the SubscribeResponse naming the new id. A notification for an
/// unknown id waits this long at most for Subscribe calls in flight to finish before it is
/// taken for someone else's (and passed through, where the receiver might end it).
const UNKNOWN_ID_GRACE: Duration = Duration::from_secs(5);
/// On shutdown, Subscribe calls in flight get this long to finish so their new ids are stored
/// (a subscription Exchange created but the relay never recorded would be an orphan).
const SHUTDOWN_SUBSCRIBE_GRACE: Duration = Duration::from_secs(5);

/// Why a mailbox is being (re)subscribed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// First subscription after start-up or after the mailbox was added.
    Startup,
    /// Keep-alives stopped.
    Heartbeat,
    /// Exchange pushed an error for the subscription (e.g. ErrorReadEventsFailed).
    ErrorPush,
    /// The watermark was refused.
    InvalidWatermark,
    /// Exchange said the mailbox moved.
    Rediscover,
    /// Retrying after a failed attempt.
    Retry,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Startup => "startup",
            Reason::Heartbeat => "heartbeat",
            Reason::ErrorPush => "error_push",
            Reason::InvalidWatermark => "invalid_watermark",
            Reason::Rediscover => "rediscover",
            Reason::Retry => "retry",
        }
    }
}

enum Signal {
    Lost(Reason),
    Stop,
}

/// What the request path needs to know about one mailbox, shared with its task.
struct Mailbox {
    record: Mutex<MailboxRecord>,
    /// Unix ms of the latest notification (keep-alive or events); read by the watchdog.
    heartbeat_ms: AtomicU64,
    /// Records changed since the last flush.
    dirty: std::sync::atomic::AtomicBool,
    signals: mpsc::UnboundedSender<Signal>,
}

/// Who an incoming subscription id belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// The mailbox's current subscription.
    Current(String),
    /// A subscription the relay replaced or whose mailbox was removed: answer `Unsubscribe`.
    Retired(String),
}

/// Where a group of mailboxes is subscribed.
#[derive(Debug, Clone, Default)]
struct Group {
    ews_url: String,
    anchor: String,
    cookie: Option<String>,
    /// Held by the group's first Subscribe until it has answered (`true` once one succeeded),
    /// so the others wait for the `X-BackEndOverrideCookie` it returns instead of racing it.
    first: Arc<tokio::sync::Mutex<bool>>,
}

/// The subscription manager.
pub struct Manager {
    cfg: Managed,
    client: EwsClient,
    writer: Arc<StoreWriter>,
    delivery: Arc<Delivery>,
    metrics: Arc<Metrics>,
    mailboxes: RwLock<HashMap<String, Arc<Mailbox>>>,
    ids: RwLock<HashMap<String, Owner>>,
    /// Autodiscover results: mailbox → group key; group key → group.
    groups: Mutex<(HashMap<String, String>, HashMap<String, Group>)>,
    /// Set by [`Manager::shutdown`]: no new Subscribe calls start.
    stopping: std::sync::atomic::AtomicBool,
    /// Subscribe calls in flight, and a signal when one finishes (see [`UNKNOWN_ID_GRACE`]).
    subscribing: std::sync::atomic::AtomicUsize,
    subscribed: tokio::sync::Notify,
    /// The mailbox tasks and the flusher, ended by [`Manager::shutdown`].
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

/// One mailbox as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MailboxView {
    /// SMTP address.
    pub mailbox: String,
    /// Where its subscription stands; told in words ([`state_label`]) only at the edge: the
    /// API's JSON and the metrics' labels.
    #[serde(serialize_with = "serialize_state")]
    pub state: MailboxState,
    /// Current subscription id.
    pub subscription_id: Option<String>,
    /// Seconds since the last keep-alive or event.
    pub seconds_since_heartbeat: Option<u64>,
    /// Seconds since the last notification with events.
    pub seconds_since_event: Option<u64>,
    /// The last watermark.
    pub last_watermark: Option<String>,
    /// The last error.
    pub last_error: Option<String>,
    /// Notifications waiting in the spool.
    pub spool_depth: u64,
    /// The receiver has been told to resynchronise and has not yet acknowledged.
    pub resync_pending: bool,
}

/// Every mailbox state, in the order the metrics publish them.
pub const MAILBOX_STATES: [MailboxState; 5] = [
    MailboxState::Subscribing,
    MailboxState::Active,
    MailboxState::Lost,
    MailboxState::BackingOff,
    MailboxState::Failed,
];

fn serialize_state<S: serde::Serializer>(state: &MailboxState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state_label(*state))
}

/// The label of a mailbox state, as the admin API, the status page and metrics show it.
pub fn state_label(s: MailboxState) -> &'static str {
    match s {
        MailboxState::Subscribing => "subscribing",
        MailboxState::Active => "active",
        MailboxState::Lost => "lost",
        MailboxState::BackingOff => "backing-off",
        MailboxState::Failed => "failed",
    }
}

/// Publish how many mailboxes are in each state (`ews_relay_mailboxes{state}`), every state
/// named so that a state emptied drops to 0.
pub fn publish_mailbox_states(metrics: &Metrics, views: &[MailboxView]) {
    let all: Vec<(&'static str, i64)> = MAILBOX_STATES
        .iter()
        .map(|s| {
            let n = views.iter().filter(|v| v.state == *s).count();
            (state_label(*s), i64::try_from(n).unwrap_or(i64::MAX))
        })
        .collect();
    metrics.set_mailboxes(&all);
}

impl Manager {
    /// A manager over the stored state; nothing is subscribed until [`Manager::start`].
    pub async fn new(
        cfg: Managed,
        client: EwsClient,
        writer: Arc<StoreWriter>,
        delivery: Arc<Delivery>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let store = writer.store().clone();
        let now = store::now_millis();
        store
            .blocking(move |s| s.prune_retired(RETIRED_ID_TTL, now))
            .await?;
        let manager = Arc::new(Self {
            cfg,
            client,
            writer,
            delivery,
            metrics,
            mailboxes: RwLock::new(HashMap::new()),
            ids: RwLock::new(HashMap::new()),
            groups: Mutex::new(Default::default()),
            stopping: Default::default(),
            subscribing: Default::default(),
            subscribed: tokio::sync::Notify::new(),
            tasks: Mutex::new(Vec::new()),
        });
        // `resync_pending` ends when the receiver has acknowledged the resync signal.
        let weak = Arc::downgrade(&manager);
        manager.delivery.on_resync(move |mailbox, pending| {
            let Some(m) = weak.upgrade().and_then(|me| me.mailbox(mailbox)) else {
                return;
            };
            m.record
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .resync_pending = pending;
            m.dirty.store(true, Ordering::Relaxed);
        });
        Ok(manager)
    }

    /// Subscribe the configured mailboxes (call once the TLS listener is up: Exchange calls
    /// back at once), remove stored ones no longer configured, and start the flusher.
    pub async fn start(self: &Arc<Self>) -> Result<(), StoreError> {
        let wanted = self.configured_mailboxes();
        self.apply_mailbox_set(&wanted).await?;
        let me = self.clone();
        let flusher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_INTERVAL);
            loop {
                tick.tick().await;
                me.flush().await;
                me.publish_gauges();
            }
        });
        self.track(flusher);
        Ok(())
    }

    fn track(&self, task: tokio::task::JoinHandle<()>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// Stop subscribing: end every mailbox task and the flusher, then write what changed.
    /// Without this the tasks outlive the relay's `run`, keep calling Exchange and keep the
    /// store open.
    pub async fn shutdown(&self) {
        // A Subscribe in flight may already have created a subscription at Exchange: let it
        // finish (bounded) so its id is stored, and start no new ones meanwhile.
        self.stopping.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_SUBSCRIBE_GRACE;
        while self.subscribing.load(Ordering::Acquire) > 0 {
            let finished = self.subscribed.notified();
            if self.subscribing.load(Ordering::Acquire) == 0
                || tokio::time::timeout_at(deadline, finished).await.is_err()
            {
                break;
            }
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        self.flush().await;
    }

    /// The mailboxes from `--mailbox` and `--mailboxes-file` now.
    pub fn configured_mailboxes(&self) -> Vec<String> {
        let mut all = self.cfg.mailboxes.clone();
        if let Some(path) = &self.cfg.mailboxes_file {
            match crate::config::read_mailboxes_file(path) {
                Ok(list) => all.extend(list),
                Err(e) => {
                    // Keep the current set rather than unsubscribe everything on a bad edit.
                    tracing::error!(error = %e, "cannot read the mailboxes file; keeping the current set");
                    return self.current_set();
                }
            }
        }
        all.sort();
        all.dedup();
        all
    }

    fn current_set(&self) -> Vec<String> {
        let m = self.mailboxes.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> = m.keys().cloned().collect();
        v.sort();
        v
    }

    /// Make the running set equal `wanted`: start tasks for new mailboxes, stop removed ones
    /// and retire their subscriptions (Exchange's next push for them gets `Unsubscribe`).
    pub async fn apply_mailbox_set(self: &Arc<Self>, wanted: &[String]) -> Result<(), StoreError> {
        let store = self.writer.store().clone();
        let stored = store.blocking(|s| s.mailboxes()).await?;
        let stored: HashMap<String, MailboxRecord> =
            stored.into_iter().map(|r| (r.address.clone(), r)).collect();
        let running = self.current_set();
        // Removed: configured before (running or stored) but not wanted now.
        let mut removed: Vec<String> = running
            .iter()
            .chain(stored.keys())
            .filter(|m| !wanted.contains(m))
            .cloned()
            .collect();
        removed.sort();
        removed.dedup();
        for m in removed {
            self.remove(&m).await?;
        }
        if self.cfg.endpoint_is_autodiscover() {
            let new: Vec<String> = wanted
                .iter()
                .filter(|m| !running.contains(m))
                .cloned()
                .collect();
            self.discover(&new).await;
        }
        for m in wanted {
            if running.contains(m) {
                continue;
            }
            let record = stored
                .get(m)
                .cloned()
                .unwrap_or_else(|| MailboxRecord::new(m));
            self.spawn_mailbox(record);
        }
        Ok(())
    }

    fn spawn_mailbox(self: &Arc<Self>, record: MailboxRecord) {
        let (tx, rx) = mpsc::unbounded_channel();
        let address = record.address.clone();
        if let Some(id) = &record.subscription_id {
            self.ids
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), Owner::Current(address.clone()));
        }
        let mailbox = Arc::new(Mailbox {
            heartbeat_ms: AtomicU64::new(record.last_heartbeat.unwrap_or(0)),
            record: Mutex::new(record),
            dirty: Default::default(),
            signals: tx,
        });
        self.mailboxes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(address.clone(), mailbox.clone());
        let me = self.clone();
        self.track(tokio::spawn(async move {
            me.run_mailbox(address, mailbox, rx).await
        }));
    }

    async fn remove(&self, address: &str) -> Result<(), StoreError> {
        let mailbox = self
            .mailboxes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(address);
        if let Some(m) = &mailbox {
            let _ = m.signals.send(Signal::Stop);
            let id = m
                .record
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .subscription_id
                .clone();
            if let Some(id) = id {
                self.ids
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, Owner::Retired(address.to_owned()));
            }
        }
        let a = address.to_owned();
        let now = store::now_millis();
        self.writer
            .store()
            .blocking(move |s| s.remove_mailbox(&a, now))
            .await?;
        tracing::info!(
            mailbox = address,
            "mailbox removed; its subscription will be answered Unsubscribe"
        );
        Ok(())
    }

    /// Who `subscription_id` belongs to; `None` for ids the relay never created (passed through).
    pub async fn owner(&self, subscription_id: &str) -> Option<Owner> {
        if let Some(o) = self.owner_now(subscription_id).await {
            return Some(o);
        }
        // Maybe the push for a subscription whose SubscribeResponse we are still reading.
        let deadline = tokio::time::Instant::now() + UNKNOWN_ID_GRACE;
        while self.subscribing.load(Ordering::Acquire) > 0 {
            let notified = self.subscribed.notified();
            if let Some(o) = self.in_memory(subscription_id) {
                return Some(o);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        self.in_memory(subscription_id)
    }

    /// Whether the relay retired `subscription_id` (replaced it, or its mailbox was removed),
    /// as far as this process has seen it: for the tracker, so such an id is not taken for a
    /// stale one. Never waits.
    pub fn is_retired(&self, subscription_id: &str) -> bool {
        matches!(self.in_memory(subscription_id), Some(Owner::Retired(_)))
    }

    fn in_memory(&self, subscription_id: &str) -> Option<Owner> {
        self.ids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(subscription_id)
            .cloned()
    }

    async fn owner_now(&self, subscription_id: &str) -> Option<Owner> {
        if let Some(o) = self
            .ids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(subscription_id)
        {
            return Some(o.clone());
        }
        // Not in memory: an id retired before this process started.
        let id = subscription_id.to_owned();
        let found = self
            .writer
            .store()
            .blocking(move |s| s.subscription_owner(&id))
            .await
            .ok()
            .flatten()?;
        let owner = Owner::Retired(found.mailbox);
        self.ids
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(subscription_id.to_owned(), owner.clone());
        Some(owner)
    }

    /// Record a notification for a mailbox's current subscription (the heartbeat); an error
    /// push marks the subscription lost.
    pub fn notified(&self, mailbox: &str, watermark: Option<&str>, events: bool, error: bool) {
        let Some(m) = self.mailbox(mailbox) else {
            return;
        };
        let now = store::now_millis();
        m.heartbeat_ms.store(now, Ordering::Relaxed);
        let mut r = m.record.lock().unwrap_or_else(|e| e.into_inner());
        r.last_heartbeat = Some(now);
        if events {
            r.last_event = Some(now);
        }
        if let Some(w) = watermark {
            if r.watermark.as_deref() != Some(w) {
                r.watermark = Some(w.to_owned());
            }
        }
        drop(r);
        m.dirty.store(true, Ordering::Relaxed);
        if error {
            let _ = m.signals.send(Signal::Lost(Reason::ErrorPush));
        }
    }

    fn mailbox(&self, address: &str) -> Option<Arc<Mailbox>> {
        self.mailboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(address)
            .cloned()
    }

    /// The delivery side.
    pub fn delivery(&self) -> &Arc<Delivery> {
        &self.delivery
    }

    /// Every mailbox, for the admin API; problems first.
    pub fn views(&self) -> Vec<MailboxView> {
        let now = store::now_millis();
        let mailboxes: Vec<_> = self
            .mailboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut out: Vec<MailboxView> = mailboxes
            .iter()
            .map(|m| {
                let r = m.record.lock().unwrap_or_else(|e| e.into_inner()).clone();
                MailboxView {
                    state: r.state,
                    subscription_id: r.subscription_id.clone(),
                    seconds_since_heartbeat: r.last_heartbeat.map(|t| now.saturating_sub(t) / 1000),
                    seconds_since_event: r.last_event.map(|t| now.saturating_sub(t) / 1000),
                    last_watermark: r.watermark.clone(),
                    last_error: r.last_error.clone(),
                    spool_depth: self.delivery.waiting_for(&r.address),
                    resync_pending: r.resync_pending,
                    mailbox: r.address,
                }
            })
            .collect();
        out.sort_by_key(|v| (v.state == MailboxState::Active, v.mailbox.clone()));
        out
    }

    fn publish_gauges(&self) {
        publish_mailbox_states(&self.metrics, &self.views());
    }

    /// Write records changed by the request path (watermarks, heartbeats).
    pub async fn flush(&self) {
        let dirty: Vec<MailboxRecord> = self
            .mailboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|m| m.dirty.swap(false, Ordering::Relaxed))
            .map(|m| m.record.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        // Concurrent submissions: the store writer commits them together.
        let mut writes = tokio::task::JoinSet::new();
        for r in dirty {
            let writer = self.writer.clone();
            writes.spawn(async move { writer.put_mailbox(r, store::now_millis()).await });
        }
        while let Some(joined) = writes.join_next().await {
            if let Ok(Err(e)) = joined {
                tracing::error!(error = %e, "cannot write mailbox state");
            }
        }
    }

    async fn save(&self, m: &Mailbox) {
        let r = m.record.lock().unwrap_or_else(|e| e.into_inner()).clone();
        m.dirty.store(false, Ordering::Relaxed);
        if let Err(e) = self.writer.put_mailbox(r, store::now_millis()).await {
            tracing::error!(error = %e, "cannot write mailbox state");
        }
    }

    fn set_state(&self, m: &Mailbox, state: MailboxState, error: Option<String>) {
        let mut r = m.record.lock().unwrap_or_else(|e| e.into_inner());
        r.state = state;
        if error.is_some() || state == MailboxState::Active {
            r.last_error = error;
        }
    }

    /// One mailbox's life: subscribe, watch, resubscribe, until removed.
    async fn run_mailbox(
        self: Arc<Self>,
        address: String,
        m: Arc<Mailbox>,
        mut signals: mpsc::UnboundedReceiver<Signal>,
    ) {
        let timeout = self.cfg.heartbeat_timeout;
        let mut failures: u32 = 0;
        // A stored subscription may still be alive (a quick restart): watch it first, and
        // resubscribe only if it stays silent. Saves a subscription against the 20 allowed.
        let known = m
            .record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .subscription_id
            .is_some();
        let mut next: Option<Reason> = if known {
            m.heartbeat_ms.store(store::now_millis(), Ordering::Relaxed);
            None
        } else {
            Some(Reason::Startup)
        };
        loop {
            if let Some(reason) = next.take() {
                match self.subscribe_once(&address, &m, reason).await {
                    Ok(()) => {
                        failures = 0;
                        if reason != Reason::Startup && reason != Reason::Retry {
                            self.metrics.resubscribe(reason.as_str());
                        }
                    }
                    Err((failure, retry_reason)) => {
                        failures += 1;
                        let wait = self.wait_after(&failure, failures);
                        tracing::warn!(mailbox = %address, code = %failure.code, detail = %failure.detail, retry_in = ?wait, "subscribe failed");
                        if !wait.is_zero() {
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                s = signals.recv() => match s {
                                    Some(Signal::Stop) | None => return,
                                    Some(Signal::Lost(_)) => {}
                                },
                            }
                        }
                        next = Some(retry_reason);
                        continue;
                    }
                }
            }
            // Watch: wake at heartbeat + timeout; a newer heartbeat moves the deadline.
            let last = m.heartbeat_ms.load(Ordering::Relaxed);
            let silent = Duration::from_millis(store::now_millis().saturating_sub(last));
            if silent >= timeout {
                tracing::warn!(mailbox = %address, silent_for = ?silent, "no keep-alive within --heartbeat-timeout: subscription lost, resubscribing from the last watermark");
                self.set_state(
                    &m,
                    MailboxState::Lost,
                    Some(format!("no keep-alive for {}s", silent.as_secs())),
                );
                self.save(&m).await;
                next = Some(Reason::Heartbeat);
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(timeout - silent) => {}
                s = signals.recv() => match s {
                    Some(Signal::Stop) | None => return,
                    Some(Signal::Lost(reason)) => {
                        tracing::warn!(mailbox = %address, reason = reason.as_str(), "subscription reported broken; resubscribing");
                        self.set_state(&m, MailboxState::Lost, Some(format!("{} reported by Exchange", reason.as_str())));
                        if reason == Reason::ErrorPush {
                            // ErrorReadEventsFailed: the mailbox may have moved.
                            self.forget_discovery(&address);
                        }
                        next = Some(reason);
                    }
                },
            }
        }
    }

    /// How long to wait before retrying after `failure`.
    fn wait_after(&self, failure: &Failure, failures: u32) -> Duration {
        let r = backoff::random();
        match failure.action {
            Action::BackOff(d) => d.max(Duration::from_millis(100)),
            Action::ResubscribeWithoutWatermark => Duration::ZERO,
            Action::Rediscover if failures <= 1 => Duration::ZERO,
            Action::Permanent => {
                backoff::delay(failures, backoff::PERMANENT_BASE, backoff::PERMANENT_CAP, r)
            }
            _ => backoff::delay(failures, backoff::TRANSIENT_BASE, backoff::TRANSIENT_CAP, r),
        }
    }

    /// One Subscribe; on failure, the failure and the reason for the next attempt.
    async fn subscribe_once(
        &self,
        address: &str,
        m: &Mailbox,
        reason: Reason,
    ) -> Result<(), (Failure, Reason)> {
        self.set_state(m, MailboxState::Subscribing, None);
        let mut group = match self.target(address).await {
            Ok(g) => g,
            Err(f) => {
                self.fail(m, &f).await;
                return Err((f, Reason::Retry));
            }
        };
        let affinity = self.cfg.endpoint_is_autodiscover();
        // Until a Subscribe of the group has succeeded, subscribe its mailboxes one at a time:
        // the first answer carries the backend cookie the others must send.
        let mut first = None;
        if affinity && group.cookie.is_none() {
            let guard = group.first.clone().lock_owned().await;
            if *guard {
                group = self.group_of(address).unwrap_or(group);
            } else {
                first = Some(guard);
            }
        }
        let watermark = m
            .record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .watermark
            .clone();
        let folders: Vec<&str> = self.cfg.folders.iter().map(String::as_str).collect();
        let request = ews::SubscribeRequest {
            server_version: ews::DEFAULT_SERVER_VERSION,
            mailbox: address,
            folders: Folders::from_names(&folders),
            event_types: &self.cfg.event_types,
            watermark: watermark.as_deref(),
            status_frequency: self.cfg.status_frequency,
            // Push mode always has one (config checks); streaming never builds a Manager.
            url: self.cfg.callback_url.as_deref().unwrap_or_default(),
        };
        let target = Target {
            ews_url: &group.ews_url,
            anchor: if affinity { &group.anchor } else { address },
            affinity,
            backend_cookie: group.cookie.as_deref(),
        };
        if self.stopping.load(Ordering::Acquire) {
            return Err((
                Failure::new(Action::Transient, "ShuttingDown", "the relay is stopping"),
                Reason::Retry,
            ));
        }
        self.subscribing.fetch_add(1, Ordering::AcqRel);
        let result = self.client.subscribe(target, &request).await;
        let outcome = self
            .after_subscribe(address, m, reason, &group, result)
            .await;
        if let Some(mut first) = first {
            *first = outcome.is_ok();
        }
        self.subscribing.fetch_sub(1, Ordering::AcqRel);
        self.subscribed.notify_waiters();
        outcome
    }

    /// Record a Subscribe's result (the new id is in the id map before waiters are woken).
    async fn after_subscribe(
        &self,
        address: &str,
        m: &Mailbox,
        reason: Reason,
        group: &Group,
        result: Result<super::client::Subscribed, Failure>,
    ) -> Result<(), (Failure, Reason)> {
        match result {
            Ok(sub) if self.mailbox(address).is_none() => {
                // Removed while this Subscribe was in flight: record the new id as ours and
                // retire it at once, so Exchange's pushes for it get Unsubscribe (now and after
                // a restart) instead of reviving the mailbox.
                self.metrics.subscribe("success");
                self.ids.write().unwrap_or_else(|e| e.into_inner()).insert(
                    sub.subscription_id.clone(),
                    Owner::Retired(address.to_owned()),
                );
                let mut record = m.record.lock().unwrap_or_else(|e| e.into_inner()).clone();
                record.subscription_id = Some(sub.subscription_id);
                let now = store::now_millis();
                let a = address.to_owned();
                let result = self
                    .writer
                    .store()
                    .blocking(move |s| {
                        s.put_mailbox(&record, now)?;
                        s.remove_mailbox(&a, now)
                    })
                    .await;
                if let Err(e) = result {
                    tracing::error!(mailbox = address, error = %e, "cannot retire a subscription made for a removed mailbox");
                }
                tracing::info!(
                    mailbox = address,
                    "mailbox removed during its Subscribe; the new subscription is retired"
                );
                Ok(())
            }
            Ok(sub) => {
                if let Some(cookie) = &sub.backend_cookie {
                    self.remember_cookie(address, cookie);
                }
                self.metrics.subscribe("success");
                let old = {
                    let mut r = m.record.lock().unwrap_or_else(|e| e.into_inner());
                    let old = r.subscription_id.replace(sub.subscription_id.clone());
                    if r.watermark.is_none() {
                        r.watermark = Some(sub.watermark.clone());
                    }
                    r.state = MailboxState::Active;
                    r.last_error = None;
                    r.ews_url = Some(group.ews_url.clone());
                    old
                };
                // Exchange pushes a StatusEvent at once; count the subscribe itself as life.
                m.heartbeat_ms.store(store::now_millis(), Ordering::Relaxed);
                {
                    let mut ids = self.ids.write().unwrap_or_else(|e| e.into_inner());
                    if let Some(old) = old {
                        ids.insert(old, Owner::Retired(address.to_owned()));
                    }
                    ids.insert(
                        sub.subscription_id.clone(),
                        Owner::Current(address.to_owned()),
                    );
                }
                self.save(m).await;
                tracing::info!(mailbox = address, reason = reason.as_str(), "subscribed");
                Ok(())
            }
            Err(f) => {
                self.metrics.subscribe(outcome_label(&f.action));
                let next = match f.action {
                    Action::ResubscribeWithoutWatermark => {
                        // The receiver must resynchronise: events since the watermark are lost.
                        {
                            let mut r = m.record.lock().unwrap_or_else(|e| e.into_inner());
                            r.watermark = None;
                            r.resync_pending = true;
                        }
                        if let Err(e) = self.delivery.request_resync(address).await {
                            tracing::error!(mailbox = address, error = %e, "cannot queue the resync signal");
                        }
                        tracing::warn!(mailbox = address, "watermark refused (ErrorInvalidWatermark): subscribing without one; receiver told to resynchronise");
                        Reason::InvalidWatermark
                    }
                    Action::Rediscover => {
                        self.forget_discovery(address);
                        Reason::Rediscover
                    }
                    _ => Reason::Retry,
                };
                self.fail(m, &f).await;
                Err((f, next))
            }
        }
    }

    async fn fail(&self, m: &Mailbox, f: &Failure) {
        let state = match f.action {
            Action::Permanent => MailboxState::Failed,
            _ => MailboxState::BackingOff,
        };
        self.set_state(m, state, Some(format!("{}: {}", f.code, f.detail)));
        self.save(m).await;
    }

    /// The EWS URL, anchor and cookie for `address`, discovering it first if needed.
    async fn target(&self, address: &str) -> Result<Group, Failure> {
        match &self.cfg.endpoint {
            EwsEndpoint::Direct(url) => Ok(Group {
                ews_url: url.clone(),
                anchor: address.to_owned(),
                ..Group::default()
            }),
            EwsEndpoint::Autodiscover(_) => {
                if let Some(g) = self.group_of(address) {
                    return Ok(g);
                }
                let mut errors = self.discover(&[address.to_owned()]).await;
                self.group_of(address).ok_or_else(|| {
                    Failure::new(
                        Action::Transient,
                        "AutodiscoverFailed",
                        errors.remove(address).unwrap_or_else(|| {
                            "Autodiscover gave no EWS URL for this mailbox".into()
                        }),
                    )
                })
            }
        }
    }

    fn group_of(&self, address: &str) -> Option<Group> {
        let g = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        g.0.get(address).and_then(|k| g.1.get(k)).cloned()
    }

    fn forget_discovery(&self, address: &str) {
        let mut g = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        g.0.remove(address);
    }

    fn remember_cookie(&self, address: &str, cookie: &str) {
        let mut g = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = g.0.get(address).cloned() {
            if let Some(group) = g.1.get_mut(&key) {
                group.cookie = Some(cookie.to_owned());
            }
        }
    }

    /// Autodiscover `mailboxes` and place each in a group of at most [`MAX_GROUP`] sharing
    /// ExternalEwsUrl and GroupingInformation; the group's first mailbox is its anchor.
    /// Returns why the mailboxes left out have no EWS URL, for the operator.
    async fn discover(&self, mailboxes: &[String]) -> HashMap<String, String> {
        let mut errors = HashMap::new();
        let EwsEndpoint::Autodiscover(url) = &self.cfg.endpoint else {
            return errors;
        };
        if mailboxes.is_empty() {
            return errors;
        }
        let found = match self.client.discover(url, mailboxes).await {
            Ok(f) => f,
            Err(f) => {
                tracing::warn!(code = %f.code, detail = %f.detail, "Autodiscover failed");
                for m in mailboxes {
                    errors.insert(m.clone(), format!("{}: {}", f.code, f.detail));
                }
                return errors;
            }
        };
        let mut g = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        for d in found {
            let (ews_url, grouping) = match d.result {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(mailbox = %d.mailbox, error = %e, "Autodiscover: no EWS URL");
                    errors.insert(d.mailbox, e);
                    continue;
                }
            };
            // Fill the first group of this (url, grouping) with room, else open a new one.
            let base = format!("{ews_url}\u{0}{grouping}");
            let mut n = 0;
            let key = loop {
                let key = format!("{base}\u{0}{n}");
                let members = g.0.values().filter(|k| **k == key).count();
                if members < MAX_GROUP {
                    break key;
                }
                n += 1;
            };
            g.1.entry(key.clone()).or_insert_with(|| Group {
                ews_url: ews_url.clone(),
                anchor: d.mailbox.clone(),
                ..Group::default()
            });
            g.0.insert(d.mailbox.clone(), key);
        }
        errors
    }
}

fn outcome_label(a: &Action) -> &'static str {
    match a {
        Action::Success => "success",
        Action::Transient => "transient",
        Action::BackOff(_) => "backoff",
        Action::Rediscover => "rediscover",
        Action::ResubscribeWithoutWatermark => "invalid_watermark",
        Action::Resubscribe => "resubscribe",
        Action::Permanent => "permanent",
    }
}

impl Managed {
    /// Whether mailboxes are found through Autodiscover.
    pub fn endpoint_is_autodiscover(&self) -> bool {
        matches!(self.endpoint, EwsEndpoint::Autodiscover(_))
    }
}
