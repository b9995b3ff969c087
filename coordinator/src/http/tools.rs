//! Tool calling in the generic format: `tools`, `tool_choice` and
//! `parallel_tool_calls` on chat completions, for any model.
//!
//! The tools are described to the model in a system message (each one's
//! name, description and JSON Schema of its arguments), and the output is
//! constrained (structured outputs, [`super::response_format`]'s path) to one
//! JSON object: `{"tool_calls": [{"name", "arguments"}, …]}`, each call's
//! `name` one of the tools and its `arguments` valid against that tool's
//! schema, or, when the model may choose (`auto`), `{"response": "…"}`.
//! That object is then turned into OpenAI's `tool_calls` (or `content`), so
//! even a 135M model emits calls a client can run. History in plain
//! words: an assistant message's `tool_calls` become `Calling
//! <name>(<arguments>).`, and a `tool` message a user turn `Tool result
//! (<name>): <content>`.
//!
//! A model whose chat template has a tool section (Hermes/Qwen
//! `<tool_call>`, Llama 3.x, Mistral `[TOOL_CALLS]`, or its own JSON;
//! [`ToolFormat`]) gets the tools and the history's calls rendered by that
//! template instead; a forced call is held to the template's form by a
//! Lark grammar ([`Tools::grammar`]) and the answer is read back by
//! [`read_calls`].

use nanoinfer_vocab::ToolFormat;
use serde_json::{json, Value};

use super::response::{AssistantMessage, Delta, FunctionDelta, ToolCall, ToolCallDelta};
use super::ApiError;

/// Most calls in one answer when `parallel_tool_calls` is on (the default).
pub const MAX_PARALLEL_CALLS: usize = 8;

/// Most tools in one request.
pub const MAX_TOOLS: usize = 128;

/// A request's tools and what it lets the model do with them.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    tools: Vec<Tool>,
    choice: Choice,
    parallel: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Tool {
    name: String,
    description: String,
    parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
enum Choice {
    /// Call tools or answer (the default with tools).
    Auto,
    /// Call at least one tool.
    Required,
    /// Call this tool.
    Named(String),
}

/// `tools`, `tool_choice`, `parallel_tool_calls` → the request's tools;
/// `None` when there are none or `tool_choice` is `"none"` (the tools are
/// then neither described nor callable).
pub fn parse(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<&Value>,
) -> Result<Option<Tools>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => {
            return match choice {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s == "none" => Ok(None),
                Some(_) => Err(ApiError::invalid(
                    "tool_choice",
                    "needs tools: send the tools the model may call",
                )),
            }
        }
        Some(Value::Array(list)) => list,
        Some(_) => return Err(ApiError::invalid("tools", "must be a list of tools")),
    };
    if list.is_empty() {
        return Err(ApiError::invalid(
            "tools",
            "must not be empty (leave it out for no tools)",
        ));
    }
    if list.len() > MAX_TOOLS {
        return Err(ApiError::invalid(
            "tools",
            format!("{} tools; the limit is {MAX_TOOLS}", list.len()),
        ));
    }
    let mut parsed: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}]{f}");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid(
                at(".type"),
                "must be \"function\" (the only kind of tool)",
            ));
        }
        let Some(Value::Object(f)) = t.get("function") else {
            return Err(ApiError::invalid(
                at(".function"),
                "is required: {\"name\", \"description\", \"parameters\"}",
            ));
        };
        let name = match f.get("name") {
            Some(Value::String(n)) if valid_name(n) => n.clone(),
            _ => {
                return Err(ApiError::invalid(
                    at(".function.name"),
                    "must be 1 to 64 letters, digits, '_' or '-'",
                ))
            }
        };
        if parsed.iter().any(|p| p.name == name) {
            return Err(ApiError::invalid(
                at(".function.name"),
                format!("{name:?} names two tools"),
            ));
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(d)) => d.clone(),
            Some(_) => {
                return Err(ApiError::invalid(
                    at(".function.description"),
                    "must be a string",
                ))
            }
        };
        let parameters = match f.get("parameters") {
            // OpenAI's default: a function of no arguments.
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(ApiError::invalid(
                    at(".function.parameters"),
                    "must be a JSON Schema (an object)",
                ))
            }
        };
        parsed.push(Tool {
            name,
            description,
            parameters,
        });
    }
    let choice = match choice {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"));
            match name {
                Some(n) if parsed.iter().any(|t| t.name == n) => Choice::Named(n.to_string()),
                Some(n) => {
                    return Err(ApiError::invalid(
                        "tool_choice.function.name",
                        format!("{n:?} is not one of the tools"),
                    ))
                }
                None => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
                    ))
                }
            }
        }
    };
    let parallel = match parallel {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "parallel_tool_calls",
                "must be true or false",
            ))
        }
    };
    Ok(Some(Tools {
        tools: parsed,
        choice,
        parallel,
    }))
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Tools {
    /// The tools a call may name (all of them, or the one `tool_choice`
    /// names).
    fn callable(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(move |t| match &self.choice {
            Choice::Named(n) => &t.name == n,
            _ => true,
        })
    }

    /// Most calls in one answer.
    fn max_calls(&self) -> usize {
        match (&self.choice, self.parallel) {
            (Choice::Named(_), _) | (_, false) => 1,
            _ => MAX_PARALLEL_CALLS,
        }
    }

    /// The tools as the model's chat template takes them (OpenAI's tool
    /// objects; with a named `tool_choice`, only that one).
    pub fn openai_tools(&self) -> Value {
        self.callable()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters,
                }})
            })
            .collect()
    }

    /// The constraint of a template that writes calls in `format`: `None`
    /// under `auto` (the model may answer in words; its answer is read
    /// after), else a Lark grammar (llguidance's dialect) that holds the
    /// answer to calls in the template's own form, each call's arguments
    /// valid against its tool's schema.
    pub fn grammar(&self, format: ToolFormat) -> Option<String> {
        if self.choice == Choice::Auto {
            return None;
        }
        let object = |args: &str| {
            let calls: Vec<Value> = self
                .callable()
                .map(|t| {
                    json!({
                        "type": "object",
                        "properties": {"name": {"const": t.name}, args: t.parameters},
                        "required": ["name", args],
                        "additionalProperties": false,
                    })
                })
                .collect();
            if calls.len() == 1 {
                calls.into_iter().next().unwrap_or_default()
            } else {
                json!({"anyOf": calls})
            }
        };
        let prepared = |schema: Value| {
            nanoinfer_proto::schema::prepare(schema)
                .map(|s| s.to_string())
                .unwrap_or_default()
        };
        let many = self.max_calls() > 1;
        let lark = match format {
            ToolFormat::None => return None,
            ToolFormat::Hermes => {
                let call = prepared(object("arguments"));
                let rest = if many { " (\"\\n\" call)*" } else { "" };
                format!(
                    "start: call{rest}\ncall: \"<tool_call>\\n\" %json {call} \"\\n</tool_call>\"\n"
                )
            }
            ToolFormat::Llama3 => {
                let call = prepared(object("parameters"));
                let rest = if many { " (\"; \" call)*" } else { "" };
                format!("start: call{rest}\ncall: %json {call}\n")
            }
            ToolFormat::Mistral => {
                let array = prepared(json!({
                    "type": "array", "items": object("arguments"),
                    "minItems": 1, "maxItems": self.max_calls(),
                }));
                format!("start: %json {array}\n")
            }
            ToolFormat::Json => format!("start: %json {}\n", prepared(self.schema())),
        };
        Some(lark)
    }

    /// The JSON Schema the answer is constrained to.
    pub fn schema(&self) -> Value {
        let call = |t: &Tool| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        };
        let calls: Vec<Value> = self.callable().map(call).collect();
        let items = if calls.len() == 1 {
            calls.into_iter().next().unwrap_or_default()
        } else {
            json!({"anyOf": calls})
        };
        let tool_calls = json!({
            "type": "object",
            "properties": {"tool_calls": {
                "type": "array", "items": items, "minItems": 1, "maxItems": self.max_calls(),
            }},
            "required": ["tool_calls"],
            "additionalProperties": false,
        });
        match self.choice {
            Choice::Auto => json!({"anyOf": [
                tool_calls,
                {
                    "type": "object",
                    "properties": {"response": {"type": "string"}},
                    "required": ["response"],
                    "additionalProperties": false,
                },
            ]}),
            _ => tool_calls,
        }
    }

    /// The system text that describes the tools and the answer's format.
    pub fn instructions(&self) -> String {
        let mut text = String::from(
            "You can call these tools. Each line is one tool: its name, what it does, \
             and the JSON Schema of its arguments.\n",
        );
        for t in &self.tools {
            let line =
                json!({"name": t.name, "description": t.description, "parameters": t.parameters});
            text.push_str(&line.to_string());
            text.push('\n');
        }
        let call =
            "{\"tool_calls\": [{\"name\": \"<tool name>\", \"arguments\": {<the arguments>}}]}";
        match &self.choice {
            Choice::Auto => text.push_str(&format!(
                "Reply with one JSON object: {call} to call tools, or {{\"response\": \"<your answer>\"}} to answer. A tool's result comes back in a turn that starts with \"Tool result\"."
            )),
            Choice::Required => text.push_str(&format!(
                "Reply with one JSON object that calls at least one tool: {call}. A tool's result comes back in a turn that starts with \"Tool result\"."
            )),
            Choice::Named(n) => text.push_str(&format!(
                "Reply with one JSON object that calls the tool {n:?}: {call}."
            )),
        }
        text
    }
}

/// One assistant message's `tool_calls` (OpenAI's shape) as the text of
/// that assistant turn: `Calling get_weather({"city":"Paris"}).`, a
/// sentence per call. Words rather than the answer's JSON: a small model
/// shown its own JSON calls writes the same JSON again instead of reading
/// the result (SmolLM2-135M did, in every variant tried), and answers in a
/// sentence after this form.
pub fn calls_as_text(calls: &Value, at: &str) -> Result<String, ApiError> {
    let Value::Array(list) = calls else {
        return Err(ApiError::invalid(at, "must be a list of tool calls"));
    };
    let mut out = Vec::with_capacity(list.len());
    for (k, c) in list.iter().enumerate() {
        let f = c.get("function");
        let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
        let Some(name) = name else {
            return Err(ApiError::invalid(
                format!("{at}[{k}].function.name"),
                "is required",
            ));
        };
        // `arguments` is JSON text; kept as text if it is not JSON.
        let arguments = match f.and_then(|f| f.get("arguments")) {
            Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
            Some(v) => v.clone(),
            None => json!({}),
        };
        out.push(format!("Calling {name}({arguments})."));
    }
    Ok(out.join(" "))
}

/// A `tool` message (a tool's result) as the text of a user turn, with
/// the called tool's name when the history's call with that id gave one.
/// Plain words, not JSON: a small model answers a sentence with a
/// sentence, and repeats a JSON blob.
pub fn result_as_text(tool: Option<&str>, content: &str) -> String {
    match tool {
        Some(name) => format!("Tool result ({name}): {content}"),
        None => format!("Tool result: {content}"),
    }
}

/// The `id` → `function.name` of an assistant message's `tool_calls`.
pub fn call_names(calls: &Value) -> Vec<(String, String)> {
    calls
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let id = c.get("id")?.as_str()?;
            let name = c.get("function")?.get("name")?.as_str()?;
            Some((id.to_string(), name.to_string()))
        })
        .collect()
}

/// One assistant message's `tool_calls` (OpenAI's shape, checked by
/// [`calls_as_text`]) for a chat template that renders them.
pub fn structured_calls(calls: &Value) -> Vec<nanoinfer_proto::nanoinfer::ToolCall> {
    let Value::Array(list) = calls else {
        return Vec::new();
    };
    list.iter()
        .map(|c| {
            let f = &c["function"];
            nanoinfer_proto::nanoinfer::ToolCall {
                id: c["id"].as_str().unwrap_or_default().to_string(),
                name: f["name"].as_str().unwrap_or_default().to_string(),
                arguments: match &f["arguments"] {
                    Value::String(s) => s.clone(),
                    Value::Null => "{}".to_string(),
                    v => v.to_string(),
                },
            }
        })
        .collect()
}

/// What the model's answer (the constrained JSON) says.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// OpenAI `tool_calls` entries.
    Calls(Vec<ToolCall>),
    /// A plain answer (`content`).
    Text(String),
}

/// Reads a finished answer; `None` when it is not the format's JSON (cut
/// by `max_tokens`, say), which the caller passes on as text. `id_base`
/// makes the calls' ids (`call_<id_base>_<k>`).
pub fn read_answer(text: &str, id_base: &str) -> Option<Answer> {
    let v: Value = serde_json::from_str(text).ok()?;
    if let Some(Value::String(s)) = v.get("response") {
        return Some(Answer::Text(s.clone()));
    }
    let Value::Array(calls) = v.get("tool_calls")? else {
        return None;
    };
    let mut out = Vec::with_capacity(calls.len());
    for (k, c) in calls.iter().enumerate() {
        let name = c.get("name")?.as_str()?;
        let arguments = c.get("arguments").cloned().unwrap_or_else(|| json!({}));
        out.push(ToolCall::function(
            format!("call_{id_base}_{k}"),
            name,
            arguments.to_string(),
        ));
    }
    Some(Answer::Calls(out))
}

/// The chat `message` of a finished choice and its finish reason: tool
/// calls end with `tool_calls`.
pub fn message(
    text: &str,
    finish: Option<&'static str>,
    id_base: &str,
    format: ToolFormat,
) -> (AssistantMessage, Option<&'static str>) {
    let calls = |content: Option<String>, tool_calls: Vec<ToolCall>| AssistantMessage {
        role: "assistant",
        content,
        tool_calls,
    };
    if format != ToolFormat::None {
        return match (finish, read_calls(format, text, id_base)) {
            (Some("stop"), Some((content, tool_calls))) => {
                (calls(content, tool_calls), Some("tool_calls"))
            }
            _ => (AssistantMessage::text(text), finish),
        };
    }
    match (finish, read_answer(text, id_base)) {
        (Some("stop"), Some(Answer::Calls(tool_calls))) => {
            (calls(None, tool_calls), Some("tool_calls"))
        }
        (_, Some(Answer::Text(t))) => (AssistantMessage::text(t), finish),
        _ => (AssistantMessage::text(text), finish),
    }
}

/// The streamed deltas of a finished choice, in OpenAI's order: for each
/// call one delta with its index, id, type and name (arguments empty), then
/// one with its arguments; or the answer's content. The last element's
/// finish reason goes on the final chunk.
pub fn deltas(
    text: &str,
    finish: Option<&'static str>,
    id_base: &str,
    format: ToolFormat,
) -> (Vec<Delta>, Option<&'static str>) {
    let (message, finish) = message(text, finish, id_base, format);
    let content = |c: String| Delta {
        content: Some(c),
        ..Delta::default()
    };
    let call = |piece: ToolCallDelta| Delta {
        tool_calls: vec![piece],
        ..Delta::default()
    };
    if message.tool_calls.is_empty() {
        return (vec![content(message.content.unwrap_or_default())], finish);
    }
    let mut out = Vec::new();
    out.extend(message.content.map(content));
    for (k, c) in message.tool_calls.into_iter().enumerate() {
        out.push(call(ToolCallDelta {
            index: k,
            id: Some(c.id),
            kind: Some(c.kind),
            function: FunctionDelta {
                name: Some(c.function.name),
                arguments: String::new(),
            },
        }));
        out.push(call(ToolCallDelta {
            index: k,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments: c.function.arguments,
            },
        }));
    }
    (out, finish)
}

/// The calls in an answer written in a chat template's own `format`, and
/// the text before them (`None` when empty); `None` when the answer holds
/// no call. Each call `{"name", "arguments"}` (Llama 3's `parameters`
/// too) becomes an OpenAI `tool_calls` entry.
pub fn read_calls(
    format: ToolFormat,
    text: &str,
    id_base: &str,
) -> Option<(Option<String>, Vec<ToolCall>)> {
    let (content, objects): (&str, Vec<Value>) = match format {
        ToolFormat::None => return None,
        ToolFormat::Hermes => {
            let at = text.find("<tool_call>")?;
            let mut objects = Vec::new();
            for block in text[at..].split("<tool_call>").skip(1) {
                let body = block.split("</tool_call>").next().unwrap_or("");
                objects.push(serde_json::from_str(body.trim()).ok()?);
            }
            (&text[..at], objects)
        }
        ToolFormat::Llama3 => {
            let body = text.trim_start();
            let body = body.strip_prefix("<|python_tag|>").unwrap_or(body);
            ("", json_sequence(body, ';')?)
        }
        ToolFormat::Mistral => {
            let at = text.find("[TOOL_CALLS]");
            let body = at
                .map_or(text, |a| &text[a + "[TOOL_CALLS]".len()..])
                .trim();
            let content = at.map_or("", |a| &text[..a]);
            match serde_json::from_str::<Value>(body).ok()? {
                Value::Array(a) => (content, a),
                o @ Value::Object(_) => (content, vec![o]),
                _ => return None,
            }
        }
        ToolFormat::Json => match serde_json::from_str::<Value>(text.trim()).ok()? {
            Value::Array(a) => ("", a),
            Value::Object(mut o) => match o.remove("tool_calls") {
                Some(Value::Array(a)) => ("", a),
                Some(_) => return None,
                None => ("", vec![Value::Object(o)]),
            },
            _ => return None,
        },
    };
    if objects.is_empty() {
        return None;
    }
    let mut calls = Vec::with_capacity(objects.len());
    for (k, o) in objects.iter().enumerate() {
        let name = o.get("name")?.as_str()?;
        let arguments = o
            .get("arguments")
            .or_else(|| o.get("parameters"))
            .cloned()
            .unwrap_or_else(|| json!({}));
        // Some models write the arguments as a JSON string.
        let arguments = match arguments {
            Value::String(s) => s,
            v => v.to_string(),
        };
        calls.push(ToolCall::function(
            format!("call_{id_base}_{k}"),
            name,
            arguments,
        ));
    }
    let content = content.trim();
    Some(((!content.is_empty()).then(|| content.to_string()), calls))
}

/// JSON values one after another, separated by `sep` and whitespace.
fn json_sequence(text: &str, sep: char) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let mut it = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = it.next()?.ok()?;
        out.push(v);
        rest = rest[it.byte_offset()..].trim_start();
        rest = rest.strip_prefix(sep).unwrap_or(rest).trim_start();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::response::to_value;
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"], "additionalProperties": false}}},
               {"type": "function", "function": {"name": "get_time"}}])
    }

    fn param(r: Result<Option<Tools>, ApiError>) -> String {
        r.expect_err("refused").param.expect("names a field")
    }

    #[test]
    fn tool_choice_picks_what_the_schema_allows() {
        let auto = parse(Some(&weather()), None, None).unwrap().unwrap();
        let s = auto.schema();
        assert_eq!(s["anyOf"].as_array().unwrap().len(), 2, "{s}");
        let calls = &s["anyOf"][0]["properties"]["tool_calls"];
        assert_eq!(calls["maxItems"], MAX_PARALLEL_CALLS);
        assert_eq!(calls["items"]["anyOf"].as_array().unwrap().len(), 2);
        assert_eq!(
            calls["items"]["anyOf"][1]["properties"]["arguments"],
            json!({"type": "object", "properties": {}}),
            "no parameters: a function of no arguments"
        );
        let required = parse(
            Some(&weather()),
            Some(&json!("required")),
            Some(&json!(false)),
        )
        .unwrap()
        .unwrap();
        let s = required.schema();
        assert!(s.get("anyOf").is_none(), "{s}");
        assert_eq!(s["properties"]["tool_calls"]["maxItems"], 1);
        let named = parse(
            Some(&weather()),
            Some(&json!({"type": "function", "function": {"name": "get_weather"}})),
            None,
        )
        .unwrap()
        .unwrap();
        let s = named.schema();
        let item = &s["properties"]["tool_calls"]["items"];
        assert_eq!(item["properties"]["name"]["const"], "get_weather");
        assert_eq!(item["properties"]["arguments"]["required"], json!(["city"]));
        assert!(
            named.instructions().contains("get_time"),
            "every tool is described"
        );
        assert_eq!(
            parse(Some(&weather()), Some(&json!("none")), None).unwrap(),
            None
        );
        assert_eq!(parse(None, None, None).unwrap(), None);
    }

    #[test]
    fn bad_tools_are_refused_by_field() {
        assert_eq!(param(parse(Some(&json!([])), None, None)), "tools");
        assert_eq!(param(parse(Some(&json!({})), None, None)), "tools");
        assert_eq!(
            param(parse(Some(&json!([{"type": "web_search"}])), None, None)),
            "tools[0].type"
        );
        assert_eq!(
            param(parse(
                Some(&json!([{"type": "function", "function": {"name": "a b"}}])),
                None,
                None
            )),
            "tools[0].function.name"
        );
        assert_eq!(
            param(parse(
                Some(&json!([{"type": "function", "function": {"name": "a", "parameters": "x"}}])),
                None,
                None
            )),
            "tools[0].function.parameters"
        );
        assert_eq!(
            param(parse(
                Some(&weather()),
                Some(&json!({"type": "function", "function": {"name": "nope"}})),
                None
            )),
            "tool_choice.function.name"
        );
        assert_eq!(
            param(parse(Some(&weather()), Some(&json!("always")), None)),
            "tool_choice"
        );
        assert_eq!(
            param(parse(None, Some(&json!("required")), None)),
            "tool_choice"
        );
        assert_eq!(
            param(parse(Some(&weather()), None, Some(&json!("yes")))),
            "parallel_tool_calls"
        );
    }

    #[test]
    fn answers_become_tool_calls_or_content() {
        let text = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}"#;
        let (m, finish) = message(text, Some("stop"), "r1_0", ToolFormat::None);
        let m = to_value(&m);
        assert_eq!(finish, Some("tool_calls"));
        assert_eq!(m["content"], Value::Null);
        let call = &m["tool_calls"][0];
        assert_eq!(call["id"], "call_r1_0_0");
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        let (m, finish) = message(
            r#"{"response": "Hi!"}"#,
            Some("stop"),
            "r",
            ToolFormat::None,
        );
        let m = to_value(&m);
        assert_eq!((m["content"].as_str(), finish), (Some("Hi!"), Some("stop")));
        // Cut by max_tokens: the text as it is, finish length.
        let (m, finish) = message(
            r#"{"tool_calls": [{"na"#,
            Some("length"),
            "r",
            ToolFormat::None,
        );
        assert_eq!(finish, Some("length"));
        let m = to_value(&m);
        assert_eq!(m["content"], r#"{"tool_calls": [{"na"#);
        // Streamed: name first, then the arguments.
        let (d, finish) = deltas(text, Some("stop"), "r1_0", ToolFormat::None);
        let d: Vec<Value> = d.iter().map(to_value).collect();
        assert_eq!(finish, Some("tool_calls"));
        assert_eq!(d.len(), 2);
        assert_eq!(d[0]["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(d[0]["tool_calls"][0]["function"]["arguments"], "");
        assert_eq!(
            d[1]["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris"}"#
        );
        assert!(d[1]["tool_calls"][0].get("id").is_none());
    }

    #[test]
    fn history_is_written_in_the_same_format() {
        let calls = json!([{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]);
        let text = calls_as_text(&calls, "messages[1].tool_calls").unwrap();
        assert_eq!(text, r#"Calling get_weather({"city":"Paris"})."#);
        let bad = calls_as_text(&json!([{"function": {}}]), "messages[1].tool_calls");
        assert_eq!(
            bad.unwrap_err().param.as_deref(),
            Some("messages[1].tool_calls[0].function.name")
        );
        let names = call_names(&calls);
        assert_eq!(
            names,
            vec![("call_1".to_string(), "get_weather".to_string())]
        );
        assert_eq!(
            result_as_text(Some("get_weather"), "18°C"),
            "Tool result (get_weather): 18°C"
        );
        assert_eq!(result_as_text(None, "18°C"), "Tool result: 18°C");
    }

    #[test]
    fn each_template_family_is_read_from_its_own_format() {
        let weather = |k: usize| {
            ToolCall::function(
                format!("call_r_{k}"),
                "get_weather",
                "{\"city\":\"Paris\"}".into(),
            )
        };
        // Hermes / Qwen: text before the blocks is content.
        let hermes = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        assert_eq!(
            read_calls(ToolFormat::Hermes, hermes, "r"),
            Some((Some("Let me look.".into()), vec![weather(0), weather(1)]))
        );
        // Llama 3.x: `parameters`, calls separated by `;`, the python tag.
        let llama = "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
        assert_eq!(
            read_calls(ToolFormat::Llama3, llama, "r"),
            Some((None, vec![weather(0), weather(1)]))
        );
        // Mistral: [TOOL_CALLS] and an array (the control token itself is
        // not in the detokenized text; both forms are read).
        for m in [
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]",
            "[{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\":\\\"Paris\\\"}\"}]",
        ] {
            assert_eq!(
                read_calls(ToolFormat::Mistral, m, "r"),
                Some((None, vec![weather(0)])),
                "{m}"
            );
        }
        // Generic JSON: one call, a list, or the tool_calls object.
        for j in [
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
            "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]",
            "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]}",
        ] {
            assert_eq!(
                read_calls(ToolFormat::Json, j, "r"),
                Some((None, vec![weather(0)])),
                "{j}"
            );
        }
        // Words are no call, in any format; a broken call is no call.
        for f in [
            ToolFormat::Hermes,
            ToolFormat::Llama3,
            ToolFormat::Mistral,
            ToolFormat::Json,
        ] {
            assert_eq!(read_calls(f, "It is sunny in Paris.", "r"), None, "{f:?}");
        }
        assert_eq!(
            read_calls(ToolFormat::Hermes, "<tool_call>\n{\"name\": \"get_w", "r"),
            None
        );
        // The message: content and calls, finish reason tool_calls; cut by
        // max_tokens it stays text.
        let (m, finish) = message(hermes, Some("stop"), "r", ToolFormat::Hermes);
        assert_eq!(finish, Some("tool_calls"));
        assert_eq!(m.content.as_deref(), Some("Let me look."));
        assert_eq!(m.tool_calls[1].id, "call_r_1");
        let (m, finish) = message(hermes, Some("length"), "r", ToolFormat::Hermes);
        assert_eq!(
            (m.content.as_deref(), finish),
            (Some(hermes), Some("length"))
        );
        assert!(m.tool_calls.is_empty());
        // On the wire: OpenAI's field names, `content` null beside calls.
        let (m, _) = message(
            "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]}",
            Some("stop"),
            "r",
            ToolFormat::None,
        );
        assert_eq!(
            to_value(&m),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_r_0", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]})
        );
        let (d, _) = deltas(hermes, Some("stop"), "r", ToolFormat::Hermes);
        assert_eq!(to_value(&d[0]), json!({"content": "Let me look."}));
        assert_eq!(
            to_value(&d[1]),
            json!({"tool_calls": [{"index": 0, "id": "call_r_0", "type": "function",
                   "function": {"name": "get_weather", "arguments": ""}}]})
        );
        assert_eq!(
            to_value(&d[2]),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":\"Paris\"}"}}]})
        );
        assert_eq!(d.len(), 5);
    }

    #[test]
    fn a_forced_call_gets_the_templates_grammar() {
        let tools = weather();
        let plan = |choice: Value, parallel: Value| {
            parse(Some(&tools), Some(&choice), Some(&parallel))
                .unwrap()
                .unwrap()
        };
        let auto = plan(json!("auto"), json!(true));
        assert_eq!(
            auto.grammar(ToolFormat::Hermes),
            None,
            "auto is read, not forced"
        );
        assert_eq!(auto.openai_tools()[0]["function"]["name"], "get_weather");
        let required = plan(json!("required"), json!(false));
        let g = required.grammar(ToolFormat::Hermes).unwrap();
        assert!(
            g.starts_with("start: call\ncall: \"<tool_call>\\n\" %json {"),
            "{g}"
        );
        assert!(g.contains("\"x-guidance\""), "the shared JSON layout: {g}");
        let g = plan(json!("required"), json!(true))
            .grammar(ToolFormat::Llama3)
            .unwrap();
        assert!(g.starts_with("start: call (\"; \" call)*\n"), "{g}");
        assert!(g.contains("\"parameters\""), "{g}");
        let g = required.grammar(ToolFormat::Mistral).unwrap();
        assert!(g.contains("\"maxItems\":1"), "{g}");
        assert_eq!(required.grammar(ToolFormat::None), None);
    }
}
