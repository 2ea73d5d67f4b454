//! What a bench phase cost the whole machine in CPU, read from Linux's
//! `/proc/stat`: microseconds of CPU per transfer, command or pgbench transaction
//! (every process counted: load generator, cardflow's roles, the broker,
//! Postgres), the kernel's share of it, how busy the cores were and how much time
//! the hypervisor took from them (steal).
//!
//! Why: the targets are ratios against pgbench, and when both saturate the cores a
//! ratio is the inverse ratio of these costs. pgbench spends about half of its CPU
//! in the kernel (eight clients, a round trip per statement); the batched ledger
//! much less. A machine with cheaper system calls and context switches speeds
//! pgbench up more than cardflow and moves every ratio with no change in cardflow.
//! These figures show which side moved. Where `/proc/stat` cannot be read (not
//! Linux) they are absent, never zero.

use std::time::{Duration, Instant};

/// The aggregate `cpu` line of `/proc/stat`, in clock ticks since boot. Guest
/// time is already counted in user time, so it is not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    /// Parses the text of `/proc/stat`: its first, aggregate `cpu` line. Kernels
    /// before 2.6.11 have no steal column; it then reads as zero.
    pub fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
        let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        (v.len() >= 7).then(|| CpuTimes {
            user: at(0),
            nice: at(1),
            system: at(2),
            idle: at(3),
            iowait: at(4),
            irq: at(5),
            softirq: at(6),
            steal: at(7),
        })
    }

    fn kernel(&self) -> u64 {
        self.system + self.irq + self.softirq
    }

    fn busy(&self) -> u64 {
        self.user + self.nice + self.kernel()
    }

    fn total(&self) -> u64 {
        self.busy() + self.idle + self.iowait + self.steal
    }

    fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }
}

/// The CPU one operation of a phase cost the machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuCost {
    /// Microseconds of CPU, all processes, per operation.
    pub us_per_op: f64,
    /// The kernel's share of that CPU (system, irq, softirq), in percent.
    pub kernel_pct: f64,
    /// How busy the machine's cores were over the phase, in percent of all of them.
    pub busy_pct: f64,
    /// Time the hypervisor ran something else on the cores, in percent of all of them.
    pub steal_pct: f64,
}

/// The cost of `ops` operations done between two readings `wall` apart on a
/// machine of `cores` cores. Ticks are converted through the wall time (busy share
/// × cores × seconds), so the kernel's tick rate need not be known. None when
/// nothing was done or no tick passed.
pub fn cost(before: &CpuTimes, after: &CpuTimes, cores: usize, wall: Duration, ops: f64) -> Option<CpuCost> {
    let d = after.since(before);
    let (busy, total) = (d.busy() as f64, d.total() as f64);
    if total <= 0.0 || ops <= 0.0 || cores == 0 {
        return None;
    }
    let cpu_seconds = busy / total * cores as f64 * wall.as_secs_f64();
    Some(CpuCost {
        us_per_op: cpu_seconds * 1e6 / ops,
        kernel_pct: if busy > 0.0 { d.kernel() as f64 / busy * 100.0 } else { 0.0 },
        busy_pct: busy / total * 100.0,
        steal_pct: d.steal as f64 / total * 100.0,
    })
}

/// The cores `/proc/stat` lists (`cpu0`, `cpu1`, …): the machine's, not this
/// process's affinity, since every process of the phase is counted.
fn cores(stat: &str) -> usize {
    stat.lines()
        .filter(|l| l.strip_prefix("cpu").and_then(|r| r.chars().next()).is_some_and(|c| c.is_ascii_digit()))
        .count()
}

/// A reading of the machine's CPU at the start of a phase.
#[derive(Debug, Clone, Copy)]
pub struct CpuReading {
    times: CpuTimes,
    cores: usize,
    at: Instant,
}

impl CpuReading {
    /// None where `/proc/stat` cannot be read or parsed.
    pub fn now() -> Option<CpuReading> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        Some(CpuReading { times: CpuTimes::parse(&stat)?, cores: cores(&stat), at: Instant::now() })
    }

    /// What `ops` operations since this reading cost.
    pub fn cost_of(&self, ops: f64) -> Option<CpuCost> {
        let later = CpuReading::now()?;
        cost(&self.times, &later.times, self.cores, later.at - self.at, ops)
    }
}

/// The mean of several phases' costs (pgbench runs twice), field by field.
pub fn mean(costs: &[CpuCost]) -> Option<CpuCost> {
    let n = costs.len() as f64;
    let avg = |f: fn(&CpuCost) -> f64| costs.iter().map(f).sum::<f64>() / n;
    (!costs.is_empty()).then(|| CpuCost {
        us_per_op: avg(|c| c.us_per_op),
        kernel_pct: avg(|c| c.kernel_pct),
        busy_pct: avg(|c| c.busy_pct),
        steal_pct: avg(|c| c.steal_pct),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STAT: &str = "cpu  169888 0 27250 85139 593 0 3035 87 0 0
cpu0 84030 0 12913 44421 103 0 1525 37 0 0
cpu1 85857 0 14336 40718 489 0 1510 50 0 0
intr 2073668 0 0 0
ctxt 9368969
cpu_is_not_a_core_line 1 2 3 4 5 6 7
";

    fn times(user: u64, system: u64, idle: u64, steal: u64) -> CpuTimes {
        CpuTimes { user, system, idle, steal, ..CpuTimes::default() }
    }

    #[test]
    fn the_aggregate_line_is_read_field_by_field() {
        let t = CpuTimes::parse(STAT).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                user: 169888,
                nice: 0,
                system: 27250,
                idle: 85139,
                iowait: 593,
                irq: 0,
                softirq: 3035,
                steal: 87
            }
        );
    }

    #[test]
    fn the_cores_are_the_numbered_cpu_lines() {
        assert_eq!(cores(STAT), 2);
    }

    #[test]
    fn a_kernel_without_a_steal_column_reads_it_as_zero() {
        let t = CpuTimes::parse("cpu 10 0 5 100 0 0 1\n").unwrap();
        assert_eq!(t.steal, 0);
        assert_eq!(t.softirq, 1);
    }

    #[test]
    fn text_without_a_whole_cpu_line_is_not_a_reading() {
        assert_eq!(CpuTimes::parse("intr 1 2 3\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 3\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 x 4 5 6 7\n"), None);
    }

    #[test]
    fn two_saturated_cores_for_a_second_at_1000_operations_cost_2000_microseconds_each() {
        let c = cost(&times(0, 0, 0, 0), &times(150, 50, 0, 0), 2, Duration::from_secs(1), 1000.0).unwrap();
        assert!((c.us_per_op - 2000.0).abs() < 1e-9, "{c:?}");
        assert!((c.busy_pct - 100.0).abs() < 1e-9);
        assert!((c.kernel_pct - 25.0).abs() < 1e-9);
        assert_eq!(c.steal_pct, 0.0);
    }

    #[test]
    fn idle_time_is_not_charged_to_the_operations() {
        let c = cost(&times(0, 0, 0, 0), &times(100, 0, 100, 0), 2, Duration::from_secs(1), 1000.0).unwrap();
        assert!((c.us_per_op - 1000.0).abs() < 1e-9, "{c:?}");
        assert!((c.busy_pct - 50.0).abs() < 1e-9);
    }

    #[test]
    fn stolen_time_is_reported_and_not_charged_to_the_operations() {
        let c = cost(&times(0, 0, 0, 0), &times(150, 0, 0, 50), 2, Duration::from_secs(1), 1000.0).unwrap();
        assert!((c.steal_pct - 25.0).abs() < 1e-9, "{c:?}");
        assert!((c.us_per_op - 1500.0).abs() < 1e-9, "{c:?}");
    }

    #[test]
    fn no_operations_or_no_ticks_give_no_cost() {
        let t = times(100, 0, 100, 0);
        assert_eq!(cost(&times(0, 0, 0, 0), &t, 2, Duration::from_secs(1), 0.0), None);
        assert_eq!(cost(&t, &t, 2, Duration::from_secs(1), 10.0), None);
    }

    #[test]
    fn the_mean_of_no_costs_is_none_and_of_two_is_field_by_field() {
        assert_eq!(mean(&[]), None);
        let a = CpuCost { us_per_op: 100.0, kernel_pct: 50.0, busy_pct: 90.0, steal_pct: 0.0 };
        let b = CpuCost { us_per_op: 300.0, kernel_pct: 30.0, busy_pct: 100.0, steal_pct: 2.0 };
        assert_eq!(mean(&[a, b]), Some(CpuCost { us_per_op: 200.0, kernel_pct: 40.0, busy_pct: 95.0, steal_pct: 1.0 }));
    }

    #[test]
    fn this_machine_can_be_read_where_proc_stat_exists() {
        if std::path::Path::new("/proc/stat").exists() {
            let r = CpuReading::now().expect("a reading");
            assert!(r.cores >= 1);
        }
    }

    proptest! {
        #[test]
        fn shares_stay_within_the_machine(
            user in 0u64..1_000_000, system in 0u64..1_000_000, idle in 0u64..1_000_000,
            steal in 0u64..1_000_000, cores in 1usize..64, ms in 1u64..100_000, ops in 1u32..1_000_000,
        ) {
            let before = times(0, 0, 0, 0);
            let after = times(user, system, idle, steal);
            if let Some(c) = cost(&before, &after, cores, Duration::from_millis(ms), f64::from(ops)) {
                prop_assert!((0.0..=100.0).contains(&c.kernel_pct));
                prop_assert!((0.0..=100.0).contains(&c.busy_pct));
                prop_assert!((0.0..=100.0).contains(&c.steal_pct));
                prop_assert!(c.busy_pct + c.steal_pct <= 100.0 + 1e-9);
                // Never more CPU than the cores had over the wall time.
                let cpu_s = c.us_per_op * f64::from(ops) / 1e6;
                prop_assert!(cpu_s <= cores as f64 * ms as f64 / 1000.0 * (1.0 + 1e-9));
            } else {
                prop_assert_eq!(user + system + idle + steal, 0);
            }
        }

        #[test]
        fn a_counter_that_went_backwards_never_yields_a_negative_cost(
            a in 0u64..1000, b in 0u64..1000, c in 0u64..1000, d in 0u64..1000,
        ) {
            if let Some(cost) = cost(&times(a, b, 0, 0), &times(c, d, 10, 0), 2, Duration::from_secs(1), 1.0) {
                prop_assert!(cost.us_per_op >= 0.0);
            }
        }
    }
}
