//! The embedded state of managed mode: one redb file, `<state-dir>/ews-relay.redb`, holding what
//! must survive a restart (including `kill -9`): each mailbox's subscription and watermark, the
//! map from every subscription id the relay created (current and retired) to its mailbox, and the
//! delivery spool of notifications accepted from Exchange but not yet delivered to the receiver.
//!
//! # File layout
//! | table | key | value |
//! |---|---|---|
//! | `meta` | `&str` name | `u64`: `schema_version`, `next_spool_seq` |
//! | `mailboxes` | `&str` lower-cased SMTP address | `&[u8]` JSON of [`MailboxRecord`] (without the address) |
//! | `subscriptions` | `&str` subscription id | `(&str mailbox, Option<u64> retired_at_ms)` |
//! | `spool_meta` | `(&str mailbox, u64 seq)` | `(&str subscription_id, u64 received_at_ms, u32 attempts)` |
//! | `spool_body` | `(&str mailbox, u64 seq)` | `&[u8]` raw SOAP body |
//! | `spool_depth` | `&str mailbox` | `(u64 entries, u64 body_bytes)`; absent when empty |
//! | `graph_resources`, `graph_ids` | see [`graph`] | managed Graph mode's subscriptions and secrets |
//!
//! A spool "mailbox" is a queue key: an SMTP address, or `graph:` and a Graph resource path.
//!
//! The spool key puts the mailbox first, so a range scan over one mailbox returns its entries in
//! order of arrival; `seq` comes from one persisted counter, so it never repeats, even after every
//! entry has been acknowledged. Metadata and body live in separate tables so that counting an
//! attempt or finding the oldest entry never rewrites or reads a body of several megabytes.
//! `spool_depth` is maintained with every append and ack so that metrics and the list of
//! mailboxes with pending work cost one small table scan, not a scan of the spool.
//!
//! Mailbox records are JSON (serde, absent optional fields omitted): about 200–400 bytes, written
//! a few times a minute per mailbox, and new optional fields can be added without a schema bump.
//!
//! # Writes
//! Every write commits with [`Durability::Immediate`] (an fsync): [`Store::spool_append`]
//! returning is what allows the relay to answer Exchange `OK`. On the notification path use
//! [`StoreWriter`] instead, which group-commits concurrent writes into one transaction and one
//! fsync, and runs on its own thread so the async runtime never blocks on redb.
//!
//! Reads run in redb read transactions (MVCC snapshots): they never wait for a writer and a writer
//! never waits for them.
//!
//! # I/O errors and a full disk
//! redb latches any I/O error (ENOSPC included): the failed transaction is not committed, and
//! every later operation on that handle fails with "previous I/O error" until the file is closed
//! and opened again. So the store lets go of its handle after such an error and reopens the file
//! on the next operation (redb repairs it from the last durable commit, which is the state every
//! caller was told about). A relay whose disk filled up thus resumes by itself once there is
//! room, without a restart; until then writes fail with errors for which
//! [`StoreError::is_disk_full`] is true.

mod graph;
mod writer;

pub use graph::{GraphId, GraphRecord, GraphState};

pub use writer::{StoreWriter, WriterConfig, DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_WRITES};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    TableHandle, WriteTransaction,
};
use serde::{Deserialize, Serialize};

/// The store's file name inside `--state-dir`; fixed so that a restart finds the same file.
pub const STORE_FILE_NAME: &str = "ews-relay.redb";

/// The schema version this build writes. Bump it when the layout or an encoding changes in a way
/// an older build would misread; an older build then refuses the file instead of corrupting it.
pub const SCHEMA_VERSION: u64 = 1;

/// How long a retired subscription id is remembered by default. A replaced subscription that is
/// still alive at Exchange posts at least every `StatusFrequency` (at most 1440 minutes), and is
/// ended by the `Unsubscribe` answer to that post; a week also covers a relay that was down for
/// days.
pub const DEFAULT_RETIRED_ID_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// redb's page cache ceiling. redb defaults to 1 GiB; the spool is written once and read once,
/// so a large cache buys little and would only look like a leak on a small VM.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Time as milliseconds since the Unix epoch, the unit of every timestamp in the store.
pub type UnixMillis = u64;

/// The current time in [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The store's key for a mailbox: SMTP addresses are compared case-insensitively by Exchange, so
/// `Alice@Contoso.com` and `alice@contoso.com` must be the same mailbox.
///
/// The spool's queues are keyed the same way; a Graph resource's queue is `graph:` and the
/// resource path as configured (an SMTP address never holds `:`), kept as it is.
pub fn mailbox_key(address: &str) -> String {
    if address.starts_with(GRAPH_QUEUE_PREFIX) {
        return address.to_owned();
    }
    address.trim().to_lowercase()
}

/// The start of a Graph resource's spool queue key.
pub const GRAPH_QUEUE_PREFIX: &str = "graph:";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const MAILBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("mailboxes");
const SUBSCRIPTIONS: TableDefinition<&str, (&str, Option<u64>)> =
    TableDefinition::new("subscriptions");
const SPOOL_META: TableDefinition<(&str, u64), (&str, u64, u32)> =
    TableDefinition::new("spool_meta");
const SPOOL_BODY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("spool_body");
const SPOOL_DEPTH: TableDefinition<&str, (u64, u64)> = TableDefinition::new("spool_depth");

/// `meta` key of the schema version.
const META_SCHEMA_VERSION: &str = "schema_version";
/// `meta` key of the next spool sequence number to hand out.
const META_NEXT_SEQ: &str = "next_spool_seq";

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `--state-dir` could not be created.
    #[error("{path}: cannot create the state directory: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file could not be opened or created (permissions, disk, redb format).
    #[error("{path}: cannot open the store: {source}")]
    Open {
        /// The store file.
        path: PathBuf,
        /// What redb reported.
        source: redb::DatabaseError,
    },
    /// Another process holds the file.
    #[error("{path}: the store is in use by another process (another ews-relay with the same --state-dir?)")]
    InUse {
        /// The store file.
        path: PathBuf,
    },
    /// The file is not a redb database, or is damaged beyond redb's own repair.
    #[error("{path}: not a usable store file (corrupted, or not a redb database): {detail}; move it aside to start with an empty store")]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The file is a redb database of some other program.
    #[error(
        "{path}: a redb database but not an ews-relay store (no schema version; tables {tables:?})"
    )]
    Foreign {
        /// The store file.
        path: PathBuf,
        /// The tables found in it.
        tables: Vec<String>,
    },
    /// The file was written by a newer ews-relay whose layout this build may misread.
    #[error("{path}: written by a newer ews-relay (store schema version {found}; this build understands up to {supported}); run that version or a later one")]
    NewerSchema {
        /// The store file.
        path: PathBuf,
        /// The version in the file.
        found: u64,
        /// [`SCHEMA_VERSION`].
        supported: u64,
    },
    /// A stored value could not be decoded.
    #[error("store: undecodable {what} record {key:?}: {detail}")]
    Decode {
        /// Which kind of record.
        what: &'static str,
        /// Its key.
        key: String,
        /// The decoder's complaint.
        detail: String,
    },
    /// A redb operation on an open store failed (I/O error, disk full …).
    #[error("store: {0}")]
    Db(#[from] redb::Error),
    /// The group commit this write was part of failed; the write did not happen.
    #[error("store: group commit failed: {0}")]
    BatchFailed(#[source] Arc<StoreError>),
    /// The writer thread has stopped (shut down, or panicked).
    #[error("store: the writer thread has stopped")]
    WriterStopped,
    /// After an I/O error the file was closed, and opening it again failed (often: the disk is
    /// still full); the next operation tries again.
    #[error("{path}: cannot reopen the store after an I/O error: {source}")]
    Reopen {
        /// The store file.
        path: PathBuf,
        /// What redb reported.
        source: redb::DatabaseError,
    },
}

/// `errno` values meaning "no room left": ENOSPC, and EDQUOT (a quota counts as a full disk for
/// the relay: the remedy, making room, is the same). Linux numbers; `io::ErrorKind::StorageFull`
/// covers ENOSPC on every platform.
const DISK_FULL_ERRNOS: [i32; 2] = [28, 122];

fn io_is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.raw_os_error()
            .is_some_and(|n| DISK_FULL_ERRNOS.contains(&n))
}

impl StoreError {
    /// Whether this failure is the file system being out of space (ENOSPC or a quota): the
    /// write did not happen, and will succeed once there is room.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Db(redb::Error::Io(e)) => io_is_disk_full(e),
            StoreError::Open { source, .. } | StoreError::Reopen { source, .. } => matches!(
                source,
                redb::DatabaseError::Storage(redb::StorageError::Io(e)) if io_is_disk_full(e)
            ),
            StoreError::StateDir { source, .. } => io_is_disk_full(source),
            StoreError::BatchFailed(inner) => inner.is_disk_full(),
            _ => false,
        }
    }

    /// Whether redb has latched an I/O error on its handle, which must then be reopened.
    fn latches(&self) -> bool {
        match self {
            StoreError::Db(redb::Error::Io(_) | redb::Error::PreviousIo) => true,
            StoreError::BatchFailed(inner) => inner.latches(),
            _ => false,
        }
    }
}

/// redb has one error type per operation; all of them are storage failures of an open store.
macro_rules! from_redb {
    ($($t:ident),*) => {$(
        impl From<redb::$t> for StoreError {
            fn from(e: redb::$t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    TransactionError,
    TableError,
    StorageError,
    CommitError,
    SetDurabilityError
);

/// Where a mailbox's subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MailboxState {
    /// A Subscribe request is being made.
    #[default]
    Subscribing,
    /// Subscribed, and notifications or keep-alives arrive.
    Active,
    /// Keep-alives stopped or Exchange reported the subscription gone: to be resubscribed.
    Lost,
    /// Waiting before the next attempt (throttling, transient error).
    BackingOff,
    /// A permanent error (no such mailbox, access denied …) until the configuration changes.
    Failed,
}

/// What the store remembers about one mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MailboxRecord {
    /// The lower-cased SMTP address; the key, so not repeated in the stored value.
    #[serde(skip)]
    pub address: String,
    /// The current subscription id, once a Subscribe succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    /// The last watermark received, to resubscribe from without losing events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// Where the subscription stands.
    pub state: MailboxState,
    /// The last error, for the admin API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the last notification of any kind (keep-alive included) arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<UnixMillis>,
    /// When the last notification with real events arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event: Option<UnixMillis>,
    /// The EWS URL the subscription was made on (from Autodiscover or configuration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ews_url: Option<String>,
    /// Autodiscover's `GroupingInformation` used for affinity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grouping: Option<String>,
    /// The watermark was refused (`ErrorInvalidWatermark`): the receiver must resynchronise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resync_pending: bool,
    /// Streaming: a connection of the mailbox's group was open, and the relay has not yet
    /// stopped cleanly. Found set at start-up (after `kill -9`), events read but not spooled
    /// may be lost: the receiver is told to resynchronise the mailbox.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stream_open: bool,
    /// Streaming: the `X-BackEndOverrideCookie` the subscription was made with, so a restarted
    /// relay reaches the subscription's server again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_cookie: Option<String>,
}

impl MailboxRecord {
    /// A new record for `address` (normalised with [`mailbox_key`]) in state `Subscribing`.
    pub fn new(address: &str) -> Self {
        Self {
            address: mailbox_key(address),
            ..Self::default()
        }
    }
}

/// Who a subscription id belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionOwner {
    /// The mailbox it was created for.
    pub mailbox: String,
    /// `None` while it is the mailbox's current subscription; when it was replaced otherwise.
    /// A notification for a retired id is answered `Unsubscribe`.
    pub retired_at: Option<UnixMillis>,
}

/// Position of a spooled notification: unique across the store and increasing in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SpoolSeq(pub u64);

impl std::fmt::Display for SpoolSeq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A notification to spool.
#[derive(Debug, Clone)]
pub struct NewSpoolEntry {
    /// The mailbox it is for (normalised on write).
    pub mailbox: String,
    /// The subscription id it arrived on.
    pub subscription_id: String,
    /// The raw SOAP body as Exchange sent it.
    pub body: Bytes,
    /// When the relay received it.
    pub received_at: UnixMillis,
}

/// A spooled notification waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolEntry {
    /// The mailbox it is for.
    pub mailbox: String,
    /// Its position.
    pub seq: SpoolSeq,
    /// The subscription id it arrived on.
    pub subscription_id: String,
    /// The raw SOAP body.
    pub body: Bytes,
    /// When the relay received it.
    pub received_at: UnixMillis,
    /// Delivery attempts recorded so far.
    pub attempts: u32,
}

/// How much is waiting in the spool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolDepth {
    /// Entries in all mailboxes.
    pub entries: u64,
    /// Body bytes in all mailboxes.
    pub bytes: u64,
    /// Entries per mailbox with at least one.
    pub per_mailbox: BTreeMap<String, u64>,
}

/// The embedded store. Cheap to share behind an `Arc`; all methods take `&self` and block on
/// redb, so from async code call them through [`Store::blocking`] or use a [`StoreWriter`].
pub struct Store {
    /// The open file; `None` after an I/O error until reopened (see the module's "I/O errors
    /// and a full disk"). Behind a lock so the handle can be swapped while the relay runs.
    db: RwLock<Option<Arc<Database>>>,
    /// Held while reopening, so two threads do not race to open the file.
    reopening: Mutex<()>,
    path: PathBuf,
    /// Write transactions committed since open, so tests can see group commit working.
    commits: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Open (or create) the store in `state_dir`, creating the directory if needed.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        Self::open_file(&state_dir.join(STORE_FILE_NAME))
    }

    /// Open (or create) the store at exactly `path`.
    pub fn open_file(path: &Path) -> Result<Self, StoreError> {
        let db = open_database(path)?;
        let store = Self {
            db: RwLock::new(Some(Arc::new(db))),
            reopening: Mutex::new(()),
            path: path.to_path_buf(),
            commits: AtomicU64::new(0),
        };
        store.init_schema()?;
        Ok(store)
    }

    /// The open database, reopening the file first if an I/O error closed it.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = &*self.db.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(db.clone());
        }
        let _one = self.reopening.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = &*self.db.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(db.clone());
        }
        let db = match open_database(&self.path) {
            Ok(db) => Arc::new(db),
            Err(StoreError::Open { path, source }) => {
                return Err(StoreError::Reopen { path, source })
            }
            Err(e) => return Err(e),
        };
        tracing::info!(path = %self.path.display(), "store: reopened after an I/O error");
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db.clone());
        Ok(db)
    }

    /// After `e`: if redb latched an I/O error, let go of the handle so that the next operation
    /// reopens the file (it closes once the last transaction still using it ends).
    pub(crate) fn after_error(&self, e: &StoreError) {
        if e.latches() {
            let old = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
            if old.is_some() {
                tracing::warn!(path = %self.path.display(), error = %e, "store: I/O error; the file will be reopened");
            }
        }
    }

    /// Check the schema version (writing it into a new file) and create every table, so that
    /// read transactions never meet a missing one.
    fn init_schema(&self) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write()?;
        let tables: Vec<String> = txn.list_tables()?.map(|t| t.name().to_string()).collect();
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(META_SCHEMA_VERSION)?.map(|v| v.value());
            match found {
                None if tables.is_empty() => {
                    meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION)?;
                    meta.insert(META_NEXT_SEQ, 1)?;
                }
                None => {
                    return Err(StoreError::Foreign {
                        path: self.path.clone(),
                        tables,
                    })
                }
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::NewerSchema {
                        path: self.path.clone(),
                        found: v,
                        supported: SCHEMA_VERSION,
                    })
                }
                // Version 1 is the first: there is nothing older to migrate from yet.
                Some(_) => {}
            }
        }
        txn.open_table(MAILBOXES)?;
        txn.open_table(SUBSCRIPTIONS)?;
        txn.open_table(SPOOL_META)?;
        txn.open_table(SPOOL_BODY)?;
        txn.open_table(SPOOL_DEPTH)?;
        txn.open_table(graph::GRAPH_RESOURCES)?;
        txn.open_table(graph::GRAPH_IDS)?;
        self.commit(txn)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write transactions committed since the store was opened (each one fsync).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Run `f` on a blocking thread, for reads from async code (the admin API, the delivery
    /// loop), so a slow disk never stalls the runtime.
    pub async fn blocking<T, F>(self: &Arc<Self>, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> T + Send + 'static,
    {
        let store = self.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("store task cancelled: {e}"),
        }
    }

    fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db()?.begin_write()?;
        // The default, stated because answering Exchange OK depends on it.
        txn.set_durability(Durability::Immediate)?;
        Ok(txn)
    }

    fn commit(&self, txn: WriteTransaction) -> Result<(), StoreError> {
        txn.commit()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Run `f` in one durable write transaction.
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let attempt = || {
            let txn = self.begin_write()?;
            let out = f(&txn)?;
            self.commit(txn)?;
            Ok(out)
        };
        attempt().inspect_err(|e| self.after_error(e))
    }

    // ---- mailboxes and subscription ids ----

    /// Store `record` (keyed by its normalised address). If its subscription id differs from the
    /// stored one, the old id is retired at `now` and the new one mapped to the mailbox, in the
    /// same transaction, so the id map never disagrees with the mailbox records.
    pub fn put_mailbox(&self, record: &MailboxRecord, now: UnixMillis) -> Result<(), StoreError> {
        self.write(|txn| put_mailbox_in(txn, record, now))
    }

    /// The record of one mailbox.
    pub fn mailbox(&self, address: &str) -> Result<Option<MailboxRecord>, StoreError> {
        let key = mailbox_key(address);
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(MAILBOXES)?;
        let found = table.get(key.as_str())?;
        found.map(|v| decode_mailbox(&key, v.value())).transpose()
    }

    /// Every mailbox record, ordered by address.
    pub fn mailboxes(&self) -> Result<Vec<MailboxRecord>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(MAILBOXES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push(decode_mailbox(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Forget a mailbox; its current subscription id is retired at `now` so that Exchange's next
    /// post for it is answered `Unsubscribe`. Spooled notifications stay until delivered.
    /// Returns whether the mailbox was known.
    pub fn remove_mailbox(&self, address: &str, now: UnixMillis) -> Result<bool, StoreError> {
        let key = mailbox_key(address);
        self.write(|txn| {
            let old = txn
                .open_table(MAILBOXES)?
                .remove(key.as_str())?
                .map(|v| v.value().to_vec());
            let Some(old) = old else { return Ok(false) };
            let old = decode_mailbox(&key, &old)?;
            if let Some(id) = old.subscription_id {
                txn.open_table(SUBSCRIPTIONS)?
                    .insert(id.as_str(), (key.as_str(), Some(now)))?;
            }
            Ok(true)
        })
    }

    /// Who `subscription_id` belongs to, if the relay created it.
    pub fn subscription_owner(
        &self,
        subscription_id: &str,
    ) -> Result<Option<SubscriptionOwner>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(SUBSCRIPTIONS)?;
        let found = table.get(subscription_id)?;
        Ok(found.map(|v| {
            let (mailbox, retired_at) = v.value();
            SubscriptionOwner {
                mailbox: mailbox.to_string(),
                retired_at,
            }
        }))
    }

    /// Forget retired subscription ids retired more than `max_age` before `now`; returns how
    /// many. Current ids are never pruned.
    pub fn prune_retired(&self, max_age: Duration, now: UnixMillis) -> Result<u64, StoreError> {
        let cutoff = now.saturating_sub(max_age.as_millis() as u64);
        self.write(|txn| {
            let mut table = txn.open_table(SUBSCRIPTIONS)?;
            let before = table.len()?;
            table.retain(|_, (_, retired_at)| retired_at.is_none_or(|at| at >= cutoff))?;
            Ok(before - table.len()?)
        })
    }

    // ---- the delivery spool ----

    /// Spool one notification; durable (fsynced) when this returns.
    pub fn spool_append(
        &self,
        mailbox: &str,
        subscription_id: &str,
        body: &[u8],
        received_at: UnixMillis,
    ) -> Result<SpoolSeq, StoreError> {
        self.write(|txn| {
            let mut next = read_next_seq(txn)?;
            let seq = append_in(
                txn,
                &mailbox_key(mailbox),
                subscription_id,
                body,
                received_at,
                &mut next,
            )?;
            write_next_seq(txn, next)?;
            Ok(seq)
        })
    }

    /// Spool several notifications in one transaction (one fsync); sequences in input order.
    pub fn spool_append_batch(
        &self,
        entries: &[NewSpoolEntry],
    ) -> Result<Vec<SpoolSeq>, StoreError> {
        self.write(|txn| {
            let mut next = read_next_seq(txn)?;
            let mut out = Vec::with_capacity(entries.len());
            for e in entries {
                out.push(append_in(
                    txn,
                    &mailbox_key(&e.mailbox),
                    &e.subscription_id,
                    &e.body,
                    e.received_at,
                    &mut next,
                )?);
            }
            write_next_seq(txn, next)?;
            Ok(out)
        })
    }

    /// Up to `limit` of the mailbox's oldest spooled notifications, oldest first.
    pub fn spool_peek(&self, mailbox: &str, limit: usize) -> Result<Vec<SpoolEntry>, StoreError> {
        let key = mailbox_key(mailbox);
        let txn = self.db()?.begin_read()?;
        let meta = txn.open_table(SPOOL_META)?;
        let bodies = txn.open_table(SPOOL_BODY)?;
        let mut out = Vec::new();
        for row in meta.range((key.as_str(), 0)..=(key.as_str(), u64::MAX))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            let (_, seq) = k.value();
            let (subscription_id, received_at, attempts) = v.value();
            let body = bodies
                .get((key.as_str(), seq))?
                .ok_or_else(|| StoreError::Decode {
                    what: "spool",
                    key: format!("{key}/{seq}"),
                    detail: "metadata without a body".into(),
                })?;
            out.push(SpoolEntry {
                mailbox: key.clone(),
                seq: SpoolSeq(seq),
                subscription_id: subscription_id.to_string(),
                body: Bytes::copy_from_slice(body.value()),
                received_at,
                attempts,
            });
        }
        Ok(out)
    }

    /// Remove one delivered notification; returns whether it was there.
    pub fn spool_ack(&self, mailbox: &str, seq: SpoolSeq) -> Result<bool, StoreError> {
        self.write(|txn| ack_in(txn, &mailbox_key(mailbox), seq))
    }

    /// Count one delivery attempt; returns the new count, or `None` if the entry is gone.
    pub fn spool_record_attempt(
        &self,
        mailbox: &str,
        seq: SpoolSeq,
    ) -> Result<Option<u32>, StoreError> {
        self.write(|txn| record_attempt_in(txn, &mailbox_key(mailbox), seq))
    }

    /// Mailboxes with at least one spooled notification, ordered by address.
    pub fn spool_mailboxes(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.spool_depth()?.per_mailbox.into_keys().collect())
    }

    /// How much is waiting, in total and per mailbox.
    pub fn spool_depth(&self) -> Result<SpoolDepth, StoreError> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(SPOOL_DEPTH)?;
        let mut depth = SpoolDepth::default();
        for row in table.iter()? {
            let (k, v) = row?;
            let (entries, bytes) = v.value();
            depth.entries += entries;
            depth.bytes += bytes;
            depth.per_mailbox.insert(k.value().to_string(), entries);
        }
        Ok(depth)
    }

    /// When the oldest spooled notification was received, across all mailboxes.
    pub fn spool_oldest_received_at(&self) -> Result<Option<UnixMillis>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let depth = txn.open_table(SPOOL_DEPTH)?;
        let meta = txn.open_table(SPOOL_META)?;
        let mut oldest: Option<UnixMillis> = None;
        for row in depth.iter()? {
            let (k, _) = row?;
            let mailbox = k.value();
            // The first entry of each mailbox is its oldest.
            if let Some(first) = meta.range((mailbox, 0)..=(mailbox, u64::MAX))?.next() {
                let (_, v) = first?;
                let (_, received_at, _) = v.value();
                oldest = Some(oldest.map_or(received_at, |o| o.min(received_at)));
            }
        }
        Ok(oldest)
    }

    /// Age of the oldest spooled notification at `now`, for metrics; `None` when the spool is
    /// empty.
    pub fn spool_oldest_age(&self, now: UnixMillis) -> Result<Option<Duration>, StoreError> {
        Ok(self
            .spool_oldest_received_at()?
            .map(|at| Duration::from_millis(now.saturating_sub(at))))
    }
}

/// Open (or create) the redb file at `path`, naming what is wrong with it if that fails.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    let path_buf = path.to_path_buf();
    let mut builder = Database::builder();
    builder.set_cache_size(CACHE_BYTES);
    builder.set_repair_callback(|session| {
        tracing::warn!(
            progress = session.progress(),
            "store: repairing after an unclean shutdown"
        );
    });
    // redb documents that opening a file damaged outside redb may panic rather than return
    // an error; the relay must instead say which file is bad.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.create(path)));
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            return Err(StoreError::InUse { path: path_buf })
        }
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)))) => {
            return Err(StoreError::Corrupt {
                path: path_buf,
                detail,
            })
        }
        // redb reports a wrong magic number as I/O "invalid data".
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            return Err(StoreError::Corrupt {
                path: path_buf,
                detail: e.to_string(),
            })
        }
        Ok(Err(source)) => {
            return Err(StoreError::Open {
                path: path_buf,
                source,
            })
        }
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("redb panicked while reading it");
            return Err(StoreError::Corrupt {
                path: path_buf,
                detail: detail.to_string(),
            });
        }
    };
    Ok(db)
}

fn decode_mailbox(key: &str, bytes: &[u8]) -> Result<MailboxRecord, StoreError> {
    let mut record: MailboxRecord =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Decode {
            what: "mailbox",
            key: key.to_string(),
            detail: e.to_string(),
        })?;
    record.address = key.to_string();
    Ok(record)
}

fn put_mailbox_in(
    txn: &WriteTransaction,
    record: &MailboxRecord,
    now: UnixMillis,
) -> Result<(), StoreError> {
    let key = mailbox_key(&record.address);
    let encoded = serde_json::to_vec(record).expect("a MailboxRecord always serialises");
    let mut mailboxes = txn.open_table(MAILBOXES)?;
    let old = mailboxes
        .insert(key.as_str(), encoded.as_slice())?
        .map(|v| v.value().to_vec());
    drop(mailboxes);
    let old_id = match old {
        Some(bytes) => decode_mailbox(&key, &bytes)?.subscription_id,
        None => None,
    };
    if old_id != record.subscription_id {
        let mut subs = txn.open_table(SUBSCRIPTIONS)?;
        if let Some(old_id) = &old_id {
            subs.insert(old_id.as_str(), (key.as_str(), Some(now)))?;
        }
        if let Some(new_id) = &record.subscription_id {
            subs.insert(new_id.as_str(), (key.as_str(), None))?;
        }
    }
    Ok(())
}

fn read_next_seq(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let meta = txn.open_table(META)?;
    let next = meta.get(META_NEXT_SEQ)?.map_or(1, |v| v.value());
    Ok(next)
}

fn write_next_seq(txn: &WriteTransaction, next: u64) -> Result<(), StoreError> {
    txn.open_table(META)?.insert(META_NEXT_SEQ, next)?;
    Ok(())
}

/// Append with `mailbox` already normalised, taking the sequence from `next`.
fn append_in(
    txn: &WriteTransaction,
    mailbox: &str,
    subscription_id: &str,
    body: &[u8],
    received_at: UnixMillis,
    next: &mut u64,
) -> Result<SpoolSeq, StoreError> {
    let seq = *next;
    *next += 1;
    txn.open_table(SPOOL_META)?
        .insert((mailbox, seq), (subscription_id, received_at, 0u32))?;
    txn.open_table(SPOOL_BODY)?.insert((mailbox, seq), body)?;
    let mut depth = txn.open_table(SPOOL_DEPTH)?;
    let (entries, bytes) = depth.get(mailbox)?.map_or((0, 0), |v| v.value());
    depth.insert(mailbox, (entries + 1, bytes + body.len() as u64))?;
    Ok(SpoolSeq(seq))
}

fn ack_in(txn: &WriteTransaction, mailbox: &str, seq: SpoolSeq) -> Result<bool, StoreError> {
    let removed = txn
        .open_table(SPOOL_META)?
        .remove((mailbox, seq.0))?
        .is_some();
    if !removed {
        return Ok(false);
    }
    let len = txn
        .open_table(SPOOL_BODY)?
        .remove((mailbox, seq.0))?
        .map_or(0, |v| v.value().len() as u64);
    let mut depth = txn.open_table(SPOOL_DEPTH)?;
    let (entries, bytes) = depth.get(mailbox)?.map_or((0, 0), |v| v.value());
    if entries <= 1 {
        depth.remove(mailbox)?;
    } else {
        depth.insert(mailbox, (entries - 1, bytes.saturating_sub(len)))?;
    }
    Ok(true)
}

fn record_attempt_in(
    txn: &WriteTransaction,
    mailbox: &str,
    seq: SpoolSeq,
) -> Result<Option<u32>, StoreError> {
    let mut meta = txn.open_table(SPOOL_META)?;
    let found = meta.get((mailbox, seq.0))?.map(|v| {
        let (id, at, attempts) = v.value();
        (id.to_string(), at, attempts)
    });
    let Some((id, at, attempts)) = found else {
        return Ok(None);
    };
    let attempts = attempts.saturating_add(1);
    meta.insert((mailbox, seq.0), (id.as_str(), at, attempts))?;
    Ok(Some(attempts))
}
