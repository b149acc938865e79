//! Installs what building the BPF programs needs, when it is missing, and says what it installs:
//!
//! - the nightly toolchain with `rust-src` (aya-build compiles `core` for `bpfel-unknown-none`);
//! - `bpf-linker`, built against Debian's LLVM 22 (`llvm-22-dev` and friends from apt), since
//!   nightly's LLVM is 22.x and the linker must match it.

use std::{
    env,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::run_checked;

/// The bpf-linker release this project is built and tested with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages bpf-linker's `llvm-22` feature links against.
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Makes sure nightly `rust-src` and `bpf-linker` are installed.
pub fn ensure() -> Result<()> {
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn ensure_nightly_rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .stderr(Stdio::null())
        .output()
        .context("running rustup (is rustup installed?)")?;
    if !installed.status.success() {
        say("installing the nightly Rust toolchain with rust-src (needed to build BPF programs)");
        return run_checked(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    let components = String::from_utf8_lossy(&installed.stdout);
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        say(
            "adding rust-src to the nightly toolchain (needed to build core for bpfel-unknown-none)",
        );
        run_checked(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_path().is_some() {
        return Ok(());
    }
    ensure_apt_packages(LLVM_PACKAGES, "to build bpf-linker against LLVM 22")?;
    say(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} with cargo (features llvm-22, \
         LLVM_PREFIX={LLVM_PREFIX}); this takes about two minutes"
    ));
    run_checked(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    if bpf_linker_path().is_none() {
        bail!("bpf-linker was installed but is not on PATH; add ~/.cargo/bin to PATH");
    }
    Ok(())
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

/// Installs the Debian `packages` that are missing (`apt-get update` first), saying why.
pub fn ensure_apt_packages(packages: &[&str], why: &str) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !apt_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !rustix_free_is_root() {
        bail!(
            "missing Debian packages {} ({why}); install them as root: apt-get install {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    say(&format!(
        "installing {} with apt-get ({why})",
        missing.join(" ")
    ));
    run_checked(
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn apt_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// Whether this process runs as root (uid 0), read from `id -u` to keep xtask dependency-light.
pub fn rustix_free_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Prints an xtask progress message.
pub fn say(message: &str) {
    eprintln!("xtask: {message}");
}
