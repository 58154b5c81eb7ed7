//! The HTTP JSON API: `/api/v1/{images,volumes,vms,workers,scalegroups,loadbalancers}[/NAME]`,
//! `/api/v1/vms/NAME/agent` for a VM's guest agent, the operator actions of [`actions`], and the
//! image store's blobs (`/api/v1/blobs/DIGEST`).

mod actions;
mod admission;
mod agent;
mod blobs;
mod error;
mod guard;
mod paging;
mod resources;

use std::sync::Arc;

use axum::extract::FromRef;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;

pub use actions::{ScaleRequest, StartRequest};
pub use error::ApiError;
pub use guard::require_json;
pub use resources::List;

use crate::images::store::BlobStore;
use crate::model::{
    ImageSpec, LoadBalancerSpec, ScaleGroupSpec, Spec, VmSpec, VolumeSpec, WorkerSpec,
};
use crate::store::Store;

/// What the API serves from.
#[derive(Clone)]
pub struct Api {
    pub store: Store,
    pub images: Images,
}

/// The image store, and what images may name.
#[derive(Clone, Default)]
pub struct Images {
    /// Blobs pushed with `lightbyte image push`; none: this server keeps no images.
    pub blobs: Option<Arc<BlobStore>>,
    /// Images may name files on the workers by path (trusted operators only: any file of
    /// every worker can be made a guest's disk).
    pub allow_host_path: bool,
}

impl FromRef<Api> for Store {
    fn from_ref(api: &Api) -> Store {
        api.store.clone()
    }
}

impl FromRef<Api> for Images {
    fn from_ref(api: &Api) -> Images {
        api.images.clone()
    }
}

/// Request bodies larger than this are refused (413): every object is far smaller, and etcd
/// refuses values over 1.5 MiB anyway.
pub const MAX_BODY: usize = 1 << 20;

pub fn router(api: Api) -> Router {
    // Blobs stream in whatever their size: no body limit on that route.
    let blob_routes = Router::new()
        .route(
            "/api/v1/blobs/{digest}",
            get(blobs::get).head(blobs::head).put(blobs::put),
        )
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .merge(kind::<ImageSpec>())
        .merge(kind::<VolumeSpec>())
        .merge(kind::<VmSpec>())
        .merge(kind::<WorkerSpec>())
        .merge(kind::<ScaleGroupSpec>())
        .merge(kind::<LoadBalancerSpec>())
        .route("/api/v1/vms/{name}/agent", post(agent::forward))
        .route("/api/v1/vms/{name}/start", post(actions::start))
        .route("/api/v1/vms/{name}/stop", post(actions::stop))
        .route("/api/v1/workers/{name}/drain", post(actions::drain))
        .route("/api/v1/workers/{name}/uncordon", post(actions::uncordon))
        .route("/api/v1/workers/{name}/forget", post(actions::forget))
        .route("/api/v1/scalegroups/{name}/scale", post(actions::scale))
        .route("/healthz", get(healthz))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(guard::require_json))
        .merge(blob_routes)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(api)
}

fn kind<S: Spec>() -> Router<Api> {
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
