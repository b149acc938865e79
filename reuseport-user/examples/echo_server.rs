//! A tokio line-echo server of your own, steered per CPU with the reuseport library.
//!
//! The library gives you the listeners and the steering; the threads, runtimes and protocol are
//! yours. Each line a client sends comes back prefixed with the CPU that served it:
//!
//! ```text
//! cargo run --example echo_server -- 127.0.0.1:7000 30      # as root; serves for 30 s
//! taskset -c 1 nc 127.0.0.1 7000                            # type a line: "cpu1: <line>"
//! ```

use std::{net::TcpListener as StdTcpListener, thread, time::Duration};

use anyhow::Context as _;
use reuseport::{CpuList, PerCpuListeners, Protocol, Steering, cpus::pin_current_thread};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7000".into());
    let seconds: u64 = args.next().map_or(Ok(30), |s| s.parse())?;

    // 1. One SO_REUSEPORT listener per CPU this process may use.
    let cpus = CpuList::allowed()?;
    let listeners = PerCpuListeners::bind(addr.parse()?, Protocol::Tcp, &cpus, 1024)?;
    // 2. Steer each connection to the listener of the CPU that received it.
    let steering = Steering::attach(&listeners.fds()).context("percpu steering (run as root)")?;
    println!(
        "echo on {} for {seconds}s, CPUs {cpus}, program id {}",
        listeners.local_addr(),
        steering.program_id()?
    );

    // 3. Your workers: one pinned thread and one current-thread runtime per listener.
    for listener in listeners.into_inner() {
        let cpu = listener.cpu;
        let std_listener = StdTcpListener::from(listener.socket);
        thread::spawn(move || -> anyhow::Result<()> {
            pin_current_thread(cpu)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = TcpListener::from_std(std_listener)?;
                loop {
                    let (stream, _) = listener.accept().await?;
                    tokio::spawn(async move {
                        let (read, mut write) = stream.into_split();
                        let mut lines = BufReader::new(read).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            let reply = format!("cpu{cpu}: {line}\n");
                            if write.write_all(reply.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            })
        });
    }

    // 4. Dropping everything at exit closes the listeners, which ends the group and detaches the
    //    program. (To detach while keeping the listeners, call `steering.detach(listener)`.)
    thread::sleep(Duration::from_secs(seconds));
    let stats = steering.stats()?;
    let local: u64 = stats.iter().map(|s| s.local).sum();
    let fallback: u64 = stats.iter().map(|s| s.fallback).sum();
    println!("steered to the receiving CPU: {local}, to a fallback CPU: {fallback}");
    Ok(())
}
