//! `reuseport status`: what `attach --persist` left in place: program, slots (and holes),
//! fallbacks, counters.

use reuseport::pinned::{PinnedSteering, SlotState};

/// Prints the persistent steering of `port`, or of every port that has some.
pub fn status(port: Option<u16>) -> anyhow::Result<()> {
    let ports = port.map_or_else(PinnedSteering::ports, |port| vec![port]);
    if ports.is_empty() {
        println!("reuseport: no persistent steering (attach --persist creates some)");
    }
    for port in ports {
        let status = PinnedSteering::open(port)?.status()?;
        println!(
            "port {port}: program id {}, pinned in {}",
            status.program_id,
            status.pin_dir.display()
        );
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
        for (cpu, s) in status.arrivals.iter().enumerate() {
            if s.total() + s.errors > 0 {
                println!(
                    "  arrived on cpu{cpu}: local {} fallback {} hash {} errors {}",
                    s.local, s.fallback, s.unsteered, s.errors
                );
            }
        }
        let total = status.total;
        println!(
            "  total: local {} fallback {} hash {} errors {}",
            total.local, total.fallback, total.unsteered, total.errors
        );
    }
    Ok(())
}
