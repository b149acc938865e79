//! Builds the BPF objects of `reuseport-ebpf` (target `bpfel-unknown-none`, nightly `rust-src`,
//! linked by `bpf-linker`) with aya-build and leaves them in `OUT_DIR`, where `src/probes.rs`
//! embeds the probes object (`reuseport-probes`) with `include_bytes_aligned!`. The steering
//! object is the library's; this crate only loads the probes.
//!
//! `cargo xtask setup` installs what this needs (nightly `rust-src`, `llvm-22-dev`, `bpf-linker`).

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|package| package.name.as_str() == "reuseport-ebpf")
        .ok_or_else(|| anyhow!("reuseport-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent directory for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default()).context(
        "building the BPF programs failed; `cargo xtask setup` installs nightly rust-src and bpf-linker",
    )
}
