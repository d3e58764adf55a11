//! Test harness: the real `ringswitch` binary and real DPDK testpmd guests (virtio-user), each
//! bounded by `timeout` and stopped by PID when the test ends. Needs root, hugepages and
//! `dpdk-testpmd` (scripts/test installs them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What an integration test needs of the machine beyond a Rust toolchain.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// Root: tap devices, network namespaces, hugepage files.
    Root,
    /// 2 MiB hugepages reserved (testpmd's memory, hugetlbfs guest memory).
    Hugepages,
    /// DPDK's testpmd (the guests and vdevs of most tests; also means ringswitch has DPDK).
    Testpmd,
    /// QEMU (or root and apt-get, with which scripts/guest-image installs it).
    Qemu,
}

impl Need {
    /// Why this machine lacks it, if it does.
    fn missing(self) -> Option<&'static str> {
        let on_path = |cmd: &str| {
            Command::new("sh")
                .args(["-c", &format!("command -v {cmd}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let ok = match self {
            Need::Root => root,
            Need::Hugepages => std::fs::read_to_string("/proc/meminfo").is_ok_and(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("HugePages_Total:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
            }),
            Need::Testpmd => on_path("dpdk-testpmd"),
            // scripts/guest-image installs QEMU 10 where apt can (as CI's fresh box does).
            Need::Qemu => on_path("qemu-system-x86_64") || (root && on_path("apt-get")),
        };
        (!ok).then_some(match self {
            Need::Root => "root",
            Need::Hugepages => {
                "2 MiB hugepages reserved (../shared/lab/hugepages.sh, or ./scripts/setup)"
            }
            Need::Testpmd => "dpdk-testpmd (Debian's dpdk package; ./scripts/setup installs it)",
            Need::Qemu => "qemu-system-x86_64, or root and apt-get to install it",
        })
    }
}

/// Whether the machine has everything in `needs`. If not, the test says what it misses and
/// should return (`if !rig(...) { return; }`): a contributor's `cargo test` without the rig
/// runs what it can. Under RS_REQUIRE_RIG (set by ./scripts/test, so in CI) a missing piece
/// fails the test instead.
pub fn rig(needs: &[Need]) -> bool {
    let missing: Vec<&str> = needs.iter().filter_map(|n| n.missing()).collect();
    if missing.is_empty() {
        return true;
    }
    let name = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    let why = format!("{name} needs the test rig: {}", missing.join(", "));
    assert!(std::env::var_os("RS_REQUIRE_RIG").is_none(), "{why}");
    // Straight to stderr: libtest would swallow an `eprintln!` of a test that passes.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {why}");
    false
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = PathBuf::from(format!("/tmp/rs-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A test's own directory (for tests without a `Switch`, which owns one): removed when the
/// test passes, left to look at when it fails, as a `Switch`'s.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        TestDir(tmpdir(tag))
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `[[port]]` tables for `n` vhost-user server ports p0, p1, … with sockets in the test's dir.
pub fn vhost_ports(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!("[[port]]\nname = \"p{i}\"\ntype = \"vhost-user\"\nsocket = \"{{dir}}/p{i}.sock\"\n")
        })
        .collect()
}

/// EAL arguments for tests: no hugepages (the vdevs used need none), nothing shared on disk.
pub const TEST_EAL_ARGS: &str =
    r#"eal_args = ["--no-huge", "-m", "256", "--no-shconf", "--no-telemetry", "--no-pci"]"#;

/// Every `drop_*` counter of one side (`from_port`, `to_port`) of a port in `ctl stats --json`.
pub fn drop_sum(port: &Value, side: &str) -> u64 {
    port[side]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("drop_"))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum()
}

pub struct Switch {
    child: Child,
    pub dir: PathBuf,
}

impl Switch {
    /// Start ringswitch with `ports` vhost-user server ports named p0, p1, … (PMD on CPU 1).
    pub fn start(tag: &str, ports: usize) -> Switch {
        Switch::with_config(tag, "", &vhost_ports(ports))
    }

    /// Start ringswitch (PMD on CPU 1 unless `dataplane` names `pmd_cores`) with `dataplane`
    /// lines added to `[dataplane]` and the `ports` tables; `{dir}` in either stands for the
    /// test's directory.
    pub fn with_config(tag: &str, dataplane: &str, ports: &str) -> Switch {
        Switch::wrapped(tag, dataplane, ports, &[])
    }

    /// As `with_config`, the binary started by the command `wrap` (e.g. `prlimit ...`).
    pub fn wrapped(tag: &str, dataplane: &str, ports: &str, wrap: &[&str]) -> Switch {
        let dir = tmpdir(tag);
        let d = dir.display().to_string();
        let pmd = match dataplane.contains("pmd_cores") {
            true => "",
            false => "pmd_cores = [1]\n",
        };
        let cfg = format!(
            "[dataplane]\n{pmd}control_socket = \"{d}/ctl.sock\"\n{}\n{}",
            dataplane.replace("{dir}", &d),
            ports.replace("{dir}", &d)
        );
        std::fs::write(dir.join("main.toml"), cfg).unwrap();
        let log = std::fs::File::create(dir.join("ringswitch.log")).unwrap();
        let child = Command::new("timeout")
            .args(["-s", "TERM", "300"])
            .args(wrap)
            .args([env!("CARGO_BIN_EXE_ringswitch"), "--config"])
            .arg(dir.join("main.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let sw = Switch { child, dir };
        let ctl = sw.dir.join("ctl.sock");
        wait_for("ringswitch control socket", Duration::from_secs(10), || {
            ctl.exists()
        });
        sw
    }

    pub fn sock(&self, port: usize) -> PathBuf {
        self.dir.join(format!("p{port}.sock"))
    }

    fn ctl_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_ringswitch"))
            .args(["ctl", "--socket"])
            .arg(self.dir.join("ctl.sock"))
            .args(args)
            .output()
            .unwrap()
    }

    /// `ringswitch ctl ARGS`, which must succeed; its output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.ctl_output(args);
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ringswitch ctl ARGS`, which must fail; its error message.
    pub fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl_output(args);
        assert!(!out.status.success(), "ctl {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// SIGKILL: the switch vanishes without closing anything itself.
    pub fn kill(&mut self) {
        // The child is `timeout`; the switch is its child.
        let _ = Command::new("pkill")
            .args(["-KILL", "-P"])
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stats(&self) -> Value {
        serde_json::from_str(&self.ctl(&["stats", "--json"])).unwrap()
    }

    pub fn port(&self, stats: &Value, port: usize) -> Value {
        stats["ports"][port].clone()
    }

    /// The switch's own PID (the child is `timeout`; a wrapper such as prlimit execs it).
    pub fn pid(&self) -> u32 {
        let me = self.child.id();
        let kids = std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")).unwrap();
        kids.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// How many fds the switch holds open.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// How many mappings of frontends' memory the switch has (memfds and hugetlbfs files;
    /// not its own: thread stacks come and go with glibc's stack cache).
    pub fn map_count(&self) -> usize {
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))
            .unwrap()
            .lines()
            .filter(|l| l.contains("memfd:") || l.contains("/dev/hugepages/"))
            .count()
    }

    /// `ctl stats --json`, which must answer within a second.
    pub fn stats_within_1s(&self) -> Value {
        let t = std::time::Instant::now();
        let s = self.stats();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "ctl took {:?}",
            t.elapsed()
        );
        s
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn wait_connected(&self, port: usize, want: bool) {
        wait_for("port connection state", Duration::from_secs(10), || {
            self.stats()["ports"][port]["connected"] == want
        });
    }

    /// Every frame a guest sent is forwarded or counted as dropped for a reason.
    pub fn check_accounting(&self) {
        let s = self.stats();
        for p in s["ports"].as_array().unwrap() {
            let t = &p["from_port"];
            let n = |k: &str| t[k].as_u64().unwrap();
            let drops = drop_sum(p, "from_port");
            assert_eq!(
                n("packets"),
                n("forwarded") + drops,
                "accounting of port {}",
                p["name"]
            );
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ringswitch.log")).unwrap_or_default()
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        // Signal by PID, then reap.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        // A failed test leaves its directory (config, logs) to look at; a passed one, nothing.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub struct Testpmd {
    child: Option<Child>,
    prefix: String,
    pub log: PathBuf,
}

impl Testpmd {
    /// A testpmd guest on CPU 0 with the given EAL vdevs and testpmd arguments.
    pub fn start(dir: &Path, name: &str, vdevs: &[String], args: &[&str]) -> Testpmd {
        assert!(
            Command::new("dpdk-testpmd")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "dpdk-testpmd not found: run ./scripts/test, which installs it"
        );
        let prefix = format!("rsit{}{name}", std::process::id());
        let log = dir.join(format!("testpmd-{name}.log"));
        let mut cmd = Command::new("timeout");
        cmd.args([
            "-s",
            "INT",
            "120",
            "dpdk-testpmd",
            "--lcores",
            "0@0,1@0",
            "--no-pci",
            "-m",
            "256",
            "--single-file-segments",
        ])
        .arg(format!("--file-prefix={prefix}"));
        for v in vdevs {
            cmd.arg("--vdev").arg(v);
        }
        cmd.arg("--")
            .args(["--nb-cores=1", "--stats-period", "1"])
            .args(args);
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Testpmd {
            child: Some(child),
            prefix,
            log,
        }
    }

    /// A guest with one virtio-user port on switch port `port`, forwarding in `mode`
    /// (txonly, rxonly, …) from the start; returns once the switch sees it connected.
    pub fn on_port(sw: &Switch, name: &str, port: usize, mode: &str) -> Testpmd {
        let g = Testpmd::start(
            &sw.dir,
            name,
            &[Testpmd::virtio(0, &sw.sock(port))],
            &[&format!("--forward-mode={mode}"), "--auto-start"],
        );
        sw.wait_connected(port, true);
        g
    }

    /// One guest whose two virtio-user ports sit on switch ports 0 and 1, forwarding io between
    /// them with `bursts` bursts of 32 frames circulating (`start tx_first N`); returns once
    /// it reports traffic.
    pub fn io_loop(sw: &Switch, name: &str, bursts: u32) -> Testpmd {
        let cmd = sw.dir.join(format!("{name}.cmd"));
        std::fs::write(&cmd, format!("start tx_first {bursts}\n")).unwrap();
        let g = Testpmd::start(
            &sw.dir,
            name,
            &[
                Testpmd::virtio(0, &sw.sock(0)),
                Testpmd::virtio(1, &sw.sock(1)),
            ],
            &[
                "--forward-mode=io",
                &format!("--cmdline-file={}", cmd.display()),
            ],
        );
        g.wait_output("Rx-pps", Duration::from_secs(20));
        g
    }

    pub fn virtio(idx: usize, sock: &Path) -> String {
        format!("net_virtio_user{idx},path={},queues=1", sock.display())
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the guest printed `needle` (e.g. its first stats period).
    pub fn wait_output(&self, needle: &str, timeout: Duration) {
        wait_for(needle, timeout, || self.output().contains(needle));
    }

    /// SIGINT (testpmd prints its final statistics) and wait; returns the whole log.
    pub fn stop(&mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(c.id().to_string())
                .status();
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.cleanup_hugepages();
        self.output()
    }

    /// SIGKILL: a guest that vanishes mid-traffic.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_under_timeout(&mut c);
        }
        self.cleanup_hugepages();
    }

    fn cleanup_hugepages(&self) {
        if let Ok(rd) = std::fs::read_dir("/dev/hugepages") {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILL a peer started as `timeout … PROGRAM` and the program itself (`timeout` forwards
/// only some signals), then reap it.
pub fn kill_under_timeout(c: &mut Child) {
    let _ = Command::new("pkill")
        .args(["-KILL", "-P"])
        .arg(c.id().to_string())
        .status();
    let _ = c.kill();
    let _ = c.wait();
}

/// RX-packets of `port` in testpmd's final "Forward statistics for port N" block.
pub fn final_rx_packets(log: &str, port: usize) -> u64 {
    final_count(log, port, "RX-packets:")
}

/// TX-packets of `port` in testpmd's final "Forward statistics for port N" block.
pub fn final_tx_packets(log: &str, port: usize) -> u64 {
    final_count(log, port, "TX-packets:")
}

fn final_count(log: &str, port: usize, key: &str) -> u64 {
    let marker = format!("Forward statistics for port {port}");
    let block = log
        .rsplit(&marker)
        .next()
        .filter(|_| log.contains(&marker))
        .unwrap_or_else(|| panic!("no final stats for port {port} in:\n{log}"));
    let after = block.split(key).nth(1).expect(key);
    after.split_whitespace().next().unwrap().parse().unwrap()
}

/// Per-period Rx-pps of every port summed, in print order (testpmd --stats-period).
pub fn rx_pps_periods(log: &str, ports: usize) -> Vec<u64> {
    let vals: Vec<u64> = log
        .split("Rx-pps:")
        .skip(1)
        .map(|s| {
            s.split_whitespace()
                .next()
                .unwrap_or("0")
                .parse()
                .unwrap_or(0)
        })
        .collect();
    vals.chunks(ports)
        .filter(|c| c.len() == ports)
        .map(|c| c.iter().sum())
        .collect()
}

/// Run this thread on CPU 0 (a traffic source busy-polls like a guest: away from the PMD on
/// CPU 1).
pub fn run_on_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one bit set, passed with its size, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
}
