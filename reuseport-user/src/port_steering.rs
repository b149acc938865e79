//! What steers a port, asked of the kernel rather than of a record: which of our steering
//! programs are loaded, which sockets their `cpu_listeners` slots hold (a lookup answers the
//! socket's cookie), and which of those are the listeners on the port now (their `SO_COOKIE`).
//! `status` and `detach` work from this, so they stay right whatever happened in between: an
//! `attach` killed by SIGKILL (its program stays attached, recorded nowhere), a state file or pin
//! lost, or the steered server restarted (its new listeners are on hash selection, and the pins
//! left behind are stale).
//!
//! Asking the kernel for every loaded program needs CAP_SYS_ADMIN; reading other processes'
//! sockets needs the right to `pidfd_getfd` them (root has both).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::{
    maps::{MapError, MapInfo, MapType},
    programs::{ProgramError, ProgramInfo, ProgramType, loaded_programs},
};
use reuseport_common::names;
use thiserror::Error;

use crate::{
    attach::{AttachError, duplicate},
    pinned::{PersistedState, PinnedError, PinnedRoot},
    procfs::{self, ProcError},
    sockarray,
    steering::{SteeringError, detach_group},
};

/// Errors from asking the kernel what steers a port, or from detaching it.
#[derive(Debug, Error)]
pub enum PortSteeringError {
    /// This process may not list the kernel's BPF programs.
    #[error(
        "listing the kernel's BPF programs needs CAP_SYS_ADMIN (run as root): without it the \
         steering of a port cannot be found; nothing was changed"
    )]
    NotAllowed,
    /// Listing the kernel's BPF programs or reading one failed otherwise.
    #[error("asking the kernel for its BPF programs failed")]
    Programs(#[source] ProgramError),
    /// Reading a program's `cpu_listeners` map failed.
    #[error("reading the cpu_listeners map of program {program} failed")]
    Map {
        /// The program's id.
        program: u32,
        /// Why.
        #[source]
        source: MapError,
    },
    /// Reading a slot failed.
    #[error(transparent)]
    Slot(#[from] sockarray::SlotError),
    /// Reading `/proc` failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// A steered listener could not be taken from its process, to detach through it.
    #[error("port {port} is steered, but its listener could not be taken to detach through")]
    Member {
        /// The port.
        port: u16,
        /// Why.
        #[source]
        source: Box<AttachError>,
    },
    /// Detaching the program from the group failed.
    #[error(transparent)]
    Steering(#[from] SteeringError),
    /// The pins or state file are unsafe, unreadable or cannot be removed.
    #[error(transparent)]
    Pinned(#[from] PinnedError),
    /// Nothing steers the port.
    #[error(
        "nothing steers port {port}: no persistent steering (nothing under {dir}), and none of \
         its listeners is in a steering program's map"
    )]
    NotSteered {
        /// The port.
        port: u16,
        /// Where pins would be.
        dir: String,
    },
}

/// A listening TCP socket on the port, as the kernel has it now.
#[derive(Debug)]
pub struct Listener {
    /// Its local address.
    pub addr: SocketAddr,
    /// Its owner's uid.
    pub uid: u32,
    /// Its inode.
    pub inode: u64,
    /// Its cookie (`SO_COOKIE`), or `None` where this process may not take it from its holder.
    pub cookie: Option<u64>,
    /// The processes holding it, with their fd.
    pub holders: Vec<(u32, i32)>,
    /// This process's duplicate (to read the cookie and to detach through).
    socket: Option<OwnedFd>,
}

/// One filled slot of a steering program's `cpu_listeners` map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilledSlot {
    /// The slot: the CPU.
    pub cpu: u32,
    /// The cookie of the socket it holds.
    pub cookie: u64,
}

/// One of our steering programs loaded in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelProgram {
    /// The kernel's id.
    pub id: u32,
    /// Its name (`steer_to_cpu`, `steer_migrate`, ...).
    pub name: String,
    /// The id of its `cpu_listeners` map.
    pub map_id: u32,
    /// The filled slots (a closed listener leaves its slot by itself).
    pub slots: Vec<FilledSlot>,
    /// The processes holding the program open: a running `attach` or `serve`; empty when only
    /// a reuseport group (and pins) keep it.
    pub holders: Vec<u32>,
}

/// Lists our steering programs: `SK_REUSEPORT` programs named as ours with a readable
/// `cpu_listeners` map. Fails with [`PortSteeringError::NotAllowed`] without CAP_SYS_ADMIN.
pub fn kernel_programs() -> Result<Vec<KernelProgram>, PortSteeringError> {
    let ours = [
        names::STEER_TO_CPU,
        names::STEER_MIGRATE,
        names::STEER_NOOP,
        names::STEER_SELECT,
    ];
    let mut programs = Vec::new();
    for info in loaded_programs() {
        let info = match info {
            Ok(info) => info,
            Err(ProgramError::SyscallError(err)) => match err.io_error.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => {
                    return Err(PortSteeringError::NotAllowed);
                }
                // Unloaded while we looked.
                Some(libc::ENOENT) => continue,
                _ => return Err(PortSteeringError::Programs(ProgramError::SyscallError(err))),
            },
            Err(other) => return Err(PortSteeringError::Programs(other)),
        };
        if info.program_type() != ProgramType::SkReuseport.into()
            || !info.name_as_str().is_some_and(|name| ours.contains(&name))
        {
            continue;
        }
        if let Some(program) = read_program(&info)? {
            programs.push(program);
        }
    }
    let held = program_holders();
    for program in &mut programs {
        program.holders = held.get(&program.id).cloned().unwrap_or_default();
    }
    Ok(programs)
}

fn read_program(info: &ProgramInfo) -> Result<Option<KernelProgram>, PortSteeringError> {
    let id = info.id();
    let map_ids = match info.map_ids() {
        Ok(ids) => ids.unwrap_or_default(),
        // Unloaded while we looked.
        Err(_) => return Ok(None),
    };
    for map_id in map_ids {
        let Ok(map) = MapInfo::from_id(map_id) else {
            continue;
        };
        if map.name_as_str() != Some(names::CPU_LISTENERS)
            || !matches!(map.map_type(), Ok(MapType::ReuseportSockArray))
            // Built before slots could be read (4-byte values): not one of ours to judge.
            || map.value_size() != 8
        {
            continue;
        }
        let fd = map.fd().map_err(|source| PortSteeringError::Map {
            program: id,
            source,
        })?;
        let mut slots = Vec::new();
        for cpu in 0..map.max_entries() {
            if let Some(cookie) = sockarray::cookie(fd.as_fd(), cpu)? {
                slots.push(FilledSlot { cpu, cookie });
            }
        }
        return Ok(Some(KernelProgram {
            id,
            name: info.name_as_str().unwrap_or("?").to_owned(),
            map_id,
            slots,
            holders: Vec::new(),
        }));
    }
    Ok(None)
}

/// Program id -> the processes holding it open (`/proc/PID/fdinfo` of each `bpf-prog` fd names
/// its `prog_id`). Called when this process holds no fd of its own from the listing.
fn program_holders() -> BTreeMap<u32, Vec<u32>> {
    let mut held: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for pid in all_pids() {
        let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            if !fs::read_link(entry.path()).is_ok_and(|t| t.to_str() == Some("anon_inode:bpf-prog"))
            {
                continue;
            }
            let info = fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                entry.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let id = info
                .lines()
                .find_map(|line| line.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok());
            if let Some(id) = id {
                let pids = held.entry(id).or_default();
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    held
}

pub(crate) fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The listening TCP sockets on `port` (in every network namespace), each with its holders and,
/// where this process may take it, its cookie.
pub fn listeners(port: u16) -> Result<Vec<Listener>, PortSteeringError> {
    let mut sockets = procfs::listening_tcp(std::process::id(), port)?;
    // Other network namespaces' too: a steered server may run in one of its own.
    for pid in procfs::one_process_per_netns().into_iter().skip(1) {
        for socket in procfs::listening_tcp(pid, port).unwrap_or_default() {
            if !sockets.iter().any(|s| s.inode == socket.inode) {
                sockets.push(socket);
            }
        }
    }
    let inodes: BTreeSet<u64> = sockets.iter().map(|s| s.inode).collect();
    let mut holders: BTreeMap<u64, Vec<(u32, i32)>> = BTreeMap::new();
    for pid in all_pids() {
        for (fd, inode) in procfs::socket_fds(pid).unwrap_or_default() {
            if inodes.contains(&inode) {
                holders.entry(inode).or_default().push((pid, fd));
            }
        }
    }
    Ok(sockets
        .into_iter()
        .map(|socket| {
            let held = holders.remove(&socket.inode).unwrap_or_default();
            let dup = held
                .iter()
                .find_map(|&(pid, fd)| duplicate(pid, fd).ok())
                // The duplicate must be this very socket (the fd may have been reused).
                .filter(|dup| rustix::fs::fstat(dup).is_ok_and(|st| st.st_ino == socket.inode));
            let cookie = dup
                .as_ref()
                .and_then(|dup| sockarray::socket_cookie(dup.as_fd()).ok());
            Listener {
                addr: socket.addr,
                uid: socket.uid,
                inode: socket.inode,
                cookie,
                holders: held,
                socket: dup,
            }
        })
        .collect())
}

/// One steering program as it concerns the port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramOnPort {
    /// The program.
    pub program: KernelProgram,
    /// Whether it is the program pinned for the port.
    pub pinned: bool,
    /// Per filled slot, the inode of the port's listener it holds, or `None` when the slot
    /// holds a socket that is not listening on the port any more.
    pub slot_listeners: Vec<(FilledSlot, Option<u64>)>,
}

impl ProgramOnPort {
    /// Whether any slot holds a listener of the port now: the program steers it.
    pub fn steers(&self) -> bool {
        self.slot_listeners.iter().any(|(_, inode)| inode.is_some())
    }
}

/// What the kernel says about the steering of one port (see the module documentation).
#[derive(Debug)]
pub struct PortSteering {
    /// The port.
    pub port: u16,
    /// Its listening sockets now.
    pub listeners: Vec<Listener>,
    /// Our programs that hold a listener of the port, or are pinned for it.
    pub programs: Vec<ProgramOnPort>,
    /// Where its pins are, if the directory exists.
    pub pin_dir: Option<PathBuf>,
    /// What the state file beside the pins records, if there is one.
    pub recorded: Option<PersistedState>,
    /// The id of the program pinned for the port when its slots cannot be read (pinned by an
    /// earlier version, whose `cpu_listeners` map has 4-byte values).
    pub unreadable_pinned: Option<u32>,
}

/// What [`PortSteering::verdict`] concludes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every listener of the port is in a steering program's slot.
    Steered,
    /// Some listeners are steered, others (`unsteered` of them) are in no slot.
    Partly {
        /// Listeners in no slot.
        unsteered: usize,
    },
    /// Something is pinned or recorded for the port, but no slot holds any of its listeners:
    /// the group it steered is gone (the server restarted or stopped) and the port's listeners,
    /// if any, are on hash selection.
    Stale,
    /// Nothing steers the port and nothing is left of earlier steering.
    NotSteered,
    /// A program pinned for the port by an earlier version may steer it: its slots cannot be
    /// read, so whether it still holds the port's listeners is unknown.
    Unknown,
}

impl PortSteering {
    /// Asks the kernel (programs, maps, sockets) and `/proc` what steers `port`, with pins and
    /// state under `root`. Refuses a pin or state directory another user could have placed or
    /// changed.
    pub fn inspect(port: u16, root: &PinnedRoot) -> Result<Self, PortSteeringError> {
        root.check_dirs(port)?;
        let programs = kernel_programs()?;
        let listeners = listeners(port)?;
        let pin_dir = Some(root.pin_dir(port)).filter(|dir| dir.is_dir());
        let pinned_id = pin_dir.as_ref().and_then(|dir| {
            [
                names::STEER_TO_CPU,
                names::STEER_MIGRATE,
                names::STEER_NOOP,
                names::STEER_SELECT,
            ]
            .iter()
            .find_map(|name| ProgramInfo::from_pin(dir.join(name)).ok())
            .map(|info| info.id())
        });
        let recorded = root.read_state(port)?;
        let by_cookie: BTreeMap<u64, u64> = listeners
            .iter()
            .filter_map(|l| Some((l.cookie?, l.inode)))
            .collect();
        let programs: Vec<ProgramOnPort> = programs
            .into_iter()
            .filter_map(|program| {
                let slot_listeners: Vec<_> = program
                    .slots
                    .iter()
                    .map(|slot| (*slot, by_cookie.get(&slot.cookie).copied()))
                    .collect();
                let pinned = pinned_id == Some(program.id);
                let on_port = pinned || slot_listeners.iter().any(|(_, inode)| inode.is_some());
                on_port.then_some(ProgramOnPort {
                    program,
                    pinned,
                    slot_listeners,
                })
            })
            .collect();
        let unreadable_pinned =
            pinned_id.filter(|id| !programs.iter().any(|p| p.program.id == *id));
        Ok(Self {
            port,
            listeners,
            programs,
            pin_dir,
            recorded,
            unreadable_pinned,
        })
    }

    /// Whether the port is steered, partly, stale or not at all (see [`Verdict`]).
    pub fn verdict(&self) -> Verdict {
        let steered: BTreeSet<u64> = self
            .programs
            .iter()
            .flat_map(|p| p.slot_listeners.iter().filter_map(|(_, inode)| *inode))
            .collect();
        if steered.is_empty() {
            return if self.unreadable_pinned.is_some() {
                Verdict::Unknown
            } else if self.pin_dir.is_some() || self.recorded.is_some() || !self.programs.is_empty()
            {
                Verdict::Stale
            } else {
                Verdict::NotSteered
            };
        }
        let unsteered = self
            .listeners
            .iter()
            .filter(|l| !steered.contains(&l.inode))
            .count();
        if unsteered == 0 {
            Verdict::Steered
        } else {
            Verdict::Partly { unsteered }
        }
    }

    /// The CPUs whose slot holds a listener of the port now: the worker CPUs of the server it
    /// steers.
    pub fn steered_cpus(&self) -> crate::CpuList {
        self.programs
            .iter()
            .flat_map(|p| p.slot_listeners.iter())
            .filter(|(_, inode)| inode.is_some())
            .map(|(slot, _)| slot.cpu)
            .collect()
    }

    /// The listeners in no program's slot.
    pub fn unsteered(&self) -> impl Iterator<Item = &Listener> {
        let steered: BTreeSet<u64> = self
            .programs
            .iter()
            .flat_map(|p| p.slot_listeners.iter().filter_map(|(_, inode)| *inode))
            .collect();
        self.listeners
            .iter()
            .filter(move |l| !steered.contains(&l.inode))
    }

    /// The listener with `inode`.
    pub fn listener(&self, inode: u64) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.inode == inode)
    }
}

/// What [`detach`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detached {
    /// The port.
    pub port: u16,
    /// `(id, name)` of each program detached from the port's listeners.
    pub programs: Vec<(u32, String)>,
    /// The pin directory removed, if there was one.
    pub pins_removed: Option<PathBuf>,
    /// Whether a state file was removed.
    pub state_removed: bool,
}

/// How long [`detach`] waits for the kernel to free a detached program's map (which releases
/// its sockets, so a new `attach` can put them into a map of its own).
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Returns `port` to hash selection and removes everything left of its steering: every one of
/// our programs whose slots hold a listener of the port is detached from that listener's group
/// (a pinned one, one left by an `attach` that was killed, one a running `attach` holds), then
/// the pins and state file under `root` are removed. Everything it needs is checked first: the
/// right to list the kernel's programs, to remove the pins, and to take a steered listener
/// from its process; on any refusal nothing is changed. Waits (up to 5 s) until the kernel has
/// released the detached programs' sockets, so a new `attach` works at once.
pub fn detach(port: u16, root: &PinnedRoot) -> Result<Detached, PortSteeringError> {
    root.check_removable(port)?;
    root.check_dirs(port)?;
    let view = PortSteering::inspect(port, root)?;
    if view.verdict() == Verdict::NotSteered {
        return Err(PortSteeringError::NotSteered {
            port,
            dir: root.pin_dir(port).display().to_string(),
        });
    }
    // One socket of each steered group, taken before anything changes.
    let mut members: Vec<(&ProgramOnPort, &OwnedFd)> = Vec::new();
    for program in view.programs.iter().filter(|p| p.steers()) {
        for inode in program
            .slot_listeners
            .iter()
            .filter_map(|(_, inode)| *inode)
        {
            let listener = view.listener(inode).and_then(|l| l.socket.as_ref());
            match listener {
                Some(socket) => members.push((program, socket)),
                None => {
                    let holder = view
                        .listener(inode)
                        .and_then(|l| l.holders.first().copied());
                    return Err(PortSteeringError::Member {
                        port,
                        source: Box::new(match holder {
                            Some((pid, _)) => AttachError::Permission { pid },
                            None => AttachError::NoListener {
                                port,
                                pids: String::new(),
                            },
                        }),
                    });
                }
            }
        }
    }
    // A pinned program whose slots cannot be read may steer any group on the port: detach
    // through every listener (a group without a program is left as it is).
    let mut legacy: Vec<&OwnedFd> = Vec::new();
    if view.unreadable_pinned.is_some() {
        for listener in &view.listeners {
            match &listener.socket {
                Some(socket) => legacy.push(socket),
                None => {
                    return Err(PortSteeringError::Member {
                        port,
                        source: Box::new(match listener.holders.first() {
                            Some(&(pid, _)) => AttachError::Permission { pid },
                            None => AttachError::NoListener {
                                port,
                                pids: String::new(),
                            },
                        }),
                    });
                }
            }
        }
    }
    let mut programs: Vec<(u32, String)> = Vec::new();
    for socket in legacy {
        detach_group(socket.as_fd())?;
    }
    if let Some(id) = view.unreadable_pinned {
        programs.push((id, "pinned by an earlier version".to_owned()));
    }
    for (program, socket) in &members {
        detach_group(socket.as_fd())?;
        let entry = (program.program.id, program.program.name.clone());
        if !programs.contains(&entry) {
            programs.push(entry);
        }
    }
    let (pins_removed, state_removed) = root.remove(port)?;
    // Programs no process holds are freed now, and their maps with them: wait for that.
    let released: Vec<u32> = view
        .programs
        .iter()
        .filter(|p| p.program.holders.is_empty())
        .map(|p| p.program.map_id)
        .collect();
    drop(view);
    let deadline = Instant::now() + RELEASE_WAIT;
    while released.iter().any(|&id| MapInfo::from_id(id).is_ok()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Detached {
        port,
        programs,
        pins_removed,
        state_removed,
    })
}

/// Every port something of ours steers or was left for: ports with pins or a state file under
/// `root`, and ports whose listeners sit in a steering program's slots. In ascending order.
pub fn ports(root: &PinnedRoot) -> Result<Vec<u16>, PortSteeringError> {
    let mut ports: BTreeSet<u16> = root.ports().into_iter().collect();
    ports.extend(root.state_ports());
    let programs = kernel_programs()?;
    let cookies: BTreeSet<u64> = programs
        .iter()
        .flat_map(|p| p.slots.iter().map(|s| s.cookie))
        .collect();
    if !cookies.is_empty() {
        for port in listening_ports()? {
            if ports.contains(&port) {
                continue;
            }
            if listeners(port)?
                .iter()
                .any(|l| l.cookie.is_some_and(|c| cookies.contains(&c)))
            {
                ports.insert(port);
            }
        }
    }
    Ok(ports.into_iter().collect())
}

/// [`PortSteering::inspect`] of every port of [`ports`], leaving out any whose steering ended
/// in between (while another process detached it).
pub fn inspect_all(root: &PinnedRoot) -> Result<Vec<PortSteering>, PortSteeringError> {
    let mut views = Vec::new();
    for port in ports(root)? {
        let view = PortSteering::inspect(port, root)?;
        if view.verdict() != Verdict::NotSteered {
            views.push(view);
        }
    }
    Ok(views)
}

/// The ports with a listening TCP socket, in any network namespace.
fn listening_ports() -> Result<BTreeSet<u16>, PortSteeringError> {
    let mut ports: BTreeSet<u16> = procfs::listening_tcp_all(std::process::id())?
        .iter()
        .map(|s| s.addr.port())
        .collect();
    for pid in procfs::one_process_per_netns().into_iter().skip(1) {
        ports.extend(
            procfs::listening_tcp_all(pid)
                .unwrap_or_default()
                .iter()
                .map(|s| s.addr.port()),
        );
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(inode: u64) -> Listener {
        Listener {
            addr: "127.0.0.1:8080".parse().expect("address"),
            uid: 0,
            inode,
            cookie: Some(inode + 1000),
            holders: vec![(100, 3)],
            socket: None,
        }
    }

    fn program(slots: &[(u32, Option<u64>)], pinned: bool) -> ProgramOnPort {
        let filled: Vec<_> = slots
            .iter()
            .map(|&(cpu, inode)| {
                (
                    FilledSlot {
                        cpu,
                        cookie: inode.map_or(1, |i| i + 1000),
                    },
                    inode,
                )
            })
            .collect();
        ProgramOnPort {
            program: KernelProgram {
                id: 7,
                name: names::STEER_MIGRATE.to_owned(),
                map_id: 8,
                slots: filled.iter().map(|(slot, _)| *slot).collect(),
                holders: Vec::new(),
            },
            pinned,
            slot_listeners: filled,
        }
    }

    fn view(listeners: &[u64], programs: Vec<ProgramOnPort>, pinned: bool) -> PortSteering {
        PortSteering {
            port: 8080,
            listeners: listeners.iter().copied().map(listener).collect(),
            programs,
            pin_dir: pinned.then(|| PathBuf::from("/sys/fs/bpf/reuseport/8080")),
            recorded: None,
            unreadable_pinned: None,
        }
    }

    #[test]
    fn the_verdict_follows_which_listeners_the_slots_hold() {
        let all = view(
            &[1, 2],
            vec![program(&[(0, Some(1)), (1, Some(2))], true)],
            true,
        );
        assert_eq!(all.verdict(), Verdict::Steered);
        assert_eq!(all.unsteered().count(), 0);

        // A worker restarted with a new listener: the old slot emptied, the new socket is in none.
        let part = view(&[1, 3], vec![program(&[(0, Some(1))], true)], true);
        assert_eq!(part.verdict(), Verdict::Partly { unsteered: 1 });
        assert_eq!(part.unsteered().map(|l| l.inode).collect::<Vec<_>>(), [3]);

        // The server restarted: the pinned program holds nothing of the new group.
        let stale = view(&[5, 6], vec![program(&[], true)], true);
        assert_eq!(stale.verdict(), Verdict::Stale);
        assert_eq!(stale.unsteered().count(), 2);
        // Only pins (or only a state file) left, no program: stale too.
        assert_eq!(view(&[5], Vec::new(), true).verdict(), Verdict::Stale);
        let mut recorded = view(&[5], Vec::new(), false);
        recorded.recorded = Some(PersistedState {
            port: 8080,
            pids: Vec::new(),
            program_id: 7,
            slots: Vec::new(),
        });
        assert_eq!(recorded.verdict(), Verdict::Stale);

        // A program killed with its attach still steering (not pinned): steered.
        let killed = view(
            &[1, 2],
            vec![program(&[(0, Some(1)), (1, Some(2))], false)],
            false,
        );
        assert_eq!(killed.verdict(), Verdict::Steered);

        assert_eq!(view(&[1], Vec::new(), false).verdict(), Verdict::NotSteered);
        let mut legacy = view(&[1], Vec::new(), true);
        legacy.unreadable_pinned = Some(9);
        assert_eq!(legacy.verdict(), Verdict::Unknown);
    }
}
