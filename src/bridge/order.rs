//! Per-resource arrival order for concurrently handled commands.
//!
//! The dispatcher calls [`KeyOrder::enter`] for each command in arrival order. A command gets back
//! the completion signals of the earlier commands that touch any of its resources, and a guard whose
//! drop signals its own completion. Commands on disjoint resources run in parallel; commands on a
//! shared resource run one after the other, in the order they arrived. A command whose task panics
//! drops its guard too, so nothing waits forever.
//!
//! A command whose resources are not known on arrival (a claim check: its plan is still in a blob)
//! enters with [`KeyOrder::enter_exclusive`]: it waits for every earlier command, and every later
//! one waits for it, so per-resource arrival order holds whatever its plan turns out to touch.

use std::collections::HashMap;

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
    /// The last command that entered exclusively, while it may still run.
    barrier: Option<Done>,
}

impl KeyOrder {
    /// Registers a command touching `keys`: returns what it must wait for, and its own guard.
    pub fn enter(&mut self, keys: Vec<ResourceKey>) -> (Vec<Done>, oneshot::Sender<()>) {
        let (done, finished) = oneshot::channel();
        let finished = finished.shared();
        let mut waits = Vec::new();
        if let Some(barrier) = &self.barrier {
            if barrier.peek().is_none() {
                waits.push(barrier.clone());
            } else {
                self.barrier = None;
            }
        }
        for key in keys {
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

    /// Registers a command whose resources are unknown: it waits for every command still in
    /// flight, and every later command waits for it.
    pub fn enter_exclusive(&mut self) -> (Vec<Done>, oneshot::Sender<()>) {
        let (done, finished) = oneshot::channel();
        let finished = finished.shared();
        let mut waits: Vec<Done> = self.tails.drain().map(|(_, f)| f).filter(|f| f.peek().is_none()).collect();
        if let Some(barrier) = self.barrier.take()
            && barrier.peek().is_none()
        {
            waits.push(barrier);
        }
        // Later commands wait for this one, which waits for all earlier ones: the tails can go.
        self.barrier = Some(finished);
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

    #[tokio::test]
    async fn an_exclusive_command_waits_for_all_earlier_and_all_later_wait_for_it() {
        let mut order = KeyOrder::default();
        let (_, g1) = order.enter(vec![ResourceKey::new("Patient", "a")]);
        let (_, g2) = order.enter(vec![ResourceKey::new("Patient", "b")]);
        let (w3, g3) = order.enter_exclusive();
        assert_eq!(w3.len(), 2, "waits for both earlier commands");
        let (w4, _g4) = order.enter(vec![ResourceKey::new("Patient", "c")]);
        assert_eq!(w4.len(), 1, "a later command on another resource waits for the exclusive one");
        drop(g1);
        drop(g2);
        assert!(w4[0].clone().now_or_never().is_none());
        drop(g3);
        assert!(w4[0].clone().now_or_never().is_some());
        let (w5, _g5) = order.enter(vec![ResourceKey::new("Patient", "d")]);
        assert!(w5.is_empty(), "a finished exclusive command holds nobody up");
    }
}
