//! Builds the BPF objects of `reuseport-ebpf` with the pinned nightly (see `reuseport-build`) and
//! leaves them in `OUT_DIR`, where `src/steering.rs` embeds the steering object
//! (`reuseport-steering`) with `include_bytes_aligned!`.
//!
//! `cargo xtask setup` installs what this needs (the pinned nightly's `rust-src`, `bpf-linker`).

fn main() -> anyhow::Result<()> {
    reuseport_build::build_bpf_objects()
}
