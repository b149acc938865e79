//! One BPF object per purpose: `serve` loads the steering object only, so none of the lab's probe
//! maps (such as the 65,536-entry `conn_cpus`) exists while it serves. Needs root.

mod common;

use std::collections::BTreeSet;

use aya::maps::loaded_maps;
use common::ServeProcess;
use reuseport_common::names;

/// Ids and names of every BPF map loaded on the machine now.
fn maps_now() -> Vec<(u32, String)> {
    loaded_maps()
        .filter_map(Result::ok)
        .map(|map| (map.id(), map.name_as_str().unwrap_or_default().to_owned()))
        .collect()
}

#[test]
fn serve_creates_the_steering_maps_and_no_probe_maps() {
    let before: BTreeSet<u32> = maps_now().into_iter().map(|(id, _)| id).collect();
    let server = ServeProcess::start(&[
        "--mode",
        "percpu-spill",
        "--listen",
        "127.0.0.1:0",
        "--duration",
        "2s",
        "--quiet",
    ]);
    let created: BTreeSet<String> = maps_now()
        .into_iter()
        .filter(|(id, _)| !before.contains(id))
        .map(|(_, name)| name)
        .collect();
    let (status, _, stderr) = server.finish();
    assert!(status.success(), "{stderr}");

    for steering in [
        names::CPU_LISTENERS,
        names::CPU_SPILL,
        names::CPU_FALLBACK,
        names::STEERING_STATS,
    ] {
        assert!(
            created.contains(steering),
            "{steering} missing: {created:?}"
        );
    }
    for probe in [
        names::PROBE_CONFIG,
        names::PROBE_COUNTS,
        names::SERVER_TIDS,
        names::CONN_CPUS,
        names::LOCK_PENDING,
        names::LOCK_STACKS,
        names::LOCK_WAITS,
        names::LOCK_SIDES,
    ] {
        assert!(
            !created.contains(probe),
            "serve created the probe map {probe}: {created:?}"
        );
    }
}
