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
//! A body's scalar fields are deserialized into a typed struct
//! ([`request::Body`]) whose type errors carry the field's path
//! (`serde_path_to_error`); its structured fields (messages, tools,
//! response_format, logit_bias, prompt) are read by functions that name the
//! nested path they refuse (`messages[2].content[0]`). Either way a 400
//! says which field, as every other refusal does.
//!
//! # Layout
//! - this module: the routes, the key check, the small endpoints (models,
//!   tokenize, health) and the shared start of a generation ([`begin`]).
//! - [`request`]: bodies into the shared request and the answer's [`Shape`].
//! - [`response`]: whole answers; [`sse`]: the one SSE encoder and the
//!   chunk stream; [`error`]: the one error type ([`ApiError`]).
//! - [`tools`]: tool calling; [`responses`]: the Responses API.
//! - [`server`]: connections (HTTP/1.1 and 2, TLS, limits, timeouts);
//!   [`edge`]: errors outside the routes, and CORS.

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
use crate::front::{Call, Front};
use crate::metrics::Api;
use crate::service::health_status;

/// Largest request body accepted (a prompt at the default byte limit, in
/// JSON, fits with room to spare).
pub const MAX_BODY_BYTES: usize = 4 << 20;

pub mod edge;
mod error;
mod request;
mod response;
mod responses;
mod server;
mod sse;
pub mod tools;

pub use error::{http_of, ApiError};
pub(crate) use request::*;
pub use request::{parse_request, parse_request_for, response_format, Kind, Shape};
pub use response::finish_reason;
pub(crate) use response::*;
pub use server::{HttpMetrics, HTTP_ALPN};
pub(crate) use sse::*;

/// Serves the routes on `listener` (over TLS with `tls`, offering
/// [`HTTP_ALPN`]) with `config`'s connection limits and timeouts, as the
/// process's "HTTP API" [`nanoinfer_proto::server::Server`]: drained, open
/// responses finish within the drain's bound. See [`server`] for the
/// connection handling.
pub fn spawn(
    listener: tokio::net::TcpListener,
    front: Arc<Front>,
    tls: Option<Arc<nanoinfer_proto::tls::ServerTls>>,
    config: crate::config::HttpServerConfig,
    metrics: Arc<HttpMetrics>,
) -> std::io::Result<nanoinfer_proto::server::Server> {
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
/// answers `{tokens}` only): `{model?, prompt | messages (with tools?,
/// tool_choice?), add_special_tokens? (default true), return_token_strs?}`
/// → `{tokens, count, max_model_len, model, token_strs?}`.
async fn tokenize(
    State(front): State<Arc<Front>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let metadata = authorized(&front, headers)?;
    let body = json_body(&body)?;
    let f = object(&body)?;
    // With tools, the conversation as a chat request with them renders it
    // (the model's template, or the generic format's system message).
    let (messages, tools) = match (f.get("messages"), f.get("tools")) {
        (Some(m), Some(t)) => {
            let model = f.str("model")?;
            let format = front.tool_format(model).await;
            let mut chat = json!({"messages": m, "tools": t});
            if let Some(c) = f.get("tool_choice") {
                chat["tool_choice"] = c.clone();
            }
            let (request, _) = parse_request_for(Kind::Chat, &chat, format)?;
            (request.messages, request.tools)
        }
        (Some(m), None) => (chat_messages(Some(m), false)?, String::new()),
        (None, _) => (Vec::new(), String::new()),
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
        tools,
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
            // With tools, the schema (or, in a template's own format, the
            // grammar) the worker refused is theirs.
            if shape.tools && matches!(e.param.as_deref(), Some("response_format" | "grammar")) {
                e.param = Some("tools".into());
            }
            e.into_response()
        })?;
    Ok((call, shape))
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
    fn a_wrong_type_is_refused_by_its_path() {
        let chat = |extra: Value| {
            let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            param(parse(Kind::Chat, body))
        };
        assert_eq!(
            chat(json!({"stream_options": {"include_usage": "yes"}})),
            "stream_options.include_usage"
        );
        assert_eq!(chat(json!({"max_tokens": "5"})), "max_tokens");
        assert_eq!(
            chat(json!({"max_completion_tokens": -1})),
            "max_completion_tokens"
        );
        assert_eq!(chat(json!({"temperature": "hot"})), "temperature");
        assert_eq!(chat(json!({"stop": 3})), "stop");
        assert_eq!(chat(json!({"stop": ["a", 1]})), "stop");
        assert_eq!(chat(json!({"top_k": -2})), "top_k");
        assert_eq!(chat(json!({"seed": 1.5})), "seed");
        assert_eq!(chat(json!({"logprobs": 3})), "logprobs");
        assert_eq!(chat(json!({"n": 1e10})), "n");
        let completion = param(parse(
            Kind::Completion,
            json!({"prompt": "a", "logprobs": true}),
        ));
        assert_eq!(completion, "logprobs");
        // What clients send and this server ignores is taken.
        let (r, _) = parse(
            Kind::Chat,
            json!({"messages": [{"role": "user", "content": "hi"}], "user": "u1",
                   "metadata": {"a": "b"}, "store": false, "stop": null, "seed": -1,
                   "top_k": -1, "temperature": 1}),
        )
        .unwrap();
        assert_eq!(
            (r.seed, r.top_k, r.temperature),
            (Some(u64::MAX), None, Some(1.0))
        );
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
        // A template with a tool section: the tools and the history's calls
        // go to it structured, a forced call gets the template's grammar.
        let body = json!({"messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18 C"}],
            "tools": tools, "tool_choice": "required"});
        let (r, s) = parse_request_for(Kind::Chat, &body, ToolFormat::Hermes).unwrap();
        assert_eq!((s.tools, s.tool_format), (true, ToolFormat::Hermes));
        assert!(
            r.json_schema.is_empty() && r.grammar.contains("<tool_call>"),
            "{}",
            r.grammar
        );
        assert_eq!(r.messages.len(), 3, "no system message added");
        assert_eq!(r.messages[1].tool_calls[0].name, "get_weather");
        assert_eq!(
            (r.messages[2].role.as_str(), r.messages[2].name.as_str()),
            ("tool", "get_weather")
        );
        let tools_sent: Value = serde_json::from_str(&r.tools).unwrap();
        assert_eq!(tools_sent[0]["function"]["name"], "get_weather");
        let mut with_format = body.clone();
        with_format["response_format"] = json!({"type": "json_object"});
        assert_eq!(
            param(parse_request_for(
                Kind::Chat,
                &with_format,
                ToolFormat::Hermes
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
