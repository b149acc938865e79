//! Where the server and the clients run, created by the harness and always torn down.
//!
//! - [`TopologyKind::Veth`]: two network namespaces (`rp-s-PID` for the server, `rp-c-PID` for the
//!   clients) joined by a veth pair, with RPS on the server side's `rx-0` over every server CPU.
//!   The CPU that processes each SYN is then picked by the flow hash, as a multi-queue NIC's RSS
//!   would. Addresses are link-local (169.254.77.1 server, .2 client), inside the namespaces only.
//! - [`TopologyKind::Loopback`]: the server on 127.0.0.1 in this namespace, and clients pinned
//!   round-robin to CPUs (a pinned loopback sender's SYN is processed on its own CPU).
//!
//! Dropping a [`Topology`] deletes its namespaces (which deletes the veth pair). Namespaces left by
//! a harness that was killed are removed by the next one (their PID is no longer alive).

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr},
    os::{fd::AsFd, unix::process::CommandExt},
    path::Path,
    process::{Command, Stdio},
};

use reuseport::cpus::CpuList;
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use serde::Serialize;
use thiserror::Error;

/// Errors from creating a topology.
#[derive(Debug, Error)]
pub enum TopologyError {
    /// An `ip` command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// An `ip` command could not be run at all.
    #[error("running `{command}` failed (is iproute2 installed?)")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A namespace could not be opened.
    #[error("opening network namespace {name}")]
    Open {
        /// The namespace.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Which topology an experiment uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologyKind {
    /// Server and clients in two namespaces joined by veth, RPS spreading SYNs by flow hash.
    Veth,
    /// Everything on loopback, clients pinned round-robin to CPUs.
    Loopback,
}

/// Namespace names start with this, followed by `s-`/`c-` and the creating process's PID.
const PREFIX: &str = "rp-";
/// Server and client addresses on the veth pair (link-local: never routed off the machine).
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 2);

/// A named network namespace under `/run/netns`, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    fn create(name: String) -> Result<Self, TopologyError> {
        ip(&["netns", "add", &name])?;
        Ok(Self { name })
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes `command` run inside this namespace (it enters it between fork and exec).
    pub fn enter_on_spawn(&self, command: &mut Command) -> Result<(), TopologyError> {
        let path = Path::new("/run/netns").join(&self.name);
        let file = File::open(&path).map_err(|source| TopologyError::Open {
            name: self.name.clone(),
            source,
        })?;
        // SAFETY: the closure only makes the setns system call, which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
                    .map_err(io::Error::from)
            });
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth end inside it, and with it the pair.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A created topology: where the server listens and how to start processes on each side.
#[derive(Debug)]
pub struct Topology {
    kind: TopologyKind,
    server: Option<NetNs>,
    client: Option<NetNs>,
    rx_cpus: CpuList,
}

impl Topology {
    /// Creates the topology for a server on `server_cpus`, receiving on all of them.
    pub fn create(kind: TopologyKind, server_cpus: &CpuList) -> Result<Self, TopologyError> {
        Self::create_receiving_on(kind, server_cpus)
    }

    /// Creates a topology whose SYNs are processed only on `rx_cpus` (all the server's CPUs, or
    /// fewer to skew the load): the RPS mask (veth) or the CPUs the clients are pinned to
    /// (loopback).
    pub fn create_receiving_on(
        kind: TopologyKind,
        rx_cpus: &CpuList,
    ) -> Result<Self, TopologyError> {
        remove_stale_namespaces();
        let rx_cpus = rx_cpus.clone();
        match kind {
            TopologyKind::Loopback => Ok(Self {
                kind,
                server: None,
                client: None,
                rx_cpus,
            }),
            TopologyKind::Veth => {
                let pid = std::process::id();
                // Namespaces first, so a failure below still deletes them on drop.
                let server = NetNs::create(format!("{PREFIX}s-{pid}"))?;
                let client = NetNs::create(format!("{PREFIX}c-{pid}"))?;
                let (server_dev, client_dev) = (format!("rps{pid}"), format!("rpc{pid}"));
                ip(&[
                    "link",
                    "add",
                    &server_dev,
                    "netns",
                    server.name(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &client_dev,
                    "netns",
                    client.name(),
                ])?;
                for (ns, dev, addr) in [
                    (&server, &server_dev, SERVER_IP),
                    (&client, &client_dev, CLIENT_IP),
                ] {
                    ip(&[
                        "-n",
                        ns.name(),
                        "addr",
                        "add",
                        &format!("{addr}/30"),
                        "dev",
                        dev,
                    ])?;
                    ip(&["-n", ns.name(), "link", "set", "lo", "up"])?;
                    ip(&["-n", ns.name(), "link", "set", dev, "up"])?;
                }
                // RPS: hash each received flow to one of the server CPUs, like RSS would.
                // `ip netns exec` mounts the namespace's own /sys, where its devices are.
                let rps = format!(
                    "echo {} > /sys/class/net/{server_dev}/queues/rx-0/rps_cpus",
                    cpu_mask(&rx_cpus)
                );
                ip(&["netns", "exec", server.name(), "sh", "-c", &rps])?;
                Ok(Self {
                    kind,
                    server: Some(server),
                    client: Some(client),
                    rx_cpus,
                })
            }
        }
    }

    /// The topology's kind.
    pub fn kind(&self) -> TopologyKind {
        self.kind
    }

    /// The address the server should listen on (the port is the caller's).
    pub fn server_ip(&self) -> IpAddr {
        match self.kind {
            TopologyKind::Loopback => Ipv4Addr::LOCALHOST.into(),
            TopologyKind::Veth => SERVER_IP.into(),
        }
    }

    /// Whether clients must be pinned for the receiving CPU to vary (loopback) or not (veth,
    /// where RPS picks it).
    pub fn pin_clients(&self) -> bool {
        self.kind == TopologyKind::Loopback
    }

    /// The CPUs for load-generator threads: on loopback the CPUs that are to receive the SYNs
    /// (clients are pinned there); across veth `all` (RPS picks the receiving CPU).
    pub fn client_cpus(&self, all: &CpuList) -> CpuList {
        match self.kind {
            TopologyKind::Loopback => self.rx_cpus.clone(),
            TopologyKind::Veth => all.clone(),
        }
    }

    /// Makes `command` run on the server side.
    pub fn server_side(&self, command: &mut Command) -> Result<(), TopologyError> {
        match &self.server {
            Some(ns) => ns.enter_on_spawn(command),
            None => Ok(()),
        }
    }

    /// Makes `command` run on the client side.
    pub fn client_side(&self, command: &mut Command) -> Result<(), TopologyError> {
        match &self.client {
            Some(ns) => ns.enter_on_spawn(command),
            None => Ok(()),
        }
    }

    /// The namespaces this topology created (empty for loopback).
    pub fn namespaces(&self) -> Vec<&str> {
        self.server
            .iter()
            .chain(&self.client)
            .map(NetNs::name)
            .collect()
    }
}

/// The kernel's hex CPU mask format (`3`, or `ffffffff,00000001` for more than 32 CPUs).
pub fn cpu_mask(cpus: &CpuList) -> String {
    let words = cpus.iter().last().map_or(1, |last| last as usize / 32 + 1);
    let mut mask = vec![0u32; words];
    for cpu in cpus.iter() {
        mask[cpu as usize / 32] |= 1 << (cpu % 32);
    }
    let mut text: Vec<String> = mask
        .iter()
        .rev()
        .map(|word| format!("{word:08x}"))
        .collect();
    if let Some(first) = text.first_mut() {
        *first = first.trim_start_matches('0').to_owned();
        if first.is_empty() {
            *first = "0".to_owned();
        }
    }
    text.join(",")
}

/// The harness's namespaces currently present (`ip netns list`).
pub fn harness_namespaces() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|line| line.split_whitespace().next())
                .filter(|name| name.starts_with(PREFIX))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes namespaces left by harness processes that no longer exist.
fn remove_stale_namespaces() {
    for name in harness_namespaces() {
        let pid = name
            .rsplit('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), TopologyError> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TopologyError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(TopologyError::Command {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_masks_use_the_kernel_format() {
        let list = |s: &str| s.parse::<CpuList>().unwrap();
        assert_eq!(cpu_mask(&list("0-1")), "3");
        assert_eq!(cpu_mask(&list("0,5")), "21");
        assert_eq!(cpu_mask(&list("0,32-33")), "3,00000001");
    }
}
