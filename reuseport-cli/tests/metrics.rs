//! `serve --metrics`: scraped during load and checked by a real parser (Debian's
//! `promtool check metrics`), with counters that match the run's JSON summary.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::*;

/// `GET /metrics` from `addr`: the status line and the body.
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

/// `promtool check metrics` on `text`: exit status and what it said.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package prometheus; .ci/run installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

#[test]
fn metrics_scraped_during_load_pass_promtool_and_match_the_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let summary_path = dir.path().join("summary.json");
    let summary_arg = summary_path.to_str().expect("utf-8 path");
    let serve = ServeProcess::start(&[
        "--mode",
        "percpu",
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--stats-json",
        summary_arg,
        "--quiet",
    ]);
    let line = serve
        .lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the metrics line");
    let metrics: SocketAddr = line
        .strip_prefix("reuseport: metrics on http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"));
    let program_id = serve.program_id.expect("a steering program");

    // Load from a pinned client per CPU while the endpoint is scraped.
    let cpus: Vec<u32> = allowed_cpus().iter().collect();
    let done = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            let (addr, done, served) = (serve.addr, Arc::clone(&done), Arc::clone(&served));
            thread::spawn(move || {
                on_cpu(cpu, move || {
                    let deadline = Instant::now() + Duration::from_secs(20);
                    for _ in 0..300 {
                        if done.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        http_get(addr);
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
        })
        .collect();
    let mut during = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(300));
        during = scrape(metrics);
        if value(&during, "reuseport_program_runs_total").is_some_and(|runs| runs > 0.0) {
            break;
        }
    }
    for client in clients {
        client.join().expect("client thread");
    }
    let (ok, said) = promtool_check(&during);
    assert!(
        ok,
        "promtool rejected a scrape taken during load: {said}\n{during}"
    );
    assert!(
        during.contains(&format!("program_id=\"{program_id}\"")),
        "{during}"
    );
    let (status, _) = get(metrics, "/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // Once every request is counted (the endpoint shows the snapshot of the last second), the
    // scrape and the summary written at exit agree.
    let requests = served.load(Ordering::Relaxed) as f64;
    let total = |text: &str| {
        cpus.iter()
            .filter_map(|cpu| {
                value(
                    text,
                    &format!("reuseport_worker_requests_total{{cpu=\"{cpu}\"}}"),
                )
            })
            .sum::<f64>()
    };
    let mut last = scrape(metrics);
    let deadline = Instant::now() + Duration::from_secs(10);
    while total(&last) < requests && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        last = scrape(metrics);
    }
    assert_eq!(total(&last), requests, "{last}");
    let (ok, said) = promtool_check(&last);
    assert!(ok, "{said}");

    rustix::process::kill_process(
        rustix::process::Pid::from_child(&serve.child),
        rustix::process::Signal::TERM,
    )
    .expect("kill");
    let (status, _, stderr) = serve.finish();
    assert!(status.success(), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).expect("summary"))
            .expect("summary JSON");
    for worker in summary["workers"].as_array().expect("workers") {
        let cpu = worker["cpu"].as_u64().expect("cpu");
        for (field, metric) in [
            ("accepted", "reuseport_worker_accepted_total"),
            ("local", "reuseport_worker_accepted_local_total"),
            ("requests", "reuseport_worker_requests_total"),
            ("errors", "reuseport_worker_errors_total"),
            ("timed_out", "reuseport_worker_timed_out_total"),
            ("shed", "reuseport_worker_shed_total"),
        ] {
            assert_eq!(
                value(&last, &format!("{metric}{{cpu=\"{cpu}\"}}")),
                worker[field].as_f64(),
                "{metric} of CPU {cpu}\n{last}"
            );
        }
    }
    for cpu in summary["steering"]["per_cpu"].as_array().expect("per_cpu") {
        let n = cpu["cpu"].as_u64().expect("cpu");
        for decision in ["local", "fallback", "unsteered", "spilled", "held"] {
            assert_eq!(
                value(
                    &last,
                    &format!(
                        "reuseport_steering_decisions_total{{cpu=\"{n}\",decision=\"{decision}\"}}"
                    )
                ),
                cpu[decision].as_f64(),
                "{decision} on CPU {n}\n{last}"
            );
        }
    }
}

#[test]
fn an_unusable_metrics_address_fails_before_serving() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = Command::new(BINARY)
        .args([
            "serve",
            "--mode",
            "hash",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            &addr,
            "--duration",
            "5s",
        ])
        .output()
        .expect("run reuseport");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("listening for metrics on {addr} failed")),
        "{stderr}"
    );
}

/// Kills the child on drop (SIGTERM: prefork-demo's master stops its workers; attach detaches).
struct Stopping(std::process::Child);

impl Drop for Stopping {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.0);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn attach_metrics_show_the_steering_of_a_server_not_ours_and_pass_promtool() {
    use std::io::{BufRead as _, BufReader};
    let mut server = Command::new(env!("CARGO_BIN_EXE_prefork-demo"))
        .args(["--duration", "60s", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start prefork-demo");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("prefork-demo's first line");
    let _server = Stopping(server);
    // "prefork-demo: listening on ADDR with master PID and workers A,B"
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr: SocketAddr = words[3].parse().unwrap_or_else(|_| panic!("{line:?}"));
    let master = words[6];

    let mut attach = Command::new(BINARY)
        .args([
            "attach",
            "--port",
            &addr.port().to_string(),
            "--pid",
            master,
        ])
        .args(["--metrics", "127.0.0.1:0", "--quiet"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start attach");
    let mut stdout = BufReader::new(attach.stdout.take().expect("stdout"));
    let attach = Stopping(attach);
    let mut first = String::new();
    stdout.read_line(&mut first).expect("the metrics line");
    let metrics: SocketAddr = first
        .trim_end()
        .strip_prefix("reuseport: metrics on http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {first:?}"));
    let mut steering = String::new();
    stdout.read_line(&mut steering).expect("the steering line");
    let program_id = steering
        .split("program id ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no program id in {steering:?}"));

    // 20 pinned clients per CPU, each served by its CPU's worker through the program.
    let cpus: Vec<u32> = allowed_cpus().iter().collect();
    for &cpu in &cpus {
        worker_pids_from(cpu, addr, 20);
    }
    let local = |text: &str, cpu: u32| {
        value(
            text,
            &format!("reuseport_steering_decisions_total{{cpu=\"{cpu}\",decision=\"local\"}}"),
        )
        .unwrap_or(0.0)
    };
    // The endpoint shows the snapshot of the last second.
    let mut text = scrape(metrics);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cpus.iter().any(|&cpu| local(&text, cpu) < 20.0) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        text = scrape(metrics);
    }
    let (ok, said) = promtool_check(&text);
    assert!(ok, "promtool rejected attach's metrics: {said}\n{text}");
    for &cpu in &cpus {
        assert!(local(&text, cpu) >= 20.0, "cpu {cpu}:\n{text}");
        // Pinned clients, one worker per CPU: every connection received, accepted and served
        // on one CPU.
        assert_eq!(
            value(
                &text,
                &format!("reuseport_steering_same_cpu_ratio{{cpu=\"{cpu}\"}}")
            ),
            Some(1.0),
            "cpu {cpu}:\n{text}"
        );
    }
    assert!(
        text.contains(&format!(
            "reuseport_info{{listen=\"{addr}\",mode=\"percpu\",program_id=\"{program_id}\",protocol=\"tcp\"}} 1"
        )),
        "{text}"
    );
    let runs = value(&text, "reuseport_program_runs_total");
    assert!(
        runs.is_some_and(|runs| runs >= 20.0 * cpus.len() as f64),
        "{text}"
    );
    // A foreign server's worker counters are not known: none is made up.
    assert!(!text.contains("reuseport_worker_"), "{text}");
    drop(attach);
}
