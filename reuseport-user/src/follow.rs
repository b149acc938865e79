//! `reuseport attach --follow`: steering that follows the server it was attached to.
//!
//! A server's reuseport group does not live as long as the server's name: `nginx -s reload`
//! starts new workers (new pids, pinned again), a restart or a binary upgrade makes new
//! listening sockets (a new group, on hash selection), and a worker may be pinned to another
//! CPU. A [`Follower`] looks every [`POLL_INTERVAL`] at who serves the port (the same `/proc`
//! reading [`attach::serving`] does, nothing duplicated) and compares it with what it steers:
//! when the listeners, their workers or the workers' CPUs differ, it steers the new set (see
//! [`Follower::poll`]); when nothing serves the port any more it waits, and steers the server
//! that comes back.
//!
//! The server is found first through the processes it was given (and their descendants); once
//! none of those serves the port, through the port: the processes holding its listening
//! sockets whose parent holds none of them (the new master), as long as they have the name the
//! first server had (`nginx`), so a different program that takes the port is not steered.
//! Only sockets in this process's network namespace are found that way.
//!
//! Re-steering the same sockets (a reload, a re-pinned worker) first detaches the old program
//! and waits (up to [`RELEASE_WAIT`]) until the kernel has freed its map: a socket can be in
//! one such map only. The group is on hash selection for that moment.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use aya::maps::MapInfo;
use thiserror::Error;

use crate::{
    attach::{
        self, AttachError, AttachRequest, AttachTarget, Attached, AttachedSlot, ServingListener,
        SlotHolder,
    },
    pinned::PinnedRoot,
    port_steering::{self, PortSteeringError},
    procfs,
    stats::Snapshot,
    steering::SteeringProgram,
};

/// How often [`Follower::poll`] should be called: a change is followed within about this long
/// (plus the time to attach).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long re-steering the same sockets waits for the kernel to free the old program's map.
pub const RELEASE_WAIT: Duration = Duration::from_secs(1);

/// How long the server may look inconsistent (a listener served by old and new workers during
/// a reload, a worker not pinned yet) before [`FollowEvent::CannotFollow`] says so.
const SETTLE: Duration = Duration::from_secs(1);

/// Errors from starting or ending a [`Follower`].
#[derive(Debug, Error)]
pub enum FollowError {
    /// Following needs processes to look at.
    #[error(
        "--follow needs the server's processes (--pid): sockets given by --fd cannot be found \
         again once the server replaces them"
    )]
    NoProcesses,
    /// The first attach (or the final detach) failed.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// Removing persisted steering before steering again failed.
    #[error(transparent)]
    Port(#[from] PortSteeringError),
}

/// What a [`Follower`] needs: the `attach --follow` arguments, typed.
#[derive(Clone, Debug)]
pub struct FollowRequest {
    /// The port the server listens on.
    pub port: u16,
    /// The server's processes (any: descendants are searched too).
    pub pids: Vec<u32>,
    /// The program to attach.
    pub program: SteeringProgram,
    /// `Some`: every steering is pinned under this root (and stays when the follower ends).
    pub persist: Option<PinnedRoot>,
}

/// What changed, as [`Follower::poll`] reports it: one event, one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FollowEvent {
    /// The server's listeners, workers or their CPUs changed: the new set is steered.
    Resteered {
        /// The listeners steered now.
        slots: Vec<AttachedSlot>,
        /// The new program's kernel id.
        program_id: u32,
        /// What changed, in words (`new listeners`, `new workers`, `workers on other CPUs`).
        change: &'static str,
    },
    /// Nothing serves the port any more: waiting for the server to come back.
    Gone {
        /// The server's processes that were steered.
        pids: Vec<u32>,
    },
    /// A server serves the port again: it is steered.
    Back {
        /// The server's main processes now.
        pids: Vec<u32>,
        /// The listeners steered.
        slots: Vec<AttachedSlot>,
        /// The new program's kernel id.
        program_id: u32,
    },
    /// The server serves the port, but it cannot be steered as it is (said once per reason;
    /// tried again every poll). The previous steering, if any, stays.
    CannotFollow {
        /// Why, as [`AttachError`] says it.
        reason: String,
    },
}

/// What [`Follower::stop`] did.
#[derive(Debug)]
pub enum Stopped {
    /// The live steering was detached: the group is on hash selection.
    Detached,
    /// The steering stays pinned (`--persist`) in this directory.
    LeftPinned(std::path::PathBuf),
    /// Nothing was steered at the end (the server was gone).
    NothingSteered,
}

/// Who serves the port now.
enum Observed {
    Serving {
        pids: Vec<u32>,
        listeners: Vec<ServingListener>,
    },
    Gone,
    Inconsistent(AttachError),
}

/// Steering that follows its server (see the module documentation).
pub struct Follower {
    port: u16,
    program: SteeringProgram,
    persist: Option<PinnedRoot>,
    /// The server's processes as last found.
    pids: Vec<u32>,
    /// The name of the server's first process: a process taking the port must have it.
    comm: String,
    current: Option<Attached<'static>>,
    /// `(cpu, pid, inode)` of each listener steered.
    steered: Vec<(u32, u32, u64)>,
    started: Instant,
    /// Since when the server has looked inconsistent, and whether that was said.
    inconsistent_since: Option<Instant>,
    said: Option<String>,
    gone_said: bool,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("port", &self.port)
            .field("pids", &self.pids)
            .field("steered", &self.steered)
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// Attaches as [`attach::run`] does (its errors are this call's: nothing is followed that
    /// could not be attached first) and returns the follower with the steering in place.
    pub fn start(request: FollowRequest) -> Result<Self, FollowError> {
        let FollowRequest {
            port,
            pids,
            program,
            persist,
        } = request;
        let first = *pids.first().ok_or(FollowError::NoProcesses)?;
        let mut follower = Self {
            port,
            program,
            persist,
            comm: procfs::comm(first),
            pids,
            current: None,
            steered: Vec::new(),
            started: Instant::now(),
            inconsistent_since: None,
            said: None,
            gone_said: false,
        };
        follower.attach()?;
        Ok(follower)
    }

    /// The listeners steered now (empty while the server is gone).
    pub fn slots(&self) -> &[AttachedSlot] {
        match &self.current {
            Some(Attached::Live(live)) => live.slots(),
            Some(Attached::Persisted { slots, .. } | Attached::Hashed { slots }) => slots,
            None => &[],
        }
    }

    /// The address the steered group listens on (`None` while nothing is steered live).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.current {
            Some(Attached::Live(live)) => live.local_addr(),
            _ => None,
        }
    }

    /// The kernel id of the program steering now.
    pub fn program_id(&self) -> Result<Option<u32>, FollowError> {
        Ok(match &self.current {
            Some(Attached::Live(live)) => Some(live.program_id()?),
            Some(Attached::Persisted { pinned, .. }) => Some(pinned.program_id()),
            _ => None,
        })
    }

    /// The steering counters of the program steering now (see
    /// [`attach::LiveSteering::snapshot`]), with `elapsed` counted from [`Follower::start`];
    /// `None` while nothing is steered live (the server is gone, or the steering is pinned).
    pub fn snapshot(&self) -> Option<Result<Snapshot, FollowError>> {
        match &self.current {
            Some(Attached::Live(live)) => Some(
                live.snapshot()
                    .map(|snapshot| Snapshot {
                        elapsed: self.started.elapsed(),
                        ..snapshot
                    })
                    .map_err(FollowError::from),
            ),
            _ => None,
        }
    }

    /// Looks once at who serves the port and follows what changed; call it every
    /// [`POLL_INTERVAL`]. Returns what changed, if anything worth a line did.
    pub fn poll(&mut self) -> Option<FollowEvent> {
        match self.observe() {
            Observed::Gone => {
                self.inconsistent_since = None;
                if self.gone_said {
                    return None;
                }
                self.gone_said = true;
                self.said = None;
                self.release();
                Some(FollowEvent::Gone {
                    pids: self.pids.clone(),
                })
            }
            Observed::Inconsistent(err) => {
                let since = *self.inconsistent_since.get_or_insert_with(Instant::now);
                self.cannot_follow(err, since.elapsed() >= SETTLE)
            }
            Observed::Serving { pids, listeners } => {
                self.inconsistent_since = None;
                let now: Vec<(u32, u32, u64)> =
                    listeners.iter().map(|l| (l.cpu, l.pid, l.inode)).collect();
                if self.current.is_some() && now == self.steered {
                    return None;
                }
                let change = describe_change(&self.steered, &now);
                let was_gone = self.current.is_none();
                self.pids = pids;
                self.release();
                match self.attach() {
                    Ok(()) => {
                        self.said = None;
                        self.gone_said = false;
                        let slots = self.slots().to_vec();
                        let program_id = self.program_id().ok().flatten().unwrap_or_default();
                        Some(if was_gone {
                            FollowEvent::Back {
                                pids: self.pids.clone(),
                                slots,
                                program_id,
                            }
                        } else {
                            FollowEvent::Resteered {
                                slots,
                                program_id,
                                change,
                            }
                        })
                    }
                    Err(err) => self.cannot_follow(err, true),
                }
            }
        }
    }

    /// Ends following: live steering is detached, pinned steering stays.
    pub fn stop(mut self) -> Result<Stopped, FollowError> {
        match self.current.take() {
            Some(Attached::Live(live)) => match live.detach() {
                // The group went away since the last poll: nothing left to detach.
                Ok(()) | Err(AttachError::NoListener { .. }) => Ok(Stopped::Detached),
                Err(err) => Err(err.into()),
            },
            Some(Attached::Persisted { pinned, .. }) => Ok(Stopped::LeftPinned(pinned.pin_dir())),
            Some(Attached::Hashed { .. }) | None => Ok(Stopped::NothingSteered),
        }
    }

    fn cannot_follow(&mut self, err: impl ToString, settled: bool) -> Option<FollowEvent> {
        let reason = err.to_string();
        if !settled || self.said.as_ref() == Some(&reason) {
            return None;
        }
        self.said = Some(reason.clone());
        Some(FollowEvent::CannotFollow { reason })
    }

    /// Steers the listeners of `self.pids` on the port.
    fn attach(&mut self) -> Result<(), FollowError> {
        let mut request: AttachRequest<'static> =
            AttachRequest::new(self.port, AttachTarget::Pids(self.pids.clone()));
        request.program = self.program;
        request.persist = self.persist.clone();
        let attached = attach::run(request)?;
        self.steered = steered_of(match &attached {
            Attached::Live(live) => live.slots(),
            Attached::Persisted { slots, .. } | Attached::Hashed { slots } => slots,
        });
        self.current = Some(attached);
        Ok(())
    }

    /// Takes the current steering off the port and waits until its sockets are free for a new
    /// map. Failures are not reported: the group may be gone, and a failed release shows as a
    /// failed attach right after.
    fn release(&mut self) {
        match self.current.take() {
            Some(Attached::Live(live)) => {
                let map = live.steering().listeners_map_id().ok();
                let _ = live.detach();
                if let Some(map) = map {
                    let deadline = Instant::now() + RELEASE_WAIT;
                    while MapInfo::from_id(map).is_ok() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            Some(Attached::Persisted { .. }) => {
                if let Some(root) = &self.persist {
                    // Waits itself until the kernel has freed the map.
                    let _ = port_steering::detach(self.port, root);
                }
            }
            Some(Attached::Hashed { .. }) | None => {}
        }
        self.steered.clear();
    }

    /// Who serves the port: the known processes if they still do, else the processes holding
    /// its listeners that have the server's name.
    fn observe(&self) -> Observed {
        let alive: Vec<u32> = self
            .pids
            .iter()
            .copied()
            .filter(|&pid| procfs::comm(pid) == self.comm)
            .collect();
        if !alive.is_empty() {
            match attach::serving(&alive, self.port) {
                Ok(listeners) => {
                    return Observed::Serving {
                        pids: alive,
                        listeners,
                    };
                }
                // They no longer serve the port (an old master stays during a binary upgrade):
                // look by port.
                Err(AttachError::NoListener { .. } | AttachError::Proc(_)) => {}
                Err(err) => return Observed::Inconsistent(err),
            }
        }
        let roots = server_roots(self.port, &self.comm);
        if roots.is_empty() {
            return Observed::Gone;
        }
        match attach::serving(&roots, self.port) {
            Ok(listeners) => Observed::Serving {
                pids: roots,
                listeners,
            },
            Err(err) => Observed::Inconsistent(err),
        }
    }
}

/// `(cpu, pid, inode)` of each slot held by a process.
fn steered_of(slots: &[AttachedSlot]) -> Vec<(u32, u32, u64)> {
    slots
        .iter()
        .filter_map(|slot| match slot.holder {
            SlotHolder::Process { pid, inode, .. } => Some((slot.cpu, pid, inode)),
            SlotHolder::Fd(_) => None,
        })
        .collect()
}

/// What differs between the steered `(cpu, pid, inode)` and the serving ones, in words.
fn describe_change(before: &[(u32, u32, u64)], now: &[(u32, u32, u64)]) -> &'static str {
    let inodes = |set: &[(u32, u32, u64)]| set.iter().map(|s| s.2).collect::<BTreeSet<_>>();
    let pids = |set: &[(u32, u32, u64)]| set.iter().map(|s| s.1).collect::<BTreeSet<_>>();
    if inodes(before) != inodes(now) {
        "new listeners"
    } else if pids(before) != pids(now) {
        "new workers"
    } else {
        "workers on other CPUs"
    }
}

/// The processes holding a listener on `port` (in this network namespace) whose parent holds
/// none, named `comm`: the main processes of the server that serves the port now.
fn server_roots(port: u16, comm: &str) -> Vec<u32> {
    let inodes: BTreeSet<u64> = procfs::listening_tcp(std::process::id(), port)
        .unwrap_or_default()
        .iter()
        .map(|s| s.inode)
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let holders: BTreeSet<u32> = port_steering::all_pids()
        .into_iter()
        .filter(|&pid| {
            procfs::socket_fds(pid)
                .unwrap_or_default()
                .iter()
                .any(|(_, inode)| inodes.contains(inode))
        })
        .collect();
    holders
        .iter()
        .copied()
        .filter(|&pid| procfs::parent_of(pid).is_none_or(|parent| !holders.contains(&parent)))
        .filter(|&pid| procfs::comm(pid) == comm)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_named_by_what_differs() {
        let before = [(0, 10, 100), (1, 11, 101)];
        assert_eq!(
            describe_change(&before, &[(0, 20, 200), (1, 21, 201)]),
            "new listeners"
        );
        assert_eq!(
            describe_change(&before, &[(0, 20, 100), (1, 21, 101)]),
            "new workers"
        );
        assert_eq!(
            describe_change(&before, &[(0, 11, 101), (1, 10, 100)]),
            "workers on other CPUs"
        );
    }
}
