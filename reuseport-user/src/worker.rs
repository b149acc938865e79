//! Workers: one OS thread per CPU, pinned to it with `sched_setaffinity`, each running a tokio
//! current-thread runtime that serves only its own listener. What the worker accepts, it reads,
//! writes and closes on the same CPU.

use std::{
    io,
    net::{TcpListener as StdTcpListener, UdpSocket as StdUdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use socket2::SockRef;
use thiserror::Error;
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::watch,
    task::JoinSet,
};

use crate::{
    connections::{ConnectionClock, ConnectionTable, Shed, Shedder, Timeouts},
    cpus::{CpuError, pin_current_thread},
    http::{Ended, ServedBy, serve_connection},
    listeners::CpuListener,
    stats::WorkerStats,
};

/// Errors from starting or running a worker.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// Pinning the worker thread failed.
    #[error("worker for CPU {cpu}")]
    Pin {
        /// The worker's CPU.
        cpu: u32,
        /// Why.
        #[source]
        source: CpuError,
    },
    /// Creating the thread, its runtime or registering its socket failed.
    #[error("starting the worker for CPU {cpu} failed")]
    Start {
        /// The worker's CPU.
        cpu: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The worker thread panicked.
    #[error("the worker for CPU {cpu} panicked")]
    Panicked {
        /// The worker's CPU.
        cpu: u32,
    },
}

/// What one worker has done so far. Shared with the stats reader; relaxed atomics.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Connections accepted (TCP) or datagrams received (UDP).
    pub accepted: AtomicU64,
    /// Of those, how many had `SO_INCOMING_CPU` equal to the worker's CPU.
    pub local: AtomicU64,
    /// Of those, how many had no `SO_INCOMING_CPU` (always so for UDP: the kernel records it only
    /// for connected UDP sockets).
    pub unknown_incoming: AtomicU64,
    /// HTTP requests answered (TCP) or replies sent (UDP).
    pub requests: Arc<AtomicU64>,
    /// Failed accepts, receives or sends (an accept that failed for want of file descriptors
    /// only when no connection could be shed).
    pub errors: AtomicU64,
    /// TCP connections closed because a request head or the next request did not arrive in
    /// time ([`Timeouts`]).
    pub timed_out: AtomicU64,
    /// TCP connections closed, while waiting for a request, to free a file descriptor for a new
    /// connection ([`Shedder`]).
    pub shed: AtomicU64,
}

/// What every TCP worker of a server shares: the connection timeouts and the [`Shedder`] that
/// sees every worker's connections.
#[derive(Clone, Debug, Default)]
pub struct ConnectionPolicy {
    /// How long a connection may take to send a request head or stay silent between requests.
    pub timeouts: Timeouts,
    /// The connections of every worker, to shed from when accept runs out of file descriptors.
    pub shedder: Arc<Shedder>,
}

/// A running worker thread.
#[derive(Debug)]
pub struct Worker {
    cpu: u32,
    counters: Arc<WorkerCounters>,
    thread: thread::JoinHandle<()>,
}

/// How long to back off after an accept error that shedding cannot help, so the loop does not
/// spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// How long to wait for connections already shed to close before accepting again.
const SHED_WAIT: Duration = Duration::from_millis(1);

/// How long a stopping worker keeps a connection that sends no request open: every request it
/// reads meanwhile is answered with `connection: close`.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long past [`DRAIN_TIMEOUT`] a stopping worker waits for connections still busy with a
/// request or a request head before it drops them.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

impl Worker {
    /// Starts a thread pinned to `listener.cpu` that serves `listener` until `shutdown` becomes
    /// `true` (or its sender is dropped). Returns once the thread is pinned and serving.
    ///
    /// TCP connections follow `policy`: they are closed when a request head or the next request
    /// does not arrive in time, and an accept that fails for want of file descriptors sheds the
    /// connection (of any worker sharing `policy`) that has waited longest for a request.
    ///
    /// On shutdown the worker closes its listener (so, with the select-or-migrate program, its
    /// accept queue moves to a live listener) and drains its connections: each request read from
    /// then on is answered with `connection: close`, and a connection that sends none within
    /// [`DRAIN_TIMEOUT`] is closed while idle.
    pub fn spawn(
        listener: CpuListener,
        policy: ConnectionPolicy,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, WorkerError> {
        let cpu = listener.cpu;
        let counters = Arc::new(WorkerCounters::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_counters = Arc::clone(&counters);
        let thread = thread::Builder::new()
            .name(format!("reuseport-cpu{cpu}"))
            .spawn(move || {
                let runtime = match start_on_cpu(cpu) {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let served = serve(listener, &thread_counters, &policy, shutdown, || {
                        let _ = ready_tx.send(Ok(()));
                    });
                    if let Err(source) = served.await {
                        // Only registration with the runtime can fail before `ready`; report it.
                        let _ = ready_tx.send(Err(WorkerError::Start { cpu, source }));
                    }
                });
                // Connections still open are dropped with the runtime.
                runtime.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(|source| WorkerError::Start { cpu, source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                cpu,
                counters,
                thread,
            }),
            Ok(Err(err)) => {
                let _ = thread.join();
                Err(err)
            }
            Err(_) => {
                let _ = thread.join();
                Err(WorkerError::Panicked { cpu })
            }
        }
    }

    /// The CPU this worker is pinned to.
    pub fn cpu(&self) -> u32 {
        self.cpu
    }

    /// Whether the thread has ended (a stopped worker has finished draining).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// The worker's counters, now.
    pub fn stats(&self) -> WorkerStats {
        WorkerStats::from_counters(self.cpu, &self.counters)
    }

    /// Waits for the thread to finish (after shutdown was signalled) and returns its final
    /// counters.
    pub fn join(self) -> Result<WorkerStats, WorkerError> {
        let Self {
            cpu,
            counters,
            thread,
        } = self;
        thread.join().map_err(|_| WorkerError::Panicked { cpu })?;
        Ok(WorkerStats::from_counters(cpu, &counters))
    }
}

fn start_on_cpu(cpu: u32) -> Result<tokio::runtime::Runtime, WorkerError> {
    pin_current_thread(cpu).map_err(|source| WorkerError::Pin { cpu, source })?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| WorkerError::Start { cpu, source })
}

async fn serve(
    listener: CpuListener,
    counters: &Arc<WorkerCounters>,
    policy: &ConnectionPolicy,
    mut shutdown: watch::Receiver<bool>,
    ready: impl FnOnce(),
) -> io::Result<()> {
    let cpu = listener.cpu;
    match listener.socket.r#type()? {
        socket2::Type::DGRAM => {
            let socket = UdpSocket::from_std(StdUdpSocket::from(listener.socket))?;
            ready();
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => {}
                () = serve_udp(&socket, cpu, counters) => {}
            }
            // A restart has already given this socket's steering slot to the replacement, but
            // a softirq that picked this socket just before may still be queueing a datagram
            // here. Those run under RCU: one grace period (what membarrier's global command
            // waits for) lets every one of them finish. Kernels with nohz_full CPUs refuse the
            // command; there the drain below may, rarely, miss such a datagram.
            let _ = rustix::thread::membarrier(rustix::thread::MembarrierCommand::Global);
            // Then answer what is queued before the socket closes, asking the kernel itself:
            // tokio's `try_recv_from` trusts the readiness its reactor last saw, and datagrams
            // whose wake-up it had not processed yet would stay queued and die with the socket.
            match socket.into_std() {
                Ok(socket) => answer_queued_udp(&socket, cpu, counters),
                // Taking it back from the runtime failed (epoll would not let go of it): what
                // is queued is lost with the socket, and counted.
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        _ => {
            let listener = TcpListener::from_std(StdTcpListener::from(listener.socket))?;
            ready();
            let mut connections = JoinSet::new();
            let table = Arc::new(ConnectionTable::default());
            policy.shedder.add(Arc::clone(&table));
            let tcp = TcpWorker {
                cpu,
                counters,
                policy,
                table: &table,
            };
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => {}
                () = tcp.accept_loop(&listener, &mut connections) => {}
            }
            // Close the listener first: with the select-or-migrate program the kernel moves what
            // is still in its accept queue to a live listener instead of resetting it.
            drop(listener);
            // Then let the connections already accepted drain (each answers what it reads with
            // `connection: close`; idle ones close after DRAIN_TIMEOUT).
            table.drain_all();
            let drained = async { while connections.join_next().await.is_some() {} };
            let _ = tokio::time::timeout(DRAIN_TIMEOUT + DRAIN_GRACE, drained).await;
            // Those still open are dropped here.
            drop(connections);
            policy.shedder.remove(&table);
        }
    }
    Ok(())
}

/// What a TCP worker's accept loop needs.
struct TcpWorker<'a> {
    cpu: u32,
    counters: &'a Arc<WorkerCounters>,
    policy: &'a ConnectionPolicy,
    table: &'a Arc<ConnectionTable>,
}

impl TcpWorker<'_> {
    async fn accept_loop(&self, listener: &TcpListener, connections: &mut JoinSet<()>) {
        loop {
            // Forget the connections that have ended.
            while connections.try_join_next().is_some() {}
            match listener.accept().await {
                Ok((stream, _peer)) => self.start_connection(stream, connections),
                Err(err) if out_of_descriptors(&err) => match self.policy.shedder.shed_oldest() {
                    // Let the shed connection close (if it is one of ours) before accepting.
                    Shed::One => tokio::task::yield_now().await,
                    Shed::Pending => tokio::time::sleep(SHED_WAIT).await,
                    Shed::Nothing => self.accept_failed().await,
                },
                Err(_) => self.accept_failed().await,
            }
        }
    }

    async fn accept_failed(&self) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
    }

    fn start_connection(&self, stream: TcpStream, connections: &mut JoinSet<()>) {
        let incoming_cpu = incoming_cpu(SockRef::from(&stream));
        count_arrival(self.counters, self.cpu, incoming_cpu);
        // Best effort: a failure only costs latency.
        let _ = stream.set_nodelay(true);
        let served_by = ServedBy {
            worker_cpu: self.cpu,
            incoming_cpu,
        };
        let clock = ConnectionClock::accepted();
        let registration = self.table.register(Arc::clone(&clock));
        let counters = Arc::clone(self.counters);
        let timeouts = self.policy.timeouts;
        // The runtime is single-threaded: the connection stays on this worker's CPU.
        connections.spawn(async move {
            let _registered = registration;
            let requests = Arc::clone(&counters.requests);
            match serve_connection(stream, served_by, requests, clock, timeouts).await {
                Ended::TimedOut(_) => counters.timed_out.fetch_add(1, Ordering::Relaxed),
                Ended::Shed => counters.shed.fetch_add(1, Ordering::Relaxed),
                Ended::Closed | Ended::Drained | Ended::Failed(_) => 0,
            };
        });
    }
}

/// Whether an accept failed because the process (`EMFILE`) or the system (`ENFILE`) has no file
/// descriptor left: the connection stays queued, and closing one of ours makes room for it.
fn out_of_descriptors(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// UDP: each datagram is answered with the `ServedBy` line, a newline, and the datagram's payload.
async fn serve_udp(socket: &UdpSocket, cpu: u32, counters: &WorkerCounters) {
    let mut buffer = vec![0u8; 65536];
    loop {
        let (len, peer) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(_) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let reply = udp_reply(counters, cpu, &buffer[..len]);
        count_sent(counters, socket.send_to(&reply, peer).await);
    }
}

/// Answers the datagrams already queued on `socket`, without waiting for more.
/// `socket` is non-blocking: the first `recv_from` that finds the queue empty ends it.
fn answer_queued_udp(socket: &StdUdpSocket, cpu: u32, counters: &WorkerCounters) {
    let mut buffer = vec![0u8; 65536];
    while let Ok((len, peer)) = socket.recv_from(&mut buffer) {
        let reply = udp_reply(counters, cpu, &buffer[..len]);
        count_sent(counters, socket.send_to(&reply, peer));
    }
}

/// Counts a received datagram and builds its reply: the `ServedBy` line, a newline, `payload`.
fn udp_reply(counters: &WorkerCounters, cpu: u32, payload: &[u8]) -> Vec<u8> {
    // The kernel records a datagram's CPU in SO_INCOMING_CPU only for connected UDP sockets; on
    // this unconnected one the option holds -1 or, in incoming-cpu mode, the value we set
    // ourselves. Neither is an observation, so say "unknown"; the steering program's per-CPU
    // counters say where datagrams arrived.
    let incoming_cpu = None;
    count_arrival(counters, cpu, incoming_cpu);
    let served_by = ServedBy {
        worker_cpu: cpu,
        incoming_cpu,
    };
    let mut reply = format!("{}\n", served_by.line()).into_bytes();
    reply.extend_from_slice(payload);
    reply
}

/// Counts a reply as answered, or its send as an error.
fn count_sent(counters: &WorkerCounters, sent: io::Result<usize>) {
    match sent {
        Ok(_) => counters.requests.fetch_add(1, Ordering::Relaxed),
        Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
    };
}

impl WorkerStats {
    /// Reads `counters` of the worker on `cpu`.
    fn from_counters(cpu: u32, counters: &WorkerCounters) -> Self {
        Self {
            cpu,
            accepted: counters.accepted.load(Ordering::Relaxed),
            local: counters.local.load(Ordering::Relaxed),
            unknown_incoming: counters.unknown_incoming.load(Ordering::Relaxed),
            requests: counters.requests.load(Ordering::Relaxed),
            errors: counters.errors.load(Ordering::Relaxed),
            timed_out: counters.timed_out.load(Ordering::Relaxed),
            shed: counters.shed.load(Ordering::Relaxed),
        }
    }
}

fn count_arrival(counters: &WorkerCounters, cpu: u32, incoming_cpu: Option<u32>) {
    counters.accepted.fetch_add(1, Ordering::Relaxed);
    match incoming_cpu {
        Some(incoming) if incoming == cpu => counters.local.fetch_add(1, Ordering::Relaxed),
        Some(_) => 0,
        None => counters.unknown_incoming.fetch_add(1, Ordering::Relaxed),
    };
}

/// `SO_INCOMING_CPU`: the CPU that processed the socket's most recent packet (-1 → `None`).
fn incoming_cpu(socket: SockRef<'_>) -> Option<u32> {
    socket
        .cpu_affinity()
        .ok()
        .and_then(|cpu| u32::try_from(cpu).ok())
}
