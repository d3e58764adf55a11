//! Configuration: a main TOML file (`[dataplane]`, optional inline `[[port]]`s) and one TOML
//! file per port in a `ports.d/` folder beside it. Parsed with unknown keys refused, then
//! validated into a `Config`. Runs on the control thread at start-up only.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane::{Assign, AutoLb, Model};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// toml's message names the line, column and key.
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    fn invalid(file: &Path, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            message,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MainFile {
    dataplane: DataplaneSection,
    #[serde(default)]
    port: Vec<PortSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataplaneSection {
    pmd_cores: Vec<usize>,
    #[serde(default = "default_ctl")]
    control_socket: PathBuf,
    /// Permissions of the control socket, octal (default "0660"), and its group. Clients
    /// other than root and the switch's own user may only read (stats, shows).
    control_socket_mode: Option<String>,
    control_socket_group: Option<String>,
    /// Folder of per-port files, relative to the main file. Default: `ports.d` if it exists.
    ports_dir: Option<PathBuf>,
    /// DPDK EAL arguments, used only if a `dpdk` port exists. Default: DEFAULT_EAL_ARGS.
    eal_args: Option<Vec<String>>,
    /// What a PMD does when it has nothing to do: `rtc` busy-polls, `adaptive` sleeps.
    #[serde(default)]
    model: ModelName,
    /// Adaptive model: microseconds without a frame before a PMD sleeps.
    adaptive_idle_us: Option<u32>,
    /// Pipeline model: how many of the PMDs (the last ones listed) only deliver.
    pipeline_tx_pmds: Option<u16>,
    /// How source queues not pinned are spread over the PMDs.
    #[serde(default)]
    rxq_assign: RxqAssign,
    /// "auto": lock a destination queue only when several PMDs may write it; "always": lock
    /// every one (to measure what locking costs).
    #[serde(default)]
    tx_queue_locking: Locking,
    /// Auto-rebalance (as OVS's pmd-auto-lb), off by default.
    #[serde(default)]
    auto_lb: bool,
    /// Busy percent of the busiest PMD above which a rebalance is considered.
    auto_lb_load_threshold: Option<u32>,
    /// Percent by which a rebalance must lower the busiest PMD's load.
    auto_lb_improvement: Option<u32>,
    /// Seconds between rebalances, at most one per interval.
    auto_lb_interval: Option<u64>,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum ModelName {
    #[default]
    Rtc,
    Adaptive,
    Pipeline,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Locking {
    #[default]
    Auto,
    Always,
}

#[derive(Debug, Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "lowercase")]
enum RxqAssign {
    #[default]
    Roundrobin,
    Cycles,
}

/// No hugepage files or shared config left behind, and a runtime directory of our own.
pub const DEFAULT_EAL_ARGS: &[&str] = &["--in-memory", "--file-prefix=ringswitch"];

fn default_ctl() -> PathBuf {
    PathBuf::from("/run/ringswitch/ctl.sock")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSection {
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
fn resolve_id(spec: &str, group: bool) -> Option<u32> {
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

fn one() -> u16 {
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

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub pmd_cores: Vec<usize>,
    pub model: Model,
    pub always_lock: bool,
    pub rxq_assign: Assign,
    pub auto_lb: Option<AutoLb>,
    pub control_socket: PathBuf,
    /// Mode and group of the control socket (`control_socket_mode`, `control_socket_group`).
    pub control_perm: SocketPerm,
    pub eal_args: Vec<String>,
    pub ports: Vec<PortConfig>,
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

/// Adaptive model: idle time before a PMD sleeps, unless the config says otherwise.
pub const DEFAULT_ADAPTIVE_IDLE_US: u32 = 200;

/// Descriptors per DPDK queue unless the port file says otherwise.
pub const DEFAULT_DPDK_DESC: u16 = 1024;
/// Largest MTU a DPDK port may be given: its frames must fit one mbuf.
pub const MAX_DPDK_MTU: u16 = 9600;

/// Most queue pairs a vhost-user port may ask for (as DPDK's VHOST_MAX_QUEUE_PAIRS).
pub const MAX_QUEUE_PAIRS: u16 = 128;

fn parse<T: serde::de::DeserializeOwned>(file: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_owned(),
        source,
    })?;
    parse_text(file, &text)
}

/// `text`, the contents of `file` (which is only named, not read).
fn parse_text<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        file: file.to_owned(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let main: MainFile = parse(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut ports: Vec<(PortSection, PathBuf)> = main
            .port
            .into_iter()
            .map(|p| (p, path.to_owned()))
            .collect();

        let dir = match &main.dataplane.ports_dir {
            Some(d) => Some(base.join(d)),
            None => Some(base.join("ports.d")).filter(|d| d.is_dir()),
        };
        if let Some(dir) = dir {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|source| ConfigError::Read {
                    file: dir.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            files.sort();
            for f in files {
                ports.push((parse(&f)?, f));
            }
        }
        validate(main.dataplane, ports, path)
    }
}

fn validate(
    dp: DataplaneSection,
    ports: Vec<(PortSection, PathBuf)>,
    main_file: &Path,
) -> Result<Config, ConfigError> {
    let invalid = ConfigError::invalid;
    // Cores online, not the ones this process may run on: the PMD pins itself.
    // SAFETY: sysconf has no preconditions.
    let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    if dp.pmd_cores.is_empty() {
        return Err(invalid(
            main_file,
            "dataplane.pmd_cores",
            "needs at least one core".into(),
        ));
    }
    if let Some(&c) = dp.pmd_cores.iter().find(|&&c| c >= ncpu) {
        return Err(invalid(
            main_file,
            "dataplane.pmd_cores",
            format!(
                "core {c} does not exist (this machine has cores 0..{})",
                ncpu - 1
            ),
        ));
    }
    if let Some(c) = dp
        .pmd_cores
        .iter()
        .enumerate()
        .find_map(|(i, c)| dp.pmd_cores[..i].contains(c).then_some(c))
    {
        return Err(invalid(
            main_file,
            "dataplane.pmd_cores",
            format!("core {c} is listed twice"),
        ));
    }
    let percent = |key: &str, v: Option<u32>, default: u32| match v {
        Some(n) if !(1..=100).contains(&n) => Err(invalid(
            main_file,
            key,
            format!("{n}: must be a percentage, 1..=100"),
        )),
        v => Ok(v.unwrap_or(default)),
    };
    let lb = AutoLb {
        load_threshold: percent(
            "dataplane.auto_lb_load_threshold",
            dp.auto_lb_load_threshold,
            95,
        )?,
        improvement: percent("dataplane.auto_lb_improvement", dp.auto_lb_improvement, 25)?,
        interval: Duration::from_secs(match dp.auto_lb_interval {
            Some(0) => {
                return Err(invalid(
                    main_file,
                    "dataplane.auto_lb_interval",
                    "must be at least 1 (seconds)".into(),
                ))
            }
            v => v.unwrap_or(60),
        }),
    };
    let model = match dp.model {
        ModelName::Rtc => Model::Rtc,
        ModelName::Adaptive => Model::Adaptive {
            idle_us: match dp.adaptive_idle_us {
                Some(n) if !(1..=1_000_000).contains(&n) => {
                    return Err(invalid(
                        main_file,
                        "dataplane.adaptive_idle_us",
                        format!("{n}: must be 1..=1000000 (microseconds)"),
                    ))
                }
                v => v.unwrap_or(DEFAULT_ADAPTIVE_IDLE_US),
            },
        },
        ModelName::Pipeline => {
            let tx_pmds = dp.pipeline_tx_pmds.unwrap_or(1);
            if tx_pmds == 0 || tx_pmds as usize >= dp.pmd_cores.len() {
                return Err(invalid(
                    main_file,
                    "dataplane.pipeline_tx_pmds",
                    format!(
                        "{tx_pmds} tx PMDs of {}: the pipeline needs at least one PMD of each kind (list 2 or more pmd_cores)",
                        dp.pmd_cores.len()
                    ),
                ));
            }
            Model::Pipeline { tx_pmds }
        }
    };
    if dp.pipeline_tx_pmds.is_some() && dp.model != ModelName::Pipeline {
        return Err(invalid(
            main_file,
            "dataplane.pipeline_tx_pmds",
            "applies only to model = \"pipeline\"".into(),
        ));
    }
    if dp.adaptive_idle_us.is_some() && dp.model != ModelName::Adaptive {
        return Err(invalid(
            main_file,
            "dataplane.adaptive_idle_us",
            "applies only to model = \"adaptive\"".into(),
        ));
    }
    let mut set = PortSet::default();
    let mut out = Vec::new();
    for (p, file) in ports {
        let pc = validate_port(p, file)?;
        check_affinity(&pc, &dp.pmd_cores)?;
        set.insert(&pc)?;
        out.push(pc);
    }
    if out.len() > dataplane::MAX_PORTS {
        return Err(invalid(
            main_file,
            "port",
            format!("more than {} ports", dataplane::MAX_PORTS),
        ));
    }
    Ok(Config {
        model,
        always_lock: dp.tx_queue_locking == Locking::Always,
        rxq_assign: match dp.rxq_assign {
            RxqAssign::Roundrobin => Assign::RoundRobin,
            RxqAssign::Cycles => Assign::Cycles,
        },
        auto_lb: dp.auto_lb.then_some(lb),
        pmd_cores: dp.pmd_cores,
        control_perm: perm_from(
            main_file,
            "control_socket",
            dp.control_socket_mode.as_deref(),
            None,
            dp.control_socket_group.as_deref(),
        )?,
        control_socket: dp.control_socket,
        eal_args: dp
            .eal_args
            .unwrap_or_else(|| DEFAULT_EAL_ARGS.iter().map(|a| a.to_string()).collect()),
        ports: out,
    })
}

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

fn validate_port(p: PortSection, file: PathBuf) -> Result<PortConfig, ConfigError> {
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
fn socket_perm(p: &PortSection, file: &Path) -> Result<SocketPerm, ConfigError> {
    perm_from(
        file,
        "socket",
        p.socket_mode.as_deref(),
        p.socket_owner.as_deref(),
        p.socket_group.as_deref(),
    )
}

/// A socket's permissions from the keys `{prefix}_mode`, `_owner` and `_group`.
fn perm_from(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A fresh directory for one test's files, removed when the test ends.
    struct TmpDir(PathBuf);

    impl std::ops::Deref for TmpDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmpdir(tag: &str) -> TmpDir {
        let d = std::env::temp_dir().join(format!("rs-cfg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TmpDir(d)
    }

    #[test]
    fn main_file_plus_port_files() {
        let d = tmpdir("ok");
        let main = write(&d, "main.toml", "[dataplane]\npmd_cores = [0]\ncontrol_socket = \"/tmp/x.sock\"\n[[port]]\nname = \"a\"\ntype = \"vhost-user\"\nsocket = \"/tmp/a.sock\"\n");
        write(&d, "ports.d/b.toml", "name = \"b\"\ntype = \"vhost-user\"\nmode = \"client\"\nsocket = \"/tmp/b.sock\"\nqueues = 2\n");
        let c = Config::load(&main).unwrap();
        assert_eq!(c.ports.len(), 2);
        assert!(matches!(
            c.ports[1].kind,
            PortKind::VhostUser {
                mode: VhostMode::Client,
                ..
            }
        ));
        assert_eq!(c.ports[1].queues, 2);
        assert!(c.ports[1].file.ends_with("ports.d/b.toml"));
    }

    #[test]
    fn socket_permissions() {
        let d = tmpdir("perm");
        let main = write(&d, "main.toml", "[dataplane]\npmd_cores = [0]\n");
        let port = |extra: &str| {
            write(
                &d,
                "ports.d/p.toml",
                &format!("name = \"p\"\ntype = \"vhost-user\"\nsocket = \"/tmp/p.sock\"\n{extra}"),
            );
            Config::load(&main)
        };
        let c = port("").unwrap();
        let perm = |c: &Config| match c.ports[0].kind {
            PortKind::VhostUser { socket_perm, .. } => socket_perm,
            _ => panic!("not vhost-user"),
        };
        assert_eq!(perm(&c), SocketPerm::default());
        let c = port("socket_mode = \"0600\"\nsocket_owner = \"root\"\nsocket_group = \"0\"\n")
            .unwrap();
        assert_eq!(
            perm(&c),
            SocketPerm {
                mode: 0o600,
                uid: Some(0),
                gid: Some(0)
            }
        );
        for (extra, key) in [
            ("socket_mode = \"rw-\"\n", "socket_mode"),
            ("socket_mode = \"1777\"\n", "socket_mode"),
            ("socket_owner = \"no-such-user-rs\"\n", "socket_owner"),
            ("socket_group = \"no-such-group-rs\"\n", "socket_group"),
        ] {
            let e = port(extra).unwrap_err().to_string();
            assert!(e.contains("p.toml") && e.contains(key), "{e}");
        }
    }

    #[test]
    fn dpdk_and_tap_ports() {
        let d = tmpdir("dev");
        let main = write(
            &d,
            "main.toml",
            "[dataplane]\npmd_cores = [0]\neal_args = [\"--no-huge\"]\n",
        );
        write(&d, "ports.d/a.toml", "name = \"up\"\ntype = \"dpdk\"\ndevargs = \"net_af_packet0,iface=veth1\"\nqueues = 2\nmtu = 9000\nrx_descriptors = 512\n");
        write(
            &d,
            "ports.d/b.toml",
            "name = \"host\"\ntype = \"tap\"\nifname = \"rs-host\"\n",
        );
        let c = Config::load(&main).unwrap();
        assert_eq!(c.eal_args, ["--no-huge"]);
        match &c.ports[0].kind {
            PortKind::Dpdk {
                devargs,
                mtu,
                rx_desc,
                tx_desc,
            } => {
                assert_eq!(devargs, "net_af_packet0,iface=veth1");
                assert_eq!(
                    (*mtu, *rx_desc, *tx_desc),
                    (Some(9000), 512, DEFAULT_DPDK_DESC)
                );
            }
            k => panic!("{k:?}"),
        }
        assert!(matches!(&c.ports[1].kind, PortKind::Tap { ifname } if ifname == "rs-host"));

        for (file, text, key) in [
            ("a.toml", "name = \"up\"\ntype = \"dpdk\"\n", "devargs"),
            (
                "a.toml",
                "name = \"up\"\ntype = \"dpdk\"\ndevargs = \"net_null0\"\nsocket = \"/tmp/s\"\n",
                "socket",
            ),
            (
                "a.toml",
                "name = \"up\"\ntype = \"dpdk\"\ndevargs = \"net_null0\"\nmtu = 20000\n",
                "mtu",
            ),
            (
                "a.toml",
                "name = \"up\"\ntype = \"dpdk\"\ndevargs = \"net_null0\"\ntx_descriptors = 1000\n",
                "tx_descriptors",
            ),
            (
                "a.toml",
                "name = \"up\"\ntype = \"dpdk\"\ndevargs = \"net_null0,size=64\"\n",
                "",
            ),
            (
                "a.toml",
                "name = \"up\"\ntype = \"tap\"\nifname = \"a-name-far-too-long\"\n",
                "ifname",
            ),
            (
                "a.toml",
                "name = \"up\"\ntype = \"tap\"\nifname = \"rs-host\"\n",
                "b.toml: ifname",
            ),
            (
                "b.toml",
                "name = \"host\"\ntype = \"vhost-user\"\nsocket = \"/tmp/h\"\nifname = \"x\"\n",
                "ifname",
            ),
        ] {
            write(&d, &format!("ports.d/{file}"), text);
            let r = Config::load(&main);
            if key.is_empty() {
                r.unwrap();
                continue;
            }
            let e = r.unwrap_err().to_string();
            assert!(e.contains(".toml: ") && e.contains(key), "{e}");
        }
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let d = tmpdir("bad");
        let main = write(&d, "main.toml", "[dataplane]\npmd_cores = [0]\n");
        write(
            &d,
            "ports.d/b.toml",
            "name = \"b\"\ntype = \"vhost-user\"\nsocket = \"/tmp/b.sock\"\nqueus = 2\n",
        );
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(
            e.contains("b.toml") && e.contains("line 4") && e.contains("queus"),
            "{e}"
        );

        write(
            &d,
            "ports.d/b.toml",
            "name = \"b\"\ntype = \"vhost-user\"\nsocket = \"/tmp/b.sock\"\nqueues = 0\n",
        );
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(e.contains("b.toml") && e.contains("queues"), "{e}");

        write(
            &d,
            "ports.d/b.toml",
            "name = \"b\"\ntype = \"vhost-user\"\nsocket = \"/tmp/b.sock\"\n",
        );
        write(
            &d,
            "ports.d/c.toml",
            "name = \"c\"\ntype = \"vhost-user\"\nsocket = \"/tmp/b.sock\"\n",
        );
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("socket"), "{e}");

        let main = write(&d, "main2.toml", "[dataplane]\npmd_cores = [4096]\n");
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(
            e.contains("pmd_cores") && e.contains("does not exist"),
            "{e}"
        );
    }

    #[test]
    fn threading_keys() {
        let d = tmpdir("threads");
        let load = |dataplane: &str, port: &str| {
            let main = write(
                &d,
                "main.toml",
                &format!("[dataplane]\n{dataplane}\n[[port]]\nname = \"a\"\ntype = \"vhost-user\"\nsocket = \"/tmp/a.sock\"\nqueues = 2\n{port}"),
            );
            Config::load(&main).map_err(|e| e.to_string())
        };
        let c = load(
            "pmd_cores = [0, 1]\nmodel = \"adaptive\"\nadaptive_idle_us = 50\nrxq_assign = \"cycles\"\nauto_lb = true\nauto_lb_interval = 5",
            "pmd_rxq_affinity = [1, 0]",
        )
        .unwrap();
        assert_eq!(c.model, Model::Adaptive { idle_us: 50 });
        assert_eq!(c.rxq_assign, Assign::Cycles);
        let lb = c.auto_lb.unwrap();
        assert_eq!(
            (lb.load_threshold, lb.improvement, lb.interval),
            (95, 25, Duration::from_secs(5))
        );
        assert_eq!(c.ports[0].rxq_affinity, [1, 0]);
        assert_eq!(load("pmd_cores = [0]", "").unwrap().model, Model::Rtc);
        assert_eq!(
            load("pmd_cores = [0, 1]\nmodel = \"pipeline\"", "")
                .unwrap()
                .model,
            Model::Pipeline { tx_pmds: 1 }
        );
        for (dataplane, port, want) in [
            ("pmd_cores = [0, 0]", "", "listed twice"),
            (
                "pmd_cores = [0]\nmodel = \"pipeline\"",
                "",
                "at least one PMD of each kind",
            ),
            ("pmd_cores = [0]\npipeline_tx_pmds = 1", "", "applies only"),
            (
                "pmd_cores = [0]\nmodel = \"rtc\"\nadaptive_idle_us = 5",
                "",
                "adaptive_idle_us",
            ),
            (
                "pmd_cores = [0]\nauto_lb_load_threshold = 150",
                "",
                "percentage",
            ),
            (
                "pmd_cores = [0]",
                "pmd_rxq_affinity = [1]",
                "core 1 runs no PMD",
            ),
            (
                "pmd_cores = [0]",
                "pmd_rxq_affinity = [0, 0, 0]",
                "one core per queue",
            ),
        ] {
            let e = load(dataplane, port).unwrap_err();
            assert!(e.contains(want), "{dataplane} / {port}: {e}");
        }
    }
}
