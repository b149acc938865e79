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
    /// CPU N when slot N of [`CPU_LISTENERS`] is empty (the nearest live CPU).
    pub const CPU_FALLBACK: &str = "cpu_fallback";
    /// `PERCPU_ARRAY` with one [`SteeringStats`](crate::SteeringStats) per CPU.
    pub const STEERING_STATS: &str = "steering_stats";
    /// The `SK_REUSEPORT` program that selects the listener of the receiving CPU.
    pub const STEER_TO_CPU: &str = "steer_to_cpu";
}

/// Upper bound on the number of CPU slots the BPF maps are compiled with.
///
/// Userspace shrinks the maps to the machine's possible CPU count at load time; this is only the
/// size written into the object file.
pub const MAX_CPUS: u32 = 4096;

/// What the steering program did with the connections (TCP SYNs, UDP datagrams) that arrived on
/// one CPU. Stored per CPU in [`names::STEERING_STATS`]; userspace sums or lists them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeringStats {
    /// Selected the listener of the CPU the program ran on (the CPU that received the packet).
    pub local: u64,
    /// The local slot was empty or closed; selected the fallback slot's listener instead.
    pub fallback: u64,
    /// Neither the local nor the fallback slot held a live listener: the program returned
    /// `SK_PASS` without selecting, so the kernel picked a listener by hash. Never a refusal.
    pub unsteered: u64,
    /// `bpf_sk_select_reuseport` failed for a reason other than an empty slot (for example a
    /// slot holding a socket of another reuseport group). The packet was still passed on.
    pub errors: u64,
}

impl SteeringStats {
    /// Adds `other` into `self`, field by field.
    pub fn add(&mut self, other: &Self) {
        self.local += other.local;
        self.fallback += other.fallback;
        self.unsteered += other.unsteered;
        self.errors += other.errors;
    }

    /// Every selection the program made, whatever its outcome.
    pub fn total(&self) -> u64 {
        self.local + self.fallback + self.unsteered
    }
}

// SAFETY: `SteeringStats` is `#[repr(C)]`, made only of `u64`s, so it has no padding and every bit
// pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SteeringStats {}
