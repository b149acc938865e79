//! `reuseport status`: what steers a port, as the kernel says: each of our steering programs
//! that holds a listener of the port or is pinned for it, its slots, the listeners in no slot,
//! whether recorded steering is stale, and the pinned program's fallbacks and counters.

use std::{
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use reuseport::{
    pinned::{PinnedRoot, SlotState},
    port_report::PortReport,
    port_steering::{self, PortSteering, ProgramOnPort, Verdict},
    procfs,
};

/// `writeln!` into the report being built (writing into a `String` cannot fail).
macro_rules! put {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// `reuseport status`'s arguments.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this port.
    #[arg(long)]
    port: Option<u16>,
    /// Print the same facts as JSON: an array with one object per port (fields documented in
    /// the README and in `reuseport::port_report::PortReport`).
    #[arg(long)]
    json: bool,
    /// Refresh every second until Ctrl-C: in place on a terminal, one block (with --json, one
    /// line) per second when piped. A port that stops being steered is shown as such rather
    /// than ending the watch.
    #[arg(long)]
    watch: bool,
    /// With --watch: stop after this many refreshes.
    #[arg(long, requires = "watch", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

/// Prints the steering of `--port`, or of every port something of ours steers or was left for;
/// with `--watch`, again every second.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let root = PinnedRoot::system();
    if !args.watch {
        let views = inspect(args.port, &root, false)?;
        print!("{}", render(&args, &views, &root)?);
        return Ok(());
    }
    let stop = crate::live::stop_on_signals()?;
    let terminal = std::io::stdout().is_terminal() && !args.json;
    let mut shown = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) && args.count.is_none_or(|count| shown < count) {
        let views = inspect(args.port, &root, true)?;
        let text = render(&args, &views, &root)?;
        let mut out = std::io::stdout().lock();
        if terminal {
            // Home, clear the screen, redraw.
            write!(out, "\x1b[H\x1b[2J{text}")?;
        } else if args.json {
            write!(out, "{text}")?;
        } else {
            writeln!(out, "{text}")?;
        }
        out.flush()?;
        drop(out);
        shown += 1;
        next += Duration::from_secs(1);
        while !stop.load(Ordering::Relaxed)
            && args.count.is_none_or(|count| shown < count)
            && Instant::now() < next
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// The views to show: `port`'s (refused when nothing steers it, unless `watching`), or every
/// port's.
fn inspect(
    port: Option<u16>,
    root: &PinnedRoot,
    watching: bool,
) -> anyhow::Result<Vec<PortSteering>> {
    Ok(match port {
        Some(port) => {
            let view = PortSteering::inspect(port, root)?;
            if view.verdict() == Verdict::NotSteered && !watching {
                anyhow::bail!(port_steering::PortSteeringError::NotSteered {
                    port,
                    dir: root.pin_dir(port).display().to_string(),
                });
            }
            vec![view]
        }
        None => port_steering::inspect_all(root)?,
    })
}

/// The report of `views`: text, or a JSON array and a newline with `--json`.
fn render(args: &StatusArgs, views: &[PortSteering], root: &PinnedRoot) -> anyhow::Result<String> {
    if args.json {
        let reports = views
            .iter()
            .map(|view| PortReport::new(view, root))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(format!("{}\n", serde_json::to_string(&reports)?));
    }
    let mut out = String::new();
    if views.is_empty() {
        put!(
            out,
            "reuseport: no steering: no steering program holds a listener, and nothing is pinned \
             (attach creates some)"
        );
    }
    for view in views {
        if view.verdict() == Verdict::NotSteered {
            put!(out, "port {}: nothing steers it", view.port);
            continue;
        }
        show(&mut out, view, root)?;
    }
    Ok(out)
}

fn holders(view: &PortSteering, inode: u64) -> String {
    let pids: Vec<String> = view
        .listener(inode)
        .map(|l| {
            l.holders
                .iter()
                .map(|&(pid, _)| format!("{pid} ({})", procfs::comm(pid)))
                .collect()
        })
        .unwrap_or_default();
    if pids.is_empty() {
        "no process".to_owned()
    } else {
        format!("pid {}", pids.join(", "))
    }
}

fn describe(program: &ProgramOnPort, view: &PortSteering) -> String {
    let kept = if program.pinned {
        format!(
            "pinned in {}",
            view.pin_dir
                .as_ref()
                .map_or_else(String::new, |d| d.display().to_string())
        )
    } else if program.program.holders.is_empty() {
        "not pinned and held by no process: left attached by an attach that did not detach \
         (killed?)"
            .to_owned()
    } else {
        let pids: Vec<String> = program
            .program
            .holders
            .iter()
            .map(|&pid| format!("{pid} ({})", procfs::comm(pid)))
            .collect();
        format!("held by pid {}", pids.join(", "))
    };
    format!(
        "program id {} ({}), {kept}",
        program.program.id, program.program.name
    )
}

fn show(out: &mut String, view: &PortSteering, root: &PinnedRoot) -> anyhow::Result<()> {
    let port = view.port;
    let verdict = view.verdict();
    if let Some(id) = view.unreadable_pinned {
        put!(
            out,
            "port {port}: program id {id}, pinned in {} by an earlier version of reuseport: its \
             slots cannot be read; `reuseport detach --port {port}` detaches it",
            root.pin_dir(port).display()
        );
    } else if view.programs.is_empty() {
        put!(
            out,
            "port {port}: stale: {} is left, but no steering program is loaded for it",
            view.pin_dir.as_ref().map_or_else(
                || root.state_path(port).display().to_string(),
                |d| d.display().to_string()
            )
        );
    }
    for program in &view.programs {
        put!(out, "port {port}: {}", describe(program, view));
        let recorded = view
            .recorded
            .as_ref()
            .filter(|state| program.pinned && state.program_id == program.program.id);
        match recorded {
            // The state file beside the pins names who served each slot: say what became of it.
            Some(_) if program.steers() => show_recorded(out, port, root)?,
            _ => {
                for (slot, inode) in &program.slot_listeners {
                    match inode {
                        Some(inode) => put!(
                            out,
                            "  slot cpu{}: socket {inode}, live, held by {}",
                            slot.cpu,
                            holders(view, *inode)
                        ),
                        None => put!(
                            out,
                            "  slot cpu{}: holds a socket that no longer listens on port {port} \
                             (stale)",
                            slot.cpu
                        ),
                    }
                }
            }
        }
        if !program.steers() {
            let recorded = view
                .recorded
                .as_ref()
                .filter(|state| program.pinned && state.program_id == program.program.id);
            if let Some(state) = recorded
                && !state.slots.is_empty()
            {
                let slots: Vec<String> = state
                    .slots
                    .iter()
                    .map(|s| format!("cpu{} <- pid {} socket {}", s.cpu, s.pid, s.inode))
                    .collect();
                put!(out, "  recorded slots: {}", slots.join(", "));
            }
            put!(
                out,
                "  stale: none of its slots holds a listener on port {port} now (the server \
                 restarted or stopped)"
            );
        }
    }
    match verdict {
        Verdict::Steered => put!(
            out,
            "  steering: all {} listeners on port {port} are in its slots",
            view.listeners.len()
        ),
        Verdict::Partly { unsteered } => put!(
            out,
            "  partly stale: {unsteered} of the {} listeners on port {port} are in no slot and \
             on hash selection (added since attach?)",
            view.listeners.len()
        ),
        Verdict::Unknown => put!(
            out,
            "  whether it still steers the {} listeners on port {port} cannot be told",
            view.listeners.len()
        ),
        Verdict::Stale | Verdict::NotSteered if view.listeners.is_empty() => put!(
            out,
            "  nothing listens on port {port} now; `reuseport detach --port {port}` removes what \
             is left"
        ),
        Verdict::Stale | Verdict::NotSteered => put!(
            out,
            "  {} listeners on port {port} are on hash selection; `reuseport detach --port \
             {port}` removes what is left",
            view.listeners.len()
        ),
    }
    if !matches!(verdict, Verdict::Steered | Verdict::Unknown) {
        for listener in view.unsteered() {
            put!(
                out,
                "  unsteered: socket {} on {}, held by {}",
                listener.inode,
                listener.addr,
                holders(view, listener.inode)
            );
        }
    }
    Ok(())
}

/// The recorded slots of the steering pinned for `port`, with the kernel's and `/proc`'s view
/// of each, and its counters.
fn show_recorded(out: &mut String, port: u16, root: &PinnedRoot) -> anyhow::Result<()> {
    let status = root.open(port)?.status()?;
    for slot in &status.slots {
        let (cpu, pid) = (slot.slot.cpu, slot.slot.pid);
        let state = match slot.state() {
            SlotState::Live => format!("live, served by pid {pid}"),
            SlotState::HeldElsewhere => format!(
                "filled, but pid {pid} no longer holds it (another process does: a restarted \
                 worker, or a master keeping it until one starts)"
            ),
            SlotState::Empty => format!(
                "empty (hole: CPU {cpu}'s connections go to CPU {}'s listener)",
                slot.fallback
            ),
        };
        put!(out, "  slot cpu{cpu}: socket {}, {state}", slot.slot.inode);
    }
    for (cpu, s) in status.active_cpus() {
        let same_cpu = reuseport::stats::same_cpu_ratio(s)
            .map(|ratio| {
                format!(
                    "; {:.1}% received, accepted and served on cpu{cpu}",
                    100.0 * ratio
                )
            })
            .unwrap_or_default();
        put!(
            out,
            "  arrived on cpu{cpu}: local {} fallback {} hash {} errors {}{same_cpu}",
            s.local,
            s.fallback,
            s.unsteered,
            s.errors
        );
    }
    let total = status.total;
    put!(
        out,
        "  total: local {} fallback {} hash {} errors {}",
        total.local,
        total.fallback,
        total.unsteered,
        total.errors
    );
    Ok(())
}
