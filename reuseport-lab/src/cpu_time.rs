//! How busy the server's and the clients' CPUs were during a run, and the CPU time each
//! connection cost: the kernel's per-CPU time accounting (`/proc/stat`, the `cpuN` lines, in clock
//! ticks), read before and after the run.
//!
//! A CPU is busy for all its time but `idle` and `iowait`; `steal` (time the hypervisor ran
//! something else while this vCPU wanted to run) counts as busy, since the vCPU had work. The
//! kernel counts in ticks of `USER_HZ` (usually 100 per second), so a run of a few seconds over
//! several CPUs is exact to about a percent.

use std::{collections::BTreeMap, fs, io};

use reuseport::cpus::CpuList;
use serde::{Deserialize, Serialize};

/// Per-CPU time accounting, as totals or as the change over a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// CPU number → (busy ticks, all ticks).
    per_cpu: BTreeMap<u32, (u64, u64)>,
}

impl CpuTimes {
    /// Reads `/proc/stat` now.
    pub fn read() -> io::Result<Self> {
        Ok(Self::parse(&fs::read_to_string("/proc/stat")?))
    }

    /// Parses `/proc/stat`'s `cpuN user nice system idle iowait irq softirq steal guest
    /// guest_nice` lines (guest time is already inside user and nice; older kernels' shorter lines
    /// are read as far as they go). Other lines, and the all-CPU `cpu` line, are skipped.
    pub fn parse(text: &str) -> Self {
        let per_cpu = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let cpu: u32 = fields.next()?.strip_prefix("cpu")?.parse().ok()?;
                let ticks: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal; guest is inside user.
                let all: u64 = ticks.iter().take(8).sum();
                let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
                Some((cpu, (all.saturating_sub(idle), all)))
            })
            .collect();
        Self { per_cpu }
    }

    /// What accrued from `before` to `self`.
    pub fn since(&self, before: &Self) -> Self {
        let per_cpu = self
            .per_cpu
            .iter()
            .map(|(&cpu, &(busy, all))| {
                let (busy_before, all_before) = before.per_cpu.get(&cpu).copied().unwrap_or((0, 0));
                (
                    cpu,
                    (
                        busy.saturating_sub(busy_before),
                        all.saturating_sub(all_before),
                    ),
                )
            })
            .collect();
        Self { per_cpu }
    }

    /// Busy ticks and all ticks summed over `cpus`.
    fn sum(&self, cpus: &CpuList) -> (u64, u64) {
        cpus.iter()
            .filter_map(|cpu| self.per_cpu.get(&cpu))
            .fold((0, 0), |(busy, all), &(b, a)| (busy + b, all + a))
    }

    /// The share of `cpus`' time that was busy (0 to 1); `None` where no time passed on them.
    pub fn busy_fraction(&self, cpus: &CpuList) -> Option<f64> {
        let (busy, all) = self.sum(cpus);
        (all > 0).then(|| busy as f64 / all as f64)
    }

    /// Busy seconds summed over `cpus`.
    pub fn busy_seconds(&self, cpus: &CpuList) -> f64 {
        let ticks_per_second = rustix::param::clock_ticks_per_second();
        self.sum(cpus).0 as f64 / ticks_per_second.max(1) as f64
    }
}

/// One run's CPU use, as stored with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    /// Busy share of the server's CPUs (its workers and the receive processing placed there).
    pub server_busy: Option<f64>,
    /// Busy share of the load generators' CPUs (the same CPUs as the server's where they share).
    pub client_busy: Option<f64>,
    /// Busy seconds of every CPU of the experiment, server's and clients' together.
    pub busy_s: f64,
}

impl CpuUse {
    /// The use of `server` and `client` CPUs in `times` (a run's change).
    pub fn of(times: &CpuTimes, server: &CpuList, client: &CpuList) -> Self {
        let both: CpuList = server.iter().chain(client.iter()).collect();
        Self {
            server_busy: times.busy_fraction(server),
            client_busy: times.busy_fraction(client),
            busy_s: times.busy_seconds(&both),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        thread,
        time::{Duration, Instant},
    };

    use super::*;

    #[test]
    fn parses_busy_and_all_ticks_per_cpu() {
        let before = CpuTimes::parse(
            "cpu  100 0 100 800 0 0 0 0 0 0\n\
             cpu0 10 1 20 100 5 1 2 3 7 0\n\
             cpu1 0 0 0 50\n\
             intr 12345\n",
        );
        assert_eq!(before.per_cpu[&0], (10 + 1 + 20 + 1 + 2 + 3, 142));
        assert_eq!(before.per_cpu[&1], (0, 50));
        assert_eq!(before.per_cpu.len(), 2, "the all-CPU line is not a CPU");
        let after = CpuTimes::parse("cpu0 40 1 50 130 5 1 2 3 7 0\ncpu1 0 0 0 150\n");
        let run = after.since(&before);
        assert_eq!(run.per_cpu[&0], (60, 90));
        let cpu0: CpuList = [0].into_iter().collect();
        let both: CpuList = [0, 1].into_iter().collect();
        assert_eq!(run.busy_fraction(&cpu0), Some(60.0 / 90.0));
        assert_eq!(run.busy_fraction(&both), Some(60.0 / 190.0));
        let none: CpuList = [5].into_iter().collect();
        assert_eq!(run.busy_fraction(&none), None);
    }

    /// A thread spinning on one CPU for a second makes that CPU busy nearly all the time.
    #[test]
    fn a_spinning_thread_makes_its_cpu_busy() {
        let cpu = CpuList::allowed()
            .expect("allowed CPUs")
            .iter()
            .next()
            .expect("a CPU");
        let window = Instant::now();
        let before = CpuTimes::read().expect("/proc/stat");
        thread::spawn(move || {
            reuseport::cpus::pin_current_thread(cpu).expect("pin");
            let end = Instant::now() + Duration::from_secs(1);
            let mut spins = 0u64;
            while Instant::now() < end {
                spins = std::hint::black_box(spins + 1);
            }
        })
        .join()
        .expect("spinner");
        let run = CpuTimes::read().expect("/proc/stat").since(&before);
        let window = window.elapsed().as_secs_f64();
        let cpus: CpuList = [cpu].into_iter().collect();
        let busy = run.busy_fraction(&cpus).expect("time passed");
        assert!(
            busy > 0.9,
            "CPU {cpu} busy {busy:.3} while a thread spun on it"
        );
        // One CPU cannot be busy for longer than the window (plus a tick on either side).
        let seconds = run.busy_seconds(&cpus);
        assert!(
            seconds > 0.9 && seconds < window + 0.03,
            "{seconds} busy seconds in a {window} s window"
        );
    }
}
