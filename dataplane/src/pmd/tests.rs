//! The PMD driven whole on a test thread: bursts, forwarding, commands.

use std::sync::atomic::AtomicBool;

use crossbeam_queue::ArrayQueue;

use super::command::{Command, Reply, Returned};
use super::*;
use crate::port::lock::DestLock;
use crate::port::Port;
use crate::port::{GuestRxq, VhostPort};
use crate::stats::PmdStats;
use crate::virtq::mock::MockGuest;
use crate::virtq::VIRTQ_DESC_F_NEXT;
use crate::BURST;

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
        *p.rx[0].get_mut() = GuestRxq {
            ring: Some(Box::new(g.rx.ring(false).into())),
            features: f,
        };
        pmd.apply(Command::AddPort(Arc::new(port), reply()));
        let source = Source::Vhost {
            ring: Box::new(g.tx.ring(false).into()),
            features: f,
            kick: None,
        };
        pmd.apply(Command::AddSource(
            SourceQueue::new(id, 0, source, Arc::default()),
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
    pmd.apply(Command::AddSource(
        SourceQueue::new(PortId(0), 1, source, Arc::default()),
        r.clone(),
    ));
    assert_eq!(pmd.sources.len(), 1, "only the queue added before");
    assert!(!r.is_done());
    let r = reply();
    pmd.apply(Command::RemoveSource(PortId(0), 0, r.clone()));
    assert!(r.is_done() && !r.cancel(), "applied: too late to withdraw");
    assert!(pmd.sources.is_empty());
    assert!(matches!(r.returned.pop(), Some(Returned::SourceQueue(_))));
}

impl Pmd {
    fn pass(&mut self) -> usize {
        self.poll_all(&mut tsc::now()).0
    }
}

/// The counters of port `port`'s guest TX queue (`tx`) or RX queue.
fn stats(pmd: &Pmd, port: usize, tx: bool) -> crate::stats::QueueCounters {
    if tx {
        let q = pmd
            .sources
            .iter()
            .find(|q| q.port.0 as usize == port)
            .unwrap();
        let Source::Vhost { ring, .. } = &q.source else {
            panic!()
        };
        return ring.stats().snapshot();
    }
    rx_queue(pmd, port).with(pmd.fwd.fabric.dl.me, |q| {
        q.ring.as_ref().unwrap().stats().snapshot()
    })
}

fn rx_queue(pmd: &Pmd, port: usize) -> &DestLock<GuestRxq> {
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
    use crate::net::offload::tests::{check_tcp, tso_frame};
    use crate::net::vnet::OffloadCaps;
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
    let (f, h) = crate::net::offload::tests::tso_frame(false, false, payload, mss);
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
    use crate::mem::table::{test_mem::memfd, DirtyLog};
    use std::os::unix::fs::FileExt;
    let (mut pmd, mut g) = switch_with(&[false, false]);
    let file = memfd(0x100);
    let log = DirtyLog::map(file.try_clone().unwrap(), 0x100, 0).unwrap();
    let ring = Box::new(g[1].rx.ring(false).with_log(log, None).into());
    rx_queue(&pmd, 1).with(pmd.fwd.fabric.dl.me, |q| q.ring = Some(ring));
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
