//! The model's own chat template: the Jinja source in the GGUF's
//! `tokenizer.chat_template`, rendered with `minijinja` the way Hugging
//! Face's `apply_chat_template` renders it (`messages`, `tools`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, blocks trimmed,
//! Python's string and dict methods, `raise_exception`, `strftime_now`,
//! `tojson` with Python's separators). A template that `minijinja` cannot
//! compile is left to llama.cpp's built-in matcher ([`super::render_chat`]
//! falls back), which knows the common families by their markers but
//! renders no tools.
//!
//! [`ToolFormat`] says how a template lays out tool calls, read from its
//! source: the coordinator parses a model's answer by it, and constrains a
//! forced call to it.

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

/// How a chat template writes tool calls (and so how the model's answer is
/// read back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// The template has no tool section: tools are described in a system
    /// message and the answer constrained to one JSON object (the
    /// coordinator's generic format).
    None,
    /// Hermes and Qwen: `<tool_call>{"name": …, "arguments": …}</tool_call>`,
    /// one block per call.
    Hermes,
    /// Llama 3.x: `{"name": …, "parameters": …}` (after `<|python_tag|>`
    /// when the model emits it), calls separated by `;`.
    Llama3,
    /// Mistral: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}`.
    Mistral,
    /// The template renders `tools` in a form not known here: the answer is
    /// read as a JSON call object (`{"name", "arguments"}`), an array of
    /// them, or `{"tool_calls": [...]}`.
    Json,
}

impl ToolFormat {
    /// The format a template's source declares, by the markers its tool
    /// section writes.
    pub fn of(source: &str) -> Self {
        if source.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if source.contains("<|python_tag|>") || source.contains("ipython") {
            ToolFormat::Llama3
        } else if source.contains("tools") {
            ToolFormat::Json
        } else {
            ToolFormat::None
        }
    }

    /// Its name in logs and docs.
    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::None => "generic",
            ToolFormat::Hermes => "hermes",
            ToolFormat::Llama3 => "llama3",
            ToolFormat::Mistral => "mistral",
            ToolFormat::Json => "json",
        }
    }
}

/// One message as the template sees it (OpenAI's shape, as Hugging Face
/// passes it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's calls.
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: String,
    /// A `tool` message: the tool's name (when the client gave it).
    pub name: String,
}

impl ChatMessage {
    /// A message with a role and text only.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            ..ChatMessage::default()
        }
    }
}

/// One call in an assistant message of the history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (as OpenAI carries them); handed to the
    /// template as the parsed object, as Hugging Face's templates expect.
    pub arguments: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: String,
    eos: String,
    format: ToolFormat,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are the text of the model's
    /// begin and end tokens (the template's `bos_token`/`eos_token`). The
    /// error is `minijinja`'s, with the line.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| describe(&e))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos: bos.to_string(),
            eos: eos.to_string(),
            format: ToolFormat::of(source),
        })
    }

    /// How this template writes tool calls.
    pub fn tool_format(&self) -> ToolFormat {
        self.format
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text of the begin-of-sequence token the template may write.
    pub fn bos(&self) -> &str {
        &self.bos
    }

    /// Renders `messages` (contents as given) with `tools` (OpenAI's tool
    /// objects) when there are any, the assistant's turn opened. An error
    /// is the template's own `raise_exception` message or `minijinja`'s.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<String, String> {
        let template = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        let messages: Vec<serde_json::Value> = messages.iter().map(as_json).collect();
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), messages.into());
        if let Some(tools) = tools {
            ctx.insert("tools".into(), tools.clone());
        }
        ctx.insert("add_generation_prompt".into(), true.into());
        ctx.insert("bos_token".into(), self.bos.clone().into());
        ctx.insert("eos_token".into(), self.eos.clone().into());
        template
            .render(Value::from_serialize(&ctx))
            .map_err(|e| describe(&e))
    }
}

/// A message in the shape Hugging Face's templates read: `content` a
/// string (or null for an assistant turn that only calls tools), each
/// call `{id, type, function: {name, arguments}}` with `arguments` an
/// object when it is JSON.
fn as_json(m: &ChatMessage) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    o.insert("role".into(), m.role.clone().into());
    o.insert(
        "content".into(),
        if m.content.is_empty() && !m.tool_calls.is_empty() {
            serde_json::Value::Null
        } else {
            m.content.clone().into()
        },
    );
    if !m.tool_calls.is_empty() {
        let calls: Vec<serde_json::Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                let arguments = serde_json::from_str(&c.arguments)
                    .unwrap_or_else(|_| serde_json::Value::String(c.arguments.clone()));
                serde_json::json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": arguments},
                })
            })
            .collect();
        o.insert("tool_calls".into(), calls.into());
    }
    if !m.tool_call_id.is_empty() {
        o.insert("tool_call_id".into(), m.tool_call_id.clone().into());
    }
    if !m.name.is_empty() {
        o.insert("name".into(), m.name.clone().into());
    }
    o.into()
}

/// `minijinja`'s error with its cause chain (the line of the template).
fn describe(e: &Error) -> String {
    if e.kind() == ErrorKind::InvalidOperation {
        if let Some(detail) = e.detail() {
            if let Some(m) = detail.strip_prefix(RAISED) {
                return m.to_string();
            }
        }
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Prefix of an error raised by the template itself.
const RAISED: &str = "raised by the chat template: ";

/// `raise_exception(message)`: the template refuses the conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

/// `tojson(value, indent=None)` as Python's `json.dumps` writes it (the
/// filter Hugging Face registers): `", "` and `": "` between items, no
/// escaping of non-ASCII or of `<`, `>`, `&` (`minijinja`'s own filter
/// escapes those for HTML), keys in their order.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            );
            value.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            value.serialize(&mut ser)
        }
    };
    result.map_err(|e| Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    Ok(Value::from_safe_string(
        String::from_utf8(out).expect("serde_json writes UTF-8"),
    ))
}

/// Python's default JSON separators: `", "` and `": "`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.begin_array_value(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `strftime_now(format)`: today's date (UTC) in `%d`, `%b`, `%B`, `%m`,
/// `%Y`, `%H`, `%M`, `%S` (what templates ask for; other directives are
/// kept as written).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(&format, secs)
}

fn strftime(format: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (secs / 86_400) as i64;
    let tod = secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('H') => out.push_str(&format!("{:02}", tod / 3_600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ChatML template in Hermes' style with a tool section, written for
    /// the tests (the integration tests give it to a worker too).
    const HERMES: &str = include_str!("../../tests/fixtures/hermes-style.jinja");

    #[test]
    fn a_hermes_style_template_renders_tools_and_calls() {
        let t = ChatTemplate::new(HERMES, "", "<|im_end|>").unwrap();
        assert_eq!(t.tool_format(), ToolFormat::Hermes);
        let tools = serde_json::json!([{"type": "function", "function": {
            "name": "get_weather", "description": "Weather <now> & here",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let messages = [
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "18 C".into(),
                tool_call_id: "call_1".into(),
                ..ChatMessage::default()
            },
        ];
        let text = t.render(&messages, Some(&tools)).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a function calling AI model. You may call one or more \
             functions. Function signatures:\n<tools>\n\
             {\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \
             \"description\": \"Weather <now> & here\", \"parameters\": {\"type\": \"object\", \
             \"properties\": {\"city\": {\"type\": \"string\"}}}}}\n</tools>\n\
             For each call return a JSON object with the function name and arguments within \
             <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \
             \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n\
             <|im_start|>user\nWeather in Paris?<|im_end|>\n\
             <|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<|im_end|>\n\
             <|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // Without tools the same template is a plain ChatML one.
        let plain = t.render(&messages[..1], None).unwrap();
        assert_eq!(
            plain,
            "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_the_templates_own_errors_work() {
        let t = ChatTemplate::new(
            "{% if messages[0].content.startswith('x') %}{{ raise_exception('no x, please') }}{% endif %}\
             {{ messages[0].content.strip().upper() }}|{{ bos_token }}|{{ {'b': 1, 'a': [1, 2]} | tojson }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi ")], None)
                .unwrap(),
            "HI|<s>|{\"b\": 1, \"a\": [1, 2]}"
        );
        assert_eq!(
            t.render(&[ChatMessage::new("user", "xy")], None)
                .unwrap_err(),
            "no x, please"
        );
        let bad = ChatTemplate::new("{% if %}", "", "").unwrap_err();
        assert!(bad.contains("chat_template:1"), "{bad}");
    }

    #[test]
    fn formats_are_told_by_their_markers() {
        assert_eq!(ToolFormat::of("{{ '[TOOL_CALLS]' }}"), ToolFormat::Mistral);
        assert_eq!(
            ToolFormat::of("{% if tools %}<|python_tag|>{% endif %}"),
            ToolFormat::Llama3
        );
        assert_eq!(
            ToolFormat::of("{% for t in tools %}{% endfor %}"),
            ToolFormat::Json
        );
        assert_eq!(
            ToolFormat::of("<|im_start|>{{ message.content }}"),
            ToolFormat::None
        );
    }

    #[test]
    fn dates_are_written_like_strftime() {
        // 2024-07-26 13:05:09 UTC.
        assert_eq!(
            strftime("%d %b %Y %B %m %H:%M:%S %% %j", 1_721_999_109),
            "26 Jul 2024 July 07 13:05:09 % %j"
        );
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
    }
}
