//! The experiment's report: per row and metric the median and min–max over repetitions, the
//! percpu/hash ratio (flagged where the ranges overlap), as a terminal table, `results.json`
//! (every raw run plus the summary) and `results.svg` (a chart of the key metrics).

use std::{collections::BTreeMap, fmt::Write as _, fs, io, path::Path};

use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};
use serde::Serialize;
use thiserror::Error;

use crate::{
    metrics::{Metric, MetricId, median},
    runner::{AbConfig, AbResults, CrossCheck, RunRecord},
};

/// Errors from writing the report.
#[derive(Debug, Error)]
pub enum ReportError {
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
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
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

/// `percpu` over `hash` for one metric.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Ratio {
    /// percpu median / hash median.
    pub ratio: f64,
    /// Whether the two min–max ranges overlap (then the difference may be noise).
    pub ranges_overlap: bool,
}

/// Facts about the machine and the run, so results can be compared across machines.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPUs the experiment used.
    pub cpus: usize,
    /// `uname -r`.
    pub kernel: String,
    /// `veth` or `loopback`.
    pub topology: String,
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
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The machine and settings.
    pub machine: Machine,
    /// Per row, per metric.
    pub summary: BTreeMap<String, BTreeMap<MetricId, Summary>>,
    /// percpu / hash per metric, when both rows ran.
    pub ratios: BTreeMap<MetricId, Ratio>,
    /// wrk vs the built-in generator.
    pub cross_check: Option<CrossCheck>,
    /// Every measured run.
    pub runs: Vec<RunRecord>,
    /// Row order as run.
    pub rows: Vec<String>,
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
        let ratios = match (summary.get("percpu"), summary.get("hash")) {
            (Some(percpu), Some(hash)) => MetricId::ALL
                .into_iter()
                .filter_map(|metric| {
                    let (Some(Summary::Range(p)), Some(Summary::Range(h))) =
                        (percpu.get(&metric), hash.get(&metric))
                    else {
                        return None;
                    };
                    (h.median != 0.0).then(|| {
                        (
                            metric,
                            Ratio {
                                ratio: p.median / h.median,
                                ranges_overlap: p.overlaps(h),
                            },
                        )
                    })
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        let kernel = reuseport::kernel::release();
        Self {
            machine: Machine {
                cpus,
                kernel,
                topology: format!("{:?}", config.topology).to_lowercase(),
                skew: config.skew,
                load: format!("{:?}", config.load).to_lowercase(),
                connections: config.connections,
                duration_s: config.duration.as_secs_f64(),
                reps: config.reps,
            },
            summary,
            ratios,
            cross_check: results.cross_check,
            runs: results.runs,
            rows,
        }
    }

    /// The terminal table: one line per metric, one column per row, then percpu/hash.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} CPUs, kernel {}, topology {}, load {} x{} for {}s, {} reps (median [min-max])\n",
            self.machine.cpus,
            self.machine.kernel,
            self.machine.topology,
            self.machine.load,
            self.machine.connections,
            self.machine.duration_s,
            self.machine.reps
        );
        let _ = write!(out, "{:<28}", "metric");
        for row in &self.rows {
            let _ = write!(out, " {row:>26}");
        }
        let with_ratio = !self.ratios.is_empty();
        if with_ratio {
            out.push_str("  percpu/hash");
        }
        out.push('\n');
        for metric in MetricId::ALL {
            let _ = write!(out, "{:<28}", metric.name());
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
                let flag = if ratio.ranges_overlap { " ~" } else { "" };
                let _ = write!(out, "  {:.2}{flag}", ratio.ratio);
            }
            out.push('\n');
        }
        if with_ratio {
            out.push_str(
                "(~: the two rows' min-max ranges overlap; the difference may be noise)\n",
            );
        }
        if let Some(check) = &self.cross_check {
            let _ = writeln!(
                out,
                "cross-check ({}): wrk {:.0} req/s vs built-in {:.0} req/s (wrk/built-in {:.2})",
                check.mode, check.wrk_req_per_s, check.builtin_req_per_s, check.ratio
            );
        }
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
}
