//! Starting each kind of port: a DPDK port on its mbuf pools, a tap's queues, a vhost-user
//! port's listener or reconnect loop, each handed to the PMDs. Control threads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use dataplane::dpdk::{self, EthConfig, EthDev, Mempool};
use dataplane::{Dataplane, DpdkPort, Port, PortId, QueueStats, Source, Tap, TapPort, VhostPort};

use super::listen::{bind_socket, Serve};
use super::{queue_stats, PortInfo, PortThread};
use crate::config::{Config, PortConfig, PortKind, VhostMode};
use crate::vhost_user::VhostUserDevice;

/// One mbuf pool per PMD, sized for the DPDK ports that PMD polls; the EAL is started with the
/// first one.
pub(super) struct DpdkPools {
    pub(super) eal_args: Vec<String>,
    /// Per PMD: mbufs the RX and TX rings of the configured ports can hold.
    pub(super) need: Vec<u32>,
    /// Frame bytes one mbuf holds: enough for the largest configured MTU.
    pub(super) frame_room: u32,
    pub(super) pools: HashMap<usize, Arc<Mempool>>,
}

/// Mbufs a DPDK port's rings can hold, and the frame room its MTU needs (Ethernet header and
/// one VLAN tag beyond the MTU).
pub(super) fn dpdk_needs(pc: &PortConfig) -> (u32, u32) {
    match pc.kind {
        PortKind::Dpdk {
            mtu,
            rx_desc,
            tx_desc,
            ..
        } => (
            pc.queues as u32 * (rx_desc as u32 + tx_desc as u32),
            (mtu.unwrap_or(1500) as u32 + 18).max(2048),
        ),
        _ => (0, 0),
    }
}

impl DpdkPools {
    pub(super) fn new(cfg: &Config, n_pmds: usize) -> DpdkPools {
        let mut need = vec![0u32; n_pmds];
        let mut frame_room = 2048;
        for (i, pc) in cfg.ports.iter().enumerate() {
            let (n, room) = dpdk_needs(pc);
            need[i % n_pmds] += n;
            frame_room = frame_room.max(room);
        }
        DpdkPools {
            eal_args: cfg.eal_args.clone(),
            need,
            frame_room,
            pools: HashMap::new(),
        }
    }

    /// The pool of PMD `pmd`, for port `pc` to draw from; made (and the EAL started) the first
    /// time. A port added later must fit the pool made for the configured ports.
    pub(super) fn pool_for(&mut self, pmd: usize, pc: &PortConfig) -> anyhow::Result<Arc<Mempool>> {
        let (n, room) = dpdk_needs(pc);
        if let Some(p) = self.pools.get(&pmd) {
            anyhow::ensure!(
                room <= p.frame_room,
                "its MTU needs {room}-byte mbufs, the running pool has {} (configure the largest MTU at start)",
                p.frame_room
            );
            return Ok(p.clone());
        }
        dpdk::eal_init(&self.eal_args)?;
        // Rings full, plus what PMD bursts and per-lcore caches hold; 2^k - 1 suits the ring.
        let n = (self.need[pmd].max(n) + 4096).next_power_of_two() - 1;
        let room = self.frame_room.max(room);
        let pool = Mempool::new(&format!("rs_pmd{pmd}"), n, room)?;
        log::info!("DPDK: mbuf pool for PMD {pmd}: {n} mbufs of {room} bytes");
        self.pools.insert(pmd, pool.clone());
        Ok(pool)
    }
}

pub(super) fn start_dpdk_port(
    pc: &PortConfig,
    id: PortId,
    dp: &Dataplane,
    pool: Arc<Mempool>,
) -> anyhow::Result<PortInfo> {
    let PortKind::Dpdk {
        devargs,
        mtu,
        rx_desc,
        tx_desc,
    } = &pc.kind
    else {
        anyhow::bail!("not a dpdk port");
    };
    let cfg = EthConfig {
        rx_queues: pc.queues,
        tx_queues: pc.queues,
        rx_desc: *rx_desc,
        tx_desc: *tx_desc,
        mtu: *mtu,
    };
    let dev = EthDev::open(devargs, &cfg, pool)?;
    let (port_id, mac) = (dev.port_id, dev.mac);
    let link = dpdk::link(port_id);
    let mut info = PortInfo::new(pc, id, queue_stats(pc.queues));
    let (to_port, from_port) = split_stats(&info.queues);
    let port = Port::Dpdk(DpdkPort::new(id, dev, to_port, from_port.into()));
    start_device_port(dp, port, pc)?;
    log::info!(
        "port {}: dpdk {devargs} (port id {port_id}, {}, {} queue(s), link {} {} Mb/s)",
        pc.name,
        fmt_mac(&mac),
        pc.queues,
        if link.up { "up" } else { "down" },
        link.speed_mbps
    );
    info.connected.store(true, Ordering::Relaxed);
    info.dpdk_port = Some(port_id);
    info.started = true;
    Ok(info)
}

/// A device port's counters: per queue, those of frames into it and those of frames from it.
pub(super) fn split_stats(
    queues: &[Arc<QueueStats>],
) -> (Vec<Arc<QueueStats>>, Vec<Arc<QueueStats>>) {
    let to = queues.iter().step_by(2).cloned().collect();
    let from = queues.iter().skip(1).step_by(2).cloned().collect();
    (to, from)
}

/// Hand a device port to the PMDs, and each of its source queues to the PMD the policy picks.
pub(super) fn start_device_port(dp: &Dataplane, port: Port, pc: &PortConfig) -> anyhow::Result<()> {
    let id = port.id();
    dp.add_port(port, &pc.rxq_affinity)?;
    for q in 0..pc.queues {
        let source = match pc.kind {
            PortKind::Tap { .. } => Source::Tap,
            _ => Source::Dpdk,
        };
        if let Err(e) = dp.add_source(id, q, source) {
            drop(dp.remove_port(id));
            return Err(e.into());
        }
    }
    Ok(())
}

pub(super) fn start_tap_port(
    pc: &PortConfig,
    id: PortId,
    dp: &Dataplane,
    ifname: &str,
) -> anyhow::Result<PortInfo> {
    let queues = (0..pc.queues)
        .map(|_| Tap::open(ifname))
        .collect::<Result<Vec<_>, _>>()?;
    let mut info = PortInfo::new(pc, id, queue_stats(pc.queues));
    let (to_port, from_port) = split_stats(&info.queues);
    let port = Port::Tap(TapPort {
        id,
        queues: queues.into_boxed_slice(),
        to_port: to_port.into(),
        from_port: from_port.into(),
    });
    start_device_port(dp, port, pc)?;
    log::info!("port {}: tap {ifname} with {} queue(s)", pc.name, pc.queues);
    info.connected.store(true, Ordering::Relaxed);
    info.started = true;
    Ok(info)
}

pub(super) fn fmt_mac(m: &[u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

pub(super) fn start_vhost_port(
    pc: &PortConfig,
    id: PortId,
    dp: &Arc<Dataplane>,
) -> anyhow::Result<PortInfo> {
    let PortKind::VhostUser {
        mode,
        socket,
        socket_perm,
    } = &pc.kind
    else {
        anyhow::bail!("not a vhost-user port");
    };
    let listener = match mode {
        VhostMode::Server => Some(bind_socket(socket, *socket_perm)?),
        VhostMode::Client => None,
    };
    let mut info = PortInfo::new(pc, id, queue_stats(pc.queues));
    dp.add_port(VhostPort::port(id, pc.queues as usize), &pc.rxq_affinity)?;
    let device = Arc::new(Mutex::new(VhostUserDevice::new(
        pc.name.clone(),
        id,
        dp.clone(),
        info.queues.clone(),
    )));
    let stop = Arc::new(AtomicBool::new(false));
    let conn = Arc::new(Mutex::new(None));
    let thread_listener = listener.as_ref().map(|l| l.try_clone()).transpose()?;
    let serve = Serve {
        name: pc.name.clone(),
        dev: device,
        connected: info.connected.clone(),
        stop: stop.clone(),
        conn: conn.clone(),
        busy: AtomicBool::new(false),
    };
    let path = socket.clone();
    let handle = std::thread::Builder::new()
        .name(format!("vhost-{}", pc.name))
        .spawn(move || match thread_listener {
            Some(l) => Arc::new(serve).listener(l),
            None => serve.client(&path),
        })
        .context("spawn port thread")?;
    log::info!(
        "port {}: vhost-user {:?} on {} with {} queue pair(s)",
        pc.name,
        mode,
        socket.display(),
        pc.queues
    );
    info.thread = Some(PortThread {
        stop,
        listener,
        conn,
        handle: Mutex::new(Some(handle)),
    });
    info.started = true;
    Ok(info)
}
