//! The virtio and vhost-user feature bits the switch offers, from the spec's bindings
//! (virtio-bindings, the vhost crate). Control threads.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::{virtio_config, virtio_net, virtio_ring};

pub const VIRTIO_NET_F_CSUM: u64 = 1 << virtio_net::VIRTIO_NET_F_CSUM;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_CSUM;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_TSO4;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_TSO6;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_ECN;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << virtio_net::VIRTIO_NET_F_HOST_TSO4;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << virtio_net::VIRTIO_NET_F_HOST_TSO6;
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << virtio_net::VIRTIO_NET_F_HOST_ECN;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << virtio_net::VIRTIO_NET_F_MRG_RXBUF;
pub const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_ANNOUNCE;
pub const VIRTIO_NET_F_MQ: u64 = 1 << virtio_net::VIRTIO_NET_F_MQ;
pub const VHOST_F_LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
pub const VIRTIO_F_ANY_LAYOUT: u64 = 1 << virtio_config::VIRTIO_F_ANY_LAYOUT;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
pub const VIRTIO_F_RING_PACKED: u64 = 1 << virtio_config::VIRTIO_F_RING_PACKED;
pub const VIRTIO_F_IN_ORDER: u64 = 1 << virtio_config::VIRTIO_F_IN_ORDER;

/// Checksum and TCP segmentation offloads both ways: what a guest leaves undone is finished in
/// software for destinations that did not negotiate it (dataplane/src/net/offload.rs).
pub const OFFLOAD_FEATURES: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN;

/// Everything the switch can do for a guest today. Split or packed rings; IN_ORDER costs
/// nothing, as chains are always given back in the order they were taken. For live migration:
/// LOG_ALL (dirty-page logging), and GUEST_ANNOUNCE, with which the guest itself sends
/// gratuitous ARPs once migrated (QEMU handles the control queue that asks it to), so the
/// switch learns its MAC on the new port.
pub const OFFERED_FEATURES: u64 = OFFLOAD_FEATURES
    | VHOST_F_LOG_ALL
    | VIRTIO_NET_F_GUEST_ANNOUNCE
    | VIRTIO_F_RING_PACKED
    | VIRTIO_F_IN_ORDER
    | VIRTIO_F_VERSION_1
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_MQ
    | VIRTIO_F_ANY_LAYOUT
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VHOST_USER_F_PROTOCOL_FEATURES;

/// REPLY_ACK is added by the vhost crate itself. LOG_SHMFD: the dirty log is shared memory
/// (QEMU migrates a vhost-user guest only with it).
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
}
