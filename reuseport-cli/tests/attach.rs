//! `reuseport attach` against real servers: Debian's nginx and a prefork server of our own,
//! attached by --pid, sockets attached by --fd, a worker exiting under --persist, and every bad
//! input. Needs root and nginx (`cargo xtask test` installs it).

mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;
use reuseport::{PerCpuListeners, Protocol, procfs};

/// Stops the child on drop, so no server outlives a failing test: SIGTERM first (nginx's master
/// then stops its workers; a SIGKILLed master would orphan them), SIGKILL after 5 s.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.0);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Debian's nginx on `addr` with two workers (one per CPU) and `affinity`, answering with its
/// worker's pid in X-Worker-Pid. Returns the guard, the master pid and the workers by CPU.
fn start_nginx(addr: SocketAddr, affinity: &str) -> (Guard, u32, Vec<(u32, u32)>) {
    let dir = std::env::temp_dir().join(format!(
        "reuseport-nginx-{}-{}",
        std::process::id(),
        addr.port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let workers = allowed_cpus().len();
    let conf = format!(
        "daemon off;\nmaster_process on;\nuser root;\nworker_processes {workers};\n{affinity}\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
         http {{ access_log off; client_body_temp_path {d}/b; proxy_temp_path {d}/p; \
         fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
         server {{ listen {addr} reuseport; add_header X-Worker-Pid $pid; \
         location / {{ return 200 \"ok\\n\"; }} }} }}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx is installed (cargo xtask test installs it: apt-get install nginx)");
    let master = child.id();
    let guard = Guard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while procfs::children_of(master).len() < workers {
        assert!(Instant::now() < deadline, "nginx workers did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The workers pin themselves right after fork; wait until they have.
    std::thread::sleep(Duration::from_millis(200));
    (guard, master, workers_by_cpu(master))
}

/// `(cpu, pid)` of the master's children pinned to one CPU.
fn workers_by_cpu(master: u32) -> Vec<(u32, u32)> {
    let mut workers: Vec<(u32, u32)> = procfs::children_of(master)
        .into_iter()
        .filter_map(|pid| {
            let cpus: Vec<u32> = procfs::affinity(pid).ok()?.iter().collect();
            (cpus.len() == 1).then(|| (cpus[0], pid))
        })
        .collect();
    workers.sort_unstable();
    workers
}

/// Our prefork server with `flags`; returns the guard, its address, master and workers.
fn start_prefork(flags: &[&str]) -> (Guard, SocketAddr, u32) {
    start_prefork_by(Command::new(env!("CARGO_BIN_EXE_prefork-demo")), flags)
}

/// Our prefork server started by `command` (prefork-demo, or a wrapper running it) with `flags`.
fn start_prefork_by(mut command: Command, flags: &[&str]) -> (Guard, SocketAddr, u32) {
    let mut child = command
        .args(["--duration", "60s"])
        .args(if flags.contains(&"--listen") {
            &[][..]
        } else {
            &["--listen", "127.0.0.1:0"][..]
        })
        .args(flags)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start prefork-demo");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "prefork-demo: listening on ADDR with master PID and workers A,B"
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = words[3].parse().unwrap_or_else(|_| panic!("{line:?}"));
    let master = words[6].parse().unwrap_or_else(|_| panic!("{line:?}"));
    (Guard(child), addr, master)
}

/// `reuseport attach ARGS` running until stopped; returns once it is steering, with its stdout
/// (kept open: it prints again when it detaches).
fn start_attach(args: &[&str]) -> (Guard, BufReader<std::process::ChildStdout>) {
    let (child, stdout) = spawn_steering_attach(&[args, &["--quiet"]].concat());
    (Guard(child), stdout)
}

/// Spawns `reuseport attach ARGS` and returns once its first line says it steers, with its
/// stdout.
fn spawn_steering_attach(
    args: &[&str],
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(BINARY)
        .arg("attach")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start attach");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("reuseport: steering port"), "{first:?}");
    (child, stdout)
}

/// Stops an attach with SIGTERM: it detaches, says so and exits successfully.
fn stop_attach((mut attach, mut stdout): (Guard, BufReader<std::process::ChildStdout>)) {
    let pid = rustix::process::Pid::from_child(&attach.0);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let mut last = String::new();
    stdout.read_line(&mut last).unwrap();
    assert!(last.contains("detached"), "{last:?}");
    let status = attach.0.wait().unwrap();
    assert!(status.success(), "attach exited with {status}");
}

fn run(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run reuseport")
}

/// `reuseport attach --port <addr's port> --pid <master>` fails with one line naming `needle`.
fn assert_attach_fails(addr: SocketAddr, master: u32, needle: &str) {
    let output = run(&[
        "attach",
        "--port",
        &addr.port().to_string(),
        "--pid",
        &master.to_string(),
    ]);
    assert_one_line_error(&output, 1, needle);
}

/// Before attach, a client on one CPU reaches every worker; while attached, every response to
/// a client on CPU k comes from the worker pinned to k; after detach, mixed again.
fn assert_attach_steers(addr: SocketAddr, master: u32, workers: &[(u32, u32)]) {
    assert!(workers.len() >= 2, "needs two pinned workers: {workers:?}");
    let all: BTreeSet<u32> = workers.iter().map(|&(_, pid)| pid).collect();
    let first_cpu = workers[0].0;
    let seen: BTreeSet<u32> = worker_pids_from(first_cpu, addr, 60).into_iter().collect();
    assert_eq!(seen, all, "before attach: hash reaches every worker");

    let attach = start_attach(&[
        "--port",
        &addr.port().to_string(),
        "--pid",
        &master.to_string(),
    ]);
    for &(cpu, pid) in workers {
        for served_by in worker_pids_from(cpu, addr, 100) {
            assert_eq!(served_by, pid, "client on CPU {cpu} while attached");
        }
    }
    stop_attach(attach);

    let seen: BTreeSet<u32> = worker_pids_from(first_cpu, addr, 60).into_iter().collect();
    assert_eq!(seen, all, "after detach: hash again");
}

#[test]
fn nginx_workers_serve_their_own_cpus_connections_while_attached() {
    let addr = free_addr();
    let (_nginx, master, workers) = start_nginx(addr, "worker_cpu_affinity auto;");
    // nginx's master and every worker hold every listener: the epoll registrations decide.
    assert_attach_steers(addr, master, &workers);
}

#[test]
fn a_prefork_server_attached_by_pid_is_steered() {
    let (_server, addr, master) = start_prefork(&[]);
    assert_attach_steers(addr, master, &workers_by_cpu(master));
}

/// A reuseport group with a listener on every allowed CPU that a child `attach` inherits (no
/// close-on-exec), and the `--fd N --cpu K` arguments naming them.
fn inherited_group() -> (SocketAddr, Vec<(u32, TcpListener)>, Vec<String>) {
    let cpus: Vec<u32> = allowed_cpus().iter().collect();
    let (addr, listeners) = unsteered_group(&cpus);
    let mut fd_args = Vec::new();
    for (cpu, listener) in &listeners {
        socket2::SockRef::from(listener).set_cloexec(false).unwrap();
        fd_args.extend([
            "--fd".to_owned(),
            listener.as_raw_fd().to_string(),
            "--cpu".to_owned(),
            cpu.to_string(),
        ]);
    }
    (addr, listeners, fd_args)
}

#[test]
fn sockets_passed_by_fd_are_steered_through_the_same_path() {
    let cpus = allowed_cpus();
    let (addr, listeners, fd_args) = inherited_group();
    let mut args = vec!["--port".to_owned(), addr.port().to_string()];
    args.extend(fd_args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let attach = start_attach(&args);
    for cpu in cpus.iter() {
        for _ in 0..20 {
            let _client = on_cpu(cpu, move || std::net::TcpStream::connect(addr).unwrap());
            assert_eq!(accept_from(&listeners), cpu, "client on CPU {cpu}");
        }
    }
    stop_attach(attach);
}

#[test]
fn a_persistent_attach_survives_its_command_and_a_worker_exit_leaves_a_served_hole() {
    let (_server, addr, master) = start_prefork(&[]);
    let workers = workers_by_cpu(master);
    assert!(workers.len() >= 2, "{workers:?}");
    let port = addr.port().to_string();
    let output = run(&[
        "attach",
        "--port",
        &port,
        "--pid",
        &master.to_string(),
        "--persist",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The attach command has exited; the steering stays.
    let (cpu_a, pid_a) = workers[0];
    let (cpu_b, pid_b) = workers[1];
    assert!(
        worker_pids_from(cpu_b, addr, 30)
            .iter()
            .all(|&p| p == pid_b)
    );
    // Worker B dies: its listener closes, its slot empties, its CPU falls back to A's.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid_b as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        worker_pids_from(cpu_b, addr, 30)
            .iter()
            .all(|&p| p == pid_a)
    );
    let status = run(&["status", "--port", &port]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    // The kernel reports B's slot empty; A's is live.
    assert!(text.contains(&format!("slot cpu{cpu_b}: socket")), "{text}");
    assert!(
        text.contains(&format!(
            "empty (hole: CPU {cpu_b}'s connections go to CPU {cpu_a}'s"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("live, served by pid {pid_a}")),
        "{text}"
    );
    // CPU B's connections: served there while B lived, by A's worker since: the share that was
    // received, accepted and served on one CPU is what the line says.
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("  arrived on cpu{cpu_b}: ")))
        .unwrap_or_else(|| panic!("no counters for cpu{cpu_b}: {text}"));
    let count = |name: &str| -> f64 {
        line.split_once(&format!("{name} "))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.trim_end_matches(';').parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    let (local, fallback) = (count("local"), count("fallback"));
    assert!(local >= 30.0 && fallback >= 30.0, "{line}");
    let share = 100.0 * local / (local + fallback + count("hash") + count("errors"));
    assert!(
        line.ends_with(&format!(
            "; {share:.1}% received, accepted and served on cpu{cpu_b}"
        )),
        "{line}"
    );
    let detach = run(&["detach", "--port", &port]);
    assert!(
        detach.status.success(),
        "{}",
        String::from_utf8_lossy(&detach.stderr)
    );
    assert!(!PathBuf::from(format!("/sys/fs/bpf/reuseport/{port}")).exists());
}

#[test]
fn no_such_pid() {
    assert_one_line_error(
        &run(&["attach", "--port", "80", "--pid", "4194303"]),
        1,
        "no process with pid 4194303",
    );
}

#[test]
fn no_listener_on_the_port() {
    let (_server, addr, master) = start_prefork(&["--cpus", "0"]);
    let other = free_addr().port();
    assert_ne!(other, addr.port());
    assert_one_line_error(
        &run(&[
            "attach",
            "--port",
            &other.to_string(),
            "--pid",
            &master.to_string(),
        ]),
        1,
        &format!("has a TCP listener on port {other}"),
    );
}

#[test]
fn a_listener_without_so_reuseport() {
    let (_server, addr, master) = start_prefork(&["--cpus", "0", "--no-reuseport"]);
    assert_attach_fails(addr, master, "has no SO_REUSEPORT");
}

#[test]
fn unpinned_workers() {
    if allowed_cpus().len() < 2 {
        return;
    }
    let (_server, addr, master) = start_prefork(&["--unpinned"]);
    assert_attach_fails(addr, master, "worker_cpu_affinity auto");
}

#[test]
fn two_workers_on_one_cpu() {
    if allowed_cpus().len() < 2 {
        return;
    }
    let (_server, addr, master) = start_prefork(&["--same-cpu"]);
    assert_attach_fails(addr, master, "are both pinned to CPU");
}

#[test]
fn nginx_without_worker_cpu_affinity_is_refused_by_name() {
    let addr = free_addr();
    let (_nginx, master, _) = start_nginx(addr, "");
    assert_attach_fails(
        addr,
        master,
        "(nginx) serves a listener but may run on CPUs",
    );
}

#[test]
fn a_threaded_server_is_refused() {
    let serve = ServeProcess::start(&[
        "--mode",
        "hash",
        "--listen",
        "127.0.0.1:0",
        "--duration",
        "5s",
    ]);
    let pid = serve.child.id();
    let output = run(&[
        "attach",
        "--port",
        &serve.addr.port().to_string(),
        "--pid",
        &pid.to_string(),
    ]);
    drop(serve);
    if allowed_cpus().len() > 1 {
        assert_one_line_error(&output, 1, "its workers are threads");
    }
}

#[test]
fn listeners_of_two_groups_are_refused() {
    let (_a, addr, master_a) = start_prefork(&["--cpus", "0"]);
    let mut other = Command::new(env!("CARGO_BIN_EXE_prefork-demo"))
        .args([
            "--listen",
            &format!("127.0.0.2:{}", addr.port()),
            "--cpus",
            "0",
            "--duration",
            "60s",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(other.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let master_b = other.id();
    let _b = Guard(other);
    assert_one_line_error(
        &run(&[
            "attach",
            "--port",
            &addr.port().to_string(),
            "--pid",
            &master_a.to_string(),
            "--pid",
            &master_b.to_string(),
        ]),
        1,
        "different reuseport groups",
    );
}

#[test]
fn an_fd_that_is_not_a_socket_or_not_listening() {
    assert_one_line_error(
        &run(&["attach", "--port", "80", "--fd", "0", "--cpu", "0"]),
        1,
        "fd 0 is not a socket",
    );
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_cloexec(false).unwrap();
    let fd = socket.as_raw_fd().to_string();
    assert_one_line_error(
        &run(&["attach", "--port", "80", "--fd", &fd, "--cpu", "0"]),
        1,
        "not a listening TCP socket",
    );
}

/// A copy of `binary` that user nobody may execute (the build directory may not be), in a
/// directory removed on drop.
fn copy_for_nobody(binary: &str) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let copy = dir
        .path()
        .join(std::path::Path::new(binary).file_name().unwrap());
    std::fs::copy(binary, &copy).unwrap();
    for path in [dir.path(), &copy] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    (dir, copy)
}

/// `setpriv` arguments that run a command as user nobody, without capabilities.
const AS_NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];

#[test]
fn another_users_attach_is_not_allowed_to_take_the_sockets() {
    let (_server, addr, master) = start_prefork(&["--cpus", "0"]);
    let (dir, copy) = copy_for_nobody(BINARY);
    // With CAP_BPF (so the capability check passes) but no right to take another user's fds.
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=+bpf", "--ambient-caps=+bpf", "--"])
        .arg(&copy)
        .args([
            "attach",
            "--port",
            &addr.port().to_string(),
            "--pid",
            &master.to_string(),
        ])
        .output()
        .unwrap();
    drop(dir);
    assert_one_line_error(&output, 1, "not allowed to take pid");
}

/// Clients on `cpu` each connect and send a request while the worker `pid` is stopped
/// (SIGSTOP), so whatever reaches it waits in its accept queue; then the worker is killed
/// (SIGKILL). Returns how many of the `count` clients got a response, and how many failed.
fn requests_queued_on_a_killed_worker(
    addr: SocketAddr,
    cpu: u32,
    pid: u32,
    count: usize,
) -> (usize, usize) {
    use std::io::{Read, Write};
    let worker = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(worker, rustix::process::Signal::STOP).unwrap();
    // SIGSTOP takes effect asynchronously: until the worker is really stopped it may still accept
    // a connection, which then dies with it under any scheme. Wait for state `T`.
    wait_for_state(&format!("/proc/{pid}/stat"), 'T');
    let clients: Vec<std::net::TcpStream> = on_cpu(cpu, move || {
        (0..count)
            .map(|_| {
                let mut stream = std::net::TcpStream::connect(addr).expect("connect");
                stream
                    .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                    .unwrap();
                stream
            })
            .collect()
    });
    std::thread::sleep(Duration::from_millis(100));
    rustix::process::kill_process(worker, rustix::process::Signal::KILL).unwrap();
    let (mut served, mut failed) = (0, 0);
    for mut client in clients {
        client
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut response = Vec::new();
        match client.read_to_end(&mut response) {
            Ok(_) if response.starts_with(b"HTTP/1.1 200") => served += 1,
            _ => failed += 1,
        }
    }
    (served, failed)
}

#[test]
fn kill_9_of_an_attached_worker_loses_none_of_its_queued_requests() {
    let (_server, addr, master) = start_prefork(&[]);
    let workers = workers_by_cpu(master);
    assert!(workers.len() >= 2, "{workers:?}");
    let attach = start_attach(&[
        "--port",
        &addr.port().to_string(),
        "--pid",
        &master.to_string(),
    ]);
    let (cpu, pid) = workers[1];
    let (served, failed) = requests_queued_on_a_killed_worker(addr, cpu, pid, 20);
    assert_eq!(
        (served, failed),
        (20, 0),
        "the select-or-migrate program moved the dead worker's queue to a live worker"
    );
    // The dead worker's CPU falls back to a live one.
    let pids = worker_pids_from(cpu, addr, 20);
    assert!(pids.iter().all(|&p| p != pid), "{pids:?}");
    stop_attach(attach);
}

#[test]
fn without_steering_kill_9_of_a_worker_resets_its_queued_requests() {
    if kernel_migrates_anyway() {
        return;
    }
    let (_server, addr, master) = start_prefork(&[]);
    let workers = workers_by_cpu(master);
    let (cpu, pid) = workers[1];
    // The kernel's hash sends about half of them to the stopped worker.
    let (served, failed) = requests_queued_on_a_killed_worker(addr, cpu, pid, 40);
    assert!(served > 0 && failed > 0, "served {served}, failed {failed}");
}

#[test]
fn fds_given_twice_for_one_cpu_or_on_another_port_are_refused() {
    let group = PerCpuListeners::bind(
        "127.0.0.1:0".parse().unwrap(),
        Protocol::Tcp,
        &[0].into_iter().collect(),
        16,
    )
    .expect("bind");
    let addr = group.local_addr();
    let listener = group.into_inner().remove(0).socket;
    listener.set_cloexec(false).unwrap();
    // A second member of the same group, for "two fds, one CPU".
    let member = reuseport::listeners::bind_one(addr, Protocol::Tcp, 16).expect("join");
    member.set_cloexec(false).unwrap();
    let (fd, other) = (
        listener.as_raw_fd().to_string(),
        member.as_raw_fd().to_string(),
    );
    let port = addr.port().to_string();
    assert_one_line_error(
        &run(&[
            "attach", "--port", &port, "--fd", &fd, "--cpu", "0", "--fd", &fd, "--cpu", "1",
        ]),
        1,
        &format!("fd {fd} is given twice"),
    );
    assert_one_line_error(
        &run(&[
            "attach", "--port", &port, "--fd", &fd, "--cpu", "0", "--fd", &other, "--cpu", "0",
        ]),
        1,
        &format!("CPU 0 is given twice (fds {fd} and {other})"),
    );
    let wrong_port = (addr.port() ^ 1).to_string();
    assert_one_line_error(
        &run(&["attach", "--port", &wrong_port, "--fd", &fd, "--cpu", "0"]),
        1,
        &format!("fd {fd} listens on {addr}, not on port {wrong_port}"),
    );
}

#[test]
fn a_second_attach_on_a_steered_port_says_it_is_steered_already() {
    let (_server, addr, master) = start_prefork(&[]);
    let (port, master) = (addr.port().to_string(), master.to_string());
    let first = start_attach(&["--port", &port, "--pid", &master]);
    assert_one_line_error(
        &run(&[
            "attach",
            "--port",
            &port,
            "--pid",
            &master,
            "--duration",
            "1s",
        ]),
        1,
        "this group is steered already",
    );
    stop_attach(first);
}

#[test]
fn attach_without_cap_bpf_refuses_before_taking_any_socket() {
    let (_server, addr, master) = start_prefork(&[]);
    let output = Command::new("setpriv")
        .args(WITHOUT_CAPABILITIES)
        .arg(BINARY)
        .args(["attach", "--port", &addr.port().to_string()])
        .args(["--pid", &master.to_string(), "--duration", "1s"])
        .output()
        .expect("run setpriv");
    // The capability check comes first: without it pidfd_getfd (CAP_SYS_PTRACE) would fail first.
    assert_one_line_error(&output, 1, "needs CAP_BPF");
}

#[test]
fn the_pid_of_one_worker_of_a_group_is_refused() {
    let (_server, addr, master) = start_prefork(&[]);
    let workers = workers_by_cpu(master);
    assert!(workers.len() >= 2, "{workers:?}");
    let (_, worker) = workers[0];
    assert_one_line_error(
        &run(&[
            "attach",
            "--port",
            &addr.port().to_string(),
            "--pid",
            &worker.to_string(),
            "--duration",
            "1s",
        ]),
        1,
        &format!(
            "pid {worker} serves 1 of the {} listeners on {addr}",
            workers.len()
        ),
    );
}

#[test]
fn attach_mode_hash_on_persisted_steering_removes_it_and_a_new_attach_works() {
    let (_server, addr, master) = start_prefork(&[]);
    let (port, master) = (addr.port().to_string(), master.to_string());
    let ok = |output: std::process::Output| {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    ok(run(&[
        "attach",
        "--port",
        &port,
        "--pid",
        &master,
        "--persist",
    ]));
    let hashed = ok(run(&[
        "attach", "--port", &port, "--pid", &master, "--mode", "hash",
    ]));
    assert!(hashed.contains("is on hash selection"), "{hashed}");
    // Nothing is left pinned or recorded for the port...
    assert!(!reuseport::pinned::PinnedRoot::system().is_persisted(addr.port()));
    assert_one_line_error(
        &run(&["status", "--port", &port]),
        1,
        "no persistent steering",
    );
    // ... so steering it again works, and so does removing that.
    ok(run(&[
        "attach",
        "--port",
        &port,
        "--pid",
        &master,
        "--persist",
    ]));
    let detached = ok(run(&["detach", "--port", &port]));
    assert!(detached.contains("hash selection again"), "{detached}");
}

/// Runs `reuseport ARGS` and returns its stdout, failing the test unless it succeeded.
fn run_ok(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        output.status.success(),
        "reuseport {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether clients on the first worker's CPU reach every worker (hash selection), or only that
/// worker (steered).
fn hashed(addr: SocketAddr, workers: &[(u32, u32)]) -> bool {
    let all: BTreeSet<u32> = workers.iter().map(|&(_, pid)| pid).collect();
    let seen: BTreeSet<u32> = worker_pids_from(workers[0].0, addr, 60)
        .into_iter()
        .collect();
    match seen.len() {
        1 => false,
        _ => {
            assert_eq!(seen, all);
            true
        }
    }
}

#[test]
fn an_attach_killed_by_sigkill_is_shown_by_status_and_removed_by_detach() {
    let (_server, addr, master) = start_prefork(&[]);
    let workers = workers_by_cpu(master);
    assert!(workers.len() >= 2, "{workers:?}");
    let (port, master) = (addr.port().to_string(), master.to_string());
    let (mut attach, _stdout) = start_attach(&["--port", &port, "--pid", &master]);
    attach.0.kill().unwrap();
    attach.0.wait().unwrap();
    // Its program stays attached: nothing could detach it.
    assert!(!hashed(addr, &workers));
    let status = run_ok(&["status", "--port", &port]);
    assert!(
        status.contains("not pinned and held by no process: left attached by an attach"),
        "{status}"
    );
    assert!(
        status.contains(&format!("steering: all {} listeners", workers.len())),
        "{status}"
    );
    let all = run_ok(&["status"]);
    assert!(all.contains(&format!("port {port}: program id")), "{all}");
    let detached = run_ok(&["detach", "--port", &port]);
    assert!(detached.contains("hash selection again"), "{detached}");
    assert!(hashed(addr, &workers));
    // Its sockets are free again: a new attach steers them.
    run_ok(&[
        "attach",
        "--port",
        &port,
        "--pid",
        &master,
        "--duration",
        "1s",
        "--quiet",
    ]);
    assert_one_line_error(&run(&["status", "--port", &port]), 1, "nothing steers port");
}

#[test]
fn an_attach_ended_by_sighup_detaches() {
    let (_server, addr, master) = start_prefork(&[]);
    let workers = workers_by_cpu(master);
    assert!(workers.len() >= 2, "{workers:?}");
    let (port, master) = (addr.port().to_string(), master.to_string());
    let (attach, mut stdout) = start_attach(&["--port", &port, "--pid", &master]);
    assert!(!hashed(addr, &workers));
    let pid = rustix::process::Pid::from_child(&attach.0);
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    let mut last = String::new();
    stdout.read_line(&mut last).unwrap();
    assert!(last.contains("detached"), "{last:?}");
    assert!(hashed(addr, &workers));
}

#[test]
fn an_attach_whose_reader_goes_away_keeps_steering_then_detaches_when_stopped() {
    // `reuseport attach ... | head -1`: the reader closes the pipe after the first line.
    let (_server, addr, master) = start_prefork(&[]);
    let workers = workers_by_cpu(master);
    assert!(workers.len() >= 2, "{workers:?}");
    let (mut attach, stdout) = spawn_steering_attach(&[
        "--port",
        &addr.port().to_string(),
        "--pid",
        &master.to_string(),
    ]);
    drop(stdout);
    // Live lines now go to a closed pipe (SIGPIPE or EPIPE) for a few seconds.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(attach.try_wait().unwrap().is_none(), "attach ended");
    assert!(!hashed(addr, &workers), "steering stopped");
    let pid = rustix::process::Pid::from_child(&attach);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = attach.wait().unwrap();
    assert!(status.success(), "attach exited with {status}");
    assert!(hashed(addr, &workers), "the program stayed attached");
}

#[test]
fn a_persisted_attach_by_fd_is_detached_by_detach() {
    let cpus = allowed_cpus();
    let (addr, listeners, fd_args) = inherited_group();
    let port = addr.port().to_string();
    let mut args = vec![
        "attach".to_owned(),
        "--port".into(),
        port.clone(),
        "--persist".into(),
    ];
    args.extend(fd_args);
    run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let first = cpus.iter().next().unwrap();
    if cpus.len() >= 2 {
        assert!(!on_hash_selection(first, addr, &listeners), "steered");
    }
    let detached = run_ok(&["detach", "--port", &port]);
    assert!(detached.contains("detached program"), "{detached}");
    if cpus.len() >= 2 {
        assert!(on_hash_selection(first, addr, &listeners), "hash again");
    }
    assert!(!PathBuf::from(format!("/sys/fs/bpf/reuseport/{port}")).exists());
}

#[test]
fn detach_by_the_workers_unprivileged_user_changes_nothing() {
    let (_prefork_dir, prefork) = copy_for_nobody(env!("CARGO_BIN_EXE_prefork-demo"));
    let mut as_nobody = Command::new("setpriv");
    as_nobody.args(AS_NOBODY).arg("--").arg(&prefork);
    let (_server, addr, master) = start_prefork_by(as_nobody, &[]);
    let workers = workers_by_cpu(master);
    assert!(workers.len() >= 2, "{workers:?}");
    let (port, master) = (addr.port().to_string(), master.to_string());
    run_ok(&["attach", "--port", &port, "--pid", &master, "--persist"]);

    // The workers' own user may take their sockets, but not remove root's pins: refused first.
    let (_dir, copy) = copy_for_nobody(BINARY);
    let output = Command::new("setpriv")
        .args(AS_NOBODY)
        .arg("--")
        .arg(&copy)
        .args(["detach", "--port", &port])
        .output()
        .unwrap();
    assert_one_line_error(&output, 1, "run as root; nothing was changed");
    assert!(!hashed(addr, &workers), "still steered");
    let status = run_ok(&["status", "--port", &port]);
    assert!(status.contains("steering: all"), "{status}");

    run_ok(&["detach", "--port", &port]);
    assert!(hashed(addr, &workers));
}

#[test]
fn after_the_server_restarts_status_says_stale_and_detach_cleans_up() {
    let (server, addr, master) = start_prefork(&[]);
    let (port, old_master) = (addr.port().to_string(), master.to_string());
    run_ok(&["attach", "--port", &port, "--pid", &old_master, "--persist"]);
    drop(server);
    let listen = addr.to_string();
    let (_server, _, master) = start_prefork(&["--listen", &listen]);
    let workers = workers_by_cpu(master);
    assert!(workers.len() >= 2, "{workers:?}");
    let status = run_ok(&["status", "--port", &port]);
    assert!(
        status.contains("stale: none of its slots holds a listener"),
        "{status}"
    );
    assert!(
        status.contains(&format!(
            "{} listeners on port {port} are on hash selection",
            workers.len()
        )),
        "{status}"
    );
    assert!(status.contains("unsteered: socket"), "{status}");
    assert!(!status.contains("hole"), "{status}");
    // Without the state file the pins still show.
    std::fs::remove_file(format!("/run/reuseport/{port}.json")).unwrap();
    let status = run_ok(&["status", "--port", &port]);
    assert!(
        status.contains(&format!("pinned in /sys/fs/bpf/reuseport/{port}")),
        "{status}"
    );
    assert!(status.contains("stale"), "{status}");

    let detached = run_ok(&["detach", "--port", &port]);
    assert!(detached.contains("was stale"), "{detached}");
    assert!(!PathBuf::from(format!("/sys/fs/bpf/reuseport/{port}")).exists());
    let master = master.to_string();
    run_ok(&["attach", "--port", &port, "--pid", &master, "--persist"]);
    assert!(!hashed(addr, &workers));
    run_ok(&["detach", "--port", &port]);
    assert!(hashed(addr, &workers));
}

#[test]
fn a_server_in_a_network_namespace_of_its_own_is_seen_by_status_and_detach() {
    let mut in_netns = Command::new("unshare");
    in_netns
        .args(["--net", "--"])
        .arg(env!("CARGO_BIN_EXE_prefork-demo"));
    let (_server, addr, master) = start_prefork_by(in_netns, &["--listen", "0.0.0.0:0"]);
    let workers = workers_by_cpu(master);
    let (port, master) = (addr.port().to_string(), master.to_string());
    run_ok(&["attach", "--port", &port, "--pid", &master, "--persist"]);
    // Its listeners are not in this namespace's /proc/net/tcp, yet they are the ones steered.
    let status = run_ok(&["status", "--port", &port]);
    assert!(
        status.contains(&format!("steering: all {} listeners", workers.len())),
        "{status}"
    );
    assert!(!status.contains("stale"), "{status}");
    let detached = run_ok(&["detach", "--port", &port]);
    assert!(detached.contains("detached program"), "{detached}");
    assert!(!PathBuf::from(format!("/sys/fs/bpf/reuseport/{port}")).exists());
}

/// `reuseport attach --follow ARGS` running until stopped, its stdout lines on a channel (so a
/// test waits for a line with a deadline rather than forever).
fn start_follow(
    args: &[&str],
) -> (
    Guard,
    std::sync::mpsc::Receiver<String>,
    std::process::ChildStderr,
) {
    let mut child = Command::new(BINARY)
        .args(["attach", "--follow", "--quiet"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start attach --follow");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let stderr = child.stderr.take().unwrap();
    let (send, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    (Guard(child), lines, stderr)
}

/// The next line containing `needle` within `timeout` (lines before it are passed over).
fn line_with(lines: &std::sync::mpsc::Receiver<String>, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut passed = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => passed.push(line),
            Err(err) => panic!("no line with {needle:?} within {timeout:?} ({err}): {passed:?}"),
        }
    }
}

/// Whether every one of `count` clients on each worker's CPU was served by that worker.
fn each_cpu_served_locally(addr: SocketAddr, workers: &[(u32, u32)], count: usize) -> bool {
    workers
        .iter()
        .all(|&(cpu, pid)| worker_pids_from(cpu, addr, count).iter().all(|&p| p == pid))
}

/// Waits until clients on each worker's CPU are served by that worker; returns how long it
/// took, failing after `limit`.
fn time_until_steered(addr: SocketAddr, workers: &[(u32, u32)], limit: Duration) -> Duration {
    let start = Instant::now();
    // 20 clients per CPU all reaching the local worker by hash: 2 x 2^-20 with two workers.
    while !each_cpu_served_locally(addr, workers, 20) {
        assert!(
            start.elapsed() < limit,
            "clients on each CPU not served by their worker {:?} after nginx (re)started",
            limit
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn attach_follow_steers_nginx_again_after_each_restart_and_reload() {
    if allowed_cpus().len() < 2 {
        return;
    }
    let addr = free_addr();
    let port = addr.port().to_string();
    let (nginx, master, workers) = start_nginx(addr, "worker_cpu_affinity auto;");
    let (attach, lines, _stderr) = start_follow(&["--port", &port, "--pid", &master.to_string()]);
    let first = line_with(&lines, "reuseport: steering port", Duration::from_secs(10));
    assert!(first.contains("following the server"), "{first}");
    assert!(each_cpu_served_locally(addr, &workers, 20));

    let mut nginx = Some(nginx);
    let mut master = master;
    for restart in 1..=2 {
        // Stop nginx (its master closes the listeners): attach --follow says so and waits.
        drop(nginx.take());
        let gone = line_with(&lines, "is gone; waiting", Duration::from_secs(5));
        assert!(gone.contains(&format!("pid {master}")), "{gone}");
        // A fresh master with new sockets: steered again within a second of its workers.
        let (fresh, fresh_master, fresh_workers) = start_nginx(addr, "worker_cpu_affinity auto;");
        assert_ne!(fresh_master, master);
        let took = time_until_steered(addr, &fresh_workers, Duration::from_secs(1));
        eprintln!("restart {restart}: steered {took:?} after nginx's workers were pinned");
        let back = line_with(&lines, "the server is back", Duration::from_secs(1));
        assert!(back.contains(&format!("pid {fresh_master}")), "{back}");
        nginx = Some(fresh);
        master = fresh_master;
    }

    // A reload (SIGHUP): the same master, new workers on the same sockets.
    let before = workers_by_cpu(master);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(master as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let reloaded = loop {
        let now = workers_by_cpu(master);
        if now.len() == before.len() && now.iter().all(|w| !before.contains(w)) {
            break now;
        }
        assert!(Instant::now() < deadline, "nginx did not reload: {now:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = time_until_steered(addr, &reloaded, Duration::from_secs(1));
    eprintln!("reload: steered {took:?} after the new workers were pinned");
    let again = line_with(
        &lines,
        "new workers; steering again",
        Duration::from_secs(1),
    );
    assert!(again.contains("program id"), "{again}");

    // Ctrl-C (SIGTERM) detaches the steering it holds then.
    let pid = rustix::process::Pid::from_child(&attach.0);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    line_with(&lines, "detached", Duration::from_secs(5));
    assert!(hashed(addr, &reloaded));
    drop(attach);
}

#[test]
fn attach_follow_with_fds_or_mode_hash_is_refused() {
    assert_one_line_error(
        &run(&[
            "attach", "--port", "80", "--follow", "--fd", "0", "--cpu", "0",
        ]),
        2,
        "--follow",
    );
    assert_one_line_error(
        &run(&[
            "attach", "--port", "80", "--pid", "1", "--follow", "--mode", "hash",
        ]),
        1,
        "--mode hash detaches once",
    );
}

/// `status ARGS --json`'s reports, checked to parse as the documented type.
fn status_json(args: &[&str]) -> Vec<reuseport::port_report::PortReport> {
    let text = run_ok(&[&["status", "--json"], args].concat());
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn status_json_and_watch_describe_an_attached_server() {
    let (_server, addr, master) = start_prefork(&[]);
    let workers = workers_by_cpu(master);
    assert!(!workers.is_empty(), "{workers:?}");
    let (port, master_arg) = (addr.port().to_string(), master.to_string());
    let attach = start_attach(&["--port", &port, "--pid", &master_arg]);
    let attach_pid = attach.0.0.id();

    let reports = status_json(&["--port", &port]);
    assert_eq!(reports.len(), 1, "{reports:?}");
    let report = &reports[0];
    assert_eq!(report.port, addr.port());
    assert_eq!(report.verdict, "steered");
    assert_eq!(report.unsteered, 0);
    assert_eq!(report.listeners.len(), workers.len(), "{report:?}");
    assert!(report.listeners.iter().all(|l| l.steered), "{report:?}");
    assert_eq!(report.programs.len(), 1, "{report:?}");
    let program = &report.programs[0];
    assert!(program.steers && !program.pinned, "{program:?}");
    assert_eq!(program.held_by, [attach_pid], "{program:?}");
    assert!(
        report.pinned.is_none() && report.pin_dir.is_none(),
        "{report:?}"
    );
    // Slot k holds the listener that the worker pinned to CPU k holds.
    let cpus: Vec<u32> = program.slots.iter().map(|s| s.cpu).collect();
    assert_eq!(cpus, workers.iter().map(|w| w.0).collect::<Vec<_>>());
    for slot in &program.slots {
        let worker = workers.iter().find(|w| w.0 == slot.cpu).unwrap().1;
        let listener = report
            .listeners
            .iter()
            .find(|l| Some(l.inode) == slot.listener_inode)
            .unwrap_or_else(|| panic!("slot {slot:?} holds no listener: {report:?}"));
        assert_eq!(Some(slot.cookie), listener.cookie);
        assert!(
            listener.holders.iter().any(|h| h.pid == worker),
            "{listener:?} not held by worker {worker}"
        );
    }
    // The same through `status` without --port.
    assert!(status_json(&[]).iter().any(|r| r == report));

    // --watch piped: one block per second, two of them with --count 2.
    let started = Instant::now();
    let watched = run_ok(&["status", "--port", &port, "--watch", "--count", "2"]);
    let blocks = watched
        .matches(&format!("port {port}: program id {}", program.id))
        .count();
    assert_eq!(blocks, 2, "{watched}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "refreshed too fast"
    );
    let lines = run_ok(&[
        "status", "--port", &port, "--watch", "--count", "2", "--json",
    ]);
    assert_eq!(lines.lines().count(), 2, "{lines}");
    for line in lines.lines() {
        let reports: Vec<reuseport::port_report::PortReport> = serde_json::from_str(line).unwrap();
        assert_eq!(reports[0].verdict, "steered");
    }
    stop_attach(attach);

    // Pinned: the recorded slots and counters are there too.
    run_ok(&["attach", "--port", &port, "--pid", &master_arg, "--persist"]);
    worker_pids_from(workers[0].0, addr, 5);
    let reports = status_json(&["--port", &port]);
    let pinned = reports[0].pinned.as_ref().expect("pinned report");
    assert_eq!(
        Some(pinned.program_id),
        reports[0].programs.first().map(|p| p.id)
    );
    assert_eq!(pinned.slots.len(), workers.len());
    assert!(pinned.slots.iter().all(|s| s.state == "live"), "{pinned:?}");
    assert!(pinned.total.local >= 5, "{pinned:?}");
    run_ok(&["detach", "--port", &port]);
    // Watching a port nothing steers says so rather than failing.
    let none = run_ok(&["status", "--port", &port, "--watch", "--count", "1"]);
    assert!(
        none.contains(&format!("port {port}: nothing steers it")),
        "{none}"
    );
}

#[test]
fn attach_follow_persist_keeps_the_pins_current_and_leaves_them_when_it_ends() {
    if allowed_cpus().len() < 2 {
        return;
    }
    let addr = free_addr();
    let port = addr.port().to_string();
    let (nginx, master, _) = start_nginx(addr, "worker_cpu_affinity auto;");
    let (mut attach, lines, _stderr) =
        start_follow(&["--port", &port, "--pid", &master.to_string(), "--persist"]);
    line_with(&lines, "reuseport: steering port", Duration::from_secs(10));
    let before = status_json(&["--port", &port]);
    let first_id = before[0].pinned.as_ref().expect("pinned").program_id;

    drop(nginx);
    line_with(&lines, "is gone; waiting", Duration::from_secs(5));
    let (_nginx, fresh_master, workers) = start_nginx(addr, "worker_cpu_affinity auto;");
    line_with(&lines, "the server is back", Duration::from_secs(2));
    time_until_steered(addr, &workers, Duration::from_secs(1));
    let after = status_json(&["--port", &port]);
    assert_eq!(after[0].verdict, "steered", "{after:?}");
    let pinned = after[0].pinned.as_ref().expect("pinned again");
    assert_ne!(
        pinned.program_id, first_id,
        "a new program for the new group"
    );
    assert_eq!(pinned.pids, [fresh_master]);

    // Ending the follower leaves the (current) pins in place.
    let pid = rustix::process::Pid::from_child(&attach.0);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    line_with(&lines, "the steering stays pinned", Duration::from_secs(5));
    assert!(attach.0.wait().unwrap().success());
    assert!(each_cpu_served_locally(addr, &workers, 20));
    assert_eq!(status_json(&["--port", &port])[0].verdict, "steered");
    run_ok(&["detach", "--port", &port]);
    assert!(hashed(addr, &workers));
}

/// Pins process `pid` to `cpu` from outside (as `taskset -p` does).
fn repin(pid: u32, cpu: u32) {
    let mut mask = rustix::thread::CpuSet::new();
    mask.set(cpu as usize);
    rustix::thread::sched_setaffinity(
        Some(rustix::process::Pid::from_raw(pid as i32).unwrap()),
        &mask,
    )
    .unwrap();
}

#[test]
fn attach_follow_steers_workers_pinned_to_other_cpus_again() {
    let Some((a, b)) = two_cpus() else {
        return;
    };
    let addr = free_addr();
    let port = addr.port().to_string();
    let (_nginx, master, workers) = start_nginx(addr, "worker_cpu_affinity auto;");
    let (attach, lines, _stderr) = start_follow(&["--port", &port, "--pid", &master.to_string()]);
    line_with(&lines, "reuseport: steering port", Duration::from_secs(10));
    let pid_on = |cpu: u32| workers.iter().find(|w| w.0 == cpu).unwrap().1;
    let (on_a, on_b) = (pid_on(a), pid_on(b));
    // Swap the two workers' CPUs: for a moment both are on one CPU (said only if it lasts).
    repin(on_a, b);
    repin(on_b, a);
    let line = line_with(&lines, "workers on other CPUs", Duration::from_secs(2));
    assert!(line.contains(&format!("cpu{a} <- pid {on_b}")), "{line}");
    let swapped = [(a, on_b), (b, on_a)];
    time_until_steered(addr, &swapped, Duration::from_secs(1));
    // Both on one CPU for good: said once, and the last steering stays.
    repin(on_b, b);
    let said = line_with(&lines, "cannot steer the server", Duration::from_secs(3));
    assert!(said.contains(&format!("both pinned to CPU {b}")), "{said}");
    assert!(each_cpu_served_locally(addr, &[(b, on_a)], 20));
    stop_follow(attach, &lines);
}

/// Stops an `attach --follow` with SIGTERM: it detaches, says so and exits successfully.
fn stop_follow(mut attach: Guard, lines: &std::sync::mpsc::Receiver<String>) {
    let pid = rustix::process::Pid::from_child(&attach.0);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    line_with(lines, "detached", Duration::from_secs(5));
    assert!(attach.0.wait().unwrap().success());
}
