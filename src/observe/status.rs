//! The figures behind `/status`: per input (where commands arrive) and per event destination (where
//! change events go), the counts FHIR users know from Aidbox's `$status` — messages delivered,
//! failed delivery attempts, messages in process — with the start time, the state and the last
//! errors.
//!
//! The board knows nothing of a particular broker: the bridge registers its input under the
//! transport's `input_address()`, the publisher its destinations under the event type, so every
//! transport gets status without code of its own. Counters only grow; `in_process` is kept right
//! by a guard that counts down when dropped, whatever way the handling ends.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use serde::Serialize;

/// How many of the latest errors each endpoint keeps.
pub const KEPT_ERRORS: usize = 5;

/// Where the process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Taking messages.
    Running,
    /// A stop was asked: finishing the messages in flight, then publishing what the outbox holds.
    Stopping,
}

/// The figures of the whole process.
#[derive(Debug)]
pub struct StatusBoard {
    started_at: DateTime<Utc>,
    state: Mutex<RunState>,
    inputs: Mutex<BTreeMap<String, Arc<EndpointStats>>>,
    destinations: Mutex<BTreeMap<String, Arc<EndpointStats>>>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        StatusBoard {
            started_at: Utc::now(),
            state: Mutex::new(RunState::Running),
            inputs: Mutex::default(),
            destinations: Mutex::default(),
        }
    }
}

impl StatusBoard {
    pub fn new() -> Arc<StatusBoard> {
        Arc::new(StatusBoard::default())
    }

    pub fn started_at(&self) -> DateTime<Utc> {
        self.started_at
    }

    pub fn state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_state(&self, state: RunState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    /// The figures of the input at `address`, created on first use.
    pub fn input(&self, address: &str) -> Arc<EndpointStats> {
        entry(&self.inputs, address)
    }

    /// The figures of the event destination `name`, created on first use.
    pub fn destination(&self, name: &str) -> Arc<EndpointStats> {
        entry(&self.destinations, name)
    }

    /// Every input, by address.
    pub fn inputs(&self) -> Vec<(String, Arc<EndpointStats>)> {
        listed(&self.inputs)
    }

    /// Every event destination, by name.
    pub fn destinations(&self) -> Vec<(String, Arc<EndpointStats>)> {
        listed(&self.destinations)
    }
}

fn entry(map: &Mutex<BTreeMap<String, Arc<EndpointStats>>>, name: &str) -> Arc<EndpointStats> {
    map.lock().unwrap_or_else(PoisonError::into_inner).entry(name.to_owned()).or_default().clone()
}

fn listed(map: &Mutex<BTreeMap<String, Arc<EndpointStats>>>) -> Vec<(String, Arc<EndpointStats>)> {
    map.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// One error, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedError {
    pub message: String,
    pub timestamp: DateTime<Utc>,
}

/// The figures of one input or destination.
#[derive(Debug)]
pub struct EndpointStats {
    started_at: DateTime<Utc>,
    delivered: AtomicU64,
    failed_attempts: AtomicU64,
    skipped: AtomicU64,
    in_process: Arc<AtomicU64>,
    errors: Mutex<VecDeque<RecordedError>>,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            started_at: Utc::now(),
            delivered: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            in_process: Arc::default(),
            errors: Mutex::new(VecDeque::with_capacity(KEPT_ERRORS)),
        }
    }
}

/// A copy of an endpoint's figures at one moment, named as in Aidbox's `$status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSnapshot {
    pub start_timestamp: DateTime<Utc>,
    /// Messages handled to the end: applied or answered and acknowledged (an input), or confirmed
    /// by the broker (a destination).
    pub messages_delivered: u64,
    /// Attempts that failed: a message moved to the error queue or given back for a later attempt
    /// (an input), a publish the broker did not confirm (a destination).
    pub messages_delivery_attempts: u64,
    /// Messages of a type nobody here consumes, moved to the skipped queue (inputs only).
    pub messages_skipped: u64,
    /// Messages being handled now.
    pub messages_in_process: u64,
    /// The latest errors (at most [`KEPT_ERRORS`]), oldest first.
    pub last_error_detail: Vec<RecordedError>,
}

impl EndpointStats {
    /// Counts a message as in process until the guard is dropped.
    pub fn begin(&self) -> InProcess {
        self.in_process.fetch_add(1, Ordering::Relaxed);
        InProcess(self.in_process.clone())
    }

    pub fn delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    pub fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed attempt and keeps its reason (the oldest of [`KEPT_ERRORS`] is dropped).
    pub fn failed(&self, message: impl Into<String>) {
        self.failed_attempts.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if errors.len() == KEPT_ERRORS {
            errors.pop_front();
        }
        errors.push_back(RecordedError { message: message.into(), timestamp: Utc::now() });
    }

    pub fn snapshot(&self) -> EndpointSnapshot {
        EndpointSnapshot {
            start_timestamp: self.started_at,
            messages_delivered: self.delivered.load(Ordering::Relaxed),
            messages_delivery_attempts: self.failed_attempts.load(Ordering::Relaxed),
            messages_skipped: self.skipped.load(Ordering::Relaxed),
            messages_in_process: self.in_process.load(Ordering::Relaxed),
            last_error_detail: self.errors.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect(),
        }
    }
}

/// Keeps one message counted in process; counts it out when dropped.
#[derive(Debug)]
pub struct InProcess(Arc<AtomicU64>);

impl Drop for InProcess {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_counts_down_however_handling_ends() {
        let stats = EndpointStats::default();
        let first = stats.begin();
        let second = stats.begin();
        assert_eq!(stats.snapshot().messages_in_process, 2);
        drop(first);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = second;
            panic!("handler failed");
        }));
        assert!(panicked.is_err());
        assert_eq!(stats.snapshot().messages_in_process, 0);
    }

    #[test]
    fn only_the_latest_errors_are_kept_oldest_first() {
        let stats = EndpointStats::default();
        for n in 0..8 {
            stats.failed(format!("error {n}"));
        }
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.messages_delivery_attempts, 8);
        let kept: Vec<&str> = snapshot.last_error_detail.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(kept, ["error 3", "error 4", "error 5", "error 6", "error 7"]);
    }

    #[test]
    fn one_entry_per_address() {
        let board = StatusBoard::default();
        board.input("rabbitmq://h/Q").delivered();
        board.input("rabbitmq://h/Q").delivered();
        board.input("kafka://h/T").delivered();
        let inputs = board.inputs();
        assert_eq!(inputs.len(), 2);
        assert_eq!(inputs.iter().find(|(a, _)| a == "rabbitmq://h/Q").unwrap().1.snapshot().messages_delivered, 2);
    }
}
