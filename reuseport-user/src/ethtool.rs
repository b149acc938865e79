//! The `SIOCETHTOOL` ioctl, the ethtool command's own interface to a device's driver, for the few
//! commands this project needs without the `ethtool` binary: reading the RSS indirection table
//! ([`crate::align`]) and, in the lab, switching GRO and TSO on a veth.

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
};

/// Runs one ethtool command on `dev` in the calling thread's network namespace. `command` is the
/// command's `struct ethtool_*` as raw memory, starting with its `cmd` field; the driver reads
/// it and writes its answer back into it.
///
/// # Safety
///
/// `command` must be the whole structure the command's `cmd` names (including any entries its
/// size field says follow), so that the kernel reads and writes only inside it.
pub unsafe fn ethtool(dev: &str, command: &mut [u32]) -> io::Result<()> {
    let socket: OwnedFd = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = dev.as_bytes();
    if name.is_empty() || name.len() >= request.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{dev:?} is not a valid device name"),
        ));
    }
    for (slot, &byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_data = command.as_mut_ptr().cast();
    // SAFETY: SIOCETHTOOL reads the ifreq and, through ifru_data, the command structure, which
    // the caller guarantees is whole; both live until the call returns.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
