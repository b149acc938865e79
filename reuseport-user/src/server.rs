//! A whole server: per-CPU listeners, a steering [`Strategy`] and pinned workers, started and
//! stopped together, and restarted one worker at a time without refusing a connection.
//! `reuseport serve`, the tests and the example all run this. The server never asks which mode it
//! runs: the [`Strategy`] does what its mode needs.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    time::Instant,
};

use socket2::Socket;

use thiserror::Error;
use tokio::sync::watch;

use crate::{
    connections::{TimeoutError, Timeouts},
    cpus::{CpuError, CpuList},
    incoming_cpu::IncomingCpuError,
    listeners::{self, CpuListener, ListenerError, PerCpuListeners, Protocol},
    spill::{SpillConfig, SpillError},
    stats::{Migrations, Snapshot, WorkerStats},
    steering::{Steering, SteeringMode, SteeringProgram},
    strategy::{self, Strategy, StrategyError},
    worker::{ConnectionPolicy, Worker, WorkerError},
};

/// Errors from starting, observing or stopping a [`Server`].
#[derive(Debug, Error)]
pub enum ServerError {
    /// Choosing CPUs failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// Creating the listeners failed.
    #[error(transparent)]
    Listener(#[from] ListenerError),
    /// Putting the steering strategy in place failed.
    #[error(transparent)]
    Strategy(#[from] StrategyError),
    /// Starting the spill sampler failed.
    #[error(transparent)]
    Spill(#[from] SpillError),
    /// Reading the steering program's counters failed.
    #[error(transparent)]
    Steering(#[from] crate::steering::SteeringError),
    /// A worker failed to start or panicked.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// [`Server::restart_worker`] was asked for a CPU without a worker.
    #[error("no worker runs on CPU {cpu}")]
    NoWorker {
        /// The CPU asked for.
        cpu: u32,
    },
    /// Setting `SO_INCOMING_CPU` on a restarted worker's listener failed.
    #[error(transparent)]
    IncomingCpu(#[from] IncomingCpuError),
    /// A connection timeout is out of range.
    #[error(transparent)]
    Timeouts(#[from] TimeoutError),
}

impl ServerError {
    /// A strategy's error while serving (a restart, reading counters), as the variants these
    /// steps returned before strategies were types: [`ServerError::Steering`] and
    /// [`ServerError::IncomingCpu`].
    fn running(err: StrategyError) -> Self {
        match err {
            StrategyError::Steering(err) => Self::Steering(err),
            StrategyError::IncomingCpu(err) => Self::IncomingCpu(err),
            other => Self::Strategy(other),
        }
    }
}

/// What to serve and how.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to bind every listener to (port 0: pick a free port).
    pub listen: SocketAddr,
    /// TCP (HTTP/1.1 demo) or UDP (datagram echo).
    pub protocol: Protocol,
    /// How the kernel picks a listener for each connection (`auto` is resolved at start).
    pub mode: SteeringMode,
    /// CPUs to run workers on; `None` means every CPU this process may run on.
    pub cpus: Option<CpuList>,
    /// TCP accept-queue length of each listener.
    pub backlog: i32,
    /// The program `percpu` attaches ([`SteeringProgram::recommended`] by default).
    pub program: SteeringProgram,
    /// When `percpu-spill` spills (ignored by other modes).
    pub spill: SpillConfig,
    /// How long a TCP connection may take to send a request head, and stay silent between
    /// requests (ignored for UDP).
    pub timeouts: Timeouts,
}

impl ServerConfig {
    /// TCP on `listen` with `mode`, on every allowed CPU, backlog 1024, the recommended program,
    /// the default [`Timeouts`].
    pub fn new(listen: SocketAddr, mode: SteeringMode) -> Self {
        Self {
            listen,
            protocol: Protocol::Tcp,
            mode,
            cpus: None,
            backlog: 1024,
            program: SteeringProgram::recommended(),
            spill: SpillConfig::default(),
            timeouts: Timeouts::default(),
        }
    }
}

/// What a started server reports once every listener accepts: `reuseport serve --ready-json`
/// prints it as its first line, so a program that starts `serve` (the lab, a supervisor) reads
/// typed data instead of the human line.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    /// The serving process.
    pub pid: u32,
    /// The address served, port filled in.
    pub listen: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The steering mode in use (`auto` resolved).
    pub mode: SteeringMode,
    /// Why that mode (`as requested`, or what `auto` found).
    pub mode_reason: String,
    /// The CPUs with a worker, as a CPU list (`0-3,6`).
    pub cpus: String,
    /// The kernel's id of the steering program, if one is attached.
    pub program_id: Option<u32>,
}

/// A running server: one pinned worker and one listener per CPU, all in one reuseport group.
pub struct Server {
    listen: SocketAddr,
    mode_reason: String,
    protocol: Protocol,
    backlog: i32,
    cpus: CpuList,
    workers: Vec<RunningWorker>,
    /// Workers replaced by [`Server::restart_worker`] that are still draining their connections.
    retiring: Vec<Worker>,
    /// Final counters of replaced workers that have finished.
    retired: Vec<WorkerStats>,
    /// What every worker's connections follow, and the shedder that sees them all.
    policy: ConnectionPolicy,
    restarts: u64,
    /// A duplicate of each listener handed over by a service manager, by CPU: those sockets stay
    /// open in the manager, so a restart hands the same socket to the new worker instead of
    /// replacing it (a replaced one would stay in the group with nobody accepting).
    passed: BTreeMap<u32, OwnedFd>,
    /// The steering mode in place (`auto` resolved).
    strategy: Box<dyn Strategy>,
    started: Instant,
    migrations_at_start: Migrations,
}

/// A worker and the switch that stops it.
struct RunningWorker {
    worker: Worker,
    shutdown: watch::Sender<bool>,
}

impl RunningWorker {
    fn spawn(listener: CpuListener, policy: &ConnectionPolicy) -> Result<Self, WorkerError> {
        let (shutdown, stop_signal) = watch::channel(false);
        // On error `shutdown` drops, which a started worker also takes as the signal to stop.
        let worker = Worker::spawn(listener, policy.clone(), stop_signal)?;
        Ok(Self { worker, shutdown })
    }

    /// Tells the worker to stop; it drains in the background. Its thread stops when the
    /// returned worker is joined.
    fn retire(self) -> Worker {
        let _ = self.shutdown.send(true);
        self.worker
    }

    fn stop(self) -> Result<WorkerStats, WorkerError> {
        self.retire().join()
    }
}

impl Server {
    /// Binds the listeners, puts the steering mode in place (resolving `auto`) and starts the
    /// workers.
    ///
    /// On error everything created so far is closed again, so nothing stays attached.
    pub fn start(config: ServerConfig) -> Result<Self, ServerError> {
        Self::start_on(config, Vec::new())
    }

    /// [`Server::start`] on sockets handed over by a service manager (socket activation:
    /// `LISTEN_FDS`), bound and, for TCP, listening: they become the listeners of the first
    /// CPUs, and the other CPUs get new sockets joining their group (see
    /// [`PerCpuListeners::adopt`]). `config.listen` is not used: the address is theirs.
    pub fn adopt(config: ServerConfig, passed: Vec<OwnedFd>) -> Result<Self, ServerError> {
        if passed.is_empty() {
            return Err(ServerError::Listener(ListenerError::Unusable {
                fd: -1,
                reason: "list is empty".to_owned(),
            }));
        }
        Self::start_on(config, passed)
    }

    fn start_on(config: ServerConfig, passed: Vec<OwnedFd>) -> Result<Self, ServerError> {
        let allowed = CpuList::allowed()?;
        let cpus = match config.cpus {
            Some(cpus) => cpus.within(&allowed)?,
            None => allowed,
        };
        strategy::check_spill(config.mode, &config.spill, cpus.len())?;
        config.timeouts.check()?;
        let policy = ConnectionPolicy {
            timeouts: config.timeouts,
            shedder: Default::default(),
        };
        let pending = if passed.is_empty() {
            PerCpuListeners::prepare(config.listen, config.protocol, &cpus, config.backlog)?
        } else {
            PerCpuListeners::adopt(
                passed.into_iter().map(Socket::from).collect(),
                config.protocol,
                &cpus,
                config.backlog,
            )?
        };
        let passed_cpus: Vec<u32> = cpus.iter().take(pending.passed()).collect();
        let migrations_at_start = Migrations::read();
        let choice = strategy::choose(config.mode);
        let mut strategy = strategy::for_mode(choice.mode, config.program, config.spill)?;
        // The spill sampler's errors stay `ServerError::Spill`, as they were before strategies.
        let listeners = strategy.open(pending).map_err(|err| match err {
            StrategyError::Spill(spill) => ServerError::Spill(spill),
            other => ServerError::Strategy(other),
        })?;
        let listen = listeners.local_addr();
        let mut passed = BTreeMap::new();
        for listener in listeners.iter() {
            if passed_cpus.contains(&listener.cpu) {
                let cpu = listener.cpu;
                let fd = listener
                    .socket
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| WorkerError::Start { cpu, source })?;
                passed.insert(cpu, fd);
            }
        }
        let mut workers = Vec::with_capacity(cpus.len());
        for listener in listeners.into_inner() {
            // On error, the workers already started stop as their switches drop.
            workers.push(RunningWorker::spawn(listener, &policy)?);
        }
        Ok(Self {
            listen,
            mode_reason: choice.reason,
            protocol: config.protocol,
            backlog: config.backlog,
            cpus,
            workers,
            retiring: Vec::new(),
            retired: Vec::new(),
            policy,
            restarts: 0,
            passed,
            strategy,
            started: Instant::now(),
            migrations_at_start,
        })
    }

    /// Replaces the worker on `cpu` with a new one, without refusing a connection:
    ///
    /// (A listener handed over by a service manager, see [`Server::adopt`], is not replaced: the
    /// new worker serves the same socket, and the old one stops accepting from it and drains.)
    ///
    /// 1. a new listener binds and joins the reuseport group, and a new worker pinned to `cpu`
    ///    starts serving it;
    /// 2. the new listener takes `cpu`'s place ([`Strategy::replace_listener`]): its steering slot
    ///    (`percpu`) or its `SO_INCOMING_CPU` (`incoming-cpu`); from now on new connections go to
    ///    it;
    /// 3. the old worker closes its listener (with the select-or-migrate program the kernel moves
    ///    the connections still queued on it to the new listener instead of resetting them; see
    ///    [`Snapshot::migrations`]) and drains its open connections in the background: it
    ///    answers every request it reads with `connection: close` (so the client reconnects, to a
    ///    new worker, without losing a request), closes a connection that sends none within
    ///    [`crate::worker::DRAIN_TIMEOUT`], and exits. Its counters stay in the snapshots.
    ///
    /// In `hash` and `cbpf` modes there is no program to migrate with: requests queued on the old
    /// listener when it closes are reset unless `net.ipv4.tcp_migrate_req` is 1. If a step fails,
    /// the old worker keeps serving.
    pub fn restart_worker(&mut self, cpu: u32) -> Result<(), ServerError> {
        let index = self
            .workers
            .iter()
            .position(|running| running.worker.cpu() == cpu)
            .ok_or(ServerError::NoWorker { cpu })?;
        let socket = match self.passed.get(&cpu) {
            // The service manager's socket: the new worker serves the same one.
            Some(fd) => Socket::from(
                fd.try_clone()
                    .map_err(|source| WorkerError::Start { cpu, source })?,
            ),
            None => listeners::bind_one(self.listen, self.protocol, self.backlog)?,
        };
        // The new socket is in the group but does not have `cpu`'s place yet: it only gets
        // connections the strategy leaves to the kernel's hash until it takes that place below.
        let fd = socket
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| WorkerError::Start { cpu, source })?;
        let replacement = RunningWorker::spawn(CpuListener { cpu, socket }, &self.policy)?;
        // A passed socket keeps its place: the new worker serves the very socket already there.
        if !self.passed.contains_key(&cpu)
            && let Err(err) = self.strategy.replace_listener(cpu, fd)
        {
            let _ = replacement.stop();
            return Err(ServerError::running(err));
        }
        let old = std::mem::replace(&mut self.workers[index], replacement);
        self.retiring.push(old.retire());
        self.restarts += 1;
        self.reap_retired()
    }

    /// Joins the replaced workers that have finished draining, keeping their final counters.
    fn reap_retired(&mut self) -> Result<(), ServerError> {
        let (finished, draining) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(Worker::is_finished);
        self.retiring = draining;
        for worker in finished {
            self.retired.push(worker.join()?);
        }
        Ok(())
    }

    /// Restarts every worker in turn ([`Server::restart_worker`]), as `reuseport serve` does on
    /// SIGHUP.
    pub fn restart_workers(&mut self) -> Result<(), ServerError> {
        for cpu in self.cpus.iter().collect::<Vec<_>>() {
            self.restart_worker(cpu)?;
        }
        Ok(())
    }

    /// What this server reports as ready (see [`Ready`]).
    pub fn ready(&self) -> Result<Ready, ServerError> {
        let program_id = match self.steering() {
            Some(steering) => Some(steering.program_id()?),
            None => None,
        };
        Ok(Ready {
            pid: std::process::id(),
            listen: self.local_addr(),
            protocol: self.protocol(),
            mode: self.mode(),
            mode_reason: self.mode_reason().to_owned(),
            cpus: self.cpus().to_string(),
            program_id,
        })
    }

    /// The address served, with the port filled in.
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The steering mode in use (`auto` resolved).
    pub fn mode(&self) -> SteeringMode {
        self.strategy.mode()
    }

    /// The steering strategy in place, e.g. to [describe](Strategy::describe) it.
    pub fn strategy(&self) -> &dyn Strategy {
        self.strategy.as_ref()
    }

    /// Why [`Server::mode`] is in use (`as requested`, or what `auto` found).
    pub fn mode_reason(&self) -> &str {
        &self.mode_reason
    }

    /// The protocol served.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The CPUs with a worker.
    pub fn cpus(&self) -> &CpuList {
        &self.cpus
    }

    /// The eBPF steering program (`None` in modes without one), e.g. to empty or refill a slot
    /// while serving. A shortcut for [`Strategy::steering_mut`].
    pub fn steering_mut(&mut self) -> Option<&mut Steering> {
        self.strategy.steering_mut()
    }

    /// The eBPF steering program (`None` in modes without one). A shortcut for
    /// [`Strategy::steering`].
    pub fn steering(&self) -> Option<&Steering> {
        self.strategy.steering()
    }

    /// All counters, now.
    pub fn snapshot(&self) -> Result<Snapshot, ServerError> {
        let workers = self
            .workers
            .iter()
            .map(|running| running.worker.stats())
            .collect();
        self.snapshot_with(workers)
    }

    /// Stops the workers (closing every listener, which also ends the group and with it the
    /// program's attachment) and returns the final counters.
    pub fn stop(mut self) -> Result<Snapshot, ServerError> {
        // The strategy may hold duplicates of the listeners (the spill sampler): let go of them
        // first.
        self.strategy.shutdown();
        let mut workers = Vec::with_capacity(self.workers.len());
        // Signal every worker first, so they drain in parallel.
        for running in &self.workers {
            let _ = running.shutdown.send(true);
        }
        for running in self.workers.drain(..) {
            workers.push(running.stop()?);
        }
        for worker in std::mem::take(&mut self.retiring) {
            self.retired.push(worker.join()?);
        }
        self.snapshot_with(workers)
    }

    fn snapshot_with(&self, live: Vec<WorkerStats>) -> Result<Snapshot, ServerError> {
        let strategy = self.strategy.counters().map_err(ServerError::running)?;
        let retired = self
            .retiring
            .iter()
            .map(Worker::stats)
            .chain(self.retired.iter().copied())
            .collect::<Vec<_>>();
        Ok(Snapshot {
            elapsed: self.started.elapsed(),
            workers: with_retired(live, &retired),
            steering: strategy.steering,
            program: strategy.program,
            migrations: Migrations::read().since(&self.migrations_at_start),
            restarts: self.restarts,
            spill: strategy.spill,
            spilling: strategy.spilling,
        })
    }
}

/// Per-CPU counters of the live workers plus those of the workers they replaced.
fn with_retired(mut live: Vec<WorkerStats>, retired: &[WorkerStats]) -> Vec<WorkerStats> {
    for old in retired {
        if let Some(now) = live.iter_mut().find(|now| now.cpu == old.cpu) {
            now.add(old);
        }
    }
    live
}
