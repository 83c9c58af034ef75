//! Group commit: store plans handled at the same time share one SQL transaction, each in its own
//! savepoint ([`plan::execute_store_plans`]), so a burst of commands pays for one commit instead of
//! one each (on SQLite with `synchronous=FULL` that is one disk flush for the whole group).
//!
//! Leader/follower, with no timer and no task of its own: a command puts its plan in the queue and
//! waits for either its outcome or a commit slot; whoever gets a slot takes everything queued (up to
//! [`MAX_GROUP_INSTRUCTIONS`]) and commits it, then hands each command its outcome. A command that
//! arrives alone commits alone, at once: grouping adds no latency, it only forms under load.
//!
//! Invariants:
//! - a command learns its outcome only after the transaction holding its plan committed (or failed);
//! - two commands on the same resource are never in one group: the bridge's [`super::KeyOrder`] keeps
//!   the second waiting until the first is done;
//! - one plan's failure never fails another: rule violations and rejected data stay in the plan's
//!   savepoint, and if a group fails as a whole for another reason (not an outage or a lost race,
//!   which every command retries anyway) each of its plans is run again alone, so only the plan that
//!   causes the failure gets it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::sync::{Semaphore, oneshot};

use crate::plan::{self, PlanOutcome, StoreJob};
use crate::store::{Store, StoreError};

/// A group stops growing at this many instructions (a plan larger than this commits alone).
pub const MAX_GROUP_INSTRUCTIONS: usize = 2000;

type Waiting = (StoreJob, oneshot::Sender<Result<PlanOutcome, StoreError>>);

/// The queue of plans waiting for a commit, and the commit slots.
pub struct GroupCommit {
    queue: Mutex<Vec<Waiting>>,
    /// Transactions that may run at once.
    slots: Semaphore,
    /// Groups committed so far (one transaction each, retries aside).
    groups: AtomicU64,
}

impl GroupCommit {
    /// `transactions`: how many groups may commit at the same time (at least 1).
    pub fn new(transactions: usize) -> Self {
        GroupCommit {
            queue: Mutex::new(Vec::new()),
            slots: Semaphore::new(transactions.max(1)),
            groups: AtomicU64::new(0),
        }
    }

    /// How many groups were committed (or failed) so far.
    pub fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }

    /// Executes `job` in the next group to commit and returns its outcome.
    pub async fn execute(&self, store: &dyn Store, job: StoreJob) -> Result<PlanOutcome, StoreError> {
        let (sender, mut outcome) = oneshot::channel();
        self.lock().push((job, sender));
        loop {
            tokio::select! {
                biased;
                result = &mut outcome => {
                    // The leader holding our plan was dropped mid-transaction: nothing of it committed
                    // unless the inbox says so on the redelivery.
                    return result.unwrap_or_else(|_| Err(StoreError::Unavailable("the transaction holding this plan was abandoned".into())));
                }
                slot = self.slots.acquire() => {
                    let Ok(_slot) = slot else {
                        return Err(StoreError::Unavailable("the group commit is closed".into()));
                    };
                    let group = self.take_group();
                    if !group.is_empty() {
                        self.groups.fetch_add(1, Ordering::Relaxed);
                        commit_group(store, group).await;
                    }
                    // Our plan was in this group or in another leader's: its outcome comes next.
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the oldest waiting plans, up to MAX_GROUP_INSTRUCTIONS instructions (at least one plan).
    fn take_group(&self) -> Vec<Waiting> {
        let mut queue = self.lock();
        let mut instructions = 0;
        let mut count = 0;
        for (job, _) in queue.iter() {
            let size = job.plan.as_ref().map(Vec::len).unwrap_or(0).max(1);
            if count > 0 && instructions + size > MAX_GROUP_INSTRUCTIONS {
                break;
            }
            instructions += size;
            count += 1;
        }
        queue.drain(..count).collect()
    }
}

async fn commit_group(store: &dyn Store, group: Vec<Waiting>) {
    let (jobs, senders): (Vec<StoreJob>, Vec<_>) = group.into_iter().unzip();
    match plan::execute_store_plans(store, &jobs).await {
        Ok(outcomes) => {
            for (sender, outcome) in senders.into_iter().zip(outcomes) {
                let _ = sender.send(Ok(outcome));
            }
        }
        // Alone, or a failure every plan of the group would meet the same way: each gets it.
        Err(e) if jobs.len() == 1 || e.is_unavailable() || e.is_conflict() => {
            for sender in senders {
                let _ = sender.send(Err(e.clone()));
            }
        }
        // Find the plan that fails: each runs alone.
        Err(e) => {
            tracing::warn!(error = %e, plans = jobs.len(), "a group of store plans failed; running each alone");
            for (sender, job) in senders.into_iter().zip(jobs) {
                let alone = plan::execute_store_plans(store, std::slice::from_ref(&job)).await;
                let _ = sender.send(alone.map(|mut outcomes| outcomes.remove(0)));
            }
        }
    }
}
