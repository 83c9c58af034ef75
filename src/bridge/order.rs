//! Per-resource arrival order for concurrently handled commands.
//!
//! The dispatcher calls [`KeyOrder::enter`] for each command in arrival order. A command gets back
//! the completion signals of the earlier commands that touch any of its resources, and a guard whose
//! drop signals its own completion. Commands on disjoint resources run in parallel; commands on a
//! shared resource run one after the other, in the order they arrived. A command whose task panics
//! drops its guard too, so nothing waits forever.

use std::collections::{HashMap, HashSet};

use futures::FutureExt;
use futures::future::Shared;
use tokio::sync::oneshot;

use crate::store::ResourceKey;

/// Completion of an earlier command (resolves when its guard is dropped).
pub type Done = Shared<oneshot::Receiver<()>>;

/// The last command to have entered for each resource.
#[derive(Default)]
pub struct KeyOrder {
    tails: HashMap<ResourceKey, Done>,
}

impl KeyOrder {
    /// Registers a command touching `keys`: returns what it must wait for, and its own guard. A key
    /// named twice counts once: a command never waits for itself (a retrieve plan may name one
    /// resource in several instructions).
    pub fn enter(&mut self, keys: Vec<ResourceKey>) -> (Vec<Done>, oneshot::Sender<()>) {
        let (done, finished) = oneshot::channel();
        let finished = finished.shared();
        let mut waits = Vec::new();
        let mut seen = HashSet::new();
        for key in keys {
            if !seen.insert(key.clone()) {
                continue;
            }
            if let Some(previous) = self.tails.insert(key, finished.clone())
                && previous.peek().is_none()
            {
                waits.push(previous);
            }
        }
        // Forget finished commands now and then, so the map holds only what is in flight.
        if self.tails.len() > 4096 {
            self.tails.retain(|_, f| f.peek().is_none());
        }
        (waits, done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_on_a_shared_resource_wait_in_arrival_order_and_others_do_not() {
        let mut order = KeyOrder::default();
        let a = ResourceKey::new("Patient", "a");
        let b = ResourceKey::new("Patient", "b");
        let (w1, g1) = order.enter(vec![a.clone()]);
        let (w2, _g2) = order.enter(vec![b.clone()]);
        let (w3, _g3) = order.enter(vec![a.clone(), b.clone()]);
        assert!(w1.is_empty() && w2.is_empty());
        assert_eq!(w3.len(), 2);
        let first = w3[0].clone();
        assert!(first.clone().now_or_never().is_none(), "must wait for the first command");
        drop(g1);
        assert!(first.now_or_never().is_some(), "released when the first command is done");
    }

    #[test]
    fn a_command_naming_a_resource_twice_does_not_wait_for_itself() {
        let mut order = KeyOrder::default();
        let a = ResourceKey::new("Patient", "a");
        let (waits, guard) = order.enter(vec![a.clone(), a.clone(), a.clone()]);
        assert!(waits.is_empty(), "nothing entered before it");
        let (next, _) = order.enter(vec![a]);
        assert_eq!(next.len(), 1);
        drop(guard);
        assert!(next[0].clone().now_or_never().is_some());
    }
}
