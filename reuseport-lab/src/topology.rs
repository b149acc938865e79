//! Where the server and the clients run, created by the harness and always torn down.
//!
//! - [`TopologyKind::VethRss`]: two network namespaces joined by a veth pair with one receive
//!   queue per receiving server CPU, as a multi-queue NIC with RSS and one interrupt per CPU: the
//!   client end picks a transmit queue per flow by hash (no XPS), veth hands it to the same-numbered
//!   receive queue of the server end, and that queue's NAPI instance runs in its own kernel thread
//!   (`napi/DEV-ID`, threaded NAPI) pinned to one server CPU, where the SYN is processed; it
//!   runs at normal priority (measured: at SCHED_FIFO, preempting per packet, it got half the
//!   connections per second, and interrupt coalescing with `gro_flush_timeout` fewer still). The
//!   return path is the same with the client's queues pinned to the client CPUs
//!   ([`ClientRx::NapiThread`]), or, with [`ClientRx::Softirq`], the server's replies are
//!   processed in the backlog of the server CPU that sent them. Needs GRO on at each end that
//!   uses NAPI and TSO off on both (veth only uses its per-queue NAPI for GRO-eligible packets).
//! - [`TopologyKind::VethRps`]: the same two namespaces joined by a veth pair with one queue and
//!   no NAPI: each packet is queued on the sending CPU's backlog and RPS (`rx-0/rps_cpus` over the
//!   receiving server CPUs) moves it to a CPU picked by flow hash, with an IPI. Software steering
//!   of a one-queue NIC; its one backlog per sending CPU caps throughput.
//! - [`TopologyKind::Loopback`]: the server on 127.0.0.1 in this namespace, and clients pinned
//!   round-robin to CPUs (a pinned loopback sender's SYN is processed on its own CPU).
//!
//! Addresses are link-local (169.254.77.1 server, .2 client), inside the namespaces only. The
//! namespaces have no names (see [`crate::netns`]): the kernel deletes them, and with them the
//! veth pair and its NAPI threads, when the [`Topology`] is dropped or its process dies, even by
//! SIGKILL. Everything is set up by netlink, ioctl and sysfs from this program: no `ip` needed.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use reuseport::cpus::CpuList;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    netns::{NetNs, NetNsError},
    veth::{Offloads, VethEnd, VethError, configure, create_pair, write_sysfs},
};

/// Errors from creating a topology.
#[derive(Debug, Error)]
pub enum TopologyError {
    /// A namespace could not be created or entered.
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    /// The veth pair could not be set up.
    #[error(transparent)]
    Veth(#[from] VethError),
    /// The NAPI threads of a device did not appear.
    #[error(
        "{dev} has {found} NAPI threads (napi/{dev}-*), not the {expected} of its receive queues"
    )]
    NapiThreads {
        /// The device.
        dev: String,
        /// Threads found.
        found: usize,
        /// Receive queues.
        expected: usize,
    },
    /// A NAPI thread could not be pinned.
    #[error("pinning NAPI thread {name} (pid {pid}) to CPU {cpu} failed")]
    Pin {
        /// The thread's name.
        name: String,
        /// Its pid.
        pid: u32,
        /// The CPU.
        cpu: u32,
        /// Why.
        #[source]
        source: reuseport::cpus::CpuError,
    },
}

/// Which topology an experiment uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TopologyKind {
    /// Two namespaces joined by a multi-queue veth: one queue and one pinned NAPI thread per
    /// receiving CPU, flows spread over queues by hash (a NIC with RSS).
    VethRss,
    /// Two namespaces joined by a one-queue veth, RPS spreading received flows by hash.
    VethRps,
    /// Everything on loopback, clients pinned round-robin to CPUs.
    Loopback,
}

impl TopologyKind {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::VethRss => "veth-rss",
            Self::VethRps => "veth-rps",
            Self::Loopback => "loopback",
        }
    }

    /// Whether server and clients are in two namespaces joined by veth.
    pub fn is_veth(self) -> bool {
        matches!(self, Self::VethRss | Self::VethRps)
    }
}

impl std::fmt::Display for TopologyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the clients' end of a [`TopologyKind::VethRss`] pair processes what it receives (the
/// server's replies). The server's end is the same either way: a queue and a pinned NAPI thread
/// per receiving server CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientRx {
    /// One receive queue per client CPU, each with its NAPI instance in a kernel thread pinned to
    /// that CPU (GRO on, TSO off, threaded NAPI): replies are processed on the client CPUs, as on
    /// a separate client machine with a multi-queue NIC. Each packet wakes a NAPI thread.
    #[default]
    NapiThread,
    /// GRO off, TSO off, no threaded NAPI: veth queues each reply on the backlog of the CPU that
    /// sent it (a server CPU) and processes it in that CPU's softirq, as loopback does. No client
    /// NAPI thread exists, so none is woken; the server CPUs do the clients' receive work.
    Softirq,
}

impl ClientRx {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::NapiThread => "napi-thread",
            Self::Softirq => "softirq",
        }
    }
}

impl std::fmt::Display for ClientRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Server and client addresses on the veth pair (link-local: never routed off the machine).
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 2);

/// A NAPI kernel thread of a veth receive queue, and the CPU it was pinned to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NapiThread {
    /// Its name, `napi/DEV-ID`.
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// The CPU it is pinned to.
    pub cpu: u32,
}

/// The two namespaces and the devices between them.
#[derive(Debug)]
struct VethPair {
    server: NetNs,
    client: NetNs,
    server_dev: String,
    client_dev: String,
}

/// A created topology: where the server listens and how to start processes on each side.
#[derive(Debug)]
pub struct Topology {
    kind: TopologyKind,
    pair: Option<VethPair>,
    rx_cpus: CpuList,
    client_cpus: CpuList,
    client_rx: ClientRx,
    napi_threads: Vec<NapiThread>,
}

impl Topology {
    /// Creates the topology for a server on `server_cpus`, receiving on all of them, with the
    /// clients on the same CPUs.
    pub fn create(kind: TopologyKind, server_cpus: &CpuList) -> Result<Self, TopologyError> {
        Self::create_receiving_on(kind, server_cpus, server_cpus)
    }

    /// Creates a topology whose SYNs are processed only on `rx_cpus` (all the server's CPUs, or
    /// fewer to skew the load), with the load generators on `client_cpus`: one queue and NAPI
    /// thread per CPU of each (veth-rss), the RPS mask (veth-rps), or the CPUs the clients are
    /// pinned to (loopback, where the receiving CPU is the sending one: `rx_cpus` wins).
    pub fn create_receiving_on(
        kind: TopologyKind,
        rx_cpus: &CpuList,
        client_cpus: &CpuList,
    ) -> Result<Self, TopologyError> {
        Self::create_with(kind, rx_cpus, client_cpus, ClientRx::default())
    }

    /// [`Topology::create_receiving_on`], with the clients' end of a veth-rss pair processing
    /// what it receives as `client_rx` says (other kinds ignore it).
    pub fn create_with(
        kind: TopologyKind,
        rx_cpus: &CpuList,
        client_cpus: &CpuList,
        client_rx: ClientRx,
    ) -> Result<Self, TopologyError> {
        let client_rx = match kind {
            TopologyKind::VethRss => client_rx,
            TopologyKind::VethRps | TopologyKind::Loopback => ClientRx::default(),
        };
        let mut topology = Self {
            kind,
            pair: None,
            rx_cpus: rx_cpus.clone(),
            client_cpus: client_cpus.clone(),
            client_rx,
            napi_threads: Vec::new(),
        };
        if !kind.is_veth() {
            return Ok(topology);
        }
        // Namespaces first: whatever fails below, dropping them deletes everything in them.
        let suffix = device_suffix();
        let pair = VethPair {
            server: NetNs::create()?,
            client: NetNs::create()?,
            server_dev: format!("rps{suffix}"),
            client_dev: format!("rpc{suffix}"),
        };
        // With ClientRx::Softirq the client's receive queues are kept (the server end is
        // unchanged), though a reply's backlog is the sending CPU's, whichever queue it names.
        let (server_queues, client_queues) = match kind {
            TopologyKind::VethRss => (count(rx_cpus), count(client_cpus)),
            _ => (1, 1),
        };
        let server = VethEnd {
            ns: &pair.server,
            name: pair.server_dev.clone(),
            addr: SERVER_IP,
            rx_queues: server_queues,
            tx_queues: client_queues,
        };
        let client = VethEnd {
            ns: &pair.client,
            name: pair.client_dev.clone(),
            addr: CLIENT_IP,
            rx_queues: client_queues,
            tx_queues: server_queues,
        };
        create_pair(&server, &client)?;
        match kind {
            TopologyKind::VethRss => {
                // No RPS on any receive queue and no XPS on any transmit queue: the queue is the
                // flow hash's pick, and its NAPI thread's CPU the receiving CPU, as with RSS.
                let clear = |sysfs: &Path, end: &VethEnd<'_>| {
                    for queue in 0..end.rx_queues {
                        write_sysfs(&sysfs.join(format!("queues/rx-{queue}/rps_cpus")), "0")?;
                    }
                    // XPS exists only on multi-queue devices.
                    if end.tx_queues > 1 {
                        for queue in 0..end.tx_queues {
                            write_sysfs(&sysfs.join(format!("queues/tx-{queue}/xps_cpus")), "0")?;
                        }
                    }
                    Ok(())
                };
                configure(&server, Offloads::Napi, |sysfs| clear(sysfs, &server))?;
                let mut napi_ends = vec![(&server, rx_cpus)];
                match client_rx {
                    ClientRx::NapiThread => {
                        configure(&client, Offloads::Napi, |sysfs| clear(sysfs, &client))?;
                        napi_ends.push((&client, client_cpus));
                    }
                    ClientRx::Softirq => {
                        configure(&client, Offloads::Backlog, |sysfs| clear(sysfs, &client))?;
                    }
                }
                // Threaded NAPI once both ends are up (NAPI exists while the device is up).
                for (end, cpus) in napi_ends {
                    configure_threaded(end)?;
                    topology
                        .napi_threads
                        .extend(pin_napi_threads(&end.name, cpus)?);
                }
            }
            _ => {
                // RPS: hash each received flow to one of the receiving CPUs.
                let mask = rx_cpus.to_mask();
                configure(&server, Offloads::Defaults, |sysfs| {
                    write_sysfs(&sysfs.join("queues/rx-0/rps_cpus"), &mask)
                })?;
                configure(&client, Offloads::Defaults, |_| Ok(()))?;
            }
        }
        topology.pair = Some(pair);
        Ok(topology)
    }

    /// The topology's kind.
    pub fn kind(&self) -> TopologyKind {
        self.kind
    }

    /// How the clients' end processes what it receives (always the default but for veth-rss).
    pub fn client_rx(&self) -> ClientRx {
        self.client_rx
    }

    /// The address the server should listen on (the port is the caller's).
    pub fn server_ip(&self) -> IpAddr {
        match self.kind {
            TopologyKind::Loopback => Ipv4Addr::LOCALHOST.into(),
            TopologyKind::VethRss | TopologyKind::VethRps => SERVER_IP.into(),
        }
    }

    /// Whether clients must be pinned for the receiving CPU to vary (loopback) or not (veth,
    /// where the queue's CPU or RPS picks it).
    pub fn pin_clients(&self) -> bool {
        self.kind == TopologyKind::Loopback
    }

    /// The CPUs for load-generator threads: on loopback the CPUs that are to receive the SYNs
    /// (clients are pinned there); across veth the client CPUs.
    pub fn client_cpus(&self) -> CpuList {
        match self.kind {
            TopologyKind::Loopback => self.rx_cpus.clone(),
            TopologyKind::VethRss | TopologyKind::VethRps => self.client_cpus.clone(),
        }
    }

    /// Makes `command` run on the server side.
    pub fn server_side(&self, command: &mut Command) -> Result<(), TopologyError> {
        match &self.pair {
            Some(pair) => Ok(pair.server.enter_on_spawn(command)?),
            None => Ok(()),
        }
    }

    /// Makes `command` run on the client side.
    pub fn client_side(&self, command: &mut Command) -> Result<(), TopologyError> {
        match &self.pair {
            Some(pair) => Ok(pair.client.enter_on_spawn(command)?),
            None => Ok(()),
        }
    }

    /// The namespaces this topology created, by inode (server's first; empty for loopback).
    pub fn namespaces(&self) -> Vec<u64> {
        self.pair
            .iter()
            .flat_map(|pair| [pair.server.inode(), pair.client.inode()])
            .collect()
    }

    /// The server-side and client-side device names (none for loopback): `rps`/`rpc` and the
    /// pid for a process's first topology, with `nN` after it for later ones.
    pub fn devices(&self) -> Option<(&str, &str)> {
        self.pair
            .as_ref()
            .map(|pair| (pair.server_dev.as_str(), pair.client_dev.as_str()))
    }

    /// The NAPI threads of both ends and their CPUs (veth-rss only), server's first; none of the
    /// clients' end with [`ClientRx::Softirq`].
    pub fn napi_threads(&self) -> &[NapiThread] {
        &self.napi_threads
    }

    /// Runs `work` inside the server's namespace, with its sysfs on `/sys` (veth only).
    pub fn in_server_namespace<T: Send>(
        &self,
        work: impl FnOnce() -> T + Send,
    ) -> Option<Result<T, TopologyError>> {
        let pair = self.pair.as_ref()?;
        Some(pair.server.run(work).map_err(TopologyError::from))
    }

    /// Runs `work` inside the clients' namespace, with its sysfs on `/sys` (veth only).
    pub fn in_client_namespace<T: Send>(
        &self,
        work: impl FnOnce() -> T + Send,
    ) -> Option<Result<T, TopologyError>> {
        let pair = self.pair.as_ref()?;
        Some(pair.client.run(work).map_err(TopologyError::from))
    }
}

/// What follows `rps`/`rpc` in device names: this process's pid, and from its second topology
/// on `nN` too, so that the NAPI threads (`napi/DEV-ID`, named in one global namespace) of every
/// topology alive at once have names of their own. At most 13 bytes (`4194304n9999`).
fn device_suffix() -> String {
    static CREATED: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    match CREATED.fetch_add(1, Ordering::Relaxed) {
        0 => pid.to_string(),
        n => format!("{pid}n{}", n % 10_000),
    }
}

fn count(cpus: &CpuList) -> u32 {
    u32::try_from(cpus.len()).unwrap_or(u32::MAX).max(1)
}

/// Turns on threaded NAPI for `end`'s device.
fn configure_threaded(end: &VethEnd<'_>) -> Result<(), TopologyError> {
    let dev = end.name.clone();
    end.ns
        .run(move || write_sysfs(&Path::new("/sys/class/net").join(dev).join("threaded"), "1"))??;
    Ok(())
}

/// The NAPI threads of `dev` (`napi/DEV-ID`, in any namespace: kernel threads are global),
/// sorted by NAPI id, which veth allocates in receive-queue order.
pub fn napi_threads_of(dev: &str) -> Vec<(u32, String)> {
    let prefix = format!("napi/{dev}-");
    let mut threads: Vec<(u64, u32, String)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = fs::read_to_string(entry.path().join("comm")).ok()?;
            let comm = comm.trim();
            let id: u64 = comm.strip_prefix(&prefix)?.parse().ok()?;
            Some((id, pid, comm.to_owned()))
        })
        .collect();
    threads.sort();
    threads
        .into_iter()
        .map(|(_, pid, name)| (pid, name))
        .collect()
}

/// Pins the i-th NAPI thread of `dev` (receive queue i) to the i-th CPU of `cpus`.
fn pin_napi_threads(dev: &str, cpus: &CpuList) -> Result<Vec<NapiThread>, TopologyError> {
    let expected = cpus.len().max(1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let threads = loop {
        let threads = napi_threads_of(dev);
        if threads.len() == expected || Instant::now() > deadline {
            break threads;
        }
        thread::sleep(Duration::from_millis(10));
    };
    if threads.len() != expected {
        return Err(TopologyError::NapiThreads {
            dev: dev.to_owned(),
            found: threads.len(),
            expected,
        });
    }
    threads
        .into_iter()
        .zip(cpus.iter())
        .map(|((pid, name), cpu)| {
            reuseport::cpus::set_task_affinity(pid, &std::iter::once(cpu).collect()).map_err(
                |source| TopologyError::Pin {
                    name: name.clone(),
                    pid,
                    cpu,
                    source,
                },
            )?;
            Ok(NapiThread { name, pid, cpu })
        })
        .collect()
}
