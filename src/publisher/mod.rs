//! The change publisher: every committed change goes out as `ResourcesChangedEvent` and/or
//! `ResourcesChangedLightEvent`, at least once, in commit order per resource.
//!
//! Invariants:
//! - a change leaves the store's outbox only after the broker confirmed every event message carrying it
//!   (a batch is named in the next claim's `completed` only after [`Transport::publish`] returned), so a crash at any moment
//!   loses nothing; it may publish the same batch again, with the same messageId ([`events`]);
//! - only the process holding the store's publisher lease publishes ([`Store::try_lead`]); the others
//!   wait and take over when the leader's lease ends;
//! - batches are published one after the other, in the order the store cut them, never more than
//!   `MaxPublishBatchSize` changes per message.
//!
//! Figures: [`PublisherStats`] (cursor, lag, counts) for `/status` and readiness, the
//! [`crate::observe::metrics`], and one [`EndpointStats`] per event type on the status board.
//!
//! Latency: the bridge wakes the publisher after each commit ([`Publisher::waker`]); PostgreSQL's
//! `NOTIFY` wakes it for other writers; `PollingIntervalSeconds` bounds the delay otherwise.

pub mod events;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::config::ResourceChangeNotificationSettings;
use crate::contracts::MessageType;
use crate::observe::metrics as m;
use crate::observe::{EndpointStats, StatusBoard};
use crate::store::{ChangeBatch, Claim, PendingChange, PublisherLease, ResourceKey, Store, StoreError};
use crate::transport::{Transport, TransportError};

/// Batches claimed at once, at least: more amortise the outbox read, fewer keep repeats after a crash small.
const BATCHES_PER_CLAIM: usize = 16;
/// Changes claimed at once, at most, when batches are small (a backlog drains in few outbox reads).
const CHANGES_PER_CLAIM: usize = 50_000;
/// Batches claimed at once, at most (each is a row written before publishing).
const MAX_BATCHES_PER_CLAIM: usize = 256;
/// A round whose claim came back short of full starts the next one no sooner than this after its
/// own start. Under a steady stream of small commits a round would otherwise follow the last at
/// once, each claim cutting a handful of changes at the cost of a whole claim (measured: with 5 ms
/// the claims took a third of PostgreSQL's time at 1,800 commands/s; with 20 ms the bridge carried
/// 2,700/s); a backlog (full claims) drains without pause. Adds at most this much to an event's latency.
const MIN_ROUND: Duration = Duration::from_millis(20);
/// With both event kinds off, how often the outbox is drained: rarely, in bulk, since nobody waits for it.
const DRAIN_EVERY: Duration = Duration::from_secs(1);
/// How often a process that does not lead tries to take over.
const LEAD_RETRY: Duration = Duration::from_secs(1);
/// How often the outbox's size and age are read for the lag figures.
const LAG_CHECK: Duration = Duration::from_secs(1);
/// At most one lag warning this often.
const LAG_WARNING_EVERY: Duration = Duration::from_secs(30);

/// The environment variable that pauses the publisher once at a named point, for crash testing:
/// `before-publish` (batches claimed, nothing sent), `mid-batch` (the first message of a claim
/// confirmed, the rest not sent), `after-publish` (all confirmed, the outbox not yet updated). The
/// process then waits to be killed; it logs `publisher paused for fault injection` when it gets there.
pub const FAULT_PAUSE_ENV: &str = "FHIR_PUBSUB_FAULT_PAUSE";

/// A point where [`FAULT_PAUSE_ENV`] can hold the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PausePoint {
    BeforePublish,
    MidBatch,
    AfterPublish,
}

impl PausePoint {
    /// Reads [`FAULT_PAUSE_ENV`]; unknown values are ignored with a warning.
    pub fn from_env() -> Option<PausePoint> {
        let value = std::env::var(FAULT_PAUSE_ENV).ok()?;
        match value.trim() {
            "before-publish" => Some(PausePoint::BeforePublish),
            "mid-batch" => Some(PausePoint::MidBatch),
            "after-publish" => Some(PausePoint::AfterPublish),
            other => {
                tracing::warn!(
                    value = other,
                    "{FAULT_PAUSE_ENV} is not before-publish, mid-batch or after-publish; ignored"
                );
                None
            }
        }
    }
}

/// Figures of the publisher, for logs, `/status` and metrics.
#[derive(Debug, Default)]
pub struct PublisherStats {
    /// Whether this process publishes now.
    pub leading: AtomicBool,
    /// Event messages confirmed by the broker.
    pub messages_published: AtomicU64,
    /// Changes whose events were all confirmed (filtered-out changes, and with events off drained ones, included).
    pub changes_published: AtomicU64,
    /// The highest log position published so far (0 before the first).
    pub last_seq: AtomicI64,
    /// Publish attempts that failed (and were retried).
    pub failures: AtomicU64,
    /// Changes waiting, at the last check.
    pub pending: AtomicU64,
    /// Age of the oldest waiting change in milliseconds, at the last check (0 when none waits).
    pub lag_millis: AtomicU64,
}

/// Why leading ended.
enum LeadEnd {
    /// Shutdown was asked and the outbox is empty (or the store/broker is down at shutdown).
    Stopped,
    /// The lease is gone or cannot be confirmed.
    Lost(String),
}

/// A publish attempt that failed; the batches stay claimed and are published again.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot serialise an event: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Publishes the store's committed changes through a transport.
pub struct Publisher {
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    settings: ResourceChangeNotificationSettings,
    waker: Arc<Notify>,
    holder: String,
    stats: Arc<PublisherStats>,
    /// The figures of each event type's destination: full events, light events.
    full_stats: Arc<EndpointStats>,
    light_stats: Arc<EndpointStats>,
    /// A one-shot pause for crash tests ([`FAULT_PAUSE_ENV`]).
    pause_at: std::sync::Mutex<Option<PausePoint>>,
}

impl Publisher {
    pub fn new(
        store: Arc<dyn Store>,
        transport: Arc<dyn Transport>,
        settings: ResourceChangeNotificationSettings,
    ) -> Self {
        let holder = format!("pid {} ({})", std::process::id(), crate::envelope::ids::new_id());
        Publisher {
            store,
            transport,
            settings,
            waker: Arc::new(Notify::new()),
            holder,
            stats: Arc::default(),
            full_stats: Arc::default(),
            light_stats: Arc::default(),
            pause_at: std::sync::Mutex::new(None),
        }
    }

    /// Reports the figures of each event type this publisher sends on `board`.
    pub fn with_status_board(mut self, board: &StatusBoard) -> Self {
        if self.settings.send_full_events {
            self.full_stats = board.destination(MessageType::ResourcesChangedEvent.as_str());
        }
        if self.settings.send_light_events {
            self.light_stats = board.destination(MessageType::ResourcesChangedLightEvent.as_str());
        }
        self
    }

    /// Pauses the publisher for good the first time it reaches `point` (crash tests only).
    pub fn with_fault_pause(self, point: Option<PausePoint>) -> Self {
        *self.pause_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = point;
        self
    }

    async fn maybe_pause(&self, here: PausePoint) {
        let paused = {
            let mut pause = self.pause_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if *pause == Some(here) { pause.take().is_some() } else { false }
        };
        if paused {
            tracing::warn!(point = ?here, "publisher paused for fault injection");
            std::future::pending::<()>().await;
        }
    }

    /// Notify this after a commit that recorded changes: the publisher looks at once.
    pub fn waker(&self) -> Arc<Notify> {
        self.waker.clone()
    }

    pub fn stats(&self) -> Arc<PublisherStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` turns true; then, if leading, publishes what the outbox holds and
    /// returns (the caller bounds how long it waits for that).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if !self.settings.send_full_events && !self.settings.send_light_events {
            tracing::info!(
                "change events are off (SendFullEvents and SendLightEvents are false): changes are recorded, not published"
            );
        }
        self.store.watch_changes(self.waker.clone());
        loop {
            if *shutdown.borrow() {
                return;
            }
            let lease = match self.store.try_lead(&self.holder).await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    tracing::debug!("another process publishes the change events");
                    self.follow(&mut shutdown).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take the publisher lease; trying again");
                    wait(&mut shutdown, &self.waker, LEAD_RETRY, false).await;
                    continue;
                }
            };
            tracing::info!("this process publishes the change events");
            self.stats.leading.store(true, Ordering::Relaxed);
            metrics::gauge!(m::PUBLISHER_LEADING).set(1.0);
            let end = self.lead(lease, &mut shutdown).await;
            self.stats.leading.store(false, Ordering::Relaxed);
            metrics::gauge!(m::PUBLISHER_LEADING).set(0.0);
            match end {
                LeadEnd::Stopped => return,
                LeadEnd::Lost(why) => {
                    tracing::warn!(reason = %why, "no longer the publisher of change events; trying to take over again")
                }
            }
        }
    }

    /// While another process leads: passes this process's commits on to it (the bridge's own commits
    /// do not NOTIFY), until it is time to try to lead again.
    async fn follow(&self, shutdown: &mut watch::Receiver<bool>) {
        let retry_at = tokio::time::Instant::now() + LEAD_RETRY;
        loop {
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(retry_at) => return,
                _ = self.waker.notified() => {
                    if let Err(e) = self.store.announce_changes().await {
                        tracing::debug!(error = %e, "cannot announce changes to the leading publisher");
                    }
                }
                Ok(()) = shutdown.changed() => {}
            }
        }
    }

    /// Publishes while this process leads. Each round does three things at once: confirms the lease
    /// (on its own connection), publishes the batches in hand in order, and claims the next batches
    /// (completing, in the same transaction, those the broker confirmed in the previous round). So a
    /// round lasts as long as the slower of the claim and the broker's confirmations, and a batch is
    /// published only after every batch before it was confirmed.
    async fn lead(&self, mut lease: Box<dyn PublisherLease>, shutdown: &mut watch::Receiver<bool>) -> LeadEnd {
        if !self.settings.send_full_events && !self.settings.send_light_events {
            return self.drain_unpublished(lease, shutdown).await;
        }
        let batch_size = self.settings.max_publish_batch_size.max(1) as usize;
        let max_batches = (CHANGES_PER_CLAIM / batch_size).clamp(BATCHES_PER_CLAIM, MAX_BATCHES_PER_CLAIM);
        let mut lag = LagWatch::default();
        let mut backoff = Duration::from_millis(100);
        // Confirmed by the broker, completed by the next claim.
        let mut confirmed: Vec<ChangeBatch> = Vec::new();
        // Claimed, to be published in this order.
        let mut in_hand: Vec<ChangeBatch> = Vec::new();
        loop {
            let round_started = tokio::time::Instant::now();
            let stopping = *shutdown.borrow();
            let claim = Claim {
                completed: &confirmed,
                publishing_through: in_hand.last().map(|b| b.id),
                batch_size,
                max_batches,
                bodies: self.settings.send_full_events,
            };
            let (lease_held, claimed, published) =
                tokio::join!(lease.confirm(), self.store.claim_batches(claim), self.publish_in_order(&in_hand));
            // Whatever the lease says, the broker confirmed these: they are completed by the next claim,
            // ours or the next leader's (which publishes every open batch again, unchanged).
            let (sent, publish_failure) = published;
            let newly_confirmed: Vec<ChangeBatch> = in_hand.drain(..sent).collect();
            match lease_held {
                Ok(true) => {}
                Ok(false) => return LeadEnd::Lost("another process holds the publisher lease".into()),
                Err(e) => return LeadEnd::Lost(e.to_string()),
            }
            let mut claim_full = false;
            let claim_failure = match claimed {
                Ok(batches) => {
                    claim_full = batches.iter().map(|b| b.changes.len()).sum::<usize>() >= batch_size * max_batches;
                    self.count_completed(&confirmed);
                    confirmed.clear();
                    // Batches left unconfirmed by a failed publish go out again first.
                    in_hand.extend(batches);
                    None
                }
                Err(e) => Some(PublishError::from(e)),
            };
            confirmed.extend(newly_confirmed);
            match publish_failure.or(claim_failure) {
                None => {
                    backoff = Duration::from_millis(100);
                    self.check_lag(&mut lag).await;
                    if in_hand.is_empty() && confirmed.is_empty() {
                        if stopping {
                            lease.release().await;
                            return LeadEnd::Stopped;
                        }
                        let poll = Duration::from_secs(self.settings.polling_interval_seconds.max(1));
                        wait(shutdown, &self.waker, poll, true).await;
                    } else if !claim_full && !stopping {
                        tokio::time::sleep_until(round_started + MIN_ROUND).await;
                    }
                }
                Some(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::PUBLISH_FAILURES).increment(1);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "publishing change events failed");
                    if stopping {
                        tracing::warn!("shutting down with changes not yet published; they go out after the restart");
                        lease.release().await;
                        return LeadEnd::Stopped;
                    }
                    self.check_lag(&mut lag).await;
                    wait(shutdown, &Notify::new(), backoff, false).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// While this process leads with both event kinds off: empties the outbox in bulk every
    /// [`DRAIN_EVERY`] (and once more at shutdown) instead of cutting batches that carry no message.
    /// The changes stay in the version log; turning events on later publishes the changes from then on.
    async fn drain_unpublished(
        &self,
        mut lease: Box<dyn PublisherLease>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> LeadEnd {
        let mut lag = LagWatch::default();
        let mut backoff = Duration::from_millis(100);
        loop {
            let stopping = *shutdown.borrow();
            let (lease_held, drained) = tokio::join!(lease.confirm(), self.store.drain_changes(CHANGES_PER_CLAIM));
            match lease_held {
                Ok(true) => {}
                Ok(false) => return LeadEnd::Lost("another process holds the publisher lease".into()),
                Err(e) => return LeadEnd::Lost(e.to_string()),
            }
            match drained {
                Ok(drained) => {
                    backoff = Duration::from_millis(100);
                    self.count_published(drained.changes, drained.last_seq);
                    self.check_lag(&mut lag).await;
                    if drained.changes as usize >= CHANGES_PER_CLAIM {
                        continue;
                    }
                    if stopping {
                        lease.release().await;
                        return LeadEnd::Stopped;
                    }
                    wait(shutdown, &Notify::new(), DRAIN_EVERY, false).await;
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::PUBLISH_FAILURES).increment(1);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "draining the outbox failed");
                    if stopping {
                        lease.release().await;
                        return LeadEnd::Stopped;
                    }
                    wait(shutdown, &Notify::new(), backoff, false).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Publishes batches in order, each only after the broker confirmed the one before. Returns how
    /// many were confirmed, and why the next one was not.
    async fn publish_in_order(&self, batches: &[ChangeBatch]) -> (usize, Option<PublishError>) {
        if batches.is_empty() {
            return (0, None);
        }
        self.maybe_pause(PausePoint::BeforePublish).await;
        for (sent, batch) in batches.iter().enumerate() {
            if sent > 0 {
                self.maybe_pause(PausePoint::MidBatch).await;
            }
            if let Err(e) = self.publish_batch(batch).await {
                return (sent, Some(e));
            }
        }
        // Confirmed, not yet completed: a crash here publishes these batches again, unchanged.
        self.maybe_pause(PausePoint::AfterPublish).await;
        (batches.len(), None)
    }

    /// Counts batches whose completion was recorded.
    fn count_completed(&self, completed: &[ChangeBatch]) {
        let changes: usize = completed.iter().map(|b| b.changes.len()).sum();
        let last = completed.iter().flat_map(|b| b.changes.iter().map(|c| c.seq)).max();
        self.count_published(changes as u64, last);
        if changes > 0 {
            tracing::debug!(batches = completed.len(), changes, "change events published");
        }
    }

    /// Counts changes that left the outbox, up to log position `last`.
    fn count_published(&self, changes: u64, last: Option<i64>) {
        if changes == 0 {
            return;
        }
        self.stats.changes_published.fetch_add(changes, Ordering::Relaxed);
        metrics::counter!(m::CHANGES_PUBLISHED).increment(changes);
        if let Some(last) = last {
            self.stats.last_seq.fetch_max(last, Ordering::Relaxed);
        }
    }

    async fn publish_batch(&self, batch: &ChangeBatch) -> Result<(), PublishError> {
        let changes: Vec<&PendingChange> =
            batch.changes.iter().filter(|c| self.settings.publishes(&c.key.resource_type)).collect();
        if changes.is_empty() {
            return Ok(());
        }
        let source = self.transport.input_address();
        if self.transport.events_keyed_by_resource() {
            return self.publish_per_resource(&changes, &source).await;
        }
        if self.settings.send_full_events {
            let message = events::full_event(&changes);
            let outgoing = events::outgoing(MessageType::ResourcesChangedEvent, &message, &changes, &source)?;
            self.publish_counted(MessageType::ResourcesChangedEvent, outgoing, &self.full_stats).await?;
        }
        if self.settings.send_light_events {
            let message = events::light_event(&changes);
            let outgoing = events::outgoing(MessageType::ResourcesChangedLightEvent, &message, &changes, &source)?;
            self.publish_counted(MessageType::ResourcesChangedLightEvent, outgoing, &self.light_stats).await?;
        }
        Ok(())
    }

    /// Publishes a batch as one message per resource and event type, keyed `Type/id`, each with
    /// that resource's changes in log order. The messages go out together: each key occurs once in
    /// the batch, and batches go one after the other, so every resource's events stay in order.
    async fn publish_per_resource(&self, changes: &[&PendingChange], source: &str) -> Result<(), PublishError> {
        let mut groups: Vec<Vec<&PendingChange>> = Vec::new();
        let mut group_of: HashMap<&ResourceKey, usize> = HashMap::new();
        for change in changes {
            let index = *group_of.entry(&change.key).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[index].push(change);
        }
        let mut messages = Vec::new();
        for group in &groups {
            let key = group[0].key.to_string();
            if self.settings.send_full_events {
                let message = events::full_event(group);
                let mut outgoing = events::outgoing(MessageType::ResourcesChangedEvent, &message, group, source)?;
                outgoing.key = Some(key.clone());
                messages.push((MessageType::ResourcesChangedEvent, outgoing, &self.full_stats));
            }
            if self.settings.send_light_events {
                let message = events::light_event(group);
                let mut outgoing = events::outgoing(MessageType::ResourcesChangedLightEvent, &message, group, source)?;
                outgoing.key = Some(key);
                messages.push((MessageType::ResourcesChangedLightEvent, outgoing, &self.light_stats));
            }
        }
        futures::future::try_join_all(
            messages
                .into_iter()
                .map(|(message_type, outgoing, destination)| self.publish_counted(message_type, outgoing, destination)),
        )
        .await?;
        Ok(())
    }

    /// Publishes one event message and counts the outcome on its destination's figures.
    async fn publish_counted(
        &self,
        message_type: MessageType,
        outgoing: crate::transport::OutgoingMessage,
        destination: &EndpointStats,
    ) -> Result<(), TransportError> {
        let _in_process = destination.begin();
        match self.transport.publish(message_type, outgoing).await {
            Ok(()) => {
                destination.delivered();
                self.stats.messages_published.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::EVENTS_PUBLISHED, "type" => message_type.as_str()).increment(1);
                Ok(())
            }
            Err(e) => {
                destination.failed(e.to_string());
                Err(e)
            }
        }
    }

    /// Reads the outbox's size and age (at most once a second) and warns when the oldest waiting
    /// change is older than `LagWarningSeconds`.
    async fn check_lag(&self, lag: &mut LagWatch) {
        if lag.checked.is_some_and(|at| at.elapsed() < LAG_CHECK) {
            return;
        }
        lag.checked = Some(Instant::now());
        let Ok(state) = self.store.outbox_state().await else { return };
        let age = state.oldest.map(|t| (chrono::Utc::now() - t).to_std().unwrap_or_default()).unwrap_or_default();
        self.stats.pending.store(state.pending, Ordering::Relaxed);
        self.stats.lag_millis.store(age.as_millis() as u64, Ordering::Relaxed);
        metrics::gauge!(m::PUBLISHER_PENDING).set(state.pending as f64);
        metrics::gauge!(m::PUBLISHER_LAG).set(age.as_secs_f64());
        let threshold = Duration::from_secs(self.settings.lag_warning_seconds.max(1));
        if age > threshold {
            if lag.warned.is_none_or(|at| at.elapsed() >= LAG_WARNING_EVERY) {
                lag.warned = Some(Instant::now());
                tracing::warn!(
                    pending = state.pending,
                    oldest_seconds = age.as_secs(),
                    threshold_seconds = threshold.as_secs(),
                    "change events lag behind: the oldest unpublished change waits longer than LagWarningSeconds"
                );
            }
        } else if lag.warned.take().is_some() {
            tracing::info!(pending = state.pending, "change events caught up");
        }
    }
}

#[derive(Default)]
struct LagWatch {
    checked: Option<Instant>,
    warned: Option<Instant>,
}

/// Waits for `timeout`, a wake-up (when `wakeable`), or a shutdown request.
async fn wait(shutdown: &mut watch::Receiver<bool>, waker: &Notify, timeout: Duration, wakeable: bool) {
    if *shutdown.borrow() {
        return;
    }
    tokio::select! {
        _ = tokio::time::sleep(timeout) => {}
        _ = waker.notified(), if wakeable => {}
        // A dropped sender disables this branch instead of waking in a loop.
        Ok(()) = shutdown.changed() => {}
    }
}
