//! `reuseport`: steer each new connection to the SO_REUSEPORT listener of the worker pinned to the
//! CPU that received it, and show what that does.

use std::{
    cell::RefCell,
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, error::ErrorKind};
use reuseport::{
    CpuList, Protocol, Server, ServerConfig, SteeringMode,
    server::ServerError,
    spill::{SpillConfig, SpillError},
    stats::{Migrations, Snapshot, Summary},
    steering::SteeringProgram,
};
use reuseport_lab::{
    load::{LoadConfig, LoadKind},
    report::Report,
    runner::{AbConfig, Progress},
    topology::TopologyKind,
};

/// Per-CPU SO_REUSEPORT steering with eBPF.
#[derive(Debug, Parser)]
// The help's first line, as before the CLI had its own package (`about` alone would take this
// package's description).
#[command(
    name = "reuseport",
    version,
    about = "Per-CPU SO_REUSEPORT steering with eBPF: library and the `reuseport` CLI",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve on one port with one pinned worker and one SO_REUSEPORT listener per CPU.
    ///
    /// TCP serves HTTP/1.1 (keep-alive); every response carries `x-worker-cpu` (the worker's CPU)
    /// and `x-incoming-cpu` (the CPU that processed the connection's packets). UDP answers each
    /// datagram with `worker-cpu=N incoming-cpu=M`, a newline and the datagram. A live line per
    /// second shows per-CPU connections, locality and the steering program's counters.
    Serve(ServeArgs),
    /// Generate load against a server: crr (a new connection per HTTP request), rr (keep-alive),
    /// or udp; closed loop, or open loop at --rate with latency from the scheduled start.
    Load(LoadArgs),
    /// Compare steering modes (and peers) under the same load: lock contention, cross-CPU
    /// wakeups, IPIs, CPUs per connection, throughput and latency, interleaved repetitions.
    ///
    /// Writes DIR/results.json (every run and the summary) and DIR/results.svg, and prints a
    /// table of median [min-max] per mode with the percpu/hash ratio. Needs root.
    Ab(AbArgs),
    /// Steer a running server's listeners per CPU, without touching its code.
    ///
    /// Finds the SO_REUSEPORT listeners on --port held by --pid and its descendants (e.g.
    /// nginx's master), matches each to the worker process that serves it (its epoll
    /// registrations) and that worker's single CPU, and attaches the steering program. Prints a
    /// live line until Ctrl-C, then detaches (or, with --persist, leaves it pinned).
    Attach(AttachArgs),
    /// Remove steering left in place by `attach --persist`.
    Detach {
        /// The port given to `attach`.
        #[arg(long)]
        port: u16,
    },
    /// Show persistent steering: program, slots (and holes), fallbacks, counters.
    Status {
        /// Only this port.
        #[arg(long)]
        port: Option<u16>,
    },
}

#[derive(Debug, clap::Args)]
struct AttachArgs {
    /// The port the server listens on.
    #[arg(long)]
    port: u16,
    /// A process of the server (any: the command also searches its descendants). Repeatable.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// A listening socket this process already holds (inherited, systemd LISTEN_FDS), paired
    /// with the --cpu that follows it. Repeatable.
    #[arg(long = "fd")]
    fds: Vec<i32>,
    /// The CPU of the preceding --fd.
    #[arg(long = "cpu")]
    fd_cpus: Vec<u32>,
    /// percpu: attach the steering program; hash: detach any program and leave the group to
    /// the kernel's hash (after checking what attach would steer).
    #[arg(long, value_enum, default_value_t = AttachMode::Percpu)]
    mode: AttachMode,
    /// Leave the steering in place after exit, pinned under /sys/fs/bpf/reuseport/PORT/
    /// (`reuseport detach --port PORT` removes it).
    #[arg(long)]
    persist: bool,
    /// Detach after this long (default: at Ctrl-C or SIGTERM).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Do not print the live line every second.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AttachMode {
    Percpu,
    Hash,
}

#[derive(Debug, clap::Args)]
struct AbArgs {
    /// Steering modes to compare, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "hash,percpu")]
    modes: Vec<SteeringMode>,
    /// veth: server and clients in two namespaces, RPS spreading SYNs over CPUs by flow hash;
    /// loopback: clients pinned round-robin to CPUs.
    #[arg(long, value_enum, default_value_t = TopologyKind::Veth)]
    topology: TopologyKind,
    /// Process every SYN on the first CPU (veth: RPS mask of one CPU; loopback: all clients
    /// pinned there), as with a one-queue NIC or one bursty client. Compare
    /// `--modes hash,percpu,percpu-spill`.
    #[arg(long)]
    skew: bool,
    /// Restart our server's workers (SIGHUP, one at a time) at random intervals averaging this
    /// (0.5x to 1.5x) during every measured run, e.g. `500ms`; peers are not restarted. Errors
    /// show any connection lost.
    #[arg(long, value_parser = humantime::parse_duration)]
    restart_every: Option<Duration>,
    /// percpu-spill rows: queue depth that counts as overloaded.
    #[arg(long, default_value_t = SpillConfig::default().threshold,
          value_parser = clap::value_parser!(u32).range(1..))]
    spill_threshold: u32,
    /// percpu-spill rows: how often the queues are sampled (more than 0, at most 1s).
    #[arg(long, value_parser = parse_spill_period, default_value = "1ms")]
    spill_period: Duration,
    /// percpu-spill rows: most CPUs one overloaded CPU spreads its excess over (default: as many
    /// as the load needs; at most the CPU count less one).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    spill_targets: Option<u32>,
    /// crr: a new connection per request; rr: keep-alive; udp: datagram request/reply.
    #[arg(long, value_enum, default_value_t = LoadKind::Crr)]
    load: LoadKind,
    /// Measured time per run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unmeasured run per row before the first repetition.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    warmup: Duration,
    /// Repetitions of every row.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// A short run for a first look or CI: 2 reps of 3 s after a 1 s warm-up.
    #[arg(long)]
    quick: bool,
    /// Directory for results.json, results.svg and per-run files.
    #[arg(long, default_value = "ab-results")]
    out: PathBuf,
    /// Also run a peer server as a row: nginx (Debian's, reuseport, one pinned worker per CPU);
    /// nginx-attach adds a second row, the same nginx steered by `reuseport attach`.
    #[arg(long, value_parser = ["nginx", "nginx-attach"])]
    peer: Option<String>,
    /// Also run wrk against our server and report its req/s beside the built-in generator's.
    #[arg(long, value_parser = ["wrk"])]
    cross_check: Option<String>,
    /// Also run the rows `bpf-noop` (an empty program, kernel hash: its bpf_ns_per_select is the
    /// floor of the cost measurement on this machine) and `bpf-select` (only the kernel's
    /// select helper on the local slot: the cost every steering program pays).
    #[arg(long)]
    calibrate: bool,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// The server to load.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: SocketAddr,
    /// crr: connect, one request, close; rr: keep-alive requests; udp: datagram request/reply.
    #[arg(long, value_enum, default_value_t = LoadKind::Crr)]
    kind: LoadKind,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Stop after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Stop after this many requests in all.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// Open loop: this many requests per second in all (default: closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// CPUs for client threads (one thread per CPU; default: every CPU this process may use).
    #[arg(long)]
    cpus: Option<CpuList>,
    /// Pin each client thread to its CPU (a pinned loopback client's SYN is processed there).
    #[arg(long)]
    pin: bool,
    /// Count a request as failed after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    timeout: Duration,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// percpu: our eBPF program keeps each connection on the CPU that received it.
    /// hash: no program, the kernel's default 4-tuple hash.
    /// cbpf: classic BPF `ld cpu; ret a` (no privileges; drifts when a listener closes).
    /// incoming-cpu: SO_INCOMING_CPU on each listener (no program; Linux >= 6.2).
    /// percpu-spill: percpu, but a CPU that receives more than its share while its queue
    /// reaches --spill-threshold spreads its excess connections over several listeners, nearest
    /// first, until the skew ends.
    /// auto: percpu-spill if this process may load BPF, else incoming-cpu if honoured, else
    /// cbpf.
    #[arg(long, value_enum, default_value_t = SteeringMode::PercpuSpill)]
    mode: SteeringMode,
    /// percpu-spill: queue depth (TCP: accept queue; UDP: receive queue, in datagrams) that
    /// counts as overloaded (see README "Restarts and overload").
    #[arg(long, default_value_t = SpillConfig::default().threshold,
          value_parser = clap::value_parser!(u32).range(1..))]
    spill_threshold: u32,
    /// percpu-spill: how often the queues and arrivals are sampled (more than 0, at most 1s).
    #[arg(long, value_parser = parse_spill_period, default_value = "1ms")]
    spill_period: Duration,
    /// percpu-spill: most CPUs one overloaded CPU spreads its excess over (default: as many as
    /// the load needs; at most the number of worker CPUs less one).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    spill_targets: Option<u32>,
    /// Address to serve (IPv4 or [IPv6]); port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Transport protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Tcp)]
    proto: Protocol,
    /// CPUs to run workers on, e.g. `0-3,6` (default: every CPU this process may use).
    #[arg(long)]
    cpus: Option<CpuList>,
    /// Stop after this long (e.g. `10s`, `2m`); default: until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Write the final summary as JSON to this file.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Accept-queue length of each TCP listener.
    #[arg(long, default_value_t = 1024)]
    backlog: i32,
    /// Do not print the live line every second.
    #[arg(long)]
    quiet: bool,
    /// With --mode percpu or percpu-spill: the program to attach. Default: `steer-migrate` on Linux >= 5.14,
    /// else `steer-to-cpu`. Both make the same choice; `steer-migrate` is attached as
    /// select-or-migrate, so connections queued on a listener that closes (a restarting worker)
    /// move to a live listener instead of being reset. `noop` selects nothing (the kernel
    /// hashes) and only calibrates the ns/select figure: its cost is what the BPF statistics
    /// report for an empty program on this machine; `select-only` only calls the kernel's select
    /// helper on the local slot (no counters, no fallback), the part of the cost no program
    /// avoids.
    #[arg(long, value_enum)]
    bpf_program: Option<SteeringProgram>,
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away (`| head`),
    // instead of panicking on the first write to a closed pipe.
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Load(args) => load(args),
        Command::Ab(args) => ab(args),
        Command::Attach(args) => attach(args),
        Command::Detach { port } => detach(port),
        Command::Status { port } => status(port),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<BadArguments>().is_some() => {
            eprintln!("reuseport: {err} (see `reuseport --help`)");
            ExitCode::from(2)
        }
        Err(err) => {
            eprintln!("reuseport: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Arguments that parse but cannot work on this machine (e.g. more spill targets than CPUs):
/// one line and exit code 2, like a usage error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadArguments(String);

/// `--spill-period`: a duration more than 0 and at most [`reuseport::spill::MAX_PERIOD`].
fn parse_spill_period(value: &str) -> Result<Duration, String> {
    let period = humantime::parse_duration(value).map_err(|err| err.to_string())?;
    if period.is_zero() || period > reuseport::spill::MAX_PERIOD {
        return Err("must be more than 0 and at most 1s".to_owned());
    }
    Ok(period)
}

/// Help and version go out as clap prints them; a usage error becomes one line and exit code 2.
fn usage_error(err: clap::Error) -> ExitCode {
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) || err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    let rendered = err.render().to_string();
    let line = rendered
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty() && !line.starts_with("Usage:") && !line.starts_with("For more")
        })
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("reuseport: {line} (see `reuseport --help`)");
    ExitCode::from(2)
}

/// A flag that SIGINT or SIGTERM sets, for loops that must end cleanly (detaching, tearing down).
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing signal handler")?;
    }
    Ok(stop)
}

/// Waits until `stop` is set or `duration` has passed, printing once a second (unless `quiet`)
/// the live line of what happened in that second, from `snapshot`'s counters. Calls `tick`
/// every 50 ms in between (e.g. to act on SIGHUP).
fn show_live_until_stopped(
    stop: &AtomicBool,
    duration: Option<Duration>,
    quiet: bool,
    mut snapshot: impl FnMut() -> anyhow::Result<Snapshot>,
    mut tick: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let deadline = duration.map(|d| Instant::now() + d);
    let mut previous = Snapshot::default();
    let mut next_line = Instant::now() + Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        thread::sleep(Duration::from_millis(50));
        tick()?;
        if Instant::now() >= next_line {
            next_line += Duration::from_secs(1);
            let now = snapshot()?;
            if !quiet {
                println!("{}", now.since(&previous).live_line(now.elapsed));
            }
            previous = now;
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let stop = stop_on_signals()?;
    // SIGHUP: restart the workers one at a time (zero-downtime, see `Server::restart_worker`).
    // Installed before anything is served, so an early SIGHUP cannot end the process.
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hangup))
        .context("installing the SIGHUP handler")?;
    let server = Server::start(ServerConfig {
        listen: args.listen,
        protocol: args.proto,
        mode: args.mode,
        cpus: args.cpus,
        backlog: args.backlog,
        program: args
            .bpf_program
            .unwrap_or_else(SteeringProgram::recommended),
        spill: SpillConfig {
            threshold: args.spill_threshold,
            period: args.spill_period,
            max_targets: args.spill_targets,
        },
    })
    .map_err(|err| match err {
        ServerError::Spill(spill @ SpillError::TooManyTargets { .. }) => {
            anyhow::Error::new(BadArguments(format!("--spill-targets: {spill}")))
        }
        other => other.into(),
    })?;
    let program = match server.steering() {
        Some(steering) => format!("steering program id {}", steering.program_id()?),
        None => "no eBPF steering program".to_owned(),
    };
    println!(
        "reuseport: serving {} on {} with workers on CPUs {}, mode {}{}, {}; {}",
        match args.proto {
            Protocol::Tcp => "http",
            Protocol::Udp => "udp",
        },
        server.local_addr(),
        server.cpus(),
        server.mode(),
        if args.mode == SteeringMode::Auto {
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

    let server = RefCell::new(server);
    show_live_until_stopped(
        &stop,
        args.duration,
        args.quiet,
        || Ok(server.borrow().snapshot()?),
        || {
            if hangup.swap(false, Ordering::Relaxed) {
                let started = Instant::now();
                let restarted = server.borrow_mut().restart_workers();
                match restarted {
                    Ok(()) => println!(
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

    let server = server.into_inner();
    let (mode, protocol, listen) = (server.mode(), server.protocol(), server.local_addr());
    let last = server.stop()?;
    let summary = Summary::new(mode, protocol, listen, &last);
    print!("{}", summary.table());
    if let Some(path) = args.stats_json {
        let json = serde_json::to_string_pretty(&summary).context("encoding the summary")?;
        fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    println!("reuseport: stopped; all listeners closed, steering detached");
    Ok(())
}

fn load(args: LoadArgs) -> anyhow::Result<()> {
    let allowed = CpuList::allowed()?;
    let cpus = match args.cpus {
        Some(cpus) => cpus.within(&allowed)?,
        None => allowed,
    };
    let report = reuseport_lab::load::run(&LoadConfig {
        target: args.target,
        kind: args.kind,
        connections: args.connections,
        duration: args.duration,
        max_requests: args.max_requests,
        rate: args.rate,
        cpus,
        pin: args.pin,
        request_timeout: args.timeout,
    })?;
    println!(
        "load: {:?} against {} for {:.1}s: {} requests ({:.0}/s), {} connections ({:.0}/s), {} errors; \
         latency p50 {:.0}us p99 {:.0}us p99.9 {:.0}us max {:.0}us",
        args.kind,
        args.target,
        report.duration_s,
        report.requests,
        report.req_per_s,
        report.connections,
        report.conn_per_s,
        report.errors,
        report.p50_us,
        report.p99_us,
        report.p999_us,
        report.max_us
    );
    if let Some(path) = args.json {
        let json = serde_json::to_string_pretty(&report).context("encoding the report")?;
        fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn ab(args: AbArgs) -> anyhow::Result<()> {
    let stop = stop_on_signals()?;
    let (duration, warmup, reps) = if args.quick {
        (Duration::from_secs(3), Duration::from_secs(1), 2)
    } else {
        (args.duration, args.warmup, args.reps)
    };
    let config = AbConfig {
        binary: std::env::current_exe().context("finding the reuseport binary")?,
        modes: args.modes,
        peer_nginx: args.peer.is_some(),
        peer_nginx_attach: args.peer.as_deref() == Some("nginx-attach"),
        cross_check_wrk: args.cross_check.is_some(),
        calibrate: args.calibrate,
        topology: args.topology,
        skew: args.skew,
        spill: SpillConfig {
            threshold: args.spill_threshold,
            period: args.spill_period,
            max_targets: args.spill_targets,
        },
        restart_every: args.restart_every,
        load: args.load,
        connections: args.connections,
        duration,
        warmup,
        reps,
        out: args.out,
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} runs, {msg} (about {eta} left)",
        )
        .context("progress bar template")?,
    );
    let results = reuseport_lab::runner::run(&config, &stop, |progress| match progress {
        Progress::Run {
            index,
            total,
            label,
        } => {
            bar.set_length(total as u64);
            bar.set_position(index as u64);
            bar.set_message(label);
        }
        Progress::Note(note) => bar.println(note),
    });
    bar.finish_and_clear();
    let results = results?;
    let report = Report::new(&config, results, CpuList::allowed()?.len());
    print!("{}", report.table());
    let json = config.out.join("results.json");
    let svg = config.out.join("results.svg");
    report.write_json(&json)?;
    report.write_svg(&svg)?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

fn attach(args: AttachArgs) -> anyhow::Result<()> {
    use std::os::fd::AsFd;

    if args.pids.is_empty() == args.fds.is_empty() {
        anyhow::bail!(
            "give the server's processes with --pid, or sockets with --fd/--cpu (not both)"
        );
    }
    if args.fds.len() != args.fd_cpus.len() {
        anyhow::bail!(
            "every --fd needs its --cpu (got {} --fd, {} --cpu)",
            args.fds.len(),
            args.fd_cpus.len()
        );
    }
    let stop = stop_on_signals()?;
    // Find and check everything first: on any error nothing has been attached.
    let (mut steering, slots, description) = if args.pids.is_empty() {
        let pairs: Vec<(std::os::fd::BorrowedFd<'static>, u32)> = args
            .fds
            .iter()
            .zip(&args.fd_cpus)
            // SAFETY: --fd names descriptors the caller handed this process for its whole life
            // (inherited or systemd's LISTEN_FDS); check_fds verifies each is a socket.
            .map(|(&fd, &cpu)| (unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, cpu))
            .collect();
        let checked = reuseport::attach::check_fds(&pairs)?;
        if args.mode == AttachMode::Hash {
            aya::programs::SkReuseport::detach(checked[0].1).context("detaching")?;
            println!("reuseport: port {} is on hash selection", args.port);
            return Ok(());
        }
        let description = args
            .fds
            .iter()
            .zip(&args.fd_cpus)
            .map(|(fd, cpu)| format!("cpu{cpu} <- fd {fd}"))
            .collect::<Vec<_>>()
            .join(", ");
        (
            reuseport::Steering::attach(&checked)?,
            Vec::new(),
            description,
        )
    } else {
        let found = reuseport::attach::from_pid(&args.pids, args.port)?;
        let description = found
            .iter()
            .map(|f| {
                format!(
                    "cpu{} <- pid {} ({})",
                    f.cpu,
                    f.pid,
                    reuseport::procfs::comm(f.pid)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        if args.mode == AttachMode::Hash {
            aya::programs::SkReuseport::detach(found[0].fd.as_fd()).context("detaching")?;
            println!(
                "reuseport: port {} is on hash selection ({description})",
                args.port
            );
            return Ok(());
        }
        let slots = found.iter().map(|f| (f.cpu, f.pid, f.inode)).collect();
        (reuseport::attach::steer(found)?, slots, description)
    };
    let program_id = steering.program_id()?;
    if args.persist {
        let dir = reuseport::attach::persist(&mut steering, args.port, &args.pids, slots)?;
        println!(
            "reuseport: steering port {} ({description}), program id {program_id}, pinned in {}; \
             `reuseport detach --port {}` removes it",
            args.port,
            dir.display(),
            args.port
        );
        return Ok(());
    }
    println!(
        "reuseport: steering port {} ({description}), program id {program_id}; {}",
        args.port,
        match args.duration {
            Some(d) => format!("detaching after {}", humantime::format_duration(d)),
            None => "Ctrl-C detaches".to_owned(),
        }
    );
    let started = Instant::now();
    let migrations_at_start = Migrations::read();
    show_live_until_stopped(
        &stop,
        args.duration,
        args.quiet,
        || {
            Ok(Snapshot {
                elapsed: started.elapsed(),
                // A foreign server's workers keep no counters of ours: only the program's.
                workers: Vec::new(),
                steering: Some(steering.stats()?),
                program: steering.run_stats()?,
                // The server's own worker restarts migrate through our program.
                migrations: Migrations::read().since(&migrations_at_start),
                restarts: 0,
                spill: None,
            })
        },
        || Ok(()),
    )?;
    if args.pids.is_empty() {
        // SAFETY: the caller passed these fds for this process's life.
        let member = unsafe { std::os::fd::BorrowedFd::borrow_raw(args.fds[0]) };
        steering.detach(member)?;
    } else {
        let member = reuseport::attach::any_member(&args.pids, args.port)?;
        steering.detach(&member)?;
    }
    println!(
        "reuseport: detached; port {} is back on hash selection",
        args.port
    );
    Ok(())
}

fn detach(port: u16) -> anyhow::Result<()> {
    let state = reuseport::attach::detach_persisted(port)?;
    println!(
        "reuseport: detached program {} from port {port} and removed its pins; hash selection again",
        state.program_id
    );
    Ok(())
}

fn status(port: Option<u16>) -> anyhow::Result<()> {
    let ports = match port {
        Some(port) => vec![port],
        None => reuseport::attach::persisted_ports(),
    };
    if ports.is_empty() {
        println!("reuseport: no persistent steering (attach --persist creates some)");
    }
    for port in ports {
        let state = reuseport::attach::persisted(port)?;
        let dir = reuseport::attach::persist_dir(port);
        let fallbacks = reuseport::steering::pinned_fallbacks(&dir)?;
        let stats = reuseport::steering::pinned_stats(&dir)?;
        println!(
            "port {port}: program id {}, pinned in {}",
            state.program_id,
            dir.display()
        );
        for &(cpu, pid, inode) in &state.slots {
            // The kernel says whether the slot is filled; /proc says whether the worker recorded
            // at attach time still holds that socket (a prefork master may hold it too, so a
            // filled slot can outlive its worker until the master starts a new one).
            let filled = reuseport::steering::pinned_slot_filled(&dir, cpu)?;
            let held = reuseport::attach::slot_alive(pid, inode);
            let fallback = fallbacks.get(cpu as usize).copied().unwrap_or(cpu);
            let state = match (filled, held) {
                (true, true) => format!("live, served by pid {pid}"),
                (true, false) => format!(
                    "filled, but pid {pid} no longer holds it (another process does: a restarted \
                     worker, or a master keeping it until one starts)"
                ),
                (false, _) => {
                    format!("empty (hole: CPU {cpu}'s connections go to CPU {fallback}'s listener)")
                }
            };
            println!("  slot cpu{cpu}: socket {inode}, {state}");
        }
        let mut total = reuseport::SteeringStats::default();
        for (cpu, s) in stats.iter().enumerate() {
            total.add(s);
            if s.total() + s.errors > 0 {
                println!(
                    "  arrived on cpu{cpu}: local {} fallback {} hash {} errors {}",
                    s.local, s.fallback, s.unsteered, s.errors
                );
            }
        }
        println!(
            "  total: local {} fallback {} hash {} errors {}",
            total.local, total.fallback, total.unsteered, total.errors
        );
    }
    Ok(())
}
