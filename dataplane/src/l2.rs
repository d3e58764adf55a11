//! L2 learning table of one PMD: MAC → port, fixed capacity, open addressing. Allocated by
//! control when the PMD starts; learning and lookup on the hot path never allocate.

use crate::PortId;

const PROBE: usize = 8;
const VALID: u64 = 1 << 63;

#[derive(Clone, Copy, Default)]
struct Entry {
    /// MAC in the low 48 bits, VALID set when occupied.
    key: u64,
    port: u16,
}

pub struct MacTable {
    slots: Box<[Entry]>,
    mask: usize,
    /// The last address learned and its port: a burst mostly repeats one source.
    learned: Entry,
    /// The last lookup and its answer, valid until the table changes: a burst mostly repeats
    /// one destination (the one-entry version of OVS's exact-match cache).
    looked_up: Option<(u64, Option<PortId>)>,
}

#[inline]
pub fn mac_key(mac: &[u8]) -> u64 {
    let mut k = 0u64;
    for &b in mac.iter().take(6) {
        k = (k << 8) | b as u64;
    }
    k | VALID
}

#[inline]
pub fn is_multicast(mac: &[u8]) -> bool {
    mac.first().is_some_and(|b| b & 1 != 0)
}

impl MacTable {
    /// `capacity` is rounded up to a power of two.
    pub fn new(capacity: usize) -> Self {
        let n = capacity.max(PROBE).next_power_of_two();
        MacTable {
            slots: vec![Entry::default(); n].into_boxed_slice(),
            mask: n - 1,
            learned: Entry::default(),
            looked_up: None,
        }
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize & self.mask
    }

    /// Remember that `mac` (a unicast source address) lives behind `port`. When every probed
    /// slot is taken by another address, the home slot is overwritten (the oldest guess loses).
    /// Multicast and all-zero sources are not addresses a station can have: never learned (as
    /// the Linux bridge does), so frames *to* 00:00:00:00:00:00 are flooded, not looped back.
    #[inline]
    pub fn learn(&mut self, mac: &[u8], port: PortId) {
        if is_multicast(mac) || mac.iter().take(6).all(|&b| b == 0) {
            return;
        }
        let key = mac_key(mac);
        let entry = Entry { key, port: port.0 };
        if self.learned.key == key && self.learned.port == port.0 {
            return;
        }
        self.learned = entry;
        let home = self.home(key);
        let mut free = None;
        for i in 0..PROBE {
            let idx = (home + i) & self.mask;
            let e = &mut self.slots[idx];
            if e.key == key {
                if e.port != port.0 {
                    e.port = port.0;
                    self.looked_up = None;
                }
                return;
            }
            if e.key == 0 && free.is_none() {
                free = Some(idx);
            }
        }
        self.slots[free.unwrap_or(home)] = entry;
        self.looked_up = None;
    }

    #[inline]
    pub fn lookup(&mut self, mac: &[u8]) -> Option<PortId> {
        let key = mac_key(mac);
        if let Some((k, port)) = self.looked_up {
            if k == key {
                return port;
            }
        }
        let home = self.home(key);
        let port = (0..PROBE)
            .map(|i| self.slots[(home + i) & self.mask])
            .find(|e| e.key == key)
            .map(|e| PortId(e.port));
        self.looked_up = Some((key, port));
        port
    }

    /// Drop every address learned on `port` (it was removed or its guest went away).
    pub fn forget_port(&mut self, port: PortId) {
        self.learned = Entry::default();
        self.looked_up = None;
        for e in self.slots.iter_mut() {
            if e.key != 0 && e.port == port.0 {
                *e = Entry::default();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learn_lookup_move_forget() {
        let mut t = MacTable::new(64);
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
        let mut t = MacTable::new(64);
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
    fn full_table_still_learns() {
        let mut t = MacTable::new(8);
        for i in 0..100u8 {
            t.learn(&[2, 0, 0, 0, 1, i], PortId(i as u16));
        }
        assert_eq!(t.lookup(&[2, 0, 0, 0, 1, 99]), Some(PortId(99)));
    }
}
