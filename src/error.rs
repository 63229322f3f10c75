//! The one error type of the service layer and its two mappings: to `tonic::Status` (with
//! `google.rpc` details) and, on the REST edge, back from a status to the JSON envelope.
//! May call: nothing but the store's error type, which it classifies.

use std::collections::HashMap;
use std::time::Duration;

use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::store::StoreError;

/// The domain carried in `google.rpc.ErrorInfo`, so a client can tell our reasons from others'.
pub const ERROR_DOMAIN: &str = "turbocat.dev";

/// The small, closed set of error codes the API speaks. Each knows its gRPC code and its HTTP
/// status; the REST envelope carries `as_str()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    ValidationError,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    NotImplemented,
    MethodNotAllowed,
    InternalError,
    ServiceUnavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::ValidationError,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::RateLimited,
        ErrorCode::NotImplemented,
        ErrorCode::MethodNotAllowed,
        ErrorCode::InternalError,
        ErrorCode::ServiceUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ValidationError => "VALIDATION_ERROR",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::NotImplemented => "NOT_IMPLEMENTED",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::InternalError => "INTERNAL_ERROR",
            ErrorCode::ServiceUnavailable => "SERVICE_UNAVAILABLE",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|code| code.as_str() == name)
    }

    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::ValidationError => tonic::Code::InvalidArgument,
            ErrorCode::Unauthorized => tonic::Code::Unauthenticated,
            ErrorCode::Forbidden => tonic::Code::PermissionDenied,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::Conflict => tonic::Code::Aborted,
            ErrorCode::PayloadTooLarge => tonic::Code::ResourceExhausted,
            ErrorCode::UnsupportedMediaType => tonic::Code::InvalidArgument,
            ErrorCode::RateLimited => tonic::Code::ResourceExhausted,
            ErrorCode::NotImplemented => tonic::Code::Unimplemented,
            ErrorCode::MethodNotAllowed => tonic::Code::Unimplemented,
            ErrorCode::InternalError => tonic::Code::Internal,
            ErrorCode::ServiceUnavailable => tonic::Code::Unavailable,
        }
    }

    pub fn http_status(self) -> http::StatusCode {
        match self {
            ErrorCode::ValidationError => http::StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => http::StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => http::StatusCode::FORBIDDEN,
            ErrorCode::NotFound => http::StatusCode::NOT_FOUND,
            ErrorCode::Conflict => http::StatusCode::CONFLICT,
            ErrorCode::PayloadTooLarge => http::StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::RateLimited => http::StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::NotImplemented => http::StatusCode::NOT_IMPLEMENTED,
            ErrorCode::MethodNotAllowed => http::StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::InternalError => http::StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::ServiceUnavailable => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The code a status without our `ErrorInfo` maps to (a status tonic itself produced).
    pub fn from_grpc_code(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ErrorCode::ValidationError,
            tonic::Code::Unauthenticated => ErrorCode::Unauthorized,
            tonic::Code::PermissionDenied => ErrorCode::Forbidden,
            tonic::Code::NotFound => ErrorCode::NotFound,
            tonic::Code::AlreadyExists | tonic::Code::Aborted | tonic::Code::FailedPrecondition => {
                ErrorCode::Conflict
            }
            tonic::Code::ResourceExhausted => ErrorCode::RateLimited,
            tonic::Code::Unimplemented => ErrorCode::NotImplemented,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                ErrorCode::ServiceUnavailable
            }
            _ => ErrorCode::InternalError,
        }
    }
}

/// One rejected field: `field` is the lowerCamelCase JSON path (`steps[2].dependsOn`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// An error of the service layer: a code, a message safe to show to the caller, the rejected
/// fields, and machine-readable facts (`metadata`, e.g. `currentVersion`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
    pub field_errors: Vec<FieldError>,
    pub metadata: HashMap<String, String>,
    pub retry_after: Option<Duration>,
}

pub type ServiceResult<T> = Result<T, ServiceError>;

/// The metadata entry that marks a claim lost to another claimant (`is_claim_taken`).
const CLAIM_METADATA: &str = "claim";
const CLAIM_TAKEN: &str = "taken";

impl ServiceError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field_errors: Vec::new(),
            metadata: HashMap::new(),
            retry_after: None,
        }
    }

    /// A VALIDATION_ERROR listing every rejected field.
    pub fn validation(field_errors: Vec<FieldError>) -> Self {
        debug_assert!(!field_errors.is_empty(), "a validation error names at least one field");
        let message = match field_errors.as_slice() {
            [only] => format!("{}: {}", only.field, only.message),
            many => format!("{} fields are invalid", many.len()),
        };
        Self { field_errors, ..Self::new(ErrorCode::ValidationError, message) }
    }

    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError::new(field, message)])
    }

    pub fn not_found(resource: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{resource} not found"))
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    pub fn unimplemented(what: &str) -> Self {
        Self::new(ErrorCode::NotImplemented, format!("{what} is not implemented yet"))
    }

    /// An internal failure: the cause is logged here, the caller sees a generic message.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %cause, source = ?cause.source(), "internal error");
        Self::new(ErrorCode::InternalError, "internal error")
    }

    pub fn with_metadata(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.metadata.insert(key.into(), value.to_string());
        self
    }

    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// The store's error, seen from the resource `resource` (for the NOT_FOUND message).
    pub fn from_store(error: StoreError, resource: &str) -> Self {
        match error {
            StoreError::NotFound => Self::not_found(resource),
            StoreError::VersionConflict { current_version } => Self::conflict(format!(
                "{resource} was changed by someone else: the current version is {current_version}"
            ))
            .with_metadata("currentVersion", current_version),
            StoreError::AlreadyExists(what) => {
                tracing::debug!(constraint = %what, "unique constraint refused a row");
                Self::conflict(format!("{resource} already exists"))
            }
            StoreError::ReferenceViolated(what) => {
                tracing::debug!(constraint = %what, "foreign key refused a change");
                Self::conflict(format!("{resource} refers to something missing or in use"))
            }
            StoreError::InUse { by } => {
                let names: Vec<&str> = by.iter().map(|(_, name)| name.as_str()).collect();
                let ids: Vec<String> = by.iter().map(|(id, _)| id.to_string()).collect();
                Self::conflict(format!("{resource} is in use by {}", names.join(", ")))
                    .with_metadata("usedBy", ids.join(","))
            }
            StoreError::InvalidCursor => {
                Self::invalid_field("cursor", "is not a cursor this API gave out")
            }
            StoreError::ValueRefused(what) => {
                tracing::debug!(constraint = %what, "the database refused a value");
                Self::invalid_field(
                    "body",
                    format!(
                        "the {resource} holds a value that cannot be stored (control characters, or out of range)"
                    ),
                )
            }
            StoreError::ClaimTaken => Self::conflict(format!(
                "{resource}: another replica claimed it first, or it is no longer due"
            ))
            .with_metadata(CLAIM_METADATA, CLAIM_TAKEN),
            unreachable @ StoreError::Database(_) if unreachable.is_unavailable() => {
                Self::database_unavailable(&unreachable)
            }
            database_error @ StoreError::Database(_) => Self::internal(&database_error),
        }
    }

    /// Whether the error is a claim lost to another claimant (`StoreError::ClaimTaken`): not a
    /// failure, only somebody else's turn.
    pub fn is_claim_taken(&self) -> bool {
        self.code == ErrorCode::Conflict
            && self.metadata.get(CLAIM_METADATA).is_some_and(|value| value == CLAIM_TAKEN)
    }

    /// The database could not be reached (`StoreError::is_unavailable`): 503 with a retry
    /// hint, never a 500. Logged at `debug` only: every request of an outage meets it, the
    /// access log shows the 503s, and the background loops warn once per outage.
    pub fn database_unavailable(cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::debug!(error = %cause, source = ?cause.source(), "the database is unreachable");
        Self::new(
            ErrorCode::ServiceUnavailable,
            "the database is unavailable; try again in a few seconds",
        )
        .with_retry_after(DATABASE_RETRY_AFTER)
    }
}

/// What a 503 for an unreachable database suggests as `Retry-After`.
pub const DATABASE_RETRY_AFTER: Duration = Duration::from_secs(2);

impl From<ServiceError> for tonic::Status {
    fn from(error: ServiceError) -> Self {
        let mut details = ErrorDetails::new();
        details.set_error_info(error.code.as_str(), ERROR_DOMAIN, error.metadata);
        if !error.field_errors.is_empty() {
            let violations: Vec<FieldViolation> = error
                .field_errors
                .into_iter()
                .map(|field_error| FieldViolation::new(field_error.field, field_error.message))
                .collect();
            details.set_bad_request(violations);
        }
        if let Some(retry_after) = error.retry_after {
            details.set_retry_info(Some(retry_after));
        }
        tonic::Status::with_error_details(error.code.grpc_code(), error.message, details)
    }
}

impl ServiceError {
    /// Reads a status back (on the REST edge): our `ErrorInfo` restores the exact code; a status
    /// from elsewhere maps by its gRPC code, and an internal one never leaks its message.
    pub fn from_status(status: &tonic::Status) -> Self {
        let details = status.get_error_details();
        let error_info = details.error_info().filter(|info| info.domain == ERROR_DOMAIN);
        let code = error_info
            .and_then(|info| ErrorCode::from_name(&info.reason))
            .unwrap_or_else(|| ErrorCode::from_grpc_code(status.code()));
        let message = if code == ErrorCode::InternalError {
            "internal error".to_owned()
        } else {
            status.message().to_owned()
        };
        let mut error = Self::new(code, message);
        if let Some(info) = error_info {
            error.metadata = info.metadata.clone();
        }
        if let Some(bad_request) = details.bad_request() {
            error.field_errors = bad_request
                .field_violations
                .iter()
                .map(|violation| FieldError::new(&violation.field, &violation.description))
                .collect();
        }
        error.retry_after = details.retry_info().and_then(|info| info.retry_delay);
        error
    }
}

#[cfg(test)]
mod tests {
    use super::{ErrorCode, FieldError, ServiceError};

    #[test]
    fn every_code_survives_the_trip_through_a_grpc_status() {
        for code in ErrorCode::ALL {
            let error =
                ServiceError::new(code, "something happened").with_metadata("currentVersion", 4);
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), code.grpc_code());
            let back = ServiceError::from_status(&status);
            assert_eq!(back.code, code, "{code:?}");
            assert_eq!(back.metadata.get("currentVersion").map(String::as_str), Some("4"));
        }
    }

    #[test]
    fn statuses_match_the_product_spec() {
        let expected = [
            (ErrorCode::ValidationError, 400, "VALIDATION_ERROR"),
            (ErrorCode::Unauthorized, 401, "UNAUTHORIZED"),
            (ErrorCode::Forbidden, 403, "FORBIDDEN"),
            (ErrorCode::NotFound, 404, "NOT_FOUND"),
            (ErrorCode::Conflict, 409, "CONFLICT"),
            (ErrorCode::PayloadTooLarge, 413, "PAYLOAD_TOO_LARGE"),
            (ErrorCode::UnsupportedMediaType, 415, "UNSUPPORTED_MEDIA_TYPE"),
            (ErrorCode::RateLimited, 429, "RATE_LIMITED"),
            (ErrorCode::InternalError, 500, "INTERNAL_ERROR"),
            (ErrorCode::ServiceUnavailable, 503, "SERVICE_UNAVAILABLE"),
        ];
        for (code, status, name) in expected {
            assert_eq!(code.http_status().as_u16(), status, "{name}");
            assert_eq!(code.as_str(), name);
            assert_eq!(ErrorCode::from_name(name), Some(code));
        }
        assert_eq!(ErrorCode::ValidationError.grpc_code(), tonic::Code::InvalidArgument);
        assert_eq!(ErrorCode::RateLimited.grpc_code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn field_violations_and_retry_hints_travel_and_internals_do_not_leak() {
        let error = ServiceError::validation(vec![
            FieldError::new("email", "is not an email address"),
            FieldError::new("password", "must be at least 8 characters"),
        ]);
        let back = ServiceError::from_status(&tonic::Status::from(error));
        assert_eq!(back.code, ErrorCode::ValidationError);
        assert_eq!(back.field_errors.len(), 2);
        assert_eq!(back.field_errors[1].field, "password");

        let limited = ServiceError::new(ErrorCode::RateLimited, "slow down")
            .with_retry_after(std::time::Duration::from_secs(30));
        let back = ServiceError::from_status(&tonic::Status::from(limited));
        assert_eq!(back.retry_after, Some(std::time::Duration::from_secs(30)));

        let foreign = tonic::Status::internal("password=hunter2 at db.internal:5432");
        let back = ServiceError::from_status(&foreign);
        assert_eq!(back.code, ErrorCode::InternalError);
        assert_eq!(back.message, "internal error");
        assert_eq!(
            ServiceError::from_status(&tonic::Status::already_exists("x")).code,
            ErrorCode::Conflict
        );
        assert_eq!(
            ServiceError::from_status(&tonic::Status::unavailable("x")).code,
            ErrorCode::ServiceUnavailable
        );
    }
}
