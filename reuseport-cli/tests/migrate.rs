//! Connections queued on a listener that closes: with the select-or-migrate program they move to
//! the nearest live CPU's listener and are served; without migration the kernel resets them.
//! Needs root (Linux >= 5.14).

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::*;
use reuseport::steering::SteeringProgram;

/// `TCPMigrateReqSuccess` from /proc/net/netstat.
fn migrate_req_success() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "TCPMigrateReqSuccess")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// Two listeners (CPUs `keep` and `closing`) steered by `program`; `count` clients on CPU
/// `closing` connect (queued, never accepted, on `closing`'s listener), then that listener
/// closes. Returns how many clients were then served by `keep`'s listener, and how many were
/// reset.
fn queued_connections_after_their_listener_closes(
    program: SteeringProgram,
    keep: u32,
    closing: u32,
    count: usize,
) -> (usize, usize) {
    let (addr, _steering, mut listeners) = steered_group(&[keep, closing], program);
    let clients: Vec<TcpStream> = on_cpu(closing, move || {
        (0..count)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect()
    });
    // Let every handshake finish, so each connection sits in `closing`'s accept queue.
    std::thread::sleep(Duration::from_millis(100));
    listeners.retain(|(cpu, _)| *cpu != closing);
    let (_, keeper) = &listeners[0];

    let (mut served, mut reset) = (0, 0);
    let mut accepted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while accepted.len() < count && Instant::now() < deadline {
        match keeper.accept() {
            Ok((stream, _)) => accepted.push(stream),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    for mut stream in accepted {
        stream.set_nonblocking(false).unwrap();
        stream.write_all(b"pong").unwrap();
    }
    for mut client in clients {
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut reply = [0u8; 4];
        match client.read_exact(&mut reply) {
            Ok(()) if &reply == b"pong" => served += 1,
            _ => reset += 1,
        }
    }
    (served, reset)
}

#[test]
fn a_closing_listeners_queue_migrates_to_the_nearest_live_cpu() {
    let Some((keep, closing)) = two_cpus() else {
        return;
    };
    let before = migrate_req_success();
    let (served, reset) = queued_connections_after_their_listener_closes(
        SteeringProgram::SteerMigrate,
        keep,
        closing,
        20,
    );
    assert_eq!(
        (served, reset),
        (20, 0),
        "every queued connection served by the live listener"
    );
    assert!(
        migrate_req_success() >= before + 20,
        "the kernel counted the migrations"
    );
}

#[test]
fn without_migration_a_closing_listeners_queue_is_reset() {
    let Some((keep, closing)) = two_cpus() else {
        return;
    };
    if kernel_migrates_anyway() {
        return;
    }
    let (served, reset) = queued_connections_after_their_listener_closes(
        SteeringProgram::SteerToCpu,
        keep,
        closing,
        20,
    );
    assert_eq!(
        (served, reset),
        (0, 20),
        "the select-only program cannot save them"
    );
}
