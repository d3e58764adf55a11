//! The PMDs as one switch, from control's side: which PMD polls which source queue, and moving
//! queues between them. Policies as OVS-DPDK's `pmd-rxq-assign`: `roundrobin` deals queues out
//! in order, `cycles` gives the busiest queues first to the least loaded PMD (by measured busy
//! cycles); a queue pinned to a core in its port file goes there, and that PMD then takes no
//! other queue (OVS's isolation). Auto-rebalance, as OVS's `pmd-auto-lb`: when the busiest PMD
//! was above a load threshold over the last second and a new assignment would lower the
//! busiest load by a margin, queues move, at most once per interval. A queue moves through the quiescence protocol: the
//! old PMD hands it back at a quiescent point, with its ring position, and the new one resumes
//! from there, so no frame is lost or taken twice. Control threads only; never the hot path.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::net::l2::MacTable;
use crossbeam_queue::ArrayQueue;

use crate::net::features::NetFeatures;
use crate::pmd::pipeline::{self, Role};
use crate::pmd::{Model, PmdError, PmdHandle, Source, SourceLoad, SourceQueue, MAX_SOURCES};
use crate::port::Port;
use crate::stats::PmdCounters;
use crate::virtq::Virtq;
use crate::{CoreId, PortId, QueueIdx, MAX_PORTS};

const MAC_TABLE_SIZE: usize = 8192;
/// Loads are measured over windows this long (`pmd-rxq-show`, `cycles`, auto-rebalance).
const WINDOW: Duration = Duration::from_secs(1);

/// How source queues that are not pinned are spread over the PMDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Assign {
    #[default]
    RoundRobin,
    Cycles,
}

/// When auto-rebalance acts (OVS: pmd-auto-lb-load-threshold, -improvement-threshold,
/// -rebal-interval).
#[derive(Debug, Clone, Copy)]
pub struct AutoLb {
    /// Busy share of the busiest PMD, in percent, above which a rebalance is considered.
    pub load_threshold: u32,
    /// How much the new assignment must lower the busiest PMD's load, in percent of it.
    pub improvement: u32,
    /// Queues move at most once per interval (loads are those of the last one-second window).
    pub interval: Duration,
}

/// One source queue as control knows it.
struct Entry {
    port: PortId,
    queue: u16,
    /// Index of the PMD that polls it (or will, once started).
    pmd: usize,
    /// Index of the PMD it is pinned to.
    pinned: Option<usize>,
    /// Polled now (a guest queue not started is only remembered).
    running: bool,
    load: Arc<SourceLoad>,
    /// `load.busy_cycles` at the start of the current window, and the busy cycles of the last
    /// full window.
    mark: u64,
    window_busy: u64,
}

/// What `pmd-rxq-show` prints for one queue.
#[derive(Debug, Clone)]
pub struct SourceQueueInfo {
    pub port: PortId,
    pub queue: u16,
    pub core: CoreId,
    pub pinned: bool,
    pub running: bool,
    /// Share of its PMD's cycles spent on this queue over the last window, in percent.
    pub busy_pct: f64,
}

/// What `pmd-stats-show` prints for one PMD.
#[derive(Debug, Clone)]
pub struct PmdInfo {
    pub core: CoreId,
    pub counters: PmdCounters,
    pub sources: usize,
    pub isolated: bool,
    /// Busy share over the last window, in percent.
    pub busy_pct: f64,
}

struct State {
    ports: Vec<Option<Arc<Port>>>,
    /// Per PMD: a pipeline tx PMD, which polls no source queue.
    tx_only: Vec<bool>,
    /// Per port: the core each source queue is pinned to (by queue number; shorter: not pinned).
    affinity: Vec<Vec<usize>>,
    sources: Vec<Entry>,
    /// Per PMD: counters at the start of the window, and busy / total cycles of the last one.
    pmd_mark: Vec<PmdCounters>,
    pmd_window: Vec<(u64, u64)>,
    window_start: Instant,
    last_rebalance: Instant,
}

pub struct Dataplane {
    pmds: Vec<PmdHandle>,
    pub macs: Arc<MacTable>,
    assign: Assign,
    auto_lb: Option<AutoLb>,
    /// Lock even the destination queues only one PMD writes (to measure what locking costs).
    pub always_lock: bool,
    state: Mutex<State>,
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("core {0} runs no PMD")]
    NoPmd(usize),
    #[error("the port has no source queue {0} (a guest's queue exists once it started)")]
    NoQueue(u16),
    #[error(transparent)]
    Pmd(#[from] PmdError),
}

/// A queue that changed PMD in a rebalance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub port: PortId,
    pub queue: u16,
    pub from: CoreId,
    pub to: CoreId,
}

impl Dataplane {
    /// Start one PMD per core, each running `model`.
    pub fn start(
        cores: &[usize],
        model: Model,
        assign: Assign,
        auto_lb: Option<AutoLb>,
    ) -> Result<Dataplane, PmdError> {
        let macs = Arc::new(MacTable::new(MAC_TABLE_SIZE));
        // Pipeline: the last `tx_pmds` PMDs deliver, each from an inbox every rx PMD feeds.
        let tx_pmds = match model {
            Model::Pipeline { tx_pmds } => (tx_pmds as usize).min(cores.len()),
            _ => 0,
        };
        let first_tx = cores.len() - tx_pmds;
        let inboxes: Vec<Arc<pipeline::Queue>> = (0..tx_pmds)
            .map(|_| Arc::new(ArrayQueue::new(pipeline::INBOX)))
            .collect();
        let role = |i: usize| match (tx_pmds, i >= first_tx) {
            (0, _) => None,
            (_, true) => Some(Role::Tx {
                inbox: inboxes[i - first_tx].clone(),
            }),
            (_, false) => Some(Role::Rx {
                inboxes: inboxes.clone(),
                free: pipeline::free_list(),
            }),
        };
        let pmds = cores
            .iter()
            .enumerate()
            .map(|(i, &c)| PmdHandle::spawn(CoreId(c), i, macs.clone(), model, role(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let now = Instant::now();
        Ok(Dataplane {
            state: Mutex::new(State {
                ports: (0..MAX_PORTS).map(|_| None).collect(),
                affinity: vec![Vec::new(); MAX_PORTS],
                sources: Vec::new(),
                pmd_mark: pmds.iter().map(|p| p.stats().snapshot()).collect(),
                pmd_window: vec![(0, 0); pmds.len()],
                tx_only: (0..pmds.len()).map(|i| i >= first_tx).collect(),
                window_start: now,
                last_rebalance: now,
            }),
            pmds,
            macs,
            assign,
            auto_lb,
            always_lock: false,
        })
    }

    pub fn pmds(&self) -> &[PmdHandle] {
        &self.pmds
    }

    /// The PMD on `core`, if there is one.
    pub fn pmd_on(&self, core: usize) -> Option<usize> {
        self.pmds.iter().position(|p| p.core().0 == core)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make `port` a destination of every PMD. Its source queues are added with `add_source`;
    /// `affinity[q]` is the core queue q is pinned to (the port file's `pmd_rxq_affinity`).
    pub fn add_port(&self, port: Port, affinity: &[usize]) -> Result<(), PmdError> {
        let id = port.id();
        if id.0 as usize >= MAX_PORTS {
            return Err(PmdError::PortId(id.0));
        }
        let mut port = port;
        port.set_exclusive(match self.always_lock {
            true => usize::MAX,
            false => self.pmds.len(),
        });
        let port = Arc::new(port);
        let mut st = self.state();
        for (i, pmd) in self.pmds.iter().enumerate() {
            if let Err(e) = pmd.add_port(port.clone()) {
                for p in &self.pmds[..i] {
                    let _ = p.remove_port(id);
                }
                return Err(e);
            }
        }
        st.ports[id.0 as usize] = Some(port);
        st.affinity[id.0 as usize] = affinity.to_vec();
        Ok(())
    }

    /// Remove a port: its source queues first, then every PMD lets go of it, and only then is it
    /// returned (to be dropped on control: guest memory unmapped, device closed).
    pub fn remove_port(&self, id: PortId) -> Result<Option<Port>, PmdError> {
        let mut st = self.state();
        let mine: Vec<(u16, usize, bool)> = st
            .sources
            .iter()
            .filter(|e| e.port == id)
            .map(|e| (e.queue, e.pmd, e.running))
            .collect();
        for (queue, pmd, running) in mine {
            if running {
                drop(self.pmds[pmd].remove_source(id, queue)?);
            }
        }
        st.sources.retain(|e| e.port != id);
        for pmd in &self.pmds {
            pmd.remove_port(id)?;
        }
        self.macs.forget_port(id);
        let port = st.ports.get_mut(id.0 as usize).and_then(Option::take);
        // Every PMD dropped its reference when it acknowledged RemovePort.
        Ok(port.and_then(Arc::into_inner))
    }

    /// Start polling source queue `queue` of `port` (the port was added). A queue that ran before
    /// goes back to the PMD it had.
    pub fn add_source(&self, port: PortId, queue: u16, source: Source) -> Result<(), PmdError> {
        let mut st = self.state();
        let i = match st
            .sources
            .iter()
            .position(|e| e.port == port && e.queue == queue)
        {
            Some(i) => i,
            None => {
                let pinned = st.affinity[port.0 as usize]
                    .get(queue as usize)
                    .and_then(|&c| self.pmd_on(c));
                let pmd = match pinned {
                    Some(p) => p,
                    None => self.least_loaded(&st),
                };
                st.sources.push(Entry {
                    port,
                    queue,
                    pmd,
                    pinned,
                    running: false,
                    load: Arc::default(),
                    mark: 0,
                    window_busy: 0,
                });
                st.sources.len() - 1
            }
        };
        let pmd = st.sources[i].pmd;
        if st
            .sources
            .iter()
            .filter(|e| e.pmd == pmd && e.running)
            .count()
            >= MAX_SOURCES
        {
            return Err(PmdError::TooManySources(self.pmds[pmd].core().0));
        }
        let e = &mut st.sources[i];
        self.pmds[pmd].add_source(SourceQueue::new(port, queue, source, e.load.clone()))?;
        e.running = true;
        Ok(())
    }

    /// Stop polling a source queue; returns it (with its ring) once its PMD let go of it.
    pub fn remove_source(&self, port: PortId, queue: u16) -> Result<Option<SourceQueue>, PmdError> {
        let mut st = self.state();
        let Some(e) = st
            .sources
            .iter_mut()
            .find(|e| e.port == port && e.queue == queue && e.running)
        else {
            return Ok(None);
        };
        // Not removed unless the PMD applied it (a withdrawn command leaves it polled).
        let out = self.pmds[e.pmd].remove_source(port, queue)?;
        e.running = false;
        Ok(out)
    }

    /// Install (Some) or detach (None) one virtqueue of a guest's port; `kick`: the eventfd
    /// the guest kicks it with. Returns the ring it replaced, which no PMD touches any more. A
    /// guest RX queue (a destination) is swapped under its lock; a TX queue (a source queue of
    /// the switch) is handed to or taken from the PMD that polls it.
    pub fn set_ring(
        &self,
        port: PortId,
        q: QueueIdx,
        features: NetFeatures,
        ring: Option<Box<Virtq>>,
        kick: Option<File>,
    ) -> Result<Option<Box<Virtq>>, PmdError> {
        if q.is_guest_rx() {
            // Any PMD will do: it takes the queue's lock between its bursts (with one PMD,
            // the only one that delivers into it, it need not).
            return self.pmds[0].swap_ring(port, q.pair(), features, ring);
        }
        let old = self
            .remove_source(port, q.pair())?
            .and_then(|r| match r.source {
                Source::Vhost { ring, .. } => Some(ring),
                _ => None,
            });
        if let Some(ring) = ring {
            let source = Source::Vhost {
                ring,
                features,
                kick,
            };
            self.add_source(port, q.pair(), source)?;
        }
        Ok(old)
    }

    /// The PMD (not isolated by a pinned queue, unless all are) with the least load: fewest
    /// queues for `roundrobin`, fewest busy cycles in the last window for `cycles`.
    fn least_loaded(&self, st: &State) -> usize {
        let weight = |p: usize| -> u64 {
            let on = st.sources.iter().filter(|e| e.pmd == p);
            match self.assign {
                Assign::RoundRobin => on.count() as u64,
                Assign::Cycles => on.map(|e| e.window_busy).sum(),
            }
        };
        open_pmds(st, self.pmds.len())
            .into_iter()
            .min_by_key(|&p| (weight(p), p))
            .unwrap_or(0)
    }

    /// About once a second (control's housekeeping): close the measurement window if it is
    /// due, so per queue and per PMD the busy cycles since the last one become "the last
    /// window"; then auto-rebalance, if on and due.
    pub fn tick(&self) -> Result<Vec<Move>, PmdError> {
        let mut st = self.state();
        if st.window_start.elapsed() < WINDOW {
            return Ok(Vec::new());
        }
        self.close_window(&mut st);
        let Some(lb) = self.auto_lb else {
            return Ok(Vec::new());
        };
        let busiest = st
            .pmd_window
            .iter()
            .map(|&(busy, total)| pct(busy, total))
            .fold(0.0, f64::max);
        if busiest < lb.load_threshold as f64 || st.last_rebalance.elapsed() < lb.interval {
            return Ok(Vec::new());
        }
        let now: Vec<usize> = st.sources.iter().map(|e| e.pmd).collect();
        let plan = plan(&st, self.pmds.len(), Assign::Cycles);
        let (before, after) = (max_load(&st, &now), max_load(&st, &plan));
        if before == 0 || before.saturating_sub(after) * 100 < before * lb.improvement as u64 {
            return Ok(Vec::new());
        }
        st.last_rebalance = Instant::now();
        self.apply(&mut st, &plan)
    }

    fn close_window(&self, st: &mut State) {
        for e in st.sources.iter_mut() {
            let now = e.load.busy_cycles.load(Ordering::Relaxed);
            e.window_busy = now.wrapping_sub(e.mark);
            e.mark = now;
        }
        for (i, pmd) in self.pmds.iter().enumerate() {
            let c = pmd.stats().snapshot();
            let m = st.pmd_mark[i];
            let busy = c.busy_cycles.wrapping_sub(m.busy_cycles);
            let idle = c.idle_cycles.wrapping_sub(m.idle_cycles);
            st.pmd_window[i] = (busy, busy + idle);
            st.pmd_mark[i] = c;
        }
        st.window_start = Instant::now();
    }

    /// Reassign every queue that is not pinned by `policy` (`ctl rebalance`), with the loads of
    /// the last window, and move those whose PMD changes.
    pub fn rebalance(&self, policy: Option<Assign>) -> Result<Vec<Move>, PmdError> {
        let mut st = self.state();
        let plan = plan(&st, self.pmds.len(), policy.unwrap_or(self.assign));
        st.last_rebalance = Instant::now();
        self.apply(&mut st, &plan)
    }

    /// Pin source queue `queue` of `port` to the PMD on `core` (None: unpin), and move it there
    /// now (`ctl pin`, as setting OVS's pmd-rxq-affinity at run time). Other queues move on
    /// the next rebalance (a newly pinned PMD then gives up the queues not pinned to it).
    pub fn pin(
        &self,
        port: PortId,
        queue: u16,
        core: Option<usize>,
    ) -> Result<Vec<Move>, PinError> {
        let mut st = self.state();
        let to = match core {
            Some(c) => Some(self.pmd_on(c).ok_or(PinError::NoPmd(c))?),
            None => None,
        };
        let i = st
            .sources
            .iter()
            .position(|e| e.port == port && e.queue == queue)
            .ok_or(PinError::NoQueue(queue))?;
        st.sources[i].pinned = to;
        let mut plan: Vec<usize> = st.sources.iter().map(|e| e.pmd).collect();
        if let Some(to) = to {
            plan[i] = to;
        }
        Ok(self.apply(&mut st, &plan)?)
    }

    /// Move each queue to the PMD `plan` gives it (indexed like `st.sources`).
    fn apply(&self, st: &mut State, plan: &[usize]) -> Result<Vec<Move>, PmdError> {
        let mut moves = Vec::new();
        for (i, &to) in plan.iter().enumerate() {
            let e = &mut st.sources[i];
            if e.pmd == to {
                continue;
            }
            let from = e.pmd;
            if e.running {
                // A queue its PMD does not have (it failed to take it) stays where it was.
                let Some(sq) = self.pmds[from].remove_source(e.port, e.queue)? else {
                    continue;
                };
                if let Err(err) = self.pmds[to].add_source(sq) {
                    e.running = false;
                    return Err(err);
                }
            }
            e.pmd = to;
            moves.push(Move {
                port: e.port,
                queue: e.queue,
                from: self.pmds[from].core(),
                to: self.pmds[to].core(),
            });
        }
        Ok(moves)
    }

    /// Every source queue, by PMD, with its share of that PMD's cycles over the last window.
    pub fn source_show(&self) -> Vec<SourceQueueInfo> {
        let st = self.state();
        let mut v: Vec<SourceQueueInfo> = st
            .sources
            .iter()
            .map(|e| SourceQueueInfo {
                port: e.port,
                queue: e.queue,
                core: self.pmds[e.pmd].core(),
                pinned: e.pinned.is_some(),
                running: e.running,
                busy_pct: pct(e.window_busy, st.pmd_window[e.pmd].1),
            })
            .collect();
        v.sort_by_key(|r| (r.core.0, r.port, r.queue));
        v
    }

    /// Every PMD: counters since start, its queues, busy share over the last window.
    pub fn pmd_show(&self) -> Vec<PmdInfo> {
        let st = self.state();
        let isolated = isolated(&st, self.pmds.len());
        self.pmds
            .iter()
            .enumerate()
            .map(|(i, p)| PmdInfo {
                core: p.core(),
                counters: p.stats().snapshot(),
                sources: st
                    .sources
                    .iter()
                    .filter(|e| e.pmd == i && e.running)
                    .count(),
                isolated: isolated[i],
                busy_pct: pct(st.pmd_window[i].0, st.pmd_window[i].1),
            })
            .collect()
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Per PMD: a queue is pinned to it, or it is a pipeline tx PMD.
fn isolated(st: &State, n: usize) -> Vec<bool> {
    let mut v: Vec<bool> = (0..n).map(|i| st.tx_only.get(i) == Some(&true)).collect();
    for e in &st.sources {
        if let Some(p) = e.pinned {
            v[p] = true;
        }
    }
    v
}

/// The busiest PMD's load (last window's busy cycles of its queues) when queue i is on PMD
/// `pmd_of[i]`.
fn max_load(st: &State, pmd_of: &[usize]) -> u64 {
    let mut load = vec![0u64; pmd_of.iter().max().map_or(0, |m| m + 1)];
    for (e, &p) in st.sources.iter().zip(pmd_of) {
        load[p] += e.window_busy;
    }
    load.into_iter().max().unwrap_or(0)
}

/// The PMDs a queue that is not pinned may go to: those not isolated, or all if every one is.
fn open_pmds(st: &State, n: usize) -> Vec<usize> {
    let isolated = isolated(st, n);
    match (0..n).filter(|&p| !isolated[p]).collect::<Vec<_>>() {
        v if v.is_empty() => (0..n).collect(),
        v => v,
    }
}

/// A PMD for every queue (indexed like `st.sources`): pinned ones where they are pinned, the
/// others over the PMDs not isolated (all of them, if every one is), by `policy`.
fn plan(st: &State, n: usize, policy: Assign) -> Vec<usize> {
    let pmds = open_pmds(st, n);
    let mut out: Vec<usize> = st
        .sources
        .iter()
        .map(|e| e.pinned.unwrap_or(e.pmd))
        .collect();
    let mut free: Vec<usize> = (0..st.sources.len())
        .filter(|&i| st.sources[i].pinned.is_none())
        .collect();
    match policy {
        Assign::RoundRobin => {
            free.sort_by_key(|&i| (st.sources[i].port, st.sources[i].queue));
            for (k, &i) in free.iter().enumerate() {
                out[i] = pmds[k % pmds.len()];
            }
        }
        Assign::Cycles => {
            // Busiest first, each to the PMD with the least load so far (ties: the queue's
            // own PMD, so equal loads do not move).
            free.sort_by_key(|&i| (std::cmp::Reverse(st.sources[i].window_busy), i));
            let mut load = vec![0u64; n];
            for (i, e) in st.sources.iter().enumerate() {
                if e.pinned.is_some() {
                    load[out[i]] += e.window_busy;
                }
            }
            for &i in &free {
                let own = st.sources[i].pmd;
                let p = *pmds
                    .iter()
                    .min_by_key(|&&p| (load[p], p != own, p))
                    .unwrap_or(&pmds[0]);
                out[i] = p;
                load[p] += st.sources[i].window_busy;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(queues: &[(u64, usize, Option<usize>)]) -> State {
        let now = Instant::now();
        State {
            ports: Vec::new(),
            tx_only: Vec::new(),
            affinity: Vec::new(),
            sources: queues
                .iter()
                .enumerate()
                .map(|(i, &(busy, pmd, pinned))| Entry {
                    port: PortId(i as u16 / 2),
                    queue: i as u16 % 2,
                    pmd,
                    pinned,
                    running: true,
                    load: Arc::default(),
                    mark: 0,
                    window_busy: busy,
                })
                .collect(),
            pmd_mark: Vec::new(),
            pmd_window: Vec::new(),
            window_start: now,
            last_rebalance: now,
        }
    }

    #[test]
    fn roundrobin_deals_queues_in_order() {
        let st = state(&[(0, 0, None), (0, 0, None), (0, 0, None), (0, 0, None)]);
        assert_eq!(plan(&st, 2, Assign::RoundRobin), [0, 1, 0, 1]);
        assert_eq!(plan(&st, 3, Assign::RoundRobin), [0, 1, 2, 0]);
    }

    #[test]
    fn cycles_balances_measured_load() {
        // Two heavy queues on PMD 0, two light ones on PMD 1.
        let st = state(&[(90, 0, None), (80, 0, None), (10, 1, None), (5, 1, None)]);
        let p = plan(&st, 2, Assign::Cycles);
        assert_ne!(p[0], p[1], "the heavy queues are split");
        assert_eq!(max_load(&st, &[0, 0, 1, 1]), 170);
        assert_eq!(max_load(&st, &p), 95);
    }

    #[test]
    fn balanced_queues_stay_where_they_are() {
        let st = state(&[(50, 1, None), (50, 0, None)]);
        assert_eq!(plan(&st, 2, Assign::Cycles), [1, 0]);
    }

    #[test]
    fn pinned_queues_stay_and_isolate_their_pmd() {
        let st = state(&[(10, 1, Some(1)), (80, 1, None), (70, 0, None), (5, 0, None)]);
        let p = plan(&st, 3, Assign::Cycles);
        assert_eq!(p[0], 1);
        assert!(
            p[1..].iter().all(|&x| x != 1),
            "PMD 1 takes only its pinned queue"
        );
        assert_ne!(p[1], p[2]);
        let p = plan(&st, 3, Assign::RoundRobin);
        assert_eq!(p, [1, 0, 2, 0]);
    }
}
