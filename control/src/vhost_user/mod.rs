//! The vhost-user backend of one port: the device state the frontend's messages build up
//! (features, memory table, vrings) and the rule that turns it into rings running on the PMD.
//! rust-vmm's `BackendReqHandler` frames and validates messages; this file never sees raw bytes.
//! Runs on the port's control thread.

mod connection;
mod features;
pub mod framing;

pub use connection::serve_connection;
pub use features::*;

use std::fs::File;
use std::sync::Arc;

use dataplane::{
    Dataplane, DirtyLog, MemTable, NetFeatures, OffloadCaps, PackedRing, PortId, QueueIdx,
    QueueStats, RegionDesc, RingAddrs, SplitRing, Virtq,
};
use vhost::vhost_user::message::*;
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::{Backend, Error as VuError, GpuBackend, Result as VuResult};
use vhost::VhostUserMemoryRegionBase;

#[derive(Default)]
struct Vring {
    size: u32,
    addrs: Option<RingAddrs>,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    /// Guest-physical address of the used ring for dirty logging (SET_VRING_ADDR's
    /// `log_guest_addr`, given with VHOST_VRING_F_LOG).
    log_addr: Option<u64>,
    enabled: bool,
    running: bool,
}

/// One vhost-user port's device, as seen by its control thread.
pub struct VhostUserDevice {
    pub name: String,
    id: PortId,
    dp: Arc<Dataplane>,
    /// Per virtqueue (2 per queue pair), kept across reconnects so counters only grow.
    stats: Vec<Arc<QueueStats>>,
    features: u64,
    protocol_features: u64,
    mem: Option<Arc<MemTable>>,
    /// The frontend's dirty-page log (SET_LOG_BASE); used while LOG_ALL is negotiated.
    log: Option<Arc<DirtyLog>>,
    vrings: Vec<Vring>,
}

fn req_err(msg: String) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(msg))
}

impl VhostUserDevice {
    pub fn new(name: String, id: PortId, dp: Arc<Dataplane>, stats: Vec<Arc<QueueStats>>) -> Self {
        let n = stats.len();
        VhostUserDevice {
            name,
            id,
            dp,
            stats,
            features: 0,
            protocol_features: 0,
            mem: None,
            log: None,
            vrings: (0..n).map(|_| Vring::default()).collect(),
        }
    }

    /// Did the frontend ack this feature (any of these bits)?
    fn has(&self, bits: u64) -> bool {
        self.features & bits != 0
    }

    fn net_features(&self) -> NetFeatures {
        let long = self.has(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
        let has = |bit: u64| self.has(bit);
        let rx_offloads = if has(VIRTIO_NET_F_GUEST_CSUM) {
            OffloadCaps::CSUM
                .with(OffloadCaps::TSO4, has(VIRTIO_NET_F_GUEST_TSO4))
                .with(OffloadCaps::TSO6, has(VIRTIO_NET_F_GUEST_TSO6))
                .with(OffloadCaps::ECN, has(VIRTIO_NET_F_GUEST_ECN))
        } else {
            OffloadCaps::NONE
        };
        NetFeatures {
            hdr_len: if long { 12 } else { 10 },
            mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
            rx_offloads,
            tx_offloads: has(VIRTIO_NET_F_CSUM),
        }
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        let name = &self.name;
        let n = self.vrings.len();
        self.vrings.get_mut(index as usize).ok_or_else(|| {
            req_err(format!(
                "port {name}: vring {index} out of range (port has {n})"
            ))
        })
    }

    /// Start the ring if everything it needs is present, else leave it stopped.
    fn try_start(&mut self, index: usize) -> VuResult<()> {
        let features = self.net_features();
        let event_idx = self.has(VIRTIO_RING_F_EVENT_IDX);
        let v = &self.vrings[index];
        let (Some(mem), Some(addrs), Some(_)) = (&self.mem, v.addrs, &v.kick) else {
            return Ok(());
        };
        if v.running || !v.enabled || v.size == 0 {
            return Ok(());
        }
        let call = match &v.call {
            Some(f) => Some(f.try_clone().map_err(VuError::ReqHandlerError)?),
            None => None,
        };
        let stats = self.stats[index].clone();
        let ring: Virtq = if self.has(VIRTIO_F_RING_PACKED) {
            PackedRing::new(mem.clone(), v.size, addrs, v.base, event_idx, call, stats)
                .map(Virtq::from)
        } else {
            SplitRing::new(mem.clone(), v.size, addrs, v.base, event_idx, call, stats)
                .map(Virtq::from)
        }
        .map_err(|e| req_err(format!("port {}: vring {index}: {e}", self.name)))?;
        let ring = match &self.log {
            Some(log) if self.has(VHOST_F_LOG_ALL) => ring.with_log(log.clone(), v.log_addr),
            _ => ring,
        };
        let q = QueueIdx(index as u16);
        let kick = match &v.kick {
            Some(f) if !q.is_guest_rx() => Some(f.try_clone().map_err(VuError::ReqHandlerError)?),
            _ => None,
        };
        // Anything it replaced is dropped here, on control, after the PMD let go of it.
        drop(self.pmd_set(q, features, Some(Box::new(ring)), kick)?);
        self.vrings[index].running = true;
        log::debug!(
            "port {}: vring {index} started at {}",
            self.name,
            self.vrings[index].base
        );
        Ok(())
    }

    /// Take a running ring back from the PMD; where it stopped becomes the base.
    fn stop(&mut self, index: usize) -> VuResult<()> {
        if !self.vrings[index].running {
            return Ok(());
        }
        let features = self.net_features();
        let back = self.pmd_set(QueueIdx(index as u16), features, None, None)?;
        let v = &mut self.vrings[index];
        if let Some(ring) = back {
            v.base = ring.base();
        }
        v.running = false;
        Ok(())
    }

    fn pmd_set(
        &self,
        q: QueueIdx,
        features: NetFeatures,
        ring: Option<Box<Virtq>>,
        kick: Option<File>,
    ) -> VuResult<Option<Box<Virtq>>> {
        self.dp
            .set_ring(self.id, q, features, ring, kick)
            .map_err(|e| req_err(format!("port {}: {e}", self.name)))
    }

    /// Re-create every running ring (new memory table, features or call fd).
    fn restart_running(&mut self, changed: impl FnOnce(&mut Self) -> VuResult<()>) -> VuResult<()> {
        let running: Vec<usize> = (0..self.vrings.len())
            .filter(|&i| self.vrings[i].running)
            .collect();
        for &i in &running {
            self.stop(i)?;
        }
        changed(self)?;
        for i in running {
            self.try_start(i)?;
        }
        Ok(())
    }

    /// The frontend went away: stop every ring, forget memory and negotiation, keep counters.
    pub fn disconnect(&mut self) {
        for i in 0..self.vrings.len() {
            if let Err(e) = self.stop(i) {
                log::error!("port {}: stopping vring {i}: {e}", self.name);
            }
        }
        self.features = 0;
        self.protocol_features = 0;
        for v in self.vrings.iter_mut() {
            *v = Vring::default();
        }
        // Every ring is back from the PMD, so nothing can touch the old memory any more.
        self.mem = None;
        self.log = None;
    }

    /// True when no ring runs and no guest memory or dirty log is held: the state after
    /// `disconnect`.
    pub fn is_idle(&self) -> bool {
        self.mem.is_none() && self.log.is_none() && self.vrings.iter().all(|v| !v.running)
    }

    fn unsupported<T>(&self, what: &str) -> VuResult<T> {
        Err(req_err(format!(
            "port {}: {what} is not supported",
            self.name
        )))
    }
}

impl VhostUserBackendReqHandlerMut for VhostUserDevice {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(OFFERED_FEATURES)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !OFFERED_FEATURES != 0 {
            return Err(req_err(format!(
                "port {}: frontend acked features {:#x} that were not offered",
                self.name,
                features & !OFFERED_FEATURES
            )));
        }
        log::info!("port {}: features {features:#x} acked", self.name);
        self.restart_running(|d| {
            d.features = features;
            if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
                // Without protocol features rings start enabled (vhost-user spec).
                d.vrings.iter_mut().for_each(|v| v.enabled = true);
            }
            Ok(())
        })
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        // The message struct is packed: copy each field out before use.
        let regions: Vec<RegionDesc> = ctx
            .iter()
            .map(|r| RegionDesc {
                guest_phys_addr: { r.guest_phys_addr },
                size: { r.memory_size },
                user_addr: { r.user_addr },
                mmap_offset: { r.mmap_offset },
            })
            .collect();
        for r in &regions {
            log::debug!("port {}: region {r:?}", self.name);
        }
        let table = MemTable::map_for(&regions, files, self.id.0 as u32)
            .map_err(|e| req_err(format!("port {}: SET_MEM_TABLE: {e}", self.name)))?;
        log::info!(
            "port {}: memory table with {} regions",
            self.name,
            table.region_count()
        );
        // Rings stop (their old table is released by the PMD), the table is swapped, rings
        // restart on the new one; the old table is unmapped when its last ring is dropped here.
        self.restart_running(|d| {
            d.mem = Some(table);
            Ok(())
        })?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let name = self.name.clone();
        // Split rings are powers of two; packed rings may have any size.
        let packed = self.has(VIRTIO_F_RING_PACKED);
        if num == 0 || num > 32768 || !(packed || num.is_power_of_two()) {
            return Err(req_err(format!(
                "port {name}: vring {index}: bad size {num}"
            )));
        }
        let v = self.vring(index)?;
        if v.running {
            return Err(req_err(format!(
                "port {name}: SET_VRING_NUM on running vring {index}"
            )));
        }
        v.size = num;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        let addrs = RingAddrs {
            desc: descriptor,
            avail: available,
            used,
        };
        log::debug!("port {}: vring {index} at {addrs:x?}", self.name);
        let running = self.vring(index)?.running;
        // Addresses may move while the ring runs: stop it, then start it at the new place.
        if running {
            self.stop(index as usize)?;
        }
        let v = self.vring(index)?;
        v.addrs = Some(addrs);
        v.log_addr = flags
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(log);
        self.try_start(index as usize)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let name = self.name.clone();
        let packed = self.has(VIRTIO_F_RING_PACKED);
        let v = self.vring(index)?;
        if v.running {
            return Err(req_err(format!(
                "port {name}: SET_VRING_BASE on running vring {index}"
            )));
        }
        // Packed rings: the next available position (wrap counter in bit 15), and the used one
        // in the upper half, as QEMU sends it. Everything taken is given back before a ring
        // stops, so the two are the same and the lower half is what counts.
        v.base = match packed {
            true => base as u16,
            false => u16::try_from(base)
                .map_err(|_| req_err(format!("port {name}: vring {index}: base {base} > 65535")))?,
        };
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        // The reply waits until the PMD has handed the ring back (the quiescent point).
        self.stop(index as usize)?;
        let packed = self.has(VIRTIO_F_RING_PACKED);
        let v = &mut self.vrings[index as usize];
        // A stopped ring needs a new kick fd before it runs again (as in DPDK's vhost).
        v.kick = None;
        let base = match packed {
            // Used position = available position (see `set_vring_base`).
            true => v.base as u32 | (v.base as u32) << 16,
            false => v.base as u32,
        };
        Ok(VhostUserVringState::new(index, base))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32)?;
        // No fd (polling frontend) still means "start": keep a marker that the kick came.
        let kick = match fd {
            Some(f) => f,
            None => File::open("/dev/null").map_err(VuError::ReqHandlerError)?,
        };
        self.vrings[index as usize].kick = Some(kick);
        self.try_start(index as usize)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = index as usize;
        self.vring(index as u32)?;
        if self.vrings[i].running {
            self.stop(i)?;
        }
        self.vrings[i].call = fd;
        self.try_start(i)
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32)?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let unknown = features & !offered_protocol_features().bits();
        if unknown != 0 {
            return Err(req_err(format!(
                "port {}: frontend acked protocol features {unknown:#x} that were not offered",
                self.name
            )));
        }
        self.protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok((self.vrings.len() / 2) as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.vring(index)?.enabled = enable;
        if enable {
            self.try_start(index as usize)
        } else {
            self.stop(index as usize)
        }
    }

    fn get_config(&mut self, _: u32, _: u32, _: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        self.unsupported("GET_CONFIG")
    }

    fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> VuResult<()> {
        self.unsupported("SET_CONFIG")
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _: GpuBackend) -> VuResult<()> {
        self.unsupported("GPU_SET_SOCKET")
    }

    fn get_shared_object(&mut self, _: VhostUserSharedMsg) -> VuResult<File> {
        self.unsupported("GET_SHARED_OBJECT")
    }

    fn get_inflight_fd(&mut self, _: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        self.unsupported("GET_INFLIGHT_FD")
    }

    fn set_inflight_fd(&mut self, _: &VhostUserInflight, _: File) -> VuResult<()> {
        self.unsupported("SET_INFLIGHT_FD")
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        self.unsupported("GET_MAX_MEM_SLOTS")
    }

    fn add_mem_region(
        &mut self,
        _: &VhostUserSingleMemoryRegion,
        _: File,
        _: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        self.unsupported("ADD_MEM_REG")
    }

    fn remove_mem_region(&mut self, _: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        self.unsupported("REM_MEM_REG")
    }

    fn set_device_state_fd(
        &mut self,
        _: VhostTransferStateDirection,
        _: VhostTransferStatePhase,
        _: File,
    ) -> VuResult<Option<File>> {
        self.unsupported("SET_DEVICE_STATE_FD")
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        self.unsupported("CHECK_DEVICE_STATE")
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        self.unsupported("GET_SHMEM_CONFIG")
    }

    /// A new dirty log (migration starts, or guest memory grew). The crate replies once this
    /// returns: by then every running ring logs into the new one and the old one is unmapped,
    /// so the frontend may free it.
    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        let log = DirtyLog::map_for(file, size, offset, self.id.0 as u32)
            .map_err(|e| req_err(format!("port {}: {e}", self.name)))?;
        log::info!("port {}: dirty log of {size:#x} bytes", self.name);
        self.restart_running(|d| {
            d.log = Some(log);
            Ok(())
        })
    }
}

/// A device for unit tests: port 0 with one queue pair on a PMD of its own on CPU 0.
#[cfg(test)]
pub(crate) fn test_device(name: &str) -> VhostUserDevice {
    let dp = Dataplane::start(&[0], Default::default(), Default::default(), None).unwrap();
    dp.add_port(dataplane::VhostPort::port(PortId(0), 1), &[])
        .unwrap();
    let stats = (0..2).map(|_| Arc::new(QueueStats::default())).collect();
    VhostUserDevice::new(name.into(), PortId(0), Arc::new(dp), stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handler's error: it names the port, and the vhost crate closes the connection on it.
    fn refused<T: std::fmt::Debug>(r: VuResult<T>, what: &str) {
        let e = r.expect_err(what).to_string();
        assert!(e.contains("port vm-test"), "{what}: {e}");
    }

    #[test]
    fn packed_rings_take_any_size_and_a_base_with_wrap_counters() {
        let mut d = test_device("vm-test");
        d.set_features(OFFERED_FEATURES & !VHOST_USER_F_PROTOCOL_FEATURES)
            .unwrap();
        d.set_vring_num(0, 100).unwrap();
        refused(d.set_vring_num(0, 40000), "size beyond 32768");
        // Next available position 5 with wrap counter 1, the used one the same (QEMU's form).
        d.set_vring_base(0, 0x8005_8005).unwrap();
        assert_eq!({ d.get_vring_base(0).unwrap().num }, 0x8005_8005);
    }

    #[test]
    fn messages_out_of_bounds_or_in_the_wrong_state_are_refused() {
        let mut d = test_device("vm-test");
        refused(
            d.set_features(OFFERED_FEATURES | 1 << 17), // CTRL_RX
            "unoffered feature",
        );
        refused(
            d.set_protocol_features(1 << 4), // MTU
            "unoffered protocol feature",
        );
        // Split rings (packed ones take a 32-bit base).
        d.set_features(OFFERED_FEATURES & !VHOST_USER_F_PROTOCOL_FEATURES & !VIRTIO_F_RING_PACKED)
            .unwrap();
        refused(d.set_vring_num(2, 256), "vring index out of range");
        refused(d.set_vring_kick(7, None), "kick index out of range");
        refused(d.set_vring_num(0, 100), "size not a power of two");
        refused(d.set_vring_num(0, 65536), "size too large");
        refused(d.set_vring_base(0, 70000), "base above 16 bits");
        let log = perf::frontend::memfd(0x1000).unwrap();
        refused(
            d.set_log_base(&VhostUserLog::new(0x2000, 0), log.try_clone().unwrap()),
            "dirty log beyond its file",
        );
        refused(
            d.set_log_base(&VhostUserLog::new(0, 0), log),
            "empty dirty log",
        );

        // Overlapping regions, a region larger than its file.
        let f = perf::frontend::memfd(1 << 20).unwrap();
        let region = |gpa, size, off| VhostUserMemoryRegion::new(gpa, size, 0x7000_0000 + gpa, off);
        let two = vec![f.try_clone().unwrap(), f.try_clone().unwrap()];
        refused(
            d.set_mem_table(
                &[region(0, 1 << 20, 0), region(0x8_0000, 1 << 20, 0)],
                two,
                None,
            ),
            "overlapping regions",
        );
        let one = vec![f.try_clone().unwrap()];
        refused(
            d.set_mem_table(&[region(0, 2 << 20, 0)], one, None),
            "region beyond its file",
        );

        // A running ring refuses a new size or base until GET_VRING_BASE has stopped it.
        d.set_mem_table(&[region(0, 1 << 20, 0)], vec![f], None)
            .unwrap();
        d.set_vring_num(0, 256).unwrap();
        // Ring addresses are the frontend's virtual addresses (user_addr).
        let (desc, avail, used) = (0x7000_1000, 0x7000_2000, 0x7000_3000);
        let flags = VhostUserVringAddrFlags::empty;
        d.set_vring_addr(0, flags(), desc, used, avail, 0).unwrap();
        d.set_vring_kick(0, None).unwrap();
        assert!(!d.is_idle(), "ring 0 should run");
        refused(d.set_vring_num(0, 128), "SET_VRING_NUM while running");
        refused(d.set_vring_base(0, 5), "SET_VRING_BASE while running");
        assert_eq!({ d.get_vring_base(0).unwrap().num }, 0);
        d.set_vring_num(0, 128).unwrap();
        d.set_vring_base(0, 5).unwrap();
        // A ring placed outside guest memory does not start.
        d.set_vring_kick(0, None).unwrap();
        refused(
            d.set_vring_addr(0, flags(), 0x7100_0000, used, avail, 0),
            "ring outside memory",
        );
        d.disconnect();
        assert!(d.is_idle());
    }
}
