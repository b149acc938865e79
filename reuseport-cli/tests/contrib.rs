//! The example units under `contrib/systemd`: each is valid for `systemd-analyze verify`, and the
//! service's own command line, run the way the unit runs it (an unprivileged user whose only
//! capability is an ambient CAP_BPF, a notify socket), becomes ready, steers and stops.

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
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
fn the_serve_unit_command_with_only_cap_bpf_becomes_ready_steers_and_stops() {
    let unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd/reuseport-serve.service"),
    )
    .expect("read the unit");
    let exec = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    assert!(unit.lines().any(|l| l == "AmbientCapabilities=CAP_BPF"));
    assert!(unit.lines().any(|l| l == "CapabilityBoundingSet=CAP_BPF"));
    assert!(unit.lines().any(|l| l == "Type=notify"));
    // Its arguments, on free ports so the test can run beside anything else.
    let args: Vec<String> = exec
        .split_whitespace()
        .skip(1)
        .map(|arg| match arg {
            "0.0.0.0:8080" => "127.0.0.1:0".to_owned(),
            "127.0.0.1:9464" => "127.0.0.1:0".to_owned(),
            other => other.to_owned(),
        })
        .collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let (path, socket) = notify_socket(dir.path());
    // The unprivileged user must be able to reach the socket, as systemd's is.
    fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    // What DynamicUser=yes, AmbientCapabilities=CAP_BPF and CapabilityBoundingSet=CAP_BPF do.
    let child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+bpf",
            "--ambient-caps=-all,+bpf",
            "--bounding-set=-all,+bpf",
            "--",
            BINARY,
        ])
        .args(&args)
        .env("NOTIFY_SOCKET", &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn setpriv");
    let ready = next_notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    let addr: std::net::SocketAddr = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=serving on "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {ready:?}"));
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
