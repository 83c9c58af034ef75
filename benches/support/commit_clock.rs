//! A store decorator for the event benchmark: it notes when each transaction's commit returned, and
//! which versions that transaction wrote, so that latency is measured from the moment a change became
//! durable and visible (commit) rather than from when its row was written (`recorded_at`), which in a
//! transaction comes earlier by the rest of the transaction's work and the commit's flush.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fhir_pubsub::store::{
    ChangeBatch, Claim, Drained, Found, InboxEntry, Lookup, OutboxState, PendingChange, PlanState, PublisherLease,
    ResourceKey, Store, StoreError, StoreTx, Write,
};
use uuid::Uuid;

/// Commit times by `Type/id|version`.
pub type CommitTimes = Arc<Mutex<HashMap<String, DateTime<Utc>>>>;

pub struct CommitClock {
    inner: Arc<dyn Store>,
    times: CommitTimes,
}

impl CommitClock {
    pub fn wrap(inner: Arc<dyn Store>) -> (Arc<dyn Store>, CommitTimes) {
        let times = CommitTimes::default();
        (Arc::new(CommitClock { inner, times: times.clone() }), times)
    }
}

struct ClockedTx {
    inner: Box<dyn StoreTx>,
    written: Vec<String>,
    times: CommitTimes,
}

#[async_trait]
impl StoreTx for ClockedTx {
    async fn read_state(
        &mut self,
        message_ids: &[Uuid],
        keys: &[ResourceKey],
        versions: &[(ResourceKey, String)],
    ) -> Result<PlanState, StoreError> {
        self.inner.read_state(message_ids, keys, versions).await
    }
    async fn write(&mut self, writes: &[Write], answers: &[InboxEntry<'_>]) -> Result<(), StoreError> {
        self.inner.write(writes, answers).await?;
        for write in writes {
            if let Write::Insert(v) | Write::Update(v) = write {
                self.written.push(format!("{}|{}", v.key, v.version_id));
            }
        }
        Ok(())
    }
    async fn savepoint(&mut self) -> Result<(), StoreError> {
        self.inner.savepoint().await
    }
    async fn rollback_to_savepoint(&mut self) -> Result<(), StoreError> {
        // The benchmark's plans do not fail; were one undone, its versions would simply never be
        // published, and so never measured.
        self.inner.rollback_to_savepoint().await
    }
    async fn release_savepoint(&mut self) -> Result<(), StoreError> {
        self.inner.release_savepoint().await
    }
    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let ClockedTx { inner, written, times } = *self;
        inner.commit().await?;
        let now = Utc::now();
        let mut times = times.lock().unwrap_or_else(PoisonError::into_inner);
        for key in written {
            times.insert(key, now);
        }
        Ok(())
    }
}

#[async_trait]
impl Store for CommitClock {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        let inner = self.inner.begin().await?;
        Ok(Box::new(ClockedTx { inner, written: Vec::new(), times: self.times.clone() }))
    }
    async fn inbox_response(&self, message_id: Uuid) -> Result<Option<String>, StoreError> {
        self.inner.inbox_response(message_id).await
    }
    async fn read(&self, lookups: &[Lookup]) -> Result<Vec<Found>, StoreError> {
        self.inner.read(lookups).await
    }
    async fn pending_changes(&self, limit: usize) -> Result<Vec<PendingChange>, StoreError> {
        self.inner.pending_changes(limit).await
    }
    async fn claim_batches(&self, claim: Claim<'_>) -> Result<Vec<ChangeBatch>, StoreError> {
        self.inner.claim_batches(claim).await
    }
    async fn drain_changes(&self, limit: usize) -> Result<Drained, StoreError> {
        self.inner.drain_changes(limit).await
    }
    async fn outbox_state(&self) -> Result<OutboxState, StoreError> {
        self.inner.outbox_state().await
    }
    async fn try_lead(&self, holder: &str) -> Result<Option<Box<dyn PublisherLease>>, StoreError> {
        self.inner.try_lead(holder).await
    }
    fn watch_changes(&self, waker: Arc<tokio::sync::Notify>) {
        self.inner.watch_changes(waker)
    }
    async fn announce_changes(&self) -> Result<(), StoreError> {
        self.inner.announce_changes().await
    }
    async fn version_log(&self) -> Result<Vec<PendingChange>, StoreError> {
        self.inner.version_log().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}
