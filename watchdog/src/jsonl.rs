//! JSON Lines output: each line is serialized whole and handed to the
//! kernel in a single write, so concurrent writers and crashes never leave
//! half a line. A write the kernel takes only in part (a full disk) is cut
//! back out of the file, so a line is either all there or not at all; lines
//! that could not be written are counted and reported in the stream itself
//! (`audit_lines_lost`) once writing works again.

use std::{
    fs::{File, OpenOptions},
    io::{self, Seek, SeekFrom, Write},
    os::{
        fd::AsFd,
        unix::fs::{FileTypeExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::Serialize;
use tracing::{error, info};

use crate::{
    event::rfc3339,
    ownership::{self, Exposure},
};

/// Why a file could not be used for output.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("refusing {}: it is a symbolic link; pass the file it points to", path.display())]
    Symlink { path: PathBuf },
    #[error(
        "refusing {}: it is owned by uid {owner}, not by uid {user} that writes it; \
         `chown {user_name} {}` it, or choose another file",
        path.display(), path.display()
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        user: u32,
        user_name: String,
    },
    #[error(
        "refusing {}: group or others can write to it (mode {mode:04o}), so they could \
         forge or erase lines; `chmod go-w {}` it, or choose another file",
        path.display(), path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
    // `error`, not `source`: the cause is in the message, and chained as a
    // source too it would be printed twice.
    #[error("failed to open {} for appending: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
}

impl OpenError {
    /// Whether the user can fix this by choosing or fixing the file (a
    /// usage error, exit code 2), rather than a failure of the system.
    pub fn is_usage(&self) -> bool {
        match self {
            // A missing directory, a path that is a directory, or one this
            // user may not write: the path given is wrong.
            Self::Io { error, .. } => matches!(
                error.raw_os_error(),
                Some(libc::ENOENT | libc::ENOTDIR | libc::EISDIR | libc::EACCES | libc::EROFS)
            ),
            _ => true,
        }
    }
}

/// Where lines go.
pub struct LineSink {
    out: Option<Box<dyn Output>>,
    /// The path, for files (for messages and reopening).
    path: Option<PathBuf>,
    /// Make each line durable (fdatasync) before `write_line` returns.
    fsync: bool,
    buf: Vec<u8>,
    /// Lines lost since writing last worked, while it is failing.
    episode: Option<Episode>,
    /// Lines lost in all.
    lost: u64,
    /// Where a partial line begins that could not be cut away yet.
    torn: Option<u64>,
}

/// One stretch of failed writes, from the first lost line to the next
/// line written.
struct Episode {
    lost: u64,
    since: SystemTime,
    error: String,
}

/// The line that reports an episode of lost lines (docs/audit-log.md).
#[derive(Serialize)]
struct LostLine<'a> {
    ts: String,
    event: &'static str,
    count: u64,
    since: String,
    error: &'a str,
}

impl LineSink {
    /// Standard output.
    pub fn stdout() -> io::Result<Self> {
        let fd = io::stdout().as_fd().try_clone_to_owned()?;
        Ok(Self::new(Box::new(FileOutput::new(File::from(fd))), None))
    }

    /// Appends to a file, creating it (mode 0640) if needed. Opened with
    /// O_APPEND, so every write lands at the current end even when another
    /// process appends too, and with O_NOFOLLOW, so a symlink planted at the
    /// path is refused instead of followed. A file that is not owned by
    /// this user, or that group or others can write, is refused too: others
    /// could forge or erase what it records.
    pub fn append(path: &Path) -> Result<Self, OpenError> {
        let file = open_append(path)?;
        Ok(Self::new(
            Box::new(FileOutput::new(file)),
            Some(path.to_owned()),
        ))
    }

    fn new(out: Box<dyn Output>, path: Option<PathBuf>) -> Self {
        Self {
            out: Some(out),
            path,
            fsync: false,
            buf: Vec::with_capacity(512),
            episode: None,
            lost: 0,
            torn: None,
        }
    }

    /// Makes every line durable (fdatasync) before `write_line` returns.
    pub fn set_fsync(&mut self, fsync: bool) {
        self.fsync = fsync;
    }

    /// The file path, when writing to a file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Lines that could not be written, in all.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// The write error, while writing is failing.
    pub fn failing(&self) -> Option<&str> {
        self.episode.as_ref().map(|e| e.error.as_str())
    }

    /// Opens the file again at its path (after logrotate moved it away),
    /// with the same checks as [`LineSink::append`]. On failure, lines are
    /// counted lost and the file is tried again with each of them.
    pub fn reopen(&mut self) -> Result<(), OpenError> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        match open_append(&path) {
            Ok(file) => {
                // A partial line still waiting to be cut is in the old file:
                // one last try, through the old descriptor.
                if let (Some(at), Some(old)) = (self.torn.take(), self.out.as_mut()) {
                    let _ = old.truncate(at);
                }
                self.out = Some(Box::new(FileOutput::new(file)));
                // While writing fails, only its return is worth a message.
                if self.episode.is_none() {
                    info!(path = %path.display(), "output file reopened");
                }
                Ok(())
            }
            Err(e) => {
                // Lines must not keep going to a file that was moved away or
                // replaced by one that is unsafe to write.
                self.out = None;
                self.fail(e.to_string(), 0);
                Err(e)
            }
        }
    }

    /// Makes what was written durable (fdatasync).
    pub fn sync(&mut self) -> io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.sync(),
            None => Ok(()),
        }
    }

    /// Writes `value` as one JSON line with one write(2), whole or not at
    /// all. An error means the line is lost: it was counted, and the first
    /// failure of an episode was logged. A reader that closed standard
    /// output gives `BrokenPipe`, which is not logged: callers end there.
    pub fn write_line<T: Serialize>(&mut self, value: &T) -> io::Result<()> {
        if self.out.is_none() {
            // The file could not be opened last time (a vanished directory,
            // an unsafe file): try again for every line.
            if let Err(e) = self.reopen() {
                self.lost += 1;
                if let Some(episode) = self.episode.as_mut() {
                    episode.lost += 1;
                }
                return Err(io::Error::other(e));
            }
        }
        if let Some(episode) = &self.episode {
            // Writing failed before: say how many lines are missing, ahead
            // of the first line that follows them.
            let report = LostLine {
                ts: rfc3339(SystemTime::now()),
                event: "audit_lines_lost",
                count: episode.lost,
                since: rfc3339(episode.since),
                error: &episode.error,
            };
            self.buf.clear();
            serde_json::to_writer(&mut self.buf, &report).map_err(io::Error::other)?;
            self.buf.push(b'\n');
            if let Err(e) = self.put() {
                return Err(self.lose(e));
            }
            if let Some(episode) = self.episode.take() {
                info!(
                    path = %self.describe(),
                    lost = episode.lost,
                    since = %rfc3339(episode.since),
                    "writing works again; the lost lines are reported in the output"
                );
            }
        }
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, value).map_err(io::Error::other)?;
        self.buf.push(b'\n');
        self.put().map_err(|e| self.lose(e))
    }

    /// Writes the buffer whole (and syncs it, with fsync on).
    fn put(&mut self) -> io::Result<()> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        write_whole(out.as_mut(), &mut self.torn, &self.buf)?;
        if self.fsync {
            out.sync()?;
        }
        Ok(())
    }

    /// Counts the line lost, logs the start of an episode, and hands the
    /// error back.
    fn lose(&mut self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::BrokenPipe && self.path.is_none() {
            // The reader of standard output is gone: the command ends.
            self.lost += 1;
            return e;
        }
        let what = format!("failed to write to {}: {e}", self.describe());
        self.fail(what, 1);
        if self.path.is_some() && self.torn.is_none() {
            // The file may be gone (an NFS handle gone stale) or replaced:
            // open it again before the next line. Not while a partial line
            // waits to be cut through this descriptor.
            self.out = None;
        }
        e
    }

    /// Starts or continues an episode of failures, with `lost` more lines.
    fn fail(&mut self, what: String, lost: u64) {
        self.lost += lost;
        match self.episode.as_mut() {
            // The same trouble going on (a retry failing again): counted,
            // not logged again.
            Some(episode) => episode.lost += lost,
            None => {
                error!(
                    error = %what,
                    "output failed; lines are counted as lost until writing works again"
                );
                self.episode = Some(Episode {
                    lost,
                    since: SystemTime::now(),
                    error: what,
                });
            }
        }
    }

    fn describe(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "standard output".into(), |p| p.display().to_string())
    }
}

/// Opens `path` for appending and checks, on the opened descriptor (not the
/// path, which could be swapped meanwhile), that it is safe to write to.
fn open_append(path: &Path) -> Result<File, OpenError> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::ELOOP) {
                OpenError::Symlink {
                    path: path.to_owned(),
                }
            } else {
                OpenError::Io {
                    path: path.to_owned(),
                    error: source,
                }
            }
        })?;
    let meta = file.metadata().map_err(|source| OpenError::Io {
        path: path.to_owned(),
        error: source,
    })?;
    // Devices (/dev/null) are the system's; regular files and FIFOs are
    // where a reader trusts what it finds.
    let kind = meta.file_type();
    if kind.is_file() || kind.is_fifo() {
        ownership::check(&meta).map_err(|rule| match rule {
            Exposure::NotOwned {
                owner,
                user,
                user_name,
            } => OpenError::NotOwned {
                path: path.to_owned(),
                owner,
                user,
                user_name,
            },
            Exposure::Writable { mode } => OpenError::Writable {
                path: path.to_owned(),
                mode,
            },
        })?;
    }
    Ok(file)
}

/// What a sink writes to: a file or pipe, or a fake one in tests.
trait Output: Send {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// The offset after the last write.
    fn position(&mut self) -> io::Result<u64>;
    /// Cuts the file at `len` and puts the offset there.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
    /// Makes sure the next `len` bytes have room on the disk before they
    /// are written, so that a full disk refuses a line instead of taking
    /// part of it (which a reader tailing the file would see before it is
    /// cut away again). Where that cannot be known (a pipe, a file system
    /// without fallocate), Ok: the write finds out.
    fn reserve(&mut self, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

struct FileOutput {
    file: File,
    /// Up to where blocks are allocated past the end of the file
    /// (fallocate, keeping its size), as far as this descriptor knows.
    #[cfg(target_os = "linux")]
    reserved: u64,
    /// fallocate is not supported here: writes find out on their own.
    #[cfg(target_os = "linux")]
    no_fallocate: bool,
}

impl FileOutput {
    fn new(file: File) -> Self {
        Self {
            file,
            #[cfg(target_os = "linux")]
            reserved: 0,
            #[cfg(target_os = "linux")]
            no_fallocate: false,
        }
    }
}

/// Room is reserved ahead in steps this large, so that most lines cost no
/// extra fallocate.
#[cfg(target_os = "linux")]
const RESERVE_STEP: u64 = 64 << 10;

impl Output for FileOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    #[cfg(target_os = "linux")]
    fn reserve(&mut self, len: u64) -> io::Result<()> {
        if self.no_fallocate {
            return Ok(());
        }
        // Appends go to the end, wherever this descriptor's offset is.
        let end = self.file.metadata()?.len();
        if end + len <= self.reserved {
            return Ok(());
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        // A step ahead if there is room for it, else just this line.
        for want in [RESERVE_STEP.max(len), len] {
            let (Ok(at), Ok(n)) = (libc::off_t::try_from(end), libc::off_t::try_from(want)) else {
                return Ok(());
            };
            // SAFETY: fallocate on our own descriptor; KEEP_SIZE leaves
            // the file's length (and so its content) as it is.
            if unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, at, n) } == 0 {
                self.reserved = end + want;
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOSPC) => continue,
                Some(
                    libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV | libc::ESPIPE,
                ) => {
                    self.no_fallocate = true;
                    return Ok(());
                }
                _ => return Err(err),
            }
        }
        Err(io::Error::from_raw_os_error(libc::ENOSPC))
    }
    fn position(&mut self) -> io::Result<u64> {
        // With O_APPEND the offset is the end of what this descriptor just
        // wrote, even when others append too.
        self.file.stream_position()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        // Cutting the file frees what was reserved past it too.
        #[cfg(target_os = "linux")]
        {
            self.reserved = 0;
        }
        self.file.set_len(len)?;
        // Without O_APPEND (standard output redirected to a file), the next
        // write goes to the offset: put it back, or it leaves a hole.
        self.file.seek(SeekFrom::Start(len))?;
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Writes `line` whole, or leaves the output as it was. A regular file or a
/// pipe takes a line this size (well under PIPE_BUF) whole, except on a
/// full disk, where the kernel writes what fits: then the part written is
/// cut away again, so the next line does not glue onto a torn one. `torn`
/// keeps where a partial line begins while it could not be cut yet.
fn write_whole(out: &mut dyn Output, torn: &mut Option<u64>, line: &[u8]) -> io::Result<()> {
    if let Some(at) = *torn {
        // An earlier partial line could not be cut away: nothing goes after
        // it until it is.
        out.truncate(at)?;
        *torn = None;
    }
    out.reserve(line.len() as u64)?;
    let mut done = 0;
    let failure = loop {
        if done == line.len() {
            return Ok(());
        }
        match out.write(&line[done..]) {
            Ok(0) => break io::Error::from(io::ErrorKind::WriteZero),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break e,
        }
    };
    if done == 0 {
        return Err(failure);
    }
    let start = match out.position() {
        Ok(end) => end.saturating_sub(done as u64),
        // A pipe has no offset, and a write under PIPE_BUF is never split.
        Err(_) => return Err(failure),
    };
    if let Err(cut) = out.truncate(start) {
        *torn = Some(start);
        return Err(io::Error::new(
            failure.kind(),
            format!("{failure} (the partial line is cut away before the next write: {cut})"),
        ));
    }
    Err(failure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("watchdog-jsonl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn appends_whole_lines() {
        let dir = temp_dir("append");
        let path = dir.join("out.jsonl");
        std::fs::write(&path, b"{\"old\":1}\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut sink = LineSink::append(&path).unwrap();
        sink.write_line(&serde_json::json!({"a": 1})).unwrap();
        sink.write_line(&serde_json::json!({"b": "x\ny"})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"old\":1}\n{\"a\":1}\n{\"b\":\"x\\ny\"}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_symlinks() {
        let dir = temp_dir("link");
        let target = dir.join("target");
        let link = dir.join("link");
        std::fs::write(&target, b"").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = LineSink::append(&link)
            .err()
            .expect("symlink must be refused");
        assert!(matches!(err, OpenError::Symlink { .. }), "{err}");
        assert!(err.is_usage());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Guards against appending to a file others can write (they could
    /// forge or erase lines): the message names the file and the fix.
    #[test]
    fn refuses_files_others_can_write() {
        let dir = temp_dir("mode");
        let path = dir.join("out.jsonl");
        std::fs::write(&path, b"").unwrap();
        for mode in [0o666, 0o620, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = LineSink::append(&path).err().expect("must be refused");
            let text = err.to_string();
            assert!(matches!(err, OpenError::Writable { .. }), "{text}");
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains("chmod go-w"), "{text}");
            assert!(err.is_usage());
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(LineSink::append(&path).is_ok());
        // A device is the system's: /dev/null is 0666 and fine to write.
        assert!(LineSink::append(Path::new("/dev/null")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fake disk: takes bytes until it is full, then fails with ENOSPC.
    struct Disk {
        data: Vec<u8>,
        room: usize,
        truncate_fails: bool,
    }

    impl Output for std::sync::Arc<std::sync::Mutex<Disk>> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut disk = self.lock().unwrap();
            let n = buf.len().min(disk.room.saturating_sub(disk.data.len()));
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            disk.data.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn position(&mut self) -> io::Result<u64> {
            Ok(self.lock().unwrap().data.len() as u64)
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            let mut disk = self.lock().unwrap();
            if disk.truncate_fails {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            disk.data.truncate(len as usize);
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn fake(room: usize) -> (LineSink, std::sync::Arc<std::sync::Mutex<Disk>>) {
        let disk = std::sync::Arc::new(std::sync::Mutex::new(Disk {
            data: Vec::new(),
            room,
            truncate_fails: false,
        }));
        // No path: a file sink would reopen its path after a failure.
        let sink = LineSink::new(Box::new(disk.clone()), None);
        (sink, disk)
    }

    fn lines(disk: &std::sync::Mutex<Disk>) -> Vec<serde_json::Value> {
        let data = disk.lock().unwrap().data.clone();
        let text = String::from_utf8(data).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "torn: {text:?}");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }

    /// Guards against a torn line on a full disk, with the next line glued
    /// on once space returns.
    #[test]
    fn a_short_write_is_rolled_back_and_the_loss_reported() {
        let (mut sink, disk) = fake(40);
        let line = serde_json::json!({"event": "exited", "comm": "true"});
        sink.write_line(&line).unwrap();
        assert!(sink.write_line(&line).is_err(), "only part of it fits");
        assert!(sink.write_line(&line).is_err(), "nothing fits");
        assert_eq!(sink.lost(), 2);
        assert!(
            sink.failing()
                .is_some_and(|e| e.contains("standard output"))
        );
        assert_eq!(lines(&disk).len(), 1, "the partial line was cut away");
        disk.lock().unwrap().room = 4096;
        sink.write_line(&serde_json::json!({"n": 4})).unwrap();
        let got = lines(&disk);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[1]["event"], "audit_lines_lost");
        assert_eq!(got[1]["count"], 2);
        assert!(humantime::parse_rfc3339(got[1]["since"].as_str().unwrap()).is_ok());
        assert!(humantime::parse_rfc3339(got[1]["ts"].as_str().unwrap()).is_ok());
        assert_eq!(got[2]["n"], 4);
        assert_eq!(sink.failing(), None);
        // A new episode is reported on its own.
        disk.lock().unwrap().room = 0;
        assert!(sink.write_line(&line).is_err());
        disk.lock().unwrap().room = 8192;
        sink.write_line(&line).unwrap();
        let got = lines(&disk);
        assert_eq!(got[3]["event"], "audit_lines_lost");
        assert_eq!(got[3]["count"], 1);
        assert_eq!(sink.lost(), 3);
    }

    /// A partial line that cannot be cut away at once is cut before
    /// anything else is written.
    #[test]
    fn a_torn_line_is_cut_before_the_next_write() {
        let (mut sink, disk) = fake(12);
        disk.lock().unwrap().truncate_fails = true;
        assert!(
            sink.write_line(&serde_json::json!({"long": "line"}))
                .is_err()
        );
        assert_eq!(disk.lock().unwrap().data.len(), 12, "torn for now");
        {
            let mut d = disk.lock().unwrap();
            d.truncate_fails = false;
            d.room = 4096;
        }
        sink.write_line(&serde_json::json!({"n": 2})).unwrap();
        let got = lines(&disk);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["event"], "audit_lines_lost");
        assert_eq!(got[1]["n"], 2);
    }

    /// A real file: a short write cut back leaves the file as it was.
    #[test]
    fn write_whole_cuts_a_file_back() {
        struct Short(FileOutput);
        impl Output for Short {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if buf.len() > 5 {
                    // The kernel takes part of the line, then the disk is full.
                    self.0.write(&buf[..5])
                } else {
                    Err(io::Error::from_raw_os_error(libc::ENOSPC))
                }
            }
            fn position(&mut self) -> io::Result<u64> {
                self.0.position()
            }
            fn truncate(&mut self, len: u64) -> io::Result<()> {
                self.0.truncate(len)
            }
            fn sync(&mut self) -> io::Result<()> {
                self.0.sync()
            }
        }
        let dir = temp_dir("short");
        let path = dir.join("out.jsonl");
        std::fs::write(&path, b"{\"old\":1}\n").unwrap();
        let file = OpenOptions::new().append(true).open(&path).unwrap();
        let mut out = Short(FileOutput::new(file));
        let err = write_whole(&mut out, &mut None, b"{\"comm\":\"true\"}\n").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"old\":1}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
