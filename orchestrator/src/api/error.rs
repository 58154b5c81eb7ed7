//! API errors: a status and a JSON body `{"error": "...", "field": "..."}` that names what was
//! wrong.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::model::FieldError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }

    /// A request that does not parse or does not fit the URL: 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// A well-formed field with a value we cannot accept.
    pub fn field(status: StatusCode, e: FieldError) -> ApiError {
        ApiError {
            status,
            message: e.to_string(),
            field: Some(e.field),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let status = match &e {
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::AlreadyExists { .. } | StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Expired(_) => StatusCode::GONE,
            StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            StoreError::Deposed { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Compacted { .. }
            | StoreError::Etcd(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        match e {
            StoreError::Invalid(f) => ApiError::field(status, f),
            other => ApiError::new(status, other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: &self.message,
            field: self.field.as_deref(),
        };
        (self.status, Json(body)).into_response()
    }
}
