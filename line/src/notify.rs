//! systemd notification (`Type=notify`, line-side.md §6.5): `READY=1` once the daemon is up with
//! its outputs in the safe state and the self-test has decided (even when the line itself is
//! Faulted, so that a missing camera does not become a restart loop), `STATUS=` on state
//! changes, `WATCHDOG=1` only while the inspection stage makes progress, `STOPPING=1` when
//! draining. Without `NOTIFY_SOCKET` it does
//! nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    sock: Option<(UnixDatagram, String)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` and `WATCHDOG_USEC` (absent: a no-op notifier).
    pub fn from_env() -> Self {
        let sock = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let s = UnixDatagram::unbound().ok()?;
            Some((s, path))
        });
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&us| us > 0)
            .map(Duration::from_micros);
        Self { sock, watchdog }
    }

    /// The watchdog period systemd asked for, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Send one notification (failures are logged, never fatal).
    pub fn send(&self, msg: &str) {
        let Some((s, path)) = &self.sock else { return };
        let r = if let Some(name) = path.strip_prefix('@') {
            abstract_send(s, name, msg)
        } else {
            s.send_to(msg.as_bytes(), path).map(|_| ())
        };
        if let Err(e) = r {
            log::warn!("systemd notify `{msg}`: {e}");
        }
    }
}

#[cfg(target_os = "linux")]
fn abstract_send(s: &UnixDatagram, name: &str, msg: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    s.send_to_addr(msg.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn abstract_send(_: &UnixDatagram, _: &str, _: &str) -> std::io::Result<()> {
    Err(std::io::Error::other("abstract sockets need Linux"))
}
