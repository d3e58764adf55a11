//! What `ringswitch ctl` prints, formatted from the typed replies (protocol.rs): `stats`,
//! `pmd-stats-show` and `pmd-rxq-show` as OVS prints theirs, and moved queues. Client side.

use super::protocol::{MoveReport, PortReport, StatsReport};

/// `stats`: per PMD one line, per port its state and the counters its kind can have.
pub fn stats(r: &StatsReport) -> String {
    let mut out = String::new();
    for p in &r.pmds {
        out += &format!(
            "pmd core {}: packets {} busy {:.1}% cycles/packet {:.1} iterations {}\n",
            p.core, p.counters.packets, p.busy_pct, p.cycles_per_packet, p.counters.iterations
        );
    }
    for p in &r.ports {
        out += &port(p);
    }
    out
}

fn port(p: &PortReport) -> String {
    let vhost = p.is_vhost();
    let state = match (&p.error, &p.dpdk) {
        (Some(e), _) => format!("FAILED: {e}"),
        (None, Some(d)) => format!(
            "link {} imissed {} ierrors {} oerrors {}",
            if d.link_up { "up" } else { "down" },
            d.imissed,
            d.ierrors,
            d.oerrors
        ),
        _ if p.connected && vhost => "connected".into(),
        _ if p.connected => "running".into(),
        _ => "waiting for a frontend".into(),
    };
    let (t, r) = (&p.from_port, &p.to_port);
    // Only the drop reasons this kind of port can have.
    let drops = |list: &[(&str, u64)]| {
        list.iter()
            .map(|(k, v)| format!(" {k} {v}"))
            .collect::<String>()
    };
    let (from, to, from_drops, to_drops) = if vhost {
        (
            "from guest:",
            "to guest:  ",
            drops(&[
                ("bad_descriptor", t.drop_bad_descriptor),
                ("runt", t.drop_runt),
                ("too_big", t.drop_too_big),
                ("no_destination", t.drop_no_destination),
                ("undelivered", t.drop_undelivered),
            ]),
            drops(&[
                ("no_rx_buffer", r.drop_no_rx_buffer),
                ("too_big", r.drop_too_big),
                ("bad_descriptor", r.drop_bad_descriptor),
            ]),
        )
    } else {
        (
            "from port: ",
            "to port:   ",
            drops(&[
                ("runt", t.drop_runt),
                ("too_big", t.drop_too_big),
                ("no_destination", t.drop_no_destination),
                ("undelivered", t.drop_undelivered),
            ]),
            drops(&[
                ("too_big", r.drop_too_big),
                ("no_mbuf", r.drop_no_mbuf),
                ("tx_full", r.drop_tx_full),
                ("tx_error", r.drop_tx_error),
            ]),
        )
    };
    let notifications = match vhost {
        true => format!(
            "  notifications {}",
            r.guest_notifications + t.guest_notifications
        ),
        false => String::new(),
    };
    let broken = match r.ring_broken + t.ring_broken > 0 {
        true => "  RING BROKEN (needs reset)",
        false => "",
    };
    format!(
        "port {} ({} {}): {state}\n  {from} packets {} bytes {} forwarded {} drops:{from_drops}\n  {to} packets {} bytes {} drops:{to_drops}{notifications}{broken}\n",
        p.name, p.kind, p.endpoint, t.packets, t.bytes, t.forwarded, r.packets, r.bytes,
    )
}

/// `pmd-stats-show`, as OVS prints it: per PMD, packets, cycles per packet, busy and idle.
pub fn pmds(r: &StatsReport) -> String {
    let mut out = String::new();
    for p in &r.pmds {
        let c = &p.counters;
        out += &format!(
            "pmd thread core {}{}:\n  source queues: {}\n  packets: {}\n  busy cycles: {} ({:.2}%)\n  idle cycles: {} ({:.2}%)\n  avg cycles per packet: {:.1}\n  busy in the last second: {:.1}%\n  sleeps (adaptive): {}\n  running for: {:.1} s\n",
            p.core,
            if p.isolated { " (isolated)" } else { "" },
            p.source_queues,
            c.packets,
            c.busy_cycles,
            p.busy_pct,
            c.idle_cycles,
            100.0 - p.busy_pct,
            p.cycles_per_packet,
            p.busy_pct_last,
            c.sleeps,
            (c.busy_cycles + c.idle_cycles) as f64 / p.tsc_hz.max(1) as f64,
        );
    }
    out
}

/// `pmd-rxq-show`, as OVS prints it: which PMD polls which source queue, and its share of
/// that PMD.
pub fn sources(r: &StatsReport) -> String {
    let mut out = String::new();
    for p in &r.pmds {
        out += &format!(
            "pmd thread core {}{}:\n  busy in the last second: {:.1}%\n",
            p.core,
            if p.isolated { " (isolated)" } else { "" },
            p.busy_pct_last
        );
        for q in r.sources.iter().filter(|q| q.core == p.core) {
            out += &format!(
                "  port: {:<16} queue-id: {:>3} {}{} pmd usage: {:>5.1} %\n",
                q.port,
                q.queue,
                if q.running {
                    "(enabled) "
                } else {
                    "(disabled)"
                },
                if q.pinned { " (pinned)" } else { "" },
                q.busy_pct
            );
        }
    }
    out
}

/// The source queues that changed PMD, a line each (rebalance, pin, auto-rebalance's log).
pub fn moves(moves: &[MoveReport]) -> String {
    let mut out = format!("{} source queue(s) moved\n", moves.len());
    for m in moves {
        out += &format!(
            "  port {} queue {}: core {} -> core {}\n",
            m.port, m.queue, m.from, m.to
        );
    }
    out
}
