//! Steering that outlives the process that attached it (persisted by `reuseport attach`), as one
//! type: [`PinnedSteering`] owns the program and maps pinned on bpffs and the state file beside
//! them, and answers for both.
//!
//! Layout for port `P` under a [`PinnedRoot`] (by default [`PinnedRoot::system`]):
//! - `/sys/fs/bpf/reuseport/P/`: the program and its `cpu_listeners`, `cpu_fallback` and
//!   `steering_stats` maps, pinned by [`Steering::pin`]. The pins keep the program and maps alive
//!   (the group keeps using the attached program by itself); the directory is created atomically,
//!   so two persists for one port cannot both succeed.
//! - `/run/reuseport/P.json`: what bpffs cannot hold, a [`PersistedState`]: the PIDs given to
//!   `attach`, the program's id, and per slot the CPU, serving PID and socket inode. Written
//!   whole (a temporary file renamed over it).
//!
//! [`PinnedSteering::status`] combines the kernel's view (which slots are filled, the fallback
//! table, the counters) with `/proc`'s (whether each recorded process still holds its socket)
//! into a [`PinnedStatus`], and [`PinnedSteering::detach`] undoes it all.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

use aya::maps::{Array, MapData};
use reuseport_common::{SteeringStats, names};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::steering::{Steering, SteeringError};

/// Where bpffs is mounted on a usual system.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// `statfs`'s `f_type` of bpffs (`BPF_FS_MAGIC`, linux/magic.h).
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// Errors from persisting, opening, reading or removing pinned steering.
#[derive(Debug, Error)]
pub enum PinnedError {
    /// Nothing was persisted for the port.
    #[error("no persistent steering for port {port} (nothing under {dir})")]
    NotPersisted {
        /// The port.
        port: u16,
        /// Where its pins would be.
        dir: String,
    },
    /// The port already has persistent steering (or a state file left from it).
    #[error("port {port} already has persistent steering (pinned in {dir})")]
    AlreadyPersisted {
        /// The port.
        port: u16,
        /// Where its pins are.
        dir: String,
    },
    /// The port has a state file, but its pins are gone.
    #[error("port {port} has a state file but nothing is pinned under {dir}")]
    PinsMissing {
        /// The port.
        port: u16,
        /// Where its pins would be.
        dir: String,
    },
    /// The pin directory is not on a BPF filesystem, where pins can live.
    #[error("{dir} is not on a BPF filesystem (bpffs)")]
    NotBpffs {
        /// The directory.
        dir: String,
    },
    /// bpffs was not mounted on `/sys/fs/bpf`, and mounting it failed.
    #[error("mounting bpffs on {dir} failed")]
    Mount {
        /// The mount point.
        dir: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating, reading, writing or removing a file or directory failed.
    #[error("{action} {path} failed")]
    Io {
        /// What was done: `creating`, `reading`, `writing`, `removing`.
        action: &'static str,
        /// The file or directory.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The state file does not hold a [`PersistedState`].
    #[error("{path} does not hold a persisted steering state")]
    StateFormat {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Pinning, reading the pinned maps or detaching failed.
    #[error(transparent)]
    Steering(#[from] SteeringError),
    /// A directory or file of the pins or state is not one only this user (root) controls.
    #[error(
        "refusing {path}: {why}; another user may have created or changed it: remove it as root \
         and run again"
    )]
    Unsafe {
        /// The directory or file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// This process may not remove the pins or state file.
    #[error(
        "removing {path} needs write access to {dir} (owned by uid {owner}): run as root; \
         nothing was changed"
    )]
    NotRemovable {
        /// What would be removed.
        path: String,
        /// The directory it is in.
        dir: String,
        /// The directory's owner.
        owner: u32,
    },
    /// Detaching through the kernel's view failed.
    #[error(transparent)]
    Port(Box<crate::port_steering::PortSteeringError>),
}

impl From<crate::port_steering::PortSteeringError> for PinnedError {
    fn from(err: crate::port_steering::PortSteeringError) -> Self {
        match err {
            crate::port_steering::PortSteeringError::Pinned(err) => err,
            other => Self::Port(Box::new(other)),
        }
    }
}

impl PinnedError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.display().to_string();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// One steered slot as `attach` recorded it. Stored in the state file as the array
/// `[cpu, pid, inode]`, the format earlier versions wrote and read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u32, u32, u64)", into = "(u32, u32, u64)")]
pub struct PinnedSlot {
    /// The slot: the CPU the serving process is pinned to.
    pub cpu: u32,
    /// The process that served the socket at attach time.
    pub pid: u32,
    /// The socket's inode.
    pub inode: u64,
}

impl PinnedSlot {
    /// Whether the recorded process still has the recorded socket open (asked of `/proc`).
    pub fn is_held(&self) -> bool {
        crate::procfs::holds_socket(self.pid, self.inode)
    }
}

impl From<(u32, u32, u64)> for PinnedSlot {
    fn from((cpu, pid, inode): (u32, u32, u64)) -> Self {
        Self { cpu, pid, inode }
    }
}

impl From<PinnedSlot> for (u32, u32, u64) {
    fn from(slot: PinnedSlot) -> Self {
        (slot.cpu, slot.pid, slot.inode)
    }
}

/// What is recorded beside the pins (the state file), for `status` and `detach`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    /// The port.
    pub port: u16,
    /// The PIDs given to `attach` (their tree is searched for a socket to detach through).
    pub pids: Vec<u32>,
    /// The kernel's id of the pinned program.
    pub program_id: u32,
    /// The steered slots (empty when `attach` was given sockets rather than processes).
    pub slots: Vec<PinnedSlot>,
}

/// Where pinned steering lives: a directory on bpffs for the pins and one for the state files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedRoot {
    pins: PathBuf,
    state: PathBuf,
    /// Mount bpffs on `/sys/fs/bpf` before persisting if it is not mounted.
    mount_bpffs: bool,
}

impl Default for PinnedRoot {
    /// [`PinnedRoot::system`].
    fn default() -> Self {
        Self::system()
    }
}

impl PinnedRoot {
    /// Pins under `/sys/fs/bpf/reuseport/PORT/`, state in `/run/reuseport/PORT.json`; bpffs is
    /// mounted on `/sys/fs/bpf` when persisting if it is not mounted yet.
    pub fn system() -> Self {
        Self {
            pins: Path::new(BPFFS_MOUNT).join("reuseport"),
            state: PathBuf::from("/run/reuseport"),
            mount_bpffs: true,
        }
    }

    /// Pins under `pins/PORT/` (`pins` must be on a mounted bpffs, or below a directory that
    /// is), state in `state/PORT.json`.
    pub fn new(pins: impl Into<PathBuf>, state: impl Into<PathBuf>) -> Self {
        Self {
            pins: pins.into(),
            state: state.into(),
            mount_bpffs: false,
        }
    }

    /// The directory holding the pins of `port`'s steering.
    pub fn pin_dir(&self, port: u16) -> PathBuf {
        self.pins.join(port.to_string())
    }

    /// The state file of `port`'s steering.
    pub fn state_path(&self, port: u16) -> PathBuf {
        self.state.join(format!("{port}.json"))
    }

    /// Every port with pins under this root, in ascending order.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = fs::read_dir(&self.pins)
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        ports.sort_unstable();
        ports
    }

    /// Whether `port` has pins or a state file under this root.
    pub fn is_persisted(&self, port: u16) -> bool {
        self.pin_dir(port).exists() || self.state_path(port).exists()
    }

    /// Pins `steering` (program and maps) for `port` and records `pids` and `slots` beside it,
    /// so the steering outlives this process. Fails, changing nothing, if `port` already has
    /// persistent steering under this root; on any other error whatever was created is removed
    /// again.
    pub fn persist(
        &self,
        steering: &mut Steering,
        port: u16,
        pids: &[u32],
        slots: Vec<PinnedSlot>,
    ) -> Result<PinnedSteering, PinnedError> {
        if self.mount_bpffs {
            mount_bpffs()?;
        }
        // Before creating anything: a directory another user placed is refused, not used.
        self.check_dirs(port)?;
        create_private_dir(&self.pins)?;
        self.check_dirs(port)?;
        if !is_bpffs(&self.pins) {
            return Err(PinnedError::NotBpffs {
                dir: self.pins.display().to_string(),
            });
        }
        let dir = self.pin_dir(port);
        let already = || PinnedError::AlreadyPersisted {
            port,
            dir: dir.display().to_string(),
        };
        if self.state_path(port).exists() {
            return Err(already());
        }
        // Creating the directory claims the port: a second persist finds it there.
        match fs::DirBuilder::new().mode(0o755).create(&dir) {
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => return Err(already()),
            other => other.map_err(PinnedError::io("creating", &dir))?,
        }
        let pinned = steering
            .pin(&dir)
            .and_then(|()| steering.program_id())
            .map_err(PinnedError::from)
            .and_then(|program_id| {
                let state = PersistedState {
                    port,
                    pids: pids.to_vec(),
                    program_id,
                    slots,
                };
                self.write_state(&state)?;
                Ok(state)
            });
        match pinned {
            Ok(state) => Ok(PinnedSteering {
                root: self.clone(),
                state,
            }),
            Err(err) => {
                // Leave nothing half-persisted: without its pins the steering ends with this
                // process.
                let _ = fs::remove_dir_all(&dir);
                let _ = fs::remove_file(self.state_path(port));
                Err(err)
            }
        }
    }

    /// The steering persisted for `port` under this root.
    pub fn open(&self, port: u16) -> Result<PinnedSteering, PinnedError> {
        let path = self.state_path(port);
        let text = match fs::read_to_string(&path) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(PinnedError::NotPersisted {
                    port,
                    dir: self.pin_dir(port).display().to_string(),
                });
            }
            other => other.map_err(PinnedError::io("reading", &path))?,
        };
        let state = serde_json::from_str(&text).map_err(|source| PinnedError::StateFormat {
            path: path.display().to_string(),
            source,
        })?;
        Ok(PinnedSteering {
            root: self.clone(),
            state,
        })
    }

    /// What the state file of `port` records, or `None` if there is none.
    pub fn read_state(&self, port: u16) -> Result<Option<PersistedState>, PinnedError> {
        match self.open(port) {
            Ok(pinned) => Ok(Some(pinned.into_state())),
            Err(PinnedError::NotPersisted { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Every port with a state file under this root, in ascending order.
    pub fn state_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = fs::read_dir(&self.state)
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                entry
                    .ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".json")?
                    .parse()
                    .ok()
            })
            .collect();
        ports.sort_unstable();
        ports
    }

    /// Fails with [`PinnedError::Unsafe`] unless each directory (and the state file) used for
    /// `port` that exists is a real directory (file) owned by root or this user and writable by
    /// no one else: under a world-writable `/sys/fs/bpf` another user could otherwise have created it
    /// first, and could rename or fill it.
    pub fn check_dirs(&self, port: u16) -> Result<(), PinnedError> {
        let paths = [
            (self.pins.clone(), true),
            (self.pin_dir(port), true),
            (self.state.clone(), true),
            (self.state_path(port), false),
        ];
        for (path, is_dir) in paths {
            let why = crate::private_path::why_not_private(&path, is_dir)
                .map_err(PinnedError::io("reading", &path))?;
            if let Some(why) = why {
                return Err(PinnedError::Unsafe {
                    path: path.display().to_string(),
                    why,
                });
            }
        }
        Ok(())
    }

    /// Fails with [`PinnedError::NotRemovable`] unless this process may remove the pins and the
    /// state file of `port` (whichever exist), before anything is changed.
    pub fn check_removable(&self, port: u16) -> Result<(), PinnedError> {
        use rustix::fs::{Access, AtFlags, CWD, accessat};
        let mut needed = Vec::new();
        let dir = self.pin_dir(port);
        if dir.exists() {
            needed.push((dir.clone(), self.pins.clone()));
            needed.push((dir.clone(), dir));
        }
        let state = self.state_path(port);
        if state.exists() {
            needed.push((state, self.state.clone()));
        }
        for (path, parent) in needed {
            let allowed = accessat(
                CWD,
                &parent,
                Access::WRITE_OK | Access::EXEC_OK,
                AtFlags::EACCESS,
            )
            .is_ok();
            if !allowed {
                return Err(PinnedError::NotRemovable {
                    path: path.display().to_string(),
                    owner: fs::metadata(&parent).map_or(0, |m| m.uid()),
                    dir: parent.display().to_string(),
                });
            }
        }
        Ok(())
    }

    /// Removes the pins and the state file of `port` (and the parent directories once empty).
    /// Returns the pin directory if there was one, and whether there was a state file.
    pub fn remove(&self, port: u16) -> Result<(Option<PathBuf>, bool), PinnedError> {
        let dir = self.pin_dir(port);
        let pins = match fs::remove_dir_all(&dir) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            other => other
                .map(|()| dir.clone())
                .map(Some)
                .map_err(PinnedError::io("removing", &dir))?,
        };
        let path = self.state_path(port);
        let state = match fs::remove_file(&path) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => false,
            other => other
                .map(|()| true)
                .map_err(PinnedError::io("removing", &path))?,
        };
        // remove_dir refuses a directory that is not empty: others' pins and states stay.
        let _ = fs::remove_dir(&self.pins);
        let _ = fs::remove_dir(&self.state);
        Ok((pins, state))
    }

    fn write_state(&self, state: &PersistedState) -> Result<(), PinnedError> {
        create_private_dir(&self.state)?;
        self.check_dirs(state.port)?;
        let path = self.state_path(state.port);
        let json =
            serde_json::to_string_pretty(state).map_err(|source| PinnedError::StateFormat {
                path: path.display().to_string(),
                source,
            })?;
        let partial = path.with_extension("json.partial");
        fs::write(&partial, json).map_err(PinnedError::io("writing", &partial))?;
        fs::rename(&partial, &path).map_err(|source| {
            let _ = fs::remove_file(&partial);
            PinnedError::io("writing", &path)(source)
        })
    }
}

/// Steering pinned for one port: its pins on bpffs and its state file (see the module
/// documentation). Opening it holds nothing open; each query reads the pins afresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedSteering {
    root: PinnedRoot,
    state: PersistedState,
}

impl PinnedSteering {
    /// [`PinnedRoot::persist`] under [`PinnedRoot::system`].
    pub fn persist(
        steering: &mut Steering,
        port: u16,
        pids: &[u32],
        slots: Vec<PinnedSlot>,
    ) -> Result<Self, PinnedError> {
        PinnedRoot::system().persist(steering, port, pids, slots)
    }

    /// [`PinnedRoot::open`] under [`PinnedRoot::system`]: [`PinnedError::NotPersisted`] if
    /// nothing was persisted for `port`.
    pub fn open(port: u16) -> Result<Self, PinnedError> {
        PinnedRoot::system().open(port)
    }

    /// [`PinnedRoot::ports`] under [`PinnedRoot::system`].
    pub fn ports() -> Vec<u16> {
        PinnedRoot::system().ports()
    }

    /// The port steered.
    pub fn port(&self) -> u16 {
        self.state.port
    }

    /// The kernel's id of the pinned program.
    pub fn program_id(&self) -> u32 {
        self.state.program_id
    }

    /// The directory holding the pins.
    pub fn pin_dir(&self) -> PathBuf {
        self.root.pin_dir(self.state.port)
    }

    /// The state file.
    pub fn state_path(&self) -> PathBuf {
        self.root.state_path(self.state.port)
    }

    /// What the state file records.
    pub fn state(&self) -> &PersistedState {
        &self.state
    }

    /// The program's counters, one entry per possible CPU, indexed by the receiving CPU.
    pub fn arrivals(&self) -> Result<Vec<SteeringStats>, PinnedError> {
        Ok(read_arrivals(&self.existing_pin_dir()?)?)
    }

    /// The fallback table: entry `c` is the CPU whose listener takes CPU `c`'s connections
    /// while slot `c` is empty.
    pub fn fallbacks(&self) -> Result<Vec<u32>, PinnedError> {
        Ok(read_fallbacks(&self.existing_pin_dir()?)?)
    }

    /// Whether slot `cpu` holds a socket, asked of the kernel (see [`slot_filled`]).
    pub fn slot_filled(&self, cpu: u32) -> Result<bool, PinnedError> {
        slot_filled(&self.existing_pin_dir()?, cpu)
    }

    /// Everything there is to say about this steering now: the kernel's view of each slot, the
    /// recorded processes', the fallbacks and the counters.
    pub fn status(&self) -> Result<PinnedStatus, PinnedError> {
        let dir = self.existing_pin_dir()?;
        let fallbacks = read_fallbacks(&dir)?;
        let arrivals = read_arrivals(&dir)?;
        PinnedStatus::from_parts(&self.state, &dir, &fallbacks, arrivals, |slot| {
            Ok(SlotProbe {
                filled: slot_filled(&dir, slot.cpu)?,
                held: slot.is_held(),
            })
        })
    }

    /// Removes the steering as [`crate::port_steering::detach`] does (detaches every program
    /// of ours that holds a listener of the port, then deletes the pins and the state file;
    /// everything it needs is checked first). Returns what the state file recorded.
    pub fn detach(self) -> Result<PersistedState, PinnedError> {
        crate::port_steering::detach(self.state.port, &self.root)?;
        Ok(self.state)
    }

    /// Gives up the handle, keeping what the state file records.
    pub fn into_state(self) -> PersistedState {
        self.state
    }

    fn existing_pin_dir(&self) -> Result<PathBuf, PinnedError> {
        let dir = self.pin_dir();
        if !dir.is_dir() {
            return Err(PinnedError::PinsMissing {
                port: self.state.port,
                dir: dir.display().to_string(),
            });
        }
        Ok(dir)
    }
}

/// What the kernel and `/proc` say about one recorded slot (the inputs of [`SlotStatus`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotProbe {
    /// The kernel's map holds a socket in the slot.
    pub filled: bool,
    /// The recorded process still has the recorded socket open.
    pub held: bool,
}

/// One slot of [`PinnedStatus`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotStatus {
    /// The slot as recorded at attach time: CPU, serving PID, socket inode.
    pub slot: PinnedSlot,
    /// The kernel's map holds a socket in the slot.
    pub filled: bool,
    /// The recorded process still has the recorded socket open.
    pub held: bool,
    /// The CPU whose listener takes this CPU's connections while the slot is empty.
    pub fallback: u32,
}

/// A slot's state, from [`SlotStatus::filled`] and [`SlotStatus::held`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Filled, and the recorded process still holds the socket: it serves the slot.
    Live,
    /// Filled, but the recorded process no longer holds the socket: another process does (a
    /// restarted worker, or a prefork master keeping it until it starts a new worker).
    HeldElsewhere,
    /// Empty (the socket closed): the CPU's connections go to the fallback CPU's listener.
    Empty,
}

impl SlotStatus {
    /// What [`SlotStatus::filled`] and [`SlotStatus::held`] say together. The kernel has the
    /// last word: an empty slot is [`SlotState::Empty`] even if `/proc` still shows the socket.
    pub fn state(&self) -> SlotState {
        match (self.filled, self.held) {
            (true, true) => SlotState::Live,
            (true, false) => SlotState::HeldElsewhere,
            (false, _) => SlotState::Empty,
        }
    }
}

/// The status of pinned steering, as data (see [`PinnedSteering::status`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedStatus {
    /// The port.
    pub port: u16,
    /// The kernel's id of the pinned program.
    pub program_id: u32,
    /// The directory holding the pins.
    pub pin_dir: PathBuf,
    /// The PIDs given to `attach`.
    pub pids: Vec<u32>,
    /// The recorded slots, in recorded order.
    pub slots: Vec<SlotStatus>,
    /// The program's counters per receiving CPU (index = CPU).
    pub arrivals: Vec<SteeringStats>,
    /// [`PinnedStatus::arrivals`] summed over every CPU.
    pub total: SteeringStats,
}

impl PinnedStatus {
    /// Combines what the state file recorded with what the kernel reports: `fallbacks` (the
    /// fallback table, index = CPU; a CPU beyond it falls back to itself), `arrivals` (the
    /// counters, index = CPU) and `probe`'s answer for each slot.
    pub fn from_parts<E>(
        state: &PersistedState,
        pin_dir: &Path,
        fallbacks: &[u32],
        arrivals: Vec<SteeringStats>,
        mut probe: impl FnMut(&PinnedSlot) -> Result<SlotProbe, E>,
    ) -> Result<Self, E> {
        let slots = state
            .slots
            .iter()
            .map(|slot| {
                let SlotProbe { filled, held } = probe(slot)?;
                Ok(SlotStatus {
                    slot: *slot,
                    filled,
                    held,
                    fallback: usize::try_from(slot.cpu)
                        .ok()
                        .and_then(|index| fallbacks.get(index))
                        .copied()
                        .unwrap_or(slot.cpu),
                })
            })
            .collect::<Result<_, E>>()?;
        let total = arrivals
            .iter()
            .fold(SteeringStats::default(), |mut sum, cpu| {
                sum.add(cpu);
                sum
            });
        Ok(Self {
            port: state.port,
            program_id: state.program_id,
            pin_dir: pin_dir.to_owned(),
            pids: state.pids.clone(),
            slots,
            arrivals,
            total,
        })
    }

    /// `(cpu, counters)` of every CPU where the program ran or failed, in CPU order.
    pub fn active_cpus(&self) -> impl Iterator<Item = (u32, &SteeringStats)> {
        (0..)
            .zip(&self.arrivals)
            .filter(|(_, stats)| stats.total() + stats.errors > 0)
    }
}

/// The counters of steering pinned into `dir` by [`Steering::pin`].
pub(crate) fn read_arrivals(dir: &Path) -> Result<Vec<SteeringStats>, SteeringError> {
    let data = MapData::from_pin(dir.join(names::STEERING_STATS))?;
    crate::steering::read_stats(&aya::maps::Map::from_map_data(data)?)
}

/// The fallback table of steering pinned into `dir` by [`Steering::pin`].
pub(crate) fn read_fallbacks(dir: &Path) -> Result<Vec<u32>, SteeringError> {
    let data = MapData::from_pin(dir.join(names::CPU_FALLBACK))?;
    let map = aya::maps::Map::from_map_data(data)?;
    let fallback = Array::<_, u32>::try_from(&map)?;
    Ok(fallback.iter().collect::<Result<_, _>>()?)
}

/// Whether slot `cpu` of the steering pinned into `dir` holds a socket, asked of the kernel
/// (a lookup answers the socket's cookie, or that the slot is empty).
pub fn slot_filled(dir: &Path, cpu: u32) -> Result<bool, PinnedError> {
    let data = MapData::from_pin(dir.join(names::CPU_LISTENERS)).map_err(SteeringError::from)?;
    Ok(
        crate::sockarray::cookie(std::os::fd::AsFd::as_fd(data.fd()), cpu)
            .map_err(SteeringError::from)?
            .is_some(),
    )
}

/// Creates `dir` (and its parents) as `rwxr-xr-x` whatever the umask, if it does not exist.
fn create_private_dir(dir: &Path) -> Result<(), PinnedError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(PinnedError::io("creating", dir))
}

/// Whether `dir` is on bpffs.
fn is_bpffs(dir: &Path) -> bool {
    rustix::fs::statfs(dir).is_ok_and(|stat| u64::try_from(stat.f_type) == Ok(BPF_FS_MAGIC))
}

/// Mounts bpffs on `/sys/fs/bpf` unless something is mounted there.
fn mount_bpffs() -> Result<(), PinnedError> {
    let mounted = fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(BPFFS_MOUNT))
    });
    if mounted {
        return Ok(());
    }
    rustix::mount::mount(
        "bpf",
        BPFFS_MOUNT,
        "bpf",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .map_err(|err| PinnedError::Mount {
        dir: BPFFS_MOUNT.to_owned(),
        source: err.into(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn stats(local: u64, fallback: u64, errors: u64) -> SteeringStats {
        SteeringStats {
            local,
            fallback,
            errors,
            ..SteeringStats::default()
        }
    }

    fn state() -> PersistedState {
        PersistedState {
            port: 8080,
            pids: vec![100],
            program_id: 42,
            slots: vec![
                PinnedSlot {
                    cpu: 0,
                    pid: 101,
                    inode: 1000,
                },
                PinnedSlot {
                    cpu: 1,
                    pid: 102,
                    inode: 1001,
                },
                PinnedSlot {
                    cpu: 3,
                    pid: 103,
                    inode: 1003,
                },
            ],
        }
    }

    #[test]
    fn status_combines_the_kernel_and_proc_views_slot_by_slot() {
        let probes: BTreeMap<u32, SlotProbe> = [
            (
                0,
                SlotProbe {
                    filled: true,
                    held: true,
                },
            ),
            (
                1,
                SlotProbe {
                    filled: true,
                    held: false,
                },
            ),
            (
                3,
                SlotProbe {
                    filled: false,
                    held: true,
                },
            ),
        ]
        .into_iter()
        .collect();
        let arrivals = vec![
            stats(5, 0, 0),
            stats(0, 0, 0),
            stats(0, 0, 1),
            stats(2, 3, 0),
        ];
        // The table covers CPUs 0-2 only: CPU 3 falls back to itself.
        let status = PinnedStatus::from_parts(
            &state(),
            Path::new("/pins/8080"),
            &[1, 0, 0],
            arrivals,
            |slot| Ok::<_, PinnedError>(probes[&slot.cpu]),
        )
        .expect("status");
        assert_eq!(status.port, 8080);
        assert_eq!(status.program_id, 42);
        assert_eq!(status.pin_dir, Path::new("/pins/8080"));
        assert_eq!(status.pids, [100]);
        let states: Vec<_> = status.slots.iter().map(SlotStatus::state).collect();
        assert_eq!(
            states,
            [SlotState::Live, SlotState::HeldElsewhere, SlotState::Empty]
        );
        let fallbacks: Vec<_> = status.slots.iter().map(|s| s.fallback).collect();
        assert_eq!(fallbacks, [1, 0, 3]);
        assert_eq!(status.slots[2].slot.inode, 1003);
        assert_eq!(status.total, stats(7, 3, 1));
        let active: Vec<u32> = status.active_cpus().map(|(cpu, _)| cpu).collect();
        assert_eq!(active, [0, 2, 3], "CPU 1 saw nothing; CPU 2 only an error");
    }

    #[test]
    fn a_failing_probe_fails_the_status() {
        let result = PinnedStatus::from_parts(&state(), Path::new("/p"), &[], Vec::new(), |_| {
            Err(PinnedError::PinsMissing {
                port: 8080,
                dir: "/p".into(),
            })
        });
        assert!(matches!(result, Err(PinnedError::PinsMissing { .. })));
    }

    #[test]
    fn the_state_file_keeps_the_earlier_tuple_format() {
        let earlier = r#"{"port":8080,"pids":[100],"program_id":42,"slots":[[0,101,1000],[1,102,1001],[3,103,1003]]}"#;
        let state: PersistedState = serde_json::from_str(earlier).expect("parse");
        assert_eq!(state, self::state());
        assert_eq!(serde_json::to_string(&state).expect("write"), earlier);
    }

    #[test]
    fn a_root_places_pins_and_state_per_port() {
        let root = PinnedRoot::new("/x/pins", "/x/state");
        assert_eq!(root.pin_dir(80), Path::new("/x/pins/80"));
        assert_eq!(root.state_path(80), Path::new("/x/state/80.json"));
        let system = PinnedRoot::system();
        assert_eq!(
            system.pin_dir(8080),
            Path::new("/sys/fs/bpf/reuseport/8080")
        );
        assert_eq!(
            system.state_path(8080),
            Path::new("/run/reuseport/8080.json")
        );
        assert!(
            PinnedRoot::new("/nonexistent/pins", "/nonexistent/s")
                .ports()
                .is_empty()
        );
    }
}
