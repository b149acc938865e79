//! The harness's topologies on the real kernel: the multi-queue veth has one receive queue per
//! requested CPU, each with a NAPI thread pinned there and no RPS/XPS, or, with the server's end
//! in softirq mode, each processed on the CPU whose clients send into it and on no other; the
//! one-queue veth has its RPS mask; with the clients' end in softirq mode that end has GRO off,
//! no threaded NAPI and no NAPI thread while TCP still flows both ways; and nothing of either
//! (namespaces, veth, NAPI threads) outlives the topology, its dropping, a panic, or the SIGKILL
//! of its process. Needs root; no `ip` binary is used.

mod common;

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use reuseport::cpus::{CpuList, pin_current_thread};
use reuseport_lab::{
    netns::namespace_held,
    topology::{
        ClientRx, ServerRx, Topology, TopologyError, TopologyKind, VethRx, napi_threads_of,
    },
};

/// Waits (up to 20 s: the kernel deletes namespaces from a work queue) until none of
/// `namespaces` is held and `dev` has no NAPI thread left.
fn assert_all_gone(namespaces: &[u64], dev: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held: Vec<u64> = namespaces
            .iter()
            .copied()
            .filter(|&ns| namespace_held(ns))
            .collect();
        let threads = napi_threads_of(dev);
        if held.is_empty() && threads.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: namespaces {held:?}, NAPI threads {threads:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The hex mask in a sysfs file, as a number (masks of up to 64 CPUs).
fn mask(text: &str) -> u64 {
    u64::from_str_radix(&text.trim().replace(',', ""), 16).expect("hex mask")
}

#[test]
fn veth_rss_has_one_pinned_napi_queue_per_cpu_and_no_rps_or_xps() {
    let cpus = allowed_cpus();
    // The clients get one CPU (one queue back), the server all: the two ends differ.
    let client: CpuList = cpus.iter().last().into_iter().collect();
    let topology =
        Topology::create_receiving_on(TopologyKind::VethRss, &cpus, &client).expect("create");
    let (server_dev, client_dev) = topology.devices().expect("devices");
    let (server_dev, client_dev) = (server_dev.to_owned(), client_dev.to_owned());
    let namespaces = topology.namespaces();
    assert_eq!(namespaces.len(), 2);
    assert!(namespaces.iter().all(|&ns| namespace_held(ns)));

    let sysfs = |dev: &str| Path::new("/sys/class/net").join(dev);
    let queues = |dir: &Path, kind: &str| {
        fs::read_dir(dir.join("queues"))
            .expect("queues")
            .flatten()
            .filter(|q| q.file_name().to_string_lossy().starts_with(kind))
            .count()
    };
    let server_dir = sysfs(&server_dev);
    let (rx, tx, rps, threaded) = topology
        .in_server_namespace(|| {
            let rps: Vec<u64> = (0..cpus.len())
                .map(|q| {
                    mask(
                        &fs::read_to_string(server_dir.join(format!("queues/rx-{q}/rps_cpus")))
                            .expect("rps_cpus"),
                    )
                })
                .collect();
            let threaded = fs::read_to_string(server_dir.join("threaded")).expect("threaded");
            (
                queues(&server_dir, "rx-"),
                queues(&server_dir, "tx-"),
                rps,
                threaded,
            )
        })
        .expect("server namespace")
        .expect("in the server namespace");
    assert_eq!(rx, cpus.len(), "one receive queue per server CPU");
    assert_eq!(tx, 1, "one transmit queue per client receive queue");
    assert!(rps.iter().all(|&m| m == 0), "RPS masks {rps:?}");
    assert_eq!(threaded.trim(), "1");

    let client_dir = sysfs(&client_dev);
    let (client_rx, client_tx, xps) = topology
        .in_client_namespace(|| {
            let tx = queues(&client_dir, "tx-");
            let xps: Vec<u64> = if tx > 1 {
                (0..tx)
                    .map(|q| {
                        mask(
                            &fs::read_to_string(client_dir.join(format!("queues/tx-{q}/xps_cpus")))
                                .expect("xps_cpus"),
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            };
            (queues(&client_dir, "rx-"), tx, xps)
        })
        .expect("client namespace")
        .expect("in the client namespace");
    assert_eq!(client_rx, 1);
    assert_eq!(client_tx, cpus.len(), "a transmit queue per server queue");
    assert!(xps.iter().all(|&m| m == 0), "XPS masks {xps:?}");

    // One NAPI thread per receive queue, pinned to its CPU.
    let server_threads = napi_threads_of(&server_dev);
    assert_eq!(server_threads.len(), cpus.len(), "{server_threads:?}");
    for ((pid, name), cpu) in server_threads.iter().zip(cpus.iter()) {
        assert_eq!(thread_affinity(*pid), [cpu], "{name}");
    }
    let client_threads = napi_threads_of(&client_dev);
    assert_eq!(client_threads.len(), 1, "{client_threads:?}");
    assert_eq!(
        thread_affinity(client_threads[0].0),
        client.iter().collect::<Vec<_>>()
    );
    assert_eq!(
        topology
            .napi_threads()
            .iter()
            .map(|t| t.cpu)
            .collect::<Vec<_>>(),
        cpus.iter().chain(client.iter()).collect::<Vec<_>>()
    );

    drop(topology);
    assert_all_gone(&namespaces, &server_dev);
    assert!(napi_threads_of(&client_dev).is_empty());
}

/// An offload's state (`ETHTOOL_G*`, `struct ethtool_value`) in the calling thread's namespace.
fn ethtool_get(dev: &str, cmd: u32) -> u32 {
    let mut value = [cmd, u32::MAX];
    // SAFETY: `[cmd, data]` is a whole struct ethtool_value, what ETHTOOL_G* commands write.
    unsafe { reuseport::ethtool::ethtool(dev, &mut value) }.expect("ethtool get");
    value[1]
}

/// `ETHTOOL_GGRO` and `ETHTOOL_GTSO` (linux/ethtool.h).
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_GTSO: u32 = 0x1e;

#[test]
fn veth_rss_with_softirq_client_rx_has_no_client_napi_and_carries_tcp() {
    let cpus = allowed_cpus();
    let client: CpuList = cpus.iter().last().into_iter().collect();
    let rx = VethRx {
        server: ServerRx::NapiThread,
        client: ClientRx::Softirq,
    };
    let topology =
        Topology::create_with(TopologyKind::VethRss, &cpus, &client, rx).expect("create");
    assert_eq!(topology.rx(), Some(rx));
    let (server_dev, client_dev) = topology.devices().expect("devices");
    let (server_dev, client_dev) = (server_dev.to_owned(), client_dev.to_owned());
    let namespaces = topology.namespaces();

    let state = |dev: &str| {
        let threaded = fs::read_to_string(Path::new("/sys/class/net").join(dev).join("threaded"))
            .expect("threaded");
        (
            threaded.trim().to_owned(),
            ethtool_get(dev, ETHTOOL_GGRO),
            ethtool_get(dev, ETHTOOL_GTSO),
        )
    };
    let client_state = topology
        .in_client_namespace(|| state(&client_dev))
        .expect("client namespace")
        .expect("in the client namespace");
    assert_eq!(
        client_state,
        ("0".to_owned(), 0, 0),
        "client end: threaded, GRO, TSO"
    );
    // The server's end is as with NAPI threads at the clients' end.
    let server_state = topology
        .in_server_namespace(|| state(&server_dev))
        .expect("server namespace")
        .expect("in the server namespace");
    assert_eq!(
        server_state,
        ("1".to_owned(), 1, 0),
        "server end: threaded, GRO, TSO"
    );

    assert!(
        napi_threads_of(&client_dev).is_empty(),
        "no client NAPI threads"
    );
    let server_threads = napi_threads_of(&server_dev);
    assert_eq!(server_threads.len(), cpus.len(), "{server_threads:?}");
    for ((pid, name), cpu) in server_threads.iter().zip(cpus.iter()) {
        assert_eq!(thread_affinity(*pid), [cpu], "{name}");
    }
    assert_eq!(
        topology
            .napi_threads()
            .iter()
            .map(|t| (t.pid, t.cpu))
            .collect::<Vec<_>>(),
        server_threads
            .iter()
            .map(|(pid, _)| *pid)
            .zip(cpus.iter())
            .collect::<Vec<_>>(),
        "only the server's NAPI threads are recorded"
    );

    // A TCP connection from the clients' namespace to a listener in the server's, with enough
    // data each way for several segments: SYNs and data through the server's NAPI queues,
    // replies through the sending CPU's backlog at the clients' end.
    let listener = listener_in_server_namespace(&topology);
    let server_addr = listener.local_addr().expect("local address");
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let echo = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut received = vec![0; 256 * 1024];
        stream.read_exact(&mut received).expect("server read");
        stream.write_all(&received).expect("server write");
    });
    let mut stream = topology
        .in_client_namespace(|| {
            TcpStream::connect_timeout(&server_addr, Duration::from_secs(10)).expect("connect")
        })
        .expect("client namespace")
        .expect("in the client namespace");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.write_all(&payload).expect("client write");
    let mut echoed = vec![0; payload.len()];
    stream.read_exact(&mut echoed).expect("client read");
    assert!(echoed == payload, "the echo differs from what was sent");
    echo.join().expect("echo thread");
    drop(stream);

    drop(topology);
    assert_all_gone(&namespaces, &server_dev);
}

/// The XPS masks of the clients' end's first `queues` transmit queues.
fn client_xps_masks(topology: &Topology, queues: usize) -> Vec<u64> {
    let (_, client_dev) = topology.devices().expect("devices");
    let client_dir = Path::new("/sys/class/net").join(client_dev);
    topology
        .in_client_namespace(|| {
            (0..queues)
                .map(|q| {
                    mask(
                        &fs::read_to_string(client_dir.join(format!("queues/tx-{q}/xps_cpus")))
                            .expect("xps_cpus"),
                    )
                })
                .collect()
        })
        .expect("client namespace")
        .expect("in the client namespace")
}

/// `SO_INCOMING_NAPI_ID` of a connected socket: the NAPI instance that received its last packet.
fn incoming_napi_id(stream: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    let mut id: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: the descriptor is open for the call; `id` and `len` are valid for writes and `len`
    // is the size of `id`, the u32 the kernel writes for SO_INCOMING_NAPI_ID.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_NAPI_ID,
            (&mut id as *mut u32).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    id
}

/// With the server's end in softirq mode, what a client sends from CPU c goes into CPU c's
/// queue and is processed on CPU c, as an RSS NIC's queue and its interrupt's CPU: every
/// connection from one CPU reports that CPU (`SO_INCOMING_CPU`) and one NAPI instance
/// (`SO_INCOMING_NAPI_ID`), and the two CPUs' instances differ. With flows hashed over the
/// queues instead (no XPS), 20 connections from one CPU would all use one queue with a chance of
/// 2^-19. No server NAPI thread exists and each client transmit queue's XPS mask is its CPU.
#[test]
fn veth_rss_with_softirq_server_rx_receives_each_cpus_packets_in_its_own_queue_on_that_cpu() {
    let Some((a, b)) = two_cpus() else { return };
    let cpus: CpuList = [a, b].into_iter().collect();
    let topology = Topology::create_with(TopologyKind::VethRss, &cpus, &cpus, VethRx::SOFTIRQ)
        .expect("create");
    assert!(
        topology.pin_clients(),
        "clients must be pinned to pick their queue"
    );
    let (server_dev, client_dev) = topology.devices().expect("devices");
    let (server_dev, client_dev) = (server_dev.to_owned(), client_dev.to_owned());
    let namespaces = topology.namespaces();

    let server_dir = Path::new("/sys/class/net").join(&server_dev);
    let (threaded, gro, tso) = topology
        .in_server_namespace(|| {
            (
                fs::read_to_string(server_dir.join("threaded")).expect("threaded"),
                ethtool_get(&server_dev, ETHTOOL_GGRO),
                ethtool_get(&server_dev, ETHTOOL_GTSO),
            )
        })
        .expect("server namespace")
        .expect("in the server namespace");
    assert_eq!(
        (threaded.trim(), gro, tso),
        ("0", 1, 0),
        "server end: threaded, GRO, TSO"
    );
    assert!(
        napi_threads_of(&server_dev).is_empty(),
        "no server NAPI threads"
    );
    assert!(
        napi_threads_of(&client_dev).is_empty(),
        "no client NAPI threads"
    );
    assert!(topology.napi_threads().is_empty());
    let xps = client_xps_masks(&topology, 2);
    assert_eq!(
        xps,
        [1 << a, 1 << b],
        "client tx queue i sends from CPU i only"
    );

    let listener = listener_in_server_namespace(&topology);
    let server_addr = listener.local_addr().expect("local address");
    let mut napi_of = Vec::new();
    for cpu in [a, b] {
        let mut ids = Vec::new();
        for _ in 0..20 {
            let client = topology
                .in_client_namespace(|| {
                    pin_current_thread(cpu).expect("pin the client");
                    let mut stream =
                        TcpStream::connect_timeout(&server_addr, Duration::from_secs(10))
                            .expect("connect");
                    stream.write_all(b"x").expect("send");
                    stream
                })
                .expect("client namespace")
                .expect("in the client namespace");
            let (mut accepted, _) = listener.accept().expect("accept");
            let mut byte = [0u8; 1];
            accepted.read_exact(&mut byte).expect("the client's byte");
            let incoming_cpu = socket2::SockRef::from(&accepted)
                .cpu_affinity()
                .expect("SO_INCOMING_CPU");
            assert_eq!(incoming_cpu, cpu as usize, "received on the sender's CPU");
            ids.push(incoming_napi_id(&accepted));
            drop(client);
        }
        ids.dedup();
        assert_eq!(
            ids.len(),
            1,
            "CPU {cpu}'s connections came through NAPI instances {ids:?}"
        );
        assert_ne!(ids[0], 0, "received without NAPI");
        napi_of.push(ids[0]);
    }
    assert_ne!(
        napi_of[0], napi_of[1],
        "both CPUs' packets went through one queue"
    );
    // The server end's NAPI instances from the kernel (netdev netlink), in id order, which veth
    // allocates in receive-queue order: CPU i's connections came through queue i's.
    let queue_napis: Vec<u32> = topology
        .in_server_namespace(|| {
            let ifindex: u32 = fs::read_to_string(server_dir.join("ifindex"))
                .expect("ifindex")
                .trim()
                .parse()
                .expect("an interface index");
            reuseport::netdev::device_napis(ifindex)
                .expect("netdev netlink")
                .expect("the kernel's netdev family")
                .napis
                .keys()
                .copied()
                .collect()
        })
        .expect("server namespace")
        .expect("in the server namespace");
    assert_eq!(
        napi_of,
        queue_napis[..2],
        "CPU {a} and CPU {b} through receive queues 0 and 1 (a third, if any, is the other CPUs')"
    );

    drop(topology);
    assert_all_gone(&namespaces, &server_dev);
}

/// With the server's end in softirq mode and only CPU a receiving (as under `--skew`), what
/// another CPU sends into the device (here a UDP flood from CPU b, as a server worker's replies
/// make the clients' ACKs there) goes into a queue of its own, so every connection from CPU a is
/// still processed on CPU a. With one queue for both, CPU b's sends schedule that queue's NAPI
/// instance on CPU b, which then processes CPU a's SYNs too (`ab --skew` measured 7 % of them).
#[test]
fn veth_rss_with_softirq_server_rx_keeps_other_cpus_out_of_the_receiving_cpus_queue() {
    let Some((a, b)) = two_cpus() else { return };
    let rx: CpuList = std::iter::once(a).collect();
    let topology =
        Topology::create_with(TopologyKind::VethRss, &rx, &rx, VethRx::SOFTIRQ).expect("create");
    let xps = client_xps_masks(&topology, 2);
    assert_eq!(xps[0], 1 << a, "queue 0 is CPU {a}'s alone: {xps:?}");
    assert_ne!(
        xps[1] & (1 << b),
        0,
        "CPU {b} sends into the other queue: {xps:?}"
    );

    // CPU b floods the server's namespace with datagrams (nobody reads them: the receive
    // processing is what matters) while CPU a connects.
    let server_ip = topology.server_ip();
    let sink = topology
        .in_server_namespace(move || {
            std::net::UdpSocket::bind(std::net::SocketAddr::new(server_ip, 0)).expect("bind")
        })
        .expect("server namespace")
        .expect("in the server namespace");
    let sink_addr = sink.local_addr().expect("address");
    let flood = topology
        .in_client_namespace(move || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            socket.connect(sink_addr).expect("connect");
            socket
        })
        .expect("client namespace")
        .expect("in the client namespace");
    let flooders = Repeaters::start([Some(b)], || {
        let socket = flood.try_clone().expect("clone");
        move || {
            for _ in 0..64 {
                let _ = socket.send(&[0u8; 64]);
            }
        }
    });
    let listener = listener_in_server_namespace(&topology);
    let server_addr = listener.local_addr().expect("local address");
    let mut elsewhere = std::collections::BTreeMap::<usize, usize>::new();
    for _ in 0..200 {
        let client = topology
            .in_client_namespace(|| {
                pin_current_thread(a).expect("pin the client");
                TcpStream::connect_timeout(&server_addr, Duration::from_secs(10)).expect("connect")
            })
            .expect("client namespace")
            .expect("in the client namespace");
        let (accepted, _) = listener.accept().expect("accept");
        let cpu = socket2::SockRef::from(&accepted)
            .cpu_affinity()
            .expect("SO_INCOMING_CPU");
        if cpu != a as usize {
            *elsewhere.entry(cpu).or_default() += 1;
        }
        drop(client);
    }
    flooders.stop();
    assert!(
        elsewhere.is_empty(),
        "of 200 connections from CPU {a}, these many were processed on these CPUs: {elsewhere:?}"
    );
}

/// Softirq at the server's end processes on the sending client's CPU, so clients on a CPU that
/// receives nothing are refused before anything is created.
#[test]
fn veth_rss_refuses_softirq_server_rx_with_clients_on_other_cpus() {
    let Some((a, b)) = two_cpus() else { return };
    let server: CpuList = std::iter::once(a).collect();
    let client: CpuList = std::iter::once(b).collect();
    let err = Topology::create_with(TopologyKind::VethRss, &server, &client, VethRx::SOFTIRQ)
        .expect_err("clients off the receiving CPUs");
    assert!(
        matches!(err, TopologyError::SoftirqNeedsSharedCpus { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("napi-thread"), "{err}");
}

#[test]
fn veth_rps_sets_up_rps_and_is_removed_on_drop() {
    let cpus = allowed_cpus();
    let topology = Topology::create(TopologyKind::VethRps, &cpus).expect("create");
    let (server_dev, _) = topology.devices().expect("devices");
    let server_dev = server_dev.to_owned();
    let namespaces = topology.namespaces();
    let path = Path::new("/sys/class/net")
        .join(&server_dev)
        .join("queues/rx-0/rps_cpus");
    let rps = topology
        .in_server_namespace(|| fs::read_to_string(&path).expect("rps_cpus"))
        .expect("server namespace")
        .expect("in the server namespace");
    let rps = mask(&rps);
    for cpu in cpus.iter().filter(|&cpu| cpu < 64) {
        assert_ne!(
            rps & (1 << cpu),
            0,
            "CPU {cpu} missing from RPS mask {rps:x}"
        );
    }
    assert!(
        napi_threads_of(&server_dev).is_empty(),
        "no NAPI on veth-rps"
    );
    drop(topology);
    assert_all_gone(&namespaces, &server_dev);
}

/// Each end's ARP table holds the other end, complete and permanent (`ATF_COM | ATF_PERM`), with
/// its real link-layer address before any packet has crossed: no packet ever waits for ARP, to
/// be sent later by whichever CPU finishes resolving it.
#[test]
fn each_veth_end_knows_its_peer_for_good_before_any_traffic() {
    for kind in [TopologyKind::VethRps, TopologyKind::VethRss] {
        let cpus = allowed_cpus();
        let topology = Topology::create(kind, &cpus).expect("create");
        let (server_dev, client_dev) = topology.devices().expect("devices");
        // (device, its ARP entries as (flags, hardware address)), and the device's own address.
        let read = |dev: &str| {
            let arp = fs::read_to_string("/proc/thread-self/net/arp").expect("arp table");
            let entries: Vec<(u32, String)> = arp
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    (fields.get(5) == Some(&dev)).then(|| {
                        let flags = fields[2].trim_start_matches("0x");
                        (
                            u32::from_str_radix(flags, 16).expect("flags"),
                            fields[3].to_owned(),
                        )
                    })
                })
                .collect();
            let own = fs::read_to_string(Path::new("/sys/class/net").join(dev).join("address"))
                .expect("address");
            (entries, own.trim().to_owned())
        };
        let (server_arp, server_mac) = topology
            .in_server_namespace(|| read(server_dev))
            .expect("server namespace")
            .expect("in the server namespace");
        let (client_arp, client_mac) = topology
            .in_client_namespace(|| read(client_dev))
            .expect("client namespace")
            .expect("in the client namespace");
        const COMPLETE_AND_PERMANENT: u32 = 0x2 | 0x4;
        assert_eq!(
            server_arp,
            [(COMPLETE_AND_PERMANENT, client_mac)],
            "{kind}: the server end's ARP entries"
        );
        assert_eq!(
            client_arp,
            [(COMPLETE_AND_PERMANENT, server_mac)],
            "{kind}: the clients' end's ARP entries"
        );
    }
}

#[test]
fn everything_is_removed_when_the_harness_panics() {
    let mut created = Vec::new();
    let mut dev = String::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topology = Topology::create(TopologyKind::VethRss, &allowed_cpus()).expect("create");
        created.extend(topology.namespaces());
        dev = topology.devices().expect("devices").0.to_owned();
        panic!("forced failure while the topology exists");
    }));
    assert!(outcome.is_err());
    assert_eq!(created.len(), 2);
    assert_all_gone(&created, &dev);
}

/// Not a test on its own: run by [`everything_is_removed_when_the_harness_is_killed`] in a
/// child process, it creates a veth-rss topology, prints it and waits to be killed.
#[test]
#[ignore = "run as a child process by everything_is_removed_when_the_harness_is_killed"]
fn child_holding_a_topology() {
    if std::env::var_os("REUSEPORT_TOPOLOGY_CHILD").is_none() {
        return;
    }
    let topology = Topology::create(TopologyKind::VethRss, &allowed_cpus()).expect("create");
    let namespaces = topology.namespaces();
    println!(
        // On a line of its own: the test harness has printed `test NAME ... ` before.
        "\nTOPOLOGY {} {} {}",
        topology.devices().expect("devices").0,
        namespaces[0],
        namespaces[1]
    );
    thread::sleep(Duration::from_secs(60));
}

#[test]
fn everything_is_removed_when_the_harness_is_killed() {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_holding_a_topology",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("REUSEPORT_TOPOLOGY_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("stdout");
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|line| line.starts_with("TOPOLOGY "))
        .expect("the child's topology line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let dev = fields[1].to_owned();
    let namespaces: Vec<u64> = fields[2..]
        .iter()
        .map(|f| f.parse().expect("inode"))
        .collect();
    assert_eq!(dev, format!("rps{}", child.id()));
    assert!(namespaces.iter().all(|&ns| namespace_held(ns)));
    assert!(
        !napi_threads_of(&dev).is_empty(),
        "the child's NAPI threads"
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    assert_all_gone(&namespaces, &dev);
}
