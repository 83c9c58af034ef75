//! Group commit: store plans handled at the same time share one SQL transaction
//! ([`plan::execute_store_plans`]), so a burst of commands pays for one commit, and one statement per
//! step, instead of one each (on SQLite with `synchronous=FULL` that is one disk flush for the group).
//!
//! A command puts its plan in the queue and waits for its outcome. Committing is done by one leader
//! task at a time: a command that finds none running starts one. The leader takes everything queued (up to [`MAX_GROUP_INSTRUCTIONS`]), commits it, hands each
//! command its outcome, and goes on while plans are queued. A command that arrives alone commits
//! alone, at once: grouping adds no latency, it only forms under load. Waiting commands do nothing
//! until their outcome arrives (no polling of commit slots).
//!
//! Invariants:
//! - a command learns its outcome only after the transaction holding its plan committed (or failed);
//! - whenever a plan is queued, a leader is running that will take it: the leader stops only after
//!   finding the queue empty, under the same lock under which a command queues its plan and looks
//!   for a leader;
//! - two commands on the same resource are never in one group: the bridge's [`super::KeyOrder`] keeps
//!   the second waiting until the first is done;
//! - one plan's failure never fails another: rule violations and rejected data stay with their plan,
//!   and if a group fails as a whole for another reason (not an outage or a lost race, which every
//!   command retries anyway) each of its plans is run again alone, so only the plan that causes the
//!   failure gets it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::observe::metrics as m;
use crate::plan::{self, PlanOutcome, StoreJob};
use crate::store::{Store, StoreError};

/// A group stops growing at this many instructions (a plan larger than this commits alone).
pub const MAX_GROUP_INSTRUCTIONS: usize = 2000;

type Waiting = (StoreJob, oneshot::Sender<Result<PlanOutcome, StoreError>>);

/// The queue of plans waiting for a commit, and the leader committing them.
pub struct GroupCommit {
    store: Arc<dyn Store>,
    state: Mutex<State>,
    /// Groups committed so far (one transaction each, retries aside).
    groups: AtomicU64,
}

#[derive(Default)]
struct State {
    queue: Vec<Waiting>,
    leading: bool,
}

impl GroupCommit {
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(GroupCommit { store, state: Mutex::default(), groups: AtomicU64::new(0) })
    }

    /// How many groups were committed (or failed) so far.
    pub fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }

    /// Executes `job` in the next group to commit and returns its outcome.
    pub async fn execute(self: &Arc<Self>, job: StoreJob) -> Result<PlanOutcome, StoreError> {
        let (sender, outcome) = oneshot::channel();
        let lead = {
            let mut state = self.lock();
            state.queue.push((job, sender));
            !std::mem::replace(&mut state.leading, true)
        };
        if lead {
            // A task of its own: the commit goes on even if this command is abandoned, and this
            // command's reply does not wait for the groups the leader commits after its own.
            tokio::spawn(self.clone().lead());
        }
        // The leader holding our plan was dropped mid-transaction (the runtime is shutting down):
        // nothing of it committed unless the inbox says so on the redelivery.
        outcome
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the transaction holding this plan was abandoned".into())))
    }

    /// Commits groups while plans are queued.
    async fn lead(self: Arc<Self>) {
        loop {
            let group = {
                let mut state = self.lock();
                let group = take_group(&mut state.queue);
                if group.is_empty() {
                    state.leading = false;
                    return;
                }
                group
            };
            self.groups.fetch_add(1, Ordering::Relaxed);
            metrics::histogram!(m::STORE_TRANSACTION_PLANS).record(group.len() as f64);
            let started = Instant::now();
            commit_group(self.store.as_ref(), group).await;
            metrics::histogram!(m::STORE_TRANSACTION_DURATION).record(started.elapsed().as_secs_f64());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Takes the oldest waiting plans, up to MAX_GROUP_INSTRUCTIONS instructions (at least one plan).
fn take_group(queue: &mut Vec<Waiting>) -> Vec<Waiting> {
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
