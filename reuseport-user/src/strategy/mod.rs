//! Choosing a steering strategy (resolving `auto`) and putting it in place on a listener group.
//! `Server::start` goes through here, so every mode works for TCP and UDP, IPv4 and IPv6 alike.
//!
//! Each mode is a type implementing [`Strategy`], which owns everything that mode does: opening
//! the group with the mode in place from its first connection, giving a restarted worker's new
//! listener its CPU's place, and reporting its counters. [`crate::Server`] holds a
//! `Box<dyn Strategy>` (made by [`for_mode`]) and never asks which mode it runs.
//!
//! - [`PercpuStrategy`]: `percpu` and `percpu-spill` (eBPF [`Steering`], plus the
//!   [`SpillSampler`](crate::spill::SpillSampler) for `percpu-spill`);
//! - [`CbpfStrategy`]: `cbpf` (classic BPF, see [`crate::cbpf`]);
//! - [`IncomingCpuStrategy`]: `incoming-cpu` (see [`crate::incoming_cpu`]);
//! - [`HashStrategy`]: `hash` (nothing in place: the kernel's hash).

mod cbpf;
mod hash;
mod incoming_cpu;
mod percpu;

use std::os::fd::OwnedFd;

use thiserror::Error;

pub use self::{
    cbpf::CbpfStrategy, hash::HashStrategy, incoming_cpu::IncomingCpuStrategy,
    percpu::PercpuStrategy,
};
use crate::{
    cbpf::CbpfError,
    cpus::CpuError,
    incoming_cpu::IncomingCpuError,
    listeners::{ListenerError, PendingListeners, PerCpuListeners},
    spill::{SpillConfig, SpillCounters, SpillError},
    steering::{ProgramRunStats, Steering, SteeringError, SteeringMode, SteeringProgram},
};
use reuseport_common::SteeringStats;

/// Errors from putting a strategy in place, replacing a listener or reading counters.
#[derive(Debug, Error)]
pub enum StrategyError {
    /// eBPF steering failed.
    #[error(transparent)]
    Steering(#[from] SteeringError),
    /// The classic BPF filter failed.
    #[error(transparent)]
    Cbpf(#[from] CbpfError),
    /// `SO_INCOMING_CPU` steering failed.
    #[error(transparent)]
    IncomingCpu(#[from] IncomingCpuError),
    /// Opening a listener failed.
    #[error(transparent)]
    Listener(#[from] ListenerError),
    /// Starting the spill sampler (`percpu-spill`) failed.
    #[error(transparent)]
    Spill(#[from] SpillError),
    /// Reading the CPU topology (for the spill sampler) failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// [`for_mode`] was given [`SteeringMode::Auto`], which names no strategy until
    /// [`choose`] resolves it.
    #[error("steering mode auto names no strategy until it is resolved")]
    Unresolved,
    /// [`Strategy::open`] ran a second time on a strategy that already steers a group.
    #[error("this {mode} strategy already steers a listener group")]
    AlreadyOpen {
        /// The strategy's mode.
        mode: SteeringMode,
    },
    /// A listener was replaced before [`Strategy::open`] put the strategy in place.
    #[error("this {mode} strategy steers no listener group yet")]
    NotOpen {
        /// The strategy's mode.
        mode: SteeringMode,
    },
}

/// One way of steering a reuseport group's connections to their CPU's listener: everything a
/// steering mode does, behind one interface (see the module documentation).
pub trait Strategy: Send {
    /// The mode this strategy implements (never [`SteeringMode::Auto`]).
    fn mode(&self) -> SteeringMode;

    /// Opens `pending` with this strategy in place from its first connection on, and returns
    /// the open listeners. Called once per strategy.
    ///
    /// On error every socket is closed again and nothing stays attached.
    fn open(&mut self, pending: PendingListeners) -> Result<PerCpuListeners, StrategyError>;

    /// A restarted worker's new listener takes `cpu`'s place: from now on `cpu`'s new
    /// connections go to it. Called once the new listener has joined the group and its worker
    /// serves it, before the old listener closes. `listener` is a duplicate of the new socket,
    /// which the strategy may keep (to sample it) or drop; the strategy lets go of any duplicate
    /// of the old listener it held, so that the old one can close.
    fn replace_listener(&mut self, cpu: u32, listener: OwnedFd) -> Result<(), StrategyError>;

    /// The counters this strategy keeps (none for strategies without a program or sampler).
    fn counters(&self) -> Result<StrategyCounters, StrategyError> {
        Ok(StrategyCounters::default())
    }

    /// The server is about to close its listeners: let go of any duplicate of them (the spill
    /// sampler stops). [`Strategy::counters`] keeps reporting the last values.
    fn shutdown(&mut self) {}

    /// The eBPF steering program, where this strategy has one (and once it is open).
    fn steering(&self) -> Option<&Steering> {
        None
    }

    /// The eBPF steering program, e.g. to empty or refill a slot while serving.
    fn steering_mut(&mut self) -> Option<&mut Steering> {
        None
    }

    /// What steers, for the user: `steering program id N` where an eBPF program steers, else
    /// `no eBPF steering program`.
    fn describe(&self) -> Result<String, StrategyError> {
        Ok(match self.steering() {
            Some(steering) => format!("steering program id {}", steering.program_id()?),
            None => "no eBPF steering program".to_owned(),
        })
    }
}

/// What a [`Strategy`] counts, at one moment: the parts of a [`crate::stats::Snapshot`] that do
/// not come from the workers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StrategyCounters {
    /// The steering program's counters per receiving CPU (index = CPU); `None` without one.
    pub steering: Option<Vec<SteeringStats>>,
    /// The steering program's run count and time; `None` without a program or BPF statistics.
    pub program: Option<ProgramRunStats>,
    /// The spill sampler's counters (`percpu-spill`).
    pub spill: Option<SpillCounters>,
    /// The CPUs spilling now (`percpu-spill`; empty otherwise).
    pub spilling: Vec<u32>,
}

/// The strategy for `mode`, not yet in place (see [`Strategy::open`]). `mode` must be resolved
/// (see [`choose`]); `program` only matters for `percpu` and `percpu-spill`, `spill` only for
/// `percpu-spill`.
pub fn for_mode(
    mode: SteeringMode,
    program: SteeringProgram,
    spill: SpillConfig,
) -> Result<Box<dyn Strategy>, StrategyError> {
    Ok(match mode {
        SteeringMode::Percpu => Box::new(PercpuStrategy::new(program)),
        SteeringMode::PercpuSpill => Box::new(PercpuStrategy::with_spill(program, spill)),
        SteeringMode::Cbpf => Box::new(CbpfStrategy),
        SteeringMode::IncomingCpu => Box::new(IncomingCpuStrategy),
        SteeringMode::Hash => Box::new(HashStrategy),
        SteeringMode::Auto => return Err(StrategyError::Unresolved),
    })
}

/// Checks `spill` for a group of `cpus` listeners when `requested` may spill: `percpu-spill`,
/// or `auto`, which may resolve to it. Other modes ignore `spill`.
pub fn check_spill(
    requested: SteeringMode,
    spill: &SpillConfig,
    cpus: usize,
) -> Result<(), SpillError> {
    if matches!(requested, SteeringMode::PercpuSpill | SteeringMode::Auto) {
        spill.validate(cpus)?;
    }
    Ok(())
}

/// The mode to use (never [`SteeringMode::Auto`]) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The resolved mode.
    pub mode: SteeringMode,
    /// Why it was chosen, for the user.
    pub reason: String,
}

/// Resolves `requested`: [`SteeringMode::Auto`] becomes `percpu-spill` when this process may load
/// BPF programs, else `incoming-cpu` when the kernel honours `SO_INCOMING_CPU` in reuseport
/// selection (Linux >= 6.2), else `cbpf` (which needs neither). Other modes stay as they are.
pub fn choose(requested: SteeringMode) -> Choice {
    if requested != SteeringMode::Auto {
        return Choice {
            mode: requested,
            reason: "as requested".to_owned(),
        };
    }
    resolve_auto(
        Steering::check_available(),
        &crate::incoming_cpu::kernel_release(),
    )
}

/// What `auto` becomes, given whether eBPF steering may be loaded here (the result of
/// [`Steering::check_available`]) and the kernel release (`uname -r`).
fn resolve_auto(ebpf: Result<(), SteeringError>, release: &str) -> Choice {
    match ebpf {
        Ok(()) => Choice {
            mode: SteeringMode::PercpuSpill,
            reason: "auto: this process may load BPF programs".to_owned(),
        },
        Err(why) if crate::incoming_cpu::honoured_by(release) => Choice {
            mode: SteeringMode::IncomingCpu,
            reason: format!(
                "auto: no eBPF ({}); kernel {release} honours SO_INCOMING_CPU",
                short(&why)
            ),
        },
        Err(why) => Choice {
            mode: SteeringMode::Cbpf,
            reason: format!(
                "auto: no eBPF ({}); kernel {release} ignores SO_INCOMING_CPU (< 6.2); classic \
                 BPF needs no privileges",
                short(&why)
            ),
        },
    }
}

fn short(error: &SteeringError) -> &'static str {
    match error {
        SteeringError::MissingCapabilities => "no CAP_BPF",
        SteeringError::Unsupported { .. } => "kernel lacks SK_REUSEPORT support",
        _ => "BPF unavailable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resolved_mode_has_a_strategy_of_that_mode() {
        for mode in [
            SteeringMode::Percpu,
            SteeringMode::PercpuSpill,
            SteeringMode::Cbpf,
            SteeringMode::IncomingCpu,
            SteeringMode::Hash,
        ] {
            let strategy = for_mode(mode, SteeringProgram::SteerToCpu, SpillConfig::default())
                .expect("a strategy");
            assert_eq!(strategy.mode(), mode);
            // Nothing is loaded before `open`.
            assert!(strategy.steering().is_none());
            assert_eq!(
                strategy.counters().expect("counters"),
                StrategyCounters::default()
            );
            assert_eq!(
                strategy.describe().expect("describe"),
                "no eBPF steering program"
            );
        }
        assert!(matches!(
            for_mode(
                SteeringMode::Auto,
                SteeringProgram::SteerToCpu,
                SpillConfig::default()
            ),
            Err(StrategyError::Unresolved)
        ));
    }

    #[test]
    fn spill_knobs_are_checked_only_where_spill_may_run() {
        let bad = SpillConfig {
            threshold: 0,
            ..SpillConfig::default()
        };
        assert!(check_spill(SteeringMode::PercpuSpill, &bad, 2).is_err());
        assert!(check_spill(SteeringMode::Auto, &bad, 2).is_err());
        assert!(check_spill(SteeringMode::Percpu, &bad, 2).is_ok());
        assert!(check_spill(SteeringMode::Hash, &bad, 2).is_ok());
    }

    /// Every branch of `auto`, including the ones this machine's kernel and privileges do not
    /// reach in the integration tests (`cbpf` needs a kernel before 6.2).
    #[test]
    fn auto_prefers_ebpf_then_incoming_cpu_then_cbpf() {
        let percpu = resolve_auto(Ok(()), "5.10.0");
        assert_eq!(percpu.mode, SteeringMode::PercpuSpill);
        assert_eq!(percpu.reason, "auto: this process may load BPF programs");

        let incoming = resolve_auto(Err(SteeringError::MissingCapabilities), "6.18.44-fc-v657");
        assert_eq!(incoming.mode, SteeringMode::IncomingCpu);
        assert_eq!(
            incoming.reason,
            "auto: no eBPF (no CAP_BPF); kernel 6.18.44-fc-v657 honours SO_INCOMING_CPU"
        );

        let cbpf = resolve_auto(Err(SteeringError::MissingCapabilities), "6.1.119-1-cloud");
        assert_eq!(cbpf.mode, SteeringMode::Cbpf);
        assert_eq!(
            cbpf.reason,
            "auto: no eBPF (no CAP_BPF); kernel 6.1.119-1-cloud ignores SO_INCOMING_CPU (< 6.2); \
             classic BPF needs no privileges"
        );

        let unsupported = SteeringError::Unsupported {
            what: "SK_REUSEPORT BPF programs",
        };
        let old = resolve_auto(Err(unsupported), "4.9.0");
        assert_eq!(old.mode, SteeringMode::Cbpf);
        assert!(
            old.reason
                .starts_with("auto: no eBPF (kernel lacks SK_REUSEPORT support); kernel 4.9.0"),
            "{}",
            old.reason
        );
    }
}
