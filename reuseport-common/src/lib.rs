//! Types shared between the reuseport BPF programs (`reuseport-ebpf`) and userspace
//! (`reuseport-user`).
//!
//! Everything here is `#[repr(C)]` plain data: the BPF side writes it into maps, userspace reads
//! it back with aya. Keep this crate `no_std` and free of logic.
#![no_std]

/// Names of the maps and programs in the BPF object, as `bpftool` shows them.
///
/// The kernel keeps at most 15 bytes of a map or program name, so every name here fits that.
pub mod names {
    /// `REUSEPORT_SOCKARRAY`: slot N holds the listener of the worker pinned to CPU N.
    pub const CPU_LISTENERS: &str = "cpu_listeners";
    /// `ARRAY` of `u32`: slot N holds the CPU whose listener takes connections that arrive on
    /// CPU N when slot N of [`CPU_LISTENERS`] is empty (the nearest live CPU), or
    /// [`HOLD`](crate::HOLD) while the group is still being built.
    pub const CPU_FALLBACK: &str = "cpu_fallback";
    /// `ARRAY` of [`SpillRoute`](crate::SpillRoute): where CPU N's connections go while CPU N
    /// spills (`--mode percpu-spill`; userspace samples the queues and writes it).
    pub const CPU_SPILL: &str = "cpu_spill";
    /// `PERCPU_ARRAY` with one [`SteeringStats`](crate::SteeringStats) per CPU.
    pub const STEERING_STATS: &str = "steering_stats";
    /// The `SK_REUSEPORT` program that selects the listener of the receiving CPU.
    pub const STEER_TO_CPU: &str = "steer_to_cpu";
    /// `steer_to_cpu` attached as select-or-migrate: also moves a closing listener's queue.
    pub const STEER_MIGRATE: &str = "steer_migrate";
    /// A `SK_REUSEPORT` program that selects nothing: calibrates the cost measurement.
    pub const STEER_NOOP: &str = "steer_noop";
    /// A `SK_REUSEPORT` program that only selects the local slot: calibrates the helper's cost.
    pub const STEER_SELECT: &str = "steer_select";
    /// Read-only `u32` global: 1 loads the steering programs with their spill branch.
    pub const SPILL_ENABLED: &str = "SPILL_ENABLED";

    /// `ARRAY` of `u32`: the probes' settings, indexed by [`probe_config`](crate::probe_config).
    pub const PROBE_CONFIG: &str = "probe_config";
    /// `PERCPU_ARRAY` with one [`ProbeCounts`](crate::ProbeCounts) per CPU.
    pub const PROBE_COUNTS: &str = "probe_counts";
    /// `HASH` of thread ids (`u32` → `u8`) whose wakeups count as the server's.
    pub const SERVER_TIDS: &str = "server_tids";
    /// `LRU_HASH` socket address → [`ConnCpus`](crate::ConnCpus): connections being followed.
    pub const CONN_CPUS: &str = "conn_cpus";
    /// `HASH` [`LockWaiter`](crate::LockWaiter) → [`LockPending`](crate::LockPending): contended
    /// lock waits in progress, one per waiting task (mutexes sleep and may end on another CPU).
    pub const LOCK_PENDING: &str = "lock_pending";
    /// `HASH` stack hash (`u64`) → [`LockStack`](crate::LockStack): the kernel stacks taken at
    /// `lock:contention_begin`.
    pub const LOCK_STACKS: &str = "lock_stacks";
    /// `PERCPU_ARRAY` with one [`LockStack`](crate::LockStack): where a stack is taken before it
    /// is hashed (too large for the BPF stack).
    pub const LOCK_STACK_BUF: &str = "lock_stack_buf";
    /// `ARRAY` of [`LOCK_STACK_CUTS_LEN`](crate::LOCK_STACK_CUTS_LEN) `u64`: address ranges
    /// `[start, end)` in pairs, the kernel's softirq and interrupt entry code. A stack is kept up
    /// to its first frame in one of them; what lies below is the interrupted context.
    pub const LOCK_STACK_CUTS: &str = "lock_stack_cuts";
    /// `PERCPU_HASH` [`LockKey`](crate::LockKey) → [`LockWait`](crate::LockWait): finished
    /// contended waits by stack, lock kind and side.
    pub const LOCK_WAITS: &str = "lock_waits";
    /// `HASH` of process ids (tgid, `u32`) → side ([`lock_side`](crate::lock_side)) whose lock
    /// waits are attributed to the server or the load generator.
    pub const LOCK_SIDES: &str = "lock_sides";

    /// Tracepoint programs: `(program, category, tracepoint)`.
    pub const PROBES: [(&str, &str, &str); 7] = [
        ("lock_cont_begin", "lock", "contention_begin"),
        ("lock_cont_end", "lock", "contention_end"),
        ("sched_waking", "sched", "sched_waking"),
        ("sock_set_state", "sock", "inet_sock_set_state"),
        ("sock_recv_len", "sock", "sock_recv_length"),
        ("sock_send_len", "sock", "sock_send_length"),
        ("sk_data_ready", "sock", "sk_data_ready"),
    ];
}

/// Slots of [`names::PROBE_CONFIG`]: the server port to follow, and the offsets of the tracepoint
/// fields the probes read (userspace takes them from each tracepoint's `format` file, so the
/// probes do not depend on one kernel's layout).
pub mod probe_config {
    /// TCP port of the server whose connections `conn_cpus` follows (host byte order).
    pub const SERVER_PORT: u32 = 0;
    /// `sched_waking`: offset of `pid`.
    pub const WAKING_PID: u32 = 1;
    /// `sched_waking`: offset of `target_cpu`.
    pub const WAKING_TARGET_CPU: u32 = 2;
    /// `inet_sock_set_state`: offset of `skaddr`.
    pub const SET_STATE_SKADDR: u32 = 3;
    /// `inet_sock_set_state`: offset of `newstate`.
    pub const SET_STATE_NEWSTATE: u32 = 4;
    /// `inet_sock_set_state`: offset of `sport`.
    pub const SET_STATE_SPORT: u32 = 5;
    /// `inet_sock_set_state`: offset of `protocol`.
    pub const SET_STATE_PROTOCOL: u32 = 6;
    /// `sock_recv_length`: offset of `sk`.
    pub const RECV_SK: u32 = 7;
    /// `sock_send_length`: offset of `sk`.
    pub const SEND_SK: u32 = 8;
    /// `sk_data_ready`: offset of `skaddr`.
    pub const DATA_READY_SK: u32 = 9;
    /// `contention_begin`: offset of `lock_addr`.
    pub const LOCK_BEGIN_ADDR: u32 = 10;
    /// `contention_begin`: offset of `flags`.
    pub const LOCK_BEGIN_FLAGS: u32 = 11;
    /// `contention_end`: offset of `lock_addr`.
    pub const LOCK_END_ADDR: u32 = 12;
    /// Number of slots.
    pub const LEN: u32 = 13;
}

/// Most CPUs [`ConnCpus`] records per connection; a connection touched by more counts as this many.
pub const CONN_CPUS_MAX: usize = 4;

/// The distinct CPUs that have touched one connection so far (its SYN softirq, accept, reads,
/// writes, receive softirqs, close).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCpus {
    /// The first `len` entries are the CPUs, the SYN's CPU first.
    pub cpus: [u32; CONN_CPUS_MAX],
    /// How many entries of `cpus` are used.
    pub len: u32,
    /// Whether a read by the server (process context) has been seen yet.
    pub read_seen: u32,
}

/// What the experiment probes counted on one CPU. Stored per CPU in [`names::PROBE_COUNTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct ProbeCounts {
    /// `lock:contention_end` events on this CPU that ended a wait whose `contention_begin` was
    /// seen (paired by waiting task and lock, so a mutex wait that slept and woke on another CPU
    /// counts where it ended).
    pub lock_contended: u64,
    /// Nanoseconds from those waits' first `contention_begin` (after the probe's stack walk) to
    /// their `contention_end`.
    pub lock_wait_ns: u64,
    /// Contended waits counted in `lock_contended` (or begun and never paired) that are missing
    /// from the per-stack [`names::LOCK_WAITS`] because a map was full.
    #[cfg_attr(feature = "user", serde(default))]
    pub lock_unrecorded: u64,
    /// `sched:sched_waking` events raised on this CPU.
    pub wakeups: u64,
    /// Of those, how many woke a task whose CPU is another one.
    pub cross_cpu_wakeups: u64,
    /// Wakeups of the server's threads ([`names::SERVER_TIDS`]).
    pub server_wakeups: u64,
    /// Of those, how many were raised on another CPU than the thread's.
    pub server_cross_cpu_wakeups: u64,
    /// Server connections that began on this CPU (entered `SYN_RECV` here: their SYN's CPU).
    pub conns_opened: u64,
    /// Followed connections that closed, by how many distinct CPUs touched them:
    /// `conn_cpus[n - 1]` for n = 1..=[`CONN_CPUS_MAX`] (the last also counts more).
    pub conn_cpus: [u64; CONN_CPUS_MAX],
    /// Followed connections whose first server read ran on this CPU.
    pub conns_read: u64,
    /// Of those, how many were read on their SYN's CPU.
    pub conns_read_local: u64,
}

impl ProbeCounts {
    /// Adds `other` into `self`, field by field.
    pub fn add(&mut self, other: &Self) {
        self.lock_contended += other.lock_contended;
        self.lock_wait_ns += other.lock_wait_ns;
        self.lock_unrecorded += other.lock_unrecorded;
        self.wakeups += other.wakeups;
        self.cross_cpu_wakeups += other.cross_cpu_wakeups;
        self.server_wakeups += other.server_wakeups;
        self.server_cross_cpu_wakeups += other.server_cross_cpu_wakeups;
        self.conns_opened += other.conns_opened;
        for (sum, n) in self.conn_cpus.iter_mut().zip(other.conn_cpus) {
            *sum += n;
        }
        self.conns_read += other.conns_read;
        self.conns_read_local += other.conns_read_local;
    }
}

/// Kernel frames kept per [`LockStack`] (innermost first). Enough to reach the softirq entry
/// (`handle_softirqs`) from any networking lock.
pub const LOCK_STACK_DEPTH: usize = 48;

/// Entries of [`names::LOCK_STACK_CUTS`]: three `[start, end)` ranges (the softirq handler loop,
/// the softirq entry text, the interrupt entry text); a range of `0, 0` cuts nothing.
pub const LOCK_STACK_CUTS_LEN: u32 = 6;

/// A kernel stack taken at `lock:contention_begin`: return addresses, innermost first, zero after
/// the last.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockStack {
    /// The addresses.
    pub frames: [u64; LOCK_STACK_DEPTH],
}

/// Who waited for a contended lock, as the BPF side knows it from the waiting task's process:
/// values of [`names::LOCK_SIDES`] and of [`LockKey::side`]. Softirq is told apart later, from
/// the stack.
pub mod lock_side {
    /// Neither the server nor the load generator (kernel threads, other processes, idle).
    pub const OTHER: u32 = 0;
    /// The server under test.
    pub const SERVER: u32 = 1;
    /// The load generator.
    pub const CLIENT: u32 = 2;
}

/// A contended wait in progress: the waiting task and the lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockWaiter {
    /// The waiting thread id.
    pub tid: u32,
    /// The CPU, for thread id 0 (every CPU's idle task is 0); `u32::MAX` otherwise.
    pub cpu: u32,
    /// The lock's address.
    pub lock: u64,
}

/// What `contention_begin` recorded for a wait in progress.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockPending {
    /// `bpf_ktime_get_ns` at the first `contention_begin`.
    pub start_ns: u64,
    /// Hash of the stack in [`names::LOCK_STACKS`].
    pub stack: u64,
    /// The tracepoint's flags, OR-ed over repeated begins (a mutex spins, then sleeps).
    pub flags: u32,
    /// [`lock_side`] of the waiting process.
    pub side: u32,
}

/// Key of [`names::LOCK_WAITS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockKey {
    /// Hash of the stack in [`names::LOCK_STACKS`].
    pub stack: u64,
    /// `contention_begin` flags (`LCB_F_*`: 1 spin, 2 read, 4 write, 8 RT, 16 percpu, 32 mutex).
    pub flags: u32,
    /// [`lock_side`] of the waiting process.
    pub side: u32,
}

/// Finished contended waits of one [`LockKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockWait {
    /// How many.
    pub count: u64,
    /// Their nanoseconds.
    pub wait_ns: u64,
}

/// Upper bound on the number of CPU slots the BPF maps are compiled with.
///
/// Userspace shrinks the maps to the machine's possible CPU count at load time; this is only the
/// size written into the object file.
pub const MAX_CPUS: u32 = 4096;

/// A [`names::CPU_FALLBACK`] entry meaning "this CPU's listener is not in place yet": the program
/// refuses the connection, exactly as if nothing listened on the port yet, instead of handing it
/// to another CPU's worker. Userspace writes it into every entry before the first listener
/// listens and replaces it with the real fallbacks once every slot is filled (`Server::start`),
/// so it exists only during the microseconds a server takes to start.
pub const HOLD: u32 = u32::MAX;

/// Entries in a [`SpillRoute`] table. A power of two, so that a connection's slot is a mask of its
/// hash; 1024 gives each of 256 CPUs 4 entries, so shares are exact to 1/1024 of a CPU's arrivals.
pub const SPILL_SLOTS: usize = 1024;

/// The [`SpillRoute::slots`] entry that a connection with 4-tuple hash `hash` (the kernel's
/// `sk_reuseport_md.hash`) uses. The BPF program and the userspace model both call this.
#[inline(always)]
pub const fn spill_slot(hash: u32) -> usize {
    (hash as usize) & (SPILL_SLOTS - 1)
}

/// Where one CPU's new connections go while that CPU spills: entry [`spill_slot`]`(hash)` of
/// `slots` names the CPU whose listener takes the connection. Entries naming the CPU itself keep
/// those connections local, so the table spreads a chosen fraction of the CPU's arrivals over
/// several listeners, each in proportion to how many entries name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpillRoute {
    /// 0: the CPU does not spill (the program does not read `slots`); 1: it does.
    pub active: u32,
    /// Reserved, 0 (keeps `slots` 4-byte aligned without padding).
    pub reserved: u32,
    /// CPU per slot. Every entry is a CPU with a listener, so a route written half-way (the
    /// kernel copies map values without a lock) still names only valid CPUs.
    pub slots: [u16; SPILL_SLOTS],
}

impl SpillRoute {
    /// A route that keeps every connection of `cpu` local.
    pub const fn local(cpu: u16) -> Self {
        Self {
            active: 0,
            reserved: 0,
            slots: [cpu; SPILL_SLOTS],
        }
    }
}

/// What the steering program did with the connections (TCP SYNs, UDP datagrams) that arrived on
/// one CPU. Stored per CPU in [`names::STEERING_STATS`]; userspace sums or lists them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeringStats {
    /// Selected the listener of the CPU the program ran on (the CPU that received the packet).
    pub local: u64,
    /// This CPU was spilling and the connection's [`SpillRoute`] entry named another CPU:
    /// selected that CPU's listener instead.
    pub spilled: u64,
    /// The local slot was empty or closed; selected the fallback slot's listener instead.
    pub fallback: u64,
    /// Neither the local nor the fallback slot held a live listener: the program returned
    /// `SK_PASS` without selecting, so the kernel picked a listener by hash. Never a refusal.
    pub unsteered: u64,
    /// `bpf_sk_select_reuseport` failed for a reason other than an empty slot (for example a
    /// slot holding a socket of another reuseport group). The packet was still passed on.
    pub errors: u64,
    /// The group was still being built ([`HOLD`]) and this CPU's listener was not in place yet:
    /// refused, as if nothing listened yet (only during a server's start).
    pub held: u64,
}

impl SteeringStats {
    /// Adds `other` into `self`, field by field.
    pub fn add(&mut self, other: &Self) {
        self.local += other.local;
        self.spilled += other.spilled;
        self.fallback += other.fallback;
        self.unsteered += other.unsteered;
        self.errors += other.errors;
        self.held += other.held;
    }

    /// Every selection the program made, whatever its outcome.
    pub fn total(&self) -> u64 {
        self.local + self.spilled + self.fallback + self.unsteered + self.held
    }
}

// SAFETY: these are `#[repr(C)]` and made only of `u16`/`u32`/`u64` fields laid out without padding
// (`SpillRoute`: two `u32`s, then `u16`s; the lock types: `u64`s, then pairs of `u32`s), so every
// bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SteeringStats {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ProbeCounts {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ConnCpus {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SpillRoute {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for LockStack {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for LockWaiter {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for LockPending {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for LockKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for LockWait {}
