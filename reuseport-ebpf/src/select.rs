//! The steering object (`reuseport-steering`): what `serve` and `attach` load, and nothing else.
//!
//! `steer_to_cpu`: keep each new connection on the CPU that received it.
//!
//! The kernel runs this program when a TCP SYN (or a UDP datagram) arrives for a port whose
//! `SO_REUSEPORT` group it is attached to. It runs in the softirq that processes the packet, on
//! the CPU that received it:
//!
//! ```text
//! SYN ─► softirq on CPU c ─► __inet_lookup_listener ─► reuseport group of the port
//!          ─► steer_to_cpu: bpf_sk_select_reuseport(CPU_LISTENERS, c)
//!               ├─ CPU c spills (percpu-spill) ─► slot CPU_SPILL[c].slots[hash % 1024]: one of
//!               │                                 several listeners, chosen per connection
//!               ├─ slot c holds a listener      ─► that listener (its worker is pinned to CPU c)
//!               ├─ slot c is empty              ─► slot CPU_FALLBACK[c] (nearest live CPU:
//!               │                                  SMT sibling, then same LLC, node, package)
//!               ├─ the group is being built     ─► refused, as if nothing listened yet (HOLD)
//!               └─ that is empty too            ─► SK_PASS without a choice: the kernel hashes
//! ```
//!
//! So the SYN, the accept, every read and write and the close all happen on CPU c: no cross-CPU
//! wakeup, no accept-queue lock shared by two CPUs, no socket cache lines moving between CPUs.
//! Once the group is built the program never refuses a connection: an empty slot falls back.
//!
//! The common path (not spilling, slot c filled) is: read the CPU id, one per-CPU counter, one
//! `cpu_spill` entry (only where spill is on: `SPILL_ENABLED` is a load-time constant, and the
//! verifier removes the branch where it is 0), one `bpf_sk_select_reuseport`. Every lookup here
//! is of an array, which the verifier inlines into a bounds check and an address computation.
//!
//! Map layout (names as `bpftool map show` prints them), all filled by userspace
//! (`reuseport-user/src/steering.rs`, `reuseport-user/src/spill/`):
//!
//! | map              | type                  | key      | value                                      |
//! |------------------|-----------------------|----------|--------------------------------------------|
//! | `cpu_listeners`  | `REUSEPORT_SOCKARRAY` | CPU `c`  | listener of the worker on CPU `c`          |
//! | `cpu_spill`      | `ARRAY`               | CPU `c`  | `SpillRoute`: `active`, 1024 target CPUs   |
//! | `cpu_fallback`   | `ARRAY`               | CPU `c`  | CPU to use when slot `c` is empty, or HOLD |
//! | `steering_stats` | `PERCPU_ARRAY`        | `0`      | `SteeringStats` of this CPU                |
//!
//! A closed listener leaves its `cpu_listeners` slot empty by itself (the kernel removes it).
#![no_std]
#![no_main]

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The helpers this program calls are not GPL-only, but a GPL-compatible licence keeps every
// helper available to future programs in this object.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

use core::{cell::UnsafeCell, ffi::c_void, ptr};

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{
        bpf_map_def,
        bpf_map_type::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{bpf_get_smp_processor_id, bpf_sk_select_reuseport},
    macros::{map, sk_reuseport},
    maps::{Array, PerCpuArray},
    programs::SkReuseportContext,
};
use reuseport_common::{HOLD, MAX_CPUS, SpillRoute, SteeringStats, spill_slot};

/// Slot `c`: the listener of the worker pinned to CPU `c`.
#[map(name = "cpu_listeners")]
static CPU_LISTENERS: ListenerSlots = ListenerSlots::with_max_entries(MAX_CPUS);

/// A `REUSEPORT_SOCKARRAY` with 8-byte values (aya's `ReusePortSockArray` has 4-byte ones): the
/// kernel answers a lookup from userspace with the socket's cookie only for 8-byte values, so
/// `reuseport status` can tell which sockets the slots hold. Updates take the fd as a `u64`.
#[repr(transparent)]
struct ListenerSlots(UnsafeCell<bpf_map_def>);

// SAFETY: the definition is only read (by the loader, and by the kernel through the helper).
unsafe impl Sync for ListenerSlots {}

impl ListenerSlots {
    const fn with_max_entries(max_entries: u32) -> Self {
        Self(UnsafeCell::new(bpf_map_def {
            type_: BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
            key_size: size_of::<u32>() as u32,
            value_size: size_of::<u64>() as u32,
            max_entries,
            map_flags: 0,
            id: 0,
            pinning: 0,
        }))
    }

    /// `bpf_sk_select_reuseport` on slot `key`: `Err(-ENOENT)` for an empty slot.
    #[inline(always)]
    fn select_reuseport(&self, ctx: &SkReuseportContext, mut key: u32) -> Result<(), i64> {
        // SAFETY: the context and the map are the ones the helper expects; the key lives on the
        // stack for the call.
        let ret = unsafe {
            bpf_sk_select_reuseport(
                ctx.as_ptr().cast(),
                self.0.get().cast::<c_void>(),
                ptr::from_mut(&mut key).cast(),
                0,
            )
        };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }
}

/// Slot `c`: where CPU `c`'s connections go while it spills (`SpillRoute::active` is 1): entry
/// `spill_slot(hash)` names a CPU, CPU `c` itself meaning "stay". Userspace samples the accept
/// queues and the arrivals and writes it (`--mode percpu-spill`); a fresh map spills nothing.
#[map(name = "cpu_spill")]
static CPU_SPILL: Array<SpillRoute> = Array::with_max_entries(MAX_CPUS, 0);

/// Slot `c`: the CPU whose listener takes CPU `c`'s connections when slot `c` is empty, or
/// `HOLD` while the group is being built.
#[map(name = "cpu_fallback")]
static CPU_FALLBACK: Array<u32> = Array::with_max_entries(MAX_CPUS, 0);

/// One `SteeringStats` per CPU (a per-CPU array needs no atomics).
#[map(name = "steering_stats")]
static STEERING_STATS: PerCpuArray<SteeringStats> = PerCpuArray::with_max_entries(1, 0);

/// 1 where userspace loaded the program for `--mode percpu-spill`, else 0. It lives in the
/// object's read-only data, which the kernel freezes before verifying, so the verifier knows its
/// value and drops the spill branch from programs loaded without spill.
#[unsafe(no_mangle)]
static SPILL_ENABLED: Global<u32> = Global::new(0);

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

/// Spill target while spilling, else local slot, else fallback slot, else the kernel's hash.
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

    // 0. This CPU spills: the connection's entry of its route, unless that names this CPU.
    if SPILL_ENABLED.load() != 0
        && let Some(route) = CPU_SPILL.get(cpu)
        && route.active != 0
    {
        // `spill_slot` masks the hash to SPILL_SLOTS - 1, so the index is in bounds.
        let target = u32::from(route.slots[spill_slot(ctx.hash())]);
        if target != cpu {
            match CPU_LISTENERS.select_reuseport(ctx, target) {
                Ok(()) => {
                    stats.spilled += 1;
                    return SK_PASS;
                }
                // A target that just closed is skipped: carry on locally.
                Err(err) if err != -ENOENT => stats.errors += 1,
                Err(_) => {}
            }
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

    // 2. The nearest live CPU's listener, as userspace chose it; none while the group is built.
    if let Some(&fallback) = CPU_FALLBACK.get(cpu) {
        if fallback == HOLD {
            // The kernel answers SK_DROP from a reuseport program with a refusal (RST): the
            // client sees the port as not yet listening on this CPU and connects again.
            stats.held += 1;
            return SK_DROP;
        }
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

/// Calibration only (`reuseport serve --bpf-program select-only`, `reuseport ab --calibrate`):
/// the one thing every steering program must do, `bpf_sk_select_reuseport` of the local slot,
/// and nothing else (no counters, no fallback). Its ns per run above `steer_noop`'s is what the
/// kernel's helper costs; `steer_to_cpu`'s above it is what this program adds.
#[sk_reuseport]
pub fn steer_select(ctx: SkReuseportContext) -> u32 {
    // SAFETY: the helper takes no arguments and cannot fail.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // An empty slot leaves the choice to the kernel's hash, as `steer_noop` does.
    let _ = CPU_LISTENERS.select_reuseport(&ctx, cpu);
    SK_PASS
}
