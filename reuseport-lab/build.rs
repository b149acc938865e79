//! Builds the BPF objects of `reuseport-ebpf` with the pinned nightly (see `reuseport-build`) and
//! leaves them in `OUT_DIR`, where `src/probes.rs` embeds the probes object (`reuseport-probes`)
//! with `include_bytes_aligned!`. The steering object is the library's; this crate only loads the
//! probes.
//!
//! `cargo xtask setup` installs what this needs (the pinned nightly's `rust-src`, `bpf-linker`).

fn main() -> anyhow::Result<()> {
    reuseport_build::build_bpf_objects()
}
