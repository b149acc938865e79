//! Behaviour of the real steering program in the real kernel: which worker accepts which
//! connection, and that none is refused. Needs root (CAP_BPF); `cargo xtask test` runs it.

mod common;

use std::{
    net::{SocketAddr, TcpStream},
    os::fd::AsFd,
};

use common::*;
use reuseport::{
    Protocol, Server, ServerConfig, Steering, SteeringMode, SteeringStats,
    steering::SteeringProgram,
};

fn start(listen: &str, protocol: Protocol, mode: SteeringMode) -> Server {
    let mut config = ServerConfig::new(listen.parse().unwrap(), mode);
    config.protocol = protocol;
    Server::start(config).expect("start server")
}

/// Every connection from a client pinned to CPU k is accepted by the worker pinned to k, and
/// the kernel agrees it arrived on k.
fn assert_percpu_tcp(listen: &str) {
    let server = start(listen, Protocol::Tcp, SteeringMode::Percpu);
    let addr = server.local_addr();
    for cpu in server.cpus().iter() {
        let served = http_gets_from(cpu, addr, CONNECTIONS_PER_CPU);
        assert_eq!(served.len(), CONNECTIONS_PER_CPU);
        for s in served {
            assert_eq!(
                s,
                Served {
                    worker_cpu: cpu,
                    incoming_cpu: cpu
                },
                "client on CPU {cpu}"
            );
        }
    }
    let last = server.stop().expect("stop");
    let expected = CONNECTIONS_PER_CPU as u64 * last.workers.len() as u64;
    assert_eq!(last.totals().accepted, expected);
    assert_eq!(last.totals().local, expected);
    let bpf = last
        .steering_totals()
        .expect("percpu has steering counters");
    assert_eq!(
        bpf.local, expected,
        "every SYN selected its own CPU's listener"
    );
    assert_eq!((bpf.fallback, bpf.unsteered, bpf.errors), (0, 0, 0));
}

#[test]
fn percpu_keeps_every_ipv4_connection_on_its_cpu() {
    assert_percpu_tcp("127.0.0.1:0");
}

#[test]
fn percpu_keeps_every_ipv6_connection_on_its_cpu() {
    assert_percpu_tcp("[::1]:0");
}

#[test]
fn hash_spreads_connections_over_workers_regardless_of_cpu() {
    let server = start("127.0.0.1:0", Protocol::Tcp, SteeringMode::Hash);
    let addr = server.local_addr();
    assert!(server.steering().is_none(), "hash mode attaches nothing");
    let cpus: Vec<u32> = server.cpus().iter().collect();
    let mut served = Vec::new();
    for &cpu in &cpus {
        served.extend(http_gets_from(cpu, addr, CONNECTIONS_PER_CPU));
    }
    let last = server.stop().expect("stop");
    for worker in &last.workers {
        assert!(worker.accepted > 0, "worker {} served nothing", worker.cpu);
    }
    if cpus.len() > 1 {
        let local = served
            .iter()
            .filter(|s| s.worker_cpu == s.incoming_cpu)
            .count();
        let locality = local as f64 / served.len() as f64;
        // With N workers the hash lands on the receiving CPU's worker about 1/N of the time.
        assert!(
            locality < 0.9,
            "hash locality {locality} is not clearly below 100 %"
        );
    }
}

#[test]
fn removed_slot_falls_back_to_a_live_cpu_and_refuses_nothing() {
    let Some((keep, empty)) = two_cpus() else {
        return;
    };
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), SteeringMode::Percpu);
    config.cpus = Some([keep, empty].into_iter().collect());
    let mut server = Server::start(config).expect("start");
    let addr = server.local_addr();
    let before = server.snapshot().expect("snapshot");

    server
        .steering_mut()
        .expect("percpu")
        .remove(empty)
        .expect("empty the slot");
    let served = http_gets_from(empty, addr, CONNECTIONS_PER_CPU);
    for s in &served {
        assert_eq!(
            s.worker_cpu, keep,
            "slot {empty} is empty: its fallback serves"
        );
        assert_eq!(s.incoming_cpu, empty);
    }

    let after = server.snapshot().expect("snapshot").since(&before);
    let on_empty = after.steering.as_ref().expect("counters")[empty as usize];
    assert_eq!(
        on_empty,
        SteeringStats {
            fallback: CONNECTIONS_PER_CPU as u64,
            ..Default::default()
        },
        "counted on the receiving CPU as fallbacks"
    );
    server.stop().expect("stop");
}

fn stats_sum(steering: &Steering) -> SteeringStats {
    steering
        .stats()
        .expect("stats")
        .iter()
        .fold(SteeringStats::default(), |mut sum, s| {
            sum.add(s);
            sum
        })
}

#[test]
fn closed_listener_empties_its_slot_and_its_cpu_falls_back() {
    let Some((keep, closed)) = two_cpus() else {
        return;
    };
    let (addr, steering, mut listeners) =
        steered_group(&[keep, closed], SteeringProgram::SteerToCpu);
    // Close CPU `closed`'s listener: the kernel removes it from the group and from the map.
    listeners.retain(|(cpu, _)| *cpu != closed);

    for _ in 0..20 {
        let _client = on_cpu(closed, move || TcpStream::connect(addr).expect("connect"));
        assert_eq!(accept_from(&listeners), keep);
    }
    let bpf = stats_sum(&steering);
    assert_eq!(bpf.fallback, 20, "{bpf:?}");
    assert_eq!(bpf.local + bpf.unsteered, 0, "{bpf:?}");
}

#[test]
fn with_every_slot_empty_the_kernel_hash_still_serves() {
    let cpus = allowed_cpus();
    let cpu = cpus.iter().next().expect("a CPU");
    let (addr, mut steering, listeners) = steered_group(&[cpu], SteeringProgram::SteerToCpu);
    steering.remove(cpu).expect("empty the only slot");
    for _ in 0..20 {
        let _client = on_cpu(cpu, move || TcpStream::connect(addr).expect("connect"));
        assert_eq!(accept_from(&listeners), cpu);
    }
    let bpf = stats_sum(&steering);
    assert_eq!(bpf.unsteered, 20, "{bpf:?}");
    assert_eq!(bpf.local + bpf.fallback, 0, "{bpf:?}");
}

#[test]
fn detach_returns_the_group_to_hash_selection() {
    let Some((a, b)) = two_cpus() else {
        return;
    };
    let (addr, steering, listeners) = steered_group(&[a, b], SteeringProgram::SteerToCpu);
    steering.detach(listeners[0].1.as_fd()).expect("detach");
    // Without the program, a client on CPU `a` reaches both listeners.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let _client = on_cpu(a, move || TcpStream::connect(addr).expect("connect"));
        seen.insert(accept_from(&listeners));
    }
    assert_eq!(
        seen.len(),
        2,
        "after detach the kernel hashes over both listeners"
    );
}

fn assert_percpu_udp(listen: &str) {
    let server = start(listen, Protocol::Udp, SteeringMode::Percpu);
    let addr: SocketAddr = server.local_addr();
    let server_cpus = server.cpus().clone();
    for cpu in server_cpus.iter() {
        for worker_cpu in udp_requests_from(cpu, addr, CONNECTIONS_PER_CPU) {
            assert_eq!(worker_cpu, cpu, "datagram sent from CPU {cpu}");
        }
    }
    let last = server.stop().expect("stop");
    let expected = CONNECTIONS_PER_CPU as u64 * last.workers.len() as u64;
    assert_eq!(last.totals().requests, expected);
    // The program ran once per datagram, on the sender's CPU, and chose that CPU's socket.
    let per_cpu = last.steering.as_ref().expect("counters");
    for cpu in server_cpus.iter() {
        assert_eq!(
            per_cpu[cpu as usize].local, CONNECTIONS_PER_CPU as u64,
            "CPU {cpu}"
        );
    }
    assert_eq!(last.steering_totals().map(|s| s.total()), Some(expected));
}

#[test]
fn percpu_keeps_every_ipv4_udp_datagram_on_its_cpu() {
    assert_percpu_udp("127.0.0.1:0");
}

#[test]
fn percpu_keeps_every_ipv6_udp_datagram_on_its_cpu() {
    assert_percpu_udp("[::1]:0");
}

#[test]
fn the_noop_calibration_program_selects_nothing_so_the_kernel_hashes() {
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), SteeringMode::Percpu);
    config.program = reuseport::steering::SteeringProgram::Noop;
    let server = Server::start(config).expect("start");
    let addr = server.local_addr();
    let cpus: Vec<u32> = server.cpus().iter().collect();
    let mut served = Vec::new();
    for &cpu in &cpus {
        served.extend(http_gets_from(cpu, addr, CONNECTIONS_PER_CPU));
    }
    let last = server.stop().expect("stop");
    // It ran for every connection but chose nothing: no counter moved.
    assert_eq!(last.steering_totals(), Some(SteeringStats::default()));
    if cpus.len() > 1 {
        let local = served
            .iter()
            .filter(|s| s.worker_cpu == s.incoming_cpu)
            .count();
        assert!(
            local < served.len() * 9 / 10,
            "{local} of {} local",
            served.len()
        );
    }
}
