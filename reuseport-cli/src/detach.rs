//! `reuseport detach`: remove steering left in place by `attach --persist`.

use reuseport::pinned::PinnedSteering;

/// Detaches the steering `attach --persist` left on `port` and removes its pins.
pub fn detach(port: u16) -> anyhow::Result<()> {
    let state = PinnedSteering::open(port)?.detach()?;
    println!(
        "reuseport: detached program {} from port {port} and removed its pins; hash selection again",
        state.program_id
    );
    Ok(())
}
