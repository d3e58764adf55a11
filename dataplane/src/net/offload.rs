//! Offloads finished in software. A frame carries the virtio-net header it arrived with
//! (vnet.rs); a destination that negotiated the same offload gets the header as it is; for one
//! that did not, the switch finishes the work here: it fills in the checksum, or cuts the
//! segment into MSS-sized frames with their own IP and TCP headers and checksums. Frames made
//! here point into the source's buffers; only the headers are new bytes. PMD threads.

use crate::mem::copy::{csum, fold, gather};
use crate::mem::seg::{Seg, SegList};
use crate::net::vnet::{
    BadOffload, Frame, VnetHdr, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Longest Ethernet + IP + TCP header segmentation takes apart (IPv6 extension headers
/// included); longer ones are refused.
const MAX_HDRS: usize = 192;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Room for the frames the software path assembles, allocated once per PMD.
pub struct SoftScratch {
    hdrs: [u8; MAX_HDRS],
    csum: [u8; 2],
    frame: SegList,
}

impl Default for SoftScratch {
    fn default() -> Self {
        SoftScratch {
            hdrs: [0; MAX_HDRS],
            csum: [0; 2],
            frame: SegList::default(),
        }
    }
}

/// Finish in software what `f`'s header leaves to its receiver, and hand `out` the complete
/// frame or frames that result (each with header NONE). Returns how many were made, or why
/// none could be; what `out` does with each is its own business (delivery counts it).
pub fn finish(
    f: &Frame,
    soft: &mut SoftScratch,
    mut out: impl FnMut(&Frame) -> bool,
) -> Result<FinishStats, BadOffload> {
    let mut done = FinishStats::default();
    if f.vnet.gso_type != VIRTIO_NET_HDR_GSO_NONE {
        segment(f, soft, |frame| {
            done.frames += 1;
            done.delivered += out(frame) as u32;
        })?;
        return Ok(done);
    }
    soft.frame.clear();
    let field = if f.vnet.needs_csum() {
        let (start, at) = (
            f.vnet.csum_start as u32,
            f.vnet.csum_start as u32 + f.vnet.csum_offset as u32,
        );
        if at + 2 > f.len {
            return Err(BadOffload);
        }
        // The field holds the pseudo-header's sum: summing over it finishes the checksum.
        let c = !csum(f.segs, f.skip + start, f.len - start);
        soft.csum = nonzero(c).to_be_bytes();
        Some(at)
    } else {
        None
    };
    let ok = match field {
        Some(at) => {
            soft.frame.push_range(f.segs, f.skip, at)
                // SAFETY: two bytes of the scratch, which outlives the frame it is part of.
                && soft.frame.push(unsafe { Seg::new(soft.csum.as_mut_ptr(), 2) })
                && soft
                    .frame
                    .push_range(f.segs, f.skip + at + 2, f.len - at - 2)
        }
        None => soft.frame.push_range(f.segs, f.skip, f.len),
    };
    if !ok {
        return Err(BadOffload);
    }
    done.frames = 1;
    done.delivered = out(&Frame {
        segs: &soft.frame,
        skip: 0,
        len: f.len,
        vnet: VnetHdr::NONE,
        queue: f.queue,
    }) as u32;
    Ok(done)
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FinishStats {
    /// Complete frames made.
    pub frames: u32,
    /// Of those, taken by the destination.
    pub delivered: u32,
}

/// A computed checksum of 0 is sent as 0xffff (the same value in ones'-complement); 0 means
/// "no checksum" to UDP.
fn nonzero(c: u16) -> u16 {
    if c == 0 {
        0xffff
    } else {
        c
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Sum of big-endian 16-bit words of a byte slice (even length).
fn sum16(b: &[u8]) -> u64 {
    b.chunks_exact(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u64)
        .sum()
}

/// Cut a TCP segment of more than one MSS into frames of at most `gso_size` payload bytes, each
/// with its IP header's length (and IPv4 id and checksum) and TCP sequence number, flags and
/// checksum rewritten, as the sender's NIC would have done. Each frame is passed to `out`.
fn segment(
    f: &Frame,
    soft: &mut SoftScratch,
    mut out: impl FnMut(&Frame),
) -> Result<(), BadOffload> {
    let v = f.vnet;
    let l4 = v.csum_start as usize;
    let v6 = match v.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_TCPV4 => false,
        VIRTIO_NET_HDR_GSO_TCPV6 => true,
        _ => return Err(BadOffload),
    };
    if !v.needs_csum() || v.csum_offset != 16 || v.gso_size == 0 || l4 + 20 > MAX_HDRS {
        return Err(BadOffload);
    }
    let h = &mut soft.hdrs;
    if gather(f.segs, f.skip, &mut h[..l4 + 20]) < l4 + 20 || l4 + 20 > f.len as usize {
        return Err(BadOffload);
    }
    let hdrs = l4 + 4 * (h[l4 + 12] >> 4) as usize;
    if hdrs < l4 + 20 || hdrs > MAX_HDRS || hdrs > f.len as usize {
        return Err(BadOffload);
    }
    gather(f.segs, f.skip, &mut h[..hdrs]);
    // Ethernet, one optional 802.1Q tag, then IP up to the TCP header at csum_start.
    let l3 = if be16(h, 12) == 0x8100 { 18 } else { 14 };
    let (ethertype, version, min_ip) = if v6 { (0x86dd, 6, 40) } else { (0x0800, 4, 20) };
    if be16(h, l3 - 2) != ethertype || h[l3] >> 4 != version || l4 < l3 + min_ip {
        return Err(BadOffload);
    }
    if !v6 && (l3 + 4 * (h[l3] & 0xf) as usize != l4 || h[l3 + 9] != 6) {
        return Err(BadOffload);
    }
    let payload = f.len as usize - hdrs;
    let mss = v.gso_size as usize;
    let seq0 = u32::from_be_bytes([h[l4 + 4], h[l4 + 5], h[l4 + 6], h[l4 + 7]]);
    let flags0 = h[l4 + 13];
    let id0 = be16(h, l3 + 4);
    // The addresses' part of the pseudo-header, the same for every frame.
    let addrs = if v6 {
        sum16(&h[l3 + 8..l3 + 40])
    } else {
        sum16(&h[l3 + 12..l3 + 20])
    };
    let tcp_hlen = hdrs - l4;
    let frames = payload.div_ceil(mss).max(1);
    for i in 0..frames {
        let off = i * mss;
        let n = mss.min(payload - off);
        let last = i + 1 == frames;
        // Lengths fit 16 bits for any frame below MAX_FRAME; a lying gso_size only makes the
        // truncated lengths wrong, which the receiver's checks catch.
        let tcp_len = tcp_hlen + n;
        if v6 {
            put16(h, l3 + 4, (l4 - l3 - 40 + tcp_len) as u16);
        } else {
            put16(h, l3 + 2, (l4 - l3 + tcp_len) as u16);
            put16(h, l3 + 4, id0.wrapping_add(i as u16));
            put16(h, l3 + 10, 0);
            let c = !fold(sum16(&h[l3..l4]));
            put16(h, l3 + 10, c);
        }
        h[l4 + 4..l4 + 8].copy_from_slice(&seq0.wrapping_add(off as u32).to_be_bytes());
        let mut flags = flags0;
        if !last {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        h[l4 + 13] = flags;
        put16(h, l4 + 16, 0);
        let data = f.skip + (hdrs + off) as u32;
        let sum =
            addrs + 6 + tcp_len as u64 + sum16(&h[l4..hdrs]) + csum(f.segs, data, n as u32) as u64;
        put16(h, l4 + 16, nonzero(!fold(sum)));

        soft.frame.clear();
        // SAFETY: the scratch's header buffer, `hdrs` <= its length, outliving the frame.
        let hdr_seg = unsafe { Seg::new(h.as_mut_ptr(), hdrs as u32) };
        let fits = soft.frame.push(hdr_seg) && soft.frame.push_range(f.segs, data, n as u32);
        if !fits {
            return Err(BadOffload);
        }
        out(&Frame {
            segs: &soft.frame,
            skip: 0,
            len: (hdrs + n) as u32,
            vnet: VnetHdr::NONE,
            queue: f.queue,
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::net::vnet::{OffloadCaps, VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_LEN};

    /// An Ethernet + IPv4/IPv6 + TCP frame with `payload` bytes, the way a sender with TSO and
    /// checksum offload hands it over: IP length of the whole, TCP checksum field holding the
    /// pseudo-header sum only. Returns the frame and its header.
    pub(crate) fn tso_frame(v6: bool, vlan: bool, payload: usize, mss: u16) -> (Vec<u8>, VnetHdr) {
        let mut f = vec![2, 0, 0, 0, 0, 0xb, 2, 0, 0, 0, 0, 0xa];
        if vlan {
            f.extend([0x81, 0x00, 0x00, 0x07]);
        }
        let l3 = f.len() + 2;
        let tcp_len = 32 + payload; // TCP header with 12 bytes of options (timestamps)
        if v6 {
            f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend((tcp_len as u16).to_be_bytes());
            f.extend([6, 64]);
            f.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            f.extend([0x08, 0x00, 0x45, 0]);
            f.extend(((20 + tcp_len) as u16).to_be_bytes());
            f.extend([0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        }
        let l4 = f.len();
        if !v6 {
            let c = !fold(sum16(&f[l3..l4]));
            put16(&mut f, l3 + 10, c);
        }
        f.extend([0x9c, 0x40, 0x14, 0x51]); // ports
        f.extend(0x1000_0000u32.to_be_bytes()); // seq
        f.extend(0x2000_0000u32.to_be_bytes()); // ack
        f.extend([
            0x80,
            TCP_PSH | TCP_FIN | TCP_CWR | 0x10,
            0x01,
            0xf6,
            0,
            0,
            0,
            0,
        ]);
        f.extend([1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        f.extend((0..payload).map(|i| (i * 13 % 251) as u8));
        let addrs = if v6 {
            sum16(&f[l3 + 8..l3 + 40])
        } else {
            sum16(&f[l3 + 12..l3 + 20])
        };
        // The partial checksum: the pseudo-header's sum, folded, not inverted.
        let pseudo = fold(addrs + 6 + tcp_len as u64);
        put16(&mut f, l4 + 16, pseudo);
        let gso = if payload > mss as usize {
            if v6 {
                VIRTIO_NET_HDR_GSO_TCPV6
            } else {
                VIRTIO_NET_HDR_GSO_TCPV4
            }
        } else {
            0
        };
        let h = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: gso,
            hdr_len: if gso != 0 { (l4 + 32) as u16 } else { 0 },
            gso_size: if gso != 0 { mss } else { 0 },
            csum_start: l4 as u16,
            csum_offset: 16,
        };
        (f, h)
    }

    /// Every checksum of a complete frame verifies: IPv4 header, TCP over its pseudo-header.
    /// Returns (IPv4 id, TCP seq, TCP flags, payload).
    pub(crate) fn check_tcp(f: &[u8]) -> (u16, u32, u8, Vec<u8>) {
        let l3 = if be16(f, 12) == 0x8100 { 18 } else { 14 };
        let v6 = f[l3] >> 4 == 6;
        let (l4, id, addrs, ip_len) = if v6 {
            let pl = be16(f, l3 + 4) as usize;
            (l3 + 40, 0, sum16(&f[l3 + 8..l3 + 40]), 40 + pl)
        } else {
            let ihl = 4 * (f[l3] & 0xf) as usize;
            assert_eq!(
                fold(sum16(&f[l3..l3 + ihl])),
                0xffff,
                "IPv4 header checksum"
            );
            (
                l3 + ihl,
                be16(f, l3 + 4),
                sum16(&f[l3 + 12..l3 + 20]),
                be16(f, l3 + 2) as usize,
            )
        };
        assert_eq!(l3 + ip_len, f.len(), "IP length");
        let tcp = &f[l4..];
        let mut padded = tcp.to_vec();
        padded.resize(tcp.len().div_ceil(2) * 2, 0);
        let sum = addrs + 6 + tcp.len() as u64 + sum16(&padded);
        assert_eq!(fold(sum), 0xffff, "TCP checksum");
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let hl = 4 * (tcp[12] >> 4) as usize;
        (id, seq, tcp[13], tcp[hl..].to_vec())
    }

    fn collect(f: &Frame, caps_soft: &mut SoftScratch) -> Result<Vec<Vec<u8>>, BadOffload> {
        let mut got = Vec::new();
        finish(f, caps_soft, |fr| {
            let mut b = vec![0u8; fr.len as usize];
            gather(fr.segs, fr.skip, &mut b);
            assert!(fr.vnet.is_none());
            got.push(b);
            true
        })?;
        Ok(got)
    }

    #[test]
    fn words_are_the_header_bytes() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
        };
        let (lo, hi) = h.words(0x090a);
        let mut b = lo.to_le_bytes().to_vec();
        b.extend(hi.to_le_bytes());
        assert_eq!(&b[..VNET_HDR_LEN], &h.bytes());
        assert_eq!(&b[10..], &0x090au16.to_le_bytes());
    }

    #[test]
    fn headers_parse_and_round_trip() {
        let (f, h) = tso_frame(false, false, 5000, 1448);
        let back = VnetHdr::parse(&h.bytes(), f.len() as u32).unwrap();
        assert_eq!(back, h);
        assert!(VnetHdr::parse(&[0; 10], 60).unwrap().is_none());
        // DATA_VALID and stray fields of a complete frame are dropped.
        let mut b = [0u8; 10];
        b[0] = 2;
        b[4] = 9;
        assert!(VnetHdr::parse(&b, 60).unwrap().is_none());
        // Checksum field beyond the frame; UDP and unknown segmentation; TSO without a size
        // or without a checksum to fill.
        let mut bad = h;
        bad.csum_offset = 6000;
        assert_eq!(
            VnetHdr::parse(&bad.bytes(), f.len() as u32),
            Err(BadOffload)
        );
        for (gso, size, flags) in [(3, 1448, 1), (7, 1448, 1), (1, 0, 1), (1, 1448, 0)] {
            let b = VnetHdr {
                gso_type: gso,
                gso_size: size,
                flags,
                ..h
            };
            assert_eq!(VnetHdr::parse(&b.bytes(), f.len() as u32), Err(BadOffload));
        }
    }

    #[test]
    fn caps_decide_what_passes_as_is() {
        let (_, tso4) = tso_frame(false, false, 5000, 1448);
        let (_, tso6) = tso_frame(true, false, 5000, 1448);
        let (_, csum) = tso_frame(false, false, 100, 1448);
        let ecn = VnetHdr {
            gso_type: tso4.gso_type | VIRTIO_NET_HDR_GSO_ECN,
            ..tso4
        };
        let c = OffloadCaps::CSUM;
        let c4 = c.with(OffloadCaps::TSO4, true);
        assert!(OffloadCaps::NONE.take(&VnetHdr::NONE));
        assert!(!OffloadCaps::NONE.take(&csum));
        assert!(c.take(&csum) && !c.take(&tso4));
        assert!(c4.take(&tso4) && !c4.take(&tso6) && !c4.take(&ecn));
        assert!(OffloadCaps::ALL.take(&ecn) && OffloadCaps::ALL.take(&tso6));
    }

    #[test]
    fn a_checksum_is_finished_over_split_buffers() {
        for v6 in [false, true] {
            let (f, h) = tso_frame(v6, false, 333, 1448);
            // Split at odd offsets, one inside the checksum field.
            let at = h.csum_start as usize + 17;
            let mut bufs = vec![
                vec![7u8; 12],
                f[..at].to_vec(),
                f[at..101].to_vec(),
                f[101..].to_vec(),
            ];
            let segs = SegList::over(&mut bufs);
            let fr = Frame {
                segs: &segs,
                skip: 12,
                len: f.len() as u32,
                vnet: h,
                queue: 0,
            };
            let got = collect(&fr, &mut SoftScratch::default()).unwrap();
            assert_eq!(got.len(), 1);
            let (_, seq, _, payload) = check_tcp(&got[0]);
            assert_eq!((seq, payload), (0x1000_0000, f[f.len() - 333..].to_vec()));
            // Only the checksum field changed.
            let c = h.csum_start as usize + 16;
            assert_eq!((&got[0][..c], &got[0][c + 2..]), (&f[..c], &f[c + 2..]));
        }
    }

    #[test]
    fn a_tso_frame_is_cut_into_checked_mss_frames() {
        for (v6, vlan, payload, mss) in [
            (false, false, 10_000, 1448),
            (true, true, 4000, 1000),
            (false, true, 2896, 1448),
            (true, false, 65_000, 1428),
        ] {
            let (f, h) = tso_frame(v6, vlan, payload, mss);
            // The frame as Linux hands it over: header, then the payload in pages.
            let mut bufs: Vec<Vec<u8>> = vec![f[..300].to_vec()];
            bufs.extend(f[300..].chunks(4096).map(|c| c.to_vec()));
            let segs = SegList::over(&mut bufs);
            let fr = Frame {
                segs: &segs,
                skip: 0,
                len: f.len() as u32,
                vnet: h,
                queue: 0,
            };
            let got = collect(&fr, &mut SoftScratch::default()).unwrap();
            assert_eq!(
                got.len(),
                payload.div_ceil(mss as usize),
                "{v6} {payload}/{mss}"
            );
            let mut data = Vec::new();
            for (i, g) in got.iter().enumerate() {
                let (id, seq, flags, p) = check_tcp(g);
                let last = i + 1 == got.len();
                assert_eq!(seq, 0x1000_0000 + data.len() as u32);
                if !v6 {
                    assert_eq!(id, 0x1234 + i as u16);
                }
                assert_eq!(flags & TCP_FIN != 0, last, "FIN on the last only");
                assert_eq!(flags & TCP_PSH != 0, last, "PSH on the last only");
                assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR on the first only");
                assert!(p.len() <= mss as usize);
                data.extend(p);
            }
            assert_eq!(data, f[f.len() - payload..]);
        }
    }

    #[test]
    fn headers_that_lie_are_refused() {
        let (f, h) = tso_frame(false, false, 5000, 1448);
        let mut bufs = vec![f.clone()];
        let segs = SegList::over(&mut bufs);
        let soft = &mut SoftScratch::default();
        let run = |vnet: VnetHdr, len: u32, soft: &mut SoftScratch| {
            let fr = Frame {
                segs: &segs,
                skip: 0,
                len,
                vnet,
                queue: 0,
            };
            collect(&fr, soft).map(|v| v.len())
        };
        assert_eq!(run(h, f.len() as u32, soft), Ok(4));
        for bad in [
            VnetHdr {
                csum_start: 20,
                ..h
            }, // not at the TCP header
            VnetHdr {
                csum_offset: 6,
                ..h
            }, // UDP's offset
            VnetHdr { gso_type: 4, ..h }, // IPv6 on an IPv4 frame
            VnetHdr {
                csum_start: 180,
                ..h
            }, // headers too long
        ] {
            assert_eq!(run(bad, f.len() as u32, soft), Err(BadOffload), "{bad:?}");
        }
        // A frame shorter than its headers.
        assert_eq!(run(h, 40, soft), Err(BadOffload));
        let c = VnetHdr {
            gso_type: 0,
            gso_size: 0,
            ..h
        };
        assert_eq!(run(c, 40, soft), Err(BadOffload));
    }
}
