//! Pinned steering ([`PinnedSteering`]) and the `attach` verb as one call ([`attach::run`])
//! against the real kernel, with pins on a bpffs of their own (mounted on a temporary directory)
//! so that nothing under /sys/fs/bpf is touched. Needs root.

mod common;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, BorrowedFd},
    path::PathBuf,
};

use common::*;
use reuseport::{
    Steering,
    attach::{self, AttachAction, AttachError, AttachRequest, AttachTarget, Attached, SlotHolder},
    pinned::{PinnedError, PinnedRoot, PinnedSlot, SlotState},
    port_steering::{self, PortSteering, PortSteeringError},
};

/// A bpffs mounted on a temporary directory, with a [`PinnedRoot`] on it; unmounted on drop.
struct TempBpffs {
    mount: PathBuf,
    root: PinnedRoot,
    _dir: tempfile::TempDir,
}

impl TempBpffs {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mount = dir.path().join("bpf");
        std::fs::create_dir(&mount).expect("mount point");
        rustix::mount::mount(
            "bpf",
            &mount,
            "bpf",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .expect("mount bpffs (needs root)");
        let root = PinnedRoot::new(mount.join("reuseport"), dir.path().join("run"));
        Self {
            mount,
            root,
            _dir: dir,
        }
    }
}

impl Drop for TempBpffs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.mount, rustix::mount::UnmountFlags::DETACH);
    }
}

fn fds(listeners: &[(u32, TcpListener)]) -> Vec<(u32, BorrowedFd<'_>)> {
    listeners.iter().map(|(cpu, l)| (*cpu, l.as_fd())).collect()
}

fn inode(listener: &TcpListener) -> u64 {
    rustix::fs::fstat(listener).expect("fstat").st_ino
}

/// Slots for `listeners` as this process serves them.
fn slots(listeners: &[(u32, TcpListener)]) -> Vec<PinnedSlot> {
    listeners
        .iter()
        .map(|(cpu, l)| PinnedSlot {
            cpu: *cpu,
            pid: std::process::id(),
            inode: inode(l),
        })
        .collect()
}

/// The CPUs to build groups on: two where there are two, else one.
fn cpus() -> Vec<u32> {
    allowed_cpus().iter().take(2).collect()
}

fn connect_from(cpu: u32, addr: SocketAddr) -> TcpStream {
    on_cpu(cpu, move || TcpStream::connect(addr).expect("connect"))
}

#[test]
fn persisted_steering_reports_its_slots_and_holes_and_detaches() {
    let bpffs = TempBpffs::new();
    let cpus = cpus();
    let (addr, mut listeners) = unsteered_group(&cpus);
    let port = addr.port();
    let mut steering = Steering::attach(&fds(&listeners)).expect("attach");
    let program_id = steering.program_id().expect("program id");
    let pid = std::process::id();

    let pinned = bpffs
        .root
        .persist(&mut steering, port, &[pid], slots(&listeners))
        .expect("persist");
    drop(steering);
    assert!(pinned.pin_dir().starts_with(&bpffs.mount));
    assert!(pinned.state_path().is_file());
    assert_eq!(bpffs.root.ports(), [port]);
    assert_eq!(pinned.program_id(), program_id);
    assert_eq!(bpffs.root.open(port).expect("open"), pinned);

    // Steered from its pins alone: this process dropped its `Steering`.
    let first = cpus[0];
    let _client = connect_from(first, addr);
    assert_eq!(accept_from(&listeners), first);

    let status = pinned.status().expect("status");
    assert_eq!(status.port, port);
    assert_eq!(status.program_id, program_id);
    assert_eq!(status.pids, [pid]);
    assert_eq!(status.slots.len(), cpus.len());
    assert!(
        status.slots.iter().all(|s| s.state() == SlotState::Live),
        "{status:?}"
    );
    assert!(status.arrivals[first as usize].local >= 1, "{status:?}");
    assert!(status.total.local >= 1);
    assert!(status.active_cpus().any(|(cpu, _)| cpu == first));

    if let [a, b] = cpus[..] {
        // B's listener closes: the kernel empties its slot, and B's connections go to A's.
        listeners.retain(|(cpu, _)| *cpu != b);
        let status = pinned.status().expect("status");
        let slot_b = status.slots.iter().find(|s| s.slot.cpu == b).unwrap();
        assert_eq!(slot_b.state(), SlotState::Empty, "{status:?}");
        assert_eq!(slot_b.fallback, a);
        assert!(!slot_b.held);
        let _client = connect_from(b, addr);
        assert_eq!(accept_from(&listeners), a);
    } else {
        eprintln!("skipped the hole: needs two CPUs");
    }

    let dir = pinned.pin_dir();
    let state_path = pinned.state_path();
    let state = pinned.detach().expect("detach");
    assert_eq!(state.program_id, program_id);
    assert!(!dir.exists());
    assert!(!state_path.exists());
    assert!(matches!(
        bpffs.root.open(port),
        Err(PinnedError::NotPersisted { port: p, .. }) if p == port
    ));
    assert!(bpffs.root.ports().is_empty());
}

#[test]
fn a_second_persist_for_a_port_is_refused_and_leaves_the_first_alone() {
    let bpffs = TempBpffs::new();
    let cpus = cpus();
    let (addr, listeners) = unsteered_group(&cpus);
    let port = addr.port();
    let mut steering = Steering::attach(&fds(&listeners)).expect("attach");
    let first = bpffs
        .root
        .persist(&mut steering, port, &[], slots(&listeners))
        .expect("persist");

    let (_other_addr, other) = unsteered_group(&cpus);
    let mut second = Steering::attach(&fds(&other)).expect("attach");
    let refused = bpffs.root.persist(&mut second, port, &[], slots(&other));
    assert!(
        matches!(refused, Err(PinnedError::AlreadyPersisted { port: p, .. }) if p == port),
        "{refused:?}"
    );
    // The first steering's pins and state are untouched.
    assert_eq!(bpffs.root.open(port).expect("open"), first);
    assert!(first.status().is_ok());
    first.detach().expect("detach");
}

#[test]
fn pins_off_bpffs_are_refused_and_nothing_is_left() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let root = PinnedRoot::new(dir.path().join("pins"), dir.path().join("run"));
    let (addr, listeners) = unsteered_group(&cpus());
    let mut steering = Steering::attach(&fds(&listeners)).expect("attach");
    let refused = root.persist(&mut steering, addr.port(), &[], Vec::new());
    assert!(
        matches!(refused, Err(PinnedError::NotBpffs { .. })),
        "{refused:?}"
    );
    assert!(!root.pin_dir(addr.port()).exists());
    assert!(!root.state_path(addr.port()).exists());
}

#[test]
fn run_steers_held_sockets_live_and_detaches() {
    let cpus = cpus();
    let (addr, listeners) = unsteered_group(&cpus);
    let pairs: Vec<(BorrowedFd<'_>, u32)> =
        listeners.iter().map(|(cpu, l)| (l.as_fd(), *cpu)).collect();
    let request = AttachRequest::new(addr.port(), AttachTarget::Fds(pairs));
    let Attached::Live(live) = attach::run(request).expect("run") else {
        panic!("not persisted: live steering expected");
    };
    assert_eq!(live.port(), addr.port());
    let described: Vec<u32> = live.slots().iter().map(|s| s.cpu).collect();
    assert_eq!(described, cpus);
    assert!(
        live.slots()
            .iter()
            .all(|s| matches!(s.holder, SlotHolder::Fd(_)))
    );
    assert!(live.program_id().expect("program id") > 0);
    for &cpu in &cpus {
        let _client = connect_from(cpu, addr);
        assert_eq!(accept_from(&listeners), cpu);
    }
    let snapshot = live.snapshot().expect("snapshot");
    assert!(snapshot.workers.is_empty());
    let total = snapshot.steering_totals().expect("steering counters");
    assert_eq!(total.local, cpus.len() as u64);
    live.detach().expect("detach");
}

#[test]
fn run_persists_under_a_root_and_refuses_a_second_persist_before_attaching() {
    let bpffs = TempBpffs::new();
    let cpus = cpus();
    let (addr, listeners) = unsteered_group(&cpus);
    let pairs = || -> Vec<(BorrowedFd<'_>, u32)> {
        listeners.iter().map(|(cpu, l)| (l.as_fd(), *cpu)).collect()
    };
    let persisted = |target| AttachRequest {
        persist: Some(bpffs.root.clone()),
        ..AttachRequest::new(addr.port(), target)
    };
    let Attached::Persisted { pinned, slots } =
        attach::run(persisted(AttachTarget::Fds(pairs()))).expect("run")
    else {
        panic!("persisted steering expected");
    };
    assert_eq!(slots.len(), cpus.len());
    // Sockets given by fd have no process to record.
    assert!(pinned.state().slots.is_empty());
    assert_eq!(
        pinned.status().expect("status").program_id,
        pinned.program_id()
    );

    let again = attach::run(persisted(AttachTarget::Fds(pairs())));
    assert!(
        matches!(
            again,
            Err(AttachError::Pinned(PinnedError::AlreadyPersisted { .. }))
        ),
        "{again:?}"
    );
    pinned.detach().expect("detach");
    assert!(bpffs.root.ports().is_empty());
    // Detached although no process was recorded to detach through.
    assert!(on_hash_selection(cpus[0], addr, &listeners));
}

#[test]
fn run_with_hash_detaches_the_program() {
    let cpus = cpus();
    let (addr, listeners) = unsteered_group(&cpus);
    let pairs = || -> Vec<(BorrowedFd<'_>, u32)> {
        listeners.iter().map(|(cpu, l)| (l.as_fd(), *cpu)).collect()
    };
    let Attached::Live(live) =
        attach::run(AttachRequest::new(addr.port(), AttachTarget::Fds(pairs()))).expect("steer")
    else {
        panic!("live steering expected");
    };
    let hash = AttachRequest {
        action: AttachAction::Hash,
        ..AttachRequest::new(addr.port(), AttachTarget::Fds(pairs()))
    };
    let Attached::Hashed { slots } = attach::run(hash).expect("hash") else {
        panic!("hash expected");
    };
    assert_eq!(slots.len(), cpus.len());
    assert!(on_hash_selection(cpus[0], addr, &listeners));
    // Nothing is attached any more: detaching again changes nothing and is no error.
    live.detach().expect("detach again");
}

#[test]
fn live_steering_dropped_without_detach_detaches() {
    let Some((a, b)) = two_cpus() else {
        eprintln!("skipped: needs two CPUs");
        return;
    };
    let (addr, listeners) = unsteered_group(&[a, b]);
    let pairs: Vec<(BorrowedFd<'_>, u32)> =
        listeners.iter().map(|(cpu, l)| (l.as_fd(), *cpu)).collect();
    let Attached::Live(live) =
        attach::run(AttachRequest::new(addr.port(), AttachTarget::Fds(pairs))).expect("steer")
    else {
        panic!("live steering expected");
    };
    assert!(
        !on_hash_selection(a, addr, &listeners),
        "steered while held"
    );
    // As a panic or an early return in the attaching process would.
    drop(live);
    assert!(
        on_hash_selection(a, addr, &listeners),
        "hash again once dropped"
    );
}

#[test]
fn run_refuses_an_empty_target_and_a_threaded_server() {
    let empty = attach::run(AttachRequest::new(80, AttachTarget::Pids(Vec::new())));
    assert!(matches!(empty, Err(AttachError::NoTarget)), "{empty:?}");
    let no_fds = attach::run(AttachRequest::new(80, AttachTarget::Fds(Vec::new())));
    assert!(matches!(no_fds, Err(AttachError::NoTarget)), "{no_fds:?}");

    // This test process holds every listener of its group: a threaded server.
    let Some((a, b)) = two_cpus() else {
        return;
    };
    let (addr, _listeners) = unsteered_group(&[a, b]);
    let threaded = attach::run(AttachRequest::new(
        addr.port(),
        AttachTarget::Pids(vec![std::process::id()]),
    ));
    assert!(
        matches!(threaded, Err(AttachError::Threaded { count: 2, .. })),
        "{threaded:?}"
    );
}

#[test]
fn pin_and_state_directories_another_user_could_have_placed_are_refused() {
    use std::os::unix::fs::{PermissionsExt, chown};
    let bpffs = TempBpffs::new();
    let cpus = cpus();
    let (addr, listeners) = unsteered_group(&cpus);
    let port = addr.port();
    let pins = bpffs
        .root
        .pin_dir(port)
        .parent()
        .expect("parent")
        .to_owned();
    let mode = |mode| std::fs::set_permissions(&pins, std::fs::Permissions::from_mode(mode));
    let refused = |needle: &str| {
        let mut steering = Steering::attach(&fds(&listeners)).expect("attach");
        let refused = bpffs.root.persist(&mut steering, port, &[], Vec::new());
        steering.detach(listeners[0].1.as_fd()).expect("detach");
        match refused {
            Err(err @ PinnedError::Unsafe { .. }) => {
                assert!(err.to_string().contains(needle), "{err}");
            }
            other => panic!("refusal expected, got {other:?}"),
        }
        assert!(!bpffs.root.pin_dir(port).exists());
        assert!(!bpffs.root.state_path(port).exists());
    };
    // Made by another user before root persists.
    std::fs::create_dir(&pins).expect("mkdir");
    chown(&pins, Some(65534), Some(65534)).expect("chown");
    refused("owned by uid 65534");
    let inspected = PortSteering::inspect(port, &bpffs.root);
    assert!(
        matches!(
            inspected,
            Err(PortSteeringError::Pinned(PinnedError::Unsafe { .. }))
        ),
        "{inspected:?}"
    );
    // Root's, but anyone may add or rename entries in it.
    chown(&pins, Some(0), Some(0)).expect("chown");
    mode(0o1777).expect("chmod");
    refused("writable by its group or by everyone");

    // A safe directory: persisted; then someone loosens the port's pin directory.
    mode(0o755).expect("chmod");
    let mut steering = Steering::attach(&fds(&listeners)).expect("attach");
    let pinned = bpffs
        .root
        .persist(&mut steering, port, &[], Vec::new())
        .expect("persist");
    drop(steering);
    let pin_dir = pinned.pin_dir();
    std::fs::set_permissions(&pin_dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let detached = port_steering::detach(port, &bpffs.root);
    assert!(
        matches!(
            detached,
            Err(PortSteeringError::Pinned(PinnedError::Unsafe { .. }))
        ),
        "{detached:?}"
    );
    // Refused before anything changed: still steered, still pinned.
    assert!(!on_hash_selection(cpus[0], addr, &listeners));
    assert!(pin_dir.is_dir());
    std::fs::set_permissions(&pin_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let done = port_steering::detach(port, &bpffs.root).expect("detach");
    assert_eq!(done.pins_removed, Some(pin_dir));
    assert_eq!(done.programs.len(), 1, "{done:?}");
}
