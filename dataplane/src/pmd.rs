//! PMD threads: a pinned, busy-polling loop that takes bursts from every port it owns (guest TX
//! queues, DPDK RX queues, taps), switches each frame by destination MAC and copies it straight
//! into the destination (a guest's RX buffers, an mbuf, a tap `writev`). Control talks to a PMD
//! only through a bounded command queue drained between bursts; each command is acknowledged
//! after the PMD applied it, which is the quiescent point control waits for before it answers
//! GET_VRING_BASE, unmaps memory or tears a port down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::dpdk::MbufBurst;
use crate::l2::{is_multicast, MacTable};
use crate::offload::{Frame, VnetHdr, VNET_HDR_LEN};
use crate::port::{Delivery, NetFeatures, PortRt, RxScratch};
use crate::stats::{PmdStats, QueueStats};
use crate::tap::{self, TapIo, TAP_HDR_LEN};
use crate::virtq::copy::gather;
use crate::virtq::{PackedRing, Seg, SegList, VirtQueue, Virtq};
use crate::{tsc, CoreId, PortId, QueueIdx, BURST, MAX_FRAME};

/// Ports one PMD can hold; ids are dense indices below this.
pub const MAX_PORTS: usize = 256;
const MAC_TABLE_SIZE: usize = 8192;
/// How long control waits for a PMD to acknowledge a command before calling it stuck.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PmdError {
    #[error("cannot spawn PMD thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot pin PMD thread to core {0}")]
    Pin(usize),
    #[error("PMD on core {0} did not acknowledge a command within {ACK_TIMEOUT:?}")]
    Unresponsive(usize),
    #[error("port id {0} is beyond the PMD's {MAX_PORTS} ports")]
    PortId(u16),
}

/// Something the PMD hands back to control, to be dropped (unmapped, closed) there.
pub enum Returned {
    Ring(Box<Virtq>),
    Port(PortRt),
}

/// A one-shot acknowledgement from the PMD.
struct Reply {
    /// Set with Release by the PMD after it stopped using what the command replaced; control's
    /// Acquire load pairs with it, so everything the PMD did before is visible to control.
    done: AtomicBool,
    returned: ArrayQueue<Returned>,
}

enum Command {
    AddPort(PortRt, Arc<Reply>),
    RemovePort(PortId, Arc<Reply>),
    SetRing {
        port: PortId,
        queue: QueueIdx,
        features: NetFeatures,
        ring: Option<Box<Virtq>>,
        reply: Arc<Reply>,
    },
}

struct Shared {
    cmds: ArrayQueue<Command>,
    stats: PmdStats,
    /// Set by control to end the loop (Relaxed: nothing else is published with it).
    stop: AtomicBool,
}

/// Control's handle on one PMD thread.
pub struct PmdHandle {
    core: CoreId,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl PmdHandle {
    /// Start a PMD pinned to `core`.
    pub fn spawn(core: CoreId) -> Result<PmdHandle, PmdError> {
        let shared = Arc::new(Shared {
            cmds: ArrayQueue::new(64),
            stats: PmdStats::default(),
            stop: AtomicBool::new(false),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("pmd-c{}", core.0))
            .spawn(move || {
                let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: core.0 });
                let _ = tx.send(pinned);
                if pinned {
                    Pmd::new(s).run();
                }
            })
            .map_err(PmdError::Spawn)?;
        if rx.recv() != Ok(true) {
            let _ = thread.join();
            return Err(PmdError::Pin(core.0));
        }
        Ok(PmdHandle {
            core,
            shared,
            thread: Some(thread),
        })
    }

    pub fn core(&self) -> CoreId {
        self.core
    }

    pub fn stats(&self) -> &PmdStats {
        &self.shared.stats
    }

    /// Post a command and wait until the PMD applied it; returns what it handed back.
    fn call(&self, make: impl FnOnce(Arc<Reply>) -> Command) -> Result<Option<Returned>, PmdError> {
        let reply = Arc::new(Reply {
            done: AtomicBool::new(false),
            returned: ArrayQueue::new(1),
        });
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut cmd = make(reply.clone());
        while let Err(back) = self.shared.cmds.push(cmd) {
            cmd = back;
            if Instant::now() > deadline || self.finished() {
                return Err(PmdError::Unresponsive(self.core.0));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        while !reply.done.load(Ordering::Acquire) {
            if Instant::now() > deadline || self.finished() {
                return Err(PmdError::Unresponsive(self.core.0));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(reply.returned.pop())
    }

    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    pub fn add_port(&self, port: impl Into<PortRt>) -> Result<(), PmdError> {
        let port = port.into();
        if port.id().0 as usize >= MAX_PORTS {
            return Err(PmdError::PortId(port.id().0));
        }
        self.call(|r| Command::AddPort(port, r)).map(drop)
    }

    /// Detach a port; returns it (with any rings it still held) once the PMD let go of it.
    pub fn remove_port(&self, port: PortId) -> Result<Option<PortRt>, PmdError> {
        Ok(match self.call(|r| Command::RemovePort(port, r))? {
            Some(Returned::Port(p)) => Some(p),
            _ => None,
        })
    }

    /// Install (Some) or detach (None) one virtqueue of a port. Returns the ring it replaced,
    /// which the PMD no longer touches: its `last_avail_idx` is final.
    pub fn set_ring(
        &self,
        port: PortId,
        queue: QueueIdx,
        features: NetFeatures,
        ring: Option<Box<Virtq>>,
    ) -> Result<Option<Box<Virtq>>, PmdError> {
        let r = self.call(|reply| Command::SetRing {
            port,
            queue,
            features,
            ring,
            reply,
        })?;
        Ok(match r {
            Some(Returned::Ring(r)) => Some(r),
            _ => None,
        })
    }
}

impl Drop for PmdHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The PMD's own state; lives on the PMD thread only.
struct Pmd {
    shared: Arc<Shared>,
    fabric: Fabric,
    /// The frame being switched, as segments (guest buffers, an mbuf chain or `tap_buf`).
    src: Box<SegList>,
    /// Frames received from a DPDK port, freed after each burst.
    mbufs: MbufBurst,
    tap_hdr: [u8; TAP_HDR_LEN],
    tap_buf: Box<[u8]>,
    /// The thread has a DPDK lcore id (mempool caches); done once the first DPDK port arrives.
    dpdk_registered: bool,
}

/// Every port the PMD holds, as destinations, and the MAC table: what forwarding needs, apart
/// from the source frame.
struct Fabric {
    /// Indexed by PortId.
    ports: Vec<Option<PortRt>>,
    /// Ids of the ports present, in poll order (capacity MAX_PORTS: pushing never allocates).
    active: Vec<PortId>,
    macs: MacTable,
    rx: RxScratch,
}

/// What happened to one frame taken from a port.
#[derive(Clone, Copy)]
enum Verdict {
    Forwarded,
    BadDescriptor,
    Runt,
    TooBig,
    NoDestination,
    Undelivered,
    BadOffload,
}

/// A burst's verdicts, published to the source queue's counters once.
#[derive(Default)]
struct Tally {
    by_verdict: [u64; 7],
    packets: u64,
    forwarded_bytes: u64,
}

impl Tally {
    #[inline]
    fn count(&mut self, v: Verdict, frame_len: u32) {
        self.packets += 1;
        self.by_verdict[v as usize] += 1;
        if matches!(v, Verdict::Forwarded) {
            self.forwarded_bytes += frame_len as u64;
        }
    }

    #[inline]
    fn publish(&self, s: &QueueStats) {
        let c = &self.by_verdict;
        s.add(&s.packets, self.packets);
        s.add(&s.bytes, self.forwarded_bytes);
        s.add(&s.forwarded, c[Verdict::Forwarded as usize]);
        s.add(&s.drop_bad_descriptor, c[Verdict::BadDescriptor as usize]);
        s.add(&s.drop_runt, c[Verdict::Runt as usize]);
        s.add(&s.drop_too_big, c[Verdict::TooBig as usize]);
        s.add(&s.drop_no_destination, c[Verdict::NoDestination as usize]);
        s.add(&s.drop_undelivered, c[Verdict::Undelivered as usize]);
        s.add(&s.drop_bad_offload, c[Verdict::BadOffload as usize]);
    }
}

/// What one port contributes to a poll pass (copied out so the port is not borrowed meanwhile).
enum PollPlan {
    Vhost { tx_queues: usize },
    Eth { dpdk_port: u16, rx_queues: u16 },
    Tap { queues: usize },
}

impl Pmd {
    fn new(shared: Arc<Shared>) -> Pmd {
        Pmd {
            shared,
            fabric: Fabric {
                ports: (0..MAX_PORTS).map(|_| None).collect(),
                active: Vec::with_capacity(MAX_PORTS),
                macs: MacTable::new(MAC_TABLE_SIZE),
                rx: RxScratch::default(),
            },
            src: Box::default(),
            mbufs: MbufBurst::default(),
            tap_hdr: [0; TAP_HDR_LEN],
            tap_buf: vec![0u8; MAX_FRAME as usize + 1].into_boxed_slice(),
            dpdk_registered: false,
        }
    }

    fn run(mut self) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let mut t0 = tsc::now();
        while !shared.stop.load(Ordering::Relaxed) {
            // Quiescent point: between bursts, nothing of any ring is held.
            while let Some(cmd) = shared.cmds.pop() {
                self.apply(cmd);
            }
            let moved = self.poll_all();
            let t1 = tsc::now();
            let dt = t1.wrapping_sub(t0);
            t0 = t1;
            let add = |c: &std::sync::atomic::AtomicU64, n: u64| {
                c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed)
            };
            if moved > 0 {
                add(&stats.busy_cycles, dt);
                add(&stats.packets, moved as u64);
            } else {
                add(&stats.idle_cycles, dt);
                // Nothing to do: PAUSE gives the pipeline to a sibling hyperthread (often the
                // guest's own vCPU thread) and stops this loop hammering lines the guest writes.
                std::hint::spin_loop();
            }
            add(&stats.iterations, 1);
        }
    }

    #[cold]
    fn apply(&mut self, cmd: Command) {
        let f = &mut self.fabric;
        let (reply, back) = match cmd {
            Command::AddPort(port, reply) => {
                if matches!(port, PortRt::Eth(_)) && !self.dpdk_registered {
                    self.dpdk_registered = true;
                    crate::dpdk::register_thread();
                }
                let id = port.id();
                f.macs.forget_port(id);
                if let Some(slot) = f.ports.get_mut(id.0 as usize) {
                    if slot.is_none() {
                        f.active.push(id);
                    }
                    *slot = Some(port);
                }
                (reply, None)
            }
            Command::RemovePort(id, reply) => {
                f.active.retain(|&p| p != id);
                f.macs.forget_port(id);
                let mut port = f.ports.get_mut(id.0 as usize).and_then(Option::take);
                // Nothing the PMD queued may outlive its hold on the port.
                if let Some(p) = port.as_mut() {
                    p.flush();
                }
                f.rx.dirty.retain(|&p| p != id);
                (reply, port.map(Returned::Port))
            }
            Command::SetRing {
                port,
                queue,
                features,
                ring,
                reply,
            } => {
                let back = match f.ports.get_mut(port.0 as usize) {
                    Some(Some(PortRt::Vhost(p))) => {
                        p.features = features;
                        match p.slot(queue.0) {
                            Some(slot) => std::mem::replace(slot, ring),
                            None => ring,
                        }
                    }
                    _ => ring,
                };
                (reply, back.map(Returned::Ring))
            }
        };
        if let Some(b) = back {
            reply.returned.force_push(b);
        }
        reply.done.store(true, Ordering::Release);
    }

    /// One pass over every port's receive side (a guest's TX queues, a device's RX queues);
    /// each burst's deliveries are published right after it.
    #[inline]
    fn poll_all(&mut self) -> usize {
        let mut moved = 0;
        for i in 0..self.fabric.active.len() {
            let id = self.fabric.active[i];
            let plan = match self.fabric.port_mut(id) {
                Some(PortRt::Vhost(p)) => PollPlan::Vhost {
                    tx_queues: p.tx.len(),
                },
                Some(PortRt::Eth(p)) => PollPlan::Eth {
                    dpdk_port: p.dev.port_id,
                    rx_queues: p.rx_queues,
                },
                Some(PortRt::Tap(p)) => PollPlan::Tap {
                    queues: p.queues.len(),
                },
                None => continue,
            };
            match plan {
                PollPlan::Vhost { tx_queues } => {
                    for q in 0..tx_queues {
                        moved += self.vhost_burst(id, q);
                        self.fabric.flush_dirty();
                    }
                }
                PollPlan::Eth {
                    dpdk_port,
                    rx_queues,
                } => {
                    for q in 0..rx_queues {
                        moved += self.eth_burst(id, dpdk_port, q);
                        self.fabric.flush_dirty();
                    }
                }
                PollPlan::Tap { queues } => {
                    for q in 0..queues {
                        moved += self.tap_burst(id, q);
                        self.fabric.flush_dirty();
                    }
                }
            }
        }
        moved
    }

    /// Take up to BURST frames from one guest TX queue and switch them.
    #[inline]
    fn vhost_burst(&mut self, src: PortId, q: usize) -> usize {
        // Take the ring out so the destinations can be borrowed mutably meanwhile.
        let (mut ring, features) = match self.fabric.port_mut(src) {
            Some(PortRt::Vhost(p)) => match p.tx[q].take() {
                Some(r) => (r, p.features),
                None => return 0,
            },
            _ => return 0,
        };
        let n = match &mut *ring {
            Virtq::Split(r) => self.switch_ring(src, q as u16, r, features),
            Virtq::Packed(r) => self.switch_packed(src, q as u16, r, features),
        };
        if let Some(PortRt::Vhost(p)) = self.fabric.port_mut(src) {
            p.tx[q] = Some(ring);
        }
        n
    }

    /// Packed rings out of line: the split-ring path is the one to keep tight.
    #[inline(never)]
    fn switch_packed(
        &mut self,
        src: PortId,
        queue: u16,
        ring: &mut PackedRing,
        features: NetFeatures,
    ) -> usize {
        self.switch_ring(src, queue, ring, features)
    }

    #[inline]
    fn switch_ring<R: VirtQueue>(
        &mut self,
        src: PortId,
        queue: u16,
        ring: &mut R,
        features: NetFeatures,
    ) -> usize {
        let hdr_len = features.hdr_len as u32;
        let n = ring.avail_pending().min(BURST as u16);
        if n == 0 {
            return 0;
        }
        // Every descriptor and frame of the burst was written on the guest's core: start all
        // those cache misses together instead of taking them one frame at a time.
        let mut heads = [0u16; BURST];
        let heads = &mut heads[..n as usize];
        for (i, h) in heads.iter_mut().enumerate() {
            *h = ring.head_at(i as u16);
            ring.prefetch_desc(*h);
        }
        for &h in heads.iter() {
            ring.prefetch_data(h, hdr_len);
        }
        let mut tally = Tally::default();
        for &head in heads.iter() {
            let (v, len) = if ring.walk_chain(head, false, &mut self.src).is_err() {
                (Verdict::BadDescriptor, 0)
            } else if self.src.total < hdr_len {
                (Verdict::Runt, 0)
            } else if features.tx_offloads {
                self.forward_offloaded(src, queue, hdr_len)
            } else {
                let len = self.src.total - hdr_len;
                let f = Frame {
                    segs: &self.src,
                    skip: hdr_len,
                    len,
                    vnet: VnetHdr::NONE,
                    queue,
                };
                (self.fabric.forward(src, &f), len)
            };
            tally.count(v, len);
            ring.push_used(head, 0);
        }
        ring.advance(n);
        ring.flush();
        tally.publish(ring.stats());
        n as usize
    }

    /// Switch the guest frame in `self.src`, whose virtio-net header may leave checksums or
    /// segmentation to do (the guest negotiated CSUM). Apart from the common path: a header
    /// passed around as a value is stored field by field, and loading it back whole stalls
    /// until those stores retire, which is behind the burst's cache misses.
    #[inline(never)]
    fn forward_offloaded(&mut self, src: PortId, queue: u16, hdr_len: u32) -> (Verdict, u32) {
        let len = self.src.total - hdr_len;
        let mut b = [0u8; VNET_HDR_LEN];
        gather(&self.src, 0, &mut b);
        (self.forward_with_header(src, queue, &b, hdr_len, len), len)
    }

    /// Switch `self.src[skip..skip + len]` with the virtio-net header `hdr` its sender wrote
    /// (a guest that negotiated CSUM, a tap); a header that does not fit the frame drops it.
    fn forward_with_header(
        &mut self,
        src: PortId,
        queue: u16,
        hdr: &[u8; VNET_HDR_LEN],
        skip: u32,
        len: u32,
    ) -> Verdict {
        let Ok(vnet) = VnetHdr::parse(hdr, len) else {
            return Verdict::BadOffload;
        };
        let f = Frame {
            segs: &self.src,
            skip,
            len,
            vnet,
            queue,
        };
        self.fabric.forward(src, &f)
    }

    /// Take up to BURST frames from one RX queue of a DPDK port and switch them.
    #[inline]
    fn eth_burst(&mut self, src: PortId, dpdk_port: u16, q: u16) -> usize {
        let n = self.mbufs.rx(dpdk_port, q);
        if n == 0 {
            return 0;
        }
        let mut tally = Tally::default();
        for i in 0..n {
            // A chain of more mbufs than a segment list holds is not taken apart.
            let (v, len) = match self.mbufs.segs(i, &mut self.src) {
                Some(len) => {
                    let f = Frame {
                        segs: &self.src,
                        skip: 0,
                        len,
                        vnet: VnetHdr::NONE,
                        queue: q,
                    };
                    (self.fabric.forward(src, &f), len)
                }
                None => (Verdict::TooBig, 0),
            };
            tally.count(v, len);
        }
        self.mbufs.free_all();
        if let Some(PortRt::Eth(p)) = self.fabric.port_mut(src) {
            if let Some(s) = p.from_port.get(q as usize) {
                tally.publish(s);
            }
        }
        n
    }

    /// Read up to BURST frames from one tap queue (one `readv` each) and switch them.
    #[inline]
    fn tap_burst(&mut self, src: PortId, q: usize) -> usize {
        let fd = match self.fabric.port_mut(src) {
            Some(PortRt::Tap(p)) => match p.queues.get(q) {
                Some(t) => t.fd(),
                None => return 0,
            },
            _ => return 0,
        };
        let mut tally = Tally::default();
        while (tally.packets as usize) < BURST {
            let TapIo::Done(len) = tap::read_frame(fd, &mut self.tap_hdr, &mut self.tap_buf) else {
                break;
            };
            self.src.clear();
            self.src.push(Seg {
                ptr: self.tap_buf.as_mut_ptr(),
                len,
            });
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr.copy_from_slice(&self.tap_hdr[..VNET_HDR_LEN]);
            let v = self.forward_with_header(src, q as u16, &hdr, 0, len);
            tally.count(v, len);
        }
        if let Some(PortRt::Tap(p)) = self.fabric.port_mut(src) {
            if let Some(s) = p.from_port.get(q) {
                tally.publish(s);
            }
        }
        tally.packets as usize
    }
}

impl Fabric {
    #[inline]
    fn port_mut(&mut self, id: PortId) -> Option<&mut PortRt> {
        self.ports.get_mut(id.0 as usize)?.as_mut()
    }

    /// Publish what the last burst queued at its destinations: the sooner a guest sees its
    /// frames, the sooner it refills and sends.
    #[inline]
    fn flush_dirty(&mut self) {
        for id in self.rx.dirty.drain(..) {
            if let Some(p) = self.ports[id.0 as usize].as_mut() {
                p.flush();
            }
        }
    }

    /// Switch one frame that arrived on port `src`.
    #[inline]
    fn forward(&mut self, src: PortId, f: &Frame) -> Verdict {
        if f.len < 14 {
            return Verdict::Runt;
        }
        if f.len > MAX_FRAME {
            return Verdict::TooBig;
        }
        let mut eth = [0u8; 12];
        gather(f.segs, f.skip, &mut eth);
        let (dst_mac, src_mac) = eth.split_at(6);
        self.macs.learn(src_mac, src);

        if !is_multicast(dst_mac) {
            if let Some(dst) = self.macs.lookup(dst_mac) {
                if dst == src {
                    return Verdict::NoDestination;
                }
                let Some(port) = self.ports.get_mut(dst.0 as usize).and_then(|p| p.as_mut()) else {
                    return Verdict::NoDestination;
                };
                return match port.deliver(f, &mut self.rx) {
                    Delivery::Delivered => Verdict::Forwarded,
                    Delivery::NoQueue => Verdict::NoDestination,
                    Delivery::Refused => Verdict::Undelivered,
                    Delivery::BadOffload => Verdict::BadOffload,
                };
            }
        }
        // Broadcast, multicast and unknown unicast: flood to every other port.
        let (mut delivered, mut refused, mut bad) = (false, false, false);
        for i in 0..self.active.len() {
            let id = self.active[i];
            if id == src {
                continue;
            }
            let Some(port) = self.ports[id.0 as usize].as_mut() else {
                continue;
            };
            match port.deliver(f, &mut self.rx) {
                Delivery::Delivered => delivered = true,
                Delivery::Refused => refused = true,
                Delivery::BadOffload => bad = true,
                Delivery::NoQueue => {}
            }
        }
        match (delivered, bad, refused) {
            (true, _, _) => Verdict::Forwarded,
            (false, true, _) => Verdict::BadOffload,
            (false, false, true) => Verdict::Undelivered,
            (false, false, false) => Verdict::NoDestination,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::VhostPortRt;
    use crate::virtq::mock::MockGuest;
    use crate::virtq::VIRTQ_DESC_F_NEXT;

    fn frame(dst: u8, src: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; 12]; // virtio-net header
        f.extend([2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src, 0x08, 0x00]);
        f.extend((0..len - 14).map(|i| (i * 7 + src as usize) as u8));
        f
    }

    struct Guest {
        tx: MockGuest,
        rx: MockGuest,
    }

    fn switch_with(mrg: &[bool]) -> (Pmd, Vec<Guest>) {
        let features: Vec<NetFeatures> = mrg
            .iter()
            .map(|&m| NetFeatures {
                mrg_rxbuf: m,
                ..NetFeatures::default()
            })
            .collect();
        switch_with_features(&features)
    }

    fn switch_with_features(features: &[NetFeatures]) -> (Pmd, Vec<Guest>) {
        let shared = Arc::new(Shared {
            cmds: ArrayQueue::new(4),
            stats: PmdStats::default(),
            stop: AtomicBool::new(false),
        });
        let mut pmd = Pmd::new(shared);
        let mut guests = Vec::new();
        for (i, &f) in features.iter().enumerate() {
            let g = Guest {
                tx: MockGuest::new(64),
                rx: MockGuest::new(64),
            };
            let mut p = VhostPortRt::new(PortId(i as u16), 1);
            p.features = f;
            p.rx[0] = Some(Box::new(g.rx.ring(false).into()));
            p.tx[0] = Some(Box::new(g.tx.ring(false).into()));
            pmd.apply(Command::AddPort(
                p.into(),
                Arc::new(Reply {
                    done: AtomicBool::new(false),
                    returned: ArrayQueue::new(1),
                }),
            ));
            guests.push(g);
        }
        (pmd, guests)
    }

    fn stats(pmd: &Pmd, port: usize, tx: bool) -> crate::stats::QueueCounters {
        let Some(PortRt::Vhost(p)) = pmd.fabric.ports[port].as_ref() else {
            panic!("port {port} is not a vhost port")
        };
        let r = if tx { &p.tx[0] } else { &p.rx[0] };
        r.as_ref().unwrap().stats().snapshot()
    }

    #[test]
    fn floods_learns_and_copies_intact() {
        let (mut pmd, mut g) = switch_with(&[false, false, false]);
        for guest in &mut g[1..3] {
            guest.rx.add_rx(&[2048]);
            guest.rx.add_rx(&[2048]);
        }
        g[0].rx.add_rx(&[2048]);
        // Unknown destination: flooded to 1 and 2. Split over three TX descriptors.
        let f = frame(0x22, 0x11, 100);
        g[0].tx
            .add_chain(&[f[..5].to_vec(), f[5..30].to_vec(), f[30..].to_vec()], 0);
        assert_eq!(pmd.poll_all(), 1);
        for guest in &g[1..3] {
            assert_eq!(guest.rx.used_idx(), 1);
            let (_, len) = guest.rx.used_elem(0);
            assert_eq!(len, 112);
            let got = guest.rx.read(0x10_0000, 112);
            assert_eq!(&got[12..], &f[12..], "frame bytes intact");
        }
        // 2 answers 1's MAC: learned, so unicast to port 0 only.
        g[2].tx.add_chain(&[frame(0x11, 0x22, 64)], 0);
        pmd.poll_all();
        assert_eq!(g[0].rx.used_idx(), 1);
        assert_eq!(g[1].rx.used_idx(), 1);
        // Now 0 → 0x22 is known: unicast to port 2.
        g[0].tx.add_chain(&[frame(0x22, 0x11, 64)], 0);
        pmd.poll_all();
        assert_eq!(g[2].rx.used_idx(), 2);
        assert_eq!(g[1].rx.used_idx(), 1);
        let s = stats(&pmd, 0, true);
        assert_eq!((s.packets, s.forwarded, s.drops()), (2, 2, 0));
        assert_eq!(stats(&pmd, 2, false).packets, 2);
    }

    #[test]
    fn mergeable_spreads_a_frame_over_buffers() {
        let (mut pmd, mut g) = switch_with(&[true, true]);
        for _ in 0..4 {
            g[1].rx.add_rx(&[512]);
        }
        let f = frame(0xff, 0x11, 1400);
        g[0].tx
            .add_indirect(&[f[..12].to_vec(), f[12..].to_vec()], 0);
        pmd.poll_all();
        assert_eq!(
            g[1].rx.used_idx(),
            3,
            "1412 bytes over three 512-byte buffers"
        );
        let lens: Vec<u32> = (0..3).map(|i| g[1].rx.used_elem(i).1).collect();
        assert_eq!(lens, [512, 512, 388]);
        let mut got = g[1].rx.read(0x10_0000, 512);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        got.extend(g[1].rx.read(0x10_0000 + 512, 512));
        got.extend(g[1].rx.read(0x10_0000 + 1024, 388));
        assert_eq!(&got[12..], &f[12..]);
    }

    #[test]
    fn drops_are_counted_and_chains_returned() {
        let (mut pmd, mut g) = switch_with(&[false, false]);
        g[1].rx.add_rx(&[256]);
        // Too big for a non-mergeable 256-byte buffer: refused at the destination.
        g[0].tx.add_chain(&[frame(0xff, 0x11, 1000)], 0);
        // Runt, and a chain pointing outside guest memory.
        g[0].tx.add_chain(&[vec![0u8; 20]], 0);
        let d = g[0].tx.take_desc();
        g[0].tx.set_desc(d, 0x7000_0000, 100, 0, 0);
        g[0].tx.publish(d);
        // A loop.
        let (a, b) = (g[0].tx.take_desc(), g[0].tx.take_desc());
        g[0].tx.set_desc(a, 0x10_0000, 64, VIRTQ_DESC_F_NEXT, b);
        g[0].tx.set_desc(b, 0x10_0000, 64, VIRTQ_DESC_F_NEXT, a);
        g[0].tx.publish(a);
        // Fits: delivered.
        g[0].tx.add_chain(&[frame(0xff, 0x11, 200)], 0);
        assert_eq!(pmd.poll_all(), 5);
        assert_eq!(g[0].tx.used_idx(), 5, "every chain returned");
        let s = stats(&pmd, 0, true);
        assert_eq!(s.packets, 5);
        assert_eq!(s.forwarded, 1);
        assert_eq!(s.drop_undelivered, 1);
        assert_eq!(s.drop_runt, 1);
        assert_eq!(s.drop_bad_descriptor, 2);
        assert_eq!(s.packets, s.forwarded + s.drops());
        let r = stats(&pmd, 1, false);
        assert_eq!((r.packets, r.drop_too_big), (1, 1));
        // No RX buffers left: counted, nothing consumed.
        g[0].tx.add_chain(&[frame(0xff, 0x11, 60)], 0);
        pmd.poll_all();
        assert_eq!(stats(&pmd, 1, false).drop_no_rx_buffer, 1);
    }

    #[test]
    fn offloads_pass_to_guests_that_take_them_and_are_finished_for_others() {
        use crate::offload::tests::{check_tcp, tso_frame};
        use crate::offload::OffloadCaps;
        let sender = NetFeatures {
            mrg_rxbuf: true,
            tx_offloads: true,
            ..NetFeatures::default()
        };
        let takes_all = NetFeatures {
            rx_offloads: OffloadCaps::ALL,
            ..sender
        };
        let takes_none = NetFeatures {
            mrg_rxbuf: true,
            ..NetFeatures::default()
        };
        let (mut pmd, mut g) = switch_with_features(&[sender, takes_all, takes_none]);
        for _ in 0..12 {
            g[1].rx.add_rx(&[2048]);
            g[2].rx.add_rx(&[2048]);
        }
        // 4000 bytes of TCP payload in one frame, MSS 1448, checksum left to do.
        let (f, h) = tso_frame(false, false, 4000, 1448);
        let mut hdr = h.bytes().to_vec();
        hdr.extend([0, 0]);
        g[0].tx
            .add_chain(&[hdr, f[..100].to_vec(), f[100..].to_vec()], 0);
        assert_eq!(pmd.poll_all(), 1);
        // Port 1 took it as it is: one frame over two buffers, header intact but num_buffers.
        let mut got = Vec::new();
        for i in 0..g[1].rx.used_idx() {
            got.extend(
                g[1].rx
                    .read(0x10_0000 + 2048 * i as u64, g[1].rx.used_elem(i).1 as usize),
            );
        }
        assert_eq!(&got[..10], &h.bytes());
        assert_eq!(&got[12..], &f[..]);
        // Port 2 got three complete frames with valid checksums, counted as made in software.
        assert_eq!(g[2].rx.used_idx(), 3);
        let mut payload = Vec::new();
        for i in 0..3 {
            let len = g[2].rx.used_elem(i).1 as usize;
            let b = g[2].rx.read(0x10_0000 + 2048 * i as u64, len);
            assert_eq!(&b[..10], &[0; 10], "a complete frame's header");
            payload.extend(check_tcp(&b[12..]).3);
        }
        assert_eq!(payload, f[f.len() - 4000..]);
        assert_eq!(stats(&pmd, 2, false).sw_offload, 3);
        let s = stats(&pmd, 0, true);
        assert_eq!((s.packets, s.forwarded), (1, 1));
        // A header that lies about the frame, to port 2 (which learns the destination MAC
        // first): the segmentation finds no TCP header where it says, and the frame is dropped
        // and counted at the source.
        g[2].tx.add_chain(&[frame(0xff, 0x0b, 60)], 0);
        g[0].rx.add_rx(&[2048]);
        g[1].rx.add_rx(&[2048]);
        pmd.poll_all();
        let mut bad = h;
        bad.csum_start = 20;
        let mut hdr = bad.bytes().to_vec();
        hdr.extend([0, 0]);
        g[0].tx.add_chain(&[hdr, f.clone()], 0);
        pmd.poll_all();
        let s = stats(&pmd, 0, true);
        assert_eq!((s.packets, s.forwarded, s.drop_bad_offload), (2, 1, 1));
        assert_eq!(s.packets, s.forwarded + s.drops());
    }

    #[test]
    fn a_logged_ring_marks_the_pages_it_writes() {
        use crate::guest_mem::{test_mem::memfd, DirtyLog};
        use std::os::unix::fs::FileExt;
        let (mut pmd, mut g) = switch_with(&[false, false]);
        let file = memfd(0x100);
        let log = DirtyLog::map(file.try_clone().unwrap(), 0x100, 0).unwrap();
        let Some(PortRt::Vhost(p)) = pmd.fabric.ports[1].as_mut() else {
            panic!()
        };
        p.rx[0] = Some(Box::new(g[1].rx.ring(false).with_log(log, None).into()));
        // One 9000-byte buffer at 0x10_0000 (pages 0x100..=0x102); 5012 bytes are written.
        g[1].rx.add_rx(&[9000]);
        g[0].tx.add_chain(&[frame(0xff, 0x11, 5000)], 0);
        pmd.poll_all();
        assert_eq!(g[1].rx.used_elem(0).1, 5012);
        let mut bits = [0u8; 0x100];
        file.read_exact_at(&mut bits, 0).unwrap();
        let page = |gpa: u64| bits[(gpa / 0x1000 / 8) as usize] & (1 << (gpa / 0x1000 % 8)) != 0;
        assert!(page(g[1].rx.used), "used ring");
        assert!(
            page(0x10_0000) && page(0x10_1000),
            "the written part of the buffer"
        );
        assert!(!page(0x10_2000), "the unwritten rest");
        assert!(!page(0x0), "nothing else");
    }
}
