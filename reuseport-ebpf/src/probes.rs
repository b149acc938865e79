//! The probes object (`reuseport-probes`): what the lab loads while it measures, and nothing else.
//!
//! Tracepoint probes for experiments (`reuseport ab`), attached only during a measured run.
//!
//! Each probe counts into this CPU's [`ProbeCounts`] (a per-CPU array, so no atomics):
//!
//! | program           | tracepoint                  | counts                                         |
//! |-------------------|-----------------------------|------------------------------------------------|
//! | `lock_cont_begin` | `lock:contention_begin`     | remembers when this CPU started waiting        |
//! | `lock_cont_end`   | `lock:contention_end`       | contended waits and their nanoseconds          |
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
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TracePointContext,
};
use reuseport_common::{CONN_CPUS_MAX, ConnCpus, ProbeCounts, probe_config as cfg};

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

/// When this CPU began waiting for a contended lock (0: not waiting).
#[map(name = "lock_start")]
static LOCK_START: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

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

#[tracepoint]
pub fn lock_cont_begin(_ctx: TracePointContext) -> u32 {
    if let Some(start) = LOCK_START.get_ptr_mut(0) {
        // SAFETY: this CPU's entry.
        unsafe { *start = bpf_ktime_get_ns() };
    }
    0
}

#[tracepoint]
pub fn lock_cont_end(_ctx: TracePointContext) -> u32 {
    let (Some(start), Some(counts)) = (LOCK_START.get_ptr_mut(0), counts()) else {
        return 0;
    };
    // SAFETY: this CPU's entry.
    let began = unsafe { core::ptr::replace(start, 0) };
    if began != 0 {
        counts.lock_contended += 1;
        // SAFETY: no arguments, cannot fail.
        counts.lock_wait_ns += unsafe { bpf_ktime_get_ns() }.saturating_sub(began);
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
