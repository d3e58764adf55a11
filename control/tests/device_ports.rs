//! Integration tests of device ports with real kernel and DPDK peers: a tap port and a DPDK
//! net_af_packet port on a veth, each wired into its own network namespace; a testpmd guest
//! sending into a DPDK net_null port; and device ports that cannot start (bad devargs, an EAL
//! that cannot get its memory) while the other ports carry traffic.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces and a veth pair, removed on drop (also when the test fails).
struct Netns {
    ns: [String; 2],
    veth: String,
}

impl Netns {
    fn new(tag: u32) -> Netns {
        let n = Netns {
            ns: [format!("rs-a{tag}"), format!("rs-b{tag}")],
            veth: format!("rsv{tag}"),
        };
        n.remove();
        for ns in &n.ns {
            sh(&["ip", "netns", "add", ns]);
        }
        n
    }

    fn exec(&self, ns: usize, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["60", "ip", "netns", "exec", &self.ns[ns]])
            .args(args);
        c
    }

    fn remove(&self) {
        for ns in &self.ns {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A TCP transfer of N random bytes, checked by SHA-256 on both ends (python3, stdlib only).
const TCP_PY: &str = r#"
import hashlib, os, socket, sys
if sys.argv[1] == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(1); s.settimeout(30)
    print("listening", flush=True)
    c, _ = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(65536)
        if not b: break
        h.update(b); n += len(b)
    print(n, h.hexdigest(), flush=True)
else:
    data = os.urandom(int(sys.argv[4]))
    c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=30)
    c.sendall(data); c.close()
    print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"#;

/// Namespace A reaches ringswitch through a `tap` port (the tap moved into A), namespace B
/// through a DPDK `net_af_packet` port on the root end of a veth whose other end is in B.
/// Ping and a checked TCP transfer go from A to B through the switch.
#[test]
fn netns_ping_and_tcp_through_tap_and_af_packet() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let tag = std::process::id() % 10_000;
    let net = Netns::new(tag);
    let (tap, veth, peer) = (format!("rst{tag}"), net.veth.clone(), format!("rsv{tag}p"));
    sh(&[
        "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer,
    ]);
    sh(&["ip", "link", "set", &peer, "netns", &net.ns[1]]);
    sh(&["ip", "link", "set", &veth, "up"]);
    // af_packet hands over what the kernel gives it: no segmentation or checksum offload on
    // the sending side, so every frame is a complete one.
    for args in [
        vec!["ip", "addr", "add", "10.77.0.2/24", "dev", &peer],
        vec!["ip", "link", "set", &peer, "up"],
        vec![
            "ethtool", "-K", &peer, "tso", "off", "gso", "off", "tx", "off",
        ],
    ] {
        assert!(
            net.exec(1, &args).output().unwrap().status.success(),
            "{args:?}"
        );
    }
    let sw = Switch::with_config(
        "netns",
        TEST_EAL_ARGS,
        &format!(
            "[[port]]\nname = \"host\"\ntype = \"tap\"\nifname = \"{tap}\"\n\
             [[port]]\nname = \"wire\"\ntype = \"dpdk\"\ndevargs = \"net_af_packet0,iface={veth}\"\n"
        ),
    );
    let s = sw.stats();
    for p in 0..2 {
        assert!(sw.port(&s, p)["error"].is_null(), "{}\n{}", s, sw.log());
    }
    sh(&["ip", "link", "set", &tap, "netns", &net.ns[0]]);
    for args in [
        vec!["ip", "addr", "add", "10.77.0.1/24", "dev", &tap],
        vec!["ip", "link", "set", &tap, "up"],
    ] {
        assert!(net.exec(0, &args).status().unwrap().success(), "{args:?}");
    }

    let ping = net
        .exec(0, &["ping", "-c", "5", "-i", "0.2", "-W", "2", "10.77.0.2"])
        .output()
        .unwrap();
    let ping_out = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && ping_out.contains(" 0% packet loss"),
        "ping A → B through ringswitch failed:\n{ping_out}\n{}",
        sw.log()
    );

    let py = sw.dir.join("tcp.py");
    std::fs::write(&py, TCP_PY).unwrap();
    let py = py.display().to_string();
    let server = net
        .exec(1, &["python3", &py, "server", "5201"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t = std::time::Instant::now();
    let client = net
        .exec(
            0,
            &["python3", &py, "client", "10.77.0.2", "5201", "20000000"],
        )
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let server = server.wait_with_output().unwrap();
    let (sent, got) = (
        String::from_utf8_lossy(&client.stdout).trim().to_string(),
        String::from_utf8_lossy(&server.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string(),
    );
    assert!(client.status.success(), "TCP client failed\n{}", sw.log());
    assert_eq!(got, sent, "bytes and SHA-256 at B vs what A sent");
    println!(
        "TCP A → B through tap + af_packet: 20 MB in {secs:.2} s ({:.0} Mbit/s)",
        160.0 / secs
    );

    let s = sw.stats();
    let (host, wire) = (sw.port(&s, 0), sw.port(&s, 1));
    let n = |p: &serde_json::Value, side: &str, k: &str| p[side][k].as_u64().unwrap();
    // 20 MB went A → B: the tap (TSO on) hands over TCP segments of up to 64 KiB, which the
    // af_packet port (no offloads) gets cut into ≤1500-byte frames with checksums filled in by
    // the switch; B's SHA-256 above says they were cut right.
    let host_frames = n(&host, "from_port", "forwarded");
    assert!(host_frames > 100, "{s}");
    assert!(n(&wire, "to_port", "packets") > 13_000, "{s}");
    assert!(
        n(&wire, "to_port", "sw_offload") > 13_000 - host_frames,
        "{s}"
    );
    assert!(
        n(&wire, "from_port", "forwarded") > 100,
        "ACKs B → A (how many depends on B's GRO and delayed ACKs): {s}"
    );
    sw.check_accounting();
}

/// A testpmd guest sends (txonly) into a vhost-user port; the switch floods to a DPDK
/// `net_null` port (no RX), and every count agrees: what the guest sent is what the switch
/// took, and what it forwarded is what the null port transmitted.
#[test]
fn testpmd_guest_into_net_null_counts_agree() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let sw = Switch::with_config(
        "null",
        TEST_EAL_ARGS,
        &(vhost_ports(1)
            + "[[port]]\nname = \"null\"\ntype = \"dpdk\"\ndevargs = \"net_null0,no-rx=1\"\n"),
    );
    let mut g = Testpmd::on_port(&sw, "tx", 0, "txonly");
    g.wait_output("Rx-pps", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(3));
    let sent = final_tx_packets(&g.stop(), 0);
    std::thread::sleep(Duration::from_millis(500));
    let s = sw.stats();
    let (guest, null) = (sw.port(&s, 0), sw.port(&s, 1));
    let n = |p: &serde_json::Value, side: &str, k: &str| p[side][k].as_u64().unwrap();
    assert!(sent > 100_000, "guest sent only {sent}");
    assert_eq!(
        n(&guest, "from_port", "packets"),
        sent,
        "switch took what the guest sent"
    );
    let drops_at_null: u64 = ["drop_too_big", "drop_no_mbuf", "drop_tx_full"]
        .iter()
        .map(|k| n(&null, "to_port", k))
        .sum();
    assert_eq!(
        n(&guest, "from_port", "forwarded"),
        n(&null, "to_port", "packets") + drops_at_null,
        "{s}"
    );
    assert!(n(&null, "to_port", "packets") > 0);
    assert_eq!(null["dpdk"]["link_up"], true);
    sw.check_accounting();
}

/// txonly guest on p0, rxonly guest on p1: frames arrive (the switch still works).
fn traffic_flows(sw: &Switch) {
    let mut b = Testpmd::on_port(sw, "rx", 1, "rxonly");
    let mut a = Testpmd::on_port(sw, "tx", 0, "txonly");
    a.wait_output("Rx-pps", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(2));
    a.stop();
    b.stop();
    let delivered = sw.port(&sw.stats(), 1)["to_port"]["packets"]
        .as_u64()
        .unwrap();
    assert!(delivered > 10_000, "p0 → p1 delivered only {delivered}");
    sw.check_accounting();
}

/// A DPDK port with bad devargs fails alone, with an error naming it; the good DPDK port and the
/// vhost-user ports run. Then an EAL that cannot get its memory (hugepages) fails every DPDK
/// port, by name, and the vhost-user ports still run.
#[test]
fn failed_dpdk_ports_are_named_and_the_others_run() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let ports = vhost_ports(2)
        + "[[port]]\nname = \"broken\"\ntype = \"dpdk\"\ndevargs = \"net_nosuchdriver0\"\n\
           [[port]]\nname = \"null\"\ntype = \"dpdk\"\ndevargs = \"net_null0,no-rx=1\"\n";
    let sw = Switch::with_config("baddev", TEST_EAL_ARGS, &ports);
    let s = sw.stats();
    let err = sw.port(&s, 2)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("port broken") && err.contains("net_nosuchdriver0"),
        "{err}"
    );
    assert!(sw.log().contains("port broken"), "{}", sw.log());
    assert!(sw.port(&s, 3)["error"].is_null(), "{s}");
    traffic_flows(&sw);
    drop(sw);

    let sw = Switch::with_config(
        "noeal",
        r#"eal_args = ["--in-memory", "-m", "900000", "--no-telemetry"]"#,
        &ports,
    );
    let s = sw.stats();
    for p in [2, 3] {
        let err = sw.port(&s, p)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = sw.port(&s, p)["name"].as_str().unwrap().to_string();
        assert!(
            err.contains(&format!("port {name}"))
                && err.contains("EAL")
                && err.contains("hugepages"),
            "{err}"
        );
    }
    traffic_flows(&sw);
}

/// DPDK and tap ports removed and added again at run time, twice: the vdev is hot-unplugged
/// and probed again, the tap device disappears and comes back, and frames flow afterwards
/// (net_null's frames flooded into the tap).
#[test]
fn dpdk_and_tap_ports_deleted_and_added_again() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let tap = format!("rsd{}", std::process::id() % 10_000);
    let null = "name = \"null\"\ntype = \"dpdk\"\ndevargs = \"net_null0,size=64\"\n".to_string();
    let tap_port = format!("name = \"t\"\ntype = \"tap\"\nifname = \"{tap}\"\n");
    let sw = Switch::with_config(
        "readd",
        TEST_EAL_ARGS,
        &format!("[[port]]\n{null}[[port]]\n{tap_port}"),
    );
    let (null_file, tap_file) = (sw.dir.join("null.toml"), sw.dir.join("t.toml"));
    std::fs::write(&null_file, &null).unwrap();
    std::fs::write(&tap_file, &tap_port).unwrap();
    let tap_exists = || std::path::Path::new(&format!("/sys/class/net/{tap}")).exists();
    for _ in 0..2 {
        sw.ctl(&["del-port", "null"]);
        sw.ctl(&["del-port", "t"]);
        assert!(!tap_exists(), "tap {tap} still there after del-port");
        sw.ctl(&["add-port", null_file.to_str().unwrap()]);
        sw.ctl(&["add-port", tap_file.to_str().unwrap()]);
        assert!(tap_exists());
    }
    std::thread::sleep(Duration::from_millis(500));
    let s = sw.stats();
    let names: Vec<&str> = s["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["null", "t"]);
    assert!(
        s["ports"][1]["to_port"]["packets"].as_u64().unwrap() > 1000,
        "{s}"
    );
    sw.check_accounting();
}
