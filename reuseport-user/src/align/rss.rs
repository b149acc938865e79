//! The NIC's RSS: its indirection table (which receive queue each flow-hash bucket goes to), read
//! with the ethtool ioctl `ETHTOOL_GRXFHINDIR` (what `ethtool -x` shows), and which header fields
//! it hashes per flow type, `ETHTOOL_GRXFH` (what `ethtool -n DEV rx-flow-hash tcp4` shows). No
//! privilege is needed. Virtual devices and NICs without RSS answer "not supported".

use std::io;

use serde::{Deserialize, Serialize};

use super::AlignError;
use crate::ethtool::ethtool;

/// `ETHTOOL_GRXFH` (linux/ethtool.h): the fields a flow type's hash covers.
const ETHTOOL_GRXFH: u32 = 0x29;

/// The flow types asked about, with ethtool's names for them (`TCP_V4_FLOW`, ...).
const FLOW_TYPES: [(u32, &str); 4] = [
    (0x01, "tcp4"),
    (0x02, "udp4"),
    (0x05, "tcp6"),
    (0x06, "udp6"),
];

/// `RXH_L4_B_0_1` and `RXH_L4_B_2_3`: the source and destination port.
const RXH_L4_SOURCE_PORT: u64 = 1 << 6;
const RXH_L4_DESTINATION_PORT: u64 = 1 << 7;

/// `RXH_*` bits of the hash fields, with ethtool's letters for them, in ethtool's order.
const FIELD_LETTERS: [(u64, char); 8] = [
    (1 << 1, 'm'),                  // RXH_L2DA: destination MAC
    (1 << 2, 'v'),                  // RXH_VLAN
    (1 << 3, 't'),                  // RXH_L3_PROTO
    (1 << 4, 's'),                  // RXH_IP_SRC
    (1 << 5, 'd'),                  // RXH_IP_DST
    (RXH_L4_SOURCE_PORT, 'f'),      // RXH_L4_B_0_1
    (RXH_L4_DESTINATION_PORT, 'n'), // RXH_L4_B_2_3
    (1 << 31, 'r'),                 // RXH_DISCARD
];

/// The header fields a NIC's RSS hash covers for one flow type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashFields {
    /// The flow type, as ethtool names it (`tcp4`, `udp4`, `tcp6`, `udp6`).
    pub flow: String,
    /// The `RXH_*` bits.
    pub fields: u64,
}

impl HashFields {
    /// Whether the hash covers both ports (`f` and `n`): otherwise every connection between two
    /// addresses hashes to one queue.
    pub fn covers_ports(&self) -> bool {
        let ports = RXH_L4_SOURCE_PORT | RXH_L4_DESTINATION_PORT;
        self.fields & ports == ports
    }

    /// ethtool's letters for the fields (`sdfn`), `none` for none.
    pub fn letters(&self) -> String {
        let letters: String = FIELD_LETTERS
            .iter()
            .filter(|(bit, _)| self.fields & bit != 0)
            .map(|(_, letter)| letter)
            .collect();
        if letters.is_empty() {
            "none".into()
        } else {
            letters
        }
    }
}

/// `dev`'s RSS hash fields for TCP and UDP over IPv4 and IPv6 in the calling thread's network
/// namespace; `None` when the device has no RSS. A flow type the driver does not answer for is
/// left out.
pub fn hash_fields(dev: &str) -> Result<Option<Vec<HashFields>>, AlignError> {
    let mut found = Vec::new();
    for (flow_type, flow) in FLOW_TYPES {
        // struct ethtool_rxnfc is 192 bytes on 64-bit: cmd, flow_type, data (u64), the flow
        // spec and rule count the kernel may copy for this command.
        let mut rxnfc = [0u32; 48];
        rxnfc[0] = ETHTOOL_GRXFH;
        rxnfc[1] = flow_type;
        // SAFETY: `rxnfc` is a whole, zeroed struct ethtool_rxnfc (192 bytes, 4-byte aligned;
        // the kernel copies it with copy_{from,to}_user, which need no alignment).
        match unsafe { ethtool(dev, &mut rxnfc) } {
            Ok(()) => {
                let mut data = [0u8; 8];
                data[..4].copy_from_slice(&rxnfc[2].to_ne_bytes());
                data[4..].copy_from_slice(&rxnfc[3].to_ne_bytes());
                found.push(HashFields {
                    flow: flow.to_owned(),
                    fields: u64::from_ne_bytes(data),
                });
            }
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) && found.is_empty() => {
                return Ok(None);
            }
            Err(err) if matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {}
            Err(source) => {
                return Err(AlignError::Rss {
                    dev: dev.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(Some(found).filter(|found| !found.is_empty()))
}

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
    fn hash_fields_read_as_ethtool_writes_them() {
        let tcp = HashFields {
            flow: "tcp4".into(),
            fields: 1 << 4 | 1 << 5 | 1 << 6 | 1 << 7,
        };
        assert_eq!(tcp.letters(), "sdfn");
        assert!(tcp.covers_ports());
        let udp = HashFields {
            flow: "udp4".into(),
            fields: 1 << 4 | 1 << 5,
        };
        assert_eq!(udp.letters(), "sd");
        assert!(!udp.covers_ports());
        assert_eq!(hash_fields("lo").expect("lo answers"), None);
    }

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
