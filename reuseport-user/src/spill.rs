//! `--mode percpu-spill`: stay on the receiving CPU while its listener keeps up; spill to the
//! least-loaded listener while it does not.
//!
//! Strict per-CPU steering has one failure mode: when the SYNs of many connections arrive on few
//! CPUs (one bursty client, a NIC with few queues, RPS off), every connection lands on those CPUs'
//! workers and the other workers idle. A sampler thread reads each listener's accept-queue depth
//! every `period` (`getsockopt(TCP_INFO)`, whose `tcpi_unacked` is the listener's
//! `sk_ack_backlog`) and, for a CPU whose queue reaches `threshold`, writes the least-loaded CPU
//! into the program's `cpu_spill` map; the program then sends that CPU's new connections there
//! until the queue drains below half the threshold. A CPU that keeps up is never touched, so
//! balanced load stays 100 % local.
//!
//! TCP only: a UDP socket has no accept queue, so a UDP group in this mode behaves as `percpu`.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use aya::maps::{Array, MapData, MapError};
use reuseport_common::NO_SPILL;
use thiserror::Error;

use crate::cpu_topology::CpuTopology;

/// Errors from the spill sampler.
#[derive(Debug, Error)]
pub enum SpillError {
    /// Writing the `cpu_spill` map failed.
    #[error("updating the cpu_spill map failed")]
    Map(#[from] MapError),
    /// Starting the sampler thread failed.
    #[error("starting the spill sampler failed")]
    Start(#[source] io::Error),
    /// A threshold of 0 would spill every connection.
    #[error("the spill threshold must be at least 1")]
    ZeroThreshold,
}

/// When to spill and how often to look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpillConfig {
    /// Accept-queue depth at which a CPU starts spilling (it stops below half of it).
    pub threshold: u32,
    /// How often the accept queues are sampled.
    pub period: Duration,
}

impl Default for SpillConfig {
    /// Threshold 16, period 1 ms (see README "Restarts and overload" for how they were chosen).
    fn default() -> Self {
        Self {
            threshold: 16,
            period: Duration::from_millis(1),
        }
    }
}

/// What the sampler has seen, for the live line and the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpillCounters {
    /// Samples taken (one per period, all listeners at once).
    pub samples: u64,
    /// Times a CPU started spilling.
    pub spill_starts: u64,
    /// Deepest accept queue seen.
    pub max_depth: u64,
}

/// The running sampler thread; stops when dropped.
pub struct SpillSampler {
    listeners: Arc<Mutex<BTreeMap<u32, OwnedFd>>>,
    stop: Arc<AtomicBool>,
    counters: Arc<SharedCounters>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SpillSampler {
    /// Starts sampling `listeners` (`(cpu, a duplicate of its listener's fd)`) and writing
    /// `spill_map` (the program's `cpu_spill`).
    ///
    /// The duplicates keep the listeners open: a restarted worker's must be swapped with
    /// [`SpillSampler::replace_listener`] before the old listener is meant to close.
    pub fn start(
        spill_map: Array<MapData, u32>,
        listeners: Vec<(u32, OwnedFd)>,
        topology: CpuTopology,
        config: SpillConfig,
    ) -> Result<Self, SpillError> {
        if config.threshold == 0 {
            return Err(SpillError::ZeroThreshold);
        }
        let listeners = Arc::new(Mutex::new(listeners.into_iter().collect()));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(SharedCounters::default());
        let mut sampler = Sampler {
            map: spill_map,
            listeners: Arc::clone(&listeners),
            topology,
            config,
            spilling: BTreeMap::new(),
            counters: Arc::clone(&counters),
        };
        let thread_stop = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("reuseport-spill".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    sampler.sample_once();
                    thread::sleep(sampler.config.period);
                }
                sampler.clear();
            })
            .map_err(SpillError::Start)?;
        Ok(Self {
            listeners,
            stop,
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
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Sampler {
    map: Array<MapData, u32>,
    listeners: Arc<Mutex<BTreeMap<u32, OwnedFd>>>,
    topology: CpuTopology,
    config: SpillConfig,
    /// CPU → the CPU it spills to now.
    spilling: BTreeMap<u32, u32>,
    counters: Arc<SharedCounters>,
}

/// [`SpillCounters`] as the sampler thread updates them.
#[derive(Default)]
struct SharedCounters {
    samples: AtomicU64,
    spill_starts: AtomicU64,
    max_depth: AtomicU64,
}

impl Sampler {
    fn sample_once(&mut self) {
        let depths: BTreeMap<u32, u32> = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|(&cpu, fd)| Some((cpu, accept_queue_depth(fd).ok()?)))
            .collect();
        let counters = &self.counters;
        counters.samples.fetch_add(1, Ordering::Relaxed);
        let deepest = depths.values().copied().max().unwrap_or(0);
        counters
            .max_depth
            .fetch_max(u64::from(deepest), Ordering::Relaxed);

        let next = decide(
            &depths,
            &self.spilling,
            &self.topology,
            self.config.threshold,
        );
        for (&cpu, &target) in &next {
            if self.spilling.get(&cpu) != Some(&target) {
                if !self.spilling.contains_key(&cpu) {
                    counters.spill_starts.fetch_add(1, Ordering::Relaxed);
                }
                // A failed write leaves the CPU local, which is safe; the next sample retries.
                let _ = self.map.set(cpu, target + 1, 0);
            }
        }
        for cpu in self.spilling.keys() {
            if !next.contains_key(cpu) {
                let _ = self.map.set(*cpu, NO_SPILL, 0);
            }
        }
        self.spilling = next;
    }

    /// Stops every spill (the program is steering strictly again).
    fn clear(&mut self) {
        for cpu in std::mem::take(&mut self.spilling).into_keys() {
            let _ = self.map.set(cpu, NO_SPILL, 0);
        }
    }
}

/// Which CPUs spill, and where to: a CPU whose queue reached `threshold` (or that was already
/// spilling and has not drained below half of it) spills to the CPU with the shortest queue,
/// nearest by topology among equals, provided that queue is shorter than its own.
pub fn decide(
    depths: &BTreeMap<u32, u32>,
    spilling: &BTreeMap<u32, u32>,
    topology: &CpuTopology,
    threshold: u32,
) -> BTreeMap<u32, u32> {
    depths
        .iter()
        .filter(|&(cpu, &depth)| {
            depth >= threshold || (spilling.contains_key(cpu) && depth >= threshold.div_ceil(2))
        })
        .filter_map(|(&cpu, &depth)| {
            let (target, target_depth) = depths
                .iter()
                .filter(|&(&other, _)| other != cpu)
                .min_by_key(|&(&other, &d)| (d, topology.distance(cpu, other), other))?;
            (*target_depth < depth).then_some((cpu, *target))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn depths(pairs: &[(u32, u32)]) -> BTreeMap<u32, u32> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn a_cpu_spills_to_the_shortest_queue_from_the_threshold_on() {
        let flat = CpuTopology::default();
        let none = BTreeMap::new();
        assert!(decide(&depths(&[(0, 15), (1, 0)]), &none, &flat, 16).is_empty());
        assert_eq!(
            decide(&depths(&[(0, 16), (1, 9), (2, 3)]), &none, &flat, 16),
            depths(&[(0, 2)])
        );
    }

    #[test]
    fn spilling_stops_below_half_the_threshold() {
        let flat = CpuTopology::default();
        let spilling = depths(&[(0, 1)]);
        assert_eq!(
            decide(&depths(&[(0, 8), (1, 0)]), &spilling, &flat, 16),
            depths(&[(0, 1)])
        );
        assert!(decide(&depths(&[(0, 7), (1, 0)]), &spilling, &flat, 16).is_empty());
    }

    #[test]
    fn no_spill_when_every_queue_is_as_deep() {
        let flat = CpuTopology::default();
        assert!(decide(&depths(&[(0, 40), (1, 40)]), &BTreeMap::new(), &flat, 16).is_empty());
    }

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
}
