//! How errors reach the user: one line, exit code 1, or 2 for [`BadArguments`].

/// Arguments that parse but cannot work on this machine (e.g. more spill targets than CPUs):
/// one line and exit code 2, like a usage error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadArguments(pub String);
