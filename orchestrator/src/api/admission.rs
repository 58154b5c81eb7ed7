//! Checks that need the store: references to other objects on write, users of an object on
//! delete.

use axum::http::StatusCode;

use super::error::ApiError;
use crate::model::{FieldError, Spec, VmSpec, VolumeSpec};
use crate::store::Store;

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

/// Nothing names `kind`/`name`: 409 naming a user otherwise, so a VM's image or volume cannot
/// vanish under it. (Only VMs and volumes name other objects.)
pub async fn check_unused(store: &Store, kind: &str, name: &str) -> Result<(), ApiError> {
    let (vms, _) = store.list::<VmSpec>().await?;
    let (volumes, _) = store.list::<VolumeSpec>().await?;
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
