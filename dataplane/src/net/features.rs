//! What a guest negotiated that changes the frames the switch exchanges with it (virtio-net
//! header length, mergeable RX buffers, offloads each way). Set by control when a ring starts;
//! read by PMDs.

use crate::net::vnet::OffloadCaps;

/// What the guest negotiated that changes frame layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetFeatures {
    /// virtio-net header length: 12 with VERSION_1 or MRG_RXBUF, else 10.
    pub hdr_len: u8,
    pub mrg_rxbuf: bool,
    /// Offloads the guest takes on its RX queues (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN).
    pub rx_offloads: OffloadCaps,
    /// The guest may hand over frames with checksums or segmentation left to do (CSUM): its
    /// TX headers are read.
    pub tx_offloads: bool,
}

impl Default for NetFeatures {
    fn default() -> Self {
        NetFeatures {
            hdr_len: 12,
            mrg_rxbuf: false,
            rx_offloads: OffloadCaps::NONE,
            tx_offloads: false,
        }
    }
}
