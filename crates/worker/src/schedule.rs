//! Which commands the worker applies next, and when: the rules only, no I/O.
//!
//! Commands wait in one queue per partition, in offset order. A batch takes them
//! from partitions that no batch in flight holds, so a partition's commands are
//! applied in order, one batch after another. A worker that keeps up runs one
//! transaction at a time: a batch starts after the linger, or as soon as it is
//! full. A second transaction starts beside the first only when a full batch is
//! waiting on partitions the first does not hold, that is, when the worker is
//! behind by a whole batch (a backlog after an outage, a burst). Smaller batches
//! side by side would cost more round trips and relay rounds per command, which
//! `make bench` measured as 12 % less async throughput on a saturated box.
//!
//! Two transactions in flight lock different cards because the gateway keys a
//! command by member and both cards of a transfer belong to that member.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Commands waiting to be applied, per partition, in the order they arrived.
#[derive(Debug)]
pub struct Waiting<T> {
    queues: BTreeMap<i32, VecDeque<T>>,
    len: usize,
    /// The partition a batch started with last; the next starts after it, so a
    /// busy low-numbered partition cannot starve the others.
    last_first: Option<i32>,
}

impl<T> Default for Waiting<T> {
    fn default() -> Self {
        Waiting { queues: BTreeMap::new(), len: 0, last_first: None }
    }
}

impl<T> Waiting<T> {
    pub fn push(&mut self, partition: i32, item: T) {
        self.queues.entry(partition).or_default().push_back(item);
        self.len += 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Commands on partitions that no batch in flight holds.
    pub fn free(&self, busy: &BTreeSet<i32>) -> usize {
        self.queues.iter().filter(|(p, _)| !busy.contains(p)).map(|(_, q)| q.len()).sum()
    }

    /// Takes up to `max` commands from partitions not in `busy`: whole partitions
    /// in turn, starting after the one the previous batch started with, the last
    /// one cut short if the batch is full. Returns the partitions taken (to be
    /// marked busy) and the commands, each partition's in their order.
    pub fn take(&mut self, busy: &BTreeSet<i32>, max: usize) -> (Vec<i32>, Vec<T>) {
        let free: Vec<i32> =
            self.queues.iter().filter(|(p, q)| !busy.contains(p) && !q.is_empty()).map(|(p, _)| *p).collect();
        let start = match self.last_first {
            Some(last) => free.iter().position(|p| *p > last).unwrap_or(0),
            None => 0,
        };
        let mut partitions = Vec::new();
        let mut taken = Vec::new();
        for p in free[start..].iter().chain(&free[..start]) {
            if taken.len() >= max {
                break;
            }
            let queue = self.queues.get_mut(p).expect("listed partitions have a queue");
            let n = queue.len().min(max - taken.len());
            taken.extend(queue.drain(..n));
            partitions.push(*p);
        }
        if let Some(first) = partitions.first() {
            self.last_first = Some(*first);
        }
        self.queues.retain(|_, q| !q.is_empty());
        self.len -= taken.len();
        (partitions, taken)
    }
}

/// Whether a batch starts now.
/// - `in_flight`: batches being applied; `max_in_flight`: how many may be.
/// - `free`: commands waiting on partitions no batch in flight holds.
/// - `lingered`: the first of them has waited the batch linger.
pub fn starts_now(in_flight: usize, max_in_flight: usize, free: usize, max_batch: usize, lingered: bool) -> bool {
    if free == 0 || in_flight >= max_in_flight.max(1) {
        return false;
    }
    let full = free >= max_batch.max(1);
    if in_flight == 0 {
        full || lingered
    } else {
        full
    }
}

/// Whether the worker takes the next message off Kafka now.
/// - `free`: commands waiting on partitions no batch in flight holds;
/// - `waiting`: every command waiting, on any partition.
///
/// It receives until a full batch waits on free partitions for every batch that
/// may be in flight and one more, so that a transaction that ends, or a slot that
/// opens, finds a full batch ready; and it never holds more than [`max_waiting`]
/// in all. Commands on a partition a batch holds cannot go until that batch ends,
/// so a bound on all waiting alone (the rule before, 8000) filled up with them: in
/// a drain only half the batches ran beside another and a fifth of the two cores
/// was idle (`make bench`, see `docs/bench/history.md`).
pub fn receives_now(free: usize, waiting: usize, max_batch: usize, max_in_flight: usize) -> bool {
    free < max_batch.max(1) * (max_in_flight.max(1) + 1) && waiting < max_waiting(max_batch, max_in_flight)
}

/// The most commands a worker holds in memory: five full batches for every batch
/// that may be in flight (20000 with the defaults; a command is under a kilobyte).
/// Beyond it the receiver waits and librdkafka's own queue fills instead.
pub fn max_waiting(max_batch: usize, max_in_flight: usize) -> usize {
    max_batch.max(1) * max_in_flight.max(1) * 5
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn busy(ps: &[i32]) -> BTreeSet<i32> {
        ps.iter().copied().collect()
    }

    #[test]
    fn nothing_waiting_starts_nothing() {
        assert!(!starts_now(0, 2, 0, 10, true));
    }

    #[test]
    fn the_first_batch_waits_for_the_linger() {
        assert!(!starts_now(0, 2, 3, 10, false));
        assert!(starts_now(0, 2, 3, 10, true));
    }

    #[test]
    fn a_full_batch_does_not_wait_for_the_linger() {
        assert!(starts_now(0, 2, 10, 10, false));
    }

    #[test]
    fn a_second_batch_starts_only_when_full() {
        assert!(!starts_now(1, 2, 9, 10, true));
        assert!(starts_now(1, 2, 10, 10, false));
    }

    #[test]
    fn no_batch_starts_beyond_the_limit_in_flight() {
        assert!(!starts_now(2, 2, 100, 10, true));
        assert!(!starts_now(1, 1, 100, 10, true));
    }

    #[test]
    fn a_limit_of_zero_in_flight_is_read_as_one() {
        assert!(starts_now(0, 0, 1, 10, true));
        assert!(!starts_now(1, 0, 100, 10, true));
    }

    #[test]
    fn busy_partitions_are_neither_counted_nor_taken() {
        let mut w = Waiting::default();
        w.push(0, "a");
        w.push(1, "b");
        assert_eq!(w.free(&busy(&[0])), 1);
        let (ps, taken) = w.take(&busy(&[0]), 10);
        assert_eq!((ps, taken), (vec![1], vec!["b"]));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn a_full_batch_cuts_the_last_partition_short_and_keeps_its_rest_in_order() {
        let mut w = Waiting::default();
        for i in 0..5 {
            w.push(3, i);
        }
        let (ps, taken) = w.take(&busy(&[]), 3);
        assert_eq!((ps, taken), (vec![3], vec![0, 1, 2]));
        let (_, rest) = w.take(&busy(&[]), 3);
        assert_eq!(rest, vec![3, 4]);
    }

    #[test]
    fn the_next_batch_starts_after_the_partition_the_last_one_started_with() {
        let mut w = Waiting::default();
        for p in 0..3 {
            w.push(p, p * 10);
            w.push(p, p * 10 + 1);
        }
        let (ps, _) = w.take(&busy(&[]), 2);
        assert_eq!(ps, vec![0]);
        let (ps, _) = w.take(&busy(&[]), 2);
        assert_eq!(ps, vec![1]);
        w.push(0, 99);
        let (ps, _) = w.take(&busy(&[]), 2);
        assert_eq!(ps, vec![2]);
        let (ps, _) = w.take(&busy(&[]), 2);
        assert_eq!(ps, vec![0]);
    }

    #[test]
    fn the_worker_receives_until_a_full_batch_waits_for_every_slot_and_one_more() {
        assert!(receives_now(5999, 5999, 2000, 2));
        assert!(!receives_now(6000, 6000, 2000, 2));
        assert!(!receives_now(4000, 4000, 2000, 1));
    }

    #[test]
    fn commands_on_busy_partitions_do_not_stop_the_worker_receiving() {
        // 9000 wait, but only 1000 of them on partitions no batch holds.
        assert!(receives_now(1000, 9000, 2000, 2));
    }

    #[test]
    fn the_worker_never_holds_more_than_its_bound() {
        assert_eq!(max_waiting(2000, 2), 20000);
        assert!(!receives_now(0, 20000, 2000, 2));
        assert!(receives_now(0, 19999, 2000, 2));
    }

    proptest! {
        /// However commands arrive and batches are taken (with any partitions
        /// busy), each partition's commands come out once each, in arrival order,
        /// and no batch exceeds its limit or touches a busy partition.
        #[test]
        fn every_command_comes_out_once_in_its_partitions_order(
            arrivals in proptest::collection::vec((0i32..6, any::<bool>()), 0..200),
            max in 1usize..20,
            busy_sets in proptest::collection::vec(proptest::collection::btree_set(0i32..6, 0..4), 1..50),
        ) {
            let mut w = Waiting::default();
            let mut out: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
            let mut round = 0;
            for (seq, (p, take_now)) in arrivals.iter().enumerate() {
                w.push(*p, (*p, seq));
                if *take_now {
                    let b = &busy_sets[round % busy_sets.len()];
                    round += 1;
                    let before = w.len();
                    let free = w.free(b);
                    let (ps, taken) = w.take(b, max);
                    prop_assert!(taken.len() <= max);
                    prop_assert_eq!(taken.len(), free.min(max));
                    prop_assert_eq!(w.len(), before - taken.len());
                    for (tp, s) in taken {
                        prop_assert!(!b.contains(&tp));
                        prop_assert!(ps.contains(&tp));
                        out.entry(tp).or_default().push(s);
                    }
                }
            }
            while !w.is_empty() {
                for (tp, s) in w.take(&BTreeSet::new(), max).1 {
                    out.entry(tp).or_default().push(s);
                }
            }
            prop_assert_eq!(out.values().map(Vec::len).sum::<usize>(), arrivals.len());
            for (p, seqs) in out {
                let expected: Vec<usize> =
                    arrivals.iter().enumerate().filter(|(_, (q, _))| *q == p).map(|(i, _)| i).collect();
                prop_assert_eq!(seqs, expected);
            }
        }
    }
}
