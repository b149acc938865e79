//! `reuseport status`: what `attach --persist` left in place: program, slots (and holes),
//! fallbacks, counters.

/// Prints the persistent steering of `port`, or of every port that has some.
pub fn status(port: Option<u16>) -> anyhow::Result<()> {
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
