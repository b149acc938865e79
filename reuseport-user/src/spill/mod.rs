//! percpu-spill mode: stay on the receiving CPU while its worker keeps up; while it does not,
//! spread its excess connections over several listeners, nearest first.
//!
//! Strict per-CPU steering has one failure mode: when the SYNs of many connections arrive on few
//! CPUs (one bursty client, a NIC with few queues, RPS off), every connection lands on those CPUs'
//! workers and the other workers idle. A sampler thread ([`SpillSampler`]) reads, every `period`,
//! each listener's queue depth (TCP: the accept queue, `getsockopt(TCP_INFO)`'s `tcpi_unacked`;
//! UDP: the receive queue, see [`receive_queue_depth`]) and how many connections each CPU received
//! (the program's own per-CPU counters, counted where they arrive, before any spill). It hands both
//! to the [`policy`], which decides, per CPU, which share of its new connections goes to which
//! listener, and writes each changed route into the program's `cpu_spill` map. The program then
//! picks, per connection, the entry of that route its 4-tuple hash falls on, so a hot CPU's excess
//! is spread over many workers instead of herding onto one.
//!
//! The decision code is pure ([`policy::SpillPolicy`]) so that the test suite drives the very same
//! functions with a model of 2 to 256 CPUs (`tests/spill_model.rs`).

pub mod policy;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData, MapError, PerCpuArray};
use reuseport_common::{SpillRoute, SteeringStats};
use thiserror::Error;

use crate::{cpu_topology::CpuTopology, listeners::Protocol};

use self::policy::{CpuSample, PolicyConfig, SpillPolicy};

/// Errors from the spill sampler.
#[derive(Debug, Error)]
pub enum SpillError {
    /// Reading the program's counters or writing the `cpu_spill` map failed.
    #[error("opening the steering program's cpu_spill or steering_stats map failed")]
    Map(#[from] MapError),
    /// Starting the sampler thread failed.
    #[error("starting the spill sampler failed")]
    Start(#[source] io::Error),
    /// A threshold of 0 would spill every connection.
    #[error("the spill threshold must be at least 1")]
    ZeroThreshold,
    /// The sampling period is 0 (a busy loop) or longer than [`MAX_PERIOD`].
    #[error("the spill period must be more than 0 and at most 1s, not {0:?}")]
    Period(Duration),
    /// More spill targets than other CPUs.
    #[error("a CPU can spill to at most {others} other CPUs here, not {asked}")]
    TooManyTargets {
        /// The target-set size asked for.
        asked: u32,
        /// The CPUs with a listener, less the spilling one.
        others: u32,
    },
}

/// Longest sampling period: a spill that reacts later than this is no protection.
pub const MAX_PERIOD: Duration = Duration::from_secs(1);

/// When to spill and how often to look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpillConfig {
    /// Queue depth that counts as overloaded (see [`policy`]).
    pub threshold: u32,
    /// How often the queues and arrivals are sampled: more than 0, at most [`MAX_PERIOD`].
    pub period: Duration,
    /// Most CPUs one CPU spills to at a time; `None`: as many as the load needs.
    pub max_targets: Option<u32>,
}

impl Default for SpillConfig {
    /// Threshold 8, period 1 ms, no cap on targets (see README "Restarts and overload").
    fn default() -> Self {
        Self {
            threshold: 8,
            period: Duration::from_millis(1),
            max_targets: None,
        }
    }
}

impl SpillConfig {
    /// Checks the knobs for a group of `cpus` listeners.
    pub fn validate(&self, cpus: usize) -> Result<(), SpillError> {
        if self.threshold == 0 {
            return Err(SpillError::ZeroThreshold);
        }
        if self.period.is_zero() || self.period > MAX_PERIOD {
            return Err(SpillError::Period(self.period));
        }
        let others = u32::try_from(cpus.saturating_sub(1)).unwrap_or(u32::MAX);
        match self.max_targets {
            Some(asked) if asked == 0 || asked > others.max(1) => {
                Err(SpillError::TooManyTargets { asked, others })
            }
            _ => Ok(()),
        }
    }
}

/// What the sampler has seen, for the live line and the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpillCounters {
    /// Samples taken (one per period, all listeners at once).
    pub samples: u64,
    /// Times a CPU started spilling.
    pub spill_starts: u64,
    /// Deepest queue seen.
    pub max_depth: u64,
}

/// The running sampler thread; stops when dropped, at once (it never finishes a sleep first).
pub struct SpillSampler {
    listeners: Arc<Mutex<BTreeMap<u32, OwnedFd>>>,
    stop: Option<mpsc::Sender<()>>,
    counters: Arc<SharedCounters>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SpillSampler {
    /// Starts sampling `listeners` (`(cpu, a duplicate of its listener's fd)`, of `protocol`) and
    /// the program's counters (`stats_map`, a handle on `steering_stats`), and writing
    /// `spill_map` (the program's `cpu_spill`).
    ///
    /// The duplicates keep the listeners open: a restarted worker's must be swapped with
    /// [`SpillSampler::replace_listener`] before the old listener is meant to close.
    pub fn start(
        spill_map: Array<MapData, SpillRoute>,
        stats_map: MapData,
        protocol: Protocol,
        listeners: Vec<(u32, OwnedFd)>,
        topology: CpuTopology,
        config: SpillConfig,
    ) -> Result<Self, SpillError> {
        config.validate(listeners.len())?;
        let arrivals = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(stats_map))?;
        let cpus: Vec<u32> = listeners.iter().map(|&(cpu, _)| cpu).collect();
        let policy = SpillPolicy::new(
            &cpus,
            topology,
            PolicyConfig {
                threshold: config.threshold,
                max_targets: config.max_targets,
            },
        );
        let listeners = Arc::new(Mutex::new(listeners.into_iter().collect()));
        let counters = Arc::new(SharedCounters::default());
        let mut sampler = Sampler {
            map: spill_map,
            listeners: Arc::clone(&listeners),
            protocol,
            policy,
            arrivals,
            last_totals: Vec::new(),
            spilling: BTreeSet::new(),
            unwritten: BTreeSet::new(),
            counters: Arc::clone(&counters),
        };
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("reuseport-spill".into())
            .spawn(move || {
                let start = Instant::now();
                loop {
                    sampler.sample_once(start.elapsed());
                    // A message or a dropped sender both mean stop; only a timeout goes on.
                    if !matches!(
                        stopped.recv_timeout(config.period),
                        Err(mpsc::RecvTimeoutError::Timeout)
                    ) {
                        break;
                    }
                }
                sampler.clear();
            })
            .map_err(SpillError::Start)?;
        Ok(Self {
            listeners,
            stop: Some(stop),
            counters,
            thread: Some(thread),
        })
    }

    /// Samples `fd` as CPU `cpu`'s listener from now on, closing the previous duplicate.
    pub fn replace_listener(&self, cpu: u32, fd: OwnedFd) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cpu, fd);
    }

    /// The CPUs spilling now (whose route in `cpu_spill` is active), in ascending order.
    pub fn spilling_cpus(&self) -> Vec<u32> {
        self.counters
            .spilling
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What the sampler has seen so far.
    pub fn counters(&self) -> SpillCounters {
        SpillCounters {
            samples: self.counters.samples.load(Ordering::Relaxed),
            spill_starts: self.counters.spill_starts.load(Ordering::Relaxed),
            max_depth: self.counters.max_depth.load(Ordering::Relaxed),
        }
    }
}

impl Drop for SpillSampler {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Sampler {
    map: Array<MapData, SpillRoute>,
    listeners: Arc<Mutex<BTreeMap<u32, OwnedFd>>>,
    protocol: Protocol,
    policy: SpillPolicy,
    /// The program's per-CPU counters: where connections arrive.
    arrivals: PerCpuArray<MapData, SteeringStats>,
    /// Connections each CPU had received at the previous sample.
    last_totals: Vec<u64>,
    /// CPUs whose route in the map is active now.
    spilling: BTreeSet<u32>,
    /// CPUs whose last route could not be written into the map.
    unwritten: BTreeSet<u32>,
    counters: Arc<SharedCounters>,
}

/// [`SpillCounters`] as the sampler thread updates them.
#[derive(Default)]
struct SharedCounters {
    samples: AtomicU64,
    spill_starts: AtomicU64,
    max_depth: AtomicU64,
    /// The CPUs whose route is active in the map now, as last written by the sampler.
    spilling: Mutex<Vec<u32>>,
}

impl Sampler {
    fn sample_once(&mut self, now: Duration) {
        let depths: BTreeMap<u32, u32> = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|(&cpu, fd)| {
                let depth = match self.protocol {
                    Protocol::Tcp => accept_queue_depth(fd),
                    Protocol::Udp => receive_queue_depth(fd),
                };
                Some((cpu, depth.ok()?))
            })
            .collect();
        let totals: Vec<u64> = match self.arrivals.get(&0, 0) {
            Ok(per_cpu) => per_cpu.iter().map(SteeringStats::total).collect(),
            Err(_) => self.last_totals.clone(),
        };
        let samples: Vec<CpuSample> = depths
            .iter()
            .map(|(&cpu, &depth)| {
                let i = cpu as usize;
                let now = totals.get(i).copied().unwrap_or(0);
                let before = self.last_totals.get(i).copied().unwrap_or(now);
                CpuSample {
                    cpu,
                    depth,
                    arrivals: now.saturating_sub(before),
                }
            })
            .collect();
        self.last_totals = totals;

        self.counters.samples.fetch_add(1, Ordering::Relaxed);
        let deepest = depths.values().copied().max().unwrap_or(0);
        self.counters
            .max_depth
            .fetch_max(u64::from(deepest), Ordering::Relaxed);

        let changed = self.policy.update(now, &samples);
        // A failed write leaves the CPU's previous route in the map, which names only CPUs with
        // a listener (or itself); it is tried again at every sample until it goes through.
        let retries: Vec<(u32, SpillRoute)> = std::mem::take(&mut self.unwritten)
            .into_iter()
            .filter(|cpu| !changed.iter().any(|(changed, _)| changed == cpu))
            .map(|cpu| (cpu, self.policy.route(cpu)))
            .collect();
        for (cpu, route) in changed.into_iter().chain(retries) {
            if self.map.set(cpu, route, 0).is_err() {
                self.unwritten.insert(cpu);
                continue;
            }
            if route.active != 0 {
                self.spilling.insert(cpu);
            } else {
                self.spilling.remove(&cpu);
            }
        }
        self.counters
            .spill_starts
            .store(self.policy.spill_starts(), Ordering::Relaxed);
        self.publish_spilling();
    }

    /// Makes the CPUs spilling now visible to [`SpillSampler::spilling_cpus`].
    fn publish_spilling(&self) {
        let mut shared = self
            .counters
            .spilling
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !shared.iter().copied().eq(self.spilling.iter().copied()) {
            *shared = self.spilling.iter().copied().collect();
        }
    }

    /// Stops every spill (the program is steering strictly again).
    fn clear(&mut self) {
        for cpu in std::mem::take(&mut self.spilling) {
            let Ok(local) = u16::try_from(cpu) else {
                continue;
            };
            let _ = self.map.set(cpu, SpillRoute::local(local), 0);
        }
        self.publish_spilling();
    }
}

/// The number of connections waiting in a TCP listener's accept queue.
///
/// For a listening socket `TCP_INFO` reports the accept backlog in `tcpi_unacked` (and its
/// limit in `tcpi_sacked`); see `tcp_get_info` in the kernel.
pub fn accept_queue_depth(listener: &impl AsRawFd) -> io::Result<u32> {
    // SAFETY: tcp_info is plain data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of `len` bytes for the duration of the call.
    let result = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_unacked)
}

/// The number of datagrams waiting in a UDP socket's receive queue, estimated from the bytes
/// it holds (`SO_MEMINFO`'s `rmem_alloc`, which counts each queued datagram's whole buffer) at
/// [`UDP_BYTES_PER_DATAGRAM`] per datagram. The kernel keeps no datagram count for a socket.
pub fn receive_queue_depth(socket: &impl AsRawFd) -> io::Result<u32> {
    /// `SK_MEMINFO_VARS` in linux/sock_diag.h (9 since Linux 4.x); `rmem_alloc` comes first.
    const SK_MEMINFO_VARS: usize = 9;
    let mut meminfo = [0u32; SK_MEMINFO_VARS];
    let mut len = size_of_val(&meminfo) as libc::socklen_t;
    // SAFETY: `meminfo` and `len` are valid for writes of `len` bytes for the duration of the
    // call; the kernel writes at most `len` bytes.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            meminfo.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(meminfo[0].div_ceil(UDP_BYTES_PER_DATAGRAM))
}

/// Buffer bytes one small queued datagram takes (its payload plus the kernel's `sk_buff`,
/// about 768 to 1280 bytes on x86-64): the divisor of [`receive_queue_depth`].
pub const UDP_BYTES_PER_DATAGRAM: u32 = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_queue_depth_counts_unaccepted_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(accept_queue_depth(&listener).unwrap(), 0);
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(accept_queue_depth(&listener).unwrap(), 3);
        drop(clients);
    }

    #[test]
    fn receive_queue_depth_grows_with_queued_datagrams() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        assert_eq!(receive_queue_depth(&socket).unwrap(), 0);
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..8 {
            sender.send_to(b"ping", addr).unwrap();
        }
        let depth = receive_queue_depth(&socket).unwrap();
        assert!((4..=16).contains(&depth), "8 datagrams read as {depth}");
    }

    #[test]
    fn knobs_out_of_range_are_refused() {
        let ok = SpillConfig::default();
        assert!(ok.validate(16).is_ok());
        let zero = SpillConfig { threshold: 0, ..ok };
        assert!(matches!(zero.validate(16), Err(SpillError::ZeroThreshold)));
        for period in [Duration::ZERO, Duration::from_millis(1001)] {
            let bad = SpillConfig { period, ..ok };
            assert!(matches!(bad.validate(16), Err(SpillError::Period(_))));
        }
        let many = SpillConfig {
            max_targets: Some(16),
            ..ok
        };
        assert!(matches!(
            many.validate(16),
            Err(SpillError::TooManyTargets {
                asked: 16,
                others: 15
            })
        ));
        assert!(
            SpillConfig {
                max_targets: Some(15),
                ..ok
            }
            .validate(16)
            .is_ok()
        );
    }
}
