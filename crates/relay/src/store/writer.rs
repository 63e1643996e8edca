//! Group commit: one thread owns every write to the store and commits whatever writes are queued
//! together, in one transaction and one fsync, then answers each caller.
//!
//! An fsync costs the same for one 4 KB notification as for a hundred, so under concurrent load
//! the cost of durability is shared: while one commit is in flight the next requests queue up and
//! go into the next commit. With no concurrency nothing waits: a lone request is committed at
//! once (unless [`WriterConfig::linger`] asks otherwise). The thread is a plain std thread
//! because redb is synchronous; callers await a oneshot answer, so the async runtime never blocks.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{
    ack_in, append_in, mailbox_key, put_mailbox_in, read_next_seq, record_attempt_in,
    write_next_seq, MailboxRecord, NewSpoolEntry, SpoolSeq, Store, StoreError, UnixMillis,
};
use std::sync::Arc;

/// Most writes in one commit by default: enough to share an fsync among all the notifications
/// a busy relay receives in one, small enough that a batch's replies are not held up long.
pub const DEFAULT_MAX_BATCH_WRITES: usize = 512;

/// Most body bytes in one commit by default: bounds the memory a batch holds and the size of one
/// redb transaction when bodies are several megabytes.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// How the writer forms batches.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Most writes in one commit.
    pub max_batch_writes: usize,
    /// Most spooled body bytes in one commit (a single larger body still goes alone).
    pub max_batch_bytes: usize,
    /// How long to wait for more writes after the first before committing. Zero by default:
    /// batches form by themselves while the previous commit's fsync runs, and a lone write should
    /// not pay extra latency.
    pub linger: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            max_batch_writes: DEFAULT_MAX_BATCH_WRITES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            linger: Duration::ZERO,
        }
    }
}

/// A queued write and where to send its answer.
enum Op {
    Append(NewSpoolEntry, oneshot::Sender<Result<SpoolSeq, StoreError>>),
    Ack(String, SpoolSeq, oneshot::Sender<Result<bool, StoreError>>),
    Attempt(
        String,
        SpoolSeq,
        oneshot::Sender<Result<Option<u32>, StoreError>>,
    ),
    PutMailbox(
        Box<MailboxRecord>,
        UnixMillis,
        oneshot::Sender<Result<(), StoreError>>,
    ),
}

impl Op {
    fn body_bytes(&self) -> usize {
        match self {
            Op::Append(e, _) => e.body.len(),
            _ => 0,
        }
    }
}

/// The outcome of an op inside a batch, held until the commit decides it.
enum Done {
    Append(
        Result<SpoolSeq, StoreError>,
        oneshot::Sender<Result<SpoolSeq, StoreError>>,
    ),
    Ack(
        Result<bool, StoreError>,
        oneshot::Sender<Result<bool, StoreError>>,
    ),
    Attempt(
        Result<Option<u32>, StoreError>,
        oneshot::Sender<Result<Option<u32>, StoreError>>,
    ),
    PutMailbox(
        Result<(), StoreError>,
        oneshot::Sender<Result<(), StoreError>>,
    ),
}

impl Done {
    fn is_err(&self) -> bool {
        match self {
            Done::Append(r, _) => r.is_err(),
            Done::Ack(r, _) => r.is_err(),
            Done::Attempt(r, _) => r.is_err(),
            Done::PutMailbox(r, _) => r.is_err(),
        }
    }

    /// Move the step's error out (leaving a placeholder that is never sent, since a failed batch
    /// answers everyone with [`StoreError::BatchFailed`]).
    fn take_error(&mut self) -> Option<StoreError> {
        fn take<T>(r: &mut Result<T, StoreError>) -> Option<StoreError> {
            match std::mem::replace(r, Err(StoreError::WriterStopped)) {
                Err(e) => Some(e),
                ok => {
                    *r = ok;
                    None
                }
            }
        }
        match self {
            Done::Append(r, _) => take(r),
            Done::Ack(r, _) => take(r),
            Done::Attempt(r, _) => take(r),
            Done::PutMailbox(r, _) => take(r),
        }
    }

    /// Answer the caller: with the op's own result if the batch committed, else with the batch's
    /// failure.
    fn answer(self, failed: Option<&Arc<StoreError>>) {
        fn pick<T>(
            r: Result<T, StoreError>,
            failed: Option<&Arc<StoreError>>,
        ) -> Result<T, StoreError> {
            match failed {
                Some(e) => Err(StoreError::BatchFailed(e.clone())),
                None => r,
            }
        }
        // A caller that gave up (dropped its future) no longer wants the answer.
        match self {
            Done::Append(r, tx) => drop(tx.send(pick(r, failed))),
            Done::Ack(r, tx) => drop(tx.send(pick(r, failed))),
            Done::Attempt(r, tx) => drop(tx.send(pick(r, failed))),
            Done::PutMailbox(r, tx) => drop(tx.send(pick(r, failed))),
        }
    }
}

/// The async face of the store's writes, with group commit. Dropping it (or [`Self::shutdown`])
/// lets the thread finish the writes already queued and exit.
#[derive(Debug)]
pub struct StoreWriter {
    tx: mpsc::Sender<Op>,
    thread: Option<JoinHandle<()>>,
    store: Arc<Store>,
}

impl StoreWriter {
    /// Start the writer thread for `store`. Writes made directly on the [`Store`] meanwhile are
    /// still correct (redb serialises write transactions) but do not share commits.
    pub fn start(store: Arc<Store>, config: WriterConfig) -> Self {
        // Unbounded: each queued op has a caller awaiting its answer, so the queue is bounded by
        // the relay's own concurrency (connection limit), not by this channel.
        let (tx, rx) = mpsc::channel();
        let thread_store = store.clone();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(&thread_store, &config, &rx))
            .expect("cannot spawn the store writer thread");
        Self {
            tx,
            thread: Some(thread),
            store,
        }
    }

    /// The store this writer writes to, for reads.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Spool a notification; durable when this returns `Ok`.
    pub async fn append(&self, entry: NewSpoolEntry) -> Result<SpoolSeq, StoreError> {
        self.submit(|reply| Op::Append(entry, reply)).await
    }

    /// Remove a delivered notification; returns whether it was there.
    pub async fn ack(&self, mailbox: &str, seq: SpoolSeq) -> Result<bool, StoreError> {
        let mailbox = mailbox_key(mailbox);
        self.submit(|reply| Op::Ack(mailbox, seq, reply)).await
    }

    /// Count a delivery attempt; returns the new count, or `None` if the entry is gone.
    pub async fn record_attempt(
        &self,
        mailbox: &str,
        seq: SpoolSeq,
    ) -> Result<Option<u32>, StoreError> {
        let mailbox = mailbox_key(mailbox);
        self.submit(|reply| Op::Attempt(mailbox, seq, reply)).await
    }

    /// [`Store::put_mailbox`] through the writer.
    pub async fn put_mailbox(
        &self,
        record: MailboxRecord,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        self.submit(|reply| Op::PutMailbox(Box::new(record), now, reply))
            .await
    }

    /// Finish the queued writes and stop the thread.
    pub async fn shutdown(mut self) {
        let thread = self.thread.take();
        drop(self);
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The writer thread: collect a batch, apply it in one transaction, answer, repeat until every
/// sender is gone.
fn run(store: &Store, config: &WriterConfig, rx: &mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut bytes = first.body_bytes();
        let mut batch = vec![first];
        let deadline = Instant::now() + config.linger;
        while batch.len() < config.max_batch_writes && bytes < config.max_batch_bytes {
            let op = match rx.try_recv() {
                Ok(op) => op,
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(left) {
                        Ok(op) => op,
                        Err(_) => break,
                    }
                }
            };
            bytes += op.body_bytes();
            batch.push(op);
        }
        apply(store, batch);
    }
}

fn apply(store: &Store, batch: Vec<Op>) {
    let txn = match store.begin_write() {
        Ok(txn) => txn,
        Err(e) => {
            store.after_error(&e);
            return fail(batch, e);
        }
    };
    let mut next = match read_next_seq(&txn) {
        Ok(n) => n,
        Err(e) => {
            drop(txn);
            store.after_error(&e);
            return fail(batch, e);
        }
    };
    let first_seq = next;
    let mut done = Vec::with_capacity(batch.len());
    let mut ops = batch.into_iter();
    for op in ops.by_ref() {
        let d = match op {
            Op::Append(e, tx) => {
                let r = append_in(
                    &txn,
                    &mailbox_key(&e.mailbox),
                    &e.subscription_id,
                    &e.body,
                    e.received_at,
                    &mut next,
                );
                Done::Append(r, tx)
            }
            Op::Ack(mailbox, seq, tx) => Done::Ack(ack_in(&txn, &mailbox, seq), tx),
            Op::Attempt(mailbox, seq, tx) => {
                Done::Attempt(record_attempt_in(&txn, &mailbox, seq), tx)
            }
            Op::PutMailbox(record, now, tx) => {
                Done::PutMailbox(put_mailbox_in(&txn, &record, now), tx)
            }
        };
        done.push(d);
        if done.last().is_some_and(Done::is_err) {
            // A failed step leaves the transaction half done: abandon the batch.
            break;
        }
    }
    let outcome = match done.last_mut().and_then(Done::take_error) {
        Some(e) => Err(e),
        None if next != first_seq => write_next_seq(&txn, next).and_then(|()| store.commit(txn)),
        None => store.commit(txn),
    };
    let failed = outcome.err().map(Arc::new);
    if let Some(e) = &failed {
        tracing::error!(error = %e, writes = done.len(), "store: group commit failed");
        // A latched I/O error (a full disk) closes the handle; the next batch reopens the file.
        store.after_error(e);
    }
    for d in done {
        d.answer(failed.as_ref());
    }
    // Ops after a failed step were never applied.
    let rest: Vec<Op> = ops.collect();
    if !rest.is_empty() {
        let failed = failed.expect("steps are skipped only after a failure");
        answer_failed(rest, &failed);
    }
}

fn fail(batch: Vec<Op>, e: StoreError) {
    tracing::error!(error = %e, writes = batch.len(), "store: cannot start a write transaction");
    answer_failed(batch, &Arc::new(e));
}

fn answer_failed(batch: Vec<Op>, e: &Arc<StoreError>) {
    for op in batch {
        let err = || StoreError::BatchFailed(e.clone());
        match op {
            Op::Append(_, tx) => drop(tx.send(Err(err()))),
            Op::Ack(_, _, tx) => drop(tx.send(Err(err()))),
            Op::Attempt(_, _, tx) => drop(tx.send(Err(err()))),
            Op::PutMailbox(_, _, tx) => drop(tx.send(Err(err()))),
        }
    }
}
