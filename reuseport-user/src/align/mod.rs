//! Whether the NIC delivers each flow to the CPU whose worker owns it. Per-CPU steering keeps a
//! connection on the CPU that received it; which CPU that is, the device decides: each receive
//! queue's IRQ affinity, RPS masks (which move a queue's packets to other CPUs), and, for replies,
//! XPS (which transmit queue a CPU sends on). [`read::read_device`] reads those settings from
//! sysfs and procfs, [`mismatches`] names each disagreement with a set of worker CPUs and what it
//! costs, and [`apply`] changes the settings to match (and puts them back).
//!
//! Where a queue's NAPI runs in a kernel thread, that thread's CPU affinity decides where its
//! packets are processed, not its IRQ's: [`napi::read_threads`] finds the threads through the
//! kernel's `netdev` netlink family.
//!
//! [`rss::indirection_table`] reads the RSS indirection table (which flow-hash bucket goes to
//! which queue) with the ethtool ioctl; where a device has none, the report assumes flows spread
//! over all receive queues.

pub mod apply;
pub mod irqbalance;
pub mod napi;
pub mod read;
pub mod rss;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, io,
    path::PathBuf,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::cpus::{format_mask, parse_mask};
use crate::{CpuList, cpu_topology::CpuTopology, steering::fallback_table};

/// Errors from reading or changing a device's queue settings.
#[derive(Debug, Error)]
pub enum AlignError {
    /// No network device of that name in this network namespace.
    #[error("no network device {dev:?} here ({path} does not exist)")]
    NoDevice {
        /// The name given.
        dev: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The device has no queues directory (e.g. `bonding_masters`, or a kernel without sysfs
    /// queues).
    #[error("device {dev:?} has no queues ({path} does not exist): nothing to align")]
    NoQueues {
        /// The device.
        dev: String,
        /// The missing directory.
        path: PathBuf,
    },
    /// Reading a sysfs or procfs file failed.
    #[error("reading {path} failed")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file held something else than the kernel writes there.
    #[error("{path} holds {text:?}, which is not {expected}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it held.
        text: String,
        /// What was expected.
        expected: &'static str,
    },
    /// Writing a setting failed (the earlier writes of the same run were put back).
    #[error("writing {value:?} to {path} failed (needs root)")]
    Write {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// This process may not change what `apply` would change.
    #[error("{what} needs {needs}, which this process lacks (run it as root)")]
    NoPrivilege {
        /// The setting.
        what: String,
        /// The privilege it needs.
        needs: &'static str,
    },
    /// The state file of an earlier `apply` is still there.
    #[error("{path} exists: settings were already changed; restore them first")]
    AlreadyApplied {
        /// The state file.
        path: PathBuf,
    },
    /// No state file to restore from.
    #[error("{path} does not exist: nothing was changed, nothing to restore")]
    NothingToRestore {
        /// The state file.
        path: PathBuf,
    },
    /// Reading or writing the state file failed.
    #[error("state file {path}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The state directory or file could have been written by another user, or names a file
    /// `apply` never writes.
    #[error("refusing {path}: {why}")]
    UnsafeState {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// irqbalance would rewrite the IRQ affinities this would set.
    #[error(
        "irqbalance runs (pid {pid}) and would undo the IRQ affinity this sets: add \
         --stop-irqbalance (restore starts it again), or ban these IRQs from it"
    )]
    Irqbalance {
        /// Its process id.
        pid: u32,
    },
    /// Stopping or starting irqbalance failed.
    #[error("{what} irqbalance failed: {detail}")]
    IrqbalanceControl {
        /// `stopping` or `starting`.
        what: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// Asking the kernel's `netdev` netlink family for the device's NAPI instances failed.
    #[error("reading the NAPI instances of {dev:?} failed")]
    Netdev {
        /// The device.
        dev: String,
        /// Why.
        #[source]
        source: crate::netdev::NetdevError,
    },
    /// A NAPI thread seen when the plan was made has exited since (the device was reset or
    /// threaded NAPI turned off).
    #[error("{thread} (pid {pid}) is gone: read the device again and apply again")]
    ThreadGone {
        /// The thread's name.
        thread: String,
        /// Its pid.
        pid: u32,
    },
    /// Setting a NAPI thread's CPU affinity failed.
    #[error("pinning {thread} (pid {pid}) to CPUs {cpus} failed (needs root)")]
    PinThread {
        /// The thread's name.
        thread: String,
        /// Its pid.
        pid: u32,
        /// The CPU list.
        cpus: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The ethtool ioctl for the RSS indirection table failed.
    #[error("reading the RSS indirection table of {dev:?} (ETHTOOL_GRXFHINDIR) failed")]
    Rss {
        /// The device.
        dev: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No worker CPU given.
    #[error("the worker CPU set is empty")]
    NoWorkers,
}

/// One IRQ of the device and where it fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Irq {
    /// Its number (`/proc/irq/N`).
    pub number: u32,
    /// Its name in `/proc/interrupts` (e.g. `eth0-TxRx-3`, `mlx5_comp3@pci:0000:01:00.0`).
    pub name: String,
    /// The CPUs it fires on: `effective_affinity_list`, or `smp_affinity_list` where the kernel
    /// has no effective affinity.
    pub cpus: Vec<u32>,
    /// Whether `cpus` came from `effective_affinity_list`.
    pub effective: bool,
}

/// One receive queue (`queues/rx-N`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxQueue {
    /// N.
    pub index: u32,
    /// Its interrupt; `None` on virtual devices (veth processes on the sending CPU).
    pub irq: Option<Irq>,
    /// The CPUs RPS moves its packets to (empty: RPS off); `None` where the kernel has no RPS.
    pub rps_cpus: Option<Vec<u32>>,
    /// `rps_flow_cnt` (RFS flow table size; 0: RFS off).
    pub rps_flow_cnt: Option<u64>,
    /// The kernel thread its NAPI runs in, where NAPI is threaded ([`napi::read_threads`]).
    #[serde(default)]
    pub napi_thread: Option<napi::NapiThread>,
}

/// What decides where a receive queue's packets reach the socket layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Processing<'a> {
    /// RPS moves them to these CPUs.
    Rps(&'a [u32]),
    /// A NAPI thread, wherever it runs.
    Thread(&'a napi::NapiThread),
    /// The CPUs its IRQ fires on (NAPI in softirq).
    Irq(&'a Irq),
}

impl Processing<'_> {
    /// The CPUs it names.
    pub fn cpus(&self) -> &[u32] {
        match self {
            Self::Rps(cpus) => cpus,
            Self::Thread(thread) => &thread.cpus,
            Self::Irq(irq) => &irq.cpus,
        }
    }
}

impl RxQueue {
    /// What decides where this queue's packets reach the socket layer: RPS when it is on, else
    /// the NAPI thread when NAPI is threaded, else the IRQ; `None` when none is known (a
    /// virtual device in softirq mode processes on the sending CPU).
    pub fn processing(&self) -> Option<Processing<'_>> {
        match (&self.rps_cpus, &self.napi_thread, &self.irq) {
            (Some(rps), _, _) if !rps.is_empty() => Some(Processing::Rps(rps)),
            (_, Some(thread), _) if !thread.cpus.is_empty() => Some(Processing::Thread(thread)),
            (_, _, Some(irq)) if !irq.cpus.is_empty() => Some(Processing::Irq(irq)),
            _ => None,
        }
    }

    /// The CPUs where this queue's packets reach the socket layer ([`Self::processing`]).
    pub fn processing_cpus(&self) -> Option<Vec<u32>> {
        self.processing().map(|how| how.cpus().to_vec())
    }
}

/// One transmit queue (`queues/tx-N`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxQueue {
    /// N.
    pub index: u32,
    /// Its own interrupt, where the driver has separate transmit IRQs.
    pub irq: Option<Irq>,
    /// The CPUs that send on it (XPS; empty: off); `None` where unreadable (single-queue
    /// devices have no XPS).
    pub xps_cpus: Option<Vec<u32>>,
}

/// A device's queues as sysfs and procfs show them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// The device name.
    pub name: String,
    /// Whether it has a bus device (`/sys/class/net/DEV/device`): false for veth, bridges, ...
    pub hardware: bool,
    /// Receive queues by index.
    pub rx: Vec<RxQueue>,
    /// Transmit queues by index.
    pub tx: Vec<TxQueue>,
    /// The pid of a running irqbalance.
    pub irqbalance: Option<u32>,
    /// The RSS indirection table (entry `i`: the queue of hash bucket `i`), where the device has
    /// one and it was read ([`rss::indirection_table`]).
    pub rss_table: Option<Vec<u32>>,
    /// The fields the RSS hash covers per flow type, where the device has RSS and they were
    /// read ([`rss::hash_fields`]).
    #[serde(default)]
    pub rss_hash: Option<Vec<rss::HashFields>>,
}

impl DeviceView {
    /// Whether any queue has an interrupt of its own.
    pub fn has_irqs(&self) -> bool {
        self.rx.iter().any(|queue| queue.irq.is_some())
    }
}

/// One way the device's delivery disagrees with the worker CPUs; its `Display` is one line
/// saying what it costs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mismatch {
    /// A queue (no RPS) is processed on CPUs without a worker.
    QueueOnCpuWithoutWorker {
        /// The rx queue.
        queue: u32,
        /// Its processing CPUs.
        cpus: Vec<u32>,
        /// Those of them without a worker.
        without: Vec<u32>,
        /// Where steering sends their connections instead (the nearest worker CPU).
        fallback: Option<u32>,
    },
    /// A queue's NAPI thread may run on several CPUs: which worker gets its flows is the
    /// scheduler's choice, and changes as it moves the thread.
    NapiThreadUnpinned {
        /// The rx queue.
        queue: u32,
        /// The thread's name.
        thread: String,
        /// Its pid.
        pid: u32,
        /// The CPUs it may run on.
        cpus: Vec<u32>,
    },
    /// RPS moves a queue's packets to CPUs without a worker.
    RpsToCpusWithoutWorker {
        /// The rx queue.
        queue: u32,
        /// The RPS CPUs without a worker.
        without: Vec<u32>,
    },
    /// Several queues are processed on one CPU while worker CPUs get none.
    QueuesShareCpu {
        /// The queues.
        queues: Vec<u32>,
        /// Their CPU.
        cpu: u32,
        /// Worker CPUs no queue is processed on.
        idle: Vec<u32>,
    },
    /// The RSS table sends no flow to a receive queue.
    RssSkipsQueue {
        /// The queue.
        queue: u32,
        /// The table's size.
        buckets: usize,
    },
    /// The RSS hash of a TCP flow type leaves out the ports.
    RssHashSkipsPorts {
        /// The flow type (`tcp4`, `tcp6`).
        flow: String,
        /// ethtool's letters for the fields it does cover (`sd`).
        letters: String,
    },
    /// A worker CPU no queue is processed on (fewer queues than workers).
    WorkerWithoutQueue {
        /// The CPU.
        cpu: u32,
        /// How many rx queues the device has.
        queues: usize,
    },
    /// XPS is off on a multi-queue NIC.
    XpsOff {
        /// How many tx queues.
        tx_queues: usize,
    },
    /// XPS is set, but no transmit queue lists this worker CPU.
    XpsMissesWorker {
        /// The CPU.
        cpu: u32,
    },
    /// irqbalance runs and moves the device's IRQs.
    Irqbalance {
        /// Its pid.
        pid: u32,
    },
}

/// `cpus` as `CPU 3` or `CPUs 4-7`.
fn cpus_phrase(cpus: &[u32]) -> String {
    let list: CpuList = cpus.iter().copied().collect();
    if cpus.len() == 1 {
        format!("CPU {list}")
    } else {
        format!("CPUs {list}")
    }
}

/// `2 and 3`, `1, 2 and 3`.
fn and_list(items: &[u32]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => {
            let rest: Vec<String> = rest.iter().map(u32::to_string).collect();
            format!("{} and {last}", rest.join(", "))
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QueueOnCpuWithoutWorker {
                queue,
                cpus,
                without,
                fallback,
            } => {
                if cpus == without {
                    let which = if cpus.len() == 1 {
                        "which has no worker"
                    } else {
                        "which have no worker"
                    };
                    write!(
                        f,
                        "queue {queue} is processed on {}, {which}",
                        cpus_phrase(cpus)
                    )?;
                } else {
                    write!(
                        f,
                        "queue {queue} is processed on {}, of which {} has no worker",
                        cpus_phrase(cpus),
                        cpus_phrase(without)
                    )?;
                }
                match fallback {
                    Some(cpu) => write!(f, ": its flows fall back to CPU {cpu}"),
                    None => write!(f, ": its flows go to another CPU's worker"),
                }
            }
            Self::NapiThreadUnpinned {
                queue,
                thread,
                pid,
                cpus,
            } => write!(
                f,
                "queue {queue} is processed by {thread} (pid {pid}), which may run on {}: its \
                 flows go to whichever worker's CPU the scheduler picks, and move with it",
                cpus_phrase(cpus)
            ),
            Self::RpsToCpusWithoutWorker { queue, without } => write!(
                f,
                "RPS on rx-{queue} sends flows to {} without {}: their connections are accepted \
                 on another CPU",
                cpus_phrase(without),
                if without.len() == 1 {
                    "a worker"
                } else {
                    "workers"
                }
            ),
            Self::QueuesShareCpu { queues, cpu, idle } => write!(
                f,
                "queues {} are {}processed on CPU {cpu} while {} {} none",
                and_list(queues),
                if queues.len() == 2 { "both " } else { "all " },
                cpus_phrase(idle),
                if idle.len() == 1 { "gets" } else { "get" }
            ),
            Self::RssSkipsQueue { queue, buckets } => write!(
                f,
                "the RSS table sends none of its {buckets} buckets to queue {queue}: the CPU \
                 processing it receives no new flows from the NIC"
            ),
            Self::RssHashSkipsPorts { flow, letters } => write!(
                f,
                "the RSS hash of {flow} flows covers {letters:?}, not both ports: every \
                 connection between two addresses lands on one queue, so a few clients (or a \
                 load balancer) load one CPU"
            ),
            Self::WorkerWithoutQueue { cpu, queues } => write!(
                f,
                "CPU {cpu} has a worker but none of the {queues} rx queues is processed there: \
                 it gets only fallback connections"
            ),
            Self::XpsOff { tx_queues } => write!(
                f,
                "XPS is off on all {tx_queues} tx queues: a worker's replies leave on a hashed \
                 queue, whose completions run on another CPU"
            ),
            Self::XpsMissesWorker { cpu } => write!(
                f,
                "no tx queue's XPS lists CPU {cpu}: its worker's replies leave on a hashed queue"
            ),
            Self::Irqbalance { pid } => write!(
                f,
                "irqbalance runs (pid {pid}): it moves these IRQs every few seconds, undoing any \
                 alignment"
            ),
        }
    }
}

/// Each way `view` disagrees with workers on `workers`, in the order: per-queue CPUs (RPS,
/// NAPI thread or IRQ), the RSS table, the RSS hash fields, shared CPUs and idle workers, XPS,
/// irqbalance. `topology` picks the fallback CPU the way the steering program does.
pub fn mismatches(view: &DeviceView, workers: &CpuList, topology: &CpuTopology) -> Vec<Mismatch> {
    let mut found = Vec::new();
    let is_worker = |cpu: &u32| workers.contains(*cpu);
    let live: BTreeSet<u32> = workers.iter().collect();
    let fallback = |cpu: u32| -> Option<u32> {
        let table = fallback_table(cpu + 1, &live, topology);
        table.get(cpu as usize).copied().filter(|&to| to != cpu)
    };
    for queue in &view.rx {
        match queue.processing() {
            Some(Processing::Rps(rps)) => {
                let without: Vec<u32> = rps.iter().copied().filter(|c| !is_worker(c)).collect();
                if !without.is_empty() {
                    found.push(Mismatch::RpsToCpusWithoutWorker {
                        queue: queue.index,
                        without,
                    });
                }
            }
            Some(Processing::Thread(thread)) if thread.cpus.len() > 1 => {
                found.push(Mismatch::NapiThreadUnpinned {
                    queue: queue.index,
                    thread: thread.name.clone(),
                    pid: thread.pid,
                    cpus: thread.cpus.clone(),
                });
            }
            Some(how) => {
                let cpus = how.cpus();
                let without: Vec<u32> = cpus.iter().copied().filter(|c| !is_worker(c)).collect();
                if !without.is_empty() {
                    found.push(Mismatch::QueueOnCpuWithoutWorker {
                        queue: queue.index,
                        cpus: cpus.to_vec(),
                        fallback: fallback(without[0]),
                        without,
                    });
                }
            }
            None => {}
        }
    }
    if let Some(table) = view.rss_table.as_ref().filter(|table| !table.is_empty()) {
        for queue in &view.rx {
            if !table.contains(&queue.index) {
                found.push(Mismatch::RssSkipsQueue {
                    queue: queue.index,
                    buckets: table.len(),
                });
            }
        }
    }
    for hash in view.rss_hash.iter().flatten() {
        if hash.flow.starts_with("tcp") && !hash.covers_ports() {
            found.push(Mismatch::RssHashSkipsPorts {
                flow: hash.flow.clone(),
                letters: hash.letters(),
            });
        }
    }
    // Which worker CPUs get a queue: only knowable when every queue's CPU is known (a virtual
    // device without RPS processes on whichever CPU sends).
    let processing: Option<Vec<(u32, Vec<u32>)>> = view
        .rx
        .iter()
        .filter(|queue| {
            view.rss_table
                .as_ref()
                .is_none_or(|table| table.is_empty() || table.contains(&queue.index))
        })
        .map(|queue| queue.processing_cpus().map(|cpus| (queue.index, cpus)))
        .collect();
    if let Some(processing) = processing.filter(|p| !p.is_empty()) {
        let covered: BTreeSet<u32> = processing
            .iter()
            .flat_map(|(_, cpus)| cpus.iter().copied())
            .collect();
        let mut idle: Vec<u32> = workers.iter().filter(|c| !covered.contains(c)).collect();
        let mut by_cpu: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (queue, cpus) in &processing {
            if let [cpu] = cpus.as_slice() {
                by_cpu.entry(*cpu).or_default().push(*queue);
            }
        }
        for (cpu, queues) in by_cpu {
            if queues.len() > 1 && !idle.is_empty() {
                // The extra queues could each have had an idle worker CPU.
                let take = (queues.len() - 1).min(idle.len());
                let named: Vec<u32> = idle.drain(..take).collect();
                found.push(Mismatch::QueuesShareCpu {
                    queues,
                    cpu,
                    idle: named,
                });
            }
        }
        for cpu in idle {
            found.push(Mismatch::WorkerWithoutQueue {
                cpu,
                queues: view.rx.len(),
            });
        }
    }
    let xps: Vec<&Vec<u32>> = view.tx.iter().filter_map(|q| q.xps_cpus.as_ref()).collect();
    if xps.len() > 1 {
        if xps.iter().all(|cpus| cpus.is_empty()) {
            if view.has_irqs() {
                found.push(Mismatch::XpsOff {
                    tx_queues: xps.len(),
                });
            }
        } else {
            let listed: BTreeSet<u32> = xps.iter().flat_map(|c| c.iter().copied()).collect();
            for cpu in workers.iter().filter(|c| !listed.contains(c)) {
                found.push(Mismatch::XpsMissesWorker { cpu });
            }
        }
    }
    if let Some(pid) = view.irqbalance.filter(|_| view.has_irqs()) {
        found.push(Mismatch::Irqbalance { pid });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rx(index: u32, irq_cpus: &[u32], rps: &[u32]) -> RxQueue {
        RxQueue {
            index,
            irq: Some(Irq {
                number: 40 + index,
                name: format!("eth0-TxRx-{index}"),
                cpus: irq_cpus.to_vec(),
                effective: true,
            }),
            rps_cpus: Some(rps.to_vec()),
            rps_flow_cnt: Some(0),
            napi_thread: None,
        }
    }

    fn lines(view: &DeviceView, workers: &str) -> Vec<String> {
        let workers: CpuList = workers.parse().expect("list");
        mismatches(view, &workers, &CpuTopology::default())
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn an_aligned_nic_has_no_mismatch_and_a_misaligned_one_names_each() {
        let mut view = DeviceView {
            name: "eth0".into(),
            hardware: true,
            rx: (0..4).map(|q| rx(q, &[q], &[])).collect(),
            tx: (0..4)
                .map(|q| TxQueue {
                    index: q,
                    irq: None,
                    xps_cpus: Some(vec![q]),
                })
                .collect(),
            irqbalance: None,
            rss_table: Some((0..128).map(|bucket| bucket % 4).collect()),
            rss_hash: None,
        };
        assert_eq!(lines(&view, "0-3"), Vec::<String>::new());
        // A TCP hash on addresses only; UDP's is not judged (many NICs leave its ports out).
        let fields = |flow: &str, fields: u64| rss::HashFields {
            flow: flow.into(),
            fields,
        };
        view.rss_hash = Some(vec![
            fields("tcp4", 0x30),
            fields("udp4", 0x30),
            fields("tcp6", 0xf0),
        ]);
        assert_eq!(
            lines(&view, "0-3"),
            [
                "the RSS hash of tcp4 flows covers \"sd\", not both ports: every connection \
                 between two addresses lands on one queue, so a few clients (or a load \
                 balancer) load one CPU"
            ]
        );
        view.rss_hash = None;
        // A table that skips queue 3: CPU 3 receives no flow, though its IRQ is right.
        view.rss_table = Some((0..128).map(|bucket| bucket % 3).collect());
        assert_eq!(
            lines(&view, "0-3"),
            [
                "the RSS table sends none of its 128 buckets to queue 3: the CPU processing it \
                 receives no new flows from the NIC",
                "CPU 3 has a worker but none of the 4 rx queues is processed there: it gets \
                 only fallback connections",
            ]
        );
        view.rss_table = None;
        view.rx[3] = rx(3, &[2], &[]);
        view.rx[1] = rx(1, &[9], &[]);
        view.rx[0] = rx(0, &[0], &[4, 5, 6, 7]);
        assert_eq!(
            lines(&view, "0-3"),
            [
                "RPS on rx-0 sends flows to CPUs 4-7 without workers: their connections are \
                 accepted on another CPU",
                "queue 1 is processed on CPU 9, which has no worker: its flows fall back to CPU 3",
                "queues 2 and 3 are both processed on CPU 2 while CPU 0 gets none",
                "CPU 1 has a worker but none of the 4 rx queues is processed there: it gets \
                 only fallback connections",
                "CPU 3 has a worker but none of the 4 rx queues is processed there: it gets \
                 only fallback connections",
            ]
        );
    }

    #[test]
    fn a_napi_thread_decides_where_its_queue_is_processed_unless_rps_is_on() {
        let thread = |queue: u32, cpus: &[u32]| napi::NapiThread {
            napi_id: 8192 + queue,
            pid: 900 + queue,
            name: format!("napi/eth0-{}", 8192 + queue),
            cpus: cpus.to_vec(),
            linked: true,
        };
        let mut view = DeviceView {
            name: "eth0".into(),
            hardware: true,
            rx: (0..2).map(|q| rx(q, &[q], &[])).collect(),
            tx: Vec::new(),
            irqbalance: None,
            rss_table: None,
            rss_hash: None,
        };
        // Threads on the IRQs' CPUs: aligned.
        view.rx[0].napi_thread = Some(thread(0, &[0]));
        view.rx[1].napi_thread = Some(thread(1, &[1]));
        assert_eq!(lines(&view, "0-1"), Vec::<String>::new());
        // Queue 1's thread runs on CPU 0 although its IRQ fires on CPU 1: the thread counts.
        view.rx[1].napi_thread = Some(thread(1, &[0]));
        assert_eq!(
            lines(&view, "0-1"),
            ["queues 0 and 1 are both processed on CPU 0 while CPU 1 gets none"]
        );
        // A thread free to run anywhere.
        view.rx[1].napi_thread = Some(thread(1, &[0, 1, 2, 3]));
        assert_eq!(
            lines(&view, "0-1"),
            [
                "queue 1 is processed by napi/eth0-8193 (pid 901), which may run on CPUs 0-3: \
                 its flows go to whichever worker's CPU the scheduler picks, and move with it"
            ]
        );
        // RPS moves the packets on after NAPI: it wins.
        view.rx[1] = rx(1, &[1], &[0]);
        view.rx[1].napi_thread = Some(thread(1, &[3]));
        assert_eq!(view.rx[1].processing_cpus(), Some(vec![0]));
    }
}
