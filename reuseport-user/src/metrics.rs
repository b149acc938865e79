//! Prometheus metrics: the counters of the live line and the summary, for a scraper.
//!
//! [`render`] turns a [`Snapshot`] (counters since the server started) into the Prometheus text
//! exposition format; [`MetricsEndpoint`] serves the latest published snapshot at
//! `http://ADDR/metrics` from a thread of its own, so a slow or hostile scraper never holds up
//! a worker or the steering.
//!
//! A snapshot without workers (`attach`: a server not ours) has no `reuseport_worker_*`
//! series, `reuseport_worker_restarts_total` included.
//!
//! | metric                                          | type    | labels             |
//! |-------------------------------------------------|---------|--------------------|
//! | `reuseport_info`                                | gauge   | mode, protocol, listen, program_id |
//! | `reuseport_uptime_seconds`                      | gauge   |                    |
//! | `reuseport_steering_decisions_total`            | counter | cpu, decision      |
//! | `reuseport_steering_same_cpu_ratio`             | gauge   | cpu                |
//! | `reuseport_program_runs_total`                  | counter |                    |
//! | `reuseport_program_run_seconds_total`           | counter |                    |
//! | `reuseport_worker_accepted_total`               | counter | cpu                |
//! | `reuseport_worker_accepted_local_total`         | counter | cpu                |
//! | `reuseport_worker_requests_total`               | counter | cpu                |
//! | `reuseport_worker_errors_total`                 | counter | cpu                |
//! | `reuseport_worker_timed_out_total`              | counter | cpu                |
//! | `reuseport_worker_shed_total`                   | counter | cpu                |
//! | `reuseport_worker_locality_ratio`               | gauge   | cpu                |
//! | `reuseport_worker_restarts_total`               | counter |                    |
//! | `reuseport_kernel_migrations_total`             | counter | result             |
//! | `reuseport_spill_samples_total`                 | counter |                    |
//! | `reuseport_spill_starts_total`                  | counter |                    |
//! | `reuseport_spill_max_queue_depth`               | gauge   |                    |
//! | `reuseport_spill_active`                        | gauge   | cpu                |
//!
//! `cpu` on a steering decision is the CPU that received the packet (where the program ran); on a
//! worker metric, the worker's CPU. `decision` is one of `local`, `spilled`, `fallback`,
//! `unsteered`, `error`, `held` (see [`SteeringStats`]). Mean time per selection is
//! `rate(reuseport_program_run_seconds_total) / rate(reuseport_program_runs_total)`; the program's
//! run statistics are absent when the kernel keeps none (see [`crate::steering`]).

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use prometheus::{
    Encoder as _, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
    core::Collector,
};
use reuseport_common::SteeringStats;
use thiserror::Error;

use crate::stats::Snapshot;

/// Errors from the metrics endpoint.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// The metrics address could not be bound.
    #[error("listening for metrics on {addr} failed")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The endpoint's thread could not be started.
    #[error("starting the metrics thread failed")]
    Thread(#[source] io::Error),
    /// A metric could not be built or encoded (a bug in its definition).
    #[error("encoding the metrics failed")]
    Encode(#[source] prometheus::Error),
}

/// What a scrape says about the server besides its counters: the labels of `reuseport_info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsInfo {
    /// The steering mode in effect (after `auto` chose).
    pub mode: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The address the server listens on.
    pub listen: SocketAddr,
    /// The steering program's kernel id; `None` in modes without an eBPF program.
    pub program_id: Option<u32>,
}

/// What the endpoint shows: the server's description and its latest snapshot, shared between
/// whoever takes snapshots (the live line's loop) and the endpoint. Cloning it shares the same
/// slot.
#[derive(Clone, Debug, Default)]
pub struct LatestSnapshot(Arc<Mutex<Published>>);

#[derive(Debug, Default)]
struct Published {
    info: Option<MetricsInfo>,
    snapshot: Option<Snapshot>,
}

impl LatestSnapshot {
    /// Sets the labels of `reuseport_info` (known once the server has started).
    pub fn describe(&self, info: MetricsInfo) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).info = Some(info);
    }

    /// Makes `snapshot` the one the next scrape shows.
    pub fn publish(&self, snapshot: Snapshot) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshot = Some(snapshot);
    }

    /// The metrics text of the last snapshot published, `None` before the first or before
    /// [`LatestSnapshot::describe`].
    pub fn render(&self) -> Option<Result<String, MetricsError>> {
        let published = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match (&published.snapshot, &published.info) {
            (Some(snapshot), Some(info)) => Some(render(snapshot, info)),
            _ => None,
        }
    }
}

/// The metrics for `snapshot` in the Prometheus text format (version 0.0.4).
pub fn render(snapshot: &Snapshot, info: &MetricsInfo) -> Result<String, MetricsError> {
    let registry = Registry::new();
    let program_id = info.program_id.map(|id| id.to_string()).unwrap_or_default();
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        IntGaugeVec::new(Opts::new(name, help), labels).map_err(MetricsError::Encode)
    };
    let counter = |name: &str, help: &str, labels: &[&str]| {
        IntCounterVec::new(Opts::new(name, help), labels).map_err(MetricsError::Encode)
    };

    let server_info = gauge(
        "reuseport_info",
        "Always 1: the labels say the server's steering mode, protocol, address and program id.",
        &["mode", "protocol", "listen", "program_id"],
    )?;
    server_info
        .with_label_values(&[
            info.mode.as_str(),
            info.protocol.as_str(),
            &info.listen.to_string(),
            &program_id,
        ])
        .set(1);
    let uptime = GaugeVec::new(
        Opts::new(
            "reuseport_uptime_seconds",
            "Seconds since the server started.",
        ),
        &[],
    )
    .map_err(MetricsError::Encode)?;
    uptime
        .with_label_values(&[] as &[&str])
        .set(snapshot.elapsed.as_secs_f64());
    let mut collectors: Vec<Box<dyn Collector>> = vec![Box::new(server_info), Box::new(uptime)];

    if let Some(per_cpu) = &snapshot.steering {
        let decisions = counter(
            "reuseport_steering_decisions_total",
            "Selections by the steering program, by the CPU that received the packet and what it \
             decided.",
            &["cpu", "decision"],
        )?;
        let same_cpu = GaugeVec::new(
            Opts::new(
                "reuseport_steering_same_cpu_ratio",
                "Fraction of the connections received on each CPU that the program gave to that \
                 CPU's listener, so that the receiving, accepting and serving CPU are the same, \
                 since the start.",
            ),
            &["cpu"],
        )
        .map_err(MetricsError::Encode)?;
        for (cpu, stats) in per_cpu.iter().enumerate() {
            let Some(ratio) = crate::stats::same_cpu_ratio(stats) else {
                continue;
            };
            let cpu = cpu.to_string();
            for (decision, count) in decision_counts(stats) {
                decisions
                    .with_label_values(&[cpu.as_str(), decision])
                    .inc_by(count);
            }
            same_cpu.with_label_values(&[cpu.as_str()]).set(ratio);
        }
        collectors.push(Box::new(decisions));
        collectors.push(Box::new(same_cpu));
    }
    if let Some(program) = snapshot.program {
        let runs = counter(
            "reuseport_program_runs_total",
            "Runs of the steering program (one per TCP SYN or UDP datagram reaching the group).",
            &[],
        )?;
        runs.with_label_values(&[] as &[&str])
            .inc_by(program.run_count);
        let run_seconds = prometheus::CounterVec::new(
            Opts::new(
                "reuseport_program_run_seconds_total",
                "Seconds spent in the steering program, from the kernel's BPF run-time statistics.",
            ),
            &[],
        )
        .map_err(MetricsError::Encode)?;
        run_seconds
            .with_label_values(&[] as &[&str])
            .inc_by(program.run_time_ns as f64 / 1e9);
        collectors.push(Box::new(runs));
        collectors.push(Box::new(run_seconds));
    }

    let accepted = counter(
        "reuseport_worker_accepted_total",
        "Connections accepted (TCP) or datagrams received (UDP) by each CPU's worker.",
        &["cpu"],
    )?;
    let local = counter(
        "reuseport_worker_accepted_local_total",
        "Connections (TCP) or datagrams (UDP) each CPU's worker got that were received on its CPU.",
        &["cpu"],
    )?;
    let requests = counter(
        "reuseport_worker_requests_total",
        "Requests answered by each CPU's worker.",
        &["cpu"],
    )?;
    let errors = counter(
        "reuseport_worker_errors_total",
        "Connections or datagrams each CPU's worker failed on.",
        &["cpu"],
    )?;
    let timed_out = counter(
        "reuseport_worker_timed_out_total",
        "TCP connections each CPU's worker closed for the header or idle timeout.",
        &["cpu"],
    )?;
    let shed = counter(
        "reuseport_worker_shed_total",
        "Idle TCP connections each CPU's worker closed to accept new ones when out of file \
         descriptors.",
        &["cpu"],
    )?;
    let locality = GaugeVec::new(
        Opts::new(
            "reuseport_worker_locality_ratio",
            "Fraction of each worker's connections received on its own CPU, since the start.",
        ),
        &["cpu"],
    )
    .map_err(MetricsError::Encode)?;
    for worker in &snapshot.workers {
        let cpu = worker.cpu.to_string();
        let cpu = [cpu.as_str()];
        accepted.with_label_values(&cpu).inc_by(worker.accepted);
        local.with_label_values(&cpu).inc_by(worker.local);
        requests.with_label_values(&cpu).inc_by(worker.requests);
        errors.with_label_values(&cpu).inc_by(worker.errors);
        timed_out.with_label_values(&cpu).inc_by(worker.timed_out);
        shed.with_label_values(&cpu).inc_by(worker.shed);
        if let Some(ratio) = worker.locality() {
            locality.with_label_values(&cpu).set(ratio);
        }
    }
    let restarts = counter(
        "reuseport_worker_restarts_total",
        "Workers restarted (SIGHUP restarts one worker at a time).",
        &[],
    )?;
    // A snapshot without workers is of a server not ours (`attach`): its restarts are unknown.
    if !snapshot.workers.is_empty() {
        restarts
            .with_label_values(&[] as &[&str])
            .inc_by(snapshot.restarts);
    }
    let migrations = counter(
        "reuseport_kernel_migrations_total",
        "Requests the kernel moved from a closing listener to a live one (success) or reset \
         (failure), since the server started.",
        &["result"],
    )?;
    migrations
        .with_label_values(&["success"])
        .inc_by(snapshot.migrations.success);
    migrations
        .with_label_values(&["failure"])
        .inc_by(snapshot.migrations.failure);
    collectors.extend([
        Box::new(accepted) as Box<dyn Collector>,
        Box::new(local),
        Box::new(requests),
        Box::new(errors),
        Box::new(timed_out),
        Box::new(shed),
        Box::new(locality),
        Box::new(restarts),
        Box::new(migrations),
    ]);

    if let Some(spill) = snapshot.spill {
        let samples = counter(
            "reuseport_spill_samples_total",
            "Samples of the listeners' queues taken by the spill sampler.",
            &[],
        )?;
        samples
            .with_label_values(&[] as &[&str])
            .inc_by(spill.samples);
        let starts = counter(
            "reuseport_spill_starts_total",
            "Times a CPU started spilling its excess connections to other CPUs' listeners.",
            &[],
        )?;
        starts
            .with_label_values(&[] as &[&str])
            .inc_by(spill.spill_starts);
        let depth = gauge(
            "reuseport_spill_max_queue_depth",
            "The deepest listener queue the spill sampler has seen.",
            &[],
        )?;
        depth
            .with_label_values(&[] as &[&str])
            .set(i64::try_from(spill.max_depth).unwrap_or(i64::MAX));
        let active = gauge(
            "reuseport_spill_active",
            "1 while the CPU spreads its excess new connections over other CPUs' listeners.",
            &["cpu"],
        )?;
        for worker in &snapshot.workers {
            let spilling = snapshot.spilling.contains(&worker.cpu);
            active
                .with_label_values(&[worker.cpu.to_string().as_str()])
                .set(i64::from(spilling));
        }
        collectors.extend([
            Box::new(samples) as Box<dyn Collector>,
            Box::new(starts),
            Box::new(depth),
            Box::new(active),
        ]);
    }

    for collector in collectors {
        registry.register(collector).map_err(MetricsError::Encode)?;
    }
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .map_err(MetricsError::Encode)?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Each `decision` label and its count.
fn decision_counts(stats: &SteeringStats) -> [(&'static str, u64); 6] {
    [
        ("local", stats.local),
        ("spilled", stats.spilled),
        ("fallback", stats.fallback),
        ("unsteered", stats.unsteered),
        ("error", stats.errors),
        ("held", stats.held),
    ]
}

/// `http://ADDR/metrics`, served from its own thread until dropped.
#[derive(Debug)]
pub struct MetricsEndpoint {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the endpoint's thread looks at its stop flag between connections.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The longest request head read; a scrape's is a few hundred bytes.
const MAX_REQUEST: usize = 8192;

impl MetricsEndpoint {
    /// Listens on `addr` (port 0 picks a free one, see [`MetricsEndpoint::local_addr`]) and
    /// answers `GET /metrics` with [`render`] of what `latest` holds (an empty body until a
    /// snapshot and a description are published), anything else with 404. Start it before the
    /// server, so that an address in use fails before anything is served.
    pub fn start(addr: SocketAddr, latest: LatestSnapshot) -> Result<Self, MetricsError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new()
            .name("reuseport-metrics".to_owned())
            .spawn({
                let stop = Arc::clone(&stop);
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            // One scrape at a time: a scraper is one client, and a request that
                            // stalls is cut off after REQUEST_TIMEOUT.
                            Ok((stream, _)) => {
                                let _ = answer(stream, &latest);
                            }
                            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                                thread::sleep(POLL_INTERVAL);
                            }
                            // EMFILE and the like: try again later rather than spin.
                            Err(_) => thread::sleep(POLL_INTERVAL),
                        }
                    }
                }
            })
            .map_err(MetricsError::Thread)?;
        Ok(Self {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request head from `stream` and answers it.
fn answer(mut stream: TcpStream, latest: &LatestSnapshot) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request_line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = request_line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => match latest.render() {
            Some(Ok(text)) => ("200 OK", text),
            Some(Err(err)) => ("500 Internal Server Error", format!("{err}\n")),
            None => ("200 OK", String::new()),
        },
        _ => (
            "404 Not Found",
            "only GET /metrics is served here\n".to_owned(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        stats::{Migrations, WorkerStats},
        steering::ProgramRunStats,
    };

    fn info() -> MetricsInfo {
        MetricsInfo {
            mode: "percpu".to_owned(),
            protocol: "tcp".to_owned(),
            listen: "127.0.0.1:8080".parse().unwrap(),
            program_id: Some(42),
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            elapsed: Duration::from_secs(3),
            workers: vec![WorkerStats {
                cpu: 1,
                accepted: 10,
                local: 9,
                unknown_incoming: 0,
                requests: 12,
                errors: 0,
                timed_out: 3,
                shed: 0,
            }],
            steering: Some(vec![
                SteeringStats::default(),
                SteeringStats {
                    local: 9,
                    fallback: 1,
                    ..Default::default()
                },
            ]),
            program: Some(ProgramRunStats {
                run_count: 10,
                run_time_ns: 500,
            }),
            migrations: Migrations {
                success: 2,
                failure: 0,
            },
            restarts: 1,
            spill: None,
            spilling: Vec::new(),
        }
    }

    #[test]
    fn counters_carry_their_labels_and_base_units() {
        let text = render(&snapshot(), &info()).unwrap();
        for line in [
            "reuseport_info{listen=\"127.0.0.1:8080\",mode=\"percpu\",program_id=\"42\",protocol=\"tcp\"} 1",
            "reuseport_steering_decisions_total{cpu=\"1\",decision=\"local\"} 9",
            "reuseport_steering_decisions_total{cpu=\"1\",decision=\"fallback\"} 1",
            "reuseport_steering_same_cpu_ratio{cpu=\"1\"} 0.9",
            "reuseport_program_runs_total 10",
            "reuseport_program_run_seconds_total 0.0000005",
            "reuseport_worker_accepted_total{cpu=\"1\"} 10",
            "reuseport_worker_locality_ratio{cpu=\"1\"} 0.9",
            "reuseport_worker_restarts_total 1",
            "reuseport_worker_timed_out_total{cpu=\"1\"} 3",
            "reuseport_kernel_migrations_total{result=\"success\"} 2",
            "# TYPE reuseport_worker_requests_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // CPU 0 ran nothing: no series for it.
        assert!(!text.contains("cpu=\"0\""), "{text}");
        assert!(!text.contains("reuseport_spill"), "{text}");
    }

    #[test]
    fn spilling_cpus_are_1_and_the_others_0() {
        let mut snapshot = snapshot();
        snapshot.workers.push(WorkerStats {
            cpu: 2,
            ..snapshot.workers[0]
        });
        snapshot.spill = Some(crate::spill::SpillCounters {
            samples: 7,
            spill_starts: 1,
            max_depth: 12,
        });
        snapshot.spilling = vec![2];
        let text = render(&snapshot, &info()).unwrap();
        for line in [
            "reuseport_spill_active{cpu=\"1\"} 0",
            "reuseport_spill_active{cpu=\"2\"} 1",
            "reuseport_spill_starts_total 1",
            "reuseport_spill_max_queue_depth 12",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
