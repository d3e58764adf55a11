//! The virtio-net header as the switch reads it (`VnetHdr`: a checksum left to finish, a TCP
//! segment larger than the MTU), the offloads a destination takes (`OffloadCaps`), and a frame
//! in flight with its header (`Frame`). Parsed on PMD threads; every field is checked against
//! the frame it describes before anything uses it.

use virtio_bindings::virtio_net;

use crate::mem::seg::SegList;

// The header's flags and GSO types, from virtio-bindings (u32 there; the fields are bytes).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;

pub const VIRTIO_NET_HDR_GSO_NONE: u8 = virtio_net::VIRTIO_NET_HDR_GSO_NONE as u8;

pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = virtio_net::VIRTIO_NET_HDR_GSO_TCPV4 as u8;

pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = virtio_net::VIRTIO_NET_HDR_GSO_TCPV6 as u8;

pub const VIRTIO_NET_HDR_GSO_ECN: u8 = virtio_net::VIRTIO_NET_HDR_GSO_ECN as u8;

/// The part of the virtio-net header that describes the frame (without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

/// Smallest `gso_size` taken: Linux's own floor for an MSS (TCP_MIN_MSS). A frame asking for
/// less is refused: cut in software, a 64 KiB frame with `gso_size = 1` was 65,499 frames and
/// 3 ms of a PMD; at this floor it is at most 745.
pub const MIN_GSO_SIZE: u16 = 88;

/// The frame-describing fields of a virtio-net header. `NONE`: a complete frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Why a frame's header or headers cannot be acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadOffload;

impl VnetHdr {
    pub const NONE: VnetHdr = VnetHdr {
        flags: 0,
        gso_type: 0,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Read a header as a sender wrote it, for a frame of `frame_len` bytes. Only NEEDS_CSUM is
    /// kept of the flags (DATA_VALID is a promise to one receiver, not something to pass on).
    /// Refused: a checksum outside the frame, segmentation other than TCP, or without a size
    /// (at least MIN_GSO_SIZE) or a checksum to fill in (as Linux's `virtio_net_hdr_to_skb`
    /// refuses them).
    pub fn parse(b: &[u8; VNET_HDR_LEN], frame_len: u32) -> Result<VnetHdr, BadOffload> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let mut h = VnetHdr {
            flags: b[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        };
        if h.needs_csum() {
            if h.csum_start as u32 + h.csum_offset as u32 + 2 > frame_len {
                return Err(BadOffload);
            }
        } else {
            // Fields without meaning: normalised, so that a complete frame is exactly NONE.
            (h.csum_start, h.csum_offset) = (0, 0);
        }
        match h.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE if h.gso_type == 0 => Ok(VnetHdr {
                hdr_len: 0,
                gso_size: 0,
                ..h
            }),
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6
                if h.needs_csum() && h.gso_size >= MIN_GSO_SIZE =>
            {
                Ok(h)
            }
            _ => Err(BadOffload),
        }
    }

    /// The header's bytes, as a receiver reads them.
    pub fn bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// The header as the little-endian words `Writer::write_header` takes, with `num_buffers`
    /// in bytes 10..12: computed in registers, never stored and loaded back.
    #[inline]
    pub fn words(&self, num_buffers: u16) -> (u64, u32) {
        let lo = self.flags as u64
            | (self.gso_type as u64) << 8
            | (self.hdr_len as u64) << 16
            | (self.gso_size as u64) << 32
            | (self.csum_start as u64) << 48;
        (lo, self.csum_offset as u32 | (num_buffers as u32) << 16)
    }

    /// A complete frame: nothing left to do (`parse` zeroes every other field then). Two byte
    /// loads, not one wide load of fields just stored one by one: that cannot be forwarded
    /// from the store buffer (see `Pmd::forward_offloaded`).
    #[inline]
    pub fn is_none(&self) -> bool {
        self.flags == 0 && self.gso_type == 0
    }

    #[inline]
    pub fn needs_csum(&self) -> bool {
        self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
    }
}

/// The offloads a destination takes: frames with a checksum to finish (`CSUM`), TCP segments
/// over IPv4 or IPv6 to cut (`TSO4`, `TSO6`), with ECN's CWR flag to respect (`ECN`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffloadCaps(u8);

impl OffloadCaps {
    pub const NONE: OffloadCaps = OffloadCaps(0);
    pub const CSUM: OffloadCaps = OffloadCaps(1);
    pub const TSO4: OffloadCaps = OffloadCaps(2);
    pub const TSO6: OffloadCaps = OffloadCaps(4);
    pub const ECN: OffloadCaps = OffloadCaps(8);
    pub const ALL: OffloadCaps = OffloadCaps(15);

    pub const fn with(self, other: OffloadCaps, on: bool) -> OffloadCaps {
        if on {
            OffloadCaps(self.0 | other.0)
        } else {
            self
        }
    }

    fn has(self, c: OffloadCaps) -> bool {
        self.0 & c.0 == c.0
    }

    /// Can the destination take a frame with this header as it is?
    #[inline]
    pub fn take(self, h: &VnetHdr) -> bool {
        if h.is_none() {
            return true;
        }
        let tso = match h.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_TCPV4 => OffloadCaps::TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => OffloadCaps::TSO6,
            _ => OffloadCaps::NONE,
        };
        let ecn = if h.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 {
            OffloadCaps::ECN
        } else {
            OffloadCaps::NONE
        };
        self.has(OffloadCaps(OffloadCaps::CSUM.0 | tso.0 | ecn.0))
    }
}

/// A frame being switched: bytes `segs[skip..skip + len]`, with the header it came with, from
/// queue `queue` of its port (destinations with several queues pick theirs by it).
#[derive(Clone, Copy)]
pub struct Frame<'a> {
    pub segs: &'a SegList,
    pub skip: u32,
    pub len: u32,
    pub vnet: VnetHdr,
    pub queue: u16,
}

impl Frame<'_> {
    /// The destination queue, of `queues`, that takes this frame: the one numbered as the
    /// queue it came from, modulo (a flow stays on one queue, and queues share the load).
    #[inline]
    pub fn queue_among(&self, queues: usize) -> usize {
        if queues > 1 {
            self.queue as usize % queues
        } else {
            0
        }
    }
}
