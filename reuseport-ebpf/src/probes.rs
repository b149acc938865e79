//! The probes object (`reuseport-probes`): what the lab loads while it measures, and nothing else.
//!
//! Tracepoint probes for experiments (`reuseport ab`), attached only during a measured run.
//!
//! Each probe counts into this CPU's [`ProbeCounts`] (a per-CPU array, so no atomics):
//!
//! | program           | tracepoint                  | counts                                         |
//! |-------------------|-----------------------------|------------------------------------------------|
//! | `lock_cont_begin` | `lock:contention_begin`     | remembers when a task began waiting, and where |
//! | `lock_cont_end`   | `lock:contention_end`       | contended waits and their ns, by stack and side|
//! | `sched_waking`    | `sched:sched_waking`        | wakeups, cross-CPU ones, and the server's      |
//! | `sock_set_state`  | `sock:inet_sock_set_state`  | follows server connections from SYN to close   |
//! | `sock_recv_len`   | `sock:sock_recv_length`     | a server read touched the connection here      |
//! | `sock_send_len`   | `sock:sock_send_length`     | a server write touched it here                 |
//! | `sk_data_ready`   | `sock:sk_data_ready`        | a receive softirq touched it here              |
//!
//! "Following" a connection means keeping, in `conn_cpus` (keyed by its socket's address), the
//! distinct CPUs that touched it: the CPU where it entered `SYN_RECV` (its SYN's softirq), then
//! every read, write and receive softirq, until it enters `TCP_CLOSE`, when the number of CPUs is
//! added to a histogram. One CPU per connection means its socket's cache lines never moved.
//!
//! Lock waits are paired per waiting task and lock (`lock_pending`), not per CPU: a mutex waiter
//! sleeps and may wake on another CPU, and a softirq can interrupt a task's wait on one lock to
//! wait on another (never on the same one: that would deadlock). Every CPU's idle task has thread
//! id 0, so for it the CPU is part of the key (idle never sleeps on a lock). A mutex reports
//! `contention_begin` again when it stops spinning and sleeps: the first begin's time and stack
//! are kept and the flags are OR-ed. Each finished wait is added, per CPU, under its stack's hash,
//! its flags and its process's side (`lock_sides`) in `lock_waits`; userspace symbolizes the
//! stacks from `lock_stacks`. The wait is timed from after the stack walk: the walk's own time
//! is not counted, but a spin shorter than the walk may end during it (counts are exact; for the
//! shortest spins the nanoseconds are a lower bound).
//!
//! Field offsets come from userspace (`probe_config`), read from each tracepoint's `format` file.
#![no_std]
#![no_main]

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// A GPL-compatible licence keeps every helper available to these probes.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::bpf_get_stack,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
};
use reuseport_common::{
    CONN_CPUS_MAX, ConnCpus, LOCK_STACK_CUTS_LEN, LockKey, LockPending, LockStack, LockWait,
    LockWaiter, ProbeCounts, lock_side, probe_config as cfg,
};

/// Settings and tracepoint field offsets, indexed by `probe_config::*`.
#[map(name = "probe_config")]
static PROBE_CONFIG: Array<u32> = Array::with_max_entries(cfg::LEN, 0);

/// One `ProbeCounts` per CPU.
#[map(name = "probe_counts")]
static PROBE_COUNTS: PerCpuArray<ProbeCounts> = PerCpuArray::with_max_entries(1, 0);

/// Thread ids of the server under test: their wakeups are counted separately.
#[map(name = "server_tids")]
static SERVER_TIDS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);

/// Server connections being followed, keyed by socket address. LRU, so connections whose close
/// is never seen cannot fill it.
#[map(name = "conn_cpus")]
static CONN_CPUS: LruHashMap<u64, ConnCpus> = LruHashMap::with_max_entries(65536, 0);

/// Contended lock waits in progress, per waiting task and lock.
#[map(name = "lock_pending")]
static LOCK_PENDING: HashMap<LockWaiter, LockPending> = HashMap::with_max_entries(16384, 0);

/// Kernel stacks of contended waits, by hash.
#[map(name = "lock_stacks")]
static LOCK_STACKS: HashMap<u64, LockStack> = HashMap::with_max_entries(8192, 0);

/// Where this CPU takes a stack before hashing it.
#[map(name = "lock_stack_buf")]
static LOCK_STACK_BUF: PerCpuArray<LockStack> = PerCpuArray::with_max_entries(1, 0);

/// Softirq and interrupt entry code, as `[start, end)` pairs: stacks end at their first frame
/// there (set by user space from `/proc/kallsyms`).
#[map(name = "lock_stack_cuts")]
static LOCK_STACK_CUTS: Array<u64> = Array::with_max_entries(LOCK_STACK_CUTS_LEN, 0);

/// Finished contended waits by stack, flags and side.
#[map(name = "lock_waits")]
static LOCK_WAITS: PerCpuHashMap<LockKey, LockWait> = PerCpuHashMap::with_max_entries(16384, 0);

/// Processes (tgid) whose waits are the server's or the load generator's (`lock_side`).
#[map(name = "lock_sides")]
static LOCK_SIDES: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

const IPPROTO_TCP: u16 = 6;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;

fn config(slot: u32) -> u32 {
    PROBE_CONFIG.get(slot).copied().unwrap_or(0)
}

/// Reads the tracepoint field whose offset is in config slot `slot`.
fn field<T>(ctx: &TracePointContext, slot: u32) -> Option<T> {
    // SAFETY: `read_at` copies with bpf_probe_read; a bad offset yields an error, not a fault.
    unsafe { ctx.read_at::<T>(config(slot) as usize).ok() }
}

fn counts() -> Option<&'static mut ProbeCounts> {
    // SAFETY: this CPU's entry, touched only by this CPU while the program runs unpreempted.
    PROBE_COUNTS
        .get_ptr_mut(0)
        .map(|counts| unsafe { &mut *counts })
}

fn this_cpu() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { bpf_get_smp_processor_id() }
}

/// The waiting task and `lock`, as `lock_pending` keys it.
fn waiter(lock: u64) -> LockWaiter {
    let tid = bpf_get_current_pid_tgid() as u32;
    LockWaiter {
        tid,
        cpu: if tid == 0 { this_cpu() } else { u32::MAX },
        lock,
    }
}

/// Takes the kernel stack into `lock_stacks` and returns its hash (FNV-1a over the frames);
/// 0 if no stack could be taken.
fn record_stack(ctx: &TracePointContext) -> u64 {
    let Some(buf) = LOCK_STACK_BUF.get_ptr_mut(0) else {
        return 0;
    };
    let size = core::mem::size_of::<LockStack>() as u32;
    // SAFETY: `buf` is this CPU's entry, `size` bytes long; the helper zero-fills what it does not
    // write, so the whole entry is this stack.
    let taken = unsafe { bpf_get_stack(ctx.as_ptr(), buf.cast(), size, 0) };
    if taken <= 0 {
        return 0;
    }
    // SAFETY: this CPU's entry, written above; nothing else touches it while this runs.
    let stack = unsafe { &mut *buf };
    cut_below_interrupt_entry(stack);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for frame in stack.frames {
        hash = (hash ^ frame).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let hash = hash | 1;
    // Already there (the usual case) or the map is full: either way the hash names it.
    let _ = LOCK_STACKS.insert(&hash, stack, BPF_NOEXIST);
    hash
}

/// Zeroes the frames below the first one in softirq or interrupt entry code: they are whatever
/// the interrupt happened to interrupt, as varied as the kernel, and would make every such wait a
/// stack of its own, filling `lock_stacks` and `lock_waits` on a busy machine. The entry frame is
/// kept, so user space still tells softirq waits apart. A return address points after its call,
/// so a frame belongs to `[start, end)` when `start < frame <= end`.
fn cut_below_interrupt_entry(stack: &mut LockStack) {
    let bound = |slot: u32| LOCK_STACK_CUTS.get(slot).copied().unwrap_or(0);
    let ranges = [
        (bound(0), bound(1)),
        (bound(2), bound(3)),
        (bound(4), bound(5)),
    ];
    let mut cut = false;
    for frame in stack.frames.iter_mut() {
        if cut {
            *frame = 0;
        } else {
            cut = ranges
                .iter()
                .any(|&(start, end)| start < *frame && *frame <= end);
        }
    }
}

#[tracepoint]
pub fn lock_cont_begin(ctx: TracePointContext) -> u32 {
    let Some(lock) = field::<u64>(&ctx, cfg::LOCK_BEGIN_ADDR) else {
        return 0;
    };
    let flags = field::<u32>(&ctx, cfg::LOCK_BEGIN_FLAGS).unwrap_or(0);
    let key = waiter(lock);
    if let Some(pending) = LOCK_PENDING.get_ptr_mut(&key) {
        // SAFETY: the entry of this task, which is running this program.
        unsafe { (*pending).flags |= flags };
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the value is copied out at once.
    let side = unsafe { LOCK_SIDES.get(&tgid) }
        .copied()
        .unwrap_or(lock_side::OTHER);
    // The stack walk first, so that its own time is not counted as waiting.
    let stack = record_stack(&ctx);
    let pending = LockPending {
        // SAFETY: no arguments, cannot fail.
        start_ns: unsafe { bpf_ktime_get_ns() },
        stack,
        flags,
        side,
    };
    if LOCK_PENDING.insert(&key, &pending, 0).is_err()
        && let Some(counts) = counts()
    {
        counts.lock_unrecorded += 1;
    }
    0
}

#[tracepoint]
pub fn lock_cont_end(ctx: TracePointContext) -> u32 {
    let (Some(lock), Some(counts)) = (field::<u64>(&ctx, cfg::LOCK_END_ADDR), counts()) else {
        return 0;
    };
    let key = waiter(lock);
    // SAFETY: the value is copied out at once.
    let Some(pending) = (unsafe { LOCK_PENDING.get(&key) }).copied() else {
        return 0;
    };
    let _ = LOCK_PENDING.remove(&key);
    // SAFETY: no arguments, cannot fail.
    let wait_ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(pending.start_ns);
    counts.lock_contended += 1;
    counts.lock_wait_ns += wait_ns;
    let stat_key = LockKey {
        stack: pending.stack,
        flags: pending.flags,
        side: pending.side,
    };
    if let Some(stat) = LOCK_WAITS.get_ptr_mut(&stat_key) {
        // SAFETY: this CPU's value of a per-CPU entry.
        unsafe {
            (*stat).count += 1;
            (*stat).wait_ns += wait_ns;
        }
    } else if LOCK_WAITS
        .insert(&stat_key, &LockWait { count: 1, wait_ns }, 0)
        .is_err()
    {
        counts.lock_unrecorded += 1;
    }
    0
}

#[tracepoint]
pub fn sched_waking(ctx: TracePointContext) -> u32 {
    let (Some(pid), Some(target_cpu), Some(counts)) = (
        field::<i32>(&ctx, cfg::WAKING_PID),
        field::<i32>(&ctx, cfg::WAKING_TARGET_CPU),
        counts(),
    ) else {
        return 0;
    };
    // `target_cpu` is the CPU the woken task last ran on; the waker runs on this one.
    let cross = target_cpu as u32 != this_cpu();
    counts.wakeups += 1;
    counts.cross_cpu_wakeups += cross as u64;
    // SAFETY: the value is copied out at once.
    if unsafe { SERVER_TIDS.get(&(pid as u32)) }.is_some() {
        counts.server_wakeups += 1;
        counts.server_cross_cpu_wakeups += cross as u64;
    }
    0
}

/// Records that `cpu` touched the followed connection at `sk`; returns it if it is followed.
fn touch(sk: u64, cpu: u32) -> Option<&'static mut ConnCpus> {
    // SAFETY: entries are only changed by these programs; a racing update can at worst miss a CPU.
    let conn = unsafe { &mut *CONN_CPUS.get_ptr_mut(&sk)? };
    let len = (conn.len as usize).min(CONN_CPUS_MAX);
    if !conn.cpus.iter().take(len).any(|&seen| seen == cpu) {
        if let Some(slot) = conn.cpus.get_mut(len) {
            *slot = cpu;
            conn.len += 1;
        }
    }
    Some(conn)
}

#[tracepoint]
pub fn sock_set_state(ctx: TracePointContext) -> u32 {
    let (Some(protocol), Some(sport), Some(sk), Some(newstate), Some(counts)) = (
        field::<u16>(&ctx, cfg::SET_STATE_PROTOCOL),
        field::<u16>(&ctx, cfg::SET_STATE_SPORT),
        field::<u64>(&ctx, cfg::SET_STATE_SKADDR),
        field::<i32>(&ctx, cfg::SET_STATE_NEWSTATE),
        counts(),
    ) else {
        return 0;
    };
    if protocol != IPPROTO_TCP || u32::from(sport) != config(cfg::SERVER_PORT) {
        return 0;
    }
    let cpu = this_cpu();
    if newstate == TCP_SYN_RECV {
        // A server connection is born, in the softirq of its handshake's final ACK (the same
        // flow, so the same CPU as its SYN).
        let conn = ConnCpus {
            cpus: [cpu, 0, 0, 0],
            len: 1,
            read_seen: 0,
        };
        if CONN_CPUS.insert(&sk, &conn, 0).is_ok() {
            counts.conns_opened += 1;
        }
        return 0;
    }
    if newstate == TCP_CLOSE {
        if let Some(conn) = touch(sk, cpu) {
            let n = (conn.len as usize).clamp(1, CONN_CPUS_MAX);
            if let Some(bucket) = counts.conn_cpus.get_mut(n - 1) {
                *bucket += 1;
            }
            let _ = CONN_CPUS.remove(&sk);
        }
        return 0;
    }
    touch(sk, cpu);
    0
}

#[tracepoint]
pub fn sock_recv_len(ctx: TracePointContext) -> u32 {
    let (Some(sk), Some(counts)) = (field::<u64>(&ctx, cfg::RECV_SK), counts()) else {
        return 0;
    };
    let cpu = this_cpu();
    if let Some(conn) = touch(sk, cpu) {
        // The server's first read, right after accept: is it on the SYN's CPU?
        if conn.read_seen == 0 {
            conn.read_seen = 1;
            counts.conns_read += 1;
            counts.conns_read_local += (conn.cpus[0] == cpu) as u64;
        }
    }
    0
}

#[tracepoint]
pub fn sock_send_len(ctx: TracePointContext) -> u32 {
    if let Some(sk) = field::<u64>(&ctx, cfg::SEND_SK) {
        touch(sk, this_cpu());
    }
    0
}

#[tracepoint]
pub fn sk_data_ready(ctx: TracePointContext) -> u32 {
    if let Some(sk) = field::<u64>(&ctx, cfg::DATA_READY_SK) {
        touch(sk, this_cpu());
    }
    0
}
