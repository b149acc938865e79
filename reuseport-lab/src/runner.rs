//! The A/B runner: the same `reuseport serve` and `reuseport load` a user runs, as child
//! processes on each side of a [`Topology`], one run per row (mode or peer) and repetition,
//! interleaved (A B A B …) after a warm-up, with the probes attached only while load runs.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use reuseport::{
    cpus::CpuList,
    server::Ready,
    stats::Summary,
    steering::{SteeringMode, SteeringProgram},
};
use serde::{Deserialize, Serialize};

use crate::{
    child::ChildGuard,
    cpu_split::{CpuSplit, confine_on_spawn},
    cpu_time::{CpuTimes, CpuUse},
    hw_counters::{HwCount, HwCounters},
    load::{LoadKind, LoadReport},
    losses::Losses,
    metrics::{Metric, MetricId, median},
    probes::{ProbeTotals, Probes, ipi_count},
    topology::{Topology, TopologyKind, VethRx},
};

pub use crate::error::RunnerError;

/// One row of the comparison: a steering mode of our server, or a peer server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Row {
    /// `reuseport serve --mode <mode>`.
    Mode(SteeringMode),
    /// Debian's nginx with `reuseport`, one worker per CPU, `worker_cpu_affinity auto`.
    Nginx,
    /// The same nginx, steered per CPU from outside by `reuseport attach --pid <master>`.
    NginxAttached,
    /// `reuseport serve --mode percpu --bpf-program noop`: calibrates the steering cost figure.
    BpfNoop,
    /// `reuseport serve --mode percpu --bpf-program select-only`: the kernel helper's share of it.
    BpfSelect,
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Mode(mode) => mode.fmt(f),
            Self::Nginx => f.write_str("nginx"),
            Self::NginxAttached => f.write_str("nginx+attach"),
            Self::BpfNoop => f.write_str("bpf-noop"),
            Self::BpfSelect => f.write_str("bpf-select"),
        }
    }
}

/// What to compare and how.
#[derive(Clone, Debug)]
pub struct AbConfig {
    /// The `reuseport` binary to run as server and load generator.
    pub binary: PathBuf,
    /// Steering modes to compare (rows), in order.
    pub modes: Vec<SteeringMode>,
    /// Also run nginx as a row.
    pub peer_nginx: bool,
    /// Also run nginx steered by `reuseport attach` as a row.
    pub peer_nginx_attach: bool,
    /// Also run `wrk` against our server and report its req/s beside the built-in generator's.
    pub cross_check_wrk: bool,
    /// Also run the `bpf-noop` and `bpf-select` calibration rows.
    pub calibrate: bool,
    /// Where server and clients run.
    pub topology: TopologyKind,
    /// How the ends of a veth-rss pair process what they receive (ignored by the other
    /// topologies; [`CpuSplit::default_veth_rx`] is the usual choice).
    pub veth_rx: VethRx,
    /// The server's CPUs and the load generators' (see [`crate::cpu_split`]).
    pub cpus: CpuSplit,
    /// Process every SYN on the first CPU only (RPS mask or client pinning), as with a NIC with
    /// one queue or one bursty client: the load strict per-CPU steering cannot spread.
    pub skew: bool,
    /// Threshold and period of the `percpu-spill` rows.
    pub spill: reuseport::spill::SpillConfig,
    /// Restart our server's workers (SIGHUP) this often while the load runs.
    pub restart_every: Option<Duration>,
    /// The load.
    pub load: LoadKind,
    /// Concurrent clients.
    pub connections: usize,
    /// Measured time per run.
    pub duration: Duration,
    /// Unmeasured time per row before the first repetition.
    pub warmup: Duration,
    /// Repetitions of every row.
    pub reps: usize,
    /// Directory for results.json, results.svg and per-run files.
    pub out: PathBuf,
}

/// One measured run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// The row.
    pub row: String,
    /// Repetition, from 1.
    pub rep: usize,
    /// The derived metrics (see [`MetricId`]).
    pub metrics: BTreeMap<MetricId, Metric>,
    /// The load generator's report.
    pub load: LoadReport,
    /// The server's `--stats-json` summary (null for peers).
    pub server: Option<Summary>,
    /// What the probes counted.
    pub probes: ProbeTotals,
    /// IPIs (RES + CAL) during the run.
    pub ipis: u64,
    /// Hardware counters during the run.
    pub hw: BTreeMap<String, HwCount>,
    /// Packets lost during the run (zero in files written before it was counted).
    #[serde(default)]
    pub losses: Losses,
    /// How busy the CPUs were during the run (absent, as zero, from files written before it
    /// was measured).
    #[serde(default)]
    pub cpu: CpuUse,
}

/// Progress events for a progress bar.
#[derive(Clone, Debug)]
pub enum Progress {
    /// A run begins: `index` of `total` (warm-ups included).
    Run {
        /// Index from 0.
        index: usize,
        /// Total runs.
        total: usize,
        /// Human description, e.g. `rep 2/5 percpu`.
        label: String,
    },
    /// A note worth printing (e.g. SYN spread check).
    Note(String),
}

/// Every run and the wrk cross-check.
#[derive(Clone, Debug, Serialize)]
pub struct AbResults {
    /// The measured runs in the order they ran.
    pub runs: Vec<RunRecord>,
    /// `wrk` vs built-in generator, when asked for (and not interrupted before it).
    pub cross_check: Option<CrossCheck>,
    /// Whether `stop` ended the experiment early: `runs` are those that finished.
    pub interrupted: bool,
    /// Measured runs planned (rows x repetitions).
    pub planned_runs: usize,
}

/// wrk's req/s beside the built-in generator's for the same server and mode.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CrossCheck {
    /// The mode both measured.
    pub mode: String,
    /// wrk's requests per second.
    pub wrk_req_per_s: f64,
    /// The built-in generator's median requests per second for that mode.
    pub builtin_req_per_s: f64,
    /// wrk / built-in.
    pub ratio: f64,
}

/// Runs the experiment. `progress` sees each run start.
///
/// `stop` ends it early (Ctrl-C): during the warm-up, or before any measured run finished, with
/// [`RunnerError::Interrupted`]; later, with the finished runs and [`AbResults::interrupted`] set
/// (the run in progress and the wrk cross-check are dropped).
pub fn run(
    config: &AbConfig,
    stop: &AtomicBool,
    mut progress: impl FnMut(Progress),
) -> Result<AbResults, RunnerError> {
    if config.modes.is_empty()
        && !config.peer_nginx
        && !config.peer_nginx_attach
        && !config.calibrate
    {
        return Err(RunnerError::Invalid("nothing to compare: no modes".into()));
    }
    if config.reps == 0 {
        return Err(RunnerError::Invalid("reps must be at least 1".into()));
    }
    if (config.peer_nginx || config.peer_nginx_attach) && config.load == LoadKind::Udp {
        return Err(RunnerError::Invalid(
            "nginx serves HTTP: use --load crr or rr".into(),
        ));
    }
    fs::create_dir_all(&config.out).map_err(|source| RunnerError::File {
        path: config.out.clone(),
        source,
    })?;
    let cpus = config.cpus.server.clone();
    let skewed = |list: &CpuList| -> CpuList {
        if config.skew {
            list.iter().take(1).collect()
        } else {
            list.clone()
        }
    };
    let rx_cpus = skewed(&config.cpus.server);
    // Where a client's packets are received on its own CPU (loopback, veth-rss with server rx
    // softirq), the clients' CPUs are the receiving CPUs: skewed, or shared with the server.
    let client_cpus =
        if config.topology.receives_on_client_cpus(config.veth_rx) && config.cpus.is_shared() {
            rx_cpus.clone()
        } else if config.topology == TopologyKind::Loopback {
            skewed(&config.cpus.client)
        } else {
            config.cpus.client.clone()
        };
    let topology = Topology::create_with(config.topology, &rx_cpus, &client_cpus, config.veth_rx)?;
    let mut rows: Vec<Row> = config.modes.iter().copied().map(Row::Mode).collect();
    if config.peer_nginx {
        rows.push(Row::Nginx);
    }
    if config.peer_nginx_attach {
        rows.push(Row::NginxAttached);
    }
    if config.calibrate {
        rows.push(Row::BpfNoop);
        rows.push(Row::BpfSelect);
    }
    let warmups = if config.warmup.is_zero() {
        0
    } else {
        rows.len()
    };
    let total = warmups + rows.len() * config.reps + usize::from(config.cross_check_wrk);
    let mut index = 0;
    let mut step = |label: String, progress: &mut dyn FnMut(Progress)| {
        progress(Progress::Run {
            index,
            total,
            label,
        });
        index += 1;
    };

    for &row in rows.iter().take(warmups) {
        step(format!("warm-up {row}"), &mut progress);
        measure(config, &topology, &cpus, row, 0, config.warmup, stop, false)?;
    }
    let mut runs = Vec::new();
    let mut interrupted = false;
    'reps: for rep in 1..=config.reps {
        // A B A B …, with the order flipped every other repetition so no row always goes first.
        let order: Vec<Row> = if rep % 2 == 0 {
            rows.iter().rev().copied().collect()
        } else {
            rows.clone()
        };
        for row in order {
            step(format!("rep {rep}/{} {row}", config.reps), &mut progress);
            let record = match measure(
                config,
                &topology,
                &cpus,
                row,
                rep,
                config.duration,
                stop,
                true,
            ) {
                Ok(Some(record)) => record,
                Ok(None) | Err(RunnerError::Interrupted) => {
                    interrupted = true;
                    break 'reps;
                }
                Err(err) => return Err(err),
            };
            if topology.kind().is_veth() {
                note_syn_spread(&record, &mut progress);
            }
            runs.push(record);
        }
    }
    if interrupted && runs.is_empty() {
        return Err(RunnerError::Interrupted);
    }
    let cross_check = if config.cross_check_wrk && !interrupted {
        step("wrk cross-check".into(), &mut progress);
        match cross_check_wrk(config, &topology, &cpus, &runs, stop) {
            Ok(check) => Some(check),
            Err(RunnerError::Interrupted) => {
                interrupted = true;
                None
            }
            Err(err) => return Err(err),
        }
    } else {
        None
    };
    Ok(AbResults {
        runs,
        cross_check,
        interrupted,
        planned_runs: rows.len() * config.reps,
    })
}

fn note_syn_spread(record: &RunRecord, progress: &mut impl FnMut(Progress)) {
    let syns: u64 = record.probes.syn_cpus.iter().sum();
    let busiest = record.probes.syn_cpus.iter().copied().max().unwrap_or(0);
    if let Some(share) = reuseport::stats::fraction(busiest, syns)
        && share > 0.9
        && record.probes.syn_cpus.len() > 1
    {
        progress(Progress::Note(format!(
            "warning: {:.0}% of SYNs were processed on one CPU in this run: RPS is not \
             spreading flows over the receive queues or RPS CPUs",
            share * 100.0
        )));
    }
}

/// A server under test, started on the server side of the topology.
struct RunningServer {
    guard: ChildGuard,
    addr: SocketAddr,
    stats_json: Option<PathBuf>,
    /// `reuseport attach` steering the server, stopped (detaching) before it.
    attach: Option<ChildGuard>,
}

impl RunningServer {
    /// Stops the attach (which detaches), then the server.
    fn terminate(mut self, stop: &AtomicBool) -> Result<Option<PathBuf>, RunnerError> {
        if let Some(mut attach) = self.attach.take() {
            attach.terminate(stop)?;
        }
        self.guard.terminate(stop)?;
        Ok(self.stats_json)
    }
}

fn start_server(
    config: &AbConfig,
    topology: &Topology,
    cpus: &CpuList,
    row: Row,
    files: &Path,
    limit: Duration,
) -> Result<RunningServer, RunnerError> {
    let (mode, program) = match row {
        Row::Mode(mode) => (mode, SteeringProgram::recommended()),
        Row::BpfNoop => (SteeringMode::Percpu, SteeringProgram::Noop),
        Row::BpfSelect => (SteeringMode::Percpu, SteeringProgram::SelectOnly),
        Row::Nginx | Row::NginxAttached => {
            let (guard, addr) =
                crate::peers::start_nginx(topology, cpus, files, config.connections)?;
            let attach = if row == Row::NginxAttached {
                let mut command = Command::new(&config.binary);
                command
                    .arg("attach")
                    .args(["--port", &addr.port().to_string()])
                    .args(["--pid", &guard.pid().to_string()])
                    .args(["--duration", &format!("{}s", limit.as_secs())])
                    .arg("--quiet")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                let mut attach = ChildGuard::spawn(command, "reuseport attach (nginx)")?;
                wait_until_steered(&mut attach, addr.port())?;
                Some(attach)
            } else {
                None
            };
            return Ok(RunningServer {
                guard,
                addr,
                stats_json: None,
                attach,
            });
        }
    };
    let stats_json = files.join("server.json");
    let mut command = Command::new(&config.binary);
    command
        .arg("serve")
        .args(["--mode", &mode.to_string()])
        .args(["--bpf-program", &program.to_string()])
        .args([
            "--listen",
            &SocketAddr::new(topology.server_ip(), 0).to_string(),
        ])
        .args(["--cpus", &cpus.to_string()])
        .args(["--duration", &format!("{}s", limit.as_secs())])
        .arg("--stats-json")
        .arg(&stats_json)
        .arg("--quiet")
        .arg("--ready-json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if config.load == LoadKind::Udp {
        command.args(["--proto", "udp"]);
    }
    if mode == SteeringMode::PercpuSpill {
        command
            .args(["--spill-threshold", &config.spill.threshold.to_string()])
            .args([
                "--spill-period",
                &format!("{}us", config.spill.period.as_micros()),
            ]);
        if let Some(targets) = config.spill.max_targets {
            command.args(["--spill-targets", &targets.to_string()]);
        }
    }
    topology.server_side(&mut command)?;
    confine_on_spawn(&mut command, cpus);
    let mut guard = ChildGuard::spawn(command, format!("reuseport serve ({row})"))?;
    let addr = ready(&mut guard)?.listen;
    Ok(RunningServer {
        guard,
        addr,
        stats_json: Some(stats_json),
        attach: None,
    })
}

/// Waits until the kernel says every listener of `port` is in a slot of a steering program
/// (what `reuseport status` checks), or fails with the attach's stderr if it exits first or
/// that takes 15 s.
fn wait_until_steered(attach: &mut ChildGuard, port: u16) -> Result<(), RunnerError> {
    let root = reuseport::pinned::PinnedRoot::system();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let last = match reuseport::port_steering::PortSteering::inspect(port, &root) {
            Ok(steering) => match steering.verdict() {
                reuseport::port_steering::Verdict::Steered => return Ok(()),
                verdict => format!("{verdict:?}"),
            },
            Err(err) => err.to_string(),
        };
        let exited = matches!(attach.child_mut().try_wait(), Ok(Some(_)));
        if exited || Instant::now() > deadline {
            let stderr = attach.kill_and_read_stderr();
            return Err(RunnerError::Child {
                what: attach.what().to_owned(),
                detail: format!(
                    "port {port} not steered ({last}){}: {}",
                    if exited {
                        ", attach exited"
                    } else {
                        " after 15 s"
                    },
                    stderr.trim()
                ),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a child's first stdout line (within 15 s), and keeps draining the rest so the child
/// never blocks on a full pipe.
fn first_line(guard: &mut ChildGuard) -> Result<String, RunnerError> {
    let stdout = guard
        .child_mut()
        .stdout
        .take()
        .ok_or_else(|| RunnerError::Child {
            what: guard.what().to_owned(),
            detail: "no stdout".into(),
        })?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(15)) {
        Ok(Some(Ok(line))) => Ok(line),
        _ => {
            let stderr = guard.kill_and_read_stderr();
            Err(RunnerError::Child {
                what: guard.what().to_owned(),
                detail: format!("did not start: {}", stderr.trim()),
            })
        }
    }
}

/// Reads `reuseport serve`'s first stdout line ("... serving http on ADDR with ...").
/// `serve --ready-json`'s first line, typed.
fn ready(guard: &mut ChildGuard) -> Result<Ready, RunnerError> {
    let line = first_line(guard)?;
    serde_json::from_str(&line).map_err(|err| RunnerError::Child {
        what: guard.what().to_owned(),
        detail: format!("its ready line {line:?} is not what this lab reads: {err}"),
    })
}

/// Sends SIGHUP to a `reuseport serve` (it restarts its workers one at a time) at random
/// intervals of 0.5 to 1.5 times `every`, so restarts hit every phase of the load, until dropped.
struct Restarter {
    stop: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Restarter {
    fn start(pid: u32, every: Duration) -> Self {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread_stop = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
                return;
            };
            // Randomness enough for jitter: std's per-process random hash keys.
            let random = std::hash::RandomState::new();
            let jittered = |n: u64| {
                let fraction =
                    (std::hash::BuildHasher::hash_one(&random, n) % 1000) as f64 / 1000.0;
                every.mul_f64(0.5 + fraction)
            };
            let mut restarts = 0;
            let mut next = Instant::now() + jittered(restarts);
            while !thread_stop.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::HUP);
                    restarts += 1;
                    next += jittered(restarts);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Restarter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread ids of `pid` and, for a prefork server, its children (`/proc/PID/task/*`).
pub fn server_threads(pid: u32) -> Vec<u32> {
    std::iter::once(pid)
        .chain(reuseport::procfs::children_of(pid))
        .flat_map(reuseport::procfs::threads)
        .collect()
}

#[allow(
    clippy::too_many_arguments,
    reason = "one internal call site per phase"
)]
fn measure(
    config: &AbConfig,
    topology: &Topology,
    cpus: &CpuList,
    row: Row,
    rep: usize,
    duration: Duration,
    stop: &AtomicBool,
    probed: bool,
) -> Result<Option<RunRecord>, RunnerError> {
    if stop.load(Ordering::Relaxed) {
        return Err(RunnerError::Interrupted);
    }
    let files = config.out.join("runs").join(format!("{row}-{rep}"));
    fs::create_dir_all(&files).map_err(|source| RunnerError::File {
        path: files.clone(),
        source,
    })?;
    // The server stops by itself well after the load, should the harness die.
    let server_limit = duration * 3 + Duration::from_secs(30);
    let server = start_server(config, topology, cpus, row, &files, server_limit)?;

    let mut probes = if probed {
        let mut probes = Probes::attach(server.addr.port())?;
        probes.watch_threads(server_threads(server.guard.pid()))?;
        for pid in std::iter::once(server.guard.pid())
            .chain(reuseport::procfs::children_of(server.guard.pid()))
        {
            probes.watch_process(pid, crate::locks::Side::Server)?;
        }
        Some(probes)
    } else {
        None
    };
    let hw = probed.then(|| HwCounters::start(cpus));
    let ipis_before = ipi_count()?;
    let losses_before = Losses::read(topology)?;
    let cpu_before = read_cpu_times()?;

    let load_json = files.join("load.json");
    let mut load = Command::new(&config.binary);
    load.arg("load")
        .args(["--target", &server.addr.to_string()])
        .args(["--kind", &format!("{:?}", config.load).to_lowercase()])
        .args(["--connections", &config.connections.to_string()])
        .args(["--duration", &format!("{}ms", duration.as_millis())])
        .args(["--cpus", &topology.client_cpus().to_string()])
        .arg("--json")
        .arg(&load_json)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if topology.pin_clients() {
        load.arg("--pin");
    }
    topology.client_side(&mut load)?;
    confine_on_spawn(&mut load, &topology.client_cpus());
    let mut load = ChildGuard::spawn(load, "reuseport load")?;
    // Its first connections may wait before this: they count as `other`.
    if let Some(probes) = probes.as_mut() {
        probes.watch_process(load.pid(), crate::locks::Side::Client)?;
    }
    // Rolling restarts while the load runs: SIGHUP to our server (peers are left alone).
    let restarter = match (config.restart_every, row) {
        (Some(every), Row::Mode(_)) => Some(Restarter::start(server.guard.pid(), every)),
        _ => None,
    };
    let waited = load.wait(duration + Duration::from_secs(30), stop);
    drop(restarter);
    waited?;

    let ipis = ipi_count()?.saturating_sub(ipis_before);
    let losses = Losses::read(topology)?.since(losses_before);
    let cpu = CpuUse::of(
        &read_cpu_times()?.since(&cpu_before),
        &config.cpus.server,
        &config.cpus.client,
    );
    let hw = hw.map(HwCounters::stop).unwrap_or_default();
    let totals = probes.as_ref().map(Probes::totals).transpose()?;
    drop(probes);
    let stats_json = server.terminate(stop)?;
    let Some(probes) = totals else {
        return Ok(None);
    };
    let load: LoadReport = read_json(&load_json)?;
    let server_json: Option<Summary> = match &stats_json {
        Some(path) => Some(read_json(path)?),
        None => None,
    };
    let mut record = RunRecord {
        row: row.to_string(),
        rep,
        metrics: BTreeMap::new(),
        load,
        server: server_json,
        probes,
        ipis,
        hw,
        losses,
        cpu,
    };
    record.metrics = derive_metrics(config.load, &record);
    Ok(Some(record))
}

fn read_cpu_times() -> Result<CpuTimes, RunnerError> {
    CpuTimes::read().map_err(|source| RunnerError::File {
        path: "/proc/stat".into(),
        source,
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, RunnerError> {
    let text = fs::read_to_string(path).map_err(|source| RunnerError::File {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|err| RunnerError::File {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, err),
    })
}

/// What "per conn" divides by: new connections for `crr`, requests for `rr` and `udp`.
pub fn units(kind: LoadKind, load: &LoadReport) -> u64 {
    match kind {
        LoadKind::Crr => load.connections,
        LoadKind::Rr | LoadKind::Udp => load.requests,
    }
}

/// Turns one run's raw counts (everything of `run` but its `metrics`) into the compared metrics.
/// "Per conn" means per new connection for `crr`, and per request for `rr` and `udp` (where
/// requests, not connections, are the unit).
pub fn derive_metrics(kind: LoadKind, run: &RunRecord) -> BTreeMap<MetricId, Metric> {
    let RunRecord {
        load,
        server,
        probes,
        ipis,
        hw,
        losses,
        cpu,
        ..
    } = run;
    let server = server.as_ref();
    let ipis = *ipis;
    let units = units(kind, load);
    let per = |count: u64| Metric::from_option(reuseport::stats::fraction(count, units));
    let steering = server.and_then(|server| server.steering.as_ref());
    // Our server knows each TCP connection's SO_INCOMING_CPU; for peers use the probes' SYN CPU
    // vs first-read CPU, which sees any TCP server; for UDP (no SO_INCOMING_CPU on unconnected
    // sockets) the steering program's own counters, where there is a program.
    let locality = server
        .and_then(|server| server.total.locality)
        .or_else(|| reuseport::stats::fraction(probes.sum.conns_read_local, probes.sum.conns_read))
        .or_else(|| {
            let total = steering?.total;
            let selections = total.local + total.spilled + total.fallback + total.unsteered;
            reuseport::stats::fraction(total.local, selections)
        });
    let cache_misses = match hw.get("cache_misses") {
        Some(HwCount::Count(count)) => per(*count),
        _ => Metric::Unsupported(crate::metrics::UNSUPPORTED),
    };
    let syns: u64 = probes.syn_cpus.iter().sum();
    let (listener_waits, listener_ns) = crate::locks::listener_totals(&probes.locks);
    let count = |n: Option<u64>| Metric::from_option(n.map(|n| n as f64));
    MetricId::ALL
        .into_iter()
        .map(|metric| {
            let value = match metric {
                MetricId::ConnPerS => Metric::Value(load.conn_per_s),
                MetricId::ReqPerS => Metric::Value(load.req_per_s),
                MetricId::P50Us => Metric::Value(load.p50_us),
                MetricId::P99Us => Metric::Value(load.p99_us),
                MetricId::P999Us => Metric::Value(load.p999_us),
                MetricId::Errors => Metric::Value(load.errors as f64),
                MetricId::SpilledFraction => Metric::from_option(
                    steering.and_then(|s| reuseport::stats::fraction(s.total.spilled, units)),
                ),
                MetricId::Restarts => count(server.map(|s| s.restarts)),
                MetricId::Migrated => count(server.map(|s| s.migrations.success)),
                MetricId::Locality => Metric::from_option(locality),
                MetricId::CrossCpuWakeupsPerConn => per(probes.sum.server_cross_cpu_wakeups),
                MetricId::LockContendedPerConn => per(probes.sum.lock_contended),
                MetricId::LockWaitNsPerConn => per(probes.sum.lock_wait_ns),
                MetricId::ListenerLockContendedPerConn => per(listener_waits),
                MetricId::ListenerLockWaitNsPerConn => per(listener_ns),
                MetricId::IpisPerConn => per(ipis),
                MetricId::RetransPerConn => per(losses.retrans_segs),
                MetricId::LossProbesPerConn => per(losses.loss_probes),
                MetricId::ListenDropsPerConn => per(losses.listen_drops),
                MetricId::BacklogDropsPerConn => per(losses.backlog_drops),
                MetricId::ServerCpuBusy => Metric::from_option(cpu.server_busy),
                MetricId::ClientCpuBusy => Metric::from_option(cpu.client_busy),
                MetricId::CpuUsPerConn => {
                    Metric::from_option((units > 0).then(|| cpu.busy_s * 1e6 / units as f64))
                }
                MetricId::CpusPerConn => Metric::from_option(probes.cpus_per_conn()),
                MetricId::CrossCpuConnFraction => {
                    Metric::from_option(probes.cross_cpu_conn_fraction())
                }
                MetricId::CacheMissesPerConn => cache_misses,
                MetricId::BpfNsPerSelect => {
                    Metric::from_option(steering.and_then(|s| s.ns_per_select))
                }
                MetricId::SynCpuMaxShare => Metric::from_option(reuseport::stats::fraction(
                    probes.syn_cpus.iter().copied().max().unwrap_or(0),
                    syns,
                )),
            };
            (metric, value)
        })
        .collect()
}

fn cross_check_wrk(
    config: &AbConfig,
    topology: &Topology,
    cpus: &CpuList,
    runs: &[RunRecord],
    stop: &AtomicBool,
) -> Result<CrossCheck, RunnerError> {
    let mode = config
        .modes
        .iter()
        .copied()
        .find(|&m| m == SteeringMode::Percpu)
        .or_else(|| config.modes.first().copied())
        .ok_or_else(|| RunnerError::Invalid("the wrk cross-check needs a mode of ours".into()))?;
    let files = config.out.join("runs").join(format!("wrk-{mode}"));
    fs::create_dir_all(&files).map_err(|source| RunnerError::File {
        path: files.clone(),
        source,
    })?;
    let limit = config.duration * 3 + Duration::from_secs(30);
    let server = start_server(config, topology, cpus, Row::Mode(mode), &files, limit)?;
    let wrk_req_per_s = crate::peers::run_wrk(
        topology,
        server.addr,
        config.load,
        &topology.client_cpus(),
        config.connections,
        config.duration,
        stop,
    )?;
    server.terminate(stop)?;
    let mut builtin: Vec<f64> = runs
        .iter()
        .filter(|r| r.row == mode.to_string())
        .filter_map(|r| r.metrics.get(&MetricId::ReqPerS).and_then(Metric::value))
        .collect();
    let builtin_req_per_s = median(&mut builtin).unwrap_or(0.0);
    Ok(CrossCheck {
        mode: mode.to_string(),
        wrk_req_per_s,
        builtin_req_per_s,
        ratio: if builtin_req_per_s > 0.0 {
            wrk_req_per_s / builtin_req_per_s
        } else {
            0.0
        },
    })
}
