//! Network namespaces without names: created by `unshare(CLONE_NEWNET)` in a short-lived thread
//! and kept alive only by the file descriptor a [`NetNs`] holds (and by the processes inside).
//!
//! Nothing is bind-mounted under `/run/netns`, so nothing outlives the harness: when its last
//! descriptor closes (drop, a panic, or SIGKILL of the harness) and its processes have exited, the
//! kernel deletes the namespace and every device in it. That is why the harness does not name
//! them like `ip netns add` would: a named namespace survives a killed harness and needs a
//! clean-up pass by the next one.
//!
//! [`NetNs::run`] runs code inside a namespace with that namespace's own sysfs mounted on `/sys`
//! (sysfs shows the devices of the namespace of whoever mounts it), in a thread with a private
//! mount namespace, so the rest of the process keeps the host's `/sys`.

use std::{
    fs, io,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::{fs::MetadataExt, process::CommandExt},
    },
    path::Path,
    process::Command,
    thread,
};

use rustix::{
    mount::{MountFlags, MountPropagationFlags, mount, mount_change},
    thread::{LinkNameSpaceType, UnshareFlags, move_into_link_name_space, unshare_unsafe},
};
use thiserror::Error;

/// Errors from creating, entering or working inside a namespace.
#[derive(Debug, Error)]
pub enum NetNsError {
    /// A system call on the way failed.
    #[error("{what} failed (needs root: CAP_SYS_ADMIN)")]
    Sys {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The thread working inside the namespace panicked.
    #[error("the thread working inside a network namespace panicked")]
    Panicked,
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> NetNsError {
    move |source| NetNsError::Sys { what, source }
}

/// A network namespace of its own, alive while this value (or a process inside) is.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    inode: u64,
}

impl NetNs {
    /// Creates a new, empty network namespace (only `lo`, down).
    pub fn create() -> Result<Self, NetNsError> {
        let fd = thread::scope(|scope| {
            scope
                .spawn(|| -> Result<OwnedFd, NetNsError> {
                    // SAFETY: NEWNET alone leaves this thread's file table shared, so every
                    // descriptor stays valid for every thread; only its network namespace changes,
                    // and this thread ends right after.
                    unsafe { unshare_unsafe(UnshareFlags::NEWNET) }
                        .map_err(|err| sys("unshare(CLONE_NEWNET)")(err.into()))?;
                    fs::File::open("/proc/thread-self/ns/net")
                        .map(OwnedFd::from)
                        .map_err(sys("opening /proc/thread-self/ns/net"))
                })
                .join()
                .map_err(|_| NetNsError::Panicked)?
        })?;
        let inode = fs::File::from(fd.try_clone().map_err(sys("dup"))?)
            .metadata()
            .map_err(sys("fstat of the namespace"))?
            .ino();
        Ok(Self { fd, inode })
    }

    /// The namespace's inode number: its identity, as `/proc/PID/ns/net` shows it (`net:[N]`).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The descriptor that keeps the namespace alive (for netlink's `IFLA_NET_NS_FD`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Makes `command` run inside this namespace (it enters it between fork and exec).
    pub fn enter_on_spawn(&self, command: &mut Command) -> Result<(), NetNsError> {
        let fd = self.fd.try_clone().map_err(sys("dup"))?;
        // SAFETY: the closure only makes the setns system call, which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                move_into_link_name_space(fd.as_fd(), Some(LinkNameSpaceType::Network))
                    .map_err(io::Error::from)
            });
        }
        Ok(())
    }

    /// Runs `work` in a thread inside this namespace, with the namespace's sysfs on `/sys` (in
    /// a mount namespace of that thread only), and returns what it returns.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, NetNsError> {
        thread::scope(|scope| {
            scope
                .spawn(|| -> Result<T, NetNsError> {
                    move_into_link_name_space(self.fd.as_fd(), Some(LinkNameSpaceType::Network))
                        .map_err(|err| sys("setns(CLONE_NEWNET)")(err.into()))?;
                    // SAFETY: NEWNS (with FS, which it implies) copies this thread's root, cwd
                    // and mounts; the file table stays shared, so descriptors stay valid.
                    unsafe { unshare_unsafe(UnshareFlags::NEWNS | UnshareFlags::FS) }
                        .map_err(|err| sys("unshare(CLONE_NEWNS)")(err.into()))?;
                    mount_change(
                        "/",
                        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
                    )
                    .map_err(|err| sys("making / private")(err.into()))?;
                    mount("sysfs", "/sys", "sysfs", MountFlags::empty(), None)
                        .map_err(|err| sys("mounting the namespace's sysfs")(err.into()))?;
                    Ok(work())
                })
                .join()
                .map_err(|_| NetNsError::Panicked)?
        })
    }
}

/// Whether any process still holds the network namespace with this inode: as its namespace, or
/// as an open descriptor (`/proc/*/ns/net`, `/proc/*/task/*/ns/net`, `/proc/*/fd/*`).
pub fn namespace_held(inode: u64) -> bool {
    let target = format!("net:[{inode}]");
    let is_it =
        |path: &Path| fs::read_link(path).is_ok_and(|link| link.as_os_str() == target.as_str());
    let Ok(procs) = fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|proc| {
        let dir = proc.path();
        let threads = fs::read_dir(dir.join("task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|task| is_it(&task.path().join("ns/net")));
        let fds = fs::read_dir(dir.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| is_it(&fd.path()));
        is_it(&dir.join("ns/net")) || threads || fds
    })
}
