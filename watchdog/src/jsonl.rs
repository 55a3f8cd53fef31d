//! JSON Lines output: each line is serialized whole and handed to the
//! kernel in a single write, so concurrent writers and crashes never leave
//! half a line.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::{fd::AsFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::Serialize;

/// Where lines go.
pub struct LineSink {
    file: File,
    /// The path, for files (for messages and reopening).
    path: Option<PathBuf>,
    buf: Vec<u8>,
}

impl LineSink {
    /// Standard output.
    pub fn stdout() -> io::Result<Self> {
        let fd = io::stdout().as_fd().try_clone_to_owned()?;
        Ok(Self {
            file: File::from(fd),
            path: None,
            buf: Vec::with_capacity(512),
        })
    }

    /// Appends to a file, creating it (mode 0640) if needed. Opened with
    /// O_APPEND, so every write lands at the current end even when another
    /// process appends too, and with O_NOFOLLOW, so a symlink planted at the
    /// path is refused instead of followed.
    pub fn append(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Self {
            file,
            path: Some(path.to_owned()),
            buf: Vec::with_capacity(512),
        })
    }

    /// The file path, when writing to a file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Makes what was written durable (fdatasync).
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Writes `value` as one JSON line with one write(2).
    pub fn write_line<T: Serialize>(&mut self, value: &T) -> io::Result<()> {
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, value).map_err(io::Error::other)?;
        self.buf.push(b'\n');
        // A regular file or a pipe takes a line this size (well under
        // PIPE_BUF) whole; should the kernel ever accept less, write the
        // rest rather than drop it.
        let mut rest = &self.buf[..];
        while !rest.is_empty() {
            match self.file.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_whole_lines() {
        let dir = std::env::temp_dir().join(format!("watchdog-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.jsonl");
        std::fs::write(&path, b"{\"old\":1}\n").unwrap();
        let mut sink = LineSink::append(&path).unwrap();
        sink.write_line(&serde_json::json!({"a": 1})).unwrap();
        sink.write_line(&serde_json::json!({"b": "x\ny"})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"old\":1}\n{\"a\":1}\n{\"b\":\"x\\ny\"}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_symlinks() {
        let dir = std::env::temp_dir().join(format!("watchdog-jsonl-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target");
        let link = dir.join("link");
        std::fs::write(&target, b"").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = LineSink::append(&link)
            .err()
            .expect("symlink must be refused");
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
