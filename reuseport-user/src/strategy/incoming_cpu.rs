//! `incoming-cpu`: each listener's `SO_INCOMING_CPU` (see [`crate::incoming_cpu`]).

use std::os::fd::OwnedFd;

use super::{Strategy, StrategyError};
use crate::{
    incoming_cpu,
    listeners::{PendingListeners, PerCpuListeners},
    steering::SteeringMode,
};

/// The incoming-cpu mode: no program; each listener's `SO_INCOMING_CPU` is its worker's CPU,
/// which the kernel's reuseport selection prefers since Linux 6.2.
#[derive(Clone, Copy, Debug, Default)]
pub struct IncomingCpuStrategy;

impl Strategy for IncomingCpuStrategy {
    fn mode(&self) -> SteeringMode {
        SteeringMode::IncomingCpu
    }

    /// Checks that the kernel honours `SO_INCOMING_CPU`, then sets each socket's as it opens;
    /// until every socket has joined, a connection whose CPU has no socket yet is hashed among
    /// those that have.
    fn open(&mut self, pending: PendingListeners) -> Result<PerCpuListeners, StrategyError> {
        incoming_cpu::check_honoured()?;
        pending.open_each(|listener| {
            incoming_cpu::set(&listener.socket, listener.cpu).map_err(StrategyError::from)
        })
    }

    /// Sets the new listener's `SO_INCOMING_CPU` to `cpu`: the kernel prefers it (or the old
    /// one, until that closes) for `cpu`'s connections.
    fn replace_listener(&mut self, cpu: u32, listener: OwnedFd) -> Result<(), StrategyError> {
        incoming_cpu::set(&socket2::SockRef::from(&listener), cpu)?;
        Ok(())
    }
}
