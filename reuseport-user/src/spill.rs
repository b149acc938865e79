//! `--mode percpu-spill`: stay on the receiving CPU while its listener keeps up; spill to the
//! least-loaded listener while it does not.
//!
//! Strict per-CPU steering has one failure mode: when the SYNs of many connections arrive on few
//! CPUs (one bursty client, a NIC with few queues, RPS off), every connection lands on those CPUs'
//! workers and the other workers idle. A sampler thread reads each listener's accept-queue depth
//! every `period` (`getsockopt(TCP_INFO)`, whose `tcpi_unacked` is the listener's
//! `sk_ack_backlog`). For a CPU whose queue stays at or over `threshold` for a few samples (or
//! reaches a quarter of it while that CPU receives a skewed share of the SYNs, per the program's
//! own counters) while another queue is at most half as deep, it writes the least-loaded CPU into
//! the program's `cpu_spill` map; the program then sends that CPU's new connections there until
//! its queue is no deeper than the target's. A CPU that keeps up is never touched, and queues
//! that are alike never spill, so balanced load stays local.
//!
//! TCP only: a UDP socket has no accept queue, so a UDP group in this mode behaves as `percpu`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use aya::maps::{Array, MapData, MapError, PerCpuArray};
use reuseport_common::{NO_SPILL, SteeringStats};
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
    /// Accept-queue depth at which a CPU starts spilling: sustained for [`SUSTAINED_SAMPLES`]
    /// samples, or a quarter of it while the SYNs are skewed onto that CPU (see [`decide`]).
    pub threshold: u32,
    /// How often the accept queues are sampled.
    pub period: Duration,
}

impl Default for SpillConfig {
    /// Threshold 8, period 1 ms (see README "Restarts and overload" for how they were chosen).
    fn default() -> Self {
        Self {
            threshold: 8,
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
    /// Starts sampling `listeners` (`(cpu, a duplicate of its listener's fd)`) and the
    /// program's counters (`stats_map`, a handle on `steering_stats`), and writing `spill_map`
    /// (the program's `cpu_spill`).
    ///
    /// The duplicates keep the listeners open: a restarted worker's must be swapped with
    /// [`SpillSampler::replace_listener`] before the old listener is meant to close.
    pub fn start(
        spill_map: Array<MapData, u32>,
        stats_map: MapData,
        listeners: Vec<(u32, OwnedFd)>,
        topology: CpuTopology,
        config: SpillConfig,
    ) -> Result<Self, SpillError> {
        if config.threshold == 0 {
            return Err(SpillError::ZeroThreshold);
        }
        let arrivals = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(stats_map))?;
        let listeners = Arc::new(Mutex::new(listeners.into_iter().collect()));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(SharedCounters::default());
        let mut sampler = Sampler {
            map: spill_map,
            listeners: Arc::clone(&listeners),
            topology,
            config,
            spilling: BTreeMap::new(),
            streaks: BTreeMap::new(),
            arrivals,
            window_start: Vec::new(),
            skewed: BTreeSet::new(),
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
    /// CPU → consecutive samples at or over the threshold.
    streaks: BTreeMap<u32, u32>,
    /// The program's per-CPU counters, for the arrival skew.
    arrivals: PerCpuArray<MapData, SteeringStats>,
    /// Arrivals per CPU at the start of the current window.
    window_start: Vec<u64>,
    /// CPUs that received more than their share of SYNs in the last window.
    skewed: BTreeSet<u32>,
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
        let sample = self.counters.samples.fetch_add(1, Ordering::Relaxed);
        let deepest = depths.values().copied().max().unwrap_or(0);
        self.counters
            .max_depth
            .fetch_max(u64::from(deepest), Ordering::Relaxed);

        update_streaks(&depths, &mut self.streaks, self.config.threshold);
        if sample.is_multiple_of(WINDOW_SAMPLES) {
            self.update_skew(&depths);
        }
        let next = decide(
            &depths,
            &self.streaks,
            &self.skewed,
            &self.spilling,
            &self.topology,
            self.config.threshold,
        );
        for (&cpu, &target) in &next {
            if self.spilling.get(&cpu) != Some(&target) {
                if !self.spilling.contains_key(&cpu) {
                    self.counters.spill_starts.fetch_add(1, Ordering::Relaxed);
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

    /// Recomputes which CPUs received more than their share of new connections since the last
    /// window, from the program's own per-CPU counters.
    fn update_skew(&mut self, depths: &BTreeMap<u32, u32>) {
        let Ok(per_cpu) = self.arrivals.get(&0, 0) else {
            return;
        };
        let now: Vec<u64> = per_cpu.iter().map(SteeringStats::total).collect();
        let window: BTreeMap<u32, u64> = depths
            .keys()
            .map(|&cpu| {
                let i = cpu as usize;
                let before = self.window_start.get(i).copied().unwrap_or(0);
                (cpu, now.get(i).copied().unwrap_or(0).saturating_sub(before))
            })
            .collect();
        self.skewed = skewed_cpus(&window);
        self.window_start = now;
    }

    /// Stops every spill (the program is steering strictly again).
    fn clear(&mut self) {
        for cpu in std::mem::take(&mut self.spilling).into_keys() {
            let _ = self.map.set(cpu, NO_SPILL, 0);
        }
    }
}

/// Consecutive samples a queue must stay at or over the threshold before its CPU spills: a
/// burst that the worker absorbs within a few periods is no overload.
pub const SUSTAINED_SAMPLES: u32 = 3;

/// Samples per arrival window: how often the arrival skew is recomputed.
pub const WINDOW_SAMPLES: u64 = 20;

/// Fewest arrivals in a window for its skew to mean anything.
pub const WINDOW_MIN_ARRIVALS: u64 = 64;

/// The CPUs that received more than 1.5 times their even share of a window's `arrivals` (new
/// connections by receiving CPU): the SYNs are skewed onto them.
pub fn skewed_cpus(arrivals: &BTreeMap<u32, u64>) -> BTreeSet<u32> {
    let total: u64 = arrivals.values().sum();
    let cpus = arrivals.len() as u64;
    if total < WINDOW_MIN_ARRIVALS || cpus < 2 {
        return BTreeSet::new();
    }
    arrivals
        .iter()
        // share > 1.5 / cpus, in integers.
        .filter(|&(_, &n)| 2 * n * cpus > 3 * total)
        .map(|(&cpu, _)| cpu)
        .collect()
}

/// Counts, per CPU, the consecutive samples whose queue was at or over `threshold`.
pub fn update_streaks(
    depths: &BTreeMap<u32, u32>,
    streaks: &mut BTreeMap<u32, u32>,
    threshold: u32,
) {
    streaks.retain(|cpu, _| depths.contains_key(cpu));
    for (&cpu, &depth) in depths {
        let streak = streaks.entry(cpu).or_default();
        *streak = if depth >= threshold { *streak + 1 } else { 0 };
    }
}

/// Which CPUs spill, and where to. A CPU starts spilling when another queue is at most half as
/// deep as its own and either its SYNs are `skewed` onto it (see [`skewed_cpus`]) and its queue
/// holds a quarter of `threshold`, or its queue has stayed at or over `threshold` for
/// [`SUSTAINED_SAMPLES`] samples (`streaks`, see [`update_streaks`]: a worker slow for another
/// reason); it keeps spilling while its queue is deeper than the target's. The target is the CPU
/// with the shortest queue, nearest by topology among equals. Balanced load, where all queues are
/// alike, never spills.
pub fn decide(
    depths: &BTreeMap<u32, u32>,
    streaks: &BTreeMap<u32, u32>,
    skewed: &BTreeSet<u32>,
    spilling: &BTreeMap<u32, u32>,
    topology: &CpuTopology,
    threshold: u32,
) -> BTreeMap<u32, u32> {
    depths
        .iter()
        .filter_map(|(&cpu, &depth)| {
            let (&target, &target_depth) = depths
                .iter()
                .filter(|&(&other, _)| other != cpu)
                .min_by_key(|&(&other, &d)| (d, topology.distance(cpu, other), other))?;
            let sustained = streaks.get(&cpu).copied().unwrap_or(0) >= SUSTAINED_SAMPLES;
            let skewed = skewed.contains(&cpu) && depth >= (threshold / 4).max(1);
            let overloaded = sustained || skewed;
            let starts = overloaded && target_depth * 2 <= depth;
            let continues = spilling.contains_key(&cpu) && target_depth < depth;
            (starts || continues).then_some((cpu, target))
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

    /// `decide` after `samples` identical samples of `depths`, starting from no spill.
    fn after(samples: u32, pairs: &[(u32, u32)], threshold: u32) -> BTreeMap<u32, u32> {
        let (depths, flat) = (depths(pairs), CpuTopology::default());
        let (mut streaks, mut spilling) = (BTreeMap::new(), BTreeMap::new());
        for _ in 0..samples {
            update_streaks(&depths, &mut streaks, threshold);
            spilling = decide(
                &depths,
                &streaks,
                &BTreeSet::new(),
                &spilling,
                &flat,
                threshold,
            );
        }
        spilling
    }

    #[test]
    fn a_sustained_deep_queue_spills_to_the_shortest_one() {
        assert!(
            after(10, &[(0, 15), (1, 0)], 16).is_empty(),
            "under the threshold"
        );
        assert!(
            after(SUSTAINED_SAMPLES - 1, &[(0, 16), (1, 0)], 16).is_empty(),
            "not yet sustained"
        );
        assert_eq!(
            after(SUSTAINED_SAMPLES, &[(0, 16), (1, 9), (2, 3)], 16),
            depths(&[(0, 2)])
        );
    }

    #[test]
    fn alike_queues_never_spill() {
        assert!(after(10, &[(0, 40), (1, 40)], 16).is_empty());
        assert!(after(10, &[(0, 40), (1, 21)], 16).is_empty(), "21 > 40 / 2");
    }

    #[test]
    fn spilling_continues_while_the_queue_is_deeper_than_the_targets() {
        let flat = CpuTopology::default();
        let spilling = depths(&[(0, 1)]);
        let none = BTreeMap::new();
        assert_eq!(
            decide(
                &depths(&[(0, 3), (1, 2)]),
                &none,
                &BTreeSet::new(),
                &spilling,
                &flat,
                16
            ),
            spilling
        );
        assert!(
            decide(
                &depths(&[(0, 2), (1, 2)]),
                &none,
                &BTreeSet::new(),
                &spilling,
                &flat,
                16
            )
            .is_empty()
        );
    }

    #[test]
    fn a_cpu_with_skewed_syns_spills_at_a_quarter_of_the_threshold_without_waiting() {
        let flat = CpuTopology::default();
        let (pairs, none) = (depths(&[(0, 4), (1, 0)]), BTreeMap::new());
        let skewed = BTreeSet::from([0]);
        assert!(decide(&pairs, &none, &BTreeSet::new(), &none, &flat, 16).is_empty());
        assert_eq!(
            decide(&pairs, &none, &skewed, &none, &flat, 16),
            depths(&[(0, 1)])
        );
        let shallow = depths(&[(0, 3), (1, 0)]);
        assert!(decide(&shallow, &none, &skewed, &none, &flat, 16).is_empty());
    }

    #[test]
    fn skew_is_more_than_one_and_a_half_times_the_even_share() {
        let arrivals = |pairs: &[(u32, u64)]| pairs.iter().copied().collect::<BTreeMap<_, _>>();
        assert_eq!(
            skewed_cpus(&arrivals(&[(0, 1000), (1, 0)])),
            BTreeSet::from([0])
        );
        assert!(skewed_cpus(&arrivals(&[(0, 520), (1, 480)])).is_empty());
        assert!(
            skewed_cpus(&arrivals(&[(0, 750), (1, 250)])).is_empty(),
            "exactly 1.5x"
        );
        assert_eq!(
            skewed_cpus(&arrivals(&[(0, 500), (1, 100), (2, 100), (3, 100)])),
            BTreeSet::from([0])
        );
        assert!(
            skewed_cpus(&arrivals(&[(0, 10), (1, 0)])).is_empty(),
            "too few to tell"
        );
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
