//! Lock contention by lock, against the real kernel: contention forced on a known kernel lock from
//! a known process shows under its function, its side and its kind. Needs root.
//!
//! (The symbolizer against `/proc/kallsyms` and the listener rule against stacks of known frames
//! are tested in `reuseport-lab`: `cargo test -p reuseport-lab kallsyms locks`.)

mod common;

use std::{
    io::Write as _,
    net::UdpSocket,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use reuseport_lab::{
    locks::{LockSite, Side},
    probes::Probes,
};

/// Whether `sites` has waits at the pipe function `site` (`anon_pipe_write` since Linux 6.16,
/// `pipe_write` before) by `side` on a lock of `kind`.
fn has(sites: &[LockSite], site: &str, side: Side, kind: &str) -> bool {
    sites.iter().any(|s| {
        (s.site == site || s.site == format!("anon_{site}"))
            && s.side == side
            && s.kind == kind
            && s.count > 0
            && s.wait_ns > 0
    })
}

/// Threads of this process (registered as the server) write 64 KiB buffers into one pipe that a
/// `cat` (registered as the load generator) drains: the writers wait for the pipe's mutex in
/// `pipe_write`, and `cat` waits for it in `pipe_read`.
#[test]
fn pipe_mutex_waits_show_under_pipe_write_and_pipe_read_by_side() {
    let Some((a, b)) = two_cpus() else { return };
    let mut probes = Probes::attach(1).expect("attach probes");
    let mut cat = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn cat");
    probes
        .watch_process(std::process::id(), Side::Server)
        .expect("watch this process");
    probes
        .watch_process(cat.id(), Side::Client)
        .expect("watch cat");
    // Softirq is told from the stack, never registered.
    assert!(probes.watch_process(cat.id(), Side::Softirq).is_err());
    let stdin = cat.stdin.take().expect("cat's stdin");
    let fd = std::os::fd::OwnedFd::from(stdin);
    let writers = Repeaters::start([a, b, a, b].map(Some), || {
        let mut file = std::fs::File::from(fd.try_clone().expect("dup pipe"));
        let buffer = vec![7u8; 64 << 10];
        move || file.write_all(&buffer).expect("write into the pipe")
    });
    drop(fd);
    let sites = wait_for_sites(&probes, |sites| {
        has(sites, "pipe_write", Side::Server, "mutex")
            && has(sites, "pipe_read", Side::Client, "mutex")
    });
    writers.stop();
    let _ = cat.wait();
    assert!(
        has(&sites, "pipe_write", Side::Server, "mutex"),
        "no pipe_write mutex waits by the server: {sites:#?}"
    );
    assert!(
        has(&sites, "pipe_read", Side::Client, "mutex"),
        "no pipe_read mutex waits by the client: {sites:#?}"
    );
    // Neither is the listener's.
    assert!(
        sites
            .iter()
            .filter(|s| s.site.contains("pipe_"))
            .all(|s| !s.listener)
    );
}

/// Two threads of this process (registered as the load generator) mapping and unmapping memory
/// on two CPUs wait for its mmap lock, a read-write semaphore, in the mmap and munmap paths.
#[test]
fn mmap_lock_waits_show_as_rwsem_waits_of_the_client() {
    let Some((a, b)) = two_cpus() else { return };
    let probes = probes_watching_this_process(Side::Client);
    let workers = Repeaters::start([a, b].map(Some), || map_touch_unmap);
    let rwsem_of_client = |sites: &[LockSite]| {
        sites.iter().any(|s| {
            s.side == Side::Client && s.kind.starts_with("rwsem-") && s.count > 0 && !s.listener
        })
    };
    let sites = wait_for_sites(&probes, rwsem_of_client);
    workers.stop();
    assert!(
        rwsem_of_client(&sites),
        "no rwsem waits by the client: {sites:#?}"
    );
    // No site is a lock primitive: the symbolizer skipped them.
    assert!(
        sites
            .iter()
            .all(|s| !reuseport_lab::locks::is_lock_primitive(&s.site)),
        "{sites:#?}"
    );
}

/// Two threads of this process on two CPUs flood one UDP socket over loopback while a third
/// drains it: each datagram is delivered in the sender's softirq, which takes the receiving
/// socket's queue lock against the other sender's softirq and the reader. Those waits are softirq
/// waits, and their stacks end at the softirq handler loop: what it interrupted (here, the
/// sender's own `sendto`) is cut, so that such stacks do not fill the maps.
#[test]
fn softirq_wait_stacks_end_at_the_softirq_entry() {
    let Some((a, b)) = two_cpus() else { return };
    let probes = Probes::attach(1).expect("attach probes");
    let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind");
    receiver
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let target = receiver.local_addr().expect("local address");
    let senders = Repeaters::start([a, b].map(Some), || {
        let sender = UdpSocket::bind("127.0.0.1:0").expect("bind");
        // A full receive queue drops datagrams; the send still succeeds.
        move || {
            let _ = sender.send_to(&[7u8; 64], target);
        }
    });
    let mut receiver = Some(receiver);
    let reader = Repeaters::start([None], || {
        let receiver = receiver.take().expect("one reader");
        let mut buffer = [0u8; 64];
        move || {
            let _ = receiver.recv(&mut buffer);
        }
    });
    let softirq_entry = |frame: &String| frame == "handle_softirqs" || frame == "__do_softirq";
    let stacks = poll_until(
        || probes.lock_stacks().expect("lock stacks"),
        |stacks| {
            stacks
                .values()
                .any(|frames| frames.iter().any(softirq_entry))
        },
    );
    senders.stop();
    reader.stop();
    let softirq_stacks: Vec<&Vec<String>> = stacks
        .values()
        .filter(|frames| frames.iter().any(softirq_entry))
        .collect();
    assert!(
        !softirq_stacks.is_empty(),
        "no contended wait in softirq recorded in 20 s: {stacks:#?}"
    );
    for frames in softirq_stacks {
        assert!(
            frames.last().is_some_and(softirq_entry),
            "a softirq stack goes on below the softirq entry: {frames:#?}"
        );
    }
}
