//! The control socket: a unix socket taking one-line commands (`stats`, `stats-json`) and the
//! `ringswitch ctl` client for it. The server runs on its own control thread.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use dataplane::stats::QueueCounters;
use serde_json::{json, Value};

use crate::switch::Switch;

pub fn serve(path: &Path, sw: Arc<Switch>) -> anyhow::Result<()> {
    let l = crate::switch::bind_socket(path, Default::default()).context("control socket")?;
    std::thread::Builder::new()
        .name("ctl".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                if let Err(e) = answer(s, &sw) {
                    log::warn!("ctl: {e}");
                }
            }
        })
        .context("spawn ctl thread")?;
    Ok(())
}

fn answer(s: UnixStream, sw: &Switch) -> anyhow::Result<()> {
    let mut line = String::new();
    BufReader::new(s.try_clone()?)
        .take(256)
        .read_line(&mut line)?;
    let reply = match line.trim() {
        "stats" => format_stats(&stats_json(sw)),
        "stats-json" => stats_json(sw).to_string() + "\n",
        other => format!("error: unknown command {other:?} (try: stats, stats-json)\n"),
    };
    (&s).write_all(reply.as_bytes())?;
    Ok(())
}

fn queue_json(c: &QueueCounters) -> Value {
    json!({
        "packets": c.packets, "bytes": c.bytes, "forwarded": c.forwarded,
        "drop_no_rx_buffer": c.drop_no_rx_buffer, "drop_bad_descriptor": c.drop_bad_descriptor,
        "drop_runt": c.drop_runt, "drop_too_big": c.drop_too_big,
        "drop_no_destination": c.drop_no_destination, "drop_undelivered": c.drop_undelivered,
        "guest_notifications": c.guest_notifications, "ring_broken": c.ring_broken,
    })
}

/// Counters as JSON. Directions are the guest's: `guest_tx` is what the switch took from the
/// guest, `guest_rx` what it delivered into the guest.
pub fn stats_json(sw: &Switch) -> Value {
    let pmds: Vec<Value> = sw
        .pmds
        .iter()
        .map(|p| {
            let s = p.stats().snapshot();
            let total = (s.busy_cycles + s.idle_cycles).max(1);
            json!({
                "core": p.core().0, "iterations": s.iterations, "packets": s.packets,
                "busy_cycles": s.busy_cycles, "idle_cycles": s.idle_cycles,
                "busy_pct": 100.0 * s.busy_cycles as f64 / total as f64,
                "cycles_per_packet": s.busy_cycles as f64 / s.packets.max(1) as f64,
                "tsc_hz": sw.tsc_hz,
            })
        })
        .collect();
    let ports: Vec<Value> = sw
        .ports
        .iter()
        .map(|p| {
            let qs: Vec<QueueCounters> = p.queues.iter().map(|q| q.snapshot()).collect();
            let sum = |rx: bool| {
                let mut t = QueueCounters::default();
                for (_, q) in qs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i.is_multiple_of(2) == rx)
                {
                    t.accumulate(q);
                }
                t
            };
            let queues: Vec<Value> = qs
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    let mut v = queue_json(q);
                    v["queue"] = json!(i);
                    v["kind"] = json!(if i % 2 == 0 { "guest_rx" } else { "guest_tx" });
                    v
                })
                .collect();
            json!({
                "name": p.name, "socket": p.socket,
                "connected": p.connected.load(Ordering::Relaxed),
                "guest_tx": queue_json(&sum(false)), "guest_rx": queue_json(&sum(true)),
                "queues": queues,
            })
        })
        .collect();
    json!({ "pmds": pmds, "ports": ports })
}

fn format_stats(v: &Value) -> String {
    let mut out = String::new();
    let n = |x: &Value| x.as_u64().unwrap_or(0);
    for p in v["pmds"].as_array().into_iter().flatten() {
        out += &format!(
            "pmd core {}: packets {} busy {:.1}% cycles/packet {:.1} iterations {}\n",
            p["core"],
            n(&p["packets"]),
            p["busy_pct"].as_f64().unwrap_or(0.0),
            p["cycles_per_packet"].as_f64().unwrap_or(0.0),
            n(&p["iterations"])
        );
    }
    for p in v["ports"].as_array().into_iter().flatten() {
        let (t, r) = (&p["guest_tx"], &p["guest_rx"]);
        out += &format!(
            "port {} ({}{}):\n  from guest: packets {} bytes {} forwarded {} drops: bad_descriptor {} runt {} too_big {} no_destination {} undelivered {}\n  to guest:   packets {} bytes {} drops: no_rx_buffer {} too_big {} bad_descriptor {}  notifications {}{}\n",
            p["name"].as_str().unwrap_or("?"),
            p["socket"].as_str().unwrap_or("?"),
            if p["connected"].as_bool() == Some(true) { ", connected" } else { "" },
            n(&t["packets"]), n(&t["bytes"]), n(&t["forwarded"]),
            n(&t["drop_bad_descriptor"]), n(&t["drop_runt"]), n(&t["drop_too_big"]),
            n(&t["drop_no_destination"]), n(&t["drop_undelivered"]),
            n(&r["packets"]), n(&r["bytes"]), n(&r["drop_no_rx_buffer"]), n(&r["drop_too_big"]),
            n(&r["drop_bad_descriptor"]),
            n(&r["guest_notifications"]) + n(&t["guest_notifications"]),
            if n(&r["ring_broken"]) + n(&t["ring_broken"]) > 0 { "  RING BROKEN (needs reset)" } else { "" },
        );
    }
    out
}

/// `ringswitch ctl`: send one command, print the answer.
pub fn client(path: &Path, cmd: &str) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(path)
        .with_context(|| format!("connect to {} (is ringswitch running?)", path.display()))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
