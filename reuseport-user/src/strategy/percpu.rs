//! `percpu` and `percpu-spill`: the eBPF steering program ([`Steering`]), and for
//! `percpu-spill` the sampler that spills an overloaded CPU's connections ([`SpillSampler`]).

use std::os::fd::{AsFd, OwnedFd};

use super::{Strategy, StrategyCounters, StrategyError};
use crate::{
    cpu_topology::CpuTopology,
    listeners::{PendingListeners, PerCpuListeners},
    spill::{SpillConfig, SpillCounters, SpillError, SpillSampler},
    steering::{Steering, SteeringMode, SteeringProgram},
};

/// The percpu (and percpu-spill) mode: the `SK_REUSEPORT` program picks the listener of the
/// worker pinned to the CPU that received the connection; with spill, a sampler thread sends an
/// overloaded CPU's excess to other listeners (see [`crate::spill`]).
pub struct PercpuStrategy {
    program: SteeringProgram,
    /// `Some` for `percpu-spill`.
    spill: Option<SpillConfig>,
    /// Loaded by [`Strategy::open`].
    steering: Option<Steering>,
    /// Running from [`Strategy::open`] to [`Strategy::shutdown`] (`percpu-spill`).
    sampler: Option<SpillSampler>,
    /// The sampler's counters when it stopped.
    last_spill: Option<SpillCounters>,
}

impl PercpuStrategy {
    /// `percpu` with `program`.
    pub fn new(program: SteeringProgram) -> Self {
        Self {
            program,
            spill: None,
            steering: None,
            sampler: None,
            last_spill: None,
        }
    }

    /// `percpu-spill` with `program`, spilling as `spill` says.
    pub fn with_spill(program: SteeringProgram, spill: SpillConfig) -> Self {
        Self {
            spill: Some(spill),
            ..Self::new(program)
        }
    }

    /// Starts the spill sampler on the open `listeners` (`percpu-spill`).
    fn start_sampler(
        steering: &mut Steering,
        listeners: &PerCpuListeners,
        config: SpillConfig,
    ) -> Result<SpillSampler, StrategyError> {
        let fds = listeners
            .iter()
            .map(|l| Ok((l.cpu, l.socket.as_fd().try_clone_to_owned()?)))
            .collect::<Result<Vec<_>, std::io::Error>>()
            .map_err(SpillError::Start)?;
        let topology = CpuTopology::read(crate::cpus::possible_cpus()?);
        Ok(SpillSampler::start(
            steering.take_spill_map()?,
            steering.stats_map_handle()?,
            listeners.protocol(),
            fds,
            topology,
            config,
        )?)
    }
}

impl Strategy for PercpuStrategy {
    fn mode(&self) -> SteeringMode {
        match self.spill {
            Some(_) => SteeringMode::PercpuSpill,
            None => SteeringMode::Percpu,
        }
    }

    /// The program is loaded and verified, then attached to the group before any socket can
    /// receive, and each CPU's slot is filled the moment its socket opens (see
    /// [`Steering::load`]), so no connection is ever handed to another CPU's worker because the
    /// server was still starting. With spill, the sampler starts once every socket is open.
    fn open(&mut self, pending: PendingListeners) -> Result<PerCpuListeners, StrategyError> {
        if self.steering.is_some() {
            return Err(StrategyError::AlreadyOpen { mode: self.mode() });
        }
        let mut steering = Steering::load(self.program, self.spill.is_some())?;
        steering.attach_to_group(pending.first())?;
        let listeners = pending.open_each(|listener| {
            steering
                .insert(listener.cpu, listener.socket.as_fd())
                .map_err(StrategyError::from)
        })?;
        steering.open()?;
        if let Some(config) = self.spill {
            self.sampler = Some(Self::start_sampler(&mut steering, &listeners, config)?);
        }
        self.steering = Some(steering);
        Ok(listeners)
    }

    /// Puts the new listener into slot `cpu` (the old one leaves the slot and, with the
    /// select-or-migrate program, hands its queue to the new one when it closes), then has the
    /// sampler sample it instead of the old one.
    fn replace_listener(&mut self, cpu: u32, listener: OwnedFd) -> Result<(), StrategyError> {
        let mode = self.mode();
        let steering = self
            .steering
            .as_mut()
            .ok_or(StrategyError::NotOpen { mode })?;
        steering.insert(cpu, listener.as_fd())?;
        // The sampler lets go of the old listener (so it can close) and samples the new one.
        if let Some(sampler) = &self.sampler {
            sampler.replace_listener(cpu, listener);
        }
        Ok(())
    }

    fn counters(&self) -> Result<StrategyCounters, StrategyError> {
        let (steering, program) = match &self.steering {
            Some(steering) => (Some(steering.stats()?), steering.run_stats()?),
            None => (None, None),
        };
        Ok(StrategyCounters {
            steering,
            program,
            spill: self
                .sampler
                .as_ref()
                .map(SpillSampler::counters)
                .or(self.last_spill),
            spilling: self
                .sampler
                .as_ref()
                .map(SpillSampler::spilling_cpus)
                .unwrap_or_default(),
        })
    }

    /// Stops the sampler, which holds duplicates of the listeners.
    fn shutdown(&mut self) {
        if let Some(sampler) = self.sampler.take() {
            self.last_spill = Some(sampler.counters());
        }
    }

    fn steering(&self) -> Option<&Steering> {
        self.steering.as_ref()
    }

    fn steering_mut(&mut self) -> Option<&mut Steering> {
        self.steering.as_mut()
    }
}
