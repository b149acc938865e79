//! Steered from the first connection: `serve` loads and verifies the program before any socket
//! can receive, attaches it to the group before the first `listen()`, and fills each CPU's slot
//! the moment that CPU's listener listens. A connection that arrives before its CPU's listener is
//! in place is refused (as if nothing listened yet) and connected again by the client, never
//! handed to another CPU's worker.
//!
//! The test starts `serve` 50 times per eBPF mode and, the moment the port accepts, connects once
//! from a client pinned to each CPU, last CPU first; every connection must be served by its own
//! CPU's worker. `REUSEPORT_STARTUP_BINARY=/path/to/reuseport` runs the same test against another
//! build (e.g. one from before this change) to show what it catches.

mod common;

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{BINARY, allowed_cpus, on_cpu, parse_served, request_on};

/// Starts per mode.
const STARTS: usize = 50;

/// A port that was free a moment ago (bound to port 0, then closed).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Connects from the calling thread until the port accepts (refusals are retried for up to 10 s),
/// then makes one request; returns the worker CPU that served it and how many refusals came first.
fn first_request(addr: SocketAddr) -> (u32, u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = 0;
    let stream = loop {
        match TcpStream::connect(addr) {
            Ok(stream) => break stream,
            Err(err) if err.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                refused += 1;
                thread::yield_now();
            }
            Err(err) => panic!("connect {addr}: {err}"),
        }
    };
    let response = request_on(stream);
    (parse_served(&response).worker_cpu, refused)
}

fn stop(mut child: Child) {
    // SAFETY: plain kill(2) of our own child, which has not been waited for yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().expect("wait for serve");
    assert!(status.success(), "serve exited with {status}");
}

fn every_first_connection_is_local(mode: &str) {
    let binary = std::env::var("REUSEPORT_STARTUP_BINARY").unwrap_or_else(|_| BINARY.to_owned());
    let cpus: Vec<u32> = allowed_cpus().iter().collect();
    let mut misplaced = Vec::new();
    let mut refusals = 0;
    for start in 0..STARTS {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let child = Command::new(&binary)
            .args(["serve", "--mode", mode, "--quiet", "--duration", "30s"])
            .args(["--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn reuseport serve");
        for &cpu in cpus.iter().rev() {
            let (worker, refused) = on_cpu(cpu, move || first_request(addr));
            refusals += refused;
            if worker != cpu {
                misplaced.push(format!(
                    "start {start}: client on CPU {cpu} served by {worker}"
                ));
            }
        }
        stop(child);
    }
    println!(
        "{mode}: {STARTS} starts x {} CPUs, {} first connections served by another CPU's worker \
         ({refusals} refusals retried while starting)",
        cpus.len(),
        misplaced.len()
    );
    assert!(misplaced.is_empty(), "{mode}: {misplaced:#?}");
}

#[test]
fn percpu_steers_the_first_connection_of_every_cpu() {
    every_first_connection_is_local("percpu");
}

#[test]
fn percpu_spill_steers_the_first_connection_of_every_cpu() {
    every_first_connection_is_local("percpu-spill");
}
