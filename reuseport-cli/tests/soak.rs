//! Soak: many short connections through `reuseport serve` leave its open fds and resident memory
//! where they were after a warm-up. 100,000 connections here (a few seconds);
//! `cargo xtask soak` runs the same test with 1,000,000 (`REUSEPORT_SOAK_CONNECTIONS`).

mod common;

use std::process::{Command, Stdio};

use common::*;
use reuseport::procfs::{open_fds, rss_kib};

/// Connections before the first measurement: runtimes, buffers and allocator arenas settle.
const WARMUP: u64 = 20_000;
/// Growth allowed after the warm-up: a few fds in flight, allocator noise.
const FD_BOUND: usize = 8;
const RSS_BOUND_KIB: u64 = 16 * 1024;

/// Runs `count` crr requests (one connection each) against `target`; returns (requests, errors).
fn crr(target: &str, count: u64) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("load.json");
    let status = Command::new(BINARY)
        .args(["load", "--target", target, "--connections", "32"])
        .args(["--max-requests", &count.to_string(), "--duration", "10m"])
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (
        report["requests"].as_u64().unwrap(),
        report["errors"].as_u64().unwrap(),
    )
}

#[test]
fn many_short_connections_grow_neither_fds_nor_memory() {
    let connections: u64 = std::env::var("REUSEPORT_SOAK_CONNECTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let server = ServeProcess::start(&["--listen", "127.0.0.1:0", "--duration", "15m", "--quiet"]);
    let (pid, target) = (server.child.id(), server.addr.to_string());

    assert_eq!(crr(&target, WARMUP), (WARMUP, 0));
    let (fds_before, rss_before) = (open_fds(pid).unwrap(), rss_kib(pid).unwrap());
    let (requests, errors) = crr(&target, connections);
    let (fds_after, rss_after) = (open_fds(pid).unwrap(), rss_kib(pid).unwrap());
    eprintln!(
        "soak: {requests} connections, {errors} errors; fds {fds_before} -> {fds_after}, \
         RSS {rss_before} KiB -> {rss_after} KiB"
    );

    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let (status, _, stderr) = server.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!((requests, errors), (connections, 0));
    assert!(
        fds_after <= fds_before + FD_BOUND,
        "fds grew from {fds_before} to {fds_after}"
    );
    assert!(
        rss_after <= rss_before + RSS_BOUND_KIB,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}
