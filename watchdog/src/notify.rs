//! Notifications to the service manager (systemd's `sd_notify` protocol):
//! ready, reloading, stopping, status text and watchdog pings.
//!
//! The protocol is one datagram of newline-separated `KEY=VALUE` lines sent
//! to the socket named by `NOTIFY_SOCKET`: a filesystem path, or on Linux an
//! abstract socket written with a leading `@`. Without that variable (not
//! started by systemd, or a unit type that does not listen) every call is a
//! no-op that costs a branch. A failed send is never fatal: the first one
//! is logged at warn, later ones at debug, so a broken socket cannot flood
//! the log from the watchdog ping.

use std::{
    ffi::{OsStr, OsString},
    io,
    os::unix::{
        ffi::OsStrExt,
        net::{SocketAddr, UnixDatagram},
    },
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// The variables systemd sets for a notifying service. They belong to this
/// process only: services it spawns must not inherit them.
const VARIABLES: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// A handle on the service manager's notification socket, or an inactive
/// one when there is none.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
    /// The watchdog period systemd expects pings within (`WATCHDOG_USEC`),
    /// when the watchdog is enabled for this process.
    watchdog: Option<Duration>,
    /// Whether a failed send has been logged at warn already.
    warned: AtomicBool,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for log lines.
    name: OsString,
}

impl Notifier {
    /// A notifier that never sends anything.
    pub fn inactive() -> Self {
        Self {
            target: None,
            watchdog: None,
            warned: AtomicBool::new(false),
        }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, then
    /// removes them from this process's environment so that the services
    /// it spawns later do not inherit them (a service that found
    /// `NOTIFY_SOCKET` could send `READY=1` or `STOPPING=1` on the daemon's
    /// behalf; systemd ignores it only when `NotifyAccess=main`).
    ///
    /// Call it at start-up, from `main`, before the async runtime or any
    /// other thread exists: changing the environment while another thread
    /// may read it (through libc's `getenv`, which takes no lock) is
    /// undefined behaviour. It checks: when the process already runs more
    /// than one thread (or, off Linux, when that cannot be told), it leaves
    /// the variables in place and says so at warn.
    pub fn take_from_env() -> Self {
        let values = VARIABLES.map(std::env::var_os);
        let present = values.iter().any(Option::is_some);
        let [socket, usec, pid] = values;
        let notifier = Self::from_vars(socket, usec.as_deref(), pid.as_deref(), std::process::id());
        if present {
            if single_threaded() {
                for name in VARIABLES {
                    // SAFETY: this process runs one thread (checked just
                    // above), the one calling this function, so nothing else
                    // can read or write the environment concurrently.
                    unsafe { std::env::remove_var(name) };
                }
            } else {
                tracing::warn!(
                    "NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID stay in the environment: \
                     other threads already run, so it cannot be changed safely"
                );
            }
        }
        notifier
    }

    /// A notifier sending to `address`: a socket path, or (on Linux) an
    /// abstract socket name with a leading `@`, as `NOTIFY_SOCKET` holds.
    /// `watchdog_usec` is the watchdog period as `WATCHDOG_USEC` gives it.
    /// When the address cannot be used, the notifier is inactive and a
    /// warning says why.
    pub fn to_socket(address: impl AsRef<Path>, watchdog_usec: Option<u64>) -> Self {
        let address = address.as_ref().as_os_str();
        match Target::new(address) {
            Ok(target) => Self {
                target: Some(target),
                watchdog: watchdog_period(watchdog_usec),
                warned: AtomicBool::new(false),
            },
            Err(err) => {
                tracing::warn!(
                    socket = %address.to_string_lossy(),
                    error = %err,
                    "cannot notify the service manager"
                );
                Self::inactive()
            }
        }
    }

    /// The notifier the variables describe, for the process `own_pid`.
    /// `WATCHDOG_PID`, when set, names the process the watchdog is meant
    /// for (a shell wrapper may have exec'd or forked us): pings are sent
    /// only when it is `own_pid`.
    fn from_vars(
        socket: Option<OsString>,
        usec: Option<&OsStr>,
        pid: Option<&OsStr>,
        own_pid: u32,
    ) -> Self {
        let Some(socket) = socket.filter(|s| !s.is_empty()) else {
            return Self::inactive();
        };
        let parse = |value: &OsStr| value.to_str()?.trim().parse::<u64>().ok();
        let ours = pid.is_none_or(|pid| parse(pid) == Some(u64::from(own_pid)));
        let usec = usec.and_then(parse).filter(|_| ours);
        Self::to_socket(socket, usec)
    }

    /// Whether notifications go anywhere.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// The recommended ping period: half of `WATCHDOG_USEC`, so that one
    /// late tick does not get the daemon killed. `None` when the watchdog
    /// is not enabled for this process (no socket, no or an invalid
    /// `WATCHDOG_USEC`, or `WATCHDOG_PID` naming another process).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|period| period / 2)
    }

    /// Start-up is complete (and, after [`Notifier::reloading`], the
    /// reload is): `READY=1`.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// A configuration reload begins: `RELOADING=1` with the
    /// `MONOTONIC_USEC` systemd 253 and later require for
    /// `Type=notify-reload` (older versions ignore it). Send
    /// [`Notifier::ready`] when the reload is done, whether it applied or
    /// was rejected.
    pub fn reloading(&self) {
        if self.target.is_some() {
            self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        }
    }

    /// Shutdown begins: `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// Tells the watchdog the event loop is alive: `WATCHDOG=1`. A no-op
    /// when the watchdog is not enabled for this process. Call it from the
    /// loop whose liveness it vouches for, every
    /// [`Notifier::watchdog_interval`].
    pub fn watchdog_ping(&self) {
        if self.watchdog.is_some() {
            self.send("WATCHDOG=1");
        }
    }

    /// One line of free-form status, shown by `systemctl status`. Line
    /// breaks become spaces: each line of the datagram is an assignment,
    /// so text must not be able to add one.
    pub fn status(&self, text: &str) {
        if self.target.is_some() {
            self.send(&format!("STATUS={}", text.replace(['\n', '\r'], " ")));
        }
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.target else {
            return;
        };
        let Err(err) = target.socket.send_to_addr(message.as_bytes(), &target.addr) else {
            return;
        };
        let socket = target.name.to_string_lossy();
        if self.warned.swap(true, Ordering::Relaxed) {
            tracing::debug!(%socket, error = %err, "failed to notify the service manager");
        } else {
            tracing::warn!(
                %socket,
                error = %err,
                "failed to notify the service manager (further failures are logged at debug)"
            );
        }
    }
}

static FROM_ENV: std::sync::OnceLock<std::sync::Arc<Notifier>> = std::sync::OnceLock::new();

/// Takes the notifier out of the environment: called once by `main` before
/// any other thread exists, so that no service inherits systemd's socket.
pub fn init() {
    let _ = FROM_ENV.set(std::sync::Arc::new(Notifier::take_from_env()));
}

/// The notifier taken at start-up (inactive when there was none).
pub fn shared() -> std::sync::Arc<Notifier> {
    FROM_ENV
        .get_or_init(|| std::sync::Arc::new(Notifier::inactive()))
        .clone()
}

impl Default for Notifier {
    fn default() -> Self {
        Self::inactive()
    }
}

impl Target {
    fn new(address: &OsStr) -> io::Result<Self> {
        let addr = match address.as_bytes() {
            [b'@', name @ ..] => abstract_address(name)?,
            [b'/', ..] => SocketAddr::from_pathname(address)?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not an absolute path or an abstract socket name",
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        // A full socket buffer (systemd not reading) must not stall the
        // caller, which is the event loop.
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            addr,
            name: address.to_owned(),
        })
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets are not supported on this system",
    ))
}

/// The watchdog period from `WATCHDOG_USEC`; 0 and "infinity" (`u64::MAX`)
/// mean no watchdog, as in `sd_watchdog_enabled`.
fn watchdog_period(usec: Option<u64>) -> Option<Duration> {
    usec.filter(|&u| u != 0 && u != u64::MAX)
        .map(Duration::from_micros)
}

/// CLOCK_MONOTONIC in microseconds, the clock `MONOTONIC_USEC` is read
/// against.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1_000
}

/// Whether the calling thread is the only thread of this process.
#[cfg(target_os = "linux")]
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .is_some_and(|n| n.trim() == "1")
    })
}

/// Whether the calling thread is the only thread of this process: not
/// known here, so assume not (systemd does not run on these systems).
#[cfg(not(target_os = "linux"))]
fn single_threaded() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    /// A unique name per socket, so tests running in parallel (and in
    /// other test processes) do not collide.
    fn unique(prefix: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}-{n}", std::process::id())
    }

    /// A datagram socket bound at a fresh path; removed on drop.
    struct Listener {
        socket: UnixDatagram,
        path: Option<std::path::PathBuf>,
    }

    impl Listener {
        fn at_path() -> Self {
            let path = std::env::temp_dir().join(unique("wd-notify"));
            let socket = UnixDatagram::bind(&path).unwrap();
            Self::ready(socket, Some(path))
        }

        fn ready(socket: UnixDatagram, path: Option<std::path::PathBuf>) -> Self {
            socket.set_nonblocking(true).unwrap();
            Self { socket, path }
        }

        /// Every datagram waiting, in order.
        fn received(&self) -> Vec<String> {
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match self.socket.recv(&mut buf) {
                    Ok(n) => out.push(String::from_utf8(buf[..n].to_vec()).unwrap()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                    Err(e) => panic!("recv: {e}"),
                }
            }
        }
    }

    impl Drop for Listener {
        fn drop(&mut self) {
            if let Some(path) = &self.path {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    #[test]
    fn sends_each_notification_as_one_datagram() {
        let listener = Listener::at_path();
        let notifier = Notifier::to_socket(listener.path.as_ref().unwrap(), Some(30_000_000));
        assert!(notifier.is_active());
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(15)));

        let before = monotonic_usec();
        notifier.ready();
        notifier.reloading();
        notifier.ready();
        notifier.watchdog_ping();
        notifier.status("2 services running\nREADY=1");
        notifier.stopping();
        let after = monotonic_usec();

        let got = listener.received();
        assert_eq!(got.len(), 6, "{got:?}");
        assert_eq!(got[0], "READY=1");
        let stamp: u64 = got[1]
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{:?}", got[1]))
            .parse()
            .unwrap();
        assert!(
            (before..=after).contains(&stamp),
            "{before} <= {stamp} <= {after}"
        );
        assert_eq!(got[2], "READY=1");
        assert_eq!(got[3], "WATCHDOG=1");
        // A line break in the text cannot smuggle in an assignment.
        assert_eq!(got[4], "STATUS=2 services running READY=1");
        assert_eq!(got[5], "STOPPING=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = unique("wd-notify-abstract");
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = Listener::ready(UnixDatagram::bind_addr(&addr).unwrap(), None);
        let notifier = Notifier::to_socket(format!("@{name}"), None);
        assert!(notifier.is_active());
        notifier.ready();
        notifier.status("draining");
        assert_eq!(listener.received(), ["READY=1", "STATUS=draining"]);
    }

    #[test]
    fn pings_only_when_the_watchdog_is_ours() {
        let listener = Listener::at_path();
        let socket = || Some(listener.path.clone().unwrap().into_os_string());
        let usec = Some(OsStr::new("4000000"));

        let unset_pid = Notifier::from_vars(socket(), usec, None, 42);
        assert_eq!(unset_pid.watchdog_interval(), Some(Duration::from_secs(2)));
        let our_pid = Notifier::from_vars(socket(), usec, Some(OsStr::new("42")), 42);
        assert_eq!(our_pid.watchdog_interval(), Some(Duration::from_secs(2)));
        our_pid.watchdog_ping();
        assert_eq!(listener.received(), ["WATCHDOG=1"]);

        let other_pid = Notifier::from_vars(socket(), usec, Some(OsStr::new("41")), 42);
        let bad_pid = Notifier::from_vars(socket(), usec, Some(OsStr::new("x")), 42);
        let no_usec = Notifier::from_vars(socket(), None, None, 42);
        let zero_usec = Notifier::from_vars(socket(), Some(OsStr::new("0")), None, 42);
        let infinite =
            Notifier::from_vars(socket(), Some(OsStr::new(&u64::MAX.to_string())), None, 42);
        for notifier in [other_pid, bad_pid, no_usec, zero_usec, infinite] {
            assert!(notifier.is_active());
            assert_eq!(notifier.watchdog_interval(), None);
            notifier.watchdog_ping();
            // The socket is still used for everything else.
            notifier.stopping();
        }
        assert_eq!(listener.received(), ["STOPPING=1"; 5]);
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        for notifier in [
            Notifier::from_vars(None, Some(OsStr::new("30000000")), None, 42),
            Notifier::from_vars(Some(OsString::new()), None, None, 42),
            Notifier::default(),
        ] {
            assert!(!notifier.is_active());
            assert_eq!(notifier.watchdog_interval(), None);
            notifier.ready();
            notifier.reloading();
            notifier.watchdog_ping();
            notifier.status("idle");
            notifier.stopping();
            assert!(!notifier.warned.load(Ordering::Relaxed));
        }
    }

    #[test]
    fn refuses_an_address_it_cannot_use() {
        for address in ["relative/path", "vsock:2:1234"] {
            assert!(!Notifier::to_socket(address, Some(1)).is_active());
        }
        let too_long = format!("/{}", "x".repeat(200));
        assert!(!Notifier::to_socket(too_long, None).is_active());
    }

    #[test]
    fn a_failed_send_is_not_fatal() {
        let path = std::env::temp_dir().join(unique("wd-notify-gone"));
        let notifier = Notifier::to_socket(&path, Some(1_000_000));
        assert!(notifier.is_active());
        notifier.ready();
        assert!(notifier.warned.load(Ordering::Relaxed));
        notifier.watchdog_ping();
        notifier.stopping();
    }
}
