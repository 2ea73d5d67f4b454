//! The one error type of the HTTP API. Every failure a client can see is one row of
//! the result-code table; the response body is `{"code", "message"}` and the HTTP
//! status comes from the table.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cardflow_domain::{RequestError, ResultCode};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {}", code.code(), code.message_with(field.as_deref()))]
pub struct ApiError {
    pub code: ResultCode,
    /// The offending field or header, appended to the message.
    pub field: Option<String>,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ResultCode) -> Self {
        ApiError { code, field: None, retry_after: None }
    }
    pub fn missing(field: &str) -> Self {
        ApiError { code: ResultCode::MissingRequiredValue, field: Some(field.to_string()), retry_after: None }
    }
    pub fn invalid(field: &str) -> Self {
        ApiError { code: ResultCode::InvalidValue, field: Some(field.to_string()), retry_after: None }
    }
    pub fn unavailable() -> Self {
        ApiError { code: ResultCode::ServiceUnavailable, field: None, retry_after: Some(1) }
    }
    pub fn message(&self) -> String {
        self.code.message_with(self.field.as_deref())
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        ApiError { code: e.code, field: e.field, retry_after: None }
    }
}

impl From<cardflow_ledger::LedgerError> for ApiError {
    fn from(e: cardflow_ledger::LedgerError) -> Self {
        tracing::error!(error = %e, "database unavailable");
        ApiError::unavailable()
    }
}

/// The plain JSON body of an answer.
pub fn body_json(code: ResultCode, message: &str, amount: Option<rust_decimal::Decimal>) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("code".into(), code.code().into());
    obj.insert("message".into(), message.into());
    if let Some(a) = amount {
        // An exact JSON number: serde_json keeps the digits (arbitrary_precision).
        let n: serde_json::Number =
            serde_json::from_str(&a.normalize().to_string()).expect("decimal text is a JSON number");
        obj.insert("amount".into(), serde_json::Value::Number(n));
    }
    if code == ResultCode::Pending {
        obj.insert("status".into(), "PENDING".into());
    }
    serde_json::Value::Object(obj).to_string()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
        let mut resp = (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body_json(self.code, &self.message(), None),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
