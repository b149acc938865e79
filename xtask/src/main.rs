//! `cargo xtask`: the project's tasks. Every task first makes sure the toolchain is installed.
//!
//! - `cargo xtask setup`: install the pinned nightly's rust-src, LLVM 22 and bpf-linker where
//!   missing.
//! - `cargo xtask run --mode percpu|hash [-- serve args]`: build and run `reuseport serve`.
//! - `cargo xtask ab [reuseport ab args]`: build and run the A/B experiment.
//! - `cargo xtask test`: formatting, clippy, and every test (unit and integration, which load
//!   the real BPF program and need root).
//! - `cargo xtask soak [--connections N]`: the soak test with 1,000,000 connections (release).

mod toolchain;

use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "reuseport's development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building the BPF programs needs (the nightly pinned in
    /// reuseport-ebpf/rust-toolchain.toml with rust-src, LLVM 22, bpf-linker).
    Setup,
    /// Build (release) and run `reuseport serve`.
    Run {
        /// Steering mode passed to `reuseport serve --mode`.
        #[arg(long, default_value = "percpu",
              value_parser = ["percpu", "percpu-spill", "hash", "cbpf", "incoming-cpu", "auto"])]
        mode: String,
        /// Further `reuseport serve` arguments, after `--` (e.g. `-- --listen [::1]:8080`).
        #[arg(last = true)]
        serve_args: Vec<String>,
    },
    /// Build (release) and run `reuseport ab`: the A/B experiment (see `reuseport ab --help`).
    Ab {
        /// `reuseport ab` arguments, e.g. `--quick`, `--modes hash,percpu --peer nginx`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ab_args: Vec<String>,
    },
    /// Soak: N short connections through `reuseport serve` (release build); fails if its open
    /// fds or resident memory grow beyond a bound (tests/soak.rs).
    Soak {
        /// Connections to make after the warm-up.
        #[arg(long, default_value_t = 1_000_000)]
        connections: u64,
    },
    /// Check formatting and lints, then run every test.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Further `cargo test` arguments, after `--` (e.g. `-- percpu`).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    toolchain::ensure()?;
    match cli.task {
        Task::Setup => {
            toolchain::say(&format!(
                "toolchain ready: the pinned nightly with rust-src, and bpf-linker {}",
                toolchain::BPF_LINKER_VERSION
            ));
            Ok(())
        }
        Task::Run { mode, serve_args } => {
            run_checked(cargo().args(["build", "--release", "--package", "reuseport-cli"]))?;
            run_checked(
                Command::new(release_binary())
                    .args(["serve", "--mode", &mode])
                    .args(&serve_args),
            )
        }
        Task::Ab { ab_args } => {
            let mut tools = Vec::new();
            if ab_args.iter().any(|arg| arg.contains("nginx")) {
                tools.push(toolchain::NGINX);
            }
            if ab_args.iter().any(|arg| arg.contains("wrk")) {
                tools.push(toolchain::WRK);
            }
            toolchain::ensure_tools(&tools, "the A/B experiment runs them")?;
            run_checked(cargo().args(["build", "--release", "--package", "reuseport-cli"]))?;
            run_checked(Command::new(release_binary()).arg("ab").args(&ab_args))
        }
        Task::Soak { connections } => run_checked(
            cargo()
                .args([
                    "test",
                    "--release",
                    "--package",
                    "reuseport-cli",
                    "--test",
                    "soak",
                ])
                .args(["--", "--nocapture"])
                .env("REUSEPORT_SOAK_CONNECTIONS", connections.to_string()),
        ),
        Task::Test { no_lint, test_args } => {
            if !toolchain::is_root() {
                toolchain::say(
                    "not root: the integration tests load BPF programs and will fail without \
                     CAP_BPF and CAP_NET_ADMIN",
                );
            }
            toolchain::ensure_tools(
                &[
                    toolchain::NGINX,
                    toolchain::PROMTOOL,
                    toolchain::SYSTEMD_ANALYZE,
                    toolchain::IRQBALANCE,
                ],
                "the tests attach to a real nginx, check the metrics with promtool and the \
                 example units with systemd-analyze, and stop and restart irqbalance",
            )?;
            if !no_lint {
                run_checked(cargo().args(["fmt", "--all", "--check"]))?;
                run_checked(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            }
            run_checked(cargo().args(["test", "--no-fail-fast"]).args(&test_args))
        }
    }
}

/// `release/reuseport` in this workspace's target directory (`CARGO_TARGET_DIR` if set).
fn release_binary() -> std::path::PathBuf {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), |dir| workspace.join(dir));
    target.join("release/reuseport")
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs `command`, failing with its name if it does not exit successfully.
pub fn run_checked(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}
