//! The SQL store: current resources, every version ever written, the change outbox and the
//! command inbox, on PostgreSQL or SQLite (sqlx, runtime queries, migrations run at open).
//!
//! Invariants every implementation keeps:
//! - a resource body is stored and returned byte-for-byte as given;
//! - a versionId is used at most once per resource, a delete leaves a tombstone, so ids are never reused;
//! - every committed write to `resources` (by the bridge or by any other SQL client, through the
//!   triggers of the migrations) adds exactly one row to the change outbox in the same transaction;
//! - [`Store::pending_changes`] returns outbox rows in an order consistent with commit order per
//!   resource, one transaction's changes together in the order they were written;
//! - [`Store::claim_batches`] cuts the outbox into batches in that order and records them, so a batch
//!   is published again unchanged until confirmed; a row leaves the outbox only when a later claim
//!   names its batch in [`Claim::completed`], after its event was confirmed.
//!
//! Plan rules live in [`crate::plan`]; a store offers the primitives it needs inside a [`StoreTx`].

mod postgres;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::contracts::ChangeType;

/// A resource's identity: its type and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub resource_type: String,
    pub resource_id: String,
}

impl ResourceKey {
    pub fn new(resource_type: impl Into<String>, resource_id: impl Into<String>) -> Self {
        ResourceKey { resource_type: resource_type.into(), resource_id: resource_id.into() }
    }
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.resource_type, self.resource_id)
    }
}

/// The current version of a live resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub version_id: String,
    pub body: String,
}

/// A version to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVersion {
    pub key: ResourceKey,
    pub version_id: String,
    pub last_updated: String,
    pub body: String,
}

/// One write of a plan, applied in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Insert a resource that has no live version. A concurrent insert of the same resource makes the
    /// transaction fail with [`StoreError::Conflict`], never overwrite.
    Insert(NewVersion),
    /// Replace the current version of a resource this transaction has locked.
    Update(NewVersion),
    /// Remove the live resource, leaving a tombstone.
    Delete(ResourceKey),
}

/// What [`StoreTx::read_state`] found, in the order asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanState {
    pub answers: Vec<Option<String>>,
    pub current: Vec<Option<Current>>,
    pub used: Vec<bool>,
}

/// A processed command and its response, for the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxEntry<'a> {
    pub message_id: Uuid,
    pub message_type: &'a str,
    pub response: &'a str,
}

/// What a retrieve asks for: the current version, or one version by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub key: ResourceKey,
    pub version_id: Option<String>,
}

/// The answer to one [`Lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The body as stored.
    Resource(String),
    /// The resource never existed, or (for a current-version lookup) is deleted.
    NoResource,
    /// The resource exists or existed, but never had that version.
    NoVersion,
}

/// A committed change waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChange {
    /// Position in the store's version log; unique and stable.
    pub seq: i64,
    /// The writing transaction (PostgreSQL); rows of one transaction are returned together.
    pub txid: i64,
    pub key: ResourceKey,
    /// The version written, or for a delete the version it removed.
    pub version_id: String,
    pub change_type: ChangeType,
    /// The body after the change; `None` for a delete.
    pub body: Option<String>,
    pub recorded_at: DateTime<Utc>,
}

/// Outbox rows claimed for one event message. Until a claim completes it ([`Claim::completed`]), the same
/// batch (same id, same changes, same order) is returned again by [`Store::claim_batches`], so a
/// message published twice is the very same message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBatch {
    pub id: i64,
    pub changes: Vec<PendingChange>,
}

impl ChangeBatch {
    /// The ids of `batches` and the log positions of all their changes: what completing them deletes.
    pub(crate) fn ids_and_seqs(batches: &[ChangeBatch]) -> (Vec<i64>, Vec<i64>) {
        let ids = batches.iter().map(|b| b.id).collect();
        let seqs = batches.iter().flat_map(|b| b.changes.iter().map(|c| c.seq)).collect();
        (ids, seqs)
    }
}

/// What the publisher asks of [`Store::claim_batches`].
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// Batches the broker confirmed since the last claim, completed in the claim's transaction.
    pub completed: &'a [ChangeBatch],
    /// The highest batch id the caller is still publishing (its batches are not returned again, and
    /// do not keep new ones from being cut); `None` when it holds none, as after a restart.
    pub publishing_through: Option<i64>,
    pub batch_size: usize,
    pub max_batches: usize,
    /// Whether the changes carry their bodies: full events need them; light events, and changes
    /// recorded but not published, do not (their [`PendingChange::body`] is then `None`).
    pub bodies: bool,
}

impl Claim<'_> {
    /// A claim that completes nothing and holds nothing, with the bodies.
    pub fn fresh(batch_size: usize, max_batches: usize) -> Claim<'static> {
        Claim { completed: &[], publishing_through: None, batch_size, max_batches, bodies: true }
    }
}

/// What [`Store::drain_changes`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drained {
    pub changes: u64,
    /// The highest log position removed; `None` when the outbox was empty.
    pub last_seq: Option<i64>,
}

/// The state of the outbox, for lag reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxState {
    /// Committed changes not yet published.
    pub pending: u64,
    /// When the oldest of them was recorded.
    pub oldest: Option<DateTime<Utc>>,
}

/// Leadership of the change publisher among the processes sharing a store. Dropping it gives the
/// leadership up (at once on PostgreSQL, when the lease expires on SQLite).
#[async_trait]
pub trait PublisherLease: Send {
    /// Whether this process still leads; renews a time-bound lease. `false` or an error: stop publishing.
    async fn confirm(&mut self) -> Result<bool, StoreError>;
    /// Gives the leadership up now.
    async fn release(self: Box<Self>);
}

/// Errors of the store, classified by what the caller should do about them.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached (connection refused, pool timed out, disk unavailable). Retry later;
    /// nothing was committed.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The transaction lost a race (deadlock, serialization failure, a concurrent insert of the same key,
    /// SQLite busy). Running it again will succeed or fail on the rules.
    #[error("the transaction conflicted with another and was rolled back: {0}")]
    Conflict(String),
    /// The database refused this data (a value it cannot store). Running it again will not help.
    #[error("the database refused the data: {0}")]
    Rejected(String),
    /// The store URL is not one we can open.
    #[error("invalid store URL: {0}")]
    InvalidUrl(String),
    /// Creating or upgrading the schema failed.
    #[error("migrating the database failed: {0}")]
    Migration(String),
    /// Anything else the database said.
    #[error("database error: {0}")]
    Database(String),
}

impl StoreError {
    /// Whether running the same transaction again may succeed.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }

    /// Whether the database itself is unreachable (the caller should wait and redeliver).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Classifies a sqlx error. SQLSTATE classes: 40 (deadlock, serialization) and 23505 (a concurrent
/// insert of the same key) are conflicts; 08 and 57P (connection, shutdown) unavailability; 22 and 23
/// (data and constraint) rejections. SQLite's BUSY/LOCKED are conflicts, its FULL/IOERR/READONLY
/// unavailability.
pub(crate) fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let text = db.message().to_owned();
            if code.starts_with("40") || code == "23505" {
                StoreError::Conflict(text)
            } else if code.starts_with("08") || code.starts_with("57P") || code == "53300" {
                StoreError::Unavailable(text)
            } else if code.starts_with("22") || code.starts_with("23") {
                StoreError::Rejected(text)
            } else {
                // SQLite extended result codes: the primary code is the low byte.
                match code.parse::<i32>().map(|c| c & 0xff) {
                    Ok(5 | 6) => StoreError::Conflict(text),
                    Ok(8 | 10 | 13 | 14) => StoreError::Unavailable(text),
                    Ok(19 | 20 | 25) => StoreError::Rejected(text),
                    _ => StoreError::Database(format!("{text} (code {code})")),
                }
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Database(e.to_string()),
    }
}

/// An open transaction. Dropping it without [`StoreTx::commit`] rolls it back.
#[async_trait]
pub trait StoreTx: Send {
    /// What the rules need to decide plans, read in one step: for each command messageId, the
    /// response stored for it if that command was already processed; the current version of each
    /// key (`None` when absent or deleted), locking the rows that exist until the transaction ends;
    /// and for each (key, versionId) whether that version was ever written. Each in the order given.
    async fn read_state(
        &mut self,
        message_ids: &[Uuid],
        keys: &[ResourceKey],
        versions: &[(ResourceKey, String)],
    ) -> Result<PlanState, StoreError>;
    /// Applies the writes in order (their changes are recorded in that order) and records the
    /// processed commands' responses (distinct messageIds).
    async fn write(&mut self, writes: &[Write], answers: &[InboxEntry<'_>]) -> Result<(), StoreError>;
    /// Starts a savepoint (one per plan in a group commit).
    async fn savepoint(&mut self) -> Result<(), StoreError>;
    /// Undoes everything since the savepoint, which stays open.
    async fn rollback_to_savepoint(&mut self) -> Result<(), StoreError>;
    /// Ends the savepoint, keeping its effects.
    async fn release_savepoint(&mut self) -> Result<(), StoreError>;
    /// Commits; only after this returns is the effect durable.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// A store on one database.
#[async_trait]
pub trait Store: Send + Sync {
    /// `postgres` or `sqlite`.
    fn kind(&self) -> &'static str;
    /// Starts a write transaction.
    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError>;
    /// The response stored for a processed command, read outside any transaction.
    async fn inbox_response(&self, message_id: Uuid) -> Result<Option<String>, StoreError>;
    /// Answers lookups, in order.
    async fn read(&self, lookups: &[Lookup]) -> Result<Vec<Found>, StoreError>;
    /// Up to `limit` unpublished changes, in publishing order (see the module invariants).
    async fn pending_changes(&self, limit: usize) -> Result<Vec<PendingChange>, StoreError>;
    /// In one transaction: removes the confirmed batches `claim.completed` and their outbox rows, then
    /// returns the batches to publish next, in publishing order: the batches claimed earlier, not
    /// completed and not in the caller's hands (ids above `claim.publishing_through`) if there are any;
    /// otherwise up to `max_batches` new batches of at most `batch_size` changes cut from the outbox
    /// rows no batch holds, in publishing order, recorded before they are returned.
    async fn claim_batches(&self, claim: Claim<'_>) -> Result<Vec<ChangeBatch>, StoreError>;
    /// Removes up to `limit` outbox rows, lowest `seq` first, and every open batch, in one transaction,
    /// publishing nothing: what the publisher does when both event kinds are off (the changes stay in
    /// the version log).
    async fn drain_changes(&self, limit: usize) -> Result<Drained, StoreError>;
    /// How many changes wait and since when.
    async fn outbox_state(&self) -> Result<OutboxState, StoreError>;
    /// Tries to become the one publisher of this store; `None` when another process leads.
    /// `holder` names this process in the lease (SQLite).
    async fn try_lead(&self, holder: &str) -> Result<Option<Box<dyn PublisherLease>>, StoreError>;
    /// Wakes `waker` whenever another writer commits changes, if the database can say so (PostgreSQL
    /// `LISTEN`); stores that cannot rely on the publisher's polling. Runs until the store is closed.
    fn watch_changes(&self, waker: Arc<tokio::sync::Notify>);
    /// Tells the publisher of another process that this one committed changes (PostgreSQL `NOTIFY`;
    /// nothing on SQLite, where the leader's polling finds them).
    async fn announce_changes(&self) -> Result<(), StoreError>;
    /// Every version ever recorded, in `seq` order (tests and tools; not for large stores).
    async fn version_log(&self) -> Result<Vec<PendingChange>, StoreError>;
    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Closes the connections.
    async fn close(&self);
}

/// Opens the store named by a sqlx URL (`sqlite://PATH`, `sqlite::memory:`, `postgres://…`) and
/// brings its schema up to date.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let scheme = url.split(':').next().unwrap_or_default().to_ascii_lowercase();
    match scheme.as_str() {
        "sqlite" => Ok(Arc::new(SqliteStore::open(url).await?)),
        "postgres" | "postgresql" => Ok(Arc::new(PostgresStore::open(url).await?)),
        _ => Err(StoreError::InvalidUrl(format!(
            "`{scheme}:` is not a supported database; use sqlite://PATH or postgres://USER@HOST/DB"
        ))),
    }
}

/// Rebuilds claimed batches, in claim order, from their recorded seqs and the version rows read back.
pub(crate) fn reassemble(
    claimed: Vec<(i64, Vec<i64>)>,
    rows: Vec<PendingChange>,
) -> Result<Vec<ChangeBatch>, StoreError> {
    let mut by_seq: std::collections::HashMap<i64, PendingChange> = rows.into_iter().map(|c| (c.seq, c)).collect();
    claimed
        .into_iter()
        .map(|(id, seqs)| {
            let changes = seqs
                .iter()
                .map(|seq| {
                    by_seq.remove(seq).ok_or_else(|| {
                        StoreError::Database(format!("publish batch {id} names change {seq}, which is not in the log"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ChangeBatch { id, changes })
        })
        .collect()
}

/// Parses a change type as stored in the `change_type` column.
pub(crate) fn change_type(text: &str) -> Result<ChangeType, StoreError> {
    ChangeType::parse(text)
        .ok_or_else(|| StoreError::Database(format!("unknown change_type `{text}` in resource_versions")))
}
