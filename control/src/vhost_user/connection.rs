//! One frontend connection: each message waits at the framing gate (framing.rs) until it is
//! whole and bounded, then goes to rust-vmm's handler; SET_VRING_ENABLE before SET_FEATURES
//! (QEMU's order) is applied from the copy the gate peeked. The port's control thread.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, VhostUserVirtioFeatures};
use vhost::vhost_user::{BackendReqHandler, VhostUserBackendReqHandlerMut};

use crate::vhost_user::VhostUserDevice;

pub fn serve_connection(
    name: &str,
    s: UnixStream,
    dev: &Arc<Mutex<VhostUserDevice>>,
    flag: &AtomicBool,
) {
    log::info!("port {name}: frontend connected");
    flag.store(true, Ordering::Relaxed);
    let mut replies = match s.try_clone() {
        Ok(r) => r,
        Err(e) => {
            log::warn!("port {name}: closing connection: {e}");
            return;
        }
    };
    let mut h = BackendReqHandler::from_stream(s, dev.clone());
    let mut first = true;
    loop {
        // Whole, bounded in size, fds and time, before the crate reads it (framing.rs).
        let next = match super::framing::await_message(&replies, first) {
            Ok(m) => Peeked::from(&m),
            Err(super::framing::FrameError::Disconnected) => {
                log::info!("port {name}: frontend disconnected");
                break;
            }
            Err(e) => {
                log::warn!("port {name}: closing connection: {e}");
                break;
            }
        };
        first = false;
        match h.handle_request() {
            Ok(()) => {}
            Err(vhost::vhost_user::Error::Disconnected)
            | Err(vhost::vhost_user::Error::PartialMessage) => {
                log::info!("port {name}: frontend disconnected");
                break;
            }
            // QEMU's vhost-user net enables its rings with SET_VRING_ENABLE before it sends
            // SET_FEATURES, and does not enable them again after (QEMU 8 and later also wait
            // for the REPLY_ACK). The vhost crate refuses the message then, after reading all
            // of it, without a reply; DPDK's vhost applies it. So do we, from the copy peeked
            // before the crate read it.
            Err(vhost::vhost_user::Error::InactiveFeature(f))
                if f == VhostUserVirtioFeatures::PROTOCOL_FEATURES =>
            {
                let Some((msg, (index, enable))) = next.vring_enable.map(|v| (next, v)) else {
                    log::warn!("port {name}: closing connection: inactive feature {f:?}");
                    break;
                };
                log::debug!("port {name}: SET_VRING_ENABLE {index} {enable} before SET_FEATURES");
                let result = dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set_vring_enable(index, enable);
                if let Err(e) = &result {
                    log::warn!("port {name}: {e}");
                }
                if msg.need_reply() {
                    if let Err(e) = replies.write_all(&msg.ack(result.is_ok())) {
                        log::warn!("port {name}: closing connection: {e}");
                        break;
                    }
                }
            }
            Err(e) => {
                log::warn!("port {name}: closing connection: {e}");
                break;
            }
        }
    }
    flag.store(false, Ordering::Relaxed);
    dev.lock().unwrap_or_else(|p| p.into_inner()).disconnect();
}

/// The next vhost-user message as far as `serve_connection` needs it: its header, and for
/// SET_VRING_ENABLE its body (ring index, enable).
#[derive(Clone, Copy)]
struct Peeked {
    request: u32,
    flags: u32,
    vring_enable: Option<(u32, bool)>,
}

impl Peeked {
    fn need_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }

    /// A REPLY_ACK reply: header (protocol version 1), then a u64, 0 for success.
    fn ack(&self, ok: bool) -> [u8; 20] {
        let mut out = [0u8; 20];
        out[..4].copy_from_slice(&self.request.to_le_bytes());
        out[4..8].copy_from_slice(&(1 | VhostUserHeaderFlag::REPLY.bits()).to_le_bytes());
        out[8..12].copy_from_slice(&8u32.to_le_bytes());
        out[12] = u8::from(!ok);
        out
    }
}

impl Peeked {
    /// What `serve_connection` needs of the message the framing gate saw whole.
    fn from(m: &super::framing::Message) -> Peeked {
        let b = &m.head;
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8));
        let vring_enable =
            (request == FrontendReq::SET_VRING_ENABLE as u32 && size == 8 && m.len >= 20)
                .then(|| (word(12), word(16) == 1));
        Peeked {
            request,
            flags,
            vring_enable,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// QEMU's order: SET_VRING_ENABLE before SET_FEATURES. The message is applied, its
    /// REPLY_ACK sent when asked for, and the connection stays up: a GET_FEATURES after it is
    /// answered.
    #[test]
    fn set_vring_enable_before_set_features_keeps_the_connection() {
        use std::io::Read;
        let dev = Arc::new(Mutex::new(crate::vhost_user::test_device("vm-q")));
        let (mut fe, be) = UnixStream::pair().unwrap();
        let served = std::thread::spawn(move || {
            serve_connection("vm-q", be, &dev, &AtomicBool::new(false));
        });
        let msg = |request: u32, flags: u32, body: &[u32]| -> Vec<u8> {
            let size = 4 * body.len() as u32;
            [request, flags, size]
                .iter()
                .chain(body)
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
        fe.write_all(&msg(18, 1, &[0, 1])).unwrap(); // SET_VRING_ENABLE ring 0, enable
        fe.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reply = [0u8; 20];
        // The same with NEED_REPLY, as QEMU 8+ sends it: acknowledged with success.
        fe.write_all(&msg(18, 1 | 8, &[1, 1])).unwrap();
        fe.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..12], [18, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0]);
        assert_eq!(reply[12..], [0; 8], "success");
        // Ring 2 does not exist: refused, and the connection still stays up.
        fe.write_all(&msg(18, 1 | 8, &[2, 1])).unwrap();
        fe.read_exact(&mut reply).unwrap();
        assert_eq!(reply[12..], [1, 0, 0, 0, 0, 0, 0, 0], "failure");
        fe.write_all(&msg(1, 1, &[])).unwrap(); // GET_FEATURES
        fe.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..4], 1u32.to_le_bytes(), "a GET_FEATURES reply");
        let features = u64::from_le_bytes(reply[12..].try_into().unwrap());
        assert_eq!(features, crate::vhost_user::OFFERED_FEATURES);
        drop(fe);
        served.join().unwrap();
    }
}
