//! The example units under `contrib/systemd`: each is valid for `systemd-analyze verify`, and the
//! service's own command line, run the way the units run it (the socket unit's `SO_REUSEPORT`
//! socket passed as descriptor 3, no capability but CAP_BPF, a notify socket), becomes ready,
//! steers and stops.

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use common::*;
use rustix::process::{Pid, Signal, kill_process};

/// The unit files under `contrib/systemd`, drop-ins included.
fn units() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    let mut found = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("contrib/systemd") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// `text` with the installed binary's path replaced by the one under test.
fn with_this_binary(text: &str) -> String {
    text.replace("/usr/local/bin/reuseport", BINARY)
}

#[test]
fn every_service_and_socket_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let units: Vec<PathBuf> = units()
        .into_iter()
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "service" || ext == "socket")
        })
        .collect();
    assert!(
        units
            .iter()
            .any(|unit| unit.extension().is_some_and(|ext| ext == "socket")),
        "no socket unit under contrib/systemd"
    );
    // All in one directory, so that a socket unit finds its service.
    let copies: Vec<PathBuf> = units
        .iter()
        .map(|unit| {
            let copy = dir.path().join(unit.file_name().expect("a file name"));
            fs::write(
                &copy,
                with_this_binary(&fs::read_to_string(unit).expect("read unit")),
            )
            .expect("write unit");
            copy
        })
        .collect();
    for (unit, copy) in units.iter().zip(&copies) {
        let output = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(copy)
            .output()
            .expect("run systemd-analyze");
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && said.trim().is_empty(),
            "{}: {said}",
            unit.display()
        );
    }
}

#[test]
fn the_serve_unit_with_its_socket_and_only_cap_bpf_becomes_ready_steers_and_stops() {
    let unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd/reuseport-serve.service"),
    )
    .expect("read the unit");
    let socket_unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd/reuseport-serve.socket"),
    )
    .expect("read the socket unit");
    for line in [
        "CapabilityBoundingSet=CAP_BPF",
        "AmbientCapabilities=CAP_BPF",
        "User=root",
        "Type=notify",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line} in the service");
    }
    assert!(socket_unit.lines().any(|l| l == "ReusePort=yes"));
    let exec = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    // Its arguments (the socket comes from the manager; metrics on a free port).
    let args: Vec<String> = exec
        .split_whitespace()
        .skip(1)
        .map(|arg| match arg {
            "127.0.0.1:9464" => "127.0.0.1:0".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let (path, socket) = notify_socket(dir.path());
    // The socket unit's socket, passed as systemd passes it; the service's privileges:
    // root's uid, no capability but CAP_BPF.
    let (listener, addr) = reuseport_listener();
    let child = activated(
        &[
            "setpriv",
            "--bounding-set=-all,+bpf",
            "--inh-caps=-all",
            "--",
        ],
        &args,
        &listener,
    )
    .env("NOTIFY_SOCKET", &path)
    .spawn()
    .expect("spawn setpriv");
    let ready = next_notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.contains(&format!("STATUS=serving on {addr} ")),
        "serves the passed socket's address: {ready:?}"
    );
    for cpu in allowed_cpus().iter() {
        for served in http_gets_from(cpu, addr, 10) {
            assert_eq!(served.worker_cpu, cpu, "steered with CAP_BPF alone");
        }
    }
    kill_process(Pid::from_child(&child), Signal::TERM).expect("SIGTERM");
    assert!(next_notification(&socket).contains("STOPPING=1"));
    let output = child.wait_with_output().expect("wait");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
