//! Building this crate depends on the `bpf-linker` binary, which cargo cannot express as a
//! dependency. Rebuild whenever the `bpf-linker` on PATH changes, so a newly installed linker is
//! picked up (the same approach as aya-template).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found on PATH ({err}); run `cargo xtask setup` to install it"
        ),
    }
}
