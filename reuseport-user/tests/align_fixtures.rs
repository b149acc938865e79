//! `reuseport::align` against recorded sysfs/procfs trees of a four-queue NIC
//! (`tests/fixtures/align/<case>/{sys,proc}`, with the worker CPUs in `workers` and the expected
//! mismatch lines in `expected`): no multi-queue NIC is available where the tests run.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use reuseport::{
    CpuList,
    align::{
        AlignError,
        apply::{apply, plan, restore, state_path},
        mismatches,
        read::{Roots, read_device},
    },
    cpu_topology::CpuTopology,
};

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/align")
        .join(name)
}

fn roots(dir: &Path) -> Roots {
    Roots {
        sys: dir.join("sys"),
        proc: dir.join("proc"),
    }
}

fn workers(dir: &Path) -> CpuList {
    fs::read_to_string(dir.join("workers"))
        .expect("workers")
        .trim()
        .parse()
        .expect("a CPU list")
}

fn report_lines(dir: &Path) -> Vec<String> {
    let roots = roots(dir);
    let view = read_device(&roots, "eth0").expect("the fixture reads");
    let topology = CpuTopology::read_from(&roots.cpu_dir(), 16);
    mismatches(&view, &workers(dir), &topology)
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn expected_lines(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("expected"))
        .expect("expected")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn each_case_reports_its_expected_mismatch_lines() {
    for name in ["misaligned", "irqbalance", "aligned"] {
        let dir = case(name);
        assert_eq!(report_lines(&dir), expected_lines(&dir), "case {name}");
    }
}

#[test]
fn irqs_map_to_their_queues_and_control_irqs_are_left_out() {
    let view = read_device(&roots(&case("misaligned")), "eth0").expect("reads");
    let irqs: Vec<(u32, u32, Vec<u32>)> = view
        .rx
        .iter()
        .map(|queue| {
            let irq = queue.irq.as_ref().expect("each queue has its IRQ");
            (queue.index, irq.number, irq.cpus.clone())
        })
        .collect();
    assert_eq!(
        irqs,
        [
            (0, 40, vec![0]),
            (1, 41, vec![9]),
            (2, 42, vec![2]),
            (3, 43, vec![2])
        ]
    );
    assert!(
        view.rx
            .iter()
            .all(|q| q.irq.as_ref().is_some_and(|i| i.effective))
    );
    let old_kernel = read_device(&roots(&case("irqbalance")), "eth0").expect("reads");
    assert!(
        old_kernel
            .rx
            .iter()
            .all(|q| q.irq.as_ref().is_some_and(|i| !i.effective)),
        "without effective_affinity_list, smp_affinity_list is read"
    );
    assert_eq!(old_kernel.irqbalance, Some(812));
    assert_eq!(old_kernel.rx[0].rps_flow_cnt, Some(4096));
}

#[test]
fn unknown_devices_and_devices_without_queues_are_refused() {
    let roots = roots(&case("misaligned"));
    assert!(matches!(
        read_device(&roots, "eth9"),
        Err(AlignError::NoDevice { .. })
    ));
    assert!(matches!(
        read_device(&roots, "../eth0"),
        Err(AlignError::NoDevice { .. })
    ));
    assert!(matches!(
        read_device(&roots, "noqueues"),
        Err(AlignError::NoQueues { .. })
    ));
}

/// Every file under `dir`, relative path to contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in fs::read_dir(&at).expect("dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let text = fs::read_to_string(&path).expect("file");
                // The kernel ends what it shows with a newline, and takes values without one.
                let text = text.trim_end().to_owned();
                files.insert(path.strip_prefix(dir).expect("under").to_path_buf(), text);
            }
        }
    }
    files
}

fn copy_case(name: &str) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("tempdir");
    for (path, text) in snapshot(&case(name)) {
        let to = copy.path().join(path);
        fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        fs::write(to, text).expect("write");
    }
    copy
}

#[test]
fn apply_sets_irq_affinity_and_xps_per_worker_and_restore_puts_every_value_back() {
    let copy = copy_case("misaligned");
    let roots = roots(copy.path());
    let before = snapshot(copy.path());
    let view = read_device(&roots, "eth0").expect("reads");
    let settings = plan(&roots, &view, &workers(copy.path())).expect("plan");
    let state = state_path(&copy.path().join("run"), "eth0");
    apply(&roots, &view, &settings, &state, false).expect("apply");
    let read = |rel: &str| {
        fs::read_to_string(copy.path().join(rel))
            .expect("file")
            .trim()
            .to_owned()
    };
    for (irq, cpu) in [(40, "0"), (41, "1"), (42, "2"), (43, "3")] {
        assert_eq!(read(&format!("proc/irq/{irq}/smp_affinity_list")), cpu);
    }
    for (queue, mask) in [(0, "1"), (1, "2"), (2, "4"), (3, "8")] {
        assert_eq!(
            read(&format!("sys/class/net/eth0/queues/tx-{queue}/xps_cpus")),
            mask
        );
    }
    assert!(matches!(
        apply(&roots, &view, &settings, &state, false),
        Err(AlignError::AlreadyApplied { .. })
    ));
    let restored = restore(&roots, &state).expect("restore");
    assert_eq!(restored.state.settings.len(), 8);
    assert!(restored.skipped.is_empty());
    assert_eq!(snapshot(copy.path()), before, "every value is back");
    assert!(matches!(
        restore(&roots, &state),
        Err(AlignError::NothingToRestore { .. })
    ));
}

#[test]
fn apply_refuses_irq_writes_while_irqbalance_runs_and_changes_nothing() {
    let copy = copy_case("irqbalance");
    let roots = roots(copy.path());
    let before = snapshot(copy.path());
    let view = read_device(&roots, "eth0").expect("reads");
    let settings = plan(&roots, &view, &workers(copy.path())).expect("plan");
    let state = state_path(&copy.path().join("run"), "eth0");
    let err = apply(&roots, &view, &settings, &state, false).expect_err("refused");
    assert!(matches!(err, AlignError::Irqbalance { pid: 812 }), "{err}");
    assert_eq!(snapshot(copy.path()), before);
    assert!(!state.exists());
}

#[test]
fn a_failed_write_puts_the_earlier_ones_back_and_leaves_no_state_file() {
    let copy = copy_case("misaligned");
    let roots = roots(copy.path());
    let view = read_device(&roots, "eth0").expect("reads");
    let settings = plan(&roots, &view, &workers(copy.path())).expect("plan");
    let before = snapshot(copy.path());
    // The last setting's file becomes a directory: writing it fails after seven writes.
    let last = settings.last().expect("settings").path().expect("a file");
    fs::remove_file(last).expect("rm");
    fs::create_dir(last).expect("mkdir");
    let mut expected = before.clone();
    expected.remove(last.strip_prefix(copy.path()).expect("under"));
    let state = state_path(&copy.path().join("run"), "eth0");
    let err = apply(&roots, &view, &settings, &state, false).expect_err("the write fails");
    assert!(matches!(err, AlignError::Write { .. }), "{err}");
    assert_eq!(
        snapshot(copy.path()),
        expected,
        "the earlier writes are undone"
    );
    assert!(!state.exists());
}

#[test]
fn restore_refuses_a_state_file_others_could_write_or_one_naming_other_files() {
    use std::os::unix::fs::PermissionsExt as _;

    let copy = copy_case("misaligned");
    let roots = roots(copy.path());
    let view = read_device(&roots, "eth0").expect("reads");
    let settings = plan(&roots, &view, &workers(copy.path())).expect("plan");
    let state = state_path(&copy.path().join("run"), "eth0");
    apply(&roots, &view, &settings, &state, false).expect("apply");

    fs::set_permissions(&state, fs::Permissions::from_mode(0o666)).expect("chmod");
    let err = restore(&roots, &state).expect_err("group/world-writable");
    assert!(matches!(err, AlignError::UnsafeState { .. }), "{err}");
    fs::set_permissions(&state, fs::Permissions::from_mode(0o644)).expect("chmod");

    let text = fs::read_to_string(&state).expect("state");
    fs::write(&state, text.replace("xps_cpus", "ifalias")).expect("rewrite");
    let applied = snapshot(copy.path());
    let err = restore(&roots, &state).expect_err("a file align never writes");
    assert!(
        err.to_string().contains("which align never writes"),
        "{err}"
    );
    assert_eq!(snapshot(copy.path()), applied, "nothing was written");

    // A state file that would have root start something else than irqbalance.
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("state JSON");
    json["irqbalance"] = serde_json::json!({
        "pid": 812,
        "unit": null,
        "command": ["/bin/sh", "-c", "touch /tmp/reuseport-should-not-exist"],
    });
    fs::write(&state, json.to_string()).expect("rewrite");
    let rewritten = snapshot(copy.path());
    let err = restore(&roots, &state).expect_err("not irqbalance");
    assert!(err.to_string().contains("which is not irqbalance"), "{err}");
    assert_eq!(snapshot(copy.path()), rewritten, "nothing was written");
}
