//! Rolling restarts under load: `reuseport serve` restarts every worker in turn on SIGHUP while a
//! bounded crr load runs, on loopback and across a veth pair with RPS (and a udp load on
//! loopback: a replaced socket answers what is queued on it before it closes). With the select-or-migrate
//! program (the default) clients see no error; with the select-only program the connections
//! queued on a closing listener are reset, so the same test sees errors. Under keep-alive (rr)
//! load, on IPv4 and IPv6, a retiring worker answers every request it reads with
//! `connection: close` and the clients reconnect without an error. Needs root.

mod common;

use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::*;
use reuseport_lab::topology::{Topology, TopologyKind};

/// What one rolling-restart run saw.
#[derive(Debug)]
struct RestartRun {
    /// Requests the clients completed.
    requests: u64,
    /// Requests that failed (connection refused or reset, no response).
    client_errors: u64,
    /// Workers the server restarted.
    restarts: u64,
    /// Queued requests the kernel migrated to a live listener.
    migrated: u64,
}

/// Serves with `serve_args` in `kind`'s topology, runs crr load (udp load for `--proto udp`) for
/// `load_for`, and sends the server SIGHUP every `every` meanwhile.
fn restart_under_load(
    kind: TopologyKind,
    serve_args: &[&str],
    load_for: Duration,
    every: Duration,
) -> RestartRun {
    let cpus = allowed_cpus();
    let topology = Topology::create(kind, &cpus).expect("topology");
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let report = dir.path().join("load.json");
    let listen = format!("{}:0", topology.server_ip());

    let mut serve = Command::new(BINARY);
    serve
        .args(["serve", "--quiet", "--listen", &listen, "--stats-json"])
        .arg(&stats)
        .args(serve_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    topology.server_side(&mut serve).unwrap();
    let mut server = serve.spawn().expect("spawn serve");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    let target = served_address(&first).to_string();

    let udp = serve_args.windows(2).any(|pair| pair == ["--proto", "udp"]);
    let mut load = Command::new(BINARY);
    load.args(["load", "--target", &target, "--connections", "16"])
        .args(["--kind", if udp { "udp" } else { "crr" }])
        .args(["--duration", &format!("{}ms", load_for.as_millis())])
        .arg("--json")
        .arg(&report)
        .stdout(Stdio::null());
    if topology.pin_clients() {
        load.arg("--pin");
    }
    topology.client_side(&mut load).unwrap();
    let mut load = load.spawn().expect("spawn load");

    let started = Instant::now();
    thread::sleep(every);
    while started.elapsed() + every < load_for {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(server.id() as i32, libc::SIGHUP) };
        thread::sleep(every);
    }
    assert!(load.wait().unwrap().success(), "load failed");
    // SAFETY: as above.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert!(server.wait().unwrap().success(), "serve failed");

    let load: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    RestartRun {
        requests: load["requests"].as_u64().unwrap(),
        client_errors: load["errors"].as_u64().unwrap(),
        restarts: stats["restarts"].as_u64().unwrap(),
        migrated: stats["migrations"]["success"].as_u64().unwrap(),
    }
}

fn assert_no_errors_across_restarts(kind: TopologyKind) -> RestartRun {
    let run = restart_under_load(
        kind,
        &[],
        Duration::from_secs(6),
        Duration::from_millis(200),
    );
    eprintln!("{kind:?} with migration: {run:?}");
    assert!(
        run.restarts >= 20 * allowed_cpus().len() as u64,
        "SIGHUP restarted every worker each time: {run:?}"
    );
    assert!(run.requests > 1000, "the load ran: {run:?}");
    assert_eq!(
        run.client_errors, 0,
        "no client saw an error while workers restarted: {run:?}"
    );
    run
}

#[test]
fn rolling_restarts_on_loopback_lose_no_connection() {
    let run = assert_no_errors_across_restarts(TopologyKind::Loopback);
    assert!(
        run.migrated > 0,
        "queued requests were migrated, not reset: {run:?}"
    );
}

#[test]
fn rolling_restarts_across_veth_lose_no_connection() {
    assert_no_errors_across_restarts(TopologyKind::VethRss);
}

#[test]
fn rolling_restarts_of_a_udp_server_lose_no_datagram() {
    let run = restart_under_load(
        TopologyKind::Loopback,
        &["--proto", "udp"],
        Duration::from_secs(4),
        Duration::from_millis(200),
    );
    eprintln!("udp: {run:?}");
    assert!(run.restarts >= 10 * allowed_cpus().len() as u64, "{run:?}");
    assert!(run.requests > 1000, "the load ran: {run:?}");
    assert_eq!(
        run.client_errors, 0,
        "every datagram answered while workers restarted: {run:?}"
    );
}

#[test]
fn without_migration_rolling_restarts_reset_queued_connections() {
    if kernel_migrates_anyway() {
        return;
    }
    let run = restart_under_load(
        TopologyKind::Loopback,
        &["--bpf-program", "steer-to-cpu"],
        Duration::from_secs(6),
        Duration::from_millis(200),
    );
    eprintln!("loopback without migration: {run:?}");
    assert!(
        run.client_errors > 0,
        "closing listeners reset their queued connections: {run:?}"
    );
}

/// Honest keep-alive clients in this process: each sends requests back to back on one
/// connection, opens a new one when a response says `connection: close`, and counts what it
/// completed and what failed (no response, reset, timeout).
struct KeepAliveWitness {
    completed: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl KeepAliveWitness {
    fn start(addr: std::net::SocketAddr, clients: usize) -> Self {
        let completed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let (completed, errors, stop) = (
                    Arc::clone(&completed),
                    Arc::clone(&errors),
                    Arc::clone(&stop),
                );
                thread::spawn(move || {
                    let mut stream = None;
                    while !stop.load(Ordering::Relaxed) {
                        let outcome = match stream.take() {
                            Some(open) => Ok(open),
                            None => connect_with_timeout(addr),
                        }
                        .and_then(|mut open| {
                            keep_alive_request(&mut open).map(|kept| (open, kept))
                        });
                        match outcome {
                            Ok((open, kept)) => {
                                completed.fetch_add(1, Ordering::Relaxed);
                                if kept {
                                    stream = Some(open);
                                }
                            }
                            Err(err) => {
                                eprintln!("witness: {err}");
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            completed,
            errors,
            stop,
            threads,
        }
    }

    /// Waits (up to 5 s) until the clients complete a request after this call.
    fn progresses(&self) -> bool {
        let before = self.completed.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.completed.load(Ordering::Relaxed) > before {
                return true;
            }
            thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Stops the clients; what they completed and how many failed.
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("witness thread");
        }
        (
            self.completed.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// Serves on `listen`, runs `reuseport load --kind rr` and keep-alive witnesses, and restarts
/// the workers (SIGHUP) 10 times, each once the last one finished and requests completed after
/// it; no client may see an error.
fn keep_alive_clients_survive_restarts(listen: &str) {
    const RESTARTS: u64 = 10;
    let load_for = Duration::from_secs(15);
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let report = dir.path().join("load.json");
    let server = ServeProcess::start(&[
        "--quiet",
        "--listen",
        listen,
        "--stats-json",
        stats.to_str().unwrap(),
    ]);
    let mut load = Command::new(BINARY)
        .args(["load", "--kind", "rr", "--connections", "16"])
        .args(["--target", &server.addr.to_string()])
        .args(["--duration", &format!("{}ms", load_for.as_millis())])
        .arg("--json")
        .arg(&report)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn load");
    let started = Instant::now();
    let witness = KeepAliveWitness::start(server.addr, 4);
    assert!(witness.progresses(), "the witnesses were served");
    for restart in 1..=RESTARTS {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
        let line = server
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the restart line");
        assert!(
            line.contains("SIGHUP: restarted"),
            "restart {restart}: {line}"
        );
        assert!(
            witness.progresses(),
            "requests completed after restart {restart}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        started.elapsed() < load_for,
        "the {RESTARTS} restarts took {:?}, longer than the load",
        started.elapsed()
    );
    let (witnessed, witness_errors) = witness.finish();
    assert!(load.wait().unwrap().success(), "load failed");
    // SAFETY: as above.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let (status, _, stderr) = server.finish();
    assert!(status.success(), "serve failed: {stderr}");

    let load: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    eprintln!(
        "{listen}: load {load}, witnesses {witnessed} requests {witness_errors} errors, restarts {}",
        stats["restarts"]
    );
    assert_eq!(
        stats["restarts"].as_u64().unwrap(),
        RESTARTS * allowed_cpus().len() as u64
    );
    assert!(
        load["requests"].as_u64().unwrap() > 1000,
        "the load ran: {load}"
    );
    assert_eq!(witness_errors, 0, "no witness saw an error");
    assert_eq!(
        load["errors"].as_u64().unwrap(),
        0,
        "no keep-alive client saw an error across {RESTARTS} restarts: {load}"
    );
}

#[test]
fn rolling_restarts_keep_keep_alive_clients_on_ipv4() {
    keep_alive_clients_survive_restarts("127.0.0.1:0");
}

#[test]
fn rolling_restarts_keep_keep_alive_clients_on_ipv6() {
    keep_alive_clients_survive_restarts("[::1]:0");
}
