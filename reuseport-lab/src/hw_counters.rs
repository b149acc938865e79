//! Hardware counters (cycles, instructions, cache misses, LLC load misses) on every CPU via
//! `perf_event_open`, where the machine has them. Virtual machines often do not: then each event
//! is reported as unsupported, never as 0.

use std::collections::BTreeMap;

use perf_event::{
    Builder, Counter,
    events::{Cache, CacheId, CacheOp, CacheResult, Event, Hardware},
};
use reuseport::cpus::CpuList;
use serde::{Deserialize, Deserializer, Serialize};

/// One hardware event's count over a measured window, or why there is none.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum HwCount {
    /// The count, summed over CPUs.
    Count(u64),
    /// The machine cannot count this event (`perf_event_open` failed).
    Unsupported(&'static str),
}

impl<'de> Deserialize<'de> for HwCount {
    /// A number is a count, `"unsupported"` [`HwCount::Unsupported`].
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        Ok(match Raw::deserialize(deserializer)? {
            Raw::Count(count) => Self::Count(count),
            Raw::Text(text) => Self::Unsupported(crate::metrics::unsupported::<D::Error>(&text)?),
        })
    }
}

/// Counters open on every CPU, counting from creation until [`HwCounters::stop`].
pub struct HwCounters {
    events: Vec<(&'static str, Option<Vec<Counter>>)>,
}

impl HwCounters {
    /// Opens and enables each event on each CPU of `cpus`; events that fail anywhere are
    /// recorded as unsupported.
    pub fn start(cpus: &CpuList) -> Self {
        let llc_load_misses = Cache {
            which: CacheId::LL,
            operation: CacheOp::READ,
            result: CacheResult::MISS,
        };
        let events = vec![
            ("cycles", open_all(cpus, Hardware::CPU_CYCLES)),
            ("instructions", open_all(cpus, Hardware::INSTRUCTIONS)),
            ("cache_misses", open_all(cpus, Hardware::CACHE_MISSES)),
            ("llc_load_misses", open_all(cpus, llc_load_misses)),
        ];
        Self { events }
    }

    /// Reads every event: its total over CPUs, or `unsupported`.
    pub fn stop(mut self) -> BTreeMap<String, HwCount> {
        self.events
            .iter_mut()
            .map(|(name, counters)| {
                let count = counters.as_mut().and_then(|counters| {
                    counters
                        .iter_mut()
                        .map(|counter| counter.read().ok())
                        .sum::<Option<u64>>()
                });
                (
                    (*name).to_owned(),
                    count.map_or(
                        HwCount::Unsupported(crate::metrics::UNSUPPORTED),
                        HwCount::Count,
                    ),
                )
            })
            .collect()
    }
}

fn open_all<E: Event + Clone>(cpus: &CpuList, event: E) -> Option<Vec<Counter>> {
    cpus.iter()
        .map(|cpu| {
            let mut counter = Builder::new(event.clone())
                .one_cpu(cpu as usize)
                .any_pid()
                .build()
                .ok()?;
            counter.enable().ok()?;
            Some(counter)
        })
        .collect()
}
