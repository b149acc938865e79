//! incoming-cpu mode: no program at all. Each listener's `SO_INCOMING_CPU` is set to its
//! worker's CPU; since Linux 6.2 the kernel's reuseport selection prefers, among the group's
//! sockets, one whose `SO_INCOMING_CPU` equals the CPU processing the packet, before falling
//! back to the hash. Older kernels accept the option but ignore it there.

use std::io;

use thiserror::Error;

use crate::listeners::PerCpuListeners;

/// The first kernel whose reuseport selection honours `SO_INCOMING_CPU`.
pub const FIRST_HONOURING_KERNEL: (u32, u32) = (6, 2);

/// Errors from setting up `SO_INCOMING_CPU` steering.
#[derive(Debug, Error)]
pub enum IncomingCpuError {
    /// This kernel ignores `SO_INCOMING_CPU` in reuseport selection.
    #[error(
        "kernel {release} ignores SO_INCOMING_CPU when it selects a reuseport listener (that \
         needs Linux 6.2 or later)"
    )]
    Ignored {
        /// `uname -r`.
        release: String,
    },
    /// `setsockopt(SO_INCOMING_CPU)` failed.
    #[error("setsockopt(SO_INCOMING_CPU, {cpu}) failed")]
    Set {
        /// The CPU.
        cpu: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    crate::kernel::release()
}

/// Whether the running kernel's reuseport selection honours `SO_INCOMING_CPU`.
pub fn honoured() -> bool {
    honoured_by(&kernel_release())
}

/// Whether kernel `release` (e.g. `6.18.44-foo`) honours `SO_INCOMING_CPU` in reuseport
/// selection.
pub fn honoured_by(release: &str) -> bool {
    crate::kernel::release_at_least(release, FIRST_HONOURING_KERNEL)
}

/// Fails if the running kernel ignores `SO_INCOMING_CPU` in reuseport selection (before 6.2).
pub fn check_honoured() -> Result<(), IncomingCpuError> {
    if !honoured() {
        return Err(IncomingCpuError::Ignored {
            release: kernel_release(),
        });
    }
    Ok(())
}

/// Sets each listener's `SO_INCOMING_CPU` to its worker's CPU, after checking the kernel honours it.
pub fn apply(listeners: &PerCpuListeners) -> Result<(), IncomingCpuError> {
    check_honoured()?;
    for listener in listeners.iter() {
        set(&listener.socket, listener.cpu)?;
    }
    Ok(())
}

/// Sets one listener's `SO_INCOMING_CPU` to `cpu` (e.g. a restarted worker's new listener).
pub fn set(socket: &socket2::Socket, cpu: u32) -> Result<(), IncomingCpuError> {
    socket
        .set_cpu_affinity(cpu as usize)
        .map_err(|source| IncomingCpuError::Set { cpu, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_from_6_2_honour_it() {
        assert!(honoured_by("6.18.44-fc-v657"));
        assert!(honoured_by("6.2.0"));
        assert!(honoured_by("7.0.1"));
        assert!(!honoured_by("6.1.119-1-cloud"));
        assert!(!honoured_by("5.15.0-91-generic"));
        assert!(!honoured_by("garbage"));
    }
}
