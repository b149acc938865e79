//! Connections that hold a worker without sending requests: `reuseport serve` closes a connection
//! whose request head does not arrive within `--header-timeout`, and a keep-alive connection that
//! sends nothing for `--idle-timeout` (while an active one stays open); and when accept runs out
//! of file descriptors, it sheds the connections that have waited longest instead of locking new
//! clients out. Real sockets against a real `serve` process. Needs root (steering).

mod common;

use std::{
    io::Write,
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use common::*;

/// Stops `server` with SIGTERM and returns its summary (`--stats-json` at `stats`).
fn stop(server: ServeProcess, stats: &std::path::Path) -> serde_json::Value {
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let (status, _, stderr) = server.finish();
    assert!(status.success(), "serve failed: {stderr}");
    serde_json::from_str(&std::fs::read_to_string(stats).unwrap()).unwrap()
}

/// Sends `head` one byte every 100 ms until the server closes the connection (or `limit`
/// passes); when it closed, counted from the connection's start.
fn trickle_until_closed(mut stream: TcpStream, head: &[u8], limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    for byte in head.iter().cycle() {
        if stream.write_all(&[*byte]).is_err() {
            return Some(started.elapsed());
        }
        if wait_for_close(&mut stream, Duration::from_millis(100)).is_some() {
            return Some(started.elapsed());
        }
        if started.elapsed() > limit {
            return None;
        }
    }
    None
}

/// `serve` with these header and idle timeouts, writing its summary into a scratch directory
/// (returned, to keep it, with the summary's path).
fn serve_with_timeouts(
    header: &str,
    idle: &str,
) -> (ServeProcess, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let server = ServeProcess::start(&[
        "--quiet",
        "--listen",
        "127.0.0.1:0",
        "--header-timeout",
        header,
        "--idle-timeout",
        idle,
        "--stats-json",
        stats.to_str().unwrap(),
    ]);
    (server, dir, stats)
}

#[test]
fn a_slow_or_silent_request_head_is_closed_after_the_header_timeout() {
    let (server, _dir, stats) = serve_with_timeouts("1s", "20s");
    let addr = server.addr;
    // A client that sends its head a byte every 100 ms (the head is 33 bytes: 3.3 s).
    let slow = thread::spawn(move || {
        let stream = connect_with_timeout(addr).expect("connect");
        trickle_until_closed(
            stream,
            b"GET / HTTP/1.1\r\nHost: slowloris\r\n\r\n",
            Duration::from_secs(8),
        )
    });
    // A client that connects and sends nothing.
    let mut silent = connect_with_timeout(addr).expect("connect");
    let silent_closed = wait_for_close(&mut silent, Duration::from_secs(8));
    let slow_closed = slow.join().unwrap();
    // A prompt client is served (`http_get` panics otherwise).
    http_get(addr);
    let summary = stop(server, &stats);

    let within = |closed: Option<Duration>| {
        closed.is_some_and(|after| {
            after >= Duration::from_millis(900) && after < Duration::from_secs(4)
        })
    };
    assert!(
        within(slow_closed),
        "slow head closed after {slow_closed:?}, not about 1 s"
    );
    assert!(
        within(silent_closed),
        "silent connection closed after {silent_closed:?}"
    );
    assert_eq!(summary["total"]["timed_out"].as_u64(), Some(2), "{summary}");
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_an_active_one_is_not() {
    let (server, _dir, stats) = serve_with_timeouts("20s", "1s");
    let addr = server.addr;
    // The active connection: a request every 200 ms for 3 s, all on one connection.
    let active = thread::spawn(move || {
        let mut stream = connect_with_timeout(addr).expect("connect");
        let started = Instant::now();
        let mut requests = 0;
        while started.elapsed() < Duration::from_secs(3) {
            assert!(
                keep_alive_request(&mut stream).expect("the active connection stays open"),
                "no `connection: close` for an active connection"
            );
            requests += 1;
            thread::sleep(Duration::from_millis(200));
        }
        requests
    });
    let mut idle = connect_with_timeout(addr).expect("connect");
    assert!(keep_alive_request(&mut idle).expect("first request"));
    let idle_closed = wait_for_close(&mut idle, Duration::from_secs(8));
    let active_requests = active.join().unwrap();
    let summary = stop(server, &stats);

    assert!(
        idle_closed.is_some_and(
            |after| after >= Duration::from_millis(900) && after < Duration::from_secs(4)
        ),
        "the idle connection closed after {idle_closed:?}, not about 1 s"
    );
    // 3 s of requests 200 ms apart: about 15 on an idle machine, fewer on a loaded one; what
    // matters is that it stayed open for three times the idle timeout (the loop's `expect`).
    assert!(active_requests >= 5, "{active_requests} requests");
    assert_eq!(summary["total"]["timed_out"].as_u64(), Some(1), "{summary}");
}

#[test]
fn out_of_file_descriptors_the_longest_waiting_connections_are_shed_for_new_clients() {
    const IDLE: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    // 64 file descriptors in all for `serve`: room for a few dozen connections.
    let server = ServeProcess::start_with(
        &["prlimit", "--nofile=64:64", "--"],
        &[
            "--quiet",
            "--listen",
            "127.0.0.1:0",
            "--stats-json",
            stats.to_str().unwrap(),
        ],
    );
    let addr = server.addr;
    // Idle connections from one CPU and the new client from another, where there are two: the
    // worker that accepts the new client may have to shed another worker's connections.
    let (idle_cpu, client_cpu) = two_cpus().unwrap_or((0, 0));
    let idle: Vec<TcpStream> = on_cpu(idle_cpu, move || {
        (0..IDLE)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect()
    });
    let started = Instant::now();
    let served = on_cpu(client_cpu, move || {
        let mut stream = connect_with_timeout(addr).expect("connect");
        keep_alive_request(&mut stream)
    });
    let waited = started.elapsed();
    let summary = stop(server, &stats);
    drop(idle);

    served.unwrap_or_else(|err| panic!("the new client was not served: {err} after {waited:?}"));
    assert!(waited < Duration::from_secs(5), "served after {waited:?}");
    let shed = summary["total"]["shed"].as_u64().unwrap();
    assert!(shed > 0, "{summary}");
    assert!(
        shed <= IDLE as u64,
        "only idle connections were shed: {summary}"
    );
}
