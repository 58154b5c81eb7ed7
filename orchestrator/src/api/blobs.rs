//! `/api/v1/blobs/sha256:<hex>`: the image store. `PUT` uploads a blob (stored only when its
//! content hashes to the name; 201, or 200 when it was there already), `HEAD` says whether it
//! is there and its size, `GET` streams it (workers pull images this way).

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::Images;
use crate::images::store::{BlobStore, PutError};
use crate::images::Digest;

fn parse(path: Result<Path<String>, PathRejection>) -> Result<Digest, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    raw.parse::<Digest>()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))
}

fn store(images: &Images) -> Result<&BlobStore, ApiError> {
    images
        .blobs
        .as_deref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "this server keeps no images"))
}

/// `HEAD`: 200 with the size, 404.
pub async fn head(
    State(images): State<Images>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let d = parse(path)?;
    match store(&images)?.size(&d) {
        Some(n) => Ok((StatusCode::OK, [(header::CONTENT_LENGTH, n.to_string())]).into_response()),
        None => Ok(StatusCode::NOT_FOUND.into_response()),
    }
}

/// `GET`: the blob's bytes.
pub async fn get(
    State(images): State<Images>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let d = parse(path)?;
    let blobs = store(&images)?;
    let file = match tokio::fs::File::open(blobs.path(&d)).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no blob {d} in the image store"),
            ))
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            ))
        }
    };
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .len();
    blobs.count_served();
    tracing::info!(blob = %d, bytes = len, "serving a blob");
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)),
    )
        .into_response())
}

/// `PUT`: stores the body as the blob it names, or refuses it (422 when its content hashes to
/// something else, 400 when it broke off).
pub async fn put(
    State(images): State<Images>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let d = parse(path)?;
    let blobs = store(&images)?;
    let existed = blobs.size(&d).is_some();
    match blobs.put(&d, body.into_data_stream()).await {
        Ok(n) => {
            tracing::info!(blob = %d, bytes = n, "blob stored");
            let status = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((
                status,
                axum::Json(serde_json::json!({"digest": d.to_string(), "size": n})),
            )
                .into_response())
        }
        Err(e @ PutError::Mismatch { .. }) => {
            tracing::warn!(blob = %d, "upload refused: {e}");
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                e.to_string(),
            ))
        }
        Err(e @ PutError::Broken { .. }) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
        }
        Err(e @ PutError::Io { .. }) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}
