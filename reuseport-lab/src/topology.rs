//! Where the server and the clients run, created by the harness and always torn down.
//!
//! - [`TopologyKind::VethRss`]: two network namespaces joined by a veth pair with one receive
//!   queue per receiving server CPU, as a multi-queue NIC with RSS and one interrupt per CPU.
//!   Where each queue's NAPI instance runs is the server end's [`ServerRx`]:
//!   - [`ServerRx::Softirq`] (the default where server and clients share the CPUs): the clients
//!     are pinned round-robin to the server's CPUs and XPS at their end sends whatever CPU i
//!     sends into receive queue i, whose NAPI instance veth schedules in the softirq of the CPU
//!     that sent, CPU i: queue i is processed on CPU i, in softirq, with no thread to wake, as a
//!     NIC's interrupt for queue i raises it on CPU i. CPUs that receive nothing (under
//!     `--skew`, the server's other CPUs, where its replies make the clients' ACKs) send into
//!     one more queue of their own, so they never run a receiving CPU's queue. The flow's queue
//!     is its client's CPU rather than a hash of its addresses, which spreads SYNs as evenly as
//!     the clients.
//!   - [`ServerRx::NapiThread`] (the default where they are split): the client end picks a
//!     transmit queue per flow by hash (no XPS), veth hands it to the same-numbered receive queue
//!     of the server end, and that queue's NAPI instance runs in its own kernel thread
//!     (`napi/DEV-ID`, threaded NAPI) pinned to one server CPU, where the SYN is processed; it
//!     runs at normal priority (measured: at SCHED_FIFO, preempting per packet, it got half the
//!     connections per second, and interrupt coalescing with `gro_flush_timeout` fewer still).
//!     Each packet wakes a thread: on 2 shared CPUs that cost 43 % of the hash row's connection
//!     rate (README, "The topologies side by side").
//!
//!   The return path is the clients' end's [`ClientRx`]: its queues pinned to the client CPUs
//!   ([`ClientRx::NapiThread`]), or, with [`ClientRx::Softirq`], the server's replies processed
//!   in the backlog of the server CPU that sent them. Needs GRO on at each end that uses NAPI and
//!   TSO off on both (veth only uses its per-queue NAPI for GRO-eligible packets).
//! - [`TopologyKind::VethRps`]: the same two namespaces joined by a veth pair with one queue and
//!   no NAPI: each packet is queued on the sending CPU's backlog and RPS (`rx-0/rps_cpus` over the
//!   receiving server CPUs) moves it to a CPU picked by flow hash, with an IPI. Software steering
//!   of a one-queue NIC; its one backlog per sending CPU caps throughput.
//! - [`TopologyKind::Loopback`]: the server on 127.0.0.1 in this namespace, and clients pinned
//!   round-robin to CPUs (a pinned loopback sender's SYN is processed on its own CPU).
//!
//! Addresses are link-local (169.254.77.1 server, .2 client), inside the namespaces only, and
//! each end has a permanent neighbour entry for the other ([`crate::veth::link_neighbours`]):
//! no packet waits for ARP. The namespaces have no names (see [`crate::netns`]): the kernel
//! deletes them, and with them the veth pair and its NAPI threads, when the [`Topology`] is
//! dropped or its process dies, even by SIGKILL. Everything is set up by netlink, ioctl and sysfs
//! from this program: no `ip` needed.

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
    veth::{Offloads, VethEnd, VethError, configure, create_pair, link_neighbours, write_sysfs},
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
    /// [`ServerRx::Softirq`] was asked for with clients on CPUs that receive nothing.
    #[error(
        "server rx softirq processes each packet on the CPU of the client that sent it, so the \
         clients' CPUs ({client}) must be among the receiving server CPUs ({rx}): share the \
         CPUs, or use server rx napi-thread"
    )]
    SoftirqNeedsSharedCpus {
        /// The receiving server CPUs.
        rx: CpuList,
        /// The clients' CPUs.
        client: CpuList,
    },
    /// The machine's possible CPUs could not be read.
    #[error("reading the machine's possible CPUs failed")]
    PossibleCpus(#[source] reuseport::cpus::CpuError),
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
    /// Two namespaces joined by a multi-queue veth: one queue per receiving CPU, processed on
    /// that CPU, in softirq (the clients' CPU picking the queue) or in a pinned NAPI thread
    /// (a flow hash picking it), a NIC with RSS (see [`VethRx`]).
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

    /// Whether a client's packets are received on the client's own CPU, so that clients must
    /// be pinned to the CPUs that are to receive: on loopback, and on veth-rss with
    /// [`ServerRx::Softirq`]; not where a NAPI thread or RPS picks the CPU.
    pub fn receives_on_client_cpus(self, rx: VethRx) -> bool {
        match self {
            Self::Loopback => true,
            Self::VethRss => rx.server == ServerRx::Softirq,
            Self::VethRps => false,
        }
    }
}

impl std::fmt::Display for TopologyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the server's end of a [`TopologyKind::VethRss`] pair processes what it receives (the
/// clients' SYNs and requests): where each receive queue's NAPI instance runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerRx {
    /// Flows spread over the queues by hash, each queue's NAPI instance in a kernel thread pinned
    /// to its server CPU (GRO on, TSO off, threaded NAPI), as a NIC with threaded NAPI. Each
    /// packet wakes a NAPI thread. Works with the clients on CPUs of their own.
    NapiThread,
    /// The clients pinned round-robin to the server's CPUs, XPS at their end mapping CPU i to
    /// receive queue i (and every CPU that receives nothing to one more queue of their own),
    /// each queue's NAPI instance in the softirq of the CPU that sends into it (GRO on, TSO off,
    /// no threaded NAPI): queue i is processed on CPU i without a thread wake-up, as a NIC's
    /// per-queue interrupt would. Needs every client CPU to be a server CPU.
    Softirq,
}

impl ServerRx {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::NapiThread => "napi-thread",
            Self::Softirq => "softirq",
        }
    }
}

impl std::fmt::Display for ServerRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the clients' end of a [`TopologyKind::VethRss`] pair processes what it receives (the
/// server's replies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientRx {
    /// One receive queue per client CPU, each with its NAPI instance in a kernel thread pinned to
    /// that CPU (GRO on, TSO off, threaded NAPI): replies are processed on the client CPUs, as on
    /// a separate client machine with a multi-queue NIC. Each packet wakes a NAPI thread.
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

/// How the two ends of a [`TopologyKind::VethRss`] pair process what they receive
/// ([`crate::cpu_split::CpuSplit::default_veth_rx`] picks by where the clients run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VethRx {
    /// The server's end.
    pub server: ServerRx,
    /// The clients' end.
    pub client: ClientRx,
}

impl VethRx {
    /// NAPI threads at both ends, each pinned to its CPU: works whichever CPUs the clients get.
    pub const THREADS: Self = Self {
        server: ServerRx::NapiThread,
        client: ClientRx::NapiThread,
    };

    /// Softirq at both ends: every packet processed on the CPU that sent it, in its queue's
    /// softirq, no thread woken. Needs the clients on the server's CPUs.
    pub const SOFTIRQ: Self = Self {
        server: ServerRx::Softirq,
        client: ClientRx::Softirq,
    };
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
    rx: Option<VethRx>,
    napi_threads: Vec<NapiThread>,
}

impl Topology {
    /// Creates the topology for a server on `server_cpus`, receiving on all of them, with the
    /// clients on the same CPUs; a veth-rss pair has NAPI threads at both ends
    /// ([`VethRx::THREADS`]).
    pub fn create(kind: TopologyKind, server_cpus: &CpuList) -> Result<Self, TopologyError> {
        Self::create_receiving_on(kind, server_cpus, server_cpus)
    }

    /// Creates a topology whose SYNs are processed only on `rx_cpus` (all the server's CPUs, or
    /// fewer to skew the load), with the load generators on `client_cpus`: one queue and NAPI
    /// thread per CPU of each (veth-rss, [`VethRx::THREADS`]), the RPS mask (veth-rps), or the
    /// CPUs the clients are pinned to (loopback, where the receiving CPU is the sending one:
    /// `rx_cpus` wins).
    pub fn create_receiving_on(
        kind: TopologyKind,
        rx_cpus: &CpuList,
        client_cpus: &CpuList,
    ) -> Result<Self, TopologyError> {
        Self::create_with(kind, rx_cpus, client_cpus, VethRx::THREADS)
    }

    /// [`Topology::create_receiving_on`], with the ends of a veth-rss pair processing what they
    /// receive as `rx` says (other kinds ignore it). [`ServerRx::Softirq`] needs every client
    /// CPU among `rx_cpus`: the clients' CPU is where their packets are received.
    pub fn create_with(
        kind: TopologyKind,
        rx_cpus: &CpuList,
        client_cpus: &CpuList,
        rx: VethRx,
    ) -> Result<Self, TopologyError> {
        let rx = (kind == TopologyKind::VethRss).then_some(rx);
        let softirq_server = rx.is_some_and(|rx| rx.server == ServerRx::Softirq);
        if softirq_server && !client_cpus.iter().all(|cpu| rx_cpus.contains(cpu)) {
            return Err(TopologyError::SoftirqNeedsSharedCpus {
                rx: rx_cpus.clone(),
                client: client_cpus.clone(),
            });
        }
        let mut topology = Self {
            kind,
            pair: None,
            rx_cpus: rx_cpus.clone(),
            client_cpus: client_cpus.clone(),
            rx,
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
        // The client end's transmit queue i feeds the server end's receive queue i.
        let client_xps = if softirq_server {
            softirq_xps(rx_cpus)?
        } else {
            Vec::new()
        };
        let (server_queues, client_queues) = match kind {
            TopologyKind::VethRss if !client_xps.is_empty() => {
                (count_of(client_xps.len()), count(client_cpus))
            }
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
        match (kind, rx) {
            (TopologyKind::VethRss, Some(rx)) => {
                // No RPS on any receive queue. XPS on a transmit queue only where the clients'
                // packets go to the queue of the CPU that sends them (server rx softirq);
                // otherwise the queue is the flow hash's pick, and its NAPI thread's CPU the
                // receiving CPU, as with RSS.
                let set_queues = |sysfs: &Path, end: &VethEnd<'_>, xps: &[String]| {
                    for queue in 0..end.rx_queues {
                        write_sysfs(&sysfs.join(format!("queues/rx-{queue}/rps_cpus")), "0")?;
                    }
                    // XPS exists only on multi-queue devices.
                    if end.tx_queues > 1 {
                        for queue in 0..end.tx_queues {
                            let mask = xps.get(queue as usize).map_or("0", String::as_str);
                            write_sysfs(&sysfs.join(format!("queues/tx-{queue}/xps_cpus")), mask)?;
                        }
                    }
                    Ok(())
                };
                configure(&server, Offloads::Napi, |sysfs| {
                    set_queues(sysfs, &server, &[])
                })?;
                let mut napi_ends = Vec::new();
                if rx.server == ServerRx::NapiThread {
                    napi_ends.push((&server, rx_cpus));
                }
                let client_xps: Vec<String> = client_xps.iter().map(CpuList::to_mask).collect();
                match rx.client {
                    ClientRx::NapiThread => {
                        configure(&client, Offloads::Napi, |sysfs| {
                            set_queues(sysfs, &client, &client_xps)
                        })?;
                        napi_ends.push((&client, client_cpus));
                    }
                    ClientRx::Softirq => {
                        configure(&client, Offloads::Backlog, |sysfs| {
                            set_queues(sysfs, &client, &client_xps)
                        })?;
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
                // veth-rps (loopback returned above). RPS: hash each received flow to one of the
                // receiving CPUs.
                let mask = rx_cpus.to_mask();
                configure(&server, Offloads::Defaults, |sysfs| {
                    write_sysfs(&sysfs.join("queues/rx-0/rps_cpus"), &mask)
                })?;
                configure(&client, Offloads::Defaults, |_| Ok(()))?;
            }
        }
        link_neighbours(&server, &client)?;
        topology.pair = Some(pair);
        Ok(topology)
    }

    /// The topology's kind.
    pub fn kind(&self) -> TopologyKind {
        self.kind
    }

    /// How the two ends process what they receive (veth-rss only).
    pub fn rx(&self) -> Option<VethRx> {
        self.rx
    }

    /// The address the server should listen on (the port is the caller's).
    pub fn server_ip(&self) -> IpAddr {
        match self.kind {
            TopologyKind::Loopback => Ipv4Addr::LOCALHOST.into(),
            TopologyKind::VethRss | TopologyKind::VethRps => SERVER_IP.into(),
        }
    }

    /// Whether clients must be pinned for the receiving CPU to vary
    /// ([`TopologyKind::receives_on_client_cpus`]).
    pub fn pin_clients(&self) -> bool {
        self.kind
            .receives_on_client_cpus(self.rx.unwrap_or(VethRx::THREADS))
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

    /// The NAPI threads of both ends and their CPUs (veth-rss only), server's first; none at an
    /// end that processes in softirq ([`ServerRx::Softirq`], [`ClientRx::Softirq`]).
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
    count_of(cpus.len())
}

fn count_of(queues: usize) -> u32 {
    u32::try_from(queues).unwrap_or(u32::MAX).max(1)
}

/// The XPS masks of the clients' end's transmit queues with [`ServerRx::Softirq`]: queue i for
/// the i-th receiving CPU alone, and, where the machine has other CPUs, one more queue for all of
/// them. veth runs a receive queue's NAPI instance on whichever CPU sends into it, so a CPU that
/// receives no SYNs (a server worker's under `--skew`, whose replies make the clients' ACKs
/// there) must not send into a receiving CPU's queue, or that queue's SYNs would be processed
/// on it.
fn softirq_xps(rx_cpus: &CpuList) -> Result<Vec<CpuList>, TopologyError> {
    let possible = reuseport::cpus::possible_cpus().map_err(TopologyError::PossibleCpus)?;
    let mut masks: Vec<CpuList> = rx_cpus
        .iter()
        .map(|cpu| std::iter::once(cpu).collect())
        .collect();
    let others: CpuList = (0..possible)
        .filter(|&cpu| !rx_cpus.contains(cpu))
        .collect();
    if !others.is_empty() {
        masks.push(others);
    }
    Ok(masks)
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
