//! `rs-perf`: turns raw benchmark output into figures for perf/ scripts.
//!   rs-perf median-pps LOG [all] [tx]   median Rx-pps (or Tx-pps) in Mpps of a testpmd
//!                                       --stats-period log, port 0 or summed over all ports,
//!                                       first 2 periods skipped
//!   rs-perf testpmd-cycles LOG          busy cycles per forwarded packet from testpmd
//!                                       --record-core-cycles
//!   rs-perf ringswitch-cycles A.json B.json
//!                                       busy cycles of PMD 0 per forwarded packet between
//!                                       two `ringswitch ctl stats --json` snapshots
//!   rs-perf plot-hgrm TITLE OUT.svg NAME=FILE.hgrm...
//!                                       one latency plot with a line per .hgrm file

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let read = |i: usize| -> anyhow::Result<String> {
        let p = args.get(i).context("missing file argument")?;
        std::fs::read_to_string(p).with_context(|| format!("read {p}"))
    };
    match args.first().map(String::as_str) {
        Some("median-pps") => {
            let flag = |f: &str| args.iter().skip(2).any(|a| a == f);
            let field = if flag("tx") { "Tx-pps" } else { "Rx-pps" };
            println!("{:.2}", median_pps(&read(1)?, flag("all"), field) / 1e6);
        }
        Some("testpmd-cycles") => println!("{:.0}", testpmd_cycles(&read(1)?)?),
        Some("ringswitch-cycles") => {
            let a: serde_json::Value = serde_json::from_str(&read(1)?)?;
            let b: serde_json::Value = serde_json::from_str(&read(2)?)?;
            println!("{:.0}", ringswitch_cycles(&a, &b));
        }
        Some("plot-hgrm") if args.len() >= 4 => {
            let mut series = Vec::new();
            for arg in &args[3..] {
                let (name, path) = arg.split_once('=').context("series must be NAME=FILE")?;
                let text = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
                series.push((name, perf::traffic::parse_hgrm(&text).context(path.to_string())?));
            }
            let refs: Vec<_> = series.iter().map(|(n, h)| (*n, h)).collect();
            std::fs::write(&args[2], perf::plot::latency_svg(&args[1], &refs))?;
        }
        _ => bail!("usage: rs-perf median-pps LOG [all] [tx] | testpmd-cycles LOG | ringswitch-cycles A.json B.json | plot-hgrm TITLE OUT.svg NAME=FILE.hgrm..."),
    }
    Ok(())
}

/// testpmd prints one block per port per period; a period ends when a port repeats.
fn median_pps(log: &str, all_ports: bool, field: &str) -> f64 {
    let re = regex::Regex::new(&format!(
        r"NIC statistics for port (\d+)[\s\S]*?{field}:\s+(\d+)"
    ))
    .unwrap_or_else(|_| unreachable!());
    let mut periods = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut current = 0u64;
    for c in re.captures_iter(log) {
        let port: u32 = c[1].parse().unwrap_or(0);
        let pps: u64 = c[2].parse().unwrap_or(0);
        if !seen.insert(port) {
            periods.push(current);
            current = 0;
            seen.clear();
            seen.insert(port);
        }
        if all_ports || port == 0 {
            current += pps;
        }
    }
    let mut s: Vec<u64> = periods.into_iter().skip(2).collect();
    if s.is_empty() {
        return 0.0;
    }
    s.sort_unstable();
    s[s.len() / 2] as f64
}

/// Busy cycles per *forwarded* packet: testpmd's own "CPU cycles/packet" divides by packets
/// received, which a backend that drops most of an endless source (net_null into a slower
/// guest) makes look cheap. From the final statistics: "CPU cycles/packet=… (total cycles=C /
/// total io packets=…)" and the accumulated "TX-packets: N".
fn testpmd_cycles(log: &str) -> anyhow::Result<f64> {
    let last = |re: &str| -> anyhow::Result<Option<u64>> {
        let re = regex::Regex::new(re)?;
        Ok(re.captures_iter(log).last().and_then(|c| c[1].parse().ok()))
    };
    let cycles = last(r"CPU cycles/packet=[0-9.]+ \((?:total|busy) cycles=(\d+)")?
        .context("no 'CPU cycles/packet=' in testpmd log (run with --record-core-cycles)")?;
    let sent = last(r"Accumulated forward statistics[^\n]*\n[^\n]*\n\s*TX-packets:\s+(\d+)")?
        .context("no accumulated forward statistics in testpmd log")?;
    Ok(cycles as f64 / sent.max(1) as f64)
}

/// PMD 0's busy cycles between two snapshots per frame forwarded by any port in between.
fn ringswitch_cycles(a: &serde_json::Value, b: &serde_json::Value) -> f64 {
    let busy = |s: &serde_json::Value| s["pmds"][0]["busy_cycles"].as_u64().unwrap_or(0);
    let forwarded = |s: &serde_json::Value| -> u64 {
        let ports = s["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
        ports
            .iter()
            .map(|p| p["from_port"]["forwarded"].as_u64().unwrap_or(0))
            .sum()
    };
    (busy(b) - busy(a)) as f64 / (forwarded(b) - forwarded(a)).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_cycles() {
        let mut log = String::new();
        for p in [1u64, 2, 10, 30, 20, 5] {
            for port in 0..2 {
                log += &format!(
                    "#### NIC statistics for port {port} ####\n  Rx-pps: {}  Rx-bps: 1\n  Tx-pps: {}\n",
                    p * 1000 + port,
                    p * 10 + port
                );
            }
        }
        assert_eq!(median_pps(&log, false, "Rx-pps"), 20000.0);
        assert_eq!(median_pps(&log, true, "Rx-pps"), 40001.0);
        assert_eq!(median_pps(&log, false, "Tx-pps"), 200.0);
        let t = "  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 400            RX-dropped: 0             RX-total: 400
  TX-packets: 100            TX-dropped: 300           TX-total: 400
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

  CPU cycles/packet=95.31 (total cycles=38124 / total io packets=400) at 2000 MHz Clock";
        assert_eq!(
            testpmd_cycles(t).unwrap(),
            381.24,
            "per packet sent on, not received"
        );
        assert!(testpmd_cycles("nothing").is_err());
        let snap = |busy: u64, fwd: [u64; 2]| {
            serde_json::json!({"pmds": [{"busy_cycles": busy, "packets": 1}],
                "ports": [{"from_port": {"forwarded": fwd[0]}}, {"from_port": {"forwarded": fwd[1]}}]})
        };
        assert_eq!(
            ringswitch_cycles(&snap(1000, [5, 5]), &snap(5000, [25, 25])),
            100.0
        );
    }
}
