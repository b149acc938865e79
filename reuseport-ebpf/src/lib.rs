#![no_std]

// This file exists so that reuseport-user can name this crate as a build dependency (cargo then
// rebuilds the BPF object when it changes). The programs are in the `reuseport` binary target:
// see main.rs and select.rs.
