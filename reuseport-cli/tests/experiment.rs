//! The A/B harness's pieces, tested for behaviour (never speed): each probe counts a known event
//! it is shown, and `reuseport ab --quick` produces valid results with percpu locality >= 99 % in
//! every topology, which `reuseport ab report` redraws; the server/client CPU split is checked
//! and reported; stopped by SIGINT after a run, `ab` reports that run and exits with 130. Needs
//! root. The topologies themselves are tested in topology.rs.

mod common;

use std::{
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::*;
use reuseport::{Server, ServerConfig, SteeringMode, cpus::pin_current_thread};
use reuseport_lab::probes::Probes;

const BINARY: &str = env!("CARGO_BIN_EXE_reuseport");

#[test]
fn lock_probe_counts_forced_contention() {
    let Some((a, b)) = two_cpus() else { return };
    let probes = Probes::attach(1).expect("attach probes");
    let before = probes.totals().expect("totals");
    // Two threads of one process mapping and unmapping memory on two CPUs contend on its
    // mmap lock (thousands of times in half a second here; idle, a handful).
    let workers = Repeaters::start([a, b].map(Some), || map_touch_unmap);
    thread::sleep(Duration::from_millis(500));
    workers.stop();
    let after = probes.totals().expect("totals");
    let contended = after.sum.lock_contended - before.sum.lock_contended;
    assert!(contended >= 10, "only {contended} contended waits seen");
    assert!(after.sum.lock_wait_ns > before.sum.lock_wait_ns);
}

/// A thread pinned to `sleeper_cpu` woken `n` times by this thread pinned to `waker_cpu`;
/// returns the probes' (server wakeups, server cross-CPU wakeups) for the sleeper.
fn wakeups_of_watched_thread(waker_cpu: u32, sleeper_cpu: u32, n: u64) -> (u64, u64) {
    let mut probes = Probes::attach(1).expect("attach probes");
    let (tid_tx, tid_rx) = mpsc::channel();
    let (wake_tx, wake_rx) = mpsc::channel::<()>();
    let sleeper = thread::spawn(move || {
        pin_current_thread(sleeper_cpu).expect("pin");
        tid_tx
            .send(rustix::thread::gettid().as_raw_nonzero().get() as u32)
            .expect("tid");
        while wake_rx.recv().is_ok() {}
    });
    let tid = tid_rx.recv().expect("tid");
    probes.watch_threads([tid]).expect("watch");
    let waker = thread::spawn(move || {
        pin_current_thread(waker_cpu).expect("pin");
        for _ in 0..n {
            // Each send must find the sleeper blocked, or it wakes nobody: wait until it sleeps
            // again (a loaded machine can keep it running for longer than any fixed pause).
            wait_for_state(&format!("/proc/self/task/{tid}/stat"), 'S');
            wake_tx.send(()).expect("wake");
        }
    });
    waker.join().expect("waker");
    sleeper.join().expect("sleeper");
    let totals = probes.totals().expect("totals");
    (
        totals.sum.server_wakeups,
        totals.sum.server_cross_cpu_wakeups,
    )
}

#[test]
fn wakeup_probe_counts_cross_cpu_wakeups_of_watched_threads_only() {
    let Some((a, b)) = two_cpus() else { return };
    let (wakeups, cross) = wakeups_of_watched_thread(a, b, 50);
    assert!(wakeups >= 50, "{wakeups} wakeups of the watched thread");
    assert!(cross >= 50, "{cross} of them from another CPU");
    let (wakeups, cross) = wakeups_of_watched_thread(b, b, 50);
    assert!(wakeups >= 50, "{wakeups} wakeups of the watched thread");
    assert_eq!(cross, 0, "woken from its own CPU");
}

/// Runs a real server in `mode` with the probes following its connections; pinned clients make
/// `per_cpu` connections from each CPU.
fn followed_connections(mode: SteeringMode, per_cpu: usize) -> reuseport_lab::probes::ProbeTotals {
    let server =
        Server::start(ServerConfig::new("127.0.0.1:0".parse().unwrap(), mode)).expect("start");
    let probes = Probes::attach(server.local_addr().port()).expect("attach probes");
    for cpu in server.cpus().iter() {
        http_gets_from(cpu, server.local_addr(), per_cpu);
    }
    let totals = probes.totals().expect("totals");
    server.stop().expect("stop");
    totals
}

#[test]
fn connection_probe_sees_one_cpu_per_connection_with_percpu_steering() {
    let cpus = allowed_cpus().len() as u64;
    let totals = followed_connections(SteeringMode::Percpu, 100);
    assert!(totals.conns_closed() >= 95 * cpus, "{totals:?}");
    assert!(
        totals.cross_cpu_conn_fraction().unwrap() <= 0.01,
        "{totals:?}"
    );
    assert_eq!(
        totals.sum.conns_read_local, totals.sum.conns_read,
        "{totals:?}"
    );
    // Every CPU's pinned client had its SYNs processed on that CPU.
    for cpu in allowed_cpus().iter() {
        assert!(totals.syn_cpus[cpu as usize] >= 95, "{totals:?}");
    }
}

#[test]
fn connection_probe_sees_connections_cross_cpus_with_hash_selection() {
    if two_cpus().is_none() {
        return;
    }
    let totals = followed_connections(SteeringMode::Hash, 100);
    let fraction = totals.cross_cpu_conn_fraction().unwrap();
    // About (N-1)/N of the connections land on another CPU's worker.
    assert!(fraction > 0.2, "cross-CPU fraction {fraction}: {totals:?}");
    assert!(totals.cpus_per_conn().unwrap() > 1.2, "{totals:?}");
}

fn quick_ab(topology: &str) -> serde_json::Value {
    quick_ab_then(topology, |_| ())
}

/// Runs `ab --quick` into a fresh directory, calls `then` with it, and returns its results.json.
fn quick_ab_then(topology: &str, then: impl FnOnce(&std::path::Path)) -> serde_json::Value {
    quick_ab_with(&["--topology", topology], then).0
}

/// Runs `ab --quick` with `args` into a fresh directory, calls `then` with it, and returns its
/// results.json, stdout and pid.
fn quick_ab_with(
    args: &[&str],
    then: impl FnOnce(&std::path::Path),
) -> (serde_json::Value, String, u32) {
    let out = std::env::temp_dir().join(format!(
        "reuseport-ab-{}-{}",
        args.join("").replace(['-', ','], ""),
        std::process::id()
    ));
    let child = Command::new(BINARY)
        .args(["ab", "--quick"])
        .args(args)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run reuseport ab");
    let pid = child.id();
    let output = child.wait_with_output().expect("wait for reuseport ab");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    assert!(out.join("results.svg").is_file());
    then(&out);
    let _ = std::fs::remove_dir_all(&out);
    (
        serde_json::from_str(&json).expect("valid JSON"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        pid,
    )
}

/// Asserts that `ab` (process `pid`) left no NAPI thread of its veth behind.
fn assert_no_napi_threads_left(pid: u32) {
    let dev = format!("rps{pid}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reuseport_lab::topology::napi_threads_of(&dev).is_empty() {
        assert!(Instant::now() < deadline, "NAPI threads of {dev} remain");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that SYNs were spread over the CPUs: no CPU took (nearly) all of them.
fn assert_syns_spread(results: &serde_json::Value) {
    if allowed_cpus().len() > 1 {
        let share = results["summary"]["hash"]["syn_cpu_max_share"]["max"]
            .as_f64()
            .unwrap();
        assert!(share < 0.9, "SYNs not spread over CPUs: {share}");
    }
}

fn assert_results(results: &serde_json::Value, topology: &str) {
    assert_eq!(results["machine"]["topology"], topology);
    assert_eq!(
        results["runs"].as_array().map(Vec::len),
        Some(4),
        "2 modes x 2 reps"
    );
    for mode in ["hash", "percpu"] {
        for metric in [
            "conn_per_s",
            "req_per_s",
            "p50_us",
            "p99_us",
            "p999_us",
            "locality",
            "cross_cpu_wakeups_per_conn",
            "lock_contended_per_conn",
            "lock_wait_ns_per_conn",
            "listener_lock_contended_per_conn",
            "listener_lock_wait_ns_per_conn",
            "ipis_per_conn",
            "retrans_per_conn",
            "loss_probes_per_conn",
            "listen_drops_per_conn",
            "backlog_drops_per_conn",
            "server_cpu_busy",
            "client_cpu_busy",
            "cpu_us_per_conn",
            "cpus_per_conn",
            "cross_cpu_conn_fraction",
        ] {
            let range = &results["summary"][mode][metric];
            assert!(range["median"].is_number(), "{mode}.{metric}: {range}");
            assert!(
                range["min"].as_f64() <= range["max"].as_f64(),
                "{mode}.{metric}"
            );
        }
        // A closed loop at full speed keeps the CPUs it runs on busy, and each connection costs
        // CPU time.
        for side in ["server_cpu_busy", "client_cpu_busy"] {
            let busy = results["summary"][mode][side]["median"].as_f64().unwrap();
            assert!(busy > 0.3 && busy <= 1.0, "{mode}.{side}: {busy}");
        }
        let cpu_us = results["summary"][mode]["cpu_us_per_conn"]["median"]
            .as_f64()
            .unwrap();
        assert!(cpu_us > 1.0, "{mode}.cpu_us_per_conn: {cpu_us}");
        let cache = &results["summary"][mode]["cache_misses_per_conn"];
        assert!(
            cache == "unsupported" || cache["median"].is_number(),
            "{cache}"
        );
    }
    let percpu = &results["summary"]["percpu"];
    assert!(
        percpu["locality"]["min"].as_f64().unwrap() >= 0.99,
        "{percpu}"
    );
    assert!(percpu["bpf_ns_per_select"]["median"].as_f64().unwrap() > 0.0);
    assert!(results["summary"]["hash"]["bpf_ns_per_select"].is_null());
    assert!(results["ratios"]["conn_per_s"]["ratio"].is_number());
}

#[test]
fn quick_ab_on_veth_rss_writes_valid_results() {
    let (results, stdout, pid) = quick_ab_with(&["--topology", "veth-rss"], |_| ());
    assert_results(&results, "veth-rss");
    assert_syns_spread(&results);
    for mode in ["hash", "percpu"] {
        let conn = results["summary"][mode]["conn_per_s"]["min"].as_f64();
        assert!(conn > Some(0.0), "{mode}: {conn:?}");
    }
    // Fewer than 8 CPUs: server and clients share them, the report says so, and both ends
    // process in softirq by default; split, in NAPI threads.
    let rx = if allowed_cpus().len() < 8 {
        let all = allowed_cpus().to_string();
        assert_eq!(results["machine"]["server_cpus"], all.as_str());
        assert_eq!(results["machine"]["client_cpus"], all.as_str());
        assert!(
            stdout.contains(&format!("(server and clients share {all})")),
            "{stdout}"
        );
        "softirq"
    } else {
        "napi-thread"
    };
    assert_eq!(results["machine"]["server_rx"], rx);
    assert_eq!(results["machine"]["client_rx"], rx);
    assert!(
        stdout.contains(&format!("(server rx {rx}, client rx {rx})")),
        "{stdout}"
    );
    assert_no_napi_threads_left(pid);
}

#[test]
fn quick_ab_on_veth_rss_with_napi_threads_records_them() {
    let (results, stdout, pid) = quick_ab_with(
        &[
            "--topology",
            "veth-rss",
            "--server-rx",
            "napi-thread",
            "--client-rx",
            "softirq",
            "--modes",
            "hash",
        ],
        |_| (),
    );
    assert_eq!(results["machine"]["topology"], "veth-rss");
    assert_eq!(results["machine"]["server_rx"], "napi-thread");
    assert_eq!(results["machine"]["client_rx"], "softirq");
    assert!(
        stdout.contains("topology veth-rss (server rx napi-thread, client rx softirq)"),
        "{stdout}"
    );
    let conn = results["summary"]["hash"]["conn_per_s"]["min"].as_f64();
    assert!(conn > Some(0.0), "{conn:?}");
    assert_syns_spread(&results);
    assert_no_napi_threads_left(pid);
}

#[test]
fn ab_refuses_rx_choices_off_veth_rss_in_one_line_with_exit_code_2() {
    for flag in ["--server-rx", "--client-rx"] {
        for topology in ["loopback", "veth-rps"] {
            let output = Command::new(BINARY)
                .args(["ab", flag, "softirq", "--topology", topology])
                .arg("--out")
                .arg(std::env::temp_dir().join("reuseport-ab-refused-rx"))
                .output()
                .expect("run");
            assert_one_line_error(
                &output,
                2,
                &format!("{flag} applies to --topology veth-rss only"),
            );
        }
    }
}

#[test]
fn ab_refuses_softirq_server_rx_with_clients_apart_in_one_line_with_exit_code_2() {
    let Some((a, b)) = two_cpus() else { return };
    let output = Command::new(BINARY)
        .args(["ab", "--topology", "veth-rss", "--server-rx", "softirq"])
        .args([
            "--server-cpus",
            &a.to_string(),
            "--client-cpus",
            &b.to_string(),
        ])
        .arg("--out")
        .arg(std::env::temp_dir().join("reuseport-ab-refused-server-rx"))
        .output()
        .expect("run");
    assert_one_line_error(
        &output,
        2,
        "--server-rx softirq processes each packet on the CPU of the client that sent it",
    );
}

#[test]
fn quick_ab_on_veth_rps_under_its_old_name_writes_valid_results() {
    let results = quick_ab("veth");
    assert_results(&results, "veth-rps");
    assert_syns_spread(&results);
}

#[test]
fn ab_with_server_and_client_cpus_apart_reports_the_split_and_receives_on_the_server_cpu() {
    let Some((server, client)) = two_cpus() else {
        return;
    };
    let (server, client) = (server.to_string(), client.to_string());
    let (results, stdout, _) = quick_ab_with(
        &[
            "--topology",
            "veth-rss",
            "--server-cpus",
            &server,
            "--client-cpus",
            &client,
        ],
        |_| (),
    );
    assert_eq!(results["machine"]["server_cpus"], server.as_str());
    assert_eq!(results["machine"]["client_cpus"], client.as_str());
    assert!(
        stdout.contains(&format!("(server {server}, clients {client})")),
        "{stdout}"
    );
    // One server CPU, one receive queue pinned there: it processed every SYN, and percpu's
    // worker there accepted every connection.
    for mode in ["hash", "percpu"] {
        let share = results["summary"][mode]["syn_cpu_max_share"]["min"].as_f64();
        assert!(share > Some(0.99), "{mode}: {share:?}");
        assert!(results["summary"][mode]["conn_per_s"]["min"].as_f64() > Some(0.0));
    }
    assert!(results["summary"]["percpu"]["locality"]["min"].as_f64() >= Some(0.99));
}

#[test]
fn ab_refuses_bad_cpu_splits_in_one_line_with_exit_code_2() {
    let beyond = (allowed_cpus().iter().last().unwrap_or(0) + 1).to_string();
    let first = allowed_cpus().iter().next().unwrap_or(0).to_string();
    let all = allowed_cpus().to_string();
    for (args, expected) in [
        (
            vec!["--server-cpus", &beyond],
            "is not one this process may use",
        ),
        (vec!["--client-cpus", &all], "leaves no CPU for the servers"),
        (vec!["--server-cpus", "nonsense"], "--server-cpus"),
    ] {
        let output = Command::new(BINARY)
            .arg("ab")
            .args(&args)
            .arg("--out")
            .arg(std::env::temp_dir().join("reuseport-ab-refused-split"))
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    if allowed_cpus().len() > 1 {
        let output = Command::new(BINARY)
            .args(["ab", "--server-cpus", &all, "--client-cpus", &first])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("overlap"), "{stderr}");
    }
}

#[test]
fn quick_ab_on_loopback_writes_valid_results_that_ab_report_redraws() {
    let results = quick_ab_then("loopback", |dir| {
        std::fs::remove_file(dir.join("results.svg")).expect("remove results.svg");
        let output = Command::new(BINARY)
            .args(["ab", "report"])
            .arg(dir)
            .output()
            .expect("run reuseport ab report");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("percpu/hash"), "{stdout}");
        assert!(stdout.contains("percpu 2 reps, hash 2 reps"), "{stdout}");
        // The lock table, redrawn after the main one.
        assert!(stdout.contains("lock waits by site"), "{stdout}");
        assert!(
            stdout.contains("largest changes, percpu vs hash"),
            "{stdout}"
        );
        let conn = stdout
            .lines()
            .find(|line| line.starts_with("conn_per_s"))
            .unwrap_or_default();
        // The ratio and its interval: `1.01 [0.99-1.03]`, with `~` unless established.
        assert!(
            conn.contains(" [") && conn.matches('[').count() == 3,
            "{stdout}"
        );
        assert!(dir.join("results.svg").is_file());
    });
    assert_results(&results, "loopback");
    // Every run carries its lock sites, named past the lock primitives and sided.
    for run in results["runs"].as_array().expect("runs") {
        let sites = run["probes"]["locks"].as_array().expect("lock sites");
        assert!(!sites.is_empty(), "no contended lock site in {run}");
        for site in sites {
            let name = site["site"].as_str().expect("site");
            assert!(!reuseport_lab::locks::is_lock_primitive(name), "{site}");
            assert!(
                ["server", "client", "softirq", "other"].contains(&site["side"].as_str().unwrap()),
                "{site}"
            );
        }
    }
    for row in ["hash", "percpu"] {
        assert!(
            !results["locks"]["top"][row]
                .as_array()
                .expect("top")
                .is_empty(),
            "{row}"
        );
    }
    // On loopback every receive runs in a softirq on the sender's stack: some waits are there.
    assert!(
        results["runs"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|run| run["probes"]["locks"].as_array().unwrap())
            .any(|site| site["side"] == "softirq"),
        "no softirq lock site"
    );
    // Under hash, SYNs and accepts of one listener meet on two CPUs: its locks are contended.
    assert!(
        results["summary"]["hash"]["listener_lock_contended_per_conn"]["max"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{}",
        results["summary"]["hash"]
    );
    let ratio = &results["ratios"]["conn_per_s"];
    assert!(
        ratio["ci_low"].as_f64() <= ratio["ratio"].as_f64()
            && ratio["ratio"].as_f64() <= ratio["ci_high"].as_f64(),
        "{ratio}"
    );
    assert!(ratio["established"].is_boolean() && ratio["ranges_overlap"].is_boolean());
    assert_eq!(ratio["reps"]["percpu"], 2);
    assert_eq!(ratio["reps"]["hash"], 2);
}

#[test]
fn ab_report_refuses_a_missing_or_malformed_results_json_in_one_line() {
    let dir = std::env::temp_dir().join(format!("reuseport-ab-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    for contents in [None, Some("{\"machine\": "), Some("{\"rows\": []}")] {
        let _ = std::fs::remove_file(dir.join("results.json"));
        if let Some(contents) = contents {
            std::fs::write(dir.join("results.json"), contents).expect("write");
        }
        let output = Command::new(BINARY)
            .args(["ab", "report"])
            .arg(&dir)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{contents:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("results.json"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ab_stopped_by_sigint_reports_the_finished_runs_and_exits_130() {
    let out = std::env::temp_dir().join(format!("reuseport-ab-sigint-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let child = Command::new(BINARY)
        .args(["ab", "--quick", "--topology", "loopback", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run reuseport ab");
    // The second measured run starting means the first (hash, rep 1) finished.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !out.join("runs").join("percpu-1").is_dir() {
        assert!(Instant::now() < deadline, "the second run never started");
        thread::sleep(Duration::from_millis(50));
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
    let output = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stdout}{stderr}");
    assert!(
        stdout.contains("interrupted: 1 of 4 measured runs finished"),
        "{stdout}"
    );
    assert!(stdout.contains("conn_per_s"), "{stdout}");
    let json = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    let results: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(results["runs"].as_array().map(Vec::len), Some(1), "{json}");
    assert!(out.join("results.svg").is_file());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn ab_refuses_nonsense_in_one_line() {
    let output = Command::new(BINARY)
        .args(["ab", "--reps", "0", "--out"])
        .arg(std::env::temp_dir().join("reuseport-ab-refused"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("reps must be at least 1"), "{stderr}");
}

/// The peer rows: Debian's nginx on hash selection, then the same nginx steered by `reuseport
/// attach`, measured once the kernel says every listener of its port is in a slot: its
/// connections are then all served on the CPU that received them.
#[test]
fn ab_with_the_nginx_attach_peer_measures_nginx_plain_and_steered() {
    let (results, stdout, _) = quick_ab_with(
        &[
            "--topology",
            "loopback",
            "--modes",
            "hash",
            "--peer",
            "nginx-attach",
        ],
        |_| (),
    );
    let rows: Vec<&str> = results["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter_map(|run| run["row"].as_str())
        .collect();
    for row in ["hash", "nginx", "nginx+attach"] {
        assert_eq!(
            rows.iter().filter(|&&r| r == row).count(),
            2,
            "{row}: {rows:?}\n{stdout}"
        );
    }
    let steered = &results["summary"]["nginx+attach"];
    assert!(
        steered["locality"]["min"].as_f64().expect("locality") >= 0.99,
        "{steered}"
    );
    assert_eq!(steered["errors"]["max"].as_f64(), Some(0.0), "{steered}");
    if allowed_cpus().len() > 1 {
        let plain = &results["summary"]["nginx"];
        assert!(
            plain["locality"]["median"].as_f64().expect("locality") < 0.9,
            "nginx on hash selection: {plain}"
        );
    }
}

/// The loss counters read the namespaces' own TCP counters: a listener in the server's
/// namespace whose accept queue is full drops further SYNs from the clients' namespace, and
/// `Losses` sees those drops.
#[test]
fn losses_count_the_syns_a_full_listen_queue_drops_in_the_servers_namespace() {
    use reuseport_lab::{
        losses::Losses,
        topology::{Topology, TopologyKind},
    };
    let topology = Topology::create(TopologyKind::VethRps, &allowed_cpus()).expect("veth-rps");
    let server_ip = topology.server_ip();
    // Backlog 0: the accept queue holds one connection; nothing accepts.
    let listener = topology
        .in_server_namespace(move || {
            let socket = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .expect("socket");
            socket
                .bind(&std::net::SocketAddr::new(server_ip, 0).into())
                .expect("bind");
            socket.listen(0).expect("listen");
            socket
        })
        .expect("veth")
        .expect("the server's namespace");
    let addr = listener
        .local_addr()
        .expect("address")
        .as_socket()
        .expect("inet");
    let before = Losses::read(&topology).expect("counters");
    let _clients: Vec<_> = topology
        .in_client_namespace(move || {
            (0..6)
                .filter_map(|_| {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()
                })
                .collect::<Vec<_>>()
        })
        .expect("veth")
        .expect("the clients' namespace");
    let lost = Losses::read(&topology).expect("counters").since(before);
    assert!(lost.listen_drops >= 1, "{lost:?}");
    drop(listener);
}
