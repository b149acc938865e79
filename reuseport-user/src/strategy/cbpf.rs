//! `cbpf`: the classic BPF filter `ld cpu; ret a` (see [`crate::cbpf`]).

use std::os::fd::OwnedFd;

use super::{Strategy, StrategyError};
use crate::{
    listeners::{PendingListeners, PerCpuListeners},
    steering::SteeringMode,
};

/// The cbpf mode: the classic BPF filter returning the receiving CPU as the listener's index in
/// the group (no privileges needed; drifts when a listener closes, see [`crate::cbpf`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct CbpfStrategy;

impl Strategy for CbpfStrategy {
    fn mode(&self) -> SteeringMode {
        SteeringMode::Cbpf
    }

    /// Opens every socket, then attaches the filter (it checks their order); until then the
    /// kernel hashes among the sockets that have joined.
    fn open(&mut self, pending: PendingListeners) -> Result<PerCpuListeners, StrategyError> {
        let listeners = pending.open_each(|_| Ok::<_, StrategyError>(()))?;
        crate::cbpf::attach(&listeners)?;
        Ok(listeners)
    }

    /// Nothing to do: the filter picks by index in the group, which no socket option changes
    /// (when the old listener closes, the kernel moves the group's last socket into its index).
    fn replace_listener(&mut self, _cpu: u32, _listener: OwnedFd) -> Result<(), StrategyError> {
        Ok(())
    }
}
