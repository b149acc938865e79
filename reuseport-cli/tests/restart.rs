//! Rolling restarts under load: `reuseport serve` restarts every worker in turn on SIGHUP while a
//! bounded crr load runs, on loopback and across a veth pair with RPS (and a udp load on
//! loopback: a replaced socket answers what is queued on it before it closes). With the select-or-migrate
//! program (the default) clients see no error; with the select-only program the connections
//! queued on a closing listener are reset, so the same test sees errors. Needs root.

mod common;

use std::{
    process::{Command, Stdio},
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
