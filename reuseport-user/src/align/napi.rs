//! Threaded NAPI: where a receive queue is processed when its NAPI instance runs in a kernel
//! thread (`echo 1 > /sys/class/net/DEV/threaded`). The queue's IRQ then only wakes the thread
//! `napi/DEV-ID`; its packets reach the socket layer, and the steering program, on whichever CPU
//! the scheduler runs that thread: its CPU affinity decides, not the IRQ's.
//!
//! Which thread serves which queue comes from the kernel's `netdev` netlink family
//! ([`crate::netdev::device_napis`]). A driver that links none of its queues there (veth) but has
//! exactly one NAPI instance per receive queue gets them matched in id order, the order veth
//! creates them in; [`NapiThread::linked`] says which way it was found.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    AlignError, DeviceView,
    read::{Roots, read_optional, read_text},
};
use crate::{CpuList, netdev};

/// The kernel thread that processes one receive queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NapiThread {
    /// The NAPI instance's id (`ID` in `napi/DEV-ID`).
    pub napi_id: u32,
    /// The thread's pid.
    pub pid: u32,
    /// Its name (`/proc/PID/comm`, e.g. `napi/eth0-8194`).
    pub name: String,
    /// The CPUs it may run on (`Cpus_allowed_list`).
    pub cpus: Vec<u32>,
    /// Whether the driver linked the queue to this instance (`false`: matched in id order).
    pub linked: bool,
}

/// The CPU affinity of task `pid` from `/proc/PID/status` under `proc`.
pub fn thread_cpus(proc: &Path, pid: u32) -> Result<Vec<u32>, AlignError> {
    let path = proc.join(pid.to_string()).join("status");
    let text = read_text(&path)?;
    let list = text
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .map(str::trim)
        .unwrap_or_default();
    let cpus: CpuList = list.parse().map_err(|_| AlignError::Parse {
        path,
        text: list.to_owned(),
        expected: "a Cpus_allowed_list line",
    })?;
    Ok(cpus.iter().collect())
}

/// The name of task `pid` (`/proc/PID/comm`), `None` if it is gone.
pub fn thread_name(proc: &Path, pid: u32) -> Option<String> {
    read_optional(&proc.join(pid.to_string()).join("comm"))
}

/// Fills in each receive queue's NAPI thread of the live device `view` describes (in the calling
/// thread's network namespace), where its NAPI is threaded. Leaves them `None` where the kernel
/// has no `netdev` netlink family.
pub fn read_threads(roots: &Roots, view: &mut DeviceView) -> Result<(), AlignError> {
    let path = roots.device_dir(&view.name).join("ifindex");
    let text = read_text(&path)?;
    let ifindex: u32 = text.parse().map_err(|_| AlignError::Parse {
        path,
        text,
        expected: "an interface index",
    })?;
    let Some(device) = netdev::device_napis(ifindex).map_err(|source| AlignError::Netdev {
        dev: view.name.clone(),
        source,
    })?
    else {
        return Ok(());
    };
    // Unlinked queues, one instance each: pair them in id order.
    let in_id_order: Vec<&netdev::Napi> = device.napis.values().collect();
    let by_order = device.rx_queues.is_empty() && in_id_order.len() == view.rx.len();
    for (position, queue) in view.rx.iter_mut().enumerate() {
        let (napi, linked) = match device.of_rx_queue(queue.index) {
            Some(napi) => (napi, true),
            None if by_order => (in_id_order[position], false),
            None => continue,
        };
        let Some(pid) = napi.pid else { continue };
        // A thread that exits between the dump and here (threaded turned off) is left out.
        let Some(name) = thread_name(&roots.proc, pid) else {
            continue;
        };
        queue.napi_thread = Some(NapiThread {
            napi_id: napi.id,
            pid,
            name,
            cpus: thread_cpus(&roots.proc, pid)?,
            linked,
        });
    }
    Ok(())
}
