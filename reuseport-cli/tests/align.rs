//! `reuseport align` on a real multi-queue veth: one end in this namespace (so the verb sees it
//! in `/sys/class/net`), its peer in a namespace held only by the test's descriptor, so the pair
//! goes away with the test. RPS and XPS are misaligned on purpose; the report names each
//! mismatch, `--apply` fixes them, `--restore` puts every value back. (IRQ affinity and
//! irqbalance are tested on recorded trees: `cargo test -p reuseport-user --test
//! align_fixtures`; veth has no IRQs.) Needs root.

mod common;

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{BINARY, WITHOUT_CAPABILITIES};
use reuseport::CpuList;
use reuseport_lab::{
    netns::NetNs,
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
        report.contains("no mismatch found: queues without an IRQ or RPS"),
        "{report}"
    );
    assert_eq!(pair.masks(), before);
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
