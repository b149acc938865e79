//! `reuseport attach`: steer a running server's listeners per CPU (found through /proc, or given
//! as inherited fds), with a live line until stopped, or left pinned with `--persist`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use reuseport::stats::{Migrations, Snapshot};

use crate::live;

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
    #[arg(long, value_parser = humantime::parse_duration)]
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
    use std::os::fd::AsFd;

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
    // Find and check everything first: on any error nothing has been attached.
    let (mut steering, slots, description) = if args.pids.is_empty() {
        let pairs: Vec<(std::os::fd::BorrowedFd<'static>, u32)> = args
            .fds
            .iter()
            .zip(&args.fd_cpus)
            // SAFETY: --fd names descriptors the caller handed this process for its whole life
            // (inherited or systemd's LISTEN_FDS); check_fds verifies each is a socket.
            .map(|(&fd, &cpu)| (unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, cpu))
            .collect();
        let checked = reuseport::attach::check_fds(&pairs)?;
        if args.mode == AttachMode::Hash {
            aya::programs::SkReuseport::detach(checked[0].1).context("detaching")?;
            println!("reuseport: port {} is on hash selection", args.port);
            return Ok(());
        }
        let description = args
            .fds
            .iter()
            .zip(&args.fd_cpus)
            .map(|(fd, cpu)| format!("cpu{cpu} <- fd {fd}"))
            .collect::<Vec<_>>()
            .join(", ");
        (
            reuseport::Steering::attach(&checked)?,
            Vec::new(),
            description,
        )
    } else {
        let found = reuseport::attach::from_pid(&args.pids, args.port)?;
        let description = found
            .iter()
            .map(|f| {
                format!(
                    "cpu{} <- pid {} ({})",
                    f.cpu,
                    f.pid,
                    reuseport::procfs::comm(f.pid)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        if args.mode == AttachMode::Hash {
            aya::programs::SkReuseport::detach(found[0].fd.as_fd()).context("detaching")?;
            println!(
                "reuseport: port {} is on hash selection ({description})",
                args.port
            );
            return Ok(());
        }
        let slots = found.iter().map(|f| (f.cpu, f.pid, f.inode)).collect();
        (reuseport::attach::steer(found)?, slots, description)
    };
    let program_id = steering.program_id()?;
    if args.persist {
        let dir = reuseport::attach::persist(&mut steering, args.port, &args.pids, slots)?;
        println!(
            "reuseport: steering port {} ({description}), program id {program_id}, pinned in {}; \
             `reuseport detach --port {}` removes it",
            args.port,
            dir.display(),
            args.port
        );
        return Ok(());
    }
    println!(
        "reuseport: steering port {} ({description}), program id {program_id}; {}",
        args.port,
        match args.duration {
            Some(d) => format!("detaching after {}", humantime::format_duration(d)),
            None => "Ctrl-C detaches".to_owned(),
        }
    );
    let started = Instant::now();
    let migrations_at_start = Migrations::read();
    live::show_live_until_stopped(
        &stop,
        args.duration,
        args.quiet,
        || {
            Ok(Snapshot {
                elapsed: started.elapsed(),
                // A foreign server's workers keep no counters of ours: only the program's.
                workers: Vec::new(),
                steering: Some(steering.stats()?),
                program: steering.run_stats()?,
                // The server's own worker restarts migrate through our program.
                migrations: Migrations::read().since(&migrations_at_start),
                restarts: 0,
                spill: None,
            })
        },
        || Ok(()),
    )?;
    if args.pids.is_empty() {
        // SAFETY: the caller passed these fds for this process's life.
        let member = unsafe { std::os::fd::BorrowedFd::borrow_raw(args.fds[0]) };
        steering.detach(member)?;
    } else {
        let member = reuseport::attach::any_member(&args.pids, args.port)?;
        steering.detach(&member)?;
    }
    println!(
        "reuseport: detached; port {} is back on hash selection",
        args.port
    );
    Ok(())
}
