//! The descriptor-chain reader and the RX writer over guest memory and rings the fuzzer controls:
//! a TX ring whose chains are walked and delivered into an RX ring (mergeable or not), for a few
//! rounds, with the "guest" rewriting memory between rounds; split or packed rings. With
//! offloads on, the TX chains'
//! virtio-net headers are parsed and, for an RX side that does not take them, checksums and TCP
//! segmentation are done in software (net/offload.rs). Nothing may panic, every translated segment
//! must lie inside guest memory, and the RX counters must account for every delivery. The
//! rings notify through call eventfds, which the fuzzer may make hostile (blocking, counter at
//! its maximum: a notify that blocked would hang the run, which libFuzzer's -timeout reports).
//! Cost oracle: a chain's walk reads at most MAX_CHAIN_DESCS descriptors (+1 for an indirect
//! head), and software segmentation makes at most MAX_FRAME / MIN_GSO_SIZE + 1 frames of one.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dataplane::harness::{
    gather, install_notifier, maintain_notifier, pmd_holder, Delivery, DeliveryScratch, Frame,
    GuestRxq, SegList, VirtQueue, VnetHdr, DESC_READS, MAX_CHAIN_DESCS, MIN_GSO_SIZE, VNET_HDR_LEN,
};
use dataplane::{
    MemTable, NetFeatures, OffloadCaps, PackedRing, Port, PortId, QueueStats, RegionDesc,
    RingAddrs, SplitRing, VhostPort, Virtq, BURST, MAX_FRAME,
};
use libfuzzer_sys::fuzz_target;

// One file, two regions: A (gpa 0x10000, 64 KiB) and B right after it (gpa 0x20000, 8 KiB, at
// file offset 0x10000), so buffers may legally cross a region boundary and must be split.
const A_GPA: u64 = 0x10000;
const A_SIZE: u64 = 0x10000;
const B_SIZE: u64 = 0x2000;
const UVA: u64 = 0x7f00_0000_0000;
// Rings at the start of the image (queue sizes up to 16) so that short inputs reach them:
// desc at +0, avail at +0x100, used at +0x140.
const TX: u64 = A_GPA;
const RX: u64 = A_GPA + 0x200;

/// A call eventfd: blocking with its counter at the maximum (`hostile`), or a plain one.
fn call_fd(hostile: bool) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd(2); the fd is owned by the File at once.
    let f = unsafe { std::fs::File::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) };
    if hostile {
        use std::io::Write;
        (&f).write_all(&0xffff_ffff_ffff_fffeu64.to_ne_bytes())
            .expect("fill eventfd");
    }
    f
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // The notifications go through this thread's io_uring, as on a PMD.
    static NOTIFIER: std::sync::Once = std::sync::Once::new();
    NOTIFIER.call_once(|| install_notifier().expect("io_uring"));
    let (cfg, image) = data.split_at(4);
    let qsize = |b: u8| 1u32 << (b % 5); // 1..=16
                                         // Bits 3..=7 of cfg[2]: TX headers read, then what the RX side takes (CSUM, TSO4, TSO6, ECN).
    let rx_offloads = [
        OffloadCaps::CSUM,
        OffloadCaps::TSO4,
        OffloadCaps::TSO6,
        OffloadCaps::ECN,
    ]
    .iter()
    .enumerate()
    .fold(OffloadCaps::NONE, |c, (i, &o)| {
        c.with(o, cfg[2] & (0x10 << i) != 0)
    });
    let features = NetFeatures {
        hdr_len: if cfg[2] & 1 != 0 { 12 } else { 10 },
        mrg_rxbuf: cfg[2] & 2 != 0,
        rx_offloads,
        tx_offloads: cfg[2] & 8 != 0,
    };
    let event_idx = cfg[2] & 4 != 0;
    let rounds = 1 + (cfg[3] % 4) as usize;

    let file = ringswitch_fuzz::memfd(A_SIZE + B_SIZE);
    let chunk = image.len().div_ceil(rounds).max(1);
    let mut chunks = image.chunks(chunk);
    file.write_all_at(chunks.next().unwrap_or_default(), 0)
        .expect("write");
    let regions = [
        RegionDesc {
            guest_phys_addr: A_GPA,
            size: A_SIZE,
            user_addr: UVA,
            mmap_offset: 0,
        },
        RegionDesc {
            guest_phys_addr: A_GPA + A_SIZE,
            size: B_SIZE,
            user_addr: UVA + A_SIZE,
            mmap_offset: A_SIZE,
        },
    ];
    let mem = MemTable::map(
        &regions,
        vec![
            file.try_clone().expect("dup"),
            file.try_clone().expect("dup"),
        ],
    )
    .expect("map");
    // Host ranges of the two regions: every translated segment must lie inside one of them.
    let bounds: Vec<(usize, usize)> = [(A_GPA, A_SIZE), (A_GPA + A_SIZE, B_SIZE)]
        .iter()
        .map(|&(gpa, size)| {
            let p = mem.gpa_to_host(gpa, size).expect("region") as usize;
            (p, p + size as usize)
        })
        .collect();
    // Bit 4 of cfg[3]: packed rings (descriptors at +0, driver area at +0x100, device area at
    // +0x140; both wrap counters start at 1).
    let packed = cfg[3] & 0x10 != 0;
    // Bit 5 of cfg[3]: hostile call fds.
    let hostile_calls = cfg[3] & 0x20 != 0;
    let ring = |base: u64, size: u32| -> Virtq {
        let uva = UVA + base - A_GPA;
        let addrs = RingAddrs {
            desc: uva,
            avail: uva + 0x100,
            used: uva + 0x140,
        };
        let stats = Arc::new(QueueStats::default());
        let m = mem.clone();
        let call = Some(call_fd(hostile_calls));
        match packed {
            true => {
                PackedRing::new(m, size, addrs, 0x8000, event_idx, call, stats).map(Virtq::from)
            }
            false => SplitRing::new(m, size, addrs, 0, event_idx, call, stats).map(Virtq::from),
        }
        .expect("rings are placed validly")
    };
    let mut tx = ring(TX, qsize(cfg[0]));
    let rx = ring(RX, qsize(cfg[1]));
    let rx_stats = rx.stats().clone();
    let mut port = VhostPort::port(PortId(1), 1);
    let Port::Vhost(p) = &mut port else {
        unreachable!()
    };
    *p.rx[0].get_mut() = GuestRxq {
        ring: Some(Box::new(rx)),
        features,
    };
    // The ring marks itself broken (avail index jump) in its counters.
    let broken = || rx_stats.ring_broken.load(Ordering::Relaxed) != 0;

    let mut src = Box::<SegList>::default();
    let mut scratch = DeliveryScratch::new(pmd_holder(0));
    // Frames offered as they are, and frames whose offloads were finished in software first (the
    // RX side then counts each frame made of them, as `sw_offload`).
    let (mut offered, mut finished, mut tx_frames) = (0u64, 0u64, 0u64);
    let hdr = features.hdr_len as u32;
    for round in 0..rounds {
        if round > 0 {
            // The guest changes rings and buffers while the switch works.
            if let Some(c) = chunks.next() {
                file.write_all_at(
                    c,
                    (round as u64 * 0x1234) % (A_SIZE + B_SIZE - c.len() as u64).max(1),
                )
                .expect("write");
            }
        }
        let mut on_frame = |src: &SegList| {
            tx_frames += 1;
            let sum: u64 = src.segs().iter().map(|s| s.len() as u64).sum();
            assert_eq!(sum, src.total as u64);
            for s in src.segs() {
                let (p, end) = (s.ptr() as usize, s.ptr() as usize + s.len() as usize);
                assert!(
                    bounds.iter().any(|&(lo, hi)| lo <= p && end <= hi),
                    "segment outside guest memory"
                );
            }
            let len = src.total.saturating_sub(hdr);
            let mut b = [0u8; VNET_HDR_LEN];
            gather(src, 0, &mut b);
            let vnet = match features.tx_offloads {
                true => VnetHdr::parse(&b, len),
                false => Ok(VnetHdr::NONE),
            };
            if let (true, Ok(vnet)) = (len >= 14 && len <= MAX_FRAME, vnet) {
                let f = Frame {
                    segs: src,
                    skip: hdr,
                    len,
                    vnet,
                    queue: 0,
                };
                let as_is = vnet.is_none() || rx_offloads.take(&vnet);
                match port.deliver(&f, &mut scratch) {
                    // Only a ring marked broken (avail index jump) stops taking frames.
                    Delivery::NoQueue => assert!(broken()),
                    Delivery::BadOffload => assert!(!as_is),
                    _ if as_is => offered += 1,
                    _ => finished += 1,
                }
            }
        };
        match &mut tx {
            Virtq::Split(r) => tx_burst(r, hdr, &mut src, &mut on_frame),
            Virtq::Packed(r) => tx_burst(r, hdr, &mut src, &mut on_frame),
        }
        for (id, q) in scratch.held.drain(..) {
            assert_eq!(id, PortId(1));
            // SAFETY: listed in `held`: this scratch's PMD holds the queue, and no reference
            // into it is alive between bursts.
            unsafe { port.flush_and_release(q as usize) };
        }
        maintain_notifier();
    }
    // Every frame offered to the RX ring was delivered or counted as a drop.
    let s = &*rx_stats;
    let delivered = s.packets.load(Ordering::Relaxed);
    let dropped = s.drop_no_rx_buffer.load(Ordering::Relaxed)
        + s.drop_too_big.load(Ordering::Relaxed)
        + s.drop_bad_descriptor.load(Ordering::Relaxed);
    let made = s.sw_offload.load(Ordering::Relaxed);
    assert!(made >= finished || broken());
    // Cost: what one frame may be cut into.
    let most = tx_frames * (MAX_FRAME / MIN_GSO_SIZE as u32 + 1) as u64;
    assert!(made <= most, "{made} frames made of {tx_frames}");
    // A ring found broken half-way through a finished frame's pieces takes no more of them.
    if broken() {
        assert!(delivered + dropped <= offered + made);
    } else {
        assert_eq!(delivered + dropped, offered + made);
    }
});

/// Take a burst from the TX ring as the PMD does, handing each well-formed chain to `frame`.
fn tx_burst<R: VirtQueue>(tx: &mut R, hdr: u32, src: &mut SegList, frame: impl FnMut(&SegList)) {
    let mut frame = frame;
    let n = tx.avail_pending().min(BURST as u16);
    for i in 0..n {
        let head = tx.head_at(i);
        tx.prefetch_desc(head);
        tx.prefetch_data(head, hdr);
        let before = DESC_READS.load(Ordering::Relaxed);
        let ok = tx.walk_chain(head, false, src).is_ok();
        let reads = DESC_READS.load(Ordering::Relaxed) - before;
        assert!(
            reads <= MAX_CHAIN_DESCS as u64 + 1,
            "{reads} descriptor reads for one chain"
        );
        if ok {
            frame(src);
        }
        tx.push_used(head, 0);
    }
    tx.advance(n);
    tx.flush();
    maintain_notifier();
}
