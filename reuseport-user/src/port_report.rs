//! What `reuseport status --json` prints: [`PortSteering`]'s facts as data, one [`PortReport`]
//! per port, with the counters of steering pinned for it. Every field is documented here; the
//! field names are the JSON keys.

use serde::{Deserialize, Serialize};

use crate::{
    pinned::{PinnedError, PinnedRoot, SlotState},
    port_steering::{PortSteering, Verdict},
    procfs,
};

/// One port's steering, as [`PortSteering`] found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortReport {
    /// The port.
    pub port: u16,
    /// `steered` (every listener in a slot), `partly` (some in none: see
    /// [`PortReport::unsteered`]), `stale` (pins or a state file are left, but no slot holds a
    /// listener of the port: the server restarted or stopped), `not_steered`, or `unknown` (a
    /// program pinned by an earlier version whose slots cannot be read).
    pub verdict: String,
    /// How many listeners of the port are in no slot (on hash selection).
    pub unsteered: usize,
    /// The listening sockets on the port now.
    pub listeners: Vec<ListenerReport>,
    /// Our steering programs that hold a listener of the port or are pinned for it.
    pub programs: Vec<ProgramReport>,
    /// Where the port's pins are, if that directory exists.
    pub pin_dir: Option<String>,
    /// The steering pinned for the port, as its state file records it, with its counters;
    /// `None` when nothing is pinned (or the pinned program no longer steers the port).
    pub pinned: Option<PinnedReport>,
    /// The id of a program pinned for the port by an earlier version (its slots unreadable).
    pub unreadable_pinned_program: Option<u32>,
}

/// A listening socket on the port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerReport {
    /// Its local address (`127.0.0.1:8080`, `[::1]:8080`).
    pub addr: String,
    /// Its inode (`socket:[INODE]` in `/proc/PID/fd`).
    pub inode: u64,
    /// Its cookie (`SO_COOKIE`); `null` where it could not be taken from its holder.
    pub cookie: Option<u64>,
    /// The processes holding it.
    pub holders: Vec<HolderReport>,
    /// Whether a steering program's slot holds it.
    pub steered: bool,
}

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderReport {
    /// Its pid.
    pub pid: u32,
    /// Its name (`/proc/PID/comm`).
    pub comm: String,
    /// Its file descriptor for the socket.
    pub fd: i32,
}

/// One of our steering programs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramReport {
    /// The kernel's program id (`bpftool prog show id ID`).
    pub id: u32,
    /// Its name (`steer_migrate`, `steer_to_cpu`, ...).
    pub name: String,
    /// The id of its `cpu_listeners` map.
    pub map_id: u32,
    /// Whether it is the program pinned for the port.
    pub pinned: bool,
    /// The processes holding it open (a running `attach` or `serve`); empty when only the
    /// group and pins keep it (`pinned` false and this empty: left by a killed `attach`).
    pub held_by: Vec<u32>,
    /// Whether any of its slots holds a listener of the port now.
    pub steers: bool,
    /// Its filled slots.
    pub slots: Vec<SlotReport>,
}

/// A filled slot of a program's `cpu_listeners` map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotReport {
    /// The slot: the CPU whose connections go to this socket.
    pub cpu: u32,
    /// The cookie of the socket in it.
    pub cookie: u64,
    /// The inode of the port's listener it holds; `null` when it holds a socket that no longer
    /// listens on the port (stale).
    pub listener_inode: Option<u64>,
}

/// Steering pinned for the port, as recorded and as the kernel counts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedReport {
    /// The pinned program's id.
    pub program_id: u32,
    /// The pids given to `attach`.
    pub pids: Vec<u32>,
    /// The recorded slots.
    pub slots: Vec<PinnedSlotReport>,
    /// Per CPU that received connections (or errors): what the program did with them.
    pub arrivals: Vec<ArrivalsReport>,
    /// [`PinnedReport::arrivals`] summed over every CPU (`cpu` is `null`).
    pub total: ArrivalsReport,
}

/// A recorded slot of pinned steering.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedSlotReport {
    /// The slot's CPU.
    pub cpu: u32,
    /// The process that served it at attach time.
    pub pid: u32,
    /// The socket's inode.
    pub inode: u64,
    /// `live` (filled, served by `pid`), `held_elsewhere` (filled, another process holds the
    /// socket) or `empty` (a hole: its connections go to `fallback`'s listener).
    pub state: String,
    /// The CPU whose listener takes this CPU's connections while the slot is empty.
    pub fallback: u32,
}

/// The steering program's counters for connections that arrived on one CPU (or all).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrivalsReport {
    /// The receiving CPU; `null` in a total.
    pub cpu: Option<u32>,
    /// Sent to that CPU's own listener.
    pub local: u64,
    /// Sent to the fallback CPU's listener (the local slot was empty).
    pub fallback: u64,
    /// Left to the kernel's hash (neither slot held a live listener).
    pub hash: u64,
    /// Selection failed otherwise (still passed on).
    pub errors: u64,
}

impl ArrivalsReport {
    fn new(cpu: Option<u32>, stats: &reuseport_common::SteeringStats) -> Self {
        Self {
            cpu,
            local: stats.local,
            fallback: stats.fallback,
            hash: stats.unsteered,
            errors: stats.errors,
        }
    }
}

/// The name [`PortReport::verdict`] gives `verdict`.
pub fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Steered => "steered",
        Verdict::Partly { .. } => "partly",
        Verdict::Stale => "stale",
        Verdict::NotSteered => "not_steered",
        Verdict::Unknown => "unknown",
    }
}

impl PortReport {
    /// The report of `view`, with the pinned steering's record and counters read under `root`
    /// when the pinned program still steers the port.
    pub fn new(view: &PortSteering, root: &PinnedRoot) -> Result<Self, PinnedError> {
        let verdict = view.verdict();
        let steered: std::collections::BTreeSet<u64> = view
            .programs
            .iter()
            .flat_map(|p| p.slot_listeners.iter().filter_map(|(_, inode)| *inode))
            .collect();
        let listeners = view
            .listeners
            .iter()
            .map(|l| ListenerReport {
                addr: l.addr.to_string(),
                inode: l.inode,
                cookie: l.cookie,
                holders: l
                    .holders
                    .iter()
                    .map(|&(pid, fd)| HolderReport {
                        pid,
                        comm: procfs::comm(pid),
                        fd,
                    })
                    .collect(),
                steered: steered.contains(&l.inode),
            })
            .collect();
        let programs = view
            .programs
            .iter()
            .map(|p| ProgramReport {
                id: p.program.id,
                name: p.program.name.clone(),
                map_id: p.program.map_id,
                pinned: p.pinned,
                held_by: p.program.holders.clone(),
                steers: p.steers(),
                slots: p
                    .slot_listeners
                    .iter()
                    .map(|(slot, inode)| SlotReport {
                        cpu: slot.cpu,
                        cookie: slot.cookie,
                        listener_inode: *inode,
                    })
                    .collect(),
            })
            .collect();
        let pinned_steers = view.programs.iter().any(|p| {
            p.pinned
                && p.steers()
                && view
                    .recorded
                    .as_ref()
                    .is_some_and(|state| state.program_id == p.program.id)
        });
        let pinned = if pinned_steers {
            let status = root.open(view.port)?.status()?;
            Some(PinnedReport {
                program_id: status.program_id,
                pids: status.pids.clone(),
                slots: status
                    .slots
                    .iter()
                    .map(|s| PinnedSlotReport {
                        cpu: s.slot.cpu,
                        pid: s.slot.pid,
                        inode: s.slot.inode,
                        state: match s.state() {
                            SlotState::Live => "live",
                            SlotState::HeldElsewhere => "held_elsewhere",
                            SlotState::Empty => "empty",
                        }
                        .to_owned(),
                        fallback: s.fallback,
                    })
                    .collect(),
                arrivals: status
                    .active_cpus()
                    .map(|(cpu, stats)| ArrivalsReport::new(Some(cpu), stats))
                    .collect(),
                total: ArrivalsReport::new(None, &status.total),
            })
        } else {
            None
        };
        Ok(Self {
            port: view.port,
            verdict: verdict_name(verdict).to_owned(),
            unsteered: view.unsteered().count(),
            listeners,
            programs,
            pin_dir: view.pin_dir.as_ref().map(|d| d.display().to_string()),
            pinned,
            unreadable_pinned_program: view.unreadable_pinned,
        })
    }
}
