//! Which CPUs the server runs on: parsing lists such as `0-3,6` and the kernel's hex CPU
//! bitmaps, the process's affinity mask, and pinning a thread (this one, or another task such as
//! a NAPI kernel thread) to CPUs.

use std::{collections::BTreeSet, fmt, fs, io, str::FromStr};

use rustix::thread::{CpuSet as AffinityMask, sched_getaffinity, sched_setaffinity};
use thiserror::Error;

/// Errors from reading, choosing or pinning CPUs.
#[derive(Debug, Error)]
pub enum CpuError {
    /// A CPU list (such as `0-3,6`) could not be parsed.
    #[error("invalid CPU list {list:?}: {reason} (expected e.g. \"0-3,6\")")]
    Parse {
        /// The list as given.
        list: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A requested CPU is outside this process's affinity mask (offline, nonexistent, or excluded
    /// by `taskset`/cgroup cpusets).
    #[error("CPU {cpu} is not available to this process (allowed CPUs: {allowed})")]
    NotAllowed {
        /// The CPU that was asked for.
        cpu: u32,
        /// The CPUs this process may run on.
        allowed: CpuList,
    },
    /// `sched_getaffinity`/`sched_setaffinity` failed.
    #[error("{call} failed")]
    Affinity {
        /// The system call.
        call: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// An ordered, duplicate-free set of CPU numbers, printed and parsed in the kernel's list format
/// (`0-3,6`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuList(BTreeSet<u32>);

impl CpuList {
    /// The CPUs the calling thread may run on (`sched_getaffinity`), which may be fewer than the
    /// online CPUs under `taskset` or a cgroup cpuset.
    pub fn allowed() -> Result<Self, CpuError> {
        let mask = sched_getaffinity(None).map_err(|err| CpuError::Affinity {
            call: "sched_getaffinity",
            source: err.into(),
        })?;
        Ok(Self::from_affinity_mask(&mask))
    }

    /// The CPUs set in an affinity mask (`sched_getaffinity`'s).
    pub fn from_affinity_mask(mask: &AffinityMask) -> Self {
        (0..AffinityMask::MAX_CPU)
            .filter(|&cpu| mask.is_set(cpu))
            .filter_map(|cpu| u32::try_from(cpu).ok())
            .collect()
    }

    /// The set as an affinity mask, as `sched_setaffinity` takes it.
    pub fn to_affinity_mask(&self) -> AffinityMask {
        let mut mask = AffinityMask::new();
        for cpu in self.iter() {
            mask.set(cpu as usize);
        }
        mask
    }

    /// Checks that every CPU in `self` is in `allowed`; returns `self` unchanged if so.
    pub fn within(self, allowed: &CpuList) -> Result<Self, CpuError> {
        if let Some(cpu) = self.iter().find(|cpu| !allowed.contains(*cpu)) {
            return Err(CpuError::NotAllowed {
                cpu,
                allowed: allowed.clone(),
            });
        }
        Ok(self)
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    /// How many CPUs the set holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The set as a kernel CPU bitmap ([`format_mask`]: `3`, `1,00000000`), as `rps_cpus` and
    /// `xps_cpus` take it.
    pub fn to_mask(&self) -> String {
        format_mask(&self.iter().collect::<Vec<_>>())
    }
}

/// Parses a kernel CPU bitmap as `rps_cpus` and `xps_cpus` show it: hex, in 32-bit groups
/// separated by commas, most significant first (`00000000,00000003`).
pub fn parse_mask(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for (group_index, group) in text.trim().split(',').rev().enumerate() {
        let bits = u32::from_str_radix(group.trim(), 16).ok()?;
        let base = u32::try_from(group_index).ok()?.checked_mul(32)?;
        cpus.extend(
            (0..32)
                .filter(|bit| bits & (1 << bit) != 0)
                .map(|bit| base + bit),
        );
    }
    cpus.sort_unstable();
    Some(cpus)
}

/// Writes `cpus` as a kernel CPU bitmap (`3`, `1,00000000`); `0` for none.
pub fn format_mask(cpus: &[u32]) -> String {
    let groups = cpus.iter().max().map_or(1, |max| max / 32 + 1);
    (0..groups)
        .rev()
        .enumerate()
        .map(|(position, group)| {
            let bits = cpus
                .iter()
                .filter(|&&cpu| cpu / 32 == group)
                .fold(0u32, |bits, cpu| bits | 1 << (cpu % 32));
            if position == 0 {
                format!("{bits:x}")
            } else {
                format!("{bits:08x}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl FromIterator<u32> for CpuList {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// The largest CPU number a Linux kernel can have (`CONFIG_NR_CPUS` is at most 8192): a list
/// naming more is refused while parsing, before it costs time or memory.
pub const MAX_CPU: u32 = 8191;

impl FromStr for CpuList {
    type Err = CpuError;

    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let parse_error = |reason: String| CpuError::Parse {
            list: list.to_owned(),
            reason,
        };
        let number = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| parse_error(format!("{s:?} is not a CPU number")))
        };
        let mut cpus = BTreeSet::new();
        for part in list.split(',') {
            match part.split_once('-') {
                Some((first, last)) => {
                    let (first, last) = (number(first)?, number(last)?);
                    if last > MAX_CPU {
                        return Err(parse_error(format!(
                            "CPU {last} is beyond the largest CPU number Linux supports ({MAX_CPU})"
                        )));
                    }
                    if first > last {
                        return Err(parse_error(format!("range {first}-{last} is backwards")));
                    }
                    cpus.extend(first..=last);
                }
                None => {
                    let cpu = number(part)?;
                    if cpu > MAX_CPU {
                        return Err(parse_error(format!(
                            "CPU {cpu} is beyond the largest CPU number Linux supports ({MAX_CPU})"
                        )));
                    }
                    cpus.insert(cpu);
                }
            }
        }
        Ok(Self(cpus))
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cpus = self.iter().peekable();
        let mut first = true;
        while let Some(start) = cpus.next() {
            let mut end = start;
            while cpus.next_if_eq(&(end + 1)).is_some() {
                end += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        if first {
            f.write_str("(none)")?;
        }
        Ok(())
    }
}

/// The number of CPU slots the kernel may ever use (`/sys/devices/system/cpu/possible`), which
/// bounds every CPU number `bpf_get_smp_processor_id` can return.
pub fn possible_cpus() -> Result<u32, CpuError> {
    let path = "/sys/devices/system/cpu/possible";
    let text = fs::read_to_string(path).map_err(|source| CpuError::Affinity {
        call: "reading /sys/devices/system/cpu/possible",
        source,
    })?;
    let list: CpuList = text.trim().parse()?;
    Ok(list.iter().last().map_or(1, |last| last + 1))
}

/// Pins the calling thread to exactly `cpu` (`sched_setaffinity`).
pub fn pin_current_thread(cpu: u32) -> Result<(), CpuError> {
    let mut mask = AffinityMask::new();
    mask.set(cpu as usize);
    sched_setaffinity(None, &mask).map_err(|err| CpuError::Affinity {
        call: "sched_setaffinity",
        source: err.into(),
    })
}

/// Sets the CPU affinity of task `pid` (a thread id; another process's thread needs
/// CAP_SYS_NICE) to `cpus`.
pub fn set_task_affinity(pid: u32, cpus: &CpuList) -> Result<(), CpuError> {
    let error = |source: io::Error| CpuError::Affinity {
        call: "sched_setaffinity",
        source,
    };
    let target = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| error(io::Error::new(io::ErrorKind::InvalidInput, "not a task id")))?;
    sched_setaffinity(Some(target), &cpus.to_affinity_mask()).map_err(|err| error(err.into()))
}

/// The CPU the calling thread is running on right now.
pub fn current_cpu() -> u32 {
    // SAFETY: sched_getcpu has no preconditions; it returns -1 only on kernels without getcpu.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_round_trip_in_the_kernels_format() {
        assert_eq!(parse_mask("00000000,00000003"), Some(vec![0, 1]));
        assert_eq!(parse_mask("0"), Some(vec![]));
        assert_eq!(parse_mask("1,00000000"), Some(vec![32]));
        assert_eq!(parse_mask("f0\n"), Some(vec![4, 5, 6, 7]));
        assert_eq!(parse_mask("zz"), None);
        assert_eq!(format_mask(&[0, 1]), "3");
        assert_eq!(format_mask(&[]), "0");
        assert_eq!(format_mask(&[32]), "1,00000000");
        assert_eq!(format_mask(&[1, 33]), "2,00000002");
    }

    #[test]
    fn parses_and_prints_kernel_cpu_lists() {
        let list: CpuList = "0-3,6,8-9".parse().unwrap();
        assert_eq!(list.iter().collect::<Vec<_>>(), [0, 1, 2, 3, 6, 8, 9]);
        assert_eq!(list.to_string(), "0-3,6,8-9");
        assert_eq!("5".parse::<CpuList>().unwrap().to_string(), "5");
        assert_eq!(" 1 , 0 ".parse::<CpuList>().unwrap().to_string(), "0-1");
    }

    #[test]
    fn rejects_malformed_lists() {
        for bad in ["", "a", "3-1", "1,,2", "-1", "0-"] {
            assert!(bad.parse::<CpuList>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn within_names_the_first_disallowed_cpu() {
        let allowed: CpuList = "0-1".parse().unwrap();
        let err = "0,5"
            .parse::<CpuList>()
            .unwrap()
            .within(&allowed)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "CPU 5 is not available to this process (allowed CPUs: 0-1)"
        );
    }

    #[test]
    fn this_process_may_run_somewhere() {
        let allowed = CpuList::allowed().unwrap();
        assert!(!allowed.is_empty());
        assert!(possible_cpus().unwrap() as usize >= allowed.len());
    }
}
