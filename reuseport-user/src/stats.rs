//! What a running server has done: per-CPU worker counters, the steering program's counters and
//! cost, the once-a-second live line and the final summary (also as JSON).

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use reuseport_common::SteeringStats;
use serde::{Deserialize, Serialize};

use crate::{
    listeners::Protocol, spill::SpillCounters, steering::ProgramRunStats, steering::SteeringMode,
};

/// One worker's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WorkerStats {
    /// The CPU the worker is pinned to.
    pub cpu: u32,
    /// Connections accepted (TCP) or datagrams received (UDP).
    pub accepted: u64,
    /// Of those, how many arrived on the worker's own CPU (`SO_INCOMING_CPU == cpu`).
    pub local: u64,
    /// Of those, how many had no known incoming CPU (UDP: see [`WorkerStats::locality`]).
    pub unknown_incoming: u64,
    /// HTTP requests answered (TCP) or datagrams answered (UDP).
    pub requests: u64,
    /// Failed accepts, receives or sends.
    pub errors: u64,
    /// TCP connections closed because a request head or the next request did not arrive in time
    /// (see [`crate::connections::Timeouts`]).
    pub timed_out: u64,
    /// TCP connections closed while waiting for a request, to free a file descriptor for a new
    /// one (see [`crate::connections::Shedder`]).
    pub shed: u64,
}

impl WorkerStats {
    /// Adds `other`'s counters into `self` (the CPU stays `self`'s).
    pub fn add(&mut self, other: &Self) {
        self.accepted += other.accepted;
        self.local += other.local;
        self.unknown_incoming += other.unknown_incoming;
        self.requests += other.requests;
        self.errors += other.errors;
        self.timed_out += other.timed_out;
        self.shed += other.shed;
    }

    /// `local` over the arrivals whose incoming CPU is known; `None` if there are none (always
    /// the case for UDP, where the kernel does not record `SO_INCOMING_CPU` on unconnected
    /// sockets: use the steering counters there).
    pub fn locality(&self) -> Option<f64> {
        fraction(
            self.local,
            self.accepted.saturating_sub(self.unknown_incoming),
        )
    }
}

/// Connection requests the kernel moved from a closing listener to a live one of its group
/// (`TCPMigrateReqSuccess` / `TCPMigrateReqFailure` in `/proc/net/netstat`). The kernel counts
/// them per network namespace, so other servers in the namespace add to them too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migrations {
    /// Requests moved to a live listener instead of being reset.
    pub success: u64,
    /// Requests that could not be moved (reset).
    pub failure: u64,
}

impl Migrations {
    /// The kernel's counters now.
    pub fn read() -> Self {
        let counters = crate::procfs::tcp_ext_counters();
        let get = |name: &str| counters.get(name).copied().unwrap_or(0);
        Self {
            success: get("TCPMigrateReqSuccess"),
            failure: get("TCPMigrateReqFailure"),
        }
    }

    /// The migrations between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            success: self.success.saturating_sub(earlier.success),
            failure: self.failure.saturating_sub(earlier.failure),
        }
    }
}

/// Everything the server counts, at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Time since the server started.
    pub elapsed: Duration,
    /// One entry per worker, in CPU order.
    pub workers: Vec<WorkerStats>,
    /// The steering program's counters per receiving CPU (index = CPU); `None` in hash mode.
    pub steering: Option<Vec<SteeringStats>>,
    /// The steering program's run count and time; `None` in hash mode or without BPF statistics.
    pub program: Option<ProgramRunStats>,
    /// Requests migrated by the kernel since the server started (see [`Migrations`]).
    pub migrations: Migrations,
    /// Workers restarted since the server started (`Server::restart_workers`, SIGHUP).
    pub restarts: u64,
    /// The spill sampler's counters (`percpu-spill`).
    pub spill: Option<SpillCounters>,
    /// The CPUs spilling at this moment (`percpu-spill`), in ascending order.
    pub spilling: Vec<u32>,
}

/// Fraction of `local` in `total`, `None` when `total` is 0.
pub fn fraction(local: u64, total: u64) -> Option<f64> {
    (total > 0).then(|| local as f64 / total as f64)
}

/// The share of the connections received on one CPU that the program gave to that CPU's own
/// listener (so that the receiving, accepting and serving CPU are the same), out of every
/// selection it made there, failed ones included; `None` before the first.
pub fn same_cpu_ratio(stats: &SteeringStats) -> Option<f64> {
    fraction(stats.local, stats.total() + stats.errors)
}

impl Snapshot {
    /// Worker counters summed over all workers.
    pub fn totals(&self) -> WorkerStats {
        self.workers
            .iter()
            .fold(WorkerStats::default(), |mut sum, w| {
                sum.add(w);
                sum
            })
    }

    /// The steering counters summed over all CPUs.
    pub fn steering_totals(&self) -> Option<SteeringStats> {
        self.steering.as_ref().map(|per_cpu| {
            per_cpu
                .iter()
                .fold(SteeringStats::default(), |mut sum, cpu| {
                    sum.add(cpu);
                    sum
                })
        })
    }

    /// What happened between `earlier` and `self` (counters subtracted).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let workers = self
            .workers
            .iter()
            .map(|now| {
                let before = earlier
                    .workers
                    .iter()
                    .find(|w| w.cpu == now.cpu)
                    .copied()
                    .unwrap_or_default();
                WorkerStats {
                    cpu: now.cpu,
                    accepted: now.accepted.saturating_sub(before.accepted),
                    local: now.local.saturating_sub(before.local),
                    unknown_incoming: now.unknown_incoming.saturating_sub(before.unknown_incoming),
                    requests: now.requests.saturating_sub(before.requests),
                    errors: now.errors.saturating_sub(before.errors),
                    timed_out: now.timed_out.saturating_sub(before.timed_out),
                    shed: now.shed.saturating_sub(before.shed),
                }
            })
            .collect();
        let steering = self.steering.as_ref().map(|now| {
            now.iter()
                .enumerate()
                .map(|(cpu, now)| {
                    let before = earlier
                        .steering
                        .as_ref()
                        .and_then(|before| before.get(cpu))
                        .copied()
                        .unwrap_or_default();
                    SteeringStats {
                        local: now.local.saturating_sub(before.local),
                        spilled: now.spilled.saturating_sub(before.spilled),
                        fallback: now.fallback.saturating_sub(before.fallback),
                        unsteered: now.unsteered.saturating_sub(before.unsteered),
                        errors: now.errors.saturating_sub(before.errors),
                        held: now.held.saturating_sub(before.held),
                    }
                })
                .collect()
        });
        let program = match (self.program, earlier.program) {
            (Some(now), Some(before)) => Some(now.since(&before)),
            (now, _) => now,
        };
        Snapshot {
            elapsed: self.elapsed.saturating_sub(earlier.elapsed),
            workers,
            steering,
            program,
            migrations: self.migrations.since(&earlier.migrations),
            restarts: self.restarts.saturating_sub(earlier.restarts),
            spill: self.spill,
            spilling: self.spilling.clone(),
        }
    }

    /// The compact live line for the interval `self` covers (a [`Snapshot::since`] result):
    ///
    /// ```text
    /// 12s | cpu0 1204 conn 100.0% local | cpu1 1187 conn 100.0% local | bpf local 2391 fallback 0 hash 0 err 0 | 41 ns/select
    /// ```
    pub fn live_line(&self, total_elapsed: Duration) -> String {
        let mut line = format!("{:>4}s", total_elapsed.as_secs());
        for worker in &self.workers {
            let _ = write!(
                line,
                " | cpu{} {} conn {} local",
                worker.cpu,
                worker.accepted,
                percent(worker.locality())
            );
        }
        match self.steering_totals() {
            Some(bpf) => {
                let _ = write!(line, " | bpf local {}", bpf.local);
                if bpf.spilled > 0 {
                    let _ = write!(line, " spilled {}", bpf.spilled);
                }
                let _ = write!(
                    line,
                    " fallback {} hash {} err {}",
                    bpf.fallback, bpf.unsteered, bpf.errors
                );
                if bpf.held > 0 {
                    let _ = write!(line, " held {}", bpf.held);
                }
                match self.program.and_then(|p| p.ns_per_run()) {
                    Some(ns) => {
                        let _ = write!(line, " | {ns:.0} ns/select");
                    }
                    None => line.push_str(" | - ns/select"),
                }
            }
            None => line.push_str(" | no eBPF counters"),
        }
        if self.restarts > 0 {
            let _ = write!(line, " | restarted {}", self.restarts);
        }
        if self.migrations != Migrations::default() {
            let _ = write!(
                line,
                " | migrated {} failed {}",
                self.migrations.success, self.migrations.failure
            );
        }
        line
    }
}

/// `97.3%`, or `-` when there is nothing to divide.
pub fn percent(fraction: Option<f64>) -> String {
    fraction.map_or_else(|| "-".to_owned(), |f| format!("{:.1}%", f * 100.0))
}

/// The end-of-run report: printed as a table ([`Summary::table`]), or serialized as JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// How connections were steered.
    pub mode: SteeringMode,
    /// The transport protocol.
    pub protocol: Protocol,
    /// The address served.
    pub listen: SocketAddr,
    /// Seconds from start to stop.
    pub duration_s: f64,
    /// Per worker, in CPU order, with `locality` = local / arrivals with a known incoming CPU.
    pub workers: Vec<WorkerSummary>,
    /// All workers together.
    pub total: WorkerSummary,
    /// The steering program's counters and cost; null in hash mode.
    pub steering: Option<SteeringSummary>,
    /// Requests the kernel migrated from closing listeners (network-namespace wide).
    pub migrations: Migrations,
    /// Workers restarted (SIGHUP).
    pub restarts: u64,
    /// The spill sampler's counters (`percpu-spill`); null otherwise.
    pub spill: Option<SpillCounters>,
}

/// One worker's (or all workers') counters plus locality.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct WorkerSummary {
    /// The worker's CPU; absent for the total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// Connections accepted (TCP) or datagrams received (UDP).
    pub accepted: u64,
    /// Of those, how many arrived on the worker's own CPU.
    pub local: u64,
    /// Of those, how many had no known incoming CPU.
    pub unknown_incoming: u64,
    /// Requests (TCP) or datagrams (UDP) answered.
    pub requests: u64,
    /// Failed accepts, receives or sends.
    pub errors: u64,
    /// TCP connections closed by the header or idle timeout.
    #[serde(default)]
    pub timed_out: u64,
    /// TCP connections closed while idle to free a file descriptor for a new one.
    #[serde(default)]
    pub shed: u64,
    /// `local / (accepted - unknown_incoming)`, null when that is 0.
    pub locality: Option<f64>,
}

impl WorkerSummary {
    fn new(cpu: Option<u32>, stats: WorkerStats) -> Self {
        Self {
            cpu,
            accepted: stats.accepted,
            local: stats.local,
            unknown_incoming: stats.unknown_incoming,
            requests: stats.requests,
            errors: stats.errors,
            timed_out: stats.timed_out,
            shed: stats.shed,
            locality: stats.locality(),
        }
    }
}

/// The steering program's share of the summary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SteeringSummary {
    /// Counters per receiving CPU (only CPUs where the program ran).
    pub per_cpu: Vec<SteeringCpu>,
    /// Counters over all CPUs.
    pub total: SteeringCounters,
    /// Runs and time from the kernel's BPF statistics (null if they could not be enabled).
    pub program: Option<ProgramRunStats>,
    /// Mean nanoseconds per selection (null without statistics or runs).
    pub ns_per_select: Option<f64>,
}

/// Serializable copy of [`SteeringStats`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct SteeringCounters {
    /// Steered to the receiving CPU's listener.
    pub local: u64,
    /// Steered to another CPU's listener because the receiving CPU was spilling (spill mode).
    pub spilled: u64,
    /// Steered to the fallback CPU's listener (local slot empty).
    pub fallback: u64,
    /// Left to the kernel's hash (no live slot found).
    pub unsteered: u64,
    /// Helper errors other than an empty slot.
    pub errors: u64,
    /// Refused while the server was starting: the receiving CPU's listener was not in place yet.
    /// (Absent from summaries written before it existed: read as 0.)
    #[serde(default)]
    pub held: u64,
}

impl From<SteeringStats> for SteeringCounters {
    fn from(s: SteeringStats) -> Self {
        Self {
            local: s.local,
            spilled: s.spilled,
            fallback: s.fallback,
            unsteered: s.unsteered,
            errors: s.errors,
            held: s.held,
        }
    }
}

/// Steering counters of one receiving CPU.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct SteeringCpu {
    /// The CPU that received the connections.
    pub cpu: u32,
    /// What the program did with them.
    #[serde(flatten)]
    pub counters: SteeringCounters,
}

impl Summary {
    /// Builds the summary of a whole run from its final snapshot.
    pub fn new(
        mode: SteeringMode,
        protocol: Protocol,
        listen: SocketAddr,
        last: &Snapshot,
    ) -> Self {
        let steering = last.steering.as_ref().map(|per_cpu| SteeringSummary {
            per_cpu: (0..)
                .zip(per_cpu)
                .filter(|(_, s)| s.total() + s.errors > 0)
                .map(|(cpu, s)| SteeringCpu {
                    cpu,
                    counters: (*s).into(),
                })
                .collect(),
            total: last.steering_totals().unwrap_or_default().into(),
            program: last.program,
            ns_per_select: last.program.and_then(|p| p.ns_per_run()),
        });
        Self {
            mode,
            protocol,
            listen,
            duration_s: last.elapsed.as_secs_f64(),
            workers: last
                .workers
                .iter()
                .map(|w| WorkerSummary::new(Some(w.cpu), *w))
                .collect(),
            total: WorkerSummary::new(None, last.totals()),
            steering,
            migrations: last.migrations,
            restarts: last.restarts,
            spill: last.spill,
        }
    }

    /// The human-readable end-of-run table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "summary: mode {} {} on {} for {:.1}s\n  {:<6} {:>10} {:>10} {:>9} {:>7}\n",
            self.mode,
            match self.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            },
            self.listen,
            self.duration_s,
            "worker",
            "accepted",
            "requests",
            "locality",
            "errors"
        );
        let rows = self
            .workers
            .iter()
            .map(|w| (format!("cpu{}", w.cpu.unwrap_or_default()), w))
            .chain([("total".to_owned(), &self.total)]);
        for (name, w) in rows {
            let _ = writeln!(
                out,
                "  {:<6} {:>10} {:>10} {:>9} {:>7}",
                name,
                w.accepted,
                w.requests,
                percent(w.locality),
                w.errors
            );
        }
        match &self.steering {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "  bpf: local {} spilled {} fallback {} hash {} errors {} held {}; {}",
                    s.total.local,
                    s.total.spilled,
                    s.total.fallback,
                    s.total.unsteered,
                    s.total.errors,
                    s.total.held,
                    match (s.program, s.ns_per_select) {
                        (Some(program), Some(ns)) => {
                            format!("{ns:.1} ns/select over {} runs", program.run_count)
                        }
                        (Some(_), None) => "no selections yet".to_owned(),
                        (None, _) => "ns/select unavailable (BPF run-time statistics need CAP_SYS_ADMIN or sysctl kernel.bpf_stats_enabled=1)".to_owned(),
                    }
                );
            }
            None => {
                let how = match self.mode {
                    SteeringMode::Cbpf => {
                        "classic BPF filter `ld cpu; ret a`, which counts nothing"
                    }
                    SteeringMode::IncomingCpu => "SO_INCOMING_CPU preference, which counts nothing",
                    _ => "kernel hash selection",
                };
                let _ = writeln!(out, "  bpf: none ({how})");
            }
        }
        if let Some(spill) = self.spill {
            let _ = writeln!(
                out,
                "  spill: {} samples, {} spill starts, deepest queue {}",
                spill.samples, spill.spill_starts, spill.max_depth
            );
        }
        if self.protocol == Protocol::Tcp {
            let _ = writeln!(
                out,
                "  connections closed: {} by the header or idle timeout, {} shed for want of file \
                 descriptors",
                self.total.timed_out, self.total.shed
            );
        }
        let _ = writeln!(
            out,
            "  restarts: {} workers; kernel migrated {} queued requests, failed {} \
             (TCPMigrateReq*, whole network namespace)",
            self.restarts, self.migrations.success, self.migrations.failure
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(accepted: u64, local: u64, bpf_local: u64) -> Snapshot {
        Snapshot {
            elapsed: Duration::from_secs(accepted),
            workers: vec![WorkerStats {
                cpu: 1,
                accepted,
                local,
                unknown_incoming: 0,
                requests: accepted,
                ..Default::default()
            }],
            steering: Some(vec![
                SteeringStats::default(),
                SteeringStats {
                    local: bpf_local,
                    ..Default::default()
                },
            ]),
            program: Some(ProgramRunStats {
                run_count: bpf_local,
                run_time_ns: bpf_local * 40,
            }),
            migrations: Migrations::default(),
            restarts: 0,
            spill: None,
            spilling: Vec::new(),
        }
    }

    #[test]
    fn live_line_shows_the_interval() {
        let interval = snapshot(30, 30, 30).since(&snapshot(10, 10, 10));
        assert_eq!(
            interval.live_line(Duration::from_secs(3)),
            "   3s | cpu1 20 conn 100.0% local | bpf local 20 fallback 0 hash 0 err 0 | 40 ns/select"
        );
    }

    #[test]
    fn live_line_adds_restarts_and_migrations_only_when_they_happened() {
        let mut later = snapshot(30, 30, 30);
        later.restarts = 2;
        later.migrations = Migrations {
            success: 5,
            failure: 0,
        };
        let line = later
            .since(&snapshot(10, 10, 10))
            .live_line(Duration::from_secs(3));
        assert!(
            line.ends_with("| 40 ns/select | restarted 2 | migrated 5 failed 0"),
            "{line}"
        );
    }

    #[test]
    fn summary_reports_locality_and_cost() {
        let summary = Summary::new(
            SteeringMode::Percpu,
            Protocol::Tcp,
            "127.0.0.1:1".parse().unwrap(),
            &snapshot(4, 3, 4),
        );
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["total"]["locality"], 0.75);
        assert!(json["total"].get("cpu").is_none());
        assert_eq!(json["workers"][0]["cpu"], 1);
        assert_eq!(json["steering"]["ns_per_select"], 40.0);
        assert_eq!(json["steering"]["per_cpu"][0]["cpu"], 1);
        assert_eq!(json["mode"], "percpu");
    }

    #[test]
    fn summary_says_whether_nothing_ran_or_statistics_are_off() {
        let summary = |program| {
            let mut idle = snapshot(0, 0, 0);
            idle.program = program;
            Summary::new(
                SteeringMode::Percpu,
                Protocol::Tcp,
                "127.0.0.1:1".parse().unwrap(),
                &idle,
            )
            .table()
        };
        let no_runs = summary(Some(ProgramRunStats::default()));
        assert!(no_runs.contains("; no selections yet"), "{no_runs}");
        assert!(!no_runs.contains("CAP_SYS_ADMIN"), "{no_runs}");
        let off = summary(None);
        assert!(off.contains("ns/select unavailable"), "{off}");
    }
}
