//! L2 learning table: MAC → port, fixed capacity, open addressing, shared by every PMD (a
//! station learned by one PMD is known to all). Each slot is one atomic word, so learning and
//! lookup are plain loads and stores with no lock; each PMD keeps a `MacCache` of its last
//! answers beside it. Allocated by control at start; the hot path never allocates.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::PortId;

const PROBE: usize = 8;
const VALID: u64 = 1 << 63;
const MAC_BITS: u64 = (1 << 48) - 1;
const PORT_SHIFT: u32 = 48;
/// Port ids fit the 15 bits between the MAC and VALID.
const PORT_MASK: u64 = 0x7fff;

pub struct MacTable {
    /// MAC in the low 48 bits, the port above it, VALID set when occupied; 0 is free.
    slots: Box<[AtomicU64]>,
    mask: usize,
    /// A new value on every change, so a PMD knows when its cached answers went stale. Each
    /// writer makes values only it can (its id above a count of its own): a plain store, not
    /// a locked increment, which would stall until the burst's earlier stores drained (the
    /// v2v loop re-learns a MAC on every burst).
    generation: AtomicU64,
    /// Control's count of changes (`forget_port`).
    control_changes: AtomicU64,
}

/// One PMD's memory of its last learn and lookup: a burst mostly repeats one source and one
/// destination (the one-entry version of OVS's exact-match cache).
pub struct MacCache {
    /// This writer's tag in `generation`, and its count of changes.
    writer: u64,
    changes: u64,
    /// The last entry this PMD learned, and the table generation then.
    learned: (u64, u64),
    /// The last lookup and its answer, valid while the generation is unchanged.
    looked_up: Option<(u64, Option<PortId>, u64)>,
    /// The last frame's addresses, source port and table generation, and where it went.
    last_frame: Option<(FrameKey, Option<PortId>)>,
}

/// What decides where a frame goes: its addresses, the port it came from, and the table then.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FrameKey {
    dst: u64,
    src: u64,
    port: PortId,
    generation: u64,
}

impl MacCache {
    /// The cache of writer `writer` (a PMD's index + 1; 0 is control's).
    pub fn new(writer: u32) -> Self {
        MacCache {
            writer: (writer as u64) << 40,
            changes: 0,
            learned: (0, 0),
            looked_up: None,
            last_frame: None,
        }
    }
}

/// A MAC address as the table knows it: its six bytes in order in the low 48 bits.
#[cfg(test)]
pub fn mac_key(mac: &[u8; 6]) -> u64 {
    mac.iter().fold(0, |k, &b| (k << 8) | b as u64)
}

/// An Ethernet header's destination and source keys, from its bytes 0..8 and 4..12 read as
/// little-endian words (`copy::head_words`): two loads and byte swaps instead of twelve bytes.
#[inline(always)]
pub fn header_keys(w0: u64, w4: u64) -> (u64, u64) {
    (w0.swap_bytes() >> 16, w4.swap_bytes() & MAC_BITS)
}

/// The group bit: the first byte's lowest.
#[inline(always)]
pub fn is_multicast(key: u64) -> bool {
    key & 1 << 40 != 0
}

#[inline]
fn key_of(e: u64) -> u64 {
    e & (VALID | MAC_BITS)
}

#[inline]
fn port_of(e: u64) -> PortId {
    PortId(((e >> PORT_SHIFT) & PORT_MASK) as u16)
}

impl MacTable {
    /// `capacity` is rounded up to a power of two.
    pub fn new(capacity: usize) -> Self {
        let n = capacity.max(PROBE).next_power_of_two();
        MacTable {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
            mask: n - 1,
            generation: AtomicU64::new(0),
            control_changes: AtomicU64::new(0),
        }
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize & self.mask
    }

    /// Publish a change made by the writer of `cache`.
    #[inline]
    fn changed(&self, cache: &mut MacCache) {
        cache.changes += 1;
        self.generation
            .store(cache.writer | (cache.changes & ((1 << 40) - 1)), Release);
    }

    /// Remember that `mac` (a unicast source address) lives behind `port`. When every probed
    /// slot is taken by another address, the home slot is overwritten (the oldest guess loses).
    /// Multicast and all-zero sources are not addresses a station can have: never learned (as
    /// the Linux bridge does), so frames *to* 00:00:00:00:00:00 are flooded, not looped back.
    #[inline]
    fn learn(&self, cache: &mut MacCache, key: u64, port: PortId) {
        if is_multicast(key) || key == 0 {
            return;
        }
        let key = key | VALID;
        let entry = key | (port.0 as u64 & PORT_MASK) << PORT_SHIFT;
        let generation = self.generation.load(Relaxed);
        if cache.learned == (entry, generation) {
            return;
        }
        self.learn_slow(cache, key, entry);
        cache.learned = (entry, self.generation.load(Relaxed));
    }

    #[cold]
    fn learn_slow(&self, cache: &mut MacCache, key: u64, entry: u64) {
        let home = self.home(key);
        'probe: for i in 0..PROBE {
            let slot = &self.slots[(home + i) & self.mask];
            let mut e = slot.load(Relaxed);
            loop {
                if key_of(e) == key {
                    if e != entry {
                        slot.store(entry, Relaxed);
                        self.changed(cache);
                    }
                    return;
                }
                if e != 0 {
                    continue 'probe;
                }
                // Two PMDs may claim one free slot at once: the loser looks again.
                match slot.compare_exchange(0, entry, Relaxed, Relaxed) {
                    Ok(_) => {
                        self.changed(cache);
                        return;
                    }
                    Err(now) => e = now,
                }
            }
        }
        self.slots[home].store(entry, Relaxed);
        self.changed(cache);
    }

    #[inline]
    fn lookup(&self, cache: &mut MacCache, key: u64) -> Option<PortId> {
        let key = key | VALID;
        // Acquire: the slots read below are at least as new as the change it names.
        let generation = self.generation.load(Acquire);
        if let Some((k, port, g)) = cache.looked_up {
            if k == key && g == generation {
                return port;
            }
        }
        let home = self.home(key);
        let port = (0..PROBE)
            .map(|i| self.slots[(home + i) & self.mask].load(Relaxed))
            .find(|&e| key_of(e) == key)
            .map(port_of);
        cache.looked_up = Some((key, port, generation));
        port
    }

    /// Learn a frame's source (`src` behind `port`) and say where its destination `dst` is:
    /// None to flood it (multicast, or not known). A frame that repeats the last one's
    /// addresses and port while the table is unchanged gets the last answer with one
    /// comparison: a burst is mostly one flow.
    #[inline(always)]
    pub fn switch(&self, cache: &mut MacCache, dst: u64, src: u64, port: PortId) -> Option<PortId> {
        let key = FrameKey {
            dst,
            src,
            port,
            // Acquire, as in `lookup`. Read before learning: a change made meanwhile (ours or
            // another PMD's) makes the next frame look again, never keeps a stale answer.
            generation: self.generation.load(Acquire),
        };
        if let Some((last, answer)) = cache.last_frame {
            if last == key {
                return answer;
            }
        }
        self.learn(cache, src, port);
        let answer = if is_multicast(dst) {
            None
        } else {
            self.lookup(cache, dst)
        };
        cache.last_frame = Some((key, answer));
        answer
    }

    /// Drop every address learned on `port` (it was removed or its guest went away).
    pub fn forget_port(&self, port: PortId) {
        for slot in self.slots.iter() {
            let e = slot.load(Relaxed);
            if e != 0 && port_of(e) == port {
                let _ = slot.compare_exchange(e, 0, Relaxed, Relaxed);
            }
        }
        let mut control = MacCache::new(0);
        control.changes = self.control_changes.fetch_add(1, Relaxed) + 1;
        self.changed(&mut control);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table and one PMD's cache of it.
    struct View(MacTable, MacCache);

    impl View {
        fn new(n: usize) -> Self {
            View(MacTable::new(n), MacCache::new(1))
        }
        fn learn(&mut self, mac: &[u8; 6], port: PortId) {
            self.0.learn(&mut self.1, mac_key(mac), port)
        }
        fn lookup(&mut self, mac: &[u8; 6]) -> Option<PortId> {
            self.0.lookup(&mut self.1, mac_key(mac))
        }
        fn forget_port(&mut self, port: PortId) {
            self.0.forget_port(port)
        }
    }

    #[test]
    fn learn_lookup_move_forget() {
        let mut t = View::new(64);
        let a = [2, 0, 0, 0, 0, 1];
        let b = [2, 0, 0, 0, 0, 2];
        assert_eq!(t.lookup(&a), None);
        t.learn(&a, PortId(1));
        t.learn(&b, PortId(2));
        assert_eq!(t.lookup(&a), Some(PortId(1)));
        t.learn(&a, PortId(3));
        assert_eq!(t.lookup(&a), Some(PortId(3)));
        t.forget_port(PortId(3));
        assert_eq!(t.lookup(&a), None);
        assert_eq!(t.lookup(&b), Some(PortId(2)));
        t.learn(&[0xff; 6], PortId(1));
        assert_eq!(t.lookup(&[0xff; 6]), None);
        t.learn(&[0; 6], PortId(1));
        assert_eq!(t.lookup(&[0; 6]), None, "an all-zero source is not learned");
    }

    #[test]
    fn cached_answers_follow_every_change() {
        let mut t = View::new(64);
        let a = [2, 0, 0, 0, 0, 1];
        assert_eq!(t.lookup(&a), None);
        assert_eq!(t.lookup(&a), None);
        t.learn(&a, PortId(1));
        assert_eq!(t.lookup(&a), Some(PortId(1)), "a new entry");
        t.learn(&a, PortId(1));
        t.learn(&a, PortId(2));
        assert_eq!(t.lookup(&a), Some(PortId(2)), "a move");
        t.forget_port(PortId(2));
        assert_eq!(t.lookup(&a), None, "forgotten");
        t.learn(&a, PortId(2));
        assert_eq!(
            t.lookup(&a),
            Some(PortId(2)),
            "learned again after forget_port"
        );
    }

    #[test]
    fn what_one_pmd_learns_the_other_finds() {
        let t = MacTable::new(64);
        let (mut c0, mut c1) = (MacCache::new(1), MacCache::new(2));
        let a = mac_key(&[2, 0, 0, 0, 0, 1]);
        assert_eq!(t.lookup(&mut c1, a), None);
        t.learn(&mut c0, a, PortId(7));
        assert_eq!(t.lookup(&mut c1, a), Some(PortId(7)));
        t.learn(&mut c1, a, PortId(8));
        assert_eq!(t.lookup(&mut c0, a), Some(PortId(8)));
        t.learn(&mut c0, a, PortId(7));
        assert_eq!(
            t.lookup(&mut c1, a),
            Some(PortId(7)),
            "c0's cache was stale"
        );
    }

    #[test]
    fn header_keys_are_the_addresses_in_order() {
        let hdr: [u8; 12] = [
            0x01, 0x00, 0x5e, 0x7f, 0x00, 0x01, 0x52, 0x54, 0x00, 0xab, 0xcd, 0xef,
        ];
        let w0 = u64::from_le_bytes(hdr[..8].try_into().unwrap());
        let w4 = u64::from_le_bytes(hdr[4..].try_into().unwrap());
        let (dst, src) = header_keys(w0, w4);
        assert_eq!(dst, mac_key(&[0x01, 0x00, 0x5e, 0x7f, 0x00, 0x01]));
        assert_eq!(src, mac_key(&[0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]));
        assert_eq!(dst, 0x0100_5e7f_0001);
        assert!(is_multicast(dst), "01:... is a group address");
        assert!(!is_multicast(src));
    }

    #[test]
    fn full_table_still_learns() {
        let mut t = View::new(8);
        for i in 0..100u8 {
            t.learn(&[2, 0, 0, 0, 1, i], PortId(i as u16));
        }
        assert_eq!(t.lookup(&[2, 0, 0, 0, 1, 99]), Some(PortId(99)));
    }

    #[test]
    fn a_repeated_frame_gets_the_last_answer_until_the_table_changes() {
        let t = MacTable::new(64);
        let (mut pmd0, mut pmd1) = (MacCache::new(1), MacCache::new(2));
        let a = mac_key(&[2, 0, 0, 0, 0, 1]);
        let b = mac_key(&[2, 0, 0, 0, 0, 2]);
        let group = mac_key(&[0x01, 0, 0x5e, 0, 0, 1]);
        assert_eq!(
            t.switch(&mut pmd0, b, a, PortId(1)),
            None,
            "b unknown: flood"
        );
        assert_eq!(
            t.lookup(&mut pmd1, a),
            Some(PortId(1)),
            "the source was learned"
        );
        // Another PMD learns b: the repeated frame must not keep its old answer.
        t.learn(&mut pmd1, b, PortId(2));
        assert_eq!(t.switch(&mut pmd0, b, a, PortId(1)), Some(PortId(2)));
        assert_eq!(t.switch(&mut pmd0, b, a, PortId(1)), Some(PortId(2)));
        // The same addresses from another port: a moved, learned again.
        assert_eq!(t.switch(&mut pmd0, b, a, PortId(3)), Some(PortId(2)));
        assert_eq!(t.lookup(&mut pmd1, a), Some(PortId(3)));
        t.forget_port(PortId(2));
        assert_eq!(t.switch(&mut pmd0, b, a, PortId(3)), None, "b forgotten");
        assert_eq!(
            t.switch(&mut pmd0, group, a, PortId(3)),
            None,
            "a group is flooded"
        );
    }
}
