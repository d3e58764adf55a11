//! The control socket: a unix socket taking one-line commands (`stats`, `stats-json`,
//! `pmd-stats-show`, `pmd-rxq-show`, `rebalance`, `pin`, `add-port FILE` followed by the
//! file's contents, `del-port NAME`) and the `ringswitch ctl` client for it. The server
//! accepts on its own control thread and answers each client on a thread of its own (16 at
//! most, each with a 2 s timeout); only root and the switch's own user may change the switch.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dataplane::{Assign, Move, QueueCounters};
use serde_json::{json, Value};

use crate::config::SocketPerm;
use crate::switch::Switch;

/// Clients served at once; one more is told so and closed.
const MAX_CLIENTS: usize = 16;
/// How long a client has to send its request (and to take the reply).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest port file `add-port` sends.
const MAX_PORT_FILE: u64 = 64 * 1024;

pub fn serve(path: &Path, perm: SocketPerm, sw: Arc<Switch>) -> anyhow::Result<()> {
    let l = crate::switch::bind_socket(path, perm).context("control socket")?;
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("ctl".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                // Relaxed: a count, bounded by this thread alone; each client's thread
                // decrements it when done.
                if active.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
                    active.fetch_sub(1, Ordering::Relaxed);
                    let _ = s.set_write_timeout(Some(CLIENT_TIMEOUT));
                    let _ = (&s).write_all(b"error: too many control clients, try again\n");
                    continue;
                }
                let (sw, active) = (sw.clone(), active.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("ctl-client".into())
                        .spawn(move || {
                            if let Err(e) = answer(s, &sw) {
                                log::warn!("ctl: {e:#}");
                            }
                            active.fetch_sub(1, Ordering::Relaxed);
                        });
                if let Err(e) = spawned {
                    log::warn!("ctl: cannot serve a client: {e}");
                }
            }
        })
        .context("spawn ctl thread")?;
    Ok(())
}

/// Who is asking: root and the switch's own user may change the switch; anyone else who may
/// open the socket (`control_socket_mode` / `_group`) may only read it.
fn may_change(s: &UnixStream) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size given; both outlive the call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    // SAFETY: geteuid cannot fail.
    r == 0 && (cred.uid == 0 || cred.uid == unsafe { libc::geteuid() })
}

fn answer(s: UnixStream, sw: &Switch) -> anyhow::Result<()> {
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut input = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    (&mut input).take(256).read_line(&mut line)?;
    let line = line.trim();
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
    let done = |r: anyhow::Result<()>, what: String| match r {
        Ok(()) => format!("ok: {what}\n"),
        Err(e) => format!("error: {e:#}\n"),
    };
    let changes = matches!(verb, "add-port" | "del-port" | "pin" | "rebalance");
    let reply = match verb {
        _ if changes && !may_change(&s) => format!(
            "error: {verb} changes the switch: only root or the switch's own user may; this \
             client may read (stats, pmd-stats-show, pmd-rxq-show)\n"
        ),
        "stats" => format_stats(&stats_json(sw)),
        "stats-json" => stats_json(sw).to_string() + "\n",
        // The client read the file and sent it (see `client`): the switch never opens a path
        // a client names, so no error quotes a file the client could not read.
        "add-port" => {
            let mut text = String::new();
            let read = input
                .take(MAX_PORT_FILE)
                .read_to_string(&mut text)
                .with_context(|| format!("{arg}: not sent whole as UTF-8 text"));
            done(
                read.and_then(|_| {
                    crate::config::port_from_text(Path::new(arg), &text)
                        .map_err(anyhow::Error::from)
                })
                .and_then(|pc| sw.add_port(pc)),
                format!("added the port of {arg}"),
            )
        }
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
                "source_queues": p.sources, "isolated": p.isolated, "sleeps": s.sleeps,
                "tsc_hz": sw.tsc_hz,
            })
        })
        .collect();
    let rxqs: Vec<Value> = sw
        .dp
        .source_show()
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
    let mut out = format!("{} source queue(s) moved\n", moves.len());
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

/// `pin PORT QUEUE CORE|none`: pin a source queue to a PMD's core (or unpin it), moving it now.
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
            "pmd thread core {}{}:\n  source queues: {}\n  packets: {}\n  busy cycles: {} ({:.2}%)\n  idle cycles: {} ({:.2}%)\n  avg cycles per packet: {:.1}\n  busy in the last second: {:.1}%\n  sleeps (adaptive): {}\n  running for: {:.1} s\n",
            p["core"],
            if p["isolated"] == true { " (isolated)" } else { "" },
            n(&p["source_queues"]),
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
/// Send `cmd` (one line, then `body` if any: the file of `add-port`) and return the reply.
pub fn client(path: &Path, cmd: &str, body: Option<&[u8]>) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(path)
        .with_context(|| format!("connect to {} (is ringswitch running?)", path.display()))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    if let Some(b) = body {
        s.write_all(b)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if let Some(e) = out.strip_prefix("error: ") {
        anyhow::bail!("{}", e.trim_end());
    }
    Ok(out)
}
