//! The NIC's RSS indirection table (which receive queue each flow-hash bucket goes to), read
//! with the ethtool ioctl `ETHTOOL_GRXFHINDIR` (what `ethtool -x` shows; no privilege needed).
//! Virtual devices and NICs without RSS answer "not supported".

use std::io;

use super::AlignError;
use crate::ethtool::ethtool;

/// `ETHTOOL_GRXFHINDIR` (linux/ethtool.h).
const ETHTOOL_GRXFHINDIR: u32 = 0x38;

/// The largest table accepted (real NICs have 64 to 2048 entries).
const MAX_ENTRIES: u32 = 65_536;

/// `dev`'s indirection table in the calling thread's network namespace: entry `i` is the queue
/// of hash bucket `i`. `None` when the device has no table (no RSS: veth, lo, single-queue NICs).
pub fn indirection_table(dev: &str) -> Result<Option<Vec<u32>>, AlignError> {
    let error = |source: io::Error| AlignError::Rss {
        dev: dev.to_owned(),
        source,
    };
    // Size first (size 0 asks for it), then the table.
    let size = match ethtool_indir(dev, 0).map_err(error)? {
        None => return Ok(None),
        Some(buffer) => buffer[1],
    };
    if size == 0 {
        return Ok(None);
    }
    if size > MAX_ENTRIES {
        return Err(error(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the table claims {size} entries"),
        )));
    }
    match ethtool_indir(dev, size).map_err(error)? {
        None => Ok(None),
        Some(buffer) => Ok(Some(buffer[2..].to_vec())),
    }
}

/// One `ETHTOOL_GRXFHINDIR` call with room for `size` entries: the `struct ethtool_rxfh_indir`
/// as `[cmd, size, ring_index...]`, or `None` if the device does not support it.
fn ethtool_indir(dev: &str, size: u32) -> io::Result<Option<Vec<u32>>> {
    let mut buffer = vec![0u32; 2 + size as usize];
    buffer[0] = ETHTOOL_GRXFHINDIR;
    buffer[1] = size;
    // SAFETY: `buffer` is a whole struct ethtool_rxfh_indir: `size` says how many entries
    // follow its two header words, and it holds exactly that many.
    match unsafe { ethtool(dev, &mut buffer) } {
        Ok(()) => Ok(Some(buffer)),
        Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_without_rss_have_no_table_and_unknown_devices_fail() {
        assert_eq!(indirection_table("lo").expect("lo answers"), None);
        let err = indirection_table("nosuchdev0").expect_err("no such device");
        assert!(
            matches!(&err, AlignError::Rss { source, .. } if source.raw_os_error() == Some(libc::ENODEV)),
            "{err}"
        );
    }
}
