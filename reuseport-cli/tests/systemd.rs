//! `serve` under a service manager: readiness, reloading (SIGHUP) and stopping sent to the
//! datagram socket named by `NOTIFY_SOCKET`, read here as systemd would.

mod common;

use std::{
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use rustix::process::{Pid, Signal, kill_process};

/// The next notification on `socket` (one datagram, `KEY=value` lines).
fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn serve_notifies_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
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

    let ready = next_message(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=serving on 127.0.0.1:")),
        "{ready:?}"
    );

    kill_process(pid, Signal::HUP).expect("SIGHUP");
    let reloading = next_message(&socket);
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "notify-reload needs MONOTONIC_USEC with RELOADING: {reloading:?}"
    );
    let again = next_message(&socket);
    assert!(again.lines().any(|l| l == "READY=1"), "{again:?}");

    kill_process(pid, Signal::TERM).expect("SIGTERM");
    let stopping = next_message(&socket);
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
