//! `reuseport`: steer each new connection to the SO_REUSEPORT listener of the worker pinned to the
//! CPU that received it, and show what that does.
//!
//! One file per verb (`serve.rs`, `load.rs`, `ab.rs`, `attach.rs`, `detach.rs`, `status.rs`,
//! `align.rs`);
//! this file parses, dispatches and turns errors into exit codes.

mod ab;
mod align;
mod args;
mod attach;
mod detach;
mod error;
mod live;
mod load;
mod serve;
mod status;
mod systemd;

use std::process::ExitCode;

use clap::{Parser, Subcommand, error::ErrorKind};

use crate::error::BadArguments;

/// Per-CPU SO_REUSEPORT steering with eBPF.
#[derive(Debug, Parser)]
// The help's first line, as before the CLI had its own package (`about` alone would take this
// package's description).
#[command(
    name = "reuseport",
    version,
    about = "Per-CPU SO_REUSEPORT steering with eBPF: library and the `reuseport` CLI",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve on one port with one pinned worker and one SO_REUSEPORT listener per CPU.
    ///
    /// TCP serves HTTP/1.1 (keep-alive); every response carries `x-worker-cpu` (the worker's CPU)
    /// and `x-incoming-cpu` (the CPU that processed the connection's packets). UDP answers each
    /// datagram with `worker-cpu=N incoming-cpu=M`, a newline and the datagram. A live line per
    /// second shows per-CPU connections, locality and the steering program's counters.
    Serve(serve::ServeArgs),
    /// Generate load against a server: crr (a new connection per HTTP request), rr (keep-alive),
    /// or udp; closed loop, or open loop at --rate with latency from the scheduled start.
    Load(load::LoadArgs),
    /// Compare steering modes (and peers) under the same load: lock contention, cross-CPU
    /// wakeups, IPIs, CPUs per connection, throughput and latency, interleaved repetitions.
    ///
    /// Writes DIR/results.json (every run and the summary) and DIR/results.svg, and prints a
    /// table of median [min-max] per mode with the percpu/hash ratio and its 95% bootstrap
    /// interval (`~`: difference not established). Needs root. Ctrl-C after a measured run
    /// still reports the finished runs, then exits with 130.
    ///
    /// `reuseport ab report DIR` redraws the table and DIR/results.svg from DIR/results.json.
    Ab(ab::AbArgs),
    /// Steer a running server's listeners per CPU, without touching its code.
    ///
    /// Finds the SO_REUSEPORT listeners on --port held by --pid and its descendants (e.g.
    /// nginx's master), matches each to the worker process that serves it (its epoll
    /// registrations) and that worker's single CPU, and attaches the steering program. Prints a
    /// live line until Ctrl-C, then detaches (or, with --persist, leaves it pinned). --follow
    /// steers the server again after a reload, restart or re-pin; --metrics serves Prometheus
    /// metrics of the steering.
    Attach(attach::AttachArgs),
    /// Return a port to hash selection: detach every steering program of ours from its
    /// listeners (persisted by `attach --persist`, or left by an attach that was killed) and
    /// remove its pins. Needs root.
    Detach {
        /// The port given to `attach`.
        #[arg(long)]
        port: u16,
    },
    /// Show what steers each port, as the kernel says: program, slots (and holes), listeners in
    /// no slot, stale pins, fallbacks, counters (--json: as data; --watch: every second).
    /// Needs root.
    Status(status::StatusArgs),
    /// Whether the NIC delivers each flow to the CPU whose worker owns it: per queue its IRQ's
    /// CPU, RPS and XPS masks, irqbalance, and one line per mismatch with the worker CPUs
    /// saying what it costs. --apply changes the settings (saving the old ones), --restore puts
    /// them back. The report needs no privilege.
    Align(align::AlignArgs),
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away (`| head`),
    // instead of panicking on the first write to a closed pipe.
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let result = match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Load(args) => load::load(args),
        Command::Ab(args) => ab::ab(args),
        Command::Attach(args) => attach::attach(args),
        Command::Detach { port } => detach::detach(port),
        Command::Status(args) => status::status(args),
        Command::Align(args) => align::align(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<ab::Interrupted>().is_some() => {
            eprintln!("reuseport: {err}");
            ExitCode::from(130)
        }
        Err(err) if err.downcast_ref::<BadArguments>().is_some() => {
            eprintln!("reuseport: {err} (see `reuseport --help`)");
            ExitCode::from(2)
        }
        Err(err) => {
            eprintln!("reuseport: error: {}", error::message(&err));
            ExitCode::FAILURE
        }
    }
}

/// Help and version go out as clap prints them (exit 0); no subcommand prints the usage on stderr
/// with exit code 2, as other usage errors; a usage error becomes one line and exit code 2.
fn usage_error(err: clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // clap prints this help on stderr; the exit code says nothing was done.
            let _ = err.print();
            return ExitCode::from(2);
        }
        _ => {}
    }
    let rendered = err.render().to_string();
    let line = rendered
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty() && !line.starts_with("Usage:") && !line.starts_with("For more")
        })
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("reuseport: {line} (see `reuseport --help`)");
    ExitCode::from(2)
}
