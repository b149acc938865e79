//! `percpu-spill` with the real program and real listeners: a CPU whose listener stops accepting
//! keeps its connections until its accept queue reaches the threshold, then spills the rest to
//! the other CPU's listener; once the queue drains, it is local again. Needs root.

mod common;

use std::{
    net::TcpStream,
    os::fd::AsFd,
    thread,
    time::{Duration, Instant},
};

use common::*;
use reuseport::{
    cpu_topology::CpuTopology,
    spill::{SpillConfig, SpillSampler, accept_queue_depth},
    steering::SteeringProgram,
};

const THRESHOLD: u32 = 4;

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn an_overloaded_cpu_spills_to_the_idle_listener_and_returns_when_drained() {
    let Some((busy, idle)) = two_cpus() else {
        return;
    };
    let (addr, mut steering, listeners) =
        steered_group(&[busy, idle], SteeringProgram::recommended());
    let fds = listeners
        .iter()
        .map(|(cpu, l)| (*cpu, l.as_fd().try_clone_to_owned().unwrap()))
        .collect();
    let sampler = SpillSampler::start(
        steering.take_spill_map().unwrap(),
        steering.stats_map_handle().unwrap(),
        fds,
        CpuTopology::default(),
        SpillConfig {
            threshold: THRESHOLD,
            period: Duration::from_millis(1),
        },
    )
    .expect("sampler");
    let (busy_listener, idle_listener) = (&listeners[0].1, &listeners[1].1);
    // The idle CPU's worker keeps up: it accepts everything that reaches it.
    let mut idle_accepted = 0;
    let mut drain_idle = || {
        while idle_listener.accept().is_ok() {
            idle_accepted += 1;
        }
        idle_accepted
    };

    // Nobody accepts on `busy`: its first THRESHOLD connections queue there, then it spills.
    let mut clients = Vec::new();
    for n in 0..3 * THRESHOLD {
        clients.push(on_cpu(busy, move || {
            TcpStream::connect(addr).expect("connect")
        }));
        if n < THRESHOLD {
            wait_until("the connection in busy's queue", || {
                accept_queue_depth(busy_listener).unwrap() == n + 1
            });
        } else {
            wait_until("the connection spilled to idle", || {
                drain_idle() == n + 1 - THRESHOLD
            });
        }
        // Let the sampler see the queue before the next connection.
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(accept_queue_depth(busy_listener).unwrap(), THRESHOLD);
    let bpf =
        steering
            .stats()
            .unwrap()
            .iter()
            .fold(reuseport::SteeringStats::default(), |mut sum, s| {
                sum.add(s);
                sum
            });
    assert_eq!(bpf.local, u64::from(THRESHOLD), "{bpf:?}");
    assert_eq!(bpf.spilled, u64::from(2 * THRESHOLD), "{bpf:?}");

    // The busy worker catches up: its queue drains, the sampler ends the spill, and new
    // connections are local again.
    while busy_listener.accept().is_ok() {}
    thread::sleep(Duration::from_millis(50));
    for n in 0..3 {
        clients.push(on_cpu(busy, move || {
            TcpStream::connect(addr).expect("connect")
        }));
        wait_until("a local connection", || {
            accept_queue_depth(busy_listener).unwrap() == n + 1
        });
    }
    assert_eq!(drain_idle(), 2 * THRESHOLD, "nothing more spilled");
    assert_eq!(sampler.counters().spill_starts, 1);
}

#[test]
fn serve_accepts_percpu_spill_and_reports_its_sampler() {
    let server = ServeProcess::start(&[
        "--mode",
        "percpu-spill",
        "--listen",
        "127.0.0.1:0",
        "--duration",
        "2s",
        "--quiet",
    ]);
    assert!(
        server.first_line.contains("mode percpu-spill"),
        "{}",
        server.first_line
    );
    for _ in 0..20 {
        http_get(server.addr);
    }
    let (status, lines, stderr) = server.finish();
    assert!(status.success(), "{stderr}");
    let spill = lines
        .iter()
        .find(|line| line.trim_start().starts_with("spill:"))
        .unwrap_or_else(|| panic!("no spill line in {lines:?}"));
    assert!(spill.contains("spill starts"), "{spill}");
    let bpf = lines
        .iter()
        .find(|line| line.trim_start().starts_with("bpf:"))
        .unwrap();
    assert!(
        bpf.contains("spilled 0"),
        "balanced load does not spill: {bpf}"
    );
}
