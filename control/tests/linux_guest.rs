//! The real customer: Linux guests (Debian's kernel and a busybox initramfs, built by
//! scripts/guest-image) in QEMU with virtio-net-pci on vhost-user ports of the switch. The
//! guests' driver negotiates with ringswitch as with any vhost-user backend, uses interrupts
//! (EVENT_IDX), and the two guests ping each other and run iperf3 through the PMD.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// One QEMU guest on CPU 0 (TCG: the development rig's nested KVM starts no guest).
struct Guest {
    child: Child,
    console: PathBuf,
}

impl Guest {
    fn start(image: &Path, dir: &Path, name: &str, sock: &Path, mac: &str, args: &str) -> Guest {
        let console = dir.join(format!("{name}.console"));
        let child = Command::new("timeout")
            .args(["180", "taskset", "-c", "0", "qemu-system-x86_64"])
            .args(["-accel", "tcg", "-m", "256", "-smp", "1", "-no-reboot"])
            .arg("-kernel")
            .arg(image.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.join("initrd.gz"))
            .args(["-append", &format!("console=ttyS0 panic=-1 {args}")])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={}", sock.display()))
            .args(["-netdev", "vhost-user,id=n0,chardev=c0,queues=1"])
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-display", "none", "-monitor", "none"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (scripts/guest-image installs it)");
        Guest { child, console }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// The console line starting with `marker`, once the guest has printed it.
    fn wait_line(&self, marker: &str, timeout: Duration) -> String {
        let t = Instant::now();
        loop {
            if let Some(l) = self.console().lines().find(|l| l.starts_with(marker)) {
                return l.trim().to_string();
            }
            assert!(
                t.elapsed() < timeout,
                "no {marker:?} on the console of {} within {timeout:?}:\n{}",
                self.console.display(),
                self.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        kill_under_timeout(&mut self.child);
    }
}

#[test]
fn linux_guests_ping_and_iperf_each_other_through_the_switch() {
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-image");
    let built = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest-image"))
        .arg(&image)
        .status()
        .unwrap();
    assert!(built.success(), "scripts/guest-image failed");

    let sw = Switch::start("linux", 2);
    let a = Guest::start(
        &image,
        &sw.dir,
        "a",
        &sw.sock(0),
        "52:54:00:00:00:0a",
        "rs.ip=10.77.0.1/24 rs.iperf_server rs.stay",
    );
    let b = Guest::start(
        &image,
        &sw.dir,
        "b",
        &sw.sock(1),
        "52:54:00:00:00:0b",
        "rs.ip=10.77.0.2/24 rs.ping=10.77.0.1 rs.iperf=10.77.0.1",
    );
    // Both drivers came up on their vhost-user NICs.
    let boot = Duration::from_secs(120);
    assert_eq!(a.wait_line("RS-UP", boot), "RS-UP 52:54:00:00:00:0a");
    assert_eq!(b.wait_line("RS-UP", boot), "RS-UP 52:54:00:00:00:0b");
    let ping = b.wait_line("RS-PING", boot);
    assert_eq!(ping, "RS-PING ok", "{}", b.console());
    // TCP guest → guest (iperf3, 3 s). Under TCG the guests, not the switch, set the rate.
    let iperf = b.wait_line("RS-IPERF", Duration::from_secs(60));
    let mbits: f64 = iperf
        .trim_start_matches("RS-IPERF")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{iperf:?}:\n{}", b.console()));
    println!("linux guest -> guest TCP through ringswitch (TCG guests): {mbits} Mbit/s");
    assert!(mbits > 1.0, "{iperf}");
    // ARP and ICMP went through the switch both ways, and the guests were notified (the Linux
    // driver waits for interrupts, unlike testpmd).
    let s = sw.stats();
    for p in 0..2 {
        let port = sw.port(&s, p);
        assert!(
            port["from_port"]["forwarded"].as_u64().unwrap_or(0) >= 5,
            "{port}"
        );
        assert!(
            port["to_port"]["packets"].as_u64().unwrap_or(0) >= 5,
            "{port}"
        );
        let notified = |side: &str| port[side]["guest_notifications"].as_u64().unwrap_or(0);
        assert!(notified("from_port") + notified("to_port") > 0, "{port}");
    }
    drop((a, b));
    sw.check_accounting();
}
