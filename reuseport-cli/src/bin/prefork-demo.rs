//! `prefork-demo`: a small multi-process HTTP server of the classic prefork kind (the seed
//! notes' C program, but with workers really pinned), to try `reuseport attach` on:
//!
//! ```text
//! prefork-demo --listen 127.0.0.1:8081          # one pinned worker process per CPU
//! reuseport attach --port 8081 --pid <master>   # steer it per CPU from outside
//! ```
//!
//! Each worker is a child process that pins itself, binds its own SO_REUSEPORT listener and
//! answers every request with `X-Worker-Pid: <its pid>` and `Connection: close`. Workers die with
//! the master (`PR_SET_PDEATHSIG`). `--unpinned` and `--same-cpu` make the misconfigurations
//! `attach` must refuse; `--no-reuseport` makes a listener without SO_REUSEPORT.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    process::{Command, ExitCode, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use reuseport::{CpuList, cpus::pin_current_thread};
use socket2::{Domain, SockAddr, Socket, Type};

/// A prefork HTTP server: one pinned worker process per CPU, each with its own SO_REUSEPORT
/// listener.
#[derive(Debug, Parser)]
struct Args {
    /// Address to serve; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// CPUs to start workers for (default: every CPU this process may use).
    #[arg(long)]
    cpus: Option<CpuList>,
    /// Do not pin workers (attach must refuse).
    #[arg(long)]
    unpinned: bool,
    /// Pin every worker to the first CPU (attach must refuse).
    #[arg(long)]
    same_cpu: bool,
    /// Listen without SO_REUSEPORT (only one worker can then bind; attach must refuse).
    #[arg(long)]
    no_reuseport: bool,
    /// Stop after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    duration: Duration,
    /// Internal: run as the worker for this CPU.
    #[arg(long, hide = true)]
    worker: Option<u32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.worker {
        Some(cpu) => worker(&args, cpu),
        None => master(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("prefork-demo: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn master(args: &Args) -> anyhow::Result<()> {
    let cpus = match &args.cpus {
        Some(cpus) => cpus.clone(),
        None => CpuList::allowed()?,
    };
    let mut listen = args.listen;
    if listen.port() == 0 {
        // Workers bind on their own, so they need the port in advance.
        listen = TcpListener::bind(listen)?.local_addr()?;
    }
    let exe = std::env::current_exe()?;
    let mut workers = Vec::new();
    for cpu in cpus.iter() {
        let mut command = Command::new(&exe);
        command
            .args([
                "--listen",
                &listen.to_string(),
                "--worker",
                &cpu.to_string(),
            ])
            .stdout(Stdio::piped());
        for (flag, on) in [
            ("--unpinned", args.unpinned),
            ("--same-cpu", args.same_cpu),
            ("--no-reuseport", args.no_reuseport),
        ] {
            if on {
                command.arg(flag);
            }
        }
        let mut child = command.spawn().context("starting a worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut ready = String::new();
        BufReader::new(stdout).read_line(&mut ready)?;
        if !ready.starts_with("ready") {
            let _ = child.kill();
            anyhow::bail!("worker for CPU {cpu} did not start");
        }
        workers.push(child);
    }
    let pids: Vec<String> = workers.iter().map(|w| w.id().to_string()).collect();
    println!(
        "prefork-demo: listening on {listen} with master {} and workers {}",
        std::process::id(),
        pids.join(",")
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, std::sync::Arc::clone(&stop))?;
    }
    let deadline = std::time::Instant::now() + args.duration;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for mut worker in workers {
        let _ = worker.kill();
        let _ = worker.wait();
    }
    Ok(())
}

fn worker(args: &Args, cpu: u32) -> anyhow::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    if !args.unpinned {
        let first = CpuList::allowed()?.iter().next().unwrap_or(0);
        pin_current_thread(if args.same_cpu { first } else { cpu })?;
    }
    let socket = Socket::new(Domain::for_address(args.listen), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if !args.no_reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&SockAddr::from(args.listen))?;
    socket.listen(1024)?;
    let listener = TcpListener::from(socket);
    println!("ready");
    let pid = std::process::id();
    let body = format!("worker-pid={pid}\n");
    loop {
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut request = Vec::new();
        let mut chunk = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nX-Worker-Pid: {pid}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
    }
}
