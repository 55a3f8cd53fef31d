//! The status socket: `<state-dir>/status.sock`, mode 0600 (the daemon's
//! user alone). A client writes one line, `status`, and reads one JSON
//! document (a [`Snapshot`](crate::status::Snapshot)) until the end of the
//! stream.

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use super::{ObserveError, Telemetry};

/// A client that sends no request this long is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a request is worked on before the client gets an error.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients served at once; more are closed at once.
const CLIENTS: usize = 128;
/// The longest request line.
const REQUEST_MAX: u64 = 256;

/// Creates the socket with mode 0600 before it gets its name, so that it
/// is never reachable with wider permissions. A socket left by a killed
/// instance is replaced (the state directory's lock is held); anything
/// else at that name is refused.
pub(super) fn bind(
    state_dir: &Path,
) -> Result<(std::os::unix::net::UnixListener, PathBuf), ObserveError> {
    let path = super::socket_path(state_dir);
    let fail = |error: String| ObserveError::Socket {
        path: path.clone(),
        error,
    };
    // sun_path holds 108 bytes with the terminating NUL.
    if path.as_os_str().len() > 107 {
        return Err(fail(format!(
            "the path is {} bytes long, and a Unix socket's path is at most 107: use a shorter state-dir",
            path.as_os_str().len()
        )));
    }
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(&path)
                .map_err(|e| fail(format!("cannot remove the old one: {e}")))?;
        }
        Ok(_) => {
            return Err(fail(
                "something that is not a socket has that name; remove it".into(),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    // Made in the private runs/ directory (mode 0700), so that nobody can
    // connect before its mode is 0600, whatever the umask.
    let private = state_dir.join("runs");
    match std::fs::symlink_metadata(&private) {
        Ok(meta) if meta.is_dir() && meta.permissions().mode() & 0o077 == 0 => {}
        _ => {
            return Err(fail(format!(
                "{} is not a private directory (mode 0700) to create it in",
                private.display()
            )));
        }
    }
    let temporary = private.join(format!(".status.sock.{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener = std::os::unix::net::UnixListener::bind(&temporary)
        .map_err(|e| fail(format!("cannot bind it: {e}")))?;
    let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&temporary, &path))
        .and_then(|()| listener.set_nonblocking(true));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temporary);
        return Err(fail(e.to_string()));
    }
    Ok((listener, path))
}

pub(super) async fn serve(telemetry: Arc<Telemetry>, listener: std::os::unix::net::UnixListener) {
    let listener = match UnixListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the status socket");
            return;
        }
    };
    let clients = Arc::new(Semaphore::new(CLIENTS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Over the limit: closed at once rather than left waiting,
                // so that idle clients cannot hold up the others for long.
                let Ok(permit) = clients.clone().try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let telemetry = telemetry.clone();
                tokio::spawn(async move {
                    answer(&telemetry, stream).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "status socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(telemetry: &Telemetry, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, REQUEST_MAX));
    let request = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let reply = match request {
        Ok(Ok(_)) => tokio::time::timeout(ANSWER_TIMEOUT, respond(telemetry, line.trim()))
            .await
            .unwrap_or_else(|_| error("no answer within 10 s")),
        Ok(Err(e)) => error(&format!("cannot read the request: {e}")),
        Err(_) => error("no whole request line within 2 s"),
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let _ = write.write_all(reply.as_bytes()).await;
        let _ = write.shutdown().await;
    })
    .await;
}

async fn respond(telemetry: &Telemetry, request: &str) -> String {
    let mut words = request.split_whitespace();
    match (words.next(), words.next()) {
        (Some("status"), None) => {
            let snapshot = telemetry.current().await;
            serde_json::to_string(&snapshot).unwrap_or_else(|e| error(&e.to_string())) + "\n"
        }
        (Some("stall"), Some(ms)) => match ms.parse::<u64>() {
            Ok(ms) if telemetry.stall(Duration::from_millis(ms)) => "{\"stalling\":true}\n".into(),
            _ => error("stall is refused"),
        },
        _ => error(&format!(
            "unknown request {:?}: send \"status\"",
            request.chars().take(64).collect::<String>()
        )),
    }
}

fn error(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string() + "\n"
}
