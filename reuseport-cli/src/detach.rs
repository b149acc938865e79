//! `reuseport detach`: return a port to hash selection and remove whatever steering of ours is
//! left on it (persisted, left by a killed attach, or stale pins).

use reuseport::{pinned::PinnedRoot, port_steering};

/// Detaches every steering program of ours from `port`'s listeners and removes its pins.
pub fn detach(port: u16) -> anyhow::Result<()> {
    let done = port_steering::detach(port, &PinnedRoot::system())?;
    let programs: Vec<String> = done
        .programs
        .iter()
        .map(|(id, name)| format!("program {id} ({name})"))
        .collect();
    let pins = done
        .pins_removed
        .as_ref()
        .map(|dir| format!("removed its pins in {}", dir.display()));
    match (programs.is_empty(), pins) {
        (false, Some(pins)) => println!(
            "reuseport: detached {} from port {port} and {pins}; hash selection again",
            programs.join(", ")
        ),
        (false, None) => println!(
            "reuseport: detached {} from port {port}; hash selection again",
            programs.join(", ")
        ),
        (true, Some(pins)) => println!(
            "reuseport: port {port}'s steering was stale (no listener of the port was in its \
             slots): {pins}; hash selection again"
        ),
        (true, None) => println!(
            "reuseport: port {port}'s steering was stale: removed its state file; hash selection \
             again"
        ),
    }
    Ok(())
}
