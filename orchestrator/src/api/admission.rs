//! Checks that need the store: references to other objects on write, users of an object on
//! delete.

use axum::http::StatusCode;

use super::error::ApiError;
use crate::model::{FieldError, ScaleGroupSpec, Spec, VmSpec, VolumeSpec};
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

/// Nothing names `kind`/`name`: 409 naming a user otherwise, so a VM's image or volume cannot
/// vanish under it. (VMs, volumes and scale groups name other objects.)
pub async fn check_unused(store: &Store, kind: &str, name: &str) -> Result<(), ApiError> {
    let (vms, _) = store.list::<VmSpec>().await?;
    let (volumes, _) = store.list::<VolumeSpec>().await?;
    let (groups, _) = store.list::<ScaleGroupSpec>().await?;
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
