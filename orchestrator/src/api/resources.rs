//! The CRUD handlers, one generic set for every kind.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use super::admission::{
    check_exclusive, check_kind_rules, check_references, check_replace, check_unused,
    check_worker_empty,
};
use super::error::ApiError;
use super::paging::{self, ListQuery};
use super::Images;
use crate::model::{validate, Object, ObjectInput, Spec, WorkerSpec};
use crate::store::Store;

/// `GET /api/v1/<kind>`: every object (or a page of them, see [`super::paging`]) and the
/// revision they were read at.
#[derive(Debug, Serialize)]
#[serde(bound = "")]
pub struct List<S: Spec> {
    pub items: Vec<Object<S>>,
    pub resource_version: i64,
    /// The next page's token, when more follow.
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

pub async fn list<S: Spec>(
    State(store): State<Store>,
    RawQuery(query): RawQuery,
) -> Result<Json<List<S>>, ApiError> {
    let (limit, from) = match paging::parse(query.as_deref())? {
        ListQuery::All => {
            let (items, resource_version) = store.list::<S>().await?;
            return Ok(Json(List {
                items,
                resource_version,
                next: None,
            }));
        }
        ListQuery::Page { limit, from } => (limit, from),
    };
    let (after, revision) = match &from {
        Some(c) => {
            // A token from another cluster or a forged one: refused, not read "in the future".
            if c.revision > store.revision().await? {
                return Err(ApiError::bad_request(
                    "query parameter continue: not a token this server gave out",
                ));
            }
            (Some(c.after.as_str()), c.revision)
        }
        None => (None, 0),
    };
    let page = store.list_page::<S>(after, limit, revision).await?;
    let next = match page.objects.last() {
        Some(last) if page.more => Some(paging::token(page.revision, last.name())),
        _ => None,
    };
    Ok(Json(List {
        items: page.objects,
        resource_version: page.revision,
        next,
    }))
}

pub async fn get<S: Spec>(
    State(store): State<Store>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Object<S>>, ApiError> {
    let name = path_name(path)?;
    Ok(Json(store.get::<S>(&name).await?))
}

/// `POST /api/v1/<kind>`: 201 with the stored object.
pub async fn create<S: Spec>(
    State(store): State<Store>,
    State(images): State<Images>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Object<S>>), ApiError> {
    let input = parse::<S>(body)?;
    let obj = Object {
        metadata: crate::model::Metadata {
            name: input.metadata.name,
            ..Default::default()
        },
        spec: input.spec,
        status: S::Status::default(),
    };
    obj.validate()
        .map_err(|e| ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    check_kind_rules(&images, &obj.spec)?;
    check_references(&store, &obj.spec).await?;
    check_exclusive(&store, obj.name(), &obj.spec).await?;
    let created = store.create(obj).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// `PUT /api/v1/<kind>/<name>`: replaces the spec if `metadata.resource_version` is still the
/// object's (409 otherwise). The status is the controllers' and is kept.
pub async fn replace<S: Spec>(
    State(store): State<Store>,
    State(images): State<Images>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Object<S>>, ApiError> {
    let name = path_name(path)?;
    let input = parse::<S>(body)?;
    if input.metadata.name != name {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            validate::FieldError::new(
                "metadata.name",
                format!(
                    "{:?} does not match the name in the path {name:?}",
                    input.metadata.name
                ),
            ),
        ));
    }
    let expected = input.metadata.resource_version;
    if expected <= 0 {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            validate::FieldError::new(
                "metadata.resource_version",
                "is required: send back the resource_version of the object you read",
            ),
        ));
    }
    input
        .spec
        .validate()
        .map_err(|e| ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    check_kind_rules(&images, &input.spec)?;
    check_references(&store, &input.spec).await?;
    check_exclusive(&store, &name, &input.spec).await?;
    let updated = store
        .update_at::<S, _>(&name, expected, |o| {
            check_replace(&o.spec, &input.spec)?;
            o.spec = input.spec.clone();
            Ok(())
        })
        .await?;
    Ok(Json(updated))
}

/// `DELETE /api/v1/<kind>/<name>[?resource_version=N]`: the deleted object; 409 while another
/// object names it or when it changed since version N.
pub async fn delete<S: Spec>(
    State(store): State<Store>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<Object<S>>, ApiError> {
    let name = path_name(path)?;
    let (expected, force) = parse_delete_query(query.as_deref())?;
    // Fail with 404 before looking for users of something that does not exist.
    store.get::<S>(&name).await?;
    check_unused(&store, S::KIND, &name).await?;
    if S::KIND == WorkerSpec::KIND && !force {
        check_worker_empty(&store, &name).await?;
    }
    Ok(Json(store.delete::<S>(&name, expected).await?))
}

/// The object name from the URL; 400 when it cannot be a name.
pub(crate) fn path_name(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(name) = path.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    validate::dns_label("name", &name).map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, e))?;
    Ok(name)
}

/// The body as an object of kind `S`; 400 naming the JSON path of the first problem.
fn parse<S: Spec>(body: Result<Bytes, BytesRejection>) -> Result<ObjectInput<S>, ApiError> {
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let de = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::bad_request(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                validate::FieldError::new(path, inner.to_string()),
            )
        }
    })
}

/// `resource_version=N` (delete only that version) and `force=true` (a worker that still holds
/// VMs).
fn parse_delete_query(query: Option<&str>) -> Result<(Option<i64>, bool), ApiError> {
    let mut expected = None;
    let mut force = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("force", v)) => match v {
                "true" => force = true,
                "false" => force = false,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "query parameter force: {v:?} is not true or false"
                    )))
                }
            },
            Some(("resource_version", v)) => match v.parse::<i64>() {
                Ok(n) if n > 0 => expected = Some(n),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "query parameter resource_version: {v:?} is not a resource version"
                    )))
                }
            },
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {pair:?}: only resource_version and force are accepted"
                )))
            }
        }
    }
    Ok((expected, force))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_query() {
        assert_eq!(parse_delete_query(None).unwrap(), (None, false));
        assert_eq!(
            parse_delete_query(Some("resource_version=42")).unwrap(),
            (Some(42), false)
        );
        assert!(parse_delete_query(Some("resource_version=x")).is_err());
        assert!(parse_delete_query(Some("resource_version=0")).is_err());
        assert_eq!(
            parse_delete_query(Some("force=true&resource_version=7")).unwrap(),
            (Some(7), true)
        );
        assert!(parse_delete_query(Some("force=yes")).is_err());
        assert!(parse_delete_query(Some("colour=red")).is_err());
    }
}
