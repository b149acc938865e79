//! The measurement lab: the built-in load generator and the A/B experiments behind
//! `reuseport load`, `reuseport ab` and `cargo xtask ab`. Does steering each connection to the CPU
//! that received it reduce lock contention, cross-CPU wakeups and cache traffic, and what does
//! that do to throughput and tail latency, against the kernel's hash selection?
//!
//! - [`load`]: the load generator (crr, rr, udp; closed or open loop, HdrHistogram).
//! - [`topology`]: namespaces + multi-queue veth (RSS-like) or one-queue veth + RPS, or loopback
//!   with pinned clients; always torn down. Built on [`netns`] (namespaces held by a descriptor)
//!   and [`veth`] (the pair, by netlink, ioctl and sysfs).
//! - [`cpu_split`]: the server's CPUs and the load generators' (apart on 8 CPUs or more).
//! - [`cpu_time`]: how busy those CPUs were during a run, and the CPU time per connection.
//! - [`probes`]: tracepoint BPF programs (lock contention, wakeups, per-connection CPUs) and IPIs.
//! - [`locks`]: contended lock waits by site (symbolized with [`kallsyms`]), side and kind, and
//!   which of them are the listener's.
//! - [`hw_counters`]: hardware counters where the machine has them (`unsupported` otherwise).
//! - [`runner`]: runs the real `reuseport serve` / `reuseport load` (and peers) per row and
//!   repetition, interleaved, with probes attached only while measuring.
//! - [`peers`]: nginx as a row, wrk as a cross-check.
//! - [`metrics`]: every compared metric, defined once (name, unit, better direction, label).
//! - [`report`]: medians and ranges, ratios, table, JSON, SVG; [`lock_report`]: its lock table.
//! - [`significance`]: bootstrap intervals of the ratios: which differences are established.
//!
//! It builds on the `reuseport` library (CPU lists, steering modes, the BPF object whose probes
//! it attaches); a server embedding that library does not pull in any of this.

pub(crate) mod child;
pub mod cpu_split;
pub mod cpu_time;
pub mod error;
pub mod hw_counters;
pub mod kallsyms;
pub mod load;
pub mod lock_report;
pub mod locks;
pub mod losses;
pub mod metrics;
pub mod netns;
pub mod peers;
pub mod probes;
pub mod report;
pub mod runner;
pub mod significance;
pub mod topology;
pub mod veth;
