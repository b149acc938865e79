//! `serve` under a service manager: readiness, reloading (SIGHUP) and stopping sent to the
//! datagram socket named by `NOTIFY_SOCKET`, read here as systemd would.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use rustix::process::{Pid, Signal, kill_process};

#[test]
fn serve_notifies_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, socket) = notify_socket(dir.path());
    let mut child = Command::new(BINARY)
        .args([
            "serve",
            "--mode",
            "percpu",
            "--listen",
            "127.0.0.1:0",
            "--quiet",
        ])
        .env("NOTIFY_SOCKET", &path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn reuseport");
    let pid = Pid::from_child(&child);

    let ready = next_notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=serving on 127.0.0.1:")),
        "{ready:?}"
    );

    kill_process(pid, Signal::HUP).expect("SIGHUP");
    let reloading = next_notification(&socket);
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "notify-reload needs MONOTONIC_USEC with RELOADING: {reloading:?}"
    );
    let again = next_notification(&socket);
    assert!(again.lines().any(|l| l == "READY=1"), "{again:?}");

    kill_process(pid, Signal::TERM).expect("SIGTERM");
    let stopping = next_notification(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "serve did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// The response to the request already sent on `stream`.
fn request_response(mut stream: std::net::TcpStream) -> Vec<u8> {
    use std::io::Read as _;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    // Up to the end of the head: the demo server keeps the connection open.
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).expect("read the response");
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    response
}

/// A free TCP port on 127.0.0.1 (bound and released; the tests that use it bind it at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Reads `child`'s stdout lines on a channel.
fn stdout_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn a_socket_activated_without_reuseport_is_explained() {
    // Debian's systemd-socket-activate, like a .socket unit without ReusePort=yes, passes a
    // socket without SO_REUSEPORT: no group to steer.
    let port = free_port();
    let child = Command::new("systemd-socket-activate")
        .args([
            "-l",
            &format!("127.0.0.1:{port}"),
            BINARY,
            "serve",
            "--mode",
            "percpu",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run systemd-socket-activate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("wait");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("without SO_REUSEPORT") && stderr.contains("ReusePort=yes"),
        "{stderr}"
    );
}

#[test]
fn one_activated_reuseport_socket_gets_a_listener_per_cpu_added_and_survives_restarts() {
    let cpus: Vec<u32> = allowed_cpus().iter().collect();
    let (socket, addr) = reuseport_listener();
    // A connection the manager queued before serve started: served once it runs.
    let mut early = std::net::TcpStream::connect(addr).expect("connect before serve starts");
    {
        use std::io::Write as _;
        early
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .expect("send");
    }
    let mut command = activated(&[], &["serve", "--mode", "percpu"], &socket);
    let mut child = command.spawn().expect("spawn");
    let lines = stdout_lines(&mut child);
    let said = lines
        .recv_timeout(Duration::from_secs(10))
        .and_then(|_| lines.recv_timeout(Duration::from_secs(10)))
        .expect("the socket activation line");
    assert!(
        said.contains(&format!(
            "1 listener(s) from the service manager (socket activation), {} added",
            cpus.len() - 1
        )),
        "{said}"
    );
    assert!(request_response(early).starts_with(b"HTTP/1.1 200"));
    for round in 0..2 {
        for &cpu in &cpus {
            for served in http_gets_from(cpu, addr, 10) {
                assert_eq!(
                    served.worker_cpu, cpu,
                    "round {round}: not steered to CPU {cpu}"
                );
            }
        }
        if round == 0 {
            kill_process(Pid::from_child(&child), Signal::HUP).expect("SIGHUP");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let line = lines
                    .recv_timeout(Duration::from_secs(20))
                    .expect("the restart line");
                if line.contains("SIGHUP: restarted") {
                    break;
                }
                assert!(Instant::now() < deadline, "no restart line");
            }
        }
    }
    kill_process(Pid::from_child(&child), Signal::TERM).expect("SIGTERM");
    let output = child.wait_with_output().expect("wait");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The manager's socket is still open and listening (serve closed only its own copy).
    assert!(socket.is_listener().expect("SO_ACCEPTCONN"));
}
