//! What the verbs share on the command line: the value enums behind `--mode`, `--bpf-program`,
//! `--proto`, `--kind`/`--load` and `--topology`, the spill flags of `serve` and `ab`, and the
//! duration parsers.
//!
//! The value enums mirror the library's and the lab's types variant for variant, with the same
//! doc comments, word for word (clap shows them as the possible values' help, links and all),
//! and convert into them; the library and the lab stay free of clap.

use std::time::Duration;

use reuseport::{
    Protocol,
    spill::SpillConfig,
    steering::{SteeringMode, SteeringProgram},
};
use reuseport_lab::{
    load::LoadKind,
    topology::{ClientRx, ServerRx, TopologyKind},
};

/// [`SteeringMode`] on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Our `SK_REUSEPORT` program picks the listener of the worker pinned to the CPU that received
    /// the SYN, so the connection's whole life stays on that CPU.
    Percpu,
    /// No program: the kernel's default selection by a hash of the 4-tuple.
    Hash,
    /// A classic BPF filter returning the CPU as the listener's index in the group (no
    /// privileges needed; drifts when a listener closes and the group's order changes).
    Cbpf,
    /// No program: each listener's `SO_INCOMING_CPU` is its worker's CPU, which the kernel's
    /// selection prefers since Linux 6.2.
    IncomingCpu,
    /// `percpu`, except that an overloaded CPU spreads its excess new connections over several
    /// listeners, nearest first, until the skew ends.
    PercpuSpill,
    /// `percpu-spill` when this process may load BPF programs, else `incoming-cpu` when the kernel
    /// honours it, else `cbpf`.
    Auto,
}

impl From<ModeArg> for SteeringMode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Percpu => Self::Percpu,
            ModeArg::Hash => Self::Hash,
            ModeArg::Cbpf => Self::Cbpf,
            ModeArg::IncomingCpu => Self::IncomingCpu,
            ModeArg::PercpuSpill => Self::PercpuSpill,
            ModeArg::Auto => Self::Auto,
        }
    }
}

/// [`SteeringProgram`] on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgramArg {
    /// `steer_to_cpu`: the listener of the receiving CPU, select only: connections queued on a
    /// listener that closes are reset (the default before Linux 5.14).
    SteerToCpu,
    /// `steer_migrate`: the same choice, attached as select-or-migrate (Linux >= 5.14), so that
    /// connections queued on a listener that closes move to a live listener (its replacement
    /// on the same CPU, else the nearest live CPU's) instead of being reset. The default where
    /// the kernel has it.
    SteerMigrate,
    /// `steer_noop`: selects nothing (the kernel hashes). For calibrating the ns/select figure:
    /// its cost is the floor the kernel's BPF statistics report on this machine.
    Noop,
    /// `steer_select`: only `bpf_sk_select_reuseport` of the local slot, no counters. For
    /// calibrating: its cost above `noop`'s is the kernel helper's, which any steering pays.
    SelectOnly,
}

impl From<ProgramArg> for SteeringProgram {
    fn from(program: ProgramArg) -> Self {
        match program {
            ProgramArg::SteerToCpu => Self::SteerToCpu,
            ProgramArg::SteerMigrate => Self::SteerMigrate,
            ProgramArg::Noop => Self::Noop,
            ProgramArg::SelectOnly => Self::SelectOnly,
        }
    }
}

/// [`Protocol`] on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtoArg {
    /// TCP: listeners, steering picks the listener whose accept queue gets the connection.
    Tcp,
    /// UDP: bound datagram sockets, steering picks the socket that receives each datagram.
    Udp,
}

impl From<ProtoArg> for Protocol {
    fn from(protocol: ProtoArg) -> Self {
        match protocol {
            ProtoArg::Tcp => Self::Tcp,
            ProtoArg::Udp => Self::Udp,
        }
    }
}

/// [`LoadKind`] on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadKindArg {
    /// A new TCP connection per HTTP request.
    Crr,
    /// Keep-alive HTTP requests over long-lived connections.
    Rr,
    /// UDP request/reply, a new socket per request.
    Udp,
}

impl From<LoadKindArg> for LoadKind {
    fn from(kind: LoadKindArg) -> Self {
        match kind {
            LoadKindArg::Crr => Self::Crr,
            LoadKindArg::Rr => Self::Rr,
            LoadKindArg::Udp => Self::Udp,
        }
    }
}

/// [`TopologyKind`] on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TopologyArg {
    /// Server and clients in two namespaces joined by a multi-queue veth, one queue per server
    /// CPU processed on that CPU, like a NIC with RSS (see --server-rx and --client-rx).
    VethRss,
    /// Server and clients in two namespaces joined by a one-queue veth, RPS spreading received
    /// flows over the server CPUs by hash (`veth` is the old name).
    #[value(alias = "veth")]
    VethRps,
    /// Everything on loopback, clients pinned round-robin to CPUs.
    Loopback,
}

impl From<TopologyArg> for TopologyKind {
    fn from(kind: TopologyArg) -> Self {
        match kind {
            TopologyArg::VethRss => Self::VethRss,
            TopologyArg::VethRps => Self::VethRps,
            TopologyArg::Loopback => Self::Loopback,
        }
    }
}

/// How the server's end of a veth-rss pair processes the clients' packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerRxArg {
    /// Flows spread over the queues by hash, each queue's NAPI instance in a thread pinned to its
    /// server CPU (a thread woken per packet); works with the clients on CPUs of their own.
    NapiThread,
    /// Clients pinned to the server's CPUs, each CPU sending into its own queue (XPS), processed
    /// in that CPU's softirq as a NIC interrupt would be (no thread wakeups); needs the clients
    /// on the server's CPUs.
    Softirq,
}

impl From<ServerRxArg> for ServerRx {
    fn from(server_rx: ServerRxArg) -> Self {
        match server_rx {
            ServerRxArg::NapiThread => Self::NapiThread,
            ServerRxArg::Softirq => Self::Softirq,
        }
    }
}

/// How the clients' end of a veth-rss pair processes the server's replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientRxArg {
    /// One queue per client CPU, its NAPI instance in a thread pinned there: replies processed
    /// on the client CPUs, as on a separate client machine.
    NapiThread,
    /// GRO off, no NAPI threads: replies processed in the softirq of the server CPU that sent
    /// them, as on loopback (no NAPI thread wakeups at the clients' end).
    Softirq,
}

impl From<ClientRxArg> for ClientRx {
    fn from(client_rx: ClientRxArg) -> Self {
        match client_rx {
            ClientRxArg::NapiThread => Self::NapiThread,
            ClientRxArg::Softirq => Self::Softirq,
        }
    }
}

/// Longest `--duration`, `--timeout` or `--warmup` taken: a year. Longer ones would overflow the
/// clock arithmetic, and no run is meant to last that long.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration (`10s`, `2m`, `1h`) of at most [`MAX_DURATION`].
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value).map_err(|err| err.to_string())?;
    if duration > MAX_DURATION {
        return Err("must be at most 365 days".to_owned());
    }
    Ok(duration)
}

/// The `percpu-spill` flags, shared by `serve` and `ab` (which passes them to its `percpu-spill`
/// rows).
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct SpillArgs {
    /// percpu-spill: queue depth (TCP: accept queue; UDP: receive queue, in datagrams) that
    /// counts as overloaded (see README "Restarts and overload").
    #[arg(long, default_value_t = SpillConfig::default().threshold,
          value_parser = clap::value_parser!(u32).range(1..))]
    spill_threshold: u32,
    /// percpu-spill: how often the queues and arrivals are sampled (more than 0, at most 1s).
    #[arg(long, value_parser = parse_spill_period, default_value = "1ms")]
    spill_period: Duration,
    /// percpu-spill: most CPUs one overloaded CPU spreads its excess over (default: as many as
    /// the load needs; at most the number of worker CPUs less one).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    spill_targets: Option<u32>,
}

impl From<SpillArgs> for SpillConfig {
    fn from(args: SpillArgs) -> Self {
        Self {
            threshold: args.spill_threshold,
            period: args.spill_period,
            max_targets: args.spill_targets,
        }
    }
}

/// `--spill-period`: a duration more than 0 and at most [`reuseport::spill::MAX_PERIOD`].
pub fn parse_spill_period(value: &str) -> Result<Duration, String> {
    let period = humantime::parse_duration(value).map_err(|err| err.to_string())?;
    if period.is_zero() || period > reuseport::spill::MAX_PERIOD {
        return Err("must be more than 0 and at most 1s".to_owned());
    }
    Ok(period)
}

/// `--header-timeout` and `--idle-timeout`: a duration from
/// [`reuseport::connections::Timeouts::MIN`] to [`reuseport::connections::Timeouts::MAX`].
pub fn parse_connection_timeout(value: &str) -> Result<Duration, String> {
    use reuseport::connections::Timeouts;
    let timeout = humantime::parse_duration(value).map_err(|err| err.to_string())?;
    if !(Timeouts::MIN..=Timeouts::MAX).contains(&timeout) {
        return Err(format!(
            "must be at least {} and at most {}",
            humantime::format_duration(Timeouts::MIN),
            humantime::format_duration(Timeouts::MAX)
        ));
    }
    Ok(timeout)
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    /// Each value the command line accepts is the name the library and the lab give that
    /// variant (in summaries, JSON and the lab's command lines), so nothing is lost in between.
    #[test]
    fn every_value_is_the_name_the_library_and_the_lab_use() {
        fn names<T: ValueEnum, U>(to_name: impl Fn(U) -> String) -> Vec<(String, String)>
        where
            U: From<T>,
        {
            T::value_variants()
                .iter()
                .map(|value| {
                    let accepted = value
                        .to_possible_value()
                        .map(|v| v.get_name().to_owned())
                        .unwrap_or_default();
                    (accepted, to_name(U::from(value.clone())))
                })
                .collect()
        }
        let json = |value: serde_json::Value| value.as_str().unwrap_or_default().to_owned();
        let pairs = [
            names::<ModeArg, SteeringMode>(|m| m.to_string()),
            names::<ProgramArg, SteeringProgram>(|p| p.to_string()),
            names::<ProtoArg, Protocol>(|p| json(serde_json::json!(p))),
            names::<LoadKindArg, LoadKind>(|k| json(serde_json::json!(k))),
            names::<TopologyArg, TopologyKind>(|k| json(serde_json::json!(k))),
            names::<ServerRxArg, ServerRx>(|c| json(serde_json::json!(c))),
            names::<ClientRxArg, ClientRx>(|c| json(serde_json::json!(c))),
        ];
        for (accepted, library) in pairs.iter().flatten() {
            assert_eq!(accepted, library);
        }
        assert_eq!(
            pairs.iter().map(Vec::len).sum::<usize>(),
            6 + 4 + 2 + 3 + 3 + 2 + 2
        );
    }
}
