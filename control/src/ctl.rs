//! The control socket: a unix socket taking one-line commands (`stats`, `stats-json`,
//! `pmd-stats-show`, `pmd-rxq-show`, `rebalance`, `pin`, `add-port FILE`, `del-port NAME`) and the
//! `ringswitch ctl` client for it. The server runs on its own control thread.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use dataplane::sched::{Assign, Move};
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
    let line = line.trim();
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
    let done = |r: anyhow::Result<()>, what: String| match r {
        Ok(()) => format!("ok: {what}\n"),
        Err(e) => format!("error: {e:#}\n"),
    };
    let reply = match verb {
        "stats" => format_stats(&stats_json(sw)),
        "stats-json" => stats_json(sw).to_string() + "\n",
        "add-port" => done(
            crate::config::load_port(Path::new(arg))
                .map_err(anyhow::Error::from)
                .and_then(|pc| sw.add_port(pc)),
            format!("added the port of {arg}"),
        ),
        "del-port" => done(sw.del_port(arg), format!("removed port {arg}")),
        "pmd-stats-show" => format_pmds(&stats_json(sw)),
        "pmd-rxq-show" => format_rxqs(&stats_json(sw)),
        "pin" => match pin(sw, arg) {
            Ok(s) => s,
            Err(e) => format!("error: {e:#}\n"),
        },
        "rebalance" => match rebalance(sw, arg) {
            Ok(s) => s,
            Err(e) => format!("error: {e:#}\n"),
        },
        _ => format!(
            "error: unknown command {line:?} (try: stats, stats-json, pmd-stats-show, pmd-rxq-show, rebalance [roundrobin|cycles], pin PORT QUEUE CORE|none, add-port FILE, del-port NAME)\n"
        ),
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
        "drop_no_mbuf": c.drop_no_mbuf, "drop_tx_full": c.drop_tx_full,
        "drop_tx_error": c.drop_tx_error, "drop_bad_offload": c.drop_bad_offload,
        "sw_offload": c.sw_offload,
        "guest_notifications": c.guest_notifications, "ring_broken": c.ring_broken,
    })
}

/// Counters as JSON. Directions are the switch's: `from_port` is what it took from the port (a
/// guest's TX queues, a device's RX queues), `to_port` what it delivered into the port.
pub fn stats_json(sw: &Switch) -> Value {
    let pmds: Vec<Value> = sw
        .dp
        .pmd_show()
        .iter()
        .map(|p| {
            let s = &p.counters;
            let total = (s.busy_cycles + s.idle_cycles).max(1);
            json!({
                "core": p.core.0, "iterations": s.iterations, "packets": s.packets,
                "busy_cycles": s.busy_cycles, "idle_cycles": s.idle_cycles,
                "busy_pct": 100.0 * s.busy_cycles as f64 / total as f64,
                "busy_pct_last": p.busy_pct,
                "cycles_per_packet": s.busy_cycles as f64 / s.packets.max(1) as f64,
                "rx_queues": p.rxqs, "isolated": p.isolated, "sleeps": s.sleeps,
                "tsc_hz": sw.tsc_hz,
            })
        })
        .collect();
    let rxqs: Vec<Value> = sw
        .dp
        .rxq_show()
        .iter()
        .map(|q| {
            json!({
                "core": q.core.0, "port": sw.port_name(q.port), "queue": q.queue,
                "pinned": q.pinned, "running": q.running, "busy_pct": q.busy_pct,
            })
        })
        .collect();
    let ports: Vec<Value> = sw.with_ports(|ports| {
        ports
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
                        v["kind"] = json!(if i % 2 == 0 { "to_port" } else { "from_port" });
                        v
                    })
                    .collect();
                let mut v = json!({
                    "name": p.config.name, "type": p.config.type_name(),
                    "endpoint": p.config.attachment(),
                    "connected": p.connected.load(Ordering::Relaxed),
                    "error": p.error,
                    "from_port": queue_json(&sum(false)), "to_port": queue_json(&sum(true)),
                    "queues": queues,
                });
                if let Some(id) = p.dpdk_port {
                    let link = dataplane::dpdk::link(id);
                    let (imissed, ierrors, oerrors) = dataplane::dpdk::hw_drops(id);
                    v["dpdk"] = json!({
                        "port_id": id, "link_up": link.up, "speed_mbps": link.speed_mbps,
                        "imissed": imissed, "ierrors": ierrors, "oerrors": oerrors,
                    });
                }
                v
            })
            .collect()
    });
    json!({ "pmds": pmds, "rxqs": rxqs, "ports": ports })
}

/// `rebalance [roundrobin|cycles]`: reassign the queues now (by the configured policy unless
/// one is named), with the loads of the last measurement window.
fn rebalance(sw: &Switch, policy: &str) -> anyhow::Result<String> {
    let policy = match policy {
        "" => None,
        "roundrobin" => Some(Assign::RoundRobin),
        "cycles" => Some(Assign::Cycles),
        p => anyhow::bail!("unknown policy {p:?} (roundrobin or cycles)"),
    };
    Ok(format!("ok: {}", moves_text(sw, &sw.dp.rebalance(policy)?)))
}

/// The queues that changed PMD, a line each (for `rebalance`, `pin` and auto-rebalance's log).
pub fn moves_text(sw: &Switch, moves: &[Move]) -> String {
    let mut out = format!("{} rx queue(s) moved\n", moves.len());
    for m in moves {
        out += &format!(
            "  port {} queue {}: core {} -> core {}\n",
            sw.port_name(m.port),
            m.queue,
            m.from.0,
            m.to.0
        );
    }
    out
}

/// `pin PORT QUEUE CORE|none`: pin an rx queue to a PMD's core (or unpin it), moving it now.
fn pin(sw: &Switch, args: &str) -> anyhow::Result<String> {
    let a: Vec<&str> = args.split_whitespace().collect();
    let [port, queue, core] = a[..] else {
        anyhow::bail!("usage: pin PORT QUEUE CORE|none");
    };
    let id = sw
        .port_id(port)
        .with_context(|| format!("no running port {port:?}"))?;
    let queue: u16 = queue.parse().context("QUEUE")?;
    let core = match core {
        "none" => None,
        c => Some(c.parse().context("CORE")?),
    };
    Ok(format!(
        "ok: {}",
        moves_text(sw, &sw.dp.pin(id, queue, core)?)
    ))
}

/// `pmd-stats-show`, as OVS prints it: per PMD, packets, cycles per packet, busy and idle.
fn format_pmds(v: &Value) -> String {
    let mut out = String::new();
    let n = |x: &Value| x.as_u64().unwrap_or(0);
    let f = |x: &Value| x.as_f64().unwrap_or(0.0);
    for p in v["pmds"].as_array().into_iter().flatten() {
        let hz = n(&p["tsc_hz"]).max(1) as f64;
        out += &format!(
            "pmd thread core {}{}:\n  rx queues: {}\n  packets: {}\n  busy cycles: {} ({:.2}%)\n  idle cycles: {} ({:.2}%)\n  avg cycles per packet: {:.1}\n  busy in the last second: {:.1}%\n  sleeps (adaptive): {}\n  running for: {:.1} s\n",
            p["core"],
            if p["isolated"] == true { " (isolated)" } else { "" },
            n(&p["rx_queues"]),
            n(&p["packets"]),
            n(&p["busy_cycles"]),
            f(&p["busy_pct"]),
            n(&p["idle_cycles"]),
            100.0 - f(&p["busy_pct"]),
            f(&p["cycles_per_packet"]),
            f(&p["busy_pct_last"]),
            n(&p["sleeps"]),
            (n(&p["busy_cycles"]) + n(&p["idle_cycles"])) as f64 / hz,
        );
    }
    out
}

/// `pmd-rxq-show`, as OVS prints it: which PMD polls which queue, and its share of that PMD.
fn format_rxqs(v: &Value) -> String {
    let mut out = String::new();
    for p in v["pmds"].as_array().into_iter().flatten() {
        out += &format!(
            "pmd thread core {}{}:\n  busy in the last second: {:.1}%\n",
            p["core"],
            if p["isolated"] == true {
                " (isolated)"
            } else {
                ""
            },
            p["busy_pct_last"].as_f64().unwrap_or(0.0)
        );
        for q in v["rxqs"].as_array().into_iter().flatten() {
            if q["core"] != p["core"] {
                continue;
            }
            out += &format!(
                "  port: {:<16} queue-id: {:>3} {}{} pmd usage: {:>5.1} %\n",
                q["port"].as_str().unwrap_or("?"),
                q["queue"],
                if q["running"] == true {
                    "(enabled) "
                } else {
                    "(disabled)"
                },
                if q["pinned"] == true { " (pinned)" } else { "" },
                q["busy_pct"].as_f64().unwrap_or(0.0)
            );
        }
    }
    out
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
        let (t, r) = (&p["from_port"], &p["to_port"]);
        let kind = p["type"].as_str().unwrap_or("?");
        let vhost = kind == "vhost-user";
        let state = match (&p["error"], &p["dpdk"]) {
            (Value::String(e), _) => format!("FAILED: {e}"),
            (_, Value::Object(d)) => format!(
                "link {} imissed {} ierrors {} oerrors {}",
                if d["link_up"] == true { "up" } else { "down" },
                n(&d["imissed"]),
                n(&d["ierrors"]),
                n(&d["oerrors"])
            ),
            _ if p["connected"] == true && vhost => "connected".into(),
            _ if p["connected"] == true => "running".into(),
            _ => "waiting for a frontend".into(),
        };
        // Only the drop reasons this kind of port can have.
        let drops = |c: &Value, keys: &[&str]| {
            keys.iter()
                .map(|k| format!(" {k} {}", n(&c[format!("drop_{k}")])))
                .collect::<String>()
        };
        let (from, to, from_keys, to_keys): (_, _, &[&str], &[&str]) = if vhost {
            (
                "from guest:",
                "to guest:  ",
                &[
                    "bad_descriptor",
                    "runt",
                    "too_big",
                    "no_destination",
                    "undelivered",
                ],
                &["no_rx_buffer", "too_big", "bad_descriptor"],
            )
        } else {
            (
                "from port: ",
                "to port:   ",
                &["runt", "too_big", "no_destination", "undelivered"],
                &["too_big", "no_mbuf", "tx_full", "tx_error"],
            )
        };
        out += &format!(
            "port {} ({kind} {}): {state}\n  {from} packets {} bytes {} forwarded {} drops:{}\n  {to} packets {} bytes {} drops:{}{}{}\n",
            p["name"].as_str().unwrap_or("?"),
            p["endpoint"].as_str().unwrap_or("?"),
            n(&t["packets"]), n(&t["bytes"]), n(&t["forwarded"]), drops(t, from_keys),
            n(&r["packets"]), n(&r["bytes"]), drops(r, to_keys),
            if vhost {
                format!("  notifications {}", n(&r["guest_notifications"]) + n(&t["guest_notifications"]))
            } else {
                String::new()
            },
            if n(&r["ring_broken"]) + n(&t["ring_broken"]) > 0 { "  RING BROKEN (needs reset)" } else { "" },
        );
    }
    out
}

/// `ringswitch ctl`: send one command, return the answer (an `error: …` answer is an error).
pub fn client(path: &Path, cmd: &str) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(path)
        .with_context(|| format!("connect to {} (is ringswitch running?)", path.display()))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if let Some(e) = out.strip_prefix("error: ") {
        anyhow::bail!("{}", e.trim_end());
    }
    Ok(out)
}
