//! Requests the API refuses before any handler runs: a body that does not say it is JSON (415).
//! A web page can make a browser POST `text/plain` to any address without asking (a "simple"
//! cross-site request); insisting on `application/json` turns that into a preflight the API
//! never grants.

use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// 415 for a POST/PUT/PATCH with a body whose Content-Type is not `application/json`.
pub async fn require_json(req: Request, next: Next) -> Response {
    let writes = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    let empty = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "0");
    if writes && !empty {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            tracing::warn!(
                method = %req.method(),
                path = %req.uri().path(),
                content_type = ct,
                "refused: not a JSON body"
            );
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "request bodies must be JSON with Content-Type: application/json (got {:?})",
                    ct
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}
