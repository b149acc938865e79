//! `steer_to_cpu`: keep each new connection on the CPU that received it.
//!
//! The kernel runs this program when a TCP SYN (or a UDP datagram) arrives for a port whose
//! `SO_REUSEPORT` group it is attached to. It runs in the softirq that processes the packet, on
//! the CPU that received it:
//!
//! ```text
//! SYN ─► softirq on CPU c ─► __inet_lookup_listener ─► reuseport group of the port
//!          ─► steer_to_cpu: bpf_sk_select_reuseport(CPU_LISTENERS, c)
//!               ├─ CPU c is spilling       ─► slot CPU_SPILL[c] (least-loaded listener;
//!               │                              only --mode percpu-spill sets it)
//!               ├─ slot c holds a listener ─► that listener (its worker is pinned to CPU c)
//!               ├─ slot c is empty          ─► slot CPU_FALLBACK[c] (nearest live CPU:
//!               │                              SMT sibling, then same LLC, node, package)
//!               └─ that is empty too        ─► SK_PASS without a choice: the kernel hashes
//! ```
//!
//! So the SYN, the accept, every read and write and the close all happen on CPU c: no cross-CPU
//! wakeup, no accept-queue lock shared by two CPUs, no socket cache lines moving between CPUs.
//! The program never returns `SK_DROP`: a connection is never refused because a slot is empty.
//!
//! Map layout (names as `bpftool map show` prints them), all filled by userspace
//! (`reuseport-user/src/steering.rs`):
//!
//! | map              | type                  | key      | value                             |
//! |------------------|-----------------------|----------|-----------------------------------|
//! | `cpu_listeners`  | `REUSEPORT_SOCKARRAY` | CPU `c`  | listener of the worker on CPU `c` |
//! | `cpu_fallback`   | `ARRAY`               | CPU `c`  | CPU to use when slot `c` is empty |
//! | `cpu_spill`      | `ARRAY`               | CPU `c`  | 1 + CPU to use while `c` is overloaded; 0: not |
//! | `steering_stats` | `PERCPU_ARRAY`        | `0`      | `SteeringStats` of this CPU       |
//!
//! A closed listener leaves its `cpu_listeners` slot empty by itself (the kernel removes it).

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    helpers::bpf_get_smp_processor_id,
    macros::{map, sk_reuseport},
    maps::{Array, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use reuseport_common::{MAX_CPUS, NO_SPILL, SteeringStats};

/// Slot `c`: the listener of the worker pinned to CPU `c`.
#[map(name = "cpu_listeners")]
static CPU_LISTENERS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_CPUS, 0);

/// Slot `c`: the CPU whose listener takes CPU `c`'s connections when slot `c` is empty.
#[map(name = "cpu_fallback")]
static CPU_FALLBACK: Array<u32> = Array::with_max_entries(MAX_CPUS, 0);

/// Slot `c`: 1 + the CPU whose listener takes CPU `c`'s connections while `c`'s accept queue is
/// over the spill threshold, or `NO_SPILL` (0, so a fresh map spills nothing). Userspace samples
/// the queues and writes it (`--mode percpu-spill`).
#[map(name = "cpu_spill")]
static CPU_SPILL: Array<u32> = Array::with_max_entries(MAX_CPUS, 0);

/// One `SteeringStats` per CPU (a per-CPU array needs no atomics).
#[map(name = "steering_stats")]
static STEERING_STATS: PerCpuArray<SteeringStats> = PerCpuArray::with_max_entries(1, 0);

/// `bpf_sk_select_reuseport` returns `-ENOENT` for an empty slot; anything else is an error.
const ENOENT: i64 = 2;

#[sk_reuseport]
pub fn steer_to_cpu(ctx: SkReuseportContext) -> u32 {
    steer(&ctx)
}

/// The same choice, attached as `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`: the kernel also runs it when
/// a listener closes, for each connection still in that listener's accept queue (or handshake),
/// so the connection moves to the listener this picks instead of being reset. The closing
/// listener has already left `cpu_listeners`, so its CPU's slot is empty and the fallback (the
/// nearest live CPU) takes it. Migrations count as selections in `steering_stats`.
#[sk_reuseport(migrate)]
pub fn steer_migrate(ctx: SkReuseportContext) -> u32 {
    steer(&ctx)
}

/// Spill target while overloaded, else local slot, else fallback slot, else the kernel's hash;
/// never a refusal.
#[inline(always)]
fn steer(ctx: &SkReuseportContext) -> u32 {
    // SAFETY: the helper takes no arguments and cannot fail.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // The per-CPU stats entry always exists (index 0 of a one-entry array); the check is for the
    // verifier, which requires it.
    let Some(stats) = STEERING_STATS.get_ptr_mut(0) else {
        return SK_PASS;
    };
    // SAFETY: a per-CPU array entry is only touched by this CPU, and the program is not
    // preempted while it runs.
    let stats = unsafe { &mut *stats };

    // 0. This CPU's listener is overloaded: the least-loaded listener, as userspace chose it.
    if let Some(&target) = CPU_SPILL.get(cpu)
        && target != NO_SPILL
    {
        match CPU_LISTENERS.select_reuseport(ctx, target - 1) {
            Ok(()) => {
                stats.spilled += 1;
                return SK_PASS;
            }
            // A target that just closed: carry on locally.
            Err(err) if err != -ENOENT => stats.errors += 1,
            Err(_) => {}
        }
    }

    // 1. The listener of this CPU's worker.
    match CPU_LISTENERS.select_reuseport(ctx, cpu) {
        Ok(()) => {
            stats.local += 1;
            return SK_PASS;
        }
        Err(err) if err != -ENOENT => stats.errors += 1,
        Err(_) => {}
    }

    // 2. The nearest live CPU's listener, as userspace chose it.
    if let Some(&fallback) = CPU_FALLBACK.get(cpu) {
        match CPU_LISTENERS.select_reuseport(ctx, fallback) {
            Ok(()) => {
                stats.fallback += 1;
                return SK_PASS;
            }
            Err(err) if err != -ENOENT => stats.errors += 1,
            Err(_) => {}
        }
    }

    // 3. Nothing selected: SK_PASS lets the kernel pick a listener of the group by hash.
    stats.unsteered += 1;
    SK_PASS
}

/// Calibration only (`reuseport serve --bpf-program noop`, `reuseport ab --calibrate`): selects
/// nothing, so the kernel hashes as if no program were attached. Its ns per run, measured exactly
/// like `steer_to_cpu`'s, is the floor the kernel's BPF run-time statistics report on this machine
/// (mostly the two clock reads around the run), to subtract when reading `steer_to_cpu`'s cost.
#[sk_reuseport]
pub fn steer_noop(_ctx: SkReuseportContext) -> u32 {
    SK_PASS
}
