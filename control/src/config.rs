//! Configuration: a main TOML file (`[dataplane]`, optional inline `[[port]]`s) and one TOML
//! file per port in a `ports.d/` folder beside it. Parsed with unknown keys refused, then
//! validated into a `Config`. Runs on the control thread at start-up only.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

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
    /// Folder of per-port files, relative to the main file. Default: `ports.d` if it exists.
    ports_dir: Option<PathBuf>,
}

fn default_ctl() -> PathBuf {
    PathBuf::from("/run/ringswitch/ctl.sock")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSection {
    name: String,
    #[serde(rename = "type")]
    kind: PortKind,
    #[serde(default)]
    mode: VhostMode,
    socket: PathBuf,
    #[serde(default = "one")]
    queues: u16,
    /// Server mode: permissions of the socket file, octal (default "0660").
    socket_mode: Option<String>,
    /// Server mode: owner and group of the socket file, by name or number (default: unchanged).
    socket_owner: Option<String>,
    socket_group: Option<String>,
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

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PortKind {
    VhostUser,
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
    pub control_socket: PathBuf,
    pub ports: Vec<PortConfig>,
}

#[derive(Debug, Clone)]
pub struct PortConfig {
    pub name: String,
    pub kind: PortKind,
    pub mode: VhostMode,
    pub socket: PathBuf,
    pub queues: u16,
    pub socket_perm: SocketPerm,
    /// The file it came from, for error messages.
    pub file: PathBuf,
}

/// Most queue pairs a vhost-user port may ask for (as DPDK's VHOST_MAX_QUEUE_PAIRS).
pub const MAX_QUEUE_PAIRS: u16 = 128;

fn parse<T: serde::de::DeserializeOwned>(file: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
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
    let invalid = |file: &Path, key: &str, message: String| ConfigError::Invalid {
        file: file.to_owned(),
        key: key.to_owned(),
        message,
    };
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
    if dp.pmd_cores.len() > 1 {
        return Err(invalid(
            main_file,
            "dataplane.pmd_cores",
            "only one PMD core is supported so far (rx-queue scheduling over several PMDs is not built yet)".into(),
        ));
    }
    let mut names = HashSet::new();
    let mut sockets = HashSet::new();
    let mut out = Vec::new();
    for (p, file) in ports {
        if p.name.is_empty() || p.name.len() > 64 || p.name.chars().any(|c| c.is_whitespace()) {
            return Err(invalid(
                &file,
                "name",
                format!("{:?} is not a valid port name", p.name),
            ));
        }
        if !names.insert(p.name.clone()) {
            return Err(invalid(
                &file,
                "name",
                format!("port {:?} is defined twice", p.name),
            ));
        }
        if !sockets.insert(p.socket.clone()) {
            return Err(invalid(
                &file,
                "socket",
                format!("{} is used by two ports", p.socket.display()),
            ));
        }
        if p.queues == 0 || p.queues > MAX_QUEUE_PAIRS {
            return Err(invalid(
                &file,
                "queues",
                format!("{} queue pairs: must be 1..={MAX_QUEUE_PAIRS}", p.queues),
            ));
        }
        let mut perm = SocketPerm::default();
        if let Some(m) = &p.socket_mode {
            perm.mode = u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|&m| m <= 0o777)
                .ok_or_else(|| {
                    invalid(
                        &file,
                        "socket_mode",
                        format!("{m:?} is not an octal mode like \"0660\""),
                    )
                })?;
        }
        if let Some(o) = &p.socket_owner {
            perm.uid = Some(
                resolve_id(o, false)
                    .ok_or_else(|| invalid(&file, "socket_owner", format!("no user {o:?}")))?,
            );
        }
        if let Some(g) = &p.socket_group {
            perm.gid = Some(
                resolve_id(g, true)
                    .ok_or_else(|| invalid(&file, "socket_group", format!("no group {g:?}")))?,
            );
        }
        out.push(PortConfig {
            name: p.name,
            kind: p.kind,
            mode: p.mode,
            socket: p.socket,
            queues: p.queues,
            socket_perm: perm,
            file,
        });
    }
    if out.len() > dataplane::pmd::MAX_PORTS {
        return Err(invalid(
            main_file,
            "port",
            format!("more than {} ports", dataplane::pmd::MAX_PORTS),
        ));
    }
    Ok(Config {
        pmd_cores: dp.pmd_cores,
        control_socket: dp.control_socket,
        ports: out,
    })
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

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rs-cfg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn main_file_plus_port_files() {
        let d = tmpdir("ok");
        let main = write(&d, "main.toml", "[dataplane]\npmd_cores = [0]\ncontrol_socket = \"/tmp/x.sock\"\n[[port]]\nname = \"a\"\ntype = \"vhost-user\"\nsocket = \"/tmp/a.sock\"\n");
        write(&d, "ports.d/b.toml", "name = \"b\"\ntype = \"vhost-user\"\nmode = \"client\"\nsocket = \"/tmp/b.sock\"\nqueues = 2\n");
        let c = Config::load(&main).unwrap();
        assert_eq!(c.ports.len(), 2);
        assert_eq!(c.ports[1].mode, VhostMode::Client);
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
        assert_eq!(c.ports[0].socket_perm, SocketPerm::default());
        let c = port("socket_mode = \"0600\"\nsocket_owner = \"root\"\nsocket_group = \"0\"\n")
            .unwrap();
        assert_eq!(
            c.ports[0].socket_perm,
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
}
