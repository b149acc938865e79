//! `reuseport status`: what steers a port, as the kernel says: each of our steering programs
//! that holds a listener of the port or is pinned for it, its slots, the listeners in no slot,
//! whether recorded steering is stale, and the pinned program's fallbacks and counters.

use reuseport::{
    pinned::{PinnedRoot, SlotState},
    port_steering::{self, PortSteering, ProgramOnPort, Verdict},
    procfs,
};

/// Prints the steering of `port`, or of every port something of ours steers or was left for.
pub fn status(port: Option<u16>) -> anyhow::Result<()> {
    let root = PinnedRoot::system();
    let views = match port {
        Some(port) => {
            let view = PortSteering::inspect(port, &root)?;
            if view.verdict() == Verdict::NotSteered {
                anyhow::bail!(port_steering::PortSteeringError::NotSteered {
                    port,
                    dir: root.pin_dir(port).display().to_string(),
                });
            }
            vec![view]
        }
        None => port_steering::inspect_all(&root)?,
    };
    if views.is_empty() {
        println!(
            "reuseport: no steering: no steering program holds a listener, and nothing is pinned \
             (attach creates some)"
        );
    }
    for view in &views {
        show(view, &root)?;
    }
    Ok(())
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

fn show(view: &PortSteering, root: &PinnedRoot) -> anyhow::Result<()> {
    let port = view.port;
    let verdict = view.verdict();
    if let Some(id) = view.unreadable_pinned {
        println!(
            "port {port}: program id {id}, pinned in {} by an earlier version of reuseport: its \
             slots cannot be read; `reuseport detach --port {port}` detaches it",
            root.pin_dir(port).display()
        );
    } else if view.programs.is_empty() {
        println!(
            "port {port}: stale: {} is left, but no steering program is loaded for it",
            view.pin_dir.as_ref().map_or_else(
                || root.state_path(port).display().to_string(),
                |d| d.display().to_string()
            )
        );
    }
    for program in &view.programs {
        println!("port {port}: {}", describe(program, view));
        let recorded = view
            .recorded
            .as_ref()
            .filter(|state| program.pinned && state.program_id == program.program.id);
        match recorded {
            // The state file beside the pins names who served each slot: say what became of it.
            Some(_) if program.steers() => show_recorded(port, root)?,
            _ => {
                for (slot, inode) in &program.slot_listeners {
                    match inode {
                        Some(inode) => println!(
                            "  slot cpu{}: socket {inode}, live, held by {}",
                            slot.cpu,
                            holders(view, *inode)
                        ),
                        None => println!(
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
                println!("  recorded slots: {}", slots.join(", "));
            }
            println!(
                "  stale: none of its slots holds a listener on port {port} now (the server \
                 restarted or stopped)"
            );
        }
    }
    match verdict {
        Verdict::Steered => println!(
            "  steering: all {} listeners on port {port} are in its slots",
            view.listeners.len()
        ),
        Verdict::Partly { unsteered } => println!(
            "  partly stale: {unsteered} of the {} listeners on port {port} are in no slot and \
             on hash selection (added since attach?)",
            view.listeners.len()
        ),
        Verdict::Unknown => println!(
            "  whether it still steers the {} listeners on port {port} cannot be told",
            view.listeners.len()
        ),
        Verdict::Stale | Verdict::NotSteered if view.listeners.is_empty() => println!(
            "  nothing listens on port {port} now; `reuseport detach --port {port}` removes what \
             is left"
        ),
        Verdict::Stale | Verdict::NotSteered => println!(
            "  {} listeners on port {port} are on hash selection; `reuseport detach --port \
             {port}` removes what is left",
            view.listeners.len()
        ),
    }
    if !matches!(verdict, Verdict::Steered | Verdict::Unknown) {
        for listener in view.unsteered() {
            println!(
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
fn show_recorded(port: u16, root: &PinnedRoot) -> anyhow::Result<()> {
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
        println!("  slot cpu{cpu}: socket {}, {state}", slot.slot.inode);
    }
    for (cpu, s) in status.active_cpus() {
        println!(
            "  arrived on cpu{cpu}: local {} fallback {} hash {} errors {}",
            s.local, s.fallback, s.unsteered, s.errors
        );
    }
    let total = status.total;
    println!(
        "  total: local {} fallback {} hash {} errors {}",
        total.local, total.fallback, total.unsteered, total.errors
    );
    Ok(())
}
