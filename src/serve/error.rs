//! Every error the API answers: a status and a JSON body `{"error": "..."}`.

use std::io;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::Error;

/// An error answer: the status and the message naming what was wrong.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub(super) fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub(super) fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }

    pub(super) fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }

    pub(super) fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// The error of a queue operation, `what` saying what the request wanted: the
    /// status from what went wrong, the message with the whole cause chain (each
    /// error of the crate names its operation and path).
    pub(super) fn from_queue(what: &str, error: &Error) -> ApiError {
        let status = match error {
            Error::InvalidId { .. } | Error::Config { .. } | Error::EmptyMessage { .. } => {
                StatusCode::BAD_REQUEST
            }
            Error::Duplicate { .. } | Error::Refused { .. } | Error::Layout { .. } => {
                StatusCode::CONFLICT
            }
            _ => match error.kind() {
                io::ErrorKind::NotFound => StatusCode::NOT_FOUND,
                io::ErrorKind::ResourceBusy | io::ErrorKind::AlreadyExists => StatusCode::CONFLICT,
                io::ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
                io::ErrorKind::TimedOut => StatusCode::REQUEST_TIMEOUT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        let mut message = format!("failed to {what}: {error}");
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!(error = %message, "request failed");
        }
        ApiError::new(status, message)
    }

    /// A blocking task that panicked or was cancelled (the runtime shutting down).
    pub(super) fn from_join(what: &str, error: &tokio::task::JoinError) -> ApiError {
        if error.is_cancelled() {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("failed to {what}: the server is shutting down"),
            )
        } else {
            tracing::warn!(what, "a request's blocking task panicked");
            ApiError::internal(format!("failed to {what}: internal error"))
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message }).to_string();
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}
