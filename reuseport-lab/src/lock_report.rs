//! The lock table of `reuseport ab`: per row its most waited-for lock sites ([`crate::locks`]),
//! and, when both ran, the sites whose wait fell most and rose most from `hash` to `percpu`. Figures are per
//! connection (per request for `rr` and `udp`, as every "per conn" metric), the median over a
//! row's repetitions, a site absent from a repetition counting 0 there.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use crate::locks::{LockSite, SiteKey};

/// Sites listed per row, and changes listed.
pub const TOP_SITES: usize = 8;

/// One site's median waits and nanoseconds per connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockLine {
    /// The site.
    #[serde(flatten)]
    pub site: SiteKey,
    /// Contended waits per connection.
    pub waits_per_conn: f64,
    /// Nanoseconds waited per connection.
    pub ns_per_conn: f64,
}

/// One site in `hash` and in `percpu`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockChange {
    /// The site.
    #[serde(flatten)]
    pub site: SiteKey,
    /// Its median waits per connection with `hash`.
    pub hash_waits_per_conn: f64,
    /// With `percpu`.
    pub percpu_waits_per_conn: f64,
    /// Its median nanoseconds per connection with `hash`.
    pub hash_ns_per_conn: f64,
    /// With `percpu`.
    pub percpu_ns_per_conn: f64,
}

impl LockChange {
    /// percpu minus hash, ns per connection.
    pub fn ns_change(&self) -> f64 {
        self.percpu_ns_per_conn - self.hash_ns_per_conn
    }
}

/// One measured run's lock sites and the connections (or requests) they are divided by.
#[derive(Clone, Copy, Debug)]
pub struct RunLocks<'a> {
    /// The run's row.
    pub row: &'a str,
    /// Connections (`crr`) or requests (`rr`, `udp`) of the run.
    pub units: u64,
    /// Its sites.
    pub sites: &'a [LockSite],
    /// Waits the maps had no room for.
    pub unrecorded: u64,
}

/// The lock table's content, as `results.json` keeps it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LockReport {
    /// Per row, its [`TOP_SITES`] sites with the most nanoseconds per connection.
    pub top: BTreeMap<String, Vec<LockLine>>,
    /// The sites whose nanoseconds per connection changed most from `hash` to `percpu`: the
    /// [`TOP_SITES`] largest falls (largest first), then the [`TOP_SITES`] largest rises (largest
    /// first); empty unless both rows ran.
    pub changes: Vec<LockChange>,
    /// Per row, the most waits a run could not attribute to a site (maps full); 0 normally.
    pub unrecorded: BTreeMap<String, u64>,
}

impl LockReport {
    /// Summarizes the runs of `rows`.
    pub fn new(rows: &[String], runs: &[RunLocks<'_>]) -> Self {
        let medians: BTreeMap<&str, BTreeMap<SiteKey, (f64, f64)>> = rows
            .iter()
            .map(|row| (row.as_str(), row_medians(runs, row)))
            .collect();
        let top = medians
            .iter()
            .map(|(row, sites)| {
                let mut lines: Vec<LockLine> = sites
                    .iter()
                    .map(|(site, &(waits, ns))| LockLine {
                        site: site.clone(),
                        waits_per_conn: waits,
                        ns_per_conn: ns,
                    })
                    .filter(|line| line.ns_per_conn > 0.0)
                    .collect();
                lines.sort_by(|a, b| b.ns_per_conn.total_cmp(&a.ns_per_conn));
                lines.truncate(TOP_SITES);
                ((*row).to_owned(), lines)
            })
            .collect();
        let changes = match (medians.get("hash"), medians.get("percpu")) {
            (Some(hash), Some(percpu)) => {
                let mut changes: Vec<LockChange> = hash
                    .keys()
                    .chain(percpu.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .map(|site| {
                        let (hash_waits, hash_ns) = hash.get(site).copied().unwrap_or_default();
                        let (percpu_waits, percpu_ns) =
                            percpu.get(site).copied().unwrap_or_default();
                        LockChange {
                            site: site.clone(),
                            hash_waits_per_conn: hash_waits,
                            percpu_waits_per_conn: percpu_waits,
                            hash_ns_per_conn: hash_ns,
                            percpu_ns_per_conn: percpu_ns,
                        }
                    })
                    .filter(|change| change.ns_change() != 0.0)
                    .collect();
                // The largest falls first, then the largest rises, largest first.
                changes.sort_by(|a, b| a.ns_change().total_cmp(&b.ns_change()));
                let rises = changes.iter().filter(|c| c.ns_change() > 0.0).count();
                let mut falls: Vec<LockChange> = changes.drain(..changes.len() - rises).collect();
                falls.truncate(TOP_SITES);
                changes.reverse();
                changes.truncate(TOP_SITES);
                falls.extend(changes);
                falls
            }
            _ => Vec::new(),
        };
        let unrecorded = rows
            .iter()
            .map(|row| {
                let most = runs
                    .iter()
                    .filter(|run| run.row == row)
                    .map(|run| run.unrecorded)
                    .max()
                    .unwrap_or(0);
                (row.clone(), most)
            })
            .collect();
        Self {
            top,
            changes,
            unrecorded,
        }
    }

    /// The terminal table; empty when no run recorded a contended wait.
    pub fn table(&self, rows: &[String]) -> String {
        if self.top.values().all(Vec::is_empty) {
            return String::new();
        }
        let name = |site: &SiteKey| format!("{} <- {}", site.site, site.caller);
        let width = self
            .top
            .values()
            .flatten()
            .map(|line| name(&line.site).len())
            .chain(self.changes.iter().map(|change| name(&change.site).len()))
            .max()
            .unwrap_or(0)
            .clamp(16, 64);
        let mut out = String::from(
            "\nlock waits by site (median per conn over reps; L: listener-side, counted in \
             listener_lock_*)\n",
        );
        let _ = writeln!(
            out,
            "{:<10} {:<width$} {:<8} {:<14} {:>1} {:>11} {:>10}",
            "row", "site <- caller", "side", "kind", "L", "waits/conn", "ns/conn"
        );
        for row in rows {
            for line in self.top.get(row).into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{:<10} {:<width$} {:<8} {:<14} {:>1} {:>11} {:>10}",
                    row,
                    name(&line.site),
                    line.site.side.to_string(),
                    line.site.kind,
                    if line.site.listener { "L" } else { "" },
                    format!("{:.4}", line.waits_per_conn),
                    format!("{:.1}", line.ns_per_conn),
                );
            }
        }
        if !self.changes.is_empty() {
            let _ = writeln!(
                out,
                "\nlargest changes, percpu vs hash (ns/conn; waits/conn hash -> percpu): falls, \
                 then rises"
            );
            let _ = writeln!(
                out,
                "{:<width$} {:<8} {:<14} {:>1} {:>10} {:>10} {:>10}  waits/conn",
                "site <- caller", "side", "kind", "L", "hash", "percpu", "change"
            );
            for change in &self.changes {
                let _ = writeln!(
                    out,
                    "{:<width$} {:<8} {:<14} {:>1} {:>10} {:>10} {:>+10.1}  {:.4} -> {:.4}",
                    name(&change.site),
                    change.site.side.to_string(),
                    change.site.kind,
                    if change.site.listener { "L" } else { "" },
                    format!("{:.1}", change.hash_ns_per_conn),
                    format!("{:.1}", change.percpu_ns_per_conn),
                    change.ns_change(),
                    change.hash_waits_per_conn,
                    change.percpu_waits_per_conn,
                );
            }
        }
        for (row, unrecorded) in &self.unrecorded {
            if *unrecorded > 0 {
                let _ = writeln!(
                    out,
                    "{row}: up to {unrecorded} contended waits in a run not attributed to a site \
                     (probe maps full); the totals include them"
                );
            }
        }
        out
    }
}

/// Per site, the median over `row`'s runs of (waits, ns) per unit; 0 where a run lacks the site.
fn row_medians(runs: &[RunLocks<'_>], row: &str) -> BTreeMap<SiteKey, (f64, f64)> {
    let runs: Vec<&RunLocks<'_>> = runs
        .iter()
        .filter(|run| run.row == row && run.units > 0)
        .collect();
    let mut per_run: BTreeMap<SiteKey, Vec<(f64, f64)>> = BTreeMap::new();
    for (index, run) in runs.iter().enumerate() {
        for site in run.sites {
            let values = per_run
                .entry(site.key())
                .or_insert_with(|| vec![(0.0, 0.0); runs.len()]);
            let units = run.units as f64;
            values[index].0 += site.count as f64 / units;
            values[index].1 += site.wait_ns as f64 / units;
        }
    }
    per_run
        .into_iter()
        .map(|(site, values)| {
            let mut waits: Vec<f64> = values.iter().map(|v| v.0).collect();
            let mut ns: Vec<f64> = values.iter().map(|v| v.1).collect();
            let waits = crate::metrics::median(&mut waits).unwrap_or(0.0);
            let ns = crate::metrics::median(&mut ns).unwrap_or(0.0);
            (site, (waits, ns))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locks::Side;

    fn site(name: &str, side: Side, listener: bool, count: u64, wait_ns: u64) -> LockSite {
        LockSite {
            site: name.into(),
            caller: "caller".into(),
            side,
            kind: "spin".into(),
            listener,
            count,
            wait_ns,
        }
    }

    #[test]
    fn medians_per_conn_top_sites_and_largest_changes() {
        let hash_1 = [
            site("accept_queue", Side::Softirq, true, 10, 10_000),
            site("backlog", Side::Client, false, 4, 2_000),
        ];
        // The second hash run lacks `backlog`: it counts 0 there.
        let hash_2 = [site("accept_queue", Side::Softirq, true, 20, 30_000)];
        let percpu = [
            site("accept_queue", Side::Softirq, true, 1, 1_000),
            site("backlog", Side::Client, false, 40, 50_000),
        ];
        let runs = [
            RunLocks {
                row: "hash",
                units: 100,
                sites: &hash_1,
                unrecorded: 0,
            },
            RunLocks {
                row: "hash",
                units: 200,
                sites: &hash_2,
                unrecorded: 3,
            },
            RunLocks {
                row: "percpu",
                units: 100,
                sites: &percpu,
                unrecorded: 0,
            },
        ];
        let rows = ["hash".to_owned(), "percpu".to_owned()];
        let report = LockReport::new(&rows, &runs);
        let hash = &report.top["hash"];
        assert_eq!(hash[0].site.site, "accept_queue");
        // Medians of 10000/100 and 30000/200; of 2000/100 and 0.
        assert_eq!((hash[0].waits_per_conn, hash[0].ns_per_conn), (0.1, 125.0));
        assert_eq!((hash[1].waits_per_conn, hash[1].ns_per_conn), (0.02, 10.0));
        let percpu_top = &report.top["percpu"];
        assert_eq!(percpu_top[0].site.site, "backlog");
        // Falls first, then rises.
        assert_eq!(report.changes.len(), 2);
        assert_eq!(report.changes[0].site.site, "accept_queue");
        assert_eq!(report.changes[0].ns_change(), 10.0 - 125.0);
        assert_eq!(report.changes[1].site.site, "backlog");
        assert_eq!(report.changes[1].ns_change(), 490.0);
        assert_eq!(report.unrecorded["hash"], 3);
        let table = report.table(&rows);
        assert!(table.contains("accept_queue <- caller"), "{table}");
        assert!(table.contains("largest changes, percpu vs hash"), "{table}");
        assert!(table.contains("+490.0"), "{table}");
        assert!(table.contains("hash: up to 3 contended waits"), "{table}");
        let back: LockReport =
            serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn changes_keep_the_largest_falls_and_the_largest_rises() {
        // Sites 1..=10 fall by 10*i ns/conn, sites 11..=20 rise by 10*(i-10).
        let hash: Vec<LockSite> = (1..=20)
            .map(|i| {
                site(
                    &format!("s{i}"),
                    Side::Server,
                    false,
                    1,
                    if i <= 10 { 20 * i } else { 0 },
                )
            })
            .collect();
        let percpu: Vec<LockSite> = (1..=20)
            .map(|i| {
                let ns = if i <= 10 { 10 * i } else { 10 * (i - 10) };
                site(&format!("s{i}"), Side::Server, false, 1, ns)
            })
            .collect();
        let runs = [
            RunLocks {
                row: "hash",
                units: 1,
                sites: &hash,
                unrecorded: 0,
            },
            RunLocks {
                row: "percpu",
                units: 1,
                sites: &percpu,
                unrecorded: 0,
            },
        ];
        let report = LockReport::new(&["hash".to_owned(), "percpu".to_owned()], &runs);
        let changes: Vec<f64> = report.changes.iter().map(LockChange::ns_change).collect();
        assert_eq!(
            changes,
            [
                -100.0, -90.0, -80.0, -70.0, -60.0, -50.0, -40.0, -30.0, 100.0, 90.0, 80.0, 70.0,
                60.0, 50.0, 40.0, 30.0
            ]
        );
    }

    #[test]
    fn no_waits_no_table() {
        let rows = ["hash".to_owned()];
        let report = LockReport::new(&rows, &[]);
        assert!(report.table(&rows).is_empty());
        assert!(report.changes.is_empty());
    }
}
