//! The error that ends an experiment, shared by the runner and the processes it starts (so
//! neither imports the other for it).

use std::{io, path::PathBuf};

use thiserror::Error;

use reuseport::cpus::CpuError;

use crate::{probes::ProbeError, topology::TopologyError};

/// Errors that end an experiment.
#[derive(Debug, Error)]
pub enum RunnerError {
    /// Creating the topology failed.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// Attaching or reading probes failed.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// Reading CPUs failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A child process failed.
    #[error("{what}: {detail}")]
    Child {
        /// Which process.
        what: String,
        /// What went wrong.
        detail: String,
    },
    /// Writing or reading a file failed.
    #[error("{path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Stopped by Ctrl-C or SIGTERM.
    #[error("interrupted")]
    Interrupted,
    /// The configuration cannot run.
    #[error("{0}")]
    Invalid(String),
}
