//! What `/proc` says about other processes: their children, their socket file descriptors, the
//! sockets registered in their epoll instances, their listening sockets and their CPU affinity.
//! Used to find a running server's listeners (`reuseport attach`) and a peer's threads. Also the
//! kernel's TCP counters (`/proc/net/netstat`), a process's open fds and resident memory, and
//! this process's effective capabilities.

use std::{collections::BTreeSet, fs, io, net::SocketAddr};

use rustix::{process::Pid, thread::sched_getaffinity};
use thiserror::Error;

use crate::cpus::CpuList;

/// Errors from reading `/proc`.
#[derive(Debug, Error)]
pub enum ProcError {
    /// The process does not exist (or exited).
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    /// A `/proc` file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn read(path: String) -> Result<String, ProcError> {
    fs::read_to_string(&path).map_err(|source| ProcError::Read { path, source })
}

/// The PIDs whose parent is `pid` (`/proc/*/stat`, field 4).
pub fn children_of(pid: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            (parent_of(child)? == pid).then_some(child)
        })
        .collect()
}

/// The parent of `pid` (`/proc/PID/stat`, field 4), `None` if it is gone.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after its closing ')' are plain.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `pid` and all its descendants, parents first.
pub fn process_tree(pid: u32) -> Result<Vec<u32>, ProcError> {
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(ProcError::NoSuchProcess(pid));
    }
    let mut tree = vec![pid];
    let mut next = 0;
    while let Some(&parent) = tree.get(next) {
        tree.extend(children_of(parent));
        next += 1;
    }
    Ok(tree)
}

/// One process in each network namespace, this process's first: whose `/proc/PID/net/*`
/// together list every socket of the machine (`/proc/PID/ns/net` names the namespace).
pub fn one_process_per_netns() -> Vec<u32> {
    let me = std::process::id();
    let mut seen = BTreeSet::new();
    let pids = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok());
    std::iter::once(me)
        .chain(pids)
        .filter(|pid| fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|ns| seen.insert(ns)))
        .collect()
}

/// The thread ids of `pid` (`/proc/PID/task/*`).
pub fn threads(pid: u32) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The process's command name (`/proc/PID/comm`).
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|comm| comm.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

/// The CPUs `pid`'s main thread may run on.
pub fn affinity(pid: u32) -> Result<CpuList, ProcError> {
    let target = Pid::from_raw(pid as i32).ok_or(ProcError::NoSuchProcess(pid))?;
    let mask = sched_getaffinity(Some(target)).map_err(|_| ProcError::NoSuchProcess(pid))?;
    Ok(CpuList::from_affinity_mask(&mask))
}

/// `(fd, inode)` of every socket `pid` has open (`/proc/PID/fd/N -> socket:[INODE]`).
pub fn socket_fds(pid: u32) -> Result<Vec<(i32, u64)>, ProcError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).map_err(|source| ProcError::Read { path: dir, source })?;
    Ok(entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let fd: i32 = entry.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(entry.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, inode))
        })
        .collect())
}

/// Whether `pid` has the socket with inode `inode` open (false if `pid` is gone or unreadable).
pub fn holds_socket(pid: u32, inode: u64) -> bool {
    socket_fds(pid).is_ok_and(|fds| fds.iter().any(|&(_, i)| i == inode))
}

/// The inodes of every file registered in any of `pid`'s epoll instances: each epoll fd's
/// `/proc/PID/fdinfo/N` lists its targets as `tfd: 5 events: 19 data: ... ino:2b1c sdev:8`.
pub fn epoll_targets(pid: u32) -> BTreeSet<u64> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            fs::read_link(entry.path()).is_ok_and(|t| t.to_str() == Some("anon_inode:[eventpoll]"))
        })
        .filter_map(|entry| {
            fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                entry.file_name().to_str()?
            ))
            .ok()
        })
        .flat_map(|info| {
            info.lines()
                .filter(|line| line.starts_with("tfd:"))
                .filter_map(|line| {
                    let hex = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("ino:"))?;
                    u64::from_str_radix(hex, 16).ok()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A listening TCP socket (or bound UDP socket) as `/proc/PID/net/{tcp,tcp6}` lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcSocket {
    /// The local address.
    pub addr: SocketAddr,
    /// The owner's uid.
    pub uid: u32,
    /// The socket's inode.
    pub inode: u64,
}

/// Listening TCP sockets on `port` in `pid`'s network namespace.
pub fn listening_tcp(pid: u32, port: u16) -> Result<Vec<ProcSocket>, ProcError> {
    Ok(listening_tcp_all(pid)?
        .into_iter()
        .filter(|socket| socket.addr.port() == port)
        .collect())
}

/// Every listening TCP socket in `pid`'s network namespace.
///
/// The kernel lists its listening table first and every other socket (established, TIME_WAIT
/// ...) after it, so reading stops at the first line that is not `LISTEN`: a host with many
/// connections (tens of thousands of lines) costs no more than one without.
pub fn listening_tcp_all(pid: u32) -> Result<Vec<ProcSocket>, ProcError> {
    use std::io::BufRead as _;
    const TCP_LISTEN: &str = "0A";
    let mut sockets = Vec::new();
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let file = fs::File::open(&path).map_err(|source| ProcError::Read {
            path: path.clone(),
            source,
        })?;
        for line in std::io::BufReader::new(file).lines().skip(1) {
            let line = line.map_err(|source| ProcError::Read {
                path: path.clone(),
                source,
            })?;
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let mut fields = line.split_whitespace();
            let local = fields.nth(1);
            let state = fields.nth(1);
            if state != Some(TCP_LISTEN) {
                break;
            }
            let uid = fields.nth(3);
            let inode = fields.nth(1);
            let socket = (|| {
                Some(ProcSocket {
                    addr: parse_proc_addr(local?)?,
                    uid: uid?.parse().ok()?,
                    inode: inode?.parse().ok()?,
                })
            })();
            sockets.extend(socket);
        }
    }
    Ok(sockets)
}

/// Parses `/proc/net/tcp`'s `0100007F:1F90` (IPv4, host-order words) or the 32-hex-digit IPv6
/// form.
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    match bytes.len() {
        4 => Some(SocketAddr::from((<[u8; 4]>::try_from(bytes).ok()?, port))),
        16 => Some(SocketAddr::from((<[u8; 16]>::try_from(bytes).ok()?, port))),
        _ => None,
    }
}

/// The `TcpExt` counters of this network namespace (`/proc/net/netstat`, as `nstat` shows them),
/// by name; empty if the file cannot be read.
pub fn tcp_ext_counters() -> std::collections::BTreeMap<String, u64> {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    parse_group(&text, "TcpExt")
}

/// The counters of one group of a `/proc/net/netstat` or `/proc/net/snmp` text: two lines,
/// `GROUP: Name1 Name2 ...` then `GROUP: 1 2 ...`, by name.
fn parse_group(text: &str, group: &str) -> std::collections::BTreeMap<String, u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Default::default();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
        .collect()
}

/// The `Tcp` and `TcpExt` counters of the calling thread's network namespace
/// (`/proc/thread-self/net/snmp` and `netstat`), named as `nstat` names them (`TcpRetransSegs`,
/// `TcpExtListenDrops`); empty where unreadable.
pub fn tcp_counters() -> std::collections::BTreeMap<String, u64> {
    let mut counters = std::collections::BTreeMap::new();
    for (file, group) in [("snmp", "Tcp"), ("netstat", "TcpExt")] {
        let text = fs::read_to_string(format!("/proc/thread-self/net/{file}")).unwrap_or_default();
        counters.extend(
            parse_group(&text, group)
                .into_iter()
                .map(|(name, value)| (format!("{group}{name}"), value)),
        );
    }
    counters
}

/// Packets the kernel dropped from full per-CPU receive backlogs (`/proc/net/softnet_stat`,
/// second column, summed over CPUs; machine-wide, not per namespace); `None` where unreadable.
pub fn backlog_drops() -> Option<u64> {
    let text = fs::read_to_string("/proc/net/softnet_stat").ok()?;
    text.lines()
        .map(|line| {
            let dropped = line.split_whitespace().nth(1)?;
            u64::from_str_radix(dropped, 16).ok()
        })
        .sum()
}

/// How many file descriptors `pid` has open (`/proc/PID/fd`).
pub fn open_fds(pid: u32) -> Result<usize, ProcError> {
    let path = format!("/proc/{pid}/fd");
    fs::read_dir(&path)
        .map(Iterator::count)
        .map_err(|source| ProcError::Read { path, source })
}

/// `pid`'s resident memory in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Result<u64, ProcError> {
    let path = format!("/proc/{pid}/status");
    read(path.clone())?
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| ProcError::Read {
            path,
            source: io::Error::other("no VmRSS line"),
        })
}

/// This process's effective capability set (`CapEff` in `/proc/self/status`): bit `n` is
/// capability `n` of linux/capability.h.
pub fn effective_capabilities() -> io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_namespace_has_tcp_counters_and_the_machine_backlog_drops() {
        let counters = tcp_counters();
        for name in [
            "TcpRetransSegs",
            "TcpActiveOpens",
            "TcpExtListenDrops",
            "TcpExtTCPLossProbes",
        ] {
            assert!(counters.contains_key(name), "{name} in {counters:?}");
        }
        assert!(backlog_drops().is_some());
    }

    #[test]
    fn tcp_ext_counters_pair_names_with_values() {
        let text = "TcpExt: SyncookiesSent TCPMigrateReqSuccess TCPMigrateReqFailure\n\
                    TcpExt: 0 17 2\n\
                    IpExt: InNoRoutes\n\
                    IpExt: 5\n";
        let counters = parse_group(text, "TcpExt");
        assert_eq!(counters["TCPMigrateReqSuccess"], 17);
        assert_eq!(counters["TCPMigrateReqFailure"], 2);
        assert!(!counters.contains_key("InNoRoutes"));
    }

    #[test]
    fn listeners_opened_after_connections_are_all_found() {
        use std::net::{TcpListener, TcpStream};
        let first = TcpListener::bind("127.0.0.1:0").expect("bind");
        // Established connections (and their TIME_WAIT later) are listed after the listeners.
        let clients: Vec<_> = (0..50)
            .map(|_| TcpStream::connect(first.local_addr().expect("addr")).expect("connect"))
            .collect();
        let accepted: Vec<_> = (0..50).map(|_| first.accept().expect("accept")).collect();
        let second = TcpListener::bind("[::1]:0").expect("bind v6");
        let third = TcpListener::bind("127.0.0.1:0").expect("bind");
        let found = listening_tcp_all(std::process::id()).expect("read /proc");
        for listener in [&first, &second, &third] {
            let addr = listener.local_addr().expect("addr");
            assert!(
                found.iter().any(|s| s.addr == addr),
                "{addr} not among {found:?}"
            );
        }
        let port = third.local_addr().expect("addr").port();
        let on_port = listening_tcp(std::process::id(), port).expect("read /proc");
        assert_eq!(on_port.len(), 1, "{on_port:?}");
        drop((clients, accepted));
    }

    #[test]
    fn this_process_has_fds_and_memory() {
        let me = std::process::id();
        assert!(open_fds(me).unwrap() >= 3);
        assert!(rss_kib(me).unwrap() > 0);
    }

    #[test]
    fn proc_net_addresses_parse() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
    }

    #[test]
    fn this_process_and_its_listener_are_visible() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id();
        let found = listening_tcp(me, port).unwrap();
        assert_eq!(found.len(), 1);
        let fds = socket_fds(me).unwrap();
        assert!(fds.iter().any(|&(_, inode)| inode == found[0].inode));
        assert!(process_tree(me).unwrap().starts_with(&[me]));
        assert!(matches!(
            process_tree(u32::MAX),
            Err(ProcError::NoSuchProcess(_))
        ));
    }
}
