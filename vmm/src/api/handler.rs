//! One request, start to end: route, content type, body (bounded in size and time), parsing,
//! then the [`VmControl`] call, which runs on tokio's blocking pool because the VMM's calls block
//! (a boot builds the VM, a shutdown waits for the guest) and must not stall other connections.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde::Serialize;

use vmm_api::routes::{self, Action, Lookup};
use vmm_api::types::{Ping, API_VERSION};

use super::body::{self, error_json};
use super::error::ApiError;
use crate::config::MAX_CPUS;
use crate::control::{ControlError, VmControl};

/// What every request of one server shares.
pub(crate) struct Shared {
    /// The VMM.
    pub control: Arc<dyn VmControl>,
    /// Largest request body accepted.
    pub max_body: usize,
    /// Time a client has to send a request's body once its headers are in.
    pub body_timeout: Duration,
}

/// The response type of the server.
pub(crate) type Reply = Response<Full<Bytes>>;

/// Answers one request; errors become JSON error responses, so this never fails.
pub(crate) async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Reply, Infallible> {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let reply = match serve(req, &shared).await {
        Ok(reply) => reply,
        Err(e) => error_reply(&e),
    };
    let status = reply.status();
    let us = started.elapsed().as_micros();
    if status.is_server_error() {
        tracing::warn!(us, "API {method} {path}: {status}");
    } else {
        tracing::debug!(us, "API {method} {path}: {status}");
    }
    Ok(reply)
}

async fn serve(req: Request<Incoming>, shared: &Shared) -> Result<Reply, ApiError> {
    let action = match routes::lookup(req.method(), req.uri().path()) {
        Lookup::Found(action) => action,
        Lookup::WrongMethod(allowed) => return Ok(wrong_method(req.method(), &allowed)),
        Lookup::NotFound => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no endpoint {}", req.uri().path()),
            ))
        }
    };
    check_content_type(req.headers())?;
    let bytes = read_body(req.into_body(), shared).await?;
    match action {
        Action::Ping => {
            body::parse_no_body(&bytes)?;
            json(&ping())
        }
        Action::Create => {
            let config = body::parse_create(&bytes)?;
            call(shared, move |vmm| {
                // The host's own vCPU limit is checked again at boot, when KVM is open.
                crate::config::validate(&config, u32::from(MAX_CPUS))
                    .map_err(|e| ControlError::BadRequest(e.to_string()))?;
                vmm.create(config)
            })
            .await?;
            Ok(no_content())
        }
        Action::Boot => no_body_action(&bytes, shared, |vmm| vmm.boot()).await,
        Action::Shutdown => {
            let b = body::parse_shutdown(&bytes)?;
            call(shared, move |vmm| vmm.shutdown(b.timeout_ms)).await?;
            Ok(no_content())
        }
        Action::Reboot => no_body_action(&bytes, shared, |vmm| vmm.reboot()).await,
        Action::Pause => no_body_action(&bytes, shared, |vmm| vmm.pause()).await,
        Action::Resume => no_body_action(&bytes, shared, |vmm| vmm.resume()).await,
        Action::Info => {
            body::parse_no_body(&bytes)?;
            let info = call(shared, |vmm| Ok(vmm.info())).await?;
            json(&info)
        }
        Action::Snapshot => {
            let b = body::parse_snapshot(&bytes)?;
            call(shared, move |vmm| {
                vmm.snapshot(b.destination_dir, b.snapshot_type)
            })
            .await?;
            Ok(no_content())
        }
        Action::Restore => {
            let b = body::parse_restore(&bytes)?;
            call(shared, move |vmm| vmm.restore(b.source_dir, b.resume)).await?;
            Ok(no_content())
        }
    }
}

/// This process's answer to a ping.
pub(crate) fn ping() -> Ping {
    Ping {
        version: env!("CARGO_PKG_VERSION").to_string(),
        api: API_VERSION.to_string(),
        pid: std::process::id(),
    }
}

async fn no_body_action(
    bytes: &[u8],
    shared: &Shared,
    f: impl FnOnce(&dyn VmControl) -> Result<(), ControlError> + Send + 'static,
) -> Result<Reply, ApiError> {
    body::parse_no_body(bytes)?;
    call(shared, f).await?;
    Ok(no_content())
}

/// Runs a VMM call on the blocking pool. A panic in the VMM becomes a 500 rather than taking
/// the server down.
async fn call<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&dyn VmControl) -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ApiError> {
    let control = Arc::clone(&shared.control);
    match tokio::task::spawn_blocking(move || f(&*control)).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            if e.is_panic() {
                "the VMM failed while handling the request (panic)"
            } else {
                "the request was cancelled: the API server is stopping"
            },
        )),
    }
}

/// 415 for a declared body type other than JSON. No Content-Type is fine: curl and most
/// clients send none for empty bodies.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(());
    };
    let is_json = value.to_str().is_ok_and(|v| {
        let media = v.split(';').next().unwrap_or_default().trim();
        media.eq_ignore_ascii_case("application/json")
    });
    if is_json {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "Content-Type {:?} is not supported: send application/json",
            String::from_utf8_lossy(value.as_bytes())
        ),
    ))
}

/// Reads the body: at most `max_body` bytes (a larger declared length is refused before a byte
/// is read; a larger chunked body when the limit is crossed), within `body_timeout`.
async fn read_body(body: Incoming, shared: &Shared) -> Result<Bytes, ApiError> {
    let max = shared.max_body;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {max} bytes"),
        )
        .closing()
    };
    if body.size_hint().lower() > max as u64 {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(shared.body_timeout, Limited::new(body, max).collect());
    match collected.await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("reading the request body: {e}"),
        )
        .closing()),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} ms",
                shared.body_timeout.as_millis()
            ),
        )
        .closing()),
    }
}

fn reply(status: StatusCode, body: Vec<u8>) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn no_content() -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn json<T: Serialize>(value: &T) -> Result<Reply, ApiError> {
    let body = serde_json::to_vec(value).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the response: {e}"),
        )
    })?;
    Ok(reply(StatusCode::OK, body))
}

fn error_reply(e: &ApiError) -> Reply {
    let mut r = reply(e.status, error_json(&e.message));
    if e.close {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn wrong_method(method: &hyper::Method, allowed: &[hyper::Method]) -> Reply {
    let list = allowed
        .iter()
        .map(hyper::Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let mut r = error_reply(&ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed here: use {list}"),
    ));
    if let Ok(v) = HeaderValue::from_str(&list) {
        r.headers_mut().insert(ALLOW, v);
    }
    r
}
