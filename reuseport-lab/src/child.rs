//! Child processes of the harness (servers, load generators, peers), killed when dropped so none
//! outlives an error or Ctrl-C.

use std::{
    io,
    process::{Child, Command},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::error::RunnerError;

/// Kills the child on drop, so no server or client outlives the harness's error paths.
pub(crate) struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    pub(crate) fn spawn(
        mut command: Command,
        what: impl Into<String>,
    ) -> Result<Self, RunnerError> {
        let what = what.into();
        let child = command.spawn().map_err(|err| RunnerError::Child {
            what: what.clone(),
            detail: format!("could not start: {err}"),
        })?;
        Ok(Self { child, what })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for exit within `limit` (checking `stop`); kills the child if it overruns.
    pub(crate) fn wait(&mut self, limit: Duration, stop: &AtomicBool) -> Result<(), RunnerError> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    let stderr = self
                        .child
                        .stderr
                        .take()
                        .and_then(|err| io::read_to_string(err).ok())
                        .unwrap_or_default();
                    return Err(RunnerError::Child {
                        what: self.what.clone(),
                        detail: format!("{status}: {}", stderr.trim()),
                    });
                }
                Ok(None) if stop.load(Ordering::Relaxed) => return Err(RunnerError::Interrupted),
                Ok(None) if Instant::now() > deadline => {
                    return Err(RunnerError::Child {
                        what: self.what.clone(),
                        detail: format!("still running after {limit:?}; killed"),
                    });
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(err) => {
                    return Err(RunnerError::Child {
                        what: self.what.clone(),
                        detail: err.to_string(),
                    });
                }
            }
        }
    }

    /// Asks the child to stop (SIGTERM) and waits for it.
    pub(crate) fn terminate(&mut self, stop: &AtomicBool) -> Result<(), RunnerError> {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        self.wait(Duration::from_secs(10), stop)
    }

    pub(crate) fn what(&self) -> &str {
        &self.what
    }

    pub(crate) fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Kills the child and returns what it wrote on stderr.
    pub(crate) fn kill_and_read_stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child
            .stderr
            .take()
            .and_then(|err| io::read_to_string(err).ok())
            .unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    /// SIGTERM first, so a server can stop its own children (nginx's master its workers: a
    /// SIGKILLed master would orphan them), then SIGKILL after 5 s.
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
