//! The HTTP API's one error type: OpenAI's JSON error object, with the
//! HTTP status beside the gRPC code it comes from ([`http_of`]), built from
//! a refusal here or from a status of the shared path (the refused field
//! and reason code read from its metadata, never from its text).

use super::*;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param",
/// "code"}}` with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) message: String,
    pub(crate) param: Option<String>,
    pub(crate) code: Option<&'static str>,
    pub(crate) request_id: Option<String>,
    /// An overload refusal: `Retry-After` goes out with it.
    pub(crate) retry_after: bool,
}

impl ApiError {
    /// A 400 for `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: format!("{param}: {}", message.into()),
            param: Some(param),
            code: None,
            request_id: None,
            retry_after: false,
        }
    }

    /// The HTTP form of a gRPC status from the shared path.
    pub fn from_status(status: &Status) -> Self {
        let (http, kind, code) = http_of(status.code());
        let param = status
            .metadata()
            .get(INVALID_FIELD_HEADER)
            .and_then(|v| v.to_str().ok())
            // The gRPC field holds what this API calls response_format.
            .map(|f| {
                if f == "json_schema" {
                    "response_format"
                } else {
                    f
                }
            })
            .map(str::to_string);
        // A refusal with a code of its own (context_length_exceeded).
        let code = match nanoinfer_proto::limits::error_code(status) {
            Some(nanoinfer_proto::limits::CONTEXT_LENGTH_EXCEEDED) => {
                Some(nanoinfer_proto::limits::CONTEXT_LENGTH_EXCEEDED)
            }
            _ => code,
        };
        Self {
            status: http,
            kind,
            message: status.message().to_string(),
            param,
            code,
            request_id: status
                .metadata()
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            retry_after: status.metadata().get(RETRY_AFTER_HEADER).is_some(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// HTTP status, OpenAI error type and code for a gRPC code.
pub fn http_of(code: Code) -> (StatusCode, &'static str, Option<&'static str>) {
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            (StatusCode::BAD_REQUEST, "invalid_request_error", None)
        }
        Code::Unauthenticated => (
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "invalid_request_error", None),
        Code::NotFound => (
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
        ),
        Code::ResourceExhausted => (
            StatusCode::TOO_MANY_REQUESTS,
            "server_overloaded",
            Some("server_overloaded"),
        ),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", None),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout", None),
        Code::Cancelled => (StatusCode::from_u16(499).unwrap(), "cancelled", None),
        // A stalled client's stream (it sees this only mid-stream).
        Code::Aborted => (StatusCode::REQUEST_TIMEOUT, "stalled", None),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(value) = self
            .request_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        if self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}
