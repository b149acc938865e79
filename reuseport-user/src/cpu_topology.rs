//! How close two CPUs are: same core (SMT siblings), same last-level cache, same NUMA node, same
//! package, as `/sys/devices/system/cpu/cpuN/{topology,cache,nodeM}` say. The steering fallback
//! uses it to send an empty slot's connections to the nearest live CPU, where the connection's
//! cache lines are cheapest to reach.

use std::{fs, path::Path};

/// Where one CPU sits. Each field names the group of CPUs it shares that level with (the kernel's
/// CPU list of the group, or the node number); `None` where sysfs does not say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuPlace {
    /// The CPUs of its core (`topology/core_cpus_list`; SMT siblings).
    pub core: Option<String>,
    /// The CPUs sharing its last-level cache (`cache/indexN/shared_cpu_list` of the highest level).
    pub llc: Option<String>,
    /// Its NUMA node (`nodeN` under its sysfs directory).
    pub node: Option<u32>,
    /// The CPUs of its package (`topology/package_cpus_list`).
    pub package: Option<String>,
}

/// How far apart two CPUs are, nearest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuDistance {
    /// The same CPU.
    Same,
    /// SMT siblings: one core, its L1 and L2.
    Core,
    /// One last-level cache.
    Cache,
    /// One NUMA node (memory controller), different caches.
    Node,
    /// One package, different nodes.
    Package,
    /// Nothing shared that sysfs tells of.
    Remote,
}

/// The place of every possible CPU (index = CPU number).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuTopology {
    places: Vec<CpuPlace>,
}

impl CpuTopology {
    /// Reads the topology of CPUs `0..possible` from `/sys/devices/system/cpu`. What sysfs does
    /// not say stays unknown (treated as not shared), so this never fails.
    pub fn read(possible: u32) -> Self {
        Self::read_from(Path::new("/sys/devices/system/cpu"), possible)
    }

    /// [`CpuTopology::read`] from another directory laid out like `/sys/devices/system/cpu`.
    pub fn read_from(root: &Path, possible: u32) -> Self {
        let places = (0..possible)
            .map(|cpu| read_place(&root.join(format!("cpu{cpu}"))))
            .collect();
        Self { places }
    }

    /// A topology from known places (index = CPU number).
    pub fn from_places(places: Vec<CpuPlace>) -> Self {
        Self { places }
    }

    /// Where `cpu` sits (all unknown beyond the CPUs read).
    pub fn place(&self, cpu: u32) -> CpuPlace {
        self.places.get(cpu as usize).cloned().unwrap_or_default()
    }

    /// The nearest level `a` and `b` share.
    pub fn distance(&self, a: u32, b: u32) -> CpuDistance {
        if a == b {
            return CpuDistance::Same;
        }
        let (a, b) = (self.place(a), self.place(b));
        let shared = |x: &Option<String>, y: &Option<String>| x.is_some() && x == y;
        if shared(&a.core, &b.core) {
            CpuDistance::Core
        } else if shared(&a.llc, &b.llc) {
            CpuDistance::Cache
        } else if a.node.is_some() && a.node == b.node {
            CpuDistance::Node
        } else if shared(&a.package, &b.package) {
            CpuDistance::Package
        } else {
            CpuDistance::Remote
        }
    }
}

fn read_place(cpu_dir: &Path) -> CpuPlace {
    let read = |path: &Path| {
        fs::read_to_string(path)
            .ok()
            .map(|text| text.trim().to_owned())
            .filter(|text| !text.is_empty())
    };
    let topology = cpu_dir.join("topology");
    CpuPlace {
        core: read(&topology.join("core_cpus_list"))
            .or_else(|| read(&topology.join("thread_siblings_list"))),
        llc: last_level_cache(cpu_dir).and_then(|index| read(&index.join("shared_cpu_list"))),
        node: fs::read_dir(cpu_dir).ok().and_then(|entries| {
            entries.flatten().find_map(|entry| {
                entry
                    .file_name()
                    .to_str()?
                    .strip_prefix("node")?
                    .parse()
                    .ok()
            })
        }),
        package: read(&topology.join("package_cpus_list"))
            .or_else(|| read(&topology.join("core_siblings_list"))),
    }
}

/// The `cache/indexN` directory of the highest cache level.
fn last_level_cache(cpu_dir: &Path) -> Option<std::path::PathBuf> {
    fs::read_dir(cpu_dir.join("cache"))
        .ok()?
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("index"))
        .filter_map(|entry| {
            let level: u32 = fs::read_to_string(entry.path().join("level"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some((level, entry.path()))
        })
        .max_by_key(|(level, _)| *level)
        .map(|(_, path)| path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a sysfs-like tree: 4 CPUs, SMT pairs {0,2} and {1,3}, one LLC, one node.
    fn fake_sysfs(root: &Path) {
        for cpu in 0..4u32 {
            let dir = root.join(format!("cpu{cpu}"));
            let core = if cpu % 2 == 0 { "0,2" } else { "1,3" };
            fs::create_dir_all(dir.join("topology")).unwrap();
            fs::write(dir.join("topology/core_cpus_list"), format!("{core}\n")).unwrap();
            fs::write(dir.join("topology/package_cpus_list"), "0-3\n").unwrap();
            for (index, level, shared) in [(0, 1, core), (2, 2, core), (3, 3, "0-3")] {
                let cache = dir.join(format!("cache/index{index}"));
                fs::create_dir_all(&cache).unwrap();
                fs::write(cache.join("level"), format!("{level}\n")).unwrap();
                fs::write(cache.join("shared_cpu_list"), format!("{shared}\n")).unwrap();
            }
            fs::create_dir_all(dir.join("node0")).unwrap();
        }
    }

    #[test]
    fn reads_cores_caches_nodes_and_packages_from_sysfs() {
        let root = tempfile::tempdir().unwrap();
        fake_sysfs(root.path());
        let topology = CpuTopology::read_from(root.path(), 4);
        assert_eq!(
            topology.place(1),
            CpuPlace {
                core: Some("1,3".into()),
                llc: Some("0-3".into()),
                node: Some(0),
                package: Some("0-3".into()),
            }
        );
        assert_eq!(topology.distance(0, 2), CpuDistance::Core);
        assert_eq!(topology.distance(0, 1), CpuDistance::Cache);
        assert_eq!(topology.distance(3, 3), CpuDistance::Same);
    }

    #[test]
    fn unknown_places_share_nothing() {
        let topology = CpuTopology::read_from(Path::new("/nonexistent"), 2);
        assert_eq!(topology.distance(0, 1), CpuDistance::Remote);
    }

    #[test]
    fn this_machine_has_a_readable_topology() {
        let possible = crate::cpus::possible_cpus().unwrap();
        let topology = CpuTopology::read(possible);
        assert!(topology.place(0).package.is_some(), "{topology:?}");
    }
}
