//! The HTTP JSON API: `/api/v1/{images,volumes,vms,workers,scalegroups}[/NAME]`,
//! `/api/v1/vms/NAME/agent` for a VM's guest agent, and the operator actions of [`actions`].

mod actions;
mod admission;
mod agent;
mod error;
mod resources;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;

pub use actions::{ScaleRequest, StartRequest};
pub use error::ApiError;
pub use resources::List;

use crate::model::{ImageSpec, ScaleGroupSpec, Spec, VmSpec, VolumeSpec, WorkerSpec};
use crate::store::Store;

/// Request bodies larger than this are refused (413): every object is far smaller, and etcd
/// refuses values over 1.5 MiB anyway.
pub const MAX_BODY: usize = 1 << 20;

pub fn router(store: Store) -> Router {
    Router::new()
        .merge(kind::<ImageSpec>())
        .merge(kind::<VolumeSpec>())
        .merge(kind::<VmSpec>())
        .merge(kind::<WorkerSpec>())
        .merge(kind::<ScaleGroupSpec>())
        .route("/api/v1/vms/{name}/agent", post(agent::forward))
        .route("/api/v1/vms/{name}/start", post(actions::start))
        .route("/api/v1/vms/{name}/stop", post(actions::stop))
        .route("/api/v1/workers/{name}/drain", post(actions::drain))
        .route("/api/v1/workers/{name}/uncordon", post(actions::uncordon))
        .route("/api/v1/workers/{name}/forget", post(actions::forget))
        .route("/api/v1/scalegroups/{name}/scale", post(actions::scale))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(store)
}

fn kind<S: Spec>() -> Router<Store> {
    use resources::{create, delete, get as get_one, list, replace};
    Router::new()
        .route(
            &format!("/api/v1/{}", S::PLURAL),
            get(list::<S>).post(create::<S>),
        )
        .route(
            &format!("/api/v1/{}/{{name}}", S::PLURAL),
            get(get_one::<S>).put(replace::<S>).delete(delete::<S>),
        )
}

/// 200 while etcd answers, 503 otherwise.
async fn healthz(
    axum::extract::State(store): axum::extract::State<Store>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let revision = store.revision().await?;
    Ok(axum::Json(
        serde_json::json!({"status": "ok", "revision": revision}),
    ))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such resource: {}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
