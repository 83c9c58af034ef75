//! Which offset of a partition may be stored: the per-partition watermark.
//!
//! Several records of one partition are handled at once, and they finish in any order. Kafka keeps
//! one position per partition, so a record's offset may be stored only once it **and every earlier
//! record of its partition handed out** is finished; otherwise a crash would skip the unfinished
//! ones. This module keeps, per assigned partition, the offsets handed out and not yet covered by
//! the watermark, and says how far the watermark may move when one finishes.
//!
//! Invariants: offsets are registered in the order the consumer delivers them (increasing per
//! partition); a partition revoked in a rebalance forgets its state, and the records handed out
//! before carry the old assignment's generation, so finishing them moves nothing (the partition's
//! next owner delivers them again from the last committed offset).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

/// A partition of a topic.
pub type Partition = (String, i32);

/// The in-flight offsets of every partition this consumer owns.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    partitions: HashMap<Partition, PartitionState>,
    next_generation: u64,
}

#[derive(Debug)]
struct PartitionState {
    generation: u64,
    /// Offsets handed out and not yet below the watermark → finished?
    in_flight: BTreeMap<i64, bool>,
}

/// What finishing a record allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Store this offset (the record's and every earlier one are finished).
    Store(i64),
    /// An earlier record of the partition is still being handled: nothing to store yet.
    Wait,
    /// The partition was revoked (or reassigned) since the record was handed out.
    Stale,
}

impl OffsetTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a record handed to the bridge; returns the generation its finish must name.
    pub fn register(&self, partition: &Partition, offset: i64) -> u64 {
        let mut state = self.lock();
        if !state.partitions.contains_key(partition) {
            let generation = state.next_generation;
            state.next_generation += 1;
            state.partitions.insert(partition.clone(), PartitionState { generation, in_flight: BTreeMap::new() });
        }
        let entry = state.partitions.get_mut(partition).expect("inserted above");
        entry.in_flight.insert(offset, false);
        entry.generation
    }

    /// Marks a record finished and says which offset may now be stored.
    pub fn finish(&self, partition: &Partition, offset: i64, generation: u64) -> Finished {
        let mut state = self.lock();
        let Some(entry) = state.partitions.get_mut(partition).filter(|p| p.generation == generation) else {
            return Finished::Stale;
        };
        match entry.in_flight.get_mut(&offset) {
            Some(done) => *done = true,
            None => return Finished::Stale,
        }
        let mut watermark = None;
        while let Some(entry) = entry.in_flight.first_entry() {
            if !*entry.get() {
                break;
            }
            watermark = Some(*entry.key());
            entry.remove();
        }
        watermark.map_or(Finished::Wait, Finished::Store)
    }

    /// Whether a record handed out under `generation` still belongs to this consumer.
    pub fn is_current(&self, partition: &Partition, generation: u64) -> bool {
        self.lock().partitions.get(partition).is_some_and(|p| p.generation == generation)
    }

    /// Forgets revoked partitions: their unfinished records go to the partition's next owner.
    pub fn revoke<'a>(&self, partitions: impl IntoIterator<Item = &'a Partition>) {
        let mut state = self.lock();
        for partition in partitions {
            state.partitions.remove(partition);
        }
    }

    /// Records handed out and not finished, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.lock().partitions.values().map(|p| p.in_flight.values().filter(|done| !**done).count()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        ("t".to_owned(), n)
    }

    #[test]
    fn the_watermark_waits_for_every_earlier_offset() {
        let tracker = OffsetTracker::default();
        let g = tracker.register(&p(0), 10);
        tracker.register(&p(0), 11);
        tracker.register(&p(0), 13); // offsets need not be contiguous (compaction, markers)
        assert_eq!(tracker.finish(&p(0), 13, g), Finished::Wait);
        assert_eq!(tracker.finish(&p(0), 11, g), Finished::Wait);
        assert_eq!(tracker.in_flight(), 1);
        assert_eq!(tracker.finish(&p(0), 10, g), Finished::Store(13));
        assert_eq!(tracker.in_flight(), 0);
        tracker.register(&p(0), 14);
        assert_eq!(tracker.finish(&p(0), 14, g), Finished::Store(14));
    }

    #[test]
    fn partitions_are_independent() {
        let tracker = OffsetTracker::default();
        let g0 = tracker.register(&p(0), 5);
        let g1 = tracker.register(&p(1), 7);
        tracker.register(&p(0), 6);
        assert_eq!(tracker.finish(&p(0), 6, g0), Finished::Wait);
        assert_eq!(tracker.finish(&p(1), 7, g1), Finished::Store(7));
    }

    #[test]
    fn records_of_a_revoked_partition_store_nothing_even_after_reassignment() {
        let tracker = OffsetTracker::default();
        let old = tracker.register(&p(0), 5);
        tracker.revoke([&p(0)]);
        assert!(!tracker.is_current(&p(0), old));
        assert_eq!(tracker.finish(&p(0), 5, old), Finished::Stale);
        // Reassigned: the record comes again under a new generation.
        let new = tracker.register(&p(0), 5);
        assert_ne!(new, old);
        assert_eq!(tracker.finish(&p(0), 5, old), Finished::Stale);
        assert_eq!(tracker.finish(&p(0), 5, new), Finished::Store(5));
    }

    #[test]
    fn finishing_twice_or_an_unknown_offset_is_stale() {
        let tracker = OffsetTracker::default();
        let g = tracker.register(&p(0), 1);
        assert_eq!(tracker.finish(&p(0), 1, g), Finished::Store(1));
        assert_eq!(tracker.finish(&p(0), 1, g), Finished::Stale);
        assert_eq!(tracker.finish(&p(0), 99, g), Finished::Stale);
    }
}
