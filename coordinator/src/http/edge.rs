//! What every HTTP response passes on its way out: errors in OpenAI's JSON
//! shape whoever produced them, and CORS for browsers.
//!
//! **JSON errors.** The handlers answer errors as `{"error": {...}}`, but
//! some come from the HTTP layer itself: 405 for a wrong method (empty
//! body), 413 for a body over the limit (plain text). [`json_errors`]
//! rewrites any error response that is not JSON into the same object,
//! keeping its status and headers (`Allow`, `Retry-After`), so an SDK always
//! finds a message.
//!
//! **CORS** (`--http-cors-origins`, off by default). For an allowed
//! `Origin`, a preflight (`OPTIONS` with `Access-Control-Request-Method`)
//! is answered 204 with the methods and the requested headers allowed (API
//! keys travel in `Authorization`, a header, never in cookies, so no
//! credentials mode is needed); every other response gets
//! `Access-Control-Allow-Origin` and exposes `x-request-id` and
//! `Retry-After`. An origin not on the list gets no CORS headers, and its
//! preflight falls through to a 405 (the browser then blocks the call).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The largest error body read back to wrap it.
const MAX_ERROR_BODY: usize = 64 << 10;

/// Rewrites an error response without a JSON body into OpenAI's error
/// object, with the same status and headers.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = if status == StatusCode::METHOD_NOT_ALLOWED {
        // (axum adds its `Allow` header outside this layer.)
        format!(
            "{method} is not allowed on {path} (allowed: {})",
            allowed_methods(&path)
        )
    } else if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string()
    } else {
        text
    };
    let (kind, code) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", Some("request_too_large")),
        s if s.is_client_error() => ("invalid_request_error", None),
        _ => ("server_error", None),
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let bytes = serde_json::to_vec(&body).expect("a JSON value serializes");
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(bytes))
}

/// The methods a route serves, for a 405's message.
fn allowed_methods(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/responses"
        | "/tokenize"
        | "/detokenize" => "POST",
        "/v1/models" | "/health" => "GET, HEAD",
        p if p.starts_with("/v1/models/") => "GET, HEAD",
        _ => "none",
    }
}

/// The origins browsers may call from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// Exact origins (`https://app.example.com`), or `*` for any.
    pub origins: Vec<String>,
}

impl Cors {
    /// The value of `Access-Control-Allow-Origin` for `origin`, when it
    /// is allowed.
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.origins.iter().any(|o| o == "*") {
            return Some(HeaderValue::from_static("*"));
        }
        let origin_str = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin_str))
            .then(|| origin.clone())
    }
}

/// Checks one `--http-cors-origins` entry: `*`, or a scheme, host and
/// optional port with nothing after (what browsers send in `Origin`).
pub fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| format!("{origin:?} must start with http:// or https:// (or be *)"))?;
    if rest.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
        return Err(format!(
            "{origin:?} must be a scheme and host (and port) only, as browsers send it in Origin: \
             no path, no trailing slash"
        ));
    }
    Ok(())
}

/// Answers allowed preflights and marks allowed responses.
pub async fn cors(State(cors): State<Arc<Cors>>, request: Request, next: Next) -> Response {
    let allowed = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| cors.allow(o));
    let Some(allowed) = allowed else {
        return next.run(request).await;
    };
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        let requested = request
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or(HeaderValue::from_static(
                "authorization, content-type, x-request-id",
            ));
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(request).await
    };
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("x-request-id, retry-after"),
    );
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_as_browsers_send_them() {
        assert!(check_origin("*").is_ok());
        assert!(check_origin("https://app.example.com").is_ok());
        assert!(check_origin("http://localhost:3000").is_ok());
        assert!(check_origin("app.example.com").is_err());
        assert!(check_origin("https://app.example.com/").is_err());
        assert!(check_origin("https://").is_err());
    }

    #[test]
    fn only_listed_origins_are_allowed() {
        let cors = Cors {
            origins: vec!["https://a.example".into()],
        };
        let a = HeaderValue::from_static("https://a.example");
        assert_eq!(cors.allow(&a), Some(a.clone()));
        assert_eq!(
            cors.allow(&HeaderValue::from_static("https://b.example")),
            None
        );
        let any = Cors {
            origins: vec!["*".into()],
        };
        assert_eq!(
            any.allow(&HeaderValue::from_static("https://b.example")),
            Some(HeaderValue::from_static("*"))
        );
    }
}
