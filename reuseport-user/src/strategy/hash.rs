//! `hash`: nothing in place, the kernel's default selection by a hash of the 4-tuple.

use std::os::fd::OwnedFd;

use super::{Strategy, StrategyError};
use crate::{
    listeners::{PendingListeners, PerCpuListeners},
    steering::SteeringMode,
};

/// The hash mode: no program and no socket option; the kernel hashes each connection's 4-tuple
/// over the group. The baseline the other strategies are measured against.
#[derive(Clone, Copy, Debug, Default)]
pub struct HashStrategy;

impl Strategy for HashStrategy {
    fn mode(&self) -> SteeringMode {
        SteeringMode::Hash
    }

    /// Opens the sockets; nothing else.
    fn open(&mut self, pending: PendingListeners) -> Result<PerCpuListeners, StrategyError> {
        pending.open_each(|_| Ok::<_, StrategyError>(()))
    }

    /// Nothing to do: the new listener gets its hash share as soon as it joins the group.
    fn replace_listener(&mut self, _cpu: u32, _listener: OwnedFd) -> Result<(), StrategyError> {
        Ok(())
    }
}
