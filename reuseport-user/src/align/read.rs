//! Reads a device's queues, their IRQs and masks from a sysfs and a procfs root (`/sys`,
//! `/proc`, or fixture trees laid out like them).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use super::{AlignError, DeviceView, Irq, RxQueue, TxQueue, parse_mask};
use crate::CpuList;

/// Where sysfs and procfs are mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roots {
    /// sysfs (`/sys`).
    pub sys: PathBuf,
    /// procfs (`/proc`).
    pub proc: PathBuf,
}

impl Roots {
    /// `/sys` and `/proc`.
    pub fn system() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
        }
    }

    /// `/sys/class/net/DEV`.
    pub fn device_dir(&self, dev: &str) -> PathBuf {
        self.sys.join("class/net").join(dev)
    }

    /// `/sys/devices/system/cpu`.
    pub fn cpu_dir(&self) -> PathBuf {
        self.sys.join("devices/system/cpu")
    }
}

/// What a queue IRQ serves, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IrqRole {
    /// A combined or receive queue (`eth0-TxRx-3`, `eth0-rx-3`, `mlx5_comp3`, `virtio2-input.3`).
    Rx(u32),
    /// A transmit-only queue (`eth0-tx-3`, `virtio2-output.3`).
    Tx(u32),
}

/// The role of an IRQ named `name` (as `/proc/interrupts` shows it), `None` for control IRQs
/// (`config`, `async`, `misc`).
fn irq_role(name: &str) -> Option<IrqRole> {
    let name = name.split('@').next().unwrap_or(name).to_ascii_lowercase();
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let queue: u32 = name[name.len() - digits..].parse().ok()?;
    let head = &name[..name.len() - digits];
    let combined = ["txrx", "tx-rx", "comp", "combined", "fp-"];
    if combined.iter().any(|word| head.contains(word))
        || head.contains("rx")
        || head.contains("input")
    {
        Some(IrqRole::Rx(queue))
    } else if head.contains("tx") || head.contains("output") {
        Some(IrqRole::Tx(queue))
    } else {
        None
    }
}

/// A sysfs or procfs file's text, trimmed.
pub(crate) fn read_text(path: &Path) -> Result<String, AlignError> {
    fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(|source| AlignError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// A file that may be absent or unreadable on some kernels and devices (`xps_cpus` of a
/// single-queue device answers ENOENT).
pub(crate) fn read_optional(path: &Path) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
}

fn parse_error(path: &Path, text: &str, expected: &'static str) -> AlignError {
    AlignError::Parse {
        path: path.to_path_buf(),
        text: text.to_owned(),
        expected,
    }
}

/// The queue numbers of `queues/PREFIX-N`, ascending.
fn queue_indices(queues: &Path, prefix: &str) -> Result<Vec<u32>, AlignError> {
    let entries = fs::read_dir(queues).map_err(|source| AlignError::Read {
        path: queues.to_path_buf(),
        source,
    })?;
    let mut indices: Vec<u32> = entries
        .flatten()
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()?
                .strip_prefix(prefix)?
                .parse()
                .ok()
        })
        .collect();
    indices.sort_unstable();
    Ok(indices)
}

/// `/proc/interrupts`: IRQ number to name (the last column).
fn interrupt_names(proc: &Path) -> Result<BTreeMap<u32, String>, AlignError> {
    let path = proc.join("interrupts");
    let text = read_text(&path)?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (number, rest) = line.trim_start().split_once(':')?;
            let number = number.parse().ok()?;
            let name = rest.split_whitespace().last()?;
            Some((number, name.to_owned()))
        })
        .collect())
}

/// The IRQs of `dev`: its bus device's `msi_irqs` (or its parent's, as for virtio), else the
/// `/proc/interrupts` names that start with `DEV-` or hold `-DEV-`.
fn device_irqs(roots: &Roots, dev: &str, names: &BTreeMap<u32, String>) -> Vec<u32> {
    let device = roots.device_dir(dev).join("device");
    for dir in [device.join("msi_irqs"), device.join("../msi_irqs")] {
        if let Ok(entries) = fs::read_dir(&dir) {
            let mut irqs: Vec<u32> = entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect();
            irqs.sort_unstable();
            return irqs;
        }
    }
    let prefix = format!("{dev}-");
    let inner = format!("-{dev}-");
    names
        .iter()
        .filter(|(_, name)| name.starts_with(&prefix) || name.contains(&inner))
        .map(|(&number, _)| number)
        .collect()
}

/// Where IRQ `number` fires: `effective_affinity_list`, else `smp_affinity_list`.
fn irq_cpus(proc: &Path, number: u32) -> Result<(Vec<u32>, bool), AlignError> {
    let dir = proc.join("irq").join(number.to_string());
    let (path, effective) = match read_optional(&dir.join("effective_affinity_list")) {
        Some(text) if !text.is_empty() => (dir.join("effective_affinity_list"), true),
        _ => (dir.join("smp_affinity_list"), false),
    };
    let text = read_text(&path)?;
    let cpus: CpuList = text
        .parse()
        .map_err(|_| parse_error(&path, &text, "a CPU list"))?;
    Ok((cpus.iter().collect(), effective))
}

/// The pid of a process named `irqbalance`, if one runs (an exited one its parent has not
/// reaped yet does not count).
pub(crate) fn irqbalance_pid(proc: &Path) -> Option<u32> {
    fs::read_dir(proc).ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = read_optional(&entry.path().join("comm"))?;
        (comm == "irqbalance" && !exited(proc, pid)).then_some(pid)
    })
}

/// Whether task `pid` is gone or a zombie (exited, not yet reaped by its parent).
pub(crate) fn exited(proc: &Path, pid: u32) -> bool {
    match fs::read_to_string(proc.join(pid.to_string()).join("stat")) {
        Err(_) => true,
        // `PID (comm) STATE ...`: comm may hold spaces and parentheses; the state follows the
        // last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

fn mask_file(path: &Path) -> Result<Option<Vec<u32>>, AlignError> {
    match read_optional(path) {
        None => Ok(None),
        Some(text) => parse_mask(&text)
            .map(Some)
            .ok_or_else(|| parse_error(path, &text, "a hex CPU mask")),
    }
}

/// Reads `dev`'s queues, their IRQs (where it has any), RPS and XPS masks, and whether
/// irqbalance runs. Needs no privilege. The RSS table and hash fields are left out (`None`):
/// they come from ioctls on the live device ([`super::rss`]), and NAPI threads from netlink
/// ([`super::napi::read_threads`]).
pub fn read_device(roots: &Roots, dev: &str) -> Result<DeviceView, AlignError> {
    let dir = roots.device_dir(dev);
    if dev.is_empty() || dev.contains('/') || !dir.is_dir() {
        return Err(AlignError::NoDevice {
            dev: dev.to_owned(),
            path: dir,
        });
    }
    let queues = dir.join("queues");
    if !queues.is_dir() {
        return Err(AlignError::NoQueues {
            dev: dev.to_owned(),
            path: queues,
        });
    }
    let hardware = dir.join("device").exists();
    let mut rx_irqs = BTreeMap::new();
    let mut tx_irqs = BTreeMap::new();
    if hardware {
        let names = interrupt_names(&roots.proc)?;
        for number in device_irqs(roots, dev, &names) {
            let Some(name) = names.get(&number) else {
                continue;
            };
            let Some(role) = irq_role(name) else {
                continue;
            };
            let (cpus, effective) = irq_cpus(&roots.proc, number)?;
            let irq = Irq {
                number,
                name: name.clone(),
                cpus,
                effective,
            };
            match role {
                IrqRole::Rx(queue) => rx_irqs.entry(queue).or_insert(irq),
                IrqRole::Tx(queue) => tx_irqs.entry(queue).or_insert(irq),
            };
        }
    }
    let rx = queue_indices(&queues, "rx-")?
        .into_iter()
        .map(|index| {
            let queue = queues.join(format!("rx-{index}"));
            let flow_path = queue.join("rps_flow_cnt");
            let rps_flow_cnt = match read_optional(&flow_path) {
                None => None,
                Some(text) => Some(
                    text.parse()
                        .map_err(|_| parse_error(&flow_path, &text, "a number"))?,
                ),
            };
            Ok(RxQueue {
                index,
                irq: rx_irqs.remove(&index),
                rps_cpus: mask_file(&queue.join("rps_cpus"))?,
                rps_flow_cnt,
                napi_thread: None,
            })
        })
        .collect::<Result<_, AlignError>>()?;
    let tx = queue_indices(&queues, "tx-")?
        .into_iter()
        .map(|index| {
            Ok(TxQueue {
                index,
                irq: tx_irqs.remove(&index),
                xps_cpus: mask_file(&queues.join(format!("tx-{index}/xps_cpus")))?,
            })
        })
        .collect::<Result<_, AlignError>>()?;
    Ok(DeviceView {
        name: dev.to_owned(),
        hardware,
        rx,
        tx,
        irqbalance: irqbalance_pid(&roots.proc),
        // An ioctl, not a file: the caller reads it where the device is live (rss.rs).
        rss_table: None,
        rss_hash: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_names_of_common_drivers_name_their_queue() {
        assert_eq!(irq_role("eth0-TxRx-3"), Some(IrqRole::Rx(3)));
        assert_eq!(irq_role("i40e-eth0-TxRx-12"), Some(IrqRole::Rx(12)));
        assert_eq!(
            irq_role("mlx5_comp7@pci:0000:3b:00.0"),
            Some(IrqRole::Rx(7))
        );
        assert_eq!(irq_role("virtio2-input.0"), Some(IrqRole::Rx(0)));
        assert_eq!(irq_role("virtio2-output.1"), Some(IrqRole::Tx(1)));
        assert_eq!(irq_role("eth0-tx-2"), Some(IrqRole::Tx(2)));
        assert_eq!(irq_role("virtio2-config"), None);
        assert_eq!(irq_role("mlx5_async0@pci:0000:3b:00.0"), None);
    }

    #[test]
    fn this_machines_devices_read_without_privilege_errors() {
        // Every device here (lo, eth0 on virtio, ...) reads: the report needs only reads.
        let roots = Roots::system();
        let entries = fs::read_dir(roots.sys.join("class/net")).expect("/sys/class/net");
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().join("queues").is_dir() {
                continue;
            }
            let view = read_device(&roots, &name).expect("readable");
            assert!(!view.rx.is_empty(), "{name} has rx queues");
        }
    }
}
