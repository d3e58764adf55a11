//! The traffic engine of `rs-traffic`: one thread plays a guest with two vhost-user ports — it
//! sends timestamped frames from port A's TX ring at a fixed rate (or as fast as the rings
//! allow), receives them in port B's RX ring, and records one-way latency (TSC, same core) in
//! an HDR histogram. Works against any vhost-user backend that carries A's frames to B.

use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::frontend::{
    Device, DriverRing, GuestMemory, VIRTIO_RING_F_EVENT_IDX, VIRTQ_DESC_F_WRITE,
};

/// Frames in a burst, as the backends use.
const BURST: usize = 32;
const BUF: u64 = 2048;
const HDR: usize = 12;
/// Ethertype of timestamped frames (IEEE local experimental) and of the MAC-learning hellos.
const ETH_TEST: [u8; 2] = [0x88, 0xb5];
const ETH_HELLO: [u8; 2] = [0x88, 0xb6];
const VRING_USED_F_NO_NOTIFY: u16 = 1;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

#[derive(Debug, Clone)]
pub struct TrafficConfig {
    /// Ethernet frame bytes (without the virtio-net header), 64..=2000.
    pub frame_len: usize,
    /// Frames per second to offer; None: as fast as the rings take them.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Entries per ring (power of two).
    pub ring: u16,
    /// Print a progress line every second (to stderr).
    pub progress: bool,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX, as Linux's driver does: after publishing, read the
    /// backend's `avail_event` to decide whether to kick (instead of `used.flags`).
    pub event_idx: bool,
    /// Leave the rings' VRING_AVAIL_F_NO_INTERRUPT clear: the backend then writes the call
    /// eventfds after its bursts, as for a guest driver that sleeps (nobody reads them here).
    pub interrupts: bool,
}

pub struct Report {
    pub sent: u64,
    pub received: u64,
    /// Sent but never received (after a drain of 200 ms).
    pub lost: u64,
    /// Received out of sequence order.
    pub reordered: u64,
    /// Frames of a fixed rate not offered because the source's own vCPU stalled (a gap of
    /// over `STALL_US` between loop turns): they fell due while it was away.
    pub late: u64,
    pub seconds: f64,
    /// One-way latency in nanoseconds.
    pub latency: Histogram<u64>,
}

impl Report {
    pub fn offered_mpps(&self) -> f64 {
        self.sent as f64 / self.seconds / 1e6
    }
    pub fn received_mpps(&self) -> f64 {
        self.received as f64 / self.seconds / 1e6
    }
}

/// One vhost-user port of the traffic guest: its memory, RX and TX rings and buffers
/// (chain `i` of either ring always uses buffer `i`).
struct Port {
    mem: GuestMemory,
    rx: DriverRing,
    tx: DriverRing,
    rx_bufs: u64,
    tx_bufs: u64,
    dev: Device,
    /// TX chains free to send, and the used index reclaimed up to.
    free: Vec<u16>,
    tx_used: u16,
    rx_used: u16,
    mac: [u8; 6],
    /// The TX avail index at the last publish (EVENT_IDX's `old`).
    tx_published: u16,
}

impl Port {
    fn connect(
        socket: &Path,
        ring: u16,
        mac: [u8; 6],
        event_idx: bool,
        interrupts: bool,
    ) -> anyhow::Result<Port> {
        let n = ring as u64;
        let (mut rx, next) = DriverRing::at(0x1000, ring);
        let (tx, next) = DriverRing::at(next, ring);
        let rx_bufs = next.next_multiple_of(0x10_0000);
        let tx_bufs = rx_bufs + n * BUF;
        let mem = GuestMemory::new((tx_bufs + n * BUF).next_multiple_of(0x10_0000) as usize)?;
        for i in 0..ring {
            rx.set_desc(
                &mem,
                i,
                rx_bufs + i as u64 * BUF,
                BUF as u32,
                VIRTQ_DESC_F_WRITE,
                0,
            );
            rx.publish(&mem, i);
        }
        // We poll: no interrupts, please (unless the run measures what they cost).
        for r in [&rx, &tx].iter().filter(|_| !interrupts) {
            mem.write_u16(r.avail, VRING_AVAIL_F_NO_INTERRUPT);
        }
        let extra = if event_idx {
            VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        };
        let dev = Device::connect_with(socket, &mem, &[&rx, &tx], extra)
            .with_context(|| format!("port {}", socket.display()))?;
        Ok(Port {
            mem,
            rx,
            tx,
            rx_bufs,
            tx_bufs,
            free: (0..ring).rev().collect(),
            tx_used: 0,
            rx_used: 0,
            mac,
            tx_published: 0,
            dev,
        })
    }

    /// Take back the TX chains the backend is done with.
    fn reclaim(&mut self) {
        let used = self.tx.used_idx(&self.mem);
        while self.tx_used != used {
            let (id, _) = self.tx.used_elem(&self.mem, self.tx_used);
            if (id as u16) < self.tx.size {
                self.free.push(id as u16);
            }
            self.tx_used = self.tx_used.wrapping_add(1);
        }
    }

    /// Put a zero virtio-net header and `frame` in TX chain `head`'s buffer, and describe it.
    fn write_tx(&self, head: u16, frame: &[u8]) {
        let buf = self.tx_bufs + head as u64 * BUF;
        self.mem.write(buf, &[0u8; HDR]);
        self.mem.write(buf + HDR as u64, frame);
        self.tx
            .set_desc(&self.mem, head, buf, (HDR + frame.len()) as u32, 0, 0);
    }

    /// Put `frame` in every TX buffer, so that sending needs only `send_stamped`'s 16 bytes.
    fn fill_tx(&mut self, frame: &[u8]) {
        for head in 0..self.tx.size {
            self.write_tx(head, frame);
        }
    }

    /// Queue one frame: a zero virtio-net header, then `frame`.
    fn send(&mut self, frame: &[u8]) -> bool {
        let Some(head) = self.free.pop() else {
            return false;
        };
        self.write_tx(head, frame);
        self.tx.queue(&self.mem, head);
        true
    }

    /// Queue the frame `fill_tx` left in a free buffer, with `stamp` written at `at`.
    fn send_stamped(&mut self, at: usize, stamp: &[u8; 16]) -> bool {
        let Some(head) = self.free.pop() else {
            return false;
        };
        let buf = self.tx_bufs + head as u64 * BUF;
        self.mem.write_array(buf + (HDR + at) as u64, stamp);
        self.tx.queue(&self.mem, head);
        true
    }

    /// Start taking the lines `send_stamped` writes next (the backend last read them).
    fn prefetch_tx(&self, at: usize, frames: usize) {
        for &head in self.free.iter().rev().take(frames) {
            self.mem
                .prefetch_w(self.tx_bufs + head as u64 * BUF + (HDR + at) as u64);
        }
    }

    /// Publish what `send` queued, and kick if the backend asks for kicks (with EVENT_IDX as
    /// Linux's `virtqueue_kick_prepare`: a full barrier, then `avail_event`, every time).
    fn publish_tx(&mut self) {
        let (old, new) = (self.tx_published, self.tx.avail_idx);
        self.tx.set_avail_idx(&self.mem, new);
        self.tx_published = new;
        let kick = if self.dev.features & VIRTIO_RING_F_EVENT_IDX != 0 {
            fence(Ordering::SeqCst);
            let event = self.tx.avail_event(&self.mem);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.mem.read_u16(self.tx.used) & VRING_USED_F_NO_NOTIFY == 0
        };
        if kick {
            let _ = self.dev.kicks[1].write(1);
        }
    }

    /// Hand each received frame's first bytes (up to `HEAD`, without the virtio-net header)
    /// to `f`, then give the buffers back. A burst's frames are asked for together first:
    /// the backend wrote them on its own core, and one at a time each read waited for its miss.
    fn receive(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let used = self.rx.used_idx(&self.mem);
        let mut n = 0;
        while self.rx_used != used {
            let mut burst = [(0u16, 0usize); BURST];
            let mut k = 0;
            while k < BURST && self.rx_used.wrapping_add(k as u16) != used {
                let (id, len) = self
                    .rx
                    .used_elem(&self.mem, self.rx_used.wrapping_add(k as u16));
                let id = id as u16 & (self.rx.size - 1);
                self.mem
                    .prefetch(self.rx_bufs + id as u64 * BUF + HDR as u64);
                burst[k] = (id, len as usize);
                k += 1;
            }
            for &(id, len) in &burst[..k] {
                if len > HDR {
                    // Only the first bytes are looked at: headers, sequence and timestamp.
                    let head: [u8; HEAD] = self
                        .mem
                        .read_array(self.rx_bufs + id as u64 * BUF + HDR as u64);
                    f(&head[..(len - HDR).min(HEAD)]);
                }
                self.rx.queue(&self.mem, id);
            }
            self.rx_used = self.rx_used.wrapping_add(k as u16);
            n += k;
        }
        if n > 0 {
            self.rx.set_avail_idx(&self.mem, self.rx.avail_idx);
        }
        n
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], ethertype: [u8; 2], len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend(dst);
    f.extend(src);
    f.extend(ethertype);
    f.resize(len, 0);
    f
}

/// An empty one-way latency histogram: 1 ns to 60 s, 3 significant digits.
fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000_000, 3)?)
}

/// Offset of the sequence number and timestamp in a test frame (after the Ethernet header);
/// `send_stamped` writes both at once.
const SEQ_AT: usize = 14;
const TSC_AT: usize = 22;
/// How much of a received frame `receive` reads: through the timestamp.
const HEAD: usize = 32;
/// A gap between two turns of the traffic loop longer than this is a stall of its vCPU. Turns
/// take under 10 µs even at the highest rates; the guest kernel's timer tick (250 Hz) takes
/// the vCPU away for 15–45 µs on this rig, and what fell due meanwhile, sent late in one
/// burst, set the p99 of every backend at 50 % load.
const STALL_US: f64 = 15.0;

/// Run traffic from port A (`a`) to port B (`b`) and measure it.
pub fn run(a: &Path, b: &Path, cfg: &TrafficConfig) -> anyhow::Result<Report> {
    anyhow::ensure!(
        (64..=2000).contains(&cfg.frame_len),
        "frame size must be 64..=2000"
    );
    let mut pa = Port::connect(
        a,
        cfg.ring,
        [2, 0, 0, 0, 0, 0xa],
        cfg.event_idx,
        cfg.interrupts,
    )?;
    let mut pb = Port::connect(
        b,
        cfg.ring,
        [2, 0, 0, 0, 0, 0xb],
        cfg.event_idx,
        cfg.interrupts,
    )?;
    let hz = dataplane::tsc::hz() as f64;
    // Learning switches see each port's MAC once; the hellos are not counted.
    for (p, other) in [(&mut pa, [0xff; 6]), (&mut pb, [0xff; 6])] {
        let hello = frame(other, p.mac, ETH_HELLO, 64);
        p.send(&hello);
        p.publish_tx();
    }
    std::thread::sleep(Duration::from_millis(100));
    pa.receive(|_| {});
    pb.receive(|_| {});

    // Every TX buffer holds the test frame; a send writes only its sequence and timestamp.
    pa.reclaim();
    pa.fill_tx(&frame(pb.mac, pa.mac, ETH_TEST, cfg.frame_len));
    let mut stamp = [0u8; 16];
    let mut latency = latency_histogram()?;
    let (mut sent, mut received, mut reordered, mut next_seq) = (0u64, 0u64, 0u64, 0u64);
    let mut late = 0u64;
    let stall = (STALL_US * 1e-6 * hz) as u64;
    let ns_per_tick = 1e9 / hz;
    let gap = cfg.rate.map(|r| hz / r);
    let start = dataplane::tsc::now();
    let end = start + (cfg.duration.as_secs_f64() * hz) as u64;
    let mut next_send = start as f64;
    let mut last_turn = start;
    let mut last_report = Instant::now();
    let mut next_report = start + hz as u64;
    let (mut sent_at_report, mut recv_at_report) = (0u64, 0u64);
    loop {
        pa.reclaim();
        pa.prefetch_tx(SEQ_AT, BURST);
        // Receive before sending: B's ring is emptied before the turn adds work, and the TX
        // lines just asked for arrive meanwhile (sending first cost 5–9 % of the zero-loss
        // rate at 64 B).
        pa.receive(|_| {});
        let t_rx = dataplane::tsc::now();
        pb.receive(|f| {
            if f.len() < TSC_AT + 8 || f[12..14] != ETH_TEST {
                return;
            }
            let seq = u64::from_le_bytes(f[SEQ_AT..SEQ_AT + 8].try_into().unwrap_or_default());
            let t = u64::from_le_bytes(f[TSC_AT..TSC_AT + 8].try_into().unwrap_or_default());
            received += 1;
            if seq < next_seq {
                reordered += 1;
            }
            next_seq = next_seq.max(seq + 1);
            let ns = (t_rx.saturating_sub(t) as f64 * ns_per_tick) as u64;
            let _ = latency.record(ns.max(1));
        });
        // Two TSC reads per turn: this one paces, ends and stamps the burst (its frames reach
        // the backend together, at publish_tx), the other times what is received.
        let now = dataplane::tsc::now();
        let prev_turn = std::mem::replace(&mut last_turn, now);
        let sending = now < end;
        if !sending && now > end + (0.2 * hz) as u64 {
            break;
        }
        if sending {
            if let Some(g) = gap {
                // The source's own vCPU was away (a gap between loop turns): what fell due
                // meanwhile was never offered, and is not sent now as one burst, which the
                // backend would have to queue: a fixed-rate source does not burst.
                if now - prev_turn > stall && next_send < now as f64 {
                    late += ((now as f64 - next_send) / g) as u64;
                    next_send = now as f64;
                }
            }
            stamp[8..].copy_from_slice(&now.to_le_bytes());
            let mut queued = 0;
            while queued < BURST {
                if gap.is_some() && (now as f64) < next_send {
                    break;
                }
                stamp[..8].copy_from_slice(&sent.to_le_bytes());
                if !pa.send_stamped(SEQ_AT, &stamp) {
                    break;
                }
                next_send += gap.unwrap_or(0.0);
                sent += 1;
                queued += 1;
            }
            if queued > 0 {
                pa.publish_tx();
            }
            if let Some(g) = gap {
                // A slow loop turn is caught up by up to a ring's worth (it must not lower the
                // offered rate); beyond that the TX ring was full, and it is not owed later.
                next_send = next_send.max(now as f64 - g * cfg.ring as f64);
            }
        }
        if cfg.progress && now >= next_report {
            next_report = now + hz as u64;
            let dt = last_report.elapsed().as_secs_f64();
            eprint!(
                "\r  {:5.1} s  offered {:6.2} Mpps  received {:6.2} Mpps  lost {:>10}  p99 {:8.1} us   ",
                (now - start) as f64 / hz,
                (sent - sent_at_report) as f64 / dt / 1e6,
                (received - recv_at_report) as f64 / dt / 1e6,
                sent - received,
                latency.value_at_quantile(0.99) as f64 / 1e3
            );
            last_report = Instant::now();
            (sent_at_report, recv_at_report) = (sent, received);
        }
    }
    if cfg.progress {
        eprintln!();
    }
    Ok(Report {
        sent,
        received,
        lost: sent.saturating_sub(received),
        reordered,
        late,
        seconds: cfg.duration.as_secs_f64(),
        latency,
    })
}

/// The zero-loss rate found by `zero_loss`, and the trial runs at fractions of it.
pub struct ZeroLoss {
    /// Highest offered rate (frames/s) at which a whole trial lost nothing; 0 if none did.
    pub rate: f64,
    /// (fraction of `rate`, the run at that load).
    pub at_load: Vec<(f64, Report)>,
}

/// RFC 2544-style zero-loss throughput: binary search over the offered rate, a rate passing
/// when one of `tries` trials of `cfg.duration` offers it (98 %) and loses no frame (RFC 2544
/// proper is one trial; on a shared VM one vCPU stall can lose frames at any rate, and a
/// single unlucky trial early in the search would sink the result); then a run at each of
/// `loads` (fractions of the rate found) for latency. The upper bound is what a maximum-rate
/// trial delivered.
pub fn zero_loss(
    a: &Path,
    b: &Path,
    cfg: &TrafficConfig,
    steps: u32,
    tries: u32,
    loads: &[f64],
) -> anyhow::Result<ZeroLoss> {
    let trial = |rate: Option<f64>| {
        let r = run(
            a,
            b,
            &TrafficConfig {
                rate,
                ..cfg.clone()
            },
        )?;
        if cfg.progress {
            eprintln!(
                "  trial {}: offered {:.3} Mpps, lost {}, late {}",
                rate.map_or("max".to_string(), |r| format!("{:.3} Mpps", r / 1e6)),
                r.offered_mpps(),
                r.lost,
                r.late
            );
        }
        anyhow::Ok(r)
    };
    let max = trial(None)?;
    let (mut lo, mut hi) = (0.0, max.received as f64 / max.seconds);
    if max.lost == 0 {
        lo = hi;
    }
    for _ in 0..steps {
        if hi - lo < hi * 0.01 {
            break;
        }
        let mid = (lo + hi) / 2.0;
        // A rate passes only if it was really offered: when the rings back up, the source
        // sends less than asked, which is a failure too, not a pass with no loss. What the
        // source could not offer because its own vCPU stalled is not held against the backend.
        let mut passed = false;
        for _ in 0..tries.max(1) {
            let r = trial(Some(mid))?;
            if r.lost == 0 && (r.sent + r.late) as f64 >= 0.98 * mid * r.seconds {
                passed = true;
                break;
            }
        }
        if passed {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut at_load = Vec::new();
    if lo > 0.0 {
        for &f in loads {
            at_load.push((
                f,
                run(
                    a,
                    b,
                    &TrafficConfig {
                        rate: Some(lo * f),
                        ..cfg.clone()
                    },
                )?,
            ));
        }
    }
    Ok(ZeroLoss { rate: lo, at_load })
}

/// The histogram as an HdrHistogram percentile distribution (`.hgrm`), in microseconds: the
/// text format HdrHistogram's plotters read.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0;
    // 5 ticks per half distance, as HdrHistogram's own percentile output.
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            format!("{:14.2}", 1.0 / (1.0 - q))
        } else {
            format!("{:>14}", "inf")
        };
        out += &format!(
            "{:12.3} {:14.12} {:10} {inv}\n",
            v.value_iterated_to() as f64 / 1e3,
            q,
            total
        );
    }
    out += &format!(
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]\n",
        h.mean() / 1e3,
        h.stdev() / 1e3,
        h.max() as f64 / 1e3,
        h.len()
    );
    out
}

/// A histogram (ns) back from an `.hgrm` percentile distribution (µs) as `hgrm` writes it:
/// each row's values are recorded at the row's value, so percentiles come back to within
/// the file's resolution.
pub fn parse_hgrm(text: &str) -> anyhow::Result<Histogram<u64>> {
    let mut h = latency_histogram()?;
    let mut seen = 0u64;
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(v), Some(total)) = (cols.first(), cols.get(2)) else {
            continue;
        };
        let (Ok(v), Ok(total)) = (v.parse::<f64>(), total.parse::<u64>()) else {
            continue; // the header and the summary lines
        };
        anyhow::ensure!(total >= seen, "hgrm: total count goes down at {line:?}");
        h.record_n(((v * 1e3).round() as u64).max(1), total - seen)?;
        seen = total;
    }
    anyhow::ensure!(seen > 0, "hgrm: no percentile rows");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_round_trip() {
        let mut h = latency_histogram().unwrap();
        for i in 1..=10_000u64 {
            h.record(500 + i * i % 40_000).unwrap();
        }
        h.record(2_000_000).unwrap();
        let text = hgrm(&h);
        let back = parse_hgrm(&text).unwrap();
        assert_eq!(back.len(), h.len());
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            let (a, b) = (
                h.value_at_quantile(q) as f64,
                back.value_at_quantile(q) as f64,
            );
            assert!((a - b).abs() <= a * 0.01, "q {q}: {a} vs {b}");
        }
        assert!(parse_hgrm("Value Percentile\n").is_err());
    }
}
