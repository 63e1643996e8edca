//! Managed-mode delivery: every notification the relay acknowledges to Exchange reaches the
//! receiver at least once, in order per mailbox.
//!
//! A notification is delivered straight away when the mailbox has nothing waiting; otherwise,
//! or when the receiver fails, it is appended to the durable spool (fsync'd, group-committed)
//! before Exchange hears `OK`. A replay task drains the spool in order with back-off. A per-
//! mailbox lock orders direct deliveries and replays, so a later notification never overtakes
//! an earlier spooled one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;

use crate::metrics::Metrics;
use crate::receiver::{Outgoing, Receiver};
use crate::store::{self, NewSpoolEntry, Store, StoreError, StoreWriter};
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

/// Entries replayed per mailbox before moving to the next, so one mailbox's backlog does not
/// starve the others.
const REPLAY_BATCH: usize = 32;
/// First pause after the receiver refused a replay.
const REPLAY_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest pause between replay attempts while the receiver is down.
const REPLAY_BACKOFF_MAX: Duration = Duration::from_secs(30);

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
}

/// Told, under the mailbox's queue lock, whether a resync signal is still waiting for it.
type ResyncHook = Box<dyn Fn(&str, bool) + Send + Sync>;

/// The delivery side of managed mode.
pub struct Delivery {
    receiver: Arc<Receiver>,
    /// Path and query every delivery uses: the callback URL's, which is where Exchange posts.
    path: http::uri::PathAndQuery,
    writer: Arc<StoreWriter>,
    store: Arc<Store>,
    queues: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Queue>>>>,
    wake: tokio::sync::Notify,
    metrics: Arc<Metrics>,
    resync_hook: std::sync::OnceLock<ResyncHook>,
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
        path: http::uri::PathAndQuery,
        writer: Arc<StoreWriter>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let store = writer.store().clone();
        let depth = store.blocking(|s| s.spool_depth()).await?;
        let queues = depth
            .per_mailbox
            .into_iter()
            .map(|(m, n)| {
                let q = Queue {
                    waiting: n,
                    resyncs: 0,
                };
                (m, Arc::new(tokio::sync::Mutex::new(q)))
            })
            .collect();
        Ok(Arc::new(Self {
            receiver,
            path,
            writer,
            store,
            queues: Mutex::new(queues),
            wake: tokio::sync::Notify::new(),
            metrics,
            resync_hook: std::sync::OnceLock::new(),
        }))
    }

    /// Call `hook(mailbox, pending)` whenever a resync signal is queued or delivered, so the
    /// status page can show whether the receiver still has to hear it.
    pub fn on_resync(&self, hook: impl Fn(&str, bool) + Send + Sync + 'static) {
        let _ = self.resync_hook.set(Box::new(hook));
    }

    fn resync_changed(&self, mailbox: &str, q: &Queue) {
        if let Some(hook) = self.resync_hook.get() {
            hook(mailbox, q.resyncs > 0);
        }
    }

    fn queue(&self, mailbox: &str) -> Arc<tokio::sync::Mutex<Queue>> {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.entry(mailbox.to_owned()).or_default().clone()
    }

    /// Take care of one notification: deliver it now if nothing is waiting for its mailbox, else
    /// (or if the receiver fails) spool it. `Err` means it is neither delivered nor durably
    /// stored: Exchange must not be told `OK`.
    pub async fn accept(
        &self,
        mailbox: &str,
        subscription_id: &str,
        headers: HeaderBlock,
        body: Bytes,
    ) -> Result<Accepted, StoreError> {
        let queue = self.queue(mailbox);
        let mut q = queue.lock().await;
        if q.waiting == 0 {
            let out = self.request(mailbox, subscription_id, &headers, body.clone(), None);
            if self.try_deliver(&out).await {
                self.metrics.delivery("delivered");
                return Ok(Accepted::Delivered);
            }
        }
        self.writer
            .append(NewSpoolEntry {
                mailbox: mailbox.to_owned(),
                subscription_id: subscription_id.to_owned(),
                body,
                received_at: store::now_millis(),
            })
            .await?;
        q.waiting += 1;
        self.metrics.delivery("spooled");
        drop(q);
        self.wake.notify_one();
        Ok(Accepted::Spooled)
    }

    /// Queue the resynchronisation signal for `mailbox` behind anything already waiting.
    pub async fn request_resync(&self, mailbox: &str) -> Result<(), StoreError> {
        let queue = self.queue(mailbox);
        let mut q = queue.lock().await;
        // An empty subscription id and body mark the resync signal in the spool.
        self.writer
            .append(NewSpoolEntry {
                mailbox: mailbox.to_owned(),
                subscription_id: String::new(),
                body: Bytes::new(),
                received_at: store::now_millis(),
            })
            .await?;
        q.waiting += 1;
        q.resyncs += 1;
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
                let mut q = queue.lock().await;
                if q.waiting == 0 {
                    continue;
                }
                match self.replay_mailbox(&mailbox, &mut q).await {
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
    async fn replay_mailbox(&self, mailbox: &str, q: &mut Queue) -> Result<usize, ()> {
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
            return Ok(0);
        }
        let mut done = 0;
        let mut acks = tokio::task::JoinSet::new();
        let mut refused = false;
        for e in entries {
            let resync = e.subscription_id.is_empty() && e.body.is_empty();
            let mut headers = HeaderBlock::with_capacity(80);
            headers.push(b"content-type", b"text/xml; charset=utf-8");
            let received = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(e.received_at),
            )
            .to_string();
            headers.push(X_EWS_RECEIVED_AT.as_str().as_bytes(), received.as_bytes());
            let out = self.request(
                mailbox,
                &e.subscription_id,
                &headers,
                e.body.clone(),
                resync.then_some(mailbox),
            );
            if !self.try_deliver(&out).await {
                let _ = self.writer.record_attempt(mailbox, e.seq).await;
                self.metrics.delivery("failed");
                refused = true;
                break;
            }
            // Delivery stays strictly in order; the acknowledgements run concurrently so the
            // store writer commits them together (one fsync per batch, not per entry).
            let (writer, m, seq) = (self.writer.clone(), mailbox.to_owned(), e.seq);
            acks.spawn(async move { (resync, writer.ack(&m, seq).await) });
            self.metrics
                .delivery(if resync { "resync" } else { "replayed" });
        }
        let mut ack_failed = false;
        while let Some(joined) = acks.join_next().await {
            match joined {
                Ok((resync, Ok(_))) => {
                    q.waiting = q.waiting.saturating_sub(1);
                    if resync {
                        q.resyncs = q.resyncs.saturating_sub(1);
                        self.resync_changed(mailbox, q);
                    }
                    done += 1;
                }
                Ok((_, Err(err))) => {
                    tracing::error!(error = %err, "delivered but cannot remove from the spool; it will be delivered again");
                    ack_failed = true;
                }
                Err(err) => {
                    tracing::error!(error = %err, "spool acknowledgement task failed; the entry will be delivered again");
                    ack_failed = true;
                }
            }
        }
        if ack_failed || (refused && done == 0) {
            return Err(());
        }
        Ok(done)
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

    /// The POST to the receiver: `headers` (any `X-EWS-*` fields a client sent dropped) and the
    /// relay's own `X-EWS-*` fields.
    fn request(
        &self,
        mailbox: &str,
        subscription_id: &str,
        headers: &HeaderBlock,
        body: Bytes,
        resync: Option<&str>,
    ) -> Outgoing {
        let own = [
            &X_EWS_MAILBOX,
            &X_EWS_SUBSCRIPTION_ID,
            &X_EWS_RESYNC_REQUIRED,
        ];
        let mut out = HeaderBlock::with_capacity(headers.as_bytes().len() + 256);
        for (name, value) in headers.iter() {
            if !own
                .iter()
                .any(|o| name.eq_ignore_ascii_case(o.as_str().as_bytes()))
            {
                out.push(name, value);
            }
        }
        out.push(X_EWS_MAILBOX.as_str().as_bytes(), mailbox.as_bytes());
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
        Outgoing::new(
            "POST",
            self.path.as_str(),
            self.receiver.host_header().as_bytes(),
            &out,
            body,
        )
    }

    /// One delivery attempt: true on a 2xx answer.
    async fn try_deliver(&self, out: &Outgoing) -> bool {
        match self.receiver.send(out).await {
            Ok(resp) if resp.status.is_success() => true,
            Ok(resp) => {
                tracing::warn!(
                    status = resp.status.as_u16(),
                    "receiver refused a notification; spooled for replay"
                );
                false
            }
            Err(e) => {
                self.metrics.upstream_error(e.kind);
                tracing::warn!(error = %e, "receiver unreachable; notification spooled for replay");
                false
            }
        }
    }
}
