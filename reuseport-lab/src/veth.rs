//! A veth pair between two namespaces, set up from the program alone: rtnetlink for the pair,
//! its queue counts, addresses and link state; the ethtool ioctl for offloads; the namespace's
//! sysfs for RPS/XPS masks and threaded NAPI. No `ip` or `ethtool` binary is needed.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth,
    packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute},
};
use thiserror::Error;

use crate::netns::{NetNs, NetNsError};

/// Errors from setting up a veth pair.
#[derive(Debug, Error)]
pub enum VethError {
    /// A namespace step failed.
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    /// A netlink request failed.
    #[error("netlink: {what} failed: {source}")]
    Netlink {
        /// The request.
        what: String,
        /// Why.
        #[source]
        source: rtnetlink::Error,
    },
    /// Opening a netlink socket or starting its runtime failed.
    #[error("opening a netlink socket failed")]
    Socket(#[source] io::Error),
    /// Reading or writing a sysfs file failed.
    #[error("{path}")]
    Sysfs {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An ethtool ioctl failed.
    #[error("ethtool {what} on {dev} failed")]
    Ethtool {
        /// The setting.
        what: &'static str,
        /// The device.
        dev: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// One end of the pair.
#[derive(Clone, Debug)]
pub struct VethEnd<'a> {
    /// Where it lives.
    pub ns: &'a NetNs,
    /// Its device name (at most 15 bytes).
    pub name: String,
    /// Its address, in a /30.
    pub addr: Ipv4Addr,
    /// Receive queues (each with its own NAPI instance once GRO is on).
    pub rx_queues: u32,
    /// Transmit queues: should equal the peer's receive queues (veth hands an skb from
    /// transmit queue i to the peer's receive queue i).
    pub tx_queues: u32,
}

impl VethEnd<'_> {
    fn message(&self) -> LinkMessageBuilder<LinkUnspec> {
        LinkMessageBuilder::<LinkUnspec>::new()
            .name(self.name.clone())
            .setns_by_fd(self.ns.fd().as_raw_fd())
            .append_extra_attribute(LinkAttribute::NumTxQueues(self.tx_queues))
            .append_extra_attribute(LinkAttribute::NumRxQueues(self.rx_queues))
    }
}

/// Runs `work` with an rtnetlink handle whose socket lives in the calling thread's namespace.
fn with_netlink<T>(work: impl AsyncFnOnce(Handle) -> Result<T, VethError>) -> Result<T, VethError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(VethError::Socket)?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(VethError::Socket)?;
        let connection = tokio::spawn(connection);
        let result = work(handle).await;
        connection.abort();
        result
    })
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> VethError {
    let what = what.into();
    move |source| VethError::Netlink { what, source }
}

/// Creates the pair from the calling thread's namespace, each end directly in its own
/// namespace (`IFLA_NET_NS_FD`), with the given queue counts. Both ends start down.
pub fn create_pair(a: &VethEnd<'_>, b: &VethEnd<'_>) -> Result<(), VethError> {
    add_pair(&a.name, Some(a.ns), a.tx_queues, a.rx_queues, b)
}

/// Creates a pair whose first end, `name` with `queues` receive and transmit queues, stays in
/// the calling thread's namespace, and whose peer is `peer`, in its own namespace. Deleting one
/// end of a veth deletes both, so the pair goes away with the peer's namespace (when its last
/// descriptor closes), even if the caller is killed. Both ends start down.
pub fn create_pair_here(name: &str, queues: u32, peer: &VethEnd<'_>) -> Result<(), VethError> {
    add_pair(name, None, queues, queues, peer)
}

/// One `RTM_NEWLINK` for a veth pair: the first end `name` (moved into `ns` if given) with its
/// queue counts, and `peer` as its peer.
fn add_pair(
    name: &str,
    ns: Option<&NetNs>,
    tx_queues: u32,
    rx_queues: u32,
    peer: &VethEnd<'_>,
) -> Result<(), VethError> {
    let mut builder =
        LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth).name(name.to_owned());
    if let Some(ns) = ns {
        builder = builder.setns_by_fd(ns.fd().as_raw_fd());
    }
    let mut message = builder
        .append_extra_attribute(LinkAttribute::NumTxQueues(tx_queues))
        .append_extra_attribute(LinkAttribute::NumRxQueues(rx_queues))
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.message().build())))
        .build();
    message.header.interface_family = rtnetlink::packet_route::AddressFamily::Unspec;
    let what = format!("creating veth {name} <-> {}", peer.name);
    with_netlink(async |handle| {
        handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(netlink(what))
    })
}

/// The offloads of one end, which decide where veth processes what that end receives and
/// whether what it sends can use the peer's NAPI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offloads {
    /// The kernel's defaults (GRO off, TSO on): received packets are queued on the sending CPU's
    /// backlog, and a NAPI peer would not take this end's TCP segments.
    Defaults,
    /// GRO on, TSO off: veth hands every packet this end receives to the receive queue's NAPI
    /// instance, and this end's TCP segments are GRO-eligible at a NAPI peer.
    Napi,
    /// GRO off, TSO off: received packets are queued on the sending CPU's backlog (processed in
    /// its softirq), while this end's TCP segments stay GRO-eligible at a NAPI peer.
    Backlog,
}

/// Inside `end`'s namespace: `offloads` (see [`Offloads`]), `lo` up, the address, the device
/// up, and `extra` (sysfs work) after that.
pub fn configure<T: Send>(
    end: &VethEnd<'_>,
    offloads: Offloads,
    extra: impl FnOnce(&Path) -> Result<T, VethError> + Send,
) -> Result<T, VethError> {
    let dev = end.name.clone();
    let addr = end.addr;
    end.ns.run(move || {
        // veth_xmit only queues to the peer's NAPI skbs it deems GRO-eligible: with TSO on the
        // sender, TCP's are not (veth_skb_is_eligible_for_gro).
        match offloads {
            Offloads::Defaults => {}
            Offloads::Napi => {
                ethtool_set(&dev, ETHTOOL_SGRO, "gro", 1)?;
                ethtool_set(&dev, ETHTOOL_STSO, "tso", 0)?;
            }
            Offloads::Backlog => {
                ethtool_set(&dev, ETHTOOL_SGRO, "gro", 0)?;
                ethtool_set(&dev, ETHTOOL_STSO, "tso", 0)?;
            }
        }
        let sysfs = Path::new("/sys/class/net").join(&dev);
        let index = ifindex(&sysfs)?;
        with_netlink(async |handle| {
            handle
                .link()
                .set(LinkUnspec::new_with_name("lo").up().build())
                .execute()
                .await
                .map_err(netlink("setting lo up"))?;
            handle
                .address()
                .add(index, IpAddr::V4(addr), 30)
                .execute()
                .await
                .map_err(netlink(format!("adding {addr}/30 to {dev}")))?;
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(netlink(format!("setting {dev} up")))
        })?;
        extra(&sysfs)
    })?
}

/// Makes each end know the other's link-layer address for good (a permanent neighbour entry, as
/// `ip neigh add ... nud permanent` would), so that no ARP ever runs between them. Otherwise the
/// packets sent while the peer's address is being resolved (the first ones of a pair, and those
/// of an entry being confirmed again) wait on the neighbour entry and leave with whichever CPU
/// completes the resolution: away from the CPU, and so the transmit queue, that sent them.
pub fn link_neighbours(a: &VethEnd<'_>, b: &VethEnd<'_>) -> Result<(), VethError> {
    let (a_mac, b_mac) = (mac_address(a)?, mac_address(b)?);
    add_neighbour(a, b.addr, b_mac)?;
    add_neighbour(b, a.addr, a_mac)
}

/// `end`'s link-layer address, from its namespace's sysfs (`aa:bb:cc:dd:ee:ff`).
fn mac_address(end: &VethEnd<'_>) -> Result<Vec<u8>, VethError> {
    let path = Path::new("/sys/class/net").join(&end.name).join("address");
    end.ns.run(move || {
        let text = read_sysfs(&path)?;
        text.split(':')
            .map(|byte| u8::from_str_radix(byte, 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|err| VethError::Sysfs {
                path: path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, err),
            })
    })?
}

/// Inside `end`'s namespace: a permanent neighbour entry for `peer` at `mac` on `end`'s device.
fn add_neighbour(end: &VethEnd<'_>, peer: Ipv4Addr, mac: Vec<u8>) -> Result<(), VethError> {
    let dev = end.name.clone();
    end.ns.run(move || {
        let index = ifindex(&Path::new("/sys/class/net").join(&dev))?;
        with_netlink(async |handle| {
            handle
                .neighbours()
                .add(index, IpAddr::V4(peer))
                .link_layer_address(&mac)
                .execute()
                .await
                .map_err(netlink(format!("adding neighbour {peer} on {dev}")))
        })
    })?
}

/// The interface index of the device whose sysfs directory is `sysfs`.
fn ifindex(sysfs: &Path) -> Result<u32, VethError> {
    let path = sysfs.join("ifindex");
    read_sysfs(&path)?.parse().map_err(|err| VethError::Sysfs {
        path,
        source: io::Error::new(io::ErrorKind::InvalidData, err),
    })
}

/// Reads a sysfs file, trimmed.
pub fn read_sysfs(path: &Path) -> Result<String, VethError> {
    fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(|source| VethError::Sysfs {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes a sysfs file.
pub fn write_sysfs(path: &Path, value: &str) -> Result<(), VethError> {
    fs::write(path, value).map_err(|source| VethError::Sysfs {
        path: path.to_path_buf(),
        source,
    })
}

/// `ETHTOOL_STSO` (linux/ethtool.h): set TCP segmentation offload (all TSO features).
const ETHTOOL_STSO: u32 = 0x1f;
/// `ETHTOOL_SGRO` (linux/ethtool.h): set generic receive offload.
const ETHTOOL_SGRO: u32 = 0x2c;

/// Sets one offload (`struct ethtool_value`: `[cmd, data]`) with the ethtool ioctl in the
/// calling thread's namespace.
fn ethtool_set(dev: &str, cmd: u32, what: &'static str, on: u32) -> Result<(), VethError> {
    let mut value = [cmd, on];
    // SAFETY: `[cmd, data]` is a whole struct ethtool_value, what ETHTOOL_S* commands read.
    unsafe { reuseport::ethtool::ethtool(dev, &mut value) }.map_err(|source| VethError::Ethtool {
        what,
        dev: dev.to_owned(),
        source,
    })
}
