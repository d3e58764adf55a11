//! ringswitch killed and started again, with a `mode = "client"` port: it reconnects by itself
//! to the frontend, which listens (server mode), and frames flow again. The frontend is our
//! Rust one (perf::frontend): testpmd 22.11's virtio-user server mode does not accept a second
//! backend once the first vanished, so it cannot be the peer here.

mod common;

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::*;
use perf::frontend::{Device, DriverRing, GuestMemory, VIRTQ_DESC_F_WRITE};

#[test]
fn client_mode_port_reconnects_after_a_switch_restart() {
    let dir = TestDir::new("restart-frontend");
    let sock = dir.join("guest.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let port = format!(
        "[[port]]\nname = \"c0\"\ntype = \"vhost-user\"\nmode = \"client\"\nsocket = \"{}\"\n",
        sock.display()
    );
    let mem = GuestMemory::new(1 << 20).unwrap();
    let (mut rx, next) = DriverRing::at(0x1000, 16);
    let (mut tx, _) = DriverRing::at(next, 16);
    rx.set_desc(&mem, 0, 0x8_0000, 2048, VIRTQ_DESC_F_WRITE, 0);
    rx.publish(&mem, 0);
    let mut frame = vec![0u8; 12];
    frame.extend([0xff; 6]);
    frame.extend([2, 0, 0, 0, 0, 0x42, 0x88, 0xb5]);
    frame.resize(12 + 60, 0x5a);
    mem.write(0x9_0000, &frame);
    // Send one frame and wait for the switch to take it (its chain comes back used).
    let send = |dev: &Device, tx: &mut DriverRing, n: u16| {
        tx.set_desc(&mem, n, 0x9_0000, frame.len() as u32, 0, 0);
        tx.publish(&mem, n);
        let _ = dev.kicks[1].write(1);
        let t = Instant::now();
        while tx.used_idx(&mem) != n + 1 {
            assert!(t.elapsed() < Duration::from_secs(10), "frame {n} not taken");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    let mut sw = Switch::with_config("restart1", "", &port);
    let dev = Device::accept(&listener, Duration::from_secs(10), &mem, &[&rx, &tx]).unwrap();
    sw.wait_connected(0, true);
    send(&dev, &mut tx, 0);
    assert_eq!(sw.port(&sw.stats(), 0)["from_port"]["packets"], 1);

    // Gone without a goodbye; a new switch on the same configuration comes back to us.
    sw.kill();
    drop(dev);
    let sw = Switch::with_config("restart2", "", &port);
    let dev = Device::accept(&listener, Duration::from_secs(10), &mem, &[&rx, &tx]).unwrap();
    sw.wait_connected(0, true);
    send(&dev, &mut tx, 1);
    let s = sw.stats();
    assert_eq!(sw.port(&s, 0)["from_port"]["packets"], 1, "{s}");
    sw.check_accounting();
}
