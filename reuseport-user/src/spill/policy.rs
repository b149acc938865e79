//! The spill decision: which share of each CPU's new connections goes to which listener.
//!
//! Pure code: no threads, no syscalls, no clock (the caller passes the time), so the sampler
//! thread and the model in `tests/spill_model.rs` run the very same functions. Once per sample
//! period the caller hands [`SpillPolicy::update`] every listener's queue depth and the
//! connections each CPU *received* since the previous sample (counted by the program on the
//! receiving CPU, before any spill, so that spilling does not change the signal it acts on); it
//! answers with the [`SpillRoute`]s that changed, which the caller writes into the program's map.
//!
//! **Rates.** Each CPU's arrival rate is its count over the last [`RATE_WINDOW`] samples; a CPU
//! whose last 2, 8 or 32 samples differ from the rest of its window far beyond noise (a hot spot
//! appears, moves or ends) restarts its window, so a new hot spot is seen within a sample.
//!
//! **Skew.** A CPU turns *hot* when it receives more than [`HOT_ENTER`] times the mean (over the
//! same samples) and its queue reached a quarter of the threshold in the last [`RECENT`], or more
//! than [`HOT_ENTER_SUSTAINED`] times the mean while its queue stays at the threshold, and only if
//! its excess is clear of noise; it stays hot until it receives less than [`HOT_EXIT`] times the
//! mean (while nothing arrives anywhere, it stays hot and keeps its table for the skew to resume
//! into, until the last [`RATE_WINDOW`] samples hold too few arrivals to judge skew). Hot CPUs
//! are water-filled: each keeps the mean (what every worker gets under hash selection; nothing
//! while it drains a backlog of [`DRAIN_THRESHOLDS`]) and spills the rest to the CPUs that
//! receive less than the mean, each taking at most its spare (the mean less its own arrivals),
//! nearest tier first (SMT sibling, shared LLC, NUMA node, package, any; CPUs whose queue stayed
//! deep for [`DEEP_TARGET_SAMPLES`] last), in proportion to spare within a tier.
//! What finds no spare is shared evenly by the hot CPU and its targets. The shares become a
//! table of [`SPILL_SLOTS`] entries, each within one entry of exact.
//!
//! **Slow worker.** Arrivals even, but one queue stays at the threshold for [`SLOW_SAMPLES`]
//! samples and reaches [`SLOW_THRESHOLDS`] of it while most other queues are under one: that CPU
//! spills a fraction of its arrivals, evenly over the shallowest queues, nearest first. The
//! fraction is set from how fast the queue grew, raised every [`SLOW_WINDOW`] while it still
//! grows, and probed down once the queue has stayed shallow for [`SLOW_PROBE_AFTER`]; the CPU is
//! local again when it reaches 0.
//!
//! **Hysteresis.** The plan is recomputed every [`PLAN_INTERVAL`] (and at once when a CPU turns
//! hot or cools), but a table is rewritten only when a CPU's load would move by 5 % of the mean
//! beyond rounding and noise (at most every [`REWRITE_INTERVAL`]), when a target spills itself or
//! the set of hot CPUs changed, or, for smaller moves, every [`REFRESH_INTERVAL`]. Balanced load
//! never spills. When every CPU is overloaded, the hot ones still keep the mean and the others
//! take up to it: every worker gets what hash selection would give it, never more.

use std::time::Duration;

use reuseport_common::{SPILL_SLOTS, SpillRoute};

use crate::cpu_topology::{CpuDistance, CpuTopology};

/// One CPU's observation in one sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSample {
    /// The CPU (one of those given to [`SpillPolicy::new`]; others are ignored).
    pub cpu: u32,
    /// Depth of its listener's queue now (accept queue for TCP).
    pub depth: u32,
    /// Connections *received* on this CPU since the previous sample, counted by the program where
    /// they arrive, before any spill (a delta, not a running total).
    pub arrivals: u64,
}

/// The policy's knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Queue depth that means overloaded. A quarter of it, reached recently, confirms a skewed
    /// CPU; staying at it (and reaching [`SLOW_THRESHOLDS`] of it) marks a slow worker; a hot
    /// CPU whose queue reaches [`DRAIN_THRESHOLDS`] of it drains that backlog first. At least 1.
    pub threshold: u32,
    /// Most CPUs one CPU spills to at a time; `None`: as many as the load needs.
    pub max_targets: Option<u32>,
}

impl Default for PolicyConfig {
    /// Threshold 8, no cap on targets.
    fn default() -> Self {
        Self {
            threshold: 8,
            max_targets: None,
        }
    }
}

/// Samples over which arrival rates are estimated (256 ms at the default 1 ms period), unless a
/// jump restarts the window.
pub const RATE_WINDOW: usize = 256;
/// A CPU receiving more than this many times the mean, with a recently busy queue, turns hot.
pub const HOT_ENTER: f64 = 1.5;
/// A CPU receiving more than this many times the mean while its queue stays at the threshold for
/// [`SUSTAINED_SAMPLES`] samples turns hot too.
pub const HOT_ENTER_SUSTAINED: f64 = 1.3;
/// A hot CPU receiving less than this many times the mean is local again.
pub const HOT_EXIT: f64 = 1.2;
/// Samples a queue must stay at the threshold to count as sustained.
pub const SUSTAINED_SAMPLES: u32 = 3;
/// Samples a queue must stay at the threshold before its CPU takes spill only after all others
/// (a queue at high load wanders over the threshold for a few samples now and then).
pub const DEEP_TARGET_SAMPLES: u32 = 16;
/// Thresholds a queue must reach, besides staying at one for [`SLOW_SAMPLES`], for a slow
/// worker: at high load a healthy queue wanders over one threshold now and then, hardly ever
/// over eight.
pub const SLOW_THRESHOLDS: u32 = 8;
/// Samples a queue must stay at the threshold, with most others shallow, for a slow worker.
pub const SLOW_SAMPLES: u32 = 32;
/// A hot CPU whose queue reaches this many thresholds (the connections that arrived before it
/// spilled) keeps none of its new ones until the queue is back to one threshold (not under a
/// cap on targets, where it may have to keep more than the mean anyway).
pub const DRAIN_THRESHOLDS: u32 = 8;
/// How recently a queue must have reached a quarter of the threshold to confirm a skewed CPU.
pub const RECENT: Duration = Duration::from_millis(100);
/// How often the hot CPUs' shares are recomputed (at once when the set of hot CPUs changes).
pub const PLAN_INTERVAL: Duration = Duration::from_millis(8);
/// A table whose rewrite would move some CPU's load by 5 % of the mean (beyond a slot of rounding
/// and the noise of the estimates) is rewritten at most this often.
pub const REWRITE_INTERVAL: Duration = Duration::from_millis(16);
/// A table whose shares moved by less is rewritten at most this often.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(500);
/// How often a slow worker's spilled fraction is corrected.
pub const SLOW_WINDOW: Duration = Duration::from_millis(32);
/// How long a slow worker's queue must stay shallow before its spilled fraction is probed down.
pub const SLOW_PROBE_AFTER: Duration = Duration::from_secs(1);

/// Standard deviations of a CPU's arrival-rate estimate that a load move must exceed (beyond
/// [`MATERIAL_LOAD`]) to be material.
const NOISE_SIGMAS: f64 = 4.0;
/// Fewest arrivals a [`RATE_WINDOW`] must hold, summed over all CPUs, for any skew to count.
const MIN_WINDOW_ARRIVALS: f64 = 64.0;
/// Standard deviations a CPU's arrivals must exceed the mean by to turn hot.
const SIGNIFICANCE: f64 = 4.0;
/// Largest fraction of a slow worker's arrivals it spills.
const SLOW_MAX_SPILL: f64 = 7.0 / 8.0;
/// Smallest change of a slow worker's spilled fraction worth a rewrite (and first probe step).
const SLOW_STEP: f64 = 1.0 / 16.0;
/// A slow worker whose spilled fraction falls under this is local again.
const SLOW_MIN_SPILL: f64 = 1.0 / 32.0;
/// Samples in which a slow worker's queue should return to half the threshold.
const SLOW_DRAIN_SAMPLES: f64 = 64.0;
/// A slow worker spreads its spill so that no target gets more than this share of the mean.
const SLOW_TARGET_SHARE: f64 = 1.0 / 32.0;
/// How far the first slow-mode target moves along the CPUs at each rewrite (a prime).
const ROTATION_STRIDE: usize = 7919;
/// A change of one CPU's load (summed over all tables, exact shares against the written ones) by
/// this share of the mean, beyond a slot of rounding, is worth a rewrite within
/// [`REWRITE_INTERVAL`].
const MATERIAL_LOAD: f64 = 0.05;
/// Rounds of the water-filling per tier (more only when hot CPUs compete for one receiver).
const FILL_ROUNDS: usize = 4;
/// Loads (connections per sample) below this are nothing.
const EPSILON: f64 = 1e-9;

/// Tiers in the order spare capacity is taken.
const TIERS: [CpuDistance; 5] = [
    CpuDistance::Core,
    CpuDistance::Cache,
    CpuDistance::Node,
    CpuDistance::Package,
    CpuDistance::Remote,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Keeps its connections (it may still take others' spill).
    Local,
    /// Receives a skewed share: water-filled.
    Hot,
    /// Its worker does not keep up with an even share: spills a controlled fraction.
    Slow,
}

/// What the policy keeps per CPU.
struct Cpu {
    cpu: u32,
    id: u16,
    /// Interned core, LLC, node and package, as [`CpuTopology`] compares them.
    place: [Option<u32>; 4],
    depth: u32,
    /// Consecutive samples at or over the threshold.
    deep_streak: u32,
    /// Depth and time when that streak began.
    streak_depth: u32,
    streak_start: Duration,
    /// Other CPUs whose active table names this one.
    targeted_by: u32,
    /// When it last stopped being a target of one of them.
    targeted_at: Option<Duration>,
    /// When the queue last reached a quarter of the threshold.
    busy_at: Option<Duration>,
    mode: Mode,
    /// Hot, with a queue that reached [`DRAIN_THRESHOLDS`] thresholds and has not fallen back to
    /// one: it spills everything it can until its worker caught up.
    draining: bool,
    /// Slow mode: fraction of its arrivals it spills.
    slow_spill: f64,
    /// Slow mode: the next downward probe.
    slow_probe: f64,
    /// Slow mode: when the fraction last changed.
    slow_changed_at: Duration,
    /// Depth at the start of the current [`SLOW_WINDOW`], and the window's depth sum, samples
    /// and deepest.
    window_depth: u32,
    window_sum: u64,
    window_samples: u32,
    window_max: u32,
    route: SpillRoute,
    /// Bumped to round a table's shares up elsewhere, or pick other slow-mode targets.
    rotation: u32,
    written_at: Option<Duration>,
    /// [`SpillPolicy::hot_epoch`] at the last write.
    written_epoch: u64,
}

impl Cpu {
    /// Whether its queue stayed at the threshold long enough to take spill last.
    fn deep(&self) -> bool {
        self.deep_streak >= DEEP_TARGET_SAMPLES
    }
}

/// Per-CPU arrival counts over the last [`RATE_WINDOW`] samples, restarted on a jump.
struct Rates {
    /// `RATE_WINDOW` counts per CPU, written at `pos` (the same for every CPU).
    ring: Vec<u64>,
    pos: usize,
    /// Samples in each CPU's window (fewer than `RATE_WINDOW` after a restart).
    len: Vec<u32>,
    /// Arrivals in each CPU's window.
    sum: Vec<u64>,
    /// Arrivals on all CPUs together since the start, after each of the last `RATE_WINDOW + 1`
    /// samples (index: sample number modulo `RATE_WINDOW + 1`), so that each CPU's rate is
    /// compared with the mean over the same samples.
    cumulative: Vec<u64>,
    /// Samples so far.
    samples: u64,
}

impl Rates {
    fn new(cpus: usize) -> Self {
        Self {
            ring: vec![0; cpus * RATE_WINDOW],
            pos: 0,
            len: vec![0; cpus],
            sum: vec![0; cpus],
            cumulative: vec![0; RATE_WINDOW + 1],
            samples: 0,
        }
    }

    /// Adds one sample. A CPU whose last 2 (or 8) samples differ from the rest of its window by
    /// more than a factor of 2 and far beyond noise (a hot spot appears, moves or ends) restarts
    /// its window at the newest 1 (or 4) samples.
    fn push(&mut self, arrivals: &[u64]) {
        for (i, &x) in arrivals.iter().enumerate() {
            let base = i * RATE_WINDOW;
            if self.len[i] as usize == RATE_WINDOW {
                self.sum[i] -= self.ring[base + self.pos];
            } else {
                self.len[i] += 1;
            }
            self.ring[base + self.pos] = x;
            self.sum[i] += x;
            for (recent, keep, factor) in [(2, 1, 2.0), (8, 4, 2.0), (32, 16, 1.5)] {
                let len = self.len[i] as usize;
                if len < recent + 4 {
                    continue;
                }
                let last = |k: usize| -> u64 {
                    (0..k)
                        .map(|back| self.ring[base + (self.pos + RATE_WINDOW - back) % RATE_WINDOW])
                        .sum()
                };
                let now = last(recent) as f64;
                let before = (self.sum[i] as f64 - now) / (len - recent) as f64 * recent as f64;
                let jump = now > factor * before || factor * now < before;
                if jump && (now - before).abs() > 5.0 * now.max(before).sqrt() + 2.0 {
                    self.sum[i] = last(keep);
                    self.len[i] = keep as u32;
                    break;
                }
            }
        }
        self.pos = (self.pos + 1) % RATE_WINDOW;
        let total: u64 = arrivals.iter().sum();
        let last = self.cumulative[(self.samples % (RATE_WINDOW as u64 + 1)) as usize];
        self.samples += 1;
        self.cumulative[(self.samples % (RATE_WINDOW as u64 + 1)) as usize] = last + total;
    }

    /// Arrivals per sample and CPU, over all CPUs, in the last `len` samples (at most
    /// `RATE_WINDOW`).
    fn mean_over(&self, len: u32) -> f64 {
        let cpus = self.len.len();
        let len = u64::from(len).min(self.samples).min(RATE_WINDOW as u64);
        if len == 0 || cpus == 0 {
            return 0.0;
        }
        let slot = |k: u64| self.cumulative[(k % (RATE_WINDOW as u64 + 1)) as usize];
        (slot(self.samples) - slot(self.samples - len)) as f64 / (len as f64 * cpus as f64)
    }

    /// Arrivals per sample.
    fn rate(&self, i: usize) -> f64 {
        if self.len[i] == 0 {
            0.0
        } else {
            self.sum[i] as f64 / f64::from(self.len[i])
        }
    }
}

/// Decides, sample by sample, which CPUs spill and where (see the [module](self) docs).
pub struct SpillPolicy {
    config: PolicyConfig,
    cpus: Vec<Cpu>,
    /// CPU number → index in `cpus`.
    index: Vec<Option<usize>>,
    rates: Rates,
    /// Counts changes of the set of hot CPUs.
    hot_epoch: u64,
    last_plan: Option<Duration>,
    last_slow_tick: Option<Duration>,
    starts: u64,
}

impl SpillPolicy {
    /// A policy for the listeners of `cpus` (duplicates and CPUs over `u16::MAX`, which a route
    /// cannot name, are dropped), placed by `topology`.
    #[must_use]
    pub fn new(cpus: &[u32], topology: CpuTopology, config: PolicyConfig) -> Self {
        let mut numbers: Vec<(u32, u16)> = cpus
            .iter()
            .filter_map(|&cpu| Some((cpu, u16::try_from(cpu).ok()?)))
            .collect();
        numbers.sort_unstable();
        numbers.dedup();
        let mut names: Vec<Vec<String>> = vec![Vec::new(); 4];
        let mut intern = |level: usize, name: Option<String>| {
            let name = name?;
            let known = &mut names[level];
            let id = known.iter().position(|n| *n == name).unwrap_or_else(|| {
                known.push(name);
                known.len() - 1
            });
            u32::try_from(id).ok()
        };
        let mut index = vec![None; numbers.last().map_or(0, |&(cpu, _)| cpu as usize + 1)];
        let cpus: Vec<Cpu> = numbers
            .iter()
            .enumerate()
            .map(|(i, &(cpu, id))| {
                index[cpu as usize] = Some(i);
                let place = topology.place(cpu);
                Cpu {
                    cpu,
                    id,
                    place: [
                        intern(0, place.core),
                        intern(1, place.llc),
                        place.node,
                        intern(3, place.package),
                    ],
                    depth: 0,
                    deep_streak: 0,
                    streak_depth: 0,
                    streak_start: Duration::ZERO,
                    targeted_by: 0,
                    targeted_at: None,
                    busy_at: None,
                    mode: Mode::Local,
                    draining: false,
                    slow_spill: 0.0,
                    slow_probe: SLOW_STEP,
                    slow_changed_at: Duration::ZERO,
                    window_depth: 0,
                    window_sum: 0,
                    window_samples: 0,
                    window_max: 0,
                    route: SpillRoute::local(id),
                    rotation: 0,
                    written_at: None,
                    written_epoch: 0,
                }
            })
            .collect();
        Self {
            config,
            rates: Rates::new(cpus.len()),
            cpus,
            index,
            hot_epoch: 0,
            last_plan: None,
            last_slow_tick: None,
            starts: 0,
        }
    }

    /// Feeds one sample taken at `now` (monotonic, from any origin; one call per sample period)
    /// and returns the routes that changed, as `(cpu, new route)`: a route with `active == 0`
    /// means the CPU is local again. A CPU missing from `samples` counts as having received
    /// nothing, at its previous depth.
    #[must_use]
    pub fn update(&mut self, now: Duration, samples: &[CpuSample]) -> Vec<(u32, SpillRoute)> {
        let n = self.cpus.len();
        let mut changes = Vec::new();
        let mut arrivals = vec![0u64; n];
        for sample in samples {
            if let Some(i) = self.lookup(sample.cpu) {
                arrivals[i] = arrivals[i].saturating_add(sample.arrivals);
                self.cpus[i].depth = sample.depth;
            }
        }
        self.rates.push(&arrivals);
        let threshold = self.config.threshold.max(1);
        let busy = (threshold / 4).max(1);
        for cpu in &mut self.cpus {
            if cpu.depth >= threshold {
                if cpu.deep_streak == 0 {
                    cpu.streak_depth = cpu.depth;
                    cpu.streak_start = now;
                }
                cpu.deep_streak = cpu.deep_streak.saturating_add(1);
            } else {
                cpu.deep_streak = 0;
            }
            if cpu.depth >= busy {
                cpu.busy_at = Some(now);
            }
            cpu.window_sum += u64::from(cpu.depth);
            cpu.window_samples += 1;
            cpu.window_max = cpu.window_max.max(cpu.depth);
        }
        if n < 2 {
            return changes;
        }
        // Each CPU's arrival rate, and the mean over the same samples: whether a CPU is hot is
        // judged against the latter (a CPU whose window restarted is compared with the mean
        // since then, not with estimates of other CPUs that still hold the old pattern).
        let rates: Vec<f64> = (0..n).map(|i| self.rates.rate(i)).collect();
        let means: Vec<f64> = (0..n)
            .map(|i| self.rates.mean_over(self.rates.len[i]))
            .collect();
        let evidence = self.rates.mean_over(RATE_WINDOW as u32) * (n * RATE_WINDOW) as f64
            >= MIN_WINDOW_ARRIVALS;
        // The mean of the current estimates: what each worker should get now.
        let mean = rates.iter().sum::<f64>() / n as f64;

        // Skew: which CPUs are hot, and which of those drain a backlog.
        let mut hot_changed = false;
        let drain_on = threshold.saturating_mul(DRAIN_THRESHOLDS);
        for i in 0..n {
            let hot = evidence && self.is_hot(i, now, rates[i], means[i]);
            let cpu = &mut self.cpus[i];
            // Under a cap on targets a hot CPU may have to keep more than the mean, so a deep
            // queue does not mean it could drain: no draining then.
            let draining = hot
                && self.config.max_targets.is_none()
                && if cpu.draining {
                    cpu.depth > threshold
                } else {
                    cpu.depth >= drain_on
                };
            if draining != cpu.draining {
                cpu.draining = draining;
                hot_changed = true;
            }
            if hot == (cpu.mode == Mode::Hot) {
                continue;
            }
            hot_changed = true;
            if hot {
                cpu.mode = Mode::Hot;
            } else {
                cpu.mode = Mode::Local;
                self.write(i, now, SpillRoute::local(self.cpus[i].id), &mut changes);
            }
        }
        if hot_changed {
            self.hot_epoch += 1;
        }

        // Slow workers.
        self.start_slow(now, &rates, mean, &mut changes);
        let tick = self
            .last_slow_tick
            .is_none_or(|last| now.saturating_sub(last) >= SLOW_WINDOW);
        if tick {
            if self.last_slow_tick.is_some() {
                self.correct_slow(now, &rates, mean, &mut changes);
            }
            self.last_slow_tick = Some(now);
            for cpu in &mut self.cpus {
                cpu.window_depth = cpu.depth;
                cpu.window_sum = 0;
                cpu.window_samples = 0;
                cpu.window_max = 0;
            }
        }

        // Water-filling of the hot CPUs.
        let due = self
            .last_plan
            .is_none_or(|last| now.saturating_sub(last) >= PLAN_INTERVAL);
        if hot_changed || due {
            self.last_plan = Some(now);
            self.plan(now, &rates, mean, &mut changes);
        }
        changes
    }

    /// The current route of `cpu` (a local one for a CPU the policy does not know).
    #[must_use]
    pub fn route(&self, cpu: u32) -> SpillRoute {
        match self.lookup(cpu) {
            Some(i) => self.cpus[i].route,
            None => SpillRoute::local(u16::try_from(cpu).unwrap_or(u16::MAX)),
        }
    }

    /// Times a CPU went from local to spilling.
    #[must_use]
    pub fn spill_starts(&self) -> u64 {
        self.starts
    }

    fn lookup(&self, cpu: u32) -> Option<usize> {
        self.index.get(cpu as usize).copied().flatten()
    }

    /// How far apart the CPUs at indices `a` and `b` are, as [`CpuTopology::distance`] says.
    fn distance(&self, a: usize, b: usize) -> CpuDistance {
        if a == b {
            return CpuDistance::Same;
        }
        let (a, b) = (&self.cpus[a].place, &self.cpus[b].place);
        let shared = |level: usize| a[level].is_some() && a[level] == b[level];
        if shared(0) {
            CpuDistance::Core
        } else if shared(1) {
            CpuDistance::Cache
        } else if shared(2) {
            CpuDistance::Node
        } else if shared(3) {
            CpuDistance::Package
        } else {
            CpuDistance::Remote
        }
    }

    /// Whether CPU `i`, receiving `rate` per sample against a `mean`, is hot from now on.
    fn is_hot(&self, i: usize, now: Duration, rate: f64, mean: f64) -> bool {
        let cpu = &self.cpus[i];
        if cpu.mode == Mode::Hot {
            return rate >= HOT_EXIT * mean;
        }
        let samples = f64::from(self.rates.len[i]);
        let expected = mean * samples;
        let clear = self.rates.sum[i] as f64 - expected >= SIGNIFICANCE * expected.max(1.0).sqrt();
        let recently_busy = cpu
            .busy_at
            .is_some_and(|at| now.saturating_sub(at) <= RECENT);
        clear
            && (rate > HOT_ENTER * mean && recently_busy
                || rate > HOT_ENTER_SUSTAINED * mean && cpu.deep_streak >= SUSTAINED_SAMPLES)
    }

    /// Puts into slow mode the local CPUs that took no other CPU's spill while their queue stayed
    /// at the threshold for [`SLOW_SAMPLES`] samples, grew by a threshold meanwhile and reached
    /// [`SLOW_THRESHOLDS`] of them, while most other queues are under the threshold: a worker
    /// that does not keep up with its own arrivals.
    fn start_slow(
        &mut self,
        now: Duration,
        rates: &[f64],
        mean: f64,
        changes: &mut Vec<(u32, SpillRoute)>,
    ) {
        let n = self.cpus.len();
        let threshold = self.config.threshold.max(1);
        let candidates: Vec<usize> = (0..n)
            .filter(|&i| {
                let cpu = &self.cpus[i];
                cpu.mode == Mode::Local
                    && cpu.deep_streak >= SLOW_SAMPLES
                    && cpu.depth >= threshold.saturating_mul(SLOW_THRESHOLDS)
                    && cpu.depth >= cpu.streak_depth.saturating_add(threshold)
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let shallow = self.cpus.iter().filter(|cpu| cpu.depth < threshold).count();
        if 2 * shallow < n - 1 {
            return;
        }
        // A queue that grew while it took others' spill says nothing about its own worker.
        let candidates: Vec<usize> = candidates
            .into_iter()
            .filter(|&i| {
                let cpu = &self.cpus[i];
                cpu.targeted_by == 0 && cpu.targeted_at.is_none_or(|at| at < cpu.streak_start)
            })
            .collect();
        for i in candidates {
            let rate = rates[i];
            if rate <= EPSILON {
                continue;
            }
            let cpu = &mut self.cpus[i];
            let growth =
                f64::from(cpu.depth.saturating_sub(cpu.streak_depth)) / f64::from(cpu.deep_streak);
            let pressure = (f64::from(cpu.depth) - f64::from(self.config.threshold) / 2.0)
                / SLOW_DRAIN_SAMPLES;
            cpu.mode = Mode::Slow;
            cpu.slow_spill = ((growth + pressure) / rate).clamp(SLOW_STEP, SLOW_MAX_SPILL);
            cpu.slow_probe = SLOW_STEP;
            cpu.slow_changed_at = now;
            // The first correction looks at the queue since the spill began.
            cpu.window_depth = cpu.depth;
            cpu.window_sum = 0;
            cpu.window_samples = 0;
            cpu.window_max = 0;
            self.write_slow(i, now, rates, mean, changes);
        }
    }

    /// Corrects each slow worker's spilled fraction from its queue over the last window.
    fn correct_slow(
        &mut self,
        now: Duration,
        rates: &[f64],
        mean: f64,
        changes: &mut Vec<(u32, SpillRoute)>,
    ) {
        let busy = (self.config.threshold / 4).max(1);
        let half = f64::from(self.config.threshold) / 2.0;
        for i in 0..self.cpus.len() {
            let cpu = &mut self.cpus[i];
            if cpu.mode != Mode::Slow || cpu.window_samples == 0 {
                continue;
            }
            let rate = rates[i];
            let samples = f64::from(cpu.window_samples);
            let growth = (f64::from(cpu.depth) - f64::from(cpu.window_depth)) / samples;
            let average = cpu.window_sum as f64 / samples;
            let delta = if rate > EPSILON {
                (growth + (average - half) / SLOW_DRAIN_SAMPLES) / rate
            } else {
                -1.0
            };
            let before = cpu.slow_spill;
            // A queue that drains after an increase is what the increase was for: the fraction
            // shrinks only once the queue is under the threshold all window.
            let shallow = cpu.window_max < self.config.threshold;
            if delta >= SLOW_STEP || delta <= -SLOW_STEP && shallow {
                cpu.slow_spill = (cpu.slow_spill + delta).min(SLOW_MAX_SPILL);
                if delta > 0.0 {
                    cpu.slow_probe = SLOW_STEP;
                }
                cpu.slow_changed_at = now;
            } else if cpu.window_max <= busy
                && now.saturating_sub(cpu.slow_changed_at) >= SLOW_PROBE_AFTER
            {
                cpu.slow_spill -= cpu.slow_probe;
                cpu.slow_probe = (2.0 * cpu.slow_probe).min(0.5);
                cpu.slow_changed_at = now;
            }
            if cpu.slow_spill < SLOW_MIN_SPILL {
                cpu.mode = Mode::Local;
                cpu.slow_spill = 0.0;
                let local = SpillRoute::local(cpu.id);
                self.write(i, now, local, changes);
            } else if cpu.slow_spill != before {
                self.write_slow(i, now, rates, mean, changes);
            }
        }
    }

    /// Writes slow worker `i`'s table: its spilled fraction spread evenly over the shallowest
    /// queues that are not deep themselves, nearest first, as many as keep each under
    /// [`SLOW_TARGET_SHARE`] of the mean (none: the route stays as it is).
    fn write_slow(
        &mut self,
        i: usize,
        now: Duration,
        rates: &[f64],
        mean: f64,
        changes: &mut Vec<(u32, SpillRoute)>,
    ) {
        let mut targets: Vec<usize> = (0..self.cpus.len())
            .filter(|&t| {
                let cpu = &self.cpus[t];
                t != i && cpu.mode == Mode::Local && !cpu.deep()
            })
            .collect();
        // Among equals, start somewhere else each time, so the same few do not always take it.
        let n = self.cpus.len();
        let rotation = self.cpus[i].rotation as usize;
        self.cpus[i].rotation = self.cpus[i].rotation.wrapping_add(1);
        targets.sort_by_key(|&t| {
            let turn = (t + n - rotation.wrapping_mul(ROTATION_STRIDE) % n) % n;
            (self.distance(i, t), self.cpus[t].depth, turn)
        });
        let fraction = self.cpus[i].slow_spill;
        let load = fraction * rates[i];
        let wanted = if mean > EPSILON {
            (load / (mean * SLOW_TARGET_SHARE)).ceil() as usize
        } else {
            1
        };
        let cap = self.config.max_targets.map_or(usize::MAX, |k| k as usize);
        targets.truncate(wanted.clamp(1, cap.max(1)));
        let spilled = ((fraction * SPILL_SLOTS as f64).round() as u32).min(SPILL_SLOTS as u32);
        if targets.is_empty() && spilled > 0 {
            // Every other queue is deep: keep whatever route there is.
            return;
        }
        let route = if spilled == 0 {
            SpillRoute::local(self.cpus[i].id)
        } else {
            let k = targets.len() as u32;
            let mut counts = vec![(i, SPILL_SLOTS as u32 - spilled)];
            counts.extend(
                targets
                    .iter()
                    .enumerate()
                    .map(|(j, &t)| (t, spilled / k + u32::from((j as u32) < spilled % k))),
            );
            self.table(i, &counts)
        };
        self.write(i, now, route, changes);
    }

    /// Water-fills the hot CPUs' excess into the others' spare and rewrites the tables that
    /// moved materially.
    fn plan(
        &mut self,
        now: Duration,
        rates: &[f64],
        mean: f64,
        changes: &mut Vec<(u32, SpillRoute)>,
    ) {
        let n = self.cpus.len();
        let hot: Vec<usize> = (0..n).filter(|&i| self.cpus[i].mode == Mode::Hot).collect();
        if hot.is_empty() {
            return;
        }
        let mut spare: Vec<f64> = (0..n)
            .map(|t| match self.cpus[t].mode {
                Mode::Local => (mean - rates[t]).max(0.0),
                Mode::Hot | Mode::Slow => 0.0,
            })
            .collect();
        for (s, cpu) in self.cpus.iter().enumerate() {
            if cpu.mode == Mode::Slow && cpu.route.active != 0 {
                let per_slot = rates[s] / SPILL_SLOTS as f64;
                for &target in &cpu.route.slots {
                    if let Some(t) = self.lookup(u32::from(target)).filter(|&t| t != s) {
                        spare[t] = (spare[t] - per_slot).max(0.0);
                    }
                }
            }
        }
        let receivers: Vec<usize> = (0..n).filter(|&t| spare[t] > EPSILON).collect();
        let mut currents: Vec<Vec<u32>> = hot.iter().map(|&c| self.slot_counts(c)).collect();
        // Each hot CPU's candidates, capped by max_targets: nearest first, then those it spills
        // to already (so that targets are not swapped for noise in the spare, or for the queues
        // that the cap itself makes deep), then the shallow ones, then the most spare left once
        // the hot CPUs with more excess took their pick.
        let mut allowed: Vec<Vec<usize>> = vec![receivers.clone(); hot.len()];
        if let Some(k) = self.config.max_targets {
            let mut left = spare.clone();
            let mut order: Vec<usize> = (0..hot.len()).collect();
            order.sort_by(|&a, &b| rates[hot[b]].total_cmp(&rates[hot[a]]).then(a.cmp(&b)));
            for h in order {
                let (c, current) = (hot[h], &currents[h]);
                let candidates = &mut allowed[h];
                candidates.sort_by(|&a, &b| {
                    let key =
                        |t: usize| (self.distance(c, t), current[t] == 0, self.cpus[t].deep());
                    key(a)
                        .cmp(&key(b))
                        .then(left[b].total_cmp(&left[a]))
                        .then(a.cmp(&b))
                });
                candidates.truncate(k as usize);
                let mut want = (rates[c] - mean).max(0.0);
                for &t in candidates.iter() {
                    let take = want.min(left[t]);
                    left[t] -= take;
                    want -= take;
                }
            }
        }
        // A hot CPU keeps the mean, or nothing while it drains a backlog.
        let mut excess: Vec<f64> = hot
            .iter()
            .map(|&c| {
                let keep = if self.cpus[c].draining { 0.0 } else { mean };
                (rates[c] - keep).max(0.0)
            })
            .collect();
        // Each hot CPU's candidates in the order their spare is taken: not deep before deep,
        // then nearest first; one pass per (deep, tier) group.
        let groups: Vec<Vec<(bool, CpuDistance, usize)>> = hot
            .iter()
            .zip(&allowed)
            .map(|(&c, candidates)| {
                let mut keyed: Vec<(bool, CpuDistance, usize)> = candidates
                    .iter()
                    .map(|&t| (self.cpus[t].deep(), self.distance(c, t), t))
                    .collect();
                keyed.sort_unstable();
                keyed
            })
            .collect();
        let mut grants = vec![0.0; hot.len() * n];
        let mut demand = vec![0.0; n];
        let mut totals = vec![0.0; hot.len()];
        for deep in [false, true] {
            for tier in TIERS {
                let group = |h: usize| -> &[(bool, CpuDistance, usize)] {
                    let keyed = &groups[h];
                    let start = keyed.partition_point(|&(d, t, _)| (d, t) < (deep, tier));
                    let end = keyed.partition_point(|&(d, t, _)| (d, t) <= (deep, tier));
                    &keyed[start..end]
                };
                for _ in 0..FILL_ROUNDS {
                    demand.fill(0.0);
                    for h in 0..hot.len() {
                        totals[h] = 0.0;
                        if excess[h] <= EPSILON {
                            continue;
                        }
                        let total: f64 = group(h).iter().map(|&(_, _, t)| spare[t]).sum();
                        totals[h] = total;
                        if total <= EPSILON {
                            continue;
                        }
                        let take = excess[h].min(total);
                        for &(_, _, t) in group(h) {
                            demand[t] += take * spare[t] / total;
                        }
                    }
                    // Receivers asked for more than their spare give each asker its share.
                    let before = spare.clone();
                    let mut granted = 0.0;
                    for h in 0..hot.len() {
                        if totals[h] <= EPSILON {
                            continue;
                        }
                        let take = excess[h].min(totals[h]);
                        for &(_, _, t) in group(h) {
                            if before[t] <= EPSILON {
                                continue;
                            }
                            let scale = (before[t] / demand[t]).min(1.0);
                            let grant = take * before[t] / totals[h] * scale;
                            grants[h * n + t] += grant;
                            excess[h] -= grant;
                            spare[t] -= grant;
                            granted += grant;
                        }
                    }
                    if granted <= EPSILON {
                        break;
                    }
                }
            }
        }
        let mut plans = Vec::with_capacity(hot.len());
        for (h, &c) in hot.iter().enumerate() {
            let row = &mut grants[h * n..(h + 1) * n];
            // What found no spare is shared evenly by the CPU and its targets.
            let left = excess[h].max(0.0);
            if left > EPSILON {
                let targets = row.iter().filter(|&&g| g > EPSILON).count();
                let each = left / (targets + 1) as f64;
                for g in row.iter_mut().filter(|g| **g > EPSILON) {
                    *g += each;
                }
            }
            let spilled: f64 = row.iter().sum();
            let mut loads: Vec<(usize, f64)> = vec![(c, (rates[c] - spilled).max(0.0))];
            loads.extend(
                row.iter()
                    .enumerate()
                    .filter(|&(_, &g)| g > EPSILON)
                    .map(|(t, &g)| (t, g)),
            );
            plans.push((c, loads, std::mem::take(&mut currents[h])));
        }
        // How much each CPU's load would move if every table followed the plan exactly: by
        // MATERIAL_LOAD of the mean, beyond one slot of rounding and the noise of the estimate,
        // is material.
        let mut moved = vec![0.0; n];
        let mut rounding = vec![0.0f64; n];
        for (c, loads, current) in &plans {
            let total: f64 = loads.iter().map(|&(_, load)| load).sum();
            let per_slot = rates[*c] / SPILL_SLOTS as f64;
            for &(t, load) in loads {
                moved[t] += load / total.max(EPSILON) * rates[*c];
                rounding[t] = rounding[t].max(per_slot);
            }
            for (t, &k) in current.iter().enumerate().filter(|&(_, &k)| k > 0) {
                moved[t] -= f64::from(k) * per_slot;
                rounding[t] = rounding[t].max(per_slot);
            }
        }
        let material: Vec<bool> = (0..n)
            .map(|t| {
                // The noise in the CPU's own arrival rate, which its spare comes from.
                let len = f64::from(self.rates.len[t].max(1));
                let noise = NOISE_SIGMAS * (self.rates.sum[t] as f64).sqrt() / len;
                moved[t].abs() >= MATERIAL_LOAD * mean + rounding[t] + noise
            })
            .collect();
        for (c, loads, current) in plans {
            self.rewrite_hot(c, now, &loads, &current, &material, rates[c], mean, changes);
        }
    }

    /// Slots per target (by index) of CPU `i`'s table; all 0 while it does not spill.
    fn slot_counts(&self, i: usize) -> Vec<u32> {
        let mut counts = vec![0u32; self.cpus.len()];
        if self.cpus[i].route.active != 0 {
            for &slot in &self.cpus[i].route.slots {
                if let Some(t) = self.lookup(u32::from(slot)) {
                    counts[t] += 1;
                }
            }
        }
        counts
    }

    /// Rewrites hot CPU `c`'s table (now `current` slots per target, by index) to `loads` (target
    /// index, load) if it does not spill yet, if a target it uses spills itself now, if the set
    /// of hot CPUs changed, if it moves a CPU whose load moves materially (at most every
    /// [`REWRITE_INTERVAL`]), or if it moves at all (at most every [`REFRESH_INTERVAL`]). Where
    /// a slot is a large load (one CPU receiving most connections on many CPUs), one target's
    /// rounding up is itself material: then each refresh rounds up other targets, so that no one
    /// keeps the extra slot for long. `rate` is the CPU's arrivals per sample.
    #[allow(clippy::too_many_arguments)]
    fn rewrite_hot(
        &mut self,
        c: usize,
        now: Duration,
        loads: &[(usize, f64)],
        current: &[u32],
        material: &[bool],
        rate: f64,
        mean: f64,
        changes: &mut Vec<(u32, SpillRoute)>,
    ) {
        let cpu = &self.cpus[c];
        let mut counts = apportion(loads, seed(cpu.cpu, cpu.rotation));
        let spills = counts.iter().any(|&(t, k)| t != c && k > 0);
        if cpu.route.active == 0 {
            if spills {
                let route = self.table(c, &counts);
                self.write(c, now, route, changes);
            }
            return;
        }
        if !spills {
            // A hot CPU that receives nothing keeps its table: it is still hot only because no
            // CPU receives anything (it would have cooled against the others' mean otherwise)
            // and its window still holds the skew's arrivals, so nothing uses the table
            // meanwhile, and when arrivals resume where they were it is right at once. Written
            // local, it would keep every connection of the resumed skew until the next plan,
            // into a queue the skew had already filled.
            if rate > EPSILON {
                self.write(c, now, SpillRoute::local(cpu.id), changes);
            }
            return;
        }
        let since = cpu
            .written_at
            .map_or(Duration::MAX, |at| now.saturating_sub(at));
        let per_slot = rate / SPILL_SLOTS as f64;
        let total: f64 = loads
            .iter()
            .map(|&(_, load)| load)
            .sum::<f64>()
            .max(EPSILON);
        let rounded_up = counts.iter().zip(loads).any(|(&(_, k), &(_, load))| {
            (f64::from(k) - load / total * SPILL_SLOTS as f64) * per_slot >= MATERIAL_LOAD * mean
        });
        if since >= REFRESH_INTERVAL && rounded_up {
            let cpu = &mut self.cpus[c];
            cpu.rotation = cpu.rotation.wrapping_add(1);
            counts = apportion(loads, seed(cpu.cpu, cpu.rotation));
        }
        let cpu = &self.cpus[c];
        let deltas = slot_deltas(&counts, current);
        if deltas.is_empty() {
            return;
        }
        let unusable = current
            .iter()
            .enumerate()
            .any(|(t, &k)| k > 0 && t != c && self.cpus[t].mode != Mode::Local);
        let moves_material = deltas.iter().any(|&(t, _)| material[t]);
        let epoch = cpu.written_epoch != self.hot_epoch;
        let write = since >= PLAN_INTERVAL && (unusable || epoch)
            || since >= REWRITE_INTERVAL && moves_material
            || since >= REFRESH_INTERVAL;
        if write {
            let route = self.table(c, &counts);
            self.write(c, now, route, changes);
        }
    }

    /// A table for CPU `i` holding `counts` slots per target (summing to [`SPILL_SLOTS`]) that
    /// keeps as many of its current slots as it can, so connections that hash to a slot whose
    /// share did not shrink keep their listener.
    fn table(&self, i: usize, counts: &[(usize, u32)]) -> SpillRoute {
        let mut need = vec![0u32; self.cpus.len()];
        for &(t, k) in counts {
            need[t] += k;
        }
        let current = &self.cpus[i].route;
        let mut route = SpillRoute {
            active: 1,
            reserved: 0,
            slots: current.slots,
        };
        let mut free = Vec::new();
        for (slot, &target) in route.slots.iter().enumerate() {
            match self.lookup(u32::from(target)) {
                Some(t) if current.active != 0 && need[t] > 0 => need[t] -= 1,
                _ => free.push(slot),
            }
        }
        let mut free = free.into_iter();
        for (t, &k) in need.iter().enumerate() {
            for slot in free.by_ref().take(k as usize) {
                route.slots[slot] = self.cpus[t].id;
            }
        }
        // Counts summing short of SPILL_SLOTS (never, by construction) keep the CPU local.
        for slot in free {
            route.slots[slot] = self.cpus[i].id;
        }
        route
    }

    /// Records `route` as CPU `i`'s and reports it, unless it is the route already there.
    fn write(
        &mut self,
        i: usize,
        now: Duration,
        route: SpillRoute,
        changes: &mut Vec<(u32, SpillRoute)>,
    ) {
        if self.cpus[i].route == route {
            return;
        }
        for t in self.targets(i, &self.cpus[i].route) {
            let target = &mut self.cpus[t];
            target.targeted_by = target.targeted_by.saturating_sub(1);
            target.targeted_at = Some(now);
        }
        for t in self.targets(i, &route) {
            self.cpus[t].targeted_by += 1;
        }
        let epoch = self.hot_epoch;
        let cpu = &mut self.cpus[i];
        if cpu.route.active == 0 && route.active != 0 {
            self.starts += 1;
        }
        cpu.route = route;
        cpu.written_at = Some(now);
        cpu.written_epoch = epoch;
        changes.push((cpu.cpu, route));
    }

    /// The other CPUs (by index) that `route`, CPU `i`'s, sends connections to.
    fn targets(&self, i: usize, route: &SpillRoute) -> Vec<usize> {
        if route.active == 0 {
            return Vec::new();
        }
        let mut named = vec![false; self.cpus.len()];
        for &slot in &route.slots {
            if let Some(t) = self.lookup(u32::from(slot)) {
                named[t] = true;
            }
        }
        named[i] = false;
        (0..named.len()).filter(|&t| named[t]).collect()
    }
}

/// Splits [`SPILL_SLOTS`] in proportion to `loads` (target index, load): each count is the exact
/// share rounded down or up, and they sum to [`SPILL_SLOTS`] (all to the first entry when the
/// loads are all 0). The round-ups go to the largest remainders, which overload their target
/// least, dithered by up to half a slot with `seed` (a CPU and its rotation): tables of
/// different CPUs with alike remainders round up different targets, so one receiver does not
/// collect every table's extra slot.
fn apportion(loads: &[(usize, f64)], seed: u64) -> Vec<(usize, u32)> {
    let total: f64 = loads.iter().map(|&(_, load)| load.max(0.0)).sum();
    let slots = SPILL_SLOTS as u32;
    if total <= EPSILON {
        return loads
            .first()
            .map(|&(t, _)| vec![(t, slots)])
            .unwrap_or_default();
    }
    let exact: Vec<f64> = loads
        .iter()
        .map(|&(_, load)| load.max(0.0) / total * f64::from(slots))
        .collect();
    let mut counts: Vec<(usize, u32)> = loads
        .iter()
        .zip(&exact)
        .map(|(&(t, _), &e)| (t, (e.floor() as u32).min(slots)))
        .collect();
    let given: u32 = counts.iter().map(|&(_, k)| k).sum();
    let key = |j: usize| exact[j] - exact[j].floor() + dither(seed, loads[j].0) / 2.0;
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    for &j in order.iter().take(slots.saturating_sub(given) as usize) {
        counts[j].1 += 1;
    }
    // Rounding error in the exact shares could leave a slot over or short: the first entry
    // (the spilling CPU itself) absorbs it.
    let given: u32 = counts.iter().map(|&(_, k)| k).sum();
    if let Some(first) = counts.first_mut() {
        first.1 = (first.1 + slots).saturating_sub(given).min(slots);
    }
    counts
}

/// The targets (by index) whose slot count differs between `counts` and `current` (slots per
/// target index), and by how much.
fn slot_deltas(counts: &[(usize, u32)], current: &[u32]) -> Vec<(usize, i32)> {
    let mut delta: Vec<i64> = current.iter().map(|&k| -i64::from(k)).collect();
    for &(t, k) in counts {
        if let Some(d) = delta.get_mut(t) {
            *d += i64::from(k);
        }
    }
    delta
        .into_iter()
        .enumerate()
        .filter(|&(_, d)| d != 0)
        .map(|(t, d)| (t, d.clamp(-(SPILL_SLOTS as i64), SPILL_SLOTS as i64) as i32))
        .collect()
}

/// The rounding seed of `cpu`'s table at its `rotation`th rotation.
fn seed(cpu: u32, rotation: u32) -> u64 {
    u64::from(cpu) << 32 | u64::from(rotation)
}

/// A pseudo-random number in `[0, 1)` for `target` under `seed` (splitmix64's finaliser).
fn dither(seed: u64, target: usize) -> f64 {
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(target as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_topology::CpuPlace;

    const MS: Duration = Duration::from_millis(1);

    fn samples(arrivals: &[u64], depths: &[u32]) -> Vec<CpuSample> {
        (0u32..)
            .zip(arrivals.iter().zip(depths))
            .map(|(cpu, (&arrivals, &depth))| CpuSample {
                cpu,
                depth,
                arrivals,
            })
            .collect()
    }

    /// Feeds the same sample every ms from `*t` for `ms` ms; returns every change.
    fn run(
        policy: &mut SpillPolicy,
        t: &mut Duration,
        ms: u32,
        arrivals: &[u64],
        depths: &[u32],
    ) -> Vec<(u32, SpillRoute)> {
        let mut all = Vec::new();
        for _ in 0..ms {
            *t += MS;
            all.extend(policy.update(*t, &samples(arrivals, depths)));
        }
        all
    }

    /// Slots per CPU of `route`.
    fn shares(route: &SpillRoute) -> std::collections::BTreeMap<u16, u32> {
        let mut shares = std::collections::BTreeMap::new();
        for &slot in &route.slots {
            *shares.entry(slot).or_default() += 1;
        }
        shares
    }

    /// Asserts that `route` gives each CPU its `exact` share of the slots, rounded down or up.
    fn assert_shares(route: &SpillRoute, exact: &[(u16, f64)]) {
        let got = shares(route);
        assert_eq!(got.len(), exact.len(), "{got:?} vs {exact:?}");
        for &(cpu, e) in exact {
            let k = f64::from(got.get(&cpu).copied().unwrap_or(0));
            assert!(k == e.floor() || k == e.ceil(), "{got:?} vs {exact:?}");
        }
    }

    fn flat(cpus: u32) -> SpillPolicy {
        let cpus: Vec<u32> = (0..cpus).collect();
        SpillPolicy::new(&cpus, CpuTopology::default(), PolicyConfig::default())
    }

    #[test]
    fn balanced_load_never_spills_even_with_deep_queues() {
        let mut policy = flat(4);
        let mut t = Duration::ZERO;
        assert!(
            run(
                &mut policy,
                &mut t,
                500,
                &[100, 100, 100, 100],
                &[20, 20, 20, 20]
            )
            .is_empty()
        );
        assert!(run(&mut policy, &mut t, 500, &[110, 95, 100, 90], &[3, 1, 3, 0]).is_empty());
        assert_eq!(policy.spill_starts(), 0);
    }

    #[test]
    fn one_hot_cpu_spreads_its_excess_over_all_others_in_equal_shares() {
        let mut policy = flat(4);
        let mut t = Duration::ZERO;
        let changes = run(&mut policy, &mut t, 1, &[400, 0, 0, 0], &[50, 0, 0, 0]);
        assert_eq!(changes.len(), 1, "at the first sample");
        let route = policy.route(0);
        assert_eq!(route.active, 1);
        assert_eq!(
            shares(&route),
            [(0, 256), (1, 256), (2, 256), (3, 256)].into()
        );
        assert_eq!(policy.spill_starts(), 1);
        // Once the skew is gone the CPU is local again.
        run(
            &mut policy,
            &mut t,
            100,
            &[100, 100, 100, 100],
            &[0, 0, 0, 0],
        );
        assert_eq!(policy.route(0), SpillRoute::local(0));
    }

    #[test]
    fn shares_follow_the_spare_of_each_receiver() {
        let mut policy = flat(4);
        let mut t = Duration::ZERO;
        // Mean 150: CPU 0 keeps 150 of its 500 and gives 150 each to CPUs 1 and 2, 50 to CPU 3
        // (which receives 100 itself).
        run(&mut policy, &mut t, 5, &[500, 0, 0, 100], &[50, 0, 0, 0]);
        assert_shares(
            &policy.route(0),
            &[(0, 307.2), (1, 307.2), (2, 307.2), (3, 102.4)],
        );
    }

    fn tiered_place(cpu: u32) -> CpuPlace {
        // Cores {0,1} {2,3} ..., LLCs of 4 CPUs, nodes of 8.
        let core = cpu / 2 * 2;
        let llc = cpu / 4 * 4;
        CpuPlace {
            core: Some(format!("{core},{}", core + 1)),
            llc: Some(format!("{llc}-{}", llc + 3)),
            node: Some(cpu / 8),
            package: Some(format!("node{}", cpu / 8)),
        }
    }

    fn tiered(cpus: u32, config: PolicyConfig) -> SpillPolicy {
        let topology = CpuTopology::from_places((0..cpus).map(tiered_place).collect());
        SpillPolicy::new(&(0..cpus).collect::<Vec<_>>(), topology, config)
    }

    #[test]
    fn distances_are_the_topologys() {
        let topology = CpuTopology::from_places((0..16).map(tiered_place).collect());
        let policy = tiered(16, PolicyConfig::default());
        for a in 0..16 {
            for b in 0..16 {
                assert_eq!(
                    policy.distance(a as usize, b as usize),
                    topology.distance(a, b)
                );
            }
        }
    }

    #[test]
    fn a_hot_cpu_fills_its_own_llc_first() {
        let mut policy = tiered(8, PolicyConfig::default());
        let mut t = Duration::ZERO;
        // Mean 100. CPU 0 (LLC 0-3) and CPU 4 (LLC 4-7) each have 150 too many; each LLC's three
        // others have 50 spare each: nothing crosses to the other LLC.
        let arrivals = [250, 50, 50, 50, 250, 50, 50, 50];
        run(
            &mut policy,
            &mut t,
            5,
            &arrivals,
            &[50, 0, 0, 0, 50, 0, 0, 0],
        );
        assert_shares(
            &policy.route(0),
            &[(0, 409.6), (1, 204.8), (2, 204.8), (3, 204.8)],
        );
        assert_shares(
            &policy.route(4),
            &[(4, 409.6), (5, 204.8), (6, 204.8), (7, 204.8)],
        );
    }

    #[test]
    fn the_nearest_tier_takes_all_it_has_room_for() {
        let mut policy = tiered(8, PolicyConfig::default());
        let mut t = Duration::ZERO;
        // Mean 91.25: CPU 0 has 168.75 too many. Its SMT sibling (1) has 61.25 spare, the rest of
        // its LLC (2, 3) 122.5, CPUs 6 and 7 (other LLC) 31.25 each; 4 and 5 none (above the mean,
        // not hot). The sibling is filled, the LLC takes the rest, the other LLC nothing.
        let arrivals = [260, 30, 30, 30, 130, 130, 60, 60];
        run(
            &mut policy,
            &mut t,
            5,
            &arrivals,
            &[50, 0, 0, 0, 0, 0, 0, 0],
        );
        let got = shares(&policy.route(0));
        assert_eq!(
            got.keys().copied().collect::<Vec<_>>(),
            [0, 1, 2, 3],
            "{got:?}"
        );
        let slots = |load: f64| load / 260.0 * 1024.0;
        assert!((f64::from(got[&1]) - slots(61.25)).abs() <= 1.0, "{got:?}");
        assert!((f64::from(got[&2]) - slots(53.75)).abs() <= 1.0, "{got:?}");
        assert!((f64::from(got[&0]) - slots(91.25)).abs() <= 1.0, "{got:?}");
    }

    #[test]
    fn a_pause_in_every_arrival_keeps_the_hot_cpus_table_for_the_skew_to_resume_into() {
        let mut policy = flat(2);
        let mut t = Duration::ZERO;
        run(&mut policy, &mut t, 20, &[4, 0], &[20, 0]);
        let spilling = policy.route(0);
        assert_eq!(spilling.active, 1, "{spilling:?}");
        // Nothing arrives for 50 ms (the client stalls); the queue is still deep.
        assert!(run(&mut policy, &mut t, 50, &[0, 0], &[20, 0]).is_empty());
        assert_eq!(policy.route(0), spilling);
        // The skew resumes: the table is in place at its first connection and stays.
        run(&mut policy, &mut t, 1, &[4, 0], &[20, 0]);
        assert_eq!(policy.route(0).active, 1);
        run(&mut policy, &mut t, 50, &[4, 0], &[20, 0]);
        assert_eq!(policy.route(0).active, 1);
        assert_eq!(policy.spill_starts(), 1);
        // Were it to resume on the other CPU instead, CPU 0 is local at once.
        run(&mut policy, &mut t, 50, &[0, 0], &[0, 0]);
        run(&mut policy, &mut t, 1, &[0, 4], &[0, 0]);
        assert_eq!(policy.route(0), SpillRoute::local(0));
        // A pause that empties the rate window is an end: the 80 arrivals of the skew are
        // evidence for 240 samples (while the window holds 64 of them), then CPU 0 is local.
        let mut policy = flat(2);
        run(&mut policy, &mut t, 20, &[4, 0], &[20, 0]);
        assert_eq!(policy.route(0).active, 1);
        run(&mut policy, &mut t, 240, &[0, 0], &[0, 0]);
        assert_eq!(policy.route(0).active, 1);
        run(&mut policy, &mut t, 1, &[0, 0], &[0, 0]);
        assert_eq!(policy.route(0), SpillRoute::local(0));
    }

    #[test]
    fn a_hot_cpu_with_a_backlog_keeps_little_until_it_drained() {
        let mut policy = flat(4);
        let mut t = Duration::ZERO;
        // Mean 100, depth 8 thresholds: CPU 0 keeps nothing; the 100 that the others have no
        // spare for is shared by the four, 25 each.
        run(&mut policy, &mut t, 5, &[400, 0, 0, 0], &[64, 0, 0, 0]);
        assert_shares(
            &policy.route(0),
            &[(0, 64.0), (1, 320.0), (2, 320.0), (3, 320.0)],
        );
        // Drained to one threshold: back to keeping the mean.
        run(&mut policy, &mut t, 20, &[400, 0, 0, 0], &[8, 0, 0, 0]);
        assert_shares(
            &policy.route(0),
            &[(0, 256.0), (1, 256.0), (2, 256.0), (3, 256.0)],
        );
    }

    #[test]
    fn max_targets_caps_the_target_set() {
        let cpus: Vec<u32> = (0..8).collect();
        let config = PolicyConfig {
            max_targets: Some(2),
            ..PolicyConfig::default()
        };
        let mut policy = SpillPolicy::new(&cpus, CpuTopology::default(), config);
        let mut t = Duration::ZERO;
        run(
            &mut policy,
            &mut t,
            5,
            &[800, 0, 0, 0, 0, 0, 0, 0],
            &[50, 0, 0, 0, 0, 0, 0, 0],
        );
        let got = shares(&policy.route(0));
        assert_eq!(got.len(), 3, "itself and 2 targets: {got:?}");
        // The excess that found no spare is shared evenly by the CPU and its two targets.
        assert!(got.values().all(|&k| (341..=342).contains(&k)), "{got:?}");
    }

    #[test]
    fn small_share_changes_do_not_rewrite_but_large_ones_do() {
        let mut policy = flat(4);
        let mut t = Duration::ZERO;
        run(&mut policy, &mut t, 40, &[400, 0, 0, 0], &[50, 0, 0, 0]);
        let before = policy.route(0);
        // A few percent of jitter for 400 ms: no rewrite.
        for step in 0..400u64 {
            let wobble = step % 7;
            let changes = run(
                &mut policy,
                &mut t,
                1,
                &[400 + wobble, wobble, 0, 2],
                &[50, 0, 0, 0],
            );
            assert!(changes.is_empty(), "rewrote at step {step}: {changes:?}");
        }
        assert_eq!(policy.route(0), before);
        // CPU 3 now receives 100 itself (mean 125): its share falls from 256 to 64 slots.
        let changes = run(&mut policy, &mut t, 80, &[400, 0, 0, 100], &[50, 0, 0, 0]);
        assert!(!changes.is_empty());
        let got = shares(&policy.route(0));
        assert!((60..=70).contains(&got[&3]), "{got:?}");
    }

    #[test]
    fn when_every_queue_is_deep_the_hot_cpu_still_keeps_only_the_mean() {
        // Hash selection would give each worker the mean (100): so does the policy.
        let mut policy = flat(4);
        let mut t = Duration::ZERO;
        run(
            &mut policy,
            &mut t,
            5,
            &[250, 50, 50, 50],
            &[50, 50, 50, 50],
        );
        assert_eq!(
            shares(&policy.route(0)),
            [(0, 409), (1, 205), (2, 205), (3, 205)].into()
        );
    }

    #[test]
    fn a_slow_worker_spills_a_growing_then_shrinking_fraction() {
        let mut policy = flat(4);
        let mut t = Duration::ZERO;
        let even = [100, 100, 100, 100];
        // CPU 0's worker serves 60 of its 100 per sample: its queue grows by 40 a sample.
        let mut depth = 0;
        for _ in 0..(SLOW_SAMPLES + 8) {
            depth += 40;
            run(&mut policy, &mut t, 1, &even, &[depth, 0, 0, 0]);
        }
        let route = policy.route(0);
        assert_eq!(route.active, 1);
        let got = shares(&route);
        assert!(got[&0] < 1024 - 300, "spills at least its 40 %: {got:?}");
        assert!(got.keys().all(|&cpu| cpu < 4));
        // Drained for good: back to local within seconds, rewriting rarely.
        let changes = run(&mut policy, &mut t, 6000, &even, &[0, 0, 0, 0]);
        assert_eq!(policy.route(0), SpillRoute::local(0));
        assert!(changes.len() <= 8, "{} rewrites", changes.len());
    }

    #[test]
    fn only_known_cpus_appear_in_tables() {
        let mut policy = SpillPolicy::new(
            &[2, 5, 9, 9],
            CpuTopology::default(),
            PolicyConfig::default(),
        );
        let mut t = Duration::ZERO;
        let samples = [
            CpuSample {
                cpu: 2,
                depth: 50,
                arrivals: 900,
            },
            CpuSample {
                cpu: 5,
                depth: 0,
                arrivals: 0,
            },
            CpuSample {
                cpu: 9,
                depth: 0,
                arrivals: 0,
            },
            CpuSample {
                cpu: 7,
                depth: 0,
                arrivals: 5000,
            },
        ];
        let mut changes = Vec::new();
        for _ in 0..10 {
            t += MS;
            changes.extend(policy.update(t, &samples));
        }
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].0, 2);
        assert!(changes[0].1.slots.iter().all(|s| [2, 5, 9].contains(s)));
        let third = 1024.0 / 3.0;
        assert_shares(&policy.route(2), &[(2, third), (5, third), (9, third)]);
        assert_eq!(policy.route(7), SpillRoute::local(7));
    }

    #[test]
    fn apportion_is_exact_to_a_slot_and_spreads_the_round_ups() {
        let equal = [(0, 1.0), (1, 1.0), (2, 1.0)];
        let up = |seed: u64| -> Vec<usize> {
            let counts = apportion(&equal, seed);
            assert_eq!(counts.iter().map(|c| c.1).sum::<u32>(), 1024);
            assert!(
                counts.iter().all(|c| (341..=342).contains(&c.1)),
                "{counts:?}"
            );
            counts.iter().filter(|c| c.1 == 342).map(|c| c.0).collect()
        };
        let ups: std::collections::BTreeSet<Vec<usize>> = (0..8).map(up).collect();
        assert!(ups.len() > 1, "different seeds round up different targets");
        assert_eq!(apportion(&[(3, 0.0)], 0), [(3, 1024)]);
        // The round-up goes where it overloads least: 340.9 -> 341, not 341.05 -> 342.
        let counts = apportion(&[(0, 340.9), (1, 341.05), (2, 342.05)], 7);
        assert_eq!(counts, [(0, 341), (1, 341), (2, 342)]);
        assert_eq!(
            slot_deltas(&[(0, 500), (1, 524)], &[600, 0, 424]),
            [(0, -100), (1, 524), (2, -424)]
        );
    }
}
