//! How the workspace builds its BPF programs, for the build scripts of `reuseport-user` (the
//! steering object) and `reuseport-lab` (the probes object), and for `cargo xtask setup`.
//!
//! The programs are built by aya-build (`cargo build --target bpfel-unknown-none -Z
//! build-std=core`, linked by `bpf-linker`) with the nightly pinned in
//! `reuseport-ebpf/rust-toolchain.toml`. Which installed toolchain that is, in order:
//! 1. `REUSEPORT_BPF_TOOLCHAIN`, if set (any toolchain name `rustup run` takes);
//! 2. the pinned channel, if rustup has it installed;
//! 3. rustup's `nightly`, if it is the pinned date (the same compiler under its other name).
//!
//! Anything else is an error that says what to install, rather than a build with a compiler whose
//! LLVM the linker may not read.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use aya_build::Toolchain;

/// Overrides the pinned toolchain (e.g. to try another nightly whose LLVM matches bpf-linker's).
pub const TOOLCHAIN_ENV: &str = "REUSEPORT_BPF_TOOLCHAIN";

/// The BPF crate's directory, from `cargo metadata` of the workspace being built.
pub fn ebpf_crate_dir() -> anyhow::Result<PathBuf> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == "reuseport-ebpf")
        .ok_or_else(|| anyhow!("reuseport-ebpf package not found in the workspace"))?;
    ebpf.manifest_path
        .parent()
        .map(|dir| dir.as_std_path().to_owned())
        .ok_or_else(|| anyhow!("no parent directory for {}", ebpf.manifest_path))
}

/// The channel pinned in `DIR/rust-toolchain.toml` (`channel = "nightly-YYYY-MM-DD"`).
pub fn pinned_channel(ebpf_dir: &Path) -> anyhow::Result<String> {
    let path = ebpf_dir.join("rust-toolchain.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .ok_or_else(|| anyhow!("{} names no channel", path.display()))
}

/// The date of a pinned nightly channel (`nightly-2026-05-20` → `2026-05-20`).
pub fn channel_date(channel: &str) -> Option<&str> {
    channel.strip_prefix("nightly-")
}

/// Whether rustup can run `rustc` of `toolchain`.
pub fn toolchain_installed(toolchain: &str) -> bool {
    Command::new("rustup")
        .args(["run", toolchain, "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The date of the nightly that rustup's `toolchain` is (from its channel manifest), if any.
pub fn nightly_date(toolchain: &str) -> Option<String> {
    let sysroot = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let manifest =
        fs::read_to_string(sysroot.join("lib/rustlib/multirust-channel-manifest.toml")).ok()?;
    manifest
        .lines()
        .find_map(|line| line.strip_prefix("date = "))
        .map(|date| date.trim_matches('"').to_owned())
}

/// The installed toolchain to build the BPF programs with (see the crate's documentation).
pub fn resolve_toolchain(pinned: &str) -> anyhow::Result<String> {
    if let Ok(chosen) = std::env::var(TOOLCHAIN_ENV) {
        return Ok(chosen);
    }
    if toolchain_installed(pinned) {
        return Ok(pinned.to_owned());
    }
    let date = channel_date(pinned);
    if date.is_some() && nightly_date("nightly").as_deref() == date {
        return Ok("nightly".to_owned());
    }
    bail!(
        "the BPF programs are built with {pinned} (pinned in reuseport-ebpf/rust-toolchain.toml: \
         its LLVM matches bpf-linker's), which is not installed; run `cargo xtask setup`, or \
         `rustup toolchain install {pinned} --profile minimal --component rust-src`, or set \
         {TOOLCHAIN_ENV} to another toolchain"
    )
}

/// Builds every binary of `reuseport-ebpf` (one BPF object each) into `OUT_DIR`, with the
/// resolved toolchain. For build scripts.
pub fn build_bpf_objects() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={TOOLCHAIN_ENV}");
    let root_dir = ebpf_crate_dir()?;
    let toolchain = resolve_toolchain(&pinned_channel(&root_dir)?)?;
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", root_dir.display()))?;
    let package = aya_build::Package {
        name: "reuseport-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain)).with_context(|| {
        format!(
            "building the BPF programs with {toolchain} failed; `cargo xtask setup` installs \
             the pinned nightly's rust-src and bpf-linker"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_channel_is_a_dated_nightly() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../reuseport-ebpf");
        let channel = pinned_channel(&dir).unwrap();
        let date = channel_date(&channel).expect("a nightly-YYYY-MM-DD channel");
        assert_eq!(date.len(), 10, "{channel}");
    }
}
