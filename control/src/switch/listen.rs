//! Where frontends reach a vhost-user port: the listening socket of a server-mode port
//! (`bind_socket`, which never replaces what is not a stale socket), the client-mode
//! reconnect loop, and `Serve`, one port's control thread serving one connection at a time.
//! Control threads.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::config::SocketPerm;
use crate::vhost_user::VhostUserDevice;

use super::lock;
use crate::vhost_user::serve_connection;

/// Bind a server socket, replacing a stale file from a crashed run but never a live socket.
pub fn bind_socket(path: &Path, perm: SocketPerm) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if let Ok(md) = std::fs::symlink_metadata(path) {
        // Only a socket is ever replaced: a port file naming any other file must not make the
        // switch delete it.
        if !md.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket: not replaced",
                path.display()
            );
        }
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use by a running process", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    if perm.uid.is_some() || perm.gid.is_some() {
        std::os::unix::fs::chown(path, perm.uid, perm.gid)
            .with_context(|| format!("chown {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(perm.mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

/// Remove `path` if it is a socket (never any other file).
pub fn remove_socket_file(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// What a vhost-user port thread serves connections with.
pub(super) struct Serve {
    pub(super) name: String,
    pub(super) dev: Arc<Mutex<VhostUserDevice>>,
    pub(super) connected: Arc<AtomicBool>,
    /// Set by `PortThread::stop` (Relaxed: the shutdown that follows it is what wakes us).
    pub(super) stop: Arc<AtomicBool>,
    /// The current connection, for `PortThread::stop` to shut down.
    pub(super) conn: Arc<Mutex<Option<UnixStream>>>,
    /// Server mode: a connection is being served (a second one is refused). Cleared before
    /// the connection's last fd closes, so a frontend that saw it close may connect again.
    pub(super) busy: AtomicBool,
}

impl Serve {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn serve(&self, s: UnixStream) {
        *lock(&self.conn) = s.try_clone().ok();
        // A stop that came before the connection was registered must still end it.
        if !self.stopped() {
            serve_connection(&self.name, s, &self.dev, &self.connected);
        }
        // Release: pairs with the listener's swap; before the last fd (ours) closes.
        self.busy.store(false, Ordering::Release);
        *lock(&self.conn) = None;
    }

    /// Server mode: one frontend at a time, served on a thread of its own, so that a second
    /// one is refused (with a log line) instead of waiting unanswered in the backlog, and a
    /// silent one only holds the port until its first message times out.
    pub(super) fn listener(self: Arc<Self>, l: UnixListener) {
        let mut current: Option<std::thread::JoinHandle<()>> = None;
        for stream in l.incoming() {
            if self.stopped() {
                break;
            }
            match stream {
                // Acquire/Release: pairs with the serving thread's store when it ends.
                Ok(s) if self.busy.swap(true, Ordering::AcqRel) => {
                    log::warn!(
                        "port {}: refusing a second frontend while one is connected",
                        self.name
                    );
                    drop(s);
                }
                Ok(s) => {
                    if let Some(t) = current.take() {
                        let _ = t.join();
                    }
                    let me = self.clone();
                    let t = std::thread::Builder::new()
                        .name(format!("vhost-{}-conn", self.name))
                        .spawn(move || me.serve(s));
                    match t {
                        Ok(t) => current = Some(t),
                        Err(e) => {
                            log::error!("port {}: cannot serve a connection: {e}", self.name);
                            self.busy.store(false, Ordering::Release);
                        }
                    }
                }
                Err(e) => {
                    log::error!("port {}: accept: {e}", self.name);
                    self.pause(Duration::from_millis(100));
                }
            }
        }
        // Stopped: the connection was shut down with the listener, and ends promptly.
        if let Some(t) = current {
            let _ = t.join();
        }
    }

    /// Sleep for `d`, or less if the port is stopped meanwhile.
    fn pause(&self, d: Duration) {
        let end = std::time::Instant::now() + d;
        while !self.stopped() {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }

    /// Client mode: connect to the frontend's socket, and again (with backoff) whenever it
    /// goes. The backoff resets only after a connection that lived (a frontend that accepts
    /// and closes at once is retried ever more slowly, not thousands of times a second), the
    /// connect never waits on the frontend (a full backlog is a retry), and a stop is seen
    /// within a few milliseconds whatever the thread was waiting for.
    pub(super) fn client(&self, path: &Path) {
        const FIRST: Duration = Duration::from_millis(50);
        const MAX: Duration = Duration::from_secs(2);
        const LIVED: Duration = Duration::from_secs(5);
        let mut backoff = FIRST;
        let mut last_error = None;
        while !self.stopped() {
            match connect_nonblocking(path) {
                Ok(s) => {
                    last_error = None;
                    let since = std::time::Instant::now();
                    self.serve(s);
                    if since.elapsed() >= LIVED {
                        backoff = FIRST;
                        continue;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::NotFound | ErrorKind::ConnectionRefused | ErrorKind::WouldBlock
                    ) => {}
                Err(e) => {
                    // Once per kind of error, not once per attempt.
                    if last_error != Some(e.kind()) {
                        log::warn!("port {}: connect {}: {e}", self.name, path.display());
                        last_error = Some(e.kind());
                    }
                }
            }
            self.pause(backoff);
            backoff = (backoff * 2).min(MAX);
        }
    }
}

/// Connect to a unix socket without waiting on its listener: a full backlog is `WouldBlock`
/// at once (a blocking connect would sleep until the frontend accepts). The stream returned
/// is blocking.
pub(super) fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied within sun_path's bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: plain socket(2); the fd is owned by the UnixStream at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un of the size given.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_get_their_mode_stale_ones_are_replaced_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("rs-sock-{}", std::process::id()));
        let path = dir.join("s.sock");
        let perm = SocketPerm {
            mode: 0o600,
            uid: Some(0),
            gid: None,
        };
        let l = bind_socket(&path, perm).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        // Live: a second switch must not steal it.
        let e = bind_socket(&path, perm).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        // Stale (the listener is gone, the file stays, as after a crash): replaced.
        drop(l);
        assert!(path.exists());
        let _l = bind_socket(&path, SocketPerm::default()).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o660);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
