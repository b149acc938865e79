//! Choosing a steering strategy (resolving `auto`) and putting it in place on a listener group.
//! `Server::start` goes through here, so every mode works for TCP and UDP, IPv4 and IPv6 alike.

use std::os::fd::AsFd;

use thiserror::Error;

use crate::{
    cbpf::{self, CbpfError},
    incoming_cpu::{self, IncomingCpuError},
    listeners::{ListenerError, PendingListeners, PerCpuListeners},
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
    /// Opening a listener failed.
    #[error(transparent)]
    Listener(#[from] ListenerError),
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
    resolve_auto(Steering::check_available(), &incoming_cpu::kernel_release())
}

/// What `auto` becomes, given whether eBPF steering may be loaded here (the result of
/// [`Steering::check_available`]) and the kernel release (`uname -r`).
fn resolve_auto(ebpf: Result<(), SteeringError>, release: &str) -> Choice {
    match ebpf {
        Ok(()) => Choice {
            mode: SteeringMode::PercpuSpill,
            reason: "auto: this process may load BPF programs".to_owned(),
        },
        Err(why) if incoming_cpu::honoured_by(release) => Choice {
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

/// Opens `pending` with `mode` in place from its first connection on; returns the open listeners
/// and the eBPF [`Steering`] for `percpu` and `percpu-spill` (whose sampler [`crate::Server`]
/// starts). `program` only matters for those two. `mode` must be resolved (see [`choose`]).
///
/// - `percpu`, `percpu-spill`: the program is loaded and verified, then attached to the group
///   before any socket can receive, and each CPU's slot is filled the moment its socket opens
///   (see [`Steering::load`]), so no connection is ever handed to another CPU's worker because
///   the server was still starting.
/// - `cbpf`: the filter is attached once every socket has opened (it checks their order); until
///   then the kernel hashes among the sockets that have joined.
/// - `incoming-cpu`: each socket's `SO_INCOMING_CPU` is set as it opens; until every socket has
///   joined, a connection whose CPU has no socket yet is hashed among those that have.
pub fn open(
    mode: SteeringMode,
    pending: PendingListeners,
    program: SteeringProgram,
) -> Result<(PerCpuListeners, Option<Steering>), StrategyError> {
    match mode {
        SteeringMode::Percpu | SteeringMode::PercpuSpill => {
            let mut steering = Steering::load(program, mode == SteeringMode::PercpuSpill)?;
            steering.attach_to_group(pending.first())?;
            let listeners = pending.open_each(|listener| {
                steering
                    .insert(listener.cpu, listener.socket.as_fd())
                    .map_err(StrategyError::from)
            })?;
            steering.open()?;
            Ok((listeners, Some(steering)))
        }
        SteeringMode::Cbpf => {
            let listeners = pending.open_each(|_| Ok::<_, StrategyError>(()))?;
            cbpf::attach(&listeners)?;
            Ok((listeners, None))
        }
        SteeringMode::IncomingCpu => {
            incoming_cpu::check_honoured()?;
            let listeners = pending.open_each(|listener| {
                incoming_cpu::set(&listener.socket, listener.cpu).map_err(StrategyError::from)
            })?;
            Ok((listeners, None))
        }
        SteeringMode::Hash | SteeringMode::Auto => {
            Ok((pending.open_each(|_| Ok::<_, StrategyError>(()))?, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
