//! The HTTP listener: `GET /healthz` and `GET /metrics` (HTTP/1.1).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Notify};

use super::{Telemetry, lock, metrics};

/// Connections open at once. One more closes the oldest that is not being
/// answered (idle, or still sending its request), so that clients who
/// connect and send nothing cannot keep a probe out; when every one is
/// being answered, the new one is closed.
const CONNECTIONS: usize = 512;
/// A client that has not sent its request headers by then is dropped (an
/// idle keep-alive connection too).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// No connection lives longer than this.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

pub(super) async fn serve(telemetry: Arc<Telemetry>, listener: std::net::TcpListener) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve /healthz and /metrics");
            return;
        }
    };
    let connections = Arc::new(Mutex::new(Connections::default()));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::debug!(error = %e, "HTTP listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((id, slot)) = lock(&connections).open() else {
            // Every connection is being answered: closed at once rather
            // than left in the backlog.
            drop(stream);
            continue;
        };
        let telemetry = telemetry.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            let busy = slot.busy.clone();
            let service = service_fn(move |request| {
                let telemetry = telemetry.clone();
                let busy = Busy::new(busy.clone());
                async move {
                    let response = route(&telemetry, &request).await;
                    drop(busy);
                    Ok::<_, Infallible>(response)
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            // Told to make room first: an evicted connection must not
            // start on a request in the same turn.
            tokio::select! {
                biased;
                () = slot.evicted.notified() => {}
                _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
            }
            lock(&connections).close(id);
        });
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, Slot>,
}

#[derive(Clone, Default)]
struct Slot {
    /// A request is being answered.
    busy: Arc<AtomicBool>,
    /// Told when the connection must close to make room.
    evicted: Arc<Notify>,
}

impl Connections {
    /// A slot for a new connection: a free one, or the oldest that is not
    /// being answered, closed; `None` when every one is being answered.
    fn open(&mut self) -> Option<(u64, Slot)> {
        if self.open.len() >= CONNECTIONS {
            let oldest = self
                .open
                .iter()
                .find(|(_, slot)| !slot.busy.load(Ordering::Acquire))
                .map(|(&id, _)| id)?;
            if let Some(slot) = self.open.remove(&oldest) {
                slot.evicted.notify_one();
            }
        }
        let id = self.next;
        self.next += 1;
        let slot = Slot::default();
        self.open.insert(id, slot.clone());
        Some((id, slot))
    }

    fn close(&mut self, id: u64) {
        self.open.remove(&id);
    }
}

/// Marks its connection busy while it lives.
struct Busy(Arc<AtomicBool>);

impl Busy {
    fn new(flag: Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Release);
        Self(flag)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

async fn route(telemetry: &Telemetry, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if !matches!(path, "/healthz" | "/metrics") {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the paths are /healthz and /metrics\n",
        );
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let mut response = if path == "/healthz" {
        healthz(telemetry)
    } else {
        let snapshot = telemetry.current().await;
        let body = metrics::encode(&snapshot, telemetry);
        let accept = request
            .headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        let (body, content_type) = if metrics::wants_openmetrics(accept) {
            (body, metrics::CONTENT_TYPE)
        } else {
            (metrics::to_classic(&body), metrics::CLASSIC_CONTENT_TYPE)
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    };
    if *request.method() == Method::HEAD {
        let length = http_body_util::BodyExt::collect(std::mem::take(response.body_mut()))
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0);
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    response
}

/// 200 while the loop turns and the sensor works, 503 otherwise; the body
/// says why either way. Never waits for the loop.
fn healthz(telemetry: &Telemetry) -> Response<Full<Bytes>> {
    let snapshot = telemetry.last();
    let services: Vec<serde_json::Value> = snapshot
        .services
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "kind": s.kind,
                "state": s.state,
                "pid": s.pid,
            })
        })
        .collect();
    let health = &snapshot.health;
    let body = serde_json::json!({
        "status": match (health.ok, health.starting) {
            (false, _) => "unhealthy",
            (true, true) => "starting",
            (true, false) => "ok",
        },
        "problem": health.problem,
        "heartbeat_age_ms": health.heartbeat_age_ms,
        "threshold_ms": health.threshold_ms,
        "loop_lag_us": health.loop_lag_us,
        "loop_lag_max_us": health.loop_lag_max_us,
        "sensor": snapshot.sensor,
        "lost_events": snapshot.lost_events,
        "unconfirmed_crossings": snapshot.unconfirmed_crossings,
        "services": services,
    });
    let status = if health.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full table makes room by closing its oldest idle connection, and
    /// never one being answered.
    #[test]
    fn the_oldest_idle_connection_makes_room() {
        let mut connections = Connections::default();
        let slots: Vec<(u64, Slot)> = (0..CONNECTIONS)
            .map(|_| connections.open().unwrap_or_default())
            .collect();
        // The two oldest are being answered; the third is idle.
        slots[0].1.busy.store(true, Ordering::Release);
        slots[1].1.busy.store(true, Ordering::Release);
        let (id, _) = connections.open().unwrap_or_default();
        assert_eq!(id, CONNECTIONS as u64);
        assert_eq!(connections.open.len(), CONNECTIONS);
        assert!(!connections.open.contains_key(&slots[2].0));
        assert!(connections.open.contains_key(&slots[0].0));
        // Told to close: its notification is waiting for it.
        let told = slots[2].1.evicted.notified();
        tokio::pin!(told);
        assert!(futures_ready(told.as_mut()));
        assert!(!futures_ready(slots[3].1.evicted.notified()));
        // Every one busy: the newcomer is refused.
        for slot in connections.open.values() {
            slot.busy.store(true, Ordering::Release);
        }
        assert!(connections.open().is_none());
        connections.close(slots[0].0);
        assert!(connections.open().is_some());
    }

    /// Whether a future is ready on its first poll.
    fn futures_ready<F: std::future::Future>(future: F) -> bool {
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        let mut future = std::pin::pin!(future);
        future.as_mut().poll(&mut context).is_ready()
    }
}
