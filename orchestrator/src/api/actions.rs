//! Operator actions that are more than a spec edit: each checks that it makes sense now (409
//! when it does not, saying why) and writes in read-modify-write transactions.
//!
//! - `POST /api/v1/workers/NAME/drain|uncordon|forget`
//! - `POST /api/v1/vms/NAME/stop`, `POST /api/v1/vms/NAME/start` with `{"fresh_disks": true}`
//!   to accept that a VM's disks were lost with a forgotten worker
//! - `POST /api/v1/scalegroups/NAME/scale` with `{"replicas": N}`

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::resources::path_name;
use crate::model::{
    Power, ScaleGroup, ScaleGroupSpec, Vm, VmSpec, VmState, VolumeSpec, Worker, WorkerSpec,
};
use crate::store::{keys, Store, StoreError};

/// `{"replicas": N}`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    pub replicas: u32,
}

/// `{"fresh_disks": true}` (the body may be empty)
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    #[serde(default)]
    pub fresh_disks: bool,
}

fn conflict(message: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, message)
}

/// An optional JSON body: empty means the type's default.
fn body<T: DeserializeOwned + Default>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

pub async fn drain(
    State(store): State<Store>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Worker>, ApiError> {
    let name = path_name(path)?;
    set_worker(&store, &name, |s| s.drain = true).await
}

pub async fn uncordon(
    State(store): State<Store>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Worker>, ApiError> {
    let name = path_name(path)?;
    set_worker(&store, &name, |s| s.drain = false).await
}

/// Gives up a worker that is gone. Refused while its agent heartbeats: a live worker is drained,
/// never forgotten (its VMs would run twice).
pub async fn forget(
    State(store): State<Store>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Worker>, ApiError> {
    let name = path_name(path)?;
    let worker = store.get::<WorkerSpec>(&name).await?;
    if !worker.spec.forgotten && store.get_raw(&keys::heartbeat(&name)).await?.is_some() {
        return Err(conflict(format!(
            "worker {name} is alive (its agent heartbeats): drain it instead; forget is for workers that are gone"
        )));
    }
    set_worker(&store, &name, |s| s.forgotten = true).await
}

async fn set_worker(
    store: &Store,
    name: &str,
    change: impl Fn(&mut WorkerSpec),
) -> Result<Json<Worker>, ApiError> {
    let w = store
        .update::<WorkerSpec, _>(name, |o| {
            change(&mut o.spec);
            Ok(())
        })
        .await?;
    Ok(Json(w))
}

pub async fn stop(
    State(store): State<Store>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Vm>, ApiError> {
    let name = path_name(path)?;
    let vm = store
        .update::<VmSpec, _>(&name, |o| {
            o.spec.power = Power::Stopped;
            Ok(())
        })
        .await?;
    Ok(Json(vm))
}

pub async fn start(
    State(store): State<Store>,
    path: Result<Path<String>, PathRejection>,
    req: Result<Bytes, BytesRejection>,
) -> Result<Json<Vm>, ApiError> {
    let name = path_name(path)?;
    let req: StartRequest = body(req)?;
    let vm = store.get::<VmSpec>(&name).await?;
    let waits_for_disks = vm.status.state == VmState::Lost && vm.status.placement.is_none();
    if req.fresh_disks {
        if !waits_for_disks {
            return Err(conflict(format!(
                "vm {name} still has its disks ({}): fresh disks are only for a VM whose worker was forgotten",
                match &vm.status.placement {
                    Some(w) => format!("on worker {w}"),
                    None => "it was never placed".into(),
                }
            )));
        }
        // The volumes first: the scheduler does not place a VM whose volume is marked lost.
        for v in &vm.spec.volumes {
            let r = store
                .update::<VolumeSpec, _>(v, |o| {
                    o.status.lost = None;
                    Ok(())
                })
                .await;
            match r {
                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    } else if waits_for_disks {
        return Err(conflict(format!(
            "vm {name} lost its disks with a forgotten worker ({}); `lightbyte vm start {name} --fresh-disks` starts it on empty ones",
            vm.status.message.as_deref().unwrap_or("no message")
        )));
    }
    let uid = vm.metadata.uid.clone();
    let vm = store
        .update::<VmSpec, _>(&name, |o| {
            if o.metadata.uid != uid {
                return Err(StoreError::Conflict {
                    kind: "vm",
                    name: name.clone(),
                    expected: vm.metadata.resource_version,
                    actual: o.metadata.resource_version,
                });
            }
            o.spec.power = Power::Running;
            if req.fresh_disks {
                if o.status.state == VmState::Lost && o.status.placement.is_none() {
                    o.status.state = VmState::Pending;
                    o.status.lost_since = None;
                    o.status.message =
                        Some("starting on fresh disks: the operator accepted the loss".into());
                }
            } else if o.status.placement.is_some()
                && matches!(o.status.state, VmState::Stopped | VmState::Failed)
            {
                // Its worker starts it again (a Failed VM with a fresh restart budget).
                o.status.state = VmState::Scheduled;
                o.status.message = None;
            }
            Ok(())
        })
        .await?;
    Ok(Json(vm))
}

pub async fn scale(
    State(store): State<Store>,
    path: Result<Path<String>, PathRejection>,
    req: Result<Bytes, BytesRejection>,
) -> Result<Json<ScaleGroup>, ApiError> {
    let name = path_name(path)?;
    let body = req.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let req: ScaleRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let group = store
        .update::<ScaleGroupSpec, _>(&name, |o| {
            o.spec.replicas = req.replicas;
            Ok(())
        })
        .await?;
    Ok(Json(group))
}
