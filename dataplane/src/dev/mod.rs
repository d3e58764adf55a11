//! The operating system's and DPDK's devices, made safe: DPDK's EAL, ethdevs and mbufs
//! (dpdk.rs, the only caller of `dpdk_sys`; dpdk_stub.rs in a build without DPDK), kernel taps (tap.rs), and the epoll set an
//! adaptive PMD sleeps on (epoll.rs). Opened on control; burst calls on PMDs.

#[cfg(dpdk)]
pub mod dpdk;
#[cfg(not(dpdk))]
#[path = "dpdk_stub.rs"]
pub mod dpdk;
pub mod epoll;
pub mod tap;
