//! What the switch knows of the frames it carries: virtio-net offloads (the vnet header,
//! checksums and software segmentation, offload.rs) and L2 learning (l2.rs). PMD threads.

pub mod features;
pub mod l2;
pub mod offload;
pub mod vnet;
