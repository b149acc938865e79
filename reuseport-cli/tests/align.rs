//! `reuseport align` on a real multi-queue veth: one end in this namespace (so the verb sees it
//! in `/sys/class/net`), its peer in a namespace held only by the test's descriptor, so the pair
//! goes away with the test. RPS and XPS are misaligned on purpose; the report names each
//! mismatch, `--apply` fixes them, `--restore` puts every value back. (IRQ affinity and
//! irqbalance are tested on recorded trees: `cargo test -p reuseport-user --test
//! align_fixtures`; veth has no IRQs.) Needs root.

mod common;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{BINARY, WITHOUT_CAPABILITIES, assert_one_line_error, thread_affinity};
use reuseport::CpuList;
use reuseport_lab::{
    netns::NetNs,
    topology::{Topology, TopologyKind},
    veth::{VethEnd, create_pair_here},
};

/// A veth pair with two queues each way, removed with its peer's namespace; and its state file,
/// removed on drop in case a test stops between `--apply` and `--restore`.
struct Pair {
    name: String,
    _peer_ns: NetNs,
}

impl Pair {
    fn create(tag: &str) -> Self {
        let name = format!("ra{tag}{}", std::process::id() % 100_000);
        let peer_ns = NetNs::create().expect("a namespace (needs root)");
        let peer = VethEnd {
            ns: &peer_ns,
            name: "peer0".into(),
            addr: Ipv4Addr::new(10, 99, 0, 2),
            rx_queues: 2,
            tx_queues: 2,
        };
        create_pair_here(&name, 2, &peer).expect("the veth pair");
        Self {
            name,
            _peer_ns: peer_ns,
        }
    }

    fn file(&self, rel: &str) -> PathBuf {
        Path::new("/sys/class/net")
            .join(&self.name)
            .join("queues")
            .join(rel)
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.file(rel))
            .expect("sysfs")
            .trim()
            .to_owned()
    }

    fn write(&self, rel: &str, value: &str) {
        fs::write(self.file(rel), value).expect("sysfs write");
    }

    /// The four masks the verb may change.
    fn masks(&self) -> Vec<String> {
        [
            "rx-0/rps_cpus",
            "rx-1/rps_cpus",
            "tx-0/xps_cpus",
            "tx-1/xps_cpus",
        ]
        .iter()
        .map(|rel| self.read(rel))
        .collect()
    }

    fn state(&self) -> PathBuf {
        PathBuf::from(format!("/run/reuseport/align-{}.json", self.name))
    }

    fn align(&self, args: &[&str]) -> Output {
        Command::new(BINARY)
            .args(["align", "--dev", &self.name])
            .args(args)
            .output()
            .expect("run reuseport align")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.state());
    }
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "align failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Two CPUs this process may run on.
fn two_cpus() -> (u32, u32) {
    let allowed = CpuList::allowed().expect("affinity");
    let mut cpus = allowed.iter();
    match (cpus.next(), cpus.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => panic!("this test needs two CPUs; allowed: {allowed}"),
    }
}

fn mask(cpu: u32) -> String {
    reuseport::align::format_mask(&[cpu])
}

#[test]
fn misaligned_rps_and_xps_are_named_applied_and_restored() {
    let (a, b) = two_cpus();
    let pair = Pair::create("m");
    // Misaligned: both receive queues' flows go to CPU b, both transmit queues are for CPU b.
    for rel in [
        "rx-0/rps_cpus",
        "rx-1/rps_cpus",
        "tx-0/xps_cpus",
        "tx-1/xps_cpus",
    ] {
        pair.write(rel, &mask(b));
    }

    // Workers on CPU a only: every RPS target lacks a worker, and no XPS lists a.
    let report = stdout(&pair.align(&["--cpus", &a.to_string()]));
    for queue in [0, 1] {
        let line = format!(
            "RPS on rx-{queue} sends flows to CPU {b} without a worker: their connections are \
             accepted on another CPU"
        );
        assert!(report.contains(&line), "{line:?} in\n{report}");
    }
    assert!(
        report.contains(&format!(
            "no tx queue's XPS lists CPU {a}: its worker's replies leave on a hashed queue"
        )),
        "{report}"
    );
    assert!(report.contains("(virtual)"), "{report}");

    // Workers on a and b: both queues land on b while a gets none.
    let workers = format!("{a},{b}");
    let report = stdout(&pair.align(&["--cpus", &workers]));
    assert!(
        report.contains(&format!(
            "queues 0 and 1 are both processed on CPU {b} while CPU {a} gets none"
        )),
        "{report}"
    );

    let before = pair.masks();
    let applied = stdout(&pair.align(&["--cpus", &workers, "--apply"]));
    assert!(applied.contains("changed 2 setting(s)"), "{applied}");
    assert!(pair.state().exists(), "the previous values are saved");
    let cpus: Vec<Vec<u32>> = pair
        .masks()
        .iter()
        .map(|m| reuseport::align::parse_mask(m).expect("a mask"))
        .collect();
    assert_eq!(
        cpus,
        [vec![a], vec![b], vec![a], vec![b]],
        "one worker per queue"
    );
    let report = stdout(&pair.align(&["--cpus", &workers]));
    assert!(
        report.contains("aligned: every receive CPU has a worker and every worker a queue"),
        "{report}"
    );
    let json = stdout(&pair.align(&["--cpus", &workers, "--json"]));
    let report: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(report["mismatches"], serde_json::json!([]), "{json}");

    // A second --apply refuses and changes nothing.
    let again = pair.align(&["--cpus", &workers, "--apply"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("restore them first"),
        "{again:?}"
    );

    let restored = stdout(&pair.align(&["--restore"]));
    assert!(restored.contains("restored 2 setting(s)"), "{restored}");
    assert_eq!(pair.masks(), before, "every value is back");
    assert!(!pair.state().exists());
}

#[test]
fn the_report_needs_no_privilege_and_changes_nothing() {
    let pair = Pair::create("r");
    let (_, b) = two_cpus();
    pair.write("rx-0/rps_cpus", &mask(b));
    let before = pair.masks();
    let output = Command::new("setpriv")
        .args(WITHOUT_CAPABILITIES)
        .args([BINARY, "align", "--dev", &pair.name])
        .output()
        .expect("setpriv");
    let report = stdout(&output);
    assert!(report.contains("rx-0: no IRQ (virtual"), "{report}");
    assert!(report.contains(&format!("RPS to CPU {b}")), "{report}");
    // veth has no RSS: the ioctl answers "not supported", which is no error.
    assert!(
        report.contains("RSS table: none (the device has no RSS)"),
        "{report}"
    );
    // rx-1 has neither IRQ nor RPS: its CPU is the sender's, so no claim about coverage.
    assert!(
        report.contains("no mismatch found: queues without an IRQ, NAPI thread or RPS"),
        "{report}"
    );
    assert_eq!(pair.masks(), before);

    // --apply without the privilege: one line, exit 2, nothing changed, no state file.
    let output = Command::new("setpriv")
        .args(WITHOUT_CAPABILITIES)
        .args([BINARY, "align", "--dev", &pair.name, "--apply"])
        .output()
        .expect("setpriv");
    assert_one_line_error(&output, 2, "needs CAP_NET_ADMIN, which this process lacks");
    assert_eq!(pair.masks(), before);
    assert!(!pair.state().exists());
}

/// Runs `reuseport align ARGS` and returns its exit code and stderr.
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(BINARY)
        .arg("align")
        .args(args)
        .output()
        .expect("run reuseport align");
    assert!(output.stdout.is_empty(), "{output:?}");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_input_is_one_line_and_exit_code_2() {
    let (code, stderr) = refused(&["--dev", "nosuchdev0"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no network device \"nosuchdev0\""),
        "{stderr}"
    );

    let outside = CpuList::allowed()
        .expect("affinity")
        .iter()
        .max()
        .expect("a CPU")
        + 1;
    let (code, stderr) = refused(&["--dev", "lo", "--cpus", &outside.to_string()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("CPU {outside} is not available to this process")),
        "{stderr}"
    );

    let (code, stderr) = refused(&["--dev", "../x", "--restore"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is not a device name"), "{stderr}");

    let (code, stderr) = refused(&["--dev", "nosuchdev0", "--restore"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("nothing to restore"), "{stderr}");
}

/// `count` requests from CPU `cpu` in the clients' namespace; the worker CPU of each.
fn workers_serving(topology: &Topology, cpu: u32, addr: SocketAddr, count: usize) -> Vec<u32> {
    topology
        .in_client_namespace(move || {
            reuseport::cpus::pin_current_thread(cpu).expect("pin the client");
            (0..count)
                .map(|_| common::http_get(addr).worker_cpu)
                .collect()
        })
        .expect("a veth topology")
        .expect("the clients' namespace")
}

/// Threaded NAPI on a two-queue veth (the lab's veth-rss topology): each client CPU sends on its
/// own queue (XPS on the clients' end), and each receive queue's NAPI thread decides where its
/// packets, and so the steering program, run. Both threads pinned to one CPU: align names it,
/// and the other CPU's clients are served by the wrong worker; after `--apply` every client is
/// served by the worker on its own CPU; `--restore` puts the threads back.
#[test]
fn misaligned_napi_threads_are_named_and_after_apply_clients_are_served_on_their_cpu() {
    let (a, b) = two_cpus();
    let cpus: CpuList = [a, b].into_iter().collect();
    let topology = Topology::create(TopologyKind::VethRss, &cpus).expect("veth-rss (needs root)");
    let (server_dev, client_dev) = topology.devices().expect("veth");
    let (server_dev, client_dev) = (server_dev.to_owned(), client_dev.to_owned());
    let state = PathBuf::from(format!("/run/reuseport/align-{server_dev}.json"));
    let _state_guard = RemoveOnDrop(state.clone());
    // The clients' end: CPU a sends on queue 0, CPU b on queue 1.
    topology
        .in_client_namespace(|| {
            let queues = Path::new("/sys/class/net").join(&client_dev).join("queues");
            fs::write(queues.join("tx-0/xps_cpus"), mask(a)).expect("XPS tx-0");
            fs::write(queues.join("tx-1/xps_cpus"), mask(b)).expect("XPS tx-1");
        })
        .expect("veth")
        .expect("the clients' namespace");
    // The server's end, misaligned: both receive queues' threads on CPU a.
    let server_threads: Vec<u32> = topology
        .napi_threads()
        .iter()
        .filter(|thread| thread.name.starts_with(&format!("napi/{server_dev}-")))
        .map(|thread| thread.pid)
        .collect();
    assert_eq!(server_threads.len(), 2, "{:?}", topology.napi_threads());
    for &pid in &server_threads {
        reuseport::cpus::set_task_affinity(pid, &std::iter::once(a).collect())
            .expect("pin the NAPI thread");
    }
    let workers = format!("{a},{b}");
    let align = |args: &[&str]| -> Output {
        let dev = server_dev.clone();
        let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        topology
            .in_server_namespace(move || {
                Command::new(BINARY)
                    .args(["align", "--dev", &dev])
                    .args(&args)
                    .output()
                    .expect("run reuseport align")
            })
            .expect("veth")
            .expect("the server's namespace")
    };

    let report = stdout(&align(&["--cpus", &workers]));
    for pid in &server_threads {
        assert!(
            report.contains(&format!("(pid {pid}) on CPU {a}")),
            "thread {pid} in\n{report}"
        );
    }
    assert!(
        report.contains(&format!(
            "queues 0 and 1 are both processed on CPU {a} while CPU {b} gets none"
        )),
        "{report}"
    );

    let server = topology
        .in_server_namespace(|| {
            let listen = SocketAddr::new(topology.server_ip(), 0).to_string();
            common::ServeProcess::start(&[
                "--mode", "percpu", "--cpus", &workers, "--listen", &listen,
            ])
        })
        .expect("veth")
        .expect("the server's namespace");
    let server = StopOnDrop(server);
    let addr = server.0.addr;
    // Misaligned: CPU b's clients arrive on queue 1, processed on CPU a, served by a's worker.
    let before = workers_serving(&topology, b, addr, 50);
    assert!(before.iter().all(|&cpu| cpu == a), "{before:?}");

    let applied = stdout(&align(&["--cpus", &workers, "--apply"]));
    assert!(
        applied.contains(&format!("CPU affinity: {a} -> {b}")),
        "{applied}"
    );
    for cpu in [a, b] {
        let served = workers_serving(&topology, cpu, addr, 50);
        assert!(
            served.iter().all(|&worker| worker == cpu),
            "clients on CPU {cpu} served by {served:?}\n{applied}"
        );
    }
    assert_eq!(thread_affinity(server_threads[1]), [b], "{applied}");
    assert_eq!(thread_affinity(server_threads[0]), [a], "{applied}");
    let report = stdout(&align(&["--cpus", &workers]));
    assert!(
        report.contains("aligned: every receive CPU has a worker and every worker a queue"),
        "{report}"
    );

    let restored = stdout(&align(&["--restore"]));
    assert!(restored.contains("restored"), "{restored}");
    for &pid in &server_threads {
        assert_eq!(thread_affinity(pid), [a], "thread {pid} is back on CPU {a}");
    }
    assert!(!state.exists());

    // Threads gone by --restore (threaded NAPI turned off and on again: new threads) are named
    // and skipped; the files are restored.
    stdout(&align(&["--cpus", &workers, "--apply"]));
    let dev = server_dev.clone();
    topology
        .in_server_namespace(move || {
            let threaded = Path::new("/sys/class/net").join(&dev).join("threaded");
            fs::write(&threaded, "0").expect("threaded off");
            fs::write(&threaded, "1").expect("threaded on");
        })
        .expect("veth")
        .expect("the server's namespace");
    let restored = stdout(&align(&["--restore"]));
    assert!(
        restored.contains(&format!(
            "(pid {}) CPU affinity: not restored, the thread is gone",
            server_threads[1]
        )),
        "{restored}"
    );
    assert!(restored.contains("restored 2 setting(s)"), "{restored}");
    assert!(!state.exists());
    drop(server);
}

/// Stops the server when the test ends, also when an assertion fails first.
struct StopOnDrop(common::ServeProcess);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

/// Removes a file on drop (a state file, if the test stops between apply and restore).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A device of this machine whose first receive queue has an IRQ of its own (this VM's virtio
/// eth0; a NIC elsewhere), and that IRQ's number.
fn device_with_an_rx_irq() -> (String, u32) {
    let roots = reuseport::align::read::Roots::system();
    let mut names: Vec<String> = fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .find_map(|name| {
            let view = reuseport::align::read::read_device(&roots, &name).ok()?;
            let irq = view.rx.first()?.irq.as_ref()?.number;
            Some((name, irq))
        })
        .expect("this test needs a network device with a receive IRQ (a virtio or real NIC)")
}

/// Every IRQ's allowed CPUs, written back on drop: a running irqbalance may move any of them.
struct IrqAffinities(Vec<(PathBuf, String)>);

impl IrqAffinities {
    fn save() -> Self {
        let mut saved = Vec::new();
        for entry in fs::read_dir("/proc/irq").expect("/proc/irq").flatten() {
            let path = entry.path().join("smp_affinity_list");
            if let Ok(text) = fs::read_to_string(&path) {
                saved.push((path, text.trim().to_owned()));
            }
        }
        Self(saved)
    }
}

impl Drop for IrqAffinities {
    fn drop(&mut self) {
        for (path, text) in &self.0 {
            let _ = fs::write(path, text);
        }
    }
}

/// The pid of a running irqbalance.
fn irqbalance_pid() -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = fs::read_to_string(entry.path().join("comm")).ok()?;
        let state = fs::read_to_string(entry.path().join("stat")).ok()?;
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        (comm.trim() == "irqbalance" && !zombie).then_some(pid)
    })
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A real irqbalance (Debian's) against a real IRQ: `--apply` refuses in one line and changes
/// nothing; with `--stop-irqbalance` it stops irqbalance, then pins the IRQ; `--restore` puts
/// the IRQ back and starts irqbalance again.
#[test]
fn apply_stops_irqbalance_only_when_told_and_restore_starts_it_again() {
    let _affinities = IrqAffinities::save();
    let (dev, irq) = device_with_an_rx_irq();
    let irq_file = PathBuf::from(format!("/proc/irq/{irq}/smp_affinity_list"));
    let read_irq = || {
        fs::read_to_string(&irq_file)
            .expect("the IRQ's affinity")
            .trim()
            .to_owned()
    };
    let state = PathBuf::from(format!("/run/reuseport/align-{dev}.json"));
    let _state_guard = RemoveOnDrop(state.clone());
    // One worker, on a CPU the IRQ is not pinned to alone: the plan must move the IRQ.
    let (a, b) = two_cpus();
    fs::write(&irq_file, format!("{a},{b}")).expect("set the IRQ's affinity");
    let before = read_irq();
    let worker = b.to_string();

    // Debian's irqbalance, unless one runs already (a systemd machine that started it).
    let mut ours = match irqbalance_pid() {
        Some(_) => None,
        None => Some(
            Command::new("irqbalance")
                .arg("--foreground")
                .spawn()
                .expect("irqbalance (Debian package irqbalance)"),
        ),
    };
    wait_for("irqbalance runs", || irqbalance_pid().is_some());
    let first = irqbalance_pid().expect("irqbalance");

    let align = |args: &[&str]| -> Output {
        Command::new(BINARY)
            .args(["align", "--dev", &dev, "--cpus", &worker])
            .args(args)
            .output()
            .expect("run reuseport align")
    };
    let refused = align(&["--apply"]);
    assert_one_line_error(&refused, 1, &format!("irqbalance runs (pid {first})"));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("add --stop-irqbalance"),
        "{refused:?}"
    );
    assert_eq!(read_irq(), before, "nothing changed");
    assert!(!state.exists());
    assert_eq!(irqbalance_pid(), Some(first));

    let applied = stdout(&align(&["--apply", "--stop-irqbalance"]));
    assert!(
        applied.contains(&format!("irqbalance (pid {first}) stopped")),
        "{applied}"
    );
    assert_eq!(irqbalance_pid(), None, "{applied}");
    assert_eq!(read_irq(), worker, "{applied}");
    let saved: serde_json::Value =
        serde_json::from_slice(&fs::read(&state).expect("the state file")).expect("JSON");
    assert_eq!(saved["irqbalance"]["pid"], first, "{saved}");
    if let Some(child) = ours.as_mut() {
        child.wait().expect("reap the stopped irqbalance");
    }

    let restored = stdout(
        &Command::new(BINARY)
            .args(["align", "--dev", &dev, "--restore"])
            .output()
            .expect("run reuseport align --restore"),
    );
    assert!(restored.contains("irqbalance started again"), "{restored}");
    assert_eq!(read_irq(), before, "{restored}");
    assert!(!state.exists());
    let again = irqbalance_pid().expect("irqbalance runs again");
    assert_ne!(again, first);
    if ours.is_some() {
        // The one restore started, from the command line of the one this test started.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(again as i32).expect("a pid"),
            rustix::process::Signal::TERM,
        );
        wait_for("the restarted irqbalance exits", || {
            irqbalance_pid().is_none()
        });
    }
}

/// `--port`: the worker CPUs are those whose slot holds a listener of the port: a percpu server
/// on one CPU gives that CPU alone; a port nothing steers is one line and exit 2.
#[test]
fn the_workers_of_a_steered_port_are_its_serving_cpus() {
    let (_, b) = two_cpus();
    let pair = Pair::create("p");
    let server = StopOnDrop(common::ServeProcess::start(&[
        "--mode",
        "percpu",
        "--cpus",
        &b.to_string(),
        "--listen",
        "127.0.0.1:0",
    ]));
    let port = server.0.addr.port().to_string();
    let report = stdout(&pair.align(&["--port", &port]));
    let first = report.lines().next().unwrap_or_default().to_owned();
    assert!(
        first.contains(&format!("; workers on CPU {b};")),
        "{first}\n{report}"
    );
    drop(server);

    let unsteered = std::net::TcpListener::bind("127.0.0.1:0").expect("a plain listener");
    let port = unsteered.local_addr().expect("address").port().to_string();
    assert_one_line_error(
        &pair.align(&["--port", &port]),
        2,
        &format!("no steering program holds a listener of port {port} (nothing steers it)"),
    );
}
