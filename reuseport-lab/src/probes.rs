//! The experiment's probes: the tracepoint programs of `reuseport-ebpf/src/probes.rs`, attached
//! only while a run is measured, plus IPI counts from `/proc/interrupts`. Contended lock waits
//! come back by site and side ([`crate::locks`]).

use std::{collections::HashMap as StdHashMap, fs, io, path::Path};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapError, PerCpuArray, PerCpuHashMap},
    programs::{ProgramError, TracePoint},
};
use reuseport_common::{
    LockKey, LockStack, LockWait, ProbeCounts, lock_side, names, probe_config as cfg,
};
use serde::Serialize;
use thiserror::Error;

use crate::{
    kallsyms::{Kallsyms, KallsymsError},
    locks::{LockSite, group_sites, stack_cuts},
};

/// The probes BPF object (`reuseport-ebpf/src/probes.rs`: the tracepoint programs and their maps,
/// nothing else), built by this crate's `build.rs`.
pub static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reuseport-probes"));

/// Errors from attaching or reading the probes.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// tracefs is not mounted and could not be mounted.
    #[error("mounting tracefs on /sys/kernel/tracing failed")]
    Tracefs(#[source] io::Error),
    /// A tracepoint's `format` file is missing or lacks a field.
    #[error("tracepoint {tracepoint}: {problem}")]
    Format {
        /// `category/name`.
        tracepoint: String,
        /// What is wrong.
        problem: String,
    },
    /// Loading the BPF object failed.
    #[error("loading the probes failed")]
    Load(#[from] EbpfError),
    /// Loading or attaching a program failed.
    #[error("probe {name}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        #[source]
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("probe map operation failed")]
    Map(#[from] MapError),
    /// The object lacks a map or program this code expects.
    #[error("the BPF object has no {0}")]
    Missing(&'static str),
    /// `/proc/interrupts` could not be read.
    #[error("reading /proc/interrupts failed")]
    Interrupts(#[source] io::Error),
    /// Kernel stacks could not be named.
    #[error(transparent)]
    Kallsyms(#[from] KallsymsError),
    /// Only the server and the client are processes whose waits can be attributed.
    #[error("{0} is not a process's side: register the server's or the client's processes")]
    NotAProcessSide(crate::locks::Side),
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// The probes, attached to their tracepoints until dropped.
pub struct Probes {
    ebpf: Ebpf,
    /// The kernel's symbols as the probes were attached (`None` where they are hidden): where
    /// stacks are cut, and what names them.
    symbols: Option<Kallsyms>,
}

/// What the probes counted, summed over CPUs, plus the SYN CPUs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct ProbeTotals {
    /// Every counter summed over CPUs (lock contention and wakeups are machine-wide; the
    /// connection counters cover the followed server's connections).
    #[serde(flatten)]
    pub sum: ProbeCounts,
    /// Server connections seen entering `SYN_RECV`, per CPU (index = the SYN's CPU).
    pub syn_cpus: Vec<u64>,
    /// Contended lock waits by site, side and kind, most waited first (machine-wide; waits the
    /// maps had no room for are in `lock_unrecorded` instead).
    #[serde(default)]
    pub locks: Vec<LockSite>,
}

impl ProbeTotals {
    /// Closed connections followed from SYN to close.
    pub fn conns_closed(&self) -> u64 {
        self.sum.conn_cpus.iter().sum()
    }

    /// Mean number of distinct CPUs per closed connection (4 stands for "4 or more").
    pub fn cpus_per_conn(&self) -> Option<f64> {
        let weighted: u64 = (1..)
            .zip(self.sum.conn_cpus)
            .map(|(n, count)| n * count)
            .sum();
        reuseport::stats::fraction(weighted, self.conns_closed())
    }

    /// Fraction of closed connections touched by more than one CPU.
    pub fn cross_cpu_conn_fraction(&self) -> Option<f64> {
        reuseport::stats::fraction(
            self.conns_closed() - self.sum.conn_cpus[0],
            self.conns_closed(),
        )
    }
}

impl Probes {
    /// Loads the probes and attaches them; `server_port` selects the connections to follow.
    pub fn attach(server_port: u16) -> Result<Self, ProbeError> {
        mount_tracefs()?;
        let mut ebpf = EbpfLoader::new().load(PROBES_OBJECT)?;
        let offsets = [
            (cfg::WAKING_PID, "sched/sched_waking", "pid"),
            (cfg::WAKING_TARGET_CPU, "sched/sched_waking", "target_cpu"),
            (cfg::SET_STATE_SKADDR, "sock/inet_sock_set_state", "skaddr"),
            (
                cfg::SET_STATE_NEWSTATE,
                "sock/inet_sock_set_state",
                "newstate",
            ),
            (cfg::SET_STATE_SPORT, "sock/inet_sock_set_state", "sport"),
            (
                cfg::SET_STATE_PROTOCOL,
                "sock/inet_sock_set_state",
                "protocol",
            ),
            (cfg::RECV_SK, "sock/sock_recv_length", "sk"),
            (cfg::SEND_SK, "sock/sock_send_length", "sk"),
            (cfg::DATA_READY_SK, "sock/sk_data_ready", "skaddr"),
            (cfg::LOCK_BEGIN_ADDR, "lock/contention_begin", "lock_addr"),
            (cfg::LOCK_BEGIN_FLAGS, "lock/contention_begin", "flags"),
            (cfg::LOCK_END_ADDR, "lock/contention_end", "lock_addr"),
        ];
        {
            let map = ebpf
                .map_mut(names::PROBE_CONFIG)
                .ok_or(ProbeError::Missing(names::PROBE_CONFIG))?;
            let mut config = Array::<_, u32>::try_from(map)?;
            config.set(cfg::SERVER_PORT, u32::from(server_port), 0)?;
            for (slot, tracepoint, field) in offsets {
                config.set(slot, field_offset(tracepoint, field)?, 0)?;
            }
        }
        // Where the lock probes cut their stacks. Without kernel addresses (kallsyms hidden)
        // nothing is cut, and the stacks cannot be named anyway.
        let symbols = Kallsyms::load().ok();
        if let Some(symbols) = &symbols {
            let map = ebpf
                .map_mut(names::LOCK_STACK_CUTS)
                .ok_or(ProbeError::Missing(names::LOCK_STACK_CUTS))?;
            let mut cuts = Array::<_, u64>::try_from(map)?;
            for (index, (start, end)) in (0u32..).zip(stack_cuts(symbols)) {
                cuts.set(2 * index, start, 0)?;
                cuts.set(2 * index + 1, end, 0)?;
            }
        }
        for (name, category, tracepoint) in names::PROBES {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(ProbeError::Missing(name))?
                .try_into()
                .map_err(|source| ProbeError::Program { name, source })?;
            program
                .load()
                .map_err(|source| ProbeError::Program { name, source })?;
            program
                .attach(category, tracepoint)
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(Self { ebpf, symbols })
    }

    /// Counts wakeups of these threads as the server's.
    pub fn watch_threads(&mut self, tids: impl IntoIterator<Item = u32>) -> Result<(), ProbeError> {
        let map = self
            .ebpf
            .map_mut(names::SERVER_TIDS)
            .ok_or(ProbeError::Missing(names::SERVER_TIDS))?;
        let mut server_tids = HashMap::<_, u32, u8>::try_from(map)?;
        for tid in tids {
            server_tids.insert(tid, 1, 0)?;
        }
        Ok(())
    }

    /// Attributes the contended lock waits of process `pid` (all its threads) to `side`
    /// ([`Side::Server`](crate::locks::Side::Server) or
    /// [`Side::Client`](crate::locks::Side::Client); the others are refused: softirq is told
    /// from the stack, and `other` is what is not registered).
    pub fn watch_process(&mut self, pid: u32, side: crate::locks::Side) -> Result<(), ProbeError> {
        let value = match side {
            crate::locks::Side::Server => lock_side::SERVER,
            crate::locks::Side::Client => lock_side::CLIENT,
            side @ (crate::locks::Side::Softirq | crate::locks::Side::Other) => {
                return Err(ProbeError::NotAProcessSide(side));
            }
        };
        let map = self
            .ebpf
            .map_mut(names::LOCK_SIDES)
            .ok_or(ProbeError::Missing(names::LOCK_SIDES))?;
        HashMap::<_, u32, u32>::try_from(map)?.insert(pid, value, 0)?;
        Ok(())
    }

    /// Contended lock waits so far by site, with their stacks named from `/proc/kallsyms`.
    pub fn lock_sites(&self) -> Result<Vec<LockSite>, ProbeError> {
        let waits_map = self
            .ebpf
            .map(names::LOCK_WAITS)
            .ok_or(ProbeError::Missing(names::LOCK_WAITS))?;
        let waits_map = PerCpuHashMap::<_, LockKey, LockWait>::try_from(waits_map)?;
        let mut waits = Vec::new();
        for entry in waits_map.iter() {
            let (key, per_cpu) = entry?;
            let mut sum = LockWait::default();
            for wait in per_cpu.iter() {
                sum.count += wait.count;
                sum.wait_ns += wait.wait_ns;
            }
            waits.push((key, sum));
        }
        if waits.is_empty() {
            return Ok(Vec::new());
        }
        Ok(group_sites(waits, &self.lock_stacks()?))
    }

    /// The kernel stacks of the contended waits so far, by hash, each named from
    /// `/proc/kallsyms` (innermost first, cut below the softirq or interrupt entry:
    /// [`stack_cuts`]).
    pub fn lock_stacks(&self) -> Result<StdHashMap<u64, Vec<String>>, ProbeError> {
        let loaded;
        let symbols = match &self.symbols {
            Some(symbols) => symbols,
            None => {
                loaded = Kallsyms::load()?;
                &loaded
            }
        };
        let stacks_map = self
            .ebpf
            .map(names::LOCK_STACKS)
            .ok_or(ProbeError::Missing(names::LOCK_STACKS))?;
        let stacks_map = HashMap::<_, u64, LockStack>::try_from(stacks_map)?;
        let mut stacks = StdHashMap::new();
        for entry in stacks_map.iter() {
            let (hash, stack) = entry?;
            stacks.insert(hash, symbols.symbolize(&stack.frames));
        }
        Ok(stacks)
    }

    /// What the probes have counted so far.
    pub fn totals(&self) -> Result<ProbeTotals, ProbeError> {
        let map = self
            .ebpf
            .map(names::PROBE_COUNTS)
            .ok_or(ProbeError::Missing(names::PROBE_COUNTS))?;
        let per_cpu = PerCpuArray::<_, ProbeCounts>::try_from(map)?.get(&0, 0)?;
        let mut sum = ProbeCounts::default();
        for counts in per_cpu.iter() {
            sum.add(counts);
        }
        Ok(ProbeTotals {
            sum,
            syn_cpus: per_cpu.iter().map(|c| c.conns_opened).collect(),
            locks: self.lock_sites()?,
        })
    }
}

/// Mounts tracefs where the kernel and aya expect it, unless it is already there.
fn mount_tracefs() -> Result<(), ProbeError> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    rustix::mount::mount(
        "tracefs",
        TRACEFS,
        "tracefs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .map_err(|err| ProbeError::Tracefs(err.into()))
}

/// The byte offset of `field` in `tracepoint`'s record, from its `format` file, e.g.
/// `field:int target_cpu; offset:32; size:4; signed:1;`.
pub fn field_offset(tracepoint: &str, field: &str) -> Result<u32, ProbeError> {
    let path = Path::new(TRACEFS)
        .join("events")
        .join(tracepoint)
        .join("format");
    let problem = |problem: String| ProbeError::Format {
        tracepoint: tracepoint.to_owned(),
        problem,
    };
    let format = fs::read_to_string(&path)
        .map_err(|err| problem(format!("reading {}: {err}", path.display())))?;
    format
        .lines()
        .find_map(|line| {
            let (declaration, rest) = line.trim().strip_prefix("field:")?.split_once(';')?;
            let name = declaration.split_whitespace().last()?;
            let name = name.split('[').next()?;
            if name != field {
                return None;
            }
            rest.split(';')
                .find_map(|part| part.trim().strip_prefix("offset:"))
                .and_then(|offset| offset.parse().ok())
        })
        .ok_or_else(|| problem(format!("no field {field}")))
}

/// Rescheduling plus function-call IPIs received so far, over all CPUs (`RES` and `CAL` rows of
/// `/proc/interrupts`).
pub fn ipi_count() -> Result<u64, ProbeError> {
    let text = fs::read_to_string("/proc/interrupts").map_err(ProbeError::Interrupts)?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (name, counts) = line.trim_start().split_once(':')?;
            matches!(name, "RES" | "CAL").then_some(counts)
        })
        .flat_map(|counts| {
            counts
                .split_whitespace()
                .map_while(|word| word.parse::<u64>().ok())
        })
        .sum())
}
