//! PMD threads: a pinned, busy-polling loop over the rx queues assigned to it (guest TX queues,
//! DPDK RX queues, tap queues), which in the adaptive model sleeps when idle. It switches each frame by destination MAC and copies it straight
//! into the destination (a guest's RX buffers, an mbuf, a tap `writev`), whichever PMD polls the
//! destination's own rx queues: destinations are shared (`Port`), each queue behind a lock held
//! for one burst. Control talks to a PMD only through a bounded command queue drained between
//! bursts; each command is acknowledged after the PMD applied it, which is the quiescent point
//! control waits for before it answers GET_VRING_BASE, unmaps memory, moves an rx queue to
//! another PMD or tears a port down. Between bursts a PMD holds no destination lock.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::dpdk::MbufBurst;
use crate::l2::{header_keys, MacCache, MacTable};
use crate::offload::{Frame, VnetHdr, VNET_HDR_LEN};
use crate::pipeline::{self, Batch, Role};
use crate::port::{Delivery, NetFeatures, Port, RxScratch};
use crate::stats::{PmdStats, QueueStats};
use crate::tap::{self, TapIo, TAP_HDR_LEN};
use crate::txlock::pmd_holder;
use crate::virtq::copy::{gather, head_words};
use crate::virtq::{PackedRing, Seg, SegList, VirtQueue, Virtq};
use crate::waiter::{Waiter, Waker};
use crate::{tsc, CoreId, PortId, BURST, MAX_FRAME};

/// Ports the switch can hold; ids are dense indices below this.
pub const MAX_PORTS: usize = 256;
/// Rx queues one PMD can poll.
pub const MAX_RXQS: usize = 1024;
/// How long control waits for a PMD to acknowledge a command before calling it stuck.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How many frames ahead of the one being switched a guest TX burst loads frame data.
const TX_DATA_AHEAD: usize = 8;
/// Work one guest TX queue may cost a PMD per pass, in bytes of frames taken plus SEG_COST per
/// frame its TSO frames may be cut into: a burst stops early once it is spent, so cheap frames
/// that cost dearly (64 KiB TSO frames, segmented in software) cannot starve the other queues.
/// A burst of 32 frames of 1518 B (or 28 of 9000 B) fits; four 64 KiB TSO frames do.
const PASS_BUDGET: u32 = 256 * 1024;
/// What one frame made by software segmentation counts in PASS_BUDGET (its headers written,
/// its checksums and its delivery), in bytes.
const SEG_COST: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum PmdError {
    #[error("cannot spawn PMD thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot pin PMD thread to core {0}")]
    Pin(usize),
    #[error("PMD on core {0} did not acknowledge a command within {ACK_TIMEOUT:?}")]
    Unresponsive(usize),
    #[error("port id {0} is beyond the switch's {MAX_PORTS} ports")]
    PortId(u16),
    #[error("PMD on core {0} already polls {MAX_RXQS} rx queues")]
    TooManyRxqs(usize),
}

/// How a PMD spends the time it has nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Model {
    /// Run to completion, busy-polling always (as OVS-DPDK and VPP).
    #[default]
    Rtc,
    /// Busy-poll; after `idle_us` without a frame, ask the guests to kick, sleep on the kick
    /// eventfds (and tap fds), and poll again once one fires. A PMD with a DPDK rx queue keeps
    /// polling (the vdevs here have no rx interrupts).
    Adaptive { idle_us: u32 },
    /// The last `tx_pmds` PMDs only switch and deliver; the others poll the rx queues and
    /// hand guests' frames over to them (copied, in batches through `ArrayQueue`s).
    Pipeline { tx_pmds: u16 },
}

/// Busy cycles and packets of one rx queue: written by the PMD polling it, read by control
/// (`pmd-rxq-show`, the `cycles` assignment, auto-rebalance). Travels with the queue.
#[repr(align(64))]
#[derive(Default, Debug)]
pub struct RxqLoad {
    pub busy_cycles: AtomicU64,
    pub packets: AtomicU64,
}

/// Where an rx queue's frames come from.
pub enum Source {
    /// A guest's TX virtqueue, with the features negotiated when it started and the eventfd
    /// the guest kicks (when asked to: only an adaptive PMD about to sleep asks).
    Vhost {
        ring: Box<Virtq>,
        features: NetFeatures,
        kick: Option<File>,
    },
    /// RX queue `queue` of the port's DPDK device.
    Eth,
    /// Tap queue `queue` of the port.
    Tap,
}

/// One rx queue, as the PMD polling it holds it. Moving it to another PMD moves this value
/// (the ring and its position), so no frame is lost or taken twice.
pub struct Rxq {
    pub port: PortId,
    /// Queue pair (vhost-user) or queue number (devices).
    pub queue: u16,
    pub source: Source,
    pub load: Arc<RxqLoad>,
    /// Frames moved by its last burst.
    burst: u32,
}

impl Rxq {
    pub fn new(port: PortId, queue: u16, source: Source, load: Arc<RxqLoad>) -> Rxq {
        Rxq {
            port,
            queue,
            source,
            load,
            burst: 0,
        }
    }
}

/// Something the PMD hands back to control, to be dropped (unmapped, closed) there.
pub enum Returned {
    Rxq(Rxq),
    Ring(Box<Virtq>),
}

/// A one-shot acknowledgement from the PMD, and the one place where control and the PMD agree
/// on whether a command happened: the PMD claims it (POSTED → TAKEN) before applying it, and
/// control, once it stops waiting, withdraws it (POSTED → CANCELLED) unless the PMD has it. A
/// command is so either applied (and control waits for DONE, which applying reaches without
/// blocking) or never applied (and control knows it failed): never applied after control gave
/// up on it, which once left a queue polled by two PMDs.
struct Reply {
    /// POSTED, TAKEN, DONE or CANCELLED. The PMD's Release store of DONE, after it stopped
    /// using what the command replaced, pairs with control's Acquire load, so everything the
    /// PMD did before is visible to control; the claim and the withdrawal are one CAS each on
    /// POSTED, so only one of them wins.
    state: AtomicU8,
    returned: ArrayQueue<Returned>,
}

const POSTED: u8 = 0;
const TAKEN: u8 = 1;
const DONE: u8 = 2;
const CANCELLED: u8 = 3;

impl Reply {
    fn new() -> Arc<Reply> {
        Arc::new(Reply {
            state: AtomicU8::new(POSTED),
            returned: ArrayQueue::new(1),
        })
    }

    /// PMD: claim the command; false if control withdrew it.
    fn take(&self) -> bool {
        self.state
            .compare_exchange(POSTED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// PMD: applied; what it handed back is in `returned`.
    fn done(&self) {
        self.state.store(DONE, Ordering::Release);
    }

    /// Control: withdraw a command the PMD has not claimed; false if it has.
    fn cancel(&self) -> bool {
        self.state
            .compare_exchange(POSTED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn is_done(&self) -> bool {
        self.state.load(Ordering::Acquire) == DONE
    }
}

enum Command {
    AddPort(Arc<Port>, Arc<Reply>),
    RemovePort(PortId, Arc<Reply>),
    AddRxq(Rxq, Arc<Reply>),
    RemoveRxq(PortId, u16, Arc<Reply>),
    /// Swap the ring of a guest RX queue (a destination every PMD may hold for a burst).
    SwapRing {
        port: PortId,
        queue: u16,
        features: NetFeatures,
        ring: Option<Box<Virtq>>,
        reply: Arc<Reply>,
    },
}

impl Command {
    fn reply(&self) -> &Arc<Reply> {
        match self {
            Command::AddPort(_, r)
            | Command::RemovePort(_, r)
            | Command::AddRxq(_, r)
            | Command::RemoveRxq(_, _, r)
            | Command::SwapRing { reply: r, .. } => r,
        }
    }
}

struct Shared {
    cmds: ArrayQueue<Command>,
    /// Wakes an adaptive PMD that sleeps.
    waker: Option<Waker>,
    stats: PmdStats,
    /// Set by control to end the loop (Relaxed: nothing else is published with it).
    stop: AtomicBool,
}

/// Control's handle on one PMD thread.
pub struct PmdHandle {
    core: CoreId,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Why the PMD has no io_uring notifier (`virtq::call`), if it has none: its guest
    /// notifications are then plain writes, which a hostile frontend can block.
    notifier_error: Option<String>,
}

impl PmdHandle {
    /// Start PMD number `index` pinned to `core`, switching with the shared MAC table.
    /// `role`: its part in the pipeline model.
    pub fn spawn(
        core: CoreId,
        index: usize,
        macs: Arc<MacTable>,
        model: Model,
        role: Option<Role>,
    ) -> Result<PmdHandle, PmdError> {
        let waiter = match model {
            Model::Rtc | Model::Pipeline { .. } => None,
            Model::Adaptive { .. } => Some(Waiter::new().map_err(PmdError::Spawn)?),
        };
        let waker = waiter.as_ref().map(Waiter::waker).transpose();
        let shared = Arc::new(Shared {
            waker: waker.map_err(PmdError::Spawn)?,
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
                let notifier = crate::virtq::call::install().err().map(|e| e.to_string());
                let _ = tx.send((pinned, notifier));
                if pinned {
                    let mut pmd = Pmd::new(s, index, macs);
                    pmd.role = role;
                    if let (Model::Adaptive { idle_us }, Some(w)) = (model, waiter) {
                        pmd.sleep = Some(Sleep::new(w, idle_us));
                    }
                    pmd.run();
                }
            })
            .map_err(PmdError::Spawn)?;
        let notifier_error = match rx.recv() {
            Ok((true, e)) => e,
            _ => {
                let _ = thread.join();
                return Err(PmdError::Pin(core.0));
            }
        };
        Ok(PmdHandle {
            core,
            shared,
            thread: Some(thread),
            notifier_error,
        })
    }

    pub fn core(&self) -> CoreId {
        self.core
    }

    /// Why this PMD notifies guests with plain writes (no io_uring), if it does.
    pub fn notifier_error(&self) -> Option<&str> {
        self.notifier_error.as_deref()
    }

    pub fn stats(&self) -> &PmdStats {
        &self.shared.stats
    }

    /// Post a command and wait until the PMD applied it; returns what it handed back. Past
    /// ACK_TIMEOUT a command the PMD has not claimed is withdrawn (and never applied: the
    /// error means nothing happened); one it claimed is waited for, as it is being applied.
    fn call(&self, make: impl FnOnce(Arc<Reply>) -> Command) -> Result<Option<Returned>, PmdError> {
        let reply = Reply::new();
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut cmd = make(reply.clone());
        while let Err(back) = self.shared.cmds.push(cmd) {
            cmd = back;
            if Instant::now() > deadline || self.finished() {
                return Err(PmdError::Unresponsive(self.core.0));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        self.wake();
        while !reply.is_done() {
            if (Instant::now() > deadline || self.finished()) && reply.cancel() {
                return Err(PmdError::Unresponsive(self.core.0));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(reply.returned.pop())
    }

    fn wake(&self) {
        if let Some(w) = &self.shared.waker {
            w.wake();
        }
    }

    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Make `port` a destination of this PMD.
    pub fn add_port(&self, port: Arc<Port>) -> Result<(), PmdError> {
        if port.id().0 as usize >= MAX_PORTS {
            return Err(PmdError::PortId(port.id().0));
        }
        self.call(|r| Command::AddPort(port, r)).map(drop)
    }

    /// Let go of a port (its rx queues must have been removed first).
    pub fn remove_port(&self, port: PortId) -> Result<(), PmdError> {
        self.call(|r| Command::RemovePort(port, r)).map(drop)
    }

    /// Start polling an rx queue.
    pub fn add_rxq(&self, rxq: Rxq) -> Result<(), PmdError> {
        self.call(|r| Command::AddRxq(rxq, r)).map(drop)
    }

    /// Stop polling an rx queue; returns it once the PMD no longer touches it.
    pub fn remove_rxq(&self, port: PortId, queue: u16) -> Result<Option<Rxq>, PmdError> {
        Ok(match self.call(|r| Command::RemoveRxq(port, queue, r))? {
            Some(Returned::Rxq(q)) => Some(q),
            _ => None,
        })
    }

    /// Install (Some) or detach (None) the ring of guest RX queue `queue` of `port`, between
    /// this PMD's bursts and under the queue's lock (other PMDs may deliver into it). Returns
    /// the ring it replaced, which no PMD touches any more.
    pub fn swap_ring(
        &self,
        port: PortId,
        queue: u16,
        features: NetFeatures,
        ring: Option<Box<Virtq>>,
    ) -> Result<Option<Box<Virtq>>, PmdError> {
        let r = self.call(|reply| Command::SwapRing {
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
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The PMD's own state; lives on the PMD thread only.
struct Pmd {
    shared: Arc<Shared>,
    /// The rx queues it polls (capacity MAX_RXQS: adding never allocates).
    rxqs: Vec<Rxq>,
    fwd: Fwd,
    /// The thread has a DPDK lcore id (mempool caches); done once the first DPDK port arrives.
    dpdk_registered: bool,
    /// Adaptive model: how it sleeps.
    sleep: Option<Sleep>,
    /// Pipeline model: what it hands over or takes.
    role: Option<Role>,
}

/// An adaptive PMD's sleeping: what it waits on, and since when it has been idle.
struct Sleep {
    waiter: Waiter,
    /// Idle cycles before sleeping.
    after: u64,
    /// TSC when the current idle stretch began (0: not idle).
    idle_since: u64,
    /// A queue's fd could not be watched: sleeping could miss its frames.
    blind: bool,
}

/// Longest sleep: the loop then checks its stop flag and publishes counters.
const SLEEP_MAX_MS: i32 = 100;

impl Sleep {
    fn new(waiter: Waiter, idle_us: u32) -> Sleep {
        Sleep {
            waiter,
            after: tsc::hz() / 1_000_000 * idle_us as u64,
            idle_since: 0,
            blind: false,
        }
    }
}

/// What switching a burst needs, apart from the rx queue it comes from.
struct Fwd {
    fabric: Fabric,
    /// The frame being switched, as segments (guest buffers, an mbuf chain or `tap_buf`).
    src: Box<SegList>,
    /// Frames received from a DPDK port, freed after each burst.
    mbufs: MbufBurst,
    tap_hdr: [u8; TAP_HDR_LEN],
    tap_buf: Box<[u8]>,
    /// SEG_COST for every frame the TSO frames switched since the burst began could be cut
    /// into (PASS_BUDGET).
    seg_cost: u32,
}

/// Every port, as destinations, and the MAC table: what forwarding needs, apart from the
/// source frame.
struct Fabric {
    /// Indexed by PortId.
    ports: Vec<Option<Arc<Port>>>,
    /// Ids of the ports present, in flooding order (capacity MAX_PORTS: never allocates).
    active: Vec<PortId>,
    macs: Arc<MacTable>,
    mac_cache: MacCache,
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

    /// `publish` for counters two PMDs write (the pipeline's rx and tx PMDs).
    #[inline(never)]
    fn publish_shared(&self, s: &QueueStats) {
        self.publish_with(s, QueueStats::add_shared)
    }

    #[inline]
    fn publish(&self, s: &QueueStats) {
        self.publish_with(s, QueueStats::add)
    }

    #[inline(always)]
    fn publish_with(&self, s: &QueueStats, add: impl Fn(&QueueStats, &AtomicU64, u64)) {
        let c = &self.by_verdict;
        add(s, &s.packets, self.packets);
        add(s, &s.bytes, self.forwarded_bytes);
        add(s, &s.forwarded, c[Verdict::Forwarded as usize]);
        add(
            s,
            &s.drop_bad_descriptor,
            c[Verdict::BadDescriptor as usize],
        );
        add(s, &s.drop_runt, c[Verdict::Runt as usize]);
        add(s, &s.drop_too_big, c[Verdict::TooBig as usize]);
        add(
            s,
            &s.drop_no_destination,
            c[Verdict::NoDestination as usize],
        );
        add(s, &s.drop_undelivered, c[Verdict::Undelivered as usize]);
        add(s, &s.drop_bad_offload, c[Verdict::BadOffload as usize]);
    }
}

/// Single-writer add to a counter control reads.
#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed)
}

impl Pmd {
    fn new(shared: Arc<Shared>, index: usize, macs: Arc<MacTable>) -> Pmd {
        Pmd {
            shared,
            rxqs: Vec::with_capacity(MAX_RXQS),
            fwd: Fwd {
                fabric: Fabric {
                    ports: (0..MAX_PORTS).map(|_| None).collect(),
                    active: Vec::with_capacity(MAX_PORTS),
                    macs,
                    mac_cache: MacCache::new(pmd_holder(index)),
                    rx: RxScratch::new(pmd_holder(index)),
                },
                src: Box::default(),
                mbufs: MbufBurst::default(),
                tap_hdr: [0; TAP_HDR_LEN],
                tap_buf: vec![0u8; MAX_FRAME as usize + 1].into_boxed_slice(),
                seg_cost: 0,
            },
            dpdk_registered: false,
            sleep: None,
            role: None,
        }
    }

    fn run(mut self) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let mut t = tsc::now();
        while !shared.stop.load(Ordering::Relaxed) {
            // Quiescent point: between bursts, nothing of any ring is held.
            while let Some(cmd) = shared.cmds.pop() {
                self.apply(cmd);
            }
            crate::virtq::call::maintain();
            let (moved, busy) = self.poll_all(&mut t);
            if moved > 0 {
                bump(&stats.busy_cycles, busy);
                bump(&stats.packets, moved as u64);
                if let Some(s) = &mut self.sleep {
                    s.idle_since = 0;
                }
            } else {
                let t1 = tsc::now();
                bump(&stats.idle_cycles, t1.wrapping_sub(t));
                t = t1;
                // Nothing to do: PAUSE gives the pipeline to a sibling hyperthread (often the
                // guest's own vCPU thread) and stops this loop hammering lines the guest writes.
                std::hint::spin_loop();
                if let Some(s) = &mut self.sleep {
                    if s.idle_since == 0 {
                        s.idle_since = t1;
                    } else if t1.wrapping_sub(s.idle_since) > s.after {
                        self.sleep_until_kicked();
                    }
                }
            }
            bump(&stats.iterations, 1);
        }
    }

    /// One pass over every rx queue; returns the frames moved and the busy cycles that took.
    /// `t`: the TSC at the start, advanced to the end of the pass if it moved frames.
    ///
    /// The pass's cycles are shared among the queues by the frames each moved: reading the
    /// TSC around every queue's burst instead cost 25 cycles a frame in the v2v loop (the
    /// reads order themselves behind the burst's cache misses).
    #[inline]
    fn poll_all(&mut self, t: &mut u64) -> (usize, u64) {
        let (mut moved, mut busy_queues) = (0, 0);
        for i in 0..self.rxqs.len() {
            let n = self.poll(i);
            self.rxqs[i].burst = n as u32;
            if n > 0 {
                moved += n;
                busy_queues += 1;
            }
        }
        if self.role.is_some() {
            moved += self.take_batches();
        }
        if moved == 0 {
            return (0, 0);
        }
        let t1 = tsc::now();
        let busy = t1.wrapping_sub(*t);
        *t = t1;
        for q in self.rxqs.iter().filter(|q| q.burst > 0) {
            let share = match busy_queues {
                1 => busy,
                // One iteration's cycles times a burst is far from overflowing; a u128
                // division is a call into compiler-rt.
                _ => busy.saturating_mul(q.burst as u64) / moved as u64,
            };
            bump(&q.load.busy_cycles, share);
            bump(&q.load.packets, q.burst as u64);
        }
        (moved, busy)
    }

    /// Adaptive model: ask every guest queue for kicks, and unless frames or commands already
    /// wait, sleep until a kick, a tap's input, a command or the timeout. Then back to polling.
    #[cold]
    fn sleep_until_kicked(&mut self) {
        let Some(s) = &mut self.sleep else {
            return;
        };
        s.idle_since = 0;
        if s.blind || self.rxqs.iter().any(|q| matches!(q.source, Source::Eth)) {
            return;
        }
        let mut waiting = false;
        for q in self.rxqs.iter_mut() {
            if let Source::Vhost { ring, .. } = &mut q.source {
                waiting |= ring.set_kicks(true);
            }
        }
        if !waiting && self.shared.cmds.is_empty() && !self.shared.stop.load(Ordering::Relaxed) {
            bump(&self.shared.stats.sleeps, 1);
            s.waiter.wait(SLEEP_MAX_MS);
        }
        for q in self.rxqs.iter_mut() {
            if let Source::Vhost { ring, .. } = &mut q.source {
                ring.set_kicks(false);
            }
        }
    }

    /// The fd that says rx queue `q` has input (a guest's kick eventfd, a tap queue's fd),
    /// and whether it is an eventfd.
    fn wake_fd(&self, q: &Rxq) -> Option<(RawFd, bool)> {
        match &q.source {
            Source::Vhost { kick, .. } => kick.as_ref().map(|k| (k.as_raw_fd(), true)),
            Source::Tap => match self.fwd.fabric.port(q.port) {
                Some(Port::Tap(p)) => p.queues.get(q.queue as usize).map(|t| (t.fd(), false)),
                _ => None,
            },
            Source::Eth => None,
        }
    }

    /// Pipeline model, on a tx PMD: deliver what the rx PMDs handed over (at most an inbox's
    /// worth per pass, so commands are not starved).
    #[inline(never)]
    fn take_batches(&mut self) -> usize {
        let Some(Role::Tx { inbox }) = &self.role else {
            return 0;
        };
        let mut moved = 0;
        for _ in 0..pipeline::INBOX {
            let Some(batch) = inbox.pop() else {
                break;
            };
            moved += self.fwd.deliver_batch(batch);
        }
        moved
    }

    /// One burst from rx queue `i`; what it delivered is published (and the destination
    /// queues let go) before it returns.
    #[inline]
    fn poll(&mut self, i: usize) -> usize {
        let rxq = &mut self.rxqs[i];
        let (port, queue) = (rxq.port, rxq.queue);
        let n = match &mut rxq.source {
            Source::Vhost { ring, features, .. } if self.role.is_some() => {
                hand_off(&mut self.fwd, &self.role, port, queue, ring, *features)
            }
            Source::Vhost { ring, features, .. } => match &mut **ring {
                Virtq::Split(r) => self.fwd.switch_ring(port, queue, r, *features),
                Virtq::Packed(r) => self.fwd.switch_packed(port, queue, r, *features),
            },
            Source::Eth => self.fwd.eth_burst(port, queue),
            Source::Tap => self.fwd.tap_burst(port, queue as usize),
        };
        self.fwd.fabric.release_held();
        n
    }

    /// Apply a command control posted, unless control withdrew it first (then what it
    /// carries is dropped here: a ring or port it gave up on).
    #[cold]
    fn apply(&mut self, cmd: Command) {
        if cmd.reply().take() {
            self.apply_taken(cmd);
        }
    }

    fn apply_taken(&mut self, cmd: Command) {
        let f = &mut self.fwd.fabric;
        let (reply, back) = match cmd {
            Command::AddPort(port, reply) => {
                if matches!(*port, Port::Eth(_)) && !self.dpdk_registered {
                    self.dpdk_registered = true;
                    crate::dpdk::register_thread();
                }
                let id = port.id();
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
                // Control keeps its own reference: the port is dropped there.
                f.ports.get_mut(id.0 as usize).and_then(Option::take);
                (reply, None)
            }
            Command::AddRxq(rxq, reply) => {
                let fd = self.wake_fd(&rxq);
                if let (Some(s), Some((fd, eventfd))) = (&mut self.sleep, fd) {
                    // A queue it cannot watch would not wake it: then it never sleeps.
                    s.blind |= s.waiter.add(fd, eventfd).is_err();
                }
                // Refused by control beforehand; a full list would allocate here.
                if self.rxqs.len() < MAX_RXQS {
                    self.rxqs.push(rxq);
                    (reply, None)
                } else {
                    (reply, Some(Returned::Rxq(rxq)))
                }
            }
            Command::RemoveRxq(port, queue, reply) => {
                let back = self
                    .rxqs
                    .iter()
                    .position(|q| q.port == port && q.queue == queue)
                    .map(|i| self.rxqs.remove(i));
                if let (Some(s), Some((fd, _))) =
                    (&self.sleep, back.as_ref().and_then(|q| self.wake_fd(q)))
                {
                    s.waiter.remove(fd);
                }
                (reply, back.map(Returned::Rxq))
            }
            Command::SwapRing {
                port,
                queue,
                features,
                ring,
                reply,
            } => {
                let back = match f.ports.get(port.0 as usize).and_then(|p| p.as_deref()) {
                    Some(p) => p.swap_ring(f.rx.me, queue as usize, features, ring),
                    None => ring,
                };
                (reply, back.map(Returned::Ring))
            }
        };
        if let Some(b) = back {
            reply.returned.force_push(b);
        }
        reply.done();
    }
}

/// Pipeline model, on an rx PMD: copy a burst of the guest's frames into a free batch and
/// hand it to a tx PMD. Without a free batch the frames stay in the ring (back-pressure). Out
/// of line: the rtc path is the one to keep tight.
#[inline(never)]
fn hand_off(
    fwd: &mut Fwd,
    role: &Option<Role>,
    port: PortId,
    queue: u16,
    ring: &mut Virtq,
    features: NetFeatures,
) -> usize {
    let Some(Role::Rx { inboxes, free }) = role else {
        return 0;
    };
    let Some(mut batch) = free.pop() else {
        return 0;
    };
    batch.src = port;
    batch.queue = queue;
    batch.hdr_len = features.hdr_len as u32;
    batch.tx_offloads = features.tx_offloads;
    batch.stats = Some(ring.stats().clone());
    let n = match ring {
        Virtq::Split(r) => fwd.copy_out(port, queue, r, features, &mut batch),
        Virtq::Packed(r) => fwd.copy_out(port, queue, r, features, &mut batch),
    };
    if batch.n == 0 {
        batch.recycle();
        return n;
    }
    // One source always to the same tx PMD: its frames stay in order.
    let inbox = &inboxes[(port.0 as usize + queue as usize) % inboxes.len()];
    if let Err(batch) = inbox.push(batch) {
        fwd.deliver_batch(batch);
    }
    n
}

impl Fwd {
    /// Pipeline model: take up to BURST frames from a guest's TX ring, copying each (with its
    /// header) into `batch`; a frame too big for a slot is switched here, as in `rtc`.
    fn copy_out<R: VirtQueue>(
        &mut self,
        src: PortId,
        queue: u16,
        ring: &mut R,
        features: NetFeatures,
        batch: &mut Batch,
    ) -> usize {
        let hdr_len = features.hdr_len as u32;
        let n = ring.avail_pending().min(BURST as u16);
        let mut tally = Tally::default();
        self.seg_cost = 0;
        let (mut bytes, mut taken) = (0u32, n);
        for i in 0..n {
            let head = ring.head_at(i);
            let (v, len) = if ring.walk_chain(head, false, &mut self.src).is_err() {
                (Some(Verdict::BadDescriptor), 0)
            } else if self.src.total < hdr_len {
                (Some(Verdict::Runt), 0)
            } else if self.src.total as usize > pipeline::SLOT {
                let (v, len) = self.forward_walked(src, queue, hdr_len, features.tx_offloads);
                (Some(v), len)
            } else {
                let k = batch.n;
                gather(&self.src, 0, batch.slot(k));
                batch.lens[k] = self.src.total;
                batch.n += 1;
                (None, 0)
            };
            if let Some(v) = v {
                tally.count(v, len);
            }
            ring.push_used(head, 0);
            if self.over_budget(&mut bytes, v) {
                taken = i + 1;
                break;
            }
        }
        ring.advance(taken);
        ring.flush();
        tally.publish_shared(ring.stats());
        taken as usize
    }

    /// Count the frame just taken (in `self.src`) against its burst's PASS_BUDGET, `bytes`
    /// so far; true once the budget is spent. A frame refused before it was switched (`v`: a
    /// bad chain or header) cost little whatever its length, and counts as a small one.
    #[inline(always)]
    fn over_budget(&self, bytes: &mut u32, v: Option<Verdict>) -> bool {
        let refused = matches!(
            v,
            Some(Verdict::BadDescriptor | Verdict::Runt | Verdict::TooBig | Verdict::BadOffload)
        );
        *bytes = bytes.saturating_add(if refused { 64 } else { self.src.total });
        bytes.saturating_add(self.seg_cost) >= PASS_BUDGET
    }

    /// Pipeline model, on a tx PMD: switch and deliver a batch an rx PMD handed over, count
    /// the verdicts on its source, give the batch back.
    fn deliver_batch(&mut self, mut batch: Box<Batch>) -> usize {
        let mut tally = Tally::default();
        let (src, queue, hdr_len) = (batch.src, batch.queue, batch.hdr_len);
        for i in 0..batch.n {
            let total = batch.lens[i];
            self.src.clear();
            self.src.push(Seg {
                ptr: batch.slot(i).as_mut_ptr(),
                len: total,
            });
            let (v, len) = self.forward_walked(src, queue, hdr_len, batch.tx_offloads);
            tally.count(v, len);
        }
        self.fabric.release_held();
        if let Some(s) = &batch.stats {
            tally.publish_shared(s);
        }
        let n = batch.n;
        batch.recycle();
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
        let pending = ring.avail_pending();
        let n = pending.min(BURST as u16);
        if n == 0 {
            return 0;
        }
        // Every descriptor and frame of the burst was written on the guest's core: start the
        // descriptors' misses together, and each frame's TX_DATA_AHEAD frames before it is
        // switched (asked for all at once, the descriptors read for their addresses had to be
        // fetched again by the time the frames were walked).
        let mut heads = [0u16; BURST];
        let heads = &mut heads[..n as usize];
        for (i, h) in heads.iter_mut().enumerate() {
            *h = ring.head_at(i as u16);
            ring.prefetch_desc(*h);
        }
        for &h in heads.iter().take(TX_DATA_AHEAD) {
            ring.prefetch_data(h, hdr_len);
        }
        let mut tally = Tally::default();
        // The burst's chains go back to the guest only after the copies out of them ran.
        self.fabric.rx.defer_copies = true;
        // All the guest has sent fits in this burst: the PMD keeps up with the guest, and can
        // spend on handing the guest's lines back (not known of a packed ring; measured there
        // with the PMD the bottleneck, demoting cost 3 %).
        self.fabric.rx.demote_sources = R::COUNTS_ALL_PENDING && pending <= BURST as u16;
        self.seg_cost = 0;
        let (mut bytes, mut taken) = (0u32, n);
        for (i, &head) in heads.iter().enumerate() {
            if let Some(&h) = heads.get(i + TX_DATA_AHEAD) {
                ring.prefetch_data(h, hdr_len);
            }
            let (v, len) = if ring.walk_chain(head, false, &mut self.src).is_err() {
                (Verdict::BadDescriptor, 0)
            } else if self.src.total < hdr_len {
                (Verdict::Runt, 0)
            } else {
                self.forward_walked(src, queue, hdr_len, features.tx_offloads)
            };
            tally.count(v, len);
            ring.push_used(head, 0);
            if self.over_budget(&mut bytes, Some(v)) {
                taken = i as u16 + 1;
                break;
            }
        }
        self.fabric.rx.defer_copies = false;
        self.fabric.rx.demote_sources = false;
        // Destination guests first (the sooner a guest sees its frames, the sooner it
        // refills); then, no frame needing its buffers any more, the source guest gets its
        // chains back before the device queues are flushed (a DPDK TX burst, which frees a
        // burst of mbufs).
        self.fabric.release_held_guests();
        ring.advance(taken);
        ring.flush();
        self.fabric.release_held();
        tally.publish(ring.stats());
        taken as usize
    }

    /// Switch the guest frame in `self.src` (walked from its ring, or a pipeline batch's slot;
    /// at least `hdr_len` bytes), reading its virtio-net header only if the guest may leave
    /// work in it (`tx_offloads`).
    #[inline(always)]
    fn forward_walked(
        &mut self,
        src: PortId,
        queue: u16,
        hdr_len: u32,
        tx_offloads: bool,
    ) -> (Verdict, u32) {
        if tx_offloads {
            return self.forward_offloaded(src, queue, hdr_len);
        }
        let len = self.src.total - hdr_len;
        let f = Frame {
            segs: &self.src,
            skip: hdr_len,
            len,
            vnet: VnetHdr::NONE,
            queue,
        };
        (self.fabric.forward(src, &f), len)
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
        if vnet.gso_size > 0 {
            // At most 745 frames (MIN_GSO_SIZE); saturating all the same.
            let segs = len / vnet.gso_size as u32;
            self.seg_cost = self.seg_cost.saturating_add(segs.saturating_mul(SEG_COST));
        }
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
    fn eth_burst(&mut self, src: PortId, q: u16) -> usize {
        let Some(Port::Eth(p)) = self.fabric.port(src) else {
            return 0;
        };
        let n = self.mbufs.rx(p.dev.port_id, q);
        if n == 0 {
            return 0;
        }
        let mut tally = Tally::default();
        // The mbufs are freed only after the copies out of them ran.
        self.fabric.rx.defer_copies = true;
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
        self.fabric.rx.defer_copies = false;
        self.fabric.release_held();
        self.mbufs.free_all();
        if let Some(s) = self.fabric.port(src).and_then(|p| p.from_port(q as usize)) {
            tally.publish(s);
        }
        n
    }

    /// Read up to BURST frames from one tap queue (one `readv` each) and switch them.
    #[inline]
    fn tap_burst(&mut self, src: PortId, q: usize) -> usize {
        let Some(Port::Tap(p)) = self.fabric.port(src) else {
            return 0;
        };
        let Some(fd) = p.queues.get(q).map(|t| t.fd()) else {
            return 0;
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
        if let Some(s) = self.fabric.port(src).and_then(|p| p.from_port(q)) {
            tally.publish(s);
        }
        tally.packets as usize
    }
}

impl Fabric {
    #[inline]
    fn port(&self, id: PortId) -> Option<&Port> {
        self.ports.get(id.0 as usize)?.as_deref()
    }

    /// Publish what the last burst delivered and let go of the destination queues: the
    /// sooner a guest sees its frames, the sooner it refills and sends.
    #[inline]
    fn release_held(&mut self) {
        release_held(&self.ports, &mut self.rx)
    }

    /// Run the copies put off, then publish and let go of the guests' queues held; device
    /// queues stay held.
    #[inline]
    fn release_held_guests(&mut self) {
        self.rx.copies.run();
        let ports = &self.ports;
        self.rx
            .held
            .retain(|&(id, q)| match ports[id.0 as usize].as_deref() {
                Some(p @ Port::Vhost(_)) => {
                    // SAFETY: listed in `held`, so this PMD holds the queue; the copies into it
                    // ran and no reference from the burst's deliveries is alive any more.
                    unsafe { p.flush_and_release(q as usize) };
                    false
                }
                _ => true,
            });
    }

    /// Switch one frame that arrived on port `src`.
    #[inline(always)]
    fn forward(&mut self, src: PortId, f: &Frame) -> Verdict {
        if f.len < 14 {
            return Verdict::Runt;
        }
        if f.len > MAX_FRAME {
            return Verdict::TooBig;
        }
        let (w0, w4) = head_words(f.segs, f.skip);
        let (dst_mac, src_mac) = header_keys(w0, w4);
        if let Some(dst) = self.macs.switch(&mut self.mac_cache, dst_mac, src_mac, src) {
            if dst == src {
                return Verdict::NoDestination;
            }
            let Some(port) = self.ports.get(dst.0 as usize).and_then(|p| p.as_deref()) else {
                return Verdict::NoDestination;
            };
            return match deliver(&self.ports, &mut self.rx, port, f) {
                Delivery::Delivered => Verdict::Forwarded,
                Delivery::NoQueue | Delivery::Busy => Verdict::NoDestination,
                Delivery::Refused => Verdict::Undelivered,
                Delivery::BadOffload => Verdict::BadOffload,
            };
        }
        // Broadcast, multicast and unknown unicast: flood to every other port.
        let (mut delivered, mut refused, mut bad) = (false, false, false);
        for i in 0..self.active.len() {
            let id = self.active[i];
            if id == src {
                continue;
            }
            let Some(port) = self.ports[id.0 as usize].as_deref() else {
                continue;
            };
            match deliver(&self.ports, &mut self.rx, port, f) {
                Delivery::Delivered => delivered = true,
                Delivery::Refused => refused = true,
                Delivery::BadOffload => bad = true,
                Delivery::NoQueue | Delivery::Busy => {}
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

/// Run the copies put off, publish what was delivered into the queues `rx` holds, and let
/// go of them.
#[inline]
fn release_held(ports: &[Option<Arc<Port>>], rx: &mut RxScratch) {
    rx.copies.run();
    for (id, q) in rx.held.drain(..) {
        if let Some(p) = ports[id.0 as usize].as_deref() {
            // SAFETY: listed in `held`, so this PMD holds the queue; no reference from the
            // burst's deliveries is alive any more.
            unsafe { p.flush_and_release(q as usize) };
        }
    }
}

/// Offer a frame to `port`; when another PMD holds the queue it needs, let go of everything
/// this one holds (so two PMDs never wait on each other) and try again.
#[inline]
fn deliver(ports: &[Option<Arc<Port>>], rx: &mut RxScratch, port: &Port, f: &Frame) -> Delivery {
    loop {
        match port.deliver(f, rx) {
            Delivery::Busy => wait_busy(ports, rx),
            d => return d,
        }
    }
}

#[cold]
fn wait_busy(ports: &[Option<Arc<Port>>], rx: &mut RxScratch) {
    release_held(ports, rx);
    std::hint::spin_loop();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::{VhostPort, VhostRxq};
    use crate::txlock::TxLock;
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
        switch_with_queues(features, 64)
    }

    fn switch_with_queues(features: &[NetFeatures], qsize: u16) -> (Pmd, Vec<Guest>) {
        let shared = Arc::new(Shared {
            waker: None,
            cmds: ArrayQueue::new(4),
            stats: PmdStats::default(),
            stop: AtomicBool::new(false),
        });
        let mut pmd = Pmd::new(shared, 0, Arc::new(MacTable::new(64)));
        let mut guests = Vec::new();
        for (i, &f) in features.iter().enumerate() {
            let g = Guest {
                tx: MockGuest::new(qsize),
                rx: MockGuest::new(qsize),
            };
            let id = PortId(i as u16);
            let mut port = VhostPort::port(id, 1);
            let Port::Vhost(p) = &mut port else {
                unreachable!()
            };
            *p.rx[0].get_mut() = VhostRxq {
                ring: Some(Box::new(g.rx.ring(false).into())),
                features: f,
            };
            pmd.apply(Command::AddPort(Arc::new(port), reply()));
            let source = Source::Vhost {
                ring: Box::new(g.tx.ring(false).into()),
                features: f,
                kick: None,
            };
            pmd.apply(Command::AddRxq(
                Rxq::new(id, 0, source, Arc::default()),
                reply(),
            ));
            guests.push(g);
        }
        (pmd, guests)
    }

    fn reply() -> Arc<Reply> {
        Reply::new()
    }

    /// A command control withdrew (its ack timed out before the PMD claimed it) is never
    /// applied, however late the PMD gets to it; one the PMD claimed cannot be withdrawn.
    #[test]
    fn a_withdrawn_command_is_never_applied() {
        let (mut pmd, g) = switch_with(&[false]);
        let source = Source::Vhost {
            ring: Box::new(g[0].tx.ring(false).into()),
            features: NetFeatures::default(),
            kick: None,
        };
        let r = reply();
        assert!(r.cancel());
        pmd.apply(Command::AddRxq(
            Rxq::new(PortId(0), 1, source, Arc::default()),
            r.clone(),
        ));
        assert_eq!(pmd.rxqs.len(), 1, "only the queue added before");
        assert!(!r.is_done());
        let r = reply();
        pmd.apply(Command::RemoveRxq(PortId(0), 0, r.clone()));
        assert!(r.is_done() && !r.cancel(), "applied: too late to withdraw");
        assert!(pmd.rxqs.is_empty());
        assert!(matches!(r.returned.pop(), Some(Returned::Rxq(_))));
    }

    impl Pmd {
        fn pass(&mut self) -> usize {
            self.poll_all(&mut tsc::now()).0
        }
    }

    /// The counters of port `port`'s guest TX queue (`tx`) or RX queue.
    fn stats(pmd: &Pmd, port: usize, tx: bool) -> crate::stats::QueueCounters {
        if tx {
            let q = pmd.rxqs.iter().find(|q| q.port.0 as usize == port).unwrap();
            let Source::Vhost { ring, .. } = &q.source else {
                panic!()
            };
            return ring.stats().snapshot();
        }
        rx_queue(pmd, port).with(pmd.fwd.fabric.rx.me, |q| {
            q.ring.as_ref().unwrap().stats().snapshot()
        })
    }

    fn rx_queue(pmd: &Pmd, port: usize) -> &TxLock<VhostRxq> {
        let Some(Port::Vhost(p)) = pmd.fwd.fabric.ports[port].as_deref() else {
            panic!("port {port} is not a vhost port")
        };
        &p.rx[0]
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
        assert_eq!(pmd.pass(), 1);
        for guest in &g[1..3] {
            assert_eq!(guest.rx.used_idx(), 1);
            let (_, len) = guest.rx.used_elem(0);
            assert_eq!(len, 112);
            let got = guest.rx.read(0x10_0000, 112);
            assert_eq!(&got[12..], &f[12..], "frame bytes intact");
        }
        // 2 answers 1's MAC: learned, so unicast to port 0 only.
        g[2].tx.add_chain(&[frame(0x11, 0x22, 64)], 0);
        pmd.pass();
        assert_eq!(g[0].rx.used_idx(), 1);
        assert_eq!(g[1].rx.used_idx(), 1);
        // Now 0 → 0x22 is known: unicast to port 2.
        g[0].tx.add_chain(&[frame(0x22, 0x11, 64)], 0);
        pmd.pass();
        assert_eq!(g[2].rx.used_idx(), 2);
        assert_eq!(g[1].rx.used_idx(), 1);
        let s = stats(&pmd, 0, true);
        assert_eq!((s.packets, s.forwarded, s.drops()), (2, 2, 0));
        assert_eq!(stats(&pmd, 2, false).packets, 2);
    }

    /// Small frames are copied at the end of the burst (`PendingCopies`), large or scattered
    /// ones at once: either way each frame of a burst arrives whole in its own buffer, and the
    /// guest gets its TX buffers back only after they were copied.
    #[test]
    fn a_burst_of_small_and_large_frames_arrives_intact() {
        let (mut pmd, mut g) = switch_with(&[false, false]);
        let sizes = [60usize, 64, 255, 256, 257, 1000, 64, 128];
        let bufs: Vec<u64> = sizes.iter().map(|_| g[1].rx.add_rx(&[2048]).1[0]).collect();
        let mut frames = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let mut f = frame(0x22, 0x11, n);
            f[26..].iter_mut().for_each(|b| *b ^= i as u8);
            g[0].tx.add_chain(std::slice::from_ref(&f), 0);
            frames.push(f);
        }
        assert_eq!(pmd.pass(), sizes.len());
        assert_eq!(g[1].rx.used_idx(), sizes.len() as u16);
        assert_eq!(g[0].tx.used_idx(), sizes.len() as u16);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(g[1].rx.used_elem(i as u16).1 as usize, f.len(), "frame {i}");
            assert_eq!(
                g[1].rx.read(bufs[i] + 12, f.len() - 12),
                f[12..],
                "frame {i}"
            );
        }
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
        pmd.pass();
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
        assert_eq!(pmd.pass(), 5);
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
        pmd.pass();
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
        assert_eq!(pmd.pass(), 1);
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
        pmd.pass();
        let mut bad = h;
        bad.csum_start = 20;
        let mut hdr = bad.bytes().to_vec();
        hdr.extend([0, 0]);
        g[0].tx.add_chain(&[hdr, f.clone()], 0);
        pmd.pass();
        let s = stats(&pmd, 0, true);
        assert_eq!((s.packets, s.forwarded, s.drop_bad_offload), (2, 1, 1));
        assert_eq!(s.packets, s.forwarded + s.drops());
    }

    /// A guest with offloads, alone on the switch (every frame floods to no one).
    fn offloading_sender() -> (Pmd, Vec<Guest>) {
        switch_with_features(&[NetFeatures {
            mrg_rxbuf: true,
            tx_offloads: true,
            ..NetFeatures::default()
        }])
    }

    /// `n` chains of one descriptor each, all over one buffer holding `bytes`.
    fn same_chain(g: &mut MockGuest, bytes: &[u8], n: usize) {
        let at = g.alloc(bytes.len() as u64);
        g.write(at, bytes);
        for _ in 0..n {
            let d = g.take_desc();
            g.set_desc(d, at, bytes.len() as u32, 0, 0);
            g.publish(d);
        }
    }

    fn tso_chain(payload: usize, mss: u16) -> Vec<u8> {
        let (f, h) = crate::offload::tests::tso_frame(false, false, payload, mss);
        let mut b = h.bytes().to_vec();
        b.extend([0, 0]);
        b.extend(f);
        b
    }

    #[test]
    fn a_tso_frame_asking_for_a_tiny_mss_is_dropped() {
        let (mut pmd, mut g) = offloading_sender();
        same_chain(&mut g[0].tx, &tso_chain(60_000, 1), 1);
        same_chain(&mut g[0].tx, &tso_chain(60_000, 87), 1);
        same_chain(&mut g[0].tx, &tso_chain(60_000, 88), 1);
        assert_eq!(pmd.pass(), 3);
        let s = stats(&pmd, 0, true);
        assert_eq!((s.packets, s.drop_bad_offload), (3, 2));
        assert_eq!(s.drop_no_destination, 1, "MSS 88 is taken");
    }

    /// Frames that cost dearly end a pass early: the other queues get their turn, and the
    /// rest of the burst is taken by the next passes, every frame accounted.
    #[test]
    fn a_pass_stops_when_its_budget_is_spent() {
        let (mut pmd, mut g) = offloading_sender();
        // 60,000 bytes cut at 1448: 41 frames, 60,066 + 41 * 256 bytes of budget each.
        same_chain(&mut g[0].tx, &tso_chain(60_000, 1448), 32);
        let per_pass: Vec<usize> = (0..10).map(|_| pmd.pass()).collect();
        assert_eq!(per_pass[0], 4, "{per_pass:?}");
        assert_eq!(per_pass.iter().sum::<usize>(), 32, "{per_pass:?}");
        assert_eq!(g[0].tx.used_idx(), 32);
        let s = stats(&pmd, 0, true);
        assert_eq!((s.packets, s.drop_no_destination), (32, 32));
        // Small frames: a whole burst.
        same_chain(&mut g[0].tx, &frame(0xff, 0x11, 1500), 40);
        assert_eq!(pmd.pass(), BURST);
    }

    /// Zero-length descriptors add no bytes but cost a read each: they count against the
    /// chain's length limit.
    #[test]
    fn zero_length_descriptors_count_against_the_chain_limit() {
        use crate::virtq::MAX_CHAIN_DESCS;
        let (mut pmd, mut g) = switch_with_queues(&[NetFeatures::default()], 256);
        let f = frame(0xff, 0x11, 64);
        for empties in [MAX_CHAIN_DESCS as usize - 1, MAX_CHAIN_DESCS as usize] {
            let mut bufs = vec![Vec::new(); empties];
            bufs.push(f.clone());
            g[0].tx.add_chain(&bufs, 0);
        }
        assert_eq!(pmd.pass(), 2);
        let s = stats(&pmd, 0, true);
        assert_eq!(s.drop_bad_descriptor, 1, "one descriptor too many");
        assert_eq!(
            s.drop_no_destination, 1,
            "the longest chain allowed is taken"
        );
    }

    #[test]
    fn a_logged_ring_marks_the_pages_it_writes() {
        use crate::guest_mem::{test_mem::memfd, DirtyLog};
        use std::os::unix::fs::FileExt;
        let (mut pmd, mut g) = switch_with(&[false, false]);
        let file = memfd(0x100);
        let log = DirtyLog::map(file.try_clone().unwrap(), 0x100, 0).unwrap();
        let ring = Box::new(g[1].rx.ring(false).with_log(log, None).into());
        rx_queue(&pmd, 1).with(pmd.fwd.fabric.rx.me, |q| q.ring = Some(ring));
        // One 9000-byte buffer at 0x10_0000 (pages 0x100..=0x102); 5012 bytes are written.
        g[1].rx.add_rx(&[9000]);
        g[0].tx.add_chain(&[frame(0xff, 0x11, 5000)], 0);
        pmd.pass();
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
