//! `reuseport align`: whether the device delivers each flow to the CPU whose worker owns it,
//! and (with --apply) make it so; --restore puts the previous settings back.

use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;
use reuseport::{
    CpuList,
    align::{
        AlignError, DeviceView, Irq, Mismatch,
        apply::{self, state_path},
        mismatches, napi,
        read::{Roots, read_device},
        rss,
    },
    cpu_topology::CpuTopology,
    cpus::CpuError,
    pinned::PinnedRoot,
    port_steering::{PortSteering, Verdict},
};
use serde::Serialize;

use crate::error::BadArguments;

/// Where `--apply` keeps the previous values.
const STATE_DIR: &str = "/run/reuseport";

/// `reuseport align`'s arguments.
#[derive(Debug, clap::Args)]
pub struct AlignArgs {
    /// The network device (e.g. eth0).
    #[arg(long)]
    dev: String,
    /// The worker CPUs, e.g. "0-3,6" (default: every CPU this process may run on).
    #[arg(long, conflicts_with = "port")]
    cpus: Option<CpuList>,
    /// Take the worker CPUs from the steering of this port: the CPUs whose slot holds one of its
    /// listeners now (a running `serve`, or a server steered by `attach`). Needs root.
    #[arg(long)]
    port: Option<u16>,
    /// Print the report as JSON: {device, workers, mismatches: [{kind, line, ...}]}; the
    /// device's rss_table and rss_hash are null where it has no RSS, a queue's napi_thread where
    /// its NAPI is not threaded.
    #[arg(long)]
    json: bool,
    /// Change the settings to match the workers: each receive queue's IRQ affinity and, where
    /// NAPI is threaded, its NAPI thread's CPU affinity (RPS off on it), or, with neither, its
    /// RPS mask; and each transmit queue's XPS mask. Saves every previous value to
    /// /run/reuseport/align-DEV.json first. Needs root; refused while irqbalance runs and IRQs
    /// would change, unless --stop-irqbalance.
    #[arg(long, conflicts_with = "restore")]
    apply: bool,
    /// With --apply: stop a running irqbalance first (through systemd where it is a unit),
    /// since it would move the IRQs back within seconds; --restore starts it again.
    #[arg(long, requires = "apply")]
    stop_irqbalance: bool,
    /// Put back every value an earlier --apply changed on this device.
    #[arg(long)]
    restore: bool,
}

/// The JSON report.
#[derive(Serialize)]
struct JsonReport<'a> {
    device: &'a DeviceView,
    workers: Vec<u32>,
    mismatches: Vec<JsonMismatch<'a>>,
}

#[derive(Serialize)]
struct JsonMismatch<'a> {
    #[serde(flatten)]
    mismatch: &'a Mismatch,
    line: String,
}

/// Bad input (unknown device, no queues, CPUs outside the affinity mask) is one line and exit 2.
fn bad_input(err: AlignError) -> anyhow::Error {
    match err {
        AlignError::NoDevice { .. } | AlignError::NoQueues { .. } => {
            BadArguments(format!("--dev: {err}")).into()
        }
        AlignError::NoPrivilege { .. } => BadArguments(format!("--apply: {err}")).into(),
        err => err.into(),
    }
}

/// Reports, applies or restores.
pub fn align(args: AlignArgs) -> anyhow::Result<()> {
    let roots = Roots::system();
    if args.dev.is_empty() || args.dev.contains('/') || args.dev == "." || args.dev == ".." {
        return Err(BadArguments(format!("--dev: {:?} is not a device name", args.dev)).into());
    }
    let state = state_path(Path::new(STATE_DIR), &args.dev);
    if args.restore {
        let restored = apply::restore(&roots, &state).map_err(|err| match err {
            AlignError::NothingToRestore { .. } | AlignError::NoPrivilege { .. } => {
                BadArguments(format!("--restore: {err}")).into()
            }
            err => anyhow::Error::from(err),
        })?;
        for setting in &restored.skipped {
            println!(
                "{}: not restored, the thread is gone (its queue's new thread never had {})",
                setting.target, setting.new
            );
        }
        let irqbalance = if restored.state.irqbalance.is_some() {
            "; irqbalance started again"
        } else {
            ""
        };
        println!(
            "reuseport: restored {} setting(s) of {} from {}{irqbalance}",
            restored.state.settings.len() - restored.skipped.len(),
            restored.state.device,
            state.display()
        );
        return Ok(());
    }
    let allowed = CpuList::allowed()?;
    let workers = match args.cpus {
        Some(cpus) if cpus.is_empty() => {
            return Err(BadArguments("--cpus: the list is empty".into()).into());
        }
        Some(cpus) => cpus.within(&allowed).map_err(|err| match err {
            err @ CpuError::NotAllowed { .. } => BadArguments(format!("--cpus: {err}")).into(),
            err => anyhow::Error::from(err),
        })?,
        None => match args.port {
            Some(port) => serving_cpus(port)?,
            None => allowed,
        },
    };
    let mut view = read_device(&roots, &args.dev).map_err(bad_input)?;
    // The report goes on without the table when the ioctl fails, and says so.
    let rss_note = match rss::indirection_table(&view.name)
        .and_then(|table| Ok((table, rss::hash_fields(&view.name)?)))
    {
        Ok((table, hash)) => {
            view.rss_table = table;
            view.rss_hash = hash;
            None
        }
        Err(err) => Some(format!("{:#}", anyhow::Error::from(err))),
    };
    napi::read_threads(&roots, &mut view)?;
    if args.apply {
        apply::ensure_not_applied(&state)?;
        let settings = apply::plan(&roots, &view, &workers)?;
        if settings.is_empty() {
            println!(
                "reuseport: {} already matches workers on {}",
                view.name,
                cpus(&workers.iter().collect::<Vec<_>>())
            );
            return Ok(());
        }
        let stopped = apply::apply(&roots, &view, &settings, &state, args.stop_irqbalance)
            .map_err(|err| match err {
                AlignError::NoPrivilege { .. } => bad_input(err),
                err => anyhow::Error::from(err).context(format!("aligning {}", view.name)),
            })?;
        for setting in &settings {
            println!("{}: {} -> {}", setting.target, setting.old, setting.new);
        }
        let irqbalance = match stopped {
            Some(stopped) => format!("; irqbalance (pid {}) stopped", stopped.pid),
            None => String::new(),
        };
        println!(
            "reuseport: changed {} setting(s) of {}{irqbalance}; previous values in {} \
             (`reuseport align --dev {} --restore` puts them back)",
            settings.len(),
            view.name,
            state.display(),
            view.name
        );
        return Ok(());
    }
    let possible = reuseport::cpus::possible_cpus()?;
    let topology = CpuTopology::read_from(&roots.cpu_dir(), possible);
    let found = mismatches(&view, &workers, &topology);
    if args.json {
        let report = JsonReport {
            device: &view,
            workers: workers.iter().collect(),
            mismatches: found
                .iter()
                .map(|mismatch| JsonMismatch {
                    mismatch,
                    line: mismatch.to_string(),
                })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&view, &workers, &found, rss_note.as_deref()));
    }
    Ok(())
}

/// The worker CPUs of the server steered on `port`; a port nothing steers is a usage error.
fn serving_cpus(port: u16) -> anyhow::Result<CpuList> {
    let steering = PortSteering::inspect(port, &PinnedRoot::system())
        .with_context(|| format!("reading the steering of port {port}"))?;
    let cpus = steering.steered_cpus();
    if cpus.is_empty() {
        return Err(BadArguments(format!(
            "--port: no steering program holds a listener of port {port} ({}): start the \
             server with `reuseport serve` or `reuseport attach`, or give --cpus",
            match steering.verdict() {
                Verdict::Stale => "its steering is stale: the group it steered is gone",
                Verdict::Unknown => "a program pinned by an earlier version may steer it",
                _ => "nothing steers it",
            }
        ))
        .into());
    }
    Ok(cpus)
}

/// `CPU 3` or `CPUs 0-3`.
fn cpus(cpus: &[u32]) -> String {
    let list = cpus.iter().copied().collect::<CpuList>();
    if cpus.len() == 1 {
        format!("CPU {list}")
    } else {
        format!("CPUs {list}")
    }
}

fn irq_text(irq: &Irq) -> String {
    let source = if irq.effective {
        "effective"
    } else {
        "allowed"
    };
    format!(
        "IRQ {} ({}) on {} ({source})",
        irq.number,
        irq.name,
        cpus(&irq.cpus)
    )
}

/// The text report: one line per queue, then each mismatch.
fn render(
    view: &DeviceView,
    workers: &CpuList,
    found: &[Mismatch],
    rss_note: Option<&str>,
) -> String {
    let mut out = String::new();
    let irqbalance = match view.irqbalance {
        Some(pid) => format!("irqbalance runs (pid {pid})"),
        None => "irqbalance not running".into(),
    };
    let _ = writeln!(
        out,
        "{}: {} rx, {} tx queues ({}); workers on {}; {irqbalance}",
        view.name,
        view.rx.len(),
        view.tx.len(),
        if view.hardware { "hardware" } else { "virtual" },
        cpus(&workers.iter().collect::<Vec<_>>())
    );
    for queue in &view.rx {
        let irq = match (&queue.irq, &queue.napi_thread) {
            (Some(irq), _) => irq_text(irq),
            (None, _) if view.hardware => "no IRQ of its own found".into(),
            (None, Some(_)) => "no IRQ (virtual)".into(),
            (None, None) => "no IRQ (virtual: processed on the sending CPU)".into(),
        };
        let thread = match &queue.napi_thread {
            None => String::new(),
            Some(thread) => format!(
                "; NAPI thread {} (pid {}) on {}{}",
                thread.name,
                thread.pid,
                cpus(&thread.cpus),
                if thread.linked {
                    ""
                } else {
                    " (matched in id order)"
                }
            ),
        };
        let rps = match &queue.rps_cpus {
            None => "RPS unavailable".into(),
            Some(list) if list.is_empty() => "RPS off".into(),
            Some(list) => format!("RPS to {}", cpus(list)),
        };
        let rfs = match queue.rps_flow_cnt {
            Some(0) | None => String::new(),
            Some(count) => format!("; RFS {count} flows"),
        };
        let _ = writeln!(out, "  rx-{}: {irq}{thread}; {rps}{rfs}", queue.index);
    }
    for queue in &view.tx {
        let xps = match &queue.xps_cpus {
            None => "XPS unavailable".into(),
            Some(list) if list.is_empty() => "XPS off".into(),
            Some(list) => format!("XPS from {}", cpus(list)),
        };
        let irq = queue
            .irq
            .as_ref()
            .map(|irq| format!("{}; ", irq_text(irq)))
            .unwrap_or_default();
        let _ = writeln!(out, "  tx-{}: {irq}{xps}", queue.index);
    }
    match (&view.rss_table, rss_note) {
        (_, Some(note)) => {
            let _ = writeln!(out, "  RSS table not read: {note}");
        }
        (Some(table), None) => {
            let shares: Vec<String> = view
                .rx
                .iter()
                .map(|queue| {
                    let buckets = table.iter().filter(|&&q| q == queue.index).count();
                    format!("rx-{} {buckets}", queue.index)
                })
                .collect();
            let _ = writeln!(
                out,
                "  RSS table: {} buckets: {}",
                table.len(),
                shares.join(", ")
            );
        }
        (None, None) => {
            let _ = writeln!(out, "  RSS table: none (the device has no RSS)");
        }
    }
    if let Some(hash) = &view.rss_hash {
        let flows: Vec<String> = hash
            .iter()
            .map(|fields| format!("{} {}", fields.flow, fields.letters()))
            .collect();
        let _ = writeln!(
            out,
            "  RSS hash fields: {} (s/d: source/destination address, f/n: source/destination \
             port)",
            flows.join(", ")
        );
    }
    let unknown = view
        .rx
        .iter()
        .any(|queue| queue.processing_cpus().is_none());
    if found.is_empty() && unknown {
        let _ = writeln!(
            out,
            "no mismatch found: queues without an IRQ, NAPI thread or RPS are processed on \
             whichever CPU sends, which steering follows"
        );
    } else if found.is_empty() {
        let _ = writeln!(
            out,
            "aligned: every receive CPU has a worker and every worker a queue"
        );
    } else {
        let _ = writeln!(out, "{} mismatch(es):", found.len());
        for mismatch in found {
            let _ = writeln!(out, "  {mismatch}");
        }
    }
    out
}
