//! Integration tests of several PMD threads: the real ringswitch binary with PMDs on both CPUs,
//! between real DPDK testpmd guests (net_virtio_user, several queue pairs).

mod common;

use std::time::Duration;

use common::*;

/// p0 with two queue pairs, p1 with one.
const PORTS: &str =
    "[[port]]\nname = \"p0\"\ntype = \"vhost-user\"\nsocket = \"{dir}/p0.sock\"\nqueues = 2\n\
     [[port]]\nname = \"p1\"\ntype = \"vhost-user\"\nsocket = \"{dir}/p1.sock\"\n";

/// Guest A on p0, sending (txonly) on two queue pairs; returns once it sends.
fn two_queue_sender(sw: &Switch) -> Testpmd {
    let a = Testpmd::start(
        &sw.dir,
        "a",
        &[format!(
            "net_virtio_user0,path={},queues=2",
            sw.sock(0).display()
        )],
        &[
            "--forward-mode=txonly",
            "--auto-start",
            "--rxq=2",
            "--txq=2",
        ],
    );
    sw.wait_connected(0, true);
    a.wait_output("Tx-pps", Duration::from_secs(30));
    a
}

/// The core of the PMD polling source queue `queue` of `port`.
fn core_of(sw: &Switch, port: &str, queue: u16) -> u64 {
    let s = sw.stats();
    let q = s["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["port"] == port && q["queue"] == queue && q["running"] == true)
        .unwrap_or_else(|| panic!("no running source queue {port}/{queue} in {s}"))
        .clone();
    q["core"].as_u64().unwrap()
}

/// Two PMDs. Guest A sends on two TX queues, which land on different PMDs; both deliver into
/// guest B's single RX queue (shared, so locked). Under traffic, A's queues are moved between
/// the PMDs eight times (`ctl pin`); afterwards every frame A handed over was taken exactly
/// once, and every frame is accounted for.
#[test]
fn two_pmds_share_a_destination_and_move_queues_without_loss() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let sw = Switch::with_config("pmds", "pmd_cores = [0, 1]\n", PORTS);
    let mut b = Testpmd::on_port(&sw, "b", 1, "rxonly");
    b.wait_output("Rx-pps", Duration::from_secs(30));
    let mut a = two_queue_sender(&sw);

    // Round robin put A's two queues on different PMDs.
    let core_of = |queue| core_of(&sw, "p0", queue);
    assert_ne!(core_of(0), core_of(1), "{}", sw.ctl(&["pmd-rxq-show"]));

    for i in 0..8u16 {
        let (c0, c1) = (i % 2, (i + 1) % 2);
        let out = sw.ctl(&["pin", "p0", "0", &c0.to_string()]);
        assert!(out.starts_with("ok"), "{out}");
        sw.ctl(&["pin", "p0", "1", &c1.to_string()]);
        assert_eq!((core_of(0), core_of(1)), (c0 as u64, c1 as u64));
        std::thread::sleep(Duration::from_millis(250));
    }
    let show = sw.ctl(&["pmd-rxq-show"]);
    assert!(
        show.contains("pmd thread core 0") && show.contains("pmd thread core 1"),
        "{show}"
    );
    assert!(show.contains("(pinned)"), "{show}");
    let pmds = sw.ctl(&["pmd-stats-show"]);
    assert!(pmds.contains("avg cycles per packet"), "{pmds}");

    let sent = final_tx_packets(&a.stop(), 0);
    std::thread::sleep(Duration::from_millis(500));
    let received = final_rx_packets(&b.stop(), 0);
    let s = sw.stats();
    let (from_a, to_b) = (&sw.port(&s, 0)["from_port"], &sw.port(&s, 1)["to_port"]);
    assert!(sent > 100_000, "A sent only {sent} frames");
    assert_eq!(
        from_a["packets"].as_u64().unwrap(),
        sent,
        "frames the switch took from A's two queues vs frames A sent"
    );
    assert_eq!(to_b["packets"].as_u64().unwrap(), received);
    assert!(received > 0);
    sw.check_accounting();
    // Both PMDs carried A's frames.
    for p in s["pmds"].as_array().unwrap() {
        assert!(p["packets"].as_u64().unwrap() > 0, "idle PMD: {p}");
    }
}

/// A queue pinned in the port file goes to its core, and that PMD takes no other queue; a
/// core that runs no PMD is refused at start, naming the file and key.
#[test]
fn pinned_queues_isolate_their_pmd() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let ports = "[[port]]\nname = \"p0\"\ntype = \"vhost-user\"\nsocket = \"{dir}/p0.sock\"\nqueues = 2\npmd_rxq_affinity = [1]\n\
                 [[port]]\nname = \"p1\"\ntype = \"vhost-user\"\nsocket = \"{dir}/p1.sock\"\nqueues = 2\n";
    let sw = Switch::with_config("pinned", "pmd_cores = [0, 1]\n", ports);
    let mut a = Testpmd::start(
        &sw.dir,
        "a",
        &[
            format!("net_virtio_user0,path={},queues=2", sw.sock(0).display()),
            format!("net_virtio_user1,path={},queues=2", sw.sock(1).display()),
        ],
        &["--forward-mode=io", "--auto-start", "--rxq=2", "--txq=2"],
    );
    sw.wait_connected(0, true);
    sw.wait_connected(1, true);
    a.wait_output("Rx-pps", Duration::from_secs(30));
    let s = sw.stats();
    let rxqs = s["sources"].as_array().unwrap();
    let on = |core: u64| -> Vec<String> {
        rxqs.iter()
            .filter(|q| q["core"] == core)
            .map(|q| format!("{}/{}", q["port"].as_str().unwrap(), q["queue"]))
            .collect()
    };
    assert_eq!(on(1), ["p0/0"], "{rxqs:?}");
    assert_eq!(on(0).len(), 3, "{rxqs:?}");
    a.stop();
    drop(sw);

    let bad = "[[port]]\nname = \"p0\"\ntype = \"vhost-user\"\nsocket = \"{dir}/p0.sock\"\npmd_rxq_affinity = [3]\n";
    let dir = TestDir::new("pinned-bad");
    std::fs::write(
        dir.join("main.toml"),
        format!(
            "[dataplane]\npmd_cores = [1]\ncontrol_socket = \"{0}/ctl.sock\"\n{1}",
            dir.display(),
            bad.replace("{dir}", &dir.display().to_string())
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringswitch"))
        .args(["check", "--config"])
        .arg(dir.join("main.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("pmd_rxq_affinity") && err.contains("core 3 runs no PMD"),
        "{err}"
    );
}

/// The adaptive model: a PMD idle past its threshold asks for kicks and sleeps; frames that
/// arrive one per millisecond each wake it, none is lost, and each is delivered well within
/// the PMD's longest sleep (so the kick woke it, not the timeout).
#[test]
fn adaptive_pmd_sleeps_when_idle_and_wakes_on_kicks() {
    adaptive_pmd_wakes_on_kicks("adaptive", false);
}

/// The same with EVENT_IDX, as Linux guests negotiate it: the guest kicks only when its index
/// passes the PMD's `avail_event`, which the PMD keeps behind while it polls.
#[test]
fn adaptive_pmd_wakes_on_event_idx_kicks() {
    adaptive_pmd_wakes_on_kicks("adaptive-ei", true);
}

fn adaptive_pmd_wakes_on_kicks(name: &str, event_idx: bool) {
    let sw = Switch::with_config(name, "model = \"adaptive\"\n", &vhost_ports(2));
    let sleeps = || -> u64 { sw.stats()["pmds"][0]["sleeps"].as_u64().unwrap() };
    let before = sleeps();
    std::thread::sleep(Duration::from_millis(1000));
    let idle = sleeps() - before;
    assert!((3..=20).contains(&idle), "{idle} sleeps in an idle second");

    run_on_cpu0();
    let cfg = perf::traffic::TrafficConfig {
        frame_len: 64,
        rate: Some(1000.0),
        duration: Duration::from_secs(2),
        ring: 256,
        progress: false,
        event_idx,
        interrupts: false,
    };
    let before = sleeps();
    let r = perf::traffic::run(&sw.sock(0), &sw.sock(1), &cfg).unwrap();
    let slept = sleeps() - before;
    assert!(r.sent >= 1900, "sent only {}", r.sent);
    assert_eq!((r.received, r.lost), (r.sent, 0));
    assert!(slept > r.sent / 2, "{slept} sleeps for {} frames", r.sent);
    // The longest sleep is 100 ms: a frame woken by its kick takes far less.
    let p99_us = r.latency.value_at_quantile(0.99) as f64 / 1e3;
    assert!(
        p99_us < 20_000.0,
        "p99 {p99_us} us: kicks do not wake the PMD"
    );
    sw.check_accounting();
}

/// Auto-rebalance: both of guest A's busy queues are put on one PMD (pinned there, then
/// unpinned where they are); that PMD is over the load threshold (5 % here: the guest shares
/// CPU 0 with the other PMD, so it sends slowly) and spreading the queues halves its load, so
/// within a few intervals they are on different PMDs again, with no frame lost on the way.
#[test]
fn auto_rebalance_spreads_an_overloaded_pmd() {
    if !rig(&[Need::Root, Need::Hugepages, Need::Testpmd]) {
        return;
    }
    let dataplane =
        "pmd_cores = [0, 1]\nauto_lb = true\nauto_lb_load_threshold = 5\nauto_lb_interval = 1\n";
    let sw = Switch::with_config("autolb", dataplane, PORTS);
    let mut b = Testpmd::on_port(&sw, "b", 1, "rxonly");
    let mut a = two_queue_sender(&sw);
    let cores = || [core_of(&sw, "p0", 0), core_of(&sw, "p0", 1)];
    for q in ["0", "1"] {
        sw.ctl(&["pin", "p0", q, "1"]);
        sw.ctl(&["pin", "p0", q, "none"]);
    }
    assert_eq!(cores(), [1, 1]);
    let t = std::time::Instant::now();
    while cores()[0] == cores()[1] {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not rebalanced: {}\n{}",
            sw.ctl(&["pmd-rxq-show"]),
            sw.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(sw.log().contains("auto-rebalance"), "{}", sw.log());
    let sent = final_tx_packets(&a.stop(), 0);
    std::thread::sleep(Duration::from_millis(500));
    b.stop();
    let s = sw.stats();
    assert_eq!(
        sw.port(&s, 0)["from_port"]["packets"].as_u64().unwrap(),
        sent
    );
    sw.check_accounting();
}

/// The pipeline model: the PMD on CPU 1 polls the guest's queues and hands the frames over to
/// the PMD on CPU 0, which switches and delivers them. Every timestamped frame arrives, in
/// order, and the counters of both sides agree with the traffic tool's.
#[test]
fn pipeline_hands_frames_from_the_rx_pmd_to_the_tx_pmd() {
    let dataplane = "pmd_cores = [1, 0]\nmodel = \"pipeline\"\n";
    let sw = Switch::with_config("pipeline", dataplane, &vhost_ports(2));
    run_on_cpu0();
    // The tool shares CPU 0 with the busy-polling tx PMD, which may keep it off the CPU for a
    // scheduler slice (up to ~12 ms): a rate its 256-entry rings ride out. What falls due while
    // it is off the CPU is not sent later but counted late (about half of it).
    let cfg = perf::traffic::TrafficConfig {
        frame_len: 256,
        rate: Some(5_000.0),
        duration: Duration::from_secs(3),
        ring: 256,
        progress: false,
        event_idx: false,
        interrupts: false,
    };
    let r = perf::traffic::run(&sw.sock(0), &sw.sock(1), &cfg).unwrap();
    let s = sw.stats();
    assert!(
        r.sent > 3_000 && r.sent + r.late > 14_000,
        "sent only {} (late {})",
        r.sent,
        r.late
    );
    assert_eq!(
        (r.received, r.lost, r.reordered),
        (r.sent, 0, 0),
        "{:#}",
        s["ports"]
    );
    // Besides the test frames, each port sent one hello (for MAC learning).
    assert_eq!(sw.port(&s, 0)["from_port"]["packets"], r.sent + 1, "{s}");
    assert_eq!(sw.port(&s, 1)["to_port"]["packets"], r.received + 1, "{s}");
    let pmds = s["pmds"].as_array().unwrap();
    let (rx, tx) = (&pmds[0], &pmds[1]);
    assert_eq!(
        (rx["core"].as_u64(), tx["core"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(rx["packets"].as_u64().unwrap() > r.sent, "{rx}");
    assert!(tx["packets"].as_u64().unwrap() > r.sent, "{tx}");
    assert_eq!(
        tx["source_queues"], 0,
        "the tx PMD polls no source queue: {tx}"
    );
    sw.check_accounting();
}
