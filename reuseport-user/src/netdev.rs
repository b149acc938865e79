//! The kernel's `netdev` generic-netlink family (`Documentation/netlink/specs/netdev.yaml`,
//! Linux 6.8 and later): which NAPI instance serves each receive queue (`queue-get`), and each
//! NAPI instance's IRQ and, when NAPI is threaded, its kernel thread (`napi-get`).
//!
//! Why it matters here: a receive queue's packets are processed where its NAPI instance polls.
//! In softirq mode that is the CPU its IRQ fired on; in threaded mode (`/sys/class/net/DEV/
//! threaded`) it is wherever the scheduler runs the `napi/DEV-ID` thread, whatever the IRQ's
//! affinity. sysfs names neither link, so [`device_napis`] asks the kernel.
//!
//! Both requests are dumps filtered by interface index, answered in the calling thread's network
//! namespace; neither needs privilege.

use std::{collections::BTreeMap, io};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
    Nla as _, NlasIterator, ParseableParametrized, parse_u32,
};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};
use thiserror::Error;

/// `NETDEV_CMD_QUEUE_GET` (linux/netdev.h).
const CMD_QUEUE_GET: u8 = 10;
/// `NETDEV_CMD_NAPI_GET`.
const CMD_NAPI_GET: u8 = 11;

/// `NETDEV_A_QUEUE_ID`, `_IFINDEX`, `_TYPE`, `_NAPI_ID`.
const QUEUE_ID: u16 = 1;
const QUEUE_IFINDEX: u16 = 2;
const QUEUE_TYPE: u16 = 3;
const QUEUE_NAPI_ID: u16 = 4;
/// `NETDEV_QUEUE_TYPE_RX`.
const QUEUE_TYPE_RX: u32 = 0;

/// `NETDEV_A_NAPI_IFINDEX`, `_ID`, `_IRQ`, `_PID`.
const NAPI_IFINDEX: u16 = 1;
const NAPI_ID: u16 = 2;
const NAPI_IRQ: u16 = 3;
const NAPI_PID: u16 = 4;

/// Errors from asking the `netdev` family.
#[derive(Debug, Error)]
pub enum NetdevError {
    /// Opening, binding or using the generic-netlink socket failed.
    #[error("generic netlink socket: {what} failed")]
    Socket {
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel answered a request with an error.
    #[error("the kernel refused the netdev {request} request (errno {errno})")]
    Refused {
        /// The request.
        request: &'static str,
        /// Its errno.
        errno: i32,
    },
    /// An answer did not parse.
    #[error("a netdev {request} answer did not parse: {detail}")]
    Decode {
        /// The request.
        request: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// One NAPI instance (`napi-get`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Napi {
    /// Its id (also the `ID` in its thread's name `napi/DEV-ID`).
    pub id: u32,
    /// Its IRQ, where the driver linked one (hardware NICs; not veth).
    pub irq: Option<u32>,
    /// Its kernel thread's pid, when NAPI is threaded.
    pub pid: Option<u32>,
}

/// One generic-netlink message of the `netdev` family: a command and flat attributes.
#[derive(Clone, Debug)]
struct NetdevMessage {
    cmd: u8,
    attrs: Vec<DefaultNla>,
}

impl GenlFamily for NetdevMessage {
    fn family_name() -> &'static str {
        "netdev"
    }

    fn command(&self) -> u8 {
        self.cmd
    }

    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for NetdevMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| {
                let nla = nla?;
                Ok(DefaultNla::new(nla.kind(), nla.value().to_vec()))
            })
            .collect::<Result<Vec<_>, DecodeError>>()?;
        Ok(Self {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// A connected generic-netlink socket.
struct GenlSocket {
    socket: Socket,
    sequence: u32,
}

impl GenlSocket {
    fn open() -> Result<Self, NetdevError> {
        let socket_error = |what| move |source| NetdevError::Socket { what, source };
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(socket_error("socket"))?;
        socket.bind_auto().map_err(socket_error("bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(socket_error("connect"))?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends `payload` with `flags` and collects every answer up to the end of the dump (or the
    /// one answer of a plain request).
    fn request<F>(
        &mut self,
        request: &'static str,
        mut payload: GenlMessage<F>,
        flags: u16,
    ) -> Result<Vec<F>, NetdevError>
    where
        F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
    {
        payload.finalize();
        let mut message = NetlinkMessage::from(payload);
        self.sequence += 1;
        message.header.flags = flags;
        message.header.sequence_number = self.sequence;
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        self.socket
            .send(&buffer, 0)
            .map_err(|source| NetdevError::Socket {
                what: "send",
                source,
            })?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut answers = Vec::new();
        loop {
            let (datagram, _) =
                self.socket
                    .recv_from_full()
                    .map_err(|source| NetdevError::Socket {
                        what: "recv",
                        source,
                    })?;
            let mut offset = 0;
            while offset < datagram.len() {
                let answer = NetlinkMessage::<GenlMessage<F>>::deserialize(&datagram[offset..])
                    .map_err(|err| NetdevError::Decode {
                        request,
                        detail: err.to_string(),
                    })?;
                let length = answer.header.length as usize;
                if answer.header.sequence_number == self.sequence {
                    match answer.payload {
                        NetlinkPayload::Done(_) => return Ok(answers),
                        NetlinkPayload::Error(err) => {
                            return match err.code {
                                None => Ok(answers),
                                Some(code) => Err(NetdevError::Refused {
                                    request,
                                    errno: -code.get(),
                                }),
                            };
                        }
                        NetlinkPayload::InnerMessage(inner) => {
                            answers.push(inner.payload);
                            if !dump {
                                return Ok(answers);
                            }
                        }
                        _ => {}
                    }
                }
                if length == 0 {
                    break;
                }
                offset += length.next_multiple_of(4);
            }
        }
    }

    /// The `netdev` family's id, `None` where the kernel has no such family (before 6.8, or
    /// built without it).
    fn netdev_family(&mut self) -> Result<Option<u16>, NetdevError> {
        let ask = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(
                NetdevMessage::family_name().to_owned(),
            )],
        });
        match self.request("family", ask, NLM_F_REQUEST) {
            Err(NetdevError::Refused { errno, .. }) if errno == libc::ENOENT => Ok(None),
            Err(err) => Err(err),
            Ok(answers) => Ok(answers
                .iter()
                .flat_map(|a| &a.nlas)
                .find_map(|nla| match nla {
                    GenlCtrlAttrs::FamilyId(id) => Some(*id),
                    _ => None,
                })),
        }
    }

    /// A `netdev` dump of `cmd`, filtered by `ifindex_attr` = `ifindex`: each answer's
    /// attributes as `(kind, u32 value)` pairs (every attribute read here is a u32).
    fn dump(
        &mut self,
        family: u16,
        request: &'static str,
        cmd: u8,
        ifindex_attr: u16,
        ifindex: u32,
    ) -> Result<Vec<BTreeMap<u16, u32>>, NetdevError> {
        let mut ask = GenlMessage::from_payload(NetdevMessage {
            cmd,
            attrs: vec![DefaultNla::new(
                ifindex_attr,
                ifindex.to_ne_bytes().to_vec(),
            )],
        });
        ask.set_resolved_family_id(family);
        let answers = self.request(request, ask, NLM_F_REQUEST | NLM_F_DUMP)?;
        answers
            .iter()
            .map(|answer| {
                answer
                    .attrs
                    .iter()
                    .filter(|nla| nla.value_len() == 4)
                    .map(|nla| {
                        let mut value = [0u8; 4];
                        nla.emit_value(&mut value);
                        parse_u32(&value).map(|v| (nla.kind(), v)).map_err(|err| {
                            NetdevError::Decode {
                                request,
                                detail: err.to_string(),
                            }
                        })
                    })
                    .collect()
            })
            .collect()
    }
}

/// A device's NAPI instances and which receive queue each serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceNapis {
    /// Every NAPI instance of the device, by id.
    pub napis: BTreeMap<u32, Napi>,
    /// Receive queue index to the NAPI id serving it, for the queues the driver linked (veth
    /// links none; most NIC drivers since 6.8 link all).
    pub rx_queues: BTreeMap<u32, u32>,
}

impl DeviceNapis {
    /// The NAPI instance serving receive queue `queue`, where the driver linked one.
    pub fn of_rx_queue(&self, queue: u32) -> Option<&Napi> {
        self.napis.get(self.rx_queues.get(&queue)?)
    }
}

/// The NAPI instances of the device with index `ifindex` in the calling thread's network
/// namespace, and the receive queues they serve. `None` where the kernel has no `netdev`
/// family or one without `napi-get` and `queue-get` (before 6.8).
pub fn device_napis(ifindex: u32) -> Result<Option<DeviceNapis>, NetdevError> {
    let mut socket = GenlSocket::open()?;
    let Some(family) = socket.netdev_family()? else {
        return Ok(None);
    };
    // A kernel whose family predates queue-get and napi-get (6.5 to 6.7) answers EOPNOTSUPP.
    let unsupported = |err: &NetdevError| matches!(err, NetdevError::Refused { errno, .. } if *errno == libc::EOPNOTSUPP);
    let napi_answers = match socket.dump(family, "napi-get", CMD_NAPI_GET, NAPI_IFINDEX, ifindex) {
        Err(err) if unsupported(&err) => return Ok(None),
        answers => answers?,
    };
    let queue_answers =
        match socket.dump(family, "queue-get", CMD_QUEUE_GET, QUEUE_IFINDEX, ifindex) {
            Err(err) if unsupported(&err) => return Ok(None),
            answers => answers?,
        };
    let napis = napi_answers
        .into_iter()
        .filter(|attrs| attrs.get(&NAPI_IFINDEX) == Some(&ifindex))
        .filter_map(|attrs| {
            let id = *attrs.get(&NAPI_ID)?;
            Some((
                id,
                Napi {
                    id,
                    irq: attrs.get(&NAPI_IRQ).copied(),
                    pid: attrs.get(&NAPI_PID).copied().filter(|&pid| pid != 0),
                },
            ))
        })
        .collect();
    let rx_queues = queue_answers
        .into_iter()
        .filter(|attrs| {
            attrs.get(&QUEUE_IFINDEX) == Some(&ifindex)
                && attrs.get(&QUEUE_TYPE) == Some(&QUEUE_TYPE_RX)
        })
        .filter_map(|attrs| Some((*attrs.get(&QUEUE_ID)?, *attrs.get(&QUEUE_NAPI_ID)?)))
        .collect();
    Ok(Some(DeviceNapis { napis, rx_queues }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_no_napi_and_an_unknown_device_none() {
        let lo = device_napis(1).expect("the netdev family answers");
        assert_eq!(lo, Some(DeviceNapis::default()));
        let none = device_napis(u32::MAX - 1).expect("a dump for no device");
        assert_eq!(none, Some(DeviceNapis::default()));
    }
}
