//! The Graph keeper: one task per configured resource keeps it subscribed.
//!
//! Each task loops: create a subscription (with a fresh `clientState` secret, stored before the
//! call), then sleep until half of its remaining lifetime has passed (jittered) and renew it
//! (`PATCH expirationDateTime`), scheduling from the expiration Graph answers, however short. A
//! 404 on renew, or a `subscriptionRemoved` lifecycle event, means the subscription is gone: a
//! new one is created and, since changes between the two were not observed, the receiver is told
//! to resynchronise the resource. `reauthorizationRequired` is answered at once with a
//! reauthorize (a renewal if that fails); `missed` queues the resync signal.
//!
//! Every subscription the relay replaced, and the current one of a resource removed from the
//! configuration, is deleted at Graph (retried until Graph confirms or says it is gone), so no
//! orphans pile up. Every id and its secret is in the store before it can matter: after a
//! restart, even `kill -9`, the keeper knows each id it created.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use tokio::sync::mpsc;

use super::client::{GraphAction, GraphClient, GraphFailure};
use crate::config::{ManagedGraph, Secret};
use crate::metrics::Metrics;
use crate::spool::{graph_queue, Delivery};
use crate::store::{self, GraphId, GraphRecord, GraphState, StoreError, StoreWriter, UnixMillis};
use crate::subscriptions::backoff;

/// A renewal is due when this share of the remaining lifetime has passed (Microsoft: renew well
/// before expiry). Half leaves as much time again for retries when Graph is in trouble.
const RENEW_AT_SHARE: f64 = 0.5;
/// Renewals are spread by up to this share of the wait, so that resources created together are
/// not renewed in lock-step.
const RENEW_JITTER_SHARE: f64 = 0.1;
/// The soonest a renewal is scheduled, so a subscription Graph gives a very short life (a lab
/// server, a clock skew) is renewed often but not in a tight loop.
const MIN_RENEW_WAIT: Duration = Duration::from_secs(1);
/// Retired ids not yet deleted at Graph are tried again this often.
const DELETE_SWEEP: Duration = Duration::from_secs(60);
/// Retired ids that are gone at Graph are forgotten after this long; notifications still in
/// Graph's retry queue for them (about 4 hours) are recognised until then.
const FORGET_GONE_AFTER: Duration = Duration::from_secs(24 * 3600);
/// A notification for an id the keeper does not know waits at most this long for creates in
/// flight (Graph can post before the relay has read the 201 naming the id). Short: Graph wants
/// its answer within about 3 s.
const UNKNOWN_ID_GRACE: Duration = Duration::from_millis(1000);
/// On shutdown, creates in flight get this long to finish so their ids are stored.
const SHUTDOWN_CREATE_GRACE: Duration = Duration::from_secs(12);
/// The resource gauges are published this often.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);
/// Secrets of interrupted creates remembered per resource. Each restart during a create adds
/// one; a handful covers any real history, and the bound keeps a crash loop from growing the
/// record.
const MAX_ORPHAN_SECRETS: usize = 8;
/// Random bytes in a `clientState` secret: 256 bits, 43 characters base64url (Graph allows 128).
const CLIENT_STATE_BYTES: usize = 32;

/// What the request path tells a resource's task.
#[derive(Debug)]
enum Signal {
    /// `reauthorizationRequired` for this id.
    Reauthorize(String),
    /// `subscriptionRemoved` for this id.
    Removed(String),
    /// The resource was removed from the configuration.
    Stop,
}

/// One configured resource, shared by its task and the request path.
struct Resource {
    record: Mutex<GraphRecord>,
    signals: mpsc::UnboundedSender<Signal>,
    /// Graph said the lifetime asked for is too long: ask at most this many minutes.
    max_minutes: Mutex<Option<u64>>,
    /// The previous subscription was lost (expired, removed): once a new one exists, the
    /// receiver must resynchronise, as changes in between were not observed.
    gap: AtomicBool,
}

/// A subscription id the relay created, as the request path needs it.
#[derive(Clone)]
pub struct Known {
    /// The resource it is for.
    pub resource: String,
    /// The `clientState` it was created with.
    pub client_state: Secret,
    /// Replaced, or its resource removed: notifications for it are acknowledged, not delivered.
    pub retired: bool,
}

impl std::fmt::Debug for Known {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Known")
            .field("resource", &self.resource)
            .field("retired", &self.retired)
            .finish_non_exhaustive()
    }
}

/// One resource as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GraphView {
    /// The resource path.
    pub resource: String,
    /// `creating`, `active`, `backing-off`, `failed`, or `expiring` (active, but the renewal is
    /// late: less than a tenth of the lifetime left).
    pub state: &'static str,
    /// The current subscription id.
    pub subscription_id: Option<String>,
    /// When it expires (RFC 3339).
    pub expires_at: Option<String>,
    /// Seconds until it expires (negative once expired).
    pub seconds_to_expiry: Option<i64>,
    /// Seconds since the last notification or lifecycle event.
    pub seconds_since_notification: Option<u64>,
    /// The last lifecycle event.
    pub last_lifecycle: Option<String>,
    /// The last error.
    pub last_error: Option<String>,
    /// Notifications waiting in the spool.
    pub spool_depth: u64,
    /// The receiver has been told to resynchronise and has not yet taken the signal.
    pub resync_pending: bool,
}

/// The Graph keeper.
pub struct GraphKeeper {
    cfg: ManagedGraph,
    client: GraphClient,
    writer: Arc<StoreWriter>,
    delivery: Arc<Delivery>,
    metrics: Arc<Metrics>,
    resources: RwLock<HashMap<String, Arc<Resource>>>,
    ids: RwLock<HashMap<String, Known>>,
    /// The callback paths (notification, lifecycle; may be one).
    paths: Vec<String>,
    /// Creates in flight: while any is, Graph may validate the callback URLs.
    creating: AtomicUsize,
    /// Signalled when a create finishes (see [`UNKNOWN_ID_GRACE`]).
    created: tokio::sync::Notify,
    /// Wakes the delete sweep when an id is retired.
    retired: tokio::sync::Notify,
    stopping: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for GraphKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphKeeper").finish_non_exhaustive()
    }
}

fn path_of(url: &str) -> String {
    url.parse::<http::Uri>()
        .map(|u| u.path().to_owned())
        .unwrap_or_else(|_| "/".to_owned())
}

fn to_millis(t: SystemTime) -> UnixMillis {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_millis(ms: UnixMillis) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A fresh `clientState`: random, URL-safe, well under Graph's 128 characters.
fn new_client_state() -> String {
    let mut bytes = [0u8; CLIENT_STATE_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// How long to wait before renewing a subscription that expires at `expires` (`now` given).
pub fn renew_wait(now: SystemTime, expires: Option<SystemTime>, random: u64) -> Duration {
    let Some(expires) = expires else {
        return Duration::ZERO;
    };
    let left = expires.duration_since(now).unwrap_or_default();
    let base = left.mul_f64(RENEW_AT_SHARE);
    let spread = base.mul_f64(RENEW_JITTER_SHARE);
    let jitter = if spread.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_nanos(random % (spread.as_nanos() as u64).max(1))
    };
    // Early rather than late: subtract the jitter.
    let wait = base.saturating_sub(jitter);
    if left.is_zero() {
        Duration::ZERO
    } else {
        wait.max(MIN_RENEW_WAIT.min(left / 2))
    }
}

impl GraphKeeper {
    /// A keeper over the stored state; nothing is created until [`GraphKeeper::start`].
    pub async fn new(
        cfg: ManagedGraph,
        client: GraphClient,
        writer: Arc<StoreWriter>,
        delivery: Arc<Delivery>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let store = writer.store().clone();
        let cutoff = store::now_millis().saturating_sub(FORGET_GONE_AFTER.as_millis() as u64);
        let ids = store
            .blocking(move |s| {
                s.prune_graph_ids(cutoff)?;
                s.graph_ids()
            })
            .await?;
        let ids = ids
            .into_iter()
            .map(|(id, e)| {
                (
                    id,
                    Known {
                        resource: e.resource,
                        client_state: Secret::new(e.client_state),
                        retired: e.retired_at.is_some(),
                    },
                )
            })
            .collect();
        let mut paths = vec![path_of(&cfg.callback_url)];
        let lifecycle = path_of(&cfg.lifecycle_url);
        if !paths.contains(&lifecycle) {
            paths.push(lifecycle);
        }
        let keeper = Arc::new(Self {
            cfg,
            client,
            writer,
            delivery,
            metrics,
            resources: RwLock::new(HashMap::new()),
            ids: RwLock::new(ids),
            paths,
            creating: AtomicUsize::new(0),
            created: tokio::sync::Notify::new(),
            retired: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&keeper);
        keeper.delivery.on_resync(move |queue, pending| {
            let Some(me) = weak.upgrade() else { return };
            let Some(resource) = queue.strip_prefix(store::GRAPH_QUEUE_PREFIX) else {
                return;
            };
            if let Some(r) = me.resource(resource) {
                r.record
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .resync_pending = pending;
            }
        });
        Ok(keeper)
    }

    /// The spool shared with managed EWS.
    pub fn delivery(&self) -> &Arc<Delivery> {
        &self.delivery
    }

    /// Create the configured subscriptions (call once the TLS listener is up: Graph validates
    /// the callback at once), forget stored resources no longer configured, and start deleting
    /// retired ids.
    pub async fn start(self: &Arc<Self>) -> Result<(), StoreError> {
        let wanted = self.configured_resources();
        self.apply_resource_set(&wanted).await?;
        let me = self.clone();
        self.track(tokio::spawn(
            async move { me.delete_retired_forever().await },
        ));
        let me = self.clone();
        self.track(tokio::spawn(async move {
            let mut tick = tokio::time::interval(GAUGE_INTERVAL);
            loop {
                tick.tick().await;
                me.publish_gauges();
            }
        }));
        Ok(())
    }

    fn track(&self, task: tokio::task::JoinHandle<()>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// Stop: let creates in flight finish (bounded) so their ids are stored, then end every task.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_CREATE_GRACE;
        while self.creating.load(Ordering::Acquire) > 0 {
            let finished = self.created.notified();
            if self.creating.load(Ordering::Acquire) == 0
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
    }

    /// The resources configured now; on a bad resources file, the running set (a bad edit must
    /// not delete every subscription).
    pub fn configured_resources(&self) -> Vec<String> {
        match self.cfg.configured_resources() {
            Ok(list) => list,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the Graph resources file; keeping the current set");
                let mut v: Vec<String> = self
                    .resources
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                v.sort();
                v
            }
        }
    }

    fn resource(&self, resource: &str) -> Option<Arc<Resource>> {
        self.resources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(resource)
            .cloned()
    }

    /// Make the running set equal `wanted`: start tasks for new resources; stop removed ones
    /// and retire (delete at Graph) their subscriptions.
    pub async fn apply_resource_set(self: &Arc<Self>, wanted: &[String]) -> Result<(), StoreError> {
        let store = self.writer.store().clone();
        let stored = store.blocking(|s| s.graph_records()).await?;
        let running: Vec<String> = self
            .resources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut removed: Vec<String> = running
            .iter()
            .cloned()
            .chain(stored.iter().map(|r| r.resource.clone()))
            .filter(|r| !wanted.contains(r))
            .collect();
        removed.sort();
        removed.dedup();
        for r in removed {
            self.remove(&r, &stored).await?;
        }
        for w in wanted {
            if running.contains(w) {
                continue;
            }
            let mut record = stored
                .iter()
                .find(|r| &r.resource == w)
                .cloned()
                .unwrap_or_else(|| GraphRecord::new(w));
            if let Some(secret) = record.pending_client_state.take() {
                // A create was in flight when the relay stopped: if Graph made it, its first
                // notification carries this secret and the orphan is deleted then.
                tracing::warn!(resource = %w, "a Graph create was interrupted by a stop; creating again (a subscription Graph may have made meanwhile is deleted when it first notifies)");
                record.orphan_client_states.push(secret);
                let excess = record
                    .orphan_client_states
                    .len()
                    .saturating_sub(MAX_ORPHAN_SECRETS);
                record.orphan_client_states.drain(..excess);
            }
            self.spawn_resource(record);
        }
        Ok(())
    }

    fn spawn_resource(self: &Arc<Self>, record: GraphRecord) {
        let (tx, rx) = mpsc::unbounded_channel();
        let name = record.resource.clone();
        let r = Arc::new(Resource {
            record: Mutex::new(record),
            signals: tx,
            max_minutes: Mutex::new(None),
            gap: AtomicBool::new(false),
        });
        self.resources
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), r.clone());
        let me = self.clone();
        self.track(tokio::spawn(async move { me.run(name, r, rx).await }));
    }

    async fn remove(&self, resource: &str, stored: &[GraphRecord]) -> Result<(), StoreError> {
        let running = self
            .resources
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(resource);
        let id = match &running {
            Some(r) => {
                let _ = r.signals.send(Signal::Stop);
                r.record
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .subscription_id
                    .clone()
            }
            None => stored
                .iter()
                .find(|r| r.resource == resource)
                .and_then(|r| r.subscription_id.clone()),
        };
        if let Some(id) = id {
            self.retire(&id, false).await;
        }
        let r = resource.to_owned();
        self.writer
            .store()
            .blocking(move |s| s.remove_graph(&r))
            .await?;
        tracing::info!(
            resource,
            "Graph resource removed from the configuration; its subscription is deleted"
        );
        Ok(())
    }

    /// Mark `id` retired (stored), to be deleted at Graph unless `gone` already.
    async fn retire(&self, id: &str, gone: bool) {
        let entry = {
            let mut ids = self.ids.write().unwrap_or_else(|e| e.into_inner());
            let Some(k) = ids.get_mut(id) else { return };
            k.retired = true;
            GraphId {
                resource: k.resource.clone(),
                client_state: k.client_state.expose().to_owned(),
                retired_at: Some(store::now_millis()),
                gone,
            }
        };
        let id2 = id.to_owned();
        if let Err(e) = self
            .writer
            .store()
            .blocking(move |s| s.put_graph_id(&id2, &entry))
            .await
        {
            tracing::error!(error = %e, "cannot store a retired Graph subscription id");
        }
        if !gone {
            self.retired.notify_one();
        }
    }

    /// Who `id` is, waiting briefly for creates in flight when it is unknown.
    pub async fn lookup(&self, id: &str) -> Option<Known> {
        let deadline = tokio::time::Instant::now() + UNKNOWN_ID_GRACE;
        loop {
            let finished = self.created.notified();
            if let Some(k) = self.ids.read().unwrap_or_else(|e| e.into_inner()).get(id) {
                return Some(k.clone());
            }
            if self.creating.load(Ordering::Acquire) == 0
                || tokio::time::timeout_at(deadline, finished).await.is_err()
            {
                return None;
            }
        }
    }

    /// An id the relay does not know whose notification carries the secret of a create a stop
    /// interrupted: a subscription Graph made for the relay while it never learned the id. It
    /// is recorded as retired (so it is deleted at Graph, and its notifications acknowledged
    /// without delivery; the resource's current subscription reports the same changes).
    pub async fn adopt_orphan(&self, id: &str, client_state: &str) -> Option<Known> {
        let found = {
            let resources = self.resources.read().unwrap_or_else(|e| e.into_inner());
            resources.iter().find_map(|(name, r)| {
                let rec = r.record.lock().unwrap_or_else(|e| e.into_inner());
                rec.orphan_client_states
                    .iter()
                    .any(|s| graph::constant_time_eq(s.as_bytes(), client_state.as_bytes()))
                    .then(|| name.clone())
            })
        }?;
        let known = Known {
            resource: found.clone(),
            client_state: Secret::new(client_state.to_owned()),
            retired: true,
        };
        self.ids
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), known.clone());
        let entry = GraphId {
            resource: found.clone(),
            client_state: client_state.to_owned(),
            retired_at: Some(store::now_millis()),
            gone: false,
        };
        let id2 = id.to_owned();
        if let Err(e) = self
            .writer
            .store()
            .blocking(move |s| s.put_graph_id(&id2, &entry))
            .await
        {
            tracing::error!(error = %e, "cannot store an orphaned Graph subscription id");
        }
        tracing::warn!(resource = %found, subscription = %crate::subscriptions::abbreviate(id), "a Graph subscription made by an interrupted create notified: deleting it");
        self.retired.notify_one();
        Some(known)
    }

    /// Whether `path` is one of the relay's own callback paths.
    pub fn owns_path(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p == path)
    }

    /// Whether a validation request on `path` is expected now: a create is in flight.
    pub fn expects_validation(&self, path: &str) -> bool {
        self.owns_path(path) && self.creating.load(Ordering::Acquire) > 0
    }

    /// A notification or lifecycle event arrived for `resource`.
    pub fn notified(&self, resource: &str) {
        if let Some(r) = self.resource(resource) {
            r.record
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .last_notification = Some(store::now_millis());
        }
    }

    /// A lifecycle event for a known, current subscription `id` of `resource`. `missed` queues
    /// the resync signal before returning (so Graph hears 202 only once it is stored); the
    /// others are handed to the resource's task.
    pub async fn lifecycle(
        &self,
        resource: &str,
        id: &str,
        event: &graph::LifecycleEvent,
    ) -> Result<(), StoreError> {
        self.metrics.graph_lifecycle(event.as_str());
        let Some(r) = self.resource(resource) else {
            return Ok(());
        };
        {
            let mut rec = r.record.lock().unwrap_or_else(|e| e.into_inner());
            rec.last_lifecycle = Some((event.as_str().to_owned(), store::now_millis()));
            rec.last_notification = Some(store::now_millis());
        }
        match event {
            graph::LifecycleEvent::ReauthorizationRequired => {
                tracing::info!(resource, "Graph: reauthorizationRequired; reauthorizing");
                let _ = r.signals.send(Signal::Reauthorize(id.to_owned()));
            }
            graph::LifecycleEvent::SubscriptionRemoved => {
                tracing::warn!(
                    resource,
                    "Graph: subscriptionRemoved; creating a new subscription"
                );
                let _ = r.signals.send(Signal::Removed(id.to_owned()));
            }
            graph::LifecycleEvent::Missed => {
                tracing::warn!(
                    resource,
                    "Graph: missed notifications; telling the receiver to resynchronise"
                );
                self.delivery.request_resync(&graph_queue(resource)).await?;
            }
            graph::LifecycleEvent::Other(name) => {
                tracing::info!(resource, event = %name, "Graph: unknown lifecycle event; ignored");
            }
        }
        Ok(())
    }

    async fn save(&self, r: &Resource) {
        let record = r.record.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Err(e) = self
            .writer
            .store()
            .blocking(move |s| s.put_graph(&record))
            .await
        {
            tracing::error!(error = %e, "cannot store a Graph resource record");
        }
    }

    fn set_state(&self, r: &Resource, state: GraphState, error: Option<String>) {
        let mut rec = r.record.lock().unwrap_or_else(|e| e.into_inner());
        rec.state = state;
        rec.last_error = error;
    }

    /// One resource's loop; see the module's doc.
    async fn run(
        self: Arc<Self>,
        resource: String,
        r: Arc<Resource>,
        mut signals: mpsc::UnboundedReceiver<Signal>,
    ) {
        let mut failures = 0u32;
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let (id, expires) = {
                let rec = r.record.lock().unwrap_or_else(|e| e.into_inner());
                (rec.subscription_id.clone(), rec.expires_at.map(from_millis))
            };
            let result = match id {
                None => self.create(&resource, &r).await,
                Some(id) => {
                    let wait = renew_wait(SystemTime::now(), expires, backoff::random());
                    let signal = if wait.is_zero() {
                        None
                    } else {
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => None,
                            s = signals.recv() => Some(s),
                        }
                    };
                    match signal {
                        None => self.renew(&resource, &r, &id, "renewal").await,
                        Some(None | Some(Signal::Stop)) => return,
                        Some(Some(Signal::Reauthorize(sid))) if sid == id => {
                            self.reauthorize(&resource, &r, &id).await
                        }
                        Some(Some(Signal::Removed(sid))) if sid == id => {
                            self.lost(&r, &id).await;
                            continue;
                        }
                        // A signal for an id already replaced.
                        Some(Some(_)) => continue,
                    }
                }
            };
            let failure = match result {
                Ok(()) => {
                    failures = 0;
                    continue;
                }
                Err(f) => f,
            };
            failures += 1;
            let wait = match failure.action {
                GraphAction::Throttled(d) => d,
                GraphAction::Gone | GraphAction::ExpirationTooLong(_) if failures <= 2 => {
                    Duration::ZERO
                }
                GraphAction::Permanent => backoff::delay(
                    failures,
                    backoff::PERMANENT_BASE,
                    backoff::PERMANENT_CAP,
                    backoff::random(),
                ),
                _ => backoff::delay(
                    failures,
                    backoff::TRANSIENT_BASE,
                    backoff::TRANSIENT_CAP,
                    backoff::random(),
                ),
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    s = signals.recv() => {
                        if matches!(s, None | Some(Signal::Stop)) {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// The subscription `id` is gone at Graph (expired, removed): retire it without a delete,
    /// and make the next round create a new one and ask for a resync.
    async fn lost(&self, r: &Resource, id: &str) {
        {
            let mut rec = r.record.lock().unwrap_or_else(|e| e.into_inner());
            if rec.subscription_id.as_deref() == Some(id) {
                rec.subscription_id = None;
                rec.expires_at = None;
                rec.state = GraphState::Creating;
            }
        }
        r.gap.store(true, Ordering::Release);
        self.retire(id, true).await;
        self.save(r).await;
    }

    fn lifetime(&self, resource: &str, r: &Resource) -> Duration {
        let documented = graph::max_lifetime(resource);
        match *r.max_minutes.lock().unwrap_or_else(|e| e.into_inner()) {
            // What Graph said, less a minute for the time the request takes.
            Some(max) => documented.min(Duration::from_secs(max.saturating_sub(1).max(1) * 60)),
            None => documented,
        }
    }

    fn failed(&self, r: &Resource, op: &'static str, f: &GraphFailure) {
        self.metrics.graph_call(op, outcome_label(f.action));
        let state = match f.action {
            GraphAction::Permanent => GraphState::Failed,
            _ => GraphState::BackingOff,
        };
        // An Active subscription that failed a renewal stays active until it expires.
        let keep_active = op != "create"
            && r.record.lock().unwrap_or_else(|e| e.into_inner()).state == GraphState::Active;
        let state = if keep_active && !matches!(f.action, GraphAction::Gone) {
            GraphState::Active
        } else {
            state
        };
        self.set_state(r, state, Some(f.to_string()));
        if let GraphAction::ExpirationTooLong(max) = f.action {
            *r.max_minutes.lock().unwrap_or_else(|e| e.into_inner()) = Some(max);
        }
    }

    async fn create(&self, resource: &str, r: &Resource) -> Result<(), GraphFailure> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(GraphFailure {
                action: GraphAction::Transient,
                code: "ShuttingDown".into(),
                detail: "the relay is stopping".into(),
            });
        }
        let client_state = new_client_state();
        {
            let mut rec = r.record.lock().unwrap_or_else(|e| e.into_inner());
            rec.pending_client_state = Some(client_state.clone());
            if rec.state != GraphState::Failed && rec.state != GraphState::BackingOff {
                rec.state = GraphState::Creating;
            }
        }
        self.save(r).await;
        let expiration = SystemTime::now() + self.lifetime(resource, r);
        let request = graph::NewSubscription {
            change_type: &self.cfg.change_types,
            notification_url: &self.cfg.callback_url,
            lifecycle_notification_url: Some(&self.cfg.lifecycle_url),
            resource,
            expiration_date_time: expiration,
            client_state: &client_state,
        };
        self.creating.fetch_add(1, Ordering::AcqRel);
        let result = self.client.create(&request).await;
        if let Ok(sub) = &result {
            // Known to the request path before anything else: Graph may already post.
            self.ids.write().unwrap_or_else(|e| e.into_inner()).insert(
                sub.id.clone(),
                Known {
                    resource: resource.to_owned(),
                    client_state: Secret::new(client_state.clone()),
                    retired: false,
                },
            );
        }
        // Graph has answered: no validation for this create can come any more, and a
        // notification waiting for the new id finds it now.
        self.creating.fetch_sub(1, Ordering::AcqRel);
        self.created.notify_waiters();
        match result {
            Ok(sub) => {
                self.metrics.graph_call("create", "success");
                let now = store::now_millis();
                let (record, old) = {
                    let mut rec = r.record.lock().unwrap_or_else(|e| e.into_inner());
                    let old = rec.subscription_id.replace(sub.id.clone());
                    rec.expires_at = Some(to_millis(sub.expiration_date_time));
                    rec.state = GraphState::Active;
                    rec.last_error = None;
                    rec.renewed_at = Some(now);
                    rec.pending_client_state = None;
                    (rec.clone(), old)
                };
                let entry = GraphId {
                    resource: resource.to_owned(),
                    client_state,
                    retired_at: None,
                    gone: false,
                };
                let id = sub.id.clone();
                if let Err(e) = self
                    .writer
                    .store()
                    .blocking(move |s| s.put_graph_with_id(&record, &id, &entry))
                    .await
                {
                    tracing::error!(resource, error = %e, "cannot store a new Graph subscription; it is known until a restart");
                }
                if let Some(old) = old {
                    self.retire(&old, false).await;
                }
                let still_wanted = self
                    .resource(resource)
                    .is_some_and(|current| std::ptr::eq(Arc::as_ptr(&current), r));
                if !still_wanted {
                    // Removed from the configuration while this create was in flight.
                    tracing::info!(
                        resource,
                        "Graph resource removed during its create; the new subscription is deleted"
                    );
                    self.retire(&sub.id, false).await;
                    let res = resource.to_owned();
                    let _ = self
                        .writer
                        .store()
                        .blocking(move |s| s.remove_graph(&res))
                        .await;
                    return Ok(());
                }
                tracing::info!(
                    resource,
                    expires = %humantime::format_rfc3339_seconds(sub.expiration_date_time),
                    "Graph subscription created"
                );
                if r.gap.swap(false, Ordering::AcqRel) {
                    tracing::warn!(resource, "the previous Graph subscription was lost: telling the receiver to resynchronise");
                    if let Err(e) = self.delivery.request_resync(&graph_queue(resource)).await {
                        tracing::error!(resource, error = %e, "cannot queue the resync signal");
                        r.gap.store(true, Ordering::Release);
                    }
                }
                Ok(())
            }
            Err(f) => {
                tracing::warn!(resource, code = %f.code, detail = %f.detail, "Graph create failed");
                self.failed(r, "create", &f);
                self.save(r).await;
                Err(f)
            }
        }
    }

    async fn renew(
        &self,
        resource: &str,
        r: &Resource,
        id: &str,
        why: &'static str,
    ) -> Result<(), GraphFailure> {
        let expiration = SystemTime::now() + self.lifetime(resource, r);
        match self.client.renew(id, expiration).await {
            Ok(sub) => {
                self.metrics.graph_call("renew", "success");
                {
                    let mut rec = r.record.lock().unwrap_or_else(|e| e.into_inner());
                    rec.expires_at = Some(to_millis(sub.expiration_date_time));
                    rec.state = GraphState::Active;
                    rec.last_error = None;
                    rec.renewed_at = Some(store::now_millis());
                }
                self.save(r).await;
                tracing::info!(
                    resource,
                    why,
                    expires = %humantime::format_rfc3339_seconds(sub.expiration_date_time),
                    "Graph subscription renewed"
                );
                Ok(())
            }
            Err(f) if f.action == GraphAction::Gone => {
                self.metrics.graph_call("renew", "gone");
                tracing::warn!(
                    resource,
                    "Graph subscription gone (404 on renew); creating a new one"
                );
                self.lost(r, id).await;
                Err(f)
            }
            Err(f) => {
                tracing::warn!(resource, code = %f.code, detail = %f.detail, "Graph renewal failed");
                self.failed(r, "renew", &f);
                self.save(r).await;
                Err(f)
            }
        }
    }

    async fn reauthorize(
        &self,
        resource: &str,
        r: &Resource,
        id: &str,
    ) -> Result<(), GraphFailure> {
        match self.client.reauthorize(id).await {
            Ok(()) => {
                self.metrics.graph_call("reauthorize", "success");
                tracing::info!(resource, "Graph subscription reauthorized");
                Ok(())
            }
            Err(f) if f.action == GraphAction::Gone => {
                self.metrics.graph_call("reauthorize", "gone");
                self.lost(r, id).await;
                Err(f)
            }
            Err(f) => {
                // A renewal reauthorizes as well.
                self.metrics
                    .graph_call("reauthorize", outcome_label(f.action));
                tracing::warn!(resource, code = %f.code, detail = %f.detail, "Graph reauthorize failed; renewing instead");
                self.renew(resource, r, id, "reauthorization").await
            }
        }
    }

    /// Delete retired ids at Graph until each is confirmed gone; runs until aborted.
    async fn delete_retired_forever(self: Arc<Self>) {
        loop {
            let pending: Vec<String> = {
                let store = self.writer.store().clone();
                match store.blocking(|s| s.graph_ids()).await {
                    Ok(ids) => ids
                        .into_iter()
                        .filter(|(_, e)| e.retired_at.is_some() && !e.gone)
                        .map(|(id, _)| id)
                        .collect(),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read retired Graph subscription ids");
                        Vec::new()
                    }
                }
            };
            for id in pending {
                match self.client.delete(&id).await {
                    Ok(()) => {
                        self.metrics.graph_call("delete", "success");
                        tracing::info!(
                            subscription = %crate::subscriptions::abbreviate(&id),
                            "retired Graph subscription deleted"
                        );
                        self.retire(&id, true).await;
                    }
                    Err(f) => {
                        self.metrics.graph_call("delete", outcome_label(f.action));
                        tracing::debug!(code = %f.code, detail = %f.detail, "deleting a retired Graph subscription failed; retried later");
                    }
                }
            }
            let _ = tokio::time::timeout(DELETE_SWEEP, self.retired.notified()).await;
        }
    }

    /// A POST refused with 403 (`mismatch`, `unknown_subscription`).
    pub fn client_state_refused(&self, reason: &'static str) {
        self.metrics.graph_refused(reason);
    }

    /// A notification for a retired subscription, acknowledged and dropped.
    pub fn retired_notification(&self) {
        self.metrics.graph_notification("retired");
    }

    /// A notification delivered or spooled.
    pub fn delivered(&self, _change_type: Option<&str>) {
        self.metrics.graph_notification("accepted");
    }

    /// Publish the resources' states as metrics.
    pub fn publish_gauges(&self) {
        let views = self.views();
        let counts: Vec<(&'static str, i64)> = GRAPH_STATES
            .iter()
            .map(|s| (*s, views.iter().filter(|v| v.state == *s).count() as i64))
            .collect();
        self.metrics.set_graph_resources(&counts);
    }

    /// Every configured resource, for the admin API.
    pub fn views(&self) -> Vec<GraphView> {
        let resources: Vec<(String, Arc<Resource>)> = self
            .resources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let now = store::now_millis();
        let mut out: Vec<GraphView> = resources
            .into_iter()
            .map(|(name, r)| {
                let rec = r.record.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let seconds_to_expiry = rec
                    .expires_at
                    .map(|e| (e as i64 - now as i64).div_euclid(1000));
                let state = match rec.state {
                    GraphState::Active if expiring(&rec, now) => "expiring",
                    s => state_label(s),
                };
                GraphView {
                    spool_depth: self.delivery.waiting_for(&graph_queue(&name)),
                    resource: name,
                    state,
                    subscription_id: rec.subscription_id,
                    expires_at: rec
                        .expires_at
                        .map(|e| humantime::format_rfc3339_seconds(from_millis(e)).to_string()),
                    seconds_to_expiry,
                    seconds_since_notification: rec
                        .last_notification
                        .map(|t| now.saturating_sub(t) / 1000),
                    last_lifecycle: rec.last_lifecycle.map(|(e, _)| e),
                    last_error: rec.last_error,
                    resync_pending: rec.resync_pending,
                }
            })
            .collect();
        out.sort_by(|a, b| a.resource.cmp(&b.resource));
        out
    }
}

/// Active, but less than a tenth of its lifetime (since the last renewal) is left: the renewal
/// that should have happened at half has not.
fn expiring(rec: &GraphRecord, now: UnixMillis) -> bool {
    match (rec.expires_at, rec.renewed_at) {
        (Some(exp), Some(renewed)) if exp > renewed => {
            let life = exp - renewed;
            exp.saturating_sub(now) < life / 10
        }
        (Some(exp), _) => exp <= now,
        _ => false,
    }
}

/// Every state label of a Graph resource, as metrics publish them.
pub const GRAPH_STATES: [&str; 5] = ["creating", "active", "expiring", "backing-off", "failed"];

/// The label of a Graph resource state.
pub fn state_label(s: GraphState) -> &'static str {
    match s {
        GraphState::Creating => "creating",
        GraphState::Active => "active",
        GraphState::BackingOff => "backing-off",
        GraphState::Failed => "failed",
    }
}

fn outcome_label(a: GraphAction) -> &'static str {
    match a {
        GraphAction::Throttled(_) => "throttled",
        GraphAction::Transient => "transient",
        GraphAction::Permanent => "permanent",
        GraphAction::Gone => "gone",
        GraphAction::ExpirationTooLong(_) => "expiration_too_long",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_come_at_about_half_the_remaining_lifetime() {
        let now = SystemTime::now();
        let week = Duration::from_secs(7 * 24 * 3600);
        for r in [0, 1, 977, u64::MAX] {
            let w = renew_wait(now, Some(now + week), r);
            assert!(w <= week / 2 && w >= week.mul_f64(0.45), "{w:?}");
        }
        // However short the life Graph grants, the renewal comes before the end.
        let w = renew_wait(now, Some(now + Duration::from_secs(4)), 5);
        assert!(
            w < Duration::from_secs(4) && w >= Duration::from_millis(1800),
            "{w:?}"
        );
        assert_eq!(
            renew_wait(now, Some(now - Duration::from_secs(1)), 0),
            Duration::ZERO
        );
        assert_eq!(renew_wait(now, None, 0), Duration::ZERO);
    }

    #[test]
    fn client_states_are_fresh_and_fit() {
        let a = new_client_state();
        assert_ne!(a, new_client_state());
        assert!(a.len() <= graph::MAX_CLIENT_STATE && a.len() >= 43);
    }

    #[test]
    fn expiring_means_the_renewal_is_late() {
        let rec = |renewed: u64, exp: u64| GraphRecord {
            renewed_at: Some(renewed),
            expires_at: Some(exp),
            ..GraphRecord::default()
        };
        assert!(!expiring(&rec(0, 1000), 500));
        assert!(expiring(&rec(0, 1000), 950));
        assert!(expiring(&rec(0, 1000), 2000));
    }
}
