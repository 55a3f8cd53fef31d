//! Exit notification for sampled processes, without polling: a pidfd per
//! process on Linux, kqueue EVFILT_PROC on macOS. The exit status is known
//! only for our own children (read without reaping them, so whoever spawned
//! them still can).

use std::io;

use tokio::sync::mpsc;

use crate::exit::ExitStatus;

/// A process exit: its pid, and its status when it was our child.
pub type Exited = (u32, ExitStatus);

#[cfg(target_os = "linux")]
pub use linux::ExitWatcher;
#[cfg(target_os = "macos")]
pub use macos::ExitWatcher;

#[cfg(target_os = "linux")]
mod linux {
    use std::{
        collections::HashMap,
        os::fd::{FromRawFd, OwnedFd},
    };

    use tokio::{io::unix::AsyncFd, task::JoinHandle};

    use super::*;

    pub struct ExitWatcher {
        tx: mpsc::UnboundedSender<Exited>,
        rx: mpsc::UnboundedReceiver<Exited>,
        waiting: HashMap<u32, JoinHandle<()>>,
    }

    impl ExitWatcher {
        pub fn new() -> Self {
            let (tx, rx) = mpsc::unbounded_channel();
            Self {
                tx,
                rx,
                waiting: HashMap::new(),
            }
        }

        /// Reports `pid`'s exit when it comes (at once if it is gone).
        pub fn watch(&mut self, pid: u32) -> io::Result<()> {
            if self.waiting.contains_key(&pid) {
                return Ok(());
            }
            // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
            if fd < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ESRCH) {
                    // Already gone.
                    let _ = self.tx.send((pid, child_status(pid)));
                    return Ok(());
                }
                return Err(err);
            }
            // SAFETY: a fresh descriptor that we now own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            // SAFETY: the OwnedFd keeps its descriptor open, unchanged, for
            // as long as the AsyncFd owns it.
            let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
            let tx = self.tx.clone();
            let task = tokio::spawn(async move {
                // A pidfd becomes readable when the process exits.
                let _ = fd.readable().await;
                let _ = tx.send((pid, child_status(pid)));
            });
            self.waiting.insert(pid, task);
            Ok(())
        }

        pub fn unwatch(&mut self, pid: u32) {
            if let Some(task) = self.waiting.remove(&pid) {
                task.abort();
            }
        }

        pub async fn next(&mut self) -> Exited {
            let exited = self
                .rx
                .recv()
                .await
                .expect("the watcher holds a sender, so the channel stays open");
            self.waiting.remove(&exited.0);
            exited
        }
    }

    /// The status of `pid` if it is our child that has exited, read with
    /// WNOWAIT so that it stays to be reaped by whoever spawned it.
    fn child_status(pid: u32) -> ExitStatus {
        // SAFETY: zeroed siginfo is a valid out buffer.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer; ECHILD (not our child) is an error return.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: filled by waitid when it returned 0.
        if rc != 0 || unsafe { info.si_pid() } == 0 {
            return ExitStatus::Unknown;
        }
        // SAFETY: as above.
        let status = unsafe { info.si_status() };
        match info.si_code {
            libc::CLD_EXITED => ExitStatus::Code(status),
            libc::CLD_KILLED => ExitStatus::Signal {
                signal: status,
                core_dumped: false,
            },
            libc::CLD_DUMPED => ExitStatus::Signal {
                signal: status,
                core_dumped: true,
            },
            _ => ExitStatus::Unknown,
        }
    }
}

#[cfg(target_os = "macos")]
mod macos {
    use std::{
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        sync::Arc,
    };

    use super::*;

    pub struct ExitWatcher {
        kq: Arc<OwnedFd>,
        tx: mpsc::UnboundedSender<Exited>,
        rx: mpsc::UnboundedReceiver<Exited>,
    }

    impl ExitWatcher {
        pub fn new() -> Self {
            let (tx, rx) = mpsc::unbounded_channel();
            // SAFETY: kqueue takes no arguments.
            let fd = unsafe { libc::kqueue() };
            assert!(fd >= 0, "kqueue failed: {}", io::Error::last_os_error());
            // SAFETY: a fresh descriptor that we now own.
            let kq = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
            let reader = Arc::clone(&kq);
            let sender = tx.clone();
            // kevent blocks; a small thread turns it into channel messages.
            std::thread::spawn(move || wait_loop(&reader, &sender));
            Self { kq, tx, rx }
        }

        pub fn watch(&mut self, pid: u32) -> io::Result<()> {
            let change = proc_event(pid, libc::EV_ADD | libc::EV_ONESHOT);
            // SAFETY: one valid change, no output events.
            let rc = unsafe {
                libc::kevent(
                    self.kq.as_raw_fd(),
                    &change,
                    1,
                    std::ptr::null_mut(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ESRCH) {
                    let _ = self.tx.send((pid, ExitStatus::Unknown));
                    return Ok(());
                }
                return Err(err);
            }
            Ok(())
        }

        pub fn unwatch(&mut self, pid: u32) {
            let change = proc_event(pid, libc::EV_DELETE);
            // SAFETY: as in watch; ENOENT (already fired) is fine.
            unsafe {
                libc::kevent(
                    self.kq.as_raw_fd(),
                    &change,
                    1,
                    std::ptr::null_mut(),
                    0,
                    std::ptr::null(),
                )
            };
        }

        pub async fn next(&mut self) -> Exited {
            self.rx
                .recv()
                .await
                .expect("the watcher holds a sender, so the channel stays open")
        }
    }

    fn proc_event(pid: u32, flags: u16) -> libc::kevent {
        libc::kevent {
            ident: pid as libc::uintptr_t,
            filter: libc::EVFILT_PROC,
            flags,
            fflags: libc::NOTE_EXIT | libc::NOTE_EXITSTATUS,
            data: 0,
            udata: std::ptr::null_mut(),
        }
    }

    fn wait_loop(kq: &OwnedFd, tx: &mpsc::UnboundedSender<Exited>) {
        // SAFETY: zeroed kevents are valid out buffers.
        let mut events: [libc::kevent; 16] = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: valid buffer of 16 events; blocks until one comes.
            let n = unsafe {
                libc::kevent(
                    kq.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    std::ptr::null(),
                )
            };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            for event in &events[..n as usize] {
                if event.filter != libc::EVFILT_PROC || event.fflags & libc::NOTE_EXIT == 0 {
                    continue;
                }
                // The status comes only for our own children.
                let status = if event.fflags & libc::NOTE_EXITSTATUS != 0 {
                    ExitStatus::from_wait_status(event.data as u32)
                } else {
                    ExitStatus::Unknown
                };
                if tx.send((event.ident as u32, status)).is_err() {
                    return;
                }
            }
        }
    }
}
