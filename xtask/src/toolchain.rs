//! Installs what building the BPF programs needs, when it is missing, and says what it installs,
//! one line per step (a failing step's output is printed in full):
//!
//! - the nightly pinned in `reuseport-ebpf/rust-toolchain.toml`, with `rust-src` (aya-build
//!   compiles `core` for `bpfel-unknown-none`); an installed `nightly` of the same date will do;
//! - `bpf-linker` [`BPF_LINKER_VERSION`], built against LLVM 22 (the pinned nightly's LLVM) found
//!   under `LLVM_PREFIX` (default `/usr/lib/llvm-22`, Debian's `llvm-22-dev`).
//!
//! Programs are looked up on `PATH`, not in a package database; where one is missing and the
//! machine has no `apt-get`, the error names the Debian packages that provide it.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The bpf-linker release this project is built and tested with.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM major version bpf-linker is built against (its cargo feature `llvm-22`); the pinned
/// nightly's LLVM has the same major version.
const LLVM_MAJOR: &str = "22";
/// Debian packages bpf-linker's `llvm-22` feature links against.
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Where LLVM 22 is looked for unless `LLVM_PREFIX` says otherwise.
const DEFAULT_LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// A program a task runs, and the Debian package that provides it.
#[derive(Clone, Copy, Debug)]
pub struct Tool {
    /// The program's name on `PATH`.
    pub program: &'static str,
    /// The Debian package to install for it.
    pub package: &'static str,
}

/// nginx (the real server `attach` steers in the tests, and the A/B peer).
pub const NGINX: Tool = Tool {
    program: "nginx",
    package: "nginx",
};
/// promtool (checks the metrics in the tests).
pub const PROMTOOL: Tool = Tool {
    program: "promtool",
    package: "prometheus",
};
/// systemd-analyze (checks the example units in the tests).
pub const SYSTEMD_ANALYZE: Tool = Tool {
    program: "systemd-analyze",
    package: "systemd",
};
/// irqbalance (the daemon `align --apply --stop-irqbalance` stops and `--restore` starts again,
/// in the tests).
pub const IRQBALANCE: Tool = Tool {
    program: "irqbalance",
    package: "irqbalance",
};
/// wrk (the A/B cross-check).
pub const WRK: Tool = Tool {
    program: "wrk",
    package: "wrk",
};

/// Makes sure the pinned nightly with `rust-src` and `bpf-linker` are installed.
pub fn ensure() -> Result<()> {
    ensure_pinned_nightly()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn ensure_pinned_nightly() -> Result<()> {
    let ebpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../reuseport-ebpf");
    let pinned = reuseport_build::pinned_channel(&ebpf_dir)?;
    let toolchain = match reuseport_build::resolve_toolchain(&pinned) {
        Ok(toolchain) => toolchain,
        Err(_) => {
            say(&format!(
                "installing {pinned} with rust-src (the BPF programs' toolchain, pinned in \
                 reuseport-ebpf/rust-toolchain.toml)"
            ));
            run_quiet(Command::new("rustup").args([
                "toolchain",
                "install",
                &pinned,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            pinned.clone()
        }
    };
    let installed = Command::new("rustup")
        .args([
            "component",
            "list",
            "--toolchain",
            &toolchain,
            "--installed",
        ])
        .stderr(Stdio::null())
        .output()
        .context("running rustup (is rustup installed?)")?;
    let components = String::from_utf8_lossy(&installed.stdout);
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        say(&format!(
            "adding rust-src to {toolchain} (needed to build core for bpfel-unknown-none)"
        ));
        run_quiet(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &toolchain,
        ]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(path) = bpf_linker_path() {
        let version = Command::new(&path)
            .arg("--version")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default();
        if version.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION) {
            return Ok(());
        }
        say(&format!(
            "{} is {version:?}; this project is built with bpf-linker {BPF_LINKER_VERSION}: \
             installing it",
            path.display()
        ));
    }
    let llvm_prefix =
        PathBuf::from(env::var_os("LLVM_PREFIX").unwrap_or_else(|| DEFAULT_LLVM_PREFIX.into()));
    if !llvm_found(&llvm_prefix) {
        if env::var_os("LLVM_PREFIX").is_some() {
            bail!(
                "LLVM_PREFIX={} has no LLVM {LLVM_MAJOR} (bin/llvm-config); bpf-linker \
                 {BPF_LINKER_VERSION} is built against LLVM {LLVM_MAJOR}",
                llvm_prefix.display()
            );
        }
        install_packages(LLVM_PACKAGES, "to build bpf-linker against LLVM 22")?;
    }
    say(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} with cargo (feature llvm-{LLVM_MAJOR}, \
         LLVM_PREFIX={}); this takes a few minutes",
        llvm_prefix.display()
    ));
    run_quiet(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .env("LLVM_PREFIX", &llvm_prefix),
    )?;
    if bpf_linker_path().is_none() {
        bail!("bpf-linker was installed but is not on PATH; add ~/.cargo/bin to PATH");
    }
    Ok(())
}

/// Whether `prefix/bin/llvm-config` is LLVM [`LLVM_MAJOR`].
fn llvm_found(prefix: &Path) -> bool {
    Command::new(prefix.join("bin/llvm-config"))
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .split('.')
                .next()
                == Some(LLVM_MAJOR)
        })
}

/// bpf-linker on PATH, or in cargo's bin directory (which this process then adds to PATH, since
/// aya-build looks it up there).
fn bpf_linker_path() -> Option<PathBuf> {
    if let Ok(path) = which::which("bpf-linker") {
        return Some(path);
    }
    let cargo_bin = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?
        .join("bin");
    let candidate = cargo_bin.join("bpf-linker");
    if !candidate.is_file() {
        return None;
    }
    let path = env::var_os("PATH").unwrap_or_default();
    let joined = env::join_paths(std::iter::once(cargo_bin).chain(env::split_paths(&path))).ok()?;
    // SAFETY: xtask is single-threaded here; nothing reads the environment concurrently.
    unsafe { env::set_var("PATH", joined) };
    Some(candidate)
}

/// Makes sure every program of `tools` is on PATH (or in /usr/sbin, /sbin), installing the
/// packages of those missing with apt-get, saying why.
pub fn ensure_tools(tools: &[Tool], why: &str) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|tool| !on_path(tool.program))
        .map(|tool| tool.package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    install_packages(&missing, why)
}

fn on_path(program: &str) -> bool {
    which::which(program).is_ok()
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|dir| Path::new(dir).join(program).is_file())
}

/// Installs the Debian `packages` with apt-get (`apt-get update` first), or says exactly what to
/// install where that cannot be done here.
fn install_packages(packages: &[&str], why: &str) -> Result<()> {
    let list = packages.join(" ");
    if which::which("apt-get").is_err() {
        bail!(
            "missing {list} ({why}); this machine has no apt-get: install the equivalents of \
             the Debian packages {list} with its package manager"
        );
    }
    if !is_root() {
        bail!("missing {list} ({why}); install them as root: apt-get install -y {list}");
    }
    say(&format!("installing {list} with apt-get ({why})"));
    run_quiet(
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_quiet(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Runs `command` with its output captured: nothing is printed unless it fails, then all of it.
fn run_quiet(command: &mut Command) -> Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Whether this process runs as root (uid 0), read from `id -u` to keep xtask dependency-light.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Prints an xtask progress message.
pub fn say(message: &str) {
    eprintln!("xtask: {message}");
}
