//! Checks that need the store: references to other objects on write, users of an object on
//! delete.

use axum::http::StatusCode;

use super::error::ApiError;
use super::Images;
use crate::images::Digest;
use crate::model::{
    FieldError, ImageSpec, LoadBalancerSpec, ScaleGroupSpec, Spec, VmSpec, VolumeSpec, WorkerSpec,
};
use crate::store::{Store, StoreError};

/// Rules of one kind that need more than the spec: an image's host paths and blobs.
/// Fields a PUT may not change: a Worker's `forgotten` flag is set only by the `forget` action
/// (which first checks that the worker stopped heartbeating: forgetting a live worker would run
/// its VMs twice) and cleared only by the worker itself.
pub fn check_replace<S: Spec>(stored: &S, new: &S) -> Result<(), StoreError> {
    let any = |s: &S| {
        (s as &dyn std::any::Any)
            .downcast_ref::<WorkerSpec>()
            .map(|w| w.forgotten)
    };
    match (any(stored), any(new)) {
        (Some(was), Some(now)) if was != now => Err(StoreError::Invalid(FieldError::new(
            "spec.forgotten",
            "cannot be changed with a PUT: `lightbyte worker forget NAME` (POST \
             /api/v1/workers/NAME/forget) sets it, the worker clears it",
        ))),
        _ => Ok(()),
    }
}

pub fn check_kind_rules<S: Spec>(images: &Images, spec: &S) -> Result<(), ApiError> {
    match (spec as &dyn std::any::Any).downcast_ref::<ImageSpec>() {
        Some(image) => check_image(images, image),
        None => Ok(()),
    }
}

/// An image names host paths only when the server allows them (a path is any file of every
/// worker, `/etc/shadow` included), and blobs only that the store has, in the format stated.
fn check_image(images: &Images, spec: &ImageSpec) -> Result<(), ApiError> {
    let unprocessable = |field: &str, why: String| {
        ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            FieldError::new(field, why),
        )
    };
    if !images.allow_host_path {
        if let Some((field, path)) = spec.host_paths().first() {
            return Err(unprocessable(
                field,
                format!(
                    "{path:?}: host paths are refused by this server; push the file with \
                     `lightbyte image push` (or start the server with --allow-host-path)"
                ),
            ));
        }
    }
    let blobs = [
        ("spec.digest", spec.digest.as_deref()),
        ("spec.kernel", spec.kernel.as_deref()),
        ("spec.initramfs", spec.initramfs.as_deref()),
    ];
    for (field, value) in blobs {
        let Some(d) = value.filter(|v| Digest::looks_like(v)) else {
            continue;
        };
        let d: Digest = d.parse().map_err(|e| unprocessable(field, e))?;
        let Some(store) = &images.blobs else {
            return Err(unprocessable(field, "this server keeps no images".into()));
        };
        if store.size(&d).is_none() {
            return Err(unprocessable(
                field,
                format!("no blob {d} in the image store: push it first"),
            ));
        }
        if field == "spec.digest" {
            let head = store
                .head(&d, 4)
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            if let Some(why) = crate::images::format_mismatch(spec.format, &head) {
                return Err(unprocessable(
                    "spec.format",
                    format!("stated {} but blob {d} {why}", spec.format.as_str()),
                ));
            }
        }
    }
    Ok(())
}

/// Every object the spec names exists: 422 naming the field otherwise.
pub async fn check_references<S: Spec>(store: &Store, spec: &S) -> Result<(), ApiError> {
    for r in spec.references() {
        if !store.exists(r.kind, &r.name).await? {
            let e = FieldError::new(r.field, format!("{} {:?} not found", r.kind, r.name));
            return Err(ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, e));
        }
    }
    Ok(())
}

/// No other object of the kind makes the spec's exclusive references (two VMs writing one volume
/// would corrupt it): 409 naming the other user.
pub async fn check_exclusive<S: Spec>(store: &Store, name: &str, spec: &S) -> Result<(), ApiError> {
    let mine = spec.exclusive_references();
    if mine.is_empty() {
        return Ok(());
    }
    let (others, _) = store.list::<S>().await?;
    for other in others.iter().filter(|o| o.name() != name) {
        let theirs = other.spec.exclusive_references();
        if let Some(r) = mine
            .iter()
            .find(|r| theirs.iter().any(|t| t.kind == r.kind && t.name == r.name))
        {
            let e = FieldError::new(
                r.field.clone(),
                format!(
                    "{} {:?} is already used by {} {:?}",
                    r.kind,
                    r.name,
                    S::KIND,
                    other.name()
                ),
            );
            return Err(ApiError::field(StatusCode::CONFLICT, e));
        }
    }
    Ok(())
}

/// No VM is placed on worker `name`: deleting its record would leave them Lost (409 naming
/// them; `force=true` deletes all the same, for a worker that is gone for good).
pub async fn check_worker_empty(store: &Store, name: &str) -> Result<(), ApiError> {
    let (vms, _) = store.list::<VmSpec>().await?;
    let held: Vec<&str> = vms
        .iter()
        .filter(|vm| vm.status.placement.as_deref() == Some(name))
        .map(|vm| vm.name())
        .collect();
    if held.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "worker {name:?} still holds VMs {}: drain it (`lightbyte worker drain`), forget it \
             (`worker forget`) if it is gone, or delete with force=true",
            held.join(", ")
        ),
    ))
}

/// Nothing names `kind`/`name`: 409 naming a user otherwise, so a VM's image or volume cannot
/// vanish under it. (VMs, volumes, scale groups and load balancers name other objects.)
pub async fn check_unused(store: &Store, kind: &str, name: &str) -> Result<(), ApiError> {
    let (vms, _) = store.list::<VmSpec>().await?;
    let (volumes, _) = store.list::<VolumeSpec>().await?;
    let (groups, _) = store.list::<ScaleGroupSpec>().await?;
    let (lbs, _) = store.list::<LoadBalancerSpec>().await?;
    let users = vms
        .iter()
        .filter(|o| names(&o.spec, kind, name))
        .map(|o| format!("vm {:?}", o.name()))
        .chain(
            volumes
                .iter()
                .filter(|o| names(&o.spec, kind, name))
                .map(|o| format!("volume {:?}", o.name())),
        )
        .chain(
            groups
                .iter()
                .filter(|o| names(&o.spec, kind, name))
                .map(|o| format!("scale group {:?}", o.name())),
        )
        .chain(
            lbs.iter()
                .filter(|o| names(&o.spec, kind, name))
                .map(|o| format!("load balancer {:?}", o.name())),
        )
        .collect::<Vec<_>>();
    if users.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        format!("{kind} {name:?} is in use by {}", users.join(", ")),
    ))
}

fn names<S: Spec>(spec: &S, kind: &str, name: &str) -> bool {
    spec.references()
        .iter()
        .any(|r| r.kind == kind && r.name == name)
}
