//! Telling a service manager (systemd's `Type=notify` or `Type=notify-reload`) how `serve` is
//! doing, through the datagram socket named by `NOTIFY_SOCKET`: `READY=1` once every listener is
//! steered and serving, `RELOADING=1` while a SIGHUP restarts the workers (then `READY=1` again),
//! `STOPPING=1` when it starts to stop, and a `STATUS=` line a person reads in `systemctl status`.
//! Without `NOTIFY_SOCKET` nothing is sent.
//!
//! Socket activation: the listening sockets a manager passes (`LISTEN_FDS`, `LISTEN_PID`, from
//! descriptor 3 on) become the first CPUs' listeners ([`passed_sockets`]).

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;

use sd_notify::NotifyState;

/// Whether a failed notification was already reported (once is enough).
static WARNED: AtomicBool = AtomicBool::new(false);

/// Sends `states`; a failure is reported once on stderr and otherwise ignored, since serving
/// matters more than the manager's view of it.
fn send(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states)
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        eprintln!("reuseport: notifying the service manager (NOTIFY_SOCKET) failed: {err}");
    }
}

/// Ready: every listener serves. `status` says how.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Reloading: the workers restart one at a time (SIGHUP).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("restarting the workers one at a time"),
        ]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Stopping: listeners close and steering is detached next.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The sockets passed by socket activation (none without `LISTEN_FDS` for this process). Call it
/// before any thread starts: it unsets `LISTEN_FDS` and `LISTEN_PID`.
pub fn passed_sockets() -> anyhow::Result<Vec<OwnedFd>> {
    // SAFETY: `serve` calls this first, before it starts any thread, so nothing reads the
    // environment while it changes.
    let fds = unsafe { sd_notify::listen_fds_and_unset_env() }
        .context("reading the sockets passed by the service manager (LISTEN_FDS)")?;
    // SAFETY: the manager passed these descriptors to this process, which has not used them yet
    // (they start at 3 and `listen_fds` checked each is open); each is owned once, here.
    Ok(fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect())
}
