//! What the long-running verbs (`serve`, `attach`, `ab`) share: ending cleanly on a signal, and
//! the live line once a second.

use std::{
    io::{IsTerminal as _, Write as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use reuseport::stats::Snapshot;

/// `println!` for the long-running verbs: a reader that went away (`serve | head -1`) must not end
/// a server, so write errors are ignored (with SIGPIPE ignored, see [`keep_running_without_reader`])
/// and the verb goes on serving until it is stopped. On a terminal it first ends the live line
/// being redrawn, so the message gets a line of its own.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::live::write_line(&format!($($arg)*))
    };
}
pub(crate) use say;

/// Whether a live line is on the terminal without its newline (being redrawn in place).
static LIVE_LINE_OPEN: AtomicBool = AtomicBool::new(false);

/// Writes `text` and a newline to stdout, ignoring write errors (see [`say!`]).
pub fn write_line(text: &str) {
    let mut out = std::io::stdout().lock();
    if LIVE_LINE_OPEN.swap(false, Ordering::Relaxed) {
        let _ = out.write_all(b"\n");
    }
    let _ = writeln!(out, "{text}");
}

/// The live line: on a terminal redrawn in place (carriage return, erase line), else one line
/// per second for whoever reads the pipe or file.
fn write_live_line(text: &str) {
    let mut out = std::io::stdout().lock();
    if out.is_terminal() {
        let _ = write!(out, "\r\x1b[2K{text}");
        let _ = out.flush();
        LIVE_LINE_OPEN.store(true, Ordering::Relaxed);
    } else {
        let _ = writeln!(out, "{text}");
    }
}

/// Ends a live line left open on the terminal.
fn end_live_line() {
    if LIVE_LINE_OPEN.swap(false, Ordering::Relaxed) {
        let _ = std::io::stdout().lock().write_all(b"\n");
    }
}

/// Ignores SIGPIPE for this process: `serve` and `attach` keep running when whoever reads their
/// output goes away; their output is written with [`say!`], which ignores the failed writes.
pub fn keep_running_without_reader() {
    // SAFETY: setting a signal's disposition to "ignore" has no handler to race with; the
    // long-running verbs call this before they start any thread.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// A flag that SIGINT or SIGTERM sets, for loops that must end cleanly (detaching, tearing down).
pub fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing signal handler")?;
    }
    Ok(stop)
}

/// Waits until `stop` is set or `duration` has passed, showing once a second (unless `quiet`)
/// the live line of what happened in that second, from `snapshot`'s counters (a failed snapshot
/// is reported once on stderr and skipped). Calls `tick`
/// every 50 ms in between (e.g. to act on SIGHUP).
pub fn show_live_until_stopped(
    stop: &AtomicBool,
    duration: Option<Duration>,
    quiet: bool,
    mut snapshot: impl FnMut() -> anyhow::Result<Snapshot>,
    mut tick: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let deadline = duration.map(|d| Instant::now() + d);
    let mut previous = Snapshot::default();
    let mut next_line = Instant::now() + Duration::from_secs(1);
    let mut reading_failed = false;
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        thread::sleep(Duration::from_millis(50));
        tick()?;
        if Instant::now() >= next_line {
            next_line += Duration::from_secs(1);
            // A failed read (e.g. no file descriptor left while connections are being shed)
            // skips this second's line; it does not stop the server.
            match snapshot() {
                Ok(now) => {
                    if !quiet {
                        write_live_line(&now.since(&previous).live_line(now.elapsed));
                    }
                    previous = now;
                    reading_failed = false;
                }
                Err(err) => {
                    if !reading_failed {
                        eprintln!("reuseport: reading the counters failed, no live line: {err:#}");
                    }
                    reading_failed = true;
                }
            }
        }
    }
    end_live_line();
    Ok(())
}
