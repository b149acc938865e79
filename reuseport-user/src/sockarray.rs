//! The `cpu_listeners` map (a `REUSEPORT_SOCKARRAY` with 8-byte values) through the `bpf(2)`
//! system call: put a socket into a slot, empty a slot, and read which socket a slot holds.
//!
//! aya's `ReusePortSockArray` only knows 4-byte values, for which the kernel refuses lookups from
//! userspace; with 8-byte values a lookup answers the socket's cookie (`SO_COOKIE`), which is what
//! lets `status` and `detach` tell which sockets a steering program holds.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use thiserror::Error;

/// `BPF_MAP_LOOKUP_ELEM`, `BPF_MAP_UPDATE_ELEM`, `BPF_MAP_DELETE_ELEM` (linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// Update flags (linux/bpf.h).
/// Replace a socket or fill an empty slot.
pub const ANY: u64 = 0;
/// Only an empty slot.
pub const NOEXIST: u64 = 1;
/// Only a filled slot.
pub const EXIST: u64 = 2;

/// An error from the kernel on a slot of a `cpu_listeners` map.
#[derive(Debug, Error)]
#[error("{operation} slot {slot} of the cpu_listeners map failed")]
pub struct SlotError {
    /// `filling`, `emptying` or `reading`.
    pub operation: &'static str,
    /// The slot.
    pub slot: u32,
    /// The kernel's answer.
    #[source]
    pub source: io::Error,
}

impl SlotError {
    /// The kernel's errno.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// The map-element part of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn elem_op(
    command: libc::c_long,
    map: BorrowedFd<'_>,
    slot: u32,
    value: Option<&mut u64>,
    flags: u64,
) -> io::Result<()> {
    let key = slot;
    let attr = ElemAttr {
        map_fd: u32::try_from(map.as_raw_fd())
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        _pad: 0,
        key: std::ptr::from_ref(&key) as u64,
        value: value.map_or(0, |value| std::ptr::from_mut(value) as u64),
        flags,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the map-element commands; the key and the
    // value it points at live until the call returns, and the kernel reads or writes exactly
    // key_size (4) and value_size (8) bytes through them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_ref(&attr),
            size_of::<ElemAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts `socket` into `slot` (`flags`: [`ANY`], [`NOEXIST`], [`EXIST`]).
pub fn set(
    map: BorrowedFd<'_>,
    slot: u32,
    socket: BorrowedFd<'_>,
    flags: u64,
) -> Result<(), SlotError> {
    let mut fd = u64::try_from(socket.as_raw_fd()).unwrap_or(u64::MAX);
    elem_op(BPF_MAP_UPDATE_ELEM, map, slot, Some(&mut fd), flags).map_err(|source| SlotError {
        operation: "filling",
        slot,
        source,
    })
}

/// Empties `slot` (the kernel answers `ENOENT` if it is empty already).
pub fn clear(map: BorrowedFd<'_>, slot: u32) -> Result<(), SlotError> {
    elem_op(BPF_MAP_DELETE_ELEM, map, slot, None, 0).map_err(|source| SlotError {
        operation: "emptying",
        slot,
        source,
    })
}

/// The cookie of the socket in `slot`, or `None` if the slot is empty.
pub fn cookie(map: BorrowedFd<'_>, slot: u32) -> Result<Option<u64>, SlotError> {
    let mut cookie = 0u64;
    match elem_op(BPF_MAP_LOOKUP_ELEM, map, slot, Some(&mut cookie), 0) {
        Ok(()) => Ok(Some(cookie)),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(source) => Err(SlotError {
            operation: "reading",
            slot,
            source,
        }),
    }
}

/// The cookie of `socket` (`SO_COOKIE`): the kernel's id of a socket, the value [`cookie`] reads.
pub fn socket_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::net::sockopt::socket_cookie(socket)?)
}
