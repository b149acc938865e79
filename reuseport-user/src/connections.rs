//! The open TCP connections of a server: how long each may take to send a request head or stay
//! silent between requests ([`Timeouts`]), what each is doing now ([`ConnectionClock`]), and the
//! tables a worker that runs out of file descriptors sheds the longest-waiting ones from
//! ([`Shedder`]).
//!
//! A connection is either *waiting* for a request head or *busy* with a request:
//!
//! - a new connection must send its whole first request head within [`Timeouts::header`] of being
//!   accepted;
//! - after a response, a keep-alive connection may stay silent for [`Timeouts::idle`]; once the
//!   first byte of its next request arrives, the rest of that head must arrive within
//!   [`Timeouts::header`] of it;
//! - a busy connection has no deadline here (the demo answers at once).

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};

/// Errors from checking [`Timeouts`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TimeoutError {
    /// A timeout is shorter than [`Timeouts::MIN`] or longer than [`Timeouts::MAX`].
    #[error(
        "the {name} timeout is {value:?}; it must be at least {min:?} and at most {max:?}",
        min = Timeouts::MIN,
        max = Timeouts::MAX
    )]
    OutOfRange {
        /// `header` or `idle`.
        name: &'static str,
        /// The value given.
        value: Duration,
    },
}

/// How long a TCP connection may take to send a request head, and may stay silent between
/// requests, before the worker closes it (see the [module](self) documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept (first request) or from the first byte of a later request, until the whole
    /// request head has arrived.
    pub header: Duration,
    /// From the end of a response until the first byte of the next request.
    pub idle: Duration,
}

impl Timeouts {
    /// The shortest timeout accepted: below it, an ordinary client on a lossy link would be cut
    /// off by one retransmission.
    pub const MIN: Duration = Duration::from_millis(100);
    /// The longest timeout accepted: an hour, far past any client's own keep-alive period.
    pub const MAX: Duration = Duration::from_secs(3600);

    /// Checks that both timeouts are within [`Timeouts::MIN`] and [`Timeouts::MAX`].
    pub fn check(&self) -> Result<(), TimeoutError> {
        for (name, value) in [("header", self.header), ("idle", self.idle)] {
            if !(Self::MIN..=Self::MAX).contains(&value) {
                return Err(TimeoutError::OutOfRange { name, value });
            }
        }
        Ok(())
    }

    /// The shorter of the two: how far ahead a connection's timer is ever set, so that no
    /// change of phase can move its deadline before the timer (see [`ConnectionClock::next_check`]).
    fn shorter(&self) -> Duration {
        self.header.min(self.idle)
    }
}

impl Default for Timeouts {
    /// 30 s for a request head (hyper's own default, half of nginx's `client_header_timeout`: a
    /// head is one or two segments, so 30 s covers four retransmissions of it, while a client
    /// sending a byte a second is cut off after 30 bytes), 75 s between requests (nginx's
    /// `keepalive_timeout`: longer than the idle period of most client pools, so a client rarely
    /// sends on a connection the server is just closing).
    fn default() -> Self {
        Self {
            header: Duration::from_secs(30),
            idle: Duration::from_secs(75),
        }
    }
}

/// Which timeout closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// The request head did not arrive within [`Timeouts::header`].
    Header,
    /// No request began within [`Timeouts::idle`] of the last response.
    Idle,
}

/// What a connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head.
    Waiting {
        /// When the connection was accepted, or its last response was produced.
        since: Instant,
        /// No request yet on this connection.
        first: bool,
        /// When the first byte of the next request arrived.
        first_byte: Option<Instant>,
    },
    /// Between a request head and the end of its response.
    Busy,
}

/// What one connection is doing, shared between its task (which updates it as bytes and
/// requests come and go, with a few relaxed atomic stores per request), its worker (which may ask
/// it to drain) and the [`Shedder`] (which may ask it to close).
#[derive(Debug)]
pub struct ConnectionClock {
    /// When the connection was accepted: the origin of the times below.
    accepted: Instant,
    /// Nanoseconds after `accepted` when the connection began waiting for a request; [`BUSY`]
    /// while it is busy with one.
    waiting_since: AtomicU64,
    /// Nanoseconds after `accepted`, plus one, when the first byte of the awaited request arrived;
    /// 0 while none has.
    first_byte: AtomicU64,
    /// Whether a request has begun on this connection (from then on the idle timeout applies
    /// between requests).
    served: AtomicBool,
    /// The worker is stopping: answer with `connection: close`.
    draining: AtomicBool,
    /// The [`Shedder`] asked the connection to close.
    shed: AtomicBool,
    /// Woken when `draining` or `shed` is set.
    attention: Notify,
}

/// [`ConnectionClock::waiting_since`] of a busy connection.
const BUSY: u64 = u64::MAX;

impl ConnectionClock {
    /// A connection accepted now.
    pub fn accepted() -> Arc<Self> {
        Arc::new(Self {
            accepted: Instant::now(),
            waiting_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(0),
            served: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            shed: AtomicBool::new(false),
            attention: Notify::new(),
        })
    }

    /// Nanoseconds from accept to now (saturating below [`BUSY`], some 584 years).
    fn nanos_now(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_nanos()).unwrap_or(BUSY - 1)
    }

    fn at(&self, nanos: u64) -> Instant {
        self.accepted + Duration::from_nanos(nanos)
    }

    fn phase(&self) -> Phase {
        let since = self.waiting_since.load(Ordering::Relaxed);
        if since == BUSY {
            return Phase::Busy;
        }
        let first_byte = self.first_byte.load(Ordering::Relaxed);
        Phase::Waiting {
            since: self.at(since),
            first: !self.served.load(Ordering::Relaxed),
            first_byte: (first_byte != 0).then(|| self.at(first_byte - 1)),
        }
    }

    /// Bytes arrived: if the connection was waiting for a request, its head has begun.
    pub fn bytes_arrived(&self) {
        if self.first_byte.load(Ordering::Relaxed) == 0
            && self.waiting_since.load(Ordering::Relaxed) != BUSY
        {
            self.first_byte
                .store(self.nanos_now().saturating_add(1), Ordering::Relaxed);
        }
    }

    /// A whole request head arrived: the connection is busy until its response is produced.
    pub fn request_started(&self) {
        self.served.store(true, Ordering::Relaxed);
        self.waiting_since.store(BUSY, Ordering::Relaxed);
    }

    /// The response was produced: the connection waits for its next request.
    pub fn response_finished(&self) {
        self.first_byte.store(0, Ordering::Relaxed);
        self.waiting_since
            .store(self.nanos_now(), Ordering::Relaxed);
    }

    /// Whether the connection waits for a request and nothing of it has arrived (so closing it
    /// loses nothing the client sent).
    pub fn is_idle(&self) -> bool {
        matches!(
            self.phase(),
            Phase::Waiting {
                first_byte: None,
                ..
            }
        )
    }

    /// The deadline of the current phase and the timeout it enforces; `None` while busy.
    fn deadline(&self, timeouts: &Timeouts) -> Option<(Instant, Timeout)> {
        match self.phase() {
            Phase::Waiting {
                first_byte: Some(first_byte),
                ..
            } => Some((first_byte + timeouts.header, Timeout::Header)),
            Phase::Waiting {
                since, first: true, ..
            } => Some((since + timeouts.header, Timeout::Header)),
            Phase::Waiting { since, .. } => Some((since + timeouts.idle, Timeout::Idle)),
            Phase::Busy => None,
        }
    }

    /// The timeout that has run out at `now`, if any.
    pub fn expired(&self, timeouts: &Timeouts, now: Instant) -> Option<Timeout> {
        self.deadline(timeouts)
            .and_then(|(deadline, timeout)| (deadline <= now).then_some(timeout))
    }

    /// When the connection's timer should next fire: its deadline, but at most
    /// [`Timeouts::header`] or [`Timeouts::idle`] (the shorter) from `now`. Every phase's
    /// deadline lies at least that far after the phase began, so a timer set this way never
    /// fires after a deadline, without resetting it on each byte or request.
    pub fn next_check(&self, timeouts: &Timeouts, now: Instant) -> Instant {
        let latest = now + timeouts.shorter();
        self.deadline(timeouts)
            .map_or(latest, |(deadline, _)| deadline.min(latest))
    }

    /// Waits until the connection is asked to drain or to close; see [`ConnectionClock::is_shed`]
    /// and [`ConnectionClock::is_draining`].
    pub async fn attention(&self) {
        self.attention.notified().await;
    }

    /// Asks the connection to drain: answer every request with `connection: close`.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.attention.notify_one();
    }

    /// Whether the connection was asked to drain.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the [`Shedder`] asked the connection to close.
    pub fn is_shed(&self) -> bool {
        self.shed.load(Ordering::Relaxed)
    }

    /// When the connection began waiting, if it waits for a request and was not asked to close
    /// yet: the [`Shedder`] closes the one waiting longest first.
    fn waiting_since(&self) -> Option<Instant> {
        match self.phase() {
            Phase::Waiting { since, .. } if !self.is_shed() => Some(since),
            _ => None,
        }
    }

    fn shed(&self) {
        self.shed.store(true, Ordering::Relaxed);
        self.attention.notify_one();
    }
}

/// The open connections of one worker. The worker registers each connection it accepts; the
/// [`Registration`] removes it again when the connection's task ends.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnectionClock>>>,
}

impl ConnectionTable {
    fn open(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnectionClock>>> {
        // The map stays consistent across a panic elsewhere (inserts and removes are whole).
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds `clock`'s connection; it stays in the table until the returned value is dropped.
    pub fn register(self: &Arc<Self>, clock: Arc<ConnectionClock>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open().insert(id, clock);
        Registration {
            table: Arc::clone(self),
            id,
        }
    }

    /// Connections in the table now.
    pub fn len(&self) -> usize {
        self.open().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.open().is_empty()
    }

    /// Asks every connection in the table to drain ([`ConnectionClock::drain`]).
    pub fn drain_all(&self) {
        for clock in self.open().values() {
            clock.drain();
        }
    }
}

/// A connection's place in its [`ConnectionTable`]; dropping it removes the connection.
#[derive(Debug)]
pub struct Registration {
    table: Arc<ConnectionTable>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.open().remove(&self.id);
    }
}

/// What [`Shedder::shed_oldest`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// Asked the connection that has waited longest for a request to close.
    One,
    /// Connections asked to close earlier have not closed yet: nothing more was asked.
    Pending,
    /// No connection waits for a request: every one is busy.
    Nothing,
}

/// The connection tables of every worker of a server, for shedding across workers: the file
/// descriptor limit is the process's, so a worker whose accept fails with `EMFILE` may have to
/// close another worker's connections.
#[derive(Debug, Default)]
pub struct Shedder {
    tables: Mutex<Vec<Arc<ConnectionTable>>>,
}

impl Shedder {
    fn tables(&self) -> MutexGuard<'_, Vec<Arc<ConnectionTable>>> {
        // A list of `Arc`s stays consistent across a panic elsewhere.
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a worker's table.
    pub fn add(&self, table: Arc<ConnectionTable>) {
        self.tables().push(table);
    }

    /// Removes a worker's table (the worker has ended).
    pub fn remove(&self, table: &Arc<ConnectionTable>) {
        self.tables().retain(|held| !Arc::ptr_eq(held, table));
    }

    /// Asks the connection that has waited longest for a request, in any worker, to close, unless
    /// connections asked earlier are still open (then their descriptors are about to be freed).
    pub fn shed_oldest(&self) -> Shed {
        let tables = self.tables().clone();
        let mut oldest: Option<(Instant, Arc<ConnectionClock>)> = None;
        for table in &tables {
            for clock in table.open().values() {
                if clock.shed.load(Ordering::Relaxed) {
                    return Shed::Pending;
                }
                if let Some(since) = clock.waiting_since()
                    && oldest.as_ref().is_none_or(|(oldest, _)| since < *oldest)
                {
                    oldest = Some((since, Arc::clone(clock)));
                }
            }
        }
        match oldest {
            Some((_, clock)) => {
                clock.shed();
                Shed::One
            }
            None => Shed::Nothing,
        }
    }
}

/// A stream that tells its connection's [`ConnectionClock`] when bytes arrive.
#[derive(Debug)]
pub struct ClockedStream<S> {
    stream: S,
    clock: Arc<ConnectionClock>,
}

impl<S> ClockedStream<S> {
    /// `stream`, reporting to `clock`.
    pub fn new(stream: S, clock: Arc<ConnectionClock>) -> Self {
        Self { stream, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClockedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.bytes_arrived();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClockedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header: Duration::from_secs(2),
        idle: Duration::from_secs(5),
    };

    #[test]
    fn a_new_connection_has_the_header_timeout_from_accept() {
        let clock = ConnectionClock::accepted();
        let now = Instant::now();
        assert_eq!(clock.expired(&TIMEOUTS, now), None);
        assert_eq!(
            clock.expired(&TIMEOUTS, now + Duration::from_secs(3)),
            Some(Timeout::Header)
        );
    }

    #[test]
    fn between_requests_the_idle_timeout_then_the_header_timeout_from_the_first_byte() {
        let clock = ConnectionClock::accepted();
        clock.request_started();
        assert_eq!(
            clock.expired(&TIMEOUTS, Instant::now() + TIMEOUTS.idle * 10),
            None
        );
        clock.response_finished();
        let now = Instant::now();
        assert_eq!(clock.expired(&TIMEOUTS, now + Duration::from_secs(3)), None);
        assert_eq!(
            clock.expired(&TIMEOUTS, now + Duration::from_secs(6)),
            Some(Timeout::Idle)
        );
        clock.bytes_arrived();
        let first_byte = Instant::now();
        assert_eq!(
            clock.expired(&TIMEOUTS, first_byte + Duration::from_secs(3)),
            Some(Timeout::Header)
        );
        // The timer never waits past the shorter timeout, whatever the phase.
        assert!(clock.next_check(&TIMEOUTS, now) <= now + TIMEOUTS.header);
    }

    #[test]
    fn the_connection_waiting_longest_is_shed_first_and_only_one_at_a_time() {
        let shedder = Shedder::default();
        let (a, b) = (
            Arc::new(ConnectionTable::default()),
            Arc::new(ConnectionTable::default()),
        );
        shedder.add(Arc::clone(&a));
        shedder.add(Arc::clone(&b));
        let busy = ConnectionClock::accepted();
        busy.request_started();
        let oldest = ConnectionClock::accepted();
        std::thread::sleep(Duration::from_millis(2));
        let newer = ConnectionClock::accepted();
        let _busy = a.register(Arc::clone(&busy));
        let _newer = a.register(Arc::clone(&newer));
        let oldest_registration = b.register(Arc::clone(&oldest));
        assert_eq!(shedder.shed_oldest(), Shed::One);
        assert!(oldest.is_shed());
        assert_eq!(shedder.shed_oldest(), Shed::Pending);
        drop(oldest_registration);
        assert_eq!(shedder.shed_oldest(), Shed::One);
        assert!(newer.is_shed());
        assert!(!busy.is_shed());
    }

    #[test]
    fn timeouts_out_of_range_are_refused() {
        assert_eq!(Timeouts::default().check(), Ok(()));
        let zero = Timeouts {
            header: Duration::ZERO,
            ..Timeouts::default()
        };
        assert!(zero.check().is_err());
        let day = Timeouts {
            idle: Duration::from_secs(86_400),
            ..Timeouts::default()
        };
        assert!(day.check().is_err());
    }
}
