//! `POST /api/v1/vms/NAME/agent`: a request for a VM's guest agent, forwarded to the worker the
//! VM is placed on (its `spec.endpoint`), which asks the guest over vsock. The worker's answer
//! comes back as it is: the agent's response (200) or the worker's error.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::resources::path_name;
use crate::model::{VmSpec, WorkerSpec};
use crate::store::Store;

/// How long the worker (and the guest behind it) has to answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(40);

pub async fn forward(
    State(store): State<Store>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let name = path_name(path)?;
    let body = body.map_err(|e| ApiError::bad_request(e.to_string()))?;
    // Checked here, so that a malformed request never reaches a worker.
    serde_json::from_slice::<agent_proto::Request>(&body)
        .map_err(|e| ApiError::bad_request(format!("not a guest agent request: {e}")))?;
    let vm = store.get::<VmSpec>(&name).await?;
    let worker = vm.status.placement.ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!("vm {name} is not placed on a worker"),
        )
    })?;
    let endpoint = store
        .get::<WorkerSpec>(&worker)
        .await?
        .spec
        .endpoint
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "worker {worker} serves no guest agent requests (started without --listen)"
                ),
            )
        })?;
    let url = format!(
        "{}://{endpoint}/api/v1/vms/{name}/agent",
        crate::tls::scheme()
    );
    let (status, bytes) = crate::http::exchange(
        hyper::Method::POST,
        &url,
        Some(body.to_vec()),
        FORWARD_TIMEOUT,
    )
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("worker {worker} at {endpoint}: {e}"),
        )
    })?;
    Ok((
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(bytes),
    )
        .into_response())
}
