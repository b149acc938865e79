//! irqbalance rewrites IRQ affinities every 10 seconds (its default interval), so an IRQ pinned
//! to its worker's CPU does not stay there while it runs. [`stop`] stops it, through systemd
//! where it runs as a unit of a running systemd (so that systemd does not restart it), else with
//! SIGTERM, and returns what [`start`] needs to start it again the same way.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process};
use serde::{Deserialize, Serialize};

use super::{
    AlignError,
    read::{exited, irqbalance_pid},
};

/// How long stopping or starting may take.
const WAIT: Duration = Duration::from_secs(5);

/// A stopped irqbalance and how to start it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppedIrqbalance {
    /// The pid it had.
    pub pid: u32,
    /// The systemd unit it ran as (`irqbalance.service`), where systemd runs.
    pub unit: Option<String>,
    /// Its command line (`/proc/PID/cmdline`), to start it again outside systemd.
    pub command: Vec<String>,
}

fn control_error(what: &'static str, detail: String) -> AlignError {
    AlignError::IrqbalanceControl { what, detail }
}

/// Whether systemd is the running init (`sd_booted()`: `/run/systemd/system` exists).
fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The `.service` unit whose cgroup holds `pid` (`0::/system.slice/irqbalance.service`).
fn service_unit(proc: &Path, pid: u32) -> Option<String> {
    let cgroup = fs::read_to_string(proc.join(pid.to_string()).join("cgroup")).ok()?;
    cgroup.lines().find_map(|line| {
        let path = line.rsplit(':').next()?;
        let last = path.rsplit('/').next()?;
        last.ends_with(".service").then(|| last.to_owned())
    })
}

fn systemctl(verb: &str, unit: &str) -> Result<(), String> {
    let output = Command::new("systemctl")
        .args([verb, unit])
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("running systemctl {verb} {unit}: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "systemctl {verb} {unit}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Stops the irqbalance with pid `pid` (procfs at `proc`) and waits until it has exited.
pub fn stop(proc: &Path, pid: u32) -> Result<StoppedIrqbalance, AlignError> {
    let cmdline = fs::read(proc.join(pid.to_string()).join("cmdline"))
        .map_err(|err| control_error("stopping", format!("pid {pid}: {err}")))?;
    let command: Vec<String> = cmdline
        .split(|&byte| byte == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    if command.is_empty() {
        return Err(control_error(
            "stopping",
            format!("pid {pid} has no command line (it exited?)"),
        ));
    }
    let unit = service_unit(proc, pid).filter(|_| systemd_runs());
    match &unit {
        Some(unit) => {
            systemctl("stop", unit).map_err(|detail| control_error("stopping", detail))?
        }
        None => {
            let target = Pid::from_raw(pid as i32)
                .ok_or_else(|| control_error("stopping", "pid 0".into()))?;
            kill_process(target, Signal::TERM)
                .map_err(|err| control_error("stopping", format!("SIGTERM to pid {pid}: {err}")))?;
        }
    }
    wait_until(
        "stopping",
        || exited(proc, pid),
        || {
            format!(
                "pid {pid} still runs {} s after being asked to stop",
                WAIT.as_secs()
            )
        },
    )?;
    Ok(StoppedIrqbalance { pid, unit, command })
}

/// Starts irqbalance again the way [`stop`] found it (procfs at `proc`), and waits until a
/// process named irqbalance runs.
pub fn start(proc: &Path, stopped: &StoppedIrqbalance) -> Result<(), AlignError> {
    match &stopped.unit {
        Some(unit) => {
            systemctl("start", unit).map_err(|detail| control_error("starting", detail))?
        }
        None => {
            let (program, args) = stopped
                .command
                .split_first()
                .ok_or_else(|| control_error("starting", "no command line was saved".into()))?;
            let mut child = Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .map_err(|err| control_error("starting", format!("{program}: {err}")))?;
            // Reap it if it exits (a daemonizing irqbalance's first process does at once).
            thread::spawn(move || child.wait());
        }
    }
    wait_until(
        "starting",
        || irqbalance_pid(proc).is_some(),
        || {
            format!(
                "no irqbalance process runs {} s after starting {}",
                WAIT.as_secs(),
                stopped.command.join(" ")
            )
        },
    )
}

/// Polls `done` until it holds, failing as `what` with `late()` after [`WAIT`].
fn wait_until(
    what: &'static str,
    done: impl Fn() -> bool,
    late: impl FnOnce() -> String,
) -> Result<(), AlignError> {
    let deadline = Instant::now() + WAIT;
    while !done() {
        if Instant::now() > deadline {
            return Err(control_error(what, late()));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
