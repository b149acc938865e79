//! `reuseport load`: the lab's load generator against a server, one summary line, optionally JSON.

use std::{fs, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use reuseport::CpuList;
use reuseport_lab::load::{LoadConfig, LoadKind};

use crate::args::LoadKindArg;

/// `reuseport load`'s arguments.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The server to load.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: SocketAddr,
    /// crr: connect, one request, wait for the server to close, close; rr: keep-alive requests;
    /// udp: datagram request/reply.
    #[arg(long, value_enum, default_value_t = LoadKindArg::Crr)]
    kind: LoadKindArg,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Stop after this long.
    #[arg(long, value_parser = crate::args::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Stop after this many requests in all.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// Open loop: this many requests per second in all (default: closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// CPUs for client threads (one thread per CPU; default: every CPU this process may use).
    #[arg(long)]
    cpus: Option<CpuList>,
    /// Pin each client thread to its CPU (a pinned loopback client's SYN is processed there).
    #[arg(long)]
    pin: bool,
    /// Count a request as failed after this long.
    #[arg(long, value_parser = crate::args::parse_duration, default_value = "5s")]
    timeout: Duration,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Runs the load generator and prints one line (and the JSON report, if asked).
pub fn load(args: LoadArgs) -> anyhow::Result<()> {
    let allowed = CpuList::allowed()?;
    let cpus = match args.cpus {
        Some(cpus) => cpus.within(&allowed)?,
        None => allowed,
    };
    let kind = LoadKind::from(args.kind);
    let report = reuseport_lab::load::run(&LoadConfig {
        target: args.target,
        kind,
        connections: args.connections,
        duration: args.duration,
        max_requests: args.max_requests,
        rate: args.rate,
        cpus,
        pin: args.pin,
        request_timeout: args.timeout,
    })?;
    println!(
        "load: {:?} against {} for {:.1}s: {} requests ({:.0}/s), {} connections ({:.0}/s), {} errors; \
         latency p50 {:.0}us p99 {:.0}us p99.9 {:.0}us max {:.0}us",
        kind,
        args.target,
        report.duration_s,
        report.requests,
        report.req_per_s,
        report.connections,
        report.conn_per_s,
        report.errors,
        report.p50_us,
        report.p99_us,
        report.p999_us,
        report.max_us
    );
    if let Some(path) = args.json {
        let json = serde_json::to_string_pretty(&report).context("encoding the report")?;
        fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
