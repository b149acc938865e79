//! The built-in load generator (`reuseport load`): real clients against a server, every loop
//! bounded by a duration and a request count.
//!
//! - [`LoadKind::Crr`]: connect, one HTTP/1.1 request with `Connection: close`, wait for the
//!   server to close, close (like netperf `TCP_CRR` or neper `tcp_crr`): every request is a new
//!   connection, so it measures accept-path behaviour.
//! - [`LoadKind::Rr`]: keep-alive HTTP/1.1 requests over long-lived connections.
//! - [`LoadKind::Udp`]: one datagram and its reply, each from a new socket (a new 4-tuple, so
//!   each is a new reuseport selection).
//!
//! Closed loop by default (each of `connections` clients sends as soon as its previous request
//! finished). With a `rate`, open loop (wrk2-style): requests are scheduled at fixed intervals and
//! latency is measured from the *scheduled* start, so a stalled server shows as latency instead of
//! silently lowering the offered load (no coordinated omission).

use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use reuseport::cpus::{CpuError, CpuList, pin_current_thread};
use serde::Serialize;
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

/// Errors that stop a load run from starting or finishing (individual failed requests are only
/// counted, see [`LoadReport::errors`]).
#[derive(Debug, Error)]
pub enum LoadError {
    /// Pinning a client thread failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A client thread or its runtime could not be created.
    #[error("starting client thread failed")]
    Thread(#[source] io::Error),
    /// A client thread panicked.
    #[error("a client thread panicked")]
    Panicked,
    /// The latency histogram could not be created.
    #[error("creating the latency histogram failed")]
    Histogram(#[source] hdrhistogram::CreationError),
    /// The configuration cannot run.
    #[error("invalid load: {0}")]
    Invalid(&'static str),
}

/// What each client does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadKind {
    /// A new TCP connection per HTTP request.
    Crr,
    /// Keep-alive HTTP requests over long-lived connections.
    Rr,
    /// UDP request/reply, a new socket per request.
    Udp,
}

/// A load run's settings.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The server.
    pub target: SocketAddr,
    /// What each client does.
    pub kind: LoadKind,
    /// Concurrent clients (connections for TCP, outstanding requests for UDP).
    pub connections: usize,
    /// Stop after this long.
    pub duration: Duration,
    /// Stop after this many requests in all, whichever comes first.
    pub max_requests: u64,
    /// Open loop at this many requests per second in all; `None`: closed loop.
    pub rate: Option<f64>,
    /// Client threads; each is pinned to its CPU when `pin` is set.
    pub cpus: CpuList,
    /// Pin client thread `i` to the `i`-th CPU of `cpus` (a pinned loopback sender's SYN is
    /// processed on its own CPU).
    pub pin: bool,
    /// Give up on one request after this long (counted as an error).
    pub request_timeout: Duration,
}

/// The outcome of a load run.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct LoadReport {
    /// Requests answered.
    pub requests: u64,
    /// Connections opened (TCP), or sockets used (UDP).
    pub connections: u64,
    /// Requests that failed (refused, reset, timed out, bad response).
    pub errors: u64,
    /// Seconds the run took.
    pub duration_s: f64,
    /// New connections per second.
    pub conn_per_s: f64,
    /// Requests answered per second.
    pub req_per_s: f64,
    /// Latency percentiles in microseconds (from the scheduled start in open loop).
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// 99.9th percentile latency, µs.
    pub p999_us: f64,
    /// Largest latency, µs.
    pub max_us: f64,
}

/// Shared between client threads: the request budget and the totals.
struct Shared {
    budget: AtomicU64,
    requests: AtomicU64,
    connections: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    /// Takes one request from the budget; `false` when it is spent.
    fn take(&self) -> bool {
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            })
            .is_ok()
    }
}

/// Latency histogram bounds: 1 µs to 100 s at 3 significant digits.
fn latency_histogram() -> Result<Histogram<u64>, LoadError> {
    Histogram::new_with_bounds(1, 100_000_000, 3).map_err(LoadError::Histogram)
}

/// Runs the load and reports what it measured.
pub fn run(config: &LoadConfig) -> Result<LoadReport, LoadError> {
    if config.connections == 0 {
        return Err(LoadError::Invalid("connections must be at least 1"));
    }
    if config.cpus.is_empty() {
        return Err(LoadError::Invalid("no client CPUs"));
    }
    if config
        .rate
        .is_some_and(|rate| !rate.is_finite() || rate <= 0.0)
    {
        return Err(LoadError::Invalid("rate must be a positive number"));
    }
    let shared = Arc::new(Shared {
        budget: AtomicU64::new(config.max_requests),
        requests: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let cpus: Vec<u32> = config.cpus.iter().collect();
    let threads = cpus.len().min(config.connections);
    let started = Instant::now();
    let deadline = started + config.duration;
    let mut handles = Vec::with_capacity(threads);
    let template = latency_histogram()?;
    for (index, &cpu) in cpus.iter().take(threads).enumerate() {
        // Spread the clients over the threads as evenly as possible.
        let clients =
            config.connections / threads + usize::from(index < config.connections % threads);
        let config = config.clone();
        let shared = Arc::clone(&shared);
        let template = template.clone();
        let handle = thread::Builder::new()
            .name(format!("load-cpu{cpu}"))
            .spawn(move || client_thread(&config, cpu, clients, deadline, &shared, &template))
            .map_err(LoadError::Thread)?;
        handles.push(handle);
    }
    let mut histogram = latency_histogram()?;
    for handle in handles {
        let thread_histogram = handle.join().map_err(|_| LoadError::Panicked)??;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = histogram.add(&thread_histogram);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let requests = shared.requests.load(Ordering::Relaxed);
    let connections = shared.connections.load(Ordering::Relaxed);
    let us = |q: f64| histogram.value_at_quantile(q) as f64;
    Ok(LoadReport {
        requests,
        connections,
        errors: shared.errors.load(Ordering::Relaxed),
        duration_s: elapsed,
        conn_per_s: connections as f64 / elapsed,
        req_per_s: requests as f64 / elapsed,
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: histogram.max() as f64,
    })
}

fn client_thread(
    config: &LoadConfig,
    cpu: u32,
    clients: usize,
    deadline: Instant,
    shared: &Arc<Shared>,
    template: &Histogram<u64>,
) -> Result<Histogram<u64>, LoadError> {
    if config.pin {
        pin_current_thread(cpu)?;
    }
    private_descriptor_table().map_err(LoadError::Thread)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LoadError::Thread)?;
    // Each client's share of the open-loop rate.
    let interval = config
        .rate
        .map(|rate| Duration::from_secs_f64(config.connections as f64 / rate));
    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            tasks.spawn(client(
                config.clone(),
                deadline,
                interval,
                Arc::clone(shared),
                Histogram::new_from(template),
            ));
        }
        let mut histogram = Histogram::new_from(template);
        while let Some(done) = tasks.join_next().await {
            let client_histogram = done.map_err(|_| LoadError::Panicked)?;
            // Same bounds on both sides, so adding cannot fail.
            let _ = histogram.add(&client_histogram);
        }
        Ok(histogram)
    })
}

/// Gives the calling client thread a descriptor table of its own, holding only stdin, stdout
/// and stderr.
///
/// Every socket a client opens and closes takes its process's descriptor-table lock (`alloc_fd`,
/// `file_close_fd`), which all client threads of one process share: on 16 CPUs that lock was the
/// largest lock wait of a UDP run (a socket per request), the load generator's own contention
/// mixed into every figure. With a table per thread each client takes only its own lock. The
/// copies of the process's other descriptors that `unshare` leaves in the new table are closed
/// at once, so that this thread keeps none of them open (a server's connection in the same
/// process, say, closes when its owner closes it).
fn private_descriptor_table() -> io::Result<()> {
    use rustix::thread::{UnshareFlags, unshare_unsafe};
    // SAFETY: from here on this thread uses only descriptors it creates itself (its runtime's and
    // its sockets') and hands none to another thread; it owns none from before this call.
    unsafe { unshare_unsafe(UnshareFlags::FILES) }?;
    // The new table's copies, listed before any is closed (but for the listing's own, which
    // closes when the listing is dropped).
    let listing = rustix::fs::open(
        "/proc/thread-self/fd",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let own = listing.as_raw_fd();
    let copies: Vec<i32> = rustix::fs::Dir::new(listing)?
        .filter_map(|entry| entry.ok()?.file_name().to_str().ok()?.parse().ok())
        .filter(|&fd| fd > 2 && fd != own)
        .collect();
    for fd in copies {
        // SAFETY: a copy in this thread's own table, open (listed above, nothing closed since)
        // and owned by nothing in this thread.
        unsafe { rustix::io::close(fd) };
    }
    Ok(())
}

/// One client: requests back to back (closed loop) or on a schedule (open loop) until the
/// deadline or the shared budget ends it.
async fn client(
    config: LoadConfig,
    deadline: Instant,
    interval: Option<Duration>,
    shared: Arc<Shared>,
    mut histogram: Histogram<u64>,
) -> Histogram<u64> {
    let mut kept_alive: Option<HttpConnection> = None;
    // Stagger open-loop clients over one interval so they do not fire in lockstep.
    let mut next = interval.map(|i| Instant::now() + i.mul_f64(fastrand_fraction()));
    while Instant::now() < deadline && shared.take() {
        let start = match (next, interval) {
            (Some(scheduled), Some(interval)) => {
                next = Some(scheduled + interval);
                if Instant::now() < scheduled {
                    // On time: wait for the slot and measure from the actual send, so the
                    // timer's own lateness (tokio's timer has 1 ms granularity) is not counted.
                    tokio::time::sleep_until(scheduled.into()).await;
                    Instant::now()
                } else {
                    // Behind schedule because the server was slow: measure from when the request
                    // should have been sent (no coordinated omission).
                    scheduled
                }
            }
            _ => Instant::now(),
        };
        let outcome = timeout(config.request_timeout, async {
            match config.kind {
                LoadKind::Crr => crr(config.target, &shared).await,
                LoadKind::Rr => rr(config.target, &mut kept_alive, &shared).await,
                LoadKind::Udp => udp(config.target, &shared).await,
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => {
                shared.requests.fetch_add(1, Ordering::Relaxed);
                let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                histogram.saturating_record(micros.max(1));
            }
            _ => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                kept_alive = None;
            }
        }
    }
    histogram
}

/// A pseudo-random fraction in [0, 1) from the clock, enough to stagger clients.
fn fastrand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

/// The request every HTTP client sends.
const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: reuseport\r\nConnection: close\r\n\r\n";
const REQUEST_KEEP_ALIVE: &[u8] = b"GET / HTTP/1.1\r\nHost: reuseport\r\n\r\n";

/// An open HTTP/1.1 connection and its read buffer.
struct HttpConnection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl HttpConnection {
    async fn open(target: SocketAddr, shared: &Shared) -> io::Result<Self> {
        let stream = TcpStream::connect(target).await?;
        shared.connections.fetch_add(1, Ordering::Relaxed);
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buffer: Vec::with_capacity(1024),
        })
    }

    /// Sends `request` and reads one whole response (headers parsed with httparse, body by
    /// `Content-Length`). Returns whether the server will keep the connection open.
    async fn exchange(&mut self, request: &[u8]) -> io::Result<bool> {
        self.stream.write_all(request).await?;
        self.buffer.clear();
        loop {
            if let Some(head) = parse_response_head(&self.buffer)? {
                while self.buffer.len() < head.total() {
                    self.read_more().await?;
                }
                return Ok(head.keep_alive);
            }
            self.read_more().await?;
        }
    }

    /// Waits for the server to close the connection (its FIN), after a response that ends it.
    ///
    /// The client closes only then, so the server is always the side that closes first and
    /// keeps the TIME_WAIT entry. A client that closed as soon as it had the response would
    /// race the server's FIN and, each time it won, hold its port in TIME_WAIT for a minute;
    /// outside loopback (`tcp_tw_reuse = 2`, the default, reuses those on loopback only) such
    /// ports cannot connect to the same server again, so every `connect` searched longer for a
    /// free port, under the port table's bucket locks, and a run slowed as they filled.
    async fn await_close(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 512];
        match self.stream.read(&mut chunk).await? {
            0 => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bytes after a response that closes the connection",
            )),
        }
    }

    async fn read_more(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

async fn crr(target: SocketAddr, shared: &Shared) -> io::Result<()> {
    let mut connection = HttpConnection::open(target, shared).await?;
    // The request said `Connection: close`, so the server closes after its response whatever
    // the response says (RFC 9112, 9.6).
    connection.exchange(REQUEST_CLOSE).await?;
    connection.await_close().await
}

async fn rr(
    target: SocketAddr,
    kept_alive: &mut Option<HttpConnection>,
    shared: &Shared,
) -> io::Result<()> {
    let mut connection = match kept_alive.take() {
        Some(connection) => connection,
        None => HttpConnection::open(target, shared).await?,
    };
    if connection.exchange(REQUEST_KEEP_ALIVE).await? {
        *kept_alive = Some(connection);
        Ok(())
    } else {
        connection.await_close().await
    }
}

async fn udp(target: SocketAddr, shared: &Shared) -> io::Result<()> {
    let local: SocketAddr = if target.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    shared.connections.fetch_add(1, Ordering::Relaxed);
    socket.connect(target).await?;
    socket.send(b"reuseport").await?;
    let mut reply = [0u8; 512];
    let len = socket.recv(&mut reply).await?;
    // The server's reply starts with its `worker-cpu=N ...` line and echoes the payload.
    if !reply[..len].ends_with(b"\nreuseport") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected UDP reply",
        ));
    }
    Ok(())
}

/// The head of an HTTP/1.1 response at the start of a buffer, once all of it has arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    /// The head's length, up to the blank line.
    pub head_len: usize,
    /// The body's length (`Content-Length`).
    pub body_len: usize,
    /// Whether the server keeps the connection open (no `Connection: close`).
    pub keep_alive: bool,
}

impl ResponseHead {
    /// How many bytes the whole response takes.
    pub fn total(&self) -> usize {
        self.head_len + self.body_len
    }
}

/// Parses the response head at the start of `buffer`: `Ok(None)` while it is incomplete, an
/// error for a status other than 200 or a response without `Content-Length`.
pub fn parse_response_head(buffer: &[u8]) -> io::Result<Option<ResponseHead>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let status = response
        .parse(buffer)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let httparse::Status::Complete(head_len) = status else {
        return Ok(None);
    };
    if response.code != Some(200) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "status is not 200",
        ));
    }
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let body_len: usize = header("content-length")
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no content-length"))?;
    let keep_alive = !header("connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
    Ok(Some(ResponseHead {
        head_len,
        body_len,
        keep_alive,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_configurations_are_refused() {
        let config = LoadConfig {
            target: "127.0.0.1:9".parse().unwrap(),
            kind: LoadKind::Crr,
            connections: 0,
            duration: Duration::from_millis(10),
            max_requests: 1,
            rate: None,
            cpus: [0].into_iter().collect(),
            pin: false,
            request_timeout: Duration::from_secs(1),
        };
        assert!(matches!(run(&config), Err(LoadError::Invalid(_))));
        let config = LoadConfig {
            connections: 1,
            rate: Some(0.0),
            ..config
        };
        assert!(matches!(run(&config), Err(LoadError::Invalid(_))));
    }

    /// A server on loopback that reads one request per connection and then, if `answer`, sends
    /// a `connection: close` response before closing; else closes without a response. Serves
    /// `connections` connections.
    fn one_request_per_connection(answer: bool, connections: usize) -> SocketAddr {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming().take(connections) {
                let mut stream = stream.unwrap();
                let mut request = Vec::new();
                let mut chunk = [0u8; 512];
                while !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                if answer {
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nok\n",
                    );
                }
            }
        });
        target
    }

    fn rr_against(target: SocketAddr, requests: u64) -> LoadReport {
        run(&LoadConfig {
            target,
            kind: LoadKind::Rr,
            connections: 1,
            duration: Duration::from_secs(10),
            max_requests: requests,
            rate: None,
            cpus: [0].into_iter().collect(),
            pin: false,
            request_timeout: Duration::from_secs(2),
        })
        .unwrap()
    }

    /// An rr client takes a response with `connection: close` as the end of that connection and
    /// opens a new one, without counting an error; a connection closed with no response to the
    /// request sent on it is an error.
    #[test]
    fn rr_reconnects_after_connection_close_and_counts_a_missing_response() {
        let report = rr_against(one_request_per_connection(true, 10), 10);
        assert_eq!(
            (report.requests, report.errors, report.connections),
            (10, 0, 10),
            "{report:?}"
        );
        let report = rr_against(one_request_per_connection(false, 3), 3);
        assert_eq!((report.requests, report.errors), (0, 3), "{report:?}");
    }

    #[test]
    fn refused_connections_are_counted_not_fatal() {
        // A port that was just free: every connect is refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        drop(listener);
        let report = run(&LoadConfig {
            target,
            kind: LoadKind::Crr,
            connections: 2,
            duration: Duration::from_secs(5),
            max_requests: 20,
            rate: None,
            cpus: [0].into_iter().collect(),
            pin: false,
            request_timeout: Duration::from_secs(1),
        })
        .unwrap();
        assert_eq!((report.requests, report.errors), (0, 20));
    }
}
