//! The steering strategies as types, against the real kernel: each opens a group with its mode in
//! place and says so, the server reaches the eBPF program through its strategy, and the eBPF
//! strategy refuses to be opened twice or used before it is open. Needs root.

mod common;

use std::os::fd::AsFd;

use common::*;
use reuseport::{
    PerCpuListeners, Protocol, Server, ServerConfig, SteeringMode,
    spill::SpillConfig,
    steering::SteeringProgram,
    strategy::{self, PercpuStrategy, Strategy, StrategyError},
};

fn pending() -> reuseport::listeners::PendingListeners {
    PerCpuListeners::prepare(
        "127.0.0.1:0".parse().unwrap(),
        Protocol::Tcp,
        &allowed_cpus(),
        64,
    )
    .expect("prepare")
}

#[test]
fn the_server_describes_its_strategy() {
    for (mode, program) in [
        (SteeringMode::Percpu, true),
        (SteeringMode::PercpuSpill, true),
        (SteeringMode::Hash, false),
        (SteeringMode::IncomingCpu, false),
    ] {
        if mode == SteeringMode::IncomingCpu && !reuseport::incoming_cpu::honoured() {
            continue;
        }
        let server =
            Server::start(ServerConfig::new("127.0.0.1:0".parse().unwrap(), mode)).expect("start");
        assert_eq!(server.strategy().mode(), mode);
        let described = server.strategy().describe().expect("describe");
        if program {
            let id = server.steering().expect("a program").program_id().unwrap();
            assert_eq!(described, format!("steering program id {id}"));
        } else {
            assert_eq!(described, "no eBPF steering program");
            assert!(server.steering().is_none());
        }
        let last = server.stop().expect("stop");
        assert_eq!(last.steering.is_some(), program, "{mode}");
        assert_eq!(
            last.spill.is_some(),
            mode == SteeringMode::PercpuSpill,
            "{mode}"
        );
    }
}

#[test]
fn an_open_percpu_strategy_steers_and_refuses_a_second_open() {
    let mut percpu = PercpuStrategy::new(SteeringProgram::recommended());
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dup = socket.as_fd().try_clone_to_owned().unwrap();
    assert!(matches!(
        percpu.replace_listener(0, dup),
        Err(StrategyError::NotOpen {
            mode: SteeringMode::Percpu
        })
    ));

    let listeners = percpu.open(pending()).expect("open");
    let steering = percpu.steering().expect("loaded");
    let cpus: Vec<u32> = steering.cpus().collect();
    assert_eq!(cpus, listeners.cpus().iter().collect::<Vec<_>>());
    assert!(percpu.counters().expect("counters").steering.is_some());
    assert!(matches!(
        percpu.open(pending()),
        Err(StrategyError::AlreadyOpen { .. })
    ));
}

#[test]
fn every_strategy_opens_a_group_that_serves_its_cpus() {
    for mode in [
        SteeringMode::Percpu,
        SteeringMode::Cbpf,
        SteeringMode::IncomingCpu,
        SteeringMode::Hash,
    ] {
        let cpus = allowed_cpus();
        if (mode == SteeringMode::Cbpf && !cpus.iter().eq(0..cpus.len() as u32))
            || (mode == SteeringMode::IncomingCpu && !reuseport::incoming_cpu::honoured())
        {
            eprintln!("skipped {mode}: not available with CPUs {cpus} on this kernel");
            continue;
        }
        let mut strategy =
            strategy::for_mode(mode, SteeringProgram::recommended(), SpillConfig::default())
                .expect("strategy");
        let listeners = strategy.open(pending()).expect("open");
        assert_eq!(listeners.cpus(), allowed_cpus(), "{mode}");
    }
}
