//! `reuseport attach`: steer a running server's listeners per CPU (found through /proc, or given
//! as inherited fds), with a live line until stopped, or left pinned with `--persist`.

use std::{os::fd::BorrowedFd, time::Duration};

use reuseport::{
    attach::{self, AttachAction, AttachRequest, AttachTarget, Attached, describe_slots},
    pinned::PinnedRoot,
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
    live::show_live_until_stopped(
        &stop,
        args.duration,
        args.quiet,
        || Ok(live.snapshot()?),
        || Ok(()),
    )?;
    live.detach()?;
    say!("reuseport: detached; port {port} is back on hash selection");
    Ok(())
}
