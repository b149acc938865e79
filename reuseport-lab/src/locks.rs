//! Lock contention by lock: which kernel locks the contended waits were on, whose they were, and
//! whether they were the listener's.
//!
//! The probes (`lock_cont_begin`/`lock_cont_end` in `reuseport-ebpf/src/probes.rs`) add up every
//! contended wait under the kernel stack taken at `lock:contention_begin`, the tracepoint's flags
//! and the waiting process's side (server or load generator, registered by process id). Here each
//! stack is named with `/proc/kallsyms` ([`crate::kallsyms`]) and reduced to a [`LockSite`]:
//!
//! - **site**: the first frame that is not a lock primitive ([`is_lock_primitive`]: the spinlock
//!   slow paths, `_raw_*_lock*`, `__mutex_lock*`, `mutex_lock*`, the mutex unlock slow path
//!   (its wait-list spinlock), the rwsem slow paths, the tracing frames), i.e. the kernel function that asked for the lock, e.g. `pipe_write`,
//!   `inet_csk_reqsk_queue_add`, `lock_sock_nested`; **caller**: the frame below it (for
//!   `lock_sock_nested`, whose socket: `inet_csk_accept` takes the listener's). Helpers named
//!   after their lock (`lock_sock_nested`, `lock_timer_base`, `__task_rq_lock`) stay the site:
//!   they name the lock, and the caller says who took it.
//! - **kind**: from the flags ([`kind`]): spin, rwlock-read/-write, mutex, rwsem-read/-write,
//!   percpu-rwsem, rt.
//! - **side** ([`Side`]): `softirq` when the stack passes through the softirq entry
//!   (`handle_softirqs`, `__do_softirq`, `net_rx_action`, `run_ksoftirqd`), whatever process it
//!   interrupted (on loopback, a sender's softirq runs on its own syscall's stack); else `server`
//!   or `client` by the waiting process; else `other` (kernel threads, idle, other processes).
//!   A spinlock wait in softirq nests inside the wait of the task it interrupted only on another
//!   lock, so both are counted, each once.
//! - **listener**: [`is_listener`], the rule behind the `listener_lock_*` metrics: the stack
//!   passes through the listening socket's own work: its accept (`inet_csk_accept`: the
//!   listener's socket lock and its accept queue), its request queue (`inet_csk_reqsk_queue_*`,
//!   `reqsk_queue_*`, `inet_csk_complete_hashdance`: a finished handshake joining the accept
//!   queue), its SYN handling (`tcp_conn_request`, with the request's insertion into the
//!   established hash), the listener lookup and reuseport group (`__inet_lookup_listener`,
//!   `inet_lhash2_lookup`, `reuseport_*`), listen/close of a listener (`inet_csk_listen_start`,
//!   `inet_csk_listen_stop`), or the listener's wakeup when a connection is ready to accept
//!   (`sock_def_readable` called by `tcp_child_process`, e.g. epoll's `ep->lock`). A connected
//!   socket's own lock (the `lock_sock` of the accepted socket in `inet_accept`/`__inet_accept`,
//!   after `inet_csk_accept` returned; `tcp_v4_rcv`'s `bh_lock_sock` of an established socket)
//!   is not. Since Linux 4.4 the SYN path does not take
//!   the listener's socket lock at all, so a `tcp_v4_rcv` wait is never a listener's.
//!
//! Waits the maps had no room for are counted apart (`lock_unrecorded`), never dropped silently.
//! So that they rarely run out of room, each stack is kept only down to its first frame in the
//! softirq handler loop or in the kernel's softirq or interrupt entry code ([`stack_cuts`]):
//! below that lies whatever the interrupt interrupted, which would make nearly every softirq wait
//! a stack of its own (on 16 CPUs, more than the maps hold in one run). The entry frame itself
//! stays, so the side is still told; the listener rule sees only the softirq's own frames, not
//! those of a listener's `accept` it happened to interrupt.

use std::collections::{BTreeMap, HashMap};

use reuseport_common::{LockKey, LockWait, lock_side};
use serde::{Deserialize, Serialize};

use crate::kallsyms::Kallsyms;

/// Who waited for a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// A thread of the server under test, in process context.
    Server,
    /// A thread of the load generator, in process context.
    Client,
    /// A softirq (packet receive, timers), in whatever context it ran.
    Softirq,
    /// Anything else: kernel threads, idle, other processes.
    Other,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Server => "server",
            Self::Client => "client",
            Self::Softirq => "softirq",
            Self::Other => "other",
        })
    }
}

/// `lock:contention_begin` flags (`LCB_F_*` in `include/trace/events/lock.h`).
mod flag {
    pub const SPIN: u32 = 1 << 0;
    pub const READ: u32 = 1 << 1;
    pub const WRITE: u32 = 1 << 2;
    pub const RT: u32 = 1 << 3;
    pub const PERCPU: u32 = 1 << 4;
    pub const MUTEX: u32 = 1 << 5;
}

/// The kind of lock `flags` (OR-ed over a wait's begins) describe: `mutex` (a mutex that spun
/// first is still `mutex`), `rt`, `percpu-rwsem-read`/`-write`, `rwlock-read`/`-write` (spinning
/// reader-writer locks), `rwsem-read`/`-write`, `spin`, else `flags=N`.
pub fn kind(flags: u32) -> String {
    let read_write = |base: &str| {
        if flags & flag::WRITE != 0 {
            format!("{base}-write")
        } else {
            format!("{base}-read")
        }
    };
    if flags & flag::MUTEX != 0 {
        "mutex".into()
    } else if flags & flag::RT != 0 {
        "rt".into()
    } else if flags & flag::PERCPU != 0 {
        read_write("percpu-rwsem")
    } else if flags & (flag::READ | flag::WRITE) != 0 {
        read_write(if flags & flag::SPIN != 0 {
            "rwlock"
        } else {
            "rwsem"
        })
    } else if flags & flag::SPIN != 0 {
        "spin".into()
    } else {
        format!("flags={flags}")
    }
}

/// Frames that are how a lock is waited for, not who wants it: skipped to find the site.
pub fn is_lock_primitive(frame: &str) -> bool {
    const PREFIXES: [&str; 23] = [
        "queued_spin_lock_slowpath",
        "native_queued_spin_lock_slowpath",
        "__pv_queued_spin_lock_slowpath",
        "queued_read_lock_slowpath",
        "queued_write_lock_slowpath",
        "_raw_",
        "__raw_",
        "do_raw_",
        "__mutex_lock",
        "mutex_lock",
        "__mutex_unlock",
        "mutex_unlock",
        "mutex_spin_on_owner",
        "mutex_optimistic_spin",
        "osq_lock",
        "rwsem_",
        "down_read",
        "down_write",
        "__down_",
        "percpu_down_",
        "__percpu_down_",
        "rt_mutex",
        "rt_spin",
    ];
    const TRACING: [&str; 4] = ["__traceiter_", "perf_trace_", "trace_", "bpf_"];
    PREFIXES
        .iter()
        .chain(TRACING.iter())
        .any(|prefix| frame.starts_with(prefix))
}

/// Frames of the softirq entry.
const SOFTIRQ_FRAMES: [&str; 4] = [
    "handle_softirqs",
    "__do_softirq",
    "net_rx_action",
    "run_ksoftirqd",
];

/// Frames of the listening socket's own work (see the module docs).
const LISTENER_FRAMES: [&str; 9] = [
    "inet_csk_accept",
    "inet_csk_complete_hashdance",
    "tcp_conn_request",
    "__inet_lookup_listener",
    "inet_lhash2_lookup",
    "inet_csk_listen_start",
    "inet_csk_listen_stop",
    "inet_csk_reqsk_queue_add",
    "inet_csk_reqsk_queue_hash_add",
];

/// Prefixes of the listener's request queue and reuseport group functions.
const LISTENER_PREFIXES: [&str; 3] = ["inet_csk_reqsk_queue_", "reqsk_queue_", "reuseport_"];

/// A kernel function name without the compiler's clone suffix (`.constprop.0`, `.isra.0`,
/// `.part.0`, `.cold`).
fn base_name(frame: &str) -> &str {
    frame.split('.').next().unwrap_or(frame)
}

/// The address ranges the probes cut stacks at (entries of `lock_stack_cuts`): the softirq
/// handler loop (`handle_softirqs`, or `__do_softirq` on kernels before 6.3, which had no
/// separate loop), the softirq entry text (`__softirqentry_text_start`..`_end`, where
/// `__do_softirq` lives) and the interrupt entry text (`__irqentry_text_start`..`_end`: the
/// hardware interrupt entries). A range this kernel lacks is `(0, 0)` and cuts nothing.
pub fn stack_cuts(symbols: &Kallsyms) -> [(u64, u64); 3] {
    let text = |start: &str, end: &str| {
        symbols
            .address_of(start)
            .zip(symbols.address_of(end))
            .unwrap_or((0, 0))
    };
    [
        symbols
            .range_of("handle_softirqs")
            .or_else(|| symbols.range_of("__do_softirq"))
            .unwrap_or((0, 0)),
        text("__softirqentry_text_start", "__softirqentry_text_end"),
        text("__irqentry_text_start", "__irqentry_text_end"),
    ]
}

/// Whether a stack (innermost first) passed through the softirq entry.
pub fn is_softirq(frames: &[String]) -> bool {
    frames
        .iter()
        .any(|frame| SOFTIRQ_FRAMES.contains(&base_name(frame)))
}

/// Whether a stack (innermost first) waited for a lock of the listening socket's own work: the
/// rule of the module docs.
pub fn is_listener(frames: &[String]) -> bool {
    let names: Vec<&str> = frames.iter().map(|frame| base_name(frame)).collect();
    names.iter().any(|name| {
        LISTENER_FRAMES.contains(name)
            || LISTENER_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
    }) || names
        .windows(2)
        .any(|pair| pair == ["sock_def_readable", "tcp_child_process"])
}

/// The site (first frame that is not a lock primitive) and its caller; `?` where the stack ends.
pub fn site_of(frames: &[String]) -> (String, String) {
    let mut meaningful = frames.iter().skip_while(|frame| is_lock_primitive(frame));
    let mut next = || meaningful.next().map_or("?", String::as_str).to_owned();
    let site = next();
    (site, next())
}

/// The side of a wait: softirq by its stack, else the process's side the probe recorded.
pub fn side_of(process_side: u32, frames: &[String]) -> Side {
    if is_softirq(frames) {
        Side::Softirq
    } else {
        match process_side {
            lock_side::SERVER => Side::Server,
            lock_side::CLIENT => Side::Client,
            _ => Side::Other,
        }
    }
}

/// The site reported for waits whose stack could not be taken.
pub const NO_STACK: &str = "(no stack)";
/// The site reported for waits whose stack the stack map had no room for.
pub const STACK_NOT_RECORDED: &str = "(stack not recorded)";

/// Contended waits of one run at one site, by one side, on one kind of lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockSite {
    /// The kernel function that asked for the lock.
    pub site: String,
    /// The function that called it.
    pub caller: String,
    /// Who waited.
    pub side: Side,
    /// The kind of lock ([`kind`]).
    pub kind: String,
    /// Whether the waits were on the listening socket's own work ([`is_listener`]).
    pub listener: bool,
    /// Contended waits.
    pub count: u64,
    /// Their nanoseconds.
    pub wait_ns: u64,
}

impl LockSite {
    /// What identifies a site across runs: everything but the counts.
    pub fn key(&self) -> SiteKey {
        SiteKey {
            site: self.site.clone(),
            caller: self.caller.clone(),
            side: self.side,
            kind: self.kind.clone(),
            listener: self.listener,
        }
    }
}

/// A [`LockSite`] without its counts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SiteKey {
    /// [`LockSite::site`].
    pub site: String,
    /// [`LockSite::caller`].
    pub caller: String,
    /// [`LockSite::side`].
    pub side: Side,
    /// [`LockSite::kind`].
    pub kind: String,
    /// [`LockSite::listener`].
    pub listener: bool,
}

/// Groups the probes' waits (per stack hash, flags and process side) into sites, most waited
/// first. `stacks` holds each recorded stack's symbolized frames, innermost first.
pub fn group_sites(
    waits: impl IntoIterator<Item = (LockKey, LockWait)>,
    stacks: &HashMap<u64, Vec<String>>,
) -> Vec<LockSite> {
    let mut sites: BTreeMap<SiteKey, (u64, u64)> = BTreeMap::new();
    for (key, wait) in waits {
        let (site, caller, side, listener) = match stacks.get(&key.stack) {
            Some(frames) => {
                let (site, caller) = site_of(frames);
                (site, caller, side_of(key.side, frames), is_listener(frames))
            }
            None => {
                let site = if key.stack == 0 {
                    NO_STACK
                } else {
                    STACK_NOT_RECORDED
                };
                (site.into(), "?".into(), side_of(key.side, &[]), false)
            }
        };
        let entry = sites
            .entry(SiteKey {
                site,
                caller,
                side,
                kind: kind(key.flags),
                listener,
            })
            .or_default();
        entry.0 += wait.count;
        entry.1 += wait.wait_ns;
    }
    let mut sites: Vec<LockSite> = sites
        .into_iter()
        .map(|(key, (count, wait_ns))| LockSite {
            site: key.site,
            caller: key.caller,
            side: key.side,
            kind: key.kind,
            listener: key.listener,
            count,
            wait_ns,
        })
        .collect();
    sites.sort_by(|a, b| {
        b.wait_ns
            .cmp(&a.wait_ns)
            .then_with(|| a.key().cmp(&b.key()))
    });
    sites
}

/// Contended waits and nanoseconds of the listener's sites.
pub fn listener_totals(sites: &[LockSite]) -> (u64, u64) {
    sites
        .iter()
        .filter(|site| site.listener)
        .fold((0, 0), |(count, ns), site| {
            (count + site.count, ns + site.wait_ns)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(frames: &[&str]) -> Vec<String> {
        frames.iter().map(|frame| (*frame).to_owned()).collect()
    }

    #[test]
    fn stacks_are_cut_at_the_softirq_loop_and_the_entry_texts() {
        let symbols = Kallsyms::parse(
            "ffffffff81000300 T __irqentry_text_start\n\
             ffffffff81000400 T asm_sysvec_apic_timer_interrupt\n\
             ffffffff81000f70 T __irqentry_text_end\n\
             ffffffff81369570 t handle_softirqs\n\
             ffffffff81369810 t __irq_exit_rcu\n",
        );
        assert_eq!(
            stack_cuts(&symbols),
            [
                (0xffff_ffff_8136_9570, 0xffff_ffff_8136_9810),
                (0, 0),
                (0xffff_ffff_8100_0300, 0xffff_ffff_8100_0f70),
            ]
        );
        // A kernel before 6.3: `__do_softirq` is the loop, in the softirq entry text.
        let symbols = Kallsyms::parse(
            "ffffffff8226f580 T __softirqentry_text_start\n\
             ffffffff8226f590 T __do_softirq\n\
             ffffffff8226f800 T __softirqentry_text_end\n",
        );
        assert_eq!(
            stack_cuts(&symbols),
            [
                (0xffff_ffff_8226_f590, 0xffff_ffff_8226_f800),
                (0xffff_ffff_8226_f580, 0xffff_ffff_8226_f800),
                (0, 0),
            ]
        );
    }

    #[test]
    fn kinds_follow_the_tracepoint_flags() {
        assert_eq!(kind(1), "spin");
        assert_eq!(kind(32 | 1), "mutex");
        assert_eq!(kind(32), "mutex");
        assert_eq!(kind(1 | 2), "rwlock-read");
        assert_eq!(kind(1 | 4), "rwlock-write");
        assert_eq!(kind(2), "rwsem-read");
        assert_eq!(kind(4), "rwsem-write");
        assert_eq!(kind(16 | 4), "percpu-rwsem-write");
        assert_eq!(kind(8 | 1), "rt");
        assert_eq!(kind(0), "flags=0");
    }

    #[test]
    fn the_site_is_the_first_frame_past_the_lock_primitives() {
        let frames = stack(&[
            "__traceiter_contention_begin",
            "queued_spin_lock_slowpath",
            "_raw_spin_lock_bh",
            "lock_sock_nested",
            "inet_csk_accept",
            "inet_accept",
        ]);
        assert_eq!(
            site_of(&frames),
            ("lock_sock_nested".into(), "inet_csk_accept".into())
        );
        let mutex = stack(&["__mutex_lock.constprop.0", "pipe_write", "vfs_write"]);
        assert_eq!(site_of(&mutex), ("pipe_write".into(), "vfs_write".into()));
        let rwsem = stack(&[
            "rwsem_down_write_slowpath",
            "down_write_killable",
            "vm_mmap_pgoff",
        ]);
        assert_eq!(site_of(&rwsem).0, "vm_mmap_pgoff");
        assert_eq!(
            site_of(&stack(&["_raw_spin_lock"])),
            ("?".into(), "?".into())
        );
    }

    /// A finished handshake joining the accept queue, in the softirq of a loopback sender.
    fn handshake_stack() -> Vec<String> {
        stack(&[
            "queued_spin_lock_slowpath",
            "_raw_spin_lock",
            "inet_csk_reqsk_queue_add",
            "inet_csk_complete_hashdance",
            "tcp_check_req",
            "tcp_v4_rcv",
            "ip_protocol_deliver_rcu",
            "__netif_receive_skb_one_core",
            "process_backlog",
            "__napi_poll",
            "net_rx_action",
            "handle_softirqs",
            "do_softirq",
            "__local_bh_enable_ip",
            "__dev_queue_xmit",
            "tcp_sendmsg",
            "__sys_sendto",
        ])
    }

    #[test]
    fn listener_rule_on_known_stacks() {
        assert!(is_listener(&handshake_stack()));
        // The listener's socket lock taken by accept.
        assert!(is_listener(&stack(&[
            "_raw_spin_lock_bh",
            "lock_sock_nested",
            "inet_csk_accept",
            "inet_accept",
            "do_accept"
        ])));
        // A SYN: the request joins the established hash under its bucket lock.
        assert!(is_listener(&stack(&[
            "_raw_spin_lock",
            "inet_ehash_insert",
            "inet_csk_reqsk_queue_hash_add",
            "tcp_conn_request",
            "tcp_rcv_state_process",
            "tcp_v4_do_rcv",
            "tcp_v4_rcv",
        ])));
        // Waking the listener's epoll waiter when a connection is ready to accept.
        assert!(is_listener(&stack(&[
            "_raw_spin_lock_irqsave",
            "ep_poll_callback",
            "__wake_up_common",
            "__wake_up_sync_key",
            "sock_def_readable",
            "tcp_child_process",
            "tcp_v4_rcv",
        ])));
        // The accepted socket's own lock, after inet_csk_accept returned: not the listener's
        // (6.18 takes it in inet_accept itself; older kernels in __inet_accept).
        assert!(!is_listener(&stack(&[
            "queued_spin_lock_slowpath",
            "_raw_spin_lock_bh",
            "lock_sock_nested",
            "inet_accept",
            "do_accept",
            "__sys_accept4",
        ])));
        assert!(!is_listener(&stack(&[
            "_raw_spin_lock_bh",
            "lock_sock_nested",
            "__inet_accept",
            "inet_accept",
            "do_accept"
        ])));
        // Data for an established connection waking its reader: not the listener's.
        assert!(!is_listener(&stack(&[
            "_raw_spin_lock_irqsave",
            "ep_poll_callback",
            "__wake_up_common",
            "sock_def_readable",
            "tcp_data_queue",
            "tcp_rcv_established",
            "tcp_v4_do_rcv",
            "tcp_v4_rcv",
        ])));
        // connect()'s port selection: the client's, not the listener's.
        assert!(!is_listener(&stack(&[
            "_raw_spin_lock_bh",
            "__inet_hash_connect",
            "tcp_v4_connect",
            "__inet_stream_connect",
        ])));
        assert!(is_listener(&stack(&[
            "_raw_spin_lock",
            "reuseport_add_sock.isra.0"
        ])));
    }

    #[test]
    fn sides_come_from_the_stack_then_the_process() {
        assert_eq!(
            side_of(lock_side::CLIENT, &handshake_stack()),
            Side::Softirq
        );
        let syscall = stack(&["__mutex_lock", "pipe_write", "vfs_write"]);
        assert_eq!(side_of(lock_side::SERVER, &syscall), Side::Server);
        assert_eq!(side_of(lock_side::CLIENT, &syscall), Side::Client);
        assert_eq!(side_of(lock_side::OTHER, &syscall), Side::Other);
        let ksoftirqd = stack(&[
            "_raw_spin_lock",
            "run_timer_softirq",
            "handle_softirqs",
            "run_ksoftirqd",
        ]);
        assert_eq!(side_of(lock_side::OTHER, &ksoftirqd), Side::Softirq);
    }

    #[test]
    fn waits_group_by_site_side_kind_and_listener() {
        let accept = stack(&["_raw_spin_lock_bh", "lock_sock_nested", "inet_csk_accept"]);
        // Same site through another path of the same caller: merged.
        let accept_other_path = stack(&[
            "queued_spin_lock_slowpath",
            "_raw_spin_lock_bh",
            "lock_sock_nested",
            "inet_csk_accept",
            "inet_accept",
        ]);
        let stacks = HashMap::from([
            (11, accept),
            (12, accept_other_path),
            (13, handshake_stack()),
        ]);
        let key = |stack, flags, side| LockKey { stack, flags, side };
        let wait = |count, wait_ns| LockWait { count, wait_ns };
        let sites = group_sites(
            [
                (key(11, 1, lock_side::SERVER), wait(2, 100)),
                (key(12, 1, lock_side::SERVER), wait(3, 50)),
                (key(13, 1, lock_side::CLIENT), wait(1, 500)),
                (key(0, 32, lock_side::OTHER), wait(4, 40)),
                (key(99, 1, lock_side::CLIENT), wait(1, 10)),
            ],
            &stacks,
        );
        let summary: Vec<_> = sites
            .iter()
            .map(|s| {
                (
                    s.site.as_str(),
                    s.caller.as_str(),
                    s.side,
                    s.kind.as_str(),
                    s.listener,
                    s.count,
                    s.wait_ns,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "inet_csk_reqsk_queue_add",
                    "inet_csk_complete_hashdance",
                    Side::Softirq,
                    "spin",
                    true,
                    1,
                    500
                ),
                (
                    "lock_sock_nested",
                    "inet_csk_accept",
                    Side::Server,
                    "spin",
                    true,
                    5,
                    150
                ),
                (NO_STACK, "?", Side::Other, "mutex", false, 4, 40),
                (STACK_NOT_RECORDED, "?", Side::Client, "spin", false, 1, 10),
            ]
        );
        assert_eq!(listener_totals(&sites), (6, 650));
    }
}
