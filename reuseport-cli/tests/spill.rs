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
    Protocol, SteeringStats,
    cpu_topology::CpuTopology,
    spill::{SpillConfig, SpillSampler},
    steering::SteeringProgram,
};
use reuseport_common::{SPILL_SLOTS, SpillRoute};

fn totals(steering: &reuseport::Steering) -> SteeringStats {
    steering
        .stats()
        .unwrap()
        .iter()
        .fold(SteeringStats::default(), |mut sum, s| {
            sum.add(s);
            sum
        })
}

/// A route that sends every connection of the spilling CPU to `target`.
fn all_to(target: u32) -> SpillRoute {
    SpillRoute {
        active: 1,
        reserved: 0,
        slots: [target as u16; SPILL_SLOTS],
    }
}

#[test]
fn a_spill_route_spreads_by_hash_and_skips_a_closed_target() {
    let Some((busy, idle)) = two_cpus() else {
        return;
    };
    let (addr, mut steering, mut listeners) =
        steered_group_with(&[busy, idle], SteeringProgram::recommended(), true);
    let mut routes = steering.take_spill_map().unwrap();

    // Half the slots stay on `busy`, half go to `idle`: connections split between them by hash.
    let mut half = all_to(idle);
    for (slot, cpu) in half.slots.iter_mut().enumerate() {
        if slot % 2 == 0 {
            *cpu = busy as u16;
        }
    }
    routes.set(busy, half, 0).unwrap();
    let served: Vec<u32> = (0..64)
        .map(|_| {
            let _client = on_cpu(busy, move || TcpStream::connect(addr).expect("connect"));
            accept_from(&listeners)
        })
        .collect();
    let to_idle = served.iter().filter(|&&cpu| cpu == idle).count();
    assert!(
        (8..=56).contains(&to_idle),
        "about half of 64 go to idle by hash, not {to_idle}"
    );
    let bpf = totals(&steering);
    assert_eq!(bpf.spilled, to_idle as u64, "{bpf:?}");
    assert_eq!(bpf.local, 64 - to_idle as u64, "{bpf:?}");

    // Every slot names `idle`, whose listener then closes: the program skips it and stays
    // local; nothing is refused.
    routes.set(busy, all_to(idle), 0).unwrap();
    let _client = on_cpu(busy, move || TcpStream::connect(addr).expect("connect"));
    assert_eq!(accept_from(&listeners), idle, "spilled while idle lives");
    drop(listeners.remove(1));
    for _ in 0..16 {
        let _client = on_cpu(busy, move || {
            TcpStream::connect(addr).expect("connect: a closed target is skipped, not refused")
        });
        assert_eq!(accept_from(&listeners), busy);
    }
    let bpf = totals(&steering);
    assert_eq!(bpf.errors, 0, "{bpf:?}");
    assert_eq!(bpf.spilled, to_idle as u64 + 1, "{bpf:?}");
}

#[test]
fn the_sampler_spreads_a_skewed_slow_cpu_and_returns_to_local_when_the_skew_ends() {
    let Some((busy, idle)) = two_cpus() else {
        return;
    };
    let (addr, mut steering, listeners) =
        steered_group_with(&[busy, idle], SteeringProgram::recommended(), true);
    let fds = listeners
        .iter()
        .map(|(cpu, l)| (*cpu, l.as_fd().try_clone_to_owned().unwrap()))
        .collect();
    let sampler = SpillSampler::start(
        steering.take_spill_map().unwrap(),
        steering.stats_map_handle().unwrap(),
        Protocol::Tcp,
        fds,
        CpuTopology::default(),
        SpillConfig {
            threshold: 4,
            ..SpillConfig::default()
        },
    )
    .expect("sampler");
    let (busy_listener, idle_listener) = (&listeners[0].1, &listeners[1].1);

    // Every connection arrives on `busy`, whose worker accepts at most one per millisecond (a
    // slow worker under skew); `idle`'s worker accepts all it gets. None may be refused. The
    // client keeps to at most one connection per `PACE`: `busy` keeps half of them (the mean)
    // and fewer while it drains a backlog, so its queue stays well under the backlog of 256.
    // An unpaced client would fill that backlog before the sampler's first decision (even half
    // its connections are more than `busy` accepts); dropped SYNs are sent again a second later,
    // and how much then spills depends on the scheduler, not on the sampler.
    const CONNECTIONS: usize = 1500;
    const PACE: Duration = Duration::from_micros(500);
    let connecting = thread::spawn(move || {
        reuseport::cpus::pin_current_thread(busy).expect("pin client thread");
        let start = Instant::now();
        (0..CONNECTIONS)
            .map(|i| {
                let due = start + PACE * i as u32;
                thread::sleep(due.saturating_duration_since(Instant::now()));
                TcpStream::connect(addr).expect("connect: never refused")
            })
            .collect::<Vec<_>>()
    });
    let (mut busy_accepted, mut idle_accepted) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while busy_accepted + idle_accepted < CONNECTIONS {
        assert!(
            Instant::now() < deadline,
            "accepted {busy_accepted} + {idle_accepted}"
        );
        if busy_listener.accept().is_ok() {
            busy_accepted += 1;
        }
        while idle_listener.accept().is_ok() {
            idle_accepted += 1;
        }
        thread::sleep(Duration::from_millis(1));
    }
    let clients = connecting.join().expect("client thread");
    // With `busy`'s queues this full the kernel selects some connections twice (a dropped SYN
    // is sent again; a SYN-cookie ACK is looked up again), so the counters only bound the
    // connections.
    let bpf = totals(&steering);
    assert!(bpf.spilled > 0, "{bpf:?}");
    assert!(bpf.local + bpf.spilled >= CONNECTIONS as u64, "{bpf:?}");
    // Before its first decision the sampler needs 64 arrivals; from then on `busy` keeps at most
    // the mean (half).
    assert!(
        idle_accepted >= CONNECTIONS / 3,
        "the idle worker took its share: {idle_accepted} of {CONNECTIONS}"
    );
    // One skew, one start: a pause of the client (nothing arrives anywhere) does not end it.
    assert_eq!(
        sampler.counters().spill_starts,
        1,
        "{:?}",
        sampler.counters()
    );
    drop(clients);

    // The skew is over (nothing arrives): once the sampler's rate window (256 ms) holds too few
    // arrivals to judge, `busy` is local again.
    thread::sleep(Duration::from_millis(500));
    let before = totals(&steering);
    for _ in 0..8 {
        let _client = on_cpu(busy, move || TcpStream::connect(addr).expect("connect"));
        assert_eq!(accept_from(&listeners), busy);
    }
    let after = totals(&steering);
    assert_eq!(after.local - before.local, 8, "{after:?}");
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
