#![no_std]

// This file exists so that reuseport-user can name this crate as a build dependency (cargo then
// rebuilds the BPF objects when they change). The programs are in the binary targets: the
// steering object (select.rs) and the probes object (probes.rs).
