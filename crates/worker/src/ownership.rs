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
//! outlives the bound (the database away) is given up on: it commits nothing for
//! those partitions, ever, and later revokes of them do not wait for it. Whether a
//! batch may commit is decided under the lock the revoke takes, in one step with
//! the commit itself, so a revoke cannot give up between the two.
//!
//! One fact decides it: a batch may commit a partition while it is the batch
//! applying it. A revoke that completes has either seen the batch finish or taken
//! the partition from it; no other batch takes a partition a batch holds (the
//! worker's loop gives each partition to one batch at a time).
//!
//! The revoke runs in librdkafka's rebalance callback, on the thread that polls
//! the consumer; the batches finish on others.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The assignment era a command was received in, or a batch taken in: one more
/// for every revoke.
pub type Generation = u64;

type BatchId = u64;

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
    /// The batch applying each partition now. A revoke that gives up on a batch
    /// takes its partitions out of here: that is what keeps it from committing
    /// them, and a later revoke from waiting for it.
    applying: BTreeMap<i32, BatchId>,
    next_batch: BatchId,
}

impl State {
    fn revoked_after(&self, partition: i32, generation: Generation) -> bool {
        self.revoked_at.get(&partition).is_some_and(|g| *g > generation)
    }
}

/// A batch's hold on the partitions it applies, from [`Ownership::start_batch`].
/// Dropping it releases them, also when the batch's task panics or is aborted:
/// a revoke would otherwise wait its whole bound for a batch that is gone.
pub struct Applying {
    ownership: Arc<Ownership>,
    id: BatchId,
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

    /// A batch starts: keeps the commands still fresh and returns them with the
    /// batch's hold on their partitions (only those: a revoke does not wait for a
    /// batch that applies nothing of its partition). In one step, so a revoke
    /// either waits for the batch or made its commands stale before.
    pub fn start_batch<T>(
        self: &Arc<Self>,
        commands: Vec<(Generation, T)>,
        partition_of: impl Fn(&T) -> i32,
    ) -> (Applying, Vec<T>) {
        let mut state = self.lock();
        let id = state.next_batch;
        state.next_batch += 1;
        let fresh: Vec<T> =
            commands.into_iter().filter(|(g, c)| !state.revoked_after(partition_of(c), *g)).map(|(_, c)| c).collect();
        for c in &fresh {
            state.applying.insert(partition_of(c), id);
        }
        (Applying { ownership: self.clone(), id }, fresh)
    }

    /// Gives `partitions` up: what was received of them becomes stale at once, and
    /// this returns when no batch applies them any more, or after `bound`, giving
    /// up on the batches still applying them. Returns whether they were released
    /// in time.
    pub fn revoke(&self, partitions: &[i32], bound: Duration) -> bool {
        let mut state = self.lock();
        state.generation += 1;
        let generation = state.generation;
        for p in partitions {
            state.revoked_at.insert(*p, generation);
        }
        let (mut state, waited) = self
            .released
            .wait_timeout_while(state, bound, |s| partitions.iter().any(|p| s.applying.contains_key(p)))
            .unwrap_or_else(|e| e.into_inner());
        if waited.timed_out() {
            for p in partitions {
                state.applying.remove(p);
            }
        }
        !waited.timed_out()
    }
}

impl Applying {
    /// Runs `commit` with those of `partitions` this batch still applies: not given
    /// up on by a revoke (one that waits for the batch leaves them to it). Under the
    /// revoke's lock, so `commit` must not block (an asynchronous offset commit only
    /// queues the request).
    pub fn commit_owned<R>(&self, partitions: impl IntoIterator<Item = i32>, commit: impl FnOnce(&[i32]) -> R) -> R {
        let state = self.ownership.lock();
        let owned: Vec<i32> = partitions.into_iter().filter(|p| state.applying.get(p) == Some(&self.id)).collect();
        commit(&owned)
    }
}

impl Drop for Applying {
    fn drop(&mut self) {
        let mut state = self.ownership.lock();
        state.applying.retain(|_, batch| *batch != self.id);
        drop(state);
        self.ownership.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Commands as (partition, offset), received in a generation.
    fn received(g: Generation, commands: &[(i32, i64)]) -> Vec<(Generation, (i32, i64))> {
        commands.iter().map(|c| (g, *c)).collect()
    }

    fn committable(batch: &Applying, partitions: impl IntoIterator<Item = i32>) -> Vec<i32> {
        batch.commit_owned(partitions, |owned| owned.to_vec())
    }

    #[test]
    fn a_command_received_before_its_partition_was_revoked_is_not_applied() {
        let o = Arc::new(Ownership::default());
        let before = o.generation();
        assert!(o.revoke(&[1], Duration::ZERO));
        let after = o.generation();
        let commands = [received(before, &[(0, 7), (1, 8)]), received(after, &[(1, 9)])].concat();
        let (_batch, fresh) = o.start_batch(commands, |c| c.0);
        assert_eq!(fresh, vec![(0, 7), (1, 9)], "another partition's commands and those received after stay");
    }

    #[test]
    fn a_command_stays_stale_when_its_partition_comes_back() {
        let o = Arc::new(Ownership::default());
        let before = o.generation();
        o.revoke(&[1], Duration::ZERO);
        o.revoke(&[0], Duration::ZERO);
        let (_batch, fresh) = o.start_batch(received(before, &[(1, 8)]), |c| c.0);
        assert!(fresh.is_empty());
    }

    #[test]
    fn a_revoke_waits_for_the_batch_applying_the_partition_which_may_commit_meanwhile() {
        let o = Arc::new(Ownership::default());
        let (batch, _) = o.start_batch(received(0, &[(1, 1), (2, 1)]), |c| c.0);
        let batch = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            committable(&batch, [1, 2])
        });
        let started = Instant::now();
        assert!(o.revoke(&[1], Duration::from_secs(10)));
        assert!(started.elapsed() >= Duration::from_millis(200), "the revoke waited for the batch");
        assert_eq!(batch.join().unwrap(), vec![1, 2]);
    }

    #[test]
    fn a_revoke_does_not_wait_for_batches_of_other_partitions() {
        let o = Arc::new(Ownership::default());
        let (_batch, _) = o.start_batch(received(0, &[(2, 1)]), |c| c.0);
        let started = Instant::now();
        assert!(o.revoke(&[1], Duration::from_secs(10)));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_batch_that_outlives_the_bound_may_not_commit_the_revoked_partition() {
        let o = Arc::new(Ownership::default());
        let (batch, _) = o.start_batch(received(0, &[(1, 1), (2, 1)]), |c| c.0);
        assert!(!o.revoke(&[1], Duration::from_millis(50)), "the bound passed");
        assert_eq!(committable(&batch, [1, 2]), vec![2]);
    }

    #[test]
    fn a_late_batch_may_not_commit_a_partition_revoked_and_assigned_again() {
        let o = Arc::new(Ownership::default());
        let (late, _) = o.start_batch(received(0, &[(1, 1)]), |c| c.0);
        o.revoke(&[1], Duration::ZERO);
        // Assigned again: the new generation's batches commit it, the old one never.
        let (again, _) = o.start_batch(received(o.generation(), &[(1, 2)]), |c| c.0);
        assert_eq!(committable(&late, [1]), Vec::<i32>::new());
        assert_eq!(committable(&again, [1]), vec![1]);
    }

    #[test]
    fn a_revoke_does_not_wait_for_a_batch_that_applies_nothing_of_the_partition() {
        let o = Arc::new(Ownership::default());
        let before = o.generation();
        o.revoke(&[1], Duration::ZERO);
        let commands = [received(before, &[(1, 8)]), received(o.generation(), &[(2, 1)])].concat();
        let (_batch, fresh) = o.start_batch(commands, |c| c.0);
        assert_eq!(fresh, vec![(2, 1)], "partition 1's command was stale");
        let started = Instant::now();
        assert!(o.revoke(&[1], Duration::from_secs(10)));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_revoke_cannot_give_up_on_a_batch_between_its_check_and_its_commit() {
        let o = Arc::new(Ownership::default());
        let (batch, _) = o.start_batch(received(0, &[(1, 1)]), |c| c.0);
        let (checked, committing) = std::sync::mpsc::channel();
        let commit = std::thread::spawn(move || {
            let committed = batch.commit_owned([1], |owned| {
                checked.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(200));
                owned.to_vec()
            });
            (committed, batch)
        });
        committing.recv().unwrap();
        let started = Instant::now();
        assert!(!o.revoke(&[1], Duration::from_millis(10)), "the batch outlives the bound");
        assert!(started.elapsed() >= Duration::from_millis(150), "the revoke waited for the commit under way");
        let (committed, batch) = commit.join().unwrap();
        assert_eq!(committed, vec![1], "the commit under way went through, before the revoke gave up");
        assert_eq!(committable(&batch, [1]), Vec::<i32>::new(), "and none after it");
    }

    #[test]
    fn a_batch_that_panics_releases_its_partitions() {
        let o = Arc::new(Ownership::default());
        let (batch, _) = o.start_batch(received(0, &[(1, 1)]), |c| c.0);
        let failed = std::thread::spawn(move || {
            let _batch = batch;
            panic!("the batch's task failed");
        })
        .join();
        assert!(failed.is_err());
        let started = Instant::now();
        assert!(o.revoke(&[1], Duration::from_secs(10)), "released without waiting for the bound");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_batch_given_up_on_may_not_commit_while_a_later_revoke_drains() {
        let o = Arc::new(Ownership::default());
        let (late, _) = o.start_batch(received(0, &[(1, 1)]), |c| c.0);
        assert!(!o.revoke(&[1], Duration::ZERO), "the first revoke gives up on the batch");
        // Assigned again with partition 2, whose batch a second revoke of both waits for.
        let (current, _) = o.start_batch(received(o.generation(), &[(2, 1)]), |c| c.0);
        let before = o.generation();
        let revoke = {
            let o = o.clone();
            std::thread::spawn(move || o.revoke(&[1, 2], Duration::from_secs(10)))
        };
        while o.generation() == before {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(committable(&late, [1]), Vec::<i32>::new(), "given up on, it never commits");
        assert_eq!(committable(&current, [2]), vec![2], "the batch the revoke waits for still may");
        drop(current);
        assert!(revoke.join().unwrap(), "the later revoke waited only for the batch it could wait for");
    }
}
