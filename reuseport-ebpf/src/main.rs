//! The reuseport BPF object: every program and map the `reuseport` tool loads.
//!
//! One job per file:
//! - [`select`]: the `SK_REUSEPORT` program that keeps each connection on the CPU that received it.
//! - [`probes`]: tracepoint probes that the experiments attach only while they measure.
#![no_std]
#![no_main]

mod probes;
mod select;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The helpers these programs call (bpf_sk_select_reuseport, per-CPU maps) are not GPL-only, but a
// GPL-compatible licence keeps every helper available to future programs in this object.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
