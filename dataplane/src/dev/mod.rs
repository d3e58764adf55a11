//! The operating system's and DPDK's devices, made safe: DPDK's EAL, ethdevs and mbufs
//! (dpdk.rs, the only caller of `dpdk_sys`; dpdk_stub.rs in a build without DPDK), kernel
//! taps (tap.rs), and the epoll set an adaptive PMD sleeps on (epoll.rs). Opened on control;
//! burst calls on PMDs.

#[cfg(dpdk)]
pub mod dpdk;
#[cfg(not(dpdk))]
#[path = "dpdk_stub.rs"]
pub mod dpdk;
pub mod epoll;
pub mod tap;

// What DPDK and its stub share: plain data and names, no DPDK call.

/// The device a devargs string names (what comes before its first comma): the name DPDK gives
/// the port, and what two ports may not share.
pub fn device_name(devargs: &str) -> &str {
    devargs.split(',').next().unwrap_or_default()
}

/// How to set up an Ethernet port.
#[derive(Debug, Clone)]
pub struct EthConfig {
    pub rx_queues: u16,
    pub tx_queues: u16,
    pub rx_desc: u16,
    pub tx_desc: u16,
    /// None keeps the device's default.
    pub mtu: Option<u16>,
}

/// Link state as `rte_eth_link_get_nowait` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub up: bool,
    pub speed_mbps: u32,
}
