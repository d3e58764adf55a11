//! The control socket's protocol, shared by the server (`ctl::serve`) and the client
//! (`ringswitch ctl`): one JSON `Request` line, one JSON `Response` line. Typed both ways, so a
//! renamed field fails to compile rather than printing 0; the text the CLI prints is formatted
//! from these types (text.rs).

use dataplane::{PmdCounters, QueueCounters};
use serde::{Deserialize, Serialize};

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Per-PMD and per-port counters (`Response::Stats`).
    Stats,
    /// Reassign the source queues now, by the configured policy or the one named.
    Rebalance { policy: Option<Policy> },
    /// Pin a source queue of a port to a PMD's core (None: unpin), moving it now.
    Pin {
        port: String,
        queue: u16,
        core: Option<usize>,
    },
    /// Start the port a port file describes. The client reads the file and sends its text:
    /// the switch never opens a path a client names.
    AddPort { path: String, text: String },
    /// Stop and remove a port.
    DelPort { name: String },
}

impl Request {
    /// Whether it changes the switch (only root and the switch's own user may).
    pub fn changes(&self) -> bool {
        !matches!(self, Request::Stats)
    }
}

/// A source-queue assignment policy, as OVS's `pmd-rxq-assign`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Roundrobin,
    Cycles,
}

/// What the switch answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Response {
    Stats(StatsReport),
    /// Source queues moved (rebalance, pin).
    Moved {
        moves: Vec<MoveReport>,
    },
    /// Done (add-port, del-port): what was done.
    Done {
        what: String,
    },
    Error {
        message: String,
    },
}

/// Everything `stats` reports; `ringswitch ctl stats --json` prints it as is. Directions are
/// the switch's: `from_port` is what it took from the port (a guest's TX queues, a device's RX
/// queues), `to_port` what it delivered into the port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub pmds: Vec<PmdReport>,
    pub sources: Vec<SourceQueueReport>,
    pub ports: Vec<PortReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PmdReport {
    pub core: usize,
    #[serde(flatten)]
    pub counters: PmdCounters,
    /// Busy share since start, and over the last measurement window, in %.
    pub busy_pct: f64,
    pub busy_pct_last: f64,
    pub cycles_per_packet: f64,
    pub source_queues: usize,
    pub isolated: bool,
    pub tsc_hz: u64,
}

/// One source queue: which PMD polls it, and how busy it keeps that PMD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceQueueReport {
    pub core: usize,
    pub port: String,
    pub queue: u16,
    pub pinned: bool,
    pub running: bool,
    pub busy_pct: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortReport {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub endpoint: String,
    pub connected: bool,
    pub error: Option<String>,
    pub from_port: QueueCounters,
    pub to_port: QueueCounters,
    pub queues: Vec<QueueReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpdk: Option<DpdkReport>,
}

impl PortReport {
    pub fn is_vhost(&self) -> bool {
        self.kind == "vhost-user"
    }
}

/// One queue of a port: even numbers count frames into the port, odd ones frames from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueReport {
    pub queue: usize,
    pub kind: Direction,
    #[serde(flatten)]
    pub counters: QueueCounters,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    ToPort,
    FromPort,
}

/// A DPDK port's link and the drops only the device sees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpdkReport {
    pub port_id: u16,
    pub link_up: bool,
    pub speed_mbps: u32,
    pub imissed: u64,
    pub ierrors: u64,
    pub oerrors: u64,
}

/// A source queue that changed PMD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveReport {
    pub port: String,
    pub queue: u16,
    pub from: usize,
    pub to: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip_as_json_lines() {
        let reqs = [
            Request::Stats,
            Request::Rebalance {
                policy: Some(Policy::Cycles),
            },
            Request::Pin {
                port: "vm1".into(),
                queue: 1,
                core: None,
            },
            Request::AddPort {
                path: "/etc/p.toml".into(),
                text: "name = \"a\"\n".into(),
            },
            Request::DelPort { name: "a".into() },
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        }
        let line = serde_json::to_string(&Request::Rebalance { policy: None }).unwrap();
        assert_eq!(line, r#"{"cmd":"rebalance","policy":null}"#);
        let q = QueueReport {
            queue: 3,
            kind: Direction::FromPort,
            counters: QueueCounters {
                packets: 7,
                ..Default::default()
            },
        };
        let v = serde_json::to_value(&q).unwrap();
        assert_eq!(
            (v["kind"].as_str(), v["packets"].as_u64()),
            (Some("from_port"), Some(7))
        );
        assert_eq!(serde_json::from_value::<QueueReport>(v).unwrap(), q);
        // Unknown commands and missing fields are refused, not guessed at.
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"del-port"}"#).is_err());
    }
}
