//! The OpenAI-compatible HTTP API on `--http-listen`: `POST
//! /v1/chat/completions`, `POST /v1/completions` (streaming over SSE or
//! whole), `POST /v1/responses` (the Responses API for text, run as a chat
//! request: [`responses`]), `GET /v1/models`, `GET /v1/models/{id}`, `POST /tokenize`, `POST
//! /detokenize`, `GET /health`; every error as OpenAI's JSON object, and
//! CORS when configured ([`edge`]).
//!
//! Each handler only translates: the JSON body becomes an [`InferRequest`],
//! headers become the metadata the gRPC path reads (`authorization`,
//! `traceparent`, `x-request-id`), and [`Front::start`] runs the request on
//! the same path as gRPC `Infer` (routing, failover, deadlines, spans,
//! metrics with `api="http"`). Its messages become OpenAI's JSON.
//! `response_format` becomes the request's `json_schema`; chat `tools`
//! become a system message and a schema too, and the answer `tool_calls`
//! ([`tools`]).
//!
//! Bodies are read as JSON values and each field is taken with a check that
//! names it, so a wrong type is a 400 that says which field, as every other
//! refusal is.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use nanoinfer_proto::nanoinfer::{
    ChatMessage, FinishReason, InferRequest, InferResponse, TopLogprob,
};
use nanoinfer_vocab::ToolFormat;
use serde_json::{json, Map, Value};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::error::{
    INVALID_FIELD_HEADER, REQUEST_ID_HEADER, RETRY_AFTER_HEADER, RETRY_AFTER_SECONDS,
};
use crate::front::{Api, Call, Front};
use crate::service::health_status;

/// Largest request body accepted (a prompt at the default byte limit, in
/// JSON, fits with room to spare).
pub const MAX_BODY_BYTES: usize = 4 << 20;

pub mod edge;
mod responses;
mod server;
pub mod tools;

pub use server::{HttpMetrics, HTTP_ALPN};

/// Serves the routes on `listener` (over TLS with `tls`, offering
/// [`HTTP_ALPN`]) with `config`'s connection limits and timeouts, until
/// `stop` turns true; then open responses finish (the caller bounds the
/// wait). See [`server`] for the connection handling.
pub fn spawn(
    listener: tokio::net::TcpListener,
    front: Arc<Front>,
    tls: Option<Arc<nanoinfer_proto::tls::ServerTls>>,
    config: crate::config::HttpServerConfig,
    metrics: Arc<HttpMetrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let local = listener.local_addr()?;
    tracing::info!(
        tls = tls.is_some(),
        header_timeout_ms = config.header_timeout.as_millis() as u64,
        idle_timeout_s = config.idle_timeout.as_secs(),
        max_requests_per_connection = config.max_requests_per_connection,
        max_connections = config.max_connections,
        "OpenAI-compatible HTTP API listening on {local}"
    );
    let cors = (!config.cors_origins.is_empty()).then(|| edge::Cors {
        origins: config.cors_origins.clone(),
    });
    Ok(server::spawn(
        listener,
        router(front, cors),
        tls,
        config,
        metrics,
        stop,
    ))
}

/// The routes, over `front`, with CORS for `cors`'s origins.
pub fn router(front: Arc<Front>, cors: Option<edge::Cors>) -> Router {
    let routes = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(edge::json_errors));
    let routes = match cors {
        Some(cors) => routes.layer(axum::middleware::from_fn_with_state(
            Arc::new(cors),
            edge::cors,
        )),
        None => routes,
    };
    routes.with_state(front)
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param",
/// "code"}}` with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
    request_id: Option<String>,
    /// An overload refusal: `Retry-After` goes out with it.
    retry_after: bool,
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

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: "unknown path; the API serves POST /v1/chat/completions, POST /v1/completions, POST /v1/responses, GET /v1/models and GET /v1/models/{id}".into(),
        param: None,
        code: None,
        request_id: None,
        retry_after: false,
    }
}

async fn health(State(front): State<Arc<Front>>) -> Response {
    let routable = *front.routable.borrow();
    // Revoked keys first: with them no request can succeed.
    let revoked = front.api_keys.as_ref().and_then(|k| k.health_problem());
    let status = match revoked {
        Some(problem) => problem.to_string(),
        None => health_status(routable, &front.discovery.borrow()),
    };
    let code = if routable > 0 && revoked.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(json!({"status": status, "live_workers": routable})),
    )
        .into_response()
}

/// The request's headers as the metadata the shared path reads, once its
/// API key (when keys are required) is accepted.
fn authorized(front: &Front, headers: HeaderMap) -> Result<MetadataMap, ApiError> {
    let metadata = MetadataMap::from_headers(headers);
    front
        .authorize(&metadata)
        .map_err(|s| ApiError::from_status(&s))?;
    Ok(metadata)
}

/// A request body as JSON.
fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("not valid JSON: {e}")))
}

/// The fields of a body that must be a JSON object.
fn object(body: &Value) -> Result<Fields<'_>, ApiError> {
    match body {
        Value::Object(map) => Ok(Fields(map)),
        _ => Err(ApiError::invalid("body", "must be a JSON object")),
    }
}

/// A model as `GET /v1/models` lists it.
fn model_object(id: &str, routable: usize) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": 0,
        "owned_by": "nanoinfer",
        "routable_workers": routable,
    })
}

async fn models(State(front): State<Arc<Front>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorized(&front, headers)?;
    let data: Vec<Value> = front
        .router
        .models()
        .into_iter()
        .map(|(id, routable)| model_object(&id, routable))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /v1/models/{id}` (`client.models.retrieve`): the model, also while
/// its workers restart (`routable_workers` 0); 404 `model_not_found` for a
/// name no worker has served.
async fn model(
    State(front): State<Arc<Front>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    authorized(&front, headers)?;
    match front.router.models().into_iter().find(|(m, _)| *m == id) {
        Some((id, routable)) => Ok(axum::Json(model_object(&id, routable)).into_response()),
        None => Err(ApiError::from_status(&Status::not_found(format!(
            "model {id:?} is not served here (see GET /v1/models)"
        )))),
    }
}

/// `POST /tokenize` (vLLM's shape; llama-server's takes `content` and
/// answers `{tokens}` only): `{model?, prompt | messages,
/// add_special_tokens? (default true), return_token_strs?}` → `{tokens,
/// count, max_model_len, model, token_strs?}`.
async fn tokenize(
    State(front): State<Arc<Front>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let metadata = authorized(&front, headers)?;
    let body = json_body(&body)?;
    let f = object(&body)?;
    let messages = match f.get("messages") {
        Some(m) => chat_messages(Some(m), false)?,
        None => Vec::new(),
    };
    let add_special = match f.get("add_special_tokens") {
        None => true,
        Some(_) => f.bool("add_special_tokens")?,
    };
    let request = nanoinfer_proto::nanoinfer::TokenizeRequest {
        model: f.str("model")?.unwrap_or_default().to_string(),
        prompt: f.str("prompt")?.unwrap_or_default().to_string(),
        messages,
        add_special,
    };
    let with_strs = f.bool("return_token_strs")?;
    let r = front
        .tokenize(request, &metadata)
        .await
        .map_err(|s| ApiError::from_status(&s))?;
    let mut out = json!({
        "tokens": r.tokens,
        "count": r.tokens.len(),
        "max_model_len": r.max_model_len,
        "model": r.model,
    });
    if with_strs {
        out["token_strs"] = json!(r.pieces);
    }
    Ok(axum::Json(out).into_response())
}

/// `POST /detokenize`: `{model?, tokens}` → `{prompt, model}`.
async fn detokenize(
    State(front): State<Arc<Front>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let metadata = authorized(&front, headers)?;
    let body = json_body(&body)?;
    let f = object(&body)?;
    let tokens = match f.get("tokens") {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64()
                    .and_then(|id| i32::try_from(id).ok())
                    .ok_or_else(|| {
                        ApiError::invalid("tokens", format!("tokens[{i}] must be a token id"))
                    })
            })
            .collect::<Result<Vec<i32>, _>>()?,
        _ => {
            return Err(ApiError::invalid(
                "tokens",
                "is required: a list of token ids",
            ))
        }
    };
    let request = nanoinfer_proto::nanoinfer::DetokenizeRequest {
        model: f.str("model")?.unwrap_or_default().to_string(),
        tokens,
    };
    let r = front
        .detokenize(request, &metadata)
        .await
        .map_err(|s| ApiError::from_status(&s))?;
    Ok(axum::Json(json!({"prompt": r.text, "model": r.model})).into_response())
}

/// The two generation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// What the response needs besides the stream.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Chat or completion.
    pub kind: Kind,
    /// Stream over SSE.
    pub stream: bool,
    /// Send a final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The model asked for (echoed until a worker names its own).
    pub model: String,
    /// Completions' `echo`: the prompt, put before each choice's text.
    pub echo: Option<String>,
    /// Log-probabilities were asked for.
    pub logprobs: bool,
    /// Chat with tools: each choice's answer (the generic format's JSON)
    /// becomes `tool_calls` or `content` ([`tools`]).
    pub tools: bool,
    /// How the answer writes its calls: the model's template's own format,
    /// or [`ToolFormat::None`] for the generic format.
    pub tool_format: ToolFormat,
}

async fn chat_completions(
    State(front): State<Arc<Front>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(front, headers, body, Kind::Chat).await
}

async fn completions(State(front): State<Arc<Front>>, headers: HeaderMap, body: Bytes) -> Response {
    generate(front, headers, body, Kind::Completion).await
}

/// The steps every generating endpoint shares: the API key (first: an
/// unauthenticated caller learns nothing about the body's validity), the
/// body parsed by `parse` into the shared request (a refusal carries the
/// client's request id), then the request started on the shared path.
async fn begin(
    front: &Front,
    headers: HeaderMap,
    body: &[u8],
    parse: impl FnOnce(&Value, ToolFormat) -> Result<(InferRequest, Shape), ApiError>,
) -> Result<(Call, Shape), Response> {
    let metadata = authorized(front, headers).map_err(IntoResponse::into_response)?;
    let client_id = metadata
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let parsed = match json_body(body) {
        Ok(v) => {
            // With tools, the model's chat template decides their format.
            let format = match v.get("tools") {
                Some(Value::Array(t)) if !t.is_empty() => {
                    let model = v.get("model").and_then(Value::as_str);
                    front.tool_format(model).await
                }
                _ => ToolFormat::None,
            };
            parse(&v, format)
        }
        Err(e) => Err(e),
    };
    let (mut request, shape) = parsed.map_err(|mut e| {
        e.request_id = (!client_id.is_empty()).then_some(client_id.clone());
        e.into_response()
    })?;
    request.request_id = client_id;
    let call = front
        .start(Api::Http, request, &metadata)
        .await
        .map_err(|status| {
            let mut e = ApiError::from_status(&status);
            // With tools, the schema the worker refused is theirs.
            if shape.tools && e.param.as_deref() == Some("response_format") {
                e.param = Some("tools".into());
            }
            e.into_response()
        })?;
    Ok((call, shape))
}

/// A server-sent event stream's response.
fn sse_response(body: Body) -> Response {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn generate(front: Arc<Front>, headers: HeaderMap, body: Bytes, kind: Kind) -> Response {
    let (call, shape) = match begin(&front, headers, &body, |v, format| {
        parse_request_for(kind, v, format)
    })
    .await
    {
        Ok(started) => started,
        Err(response) => return response,
    };
    let request_id = call.request_id.clone();
    let mut response = if shape.stream {
        let mut events = Events::new(call, shape);
        sse_response(Body::from_stream(futures::stream::poll_fn(move |cx| {
            events.poll_next(cx).map(|o| o.map(Ok::<Bytes, Infallible>))
        })))
    } else {
        match collect(call, &shape).await {
            Ok(v) => axum::Json(v).into_response(),
            Err(status) => return ApiError::from_status(&status).into_response(),
        }
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Field access on a JSON object, each refusal naming its field.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn f32(&self, key: &str) -> Result<Option<f32>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64().map(|x| x as f32)),
            Some(_) => Err(ApiError::invalid(key, "must be a number")),
        }
    }

    fn u32(&self, key: &str) -> Result<Option<u32>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64().map(u32::try_from) {
                Some(Ok(v)) => Ok(Some(v)),
                Some(Err(_)) => Err(ApiError::invalid(key, "is too large")),
                None => Err(ApiError::invalid(key, "must be a non-negative integer")),
            },
            Some(_) => Err(ApiError::invalid(key, "must be a non-negative integer")),
        }
    }

    fn bool(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::invalid(key, "must be true or false")),
        }
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(key, "must be a string")),
        }
    }

    /// `seed`: any integer OpenAI accepts (negative ones keep their bits).
    fn seed(&self) -> Result<Option<u64>, ApiError> {
        match self.get("seed") {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_i64().map(|i| i as u64))
                .map(Some)
                .ok_or_else(|| ApiError::invalid("seed", "must be an integer")),
            Some(_) => Err(ApiError::invalid("seed", "must be an integer")),
        }
    }

    /// `stop`: a string or a list of strings.
    fn stop(&self) -> Result<Vec<String>, ApiError> {
        match self.get("stop") {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| ApiError::invalid("stop", "must hold strings only"))
                })
                .collect(),
            Some(_) => Err(ApiError::invalid(
                "stop",
                "must be a string or a list of strings",
            )),
        }
    }
}

/// Fields OpenAI defines that this server does not implement: refused, not
/// silently ignored, since a caller relying on them would get wrong output.
/// Refused on both endpoints: the legacy function-calling fields (`tools`
/// replaced them).
const UNSUPPORTED: [&str; 2] = ["functions", "function_call"];

/// `logit_bias`: an object of token ids (as strings, OpenAI's shape; JSON
/// numbers as keys are not JSON) → bias. Absent or null: none.
fn logit_bias(value: Option<&Value>) -> Result<std::collections::HashMap<i32, f32>, ApiError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(Default::default()),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(ApiError::invalid(
                "logit_bias",
                "must be an object of token id → bias, e.g. {\"1234\": -100}",
            ))
        }
    };
    map.iter()
        .map(|(key, v)| {
            let id = key.trim().parse::<i32>().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("keys must be token ids (integers), got {key:?}"),
                )
            })?;
            let bias = v.as_f64().ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    format!("the bias of token {id} must be a number"),
                )
            })?;
            Ok((id, bias as f32))
        })
        .collect()
}

/// `response_format` → the JSON Schema the output is constrained to (empty:
/// free text). `{"type": "json_object"}` is any JSON object (with
/// llama.cpp's server's `schema` extension honoured); `{"type":
/// "json_schema", "json_schema": {"name", "schema", "strict"}}` is always
/// enforced, `strict` or not (a schema without `schema` allows any JSON
/// value).
pub fn response_format(value: Option<&Value>) -> Result<String, ApiError> {
    let format = match value {
        None | Some(Value::Null) => return Ok(String::new()),
        Some(Value::Object(o)) => Fields(o),
        Some(_) => {
            return Err(ApiError::invalid(
                "response_format",
                "must be an object such as {\"type\": \"json_object\"}",
            ))
        }
    };
    let schema = |holder: &Fields, at: &str| -> Result<String, ApiError> {
        match holder.get("schema") {
            None => Ok(String::new()),
            Some(s @ (Value::Object(_) | Value::Bool(_))) => Ok(s.to_string()),
            Some(_) => Err(ApiError::invalid(
                format!("response_format.{at}schema"),
                "must be a JSON Schema (an object)",
            )),
        }
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(String::new()),
        Some("json_object") => {
            let s = schema(&format, "")?;
            Ok(if s.is_empty() {
                r#"{"type":"object"}"#.to_string()
            } else {
                s
            })
        }
        Some("json_schema") => {
            let Some(Value::Object(inner)) = format.get("json_schema") else {
                return Err(ApiError::invalid(
                    "response_format.json_schema",
                    "is required: {\"name\", \"schema\", \"strict\"}",
                ));
            };
            let s = schema(&Fields(inner), "json_schema.")?;
            Ok(if s.is_empty() { "{}".to_string() } else { s })
        }
        _ => Err(ApiError::invalid(
            "response_format.type",
            "must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// The body of either endpoint → the shared request and the response's
/// shape.
pub fn parse_request(kind: Kind, body: &Value) -> Result<(InferRequest, Shape), ApiError> {
    parse_request_for(kind, body, ToolFormat::None)
}

/// [`parse_request`] for a model whose chat template writes tool calls in
/// `format` ([`ToolFormat::None`]: it has no tool section, and tools use
/// the generic format).
pub fn parse_request_for(
    kind: Kind,
    body: &Value,
    format: ToolFormat,
) -> Result<(InferRequest, Shape), ApiError> {
    let f = object(body)?;
    for key in UNSUPPORTED {
        if f.get(key).is_some() {
            return Err(ApiError::invalid(key, "is not supported by this server"));
        }
    }
    let mut request = InferRequest {
        model: f.str("model")?.unwrap_or_default().to_string(),
        temperature: f.f32("temperature")?,
        top_p: f.f32("top_p")?,
        seed: f.seed()?,
        stop: f.stop()?,
        // top_k = -1 is how vLLM and llama-server say "off".
        top_k: match f.get("top_k").and_then(Value::as_i64) {
            Some(-1) => None,
            _ => f.u32("top_k")?,
        },
        min_p: f.f32("min_p")?,
        repetition_penalty: f.f32("repetition_penalty")?,
        presence_penalty: f.f32("presence_penalty")?,
        frequency_penalty: f.f32("frequency_penalty")?,
        n: f.u32("n")?.unwrap_or(1),
        logit_bias: logit_bias(f.get("logit_bias"))?,
        json_schema: response_format(f.get("response_format"))?,
        ..Default::default()
    };
    // `best_of` is the legacy API's server-side ranking: generate more than
    // `n` and return the `n` most likely. Equal to `n` (OpenAI's default of
    // 1, as clients send it) there is nothing to rank.
    if !matches!(f.get("best_of"), None | Some(Value::Null))
        && f.u32("best_of")? != Some(request.n.max(1))
    {
        return Err(ApiError::invalid(
            "best_of",
            "only best_of equal to n (default 1) is supported: this server does not rank \
             extra completions (ask for n and rank them by logprobs)",
        ));
    }
    let stream = f.bool("stream")?;
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage").map_err(|_| {
            ApiError::invalid("stream_options.include_usage", "must be true or false")
        })?,
        Some(_) => return Err(ApiError::invalid("stream_options", "must be an object")),
    };
    let mut echo = None;
    let mut tool_plan = None;
    match kind {
        Kind::Chat => {
            let max = f.u32("max_completion_tokens")?.or(f.u32("max_tokens")?);
            request.max_tokens = max.unwrap_or(0);
            // The client's own max_tokens is held to (vLLM's rule): a
            // prompt + max_tokens beyond the window is a 400, not a cut.
            request.strict_max_tokens = max.is_some();
            if max == Some(0) {
                return Err(ApiError::invalid("max_tokens", "must be at least 1"));
            }
            tool_plan = tools::parse(
                f.get("tools"),
                f.get("tool_choice"),
                f.get("parallel_tool_calls"),
            )?;
            let own_format = tool_plan.is_some() && format != ToolFormat::None;
            request.messages = chat_messages(f.get("messages"), own_format)?;
            if let (Some(plan), true) = (&tool_plan, own_format) {
                // The model's template renders the tools and the history's
                // calls itself; a forced call is held to its own format.
                if !request.json_schema.is_empty() {
                    return Err(ApiError::invalid(
                        "response_format",
                        "cannot be combined with tools (the answer is already constrained to \
                         tool calls); send one of them",
                    ));
                }
                request.tools = plan.openai_tools().to_string();
                request.grammar = plan.grammar(format).unwrap_or_default();
            } else if let Some(plan) = &tool_plan {
                if !request.json_schema.is_empty() {
                    return Err(ApiError::invalid(
                        "response_format",
                        "cannot be combined with tools (the answer is already constrained to \
                         tool calls); send one of them",
                    ));
                }
                request.json_schema = plan.schema().to_string();
                // The tools described after the caller's own system text.
                let instructions = plan.instructions();
                match request.messages.first_mut() {
                    Some(m) if m.role == "system" => {
                        m.content = format!("{}\n\n{instructions}", m.content);
                    }
                    _ => request.messages.insert(
                        0,
                        ChatMessage {
                            role: "system".into(),
                            content: instructions,
                            ..ChatMessage::default()
                        },
                    ),
                }
            }
            request.logprobs = f.bool("logprobs")?;
            request.top_logprobs = f.u32("top_logprobs")?.unwrap_or(0);
        }
        Kind::Completion => {
            let max = f.u32("max_tokens")?;
            request.max_tokens = max.unwrap_or(0);
            request.strict_max_tokens = max.is_some();
            if max == Some(0) {
                return Err(ApiError::invalid("max_tokens", "must be at least 1"));
            }
            request.prompt =
                match f.get("prompt") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                        items[0].as_str().unwrap_or_default().to_string()
                    }
                    Some(Value::Array(_)) => return Err(ApiError::invalid(
                        "prompt",
                        "must be one string (a list of prompts or of token ids is not supported)",
                    )),
                    Some(_) => return Err(ApiError::invalid("prompt", "must be a string")),
                    None => return Err(ApiError::invalid("prompt", "is required")),
                };
            if request.prompt.is_empty() {
                return Err(ApiError::invalid("prompt", "must not be empty"));
            }
            for key in ["tools", "tool_choice"] {
                if f.get(key).is_some() {
                    return Err(ApiError::invalid(
                        key,
                        "is for chat completions (/v1/chat/completions)",
                    ));
                }
            }
            // Insertion (text after the completion) needs a fill-in-the-
            // middle model and prompt format; refused rather than ignored.
            match f.get("suffix") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if s.is_empty() => {}
                Some(_) => {
                    return Err(ApiError::invalid(
                        "suffix",
                        "is not supported by this server (no insertion: send the text before \
                         the gap as the prompt)",
                    ))
                }
            }
            // The legacy API's `logprobs` is the number of alternatives.
            if let Some(k) = f.u32("logprobs")? {
                request.logprobs = true;
                request.top_logprobs = k;
            }
            if f.bool("echo")? {
                echo = Some(request.prompt.clone());
            }
        }
    }
    let shape = Shape {
        kind,
        stream,
        include_usage,
        model: request.model.clone(),
        echo,
        logprobs: request.logprobs,
        tools: tool_plan.is_some(),
        tool_format: if tool_plan.is_some() {
            format
        } else {
            ToolFormat::None
        },
    };
    Ok((request, shape))
}

/// `messages`: roles and text contents (a string, or a list of text parts).
/// The conversation. `structured`: tool calls and tool results stay
/// structured for a chat template that renders them; otherwise they are
/// written in the generic format's words.
fn chat_messages(value: Option<&Value>, structured: bool) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(items)) = value else {
        return Err(ApiError::invalid(
            "messages",
            "is required: a list of {role, content}",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "must not be empty"));
    }
    // The tool each call id of the history named (a tool message's result
    // is introduced by its tool's name).
    let mut called: Vec<(String, String)> = Vec::new();
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |name: &str| format!("messages[{i}].{name}");
            let Value::Object(m) = m else {
                return Err(ApiError::invalid(format!("messages[{i}]"), "must be an object"));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) => r.as_str(),
                _ => return Err(ApiError::invalid(field("role"), "must be a string")),
            };
            // OpenAI's newer name for the system role.
            let role = if role == "developer" { "system" } else { role };
            // Tool calls and their results, in the tools' generic format
            // (a tool's result is a user turn: every template has one).
            if role == "assistant" && !matches!(m.get("tool_calls"), None | Some(Value::Null)) {
                called.extend(tools::call_names(&m["tool_calls"]));
                if structured {
                    // Checked as the generic path checks them.
                    tools::calls_as_text(&m["tool_calls"], &field("tool_calls"))?;
                    let content = match m.get("content") {
                        Some(Value::String(s)) => s.clone(),
                        _ => String::new(),
                    };
                    return Ok(ChatMessage {
                        role: role.to_string(),
                        content,
                        tool_calls: tools::structured_calls(&m["tool_calls"]),
                        ..ChatMessage::default()
                    });
                }
                return Ok(ChatMessage {
                    role: role.to_string(),
                    content: tools::calls_as_text(&m["tool_calls"], &field("tool_calls"))?,
                    ..ChatMessage::default()
                });
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.get("type").and_then(Value::as_str), part.get("text")) {
                            (Some("text"), Some(Value::String(t))) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}]"),
                                    "only text parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                ))
                            }
                        }
                    }
                    text
                }
                _ => {
                    return Err(ApiError::invalid(
                        field("content"),
                        "must be a string or a list of text parts",
                    ))
                }
            };
            if role == "tool" {
                let id = match m.get("tool_call_id") {
                    Some(Value::String(id)) => Some(id.as_str()),
                    None | Some(Value::Null) => None,
                    Some(_) => return Err(ApiError::invalid(field("tool_call_id"), "must be a string")),
                };
                let name = id.and_then(|id| called.iter().find(|(c, _)| c == id));
                if structured {
                    return Ok(ChatMessage {
                        role: "tool".into(),
                        content,
                        tool_call_id: id.unwrap_or_default().to_string(),
                        name: name.map(|(_, n)| n.clone()).unwrap_or_default(),
                        ..ChatMessage::default()
                    });
                }
                return Ok(ChatMessage {
                    role: "user".into(),
                    content: tools::result_as_text(name.map(|(_, n)| n.as_str()), &content),
                    ..ChatMessage::default()
                });
            }
            Ok(ChatMessage {
                role: role.to_string(),
                content,
                ..ChatMessage::default()
            })
        })
        .collect()
}

/// OpenAI's finish reason.
pub fn finish_reason(reason: i32) -> &'static str {
    match FinishReason::try_from(reason).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Length | FinishReason::ContextLength => "length",
        FinishReason::StopSequence | FinishReason::Eos => "stop",
        // vLLM's word for a request ended by the server.
        FinishReason::Cancelled | FinishReason::Unspecified => "abort",
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn id_of(kind: Kind, request_id: &str) -> String {
    match kind {
        Kind::Chat => format!("chatcmpl-{request_id}"),
        Kind::Completion => format!("cmpl-{request_id}"),
    }
}

fn top_entries(top: &[TopLogprob]) -> Vec<Value> {
    top.iter()
        .map(|t| json!({"token": t.token, "logprob": t.logprob, "bytes": t.token.as_bytes()}))
        .collect()
}

/// One choice's text and log-probabilities as they accumulate.
#[derive(Default)]
struct ChoiceAcc {
    text: String,
    finish: Option<&'static str>,
    /// Chat: `logprobs.content` entries.
    chat_logprobs: Vec<Value>,
    /// Completions: tokens, token_logprobs, top_logprobs, text_offset.
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top: Vec<Value>,
    offsets: Vec<usize>,
    prompt_tokens: u32,
    cached_tokens: u32,
    generated: u32,
}

impl ChoiceAcc {
    fn add(&mut self, m: &InferResponse) {
        if let Some(lp) = m.logprob {
            self.chat_logprobs.push(json!({
                "token": m.token,
                "logprob": lp,
                "bytes": m.token.as_bytes(),
                "top_logprobs": top_entries(&m.top_logprobs),
            }));
            self.offsets.push(self.text.len());
            self.tokens.push(m.token.clone());
            self.token_logprobs.push(lp);
            self.top.push(Value::Object(
                m.top_logprobs
                    .iter()
                    .map(|t| (t.token.clone(), json!(t.logprob)))
                    .collect(),
            ));
        }
        self.text.push_str(&m.token);
        if m.finish_reason != FinishReason::Unspecified as i32 {
            self.finish = Some(finish_reason(m.finish_reason));
            if let Some(u) = &m.usage {
                self.prompt_tokens = u.prompt_tokens;
                self.cached_tokens = u.cached_prompt_tokens;
                self.generated = u.generated_tokens;
            }
        }
    }
}

/// Usage over all choices: the prompt once, every choice's tokens; of the
/// prompt, the most tokens any choice's worker found in its KV cache.
fn usage(choices: &[ChoiceAcc]) -> Value {
    let prompt = choices.iter().map(|c| c.prompt_tokens).max().unwrap_or(0);
    let cached = choices.iter().map(|c| c.cached_tokens).max().unwrap_or(0);
    let completion: u32 = choices.iter().map(|c| c.generated).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// Reads every message of a non-streaming request into one response.
async fn collect(mut call: Call, shape: &Shape) -> Result<Value, Status> {
    let mut choices: Vec<ChoiceAcc> = (0..call.n).map(|_| ChoiceAcc::default()).collect();
    let mut model = shape.model.clone();
    while let Some(item) = call.rx.recv().await {
        let m = item?;
        if !m.model.is_empty() {
            model = m.model.clone();
        }
        if let Some(c) = choices.get_mut(m.choice as usize) {
            c.add(&m);
        }
    }
    let body_choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| match shape.kind {
            Kind::Chat if shape.tools => {
                let (message, finish) =
                    tools::message(
                    &c.text,
                    c.finish,
                    &format!("{}_{i}", call.request_id),
                    shape.tool_format,
                );
                json!({"index": i, "message": message, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": shape.logprobs.then(|| json!({"content": c.chat_logprobs})),
                "finish_reason": c.finish,
            }),
            Kind::Completion => json!({
                "index": i,
                "text": format!("{}{}", shape.echo.as_deref().unwrap_or(""), c.text),
                "logprobs": shape.logprobs.then(|| json!({
                    "tokens": c.tokens,
                    "token_logprobs": c.token_logprobs,
                    "top_logprobs": c.top,
                    "text_offset": c.offsets.iter().map(|o| o + shape.echo.as_deref().map_or(0, str::len)).collect::<Vec<_>>(),
                })),
                "finish_reason": c.finish,
            }),
        })
        .collect();
    Ok(json!({
        "id": id_of(shape.kind, &call.request_id),
        "object": match shape.kind { Kind::Chat => "chat.completion", Kind::Completion => "text_completion" },
        "created": unix_now(),
        "model": model,
        "choices": body_choices,
        "usage": usage(&choices),
    }))
}

/// The SSE event stream of a streaming request.
struct Events {
    call: Call,
    shape: Shape,
    id: String,
    created: u64,
    model: String,
    choices: Vec<ChoiceAcc>,
    /// Choices whose first chunk (with the role, or the echo) went out.
    opened: Vec<bool>,
    done: bool,
}

fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

impl Events {
    fn new(call: Call, shape: Shape) -> Self {
        let n = call.n as usize;
        Self {
            id: id_of(shape.kind, &call.request_id),
            created: unix_now(),
            model: shape.model.clone(),
            choices: (0..n).map(|_| ChoiceAcc::default()).collect(),
            opened: vec![false; n],
            call,
            shape,
            done: false,
        }
    }

    fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Bytes>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        match self.call.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(m))) => Poll::Ready(Some(self.chunk(&m))),
            Poll::Ready(Some(Err(status))) => {
                // Mid-stream failure: an error event (the OpenAI clients
                // raise it), and no [DONE].
                self.done = true;
                Poll::Ready(Some(event(&ApiError::from_status(&status).body())))
            }
            Poll::Ready(None) => {
                self.done = true;
                let mut tail = Vec::new();
                if self.shape.include_usage {
                    tail.extend_from_slice(&event(&json!({
                        "id": self.id,
                        "object": self.object(),
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage(&self.choices),
                    })));
                }
                tail.extend_from_slice(b"data: [DONE]\n\n");
                Poll::Ready(Some(Bytes::from(tail)))
            }
        }
    }

    fn object(&self) -> &'static str {
        match self.shape.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        }
    }

    fn chunk(&mut self, m: &InferResponse) -> Bytes {
        if !m.model.is_empty() {
            self.model = m.model.clone();
        }
        let i = m.choice as usize;
        if i >= self.choices.len() {
            return Bytes::new();
        }
        self.choices[i].add(m);
        let finish = (m.finish_reason != FinishReason::Unspecified as i32)
            .then(|| finish_reason(m.finish_reason));
        if self.shape.tools {
            return self.tool_chunks(i, finish);
        }
        let first = !std::mem::replace(&mut self.opened[i], true);
        let choice = match self.shape.kind {
            Kind::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if !m.token.is_empty() || (first && finish.is_none()) {
                    delta.insert("content".into(), json!(m.token));
                }
                let logprobs = m.logprob.map(|lp| {
                    json!({"content": [{
                        "token": m.token, "logprob": lp, "bytes": m.token.as_bytes(),
                        "top_logprobs": top_entries(&m.top_logprobs),
                    }]})
                });
                json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                let echo = if first {
                    self.shape.echo.as_deref().unwrap_or("")
                } else {
                    ""
                };
                let logprobs = m.logprob.map(|lp| {
                    let top: Map<String, Value> = m
                        .top_logprobs
                        .iter()
                        .map(|t| (t.token.clone(), json!(t.logprob)))
                        .collect();
                    json!({"tokens": [m.token], "token_logprobs": [lp], "top_logprobs": [top]})
                });
                json!({"index": i, "text": format!("{echo}{}", m.token), "logprobs": logprobs, "finish_reason": finish})
            }
        };
        self.wrap(choice)
    }

    /// One chunk event holding `choice` (`usage` null when a usage chunk
    /// comes last).
    fn wrap(&self, choice: Value) -> Bytes {
        let mut chunk = json!({
            "id": self.id,
            "object": self.object(),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if self.shape.include_usage {
            chunk["usage"] = Value::Null;
        }
        event(&chunk)
    }

    /// With tools: nothing until choice `i` finishes (its answer is one
    /// JSON object), then its deltas in OpenAI's order (the role and each
    /// call's id and name, then its arguments; or the content) and a last
    /// chunk with the finish reason.
    fn tool_chunks(&mut self, i: usize, finish: Option<&'static str>) -> Bytes {
        if finish.is_none() {
            return Bytes::new();
        }
        let id_base = format!("{}_{i}", self.call.request_id);
        let (deltas, finish) = tools::deltas(
            &self.choices[i].text,
            finish,
            &id_base,
            self.shape.tool_format,
        );
        let mut out = Vec::new();
        let chunk = |delta: Value, finish: Option<&str>| {
            self.wrap(
                json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": finish}),
            )
        };
        for (k, mut delta) in deltas.into_iter().enumerate() {
            if k == 0 {
                delta["role"] = json!("assistant");
            }
            out.extend_from_slice(&chunk(delta, None));
        }
        out.extend_from_slice(&chunk(json!({}), finish));
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kind: Kind, body: Value) -> Result<(InferRequest, Shape), ApiError> {
        parse_request(kind, &body)
    }

    fn param(r: Result<(InferRequest, Shape), ApiError>) -> String {
        r.expect_err("refused").param.expect("names a field")
    }

    #[test]
    fn chat_bodies_become_requests() {
        let (r, s) = parse(
            Kind::Chat,
            json!({
                "model": "m", "messages": [
                    {"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}
                ],
                "max_completion_tokens": 7, "temperature": 0, "stop": "x", "seed": -1,
                "stream": true, "stream_options": {"include_usage": true},
                "logprobs": true, "top_logprobs": 3, "n": 2, "top_k": -1, "user": "ignored"
            }),
        )
        .unwrap();
        assert_eq!(r.messages[0].role, "system");
        assert_eq!(r.messages[1].content, "Hi!");
        assert_eq!(r.max_tokens, 7);
        assert!(r.strict_max_tokens, "a client's max_tokens is held to");
        assert_eq!(r.temperature, Some(0.0));
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert_eq!(r.seed, Some(u64::MAX));
        assert_eq!((r.logprobs, r.top_logprobs, r.n), (true, 3, 2));
        assert_eq!(r.top_k, None, "top_k -1 means off");
        assert_eq!(r.model, "m");
        assert!(s.stream && s.include_usage && s.logprobs);
    }

    #[test]
    fn tools_become_a_system_message_and_a_schema() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let (r, s) = parse(
            Kind::Chat,
            json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_9", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_9", "content": "18C"}
            ], "tools": tools, "tool_choice": "required"}),
        )
        .unwrap();
        assert!(s.tools);
        assert!(r.messages[0]
            .content
            .starts_with("Be brief.\n\nYou can call these tools."));
        assert!(r.messages[0].content.contains("get_weather"));
        assert_eq!(r.messages[2].role, "assistant");
        assert_eq!(
            r.messages[2].content,
            r#"Calling get_weather({"city":"Paris"})."#
        );
        assert_eq!(r.messages[3].role, "user");
        assert_eq!(r.messages[3].content, "Tool result (get_weather): 18C");
        let schema: Value = serde_json::from_str(&r.json_schema).unwrap();
        assert_eq!(schema["required"], json!(["tool_calls"]));
        // No system message: one is put first.
        let (r, _) = parse(
            Kind::Chat,
            json!({"messages": [{"role": "user", "content": "Hi"}], "tools": tools}),
        )
        .unwrap();
        assert_eq!(r.messages[0].role, "system");
        assert_eq!(r.messages.len(), 2);
        // tool_choice none: no tools at all.
        let (r, s) = parse(
            Kind::Chat,
            json!({"messages": [{"role": "user", "content": "Hi"}], "tools": tools, "tool_choice": "none"}),
        )
        .unwrap();
        assert!(!s.tools && r.json_schema.is_empty() && r.messages.len() == 1);
        assert_eq!(
            param(parse(
                Kind::Chat,
                json!({"messages": [{"role": "user", "content": "Hi"}], "tools": tools,
                       "response_format": {"type": "json_object"}}),
            )),
            "response_format"
        );
        assert_eq!(
            param(parse(
                Kind::Chat,
                json!({"messages": [{"role": "user", "content": "Hi"}], "functions": []}),
            )),
            "functions"
        );
    }

    #[test]
    fn completion_bodies_become_requests() {
        let (r, s) = parse(
            Kind::Completion,
            json!({"prompt": ["Once"], "max_tokens": 5, "logprobs": 2, "echo": true, "stop": ["a", "b"]}),
        )
        .unwrap();
        assert_eq!(r.prompt, "Once");
        assert_eq!((r.logprobs, r.top_logprobs), (true, 2));
        assert_eq!(s.echo.as_deref(), Some("Once"));
        assert_eq!(r.stop.len(), 2);
        assert!(!s.stream);
        assert!(r.strict_max_tokens);
        let (r, _) = parse(Kind::Completion, json!({"prompt": "a"})).unwrap();
        assert!(
            !r.strict_max_tokens,
            "no max_tokens: generate until the window is full"
        );
    }

    #[test]
    fn logit_bias_and_best_of_as_clients_send_them_are_taken() {
        let (r, _) = parse(
            Kind::Completion,
            json!({"prompt": "a", "logit_bias": {"5": -100, " 17 ": 2.5}, "best_of": 1, "suffix": null}),
        )
        .unwrap();
        assert_eq!(r.logit_bias.len(), 2);
        assert_eq!((r.logit_bias[&5], r.logit_bias[&17]), (-100.0, 2.5));
        let (r, _) = parse(
            Kind::Chat,
            json!({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {}, "n": 2, "best_of": 2}),
        )
        .unwrap();
        assert!(r.logit_bias.is_empty());
        assert_eq!(r.n, 2);
    }

    #[test]
    fn a_response_format_becomes_the_schema_sent_to_the_worker() {
        let schema = |format: Value| {
            let (r, _) = parse(
                Kind::Chat,
                json!({"messages": [{"role": "user", "content": "a"}],
                "response_format": format}),
            )
            .unwrap();
            r.json_schema
        };
        assert_eq!(schema(json!({"type": "text"})), "");
        assert_eq!(schema(Value::Null), "");
        assert_eq!(
            schema(json!({"type": "json_object"})),
            r#"{"type":"object"}"#
        );
        let s = json!({"type": "object", "properties": {"city": {"type": "string"}}});
        let got = schema(
            json!({"type": "json_schema", "json_schema": {"name": "c", "schema": s, "strict": true}}),
        );
        assert_eq!(serde_json::from_str::<Value>(&got).unwrap(), s);
        // llama.cpp's server's extension: a schema on json_object.
        let got = schema(json!({"type": "json_object", "schema": s}));
        assert_eq!(serde_json::from_str::<Value>(&got).unwrap(), s);
        assert_eq!(
            schema(json!({"type": "json_schema", "json_schema": {"name": "any"}})),
            "{}"
        );
        let (r, _) = parse(
            Kind::Completion,
            json!({"prompt": "a", "response_format": {"type": "json_object"}}),
        )
        .unwrap();
        assert_eq!(r.json_schema, r#"{"type":"object"}"#);
        let refused = |format: Value| {
            param(parse(
                Kind::Completion,
                json!({"prompt": "a", "response_format": format}),
            ))
        };
        assert_eq!(refused(json!("json")), "response_format");
        assert_eq!(refused(json!({"type": "yaml"})), "response_format.type");
        assert_eq!(
            refused(json!({"type": "json_schema"})),
            "response_format.json_schema"
        );
        assert_eq!(
            refused(json!({"type": "json_schema", "json_schema": {"schema": "{}"}})),
            "response_format.json_schema.schema"
        );
    }

    #[test]
    fn refusals_name_the_field() {
        assert_eq!(
            param(parse(Kind::Chat, json!({"messages": "hi"}))),
            "messages"
        );
        assert_eq!(
            param(parse(
                Kind::Chat,
                json!({"messages": [{"role": "user", "content": 5}]})
            )),
            "messages[0].content"
        );
        assert_eq!(
            param(parse(
                Kind::Chat,
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
            )),
            "messages[0].content[0]"
        );
        assert_eq!(
            param(parse(
                Kind::Completion,
                json!({"prompt": "a", "temperature": "hot"})
            )),
            "temperature"
        );
        assert_eq!(
            param(parse(
                Kind::Completion,
                json!({"prompt": "a", "max_tokens": -3})
            )),
            "max_tokens"
        );
        assert_eq!(
            param(parse(
                Kind::Completion,
                json!({"prompt": "a", "max_tokens": 0})
            )),
            "max_tokens"
        );
        assert_eq!(
            param(parse(Kind::Completion, json!({"prompt": [1, 2]}))),
            "prompt"
        );
        assert_eq!(
            param(parse(Kind::Completion, json!({"prompt": "a", "tools": []}))),
            "tools"
        );
        assert_eq!(
            param(parse(Kind::Completion, json!({"prompt": "a", "stop": [1]}))),
            "stop"
        );
        for bad in [json!([1]), json!({"x": 1}), json!({"5": "high"})] {
            assert_eq!(
                param(parse(
                    Kind::Chat,
                    json!({"messages": [], "logit_bias": bad})
                )),
                "logit_bias"
            );
        }
        assert_eq!(
            param(parse(
                Kind::Completion,
                json!({"prompt": "a", "best_of": 3})
            )),
            "best_of"
        );
        assert_eq!(
            param(parse(
                Kind::Completion,
                json!({"prompt": "a", "suffix": "end"})
            )),
            "suffix"
        );
        assert_eq!(param(parse(Kind::Completion, json!([1]))), "body");
    }

    #[test]
    fn grpc_codes_map_to_openai_statuses() {
        assert_eq!(http_of(Code::InvalidArgument).0, StatusCode::BAD_REQUEST);
        assert_eq!(http_of(Code::Unauthenticated).0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            http_of(Code::NotFound),
            (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found")
            )
        );
        assert_eq!(
            http_of(Code::ResourceExhausted).0,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_of(Code::Unavailable).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            http_of(Code::DeadlineExceeded).0,
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(finish_reason(FinishReason::Eos as i32), "stop");
        assert_eq!(finish_reason(FinishReason::ContextLength as i32), "length");
    }
}
