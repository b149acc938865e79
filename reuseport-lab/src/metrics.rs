//! The compared metrics, defined once: each one's name (the key in `results.json` and the row
//! of the table), unit, which way is better, what it is, and its label in the chart. The runner
//! fills them ([`crate::runner::derive_metrics`]), the report summarizes, prints and
//! draws them in [`MetricId::ALL`] order.

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

/// The text of a metric (or hardware count) the machine cannot measure.
pub const UNSUPPORTED: &str = "unsupported";

/// Whether more or less of a metric is better (for reading ratios).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// More is better.
    Higher,
    /// Less is better.
    Lower,
    /// Informational.
    Neither,
}

/// One compared metric. Serializes as its [`MetricId::name`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MetricId {
    /// New connections per second.
    ConnPerS,
    /// Requests per second.
    ReqPerS,
    /// Median latency.
    P50Us,
    /// 99th percentile latency.
    P99Us,
    /// 99.9th percentile latency.
    P999Us,
    /// Connections accepted on their SYN's CPU.
    Locality,
    /// Server wakeups raised on another CPU, per connection.
    CrossCpuWakeupsPerConn,
    /// Contended kernel lock waits per connection.
    LockContendedPerConn,
    /// Nanoseconds waiting for contended locks per connection.
    LockWaitNsPerConn,
    /// Contended waits on the listener's locks per connection ([`crate::locks::is_listener`]).
    ListenerLockContendedPerConn,
    /// Nanoseconds waiting for the listener's contended locks per connection.
    ListenerLockWaitNsPerConn,
    /// IPIs per connection.
    IpisPerConn,
    /// TCP segments retransmitted per connection (server's and clients' namespaces).
    RetransPerConn,
    /// TCP tail-loss probes per connection (each one a lost segment waited for, 10 ms at least).
    LossProbesPerConn,
    /// SYNs or handshake ACKs dropped by a listener, per connection.
    ListenDropsPerConn,
    /// Packets dropped from full per-CPU receive backlogs (machine-wide), per connection.
    BacklogDropsPerConn,
    /// Busy share of the server's CPUs during the run.
    ServerCpuBusy,
    /// Busy share of the load generators' CPUs during the run.
    ClientCpuBusy,
    /// Busy CPU time of every CPU of the experiment per connection, µs.
    CpuUsPerConn,
    /// Distinct CPUs touching a connection.
    CpusPerConn,
    /// Connections touched by more than one CPU.
    CrossCpuConnFraction,
    /// Hardware cache misses per connection.
    CacheMissesPerConn,
    /// The steering program's nanoseconds per selection.
    BpfNsPerSelect,
    /// Share of SYNs processed on the busiest CPU.
    SynCpuMaxShare,
    /// Failed requests.
    Errors,
    /// Connections spilled off their SYN's CPU.
    SpilledFraction,
    /// Workers restarted during the run.
    Restarts,
    /// Queued requests the kernel migrated.
    Migrated,
}

/// What the report needs to know about a metric.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    /// The key in `results.json` and the table's row name.
    pub name: &'static str,
    /// Its unit (`1` for counts and fractions).
    pub unit: &'static str,
    /// Which way is better.
    pub better: Better,
    /// What it is.
    pub description: &'static str,
    /// Its label in `results.svg`, for the metrics the chart shows.
    pub chart: Option<&'static str>,
}

impl MetricId {
    /// Every metric, in table order.
    pub const ALL: [Self; 28] = [
        Self::ConnPerS,
        Self::ReqPerS,
        Self::P50Us,
        Self::P99Us,
        Self::P999Us,
        Self::Locality,
        Self::CrossCpuWakeupsPerConn,
        Self::LockContendedPerConn,
        Self::LockWaitNsPerConn,
        Self::ListenerLockContendedPerConn,
        Self::ListenerLockWaitNsPerConn,
        Self::IpisPerConn,
        Self::RetransPerConn,
        Self::LossProbesPerConn,
        Self::ListenDropsPerConn,
        Self::BacklogDropsPerConn,
        Self::ServerCpuBusy,
        Self::ClientCpuBusy,
        Self::CpuUsPerConn,
        Self::CpusPerConn,
        Self::CrossCpuConnFraction,
        Self::CacheMissesPerConn,
        Self::BpfNsPerSelect,
        Self::SynCpuMaxShare,
        Self::Errors,
        Self::SpilledFraction,
        Self::Restarts,
        Self::Migrated,
    ];

    /// The metric's definition.
    pub const fn def(self) -> MetricDef {
        use Better::{Higher, Lower, Neither};
        let (name, unit, better, description, chart) = match self {
            Self::ConnPerS => (
                "conn_per_s",
                "1/s",
                Higher,
                "new connections per second",
                Some("conn/s"),
            ),
            Self::ReqPerS => ("req_per_s", "1/s", Higher, "requests per second", None),
            Self::P50Us => ("p50_us", "µs", Lower, "median latency, µs", None),
            Self::P99Us => (
                "p99_us",
                "µs",
                Lower,
                "99th percentile latency, µs",
                Some("p99 latency"),
            ),
            Self::P999Us => (
                "p999_us",
                "µs",
                Lower,
                "99.9th percentile latency, µs",
                None,
            ),
            Self::Locality => (
                "locality",
                "1",
                Higher,
                "connections accepted on their SYN's CPU",
                None,
            ),
            Self::CrossCpuWakeupsPerConn => (
                "cross_cpu_wakeups_per_conn",
                "1",
                Lower,
                "server wakeups raised on another CPU",
                Some("x-CPU wakeups/conn"),
            ),
            Self::LockContendedPerConn => (
                "lock_contended_per_conn",
                "1",
                Lower,
                "contended kernel lock waits",
                None,
            ),
            Self::LockWaitNsPerConn => (
                "lock_wait_ns_per_conn",
                "ns",
                Lower,
                "ns waiting for contended locks",
                Some("lock wait/conn"),
            ),
            Self::ListenerLockContendedPerConn => (
                "listener_lock_contended_per_conn",
                "1",
                Lower,
                "contended waits on the listener's locks (accept, accept queue, SYN)",
                None,
            ),
            Self::ListenerLockWaitNsPerConn => (
                "listener_lock_wait_ns_per_conn",
                "ns",
                Lower,
                "ns waiting for the listener's contended locks",
                None,
            ),
            Self::IpisPerConn => (
                "ipis_per_conn",
                "1",
                Lower,
                "IPIs (RES + CAL)",
                Some("IPIs/conn"),
            ),
            Self::RetransPerConn => (
                "retrans_per_conn",
                "1",
                Lower,
                "TCP segments retransmitted (both namespaces)",
                None,
            ),
            Self::LossProbesPerConn => (
                "loss_probes_per_conn",
                "1",
                Lower,
                "TCP tail-loss probes (a lost segment waited for, >= 10 ms)",
                None,
            ),
            Self::ListenDropsPerConn => (
                "listen_drops_per_conn",
                "1",
                Lower,
                "SYNs or handshake ACKs a listener dropped",
                None,
            ),
            Self::BacklogDropsPerConn => (
                "backlog_drops_per_conn",
                "1",
                Lower,
                "packets dropped from full per-CPU receive backlogs (machine-wide)",
                None,
            ),
            Self::ServerCpuBusy => (
                "server_cpu_busy",
                "1",
                Neither,
                "busy share of the server's CPUs (1: saturated)",
                None,
            ),
            Self::ClientCpuBusy => (
                "client_cpu_busy",
                "1",
                Neither,
                "busy share of the load generators' CPUs (1: saturated)",
                None,
            ),
            Self::CpuUsPerConn => (
                "cpu_us_per_conn",
                "µs",
                Lower,
                "busy CPU time of the experiment's CPUs, server's and clients'",
                None,
            ),
            Self::CpusPerConn => (
                "cpus_per_conn",
                "1",
                Lower,
                "distinct CPUs touching a connection",
                Some("CPUs/conn"),
            ),
            Self::CrossCpuConnFraction => (
                "cross_cpu_conn_fraction",
                "1",
                Lower,
                "connections touched by >1 CPU",
                Some("x-CPU conns"),
            ),
            Self::CacheMissesPerConn => (
                "cache_misses_per_conn",
                "1",
                Lower,
                "hardware cache misses",
                None,
            ),
            Self::BpfNsPerSelect => (
                "bpf_ns_per_select",
                "ns",
                Neither,
                "steering program ns per selection",
                None,
            ),
            Self::SynCpuMaxShare => (
                "syn_cpu_max_share",
                "1",
                Neither,
                "share of SYNs on the busiest CPU",
                None,
            ),
            Self::Errors => ("errors", "1", Lower, "failed requests", None),
            Self::SpilledFraction => (
                "spilled_fraction",
                "1",
                Neither,
                "connections spilled off their SYN's CPU (percpu-spill)",
                None,
            ),
            Self::Restarts => (
                "restarts",
                "1",
                Neither,
                "workers restarted during the run (--restart-every)",
                None,
            ),
            Self::Migrated => (
                "migrated",
                "1",
                Neither,
                "queued requests the kernel migrated (TCPMigrateReqSuccess)",
                None,
            ),
        };
        MetricDef {
            name,
            unit,
            better,
            description,
            chart,
        }
    }

    /// The key in `results.json` and the table's row name.
    pub const fn name(self) -> &'static str {
        self.def().name
    }

    /// The metric named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|metric| metric.name() == name)
    }

    /// The metrics the chart shows, in its order, with their labels.
    pub fn charted() -> impl Iterator<Item = (Self, &'static str)> {
        Self::ALL
            .into_iter()
            .filter_map(|metric| Some((metric, metric.def().chart?)))
    }
}

impl Serialize for MetricId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for MetricId {
    /// From its [`MetricId::name`].
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Self::from_name(&name).ok_or_else(|| D::Error::custom(format!("unknown metric `{name}`")))
    }
}

/// One metric of one run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Metric {
    /// A value.
    Value(f64),
    /// The machine cannot measure it (e.g. hardware counters in a VM).
    Unsupported(&'static str),
    /// Not applicable to this row (e.g. locality of a peer without probes).
    None(()),
}

impl<'de> Deserialize<'de> for Metric {
    /// A number is a value, [`UNSUPPORTED`] [`Metric::Unsupported`], null [`Metric::None`].
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Option::<Raw<f64>>::deserialize(deserializer)? {
            Some(Raw::Value(value)) => Self::Value(value),
            Some(Raw::Text(text)) => Self::Unsupported(unsupported::<D::Error>(&text)?),
            None => Self::None(()),
        })
    }
}

/// [`UNSUPPORTED`] for that text (the only one the lab writes), else an error.
pub(crate) fn unsupported<E: serde::de::Error>(text: &str) -> Result<&'static str, E> {
    if text == UNSUPPORTED {
        Ok(UNSUPPORTED)
    } else {
        Err(E::custom(format!("unknown value `{text}`")))
    }
}

/// A number or a text, as untagged metric values are written.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum Raw<T> {
    /// Measured.
    Value(T),
    /// Why not.
    Text(String),
}

impl Metric {
    /// `Value` if present, else `None`.
    pub fn from_option(value: Option<f64>) -> Self {
        value.map_or(Self::None(()), Self::Value)
    }

    /// The value, if measured.
    pub fn value(&self) -> Option<f64> {
        match self {
            Self::Value(v) => Some(*v),
            _ => None,
        }
    }
}

/// The median of `values` (the mean of the middle two for an even count); sorts them.
pub fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        for metric in MetricId::ALL {
            assert_eq!(MetricId::from_name(metric.name()), Some(metric));
            assert_eq!(
                serde_json::to_string(&metric).unwrap(),
                format!("\"{}\"", metric.name())
            );
        }
        let names: std::collections::BTreeSet<_> = MetricId::ALL.map(MetricId::name).into();
        assert_eq!(names.len(), MetricId::ALL.len());
    }

    #[test]
    fn the_chart_shows_the_seven_key_metrics() {
        let labels: Vec<_> = MetricId::charted().map(|(_, label)| label).collect();
        assert_eq!(
            labels,
            [
                "conn/s",
                "p99 latency",
                "x-CPU wakeups/conn",
                "lock wait/conn",
                "IPIs/conn",
                "CPUs/conn",
                "x-CPU conns"
            ]
        );
    }
}
