//! JSON errors: `{"error": {"code": "unknown_model", "message": "...", "type": "not_found_error",
//! "param": null}}`: gantry's `code` and `message`, with OpenAI's `type` (from the status) and
//! `param` (the request field at fault, where one is), so OpenAI clients read them too.
//!
//! Statuses: 400 bad input or malformed JSON, 401 missing/invalid token, 403 read token on a
//! write, 404 unknown model/version/alias/file/route, 405 wrong method, 409 already
//! registered, 415 a JSON body without a JSON content type, 416 unsatisfiable range, 422
//! checkpoint refused or no longer readable, 500 database trouble.

use crate::error::RegistryError;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            param: None,
        }
    }
    pub fn with_param(mut self, param: &str) -> ApiError {
        self.param = Some(param.to_string());
        self
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        let message = e.to_string();
        let (status, code) = match &e {
            RegistryError::UnknownModel(_) => (StatusCode::NOT_FOUND, "unknown_model"),
            RegistryError::UnknownVersion { .. } => (StatusCode::NOT_FOUND, "unknown_version"),
            RegistryError::UnknownAlias { .. } => (StatusCode::NOT_FOUND, "unknown_alias"),
            RegistryError::Checkpoint { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "checkpoint_refused"),
            RegistryError::OutsideRoots { .. } => (StatusCode::FORBIDDEN, "outside_checkpoint_roots"),
            RegistryError::BadName(_) => (StatusCode::BAD_REQUEST, "bad_name"),
            RegistryError::BadWeights(_) => (StatusCode::BAD_REQUEST, "bad_weights"),
            RegistryError::BadCursor { .. } => (StatusCode::BAD_REQUEST, "bad_cursor"),
            RegistryError::AlreadyRegistered { .. } => (StatusCode::CONFLICT, "already_registered"),
            RegistryError::Database { .. } | RegistryError::Corrupt { .. } | RegistryError::Schema { .. } => {
                tracing::error!(error = %e, "registry database error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, message)
    }
}

/// OpenAI's error `type` for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::CONFLICT => "conflict_error",
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request_error",
    }
}

pub(crate) fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    error_response(status, code, message, None)
}

fn error_response(status: StatusCode, code: &str, message: &str, param: Option<&str>) -> Response {
    let body = serde_json::json!({ "error": {
        "code": code, "message": message, "type": error_type(status), "param": param,
    } });
    (status, axum::Json(body)).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.status, self.code, &self.message, self.param.as_deref())
    }
}

/// `axum::Json` with its rejections (plain text) turned into [`ApiError`]s.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(JsonRejection::MissingJsonContentType(e)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                e.body_text(),
            )),
            Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_json", e.body_text())),
        }
    }
}

/// Middleware: an error response that is not already JSON (axum's own: unknown route, wrong
/// method, a path it could not decode, a body too large) becomes a JSON error.
pub(crate) async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text.trim().to_string()
    };
    let mut out = json_error(status, code, &message);
    // Keep headers such as `Allow` on a 405.
    for (name, value) in parts.headers.iter() {
        if name != CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    out
}
