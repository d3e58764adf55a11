//! Configuration: a main TOML file (`[dataplane]`, optional inline `[[port]]`s) and one TOML
//! file per port in a `ports.d/` folder beside it. Parsed with unknown keys refused, then
//! validated into a `Config`. Runs on the control thread at start-up only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane::{Assign, AutoLb, Model};
use serde::Deserialize;

mod port;

pub use port::{
    check_affinity, port_from_text, PortConfig, PortKind, PortSet, PortType, SocketPerm, VhostMode,
    DEFAULT_DPDK_DESC, MAX_DPDK_MTU, MAX_QUEUE_PAIRS,
};
use port::{perm_from, validate_port, PortSection};

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

/// Adaptive model: idle time before a PMD sleeps, unless the config says otherwise.
pub const DEFAULT_ADAPTIVE_IDLE_US: u32 = 200;

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
                .map_err(|source| match main.dataplane.ports_dir {
                    // A directory the main file names: the error says where it was named.
                    Some(_) => ConfigError::invalid(
                        path,
                        "dataplane.ports_dir",
                        format!("{}: cannot read: {source}", dir.display()),
                    ),
                    None => ConfigError::Read {
                        file: dir.clone(),
                        source,
                    },
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

    /// Found by the config fuzz target: a `ports_dir` that cannot be read was reported as
    /// "DIR: cannot read", naming neither the file nor the key that set it.
    #[test]
    fn an_unreadable_ports_dir_is_the_main_files_error() {
        let d = tmpdir("portsdir");
        let main = write(
            &d,
            "main.toml",
            "[dataplane]\npmd_cores = [1]\nports_dir = \"/nonexistent-rs\"\n",
        );
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}: dataplane.ports_dir: /nonexistent-rs: cannot read",
                main.display()
            )),
            "{e}"
        );
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
