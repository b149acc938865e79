//! `reuseport attach`: steer a running server's listeners per CPU (found through /proc, or given
//! as inherited fds), with a live line until stopped, or left pinned with `--persist`.

use std::{
    cell::RefCell,
    net::SocketAddr,
    os::fd::BorrowedFd,
    sync::atomic::AtomicBool,
    time::{Duration, Instant},
};

use reuseport::{
    attach::{self, AttachAction, AttachRequest, AttachTarget, Attached, describe_slots},
    follow::{FollowEvent, FollowRequest, Follower, POLL_INTERVAL, Stopped},
    metrics::{LatestSnapshot, MetricsEndpoint, MetricsInfo},
    pinned::PinnedRoot,
    stats::Snapshot,
};

use crate::live::{self, say};

/// `reuseport attach`'s arguments.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// The port the server listens on.
    #[arg(long)]
    port: u16,
    /// A process of the server (any: the command also searches its descendants). Repeatable.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// A listening socket this process already holds (inherited, systemd LISTEN_FDS), paired
    /// with the --cpu that follows it. Repeatable.
    #[arg(long = "fd")]
    fds: Vec<i32>,
    /// The CPU of the preceding --fd.
    #[arg(long = "cpu")]
    fd_cpus: Vec<u32>,
    /// percpu: attach the steering program; hash: detach any program and leave the group to
    /// the kernel's hash (after checking what attach would steer).
    #[arg(long, value_enum, default_value_t = AttachMode::Percpu)]
    mode: AttachMode,
    /// Leave the steering in place after exit, pinned under /sys/fs/bpf/reuseport/PORT/
    /// (`reuseport detach --port PORT` removes it).
    #[arg(long)]
    persist: bool,
    /// Detach after this long (default: at Ctrl-C or SIGTERM).
    #[arg(long, value_parser = crate::args::parse_duration)]
    duration: Option<Duration>,
    /// Do not print the live line every second.
    #[arg(long)]
    quiet: bool,
    /// Follow the server: when its listeners, workers or their CPUs change (reload, restart,
    /// binary upgrade, a worker pinned elsewhere) steer the new set within a second; when it
    /// stops, wait and steer it again when it is back. With --persist the pins are kept
    /// current while this runs and stay when it ends.
    #[arg(long, conflicts_with_all = ["fds", "fd_cpus"])]
    follow: bool,
    /// Serve Prometheus metrics of the steering at http://ADDR/metrics while attached
    /// (per-CPU decisions, program run time, info with mode and program id; the server's own
    /// worker counters are not known and left out). Not with --persist.
    #[arg(long, conflicts_with = "persist")]
    metrics: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AttachMode {
    Percpu,
    Hash,
}

/// Finds and checks the listeners (nothing is attached on any error), steers them, then shows
/// the live line until stopped and detaches, or with `--persist` pins the steering and returns.
pub fn attach(args: AttachArgs) -> anyhow::Result<()> {
    live::keep_running_without_reader();
    if args.pids.is_empty() == args.fds.is_empty() {
        anyhow::bail!(
            "give the server's processes with --pid, or sockets with --fd/--cpu (not both)"
        );
    }
    if args.fds.len() != args.fd_cpus.len() {
        anyhow::bail!(
            "every --fd needs its --cpu (got {} --fd, {} --cpu)",
            args.fds.len(),
            args.fd_cpus.len()
        );
    }
    let stop = live::stop_on_signals()?;
    // A closed terminal or Ctrl-\ ends the attach too, detaching on the way out (SIGPIPE is
    // ignored above; SIGKILL cannot be caught: `reuseport detach` cleans up after it).
    for signal in [signal_hook::consts::SIGHUP, signal_hook::consts::SIGQUIT] {
        signal_hook::flag::register(signal, std::sync::Arc::clone(&stop))?;
    }
    let target = if args.pids.is_empty() {
        AttachTarget::Fds(
            args.fds
                .iter()
                .zip(&args.fd_cpus)
                // SAFETY: --fd names descriptors the caller handed this process for its whole
                // life (inherited or systemd's LISTEN_FDS); `run` checks each is a socket.
                .map(|(&fd, &cpu)| (unsafe { BorrowedFd::borrow_raw(fd) }, cpu))
                .collect(),
        )
    } else {
        AttachTarget::Pids(args.pids.clone())
    };
    let mut request = AttachRequest::new(args.port, target);
    if args.mode == AttachMode::Hash {
        request.action = AttachAction::Hash;
    }
    if args.persist {
        request.persist = Some(PinnedRoot::system());
    }
    let port = args.port;
    if args.mode == AttachMode::Hash && (args.follow || args.metrics.is_some()) {
        anyhow::bail!(
            "--follow and --metrics steer; --mode hash detaches once: give one or the other"
        );
    }
    // The metrics address is bound first: one in use fails before anything is attached.
    let latest = LatestSnapshot::default();
    let metrics = args
        .metrics
        .map(|addr| MetricsEndpoint::start(addr, latest.clone()))
        .transpose()?;
    if let Some(endpoint) = &metrics {
        say!(
            "reuseport: metrics on http://{}/metrics",
            endpoint.local_addr()
        );
    }
    if args.follow {
        return follow(&args, request.persist, &stop, &latest);
    }
    let live = match attach::run(request)? {
        Attached::Hashed { slots } => {
            if args.pids.is_empty() {
                say!("reuseport: port {port} is on hash selection");
            } else {
                say!(
                    "reuseport: port {port} is on hash selection ({})",
                    describe_slots(&slots)
                );
            }
            return Ok(());
        }
        Attached::Persisted { pinned, slots } => {
            say!(
                "reuseport: steering port {port} ({}), program id {}, pinned in {}; \
                 `reuseport detach --port {port}` removes it",
                describe_slots(&slots),
                pinned.program_id(),
                pinned.pin_dir().display(),
            );
            return Ok(());
        }
        Attached::Live(live) => live,
    };
    say!(
        "reuseport: steering port {port} ({}), program id {}; {}",
        describe_slots(live.slots()),
        live.program_id()?,
        match args.duration {
            Some(d) => format!("detaching after {}", humantime::format_duration(d)),
            None => "Ctrl-C detaches".to_owned(),
        }
    );
    describe(&latest, live.local_addr(), Some(live.program_id()?));
    latest.publish(live.snapshot()?);
    live::show_live_until_stopped(
        &stop,
        args.duration,
        args.quiet,
        || {
            let snapshot = live.snapshot()?;
            latest.publish(snapshot.clone());
            Ok(snapshot)
        },
        || Ok(()),
    )?;
    live.detach()?;
    say!("reuseport: detached; port {port} is back on hash selection");
    Ok(())
}

/// `attach --follow`: attaches, then keeps the steering on whatever serves the port until
/// stopped, one line per change (see `reuseport::follow`).
fn follow(
    args: &AttachArgs,
    persist: Option<PinnedRoot>,
    stop: &AtomicBool,
    latest: &LatestSnapshot,
) -> anyhow::Result<()> {
    let port = args.port;
    let pinned = persist.is_some();
    let follower = Follower::start(FollowRequest {
        port,
        pids: args.pids.clone(),
        program: reuseport::steering::SteeringProgram::recommended(),
        persist,
    })?;
    say!(
        "reuseport: steering port {port} ({}), program id {}{}; following the server; {}",
        describe_slots(follower.slots()),
        follower.program_id()?.unwrap_or_default(),
        if pinned { ", pinned" } else { "" },
        match args.duration {
            Some(d) => format!("stopping after {}", humantime::format_duration(d)),
            None => "Ctrl-C stops".to_owned(),
        }
    );
    describe(latest, follower.local_addr(), follower.program_id()?);
    latest.publish(follower.snapshot().transpose()?.unwrap_or_default());
    let follower = RefCell::new(follower);
    let mut next_poll = Instant::now() + POLL_INTERVAL;
    live::show_live_until_stopped(
        stop,
        args.duration,
        // Pinned steering's counters are `reuseport status`'s to show.
        args.quiet || pinned,
        || {
            let follower = follower.borrow();
            let snapshot = follower
                .snapshot()
                .transpose()?
                .unwrap_or_else(Snapshot::default);
            latest.publish(snapshot.clone());
            Ok(snapshot)
        },
        || {
            if Instant::now() < next_poll {
                return Ok(());
            }
            next_poll = Instant::now() + POLL_INTERVAL;
            let mut follower = follower.borrow_mut();
            if let Some(event) = follower.poll() {
                say!("{}", describe_event(port, &event));
                describe(
                    latest,
                    follower.local_addr(),
                    follower.program_id().ok().flatten(),
                );
            }
            Ok(())
        },
    )?;
    match follower.into_inner().stop()? {
        Stopped::Detached => say!("reuseport: detached; port {port} is back on hash selection"),
        Stopped::LeftPinned(dir) => say!(
            "reuseport: stopped following; the steering stays pinned in {}; `reuseport detach \
             --port {port}` removes it",
            dir.display()
        ),
        Stopped::NothingSteered => {
            say!("reuseport: stopped following; nothing serves port {port}, nothing to detach")
        }
    }
    Ok(())
}

/// One line for what the follower did.
fn describe_event(port: u16, event: &FollowEvent) -> String {
    match event {
        FollowEvent::Resteered {
            slots,
            program_id,
            change,
        } => format!(
            "reuseport: port {port}: {change}; steering again ({}), program id {program_id}",
            describe_slots(slots)
        ),
        FollowEvent::Gone { pids } => format!(
            "reuseport: port {port}: the server (pid {}) is gone; waiting for it to come back",
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        FollowEvent::Back {
            pids,
            slots,
            program_id,
        } => format!(
            "reuseport: port {port}: the server is back (pid {}); steering again ({}), program \
             id {program_id}",
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            describe_slots(slots)
        ),
        FollowEvent::CannotFollow { reason } => {
            format!("reuseport: port {port}: cannot steer the server as it is now: {reason}")
        }
    }
}

/// Sets the labels of `reuseport_info` for the metrics endpoint (if there is one): mode
/// `percpu` (attach's steering), TCP, the group's address, the program steering it now.
fn describe(latest: &LatestSnapshot, listen: Option<SocketAddr>, program_id: Option<u32>) {
    latest.describe(MetricsInfo {
        mode: "percpu".to_owned(),
        protocol: "tcp".to_owned(),
        listen: listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        program_id,
    });
}
