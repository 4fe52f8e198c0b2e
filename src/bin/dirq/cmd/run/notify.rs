//! systemd's notification protocol (sd_notify(3)) for `Type=notify` units: `READY=1`
//! once every stage process has started, `RELOADING=1` and `READY=1` around a SIGHUP
//! reload (systemd 253's `Type=notify-reload` protocol, ignored by older ones),
//! `STOPPING=1` at stop, and `WATCHDOG=1` every half `WATCHDOG_USEC`.
//!
//! A datagram per notification to the `NOTIFY_SOCKET` address (a path, or an abstract
//! name after `@`), written over std's `UnixDatagram` rather than with the `sd-notify`
//! crate: the protocol is a few lines, the one system call std lacks (the monotonic
//! clock for `MONOTONIC_USEC`) is rustix's, and the crate's notify/unset-env API changed
//! between its 0.4 and 0.5 releases. Nothing here is fatal: a notification that cannot
//! be sent is logged once, and the pipeline runs on.

use std::time::{Duration, Instant};

/// The variables of the protocol, which stage processes must not inherit: a `dirq exec`
/// would not notify, but a stage's own command might.
pub(super) const ENVIRONMENT: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// The supervisor's link to the service manager; does nothing without `NOTIFY_SOCKET`.
pub(super) struct Notifier {
    socket: Option<imp::Socket>,
    /// Half the watchdog timeout, when the service manager asked for keep-alives.
    watchdog: Option<Duration>,
    next_watchdog: Instant,
    /// A failure was logged: the next ones are not.
    failed: bool,
}

impl Notifier {
    /// From the environment systemd sets: `NOTIFY_SOCKET`, `WATCHDOG_USEC`, and
    /// `WATCHDOG_PID` (keep-alives only when it is unset or names this process).
    pub(super) fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|address| {
            imp::Socket::open(&address)
                .map_err(|e| {
                    tracing::error!(address = ?address, error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
                })
                .ok()
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .map_or(true, |pid| pid.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|&usec| usec > 0 && for_us && socket.is_some())
            .map(|usec| Duration::from_micros(usec) / 2);
        Notifier {
            socket,
            watchdog,
            next_watchdog: Instant::now(),
            failed: false,
        }
    }

    /// Startup, or a reload, is complete.
    pub(super) fn ready(&mut self, status: &str) {
        let pid = std::process::id();
        self.send(&format!("READY=1\nSTATUS={status}\nMAINPID={pid}"));
    }

    /// A reload starts, at the monotonic time the service manager compares with the
    /// time it sent SIGHUP.
    pub(super) fn reloading(&mut self) {
        let message = match imp::monotonic_usec() {
            Some(usec) => format!("RELOADING=1\nSTATUS=reloading\nMONOTONIC_USEC={usec}"),
            None => "RELOADING=1\nSTATUS=reloading".to_owned(),
        };
        self.send(&message);
    }

    pub(super) fn stopping(&mut self) {
        self.send("STOPPING=1\nSTATUS=stopping: the stages drain");
    }

    /// Sends the watchdog keep-alive when it is due; returns how long until the next
    /// one, for the main loop's sleep.
    pub(super) fn watchdog(&mut self, now: Instant) -> Option<Duration> {
        let interval = self.watchdog?;
        if now >= self.next_watchdog {
            self.send("WATCHDOG=1");
            self.next_watchdog = now + interval;
        }
        Some(self.next_watchdog.saturating_duration_since(now))
    }

    fn send(&mut self, message: &str) {
        let Some(socket) = &self.socket else { return };
        if let Err(e) = socket.send(message.as_bytes()) {
            if !self.failed {
                tracing::error!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET); further failures are not logged");
                self.failed = true;
            }
        }
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::ffi::OsStr;
    use std::io;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    pub(super) struct Socket {
        socket: UnixDatagram,
        address: SocketAddr,
    }

    impl Socket {
        pub(super) fn open(address: &OsStr) -> io::Result<Socket> {
            let bytes = address.as_bytes();
            let address = match bytes.strip_prefix(b"@") {
                // systemd's spelling of an abstract address: the name after a NUL.
                Some(name) => SocketAddr::from_abstract_name(name)?,
                None if bytes.starts_with(b"/") => SocketAddr::from_pathname(address)?,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "neither an absolute path nor @name",
                    ))
                }
            };
            let socket = UnixDatagram::unbound()?;
            // IMPORTANT: the main loop must never wait for the service manager (its
            // keep-alives come from that loop): a full socket buffer fails the send
            // with WouldBlock, logged once, instead of blocking it.
            socket.set_nonblocking(true)?;
            Ok(Socket { socket, address })
        }

        pub(super) fn send(&self, message: &[u8]) -> io::Result<()> {
            // Sent to the address each time rather than connected once: systemd may
            // recreate its socket (a daemon-reexec) under the same address.
            self.socket.send_to_addr(message, &self.address).map(drop)
        }
    }

    /// CLOCK_MONOTONIC in microseconds, the clock of `MONOTONIC_USEC`.
    pub(super) fn monotonic_usec() -> Option<u128> {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let seconds = u128::try_from(now.tv_sec).ok()?;
        let nanos = u128::try_from(now.tv_nsec).ok()?;
        Some(seconds * 1_000_000 + nanos / 1_000)
    }
}

/// systemd runs on Linux only: elsewhere `NOTIFY_SOCKET` is refused once, and nothing
/// is sent.
#[cfg(not(target_os = "linux"))]
mod imp {
    use std::ffi::OsStr;
    use std::io;

    pub(super) struct Socket;

    impl Socket {
        pub(super) fn open(_address: &OsStr) -> io::Result<Socket> {
            Err(io::ErrorKind::Unsupported.into())
        }

        pub(super) fn send(&self, _message: &[u8]) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }
    }

    pub(super) fn monotonic_usec() -> Option<u128> {
        None
    }
}
