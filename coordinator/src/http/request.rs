//! Request bodies: each field taken with a check that names it, into the
//! shared [`InferRequest`] and the [`Shape`] of the answer.

use super::*;

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

/// Field access on a JSON object, each refusal naming its field.
pub(crate) struct Fields<'a>(pub(crate) &'a Map<String, Value>);

impl<'a> Fields<'a> {
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn bool(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::invalid(key, "must be true or false")),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(key, "must be a string")),
        }
    }
}

/// The scalar fields of a chat or completions body, typed: a wrong type is
/// a 400 whose `param` is the field's path (`serde_path_to_error`), e.g.
/// `stream_options.include_usage`. The structured fields (`messages`,
/// `tools`, `response_format`, `logit_bias`, `prompt`) are read by their own
/// functions, which name nested paths (`messages[2].content[0]`). Fields
/// not listed are ignored, as OpenAI's clients send more than a server
/// uses (`user`, `metadata`, `store`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct Body {
    model: Option<String>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<serde_json::Number>,
    stop: Option<Stop>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    n: Option<u32>,
    best_of: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    logprobs: Option<Logprobs>,
    top_logprobs: Option<u32>,
    echo: Option<bool>,
}

/// `stream_options`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct StreamOptions {
    include_usage: Option<bool>,
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `logprobs`: chat's flag, or the legacy completions' count.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(untagged, expecting = "true/false (chat) or a count (completions)")]
pub(crate) enum Logprobs {
    Flag(bool),
    Count(u32),
}

impl Body {
    /// The typed fields of `body`, or a refusal naming the field's path.
    pub(crate) fn from_json(body: &Value) -> Result<Self, ApiError> {
        serde_path_to_error::deserialize(body).map_err(|e| {
            let path = e.path().to_string();
            ApiError::invalid(path, e.into_inner().to_string())
        })
    }

    /// `seed`: any integer OpenAI accepts (negative ones keep their bits).
    fn seed(&self) -> Result<Option<u64>, ApiError> {
        match &self.seed {
            None => Ok(None),
            Some(n) => n
                .as_u64()
                .or_else(|| n.as_i64().map(|i| i as u64))
                .map(Some)
                .ok_or_else(|| ApiError::invalid("seed", "must be an integer")),
        }
    }
}

/// Fields OpenAI defines that this server does not implement: refused, not
/// silently ignored, since a caller relying on them would get wrong output.
/// Refused on both endpoints: the legacy function-calling fields (`tools`
/// replaced them).
pub(crate) const UNSUPPORTED: [&str; 2] = ["functions", "function_call"];

/// `logit_bias`: an object of token ids (as strings, OpenAI's shape; JSON
/// numbers as keys are not JSON) → bias. Absent or null: none.
pub(crate) fn logit_bias(
    value: Option<&Value>,
) -> Result<std::collections::HashMap<i32, f32>, ApiError> {
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
    let b = Body::from_json(body)?;
    let mut request = InferRequest {
        model: b.model.clone().unwrap_or_default(),
        temperature: b.temperature,
        top_p: b.top_p,
        seed: b.seed()?,
        stop: match b.stop.clone() {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
        // top_k = -1 is how vLLM and llama-server say "off".
        top_k: match b.top_k {
            None | Some(-1) => None,
            Some(k) => Some(u32::try_from(k).map_err(|_| {
                ApiError::invalid("top_k", "must be -1 (off) or a non-negative integer")
            })?),
        },
        min_p: b.min_p,
        repetition_penalty: b.repetition_penalty,
        presence_penalty: b.presence_penalty,
        frequency_penalty: b.frequency_penalty,
        n: b.n.unwrap_or(1),
        logit_bias: logit_bias(f.get("logit_bias"))?,
        json_schema: response_format(f.get("response_format"))?,
        ..Default::default()
    };
    // `best_of` is the legacy API's server-side ranking: generate more than
    // `n` and return the `n` most likely. Equal to `n` (OpenAI's default of
    // 1, as clients send it) there is nothing to rank.
    if b.best_of.is_some_and(|k| k != request.n.max(1)) {
        return Err(ApiError::invalid(
            "best_of",
            "only best_of equal to n (default 1) is supported: this server does not rank \
             extra completions (ask for n and rank them by logprobs)",
        ));
    }
    let stream = b.stream.unwrap_or(false);
    let include_usage = b
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let mut echo = None;
    let mut tool_plan = None;
    match kind {
        Kind::Chat => {
            let max = b.max_completion_tokens.or(b.max_tokens);
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
            if tool_plan.is_some() && !request.json_schema.is_empty() {
                return Err(ApiError::invalid(
                    "response_format",
                    "cannot be combined with tools (the answer is already constrained to \
                     tool calls); send one of them",
                ));
            }
            if let (Some(plan), true) = (&tool_plan, own_format) {
                // The model's template renders the tools and the history's
                // calls itself; a forced call is held to its own format.
                request.tools = plan.openai_tools().to_string();
                request.grammar = plan.grammar(format).unwrap_or_default();
            } else if let Some(plan) = &tool_plan {
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
            request.logprobs = match b.logprobs {
                None | Some(Logprobs::Flag(false)) => false,
                Some(Logprobs::Flag(true)) => true,
                Some(Logprobs::Count(_)) => {
                    return Err(ApiError::invalid("logprobs", "must be true or false"))
                }
            };
            request.top_logprobs = b.top_logprobs.unwrap_or(0);
        }
        Kind::Completion => {
            let max = b.max_tokens;
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
            match b.logprobs {
                None => {}
                Some(Logprobs::Count(k)) => {
                    request.logprobs = true;
                    request.top_logprobs = k;
                }
                Some(Logprobs::Flag(_)) => {
                    return Err(ApiError::invalid(
                        "logprobs",
                        "must be a non-negative integer (the number of alternatives)",
                    ))
                }
            }
            if b.echo.unwrap_or(false) {
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
/// `structured`: tool calls and tool results stay structured for a chat
/// template that renders them; otherwise they are written in the generic
/// format's words.
pub(crate) fn chat_messages(
    value: Option<&Value>,
    structured: bool,
) -> Result<Vec<ChatMessage>, ApiError> {
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
