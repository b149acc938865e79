//! `reuseport attach`: per-CPU steering for a server that is already running, without touching
//! its code — nginx, HAProxy, Envoy or your own, as long as each worker is a process pinned to
//! one CPU and owns a `SO_REUSEPORT` listener.
//!
//! How a listener is matched to its worker (the part that must be robust):
//! 1. The listening sockets on the port are read from `/proc/PID/net/tcp{,6}` (in the target's
//!    network namespace): state `LISTEN`, local port, owner uid and inode.
//! 2. Every process in the target's tree (the given PIDs and all their descendants) is searched
//!    for file descriptors pointing at those inodes (`/proc/PID/fd/N -> socket:[INODE]`).
//! 3. A prefork server's master and workers may *all* hold every listener (nginx does), so
//!    holding a socket does not say who serves it. What does: the worker registers the listener
//!    it accepts on in its epoll instance, and `/proc/PID/fdinfo/<epoll fd>` lists every
//!    registered file's inode (`tfd: … ino:…`). A socket registered by exactly one process is
//!    served by that process. Servers that block in `accept(2)` register nothing; then the
//!    socket must be held by exactly one process of the tree.
//! 4. That process must be pinned to exactly one CPU (`sched_getaffinity`), and no two
//!    listeners may share a CPU: the CPU is the listener's slot.
//! 5. The sockets are duplicated with `pidfd_open` + `pidfd_getfd`, checked (a socket,
//!    listening, `SO_REUSEPORT`, one address, one owner), put into the slots through
//!    [`Steering::attach`] — the same path `serve` uses — and the duplicates are closed again: the
//!    map holds no reference, so a worker that exits still closes its listener, emptying its slot.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    time::Instant,
};

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
use socket2::SockRef;
use thiserror::Error;

use crate::{
    cpus::CpuList,
    pinned::{PinnedError, PinnedRoot, PinnedSlot, PinnedSteering},
    procfs::{self, ProcError},
    stats::{Migrations, Snapshot},
    steering::{Steering, SteeringError, SteeringProgram},
};

/// Errors from finding, checking or steering a running server's listeners.
#[derive(Debug, Error)]
pub enum AttachError {
    /// Reading `/proc` failed (e.g. no such process).
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// Nothing listens on the port in those processes.
    #[error("no process in the tree of pid {pids} has a TCP listener on port {port}")]
    NoListener {
        /// The port.
        port: u16,
        /// The PIDs searched, comma-separated.
        pids: String,
    },
    /// Duplicating a socket from another process was refused.
    #[error(
        "not allowed to take pid {pid}'s sockets (pidfd_getfd needs ptrace rights over it: \
         run as its user or root, with CAP_SYS_PTRACE)"
    )]
    Permission {
        /// The process.
        pid: u32,
    },
    /// `pidfd_open`/`pidfd_getfd` failed otherwise (Linux >= 5.6 is needed).
    #[error("duplicating fd {fd} of pid {pid} failed (pidfd_getfd needs Linux 5.6 or later)")]
    Duplicate {
        /// The process.
        pid: u32,
        /// Its fd.
        fd: i32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A listener does not have `SO_REUSEPORT`.
    #[error(
        "the listener on {addr} (fd {fd} of pid {pid}) has no SO_REUSEPORT: only a reuseport \
         group can be steered (nginx: `listen ... reuseport`)"
    )]
    NotReuseport {
        /// Holder.
        pid: u32,
        /// Its fd.
        fd: i32,
        /// The address.
        addr: SocketAddr,
    },
    /// A file descriptor given to [`check_fds`] is not a socket.
    #[error("fd {fd} is not a socket")]
    NotASocket {
        /// The fd.
        fd: i32,
    },
    /// A socket given to [`check_fds`] is not listening.
    #[error("fd {fd} is a socket but not a listening TCP socket")]
    NotListening {
        /// The fd.
        fd: i32,
    },
    /// The listeners are bound to different addresses, so they are different groups.
    #[error(
        "the listeners belong to different reuseport groups ({addrs}); steer one group at a time"
    )]
    DifferentGroups {
        /// The addresses.
        addrs: String,
    },
    /// The listeners have different owners, so they cannot be one group.
    #[error(
        "the listeners are owned by different users (uids {uids}); a reuseport group has one owner"
    )]
    DifferentOwners {
        /// The uids.
        uids: String,
    },
    /// More than one process serves one socket.
    #[error(
        "the listener with inode {inode} is served by several processes ({pids}); cannot give it one CPU"
    )]
    Ambiguous {
        /// The socket.
        inode: u64,
        /// The processes.
        pids: String,
    },
    /// All listeners are served by one process: a threaded server.
    #[error(
        "all {count} listeners are served by one process (pid {pid}, {comm}): its workers are \
         threads, which cannot be told apart from outside; use the library in the server \
         (Steering::attach) or `reuseport serve`"
    )]
    Threaded {
        /// The process.
        pid: u32,
        /// Its name.
        comm: String,
        /// Listeners.
        count: usize,
    },
    /// A serving process may run on several CPUs.
    #[error(
        "pid {pid} ({comm}) serves a listener but may run on CPUs {cpus}: every worker must be \
         pinned to one CPU (nginx: `worker_cpu_affinity auto;`)"
    )]
    Unpinned {
        /// The process.
        pid: u32,
        /// Its name.
        comm: String,
        /// Its affinity.
        cpus: CpuList,
    },
    /// Two serving processes are pinned to the same CPU.
    #[error(
        "pids {first} and {second} are both pinned to CPU {cpu}: each CPU can have one \
         listener (nginx: `worker_cpu_affinity auto;`)"
    )]
    Doubled {
        /// The CPU.
        cpu: u32,
        /// One process.
        first: u32,
        /// The other.
        second: u32,
    },
    /// The given processes serve only some of the group's listeners.
    #[error(
        "pid {pids} serves {found} of the {members} listeners on {addr}: steering part of a \
         group would send every other CPU's connections to these workers; give the server's \
         main process (or every worker)"
    )]
    PartOfGroup {
        /// The PIDs given.
        pids: String,
        /// The group's address.
        addr: SocketAddr,
        /// Listeners the given processes serve.
        found: usize,
        /// Listeners in the group.
        members: usize,
    },
    /// The same socket was given twice.
    #[error("fd {fd} is given twice")]
    FdTwice {
        /// The descriptor.
        fd: i32,
    },
    /// Two sockets were given for one CPU.
    #[error("CPU {cpu} is given twice (fds {first} and {second}): each CPU has one slot")]
    CpuTwice {
        /// The CPU.
        cpu: u32,
        /// One descriptor.
        first: i32,
        /// The other.
        second: i32,
    },
    /// A socket listens on another port than the one to steer.
    #[error("fd {fd} listens on {addr}, not on port {port}")]
    OtherPort {
        /// The descriptor.
        fd: i32,
        /// Where it listens.
        addr: SocketAddr,
        /// The port asked for.
        port: u16,
    },
    /// Steering itself failed.
    #[error(transparent)]
    Steering(#[from] SteeringError),
    /// Nothing is pinned for the port.
    #[error("no persistent steering for port {port} (nothing under {dir})")]
    NotPersisted {
        /// The port.
        port: u16,
        /// Where it would be.
        dir: String,
    },
    /// Reading or writing the pinned state failed.
    #[error("{path}")]
    State {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Persisting, reading or removing pinned steering failed otherwise.
    #[error(transparent)]
    Pinned(PinnedError),
    /// Finding or removing what steers the port (as the kernel says) failed.
    #[error(transparent)]
    Port(Box<crate::port_steering::PortSteeringError>),
    /// [`run`] was given an empty list of processes or sockets.
    #[error("no process or socket to steer was given")]
    NoTarget,
}

impl From<PinnedError> for AttachError {
    /// The errors [`AttachError`] had its own variants for keep them (and their messages).
    fn from(err: PinnedError) -> Self {
        match err {
            PinnedError::NotPersisted { port, dir } => Self::NotPersisted { port, dir },
            PinnedError::Io { path, source, .. } => Self::State { path, source },
            PinnedError::Steering(err) => Self::Steering(err),
            other => Self::Pinned(other),
        }
    }
}

/// A running server's listener, duplicated into this process, with the CPU of its worker.
#[derive(Debug)]
pub struct FoundListener {
    /// The CPU the serving process is pinned to: the listener's slot.
    pub cpu: u32,
    /// The serving process.
    pub pid: u32,
    /// The socket's inode.
    pub inode: u64,
    /// Its local address.
    pub addr: SocketAddr,
    /// This process's duplicate of the socket (close it once the slot is filled).
    pub fd: OwnedFd,
}

/// A listener of a running server and the process serving it, as `/proc` shows them (nothing
/// duplicated yet): what [`serving`] finds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingListener {
    /// The CPU the serving process is pinned to: the listener's slot.
    pub cpu: u32,
    /// The serving process.
    pub pid: u32,
    /// Its file descriptor for the socket.
    pub fd: i32,
    /// The socket's inode.
    pub inode: u64,
    /// Its local address.
    pub addr: SocketAddr,
}

/// Finds the listeners on `port` of `pids` and their descendants, and the CPU of the process
/// that serves each (see the module documentation for how).
pub fn from_pid(pids: &[u32], port: u16) -> Result<Vec<FoundListener>, AttachError> {
    let mut found = Vec::new();
    for listener in serving(pids, port)? {
        let ServingListener {
            cpu,
            pid,
            fd,
            inode,
            addr,
        } = listener;
        let dup = duplicate(pid, fd)?;
        if !SockRef::from(&dup).reuse_port().unwrap_or(false) {
            return Err(AttachError::NotReuseport { pid, fd, addr });
        }
        found.push(FoundListener {
            cpu,
            pid,
            inode,
            addr,
            fd: dup,
        });
    }
    Ok(found)
}

/// Steps 1 to 4 of the module documentation: the listeners on `port` of `pids` and their
/// descendants, each with the process serving it and that process's CPU, in CPU order. Reads
/// `/proc` only, so it is cheap enough to repeat (see [`crate::follow`]).
pub fn serving(pids: &[u32], port: u16) -> Result<Vec<ServingListener>, AttachError> {
    let pid_list = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut tree: Vec<u32> = Vec::new();
    for &pid in pids {
        for member in procfs::process_tree(pid)? {
            if !tree.contains(&member) {
                tree.push(member);
            }
        }
    }
    let no_listener = || AttachError::NoListener {
        port,
        pids: pid_list.clone(),
    };
    let root = *tree.first().ok_or_else(no_listener)?;
    let sockets: BTreeMap<u64, procfs::ProcSocket> = procfs::listening_tcp(root, port)?
        .into_iter()
        .map(|socket| (socket.inode, socket))
        .collect();
    // inode -> processes (and their fd) holding it.
    let mut holders: BTreeMap<u64, Vec<(u32, i32)>> = BTreeMap::new();
    for &pid in &tree {
        let fds = match procfs::socket_fds(pid) {
            Ok(fds) => fds,
            Err(ProcError::Read { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                return Err(AttachError::Permission { pid });
            }
            // A process may exit while we look; it then holds nothing.
            Err(_) => Vec::new(),
        };
        for (fd, inode) in fds {
            if sockets.contains_key(&inode) {
                holders.entry(inode).or_default().push((pid, fd));
            }
        }
    }
    if holders.is_empty() {
        return Err(no_listener());
    }
    let epoll: BTreeMap<u32, BTreeSet<u64>> = tree
        .iter()
        .map(|&pid| (pid, procfs::epoll_targets(pid)))
        .collect();

    let mut serving: Vec<(u64, u32, i32)> = Vec::new();
    for (&inode, held) in &holders {
        let registered: Vec<(u32, i32)> = held
            .iter()
            .copied()
            .filter(|(pid, _)| epoll.get(pid).is_some_and(|set| set.contains(&inode)))
            .collect();
        let servers = if registered.is_empty() {
            held.clone()
        } else {
            registered
        };
        match servers.as_slice() {
            [(pid, fd)] => serving.push((inode, *pid, *fd)),
            _ => {
                return Err(AttachError::Ambiguous {
                    inode,
                    pids: servers
                        .iter()
                        .map(|(p, _)| p.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                });
            }
        }
    }
    let serving_pids: BTreeSet<u32> = serving.iter().map(|&(_, pid, _)| pid).collect();
    if let ([pid], count @ 2..) = (
        serving_pids.iter().copied().collect::<Vec<_>>().as_slice(),
        serving.len(),
    ) {
        return Err(AttachError::Threaded {
            pid: *pid,
            comm: procfs::comm(*pid),
            count,
        });
    }

    // One group first: otherwise CPU conflicts between two servers would be reported instead.
    check_one_group(serving.iter().map(|(inode, _, _)| {
        let socket = &sockets[inode];
        (socket.addr, socket.uid)
    }))?;
    // The whole group, not part of it: steering some of its listeners would send the other
    // CPUs' connections to the fallback, i.e. to these few workers.
    if let Some(&(inode, _, _)) = serving.first() {
        let group = (sockets[&inode].addr, sockets[&inode].uid);
        let members = sockets
            .values()
            .filter(|socket| (socket.addr, socket.uid) == group)
            .count();
        if serving.len() < members {
            return Err(AttachError::PartOfGroup {
                pids: pid_list,
                addr: group.0,
                found: serving.len(),
                members,
            });
        }
    }
    let mut by_cpu: BTreeMap<u32, u32> = BTreeMap::new();
    let mut found = Vec::with_capacity(serving.len());
    for (inode, pid, fd) in serving {
        let cpus = procfs::affinity(pid)?;
        let cpu = match cpus.iter().collect::<Vec<_>>().as_slice() {
            [cpu] => *cpu,
            _ => {
                return Err(AttachError::Unpinned {
                    pid,
                    comm: procfs::comm(pid),
                    cpus,
                });
            }
        };
        if let Some(&first) = by_cpu.get(&cpu) {
            return Err(AttachError::Doubled {
                cpu,
                first,
                second: pid,
            });
        }
        by_cpu.insert(cpu, pid);
        found.push(ServingListener {
            cpu,
            pid,
            fd,
            inode,
            addr: sockets[&inode].addr,
        });
    }
    found.sort_by_key(|f| f.cpu);
    Ok(found)
}

/// Fails unless every `(address, owner uid)` is the same: one reuseport group.
fn check_one_group(members: impl Iterator<Item = (SocketAddr, u32)>) -> Result<(), AttachError> {
    let (addrs, uids): (BTreeSet<SocketAddr>, BTreeSet<u32>) = members.unzip();
    let join = |items: Vec<String>| items.join(", ");
    if addrs.len() > 1 {
        return Err(AttachError::DifferentGroups {
            addrs: join(addrs.iter().map(ToString::to_string).collect()),
        });
    }
    if uids.len() > 1 {
        return Err(AttachError::DifferentOwners {
            uids: join(uids.iter().map(ToString::to_string).collect()),
        });
    }
    Ok(())
}

/// Duplicates `fd` of process `pid` into this process (`pidfd_open` + `pidfd_getfd`).
pub fn duplicate(pid: u32, fd: i32) -> Result<OwnedFd, AttachError> {
    let target = Pid::from_raw(pid as i32).ok_or(ProcError::NoSuchProcess(pid))?;
    let duplicate_error = |err: rustix::io::Errno| {
        if err == rustix::io::Errno::PERM || err == rustix::io::Errno::ACCESS {
            AttachError::Permission { pid }
        } else if err == rustix::io::Errno::SRCH {
            AttachError::Proc(ProcError::NoSuchProcess(pid))
        } else {
            AttachError::Duplicate {
                pid,
                fd,
                source: err.into(),
            }
        }
    };
    let pidfd = pidfd_open(target, PidfdFlags::empty()).map_err(duplicate_error)?;
    // `fd` is a number in the other process's table, which pidfd_getfd duplicates into ours.
    pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).map_err(duplicate_error)
}

/// Checks `(socket, cpu)` pairs of sockets this process already holds (inherited, or systemd's
/// `LISTEN_FDS`): each a listening `SO_REUSEPORT` socket, all in one group. Returns them as the
/// `(cpu, socket)` pairs [`Steering::attach`] takes.
pub fn check_fds<'a>(
    pairs: &[(BorrowedFd<'a>, u32)],
) -> Result<Vec<(u32, BorrowedFd<'a>)>, AttachError> {
    let mut checked = Vec::with_capacity(pairs.len());
    let mut members = Vec::with_capacity(pairs.len());
    let mut cpus: BTreeMap<u32, i32> = BTreeMap::new();
    for &(socket_fd, cpu) in pairs {
        let fd = socket_fd.as_raw_fd();
        if checked
            .iter()
            .any(|(_, seen): &(u32, BorrowedFd<'_>)| seen.as_raw_fd() == fd)
        {
            return Err(AttachError::FdTwice { fd });
        }
        if let Some(&first) = cpus.get(&cpu) {
            return Err(AttachError::CpuTwice {
                cpu,
                first,
                second: fd,
            });
        }
        cpus.insert(cpu, fd);
        let stat = rustix::fs::fstat(socket_fd).map_err(|_| AttachError::NotASocket { fd })?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket {
            return Err(AttachError::NotASocket { fd });
        }
        let socket = SockRef::from(&socket_fd);
        if !socket.is_listener().unwrap_or(false) {
            return Err(AttachError::NotListening { fd });
        }
        let addr = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or(AttachError::NotListening { fd })?;
        if !socket.reuse_port().unwrap_or(false) {
            return Err(AttachError::NotReuseport {
                pid: std::process::id(),
                fd,
                addr,
            });
        }
        members.push((addr, rustix::process::geteuid().as_raw()));
        checked.push((cpu, socket_fd));
    }
    check_one_group(members.into_iter())?;
    Ok(checked)
}

/// Steers the listeners `found` (see [`from_pid`]) through [`Steering::attach`], then closes the
/// duplicates so that the target's processes remain the only holders.
pub fn steer(found: Vec<FoundListener>) -> Result<Steering, AttachError> {
    steer_with(found, SteeringProgram::recommended())
}

/// A socket of the group on `port` served by `pids`' tree, to detach through.
pub fn any_member(pids: &[u32], port: u16) -> Result<OwnedFd, AttachError> {
    let pid_list = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    for &pid in pids {
        for member in procfs::process_tree(pid).unwrap_or_default() {
            let inodes: BTreeSet<u64> = procfs::listening_tcp(member, port)
                .unwrap_or_default()
                .iter()
                .map(|s| s.inode)
                .collect();
            for (fd, inode) in procfs::socket_fds(member).unwrap_or_default() {
                if inodes.contains(&inode) {
                    return duplicate(member, fd);
                }
            }
        }
    }
    Err(AttachError::NoListener {
        port,
        pids: pid_list,
    })
}

/// Which listeners [`run`] steers.
#[derive(Clone, Debug)]
pub enum AttachTarget<'a> {
    /// The server's processes (any of them: their descendants are searched too); the listeners
    /// and their CPUs are found as [`from_pid`] does.
    Pids(Vec<u32>),
    /// Listening sockets this process already holds (inherited, systemd's `LISTEN_FDS`), each
    /// with its CPU; checked as [`check_fds`] does.
    Fds(Vec<(BorrowedFd<'a>, u32)>),
}

/// What [`run`] does with the listeners it found and checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachAction {
    /// Attach the steering program.
    #[default]
    Steer,
    /// Detach whatever program the group has: the kernel's hash selects again.
    Hash,
}

/// Everything [`run`] needs: the `attach` verb's arguments, typed.
#[derive(Clone, Debug)]
pub struct AttachRequest<'a> {
    /// The port the server listens on.
    pub port: u16,
    /// The listeners to steer.
    pub target: AttachTarget<'a>,
    /// Steer, or go back to hash selection.
    pub action: AttachAction,
    /// The program to attach ([`SteeringProgram::recommended`] by default).
    pub program: SteeringProgram,
    /// `Some`: pin the steering under this root so it outlives this process
    /// ([`Attached::Persisted`]); `None`: it lasts until [`LiveSteering::detach`].
    pub persist: Option<PinnedRoot>,
}

impl<'a> AttachRequest<'a> {
    /// Steer `target`'s listeners on `port` with the recommended program, not persisted.
    pub fn new(port: u16, target: AttachTarget<'a>) -> Self {
        Self {
            port,
            target,
            action: AttachAction::Steer,
            program: SteeringProgram::recommended(),
            persist: None,
        }
    }
}

/// Who serves a steered listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotHolder {
    /// A process of the server (found through `/proc`).
    Process {
        /// The serving process.
        pid: u32,
        /// Its name (`/proc/PID/comm`).
        comm: String,
        /// The socket's inode.
        inode: u64,
    },
    /// A socket this process holds, by its file descriptor.
    Fd(i32),
}

/// One steered slot: a CPU and who serves its listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedSlot {
    /// The slot: the CPU whose connections go to this listener.
    pub cpu: u32,
    /// Who serves the listener.
    pub holder: SlotHolder,
}

impl fmt::Display for AttachedSlot {
    /// `cpu2 <- pid 1234 (nginx)` or `cpu2 <- fd 5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.holder {
            SlotHolder::Process { pid, comm, .. } => {
                write!(f, "cpu{} <- pid {pid} ({comm})", self.cpu)
            }
            SlotHolder::Fd(fd) => write!(f, "cpu{} <- fd {fd}", self.cpu),
        }
    }
}

/// `slots`, comma-separated (each as [`AttachedSlot`] displays).
pub fn describe_slots(slots: &[AttachedSlot]) -> String {
    slots
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What [`run`] did.
#[derive(Debug)]
pub enum Attached<'a> {
    /// [`AttachAction::Hash`]: the group selects by hash again.
    Hashed {
        /// The listeners found and checked.
        slots: Vec<AttachedSlot>,
    },
    /// Steering in place until [`LiveSteering::detach`].
    Live(LiveSteering<'a>),
    /// Steering in place and pinned: it outlives this process until [`PinnedSteering::detach`].
    Persisted {
        /// The pinned steering.
        pinned: PinnedSteering,
        /// The listeners steered.
        slots: Vec<AttachedSlot>,
    },
}

/// How [`LiveSteering::detach`] reaches the group again.
#[derive(Clone, Debug)]
enum GroupMember<'a> {
    /// One of the sockets this process holds.
    Fd(BorrowedFd<'a>),
    /// A socket of the group taken again from the server's processes ([`any_member`]).
    Tree(Vec<u32>),
}

/// Steering attached by [`run`] to a running server's group, for as long as this process wants:
/// read its counters with [`LiveSteering::snapshot`], end it with [`LiveSteering::detach`].
/// Dropping it detaches too (quietly), so an early return or a panic does not leave the group
/// steered by a program nobody holds.
pub struct LiveSteering<'a> {
    steering: Steering,
    slots: Vec<AttachedSlot>,
    port: u16,
    member: GroupMember<'a>,
    addr: Option<SocketAddr>,
    started: Instant,
    migrations_at_start: Migrations,
    detached: bool,
}

impl Drop for LiveSteering<'_> {
    fn drop(&mut self) {
        if !self.detached {
            let _ = self.detach_group();
        }
    }
}

impl fmt::Debug for LiveSteering<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveSteering")
            .field("port", &self.port)
            .field("slots", &self.slots)
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl LiveSteering<'_> {
    /// The steering program.
    pub fn steering(&self) -> &Steering {
        &self.steering
    }

    /// The listeners steered, in CPU order for processes, in the given order for sockets.
    pub fn slots(&self) -> &[AttachedSlot] {
        &self.slots
    }

    /// The port steered.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the steered group listens on (`None` if it could not be read).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The kernel's id of the attached program.
    pub fn program_id(&self) -> Result<u32, AttachError> {
        Ok(self.steering.program_id()?)
    }

    /// The program's counters since [`run`] attached it. A foreign server's workers keep no
    /// counters of ours, so [`Snapshot::workers`] is empty; [`Snapshot::migrations`] counts the
    /// server's own worker restarts, which migrate through the program.
    pub fn snapshot(&self) -> Result<Snapshot, AttachError> {
        Ok(Snapshot {
            elapsed: self.started.elapsed(),
            workers: Vec::new(),
            steering: Some(self.steering.stats()?),
            program: self.steering.run_stats()?,
            migrations: Migrations::read().since(&self.migrations_at_start),
            restarts: 0,
            spill: None,
            spilling: Vec::new(),
        })
    }

    /// Detaches the program: the group selects by hash again.
    pub fn detach(mut self) -> Result<(), AttachError> {
        self.detached = true;
        self.detach_group()
    }

    fn detach_group(&self) -> Result<(), AttachError> {
        match &self.member {
            GroupMember::Fd(member) => crate::steering::detach_group(member)?,
            GroupMember::Tree(pids) => {
                crate::steering::detach_group(any_member(pids, self.port)?)?;
            }
        }
        Ok(())
    }
}

/// Detaches `steering` from the group `member` reaches.
fn detach_group(
    steering: Steering,
    member: &GroupMember<'_>,
    port: u16,
) -> Result<(), AttachError> {
    match member {
        GroupMember::Fd(member) => steering.detach(member)?,
        GroupMember::Tree(pids) => steering.detach(any_member(pids, port)?)?,
    }
    Ok(())
}

/// Returns the group of `member` (on `port`) to hash selection: everything of ours that steers
/// the port or was persisted for it is detached and its pins removed (or a later attach would
/// find its sockets still in the old map), then any program the group still has is detached.
/// Without the right to list the kernel's programs, only the group's program is detached, and
/// persisted steering is refused (its pins would stay).
fn back_to_hash(member: BorrowedFd<'_>, port: u16) -> Result<(), AttachError> {
    use crate::port_steering::{self, PortSteeringError};
    let root = PinnedRoot::system();
    match port_steering::detach(port, &root) {
        Ok(_) | Err(PortSteeringError::NotSteered { .. }) => {}
        Err(PortSteeringError::NotAllowed) if !root.is_persisted(port) => {}
        Err(err) => return Err(AttachError::Port(Box::new(err))),
    }
    crate::steering::detach_group(member)?;
    Ok(())
}

/// The `attach` verb as one call: finds and checks the listeners of `request.target` (nothing is
/// attached if that fails), then steers them, or with [`AttachAction::Hash`] detaches whatever
/// program the group has. With [`AttachRequest::persist`] the steering is pinned; a port that
/// already has persistent steering there is refused before anything is attached, and if pinning
/// fails the program is detached again.
pub fn run(request: AttachRequest<'_>) -> Result<Attached<'_>, AttachError> {
    let AttachRequest {
        port,
        target,
        action,
        program,
        persist,
    } = request;
    if action == AttachAction::Steer
        && let Some(root) = &persist
        && root.is_persisted(port)
    {
        return Err(AttachError::Pinned(PinnedError::AlreadyPersisted {
            port,
            dir: root.pin_dir(port).display().to_string(),
        }));
    }
    // Pin directories another user placed are refused before anything is attached.
    if action == AttachAction::Steer
        && let Some(root) = &persist
    {
        root.check_dirs(port)?;
    }
    // Before any socket is taken from the server: this process must be able to steer at all.
    if action == AttachAction::Steer {
        Steering::check_available()?;
    }
    match target {
        AttachTarget::Fds(pairs) => {
            let checked = check_fds(&pairs)?;
            for &(_, socket) in &checked {
                let addr = SockRef::from(&socket)
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket());
                if let Some(addr) = addr.filter(|addr| addr.port() != port) {
                    return Err(AttachError::OtherPort {
                        fd: socket.as_raw_fd(),
                        addr,
                        port,
                    });
                }
            }
            let &(_, member) = checked.first().ok_or(AttachError::NoTarget)?;
            let addr = SockRef::from(&member)
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket());
            let slots = pairs
                .iter()
                .map(|&(fd, cpu)| AttachedSlot {
                    cpu,
                    holder: SlotHolder::Fd(fd.as_raw_fd()),
                })
                .collect();
            if action == AttachAction::Hash {
                back_to_hash(member, port)?;
                return Ok(Attached::Hashed { slots });
            }
            let steering = Steering::attach_program(&checked, program)?;
            finish(
                steering,
                Steered {
                    port,
                    pids: Vec::new(),
                    pinned_slots: Vec::new(),
                    slots,
                    member: GroupMember::Fd(member),
                    addr,
                },
                persist,
            )
        }
        AttachTarget::Pids(pids) => {
            if pids.is_empty() {
                return Err(AttachError::NoTarget);
            }
            let found = from_pid(&pids, port)?;
            let slots = found
                .iter()
                .map(|f| AttachedSlot {
                    cpu: f.cpu,
                    holder: SlotHolder::Process {
                        pid: f.pid,
                        comm: procfs::comm(f.pid),
                        inode: f.inode,
                    },
                })
                .collect();
            if action == AttachAction::Hash {
                let first = found.first().ok_or_else(|| AttachError::NoListener {
                    port,
                    pids: pids
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                })?;
                back_to_hash(first.fd.as_fd(), port)?;
                return Ok(Attached::Hashed { slots });
            }
            let pinned_slots = found
                .iter()
                .map(|f| PinnedSlot {
                    cpu: f.cpu,
                    pid: f.pid,
                    inode: f.inode,
                })
                .collect();
            let addr = found.first().map(|f| f.addr);
            let steering = steer_with(found, program)?;
            finish(
                steering,
                Steered {
                    port,
                    pids: pids.clone(),
                    pinned_slots,
                    slots,
                    member: GroupMember::Tree(pids),
                    addr,
                },
                persist,
            )
        }
    }
}

/// What [`run`] steered, for [`finish`].
struct Steered<'a> {
    port: u16,
    pids: Vec<u32>,
    pinned_slots: Vec<PinnedSlot>,
    slots: Vec<AttachedSlot>,
    member: GroupMember<'a>,
    addr: Option<SocketAddr>,
}

/// Pins `steering` under `persist`, or hands it over live.
fn finish<'a>(
    mut steering: Steering,
    steered: Steered<'a>,
    persist: Option<PinnedRoot>,
) -> Result<Attached<'a>, AttachError> {
    let Steered {
        port,
        pids,
        pinned_slots,
        slots,
        member,
        addr,
    } = steered;
    let Some(root) = persist else {
        return Ok(Attached::Live(LiveSteering {
            steering,
            slots,
            port,
            member,
            addr,
            started: Instant::now(),
            migrations_at_start: Migrations::read(),
            detached: false,
        }));
    };
    match root.persist(&mut steering, port, &pids, pinned_slots) {
        Ok(pinned) => Ok(Attached::Persisted { pinned, slots }),
        Err(err) => {
            // Unpinned steering would outlive this process with nothing to remove it by.
            let _ = detach_group(steering, &member, port);
            Err(AttachError::Pinned(err))
        }
    }
}

/// [`steer`] with a chosen program.
fn steer_with(
    found: Vec<FoundListener>,
    program: SteeringProgram,
) -> Result<Steering, AttachError> {
    let pairs: Vec<(u32, BorrowedFd<'_>)> = found.iter().map(|f| (f.cpu, f.fd.as_fd())).collect();
    let steering = Steering::attach_program(&pairs, program)?;
    drop(pairs);
    drop(found);
    Ok(steering)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_describe_their_holder() {
        let slots = [
            AttachedSlot {
                cpu: 0,
                holder: SlotHolder::Process {
                    pid: 1234,
                    comm: "nginx".into(),
                    inode: 99,
                },
            },
            AttachedSlot {
                cpu: 3,
                holder: SlotHolder::Fd(7),
            },
        ];
        assert_eq!(
            describe_slots(&slots),
            "cpu0 <- pid 1234 (nginx), cpu3 <- fd 7"
        );
        assert_eq!(describe_slots(&[]), "");
    }

    #[test]
    fn pinned_errors_keep_the_attach_variants_they_had() {
        let not_persisted = AttachError::from(PinnedError::NotPersisted {
            port: 80,
            dir: "/sys/fs/bpf/reuseport/80".into(),
        });
        assert_eq!(
            not_persisted.to_string(),
            "no persistent steering for port 80 (nothing under /sys/fs/bpf/reuseport/80)"
        );
        assert!(matches!(not_persisted, AttachError::NotPersisted { .. }));
        let io = AttachError::from(PinnedError::Io {
            action: "writing",
            path: "/run/reuseport/80.json".into(),
            source: io::Error::other("disk full"),
        });
        assert!(
            matches!(io, AttachError::State { ref path, .. } if path == "/run/reuseport/80.json")
        );
        let already = AttachError::from(PinnedError::AlreadyPersisted {
            port: 80,
            dir: "/x".into(),
        });
        assert_eq!(
            already.to_string(),
            "port 80 already has persistent steering (pinned in /x)"
        );
    }
}
