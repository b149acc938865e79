//! Changing a device's settings to match the workers, and putting them back: every previous
//! value goes to a state file before the first write, and [`restore`] writes them back.
//!
//! What is changed: each receive queue's IRQ affinity (`/proc/irq/N/smp_affinity_list`) where
//! the queue has an IRQ, and the CPU affinity of its NAPI thread where NAPI is threaded; RPS is
//! then turned off on it (the IRQ's or thread's CPU is the worker's). On queues with neither
//! (veth and other virtual devices in softirq mode) the RPS mask; each transmit queue's XPS
//! mask. irqbalance, which would move the IRQs back, is stopped only when asked, and started
//! again by [`restore`]. Queue `i` gets the workers at positions `i, i + n, i + 2n, ...` of the
//! worker list (`n` queues), or the worker at position `i mod workers` when there are more
//! queues than workers, so every worker gets a queue when it can.

use std::{
    fs, io,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{
    AlignError, DeviceView, format_mask,
    irqbalance::{self, StoppedIrqbalance},
    napi::{thread_cpus, thread_name},
    read::{Roots, read_text},
};
use crate::CpuList;

/// What one setting changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Target {
    /// A sysfs or procfs file (an RPS or XPS mask, an IRQ's affinity).
    File {
        /// The file.
        path: PathBuf,
    },
    /// The CPU affinity of a NAPI kernel thread.
    Thread {
        /// Its pid.
        pid: u32,
        /// Its name (`napi/DEV-ID`): restore writes only to a thread still of that name.
        thread: String,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File { path } => write!(f, "{}", path.display()),
            Self::Thread { pid, thread } => write!(f, "{thread} (pid {pid}) CPU affinity"),
        }
    }
}

/// One setting to change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    /// What it changes.
    #[serde(flatten)]
    pub target: Target,
    /// What it held before (a thread's: a CPU list).
    pub old: String,
    /// What goes in.
    pub new: String,
}

impl Setting {
    fn file(path: PathBuf, old: String, new: String) -> Self {
        Self {
            target: Target::File { path },
            old,
            new,
        }
    }

    /// The file it writes, if it writes one.
    pub fn path(&self) -> Option<&Path> {
        match &self.target {
            Target::File { path } => Some(path),
            Target::Thread { .. } => None,
        }
    }
}

/// The state file: the device and every setting changed, with its previous value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// The device.
    pub device: String,
    /// The settings, in the order they were written.
    pub settings: Vec<Setting>,
    /// The irqbalance `apply` stopped, which `restore` starts again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irqbalance: Option<StoppedIrqbalance>,
}

/// What [`restore`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The state it restored from.
    pub state: SavedState,
    /// Settings not written back because their NAPI thread is gone (the device was reset or
    /// threaded NAPI turned off: the new threads never had the changed value).
    pub skipped: Vec<Setting>,
}

/// The state file for `dev` under `dir` (`/run/reuseport` on a system).
pub fn state_path(dir: &Path, dev: &str) -> PathBuf {
    dir.join(format!("align-{dev}.json"))
}

/// The workers queue `index` of `count` gets.
fn share(workers: &[u32], index: usize, count: usize) -> Vec<u32> {
    let mine: Vec<u32> = workers
        .iter()
        .enumerate()
        .filter(|(position, _)| position % count == index)
        .map(|(_, &cpu)| cpu)
        .collect();
    if mine.is_empty() {
        vec![workers[index % workers.len()]]
    } else {
        mine
    }
}

/// The settings that would align `view` with `workers`, leaving out those already right.
pub fn plan(
    roots: &Roots,
    view: &DeviceView,
    workers: &CpuList,
) -> Result<Vec<Setting>, AlignError> {
    let workers: Vec<u32> = workers.iter().collect();
    if workers.is_empty() {
        return Err(AlignError::NoWorkers);
    }
    let queues = roots.device_dir(&view.name).join("queues");
    let mut settings = Vec::new();
    let rx_count = view.rx.len();
    for (position, queue) in view.rx.iter().enumerate() {
        let mine = share(&workers, position, rx_count);
        let rps_path = queues.join(format!("rx-{}/rps_cpus", queue.index));
        if let Some(irq) = &queue.irq {
            let path = roots
                .proc
                .join(format!("irq/{}/smp_affinity_list", irq.number));
            let old = read_text(&path)?;
            let new = mine[0].to_string();
            if irq.cpus != [mine[0]] || old != new {
                settings.push(Setting::file(path, old, new));
            }
        }
        if let Some(thread) = &queue.napi_thread
            && thread.cpus != [mine[0]]
        {
            settings.push(Setting {
                target: Target::Thread {
                    pid: thread.pid,
                    thread: thread.name.clone(),
                },
                old: thread.cpus.iter().copied().collect::<CpuList>().to_string(),
                new: mine[0].to_string(),
            });
        }
        let rps_on = queue.rps_cpus.as_ref().is_some_and(|cpus| !cpus.is_empty());
        if queue.irq.is_some() || queue.napi_thread.is_some() {
            // The IRQ's or thread's CPU is the worker's: RPS would only move packets away.
            if rps_on {
                let old = read_text(&rps_path)?;
                settings.push(Setting::file(rps_path, old, "0".into()));
            }
        } else if queue.rps_cpus.as_ref().is_some_and(|cpus| *cpus != mine) {
            let old = read_text(&rps_path)?;
            settings.push(Setting::file(rps_path, old, format_mask(&mine)));
        }
    }
    let tx_count = view.tx.len();
    for (position, queue) in view.tx.iter().enumerate() {
        let mine = share(&workers, position, tx_count);
        if queue.xps_cpus.as_ref().is_some_and(|cpus| *cpus != mine) {
            let path = queues.join(format!("tx-{}/xps_cpus", queue.index));
            let old = read_text(&path)?;
            settings.push(Setting::file(path, old, format_mask(&mine)));
        }
    }
    Ok(settings)
}

fn write(path: &Path, value: &str) -> Result<(), AlignError> {
    fs::write(path, value).map_err(|source| AlignError::Write {
        path: path.to_path_buf(),
        value: value.to_owned(),
        source,
    })
}

/// Pins thread `pid` (named `thread`) to `cpus` (a CPU list), and reads the affinity back: the
/// kernel refuses some masks for kernel threads silently.
fn pin_thread(proc: &Path, pid: u32, thread: &str, cpus: &str) -> Result<(), AlignError> {
    let error = |source: io::Error| AlignError::PinThread {
        thread: thread.to_owned(),
        pid,
        cpus: cpus.to_owned(),
        source,
    };
    let list: CpuList = cpus.parse().map_err(|_| {
        error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a CPU list",
        ))
    })?;
    crate::cpus::set_task_affinity(pid, &list).map_err(|err| match err {
        crate::cpus::CpuError::Affinity { source, .. } => error(source),
        other => error(io::Error::other(other.to_string())),
    })?;
    let now = thread_cpus(proc, pid)?;
    if now != list.iter().collect::<Vec<_>>() {
        return Err(error(io::Error::other(format!(
            "its affinity is {now:?} after the call"
        ))));
    }
    Ok(())
}

/// Writes `value` (the setting's `new` or `old`) to its target. A thread that no longer has
/// its saved name is left alone: `Ok(false)`.
fn write_setting(proc: &Path, setting: &Setting, value: &str) -> Result<bool, AlignError> {
    match &setting.target {
        Target::File { path } => write(path, value).map(|()| true),
        Target::Thread { pid, thread } => {
            if thread_name(proc, *pid).as_deref() != Some(thread.as_str()) {
                return Ok(false);
            }
            pin_thread(proc, *pid, thread, value)?;
            Ok(true)
        }
    }
}

/// The only files `apply` writes (and so the only ones `restore` will write; threads: only
/// `napi/...` ones).
const WRITABLE: [&str; 3] = ["rps_cpus", "xps_cpus", "smp_affinity_list"];

/// Fails with [`AlignError::UnsafeState`] unless `path` (where it exists) is a real directory
/// (`is_dir`) or file, owned by root or this user and writable by no one else: root writes
/// what the state file says, so no other user may have put it there.
fn check_private(path: &Path, is_dir: bool) -> Result<(), AlignError> {
    match crate::private_path::why_not_private(path, is_dir) {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(AlignError::UnsafeState {
            path: path.to_path_buf(),
            why,
        }),
        Err(source) => Err(AlignError::State {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// [`check_private`] for the state file and its directory.
fn check_state(state: &Path) -> Result<(), AlignError> {
    if let Some(dir) = state.parent() {
        check_private(dir, true)?;
    }
    check_private(state, false)
}

/// Capability bits (linux/capability.h).
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_NICE: u32 = 23;

/// Fails with [`AlignError::NoPrivilege`] unless this process may make every change of
/// `settings` and write the state file: RPS and XPS masks need CAP_NET_ADMIN, another task's
/// affinity CAP_SYS_NICE, every file (root's, mode 0644) write access, and `/run/reuseport`
/// root or CAP_DAC_OVERRIDE. Checked before anything is written, so that a refusal changes
/// nothing.
pub fn check_privilege(settings: &[Setting]) -> Result<(), AlignError> {
    let effective = crate::procfs::effective_capabilities().unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    let root = rustix::process::geteuid().is_root();
    for setting in settings {
        let refuse = |needs| AlignError::NoPrivilege {
            what: format!("changing {}", setting.target),
            needs,
        };
        match &setting.target {
            Target::File { path } => {
                let mask = path.ends_with("rps_cpus") || path.ends_with("xps_cpus");
                if mask && !has(CAP_NET_ADMIN) {
                    return Err(refuse("CAP_NET_ADMIN"));
                }
                let writable = rustix::fs::accessat(
                    rustix::fs::CWD,
                    path,
                    rustix::fs::Access::WRITE_OK,
                    rustix::fs::AtFlags::EACCESS,
                )
                .is_ok();
                if !writable {
                    return Err(refuse("write access"));
                }
            }
            Target::Thread { .. } if !has(CAP_SYS_NICE) => {
                return Err(refuse("CAP_SYS_NICE"));
            }
            Target::Thread { .. } => {}
        }
    }
    if !settings.is_empty() && !root && !has(CAP_DAC_OVERRIDE) {
        return Err(AlignError::NoPrivilege {
            what: "saving the previous values under /run/reuseport".into(),
            needs: "root",
        });
    }
    Ok(())
}

/// Fails if `state` exists: an earlier [`apply`] changed settings that [`restore`] has not put
/// back (applying again would save the changed values as the previous ones).
pub fn ensure_not_applied(state: &Path) -> Result<(), AlignError> {
    if state.exists() {
        return Err(AlignError::AlreadyApplied {
            path: state.to_path_buf(),
        });
    }
    Ok(())
}

/// Writes every setting of `settings` for `view`'s device, after checking the privilege they
/// need ([`check_privilege`]) and saving the previous values to `state` (which must not exist
/// yet). While irqbalance runs and IRQs would change, refuses, or, with `stop_irqbalance`,
/// stops it first (and saves how to start it again). If a write
/// fails, the ones before it are put back, irqbalance started again and the state file removed.
/// Returns the irqbalance it stopped.
pub fn apply(
    roots: &Roots,
    view: &DeviceView,
    settings: &[Setting],
    state: &Path,
    stop_irqbalance: bool,
) -> Result<Option<StoppedIrqbalance>, AlignError> {
    check_privilege(settings)?;
    let irqbalance_in_the_way = view.irqbalance.filter(|_| {
        settings.iter().any(|setting| {
            setting
                .path()
                .is_some_and(|p| p.ends_with("smp_affinity_list"))
        })
    });
    if let Some(pid) = irqbalance_in_the_way.filter(|_| !stop_irqbalance) {
        return Err(AlignError::Irqbalance { pid });
    }
    ensure_not_applied(state)?;
    check_state(state)?;
    let state_error = |source| AlignError::State {
        path: state.to_path_buf(),
        source,
    };
    if let Some(dir) = state.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(state_error)?;
    }
    let mut saved = SavedState {
        device: view.name.clone(),
        settings: settings.to_vec(),
        irqbalance: None,
    };
    if let Some(pid) = irqbalance_in_the_way {
        saved.irqbalance = Some(irqbalance::stop(&roots.proc, pid)?);
    }
    // Undoes what this call did, best effort: the error that got us here is the one to report.
    let undo = |written: &[Setting], saved: &SavedState| {
        for setting in written.iter().rev() {
            let _ = write_setting(&roots.proc, setting, &setting.old);
        }
        let _ = fs::remove_file(state);
        if let Some(stopped) = &saved.irqbalance {
            let _ = irqbalance::start(&roots.proc, stopped);
        }
    };
    let json = serde_json::to_vec_pretty(&saved).map_err(|err| state_error(err.into()));
    let partial = state.with_extension("json.partial");
    let written = json.and_then(|json| {
        fs::write(&partial, json).map_err(state_error)?;
        fs::rename(&partial, state).map_err(state_error)
    });
    if let Err(err) = written {
        undo(&[], &saved);
        return Err(err);
    }
    for (done, setting) in settings.iter().enumerate() {
        let result = write_setting(&roots.proc, setting, &setting.new).and_then(|written| {
            match (&setting.target, written) {
                (Target::Thread { pid, thread }, false) => Err(AlignError::ThreadGone {
                    thread: thread.clone(),
                    pid: *pid,
                }),
                _ => Ok(()),
            }
        });
        if let Err(err) = result {
            undo(&settings[..done], &saved);
            return Err(err);
        }
    }
    Ok(saved.irqbalance)
}

/// Writes back every value saved in `state`, last change first, starts irqbalance again if
/// `apply` stopped it, then removes the state file.
pub fn restore(roots: &Roots, state: &Path) -> Result<Restored, AlignError> {
    let state_error = |source| AlignError::State {
        path: state.to_path_buf(),
        source,
    };
    check_state(state)?;
    let json = match fs::read(state) {
        Ok(json) => json,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(AlignError::NothingToRestore {
                path: state.to_path_buf(),
            });
        }
        Err(err) => return Err(state_error(err)),
    };
    let saved: SavedState = serde_json::from_slice(&json).map_err(|err| state_error(err.into()))?;
    let unsafe_setting = saved.settings.iter().find(|setting| match &setting.target {
        Target::File { path } => !path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| WRITABLE.contains(&name)),
        Target::Thread { thread, .. } => !thread.starts_with("napi/"),
    });
    if let Some(setting) = unsafe_setting {
        return Err(AlignError::UnsafeState {
            path: state.to_path_buf(),
            why: format!("it names {}, which align never writes", setting.target),
        });
    }
    if let Some(stopped) = &saved.irqbalance {
        // Root runs what the file says: only irqbalance, as a unit or by a program of that name.
        let program = stopped.command.first().map(Path::new);
        let named_irqbalance =
            program.is_some_and(|p| p.file_name().is_some_and(|name| name == "irqbalance"));
        let unit_ok = stopped.unit.as_deref().is_none_or(|unit| {
            unit.ends_with(".service") && !unit.contains('/') && unit.contains("irqbalance")
        });
        if !named_irqbalance || !unit_ok {
            return Err(AlignError::UnsafeState {
                path: state.to_path_buf(),
                why: format!(
                    "it would start {:?} (unit {:?}), which is not irqbalance",
                    stopped.command, stopped.unit
                ),
            });
        }
    }
    check_privilege(&saved.settings)?;
    let mut skipped = Vec::new();
    for setting in saved.settings.iter().rev() {
        if !write_setting(&roots.proc, setting, &setting.old)? {
            skipped.push(setting.clone());
        }
    }
    if let Some(stopped) = &saved.irqbalance {
        irqbalance::start(&roots.proc, stopped)?;
    }
    fs::remove_file(state).map_err(state_error)?;
    Ok(Restored {
        state: saved,
        skipped,
    })
}
