//! `reuseport ab`: the lab's A/B experiment, with a progress bar, a table and results.json/svg;
//! `reuseport ab report DIR` redraws the table and results.svg from DIR/results.json.
//!
//! Stopped by Ctrl-C (or SIGTERM) after at least one measured run, `ab` still prints the table
//! and writes results.json/svg for the runs that finished, says so, and exits with 130.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use reuseport::{CpuList, SteeringMode, cpu_topology::CpuTopology};
use reuseport_lab::{
    cpu_split::CpuSplit,
    report::Report,
    runner::{AbConfig, Progress},
    topology::{ClientRx, ServerRx, TopologyKind, VethRx},
};

use crate::{
    args::{ClientRxArg, LoadKindArg, ModeArg, ServerRxArg, SpillArgs, TopologyArg},
    error::BadArguments,
    live,
};

/// `reuseport ab`'s arguments: the experiment's flags, or the `report` subcommand.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AbArgs {
    /// Instead of running anything.
    #[command(subcommand)]
    command: Option<AbCommand>,
    /// Steering modes to compare, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "hash,percpu")]
    modes: Vec<ModeArg>,
    /// veth-rps: server and clients in two namespaces joined by a one-queue veth, RPS spreading
    /// flows over the server CPUs (`veth` is accepted for it); veth-rss: a veth with one queue
    /// per server CPU, processed on that CPU, like a NIC with RSS (see --server-rx); loopback:
    /// clients pinned round-robin to CPUs.
    #[arg(long, value_enum, default_value_t = TopologyArg::VethRps)]
    topology: TopologyArg,
    /// veth-rss only: how the server's end processes the clients' packets. softirq (the default
    /// where server and clients share the CPUs): each client CPU sends into its own CPU's queue
    /// (XPS), processed in that CPU's softirq, no thread woken; napi-thread (the default where
    /// they are split, and the only choice then): flows spread over the queues by hash, each
    /// queue processed by a NAPI thread pinned to its server CPU, a thread woken per packet.
    #[arg(long, value_enum)]
    server_rx: Option<ServerRxArg>,
    /// veth-rss only: how the clients' end processes the server's replies. softirq (the default
    /// where server and clients share the CPUs): GRO off and no NAPI threads there, replies
    /// processed in the softirq of the server CPU that sent them, as on loopback; napi-thread
    /// (the default where they are split): a queue and pinned NAPI thread per client CPU, as on a
    /// separate client machine.
    #[arg(long, value_enum)]
    client_rx: Option<ClientRxArg>,
    /// CPUs for the server under test and its receive processing, e.g. `0-7` (default: with 8
    /// or more CPUs across veth, the first half by core; otherwise every CPU, shared with the
    /// clients).
    #[arg(long)]
    server_cpus: Option<CpuList>,
    /// CPUs for the load generators: disjoint from --server-cpus, or equal to share them
    /// (default: the CPUs the server does not get, or every CPU when shared).
    #[arg(long)]
    client_cpus: Option<CpuList>,
    /// Process every SYN on the first server CPU (veth-rss: one receiving queue, with the
    /// clients pinned there under --server-rx softirq; veth-rps: RPS mask of one CPU; loopback:
    /// all clients pinned there), as with a one-queue NIC or one bursty client. Compare
    /// `--modes hash,percpu,percpu-spill`.
    #[arg(long)]
    skew: bool,
    /// Restart our server's workers (SIGHUP, one at a time) at random intervals averaging this
    /// (0.5x to 1.5x) during every measured run, e.g. `500ms`; peers are not restarted. Errors
    /// show any connection lost.
    #[arg(long, value_parser = crate::args::parse_duration)]
    restart_every: Option<Duration>,
    #[command(flatten)]
    spill: SpillArgs,
    /// crr: a new connection per request; rr: keep-alive; udp: datagram request/reply.
    #[arg(long, value_enum, default_value_t = LoadKindArg::Crr)]
    load: LoadKindArg,
    /// Measured time per run.
    #[arg(long, value_parser = crate::args::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unmeasured run per row before the first repetition.
    #[arg(long, value_parser = crate::args::parse_duration, default_value = "3s")]
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

/// `reuseport ab`'s subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AbCommand {
    /// Redraw the table and DIR/results.svg from DIR/results.json of an earlier `reuseport ab`,
    /// running nothing (no root needed).
    Report {
        /// The directory `reuseport ab --out` wrote.
        dir: PathBuf,
    },
}

/// `ab` stopped by a signal after some runs finished: their report is written; exit 130.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: {finished} of {planned} measured runs finished")]
pub struct Interrupted {
    /// Measured runs that finished (and are in the report).
    pub finished: usize,
    /// Measured runs planned.
    pub planned: usize,
}

/// Runs the experiment with a progress bar, prints the table and writes results.json and
/// results.svg; or, with `report DIR`, redraws them from DIR/results.json.
pub fn ab(args: AbArgs) -> anyhow::Result<()> {
    if let Some(AbCommand::Report { dir }) = args.command {
        return report(&dir);
    }
    let stop = live::stop_on_signals()?;
    let (duration, warmup, reps) = if args.quick {
        (Duration::from_secs(3), Duration::from_secs(1), 2)
    } else {
        (args.duration, args.warmup, args.reps)
    };
    let allowed = CpuList::allowed()?;
    let topology: TopologyKind = args.topology.into();
    for (given, flag) in [
        (args.server_rx.is_some(), "--server-rx"),
        (args.client_rx.is_some(), "--client-rx"),
    ] {
        if given && topology != TopologyKind::VethRss {
            return Err(BadArguments(format!(
                "{flag} applies to --topology veth-rss only, not {topology}: drop it or use veth-rss"
            ))
            .into());
        }
    }
    let cpus = CpuSplit::resolve(
        topology,
        &allowed,
        args.server_cpus,
        args.client_cpus,
        &CpuTopology::read(reuseport::cpus::possible_cpus()?),
    )
    .map_err(|err| BadArguments(err.to_string()))?;
    let defaults = cpus.default_veth_rx();
    let veth_rx = VethRx {
        server: args.server_rx.map_or(defaults.server, ServerRx::from),
        client: args.client_rx.map_or(defaults.client, ClientRx::from),
    };
    if veth_rx.server == ServerRx::Softirq && !cpus.is_shared() {
        return Err(BadArguments(format!(
            "--server-rx softirq processes each packet on the CPU of the client that sent it, so \
             it needs the clients on the server's CPUs, not --server-cpus {} --client-cpus {}: \
             give both the same list, or use --server-rx napi-thread",
            cpus.server, cpus.client
        ))
        .into());
    }
    let config = AbConfig {
        binary: std::env::current_exe().context("finding the reuseport binary")?,
        modes: args.modes.into_iter().map(SteeringMode::from).collect(),
        peer_nginx: args.peer.is_some(),
        peer_nginx_attach: args.peer.as_deref() == Some("nginx-attach"),
        cross_check_wrk: args.cross_check.is_some(),
        calibrate: args.calibrate,
        topology,
        veth_rx,
        cpus,
        skew: args.skew,
        spill: args.spill.into(),
        restart_every: args.restart_every,
        load: args.load.into(),
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
    let interrupted = results.interrupted.then_some(Interrupted {
        finished: results.runs.len(),
        planned: results.planned_runs,
    });
    let report = Report::new(&config, results, allowed.len());
    if let Some(interrupted) = &interrupted {
        println!("{interrupted}: the report covers those");
    }
    print!("{}", report.table());
    let json = config.out.join("results.json");
    let svg = config.out.join("results.svg");
    report.write_json(&json)?;
    report.write_svg(&svg)?;
    println!("wrote {} and {}", json.display(), svg.display());
    interrupted.map_or(Ok(()), |interrupted| Err(interrupted.into()))
}

/// `reuseport ab report DIR`.
fn report(dir: &std::path::Path) -> anyhow::Result<()> {
    let json = dir.join("results.json");
    let svg = dir.join("results.svg");
    let report = Report::read(&json)?;
    print!("{}", report.table());
    report.write_svg(&svg)?;
    println!("wrote {}", svg.display());
    Ok(())
}
