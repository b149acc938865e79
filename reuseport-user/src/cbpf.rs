//! cbpf mode: the classic BPF way (Envoy's CPU-locality balancer, the kernel selftest
//! `reuseport_bpf_cpu`): a two-instruction filter, `ld [cpu]; ret a`, attached to the group with
//! `SO_ATTACH_REUSEPORT_CBPF`. It needs no privileges.
//!
//! Its weakness: the filter's return value is an *index into the group*, the socket's position
//! in join order, not a CPU. It equals the CPU only while the group holds exactly one socket per
//! CPU 0..N-1, joined in that order. When a listener closes, the kernel moves the group's *last*
//! socket into the hole, so from then on one CPU's connections go to another CPU's worker; an
//! index past the end falls back to hash selection. The eBPF mode (`percpu`) keys its map by CPU
//! and has no such drift.

use std::{io, os::fd::AsRawFd};

use thiserror::Error;

use crate::{cpus::CpuList, listeners::PerCpuListeners};

/// Errors from attaching the classic BPF filter.
#[derive(Debug, Error)]
pub enum CbpfError {
    /// The workers' CPUs are not 0..N-1, so group indices cannot equal CPU numbers.
    #[error(
        "cbpf returns the CPU number as the listener's index in the group, so it needs workers on \
         CPUs 0 to N-1 (got {cpus})"
    )]
    CpusNotFromZero {
        /// The workers' CPUs.
        cpus: CpuList,
    },
    /// The group has no sockets.
    #[error("no listeners to attach the filter to")]
    NoListeners,
    /// `setsockopt(SO_ATTACH_REUSEPORT_CBPF)` failed.
    #[error("setsockopt(SO_ATTACH_REUSEPORT_CBPF) failed")]
    Attach(#[source] io::Error),
}

/// The filter: `A = smp_processor_id(); return A`.
fn cpu_filter() -> [libc::sock_filter; 2] {
    [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_A) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ]
}

/// Attaches `ld cpu; ret a` to the group of `listeners`, whose CPUs must be 0..N-1 (they joined
/// the group in CPU order, so index i is CPU i's listener).
pub fn attach(listeners: &PerCpuListeners) -> Result<(), CbpfError> {
    let cpus = listeners.cpus();
    if !cpus.iter().eq(0..cpus.len() as u32) {
        return Err(CbpfError::CpusNotFromZero { cpus });
    }
    let member = listeners.iter().next().ok_or(CbpfError::NoListeners)?;
    attach_to_group(&member.socket)
}

/// Attaches the filter to the group `member` belongs to, whatever its sockets' order.
pub fn attach_to_group(member: &impl AsRawFd) -> Result<(), CbpfError> {
    let mut filter = cpu_filter();
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `program` points at `filter`, which outlives the call; the kernel copies both.
    let result = unsafe {
        libc::setsockopt(
            member.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&program).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(CbpfError::Attach(io::Error::last_os_error()));
    }
    Ok(())
}
