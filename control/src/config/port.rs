//! One port's configuration: its file's TOML (`PortSection`) validated into a `PortConfig`
//! (kind, queues, affinity, socket permissions), and a port set's uniqueness rules. Control
//! threads: at start-up, and for `ctl add-port`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{parse_text, ConfigError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PortSection {
    name: String,
    #[serde(rename = "type")]
    kind: PortType,
    #[serde(default = "one")]
    queues: u16,
    // vhost-user
    mode: Option<VhostMode>,
    socket: Option<PathBuf>,
    /// Server mode: permissions of the socket file, octal (default "0660").
    socket_mode: Option<String>,
    /// Server mode: owner and group of the socket file, by name or number (default: unchanged).
    socket_owner: Option<String>,
    socket_group: Option<String>,
    // dpdk
    devargs: Option<String>,
    mtu: Option<u16>,
    rx_descriptors: Option<u16>,
    tx_descriptors: Option<u16>,
    // tap
    ifname: Option<String>,
    /// Per source queue, the PMD core that polls it (OVS's pmd-rxq-affinity); that PMD then
    /// polls no queue that is not pinned to it.
    pmd_rxq_affinity: Option<Vec<usize>>,
}

/// Who may connect to a socket ringswitch creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPerm {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Default for SocketPerm {
    fn default() -> Self {
        SocketPerm {
            mode: 0o660,
            uid: None,
            gid: None,
        }
    }
}

/// A user or group given by name or number, resolved through NSS (getpwnam/getgrnam).
pub(super) fn resolve_id(spec: &str, group: bool) -> Option<u32> {
    if let Ok(n) = spec.parse::<u32>() {
        return Some(n);
    }
    let name = std::ffi::CString::new(spec).ok()?;
    // SAFETY: name is a valid C string; the returned record (static storage, or null) is read
    // at once, before any other NSS call on this thread could overwrite it.
    unsafe {
        if group {
            let g = libc::getgrnam(name.as_ptr());
            (!g.is_null()).then(|| (*g).gr_gid)
        } else {
            let u = libc::getpwnam(name.as_ptr());
            (!u.is_null()).then(|| (*u).pw_uid)
        }
    }
}

pub(super) fn one() -> u16 {
    1
}

/// The `type` key of a port.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PortType {
    VhostUser,
    Dpdk,
    Tap,
}

impl PortType {
    fn name(self) -> &'static str {
        match self {
            PortType::VhostUser => "vhost-user",
            PortType::Dpdk => "dpdk",
            PortType::Tap => "tap",
        }
    }
}

/// A validated port of one kind, with what only that kind has.
#[derive(Debug, Clone)]
pub enum PortKind {
    VhostUser {
        mode: VhostMode,
        socket: PathBuf,
        socket_perm: SocketPerm,
    },
    Dpdk {
        devargs: String,
        mtu: Option<u16>,
        rx_desc: u16,
        tx_desc: u16,
    },
    Tap {
        ifname: String,
    },
}

/// Server: ringswitch creates the socket and the frontend connects. Client: ringswitch connects
/// (and reconnects) to a socket the frontend created.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum VhostMode {
    #[default]
    Server,
    Client,
}

#[derive(Debug, Clone)]
pub struct PortConfig {
    pub name: String,
    /// Queue pairs (vhost-user), RX and TX queues (dpdk), queues (tap).
    pub queues: u16,
    /// The core each source queue is pinned to, by queue number (may be shorter than `queues`).
    pub rxq_affinity: Vec<usize>,
    pub kind: PortKind,
    /// The file it came from, for error messages.
    pub file: PathBuf,
}

/// Descriptors per DPDK queue unless the port file says otherwise.
pub const DEFAULT_DPDK_DESC: u16 = 1024;

/// Largest MTU a DPDK port may be given: its frames must fit one mbuf.
pub const MAX_DPDK_MTU: u16 = 9600;

/// Most queue pairs a vhost-user port may ask for (as DPDK's VHOST_MAX_QUEUE_PAIRS).
pub const MAX_QUEUE_PAIRS: u16 = 128;

/// Every core a port pins a queue to must run a PMD.
pub fn check_affinity(pc: &PortConfig, pmd_cores: &[usize]) -> Result<(), ConfigError> {
    match pc.rxq_affinity.iter().find(|c| !pmd_cores.contains(c)) {
        Some(c) => Err(ConfigError::invalid(
            &pc.file,
            "pmd_rxq_affinity",
            format!("core {c} runs no PMD (pmd_cores = {pmd_cores:?})"),
        )),
        None => Ok(()),
    }
}

/// Validate one port file that `ringswitch ctl add-port` read and sent (the switch never
/// opens a path a client names: its errors quote only what that client could read itself).
pub fn port_from_text(file: &Path, text: &str) -> Result<PortConfig, ConfigError> {
    validate_port(parse_text(file, text)?, file.to_owned())
}

pub(super) fn validate_port(p: PortSection, file: PathBuf) -> Result<PortConfig, ConfigError> {
    let invalid = ConfigError::invalid;
    if p.name.is_empty() || p.name.len() > 64 || p.name.chars().any(|c| c.is_whitespace()) {
        return Err(invalid(
            &file,
            "name",
            format!("{:?} is not a valid port name", p.name),
        ));
    }
    if p.queues == 0 || p.queues > MAX_QUEUE_PAIRS {
        return Err(invalid(
            &file,
            "queues",
            format!("{} queues: must be 1..={MAX_QUEUE_PAIRS}", p.queues),
        ));
    }
    // Keys of another port type are mistakes, not options to ignore.
    let owned_keys = [
        ("mode", p.mode.is_some(), PortType::VhostUser),
        ("socket", p.socket.is_some(), PortType::VhostUser),
        ("socket_mode", p.socket_mode.is_some(), PortType::VhostUser),
        (
            "socket_owner",
            p.socket_owner.is_some(),
            PortType::VhostUser,
        ),
        (
            "socket_group",
            p.socket_group.is_some(),
            PortType::VhostUser,
        ),
        ("devargs", p.devargs.is_some(), PortType::Dpdk),
        ("mtu", p.mtu.is_some(), PortType::Dpdk),
        ("rx_descriptors", p.rx_descriptors.is_some(), PortType::Dpdk),
        ("tx_descriptors", p.tx_descriptors.is_some(), PortType::Dpdk),
        ("ifname", p.ifname.is_some(), PortType::Tap),
    ];
    if let Some((key, _, _)) = owned_keys.iter().find(|(_, set, t)| *set && *t != p.kind) {
        return Err(invalid(
            &file,
            key,
            format!("does not apply to a {} port", p.kind.name()),
        ));
    }
    let required = |key: &str, v: Option<String>| {
        v.filter(|v| !v.is_empty())
            .ok_or_else(|| invalid(&file, key, format!("a {} port needs it", p.kind.name())))
    };
    let kind = match p.kind {
        PortType::VhostUser => {
            let socket_perm = socket_perm(&p, &file)?;
            let socket = PathBuf::from(required(
                "socket",
                p.socket.map(|s| s.display().to_string()),
            )?);
            PortKind::VhostUser {
                mode: p.mode.unwrap_or_default(),
                socket,
                socket_perm,
            }
        }
        PortType::Dpdk => {
            let devargs = required("devargs", p.devargs)?;
            if let Some(m) = p.mtu.filter(|m| !(68..=MAX_DPDK_MTU).contains(m)) {
                return Err(invalid(
                    &file,
                    "mtu",
                    format!("{m}: must be 68..={MAX_DPDK_MTU}"),
                ));
            }
            let desc = |key: &str, v: Option<u16>| match v {
                Some(n) if !(32..=32768).contains(&n) || !n.is_power_of_two() => Err(invalid(
                    &file,
                    key,
                    format!("{n}: must be a power of two in 32..=32768"),
                )),
                v => Ok(v.unwrap_or(DEFAULT_DPDK_DESC)),
            };
            PortKind::Dpdk {
                devargs,
                mtu: p.mtu,
                rx_desc: desc("rx_descriptors", p.rx_descriptors)?,
                tx_desc: desc("tx_descriptors", p.tx_descriptors)?,
            }
        }
        PortType::Tap => {
            let ifname = required("ifname", p.ifname)?;
            if ifname.len() >= 16 || ifname.contains(['/', ' ', '\0']) {
                return Err(invalid(
                    &file,
                    "ifname",
                    format!("{ifname:?} is not an interface name (1..=15 bytes, no '/' or spaces)"),
                ));
            }
            PortKind::Tap { ifname }
        }
    };
    let rxq_affinity = p.pmd_rxq_affinity.unwrap_or_default();
    if rxq_affinity.len() > p.queues as usize {
        return Err(invalid(
            &file,
            "pmd_rxq_affinity",
            format!(
                "{} cores for {} queue(s): one core per queue at most",
                rxq_affinity.len(),
                p.queues
            ),
        ));
    }
    Ok(PortConfig {
        name: p.name,
        queues: p.queues,
        rxq_affinity,
        kind,
        file,
    })
}

/// What must be unique across the ports of one switch: names, and the socket, DPDK device or
/// interface each port attaches to.
#[derive(Debug, Default)]
pub struct PortSet {
    names: HashSet<String>,
    endpoints: HashSet<String>,
}

impl PortConfig {
    /// The `type` it was configured with.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            PortKind::VhostUser { .. } => PortType::VhostUser.name(),
            PortKind::Dpdk { .. } => PortType::Dpdk.name(),
            PortKind::Tap { .. } => PortType::Tap.name(),
        }
    }

    /// What it attaches to, for display: socket path, devargs or interface name.
    pub fn attachment(&self) -> String {
        match &self.kind {
            PortKind::VhostUser { socket, .. } => socket.display().to_string(),
            PortKind::Dpdk { devargs, .. } => devargs.clone(),
            PortKind::Tap { ifname } => ifname.clone(),
        }
    }

    /// The socket ringswitch creates for this port (a server-mode vhost-user port).
    pub fn server_socket(&self) -> Option<&Path> {
        match &self.kind {
            PortKind::VhostUser {
                mode: VhostMode::Server,
                socket,
                ..
            } => Some(socket),
            _ => None,
        }
    }

    /// (key, what it attaches to) for uniqueness checks and messages.
    fn endpoint(&self) -> (&'static str, String) {
        match &self.kind {
            PortKind::VhostUser { socket, .. } => ("socket", socket.display().to_string()),
            PortKind::Dpdk { devargs, .. } => (
                "devargs",
                format!("device {:?}", dataplane::dpdk::device_name(devargs)),
            ),
            PortKind::Tap { ifname } => ("ifname", format!("interface {ifname:?}")),
        }
    }
}

impl PortSet {
    pub fn insert(&mut self, p: &PortConfig) -> Result<(), ConfigError> {
        let invalid = |key: &str, message| ConfigError::invalid(&p.file, key, message);
        let (key, endpoint) = p.endpoint();
        if self.names.contains(&p.name) {
            return Err(invalid(
                "name",
                format!("port {:?} is defined twice", p.name),
            ));
        }
        if self.endpoints.contains(&endpoint) {
            return Err(invalid(key, format!("{endpoint} is used by two ports")));
        }
        self.names.insert(p.name.clone());
        self.endpoints.insert(endpoint);
        Ok(())
    }

    pub fn remove(&mut self, p: &PortConfig) {
        self.names.remove(&p.name);
        self.endpoints.remove(&p.endpoint().1);
    }
}

/// Owner, group and mode of a server-mode vhost-user socket.
pub(super) fn socket_perm(p: &PortSection, file: &Path) -> Result<SocketPerm, ConfigError> {
    perm_from(
        file,
        "socket",
        p.socket_mode.as_deref(),
        p.socket_owner.as_deref(),
        p.socket_group.as_deref(),
    )
}

/// A socket's permissions from the keys `{prefix}_mode`, `_owner` and `_group`.
pub(super) fn perm_from(
    file: &Path,
    prefix: &str,
    mode: Option<&str>,
    owner: Option<&str>,
    group: Option<&str>,
) -> Result<SocketPerm, ConfigError> {
    let invalid =
        |key: &str, message| ConfigError::invalid(file, &format!("{prefix}_{key}"), message);
    let mut perm = SocketPerm::default();
    if let Some(m) = mode {
        perm.mode = u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|&m| m <= 0o777)
            .ok_or_else(|| invalid("mode", format!("{m:?} is not an octal mode like \"0660\"")))?;
    }
    if let Some(o) = owner {
        perm.uid =
            Some(resolve_id(o, false).ok_or_else(|| invalid("owner", format!("no user {o:?}")))?);
    }
    if let Some(g) = group {
        perm.gid =
            Some(resolve_id(g, true).ok_or_else(|| invalid("group", format!("no group {g:?}")))?);
    }
    Ok(perm)
}
