//! The `reuseport` binary as a user runs it: live output, JSON summary, clean stop on signals, and
//! one clear line with a non-zero exit for every bad input, leaving nothing attached.

mod common;

use std::{
    net::TcpListener,
    process::{Command, Output},
    thread,
    time::Duration,
};

use aya::programs::loaded_programs;
use common::*;

fn program_is_loaded(id: u32) -> bool {
    loaded_programs()
        .filter_map(Result::ok)
        .any(|program| program.id() == id)
}

/// The kernel frees a reuseport group, and with it its program, an RCU grace period after the
/// last socket closes; wait (bounded) for that.
fn unloaded_soon(id: u32) -> bool {
    for _ in 0..100 {
        if !program_is_loaded(id) {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

fn run(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run reuseport")
}

#[test]
fn serve_prints_live_lines_and_a_json_summary_then_unloads_its_program() {
    let json_path = std::env::temp_dir().join(format!("reuseport-cli-{}.json", std::process::id()));
    let json_arg = json_path.to_str().expect("utf-8 temp path");
    let serve = ServeProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--duration",
        "3s",
        "--stats-json",
        json_arg,
    ]);
    let program_id = serve
        .program_id
        .expect("percpu-spill prints its program id");
    assert!(program_is_loaded(program_id));
    let cpus = allowed_cpus();
    for cpu in cpus.iter() {
        for served in http_gets_from(cpu, serve.addr, 20) {
            assert_eq!(served.worker_cpu, cpu);
        }
    }
    let (status, lines, stderr) = serve.finish();
    assert!(status.success(), "{stderr}");
    let live: Vec<_> = lines.iter().filter(|l| l.contains("| bpf local")).collect();
    assert!(live.len() >= 2, "a live line per second: {lines:?}");
    assert!(
        live[0].contains("cpu0") && live[0].contains("ns/select"),
        "{}",
        live[0]
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("summary: mode percpu-spill")),
        "{lines:?}"
    );
    assert!(
        unloaded_soon(program_id),
        "program {program_id} still loaded 5 s after exit"
    );

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json written"))
            .expect("valid JSON");
    let _ = std::fs::remove_file(&json_path);
    let expected = 20 * cpus.len() as u64;
    assert_eq!(json["mode"], "percpu-spill", "the default mode");
    assert_eq!(json["total"]["accepted"], expected);
    assert_eq!(
        json["steering"]["total"]["spilled"], 0,
        "one client at a time never overloads a CPU"
    );
    assert_eq!(json["total"]["locality"], 1.0);
    assert_eq!(json["steering"]["total"]["local"], expected);
    assert!(
        json["steering"]["ns_per_select"]
            .as_f64()
            .is_some_and(|ns| ns > 0.0)
    );
    assert_eq!(json["workers"].as_array().map(Vec::len), Some(cpus.len()));
}

#[test]
fn sigterm_stops_serving_and_unloads_the_program() {
    let serve = ServeProcess::start(&["--listen", "[::1]:0", "--quiet"]);
    let program_id = serve.program_id.expect("program id");
    let served = http_get(serve.addr);
    assert_eq!(served.worker_cpu, served.incoming_cpu);
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&serve.child),
        rustix::process::Signal::TERM,
    )
    .expect("kill");
    let (status, lines, stderr) = serve.finish();
    assert!(status.success(), "{stderr}");
    assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:?}");
    assert!(
        unloaded_soon(program_id),
        "program {program_id} still loaded 5 s after exit"
    );
}

#[test]
fn hash_mode_loads_no_program() {
    let serve = ServeProcess::start(&[
        "--mode",
        "hash",
        "--listen",
        "127.0.0.1:0",
        "--duration",
        "1s",
    ]);
    assert_eq!(serve.program_id, None);
    http_get(serve.addr);
    let (status, lines, _) = serve.finish();
    assert!(status.success());
    assert!(
        lines
            .iter()
            .any(|l| l.contains("bpf: none (kernel hash selection)")),
        "{lines:?}"
    );
}

#[test]
fn no_subcommand_prints_the_usage_and_exits_2() {
    let output = run(&[]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Usage: reuseport <COMMAND>"), "{stderr}");
    assert!(output.stdout.is_empty(), "{output:?}");
}

#[test]
fn help_is_plain_text_without_rustdoc_links() {
    for verb in [
        &[][..],
        &["serve"],
        &["load"],
        &["ab"],
        &["attach"],
        &["detach"],
        &["status"],
        &["align"],
    ] {
        let mut args = verb.to_vec();
        args.push("--help");
        let output = run(&args);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
        let help = String::from_utf8_lossy(&output.stdout);
        for link in ["[`", "`]", "crate::"] {
            assert!(
                !help.contains(link),
                "{args:?} --help shows {link:?}:\n{help}"
            );
        }
    }
}

#[test]
fn the_live_line_is_redrawn_in_place_on_a_terminal_and_one_per_line_in_a_pipe() {
    // `script` runs serve with a pseudo-terminal as its stdout.
    let command = format!("{BINARY} serve --mode hash --listen 127.0.0.1:0 --duration 3500ms");
    let output = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("run script (util-linux)");
    assert!(output.status.success(), "{output:?}");
    let tty = String::from_utf8_lossy(&output.stdout);
    assert!(
        tty.lines()
            .any(|line| line.matches("\r\x1b[2K").count() >= 2 && line.contains("s | cpu")),
        "no live line redrawn in place on the terminal:\n{tty:?}"
    );
    assert!(tty.contains("summary: mode hash"), "{tty:?}");

    let output = run(&[
        "serve",
        "--mode",
        "hash",
        "--listen",
        "127.0.0.1:0",
        "--duration",
        "2500ms",
    ]);
    assert!(output.status.success(), "{output:?}");
    let piped = String::from_utf8_lossy(&output.stdout);
    assert!(!piped.contains('\x1b'), "{piped:?}");
    assert!(
        piped
            .lines()
            .filter(|line| line.contains("s | cpu"))
            .count()
            >= 2,
        "{piped:?}"
    );
}

#[test]
fn unknown_mode_is_a_one_line_usage_error() {
    let output = run(&["serve", "--mode", "fastest"]);
    assert_one_line_error(&output, 2, "invalid value 'fastest' for '--mode <MODE>'");
    assert!(String::from_utf8_lossy(&output.stderr).contains("percpu, hash"));
}

#[test]
fn malformed_cpu_list_is_a_one_line_usage_error() {
    let output = run(&["serve", "--cpus", "3-1"]);
    assert_one_line_error(&output, 2, "range 3-1 is backwards");
}

#[test]
fn a_cpu_outside_the_affinity_mask_is_refused() {
    let allowed = allowed_cpus();
    let outside = allowed.iter().last().expect("a CPU") + 1;
    let output = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--cpus",
        &outside.to_string(),
    ]);
    assert_one_line_error(
        &output,
        1,
        &format!("CPU {outside} is not available to this process (allowed CPUs: {allowed})"),
    );
}

#[test]
fn a_port_held_without_so_reuseport_is_refused() {
    let plain = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = plain.local_addr().expect("addr").to_string();
    let output = run(&["serve", "--listen", &addr, "--duration", "1s"]);
    assert_one_line_error(
        &output,
        1,
        "already in use by a socket without SO_REUSEPORT",
    );
}

/// `reuseport serve` with every capability dropped (still uid 0, so files stay readable).
fn without_capabilities(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(WITHOUT_CAPABILITIES)
        .args([BINARY, "serve"])
        .args(args)
        .output()
        .expect("run setpriv (util-linux)")
}

#[test]
fn percpu_without_cap_bpf_says_so_and_suggests_auto_and_hash() {
    let output = without_capabilities(&["--listen", "127.0.0.1:0", "--duration", "1s"]);
    assert_one_line_error(&output, 1, "needs CAP_BPF");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--mode auto (it picks incoming-cpu or cbpf"),
        "{stderr}"
    );
    assert!(stderr.contains("--mode hash"), "{stderr}");
}

#[test]
fn hash_mode_needs_no_capabilities() {
    let output = without_capabilities(&[
        "--mode",
        "hash",
        "--listen",
        "127.0.0.1:0",
        "--duration",
        "1s",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_second_server_on_the_same_port_does_not_join_the_first() {
    let first = ServeProcess::start(&["--listen", "127.0.0.1:0", "--duration", "3s", "--quiet"]);
    let addr = first.addr.to_string();
    let output = run(&["serve", "--listen", &addr, "--duration", "1s"]);
    assert_one_line_error(&output, 1, "already served by other SO_REUSEPORT sockets");
    // The first server is undisturbed: every connection still reaches it, on its own CPU.
    let served = http_get(first.addr);
    assert_eq!(served.worker_cpu, served.incoming_cpu);
    let (status, _, stderr) = first.finish();
    assert!(status.success(), "{stderr}");
}

#[test]
fn cap_bpf_alone_is_enough_for_percpu_steering() {
    // Every capability dropped but CAP_BPF: no CAP_NET_ADMIN, no CAP_SYS_ADMIN.
    let serve = ServeProcess::start_with(
        &[
            "setpriv",
            "--bounding-set=-all,+bpf",
            "--inh-caps=-all",
            "--",
        ],
        &["--listen", "127.0.0.1:0", "--duration", "2s", "--quiet"],
    );
    assert!(serve.program_id.is_some(), "{}", serve.first_line);
    for cpu in allowed_cpus().iter() {
        for served in http_gets_from(cpu, serve.addr, 20) {
            assert_eq!(served.worker_cpu, cpu);
        }
    }
    let (status, lines, stderr) = serve.finish();
    assert!(status.success(), "{stderr}");
    // Without CAP_SYS_ADMIN the run-time statistics cannot be switched on, and it says so.
    assert!(
        lines.iter().any(|l| l.contains("ns/select unavailable")),
        "{lines:?}"
    );
}

#[test]
fn spill_knobs_out_of_range_are_one_line_usage_errors() {
    for (args, needle) in [
        (&["--spill-threshold", "0"][..], "--spill-threshold"),
        (
            &["--spill-period", "0s"][..],
            "must be more than 0 and at most 1s",
        ),
        (
            &["--spill-period", "1000000h"][..],
            "must be more than 0 and at most 1s",
        ),
        (&["--spill-targets", "0"][..], "--spill-targets"),
    ] {
        let output = run(&[&["serve", "--listen", "127.0.0.1:0"][..], args].concat());
        assert_one_line_error(&output, 2, needle);
    }
    // More targets than other CPUs: known only once the CPUs are, still one line and exit 2.
    let cpus = allowed_cpus().len();
    let too_many = cpus.to_string();
    let output = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--spill-targets",
        &too_many,
        "--duration",
        "1s",
    ]);
    assert_one_line_error(
        &output,
        2,
        &format!(
            "--spill-targets: a CPU can spill to at most {} other CPUs here, not {cpus}",
            cpus - 1
        ),
    );
}

#[test]
fn connection_timeouts_out_of_range_are_one_line_usage_errors() {
    for (flag, value) in [
        ("--header-timeout", "0s"),
        ("--header-timeout", "10ms"),
        ("--header-timeout", "2h"),
        ("--idle-timeout", "0s"),
        ("--idle-timeout", "1000000h"),
        ("--idle-timeout", "soon"),
    ] {
        let output = run(&["serve", "--listen", "127.0.0.1:0", flag, value]);
        assert_one_line_error(&output, 2, flag);
        if value != "soon" {
            assert_one_line_error(&output, 2, "must be at least 100ms and at most 1h");
        }
    }
}

#[test]
fn ready_json_is_the_first_line_as_typed_data() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(BINARY)
        .args(["serve", "--mode", "percpu", "--listen", "127.0.0.1:0"])
        .args(["--duration", "2s", "--quiet", "--ready-json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn reuseport serve");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("first line");
    let ready: reuseport::server::Ready = serde_json::from_str(&line).expect("a Ready object");
    assert_eq!(ready.pid, child.id());
    assert_ne!(ready.listen.port(), 0);
    assert_eq!(ready.mode, reuseport::SteeringMode::Percpu);
    let id = ready.program_id.expect("a program id in percpu mode");
    assert!(program_is_loaded(id));
    let served = http_get(ready.listen);
    assert!(
        ready
            .cpus
            .parse::<reuseport::CpuList>()
            .expect("a CPU list")
            .contains(served.worker_cpu)
    );
    // Read the rest (the summary), so serve does not die writing to a closed pipe.
    let rest = std::io::read_to_string(stdout).expect("the rest of stdout");
    assert!(rest.contains("summary: mode percpu"), "{rest}");
    assert!(child.wait().expect("wait").success());
}

#[test]
fn impossible_cpu_lists_durations_and_backlogs_are_refused_at_once() {
    let started = std::time::Instant::now();
    for (args, needle) in [
        (
            &["serve", "--cpus", "0-100000000"][..],
            "CPU 100000000 is beyond the largest CPU number Linux supports (8191)",
        ),
        (
            &["serve", "--cpus", "0-4294967295"][..],
            "beyond the largest CPU number",
        ),
        (
            &["load", "--cpus", "9000"][..],
            "beyond the largest CPU number",
        ),
        (
            &["serve", "--duration", "18446744073709551615s"][..],
            "must be at most 365 days",
        ),
        (
            &["load", "--duration", "18446744073709551615s"][..],
            "must be at most 365 days",
        ),
        (
            &[
                "attach",
                "--port",
                "1",
                "--pid",
                "1",
                "--duration",
                "400days",
            ][..],
            "must be at most 365 days",
        ),
        (&["serve", "--backlog", "0"][..], "--backlog"),
        (&["serve", "--backlog=-5"][..], "--backlog"),
    ] {
        let output = run(args);
        assert_one_line_error(&output, 2, needle);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusing took {:?}",
        started.elapsed()
    );
}

#[test]
fn an_unwritable_summary_path_fails_before_serving() {
    let started = std::time::Instant::now();
    let output = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--duration",
        "30s",
        "--stats-json",
        "/nonexistent-dir/summary.json",
    ]);
    assert_one_line_error(&output, 1, "writing /nonexistent-dir/summary.json");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(output.stdout.is_empty(), "nothing was served");
}

#[test]
fn serve_keeps_serving_when_its_output_reader_goes_away() {
    // `| head -1` closes the pipe after the first line; serve must run to its --duration and
    // exit 0 (it used to die of SIGPIPE at its first live line).
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{BINARY} serve --mode hash --listen 127.0.0.1:0 --duration 3s | head -1; \
             echo \"serve exit ${{PIPESTATUS[0]}}\""
        ))
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("reuseport: serving"), "{stdout}");
    assert!(stdout.contains("serve exit 0"), "{stdout}");
}
