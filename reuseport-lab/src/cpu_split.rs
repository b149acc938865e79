//! Which CPUs the server under test gets and which the load generators get.
//!
//! On a machine with [`SPLIT_FROM`] or more CPUs, an experiment across veth puts the server
//! (its workers, the receive queues' NAPI threads or RPS mask) on one half and the clients on the
//! other, so that the load generators' own work is not charged to the server. Whole cores go to
//! one side (SMT siblings stay together), in NUMA node, package and CPU number order: the server
//! gets the first half (one node, where the machine has two), the clients the rest. Below that,
//! and on loopback (where a client's SYN is processed on the client's own CPU, so the receiving
//! CPU cannot be apart from the sending one), both share every CPU, as before.
//!
//! Explicit lists must be disjoint, or equal (sharing, on purpose); a partial overlap is refused
//! because its result would mix both setups.

use std::{collections::BTreeMap, io, os::unix::process::CommandExt, process::Command};

use reuseport::{cpu_topology::CpuTopology, cpus::CpuList};
use rustix::thread::sched_setaffinity;
use thiserror::Error;

use crate::topology::{TopologyKind, VethRx};

/// Machines with at least this many CPUs split them between server and clients by default.
pub const SPLIT_FROM: usize = 8;

/// Why a split cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpuSplitError {
    /// A list names CPUs this process may not run on.
    #[error("--{side}-cpus {list}: CPU {cpu} is not one this process may use (allowed: {allowed})")]
    NotAllowed {
        /// `server` or `client`.
        side: &'static str,
        /// The list given.
        list: CpuList,
        /// The first CPU outside.
        cpu: u32,
        /// The allowed CPUs.
        allowed: CpuList,
    },
    /// A list is empty.
    #[error("--{side}-cpus is empty: give at least one CPU")]
    Empty {
        /// `server` or `client`.
        side: &'static str,
    },
    /// The lists share some CPUs but are not equal.
    #[error(
        "--server-cpus {server} and --client-cpus {client} overlap on {common}: give disjoint \
         lists, or the same list for both to share the CPUs on purpose"
    )]
    Overlap {
        /// The server's list.
        server: CpuList,
        /// The clients' list.
        client: CpuList,
        /// The CPUs in both.
        common: CpuList,
    },
    /// One list was given and it leaves no CPU for the other side.
    #[error("--{given}-cpus {list} leaves no CPU for the {other}s: give --{other}-cpus too")]
    NothingLeft {
        /// The side given.
        given: &'static str,
        /// The side left without CPUs.
        other: &'static str,
        /// The list given.
        list: CpuList,
    },
}

/// The server's CPUs and the load generators' CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSplit {
    /// Where the server under test, and the receive processing, run.
    pub server: CpuList,
    /// Where the load generators run.
    pub client: CpuList,
}

impl CpuSplit {
    /// Both sides on all of `cpus`.
    pub fn shared(cpus: &CpuList) -> Self {
        Self {
            server: cpus.clone(),
            client: cpus.clone(),
        }
    }

    /// Whether server and clients share their CPUs.
    pub fn is_shared(&self) -> bool {
        self.server == self.client
    }

    /// How a veth-rss pair's ends process what they receive, unless told: in softirq on the
    /// sending CPU where the CPUs are shared ([`VethRx::SOFTIRQ`]: no thread woken per packet on
    /// CPUs the server also needs), in NAPI threads pinned to each side's CPUs where they are
    /// split ([`VethRx::THREADS`]: the only way to process the clients' packets on the server's
    /// CPUs).
    pub fn default_veth_rx(&self) -> VethRx {
        if self.is_shared() {
            VethRx::SOFTIRQ
        } else {
            VethRx::THREADS
        }
    }

    /// The split for `topology` from the lists given (if any), checked against `allowed`; the
    /// default (see the module's documentation) where none is given; where only one is given, the
    /// other side gets the rest of `allowed`.
    pub fn resolve(
        topology: TopologyKind,
        allowed: &CpuList,
        server: Option<CpuList>,
        client: Option<CpuList>,
        places: &CpuTopology,
    ) -> Result<Self, CpuSplitError> {
        let check = |side: &'static str, list: &CpuList| {
            if list.is_empty() {
                return Err(CpuSplitError::Empty { side });
            }
            match list.iter().find(|&cpu| !allowed.contains(cpu)) {
                Some(cpu) => Err(CpuSplitError::NotAllowed {
                    side,
                    list: list.clone(),
                    cpu,
                    allowed: allowed.clone(),
                }),
                None => Ok(()),
            }
        };
        let rest = |given: &'static str, other: &'static str, list: &CpuList| {
            let rest: CpuList = allowed.iter().filter(|&cpu| !list.contains(cpu)).collect();
            if rest.is_empty() {
                return Err(CpuSplitError::NothingLeft {
                    given,
                    other,
                    list: list.clone(),
                });
            }
            Ok(rest)
        };
        let (server, client) = match (server, client) {
            (Some(server), Some(client)) => {
                check("server", &server)?;
                check("client", &client)?;
                let common: CpuList = server.iter().filter(|&cpu| client.contains(cpu)).collect();
                if !common.is_empty() && server != client {
                    return Err(CpuSplitError::Overlap {
                        server,
                        client,
                        common,
                    });
                }
                (server, client)
            }
            (Some(server), None) => {
                check("server", &server)?;
                let client = rest("server", "client", &server)?;
                (server, client)
            }
            (None, Some(client)) => {
                check("client", &client)?;
                let server = rest("client", "server", &client)?;
                (server, client)
            }
            (None, None) if topology.is_veth() && allowed.len() >= SPLIT_FROM => {
                default_halves(allowed, places)
            }
            (None, None) => (allowed.clone(), allowed.clone()),
        };
        Ok(Self { server, client })
    }
}

/// Whole cores of `allowed`, in (node, package, first CPU) order, the first half of the CPUs to
/// the server and the rest to the clients.
fn default_halves(allowed: &CpuList, places: &CpuTopology) -> (CpuList, CpuList) {
    let mut cores: BTreeMap<(u32, String, u32), Vec<u32>> = BTreeMap::new();
    let mut core_of: BTreeMap<String, (u32, String, u32)> = BTreeMap::new();
    for cpu in allowed.iter() {
        let place = places.place(cpu);
        let core = place.core.clone().unwrap_or_else(|| cpu.to_string());
        let key = core_of
            .entry(core)
            .or_insert_with(|| {
                (
                    place.node.unwrap_or(0),
                    place.package.clone().unwrap_or_default(),
                    cpu,
                )
            })
            .clone();
        cores.entry(key).or_default().push(cpu);
    }
    let half = allowed.len().div_ceil(2);
    let mut server = Vec::new();
    let mut client = Vec::new();
    for cpus in cores.into_values() {
        if server.len() < half {
            server.extend(cpus);
        } else {
            client.extend(cpus);
        }
    }
    if client.is_empty() {
        // One core holds them all: split its CPUs instead.
        client = server.split_off(half.min(server.len().saturating_sub(1)));
    }
    (server.into_iter().collect(), client.into_iter().collect())
}

/// Makes `command` (and every thread it starts) run on `cpus` only: its affinity is set between
/// fork and exec.
pub fn confine_on_spawn(command: &mut Command, cpus: &CpuList) {
    let set = cpus.to_affinity_mask();
    // SAFETY: the closure only makes the sched_setaffinity system call, which is
    // async-signal-safe, on a mask built before the fork.
    unsafe {
        command.pre_exec(move || sched_setaffinity(None, &set).map_err(io::Error::from));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reuseport::cpu_topology::CpuPlace;

    fn list(text: &str) -> CpuList {
        text.parse().unwrap()
    }

    /// 16 CPUs: 8 cores of two SMT siblings (N and N+8), two nodes of 4 cores.
    fn smt_two_nodes() -> CpuTopology {
        CpuTopology::from_places(
            (0..16)
                .map(|cpu| {
                    let core = cpu % 8;
                    CpuPlace {
                        core: Some(format!("{core},{}", core + 8)),
                        llc: None,
                        node: Some(core / 4),
                        package: Some("0-15".into()),
                    }
                })
                .collect(),
        )
    }

    #[test]
    fn many_cpus_split_by_whole_cores_within_a_node() {
        let split = CpuSplit::resolve(
            TopologyKind::VethRss,
            &list("0-15"),
            None,
            None,
            &smt_two_nodes(),
        )
        .unwrap();
        assert_eq!(split.server, list("0-3,8-11"));
        assert_eq!(split.client, list("4-7,12-15"));
    }

    #[test]
    fn few_cpus_and_loopback_share() {
        let places = CpuTopology::default();
        for (kind, cpus) in [
            (TopologyKind::VethRss, "0-1"),
            (TopologyKind::VethRps, "0-6"),
            (TopologyKind::Loopback, "0-15"),
        ] {
            let split = CpuSplit::resolve(kind, &list(cpus), None, None, &places).unwrap();
            assert!(split.is_shared(), "{kind} {cpus}: {split:?}");
            assert_eq!(split.server, list(cpus));
        }
    }

    #[test]
    fn explicit_lists_are_checked() {
        let places = CpuTopology::default();
        let resolve = |server: Option<&str>, client: Option<&str>| {
            CpuSplit::resolve(
                TopologyKind::VethRss,
                &list("0-3"),
                server.map(list),
                client.map(list),
                &places,
            )
        };
        assert_eq!(
            resolve(Some("0-1"), Some("2-3")).unwrap().client,
            list("2-3")
        );
        assert!(resolve(Some("0-3"), Some("0-3")).unwrap().is_shared());
        assert_eq!(resolve(Some("0"), None).unwrap().client, list("1-3"));
        assert_eq!(resolve(None, Some("3")).unwrap().server, list("0-2"));
        assert!(matches!(
            resolve(Some("0-2"), Some("2-3")),
            Err(CpuSplitError::Overlap { .. })
        ));
        assert!(matches!(
            resolve(Some("0-1"), Some("7")),
            Err(CpuSplitError::NotAllowed { cpu: 7, .. })
        ));
        assert!(matches!(
            resolve(Some("0-3"), None),
            Err(CpuSplitError::NothingLeft { .. })
        ));
    }
}
