//! Which partitions of the commands topic a worker may still act on, across
//! consumer-group rebalances.
//!
//! Kafka moves a partition to another worker without asking what this one still
//! holds: commands received but not applied, and a batch in its transaction.
//! Applied by both workers at once, a member's commands lose their order (a
//! "whole balance" transfer decided before the transfer sent ahead of it), and the
//! old owner's offset commit, arriving after the new owner's, moves the group's
//! offset back, so everything between is delivered again. Money is safe either
//! way (the ledger's keys and card locks); order and the answers are not.
//!
//! So a revoke (a) makes every command received before it stale, never to be
//! applied here (the new owner reads it again from the committed offset), and
//! (b) waits, up to a bound, for the batches applying those partitions to commit
//! their offsets, which they still may while the revoke waits. A batch that
//! outlives the bound (the database away) commits nothing for those partitions.
//!
//! The revoke runs in librdkafka's rebalance callback, on the thread that polls
//! the consumer; the batches finish on others.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The assignment era a command was received in, or a batch taken in: one more
/// for every revoke.
pub type Generation = u64;

#[derive(Default)]
pub struct Ownership {
    state: Mutex<State>,
    released: Condvar,
}

#[derive(Default)]
struct State {
    generation: Generation,
    /// Each partition's latest revoke.
    revoked_at: BTreeMap<i32, Generation>,
    /// Revoked partitions whose revoke still waits for their batches.
    draining: BTreeSet<i32>,
    /// Partitions a batch is applying now.
    applying: BTreeSet<i32>,
}

impl State {
    fn revoked_after(&self, partition: i32, generation: Generation) -> bool {
        self.revoked_at.get(&partition).is_some_and(|g| *g > generation)
    }
}

impl Ownership {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent through a panic elsewhere: every change is
        // one assignment under the lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The generation to tag a command with as it is received.
    pub fn generation(&self) -> Generation {
        self.lock().generation
    }

    /// A batch starts applying `partitions`: keeps the commands still fresh and
    /// returns them with the generation the batch is taken in. In one step, so a
    /// revoke either waits for the batch or made its commands stale before.
    /// Call [`Ownership::finished`] once its offsets are committed (or given up).
    pub fn start_batch<T>(
        &self,
        partitions: &[i32],
        commands: Vec<(Generation, T)>,
        partition_of: impl Fn(&T) -> i32,
    ) -> (Generation, Vec<T>) {
        let mut state = self.lock();
        state.applying.extend(partitions);
        let fresh = commands.into_iter().filter(|(g, c)| !state.revoked_after(partition_of(c), *g)).map(|(_, c)| c);
        (state.generation, fresh.collect())
    }

    pub fn finished(&self, partitions: &[i32]) {
        let mut state = self.lock();
        for p in partitions {
            state.applying.remove(p);
        }
        drop(state);
        self.released.notify_all();
    }

    /// Which of a batch's partitions, taken in `generation`, it may still commit:
    /// those not revoked since, or whose revoke is still waiting for it.
    pub fn committable(&self, generation: Generation, partitions: impl IntoIterator<Item = i32>) -> Vec<i32> {
        let state = self.lock();
        partitions.into_iter().filter(|p| !state.revoked_after(*p, generation) || state.draining.contains(p)).collect()
    }

    /// Gives `partitions` up: what was received of them becomes stale at once, and
    /// this returns when no batch applies them any more, or after `bound`.
    /// Returns whether they were released in time.
    pub fn revoke(&self, partitions: &[i32], bound: Duration) -> bool {
        let mut state = self.lock();
        state.generation += 1;
        let generation = state.generation;
        for p in partitions {
            state.revoked_at.insert(*p, generation);
            state.draining.insert(*p);
        }
        let (mut state, waited) = self
            .released
            .wait_timeout_while(state, bound, |s| partitions.iter().any(|p| s.applying.contains(p)))
            .unwrap_or_else(|e| e.into_inner());
        for p in partitions {
            state.draining.remove(p);
        }
        !waited.timed_out()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    /// Commands as (partition, offset), received in a generation.
    fn received(g: Generation, commands: &[(i32, i64)]) -> Vec<(Generation, (i32, i64))> {
        commands.iter().map(|c| (g, *c)).collect()
    }

    #[test]
    fn a_command_received_before_its_partition_was_revoked_is_not_applied() {
        let o = Ownership::default();
        let before = o.generation();
        assert!(o.revoke(&[1], Duration::ZERO));
        let after = o.generation();
        let commands = [received(before, &[(0, 7), (1, 8)]), received(after, &[(1, 9)])].concat();
        let (_, fresh) = o.start_batch(&[0, 1], commands, |c| c.0);
        assert_eq!(fresh, vec![(0, 7), (1, 9)], "another partition's commands and those received after stay");
    }

    #[test]
    fn a_command_stays_stale_when_its_partition_comes_back() {
        let o = Ownership::default();
        let before = o.generation();
        o.revoke(&[1], Duration::ZERO);
        o.revoke(&[0], Duration::ZERO);
        let (_, fresh) = o.start_batch(&[1], received(before, &[(1, 8)]), |c| c.0);
        assert!(fresh.is_empty());
    }

    #[test]
    fn a_revoke_waits_for_the_batch_applying_the_partition_which_may_commit_meanwhile() {
        let o = Arc::new(Ownership::default());
        let (taken, _) = o.start_batch(&[1, 2], received(0, &[(1, 1), (2, 1)]), |c| c.0);
        let batch = {
            let o = o.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                let committed = o.committable(taken, [1, 2]);
                o.finished(&[1, 2]);
                committed
            })
        };
        let started = Instant::now();
        assert!(o.revoke(&[1], Duration::from_secs(10)));
        assert!(started.elapsed() >= Duration::from_millis(200), "the revoke waited for the batch");
        assert_eq!(batch.join().unwrap(), vec![1, 2]);
    }

    #[test]
    fn a_revoke_does_not_wait_for_batches_of_other_partitions() {
        let o = Ownership::default();
        o.start_batch(&[2], received(0, &[(2, 1)]), |c| c.0);
        let started = Instant::now();
        assert!(o.revoke(&[1], Duration::from_secs(10)));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_batch_that_outlives_the_bound_may_not_commit_the_revoked_partition() {
        let o = Ownership::default();
        let (taken, _) = o.start_batch(&[1, 2], received(0, &[(1, 1), (2, 1)]), |c| c.0);
        assert!(!o.revoke(&[1], Duration::from_millis(50)), "the bound passed");
        assert_eq!(o.committable(taken, [1, 2]), vec![2]);
    }

    #[test]
    fn a_late_batch_may_not_commit_a_partition_revoked_and_assigned_again() {
        let o = Ownership::default();
        let (taken, _) = o.start_batch(&[1], received(0, &[(1, 1)]), |c| c.0);
        o.revoke(&[1], Duration::ZERO);
        // Assigned again: the new generation's batches commit it, the old one never.
        let again = o.generation();
        assert_eq!(o.committable(taken, [1]), Vec::<i32>::new());
        assert_eq!(o.committable(again, [1]), vec![1]);
    }
}
