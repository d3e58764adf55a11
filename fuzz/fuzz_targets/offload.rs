//! The software offloads (dataplane net/offload.rs) as a guest drives them: a virtio-net header and a frame
//! the fuzzer writes, cut into 1–4 buffers where it says, parsed (`VnetHdr::parse`) and
//! finished (`offload::finish`: checksum, TCP segmentation) for a destination that takes
//! none. Nothing may panic; cost oracle: no more frames than a frame of that length can be
//! cut into at the smallest segment size taken; every frame made is no longer than its
//! headers and one segment; a checksum finished without segmentation verifies.
#![no_main]

use dataplane::harness::{
    finish, gather, Frame, Seg, SegList, SoftScratch, VnetHdr, MIN_GSO_SIZE, VNET_HDR_LEN,
};
use dataplane::MAX_FRAME;
use libfuzzer_sys::fuzz_target;

/// Ones'-complement sum of big-endian 16-bit words (an odd last byte padded with zero).
fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fuzz_target!(|data: &[u8]| {
    if data.len() < VNET_HDR_LEN + 3 {
        return;
    }
    let (hdr, rest) = data.split_at(VNET_HDR_LEN);
    let (cuts, frame) = rest.split_at(3);
    let mut frame = frame.to_vec();
    if frame.len() > MAX_FRAME as usize {
        frame.truncate(MAX_FRAME as usize);
    }
    let len = frame.len() as u32;
    let Ok(vnet) = VnetHdr::parse(hdr.try_into().expect("header"), len) else {
        return;
    };
    // Up to four buffers, cut where the fuzzer says.
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| c as usize * frame.len() / 256)
        .collect();
    points.sort_unstable();
    let mut segs = SegList::default();
    let mut at = 0;
    for p in points.into_iter().chain([frame.len()]) {
        if p > at {
            let ptr = frame[at..].as_mut_ptr();
            // SAFETY: a piece of `frame`, which outlives `segs`.
            assert!(segs.push(unsafe { Seg::new(ptr, (p - at) as u32) }));
            at = p;
        }
    }
    let f = Frame {
        segs: &segs,
        skip: 0,
        len,
        vnet,
        queue: 0,
    };
    let mut soft = SoftScratch::default();
    let mut made = 0u32;
    let mut out = Vec::new();
    let result = finish(&f, &mut soft, |g| {
        made += 1;
        assert!(g.vnet.is_none(), "a finished frame has nothing left to do");
        if vnet.gso_size > 0 {
            assert!(
                g.len <= vnet.hdr_len.max(192) as u32 + vnet.gso_size as u32 + 192,
                "a segment of {} bytes for gso_size {}",
                g.len,
                vnet.gso_size
            );
        } else {
            let mut b = vec![0u8; g.len as usize];
            gather(g.segs, g.skip, &mut b);
            out = b;
        }
        true
    });
    let most = len / MIN_GSO_SIZE as u32 + 1;
    assert!(made <= most, "{made} frames made of one of {len} bytes");
    // A field at an odd offset from where the sum starts straddles two of its words: then no
    // checksum could verify, and the frame is the sender's nonsense to receive.
    let aligned = vnet.csum_offset % 2 == 0;
    if let (Ok(_), true, 0, true) = (result, vnet.needs_csum(), vnet.gso_size, aligned) {
        // The sender left the pseudo-header's sum in the field; with it added back, the
        // finished checksum verifies.
        let (start, field) = (
            vnet.csum_start as usize,
            (vnet.csum_start + vnet.csum_offset) as usize,
        );
        let pseudo = u16::from_be_bytes([frame[field], frame[field + 1]]) as u32;
        assert_eq!(out.len(), frame.len());
        assert_eq!(fold(sum16(&out[start..]) + pseudo), 0xffff, "checksum");
    }
});
