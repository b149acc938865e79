//! Kernel addresses to function names, from `/proc/kallsyms` (text symbols only, modules
//! included). Reading real addresses needs root (or `kptr_restrict` 0 with `CAP_SYSLOG`):
//! otherwise the kernel shows every address as 0 and [`Kallsyms::load`] says so.

use std::{fs, io};

use thiserror::Error;

const KALLSYMS: &str = "/proc/kallsyms";

/// Errors from reading `/proc/kallsyms`.
#[derive(Debug, Error)]
pub enum KallsymsError {
    /// The file could not be read.
    #[error("reading {KALLSYMS} failed")]
    Read(#[source] io::Error),
    /// Every address read as 0: the kernel hides them from this user.
    #[error("{KALLSYMS} shows no addresses (kptr_restrict): run as root to name kernel functions")]
    Hidden,
}

/// The kernel's function symbols, sorted by address.
#[derive(Clone, Debug, Default)]
pub struct Kallsyms {
    /// `(start address, name)`, ascending.
    symbols: Vec<(u64, String)>,
}

impl Kallsyms {
    /// Reads `/proc/kallsyms`.
    pub fn load() -> Result<Self, KallsymsError> {
        let text = fs::read_to_string(KALLSYMS).map_err(KallsymsError::Read)?;
        let symbols = Self::parse(&text);
        if symbols.symbols.is_empty() {
            return Err(KallsymsError::Hidden);
        }
        Ok(symbols)
    }

    /// Parses text in `/proc/kallsyms`'s format (`ffffffff81234560 T name [module]`), keeping the
    /// text (`t`, `T`) and weak (`W`) symbols with a non-zero address.
    pub fn parse(text: &str) -> Self {
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let address = u64::from_str_radix(words.next()?, 16).ok()?;
                let kind = words.next()?;
                let name = words.next()?;
                (address != 0 && matches!(kind, "t" | "T" | "W"))
                    .then(|| (address, name.to_owned()))
            })
            .collect();
        symbols.sort_unstable();
        Self { symbols }
    }

    /// The function containing `address`: the symbol with the highest start at or below it.
    /// `None` below the first symbol.
    pub fn resolve(&self, address: u64) -> Option<&str> {
        let after = self.symbols.partition_point(|(start, _)| *start <= address);
        after
            .checked_sub(1)
            .map(|index| self.symbols[index].1.as_str())
    }

    /// The start address of the function `name` (the first if several share it).
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.symbols
            .iter()
            .find(|(_, symbol)| symbol == name)
            .map(|(address, _)| *address)
    }

    /// The function `name` as `[start, end)`: from its address to the next symbol's (the first if
    /// several share the name).
    pub fn range_of(&self, name: &str) -> Option<(u64, u64)> {
        let start = self.address_of(name)?;
        let end = self
            .symbols
            .iter()
            .map(|(address, _)| *address)
            .find(|&address| address > start)?;
        Some((start, end))
    }

    /// Names a stack of return addresses (innermost first, zeros ignored). A return address
    /// points after its call, possibly past the end of the calling function, so each is looked up
    /// one byte earlier; unknown addresses become `0x…`.
    pub fn symbolize(&self, frames: &[u64]) -> Vec<String> {
        frames
            .iter()
            .filter(|&&address| address != 0)
            .map(|&address| {
                self.resolve(address - 1)
                    .map_or_else(|| format!("{address:#x}"), str::to_owned)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_within_functions_of_a_fixed_table() {
        let symbols = Kallsyms::parse(
            "ffffffff81000100 T first\n\
             0000000000000000 A hidden\n\
             ffffffff81000200 t second\n\
             ffffffff81000300 d some_data\n\
             ffffffffc0000000 t in_module\t[loop]\n\
             not a line\n",
        );
        assert_eq!(symbols.resolve(0xffff_ffff_8100_0100), Some("first"));
        assert_eq!(symbols.resolve(0xffff_ffff_8100_01ff), Some("first"));
        assert_eq!(symbols.resolve(0xffff_ffff_8100_0200), Some("second"));
        // Data symbols are not function boundaries.
        assert_eq!(symbols.resolve(0xffff_ffff_8100_0300), Some("second"));
        assert_eq!(symbols.resolve(0xffff_ffff_c000_0010), Some("in_module"));
        assert_eq!(symbols.resolve(0xffff_ffff_8100_00ff), None);
        assert_eq!(
            symbols.range_of("first"),
            Some((0xffff_ffff_8100_0100, 0xffff_ffff_8100_0200))
        );
        // The last function has no end to tell.
        assert_eq!(symbols.range_of("in_module"), None);
        assert_eq!(symbols.range_of("hidden"), None);
        // Return addresses are looked up one byte back: the end of `first` is still `first`.
        assert_eq!(
            symbols.symbolize(&[0xffff_ffff_8100_0200, 0, 0x10]),
            ["first", "0x10"]
        );
    }

    /// Against this kernel: a known function's own address, and an address inside it, name it.
    #[test]
    fn resolves_known_kernel_functions_from_proc_kallsyms() {
        let symbols = match Kallsyms::load() {
            Ok(symbols) => symbols,
            Err(KallsymsError::Hidden) if !rustix::process::geteuid().is_root() => {
                eprintln!("skipped: not root, kernel addresses hidden");
                return;
            }
            Err(err) => panic!("{err}"),
        };
        for name in ["vfs_write", "inet_csk_accept", "tcp_v4_rcv"] {
            let address = symbols
                .address_of(name)
                .unwrap_or_else(|| panic!("{name} not in /proc/kallsyms"));
            assert_eq!(symbols.resolve(address), Some(name));
            assert_eq!(symbols.resolve(address + 8), Some(name));
            assert_eq!(symbols.symbolize(&[address + 9]), [name]);
        }
    }
}
