//! The demo protocol: HTTP/1.1 with keep-alive (hyper), every response saying where it was served.
//!
//! ```text
//! HTTP/1.1 200 OK
//! x-worker-cpu: 1        <- the CPU the accepting worker is pinned to
//! x-incoming-cpu: 1      <- SO_INCOMING_CPU of the connection: the CPU that processed its packets
//!
//! worker-cpu=1 incoming-cpu=1
//! ```

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming, SizeHint},
    header::CONNECTION,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::{
    connections::{ClockedStream, ConnectionClock, Timeout, Timeouts},
    worker::DRAIN_TIMEOUT,
};

/// Response header naming the CPU the serving worker is pinned to.
pub const WORKER_CPU_HEADER: &str = "x-worker-cpu";
/// Response header naming the connection's `SO_INCOMING_CPU` (`unknown` if the kernel has none).
pub const INCOMING_CPU_HEADER: &str = "x-incoming-cpu";

/// Where a connection is being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServedBy {
    /// The CPU the worker is pinned to.
    pub worker_cpu: u32,
    /// `SO_INCOMING_CPU` of the accepted socket, if the kernel recorded one.
    pub incoming_cpu: Option<u32>,
}

impl ServedBy {
    /// The first line of every response body (and of every UDP reply).
    pub fn line(&self) -> String {
        format!(
            "worker-cpu={} incoming-cpu={}",
            self.worker_cpu,
            self.incoming()
        )
    }

    fn incoming(&self) -> String {
        self.incoming_cpu
            .map_or_else(|| "unknown".to_owned(), |cpu| cpu.to_string())
    }
}

/// Why [`serve_connection`] ended.
#[derive(Debug)]
pub enum Ended {
    /// The client closed the connection, or it was closed after a response that said
    /// `connection: close`.
    Closed,
    /// A [`Timeouts`] deadline passed while the connection waited for a request head.
    TimedOut(Timeout),
    /// The worker ran out of file descriptors and closed this connection, which had waited for a
    /// request longer than any other (see [`crate::connections::Shedder`]).
    Shed,
    /// The worker was stopping and the connection sent no request within [`DRAIN_TIMEOUT`].
    Drained,
    /// The connection failed: reset by the client, or a malformed request.
    Failed(hyper::Error),
}

/// Serves HTTP/1.1 requests on `stream` until the client closes it, counting each in `requests`
/// and keeping `clock` up to date, and closes it when a [`Timeouts`] deadline passes or the
/// [`crate::connections::Shedder`] asks.
///
/// Once the worker asks it to drain ([`ConnectionClock::drain`]), every request it reads from
/// then on is answered with `connection: close` and the connection closes after that response, so
/// a client never sends a request that is not answered. One that sends no request within
/// [`DRAIN_TIMEOUT`] is closed while idle.
pub async fn serve_connection(
    stream: TcpStream,
    served_by: ServedBy,
    requests: Arc<AtomicU64>,
    clock: Arc<ConnectionClock>,
    timeouts: Timeouts,
) -> Ended {
    let body = Bytes::from(format!("{}\n", served_by.line()));
    let incoming = served_by.incoming();
    let worker = served_by.worker_cpu.to_string();
    let service_clock = Arc::clone(&clock);
    let service = service_fn(move |_request: Request<Incoming>| {
        requests.fetch_add(1, Ordering::Relaxed);
        service_clock.request_started();
        let mut response = Response::builder()
            .header(WORKER_CPU_HEADER, worker.as_str())
            .header(INCOMING_CPU_HEADER, incoming.as_str())
            .header("content-type", "text/plain");
        if service_clock.is_draining() {
            // hyper closes the connection once this response is written.
            response = response.header(CONNECTION, "close");
        }
        let clocked = |data| ClockedBody {
            data: Some(data),
            clock: Arc::clone(&service_clock),
        };
        // The builder only fails on invalid header names/values; ours are fixed and valid.
        let response = response
            .body(clocked(body.clone()))
            .unwrap_or_else(|_| Response::new(clocked(Bytes::new())));
        async move { Ok::<_, Infallible>(response) }
    });
    let stream = TokioIo::new(ClockedStream::new(stream, Arc::clone(&clock)));
    let connection = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(stream, service);
    tokio::pin!(connection);
    let timer = tokio::time::sleep_until(clock.next_check(&timeouts, Instant::now()).into());
    tokio::pin!(timer);
    let mut drain_by: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            served = connection.as_mut() => {
                return served.map_or_else(Ended::Failed, |()| Ended::Closed);
            }
            () = clock.attention() => {
                if clock.is_shed() {
                    return Ended::Shed;
                }
                if clock.is_draining() && drain_by.is_none() {
                    let by = Instant::now() + DRAIN_TIMEOUT;
                    drain_by = Some(by);
                    if timer.deadline() > by.into() {
                        timer.as_mut().reset(by.into());
                    }
                }
            }
            () = timer.as_mut() => {
                let now = Instant::now();
                if let Some(timeout) = clock.expired(&timeouts, now) {
                    return Ended::TimedOut(timeout);
                }
                if drain_by.is_some_and(|by| by <= now) && clock.is_idle() {
                    return Ended::Drained;
                }
                let next = clock.next_check(&timeouts, now);
                let next = drain_by.filter(|by| *by > now).map_or(next, |by| by.min(next));
                timer.as_mut().reset(next.into());
            }
        }
    }
}

/// A response body that tells the connection's [`ConnectionClock`] when the response is done
/// (hyper drops the body once it has taken all of it), which starts the idle timeout.
struct ClockedBody {
    data: Option<Bytes>,
    clock: Arc<ConnectionClock>,
}

impl Body for ClockedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |data| data.len() as u64))
    }
}

impl Drop for ClockedBody {
    fn drop(&mut self) {
        self.clock.response_finished();
    }
}
