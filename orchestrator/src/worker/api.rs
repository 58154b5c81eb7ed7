//! What the worker serves over HTTP (`--listen`):
//! - `POST /api/v1/vms/NAME/agent`: requests for the guest agents of its VMs, which the control
//!   plane forwards (`lightbyte vm agent NAME ...`), with an agent request as JSON; the answer is
//!   the agent's response (200), or 404 (no such VM here), 502 (its agent did not answer);
//! - `GET /api/v1/moves/NAME/disks/I`: the disks of a VM moving away, to the target worker
//!   bearing the move's token (see [`super::moves`]);
//! - `POST /api/v1/proxy/apply` (a proxy configuration) and `GET /api/v1/proxy/status`: the
//!   proxy of host-placed load balancers (see [`super::host_proxy`]); a refused push is 409
//!   (stale) or 422 (invalid, or a port in use) and changes nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent_proto::Request;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::guest;
use super::host_proxy::{HostProxy, ProxyError};
use super::record::Layout;
use crate::api::ApiError;
use crate::auth::{Auth, Surface};
use crate::model::validate::dns_label;

/// How long a guest agent has to answer a forwarded request.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds `addr`; the address actually bound (port 0 picks one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

#[derive(Clone)]
pub struct ApiState {
    pub layout: Layout,
    pub proxy: Arc<HostProxy>,
}

/// Serves until `shutdown` is cancelled; `auth` says who may call it, over `tls` when given.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    auth: Auth,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    let guarded = Router::new()
        .route("/api/v1/vms/{name}/agent", post(agent))
        .route("/api/v1/proxy/apply", post(proxy_apply))
        .route("/api/v1/proxy/status", get(proxy_status));
    // A move's disks are served to whoever bears that move's own single-purpose token (the
    // target worker), which `moves::serve_disk` checks: not behind the role tokens.
    let app = crate::auth::guard(guarded, &auth, Surface::Worker)
        .route("/api/v1/moves/{name}/disks/{index}", get(disk))
        .layer(axum::middleware::from_fn(crate::api::require_json))
        .with_state(state);
    crate::serve::serve(
        listener,
        app,
        crate::serve::Limits::default(),
        tls,
        shutdown,
    )
    .await;
}

async fn proxy_apply(
    State(state): State<ApiState>,
    body: Result<Json<lb_config::ProxyConfig>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(config) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    config
        .validate()
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    match state.proxy.apply(config).await {
        Ok(revision) => Ok(Json(serde_json::json!({ "revision": revision }))),
        Err(ProxyError::Refused { kind, message }) => {
            let code = match kind {
                lb_config::control::ErrorKind::Stale => StatusCode::CONFLICT,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            Err(ApiError::new(code, message))
        }
        Err(e) => Err(ApiError::new(StatusCode::BAD_GATEWAY, e.to_string())),
    }
}

async fn proxy_status(
    State(state): State<ApiState>,
) -> Result<Json<lb_config::ProxyStatus>, ApiError> {
    state
        .proxy
        .status()
        .await
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))
}

async fn disk(
    State(ApiState { layout, .. }): State<ApiState>,
    Path((name, index)): Path<(String, usize)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    dns_label("name", &name).map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, e))?;
    Ok(super::moves::serve_disk(&layout, &name, index, &headers).await)
}

async fn agent(
    State(ApiState { layout, .. }): State<ApiState>,
    Path(name): Path<String>,
    Json(request): Json<Request>,
) -> Result<Json<agent_proto::Response>, ApiError> {
    dns_label("name", &name).map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, e))?;
    if !layout.record(&name).exists() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("vm {name} does not run on this worker"),
        ));
    }
    guest::call(layout.vsock(&name), request, AGENT_TIMEOUT)
        .await
        .map(Json)
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("vm {name}: guest agent: {e}"),
            )
        })
}
