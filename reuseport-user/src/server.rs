//! A whole server: per-CPU listeners, steering (in `percpu` mode) and pinned workers, started and
//! stopped together. `reuseport serve`, the tests and the example all run this.

use std::{net::SocketAddr, time::Instant};

use thiserror::Error;
use tokio::sync::watch;

use crate::{
    cpus::{CpuError, CpuList},
    listeners::{ListenerError, PerCpuListeners, Protocol},
    stats::{Snapshot, WorkerStats},
    steering::{Steering, SteeringMode, SteeringProgram},
    strategy::{self, StrategyError},
    worker::{Worker, WorkerError},
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
    /// Reading the steering program's counters failed.
    #[error(transparent)]
    Steering(#[from] crate::steering::SteeringError),
    /// A worker failed to start or panicked.
    #[error(transparent)]
    Worker(#[from] WorkerError),
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
    /// The program `percpu` attaches (another than the default only to calibrate measurements).
    pub program: SteeringProgram,
}

impl ServerConfig {
    /// TCP on `listen` with `mode`, on every allowed CPU, backlog 1024.
    pub fn new(listen: SocketAddr, mode: SteeringMode) -> Self {
        Self {
            listen,
            protocol: Protocol::Tcp,
            mode,
            cpus: None,
            backlog: 1024,
            program: SteeringProgram::SteerToCpu,
        }
    }
}

/// A running server: one pinned worker and one listener per CPU, all in one reuseport group.
pub struct Server {
    listen: SocketAddr,
    mode: SteeringMode,
    mode_reason: String,
    protocol: Protocol,
    cpus: CpuList,
    workers: Vec<Worker>,
    steering: Option<Steering>,
    shutdown: watch::Sender<bool>,
    started: Instant,
}

impl Server {
    /// Binds the listeners, puts the steering mode in place (resolving `auto`) and starts the
    /// workers.
    ///
    /// On error everything created so far is closed again, so nothing stays attached.
    pub fn start(config: ServerConfig) -> Result<Self, ServerError> {
        let allowed = CpuList::allowed()?;
        let cpus = match config.cpus {
            Some(cpus) => cpus.within(&allowed)?,
            None => allowed,
        };
        let listeners =
            PerCpuListeners::bind(config.listen, config.protocol, &cpus, config.backlog)?;
        let listen = listeners.local_addr();
        let choice = strategy::choose(config.mode);
        let steering = strategy::apply(choice.mode, &listeners, config.program)?;
        let (shutdown, stop_signal) = watch::channel(false);
        let mut workers = Vec::with_capacity(cpus.len());
        for listener in listeners.into_inner() {
            // On error, `shutdown` drops and stops the workers already started.
            workers.push(Worker::spawn(listener, stop_signal.clone())?);
        }
        Ok(Self {
            listen,
            mode: choice.mode,
            mode_reason: choice.reason,
            protocol: config.protocol,
            cpus,
            workers,
            steering,
            shutdown,
            started: Instant::now(),
        })
    }

    /// The address served, with the port filled in.
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The steering mode in use (`auto` resolved).
    pub fn mode(&self) -> SteeringMode {
        self.mode
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

    /// The steering program (`None` in hash mode), e.g. to empty or refill a slot while serving.
    pub fn steering_mut(&mut self) -> Option<&mut Steering> {
        self.steering.as_mut()
    }

    /// The steering program (`None` in hash mode).
    pub fn steering(&self) -> Option<&Steering> {
        self.steering.as_ref()
    }

    /// All counters, now.
    pub fn snapshot(&self) -> Result<Snapshot, ServerError> {
        let workers = self.workers.iter().map(Worker::stats).collect();
        self.snapshot_with(workers)
    }

    /// Stops the workers (closing every listener, which also ends the group and with it the
    /// program's attachment) and returns the final counters.
    pub fn stop(mut self) -> Result<Snapshot, ServerError> {
        let _ = self.shutdown.send(true);
        let mut workers = Vec::with_capacity(self.workers.len());
        for worker in self.workers.drain(..) {
            workers.push(worker.join()?);
        }
        self.snapshot_with(workers)
    }

    fn snapshot_with(&self, workers: Vec<WorkerStats>) -> Result<Snapshot, ServerError> {
        let (steering, program) = match &self.steering {
            Some(steering) => (Some(steering.stats()?), steering.run_stats()?),
            None => (None, None),
        };
        Ok(Snapshot {
            elapsed: self.started.elapsed(),
            workers,
            steering,
            program,
        })
    }
}
