//! Files and directories that root acts on (pins, state files saying what to write back) must
//! not be ones another user could have placed or changed: [`why_not_private`] says what is
//! wrong with one, for `pinned` (under a world-writable `/sys/fs/bpf`) and `align` (its state
//! file under `/run/reuseport`).

use std::{fs, io, os::unix::fs::MetadataExt as _, path::Path};

/// Why `path` is not a real directory (`is_dir`) or file owned by root or this user and
/// writable by no one else; `None` when it is, or when it does not exist.
pub fn why_not_private(path: &Path, is_dir: bool) -> io::Result<Option<String>> {
    let meta = match fs::symlink_metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        other => other?,
    };
    let me = rustix::process::geteuid().as_raw();
    let why = if meta.file_type().is_symlink() {
        Some("it is a symbolic link".to_owned())
    } else if meta.is_dir() != is_dir {
        let what = if is_dir { "a directory" } else { "a file" };
        Some(format!("it is not {what}"))
    } else if meta.uid() != 0 && meta.uid() != me {
        Some(format!(
            "it is owned by uid {}, not by root or by this user (uid {me})",
            meta.uid()
        ))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "it is writable by its group or by everyone (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    Ok(why)
}
