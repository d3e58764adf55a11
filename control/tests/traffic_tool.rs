//! The traffic tool (perf::traffic, behind `rs-traffic`) through the real switch: at a rate
//! both ends sustain, every timestamped frame arrives, the switch's counters agree with the
//! tool's, and the latency histogram holds one value per frame.

mod common;

use std::time::Duration;

use common::*;
use perf::traffic::{hgrm, run, TrafficConfig};

#[test]
fn traffic_tool_measures_through_the_switch_without_loss() {
    let sw = Switch::start("traffic", 2);
    run_on_cpu0();
    let cfg = TrafficConfig {
        frame_len: 128,
        rate: Some(200_000.0),
        duration: Duration::from_secs(2),
        ring: 256,
        progress: false,
        event_idx: false,
        interrupts: false,
    };
    let r = run(&sw.sock(0), &sw.sock(1), &cfg).unwrap();
    assert!(r.sent > 300_000, "sent only {}", r.sent);
    assert_eq!((r.received, r.lost, r.reordered), (r.sent, 0, 0));
    assert_eq!(r.latency.len(), r.received);
    assert!(r.latency.value_at_quantile(0.5) > 0);
    let h = hgrm(&r.latency);
    assert!(h.contains("Percentile") && h.contains("#[Max"), "{h}");
    // Besides the test frames, each port sent one hello (for MAC learning).
    let s = sw.stats();
    assert_eq!(sw.port(&s, 1)["to_port"]["packets"], r.received + 1, "{s}");
    assert_eq!(sw.port(&s, 0)["from_port"]["packets"], r.sent + 1, "{s}");
    sw.check_accounting();
}
