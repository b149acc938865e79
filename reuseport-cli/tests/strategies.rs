//! Every steering strategy against the real kernel: each keeps TCP connections and UDP datagrams
//! on the sender's CPU (IPv4 and IPv6), cbpf's documented drift when a listener closes (and eBPF's
//! absence of it), and `auto`'s choice with and without CAP_BPF. Needs root.

mod common;

use std::{
    net::{TcpListener, TcpStream},
    process::Command,
};

use common::*;
use reuseport::{
    PerCpuListeners, Protocol, Server, ServerConfig, Steering, SteeringMode, cbpf, incoming_cpu,
};

/// Every connection (TCP) or datagram (UDP) from a client pinned to CPU k is served by worker
/// k, for IPv4 and IPv6.
fn assert_mode_keeps_traffic_local(mode: SteeringMode) {
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let mut config = ServerConfig::new(listen.parse().unwrap(), mode);
            config.protocol = protocol;
            let server = Server::start(config).expect("start");
            assert_eq!(server.mode(), mode);
            let addr = server.local_addr();
            for cpu in server.cpus().iter() {
                let workers: Vec<u32> = match protocol {
                    Protocol::Tcp => http_gets_from(cpu, addr, CONNECTIONS_PER_CPU)
                        .into_iter()
                        .map(|served| {
                            assert_eq!(served.incoming_cpu, cpu, "{mode} {listen} tcp");
                            served.worker_cpu
                        })
                        .collect(),
                    Protocol::Udp => udp_requests_from(cpu, addr, CONNECTIONS_PER_CPU),
                };
                assert_eq!(workers.len(), CONNECTIONS_PER_CPU);
                for worker in workers {
                    assert_eq!(
                        worker, cpu,
                        "{mode} {listen} {protocol:?}: sent from CPU {cpu}"
                    );
                }
            }
            server.stop().expect("stop");
        }
    }
}

#[test]
fn percpu_keeps_tcp_and_udp_on_the_senders_cpu() {
    assert_mode_keeps_traffic_local(SteeringMode::Percpu);
}

#[test]
fn cbpf_keeps_tcp_and_udp_on_the_senders_cpu() {
    if !allowed_cpus().iter().eq(0..allowed_cpus().len() as u32) {
        eprintln!(
            "skipped: cbpf needs CPUs 0..N-1, this process may use {}",
            allowed_cpus()
        );
        return;
    }
    assert_mode_keeps_traffic_local(SteeringMode::Cbpf);
}

#[test]
fn incoming_cpu_keeps_tcp_and_udp_on_the_senders_cpu() {
    if !incoming_cpu::honoured() {
        eprintln!(
            "skipped: kernel {} ignores SO_INCOMING_CPU",
            incoming_cpu::kernel_release()
        );
        return;
    }
    assert_mode_keeps_traffic_local(SteeringMode::IncomingCpu);
}

/// Listeners labelled with `labels` as CPUs (labels, not pins: there may be more than this
/// machine has), with `steer` applied; then the listener of CPU 0 closes. Returns which label
/// accepts connections from a client on CPU 0 before and after.
fn accepting_label_before_and_after_closing_cpu0(
    labels: &[u32],
    steer: impl FnOnce(&PerCpuListeners) -> Option<Steering>,
) -> (u32, u32) {
    let group = PerCpuListeners::bind(
        "127.0.0.1:0".parse().unwrap(),
        Protocol::Tcp,
        &labels.iter().copied().collect(),
        64,
    )
    .expect("bind");
    let addr = group.local_addr();
    let _steering = steer(&group);
    let mut listeners: Vec<(u32, TcpListener)> = group
        .into_inner()
        .into_iter()
        .map(|l| (l.cpu, TcpListener::from(l.socket)))
        .collect();
    let connect_from_cpu0 = || on_cpu(0, move || TcpStream::connect(addr).expect("connect"));
    let _before_client = connect_from_cpu0();
    let before = accept_from(&listeners);
    listeners.retain(|(cpu, _)| *cpu != 0);
    let _after_client = connect_from_cpu0();
    (before, accept_from(&listeners))
}

#[test]
fn cbpf_drifts_to_another_cpus_listener_when_one_closes_and_percpu_does_not() {
    if !allowed_cpus().contains(0) {
        eprintln!("skipped: needs CPU 0");
        return;
    }
    // Classic BPF returns CPU 0 as group index 0. Closing the socket at index 0 moves the
    // group's last socket (CPU 2's) into that index, so CPU 0's connections now reach CPU 2's
    // worker: the documented weakness.
    let cbpf = accepting_label_before_and_after_closing_cpu0(&[0, 1, 2], |group| {
        cbpf::attach(group).expect("attach cbpf");
        None
    });
    assert_eq!(cbpf, (0, 2), "cbpf: CPU 0's connections before/after");
    // eBPF keys its map by CPU: slot 0 is simply empty, and the fallback is the nearest CPU, 1.
    // (Its map has a slot per possible CPU, so label only CPUs this kernel can have.)
    let possible = reuseport::cpus::possible_cpus().expect("possible CPUs");
    let labels: Vec<u32> = (0..possible.min(3)).collect();
    let percpu = accepting_label_before_and_after_closing_cpu0(&labels, |group| {
        Some(Steering::attach(&group.fds()).expect("attach"))
    });
    assert_eq!(percpu, (0, 1), "percpu: CPU 0's connections before/after");
}

#[test]
fn cbpf_refuses_workers_not_on_cpus_from_zero() {
    let cpus = allowed_cpus();
    let Some(last) = cpus.iter().last().filter(|&cpu| cpu > 0) else {
        eprintln!("skipped: needs a CPU other than 0");
        return;
    };
    let output = Command::new(BINARY)
        .args([
            "serve",
            "--mode",
            "cbpf",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "1s",
        ])
        .args(["--cpus", &last.to_string()])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("needs workers on CPUs 0 to N-1 (got {last})")),
        "{stderr}"
    );
}

#[test]
fn auto_picks_percpu_when_bpf_is_available() {
    let serve = ServeProcess::start(&[
        "--mode",
        "auto",
        "--listen",
        "127.0.0.1:0",
        "--duration",
        "1s",
    ]);
    assert!(
        serve
            .first_line
            .contains("mode percpu-spill (auto: this process may load BPF programs)"),
        "{}",
        serve.first_line
    );
    assert!(serve.program_id.is_some());
    let (status, _, stderr) = serve.finish();
    assert!(status.success(), "{stderr}");
}

#[test]
fn auto_without_cap_bpf_picks_the_next_mode_says_why_and_stays_local() {
    let serve = ServeProcess::start_with(
        &[&["setpriv"], WITHOUT_CAPABILITIES].concat(),
        &[
            "--mode",
            "auto",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "3s",
        ],
    );
    let expected = if incoming_cpu::honoured() {
        "mode incoming-cpu (auto: no eBPF (no CAP_BPF); kernel"
    } else {
        "mode cbpf (auto: no eBPF (no CAP_BPF); kernel"
    };
    assert!(serve.first_line.contains(expected), "{}", serve.first_line);
    assert_eq!(serve.program_id, None);
    for cpu in allowed_cpus().iter() {
        for served in http_gets_from(cpu, serve.addr, 20) {
            assert_eq!(served.worker_cpu, cpu, "{}", serve.first_line);
        }
    }
    let (status, _, stderr) = serve.finish();
    assert!(status.success(), "{stderr}");
}
