//! The control socket: a unix socket taking one JSON `Request` line and answering one JSON
//! `Response` line (protocol.rs), and the `ringswitch ctl` client for it, which prints the
//! replies as text (text.rs) or JSON. The server accepts on its own control thread and answers
//! each client on a thread of its own (16 at most, each with a 2 s timeout); only root and the
//! switch's own user may change the switch.

pub mod protocol;
pub mod text;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dataplane::{Assign, Move, QueueCounters};

use protocol::{
    Direction, DpdkReport, MoveReport, PmdReport, Policy, PortReport, QueueReport, Request,
    Response, SourceQueueReport, StatsReport,
};

use crate::config::SocketPerm;
use crate::switch::Switch;

/// Clients served at once; one more is told so and closed.
const MAX_CLIENTS: usize = 16;
/// How long a client has to send its request (and to take the reply).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest port file `add-port` sends.
const MAX_PORT_FILE: usize = 64 * 1024;
/// Longest request line: a port file, JSON-escaped (at most 6 bytes per byte), and the rest.
const MAX_REQUEST: u64 = 6 * MAX_PORT_FILE as u64 + 4096;

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
                    let _ = reply(&s, &error("too many control clients, try again"));
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
    let mut line = String::new();
    BufReader::new(s.try_clone()?)
        .take(MAX_REQUEST)
        .read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => error(format!("malformed request ({e}); use `ringswitch ctl`")),
        Ok(r) if r.changes() && !may_change(&s) => error(
            "this request changes the switch: only root or the switch's own user may; this \
             client may read (stats, pmd-stats-show, pmd-rxq-show)",
        ),
        Ok(r) => handle(sw, r).unwrap_or_else(|e| error(format!("{e:#}"))),
    };
    reply(&s, &response)
}

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

fn reply(mut s: &UnixStream, r: &Response) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(r)?;
    line.push(b'\n');
    s.write_all(&line)?;
    Ok(())
}

fn handle(sw: &Switch, r: Request) -> anyhow::Result<Response> {
    Ok(match r {
        Request::Stats => Response::Stats(stats(sw)),
        Request::Rebalance { policy } => {
            let policy = policy.map(|p| match p {
                Policy::Roundrobin => Assign::RoundRobin,
                Policy::Cycles => Assign::Cycles,
            });
            Response::Moved {
                moves: move_reports(sw, &sw.dp.rebalance(policy)?),
            }
        }
        Request::Pin { port, queue, core } => {
            let id = sw
                .port_id(&port)
                .with_context(|| format!("no running port {port:?}"))?;
            Response::Moved {
                moves: move_reports(sw, &sw.dp.pin(id, queue, core)?),
            }
        }
        // The client read the file and sent it (see `client`): the switch never opens a path
        // a client names, so no error quotes a file the client could not read.
        Request::AddPort { path, text } => {
            anyhow::ensure!(
                text.len() <= MAX_PORT_FILE,
                "{path}: a port file is at most {MAX_PORT_FILE} bytes"
            );
            sw.add_port(crate::config::port_from_text(Path::new(&path), &text)?)?;
            Response::Done {
                what: format!("added the port of {path}"),
            }
        }
        Request::DelPort { name } => {
            sw.del_port(&name)?;
            Response::Done {
                what: format!("removed port {name}"),
            }
        }
    })
}

/// Sum of a port's queues of one direction.
fn total<'a>(queues: impl Iterator<Item = &'a QueueCounters>) -> QueueCounters {
    let mut t = QueueCounters::default();
    for q in queues {
        t.accumulate(q);
    }
    t
}

/// Everything `stats` reports, read now.
pub fn stats(sw: &Switch) -> StatsReport {
    let pmds = sw
        .dp
        .pmd_show()
        .iter()
        .map(|p| {
            let c = p.counters;
            let total = (c.busy_cycles + c.idle_cycles).max(1);
            PmdReport {
                core: p.core.0,
                counters: c,
                busy_pct: 100.0 * c.busy_cycles as f64 / total as f64,
                busy_pct_last: p.busy_pct,
                cycles_per_packet: c.busy_cycles as f64 / c.packets.max(1) as f64,
                source_queues: p.sources,
                isolated: p.isolated,
                tsc_hz: sw.tsc_hz,
            }
        })
        .collect();
    let sources = sw
        .dp
        .source_show()
        .iter()
        .map(|q| SourceQueueReport {
            core: q.core.0,
            port: sw.port_name(q.port),
            queue: q.queue,
            pinned: q.pinned,
            running: q.running,
            busy_pct: q.busy_pct,
        })
        .collect();
    let ports = sw.with_ports(|ports| {
        ports
            .iter()
            .map(|p| {
                let queues: Vec<QueueReport> = p
                    .queues
                    .iter()
                    .enumerate()
                    .map(|(i, q)| QueueReport {
                        queue: i,
                        kind: match i % 2 {
                            0 => Direction::ToPort,
                            _ => Direction::FromPort,
                        },
                        counters: q.snapshot(),
                    })
                    .collect();
                let side = |d: Direction| {
                    total(queues.iter().filter(|q| q.kind == d).map(|q| &q.counters))
                };
                let dpdk = p.dpdk_port.map(|id| {
                    let link = dataplane::dpdk::link(id);
                    let (imissed, ierrors, oerrors) = dataplane::dpdk::hw_drops(id);
                    DpdkReport {
                        port_id: id,
                        link_up: link.up,
                        speed_mbps: link.speed_mbps,
                        imissed,
                        ierrors,
                        oerrors,
                    }
                });
                PortReport {
                    name: p.config.name.clone(),
                    kind: p.config.type_name().to_string(),
                    endpoint: p.config.attachment(),
                    connected: p.connected.load(Ordering::Relaxed),
                    error: p.error.clone(),
                    from_port: side(Direction::FromPort),
                    to_port: side(Direction::ToPort),
                    queues,
                    dpdk,
                }
            })
            .collect()
    });
    StatsReport {
        pmds,
        sources,
        ports,
    }
}

/// The queues that changed PMD, with their ports' names.
pub fn move_reports(sw: &Switch, moves: &[Move]) -> Vec<MoveReport> {
    moves
        .iter()
        .map(|m| MoveReport {
            port: sw.port_name(m.port),
            queue: m.queue,
            from: m.from.0,
            to: m.to.0,
        })
        .collect()
}

/// `ringswitch ctl`: send one request, return the switch's response (an error response is an
/// error).
pub fn client(path: &Path, request: &Request) -> anyhow::Result<Response> {
    let mut s = UnixStream::connect(path)
        .with_context(|| format!("connect to {} (is ringswitch running?)", path.display()))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    s.write_all(&line)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match serde_json::from_str(&out).with_context(|| format!("unreadable reply {out:?}"))? {
        Response::Error { message } => anyhow::bail!("{message}"),
        r => Ok(r),
    }
}
