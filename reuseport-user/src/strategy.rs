//! Choosing a steering strategy (resolving `auto`) and putting it in place on a listener group.
//! `Server::start` goes through here, so every mode works for TCP and UDP, IPv4 and IPv6 alike.

use thiserror::Error;

use crate::{
    cbpf::{self, CbpfError},
    incoming_cpu::{self, IncomingCpuError},
    listeners::PerCpuListeners,
    steering::{Steering, SteeringError, SteeringMode, SteeringProgram},
};

/// Errors from putting a strategy in place.
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
}

/// The mode to use (never [`SteeringMode::Auto`]) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The resolved mode.
    pub mode: SteeringMode,
    /// Why it was chosen, for the user.
    pub reason: String,
}

/// Resolves `requested`: [`SteeringMode::Auto`] becomes `percpu` when this process may load
/// BPF programs, else `incoming-cpu` when the kernel honours `SO_INCOMING_CPU` in reuseport
/// selection (Linux >= 6.2), else `cbpf` (which needs neither). Other modes stay as they are.
pub fn choose(requested: SteeringMode) -> Choice {
    if requested != SteeringMode::Auto {
        return Choice {
            mode: requested,
            reason: "as requested".to_owned(),
        };
    }
    let release = incoming_cpu::kernel_release();
    match Steering::check_available() {
        Ok(()) => Choice {
            mode: SteeringMode::Percpu,
            reason: "auto: this process may load BPF programs".to_owned(),
        },
        Err(why) if incoming_cpu::honoured_by(&release) => Choice {
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

/// Puts `mode` in place on `listeners`' group; returns the eBPF [`Steering`] for `percpu`.
/// `program` only matters for `percpu` (calibration). `mode` must be resolved (see [`choose`]).
pub fn apply(
    mode: SteeringMode,
    listeners: &PerCpuListeners,
    program: SteeringProgram,
) -> Result<Option<Steering>, StrategyError> {
    match mode {
        SteeringMode::Percpu => Ok(Some(Steering::attach_program(&listeners.fds(), program)?)),
        SteeringMode::Cbpf => {
            cbpf::attach(listeners)?;
            Ok(None)
        }
        SteeringMode::IncomingCpu => {
            incoming_cpu::apply(listeners)?;
            Ok(None)
        }
        SteeringMode::Hash | SteeringMode::Auto => Ok(None),
    }
}
