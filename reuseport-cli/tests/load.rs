//! The load generator's connections across a veth pair, on the real kernel: `crr` clients close
//! only after the server has, so the TIME_WAIT entries stay in the server's namespace and the
//! clients' ports stay free. Needs root (namespaces, veth).

mod common;

use std::{
    fs,
    io::{Read, Write},
    thread,
    time::Duration,
};

use common::*;
use reuseport_lab::{
    load::{self, LoadConfig, LoadKind},
    topology::{ClientRx, Topology, TopologyKind},
};

/// TCP sockets in TIME_WAIT in the calling thread's network namespace (`tw` in sockstat).
fn time_wait_sockets() -> u64 {
    let sockstat = fs::read_to_string("/proc/thread-self/net/sockstat").expect("sockstat");
    let tcp = sockstat
        .lines()
        .find(|line| line.starts_with("TCP:"))
        .expect("TCP line");
    let fields: Vec<&str> = tcp.split_whitespace().collect();
    let tw = fields
        .iter()
        .position(|field| *field == "tw")
        .expect("tw field");
    fields[tw + 1].parse().expect("tw count")
}

/// A server that, as HTTP says it must after `Connection: close`, closes each connection after
/// its response, but late: 20 ms after sending it, so a client that closed as soon as it had
/// the response would always close first.
#[test]
fn crr_clients_leave_time_wait_to_the_server_even_when_it_closes_late() {
    const REQUESTS: u64 = 60;
    let cpus = allowed_cpus();
    let topology = Topology::create_with(TopologyKind::VethRps, &cpus, &cpus, ClientRx::default())
        .expect("create");
    let listener = listener_in_server_namespace(&topology);
    let target = listener.local_addr().expect("local address");
    let server = thread::spawn(move || {
        for _ in 0..REQUESTS {
            let (mut stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut request = Vec::new();
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 512];
                let n = stream.read(&mut chunk).expect("read the request");
                assert_ne!(n, 0, "the client closed before its request was complete");
                request.extend_from_slice(&chunk[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .expect("write the response");
            thread::sleep(Duration::from_millis(20));
        }
    });

    let config = LoadConfig {
        target,
        kind: LoadKind::Crr,
        connections: 4,
        duration: Duration::from_secs(30),
        max_requests: REQUESTS,
        rate: None,
        cpus: cpus.clone(),
        pin: false,
        request_timeout: Duration::from_secs(5),
    };
    let report = topology
        .in_client_namespace(|| load::run(&config))
        .expect("client namespace")
        .expect("in the client namespace")
        .expect("load run");
    server.join().expect("server thread");
    assert_eq!(
        (report.requests, report.errors),
        (REQUESTS, 0),
        "requests answered, errors"
    );

    let client_tw = topology
        .in_client_namespace(time_wait_sockets)
        .expect("client namespace")
        .expect("in the client namespace");
    let server_tw = topology
        .in_server_namespace(time_wait_sockets)
        .expect("server namespace")
        .expect("in the server namespace");
    assert_eq!(
        client_tw, 0,
        "client ports left in TIME_WAIT (the server's namespace holds {server_tw})"
    );
    assert_eq!(
        server_tw, REQUESTS,
        "the server, closing first, holds one TIME_WAIT per connection"
    );
}
