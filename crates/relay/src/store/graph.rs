//! Managed Graph mode's records: each configured resource's subscription, and every
//! subscription id the relay created with the `clientState` secret Graph echoes in its
//! notifications. Written before and after every Graph call that creates, renews or deletes, so
//! a relay restarted after `kill -9` knows every id it created, the secret of each, and which
//! ones still have to be deleted at Graph.
//!
//! | table | key | value |
//! |---|---|---|
//! | `graph_resources` | `&str` resource path | `&[u8]` JSON of [`GraphRecord`] (without the resource) |
//! | `graph_ids` | `&str` subscription id | `&[u8]` JSON of [`GraphId`] |
//!
//! The secrets sit in the store file as they are: `--state-dir` holds the relay's private state
//! (as the TLS key directory does) and must be readable by the relay alone.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, UnixMillis};

pub(super) const GRAPH_RESOURCES: TableDefinition<&str, &[u8]> =
    TableDefinition::new("graph_resources");
pub(super) const GRAPH_IDS: TableDefinition<&str, &[u8]> = TableDefinition::new("graph_ids");

/// Where a Graph resource's subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GraphState {
    /// A create is being made (or about to be).
    #[default]
    Creating,
    /// Subscribed; renewed before it expires.
    Active,
    /// Waiting before the next attempt (throttling, a transient error).
    BackingOff,
    /// A permanent error (insufficient privileges, no such resource) until the configuration
    /// changes; retried rarely.
    Failed,
}

/// What the store remembers about one configured Graph resource.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GraphRecord {
    /// The resource path; the key, so not repeated in the stored value.
    #[serde(skip)]
    pub resource: String,
    /// The current subscription id, once a create succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    /// When the current subscription expires (Graph's answer, not what was asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<UnixMillis>,
    /// Where the subscription stands.
    pub state: GraphState,
    /// The last error, for the admin API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the last notification (or lifecycle event) for it arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_notification: Option<UnixMillis>,
    /// The last lifecycle event and when it came.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_lifecycle: Option<(String, UnixMillis)>,
    /// When it was last renewed (or created).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<UnixMillis>,
    /// The receiver was told to resynchronise (`missed`) and has not yet taken the signal.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resync_pending: bool,
    /// The secret of a create in flight, written before the call: a subscription Graph created
    /// while the relay died before storing its id is recognised by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_client_state: Option<String>,
    /// Secrets of creates a stop interrupted (the newest last, a few at most): Graph may have
    /// made those subscriptions without the relay learning their ids. A notification carrying
    /// one identifies such an orphan, which is then deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphan_client_states: Vec<String>,
}

impl GraphRecord {
    /// A new record for `resource`, in state `Creating`.
    pub fn new(resource: &str) -> Self {
        Self {
            resource: resource.to_owned(),
            ..Self::default()
        }
    }
}

/// One subscription id the relay created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphId {
    /// The resource it was created for.
    pub resource: String,
    /// The `clientState` it was created with.
    pub client_state: String,
    /// `None` while it is the resource's current subscription; when it was replaced or its
    /// resource removed from the configuration otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<UnixMillis>,
    /// A retired id Graph no longer has (deleted by the relay, or gone by itself): nothing is
    /// left to clean up, and it is forgotten after a while.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
}

fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Decode {
        what,
        key: key.to_string(),
        detail: e.to_string(),
    })
}

impl Store {
    /// Store a resource's record.
    pub fn put_graph(&self, record: &GraphRecord) -> Result<(), StoreError> {
        let encoded = serde_json::to_vec(record).expect("a GraphRecord always serialises");
        self.write(|txn| {
            txn.open_table(GRAPH_RESOURCES)?
                .insert(record.resource.as_str(), encoded.as_slice())?;
            Ok(())
        })
    }

    /// Store a resource's record and a subscription id of it, in one transaction: a new id is
    /// never known without its resource's record saying so, nor the other way round.
    pub fn put_graph_with_id(
        &self,
        record: &GraphRecord,
        id: &str,
        entry: &GraphId,
    ) -> Result<(), StoreError> {
        let encoded = serde_json::to_vec(record).expect("a GraphRecord always serialises");
        let entry = serde_json::to_vec(entry).expect("a GraphId always serialises");
        self.write(|txn| {
            txn.open_table(GRAPH_RESOURCES)?
                .insert(record.resource.as_str(), encoded.as_slice())?;
            txn.open_table(GRAPH_IDS)?.insert(id, entry.as_slice())?;
            Ok(())
        })
    }

    /// Every resource record, ordered by resource.
    pub fn graph_records(&self) -> Result<Vec<GraphRecord>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(GRAPH_RESOURCES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let mut r: GraphRecord = decode("graph resource", k.value(), v.value())?;
            r.resource = k.value().to_string();
            out.push(r);
        }
        Ok(out)
    }

    /// Forget a resource's record (its ids stay, to be deleted at Graph and then forgotten).
    pub fn remove_graph(&self, resource: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(GRAPH_RESOURCES)?.remove(resource)?;
            Ok(())
        })
    }

    /// Store one subscription id's entry.
    pub fn put_graph_id(&self, id: &str, entry: &GraphId) -> Result<(), StoreError> {
        let entry = serde_json::to_vec(entry).expect("a GraphId always serialises");
        self.write(|txn| {
            txn.open_table(GRAPH_IDS)?.insert(id, entry.as_slice())?;
            Ok(())
        })
    }

    /// Every subscription id the relay created and still remembers.
    pub fn graph_ids(&self) -> Result<Vec<(String, GraphId)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(GRAPH_IDS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((
                k.value().to_string(),
                decode("graph subscription id", k.value(), v.value())?,
            ));
        }
        Ok(out)
    }

    /// Forget ids that are gone at Graph and were retired before `cutoff`; returns how many.
    pub fn prune_graph_ids(&self, cutoff: UnixMillis) -> Result<u64, StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(GRAPH_IDS)?;
            let mut old = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                let e: GraphId = decode("graph subscription id", k.value(), v.value())?;
                if e.gone && e.retired_at.is_some_and(|at| at < cutoff) {
                    old.push(k.value().to_string());
                }
            }
            for k in &old {
                table.remove(k.as_str())?;
            }
            Ok(old.len() as u64)
        })
    }
}
