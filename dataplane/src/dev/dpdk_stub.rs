//! DPDK's place in a build without it (no libdpdk found, or the `dpdk` feature off), as OVS
//! builds without DPDK (`lib/dpdk-stub.c`): the same interface, every way in refused with
//! `DpdkError::NotBuilt`. No mempool, device or mbuf can exist, so the PMD's DPDK paths are
//! dead code here (their types are uninhabited), and a `kind = "dpdk"` port fails to start
//! with that error while vhost-user and tap ports work.

use std::convert::Infallible;
use std::sync::Arc;

use crate::mem::seg::SegList;

pub use super::{device_name, EthConfig, Link};

#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    #[error("this ringswitch was built without DPDK (libdpdk was not found at build time, or the `dpdk` feature was off): dpdk ports are not available")]
    NotBuilt,
}

pub fn eal_init(_args: &[String]) -> Result<(), DpdkError> {
    Err(DpdkError::NotBuilt)
}

pub fn register_thread() -> bool {
    false
}

pub struct Mempool {
    pub frame_room: u32,
    never: Infallible,
}

impl Mempool {
    pub fn new(_name: &str, _n: u32, _frame_room: u32) -> Result<Arc<Mempool>, DpdkError> {
        Err(DpdkError::NotBuilt)
    }
}

pub struct EthDev {
    pub port_id: u16,
    pub name: String,
    pub mac: [u8; 6],
    never: Infallible,
}

impl EthDev {
    pub fn open(_devargs: &str, _cfg: &EthConfig, pool: Arc<Mempool>) -> Result<EthDev, DpdkError> {
        match pool.never {}
    }

    pub fn pool(&self) -> &Mempool {
        match self.never {}
    }
}

pub fn link(_port_id: u16) -> Link {
    Link {
        up: false,
        speed_mbps: 0,
    }
}

pub fn hw_drops(_port_id: u16) -> (u64, u64, u64) {
    (0, 0, 0)
}

/// Always empty: there is no device to receive from, nor a pool to take mbufs from.
#[derive(Default)]
pub struct MbufBurst {
    _empty: (),
}

impl MbufBurst {
    pub fn len(&self) -> usize {
        0
    }

    pub fn is_empty(&self) -> bool {
        true
    }

    pub fn is_full(&self) -> bool {
        false
    }

    pub fn rx(&mut self, _port: u16, _queue: u16) -> usize {
        0
    }

    pub fn segs(&self, _i: usize, _out: &mut SegList) -> Option<u32> {
        None
    }

    pub fn take(&mut self, pool: &Mempool) -> Option<Mbuf> {
        match pool.never {}
    }

    pub fn push(&mut self, m: Mbuf) {
        match m.0 {}
    }

    pub fn tx(&mut self, _port: u16, _queue: u16) -> usize {
        0
    }

    pub fn bytes(&self) -> u64 {
        0
    }

    pub fn free_all(&mut self) {}
}

pub struct Mbuf(Infallible);

impl Mbuf {
    pub fn fill(&mut self, _len: u32, _fill: impl FnOnce(&mut [u8])) -> bool {
        match self.0 {}
    }
}
