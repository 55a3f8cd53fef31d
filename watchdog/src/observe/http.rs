//! The HTTP listener: `GET /healthz` and `GET /metrics` (HTTP/1.1).

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use super::{Telemetry, metrics};

/// Connections served at once; more are closed at once.
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
    let connections = Arc::new(Semaphore::new(CONNECTIONS));
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
        // Over the limit: closed at once rather than left in the backlog.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let telemetry = telemetry.clone();
                async move { Ok::<_, Infallible>(route(&telemetry, &request).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(permit);
        });
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
        let mut response = Response::new(Full::new(Bytes::from(body)));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        );
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
        "status": if health.ok { "ok" } else { "unhealthy" },
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
