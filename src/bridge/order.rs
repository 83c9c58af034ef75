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

use std::collections::{HashMap, HashSet};

use futures::FutureExt;
use futures::channel::oneshot;
use futures::future::Shared;

use crate::store::ResourceKey;

/// Completion of an earlier command (resolves when its guard is dropped).
pub type Done = Shared<oneshot::Receiver<()>>;

/// `tails` is swept of finished commands once it holds this many resources.
const SWEEP_AT: usize = 4096;

/// Whether the command behind `done` has finished. `Shared::peek` alone is not enough: it only sees
/// an outcome once someone polled the shared future, and most completions nobody waits for. The
/// channel is `futures`' and not tokio's: tokio's answers "not ready" once the task's cooperative
/// budget is spent, which would make a sweep keep finished commands.
fn finished(done: &Done) -> bool {
    done.peek().is_some() || done.clone().now_or_never().is_some()
}

/// The last command to have entered for each resource.
#[derive(Default)]
pub struct KeyOrder {
    tails: HashMap<ResourceKey, Done>,
    /// The last command that entered exclusively, while it may still run.
    barrier: Option<Done>,
    /// The size of `tails` at which finished commands are forgotten next.
    next_sweep: usize,
}

impl KeyOrder {
    /// Registers a command touching `keys`: returns what it must wait for, and its own guard. A key
    /// named twice counts once: a command never waits for itself (a retrieve plan may name one
    /// resource in several instructions).
    pub fn enter(&mut self, keys: Vec<ResourceKey>) -> (Vec<Done>, oneshot::Sender<()>) {
        let (done, own) = oneshot::channel();
        let own = own.shared();
        let mut waits = Vec::new();
        if let Some(barrier) = &self.barrier {
            if !finished(barrier) {
                waits.push(barrier.clone());
            } else {
                self.barrier = None;
            }
        }
        let mut seen = HashSet::new();
        for key in keys {
            if !seen.insert(key.clone()) {
                continue;
            }
            if let Some(previous) = self.tails.insert(key, own.clone())
                && !finished(&previous)
            {
                waits.push(previous);
            }
        }
        // Forget finished commands now and then, so the map holds only what is in flight (at least
        // twice as many entries as are left between sweeps: a sweep costs O(1) per command).
        if self.tails.len() > self.next_sweep.max(SWEEP_AT) {
            self.tails.retain(|_, f| !finished(f));
            self.next_sweep = self.tails.len() * 2;
            // Give back the room a burst (large plans) needed.
            self.tails.shrink_to(self.next_sweep.max(SWEEP_AT));
        }
        (waits, done)
    }

    /// Registers a command whose resources are unknown: it waits for every command still in
    /// flight, and every later command waits for it.
    pub fn enter_exclusive(&mut self) -> (Vec<Done>, oneshot::Sender<()>) {
        let (done, own) = oneshot::channel();
        let own = own.shared();
        let mut waits: Vec<Done> = self.tails.drain().map(|(_, f)| f).filter(|f| !finished(f)).collect();
        if let Some(barrier) = self.barrier.take()
            && !finished(&barrier)
        {
            waits.push(barrier);
        }
        // Later commands wait for this one, which waits for all earlier ones: the tails can go.
        self.barrier = Some(own);
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

    #[test]
    fn finished_commands_nobody_waited_for_are_forgotten() {
        let mut order = KeyOrder::default();
        for n in 0..10_000 {
            let (waits, guard) = order.enter(vec![ResourceKey::new("Patient", n.to_string())]);
            assert!(waits.is_empty());
            drop(guard);
        }
        assert!(order.tails.len() <= SWEEP_AT + 1, "{} finished commands kept", order.tails.len());
    }

    /// The dispatcher runs in a task, where tokio's cooperative budget makes its own resources
    /// answer "not ready" after a hundred or so polls: the check for finished commands must not
    /// depend on it, or a sweep keeps nearly everything and the map grows with every command.
    #[tokio::test]
    async fn finished_commands_are_forgotten_inside_a_task_too() {
        let mut order = KeyOrder::default();
        for n in 0..100_000 {
            let (_, guard) = order.enter(vec![ResourceKey::new("Patient", n.to_string())]);
            drop(guard);
        }
        assert!(order.tails.len() <= SWEEP_AT + 1, "{} finished commands kept", order.tails.len());
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
