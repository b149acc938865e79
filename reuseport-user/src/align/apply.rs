//! Changing a device's settings to match the workers, and putting them back: every previous
//! value goes to a state file before the first write, and [`restore`] writes them back.
//!
//! What is changed: each receive queue's IRQ affinity (`/proc/irq/N/smp_affinity_list`) where
//! the queue has an IRQ, and then RPS is turned off on it (the IRQ's CPU is the worker's); on
//! queues without an IRQ (veth and other virtual devices) the RPS mask; each transmit queue's
//! XPS mask. Queue `i` gets the workers at positions `i, i + n, i + 2n, ...` of the worker list
//! (`n` queues), or the worker at position `i mod workers` when there are more queues than
//! workers, so every worker gets a queue when it can.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{AlignError, DeviceView, format_mask, read::Roots};
use crate::CpuList;

/// One setting to change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    /// The file.
    pub path: PathBuf,
    /// What it held before.
    pub old: String,
    /// What goes in.
    pub new: String,
}

/// The state file: the device and every setting changed, with its previous value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// The device.
    pub device: String,
    /// The settings, in the order they were written.
    pub settings: Vec<Setting>,
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

fn current(path: &Path) -> Result<String, AlignError> {
    fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(|source| AlignError::Read {
            path: path.to_path_buf(),
            source,
        })
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
        match &queue.irq {
            Some(irq) => {
                let path = roots
                    .proc
                    .join(format!("irq/{}/smp_affinity_list", irq.number));
                let old = current(&path)?;
                let new = mine[0].to_string();
                if irq.cpus != [mine[0]] || old != new {
                    settings.push(Setting { path, old, new });
                }
                if queue.rps_cpus.as_ref().is_some_and(|cpus| !cpus.is_empty()) {
                    let old = current(&rps_path)?;
                    settings.push(Setting {
                        path: rps_path,
                        old,
                        new: "0".into(),
                    });
                }
            }
            None => {
                if queue.rps_cpus.as_ref().is_some_and(|cpus| *cpus != mine) {
                    let old = current(&rps_path)?;
                    settings.push(Setting {
                        path: rps_path,
                        old,
                        new: format_mask(&mine),
                    });
                }
            }
        }
    }
    let tx_count = view.tx.len();
    for (position, queue) in view.tx.iter().enumerate() {
        let mine = share(&workers, position, tx_count);
        if queue.xps_cpus.as_ref().is_some_and(|cpus| *cpus != mine) {
            let path = queues.join(format!("tx-{}/xps_cpus", queue.index));
            let old = current(&path)?;
            settings.push(Setting {
                path,
                old,
                new: format_mask(&mine),
            });
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

/// The only files `apply` writes (and so the only ones `restore` will write).
const WRITABLE: [&str; 3] = ["rps_cpus", "xps_cpus", "smp_affinity_list"];

/// Fails with [`AlignError::UnsafeState`] unless `path` (where it exists) is a real directory
/// (`is_dir`) or file, owned by root or this user and writable by no one else: root writes
/// what the state file says, so no other user may have put it there.
fn check_private(path: &Path, is_dir: bool) -> Result<(), AlignError> {
    let meta = match fs::symlink_metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(AlignError::State {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok(meta) => meta,
    };
    let refuse = |why: String| AlignError::UnsafeState {
        path: path.to_path_buf(),
        why,
    };
    let me = rustix::process::geteuid().as_raw();
    if meta.file_type().is_symlink() {
        return Err(refuse("it is a symbolic link".into()));
    }
    if meta.is_dir() != is_dir {
        return Err(refuse(
            if is_dir {
                "it is not a directory"
            } else {
                "it is not a file"
            }
            .into(),
        ));
    }
    if meta.uid() != 0 && meta.uid() != me {
        return Err(refuse(format!(
            "it is owned by uid {}, not by root or by this user (uid {me})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "it is writable by its group or by everyone (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// [`check_private`] for the state file and its directory.
fn check_state(state: &Path) -> Result<(), AlignError> {
    if let Some(dir) = state.parent() {
        check_private(dir, true)?;
    }
    check_private(state, false)
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

/// Writes every setting of `settings` for `view`'s device, after saving the previous values to
/// `state` (which must not exist yet). Refuses IRQ writes while irqbalance runs. If a write
/// fails, the ones before it are put back and the state file removed.
pub fn apply(view: &DeviceView, settings: &[Setting], state: &Path) -> Result<(), AlignError> {
    if let Some(pid) = view.irqbalance {
        let touches_irqs = settings
            .iter()
            .any(|setting| setting.path.ends_with("smp_affinity_list"));
        if touches_irqs {
            return Err(AlignError::Irqbalance { pid });
        }
    }
    ensure_not_applied(state)?;
    check_state(state)?;
    let saved = SavedState {
        device: view.name.clone(),
        settings: settings.to_vec(),
    };
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
    let json = serde_json::to_vec_pretty(&saved).map_err(|err| state_error(err.into()))?;
    let partial = state.with_extension("json.partial");
    fs::write(&partial, json).map_err(state_error)?;
    fs::rename(&partial, state).map_err(state_error)?;
    for (done, setting) in settings.iter().enumerate() {
        if let Err(err) = write(&setting.path, &setting.new) {
            for undo in settings[..done].iter().rev() {
                // Best effort: the write that failed is the error to report.
                let _ = fs::write(&undo.path, &undo.old);
            }
            let _ = fs::remove_file(state);
            return Err(err);
        }
    }
    Ok(())
}

/// Writes back every value saved in `state`, last change first, then removes it. Returns what
/// was restored.
pub fn restore(state: &Path) -> Result<SavedState, AlignError> {
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
    if let Some(setting) = saved.settings.iter().find(|setting| {
        !setting
            .path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| WRITABLE.contains(&name))
    }) {
        return Err(AlignError::UnsafeState {
            path: state.to_path_buf(),
            why: format!(
                "it names {}, which align never writes",
                setting.path.display()
            ),
        });
    }
    for setting in saved.settings.iter().rev() {
        write(&setting.path, &setting.old)?;
    }
    fs::remove_file(state).map_err(state_error)?;
    Ok(saved)
}
