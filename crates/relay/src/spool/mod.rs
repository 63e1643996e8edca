//! Managed-mode delivery: every notification the relay acknowledges to Exchange reaches the
//! receiver at least once, in order per mailbox.
//!
//! A notification is delivered straight away when the mailbox has nothing waiting; otherwise,
//! or when the receiver fails, it is appended to the durable spool (fsync'd, group-committed)
//! before Exchange hears `OK`. A replay task drains the spool in order with back-off. A per-
//! mailbox lock orders direct deliveries and replays, so a later notification never overtakes
//! an earlier spooled one.
//!
//! # Limits: a full spool, a full disk, an old backlog
//! The spool is bounded by `--spool-max-bytes` (body bytes of all waiting notifications) and
//! `--spool-max-age` (age of a mailbox's oldest waiting notification). Neither limit ever drops
//! a notification the relay has acknowledged: when a notification would have to be spooled and
//! the spool is full, the disk is full (ENOSPC), or its mailbox's backlog is older than the max
//! age, it is *refused* (Exchange hears 503 and retries, or lets the subscription lapse; the
//! keeper then resubscribes from the last watermark, which only moves for notifications that
//! were safe, so Exchange delivers the refused events again once there is room). A notification
//! that needs no spool (its mailbox has no backlog and the receiver takes it) is still delivered.
//!
//! Why refuse rather than drop the oldest at the max age: a dropped notification can only be
//! made up for by a full resynchronisation of the mailbox by the receiver, while a refused one
//! stays at Exchange and arrives later by itself. Exchange keeps a watermark resumable for about
//! 30 days, far longer than the default max age; only past that does the keeper's existing
//! `ErrorInvalidWatermark` path ask the receiver to resynchronise (`X-EWS-Resync-Required`),
//! which is then unavoidable and signalled, never silent. The cost of refusing is that the
//! relay's alarm (status page, `ews_relay_spool_full`, `ews_relay_spool_over_age_mailboxes`,
//! `ews_relay_spool_refusals_total`) must be acted upon: the receiver is down, or the disk full.
//!
//! # Logging an outage
//! A receiver outage is logged once per mailbox when it starts, then at most every
//! [`EPISODE_LOG_INTERVAL`] with counts while it lasts, and once when the mailbox's backlog has
//! drained; refusals the same way. Single attempts are logged at debug level only.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderName;

pub use crate::config::SpoolLimits;
use crate::metrics::Metrics;
use crate::receiver::{Outgoing, Receiver};
use crate::store::{self, NewSpoolEntry, Store, StoreError, StoreWriter, UnixMillis};
use http1::HeaderBlock;

/// Header naming the mailbox a notification belongs to.
pub static X_EWS_MAILBOX: HeaderName = HeaderName::from_static("x-ews-mailbox");
/// Header naming the subscription a notification arrived on.
pub static X_EWS_SUBSCRIPTION_ID: HeaderName = HeaderName::from_static("x-ews-subscription-id");
/// Header of the POST telling the receiver a mailbox's watermark was lost and it must
/// resynchronise that mailbox (events may have been missed).
pub static X_EWS_RESYNC_REQUIRED: HeaderName = HeaderName::from_static("x-ews-resync-required");
/// Header with the time the relay received a spooled notification (RFC 3339).
pub static X_EWS_RECEIVED_AT: HeaderName = HeaderName::from_static("x-ews-received-at");
/// `streaming` on EWS deliveries when managed EWS mode follows the mailboxes by streaming.
pub static X_EWS_TRANSPORT: HeaderName = HeaderName::from_static("x-ews-transport");
/// Graph: the resource (as configured) a notification belongs to.
pub static X_GRAPH_RESOURCE: HeaderName = HeaderName::from_static("x-graph-resource");
/// Graph: the mailbox of the resource, when its path names one (`users/{upn}/…`).
pub static X_GRAPH_MAILBOX: HeaderName = HeaderName::from_static("x-graph-mailbox");
/// Graph: the subscription a notification arrived on.
pub static X_GRAPH_SUBSCRIPTION_ID: HeaderName = HeaderName::from_static("x-graph-subscription-id");
/// Graph: the notification's `changeType`.
pub static X_GRAPH_CHANGE_TYPE: HeaderName = HeaderName::from_static("x-graph-change-type");
/// Graph: the resync signal (Graph said `missed`): the receiver must resynchronise the
/// resource this header names, e.g. with a delta query.
pub static X_GRAPH_RESYNC_REQUIRED: HeaderName = HeaderName::from_static("x-graph-resync-required");
/// Graph: the time the relay received a spooled notification (RFC 3339).
pub static X_GRAPH_RECEIVED_AT: HeaderName = HeaderName::from_static("x-graph-received-at");

/// The relay's own header fields: a client's values for them are dropped before a delivery.
const OWN_FIELDS: [&HeaderName; 11] = [
    &X_EWS_MAILBOX,
    &X_EWS_TRANSPORT,
    &X_EWS_SUBSCRIPTION_ID,
    &X_EWS_RESYNC_REQUIRED,
    &X_EWS_RECEIVED_AT,
    &X_GRAPH_RESOURCE,
    &X_GRAPH_MAILBOX,
    &X_GRAPH_SUBSCRIPTION_ID,
    &X_GRAPH_CHANGE_TYPE,
    &X_GRAPH_RESYNC_REQUIRED,
    &X_GRAPH_RECEIVED_AT,
];

/// The spool queue of a Graph resource: notifications of one resource reach the receiver in
/// order, across the subscriptions that follow each other for it.
pub fn graph_queue(resource: &str) -> String {
    format!("{}{resource}", store::GRAPH_QUEUE_PREFIX)
}

/// Where deliveries go on the receiver: the path and query of the callback URL the
/// notifications were posted to, per source.
#[derive(Debug, Clone)]
pub struct Paths {
    /// EWS: `--callback-url`'s.
    pub ews: http::uri::PathAndQuery,
    /// Graph: `--graph-callback-url`'s.
    pub graph: http::uri::PathAndQuery,
    /// `X-EWS-Transport` on every EWS delivery, replays and resync signals included (the spool
    /// keeps no headers): `Some("streaming")` with `--transport streaming`.
    pub ews_transport: Option<&'static str>,
}

/// Entries replayed per mailbox before moving to the next, so one mailbox's backlog does not
/// starve the others.
const REPLAY_BATCH: usize = 32;
/// First pause after the receiver refused a replay.
const REPLAY_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest pause between replay attempts while the receiver is down.
const REPLAY_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// While an outage or a refusal episode of a mailbox lasts, a reminder with counts is logged at
/// most this often: often enough to show in any log window an operator looks at, rare enough
/// that a day-long outage of a thousand mailboxes does not flood the log.
pub const EPISODE_LOG_INTERVAL: Duration = Duration::from_secs(300);

/// Whether the spool takes notifications: the alarm of the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolHealth {
    /// Notifications that need the spool are spooled.
    Ok,
    /// Some mailboxes' backlogs are older than `--spool-max-age`: their notifications are
    /// refused until the backlog drains.
    OverAge,
    /// `--spool-max-bytes` is reached: notifications that need the spool are refused.
    Full,
    /// The last spool write failed because the file system is full: notifications that need
    /// the spool are refused until one succeeds.
    DiskFull,
}

impl SpoolHealth {
    /// One sentence for the operator, `None` when all is well.
    pub fn alarm(self) -> Option<&'static str> {
        match self {
            SpoolHealth::Ok => None,
            SpoolHealth::OverAge => Some(
                "Some mailboxes' spooled notifications are older than --spool-max-age: their \
                 new notifications are refused (Exchange retries them) until the receiver takes \
                 the backlog.",
            ),
            SpoolHealth::Full => Some(
                "The spool is full (--spool-max-bytes): notifications that would need it are \
                 refused (Exchange retries them) until the receiver takes the backlog.",
            ),
            SpoolHealth::DiskFull => Some(
                "The disk of --state-dir is full: notifications that would need the spool are \
                 refused (Exchange retries them) until there is room.",
            ),
        }
    }
}

/// Why a notification was neither delivered nor spooled; Exchange must not be told `OK`.
#[derive(Debug, thiserror::Error)]
pub enum NotAccepted {
    /// The spool holds `--spool-max-bytes`.
    #[error("the spool is full ({bytes} of --spool-max-bytes {max} bytes)")]
    SpoolFull {
        /// Body bytes waiting.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The mailbox's oldest waiting notification is older than `--spool-max-age`.
    #[error("its oldest spooled notification is older than --spool-max-age ({max:?})")]
    OverAge {
        /// The limit.
        max: Duration,
    },
    /// The file system is full.
    #[error("the disk is full: {0}")]
    DiskFull(#[source] StoreError),
    /// Any other store failure.
    #[error(transparent)]
    Store(StoreError),
    /// The sender's deadline passed while an earlier notification of the same queue was
    /// being delivered.
    #[error("its queue was busy until the sender's deadline")]
    Busy,
}

impl NotAccepted {
    /// The `reason` label of `ews_relay_spool_refusals_total`.
    pub fn label(&self) -> &'static str {
        match self {
            NotAccepted::SpoolFull { .. } => "spool_full",
            NotAccepted::OverAge { .. } => "max_age",
            NotAccepted::DiskFull(_) => "disk_full",
            NotAccepted::Store(_) => "store_error",
            NotAccepted::Busy => "busy",
        }
    }
}

/// One ongoing problem of a mailbox (the receiver failing, or notifications refused), so it is
/// logged when it starts, at most every [`EPISODE_LOG_INTERVAL`] while it lasts, and when it
/// ends, instead of once per notification.
#[derive(Debug, Clone)]
struct Episode {
    started: Instant,
    /// Occurrences (failed attempts, refusals) since it started.
    count: u64,
    last_logged: Instant,
}

impl Episode {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            count: 1,
            last_logged: now,
        }
    }

    /// Count one more occurrence at `now`; true when a reminder line is due.
    fn again(&mut self, now: Instant, interval: Duration) -> bool {
        self.count += 1;
        if now.saturating_duration_since(self.last_logged) >= interval {
            self.last_logged = now;
            true
        } else {
            false
        }
    }
}

/// How a notification was taken care of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// The receiver answered 2xx.
    Delivered,
    /// Durably spooled; the receiver gets it later.
    Spooled,
}

/// Per-mailbox delivery order and backlog.
#[derive(Debug, Default)]
struct Queue {
    /// Entries waiting in the spool for this mailbox.
    waiting: u64,
    /// Of those, resync signals queued by this process (ones spooled before a restart are
    /// older, so delivered first: counting from zero still ends at zero).
    resyncs: u64,
    /// When the oldest waiting entry was received (at most that old: replay refreshes it).
    oldest: Option<UnixMillis>,
    /// The receiver is failing for this mailbox; ends when its backlog has drained.
    outage: Option<Episode>,
    /// Notifications for this mailbox are being refused; ends at the next one accepted.
    refusing: Option<Episode>,
    /// Entries spooled since the outage started, for the drain line.
    spooled_in_outage: u64,
    /// A resync signal waits in the queue and has not been sent to the receiver yet: another
    /// would be redundant (the receiver resynchronises when it gets the first, which is after
    /// whatever made the second necessary).
    resync_unsent: bool,
}

/// Told, under the mailbox's queue lock, whether a resync signal is still waiting for it.
type ResyncHook = Box<dyn Fn(&str, bool) + Send + Sync>;

/// A delivery attempt made while Graph waits for the answer ends after this long: the
/// notification is spooled instead, so Graph hears 202 well within the ~3 s after which it
/// counts an endpoint as slow (and throttles, then drops it). The receiver may then get it twice
/// (at least once, never lost).
pub const GRAPH_DIRECT_LIMIT: Duration = Duration::from_millis(1500);

/// The delivery side of managed mode.
pub struct Delivery {
    receiver: Arc<Receiver>,
    /// Path and query deliveries use: the callback URL's, which is where Exchange or Graph
    /// posts.
    paths: Paths,
    writer: Arc<StoreWriter>,
    store: Arc<Store>,
    queues: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Queue>>>>,
    wake: tokio::sync::Notify,
    metrics: Arc<Metrics>,
    /// One per keeper (EWS, Graph); each ignores the queues that are not its own.
    resync_hooks: std::sync::RwLock<Vec<ResyncHook>>,
    limits: SpoolLimits,
    /// Body bytes waiting, all mailboxes (reserved before an append, so concurrent appends
    /// cannot overshoot the limit together).
    bytes: AtomicU64,
    /// A notification was refused for lack of room and nothing has been acknowledged since.
    full: AtomicBool,
    /// The last spool write failed with a full disk.
    disk_full: AtomicBool,
    /// Mailboxes refusing because their backlog is older than the max age.
    over_age: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").finish_non_exhaustive()
    }
}

impl Delivery {
    /// Delivery through `receiver`, spooling into the store; counts pending entries per mailbox
    /// from the store so a restart resumes the backlog.
    pub async fn new(
        receiver: Arc<Receiver>,
        paths: Paths,
        writer: Arc<StoreWriter>,
        limits: SpoolLimits,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let store = writer.store().clone();
        let (depth, oldest) = store
            .blocking(|s| {
                let depth = s.spool_depth()?;
                let mut oldest = HashMap::new();
                for m in depth.per_mailbox.keys() {
                    if let Some(e) = s.spool_peek(m, 1)?.first() {
                        oldest.insert(m.clone(), e.received_at);
                    }
                }
                Ok::<_, StoreError>((depth, oldest))
            })
            .await?;
        let queues = depth
            .per_mailbox
            .into_iter()
            .map(|(m, n)| {
                let q = Queue {
                    waiting: n,
                    oldest: oldest.get(&m).copied(),
                    ..Queue::default()
                };
                (m, Arc::new(tokio::sync::Mutex::new(q)))
            })
            .collect();
        metrics.set_spool_limits(limits.max_bytes);
        metrics.set_spool_bytes(depth.bytes);
        Ok(Arc::new(Self {
            limits,
            bytes: AtomicU64::new(depth.bytes),
            full: AtomicBool::new(false),
            disk_full: AtomicBool::new(false),
            over_age: Mutex::new(BTreeSet::new()),
            receiver,
            paths,
            writer,
            store,
            queues: Mutex::new(queues),
            wake: tokio::sync::Notify::new(),
            metrics,
            resync_hooks: Default::default(),
        }))
    }

    /// Call `hook(mailbox, pending)` whenever a resync signal is queued or delivered, so the
    /// status page can show whether the receiver still has to hear it.
    pub fn on_resync(&self, hook: impl Fn(&str, bool) + Send + Sync + 'static) {
        self.resync_hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    fn resync_changed(&self, mailbox: &str, q: &Queue) {
        for hook in self
            .resync_hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            hook(mailbox, q.resyncs > 0);
        }
    }

    fn queue(&self, mailbox: &str) -> Arc<tokio::sync::Mutex<Queue>> {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.entry(mailbox.to_owned()).or_default().clone()
    }

    /// Take care of one notification: deliver it now if nothing is waiting for its mailbox, else
    /// (or if the receiver fails) spool it. `Err` means it is neither delivered nor durably
    /// stored (see the module's "Limits"): Exchange must not be told `OK`.
    ///
    /// `answer_by`: when the sender wants its answer (Graph, within seconds): the wait for the
    /// mailbox's queue ends then ([`NotAccepted::Busy`]), and a direct attempt is cut after
    /// [`GRAPH_DIRECT_LIMIT`] or at that time, whichever is first, and the notification spooled
    /// instead. `None`: no limit but `--upstream-timeout` (EWS). Once the spool append has
    /// begun it runs to its end: cancelling it could store an entry the queue does not count.
    pub async fn accept(
        &self,
        mailbox: &str,
        subscription_id: &str,
        headers: HeaderBlock,
        body: Bytes,
        answer_by: Option<tokio::time::Instant>,
    ) -> Result<Accepted, NotAccepted> {
        let queue = self.queue(mailbox);
        let mut q = match answer_by {
            None => queue.lock().await,
            Some(at) => match tokio::time::timeout_at(at, queue.lock()).await {
                Ok(q) => q,
                Err(_) => {
                    self.metrics.spool_refusal(mailbox, "busy");
                    return Err(NotAccepted::Busy);
                }
            },
        };
        if q.waiting == 0 {
            let out = self.request(mailbox, subscription_id, &headers, body.clone(), None, None);
            let attempt = match answer_by {
                None => self.try_deliver(&out).await,
                Some(at) => {
                    let limit = at
                        .saturating_duration_since(tokio::time::Instant::now())
                        .min(GRAPH_DIRECT_LIMIT);
                    tokio::time::timeout(limit, self.try_deliver(&out))
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!(
                                "receiver slower than {} ms; spooled instead",
                                limit.as_millis()
                            ))
                        })
                }
            };
            match attempt {
                Ok(()) => {
                    self.metrics.delivery(mailbox, "delivered");
                    self.accepting_again(mailbox, &mut q);
                    self.drained(mailbox, &mut q);
                    return Ok(Accepted::Delivered);
                }
                Err(why) => self.receiver_failed(mailbox, &mut q, &why),
            }
        }
        let now = store::now_millis();
        let len = body.len() as u64;
        if let Err(refused) = self.room_for(mailbox, &q, len, now) {
            self.refused(mailbox, &mut q, &refused);
            return Err(refused);
        }
        let appended = self
            .writer
            .append(NewSpoolEntry {
                mailbox: mailbox.to_owned(),
                subscription_id: subscription_id.to_owned(),
                body,
                received_at: now,
            })
            .await;
        if let Err(e) = appended {
            self.release(len);
            let refused = if e.is_disk_full() {
                self.disk_full.store(true, Ordering::Relaxed);
                self.publish_health();
                NotAccepted::DiskFull(e)
            } else {
                NotAccepted::Store(e)
            };
            self.refused(mailbox, &mut q, &refused);
            return Err(refused);
        }
        if self.disk_full.swap(false, Ordering::Relaxed) {
            tracing::info!("spool writes succeed again: the disk has room");
            self.publish_health();
        }
        if q.waiting == 0 {
            q.oldest = Some(now);
        }
        q.waiting += 1;
        if q.outage.is_some() {
            q.spooled_in_outage += 1;
        }
        self.accepting_again(mailbox, &mut q);
        self.metrics.delivery(mailbox, "spooled");
        drop(q);
        self.wake.notify_one();
        Ok(Accepted::Spooled)
    }

    /// Whether a body of `len` bytes for `mailbox` may be spooled at `now`; reserves the bytes
    /// when it may (give them back with [`Self::release`] if the append fails).
    fn room_for(
        &self,
        mailbox: &str,
        q: &Queue,
        len: u64,
        now: UnixMillis,
    ) -> Result<(), NotAccepted> {
        let max_age = self.limits.max_age.as_millis() as u64;
        if q.waiting > 0 && q.oldest.is_some_and(|t| now.saturating_sub(t) > max_age) {
            let mut over = self.over_age.lock().unwrap_or_else(|e| e.into_inner());
            if over.insert(mailbox.to_owned()) {
                self.metrics.set_spool_over_age(over.len());
            }
            return Err(NotAccepted::OverAge {
                max: self.limits.max_age,
            });
        }
        let max = self.limits.max_bytes;
        let reserved = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b.saturating_add(len) <= max).then_some(b + len)
            });
        match reserved {
            Ok(b) => {
                self.metrics.set_spool_bytes(b + len);
                Ok(())
            }
            Err(bytes) => {
                if !self.full.swap(true, Ordering::Relaxed) {
                    self.publish_health();
                }
                Err(NotAccepted::SpoolFull { bytes, max })
            }
        }
    }

    /// Give back `len` bytes: reserved for an append that failed, or acknowledged.
    fn release(&self, len: u64) {
        let before = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(len))
            })
            .unwrap_or(0);
        self.metrics.set_spool_bytes(before.saturating_sub(len));
    }

    /// Count and log (once per episode, see [`Episode`]) a refused notification.
    fn refused(&self, mailbox: &str, q: &mut Queue, why: &NotAccepted) {
        self.metrics.spool_refusal(mailbox, why.label());
        let now = Instant::now();
        match &mut q.refusing {
            None => {
                q.refusing = Some(Episode::new(now));
                tracing::error!(%mailbox, reason = why.label(), waiting = q.waiting, "refusing notifications (Exchange will retry them; nothing acknowledged is lost): {why}");
            }
            Some(e) => {
                if e.again(now, EPISODE_LOG_INTERVAL) {
                    tracing::error!(%mailbox, reason = why.label(), refused = e.count, waiting = q.waiting, for_secs = now.duration_since(e.started).as_secs(), "still refusing notifications: {why}");
                }
            }
        }
    }

    /// A notification of `mailbox` was accepted: ends a refusal episode.
    fn accepting_again(&self, mailbox: &str, q: &mut Queue) {
        if let Some(e) = q.refusing.take() {
            tracing::info!(%mailbox, refused = e.count, after_secs = e.started.elapsed().as_secs(), "accepting notifications again");
        }
    }

    /// A delivery attempt for `mailbox` failed: starts or counts its outage episode.
    fn receiver_failed(&self, mailbox: &str, q: &mut Queue, why: &str) {
        let now = Instant::now();
        match &mut q.outage {
            None => {
                q.outage = Some(Episode::new(now));
                q.spooled_in_outage = 0;
                tracing::warn!(%mailbox, error = %why, waiting = q.waiting, "receiver not taking notifications for this mailbox; spooling them until it does");
            }
            Some(e) => {
                if e.again(now, EPISODE_LOG_INTERVAL) {
                    tracing::warn!(%mailbox, error = %why, failed_attempts = e.count, spooled = q.spooled_in_outage, waiting = q.waiting, for_secs = now.duration_since(e.started).as_secs(), "receiver still not taking notifications for this mailbox");
                }
            }
        }
    }

    /// The spool's state for the status page's alarm: the worst of a full disk, a full spool
    /// and backlogs over the max age.
    pub fn health(&self) -> SpoolHealth {
        if self.disk_full.load(Ordering::Relaxed) {
            SpoolHealth::DiskFull
        } else if self.full.load(Ordering::Relaxed) {
            SpoolHealth::Full
        } else if !self
            .over_age
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            SpoolHealth::OverAge
        } else {
            SpoolHealth::Ok
        }
    }

    fn publish_health(&self) {
        let h = self.health();
        self.metrics.set_spool_full(
            matches!(h, SpoolHealth::Full | SpoolHealth::DiskFull),
            h == SpoolHealth::DiskFull,
        );
    }

    /// Queue the resynchronisation signal for `mailbox` behind anything already waiting.
    pub async fn request_resync(&self, mailbox: &str) -> Result<(), StoreError> {
        let queue = self.queue(mailbox);
        let mut q = queue.lock().await;
        if q.resync_unsent {
            tracing::debug!(
                mailbox,
                "a resync signal is already waiting; not queued twice"
            );
            if q.resyncs == 0 {
                // The waiting one was spooled before a restart (not counted): it now answers
                // for this request too, so the keeper hears that a resync is pending.
                q.resyncs = 1;
                self.resync_changed(mailbox, &q);
            }
            return Ok(());
        }
        // An empty subscription id and body mark the resync signal in the spool.
        self.writer
            .append(NewSpoolEntry {
                mailbox: mailbox.to_owned(),
                subscription_id: String::new(),
                body: Bytes::new(),
                received_at: store::now_millis(),
            })
            .await?;
        // Never refused for the limits: it is tiny, and losing it would lose the resync.
        if q.waiting == 0 {
            q.oldest = Some(store::now_millis());
        }
        q.waiting += 1;
        q.resyncs += 1;
        q.resync_unsent = true;
        self.resync_changed(mailbox, &q);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    /// Entries waiting in total.
    pub fn waiting(&self) -> u64 {
        let queues: Vec<_> = {
            let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            q.values().cloned().collect()
        };
        queues
            .iter()
            .filter_map(|q| q.try_lock().ok())
            .map(|q| q.waiting)
            .sum()
    }

    /// Entries waiting for one mailbox (best effort: 0 while a delivery holds its lock).
    pub fn waiting_for(&self, mailbox: &str) -> u64 {
        let q = {
            let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            q.get(mailbox).cloned()
        };
        q.and_then(|q| q.try_lock().ok().map(|q| q.waiting))
            .unwrap_or(0)
    }

    /// Drain the spool forever (until the task is aborted): in order per mailbox, with back-off
    /// while the receiver refuses.
    pub async fn replay(self: Arc<Self>) {
        let mut backoff = REPLAY_BACKOFF_MIN;
        loop {
            let busy: Vec<(String, Arc<tokio::sync::Mutex<Queue>>)> = {
                let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                q.iter().map(|(m, q)| (m.clone(), q.clone())).collect()
            };
            let mut progressed = false;
            let mut failed = false;
            for (mailbox, queue) in busy {
                match self.replay_mailbox(&mailbox, &queue).await {
                    Ok(n) => progressed |= n > 0,
                    Err(()) => failed = true,
                }
            }
            self.update_gauges().await;
            if failed && !progressed {
                let waited = tokio::select! {
                    _ = tokio::time::sleep(backoff) => true,
                    _ = self.wake.notified() => false,
                };
                // Only time spent waiting grows the back-off: notifications spooled during an
                // outage (each one a wake-up and a failed retry) must not push the next
                // attempt out to the cap, or a brief outage costs 30 s of replay delay.
                if waited {
                    backoff = (backoff * 2).min(REPLAY_BACKOFF_MAX);
                }
            } else if !progressed {
                backoff = REPLAY_BACKOFF_MIN;
                // Nothing waiting: sleep until something is spooled (or a periodic recheck).
                let _ = tokio::time::timeout(REPLAY_BACKOFF_MAX, self.wake.notified()).await;
            } else {
                backoff = REPLAY_BACKOFF_MIN;
            }
        }
    }

    /// Replay up to [`REPLAY_BATCH`] entries of one mailbox; `Err` when the receiver refused.
    ///
    /// The queue's lock is held to read the batch and to account for it afterwards, not while
    /// the receiver is being sent to: a slow receiver must not make a new notification wait for
    /// the lock (Graph wants its answer within seconds). Order still holds: an entry being
    /// replayed stays counted in `waiting` until acknowledged, so a notification arriving
    /// meanwhile is spooled behind it, never delivered directly.
    async fn replay_mailbox(
        &self,
        mailbox: &str,
        queue: &tokio::sync::Mutex<Queue>,
    ) -> Result<usize, ()> {
        let entries = {
            let mut q = queue.lock().await;
            if q.waiting == 0 {
                return Ok(0);
            }
            // Read under the lock: every entry `waiting` counts is in the store by now.
            let m = mailbox.to_owned();
            let entries = match self
                .store
                .blocking(move |s| s.spool_peek(&m, REPLAY_BATCH))
                .await
            {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spool");
                    return Err(());
                }
            };
            if entries.is_empty() {
                q.waiting = 0;
                self.drained(mailbox, &mut q);
                return Ok(0);
            }
            q.oldest = entries.first().map(|e| e.received_at);
            entries
        };
        // The oldest entry not delivered in this round, to refresh `q.oldest` afterwards.
        let mut first_left = None;
        let mut done = 0;
        let mut acks = tokio::task::JoinSet::new();
        let mut refused = false;
        for e in entries {
            let resync = e.subscription_id.is_empty() && e.body.is_empty();
            let mut headers = HeaderBlock::with_capacity(80);
            if is_graph(mailbox) {
                headers.push(b"content-type", b"application/json; charset=utf-8");
            } else {
                headers.push(b"content-type", b"text/xml; charset=utf-8");
            }
            let out = self.request(
                mailbox,
                &e.subscription_id,
                &headers,
                e.body.clone(),
                resync.then_some(mailbox),
                Some(e.received_at),
            );
            if resync {
                // From here the receiver may be resynchronising: a new gap needs a new signal.
                queue.lock().await.resync_unsent = false;
            }
            if let Err(why) = self.try_deliver(&out).await {
                if resync {
                    // Not taken: it is still the signal to come.
                    queue.lock().await.resync_unsent = true;
                }
                let _ = self.writer.record_attempt(mailbox, e.seq).await;
                self.metrics.delivery(mailbox, "failed");
                self.receiver_failed(mailbox, &mut *queue.lock().await, &why);
                first_left = Some(e.received_at);
                refused = true;
                break;
            }
            // Delivery stays strictly in order; the acknowledgements run concurrently so the
            // store writer commits them together (one fsync per batch, not per entry).
            let (writer, m, seq) = (self.writer.clone(), mailbox.to_owned(), e.seq);
            let len = e.body.len() as u64;
            // Until the next peek, entries after this batch are at least as old as this one.
            first_left = Some(e.received_at);
            acks.spawn(async move { (resync, len, writer.ack(&m, seq).await) });
            self.metrics
                .delivery(mailbox, if resync { "resync" } else { "replayed" });
        }
        let mut ack_failed = false;
        let mut acked = Vec::new();
        while let Some(joined) = acks.join_next().await {
            acked.push(joined);
        }
        let mut q = queue.lock().await;
        let q = &mut *q;
        for joined in acked {
            match joined {
                Ok((resync, len, Ok(_))) => {
                    self.release(len);
                    q.waiting = q.waiting.saturating_sub(1);
                    if resync {
                        q.resyncs = q.resyncs.saturating_sub(1);
                        self.resync_changed(mailbox, q);
                    }
                    done += 1;
                }
                Ok((_, _, Err(err))) => {
                    tracing::error!(error = %err, "delivered but cannot remove from the spool; it will be delivered again");
                    ack_failed = true;
                }
                Err(err) => {
                    tracing::error!(error = %err, "spool acknowledgement task failed; the entry will be delivered again");
                    ack_failed = true;
                }
            }
        }
        if done > 0 {
            if self.full.swap(false, Ordering::Relaxed) {
                tracing::info!("the spool has room again");
            }
            if self.disk_full.load(Ordering::Relaxed) {
                // A commit succeeded: the disk has room (at least for acknowledgements).
                self.disk_full.store(false, Ordering::Relaxed);
            }
            self.publish_health();
        }
        if q.waiting == 0 {
            self.drained(mailbox, q);
        } else {
            q.oldest = first_left.or(q.oldest);
            let max_age = self.limits.max_age.as_millis() as u64;
            let young = q
                .oldest
                .is_none_or(|t| store::now_millis().saturating_sub(t) <= max_age);
            if young {
                self.not_over_age(mailbox);
            }
        }
        if ack_failed || (refused && done == 0) {
            return Err(());
        }
        Ok(done)
    }

    /// The mailbox's backlog is empty: ends its outage (with the line saying so) and its
    /// over-age state.
    fn drained(&self, mailbox: &str, q: &mut Queue) {
        q.oldest = None;
        self.not_over_age(mailbox);
        if let Some(e) = q.outage.take() {
            tracing::info!(%mailbox, spooled = q.spooled_in_outage, failed_attempts = e.count, after_secs = e.started.elapsed().as_secs(), "receiver caught up: backlog drained");
            q.spooled_in_outage = 0;
        }
    }

    fn not_over_age(&self, mailbox: &str) {
        let mut over = self.over_age.lock().unwrap_or_else(|e| e.into_inner());
        if over.remove(mailbox) {
            self.metrics.set_spool_over_age(over.len());
        }
    }

    async fn update_gauges(&self) {
        let age = self
            .store
            .blocking(|s| s.spool_oldest_age(store::now_millis()))
            .await
            .ok()
            .flatten();
        self.metrics.set_spool(self.waiting(), age);
    }

    /// The POST to the receiver: `headers` (any of the relay's own fields a client sent
    /// dropped) and the relay's own `X-EWS-*` or `X-Graph-*` fields; `received_at` for one
    /// delivered late (replay).
    fn request(
        &self,
        mailbox: &str,
        subscription_id: &str,
        headers: &HeaderBlock,
        body: Bytes,
        resync: Option<&str>,
        received_at: Option<UnixMillis>,
    ) -> Outgoing {
        let mut out = HeaderBlock::with_capacity(headers.as_bytes().len() + 256);
        let graph = mailbox.strip_prefix(store::GRAPH_QUEUE_PREFIX);
        for (name, value) in headers.iter() {
            if !OWN_FIELDS
                .iter()
                .any(|o| name.eq_ignore_ascii_case(o.as_str().as_bytes()))
            {
                out.push(name, value);
            }
        }
        let received = received_at.map(|at| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(at))
                .to_string()
        });
        let path = match graph {
            Some(resource) => {
                if let Some(change) = graph_change_type(&body) {
                    out.push(X_GRAPH_CHANGE_TYPE.as_str().as_bytes(), change.as_bytes());
                }
                if let Some(at) = &received {
                    out.push(X_GRAPH_RECEIVED_AT.as_str().as_bytes(), at.as_bytes());
                }
                out.push(X_GRAPH_RESOURCE.as_str().as_bytes(), resource.as_bytes());
                if let Some(mailbox) = graph_mailbox(resource) {
                    out.push(X_GRAPH_MAILBOX.as_str().as_bytes(), mailbox.as_bytes());
                }
                if resync.is_some() {
                    out.push(
                        X_GRAPH_RESYNC_REQUIRED.as_str().as_bytes(),
                        resource.as_bytes(),
                    );
                }
                if !subscription_id.is_empty() {
                    out.push(
                        X_GRAPH_SUBSCRIPTION_ID.as_str().as_bytes(),
                        subscription_id.as_bytes(),
                    );
                }
                &self.paths.graph
            }
            None => {
                if let Some(at) = &received {
                    out.push(X_EWS_RECEIVED_AT.as_str().as_bytes(), at.as_bytes());
                }
                out.push(X_EWS_MAILBOX.as_str().as_bytes(), mailbox.as_bytes());
                if let Some(transport) = self.paths.ews_transport {
                    out.push(X_EWS_TRANSPORT.as_str().as_bytes(), transport.as_bytes());
                }
                if resync.is_some() {
                    out.push(
                        X_EWS_RESYNC_REQUIRED.as_str().as_bytes(),
                        mailbox.as_bytes(),
                    );
                }
                if !subscription_id.is_empty() {
                    out.push(
                        X_EWS_SUBSCRIPTION_ID.as_str().as_bytes(),
                        subscription_id.as_bytes(),
                    );
                }
                &self.paths.ews
            }
        };
        Outgoing::new(
            "POST",
            path.as_str(),
            self.receiver.host_header().as_bytes(),
            &out,
            body,
        )
    }

    /// One delivery attempt: `Err` says why the receiver did not take it. Logged at debug
    /// level only: the callers log outages per mailbox (see the module's "Logging an outage").
    async fn try_deliver(&self, out: &Outgoing) -> Result<(), String> {
        let why = match self.receiver.send(out).await {
            Ok(resp) if resp.status.is_success() => return Ok(()),
            Ok(resp) => format!("receiver answered {}", resp.status.as_u16()),
            Err(e) => {
                self.metrics.upstream_error(e.kind);
                format!("receiver unreachable: {e}")
            }
        };
        tracing::debug!(error = %why, "delivery attempt failed");
        Err(why)
    }
}

/// Whether a queue key is a Graph resource's.
fn is_graph(queue: &str) -> bool {
    queue.starts_with(store::GRAPH_QUEUE_PREFIX)
}

/// The mailbox a Graph resource path names (`users/{id or upn}/…`), for `X-Graph-Mailbox`.
fn graph_mailbox(resource: &str) -> Option<&str> {
    graph::mailbox_of(resource)
}

/// The `changeType` of one spooled Graph notification (the JSON of that one notification).
fn graph_change_type(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(rename = "changeType")]
        change_type: Option<String>,
    }
    serde_json::from_slice::<Item>(body).ok()?.change_type
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rate limiter of the outage and refusal lines: the first occurrence is logged by the
    /// caller, later ones count silently, and a reminder is due once per interval.
    #[test]
    fn episode_logs_a_reminder_at_most_once_per_interval() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(300);
        let mut e = Episode::new(t0);
        assert_eq!(e.count, 1);
        for s in 1..300 {
            assert!(!e.again(t0 + Duration::from_secs(s), interval), "at {s} s");
        }
        assert!(e.again(t0 + Duration::from_secs(300), interval));
        assert!(!e.again(t0 + Duration::from_secs(301), interval));
        assert!(!e.again(t0 + Duration::from_secs(599), interval));
        assert!(e.again(t0 + Duration::from_secs(600), interval));
        assert_eq!(e.count, 304);
    }

    #[test]
    fn health_alarm_names_the_flag_or_the_disk() {
        assert_eq!(SpoolHealth::Ok.alarm(), None);
        assert!(SpoolHealth::Full
            .alarm()
            .unwrap()
            .contains("--spool-max-bytes"));
        assert!(SpoolHealth::OverAge
            .alarm()
            .unwrap()
            .contains("--spool-max-age"));
        assert!(SpoolHealth::DiskFull.alarm().unwrap().contains("disk"));
    }
}
