//! A failed request as the client sees it: an HTTP status and a one-line message, sent as
//! `{"error": "message"}`.

use hyper::StatusCode;

use super::body::BodyError;
use crate::control::ControlError;

/// A request that gets an error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The response status (4xx or 5xx).
    pub status: StatusCode,
    /// The `error` member of the body.
    pub message: String,
    /// The connection cannot carry another request (an unread or half-read body), so the
    /// response says `Connection: close`.
    pub close: bool,
}

impl ApiError {
    /// An error with `status` and `message`, keeping the connection.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            close: false,
        }
    }

    /// The same error, closing the connection after it.
    pub fn closing(mut self) -> ApiError {
        self.close = true;
        self
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let status = match e {
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}
