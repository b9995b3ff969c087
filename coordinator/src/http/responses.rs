//! `POST /v1/responses`: OpenAI's Responses API, as a chat request.
//!
//! The body becomes a chat completion's (`instructions` the system message,
//! `input` the conversation: a string is one user message, a list holds
//! messages whose content is a string or text parts, and the
//! `function_call` / `function_call_output` items of a tool round trip;
//! `max_output_tokens` is `max_tokens`; function `tools`, `tool_choice`
//! and `parallel_tool_calls` in chat's shape) and runs on the same path;
//! the answer is one `message` output item with one `output_text` part, or
//! a `function_call` item per tool call. Streaming sends OpenAI's typed
//! events (`response.created`, `response.output_item.added`,
//! `response.content_part.added`, `response.output_text.delta` per token,
//! then the `.done` events and `response.completed`; an answer with tools
//! goes out when complete, its calls with `function_call_arguments`
//! events). Nothing is stored: `previous_response_id`, `background` and
//! `store: true` retrieval are refused, as are hosted tools and non-text
//! items, with a 400 naming the field.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use nanoinfer_proto::nanoinfer::FinishReason;
use serde_json::{json, Map, Value};

use super::{
    begin, finish_reason, object, parse_request_for, sse_response, unix_now, ApiError, Kind,
};
use crate::error::REQUEST_ID_HEADER;
use crate::front::{Call, Front};
use nanoinfer_vocab::ToolFormat;

/// Fields of the Responses API refused rather than ignored.
const REFUSED: [&str; 4] = [
    "previous_response_id",
    "background",
    "conversation",
    "prompt",
];

/// The text of a content value: a string, or a list of text parts.
fn content_text(value: &Value, at: &str) -> Result<String, ApiError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, part.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text", Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{at}.content[{j}]"),
                            "only text parts (input_text, output_text) are supported",
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid(
            format!("{at}.content"),
            "must be a string or a list of text parts",
        )),
    }
}

/// The Responses API's function tools (`{"type": "function", "name",
/// "description", "parameters", "strict"}`) in chat's shape; `None` when
/// there are none. Other tool types (hosted search, files, computer use)
/// are refused by index.
fn function_tools(value: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let list = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) if list.is_empty() => return Ok(None),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(ApiError::invalid("tools", "must be a list of tools")),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid(
                format!("tools[{i}].type"),
                "only function tools are supported by this server",
            ));
        }
        let mut function = Map::new();
        for key in ["name", "description", "parameters"] {
            if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                function.insert(key.into(), v.clone());
            }
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Some(Value::Array(out)))
}

/// The body as a chat completion request's body.
fn to_chat(body: &Value) -> Result<Value, ApiError> {
    let f = object(body)?;
    for key in REFUSED {
        if !matches!(
            f.get(key),
            None | Some(Value::Null) | Some(Value::Bool(false))
        ) {
            return Err(ApiError::invalid(
                key,
                "is not supported by this server (responses are not stored)",
            ));
        }
    }
    let tools = function_tools(f.get("tools"))?;
    // `text.format` flattens what chat nests under `json_schema`.
    let format = match f.get("text").and_then(|t| t.get("format")) {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("json_schema") => {
            Some(json!({"type": "json_schema", "json_schema": o}))
        }
        Some(other) => Some(other.clone()),
    };
    let mut messages = Vec::new();
    match f.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => return Err(ApiError::invalid("instructions", "must be a string")),
    }
    match f.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = format!("input[{i}]");
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                match kind {
                    // A call of the history: consecutive calls are one
                    // assistant turn.
                    "function_call" => {
                        let text = |k: &str| match item.get(k) {
                            Some(Value::String(s)) => Ok(s.clone()),
                            _ => Err(ApiError::invalid(format!("{at}.{k}"), "must be a string")),
                        };
                        let call = json!({"id": text("call_id")?, "type": "function",
                            "function": {"name": text("name")?, "arguments": text("arguments")?}});
                        let merge = messages.last_mut().and_then(|m: &mut Value| {
                            (m["role"] == "assistant" && m["tool_calls"].is_array())
                                .then(|| m["tool_calls"].as_array_mut())
                                .flatten()
                        });
                        match merge {
                            Some(calls) => calls.push(call),
                            None => messages.push(
                                json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                            ),
                        }
                        continue;
                    }
                    "function_call_output" => {
                        let id = item.get("call_id").and_then(Value::as_str).ok_or_else(|| {
                            ApiError::invalid(format!("{at}.call_id"), "must be a string")
                        })?;
                        let output = match item.get("output") {
                            Some(Value::String(s)) => s.clone(),
                            Some(v @ Value::Array(_)) => content_text(v, &at)?,
                            _ => {
                                return Err(ApiError::invalid(
                                    format!("{at}.output"),
                                    "must be a string",
                                ))
                            }
                        };
                        messages
                            .push(json!({"role": "tool", "tool_call_id": id, "content": output}));
                        continue;
                    }
                    _ => {}
                }
                let role = item.get("role").and_then(Value::as_str);
                let (Some(role), "message") = (role, kind) else {
                    return Err(ApiError::invalid(
                        at,
                        "only messages ({role, content}), function_call and \
                         function_call_output items are supported",
                    ));
                };
                let content = item.get("content").unwrap_or(&Value::Null);
                messages.push(json!({"role": role, "content": content_text(content, &at)?}));
            }
        }
        None => return Err(ApiError::invalid("input", "is required")),
        Some(_) => {
            return Err(ApiError::invalid(
                "input",
                "must be a string or a list of messages",
            ))
        }
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = tools {
        chat.insert("tools".into(), tools);
        match f.get("tool_choice") {
            None => {}
            Some(Value::Object(o)) => {
                let name = o.get("name").cloned().unwrap_or(Value::Null);
                chat.insert(
                    "tool_choice".into(),
                    json!({"type": "function", "function": {"name": name}}),
                );
            }
            Some(v) => {
                chat.insert("tool_choice".into(), v.clone());
            }
        }
        if let Some(p) = f.get("parallel_tool_calls") {
            chat.insert("parallel_tool_calls".into(), p.clone());
        }
    }
    if let Some(format) = format {
        chat.insert("response_format".into(), format);
    }
    for (from, to) in [
        ("model", "model"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("max_output_tokens", "max_tokens"),
        ("stream", "stream"),
    ] {
        if let Some(v) = f.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), v.clone());
        }
    }
    Ok(Value::Object(chat))
}

/// A chat refusal's field, in this API's names.
fn rename(mut e: ApiError) -> ApiError {
    e.param = e.param.map(|p| {
        if p == "max_tokens" {
            "max_output_tokens".to_string()
        } else if let Some(rest) = p.strip_prefix("messages") {
            format!("input{rest}")
        } else if p.starts_with("tools[") && p.contains("].function.") {
            p.replacen("].function.", "].", 1)
        } else if let Some(rest) = p.strip_prefix("response_format") {
            format!("text.format{}", rest.replacen(".json_schema", "", 1))
        } else {
            p
        }
    });
    e
}

/// What a finished response says about itself.
struct Done {
    /// The request had tools: the text is read for calls
    /// ([`super::tools::message`]) in this format.
    tools: Option<ToolFormat>,
    text: String,
    model: String,
    finish: i32,
    prompt_tokens: u32,
    cached_tokens: u32,
    generated: u32,
}

fn response_object(id: &str, created: u64, d: &Done, status: &str) -> Value {
    let incomplete = d.finish == FinishReason::Length as i32;
    let status = if status == "completed" && incomplete {
        "incomplete"
    } else {
        status
    };
    let output = if status == "in_progress" {
        json!([])
    } else {
        Value::Array(output_items(id, d))
    };
    json!({
        "id": format!("resp_{id}"),
        "object": "response",
        "created_at": created,
        "status": status,
        "model": d.model,
        "output": output,
        "incomplete_details": incomplete.then(|| json!({"reason": "max_output_tokens"})),
        "error": null,
        "parallel_tool_calls": false,
        "tool_choice": "none",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "usage": {
            "input_tokens": d.prompt_tokens,
            "input_tokens_details": {"cached_tokens": d.cached_tokens},
            "output_tokens": d.generated,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": d.prompt_tokens + d.generated,
        },
    })
}

/// A finished response's output: one message, or, when the answer calls
/// tools, a `function_call` item per call (after a message with the text
/// before them, if any).
fn output_items(id: &str, d: &Done) -> Vec<Value> {
    let Some(format) = d.tools else {
        return vec![message_item(id, &d.text, "completed")];
    };
    let (m, _) = super::tools::message(
        &d.text,
        Some(finish_reason(d.finish)),
        &format!("{id}_0"),
        format,
    );
    let text = m.content.as_deref().unwrap_or_default();
    if m.tool_calls.is_empty() {
        return vec![message_item(id, text, "completed")];
    }
    let mut out = Vec::new();
    if !text.is_empty() {
        out.push(message_item(id, text, "completed"));
    }
    for (k, c) in m.tool_calls.iter().enumerate() {
        out.push(
            json!({"type": "function_call", "id": format!("fc_{id}_{k}"),
            "call_id": c.id, "name": c.function.name,
            "arguments": c.function.arguments, "status": "completed"}),
        );
    }
    out
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "in_progress" {
        json!([])
    } else {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    };
    json!({"type": "message", "id": format!("msg_{id}"), "status": status,
           "role": "assistant", "content": content})
}

/// `POST /v1/responses`.
pub(super) async fn responses(
    State(front): State<Arc<Front>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parse = |v: &Value, format| {
        to_chat(v).and_then(|chat| parse_request_for(Kind::Chat, &chat, format).map_err(rename))
    };
    let (call, shape) = match begin(&front, headers, &body, parse).await {
        Ok(started) => started,
        Err(response) => return response,
    };
    let request_id = call.request_id.clone();
    let tools = shape.tools.then_some(shape.tool_format);
    let mut response = if shape.stream {
        sse_response(Body::from_stream(events(
            call,
            start(shape.model.clone(), tools),
        )))
    } else {
        match collect(call, start(shape.model.clone(), tools)).await {
            Ok(done) => axum::Json(response_object(&request_id, unix_now(), &done, "completed"))
                .into_response(),
            Err(status) => return ApiError::from_status(&status).into_response(),
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

/// Adds one message to `done`.
fn add(done: &mut Done, m: &nanoinfer_proto::nanoinfer::InferResponse) {
    if !m.model.is_empty() {
        done.model = m.model.clone();
    }
    done.text.push_str(&m.token);
    if m.finish_reason != FinishReason::Unspecified as i32 {
        done.finish = m.finish_reason;
        if let Some(u) = &m.usage {
            done.prompt_tokens = u.prompt_tokens;
            done.cached_tokens = u.cached_prompt_tokens;
            done.generated = u.generated_tokens;
        }
    }
}

fn start(model: String, tools: Option<ToolFormat>) -> Done {
    Done {
        tools,
        text: String::new(),
        model,
        finish: FinishReason::Unspecified as i32,
        prompt_tokens: 0,
        cached_tokens: 0,
        generated: 0,
    }
}

async fn collect(mut call: Call, mut done: Done) -> Result<Done, tonic::Status> {
    while let Some(item) = call.rx.recv().await {
        add(&mut done, &*item?);
    }
    Ok(done)
}

/// One typed SSE event.
fn sse(seq: &mut u64, mut data: Value) -> Bytes {
    data["sequence_number"] = json!(*seq);
    *seq += 1;
    let kind = data["type"].as_str().unwrap_or("error").to_string();
    super::encode(Some(&kind), &data)
}

/// The events of one finished output item of an answer with tools, at
/// `index`: added, its text or arguments whole, done.
fn tool_events(out: &mut Vec<Bytes>, seq: &mut u64, index: usize, item: Value) {
    let item_id = item["id"].clone();
    let mut opening = item.clone();
    opening["status"] = json!("in_progress");
    if item["type"] == "function_call" {
        opening["arguments"] = json!("");
        out.push(sse(
            seq,
            json!({"type": "response.output_item.added",
            "output_index": index, "item": opening}),
        ));
        out.push(sse(
            seq,
            json!({"type": "response.function_call_arguments.delta",
            "item_id": item_id, "output_index": index, "delta": item["arguments"]}),
        ));
        out.push(sse(
            seq,
            json!({"type": "response.function_call_arguments.done",
            "item_id": item_id, "output_index": index, "arguments": item["arguments"]}),
        ));
    } else {
        let text = item["content"][0]["text"].clone();
        opening["content"] = json!([]);
        out.push(sse(
            seq,
            json!({"type": "response.output_item.added",
            "output_index": index, "item": opening}),
        ));
        let part = |t: &Value| json!({"type": "output_text", "text": t, "annotations": []});
        out.push(sse(
            seq,
            json!({"type": "response.content_part.added", "item_id": item_id,
            "output_index": index, "content_index": 0, "part": part(&json!(""))}),
        ));
        out.push(sse(
            seq,
            json!({"type": "response.output_text.delta", "item_id": item_id,
            "output_index": index, "content_index": 0, "delta": text, "logprobs": []}),
        ));
        out.push(sse(
            seq,
            json!({"type": "response.output_text.done", "item_id": item_id,
            "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
        ));
        out.push(sse(
            seq,
            json!({"type": "response.content_part.done", "item_id": item_id,
            "output_index": index, "content_index": 0, "part": part(&text)}),
        ));
    }
    out.push(sse(
        seq,
        json!({"type": "response.output_item.done",
        "output_index": index, "item": item}),
    ));
}

/// The event stream of a streamed response.
fn events(
    call: Call,
    done: Done,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let id = call.request_id.clone();
    let created = unix_now();
    let state = (call, done, 0u64, false, false);
    futures::stream::unfold(
        state,
        move |(mut call, mut done, mut seq, mut opened, finished)| {
            let id = id.clone();
            async move {
                if finished {
                    return None;
                }
                let mut out = Vec::new();
                let item_id = format!("msg_{id}");
                if !opened {
                    opened = true;
                    let r = response_object(&id, created, &done, "in_progress");
                    out.push(sse(
                        &mut seq,
                        json!({"type": "response.created", "response": r}),
                    ));
                    out.push(sse(
                        &mut seq,
                        json!({"type": "response.in_progress", "response": r}),
                    ));
                    if done.tools.is_none() {
                        out.push(sse(
                            &mut seq,
                            json!({"type": "response.output_item.added", "output_index": 0,
                        "item": message_item(&id, "", "in_progress")}),
                        ));
                        out.push(sse(
                            &mut seq,
                            json!({"type": "response.content_part.added", "item_id": item_id,
                        "output_index": 0, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": []}}),
                        ));
                    }
                }
                match call.rx.next().await {
                    Some(Ok(m)) => {
                        add(&mut done, &m);
                        // With tools the answer is read when complete.
                        if !m.token.is_empty() && done.tools.is_none() {
                            out.push(sse(&mut seq, json!({"type": "response.output_text.delta", "item_id": item_id,
                            "output_index": 0, "content_index": 0, "delta": m.token, "logprobs": []})));
                        }
                        Some((
                            Ok(Bytes::from(out.concat())),
                            (call, done, seq, opened, false),
                        ))
                    }
                    Some(Err(status)) => {
                        let e = ApiError::from_status(&status);
                        out.push(sse(&mut seq, json!({"type": "error", "code": e.code, "message": e.message, "param": e.param})));
                        Some((
                            Ok(Bytes::from(out.concat())),
                            (call, done, seq, opened, true),
                        ))
                    }
                    None => {
                        if done.tools.is_some() {
                            for (k, item) in output_items(&id, &done).into_iter().enumerate() {
                                tool_events(&mut out, &mut seq, k, item);
                            }
                        } else {
                            text_done_events(&mut out, &mut seq, &id, &done.text);
                        }
                        let r = response_object(&id, created, &done, "completed");
                        let kind = if r["status"] == "incomplete" {
                            "response.incomplete"
                        } else {
                            "response.completed"
                        };
                        out.push(sse(&mut seq, json!({"type": kind, "response": r})));
                        Some((
                            Ok(Bytes::from(out.concat())),
                            (call, done, seq, opened, true),
                        ))
                    }
                }
            }
        },
    )
}

/// The closing events of the streamed text message (output index 0).
fn text_done_events(out: &mut Vec<Bytes>, seq: &mut u64, id: &str, text: &str) {
    let item_id = format!("msg_{id}");
    out.push(sse(
        seq,
        json!({"type": "response.output_text.done", "item_id": item_id,
            "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
    ));
    out.push(sse(
        seq,
        json!({"type": "response.content_part.done", "item_id": item_id,
            "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": text, "annotations": []}}),
    ));
    out.push(sse(
        seq,
        json!({"type": "response.output_item.done", "output_index": 0,
            "item": message_item(id, text, "completed")}),
    ));
}

#[cfg(test)]
mod tests {
    use super::super::parse_request;
    use super::*;

    #[test]
    fn bodies_become_chat_requests() {
        let chat = to_chat(&json!({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 20,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                      {"type": "message", "role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Bye"}],
        }))
        .unwrap();
        assert_eq!(
            chat,
            json!({"model": "m", "max_tokens": 20, "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]})
        );
        assert_eq!(
            to_chat(&json!({"input": "Hi"})).unwrap()["messages"],
            json!([{"role": "user", "content": "Hi"}])
        );
    }

    #[test]
    fn a_text_format_becomes_the_chat_response_format() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let chat = to_chat(&json!({"input": "a", "text": {"format":
            {"type": "json_schema", "name": "n", "schema": schema, "strict": true}}}))
        .unwrap();
        assert_eq!(chat["response_format"]["type"], "json_schema");
        assert_eq!(chat["response_format"]["json_schema"]["schema"], schema);
        let chat = to_chat(&json!({"input": "a", "text": {"format": {"type": "json_object"}}}));
        assert_eq!(
            chat.unwrap()["response_format"],
            json!({"type": "json_object"})
        );
        assert!(to_chat(&json!({"input": "a"}))
            .unwrap()
            .get("response_format")
            .is_none());
    }

    #[test]
    fn function_tools_and_their_calls_become_chats() {
        let chat = to_chat(&json!({
            "input": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{\"city\":\"Rome\"}"},
                {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
                {"type": "function_call_output", "call_id": "c2", "output": "21 C"}],
            "tools": [{"type": "function", "name": "w", "description": "Weather.",
                       "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "w"},
            "parallel_tool_calls": false,
        }))
        .unwrap();
        assert_eq!(
            chat["tools"],
            json!([{"type": "function", "function": {"name": "w", "description": "Weather.",
                    "parameters": {"type": "object"}}}])
        );
        assert_eq!(
            chat["tool_choice"],
            json!({"type": "function", "function": {"name": "w"}})
        );
        assert_eq!(chat["parallel_tool_calls"], false);
        let m = &chat["messages"];
        assert_eq!(m.as_array().unwrap().len(), 4, "{m}");
        assert_eq!(
            m[1]["tool_calls"].as_array().unwrap().len(),
            2,
            "one assistant turn"
        );
        assert_eq!(
            m[1]["tool_calls"][1]["function"]["arguments"],
            "{\"city\":\"Rome\"}"
        );
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "c2", "content": "21 C"})
        );
        // The chat request it makes is valid, and a refusal names this
        // API's field.
        parse_request(Kind::Chat, &chat).unwrap();
        let bad = to_chat(
            &json!({"input": "a", "tools": [{"type": "function", "name": "w",
            "parameters": {"type": "object", "uniqueItems": 3}}]}),
        )
        .unwrap();
        let _ = bad;
        let e = rename(ApiError::invalid("tools[0].function.parameters", "x"));
        assert_eq!(e.param.as_deref(), Some("tools[0].parameters"));
    }

    #[test]
    fn an_answer_with_calls_is_function_call_items() {
        let mut d = start("m".into(), Some(ToolFormat::None));
        d.text = r#"{"tool_calls": [{"name": "w", "arguments": {"city": "Paris"}}]}"#.into();
        d.finish = FinishReason::Eos as i32;
        let items = output_items("r1", &d);
        assert_eq!(
            items,
            vec![
                json!({"type": "function_call", "id": "fc_r1_0", "call_id": "call_r1_0_0",
                "name": "w", "arguments": "{\"city\":\"Paris\"}", "status": "completed"})
            ]
        );
        d.text = r#"{"response": "Sunny."}"#.into();
        assert_eq!(output_items("r1", &d)[0]["content"][0]["text"], "Sunny.");
        let mut out = Vec::new();
        let mut seq = 0;
        tool_events(&mut out, &mut seq, 0, items[0].clone());
        let text = String::from_utf8(out.concat()).unwrap();
        assert!(
            text.starts_with("event: response.output_item.added\n"),
            "{text}"
        );
        assert!(
            text.contains("event: response.function_call_arguments.done\n"),
            "{text}"
        );
        assert_eq!(seq, 4);
    }

    #[test]
    fn what_is_not_supported_is_refused_by_name() {
        let param = |body: Value| to_chat(&body).unwrap_err().param.unwrap();
        assert_eq!(
            param(json!({"input": "a", "previous_response_id": "resp_1"})),
            "previous_response_id"
        );
        assert_eq!(
            param(json!({"input": "a", "tools": [{"type": "web_search"}]})),
            "tools[0].type"
        );
        assert_eq!(
            param(json!({"input": [{"type": "function_call_output"}]})),
            "input[0].call_id"
        );
        assert_eq!(param(json!({"input": [{"type": "reasoning"}]})), "input[0]");
        assert_eq!(
            param(json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]})),
            "input[0].content[0]"
        );
        assert_eq!(param(json!({"model": "m"})), "input");
        let chat = to_chat(&json!({"input": "a", "max_output_tokens": 0})).unwrap();
        let e = rename(parse_request(Kind::Chat, &chat).unwrap_err());
        assert_eq!(e.param.as_deref(), Some("max_output_tokens"));
        let format = |f: Value| {
            let chat = to_chat(&json!({"input": "a", "text": {"format": f}})).unwrap();
            rename(parse_request(Kind::Chat, &chat).unwrap_err())
                .param
                .unwrap()
        };
        assert_eq!(format(json!({"type": "xml"})), "text.format.type");
        assert_eq!(
            format(json!({"type": "json_schema", "schema": 3})),
            "text.format.schema"
        );
    }
}
