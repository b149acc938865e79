//! One `SO_REUSEPORT` socket per CPU, all bound to the same address: a reuseport group whose
//! member for CPU N is served by the worker pinned to CPU N.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
};

use socket2::{Domain, Protocol as SocketProtocol, SockAddr, Socket, Type};
use thiserror::Error;

use crate::cpus::CpuList;

/// Errors from creating listeners.
#[derive(Debug, Error)]
pub enum ListenerError {
    /// The address is held by a socket that cannot share it: one without `SO_REUSEPORT`, or one
    /// owned by another user.
    #[error(
        "{addr} is already in use by a socket without SO_REUSEPORT or owned by another user \
         (every socket sharing a port must set SO_REUSEPORT and have the same owner)"
    )]
    AddressInUse {
        /// The address that could not be bound.
        addr: SocketAddr,
    },
    /// The address already has `SO_REUSEPORT` listeners (another server, or another instance of
    /// this one); binding would join their group and take part of their connections.
    #[error(
        "{addr} is already served by other SO_REUSEPORT sockets (another server?); refusing to \
         join their group and split their connections (to steer an existing server, attach to it)"
    )]
    GroupExists {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// No CPUs were given.
    #[error("no CPUs to create listeners for")]
    NoCpus,
    /// A socket handed over (socket activation) cannot be one of this group's listeners.
    #[error("the socket passed as descriptor {fd} {reason}")]
    Unusable {
        /// Its descriptor number in this process.
        fd: i32,
        /// What is wrong with it.
        reason: String,
    },
    /// More sockets were handed over than there are CPUs to serve them.
    #[error(
        "{sockets} sockets were passed but there are workers on only {cpus} CPUs (one listener \
         per CPU): pass fewer sockets or allow more CPUs"
    )]
    TooManyPassed {
        /// Sockets handed over.
        sockets: usize,
        /// CPUs with a worker.
        cpus: usize,
    },
    /// The sockets handed over have no `SO_REUSEPORT`: they form no reuseport group, so no
    /// steering can be attached to them and no socket of ours can join them.
    #[error(
        "{sockets} socket(s) on {addr} were passed for {cpus} CPU(s) without SO_REUSEPORT: they \
         form no reuseport group to steer or to add listeners to; set ReusePort=yes in the \
         .socket unit"
    )]
    PassedWithoutReusePort {
        /// The address of the sockets.
        addr: SocketAddr,
        /// Sockets handed over.
        sockets: usize,
        /// CPUs with a worker.
        cpus: usize,
    },
    /// A listener of ours could not join the group of the sockets handed over: the kernel only
    /// lets sockets of the same owner share a port.
    #[error(
        "adding a listener to the group of the sockets passed on {addr} failed: they belong to \
         uid {owner} and this process runs as uid {uid}, and only sockets of one owner share a \
         port; run the service as uid {owner}, or pass one socket per CPU"
    )]
    CannotJoinPassed {
        /// The address of the sockets.
        addr: SocketAddr,
        /// The owner of the sockets handed over.
        owner: u32,
        /// This process's effective uid.
        uid: u32,
    },
    /// Another socket call failed.
    #[error("{call} on {addr} failed")]
    Io {
        /// The failing call (`socket`, `setsockopt(SO_REUSEPORT)`, `bind`, `listen`, ...).
        call: &'static str,
        /// The address being set up.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The transport protocol of a listener group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP: listeners, steering picks the listener whose accept queue gets the connection.
    Tcp,
    /// UDP: bound datagram sockets, steering picks the socket that receives each datagram.
    Udp,
}

/// The listener of one CPU's worker.
#[derive(Debug)]
pub struct CpuListener {
    /// The CPU whose worker serves this socket (and whose steering slot it fills).
    pub cpu: u32,
    /// The bound (and, for TCP, listening) `SO_REUSEPORT` socket.
    pub socket: Socket,
}

/// One `SO_REUSEPORT` socket per CPU, all bound to one address and so forming one reuseport group.
#[derive(Debug)]
pub struct PerCpuListeners {
    addr: SocketAddr,
    protocol: Protocol,
    listeners: Vec<CpuListener>,
}

impl PerCpuListeners {
    /// Creates one socket per CPU in `cpus`, each with `SO_REUSEPORT` set before `bind`, bound to
    /// `addr` (port 0 picks a free port for the first socket; the rest join it) and, for TCP,
    /// listening with `backlog`.
    pub fn bind(
        addr: SocketAddr,
        protocol: Protocol,
        cpus: &CpuList,
        backlog: i32,
    ) -> Result<Self, ListenerError> {
        Self::prepare(addr, protocol, cpus, backlog)?.open_each(|_| Ok(()))
    }

    /// The first half of [`PerCpuListeners::bind`]: every socket created, none reachable yet
    /// (TCP: bound, not listening; UDP: not bound), so a program can be attached to the group
    /// before its first connection ([`PendingListeners::first`]) and each CPU's slot filled the
    /// moment its socket opens ([`PendingListeners::open_each`]).
    pub fn prepare(
        addr: SocketAddr,
        protocol: Protocol,
        cpus: &CpuList,
        backlog: i32,
    ) -> Result<PendingListeners, ListenerError> {
        if cpus.is_empty() {
            return Err(ListenerError::NoCpus);
        }
        if addr.port() != 0 {
            refuse_existing_group(addr, protocol)?;
        }
        let mut addr = addr;
        let mut sockets = Vec::with_capacity(cpus.len());
        for cpu in cpus.iter() {
            let socket = new_socket(addr, protocol, true)?;
            if protocol == Protocol::Tcp {
                // A TCP socket that is bound but not listening receives nothing (a SYN to it is
                // answered with RST), so binding now only reserves the port.
                bind(&socket, addr)?;
                if addr.port() == 0 {
                    addr = local_addr(&socket, addr)?;
                }
            }
            sockets.push(CpuListener { cpu, socket });
        }
        Ok(PendingListeners {
            addr,
            protocol,
            backlog,
            sockets,
            open_already: 0,
        })
    }

    /// Like [`PerCpuListeners::prepare`], for sockets handed over by a service manager (socket
    /// activation: bound and, for TCP, listening already) instead of made here: the first
    /// `passed.len()` CPUs of `cpus` get them, in order, and each other CPU a new socket bound to
    /// their address, joining their reuseport group. They must have `SO_REUSEPORT` (a group to
    /// steer), and sockets added need the same owner. The sockets handed over are already reachable, so connections that
    /// arrive before steering is in place (or were queued before this process started) are
    /// picked by the kernel's hash.
    pub fn adopt(
        passed: Vec<Socket>,
        protocol: Protocol,
        cpus: &CpuList,
        backlog: i32,
    ) -> Result<PendingListeners, ListenerError> {
        if cpus.is_empty() {
            return Err(ListenerError::NoCpus);
        }
        if passed.len() > cpus.len() {
            return Err(ListenerError::TooManyPassed {
                sockets: passed.len(),
                cpus: cpus.len(),
            });
        }
        let mut addr = None;
        let mut reuse_port = true;
        for socket in &passed {
            let fd = socket.as_raw_fd();
            let unusable = |reason: &str| ListenerError::Unusable {
                fd,
                reason: reason.to_owned(),
            };
            let wanted = match protocol {
                Protocol::Tcp => Type::STREAM,
                Protocol::Udp => Type::DGRAM,
            };
            if socket.r#type().map_err(|e| unusable(&e.to_string()))? != wanted {
                return Err(unusable(match protocol {
                    Protocol::Tcp => "is not a TCP socket (--proto tcp)",
                    Protocol::Udp => "is not a UDP socket (--proto udp)",
                }));
            }
            if protocol == Protocol::Tcp && !socket.is_listener().unwrap_or(false) {
                return Err(unusable("is not listening"));
            }
            let here = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| unusable("is not bound to an IP address"))?;
            if here.port() == 0 {
                return Err(unusable("is not bound to a port"));
            }
            match addr {
                None => addr = Some(here),
                Some(first) if first != here => {
                    return Err(unusable(&format!(
                        "is bound to {here}, another address than the first one ({first})"
                    )));
                }
                Some(_) => {}
            }
            reuse_port &= socket.reuse_port().unwrap_or(false);
        }
        let Some(addr) = addr else {
            return Err(ListenerError::Unusable {
                fd: -1,
                reason: "list is empty".to_owned(),
            });
        };
        if !reuse_port {
            return Err(ListenerError::PassedWithoutReusePort {
                addr,
                sockets: passed.len(),
                cpus: cpus.len(),
            });
        }
        let owner = passed
            .first()
            .and_then(|socket| rustix::fs::fstat(socket).ok())
            .map_or(0, |stat| stat.st_uid);
        let passed_count = passed.len();
        let mut sockets: Vec<CpuListener> = cpus
            .iter()
            .zip(passed)
            .map(|(cpu, socket)| CpuListener { cpu, socket })
            .collect();
        for cpu in cpus.iter().skip(passed_count) {
            let socket = new_socket(addr, protocol, true)?;
            if protocol == Protocol::Tcp {
                bind(&socket, addr).map_err(|err| match err {
                    ListenerError::AddressInUse { addr } => ListenerError::CannotJoinPassed {
                        addr,
                        owner,
                        uid: rustix::process::geteuid().as_raw(),
                    },
                    other => other,
                })?;
            }
            sockets.push(CpuListener { cpu, socket });
        }
        Ok(PendingListeners {
            addr,
            protocol,
            backlog,
            sockets,
            open_already: passed_count,
        })
    }

    /// The address every socket is bound to, with the port filled in.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The protocol of the group.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The listeners, in ascending CPU order.
    pub fn iter(&self) -> impl Iterator<Item = &CpuListener> {
        self.listeners.iter()
    }

    /// `(cpu, fd)` pairs, the form [`Steering::attach`](crate::steering::Steering::attach) takes.
    pub fn fds(&self) -> Vec<(u32, BorrowedFd<'_>)> {
        self.listeners
            .iter()
            .map(|listener| (listener.cpu, listener.socket.as_fd()))
            .collect()
    }

    /// The CPUs that have a listener.
    pub fn cpus(&self) -> CpuList {
        self.listeners.iter().map(|listener| listener.cpu).collect()
    }

    /// Gives up ownership of the sockets (for handing each to its worker).
    pub fn into_inner(self) -> Vec<CpuListener> {
        self.listeners
    }
}

/// The sockets of a [`PerCpuListeners`] before any of them can receive a connection (see
/// [`PerCpuListeners::prepare`]).
#[derive(Debug)]
pub struct PendingListeners {
    addr: SocketAddr,
    protocol: Protocol,
    backlog: i32,
    sockets: Vec<CpuListener>,
    /// How many of `sockets`, from the first, were handed over already open
    /// ([`PerCpuListeners::adopt`]).
    open_already: usize,
}

impl PendingListeners {
    /// How many of the sockets were handed over ([`PerCpuListeners::adopt`]); they serve the
    /// first CPUs.
    pub fn passed(&self) -> usize {
        self.open_already
    }

    /// The first CPU's socket. It already has `SO_REUSEPORT`, so a reuseport program attached
    /// to it now (`SO_ATTACH_REUSEPORT_EBPF` on an unreachable socket makes a group of one) is
    /// the group's program from the first connection on: the others join its group as they open.
    pub fn first(&self) -> BorrowedFd<'_> {
        // `prepare` refuses an empty CPU list, so there is always a first socket.
        self.sockets[0].socket.as_fd()
    }

    /// Opens the sockets in CPU order (TCP: `listen`; UDP: `bind`) and calls `opened` with each
    /// right after it can receive, before the next one opens.
    ///
    /// On error every socket is closed again, the ones already opened included.
    pub fn open_each<E: From<ListenerError>>(
        self,
        mut opened: impl FnMut(&CpuListener) -> Result<(), E>,
    ) -> Result<PerCpuListeners, E> {
        let Self {
            mut addr,
            protocol,
            backlog,
            sockets,
            open_already,
        } = self;
        for (index, listener) in sockets.iter().enumerate() {
            match protocol {
                // Handed over bound (and listening): nothing to open.
                _ if index < open_already => {}
                Protocol::Tcp => listener
                    .socket
                    .listen(backlog)
                    // Another non-reuseport socket may have claimed the port meanwhile.
                    .map_err(in_use_or("listen", addr))?,
                Protocol::Udp => {
                    bind(&listener.socket, addr)?;
                    if addr.port() == 0 {
                        addr = local_addr(&listener.socket, addr)?;
                    }
                }
            }
            set_nonblocking(&listener.socket, addr)?;
            opened(listener)?;
        }
        Ok(PerCpuListeners {
            addr,
            protocol,
            listeners: sockets,
        })
    }
}

/// Creates one `SO_REUSEPORT` socket bound to `addr` (joining the group already there, if any).
///
/// IPv6 sockets are `IPV6_V6ONLY`, so an IPv6 group never captures IPv4 traffic.
pub fn bind_one(
    addr: SocketAddr,
    protocol: Protocol,
    backlog: i32,
) -> Result<Socket, ListenerError> {
    let socket = new_socket(addr, protocol, true)?;
    bind(&socket, addr)?;
    if protocol == Protocol::Tcp {
        // Another non-reuseport socket may have claimed the port between bind and listen.
        socket.listen(backlog).map_err(in_use_or("listen", addr))?;
    }
    set_nonblocking(&socket, addr)?;
    Ok(socket)
}

/// Maps an error of `call` on `addr` to [`ListenerError`], telling "in use" apart.
fn in_use_or(call: &'static str, addr: SocketAddr) -> impl Fn(io::Error) -> ListenerError {
    move |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            ListenerError::AddressInUse { addr }
        } else {
            ListenerError::Io { call, addr, source }
        }
    }
}

fn bind(socket: &Socket, addr: SocketAddr) -> Result<(), ListenerError> {
    socket
        .bind(&SockAddr::from(addr))
        .map_err(in_use_or("bind", addr))
}

fn set_nonblocking(socket: &Socket, addr: SocketAddr) -> Result<(), ListenerError> {
    socket
        .set_nonblocking(true)
        .map_err(|source| ListenerError::Io {
            call: "fcntl(O_NONBLOCK)",
            addr,
            source,
        })
}

/// An unbound socket for `addr`'s family and `protocol`, with `SO_REUSEPORT` if `reuse_port`.
///
/// SO_REUSEADDR is set for TCP only: it lets a restarted server bind over its old TIME_WAIT
/// connections; on UDP it would let unrelated sockets share the port. Both options must be set
/// before bind: the kernel adds a socket to a reuseport group only at bind (UDP) or listen (TCP)
/// time, and only if SO_REUSEPORT is already set.
fn new_socket(
    addr: SocketAddr,
    protocol: Protocol,
    reuse_port: bool,
) -> Result<Socket, ListenerError> {
    let io_error =
        |call: &'static str| move |source: io::Error| ListenerError::Io { call, addr, source };
    let (kind, proto) = match protocol {
        Protocol::Tcp => (Type::STREAM, SocketProtocol::TCP),
        Protocol::Udp => (Type::DGRAM, SocketProtocol::UDP),
    };
    let socket = Socket::new(Domain::for_address(addr), kind.cloexec(), Some(proto))
        .map_err(io_error("socket"))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(io_error("setsockopt(IPV6_V6ONLY)"))?;
    }
    if protocol == Protocol::Tcp {
        socket
            .set_reuse_address(true)
            .map_err(io_error("setsockopt(SO_REUSEADDR)"))?;
    }
    if reuse_port {
        socket
            .set_reuse_port(true)
            .map_err(io_error("setsockopt(SO_REUSEPORT)"))?;
    }
    Ok(socket)
}

/// Fails if `addr` is already bound. A probe socket *without* `SO_REUSEPORT` cannot bind where any
/// socket is bound (TIME_WAIT leftovers aside, see [`new_socket`]); if one *with* it can, the
/// holder is a reuseport group, otherwise a plain socket. Probes are closed again at once.
fn refuse_existing_group(addr: SocketAddr, protocol: Protocol) -> Result<(), ListenerError> {
    let bind = |reuse_port| {
        new_socket(addr, protocol, reuse_port).map(|probe| probe.bind(&SockAddr::from(addr)))
    };
    match bind(false)? {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => match bind(true)? {
            Ok(()) => Err(ListenerError::GroupExists { addr }),
            Err(_) => Err(ListenerError::AddressInUse { addr }),
        },
        Err(source) => Err(ListenerError::Io {
            call: "bind",
            addr,
            source,
        }),
    }
}

fn local_addr(socket: &Socket, requested: SocketAddr) -> Result<SocketAddr, ListenerError> {
    socket
        .local_addr()
        .and_then(|addr| {
            addr.as_socket()
                .ok_or_else(|| io::Error::other("bound address is not an IP address"))
        })
        .map_err(|source| ListenerError::Io {
            call: "getsockname",
            addr: requested,
            source,
        })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn binds_one_socket_per_cpu_on_one_port() {
        let cpus: CpuList = [0, 1, 2].into_iter().collect();
        let group = PerCpuListeners::bind("127.0.0.1:0".parse().unwrap(), Protocol::Tcp, &cpus, 16)
            .unwrap();
        assert_ne!(group.local_addr().port(), 0);
        let ports: Vec<_> = group
            .iter()
            .map(|l| l.socket.local_addr().unwrap().as_socket().unwrap().port())
            .collect();
        assert_eq!(ports, [group.local_addr().port(); 3]);
        assert_eq!(group.cpus(), cpus);
    }

    #[test]
    fn a_port_held_without_reuseport_is_reported_as_such() {
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = plain.local_addr().unwrap();
        let err =
            PerCpuListeners::bind(addr, Protocol::Tcp, &[0].into_iter().collect(), 16).unwrap_err();
        assert!(matches!(err, ListenerError::AddressInUse { .. }), "{err:?}");
    }

    #[test]
    fn an_existing_reuseport_group_is_not_joined() {
        let cpus: CpuList = [0].into_iter().collect();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let first =
                PerCpuListeners::bind("127.0.0.1:0".parse().unwrap(), protocol, &cpus, 16).unwrap();
            let err = PerCpuListeners::bind(first.local_addr(), protocol, &cpus, 16).unwrap_err();
            assert!(matches!(err, ListenerError::GroupExists { .. }), "{err:?}");
        }
    }

    #[test]
    fn a_port_left_in_time_wait_can_be_served_again() {
        let cpus: CpuList = [0].into_iter().collect();
        let group = PerCpuListeners::bind("127.0.0.1:0".parse().unwrap(), Protocol::Tcp, &cpus, 16)
            .unwrap();
        let addr = group.local_addr();
        let listener = TcpListener::from(group.into_inner().remove(0).socket);
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (server_side, _) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        };
        // The server closes first, so its side of the connection sits in TIME_WAIT on `addr`.
        drop(server_side);
        drop(listener);
        drop(client);
        PerCpuListeners::bind(addr, Protocol::Tcp, &cpus, 16).expect("rebind over TIME_WAIT");
    }

    #[test]
    fn udp_sockets_share_a_port_too() {
        let cpus: CpuList = [0, 1].into_iter().collect();
        let group =
            PerCpuListeners::bind("[::1]:0".parse().unwrap(), Protocol::Udp, &cpus, 0).unwrap();
        assert_eq!(group.iter().count(), 2);
    }
}
