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
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpStream,
    sync::{Notify, watch},
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

/// Serves HTTP/1.1 requests on `stream` until the client closes it, counting each in `requests`.
/// Once `shutdown` becomes `true` the connection closes gracefully: an idle one at once, a busy
/// one after answering its current request (with `connection: close`).
pub async fn serve_connection(
    stream: TcpStream,
    served_by: ServedBy,
    requests: Arc<AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), hyper::Error> {
    let body = Bytes::from(format!("{}\n", served_by.line()));
    let incoming = served_by.incoming();
    let worker = served_by.worker_cpu.to_string();
    let request_seen = Arc::new(Notify::new());
    let seen = Arc::clone(&request_seen);
    let service = service_fn(move |_request: Request<Incoming>| {
        requests.fetch_add(1, Ordering::Relaxed);
        seen.notify_one();
        let response = Response::builder()
            .header(WORKER_CPU_HEADER, worker.as_str())
            .header(INCOMING_CPU_HEADER, incoming.as_str())
            .header("content-type", "text/plain")
            .body(Full::new(body.clone()));
        async move {
            // The builder only fails on invalid header names/values; ours are fixed and valid.
            Ok::<_, Infallible>(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
        }
    });
    let connection = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => return result,
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
    // A connection accepted just before shutdown may not have sent its request yet, and hyper
    // closes a connection without a request at once: wait (briefly) for one first.
    tokio::select! {
        result = connection.as_mut() => return result,
        () = request_seen.notified() => {}
        () = tokio::time::sleep(FIRST_REQUEST_GRACE) => {}
    }
    connection.as_mut().graceful_shutdown();
    connection.await
}

/// How long a connection accepted just before shutdown has to send its first request.
const FIRST_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
