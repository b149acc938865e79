//! Packets lost during a run, which a closed-loop load turns into latency (a lost segment waits
//! for a tail-loss probe, 10 ms at least, or a retransmission timeout): TCP retransmissions,
//! tail-loss probes and listen-queue drops in the server's and the clients' network namespaces
//! (each namespace keeps its own `Tcp`/`TcpExt` counters), and drops from full per-CPU receive
//! backlogs (machine-wide, `/proc/net/softnet_stat`).

use serde::{Deserialize, Serialize};

use crate::topology::{Topology, TopologyError};

/// Loss counters, as totals or as the change over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Losses {
    /// TCP segments retransmitted (`TcpRetransSegs`), both namespaces.
    pub retrans_segs: u64,
    /// Tail-loss probes sent (`TcpExtTCPLossProbes`), both namespaces.
    pub loss_probes: u64,
    /// SYNs or handshake-completing ACKs a listener dropped (`TcpExtListenDrops`).
    pub listen_drops: u64,
    /// Packets dropped from full per-CPU receive backlogs (softnet_stat `dropped`).
    pub backlog_drops: u64,
}

impl Losses {
    /// The counters now: TCP's summed over the topology's namespaces (this thread's namespace
    /// for loopback), the backlog drops machine-wide.
    pub fn read(topology: &Topology) -> Result<Self, TopologyError> {
        let mut losses = Self {
            backlog_drops: reuseport::procfs::backlog_drops().unwrap_or(0),
            ..Self::default()
        };
        let mut add = |counters: std::collections::BTreeMap<String, u64>| {
            let get = |name: &str| counters.get(name).copied().unwrap_or(0);
            losses.retrans_segs += get("TcpRetransSegs");
            losses.loss_probes += get("TcpExtTCPLossProbes");
            losses.listen_drops += get("TcpExtListenDrops");
        };
        match topology.in_server_namespace(reuseport::procfs::tcp_counters) {
            None => add(reuseport::procfs::tcp_counters()),
            Some(server) => {
                add(server?);
                if let Some(client) = topology.in_client_namespace(reuseport::procfs::tcp_counters)
                {
                    add(client?);
                }
            }
        }
        Ok(losses)
    }

    /// What grew from `before` to `self`.
    pub fn since(self, before: Self) -> Self {
        Self {
            retrans_segs: self.retrans_segs.saturating_sub(before.retrans_segs),
            loss_probes: self.loss_probes.saturating_sub(before.loss_probes),
            listen_drops: self.listen_drops.saturating_sub(before.listen_drops),
            backlog_drops: self.backlog_drops.saturating_sub(before.backlog_drops),
        }
    }
}
