//! How errors reach the user: one line, exit code 1, or 2 for [`BadArguments`]. The library's
//! errors state what went wrong; what to do about it on this command line (which flag to use
//! instead) is added here, where the flags are known.

use reuseport::{
    attach::AttachError, cbpf::CbpfError, incoming_cpu::IncomingCpuError, server::ServerError,
    steering::SteeringError, strategy::StrategyError,
};

/// Arguments that parse but cannot work on this machine (e.g. more spill targets than CPUs):
/// one line and exit code 2, like a usage error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadArguments(pub String);

/// The one-line message for `err`: its causes, joined by `: `, with the advice of [`advice`]
/// around them.
pub fn message(err: &anyhow::Error) -> String {
    let Advice { before, after } = advice(err).unwrap_or_default();
    format!("{before}{err:#}{after}")
}

/// Words the command line puts before and after a library error's message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Advice {
    /// Before the message (names the flag the message is about).
    before: &'static str,
    /// After the message (the flags that would work instead).
    after: &'static str,
}

impl Advice {
    const fn after(after: &'static str) -> Self {
        Self { before: "", after }
    }
}

/// The advice for the first library error in `err`'s chain that has some. The library's error
/// enums wrap each other transparently, so the chain holds only the outermost: look inside.
fn advice(err: &anyhow::Error) -> Option<Advice> {
    err.chain().find_map(|cause| {
        if let Some(err) = cause.downcast_ref::<ServerError>() {
            match err {
                ServerError::Strategy(err) => strategy(err),
                ServerError::Steering(err) => steering(err),
                ServerError::IncomingCpu(err) => incoming_cpu(err),
                _ => None,
            }
        } else if let Some(err) = cause.downcast_ref::<AttachError>() {
            match err {
                AttachError::Steering(err) => steering(err),
                _ => None,
            }
        } else if let Some(err) = cause.downcast_ref::<StrategyError>() {
            strategy(err)
        } else if let Some(err) = cause.downcast_ref::<SteeringError>() {
            steering(err)
        } else if let Some(err) = cause.downcast_ref::<CbpfError>() {
            cbpf(err)
        } else if let Some(err) = cause.downcast_ref::<IncomingCpuError>() {
            incoming_cpu(err)
        } else {
            None
        }
    })
}

fn strategy(err: &StrategyError) -> Option<Advice> {
    match err {
        StrategyError::Steering(err) => steering(err),
        StrategyError::Cbpf(err) => cbpf(err),
        StrategyError::IncomingCpu(err) => incoming_cpu(err),
        _ => None,
    }
}

fn steering(err: &SteeringError) -> Option<Advice> {
    match err {
        SteeringError::MissingCapabilities => Some(Advice::after(
            ". Run as root, or use --mode auto (it picks incoming-cpu or cbpf, which need no \
             privileges) or --mode hash",
        )),
        SteeringError::Unsupported { .. } => Some(Advice::after(
            "; use --mode auto (it picks incoming-cpu or cbpf, which need no eBPF) or --mode hash",
        )),
        _ => None,
    }
}

fn cbpf(err: &CbpfError) -> Option<Advice> {
    match err {
        CbpfError::CpusNotFromZero { .. } => Some(Advice {
            before: "--mode ",
            after: "; use --mode percpu, which is keyed by CPU",
        }),
        _ => None,
    }
}

fn incoming_cpu(err: &IncomingCpuError) -> Option<Advice> {
    match err {
        IncomingCpuError::Ignored { .. } => {
            Some(Advice::after("; use --mode percpu or --mode cbpf"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The printed line is the one the library's error read before it stopped naming flags.
    #[test]
    fn library_errors_get_the_flags_to_use_instead() {
        let missing = anyhow::Error::from(ServerError::Strategy(StrategyError::Steering(
            SteeringError::MissingCapabilities,
        )));
        assert_eq!(
            message(&missing),
            "per-CPU steering loads a BPF program, which needs CAP_BPF (or CAP_SYS_ADMIN, e.g. \
             root); this process has neither. Run as root, or use --mode auto (it picks \
             incoming-cpu or cbpf, which need no privileges) or --mode hash"
        );
        let unsupported = anyhow::Error::from(AttachError::Steering(SteeringError::Unsupported {
            what: "SK_REUSEPORT BPF programs",
        }));
        assert_eq!(
            message(&unsupported),
            "this kernel does not support SK_REUSEPORT BPF programs (Linux >= 4.19 with \
             CONFIG_BPF_SYSCALL is needed); use --mode auto (it picks incoming-cpu or cbpf, \
             which need no eBPF) or --mode hash"
        );
        let cbpf = anyhow::Error::from(ServerError::Strategy(StrategyError::Cbpf(
            CbpfError::CpusNotFromZero {
                cpus: "1".parse().expect("CPU list"),
            },
        )));
        assert_eq!(
            message(&cbpf),
            "--mode cbpf returns the CPU number as the listener's index in the group, so it \
             needs workers on CPUs 0 to N-1 (got 1); use --mode percpu, which is keyed by CPU"
        );
        let ignored = anyhow::Error::from(StrategyError::IncomingCpu(IncomingCpuError::Ignored {
            release: "6.1.0".to_owned(),
        }));
        assert_eq!(
            message(&ignored),
            "kernel 6.1.0 ignores SO_INCOMING_CPU when it selects a reuseport listener (that \
             needs Linux 6.2 or later); use --mode percpu or --mode cbpf"
        );
        let other = anyhow::Error::from(SteeringError::NoListeners);
        assert_eq!(message(&other), "no listeners to steer");
    }
}
