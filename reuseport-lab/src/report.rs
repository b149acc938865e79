//! The experiment's report: per row and metric the median and min–max over repetitions, the
//! percpu/hash ratio with its 95 % bootstrap interval (flagged where the difference is not
//! established, see [`crate::significance`]) and every other row against its baseline
//! ([`Comparison`]), as a terminal table, `results.json` (every raw run
//! plus the summary) and `results.svg` (a chart of the key metrics). [`Report::read`] loads a
//! `results.json` back to redraw both.

use std::{collections::BTreeMap, fmt::Write as _, fs, io, path::Path};

use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::{
    lock_report::{LockReport, RunLocks},
    metrics::{Metric, MetricId, Raw, median, unsupported},
    runner::{AbConfig, AbResults, CrossCheck, RunRecord},
    significance::ratio_interval,
    topology::{ClientRx, ServerRx, TopologyKind},
};

/// Errors from writing or reading the report.
#[derive(Debug, Error)]
pub enum ReportError {
    /// Reading `results.json` failed.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `results.json` is not a report.
    #[error("{path} is not an experiment's results.json: {detail}")]
    Malformed {
        /// The file.
        path: String,
        /// What serde said.
        detail: String,
    },
    /// Writing a file failed.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Drawing the chart failed.
    #[error("drawing {path}: {detail}")]
    Chart {
        /// The file.
        path: String,
        /// What plotters said.
        detail: String,
    },
}

/// Median and range of one metric over repetitions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Range {
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Range {
    fn of(values: &mut [f64]) -> Option<Self> {
        Some(Self {
            median: median(values)?,
            min: *values.first()?,
            max: *values.last()?,
        })
    }

    fn overlaps(&self, other: &Self) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

/// A metric's summary for one row.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Summary {
    /// Measured.
    Range(Range),
    /// The machine cannot measure it.
    Unsupported(&'static str),
    /// Not applicable to this row.
    None(()),
}

impl<'de> Deserialize<'de> for Summary {
    /// A range, [`crate::metrics::UNSUPPORTED`] ([`Summary::Unsupported`]), or null.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Option::<Raw<Range>>::deserialize(deserializer)? {
            Some(Raw::Value(range)) => Self::Range(range),
            Some(Raw::Text(text)) => Self::Unsupported(unsupported::<D::Error>(&text)?),
            None => Self::None(()),
        })
    }
}

/// `percpu` over `hash` for one metric.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    /// percpu median / hash median.
    pub ratio: f64,
    /// Whether the two min–max ranges overlap (kept for readers of older files; the table goes
    /// by `established`).
    pub ranges_overlap: bool,
    /// Lower bound of the ratio's 95 % bootstrap interval over repetitions.
    #[serde(default)]
    pub ci_low: f64,
    /// Upper bound of that interval.
    #[serde(default)]
    pub ci_high: f64,
    /// Whether the difference is established: the interval excludes 1 and each side had at
    /// least two repetitions.
    #[serde(default)]
    pub established: bool,
    /// Repetitions each side had for this metric.
    #[serde(default)]
    pub reps: RatioReps,
}

/// Repetitions behind a [`Ratio`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatioReps {
    /// Measured `percpu` runs.
    pub percpu: usize,
    /// Measured `hash` runs.
    pub hash: usize,
}

/// Another row against its baseline: `percpu-spill`, `cbpf`, `bpf-noop`, ... against `hash`,
/// `nginx+attach` against `nginx`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The row.
    pub row: String,
    /// The row it is compared with.
    pub baseline: String,
    /// Per metric: the row's median / the baseline's, with its 95 % bootstrap interval.
    pub ratios: BTreeMap<MetricId, ComparedRatio>,
}

/// One metric of a [`Comparison`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComparedRatio {
    /// The row's median / the baseline's median.
    pub ratio: f64,
    /// Lower bound of the ratio's 95 % bootstrap interval over repetitions.
    pub ci_low: f64,
    /// Upper bound of that interval.
    pub ci_high: f64,
    /// Whether the difference is established: the interval excludes 1 and each side had at
    /// least two repetitions.
    pub established: bool,
    /// Measured runs of the row.
    pub row_reps: usize,
    /// Measured runs of the baseline.
    pub baseline_reps: usize,
}

/// Facts about the machine and the run, so results can be compared across machines.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    /// CPUs the experiment used.
    pub cpus: usize,
    /// `uname -r`.
    pub kernel: String,
    /// `veth-rss`, `veth-rps` or `loopback` (`veth` in files written before veth-rss existed).
    pub topology: String,
    /// The server's CPUs (absent in files written before the split existed).
    #[serde(default)]
    pub server_cpus: Option<String>,
    /// The load generators' CPUs: the same list when they shared the server's.
    #[serde(default)]
    pub client_cpus: Option<String>,
    /// How the server's end of a veth-rss pair processed the clients' packets (`napi-thread` or
    /// `softirq`; absent for other topologies and in files written before it could be chosen,
    /// when it was `napi-thread`).
    #[serde(default)]
    pub server_rx: Option<ServerRx>,
    /// How the clients' end of a veth-rss pair processed the server's replies (`napi-thread` or
    /// `softirq`; absent for other topologies and in files written before it could be chosen).
    #[serde(default)]
    pub client_rx: Option<ClientRx>,
    /// Whether every SYN was processed on one CPU (`--skew`).
    pub skew: bool,
    /// `crr`, `rr` or `udp`.
    pub load: String,
    /// Concurrent clients.
    pub connections: usize,
    /// Measured seconds per run.
    pub duration_s: f64,
    /// Repetitions per row.
    pub reps: usize,
}

/// Everything `results.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The machine and settings.
    pub machine: Machine,
    /// Per row, per metric.
    pub summary: BTreeMap<String, BTreeMap<MetricId, Summary>>,
    /// percpu / hash per metric, when both rows ran.
    pub ratios: BTreeMap<MetricId, Ratio>,
    /// Every other row against its baseline (absent from files written before it existed, and
    /// then computed from their runs when read).
    #[serde(default)]
    pub comparisons: Vec<Comparison>,
    /// wrk vs the built-in generator.
    pub cross_check: Option<CrossCheck>,
    /// Every measured run.
    pub runs: Vec<RunRecord>,
    /// Row order as run.
    pub rows: Vec<String>,
    /// The lock table: top lock sites per row, largest changes percpu vs hash (absent from
    /// files written before it existed).
    #[serde(default)]
    pub locks: LockReport,
}

impl Report {
    /// Summarizes `results` of an experiment run with `config`.
    pub fn new(config: &AbConfig, results: AbResults, cpus: usize) -> Self {
        let mut rows: Vec<String> = Vec::new();
        for run in &results.runs {
            if !rows.contains(&run.row) {
                rows.push(run.row.clone());
            }
        }
        let summary: BTreeMap<String, BTreeMap<MetricId, Summary>> = rows
            .iter()
            .map(|row| {
                let runs: Vec<&RunRecord> = results.runs.iter().filter(|r| &r.row == row).collect();
                let metrics = MetricId::ALL
                    .into_iter()
                    .map(|metric| (metric, summarize(&runs, metric)))
                    .collect();
                (row.clone(), metrics)
            })
            .collect();
        let ratios = ratios(&summary, &results.runs);
        let comparisons = comparisons(&rows, &summary, &results.runs);
        let run_locks: Vec<RunLocks<'_>> = results
            .runs
            .iter()
            .map(|run| RunLocks {
                row: &run.row,
                units: crate::runner::units(config.load, &run.load),
                sites: &run.probes.locks,
                unrecorded: run.probes.sum.lock_unrecorded,
            })
            .collect();
        let locks = LockReport::new(&rows, &run_locks);
        let kernel = reuseport::kernel::release();
        let rx = (config.topology == TopologyKind::VethRss).then_some(config.veth_rx);
        Self {
            machine: Machine {
                cpus,
                kernel,
                topology: config.topology.to_string(),
                server_cpus: Some(config.cpus.server.to_string()),
                client_cpus: Some(config.cpus.client.to_string()),
                server_rx: rx.map(|rx| rx.server),
                client_rx: rx.map(|rx| rx.client),
                skew: config.skew,
                load: format!("{:?}", config.load).to_lowercase(),
                connections: config.connections,
                duration_s: config.duration.as_secs_f64(),
                reps: config.reps,
            },
            summary,
            ratios,
            comparisons,
            cross_check: results.cross_check,
            runs: results.runs,
            rows,
            locks,
        }
    }

    /// Reads a `results.json` written by [`Report::write_json`]. A file written before ratios
    /// had intervals gets them computed from its runs.
    pub fn read(path: &Path) -> Result<Self, ReportError> {
        let text = fs::read_to_string(path).map_err(|source| ReportError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut report: Self =
            serde_json::from_str(&text).map_err(|err| ReportError::Malformed {
                path: path.display().to_string(),
                detail: err.to_string(),
            })?;
        if report.ratios.values().any(|ratio| ratio.reps.percpu == 0) {
            report.ratios = ratios(&report.summary, &report.runs);
        }
        if report.comparisons.is_empty() {
            report.comparisons = comparisons(&report.rows, &report.summary, &report.runs);
        }
        Ok(report)
    }

    /// The terminal table: one line per metric, one column per row, then percpu/hash with its
    /// 95 % interval, `~` where the difference is not established; then the lock table
    /// ([`LockReport::table`]).
    pub fn table(&self) -> String {
        let split = match (&self.machine.server_cpus, &self.machine.client_cpus) {
            (Some(server), Some(client)) if server == client => {
                format!(" (server and clients share {server})")
            }
            (Some(server), Some(client)) => format!(" (server {server}, clients {client})"),
            _ => String::new(),
        };
        let rx = match (self.machine.server_rx, self.machine.client_rx) {
            (Some(server), Some(client)) => format!(" (server rx {server}, client rx {client})"),
            (None, Some(client)) => format!(" (client rx {client})"),
            (Some(server), None) => format!(" (server rx {server})"),
            (None, None) => String::new(),
        };
        let mut out = format!(
            "{} CPUs{split}, kernel {}, topology {}{rx}, load {} x{} for {}s, {} reps (median [min-max])\n",
            self.machine.cpus,
            self.machine.kernel,
            self.machine.topology,
            self.machine.load,
            self.machine.connections,
            self.machine.duration_s,
            self.machine.reps
        );
        // As wide as the longest metric name, so every row's cells line up.
        let width = MetricId::ALL
            .iter()
            .map(|metric| metric.name().len())
            .max()
            .unwrap_or(0);
        let _ = write!(out, "{:<width$}", "metric");
        for row in &self.rows {
            let _ = write!(out, " {row:>26}");
        }
        let with_ratio = !self.ratios.is_empty();
        if with_ratio {
            out.push_str("  percpu/hash");
        }
        out.push('\n');
        for metric in MetricId::ALL {
            let _ = write!(out, "{:<width$}", metric.name());
            for row in &self.rows {
                let cell = match self.summary.get(row).and_then(|m| m.get(&metric)) {
                    Some(Summary::Range(r)) => {
                        format!("{} [{}-{}]", number(r.median), number(r.min), number(r.max))
                    }
                    Some(Summary::Unsupported(text)) => (*text).to_owned(),
                    _ => "-".to_owned(),
                };
                let _ = write!(out, " {cell:>26}");
            }
            if let Some(ratio) = self.ratios.get(&metric) {
                let flag = if ratio.established { "" } else { " ~" };
                let _ = write!(
                    out,
                    "  {:.2} [{:.2}-{:.2}]{flag}",
                    ratio.ratio, ratio.ci_low, ratio.ci_high
                );
            }
            out.push('\n');
        }
        if with_ratio {
            let reps = |row: &str| self.runs.iter().filter(|run| run.row == row).count();
            let _ = writeln!(
                out,
                "percpu/hash: ratio of medians [95% bootstrap interval, {} resamples over \
                 repetitions: percpu {} reps, hash {} reps]",
                crate::significance::RESAMPLES,
                reps("percpu"),
                reps("hash")
            );
            out.push_str(
                "(~: not established: the interval includes 1, or a side had one repetition)\n",
            );
        }
        for comparison in &self.comparisons {
            let mut cells = Vec::new();
            let mut reps = None;
            for metric in [MetricId::ConnPerS, MetricId::P99Us] {
                if let Some(ratio) = comparison.ratios.get(&metric) {
                    let flag = if ratio.established { "" } else { " ~" };
                    cells.push(format!(
                        "{} {:.2} [{:.2}-{:.2}]{flag}",
                        metric.name(),
                        ratio.ratio,
                        ratio.ci_low,
                        ratio.ci_high
                    ));
                    reps = Some((ratio.row_reps, ratio.baseline_reps));
                }
            }
            if let Some((row_reps, baseline_reps)) = reps {
                let _ = writeln!(
                    out,
                    "{}/{}: {} ({row_reps} and {baseline_reps} reps)",
                    comparison.row,
                    comparison.baseline,
                    cells.join(", ")
                );
            }
        }
        if let Some(check) = &self.cross_check {
            let _ = writeln!(
                out,
                "cross-check ({}): wrk {:.0} req/s vs built-in {:.0} req/s (wrk/built-in {:.2})",
                check.mode, check.wrk_req_per_s, check.builtin_req_per_s, check.ratio
            );
        }
        out.push_str(&self.locks.table(&self.rows));
        out
    }

    /// Writes `results.json`.
    pub fn write_json(&self, path: &Path) -> Result<(), ReportError> {
        let write_error = |source| ReportError::Write {
            path: path.display().to_string(),
            source,
        };
        let json =
            serde_json::to_string_pretty(self).map_err(|err| write_error(io::Error::other(err)))?;
        fs::write(path, json + "\n").map_err(write_error)
    }

    /// Writes `results.svg`: the key metrics of every row relative to the first row's median
    /// (so one axis fits them all), bars at the median, whiskers at min and max.
    pub fn write_svg(&self, path: &Path) -> Result<(), ReportError> {
        let key: Vec<(MetricId, &str)> = MetricId::charted().collect();
        let chart_error = |detail: String| ReportError::Chart {
            path: path.display().to_string(),
            detail,
        };
        let Some(baseline_row) = self.rows.first() else {
            return Err(chart_error("no runs".into()));
        };
        let range = |row: &str, metric: MetricId| match self.summary.get(row)?.get(&metric)? {
            Summary::Range(r) => Some(*r),
            _ => None,
        };
        let mut top: f64 = 1.5;
        let mut bars = Vec::new();
        for (m, &(metric, _)) in key.iter().enumerate() {
            let Some(base) = range(baseline_row, metric).filter(|b| b.median > 0.0) else {
                continue;
            };
            for (r, row) in self.rows.iter().enumerate() {
                if let Some(value) = range(row, metric) {
                    let rel = |v: f64| v / base.median;
                    top = top.max(rel(value.max) * 1.1);
                    bars.push((m, r, rel(value.median), rel(value.min), rel(value.max)));
                }
            }
        }
        let rows = self.rows.len().max(1) as f64;
        let root = SVGBackend::new(path, (1100, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| chart_error(e.to_string()))?;
        let caption = format!(
            "{} vs {baseline_row} (= 1.0): {} CPUs, {} topology, {} load",
            self.rows.join(" / "),
            self.machine.cpus,
            self.machine.topology,
            self.machine.load
        );
        // The band below 0 holds the metric names, drawn as text at each group's centre.
        let floor = -0.08 * top;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(10)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..key.len() as f64, floor..top)
            .map_err(|e| chart_error(e.to_string()))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(format!("relative to {baseline_row}"))
            .draw()
            .map_err(|e| chart_error(e.to_string()))?;
        let centred = TextStyle::from(("sans-serif", 13).into_font())
            .pos(Pos::new(HPos::Center, VPos::Center));
        chart
            .draw_series(key.iter().enumerate().map(|(m, (_, label))| {
                Text::new(*label, (m as f64 + 0.5, floor / 2.0), centred.clone())
            }))
            .map_err(|e| chart_error(e.to_string()))?;
        let width = 0.8 / rows;
        for (r, row) in self.rows.iter().enumerate() {
            let color = Palette99::pick(r).to_rgba();
            let row_bars: Vec<_> = bars.iter().filter(|b| b.1 == r).collect();
            chart
                .draw_series(row_bars.iter().map(|&&(m, _, median, _, _)| {
                    let x0 = m as f64 + 0.1 + width * r as f64;
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.9, median)], color.filled())
                }))
                .map_err(|e| chart_error(e.to_string()))?
                .label(row.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
            chart
                .draw_series(row_bars.iter().map(|&&(m, _, _, min, max)| {
                    let x = m as f64 + 0.1 + width * r as f64 + width * 0.45;
                    PathElement::new(vec![(x, min), (x, max)], BLACK.stroke_width(2))
                }))
                .map_err(|e| chart_error(e.to_string()))?;
            let above = TextStyle::from(("sans-serif", 11).into_font())
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            chart
                .draw_series(row_bars.iter().map(|&&(m, _, median, _, max)| {
                    let x = m as f64 + 0.1 + width * r as f64 + width * 0.45;
                    Text::new(format!("{median:.2}"), (x, max + 0.01 * top), above.clone())
                }))
                .map_err(|e| chart_error(e.to_string()))?;
        }
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, 1.0), (key.len() as f64, 1.0)],
                BLACK.mix(0.4),
            )))
            .map_err(|e| chart_error(e.to_string()))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| chart_error(e.to_string()))?;
        root.present().map_err(|e| chart_error(e.to_string()))
    }
}

/// percpu / hash per metric with its bootstrap interval, when both rows ran.
fn ratios(
    summary: &BTreeMap<String, BTreeMap<MetricId, Summary>>,
    runs: &[RunRecord],
) -> BTreeMap<MetricId, Ratio> {
    ratios_between(summary, runs, "percpu", "hash")
}

/// Every row but `hash` and `percpu` against its baseline: `nginx` for `nginx+attach`, `hash`
/// for the others; rows whose baseline did not run are left out.
fn comparisons(
    rows: &[String],
    summary: &BTreeMap<String, BTreeMap<MetricId, Summary>>,
    runs: &[RunRecord],
) -> Vec<Comparison> {
    rows.iter()
        .filter(|row| !matches!(row.as_str(), "hash" | "percpu" | "nginx"))
        .filter_map(|row| {
            let baseline = if row == "nginx+attach" {
                "nginx"
            } else {
                "hash"
            };
            rows.iter().any(|r| r == baseline).then(|| Comparison {
                row: row.clone(),
                baseline: baseline.to_owned(),
                ratios: ratios_between(summary, runs, row, baseline)
                    .into_iter()
                    .map(|(metric, ratio)| {
                        let compared = ComparedRatio {
                            ratio: ratio.ratio,
                            ci_low: ratio.ci_low,
                            ci_high: ratio.ci_high,
                            established: ratio.established,
                            row_reps: ratio.reps.percpu,
                            baseline_reps: ratio.reps.hash,
                        };
                        (metric, compared)
                    })
                    .collect(),
            })
        })
        .collect()
}

/// `row` / `baseline` per metric with its bootstrap interval, when both rows ran (the
/// [`RatioReps`] count `row` as `percpu` and `baseline` as `hash`).
fn ratios_between(
    summary: &BTreeMap<String, BTreeMap<MetricId, Summary>>,
    runs: &[RunRecord],
    row: &str,
    baseline: &str,
) -> BTreeMap<MetricId, Ratio> {
    let (Some(top), Some(bottom)) = (summary.get(row), summary.get(baseline)) else {
        return BTreeMap::new();
    };
    let values = |row: &str, metric: MetricId| -> Vec<f64> {
        runs.iter()
            .filter(|run| run.row == row)
            .filter_map(|run| run.metrics.get(&metric).and_then(Metric::value))
            .collect()
    };
    MetricId::ALL
        .into_iter()
        .filter_map(|metric| {
            let (Some(Summary::Range(t)), Some(Summary::Range(b))) =
                (top.get(&metric), bottom.get(&metric))
            else {
                return None;
            };
            if b.median == 0.0 {
                return None;
            }
            let ratio = t.median / b.median;
            let (t_values, b_values) = (values(row, metric), values(baseline, metric));
            // No interval (every resampled baseline median 0): the observed ratio, not
            // established.
            let (ci_low, ci_high, established) = ratio_interval(&t_values, &b_values)
                .map_or((ratio, ratio, false), |ci| {
                    (ci.low, ci.high, ci.established)
                });
            Some((
                metric,
                Ratio {
                    ratio,
                    ranges_overlap: t.overlaps(b),
                    ci_low,
                    ci_high,
                    established,
                    reps: RatioReps {
                        percpu: t_values.len(),
                        hash: b_values.len(),
                    },
                },
            ))
        })
        .collect()
}

fn summarize(runs: &[&RunRecord], metric: MetricId) -> Summary {
    let metrics: Vec<Metric> = runs
        .iter()
        .filter_map(|r| r.metrics.get(&metric).copied())
        .collect();
    if let Some(Metric::Unsupported(text)) = metrics.first() {
        return Summary::Unsupported(text);
    }
    let mut values: Vec<f64> = metrics.iter().filter_map(Metric::value).collect();
    Range::of(&mut values).map_or(Summary::None(()), Summary::Range)
}

/// Compact number: `32496`, `118.2`, `0.5019`.
fn number(value: f64) -> String {
    if value.abs() >= 1000.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_takes_median_and_extremes() {
        let r = Range::of(&mut [3.0, 1.0, 2.0, 10.0, 5.0]).unwrap();
        assert_eq!((r.median, r.min, r.max), (3.0, 1.0, 10.0));
        assert_eq!(median(&mut [4.0, 1.0]), Some(2.5));
        assert!(Range::of(&mut []).is_none());
        let other = Range::of(&mut [11.0, 12.0]).unwrap();
        assert!(!r.overlaps(&other));
        assert!(r.overlaps(&Range::of(&mut [9.0, 12.0]).unwrap()));
    }

    /// Two reps per row: conn/s clearly apart (established), p99 overlapping (not), cache misses
    /// unsupported, locality absent for hash.
    fn fixed_report() -> Report {
        fixed_report_of(&[
            ("hash", 1, 1000.0, 200.0),
            ("percpu", 1, 1300.0, 190.0),
            ("percpu", 2, 1320.0, 215.0),
            ("hash", 2, 1010.0, 205.0),
        ])
    }

    /// A report of runs `(row, rep, conn/s, p99)`.
    fn fixed_report_of(runs: &[(&str, usize, f64, f64)]) -> Report {
        let record = |row: &str, rep: usize, conn: f64, p99: f64| {
            let mut metrics = BTreeMap::new();
            metrics.insert(MetricId::ConnPerS, Metric::Value(conn));
            metrics.insert(MetricId::P99Us, Metric::Value(p99));
            metrics.insert(
                MetricId::CacheMissesPerConn,
                Metric::Unsupported(crate::metrics::UNSUPPORTED),
            );
            metrics.insert(
                MetricId::Locality,
                if row == "percpu" {
                    Metric::Value(1.0)
                } else {
                    Metric::None(())
                },
            );
            let mut hw = BTreeMap::new();
            hw.insert("cycles".to_owned(), crate::hw_counters::HwCount::Count(7));
            hw.insert(
                "cache_misses".to_owned(),
                crate::hw_counters::HwCount::Unsupported(crate::metrics::UNSUPPORTED),
            );
            let lock_site = crate::locks::LockSite {
                site: "inet_csk_reqsk_queue_add".into(),
                caller: "inet_csk_complete_hashdance".into(),
                side: crate::locks::Side::Softirq,
                kind: "spin".into(),
                listener: true,
                count: if row == "percpu" { 2 } else { 5 },
                wait_ns: if row == "percpu" { 400 } else { 1000 } * rep as u64,
            };
            RunRecord {
                row: row.to_owned(),
                rep,
                metrics,
                load: crate::load::LoadReport {
                    connections: 100,
                    ..Default::default()
                },
                server: None,
                probes: crate::probes::ProbeTotals {
                    locks: vec![lock_site],
                    ..Default::default()
                },
                ipis: 3,
                hw,
                losses: Default::default(),
                cpu: Default::default(),
            }
        };
        let runs: Vec<RunRecord> = runs
            .iter()
            .map(|&(row, rep, conn, p99)| record(row, rep, conn, p99))
            .collect();
        let planned_runs = runs.len();
        let config = AbConfig {
            binary: "reuseport".into(),
            modes: vec![],
            peer_nginx: false,
            peer_nginx_attach: false,
            cross_check_wrk: false,
            calibrate: false,
            topology: crate::topology::TopologyKind::Loopback,
            veth_rx: crate::topology::VethRx::THREADS,
            cpus: crate::cpu_split::CpuSplit::shared(&"0-1".parse().unwrap()),
            skew: false,
            spill: reuseport::spill::SpillConfig::default(),
            restart_every: None,
            load: crate::load::LoadKind::Crr,
            connections: 8,
            duration: std::time::Duration::from_secs(3),
            warmup: std::time::Duration::ZERO,
            reps: 2,
            out: "unused".into(),
        };
        let results = AbResults {
            runs,
            cross_check: None,
            interrupted: false,
            planned_runs,
        };
        Report::new(&config, results, 2)
    }

    #[test]
    fn other_rows_are_compared_with_hash_and_nginx_attach_with_nginx() {
        let report = fixed_report_of(&[
            ("hash", 1, 1000.0, 200.0),
            ("hash", 2, 1010.0, 205.0),
            ("percpu", 1, 1300.0, 190.0),
            ("percpu", 2, 1320.0, 215.0),
            ("percpu-spill", 1, 1500.0, 100.0),
            ("percpu-spill", 2, 1520.0, 300.0),
            ("nginx", 1, 900.0, 210.0),
            ("nginx", 2, 910.0, 220.0),
            ("nginx+attach", 1, 990.0, 200.0),
            ("nginx+attach", 2, 1000.0, 210.0),
        ]);
        let compared: Vec<(&str, &str)> = report
            .comparisons
            .iter()
            .map(|c| (c.row.as_str(), c.baseline.as_str()))
            .collect();
        assert_eq!(
            compared,
            [("percpu-spill", "hash"), ("nginx+attach", "nginx")]
        );
        let spill = &report.comparisons[0].ratios;
        let conn = spill[&MetricId::ConnPerS];
        assert!((conn.ratio - 1510.0 / 1005.0).abs() < 1e-9, "{conn:?}");
        assert!(conn.established && conn.ci_low > 1.0, "{conn:?}");
        assert_eq!((conn.row_reps, conn.baseline_reps), (2, 2));
        let p99 = spill[&MetricId::P99Us];
        assert!(!p99.established, "{p99:?}");
        let attach = report.comparisons[1].ratios[&MetricId::ConnPerS];
        assert!((attach.ratio - 995.0 / 905.0).abs() < 1e-9, "{attach:?}");
        let table = report.table();
        assert!(
            table.contains(&format!(
                "percpu-spill/hash: conn_per_s {:.2} [{:.2}-{:.2}], p99_us {:.2} [{:.2}-{:.2}] ~ (2 and 2 reps)",
                conn.ratio, conn.ci_low, conn.ci_high, p99.ratio, p99.ci_low, p99.ci_high
            )),
            "{table}"
        );
        assert!(table.contains("nginx+attach/nginx: conn_per_s"), "{table}");
        // Read back from JSON, and from a file written before comparisons existed.
        let json = serde_json::to_string(&report).unwrap();
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        old.as_object_mut().unwrap().remove("comparisons");
        let dir = std::env::temp_dir().join(format!("reuseport-cmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("results.json");
        std::fs::write(&path, old.to_string()).unwrap();
        let read = Report::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read.comparisons, report.comparisons);
    }

    #[test]
    fn ratios_carry_intervals_and_the_table_marks_what_is_not_established() {
        let report = fixed_report();
        let conn = report.ratios[&MetricId::ConnPerS];
        assert!(conn.established && conn.ci_low > 1.0, "{conn:?}");
        assert_eq!(conn.reps, RatioReps { percpu: 2, hash: 2 });
        let p99 = report.ratios[&MetricId::P99Us];
        assert!(
            !p99.established && p99.ci_low < 1.0 && p99.ci_high > 1.0,
            "{p99:?}"
        );
        assert!(!report.ratios.contains_key(&MetricId::CacheMissesPerConn));
        let table = report.table();
        let line = |name: &str| {
            table
                .lines()
                .find(|line| line.starts_with(name))
                .unwrap()
                .to_owned()
        };
        assert!(line("conn_per_s").ends_with(&format!(
            "{:.2} [{:.2}-{:.2}]",
            conn.ratio, conn.ci_low, conn.ci_high
        )));
        assert!(line("p99_us").ends_with(" ~"));
        assert!(line("cache_misses_per_conn").contains("unsupported"));
        assert!(table.contains("percpu 2 reps, hash 2 reps"), "{table}");
        // Every metric's first cell ends in the same column, after the longest metric name.
        let width = MetricId::ALL
            .map(|metric| metric.name().len())
            .into_iter()
            .max()
            .unwrap();
        for metric in MetricId::ALL {
            assert_ne!(line(metric.name()).as_bytes()[width + 26], b' ', "{table}");
        }
        // The lock table follows: the site per row, and its change percpu vs hash.
        let lock_table = table
            .split_once("lock waits by site")
            .map(|(_, rest)| rest)
            .unwrap_or_else(|| panic!("no lock table: {table}"));
        assert!(
            lock_table.contains("inet_csk_reqsk_queue_add <- inet_csk_complete_hashdance"),
            "{table}"
        );
        assert_eq!(report.locks.changes.len(), 1);
        assert_eq!(report.locks.changes[0].hash_waits_per_conn, 0.05);
        assert_eq!(report.locks.changes[0].percpu_waits_per_conn, 0.02);
    }

    #[test]
    fn the_table_header_names_the_receive_paths_beside_the_topology() {
        let mut report = fixed_report();
        assert_eq!(report.machine.server_rx, None, "loopback has none");
        assert_eq!(report.machine.client_rx, None, "loopback has none");
        assert!(report.table().contains("topology loopback, load"));
        report.machine.topology = "veth-rss".to_owned();
        report.machine.server_rx = Some(ServerRx::Softirq);
        report.machine.client_rx = Some(ClientRx::NapiThread);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["machine"]["server_rx"], "softirq");
        assert_eq!(json["machine"]["client_rx"], "napi-thread");
        assert!(
            report
                .table()
                .contains("topology veth-rss (server rx softirq, client rx napi-thread), load"),
            "{}",
            report.table()
        );
        // A file from before --server-rx names the client's only.
        report.machine.server_rx = None;
        assert!(
            report
                .table()
                .contains("topology veth-rss (client rx napi-thread), load"),
            "{}",
            report.table()
        );
    }

    #[test]
    fn a_report_survives_json_and_redraws_the_same_table() {
        let report = fixed_report();
        let json = serde_json::to_string_pretty(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.table(), report.table());
        assert_eq!(back.rows, report.rows);
        assert_eq!(back.summary, report.summary);
        assert_eq!(back.runs.len(), report.runs.len());
        assert_eq!(back.runs[0].metrics, report.runs[0].metrics);
        assert_eq!(back.runs[0].hw, report.runs[0].hw);

        let dir = std::env::temp_dir().join(format!("reuseport-report-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("results.json");
        report.write_json(&path).unwrap();
        assert_eq!(Report::read(&path).unwrap().table(), report.table());
        report.write_svg(&dir.join("results.svg")).unwrap();

        // A file from before the intervals gets them from its runs.
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        for ratio in old["ratios"].as_object_mut().unwrap().values_mut() {
            let ratio = ratio.as_object_mut().unwrap();
            for field in ["ci_low", "ci_high", "established", "reps"] {
                ratio.remove(field);
            }
        }
        fs::write(&path, old.to_string()).unwrap();
        assert_eq!(Report::read(&path).unwrap().table(), report.table());

        // A file from before --client-rx and --server-rx: none recorded, the same table.
        old["machine"].as_object_mut().unwrap().remove("client_rx");
        old["machine"].as_object_mut().unwrap().remove("server_rx");
        fs::write(&path, old.to_string()).unwrap();
        let without_client_rx = Report::read(&path).unwrap();
        assert_eq!(without_client_rx.machine.client_rx, None);
        assert_eq!(without_client_rx.machine.server_rx, None);
        assert_eq!(without_client_rx.table(), report.table());

        // A file from before lock sites: no lock table, everything else as before.
        old.as_object_mut().unwrap().remove("locks");
        for run in old["runs"].as_array_mut().unwrap() {
            let probes = run["probes"].as_object_mut().unwrap();
            probes.remove("locks");
            probes.remove("lock_unrecorded");
        }
        fs::write(&path, old.to_string()).unwrap();
        let without_locks = Report::read(&path).unwrap();
        assert_eq!(without_locks.locks, LockReport::default());
        assert!(
            without_locks
                .runs
                .iter()
                .all(|run| run.probes.locks.is_empty())
        );
        let full_table = report.table();
        let (main_table, _) = full_table.split_once("\nlock waits by site").unwrap();
        assert_eq!(without_locks.table(), main_table);

        fs::write(&path, "{\"machine\": 1}").unwrap();
        assert!(matches!(
            Report::read(&path),
            Err(ReportError::Malformed { .. })
        ));
        assert!(matches!(
            Report::read(&dir.join("missing.json")),
            Err(ReportError::Read { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
