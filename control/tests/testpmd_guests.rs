//! Integration tests: the real ringswitch binary between real DPDK testpmd guests
//! (net_virtio_user frontends). Each test starts its own switch on its own sockets.

mod common;

use std::time::Duration;

use common::*;

fn sleep(s: f64) {
    std::thread::sleep(Duration::from_secs_f64(s));
}

/// (a) guest A txonly → ringswitch → guest B rxonly: B received exactly what the switch delivered.
#[test]
fn txonly_to_rxonly_counts_agree() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let sw = Switch::start("counts", 2);
    let mut b = Testpmd::on_port(&sw, "b", 1, "rxonly");
    b.wait_output("Rx-pps", Duration::from_secs(20));
    let mut a = Testpmd::on_port(&sw, "a", 0, "txonly");
    a.wait_output("Rx-pps", Duration::from_secs(20));
    sleep(3.0);
    a.stop();
    sleep(1.0);
    let delivered = sw.port(&sw.stats(), 1)["to_port"]["packets"]
        .as_u64()
        .unwrap();
    let received = final_rx_packets(&b.stop(), 0);
    assert!(delivered > 0, "nothing forwarded");
    assert_eq!(
        received, delivered,
        "guest B's RX count vs ringswitch's delivered count"
    );
    sw.check_accounting();
}

/// (b) an io-forward loop between two virtio-user ports of one guest runs for 10 s, traffic
/// flowing in every one-second period.
#[test]
fn io_loop_flows_for_ten_seconds() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let sw = Switch::start("loop", 2);
    let mut g = Testpmd::io_loop(&sw, "loop", 32);
    // Sample ringswitch's delivered counters every second for 10 s: each second must move traffic.
    let delivered = |s: &serde_json::Value| -> u64 {
        (0..2)
            .map(|p| sw.port(s, p)["to_port"]["packets"].as_u64().unwrap())
            .sum()
    };
    let mut last = delivered(&sw.stats());
    let mut per_second = Vec::new();
    for _ in 0..10 {
        sleep(1.0);
        let now = delivered(&sw.stats());
        per_second.push(now - last);
        last = now;
    }
    g.stop();
    assert!(
        per_second.iter().all(|&n| n > 100_000),
        "a second without traffic: {per_second:?}"
    );
    sw.check_accounting();
}

/// (c) guests killed mid-traffic (sender, then receiver) and started again: the switch stays up
/// and traffic resumes.
#[test]
fn killed_guest_restarts_and_traffic_resumes() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let mut sw = Switch::start("restart", 2);
    let start_b = |sw: &Switch| Testpmd::on_port(sw, "b", 1, "rxonly");
    let start_a = |sw: &Switch| Testpmd::on_port(sw, "a", 0, "txonly");
    let delivered = |sw: &Switch| {
        sw.port(&sw.stats(), 1)["to_port"]["packets"]
            .as_u64()
            .unwrap()
    };
    let wait_growth = |sw: &Switch, from: u64| {
        for _ in 0..100 {
            if delivered(sw) > from + 1000 {
                return;
            }
            sleep(0.1);
        }
        panic!(
            "traffic did not resume (still {} delivered)\n{}",
            delivered(sw),
            sw.log()
        );
    };

    let mut b = start_b(&sw);
    let mut a = start_a(&sw);
    wait_growth(&sw, 0);
    // The sender vanishes mid-traffic.
    a.kill();
    sw.wait_connected(0, false);
    assert!(sw.alive());
    let mut a = start_a(&sw);
    wait_growth(&sw, delivered(&sw));
    // The receiver, whose memory the PMD writes into, vanishes mid-traffic.
    b.kill();
    sw.wait_connected(1, false);
    sleep(0.5);
    assert!(sw.alive(), "switch died when the receiver vanished");
    let before = delivered(&sw);
    let _b = start_b(&sw);
    wait_growth(&sw, before);
    a.stop();
    assert!(sw.alive());
    sw.check_accounting();
}

/// Minimal pcap (Ethernet) writer/reader for the content test.
fn write_pcap(path: &std::path::Path, frames: &[Vec<u8>]) {
    let mut out = Vec::new();
    for v in [0xa1b2c3d4u32, 0x0004_0002, 0, 0, 65535, 1] {
        out.extend(if v == 0x0004_0002 {
            [2u8, 0, 4, 0].to_vec()
        } else {
            v.to_le_bytes().to_vec()
        });
    }
    out.truncate(24);
    for (i, f) in frames.iter().enumerate() {
        for v in [i as u32, 0, f.len() as u32, f.len() as u32] {
            out.extend(v.to_le_bytes());
        }
        out.extend(f);
    }
    std::fs::write(path, out).unwrap();
}

fn read_pcap(path: &std::path::Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(path).unwrap_or_default();
    let mut frames = Vec::new();
    let mut off = 24;
    while off + 16 <= b.len() {
        let len = u32::from_le_bytes(b[off + 8..off + 12].try_into().unwrap()) as usize;
        off += 16;
        if off + len > b.len() {
            break;
        }
        frames.push(b[off..off + len].to_vec());
        off += len;
    }
    frames
}

/// (d) frame bytes arrive intact: a pcap of varied frames replayed by guest A (net_pcap →
/// virtio-user) is captured by guest B (virtio-user → net_pcap) and compared byte for byte.
/// B uses small mbufs, so large frames arrive over several mergeable RX buffers.
#[test]
fn frame_contents_arrive_intact() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    frames_arrive_intact("bytes", "");
}

/// The same over packed rings with IN_ORDER (testpmd's `packed_vq=1,in_order=1`): descriptors
/// taken and given back in one shared ring, big frames spread over several RX buffers.
#[test]
fn frame_contents_arrive_intact_over_packed_in_order_rings() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    frames_arrive_intact("packed", ",packed_vq=1,in_order=1");
}

/// 120 frames of random bytes and sizes from guest A's pcap to guest B's, compared byte for
/// byte; `virtio` is appended to both guests' virtio-user devargs.
fn frames_arrive_intact(tag: &str, virtio: &str) {
    let sw = Switch::start(tag, 2);
    let mut seed = 0x1234_5678u32;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    let frames: Vec<Vec<u8>> = (0..120)
        .map(|i| {
            let len = [60usize, 64, 128, 511, 1000, 1514][i % 6] + (rnd() as usize % 7);
            let len = len.min(1514);
            let mut f = vec![0x02, 0, 0, 0, 0, 0xbb, 0x02, 0, 0, 0, 0, 0xaa, 0x88, 0xb5];
            f.extend((14..len).map(|_| rnd() as u8));
            f
        })
        .collect();
    let input = sw.dir.join("in.pcap");
    let output = sw.dir.join("out.pcap");
    write_pcap(&input, &frames);
    // Scatter only on the virtio port (net_pcap has none), so set it before the ports start.
    let cmds = sw.dir.join("cap.cmd");
    std::fs::write(
        &cmds,
        "port config 0 rx_offload scatter on\nport start all\nstart\n",
    )
    .unwrap();
    let mut b = Testpmd::start(
        &sw.dir,
        &format!("{tag}cap"),
        &[
            Testpmd::virtio(0, &sw.sock(1)) + virtio,
            format!("net_pcap0,tx_pcap={}", output.display()),
        ],
        &[
            "--forward-mode=io",
            "--mbuf-size=640",
            "--disable-device-start",
            &format!("--cmdline-file={}", cmds.display()),
        ],
    );
    sw.wait_connected(1, true);
    b.wait_output("Rx-pps", Duration::from_secs(20));
    let mut a = Testpmd::start(
        &sw.dir,
        &format!("{tag}replay"),
        &[
            format!("net_pcap0,rx_pcap={}", input.display()),
            Testpmd::virtio(0, &sw.sock(0)) + virtio,
        ],
        // testpmd drains RX queues before it starts forwarding: keep the pcap's frames.
        &["--forward-mode=io", "--auto-start", "--no-flush-rx"],
    );
    for _ in 0..100 {
        if sw.port(&sw.stats(), 1)["to_port"]["packets"]
            .as_u64()
            .unwrap()
            >= frames.len() as u64
        {
            break;
        }
        sleep(0.1);
    }
    sleep(1.0);
    a.stop();
    b.stop();
    let got = read_pcap(&output);
    assert_eq!(got.len(), frames.len(), "frames captured by guest B");
    for (i, (g, f)) in got.iter().zip(&frames).enumerate() {
        assert_eq!(g, f, "frame {i} ({} bytes) differs", f.len());
    }
    sw.check_accounting();
}

/// The switch refuses a bad configuration with the file, line and key, and starts nothing.
#[test]
fn bad_config_is_refused_with_file_line_and_key() {
    let dir = TestDir::new("badcfg");
    let main = dir.join("main.toml");
    std::fs::write(&main, "[dataplane]\npmd_cores = [1]\n[[port]]\nname = \"x\"\ntype = \"vhost-user\"\nsockett = \"/tmp/x\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringswitch"))
        .arg("--config")
        .arg(&main)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("main.toml") && err.contains("line 6") && err.contains("sockett"),
        "{err}"
    );
}

/// `ctl add-port FILE` and `ctl del-port NAME` while an io-forward loop runs through two other
/// ports: the new port appears (socket created) and goes (socket removed), and the running
/// ports count no drops meanwhile and keep moving traffic.
#[test]
fn add_and_del_port_at_run_time_drop_nothing() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let sw = Switch::start("addel", 2);
    // 128 frames circulating: the loop never fills an RX ring, so it drops nothing itself.
    let mut g = Testpmd::io_loop(&sw, "loop", 4);
    sleep(2.0);
    let drops = |s: &serde_json::Value| -> Vec<u64> {
        (0..2)
            .flat_map(|p| ["from_port", "to_port"].map(|side| drop_sum(&sw.port(s, p), side)))
            .collect()
    };
    let moved = |s: &serde_json::Value| sw.port(s, 1)["to_port"]["packets"].as_u64().unwrap();
    let before = sw.stats();

    let extra = sw.dir.join("p2.toml");
    let sock = sw.sock(2);
    std::fs::write(
        &extra,
        format!(
            "name = \"p2\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n",
            sock.display()
        ),
    )
    .unwrap();
    let ok = sw.ctl(&["add-port", extra.to_str().unwrap()]);
    assert!(ok.contains("ok"), "{ok}");
    assert!(sock.exists(), "added port's socket");
    assert_eq!(sw.stats()["ports"][2]["name"], "p2");
    // The same file again: refused, by name.
    let err = sw.ctl_err(&["add-port", extra.to_str().unwrap()]);
    assert!(err.contains("p2") && err.contains("name"), "{err}");
    // A guest on the new port, connected when the port is removed under it.
    let mut g2 = Testpmd::on_port(&sw, "p2", 2, "rxonly");
    sleep(1.0);
    let ok = sw.ctl(&["del-port", "p2"]);
    assert!(ok.contains("ok"), "{ok}");
    assert!(!sock.exists(), "removed port's socket");
    assert_eq!(sw.stats()["ports"].as_array().unwrap().len(), 2);
    assert!(sw.ctl_err(&["del-port", "p2"]).contains("no port"));
    g2.stop();
    sleep(1.0);

    let after = sw.stats();
    assert_eq!(drops(&after), drops(&before), "drops on the running ports");
    assert!(
        moved(&after) > moved(&before) + 100_000,
        "traffic kept flowing"
    );
    g.stop();
    sw.check_accounting();
}

/// `mode = "client"` ports connect to frontends that listen (testpmd virtio-user `server=1`),
/// and when the frontend goes and comes back, reconnect by themselves (with backoff) and carry
/// traffic again. (A restart of ringswitch itself is not tested against testpmd: 22.11's
/// virtio-user server mode does not accept a new backend after its first one vanished.)
#[test]
fn client_mode_ports_reconnect_to_a_restarted_frontend() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let sw_dir = TestDir::new("client-guests");
    let socks = [sw_dir.join("g0.sock"), sw_dir.join("g1.sock")];
    let ports: String = socks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "[[port]]\nname = \"c{i}\"\ntype = \"vhost-user\"\nmode = \"client\"\nsocket = \"{}\"\n",
                s.display()
            )
        })
        .collect();
    let cmd = sw_dir.join("txfirst.cmd");
    std::fs::write(&cmd, "start tx_first 32\n").unwrap();
    // The guest creates the sockets and waits for a backend.
    let guest = |name: &str| {
        let vdev = |i: usize| {
            format!(
                "net_virtio_user{i},path={},queues=1,server=1",
                socks[i].display()
            )
        };
        Testpmd::start(
            &sw_dir,
            name,
            &[vdev(0), vdev(1)],
            &[
                "--forward-mode=io",
                &format!("--cmdline-file={}", cmd.display()),
            ],
        )
    };
    let flows = |sw: &Switch| {
        sw.wait_connected(0, true);
        sw.wait_connected(1, true);
        let first = sw.port(&sw.stats(), 1)["to_port"]["packets"]
            .as_u64()
            .unwrap();
        for _ in 0..100 {
            sleep(0.1);
            let now = sw.port(&sw.stats(), 1)["to_port"]["packets"]
                .as_u64()
                .unwrap();
            if now > first + 10_000 {
                return;
            }
        }
        panic!("no traffic through the client-mode ports\n{}", sw.log());
    };
    // The switch first: it retries until the guest's sockets exist.
    let sw = Switch::with_config("client", "", &ports);
    sleep(0.5);
    let mut g = guest("srv1");
    flows(&sw);
    g.kill();
    sw.wait_connected(0, false);
    sw.wait_connected(1, false);
    // A killed testpmd leaves its sockets behind and will not bind over them.
    for s in &socks {
        std::fs::remove_file(s).unwrap();
    }
    let mut g = guest("srv2");
    flows(&sw);
    g.stop();
    sw.check_accounting();
}
