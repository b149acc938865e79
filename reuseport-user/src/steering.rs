//! The one steering code path: load the BPF object, fill slot CPU → listener, attach the program to
//! the reuseport group, read its counters, detach. `serve`, the library API and (later) `attach`
//! all go through [`Steering`].

use std::{
    collections::BTreeSet,
    fs, io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, MapError, MapType, PerCpuArray},
    programs::{ProgramError, ProgramType, SkReuseport},
    sys::{Stats, enable_stats, is_map_supported, is_program_supported},
};
use reuseport_common::{HOLD, SpillRoute, SteeringStats, names};
use serde::Serialize;
use thiserror::Error;

use crate::{
    cpu_topology::CpuTopology,
    cpus::{CpuError, possible_cpus},
    sockarray,
};

/// The steering BPF object (`reuseport-ebpf/src/select.rs`: the steering programs and their maps,
/// nothing else) built by this crate's `build.rs`.
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reuseport-steering"));

/// How the kernel chooses a listener of the reuseport group for each new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SteeringMode {
    /// Our `SK_REUSEPORT` program picks the listener of the worker pinned to the CPU that received
    /// the SYN, so the connection's whole life stays on that CPU.
    Percpu,
    /// No program: the kernel's default selection by a hash of the 4-tuple.
    Hash,
    /// A classic BPF filter returning the CPU as the listener's index in the group (no
    /// privileges needed; drifts when a listener closes, see [`crate::cbpf`]).
    Cbpf,
    /// No program: each listener's `SO_INCOMING_CPU` is its worker's CPU, which the kernel's
    /// selection prefers since Linux 6.2 (see [`crate::incoming_cpu`]).
    IncomingCpu,
    /// `percpu`, except that an overloaded CPU spreads its excess new connections over several
    /// listeners, nearest first, until the skew ends (see [`crate::spill`]).
    PercpuSpill,
    /// `percpu-spill` when this process may load BPF programs, else `incoming-cpu` when the kernel
    /// honours it, else `cbpf` (see [`crate::strategy::choose`]).
    Auto,
}

impl std::fmt::Display for SteeringMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Percpu => "percpu",
            Self::PercpuSpill => "percpu-spill",
            Self::Hash => "hash",
            Self::Cbpf => "cbpf",
            Self::IncomingCpu => "incoming-cpu",
            Self::Auto => "auto",
        })
    }
}

/// Which `SK_REUSEPORT` program [`Steering`] attaches ([`SteeringProgram::recommended`] unless
/// asked otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SteeringProgram {
    /// `steer_to_cpu`: the listener of the receiving CPU, select only: connections queued on a
    /// listener that closes are reset (the default before Linux 5.14).
    SteerToCpu,
    /// `steer_migrate`: the same choice, attached as select-or-migrate (Linux >= 5.14), so that
    /// connections queued on a listener that closes move to a live listener (its replacement
    /// on the same CPU, else the nearest live CPU's) instead of being reset. The default where
    /// the kernel has it.
    SteerMigrate,
    /// `steer_noop`: selects nothing (the kernel hashes). For calibrating the ns/select figure:
    /// its cost is the floor the kernel's BPF statistics report on this machine.
    Noop,
    /// `steer_select`: only `bpf_sk_select_reuseport` of the local slot, no counters. For
    /// calibrating: its cost above `noop`'s is the kernel helper's, which any steering pays.
    SelectOnly,
}

/// The short name, as in JSON: `steer-to-cpu`, `steer-migrate`, `noop`, `select-only`.
impl std::fmt::Display for SteeringProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SteerToCpu => "steer-to-cpu",
            Self::SteerMigrate => "steer-migrate",
            Self::Noop => "noop",
            Self::SelectOnly => "select-only",
        })
    }
}

/// The first kernel with `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`.
pub const FIRST_MIGRATING_KERNEL: (u32, u32) = (5, 14);

impl SteeringProgram {
    /// `steer-migrate` where the running kernel can migrate (Linux >= 5.14), else `steer-to-cpu`.
    pub fn recommended() -> Self {
        Self::recommended_for(&crate::kernel::release())
    }

    /// [`SteeringProgram::recommended`] for kernel `release`.
    pub fn recommended_for(release: &str) -> Self {
        if crate::kernel::release_at_least(release, FIRST_MIGRATING_KERNEL) {
            Self::SteerMigrate
        } else {
            Self::SteerToCpu
        }
    }

    /// The program's name in the object (and in `bpftool prog show`).
    pub fn name(self) -> &'static str {
        match self {
            Self::SteerToCpu => names::STEER_TO_CPU,
            Self::SteerMigrate => names::STEER_MIGRATE,
            Self::Noop => names::STEER_NOOP,
            Self::SelectOnly => names::STEER_SELECT,
        }
    }
}

/// Errors from loading, filling, attaching or reading the steering program.
#[derive(Debug, Error)]
pub enum SteeringError {
    /// The process lacks the capability to load BPF programs.
    #[error(
        "per-CPU steering loads a BPF program, which needs CAP_BPF (or CAP_SYS_ADMIN, e.g. root); \
         this process has neither"
    )]
    MissingCapabilities,
    /// The kernel cannot run `SK_REUSEPORT` programs or has no `REUSEPORT_SOCKARRAY` maps.
    #[error(
        "this kernel does not support {what} (Linux >= 4.19 with CONFIG_BPF_SYSCALL is needed)"
    )]
    Unsupported {
        /// The missing feature.
        what: &'static str,
    },
    /// The socket for a slot is already in another steering program's map: the group is steered
    /// by another process (a running `attach`, or persisted steering).
    #[error(
        "the listener for CPU {cpu} is already in another steering map: this group is steered \
         already (by a running attach, persisted steering, or an attach that was killed); \
         `reuseport status` shows which, `reuseport detach --port PORT` removes it"
    )]
    AlreadySteered {
        /// The slot whose socket is taken.
        cpu: u32,
    },
    /// [`Steering::attach`] was given no sockets.
    #[error("no listeners to steer")]
    NoListeners,
    /// A CPU number beyond the kernel's possible CPUs.
    #[error("CPU {cpu} has no steering slot: this kernel has {possible} possible CPUs")]
    CpuOutOfRange {
        /// The CPU asked for.
        cpu: u32,
        /// `/sys/devices/system/cpu/possible` as a count.
        possible: u32,
    },
    /// The embedded BPF object lacks a program or map this code expects.
    #[error("the BPF object has no {0}; was it built from this source tree?")]
    MissingFromObject(&'static str),
    /// Reading the CPU topology failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// Reading this process's capabilities failed.
    #[error("reading /proc/self/status failed")]
    Capabilities(#[source] io::Error),
    /// Loading the object (creating its maps) failed.
    #[error("loading the BPF object failed")]
    Load(#[from] EbpfError),
    /// Loading, attaching or querying the program failed.
    #[error("BPF program")]
    Program(#[from] ProgramError),
    /// Updating or reading a map failed.
    #[error("BPF map operation failed")]
    Map(#[from] MapError),
    /// The kernel refused filling, emptying or reading a `cpu_listeners` slot.
    #[error(transparent)]
    Slot(#[from] crate::sockarray::SlotError),
    /// Pinning the program or a map to bpffs failed.
    #[error("pinning to bpffs failed")]
    Pin(#[from] aya::pin::PinError),
    /// Duplicating a map's file descriptor (for a second handle on it) failed.
    #[error("duplicating the {0} map's file descriptor failed")]
    DuplicateMap(&'static str, #[source] io::Error),
    /// The feature probe itself failed.
    #[error("probing kernel BPF support failed")]
    Probe(#[source] io::Error),
}

/// How often and for how long the steering program ran, from the kernel's BPF run-time statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProgramRunStats {
    /// Times the program ran (one per TCP SYN or UDP datagram reaching the group).
    pub run_count: u64,
    /// Total nanoseconds spent in the program.
    pub run_time_ns: u64,
}

impl ProgramRunStats {
    /// Mean nanoseconds per run, `None` before the first run.
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.run_count > 0).then(|| self.run_time_ns as f64 / self.run_count as f64)
    }

    /// The runs between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            run_count: self.run_count.saturating_sub(earlier.run_count),
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
        }
    }
}

/// The steering program, loaded and attached to one reuseport group.
///
/// Slot N of its `cpu_listeners` map holds the listener of the worker pinned to CPU N; a
/// connection arriving on CPU N goes to that listener, or, if slot N is empty, to the nearest live
/// CPU's (see `reuseport-ebpf/src/select.rs`).
///
/// The map does not keep sockets alive: a listener that closes leaves its slot empty by itself.
/// Like aya's [`SkReuseport`], dropping a `Steering` does not detach the program (the group keeps
/// using it until the group's last socket closes); call [`Steering::detach`] to go back to hash
/// selection while the group lives on.
pub struct Steering {
    ebpf: Ebpf,
    program: SteeringProgram,
    possible_cpus: u32,
    topology: CpuTopology,
    live: BTreeSet<u32>,
    /// Whether [`Steering::open`] ran: until then every fallback is `HOLD`.
    open: bool,
    run_stats: RunStats,
}

impl Steering {
    /// Loads the steering program ([`SteeringProgram::recommended`]), puts each `(cpu, socket)`
    /// into slot `cpu` and attaches the program to the sockets' reuseport group.
    ///
    /// All sockets must belong to one reuseport group (same address, `SO_REUSEPORT`, listening
    /// for TCP). The program is attached last, so on error nothing is attached.
    pub fn attach(listeners: &[(u32, BorrowedFd<'_>)]) -> Result<Self, SteeringError> {
        Self::attach_program(listeners, SteeringProgram::recommended())
    }

    /// [`Steering::attach`] with a chosen program (see [`Steering::attach_listening`]).
    pub fn attach_program(
        listeners: &[(u32, BorrowedFd<'_>)],
        program: SteeringProgram,
    ) -> Result<Self, SteeringError> {
        Self::load(program, false)?.attach_listening(listeners)
    }

    /// Puts each `(cpu, socket)` of a group that already serves into slot `cpu`, then attaches
    /// this loaded program to the group: every slot is filled before the program takes over from
    /// the kernel's hash, so no connection sees a half-filled map.
    pub fn attach_listening(
        mut self,
        listeners: &[(u32, BorrowedFd<'_>)],
    ) -> Result<Self, SteeringError> {
        let Some((_, group_member)) = listeners.first() else {
            return Err(SteeringError::NoListeners);
        };
        for &(cpu, _) in listeners {
            self.check_slot(cpu)?;
        }
        for &(cpu, fd) in listeners {
            self.insert(cpu, fd)?;
        }
        self.open()?;
        self.attach_to_group(*group_member)?;
        Ok(self)
    }

    /// Loads (and has the kernel verify) `program` with every map empty, attaching nothing: the
    /// first step of steering a group from its first connection on (see `Server::start`):
    ///
    /// 1. [`Steering::load`] before any socket can receive;
    /// 2. [`Steering::attach_to_group`] on the first, still unreachable socket;
    /// 3. [`Steering::insert`] each socket the moment it listens (TCP) or binds (UDP); until
    ///    then its CPU's connections are refused, as if nothing listened yet, rather than
    ///    handed to another CPU's worker (every fallback is `HOLD`);
    /// 4. [`Steering::open`]: every slot is filled, the real fallbacks replace `HOLD`.
    ///
    /// `spill` loads the program with its spill branch (percpu-spill mode); without it the
    /// verifier removes that branch.
    pub fn load(program: SteeringProgram, spill: bool) -> Result<Self, SteeringError> {
        Self::check_available()?;
        let possible_cpus = possible_cpus()?;
        let run_stats = RunStats::enable();
        let spill_enabled = u32::from(spill);
        let ebpf = EbpfLoader::new()
            .map_max_entries(names::CPU_LISTENERS, possible_cpus)
            .map_max_entries(names::CPU_FALLBACK, possible_cpus)
            .map_max_entries(names::CPU_SPILL, possible_cpus)
            .override_global(names::SPILL_ENABLED, &spill_enabled, true)
            .load(BPF_OBJECT)?;
        let mut steering = Self {
            ebpf,
            program,
            possible_cpus,
            topology: CpuTopology::read(possible_cpus),
            live: BTreeSet::new(),
            open: false,
            run_stats,
        };
        steering.program_mut()?.load()?;
        steering.write_fallbacks()?;
        Ok(steering)
    }

    /// Attaches the loaded program to the reuseport group `member` belongs to. `member` may be a
    /// socket that has `SO_REUSEPORT` but is not listening (TCP) or bound (UDP) yet: the kernel
    /// then makes it a group of one with this program, which the sockets opened after it join.
    pub fn attach_to_group(&mut self, member: BorrowedFd<'_>) -> Result<(), SteeringError> {
        self.program_mut()?.attach(member)?;
        Ok(())
    }

    /// Every slot is filled: replaces `HOLD` with each CPU's nearest live CPU, so a CPU whose
    /// slot empties later falls back instead of refusing. Until this call the program refuses a
    /// connection whose CPU's slot is empty.
    pub fn open(&mut self) -> Result<(), SteeringError> {
        self.open = true;
        self.write_fallbacks()
    }

    /// Succeeds if this process may load the steering program on this kernel: it has CAP_BPF
    /// (or CAP_SYS_ADMIN) and the kernel has `SK_REUSEPORT` programs and `REUSEPORT_SOCKARRAY`
    /// maps. Otherwise says which is missing.
    pub fn check_available() -> Result<(), SteeringError> {
        check_capabilities()?;
        check_kernel_support()
    }

    /// Puts `socket` (a member of the same group) into slot `cpu`, replacing what was there.
    pub fn insert(&mut self, cpu: u32, socket: BorrowedFd<'_>) -> Result<(), SteeringError> {
        self.check_slot(cpu)?;
        match sockarray::set(self.sockets()?, cpu, socket, sockarray::ANY) {
            // The kernel keeps a socket in one REUSEPORT_SOCKARRAY at a time.
            Err(err) if err.errno() == Some(libc::EBUSY) => {
                return Err(SteeringError::AlreadySteered { cpu });
            }
            other => other?,
        }
        self.live.insert(cpu);
        if self.open {
            self.write_fallbacks()?;
        }
        Ok(())
    }

    /// Empties slot `cpu`: connections arriving on that CPU go to the nearest live CPU's listener.
    /// The socket itself stays open and in the group.
    pub fn remove(&mut self, cpu: u32) -> Result<(), SteeringError> {
        self.check_slot(cpu)?;
        // Point everything away from `cpu` before emptying it, so no selection hits the hole.
        self.live.remove(&cpu);
        self.write_fallbacks()?;
        match sockarray::clear(self.sockets()?, cpu) {
            // Already empty (e.g. its socket closed): that is the state we want.
            Err(err) if err.errno() == Some(libc::ENOENT) => Ok(()),
            other => Ok(other?),
        }
    }

    /// Hands over the `cpu_spill` map, for a [`SpillSampler`](crate::spill::SpillSampler) to
    /// write (percpu-spill mode, loaded with `spill`). Only once; until then (and without a
    /// sampler) it spills nothing.
    pub fn take_spill_map(
        &mut self,
    ) -> Result<Array<aya::maps::MapData, SpillRoute>, SteeringError> {
        let map = self
            .ebpf
            .take_map(names::CPU_SPILL)
            .ok_or(SteeringError::MissingFromObject(names::CPU_SPILL))?;
        Ok(Array::try_from(map)?)
    }

    /// A second handle on the `steering_stats` map, for a thread of its own (the spill sampler
    /// reads where connections arrive).
    pub fn stats_map_handle(&self) -> Result<aya::maps::MapData, SteeringError> {
        let map = self
            .ebpf
            .map(names::STEERING_STATS)
            .ok_or(SteeringError::MissingFromObject(names::STEERING_STATS))?;
        let aya::maps::Map::PerCpuArray(data) = map else {
            return Err(SteeringError::MissingFromObject(names::STEERING_STATS));
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|err| SteeringError::DuplicateMap(names::STEERING_STATS, err))?;
        Ok(aya::maps::MapData::from_fd(fd)?)
    }

    /// The CPUs whose slots were filled through this `Steering` (a slot whose socket has since
    /// closed is still listed; the program skips it).
    pub fn cpus(&self) -> impl Iterator<Item = u32> + '_ {
        self.live.iter().copied()
    }

    /// The program's counters, one entry per possible CPU, indexed by the CPU that received the
    /// connections.
    pub fn stats(&self) -> Result<Vec<SteeringStats>, SteeringError> {
        let map = self
            .ebpf
            .map(names::STEERING_STATS)
            .ok_or(SteeringError::MissingFromObject(names::STEERING_STATS))?;
        read_stats(map)
    }

    /// Pins the program and its maps into `dir` (on bpffs), so the steering outlives this
    /// process; [`PinnedSteering`](crate::pinned::PinnedSteering) owns them from then on.
    pub fn pin(&mut self, dir: &std::path::Path) -> Result<(), SteeringError> {
        let name = self.program.name();
        self.program_mut()?.pin(dir.join(name))?;
        for map in [
            names::CPU_LISTENERS,
            names::CPU_FALLBACK,
            names::STEERING_STATS,
        ] {
            self.ebpf
                .map(map)
                .ok_or(SteeringError::MissingFromObject(map))?
                .pin(dir.join(map))?;
        }
        Ok(())
    }

    /// How often the program ran and for how long, or `None` where the kernel's BPF run-time
    /// statistics could not be enabled (they need CAP_SYS_ADMIN).
    pub fn run_stats(&self) -> Result<Option<ProgramRunStats>, SteeringError> {
        if matches!(self.run_stats, RunStats::Off) {
            return Ok(None);
        }
        let info = self.program()?.info()?;
        Ok(Some(ProgramRunStats {
            run_count: info.run_count(),
            run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        }))
    }

    /// The kernel's id of the loaded program (as `bpftool prog show` lists it).
    pub fn program_id(&self) -> Result<u32, SteeringError> {
        Ok(self.program()?.info()?.id())
    }

    /// The kernel's id of the `cpu_listeners` map. Its sockets can be put into another map only
    /// once the kernel has freed this one (after the program is detached and this is dropped).
    pub fn listeners_map_id(&self) -> Result<u32, SteeringError> {
        match self.ebpf.map(names::CPU_LISTENERS) {
            Some(aya::maps::Map::ReusePortSockArray(data)) => Ok(data.info()?.id()),
            _ => Err(SteeringError::MissingFromObject(names::CPU_LISTENERS)),
        }
    }

    /// Detaches the program from the group `member` belongs to: the kernel goes back to hash
    /// selection for that group.
    pub fn detach(self, member: impl AsFd) -> Result<(), SteeringError> {
        SkReuseport::detach(member)?;
        Ok(())
    }

    fn check_slot(&self, cpu: u32) -> Result<(), SteeringError> {
        if cpu >= self.possible_cpus {
            return Err(SteeringError::CpuOutOfRange {
                cpu,
                possible: self.possible_cpus,
            });
        }
        Ok(())
    }

    fn program(&self) -> Result<&SkReuseport, SteeringError> {
        let name = self.program.name();
        Ok(self
            .ebpf
            .program(name)
            .ok_or(SteeringError::MissingFromObject(name))?
            .try_into()?)
    }

    fn program_mut(&mut self) -> Result<&mut SkReuseport, SteeringError> {
        let name = self.program.name();
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or(SteeringError::MissingFromObject(name))?
            .try_into()?)
    }

    /// The `cpu_listeners` map, for [`sockarray`]'s calls.
    fn sockets(&self) -> Result<BorrowedFd<'_>, SteeringError> {
        match self.ebpf.map(names::CPU_LISTENERS) {
            Some(aya::maps::Map::ReusePortSockArray(data)) => Ok(data.fd().as_fd()),
            _ => Err(SteeringError::MissingFromObject(names::CPU_LISTENERS)),
        }
    }

    /// Rewrites `cpu_fallback` so that every CPU points at its nearest other live CPU, or, before
    /// [`Steering::open`], at `HOLD`.
    fn write_fallbacks(&mut self) -> Result<(), SteeringError> {
        let table = if self.open {
            fallback_table(self.possible_cpus, &self.live, &self.topology)
        } else {
            vec![HOLD; self.possible_cpus as usize]
        };
        let map = self
            .ebpf
            .map_mut(names::CPU_FALLBACK)
            .ok_or(SteeringError::MissingFromObject(names::CPU_FALLBACK))?;
        let mut fallback = Array::<_, u32>::try_from(map)?;
        for (cpu, target) in (0..).zip(table) {
            fallback.set(cpu, target, 0)?;
        }
        Ok(())
    }
}

/// The counters in `map` (a `steering_stats` map), one entry per possible CPU.
pub(crate) fn read_stats(map: &aya::maps::Map) -> Result<Vec<SteeringStats>, SteeringError> {
    let stats = PerCpuArray::<_, SteeringStats>::try_from(map)?;
    Ok(stats.get(&0, 0)?.iter().copied().collect())
}

/// Detaches whatever program the reuseport group of `member` has, so the kernel hashes again.
/// A group without a program (the kernel answers `ENOENT`) is already there: not an error.
pub fn detach_group(member: impl AsFd) -> Result<(), SteeringError> {
    match SkReuseport::detach(member) {
        Err(ProgramError::SkReuseportError(aya::programs::SkReuseportError::SetsockoptError {
            io_error,
            ..
        })) if io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => Ok(other?),
    }
}

/// Whether the kernel keeps BPF run-time statistics (run count and time per program) for us.
enum RunStats {
    /// Turned on with BPF_ENABLE_STATS while this fd is open; the kernel turns them off again when
    /// it closes, so nothing needs restoring, even after a crash. Needs CAP_SYS_ADMIN.
    Enabled(#[allow(dead_code, reason = "held only to keep statistics on")] OwnedFd),
    /// Already on system-wide (`sysctl kernel.bpf_stats_enabled=1`).
    SysctlOn,
    /// Off, and this process may not turn them on.
    Off,
}

impl RunStats {
    fn enable() -> Self {
        if let Ok(fd) = enable_stats(Stats::RunTime) {
            return Self::Enabled(fd);
        }
        match fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled") {
            Ok(value) if value.trim() == "1" => Self::SysctlOn,
            _ => Self::Off,
        }
    }
}

/// For each of `possible` CPUs, the CPU whose listener takes its connections when its own slot is
/// empty: the nearest live CPU other than itself, where nearest means first the same core (SMT
/// sibling), then the same last-level cache, NUMA node and package (see [`CpuTopology`]), and
/// among equals the nearest CPU number (the lower one on a tie); itself when it is the only live
/// CPU or none is live.
pub fn fallback_table(possible: u32, live: &BTreeSet<u32>, topology: &CpuTopology) -> Vec<u32> {
    (0..possible)
        .map(|cpu| {
            live.iter()
                .copied()
                .filter(|&other| other != cpu)
                .min_by_key(|&other| (topology.distance(cpu, other), other.abs_diff(cpu), other))
                .unwrap_or(cpu)
        })
        .collect()
}

/// Capability bits (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Fails if this process cannot load the program: creating the maps and loading an
/// `SK_REUSEPORT` program needs CAP_BPF, or CAP_SYS_ADMIN (which kernels before 5.8 require, as
/// they know no CAP_BPF). CAP_NET_ADMIN is not needed: `SK_REUSEPORT` is not one of the kernel's
/// net-admin program types, and attaching is a plain `setsockopt` on a socket we own.
fn check_capabilities() -> Result<(), SteeringError> {
    let effective = crate::procfs::effective_capabilities().map_err(SteeringError::Capabilities)?;
    if effective & (1 << CAP_BPF | 1 << CAP_SYS_ADMIN) == 0 {
        return Err(SteeringError::MissingCapabilities);
    }
    Ok(())
}

fn check_kernel_support() -> Result<(), SteeringError> {
    let program = is_program_supported(ProgramType::SkReuseport)?;
    if !program {
        return Err(SteeringError::Unsupported {
            what: "SK_REUSEPORT BPF programs",
        });
    }
    let map = is_map_supported(MapType::ReuseportSockArray)
        .map_err(|err| SteeringError::Probe(err.io_error))?;
    if !map {
        return Err(SteeringError::Unsupported {
            what: "REUSEPORT_SOCKARRAY BPF maps",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu_topology::CpuPlace;

    fn place(core: &str, llc: &str, node: u32) -> CpuPlace {
        CpuPlace {
            core: Some(core.into()),
            llc: Some(llc.into()),
            node: Some(node),
            package: Some("0-7".into()),
        }
    }

    #[test]
    fn without_topology_fallback_points_at_the_nearest_cpu_number() {
        let live: BTreeSet<u32> = [0, 3].into_iter().collect();
        let flat = CpuTopology::default();
        assert_eq!(fallback_table(6, &live, &flat), [3, 0, 3, 0, 3, 3]);
    }

    #[test]
    fn fallback_prefers_the_smt_sibling_then_the_cache_then_the_node() {
        // Two nodes of one LLC each; cores are SMT pairs {0,4} {1,5} {2,6} {3,7}.
        let topology = CpuTopology::from_places(
            (0..8)
                .map(|cpu| {
                    let core = format!("{},{}", cpu % 4, cpu % 4 + 4);
                    match cpu % 4 {
                        0 | 1 => place(&core, "0-1,4-5", 0),
                        _ => place(&core, "2-3,6-7", 1),
                    }
                })
                .collect(),
        );
        let live: BTreeSet<u32> = [1, 2, 4].into_iter().collect();
        let table = fallback_table(8, &live, &topology);
        // 0: sibling 4 beats 1 (one number away); 1: same LLC as 4 and 0; 2: same LLC is nobody
        // live but itself, so the other node's nearest number; 3: same LLC as 2.
        assert_eq!(table[0], 4);
        assert_eq!(table[1], 4);
        assert_eq!(table[2], 1);
        assert_eq!(table[3], 2);
        assert_eq!(table[5], 1, "SMT sibling of 5 is 1");
        assert_eq!(table[6], 2, "SMT sibling of 6 is 2");
    }

    #[test]
    fn migration_is_recommended_from_linux_5_14() {
        assert_eq!(
            SteeringProgram::recommended_for("6.18.44-fc-v669"),
            SteeringProgram::SteerMigrate
        );
        assert_eq!(
            SteeringProgram::recommended_for("5.14.0"),
            SteeringProgram::SteerMigrate
        );
        assert_eq!(
            SteeringProgram::recommended_for("5.10.0-28-amd64"),
            SteeringProgram::SteerToCpu
        );
    }

    #[test]
    fn a_lone_or_absent_cpu_points_at_itself() {
        let flat = CpuTopology::default();
        assert_eq!(fallback_table(2, &[1].into_iter().collect(), &flat), [1, 1]);
        assert_eq!(fallback_table(2, &BTreeSet::new(), &flat), [0, 1]);
    }
}
