//! Real clients for the integration tests: threads pinned to one CPU making real loopback
//! connections. A pinned loopback sender's SYN is processed in softirq on the sender's own CPU (the
//! kernel selftest reuseport_bpf_cpu relies on the same), so "the CPU that received the
//! connection" is the client's CPU.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use reuseport::{
    CpuList, PerCpuListeners, Protocol, Steering, cpus::pin_current_thread,
    steering::SteeringProgram,
};

/// The `reuseport` binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_reuseport");

/// `setpriv` arguments that drop every capability (uid stays 0, so files stay readable).
pub const WITHOUT_CAPABILITIES: &[&str] = &["--bounding-set=-all", "--inh-caps=-all", "--"];

/// A `reuseport serve` process whose stdout lines arrive on a channel.
pub struct ServeProcess {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub addr: SocketAddr,
    pub program_id: Option<u32>,
    /// The first stdout line ("reuseport: serving ...").
    pub first_line: String,
}

impl ServeProcess {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(&[], args)
    }

    /// `reuseport serve ARGS` run through `wrapper` (e.g. `setpriv ... --`).
    pub fn start_with(wrapper: &[&str], args: &[&str]) -> Self {
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(BINARY);
                command
            }
            None => Command::new(BINARY),
        };
        let mut child = command
            .arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn reuseport");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the serving line");
        let addr = served_address(&first);
        let program_id = first
            .split_once("steering program id ")
            .and_then(|(_, rest)| rest.split(';').next())
            .and_then(|id| id.parse().ok());
        Self {
            child,
            lines,
            addr,
            program_id,
            first_line: first,
        }
    }

    /// Waits for exit; returns the exit status, the rest of stdout, and stderr.
    pub fn finish(mut self) -> (std::process::ExitStatus, Vec<String>, String) {
        let status = self.child.wait().expect("wait");
        let stderr = std::io::read_to_string(self.child.stderr.take().expect("stderr"))
            .expect("read stderr");
        (status, self.lines.iter().collect(), stderr)
    }
}

/// The address in `serve`'s first line: "reuseport: serving http on 127.0.0.1:PORT with workers on
/// CPUs ..., steering program id N; ...".
pub fn served_address(first_line: &str) -> SocketAddr {
    first_line
        .split_once(" on ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {first_line:?}"))
}

/// Connections each pinned client makes (the issue asks for at least 200 per CPU).
pub const CONNECTIONS_PER_CPU: usize = 200;

/// Where one response says it was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    pub worker_cpu: u32,
    pub incoming_cpu: u32,
}

/// The CPUs this test process may use.
pub fn allowed_cpus() -> CpuList {
    CpuList::allowed().expect("sched_getaffinity")
}

/// Runs `f` on a thread pinned to `cpu` and returns its result.
pub fn on_cpu<T: Send + 'static>(cpu: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    thread::spawn(move || {
        pin_current_thread(cpu).expect("pin client thread");
        f()
    })
    .join()
    .expect("client thread panicked")
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`); returns the raw response.
/// Panics if the connection is refused or reset, so "none refused" is part of every test that
/// uses it.
fn http_exchange(addr: SocketAddr) -> Vec<u8> {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    request_on(stream)
}

/// One HTTP/1.1 request (`Connection: close`) on a connected `stream`; the raw response.
pub fn request_on(mut stream: TcpStream) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set timeout");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    response
}

/// One request to our server: where it says it was served.
pub fn http_get(addr: SocketAddr) -> Served {
    parse_served(&http_exchange(addr))
}

/// One HTTP/1.1 request on a fresh connection; returns the response header `name`.
pub fn http_get_header(addr: SocketAddr, name: &str) -> String {
    let response = http_exchange(addr);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    parsed.parse(&response).expect("valid HTTP response");
    parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| String::from_utf8_lossy(h.value).into_owned())
        .unwrap_or_else(|| panic!("no {name} header"))
}

/// `count` requests from a thread pinned to `cpu`; the `X-Worker-Pid` of each response.
pub fn worker_pids_from(cpu: u32, addr: SocketAddr, count: usize) -> Vec<u32> {
    on_cpu(cpu, move || {
        (0..count)
            .map(|_| {
                http_get_header(addr, "x-worker-pid")
                    .parse()
                    .expect("a pid")
            })
            .collect()
    })
}

/// Reads `x-worker-cpu` and `x-incoming-cpu` from a raw HTTP response.
pub fn parse_served(response: &[u8]) -> Served {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut headers);
    parsed.parse(response).expect("valid HTTP response");
    assert_eq!(parsed.code, Some(200), "status");
    let header = |name: &str| -> u32 {
        let value = parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .unwrap_or_else(|| panic!("no {name} header"))
            .value;
        std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {value:?} is not a CPU"))
    };
    Served {
        worker_cpu: header("x-worker-cpu"),
        incoming_cpu: header("x-incoming-cpu"),
    }
}

/// `count` HTTP requests, each on a new connection, from a thread pinned to `cpu`.
pub fn http_gets_from(cpu: u32, addr: SocketAddr, count: usize) -> Vec<Served> {
    on_cpu(cpu, move || (0..count).map(|_| http_get(addr)).collect())
}

/// `count` UDP request/replies from a socket pinned to `cpu`; returns the `worker-cpu` each reply's
/// first line (`worker-cpu=N incoming-cpu=M`) names, and checks the payload is echoed.
/// (`incoming-cpu` is `unknown` for UDP: the kernel records it only for connected UDP sockets.)
pub fn udp_requests_from(cpu: u32, addr: SocketAddr, count: usize) -> Vec<u32> {
    on_cpu(cpu, move || {
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::1]:0".parse().unwrap()
        } else {
            "127.0.0.1:0".parse().unwrap()
        };
        (0..count)
            .map(|i| {
                // A new socket (new source port, new 4-tuple) per request, like a new connection.
                let socket = UdpSocket::bind(bind).expect("bind client");
                socket
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("set timeout");
                let payload = format!("request {i}");
                socket.send_to(payload.as_bytes(), addr).expect("send");
                let mut reply = [0u8; 512];
                let len = socket.recv(&mut reply).expect("reply within 5 s");
                let reply = std::str::from_utf8(&reply[..len]).expect("utf-8 reply");
                let (first, echoed) = reply.split_once('\n').expect("two lines");
                assert_eq!(echoed, payload, "payload echoed");
                let (worker, incoming) = first
                    .strip_prefix("worker-cpu=")
                    .and_then(|rest| rest.split_once(" incoming-cpu="))
                    .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
                assert!(
                    incoming == "unknown" || incoming.parse::<u32>().is_ok(),
                    "{first:?}"
                );
                worker
                    .parse()
                    .unwrap_or_else(|_| panic!("worker-cpu in {first:?}"))
            })
            .collect()
    })
}

/// Accepts one pending connection from whichever of `listeners` (labelled by CPU) has it, within
/// 5 s; returns that listener's CPU.
pub fn accept_from(listeners: &[(u32, TcpListener)]) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for (cpu, listener) in listeners {
            match listener.accept() {
                Ok(_) => return *cpu,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        assert!(Instant::now() < deadline, "no listener got the connection");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Whether clients on `cpu` reach more than one of `listeners` (40 connections): hash selection
/// spreads them (all on one listener has odds of 2^-39 with two), steering keeps them on one.
pub fn on_hash_selection(cpu: u32, addr: SocketAddr, listeners: &[(u32, TcpListener)]) -> bool {
    let reached: std::collections::BTreeSet<u32> = (0..40)
        .map(|_| {
            let _client = on_cpu(cpu, move || TcpStream::connect(addr).expect("connect"));
            accept_from(listeners)
        })
        .collect();
    reached.len() > 1
}

/// A failure is exactly one line on stderr, exits with `code`, and mentions `needle`.
pub fn assert_one_line_error(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
}

/// The first two CPUs this process may use, or `None` (after saying the test is skipped).
pub fn two_cpus() -> Option<(u32, u32)> {
    let cpus = allowed_cpus();
    match (cpus.iter().next(), cpus.iter().nth(1)) {
        (Some(a), Some(b)) => Some((a, b)),
        _ => {
            eprintln!("skipped: needs two CPUs, this process may use {cpus}");
            None
        }
    }
}

/// A TCP group with one listener per CPU in `cpus`, steered by `program`, but with no workers:
/// the test accepts by hand. Returns the address, the steering and the listeners.
pub fn steered_group(
    cpus: &[u32],
    program: SteeringProgram,
) -> (SocketAddr, Steering, Vec<(u32, TcpListener)>) {
    steered_group_with(cpus, program, false)
}

/// [`steered_group`], with the program loaded with its spill branch when `spill` is set.
pub fn steered_group_with(
    cpus: &[u32],
    program: SteeringProgram,
    spill: bool,
) -> (SocketAddr, Steering, Vec<(u32, TcpListener)>) {
    let (addr, listeners) = unsteered_group(cpus);
    let fds: Vec<_> = listeners
        .iter()
        .map(|(cpu, listener)| (*cpu, listener.as_fd()))
        .collect();
    let steering = Steering::load(program, spill)
        .and_then(|loaded| loaded.attach_listening(&fds))
        .expect("attach");
    (addr, steering, listeners)
}

/// A TCP group on 127.0.0.1 with one listener per CPU in `cpus`, not steered, no workers.
pub fn unsteered_group(cpus: &[u32]) -> (SocketAddr, Vec<(u32, TcpListener)>) {
    let group = PerCpuListeners::bind(
        "127.0.0.1:0".parse().unwrap(),
        Protocol::Tcp,
        &cpus.iter().copied().collect(),
        256,
    )
    .expect("bind");
    let addr = group.local_addr();
    let listeners = group
        .into_inner()
        .into_iter()
        .map(|l| (l.cpu, TcpListener::from(l.socket)))
        .collect();
    (addr, listeners)
}

/// Waits (up to 5 s) until the task whose `/proc/.../stat` is `stat_path` is in `state` (e.g.
/// `S` asleep, `T` stopped): signals and wakeups take effect asynchronously.
pub fn wait_for_state(stat_path: &str, state: char) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(stat_path).expect("stat");
        // The state follows the command name, which is in parentheses.
        let now = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if now == Some(state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{stat_path} never reached state {state}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Whether `net.ipv4.tcp_migrate_req` is on, so the kernel migrates a closing listener's queue
/// even without our program (and a test showing resets without migration must be skipped; it
/// says so).
pub fn kernel_migrates_anyway() -> bool {
    let sysctl = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").unwrap_or_default();
    let on = sysctl.trim() != "0";
    if on {
        eprintln!("skipped: net.ipv4.tcp_migrate_req is on, so the kernel migrates anyway");
    }
    on
}

/// One keep-alive HTTP/1.1 request on `stream`; `Ok(true)` when the server keeps the connection
/// open, `Ok(false)` when the response says `connection: close`. Reads exactly one response
/// (headers, then `content-length` bytes of body), within the stream's read timeout.
pub fn keep_alive_request(stream: &mut TcpStream) -> std::io::Result<bool> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut buffer = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let mut read_more = |buffer: &mut Vec<u8>| {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::from(ErrorKind::UnexpectedEof));
        }
        buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    };
    loop {
        if let Some(head) = reuseport_lab::load::parse_response_head(&buffer)? {
            while buffer.len() < head.total() {
                read_more(&mut buffer)?;
            }
            return Ok(head.keep_alive);
        }
        read_more(&mut buffer)?;
    }
}

/// A new connection to `addr` with a 5 s read timeout.
pub fn connect_with_timeout(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Waits (up to `limit`) until `stream`'s peer has closed it: `Some(elapsed)` when a read returns
/// end of file or a reset, `None` if it is still open after `limit`. Anything the server sent
/// before closing is read and discarded.
pub fn wait_for_close(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).expect("set timeout");
        match stream.read(&mut chunk) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(_) => return Some(started.elapsed()),
        }
    }
}

/// Maps 1 MiB of anonymous memory, touches it and unmaps it: each call takes the process's mmap
/// lock for writing twice, so threads doing this in a loop contend on it (a known lock for the
/// probes' tests).
pub fn map_touch_unmap() {
    // SAFETY: a fresh anonymous mapping, touched once and unmapped.
    unsafe {
        let len = 1 << 20;
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        *(p as *mut u8) = 1;
        libc::munmap(p, len);
    }
}

/// A datagram socket at `DIR/notify.sock` to read a service's `NOTIFY_SOCKET` messages from,
/// each read waiting at most 15 s.
pub fn notify_socket(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::os::unix::net::UnixDatagram) {
    let path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    (path, socket)
}

/// The next notification on `socket` (one datagram, `KEY=value` lines).
pub fn next_notification(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// What a `.socket` unit with `ReusePort=yes` makes: a listening `SO_REUSEPORT` TCP socket on
/// 127.0.0.1 (a free port), and its address.
pub fn reuseport_listener() -> (socket2::Socket, SocketAddr) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&any.into()).expect("bind");
    socket.listen(128).expect("listen");
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("addr");
    (socket, addr)
}

/// `wrapper... reuseport ARGS...` started the way a service manager starts an activated service:
/// `socket` as descriptor 3, `LISTEN_FDS=1` and `LISTEN_PID` its pid (set by a shell that then
/// execs it), stdout and stderr piped.
pub fn activated(wrapper: &[&str], args: &[&str], socket: &socket2::Socket) -> Command {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let raw = socket.as_raw_fd();
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut command = Command::new(program);
            command.args(rest).arg("sh");
            command
        }
        None => Command::new("sh"),
    };
    // LISTEN_PID is the shell's pid, which `exec` hands to reuseport.
    command
        .args([
            "-c",
            "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"",
            BINARY,
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the closure only calls dup2 and fcntl, which are
    // async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            let moved = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if moved < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// A TCP listener on `topology`'s server address (port chosen by the kernel), created in its
/// server namespace.
pub fn listener_in_server_namespace(topology: &reuseport_lab::topology::Topology) -> TcpListener {
    let server_ip = topology.server_ip();
    topology
        .in_server_namespace(move || {
            TcpListener::bind(SocketAddr::new(server_ip, 0)).expect("bind")
        })
        .expect("server namespace")
        .expect("in the server namespace")
}

/// Threads that each repeat some work until stopped (or for 25 s at most), for forcing
/// contention: one thread per entry of `cpus`, pinned there when it is `Some`.
pub struct Repeaters {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Repeaters {
    /// Starts one thread per entry of `cpus`; `make()` builds that thread's work (on the
    /// calling thread, so it can clone what the work needs), which then runs in a loop.
    pub fn start<W: FnMut() + Send + 'static>(
        cpus: impl IntoIterator<Item = Option<u32>>,
        mut make: impl FnMut() -> W,
    ) -> Self {
        use std::sync::{Arc, atomic::AtomicBool};
        let stop = Arc::new(AtomicBool::new(false));
        let threads = cpus
            .into_iter()
            .map(|cpu| {
                let mut work = make();
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_current_thread(cpu).expect("pin");
                    }
                    let end = Instant::now() + Duration::from_secs(25);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                        work();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Stops every thread and waits for it.
    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("a repeating thread panicked");
        }
    }
}

/// The CPUs task `pid` (a thread id) may run on, from its `Cpus_allowed_list`.
pub fn thread_affinity(pid: u32) -> Vec<u32> {
    reuseport::align::napi::thread_cpus(std::path::Path::new("/proc"), pid)
        .expect("the thread's affinity")
}

/// Calls `read` every 200 ms until `done` holds for what it returned, or 20 s have passed;
/// returns the last reading.
pub fn poll_until<T>(mut read: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let reading = read();
        if done(&reading) || Instant::now() > end {
            return reading;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Polls the probes' lock sites until `done` holds for them (at most 20 s); returns the last.
pub fn wait_for_sites(
    probes: &reuseport_lab::probes::Probes,
    done: impl Fn(&[reuseport_lab::locks::LockSite]) -> bool,
) -> Vec<reuseport_lab::locks::LockSite> {
    poll_until(
        || probes.lock_sites().expect("lock sites"),
        |sites| done(sites),
    )
}

/// The lock probes attached, with this process's waits counted as `side`'s.
pub fn probes_watching_this_process(
    side: reuseport_lab::locks::Side,
) -> reuseport_lab::probes::Probes {
    let mut probes = reuseport_lab::probes::Probes::attach(1).expect("attach probes");
    probes
        .watch_process(std::process::id(), side)
        .expect("watch this process");
    probes
}
