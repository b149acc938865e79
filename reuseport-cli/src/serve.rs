//! `reuseport serve`: one pinned worker and one SO_REUSEPORT listener per CPU, steered, with a
//! live line each second and a summary at the end.

use std::{
    cell::RefCell,
    fs,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use reuseport::{
    CpuList, Protocol, Server, ServerConfig, SteeringMode,
    connections::Timeouts,
    metrics::{LatestSnapshot, MetricsEndpoint, MetricsInfo},
    server::ServerError,
    spill::SpillError,
    stats::Summary,
    steering::SteeringProgram,
};

use crate::{
    args::{ModeArg, ProgramArg, ProtoArg, SpillArgs},
    error::BadArguments,
    live::{self, say},
    systemd,
};

/// `reuseport serve`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// percpu: our eBPF program keeps each connection on the CPU that received it.
    /// hash: no program, the kernel's default 4-tuple hash.
    /// cbpf: classic BPF `ld cpu; ret a` (no privileges; drifts when a listener closes).
    /// incoming-cpu: SO_INCOMING_CPU on each listener (no program; Linux >= 6.2).
    /// percpu-spill: percpu, but a CPU that receives more than its share while its queue
    /// reaches --spill-threshold spreads its excess connections over several listeners, nearest
    /// first, until the skew ends.
    /// auto: percpu-spill if this process may load BPF, else incoming-cpu if honoured, else
    /// cbpf.
    #[arg(long, value_enum, default_value_t = ModeArg::PercpuSpill)]
    mode: ModeArg,
    #[command(flatten)]
    spill: SpillArgs,
    /// Address to serve (IPv4 or [IPv6]); port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Transport protocol.
    #[arg(long, value_enum, default_value_t = ProtoArg::Tcp)]
    proto: ProtoArg,
    /// CPUs to run workers on, e.g. `0-3,6` (default: every CPU this process may use).
    #[arg(long)]
    cpus: Option<CpuList>,
    /// Stop after this long (e.g. `10s`, `2m`); default: until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = crate::args::parse_duration)]
    duration: Option<Duration>,
    /// Write the final summary as JSON to this file.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Accept-queue length of each TCP listener (1 to 65535; the kernel caps it at
    /// net.core.somaxconn).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(i32).range(1..=65535))]
    backlog: i32,
    /// TCP: close a connection whose request head has not fully arrived this long after it was
    /// accepted, or after the first byte of a later request (100ms to 1h).
    #[arg(long, value_parser = crate::args::parse_connection_timeout, default_value = "30s")]
    header_timeout: Duration,
    /// TCP: close a keep-alive connection that sends no new request this long after its last
    /// response (100ms to 1h).
    #[arg(long, value_parser = crate::args::parse_connection_timeout, default_value = "75s")]
    idle_timeout: Duration,
    /// Do not print the live line every second.
    #[arg(long)]
    quiet: bool,
    /// Print the first line (the server is ready) as one JSON object instead of text: pid,
    /// listen, protocol, mode, mode_reason, cpus, program_id. For programs that start `serve`.
    #[arg(long)]
    ready_json: bool,
    /// With --mode percpu or percpu-spill: the program to attach. Default: `steer-migrate` on Linux >= 5.14,
    /// else `steer-to-cpu`. Both make the same choice; `steer-migrate` is attached as
    /// select-or-migrate, so connections queued on a listener that closes (a restarting worker)
    /// move to a live listener instead of being reset. `noop` selects nothing (the kernel
    /// hashes) and only calibrates the ns/select figure: its cost is what the BPF statistics
    /// report for an empty program on this machine; `select-only` only calls the kernel's select
    /// helper on the local slot (no counters, no fallback), the part of the cost no program
    /// avoids.
    #[arg(long, value_enum)]
    bpf_program: Option<ProgramArg>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. `127.0.0.1:9464`; port 0 picks a
    /// free port, printed after the first line): per-CPU steering decisions, per-worker
    /// connections, requests and locality, restarts, kernel migrations, the program's run time.
    /// Updated once a second.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

/// Serves until Ctrl-C, SIGTERM or `--duration`, restarting the workers on SIGHUP, then prints
/// the summary.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Before any thread starts: this unsets LISTEN_FDS and LISTEN_PID.
    let passed = systemd::passed_sockets()?;
    live::keep_running_without_reader();
    let stop = live::stop_on_signals()?;
    // A summary file that cannot be written fails now, not after the whole run.
    if let Some(path) = &args.stats_json {
        fs::write(path, "").with_context(|| format!("writing {}", path.display()))?;
    }
    let (mode, protocol) = (SteeringMode::from(args.mode), Protocol::from(args.proto));
    // SIGHUP: restart the workers one at a time (zero-downtime, see `Server::restart_worker`).
    // Installed before anything is served, so an early SIGHUP cannot end the process.
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hangup))
        .context("installing the SIGHUP handler")?;
    // The metrics address is bound first: one in use fails before anything is served.
    let latest = LatestSnapshot::default();
    let metrics = args
        .metrics
        .map(|addr| MetricsEndpoint::start(addr, latest.clone()))
        .transpose()?;
    let passed_count = passed.len();
    let config = ServerConfig {
        listen: args.listen,
        protocol,
        mode,
        cpus: args.cpus,
        backlog: args.backlog,
        program: args
            .bpf_program
            .map_or_else(SteeringProgram::recommended, SteeringProgram::from),
        spill: args.spill.into(),
        timeouts: Timeouts {
            header: args.header_timeout,
            idle: args.idle_timeout,
        },
    };
    let started = if passed.is_empty() {
        Server::start(config)
    } else {
        Server::adopt(config, passed)
    };
    let server = started.map_err(|err| match err {
        ServerError::Spill(spill @ SpillError::TooManyTargets { .. }) => {
            anyhow::Error::new(BadArguments(format!("--spill-targets: {spill}")))
        }
        other => other.into(),
    })?;
    let ready = server.ready()?;
    let program = match ready.program_id {
        Some(id) => format!("steering program id {id}"),
        None => "no eBPF steering program".to_owned(),
    };
    if args.ready_json {
        say!("{}", serde_json::to_string(&ready)?);
    } else {
        say!(
            "reuseport: serving {} on {} with workers on CPUs {}, mode {}{}, {}; {}",
            match protocol {
                Protocol::Tcp => "http",
                Protocol::Udp => "udp",
            },
            server.local_addr(),
            server.cpus(),
            server.mode(),
            if mode == SteeringMode::Auto {
                format!(" ({})", server.mode_reason())
            } else {
                String::new()
            },
            program,
            match args.duration {
                Some(d) => format!("stopping after {}", humantime::format_duration(d)),
                None => "Ctrl-C to stop".to_owned(),
            }
        );
    }

    if args.metrics.is_some() {
        latest.describe(MetricsInfo {
            mode: server.mode().to_string(),
            protocol: match protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            }
            .to_owned(),
            listen: server.local_addr(),
            program_id: ready.program_id,
        });
        latest.publish(server.snapshot()?);
    }
    if passed_count > 0 {
        say!(
            "reuseport: {passed_count} listener(s) from the service manager (socket activation), \
             {} added to their group",
            server.cpus().len() - passed_count
        );
    }
    if let Some(endpoint) = &metrics {
        say!(
            "reuseport: metrics on http://{}/metrics",
            endpoint.local_addr()
        );
    }

    let status = format!(
        "serving on {} with {} workers, mode {}",
        server.local_addr(),
        server.cpus().len(),
        server.mode()
    );
    systemd::ready(&status);

    let server = RefCell::new(server);
    live::show_live_until_stopped(
        &stop,
        args.duration,
        args.quiet,
        || {
            let snapshot = server.borrow().snapshot()?;
            if args.metrics.is_some() {
                latest.publish(snapshot.clone());
            }
            Ok(snapshot)
        },
        || {
            if hangup.swap(false, Ordering::Relaxed) {
                let started = Instant::now();
                systemd::reloading();
                let restarted = server.borrow_mut().restart_workers();
                systemd::ready(&status);
                match restarted {
                    Ok(()) => say!(
                        "reuseport: SIGHUP: restarted {} workers one at a time in {:.0?}",
                        server.borrow().cpus().len(),
                        started.elapsed()
                    ),
                    // The worker that could not be replaced keeps serving; so does the server.
                    Err(err) => eprintln!(
                        "reuseport: SIGHUP: restart failed, the old worker keeps serving: {:#}",
                        anyhow::Error::from(err)
                    ),
                }
            }
            Ok(())
        },
    )?;

    systemd::stopping();
    let server = server.into_inner();
    let (mode, protocol, listen) = (server.mode(), server.protocol(), server.local_addr());
    let last = server.stop()?;
    let summary = Summary::new(mode, protocol, listen, &last);
    {
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), "{}", summary.table());
    }
    if let Some(path) = args.stats_json {
        let json = serde_json::to_string_pretty(&summary).context("encoding the summary")?;
        fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    say!("reuseport: stopped; all listeners closed, steering detached");
    Ok(())
}
