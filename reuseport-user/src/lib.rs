//! Per-CPU `SO_REUSEPORT` steering with eBPF.
//!
//! With `SO_REUSEPORT` each worker owns a listener on the same port and the kernel picks one per
//! connection by hashing the 4-tuple, so the CPU that processed the SYN (in softirq) is usually
//! not the CPU of the worker that accepts it. This crate attaches an `SK_REUSEPORT` program that
//! picks the listener of the worker pinned to the receiving CPU instead, keeping each
//! connection's whole life on one CPU.
//!
//! The pieces, each usable on its own:
//! - [`cpus`]: which CPUs to use (lists such as `0-3,6`, the affinity mask), pinning;
//!   [`cpu_topology`]: which CPUs share a core, a cache, a NUMA node.
//! - [`listeners`]: one `SO_REUSEPORT` socket per CPU ([`PerCpuListeners`]).
//! - [`steering`]: load the BPF program, fill slot CPU → listener, attach, read counters
//!   ([`Steering`]) — the one steering path; [`sockarray`]: the `cpu_listeners` map's slots
//!   through `bpf(2)` (readable socket cookies).
//! - [`strategy`]: one type per steering mode behind the [`Strategy`] trait, and `auto`: eBPF
//!   per-CPU (with or without spill), [`cbpf`] (classic BPF `ld cpu; ret a`), [`incoming_cpu`]
//!   (`SO_INCOMING_CPU`, Linux >= 6.2), kernel hash.
//! - [`attach`]: the same steering for a running server's listeners (nginx, prefork servers),
//!   found through `/proc` ([`procfs`]) and taken with `pidfd_getfd`; [`pinned`]: such steering
//!   left in place after the attaching process exits ([`PinnedSteering`]); [`follow`]: steering
//!   that follows a server across reloads and restarts.
//! - [`port_steering`]: what steers a port, asked of the kernel (programs, slots, live
//!   listeners: steered, partly, stale), and detaching it; [`port_report`]: the same as data.
//! - [`align`]: whether the NIC's queues, IRQs, RSS, RPS and XPS deliver flows to the workers'
//!   CPUs, and making them; [`ethtool`]: the `SIOCETHTOOL` ioctl it and the lab use.
//! - [`kernel`]: the running kernel's release, for features that depend on it.
//! - [`worker`]: a pinned thread with a tokio current-thread runtime per listener;
//!   [`connections`]: header and idle timeouts, draining and shedding of its TCP connections.
//! - [`http`]: the demo HTTP/1.1 responder (`x-worker-cpu`, `x-incoming-cpu` headers).
//! - [`spill`]: `percpu-spill`, per-CPU steering that spills an overloaded CPU's connections.
//! - [`stats`]: counters, live line and JSON summary; [`metrics`]: the same counters for
//!   Prometheus.
//! - [`server`]: all of the above started and stopped together ([`Server`]).
//!
//! This crate is what a server embeds: it has no command-line or measurement dependencies. The
//! `reuseport` command line is the `reuseport-cli` crate; the load generator and the A/B
//! experiments behind `reuseport ab` are the `reuseport-lab` crate.
//!
//! ```no_run
//! use reuseport::{Server, ServerConfig, SteeringMode};
//!
//! let server = Server::start(ServerConfig::new("127.0.0.1:8080".parse()?, SteeringMode::Percpu))?;
//! println!("serving on {}", server.local_addr());
//! std::thread::sleep(std::time::Duration::from_secs(10));
//! let last = server.stop()?;
//! println!("locality {:?}", reuseport::stats::fraction(last.totals().local, last.totals().accepted));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod align;
pub mod attach;
pub mod cbpf;
pub mod connections;
pub mod cpu_topology;
pub mod cpus;
pub mod ethtool;
pub mod follow;
pub mod http;
pub mod incoming_cpu;
pub mod kernel;
pub mod listeners;
pub mod metrics;
pub mod netdev;
pub mod pinned;
pub mod port_report;
pub mod port_steering;
pub mod private_path;
pub mod procfs;
pub mod server;
pub mod sockarray;
pub mod spill;
pub mod stats;
pub mod steering;
pub mod strategy;
pub mod worker;

pub use cpus::CpuList;
pub use listeners::{PerCpuListeners, Protocol};
pub use pinned::PinnedSteering;
pub use reuseport_common::SteeringStats;
pub use server::{Server, ServerConfig};
pub use steering::{Steering, SteeringMode};
pub use strategy::Strategy;
