//! Telling a service manager (systemd's `Type=notify` or `Type=notify-reload`) how `serve` is
//! doing, through the datagram socket named by `NOTIFY_SOCKET`: `READY=1` once every listener is
//! steered and serving, `RELOADING=1` while a SIGHUP restarts the workers (then `READY=1` again),
//! `STOPPING=1` when it starts to stop, and a `STATUS=` line a person reads in `systemctl status`.
//! Without `NOTIFY_SOCKET` nothing is sent.

use std::sync::atomic::{AtomicBool, Ordering};

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
