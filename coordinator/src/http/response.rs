//! Whole (non-streamed) answers: the completions collected into OpenAI's
//! JSON, and the pieces streamed answers share (ids, finish reasons,
//! log-probabilities, usage). Every object a chat or completions answer
//! sends is a typed struct here ([`ChatCompletion`], [`Chunk`] and their
//! parts), so a field's name and shape are written once.

use serde::Serialize;

use super::*;

/// A chat completion, a completion, or one streamed chunk of either: the
/// envelope OpenAI's answers share, around choices of type `C`.
#[derive(Debug, Serialize)]
pub struct Envelope<C> {
    /// `chatcmpl-<request id>` or `cmpl-<request id>`.
    pub id: String,
    /// `chat.completion`, `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// The choices (none in a stream's usage chunk).
    pub choices: Vec<C>,
    /// Whole answers: always. Streams: absent, or `null` on every chunk but
    /// the last when `stream_options.include_usage` asks for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// A whole chat answer.
pub type ChatCompletion = Envelope<ChatChoice>;
/// A whole completions answer.
pub type TextCompletion = Envelope<TextChoice>;

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated, over all choices.
    pub completion_tokens: u32,
    /// The sum.
    pub total_tokens: u32,
    /// Of the prompt, what came from the KV cache.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens a worker found in its prefix cache.
    pub cached_tokens: u32,
}

/// One chat choice of a whole answer.
#[derive(Debug, Serialize)]
pub struct ChatChoice {
    /// The choice's index (`n`).
    pub index: usize,
    /// The assistant's message.
    pub message: AssistantMessage,
    /// `{"content": [...]}` when log-probabilities were asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length`, `tool_calls` or `abort`.
    pub finish_reason: Option<&'static str>,
}

/// The assistant's message of a chat choice.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The text; `null` when the answer is only tool calls.
    pub content: Option<String>,
    /// The calls, when the answer makes any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

impl AssistantMessage {
    /// A message of text only.
    pub fn text(content: impl Into<String>) -> Self {
        Self {
            role: "assistant",
            content: Some(content.into()),
            tool_calls: Vec::new(),
        }
    }
}

/// One tool call of an assistant's message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_<request id>_<choice>_<k>`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The function called.
    pub function: FunctionCall,
}

impl ToolCall {
    /// A call of function `name` with `arguments` (JSON text).
    pub fn function(id: String, name: impl Into<String>, arguments: String) -> Self {
        Self {
            id,
            kind: "function",
            function: FunctionCall {
                name: name.into(),
                arguments,
            },
        }
    }
}

/// A call's function: its name and its arguments as JSON text.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// The arguments, a JSON object written as text.
    pub arguments: String,
}

/// Chat log-probabilities: one entry per token.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    /// The tokens in order.
    pub content: Vec<TokenLogprob>,
}

/// One token's log-probability and its alternatives.
#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position.
    pub top_logprobs: Vec<TopEntry>,
}

impl TokenLogprob {
    fn of(token: &str, logprob: f32, top: &[TopLogprob]) -> Self {
        Self {
            token: token.to_string(),
            logprob,
            bytes: token.as_bytes().to_vec(),
            top_logprobs: top
                .iter()
                .map(|t| TopEntry {
                    token: t.token.clone(),
                    logprob: t.logprob,
                    bytes: t.token.as_bytes().to_vec(),
                })
                .collect(),
        }
    }
}

/// One alternative of [`TokenLogprob::top_logprobs`].
#[derive(Debug, Clone, Serialize)]
pub struct TopEntry {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One choice of a completions answer, whole or streamed.
#[derive(Debug, Serialize)]
pub struct TextChoice {
    /// The choice's index (`n`).
    pub index: usize,
    /// Its text (after the prompt, with `echo`).
    pub text: String,
    /// The legacy log-probabilities, when asked for.
    pub logprobs: Option<TextLogprobs>,
    /// `stop`, `length` or `abort`; `null` until the last chunk.
    pub finish_reason: Option<&'static str>,
}

/// The completions API's log-probabilities, in columns.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TextLogprobs {
    /// The tokens' texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// Per token, the most likely tokens and their log-probabilities.
    pub top_logprobs: Vec<TopMap>,
    /// Per token, its byte offset in the choice's text.
    pub text_offset: Vec<usize>,
}

/// A token's alternatives as the completions API writes them: an object
/// from token text to log-probability, most likely first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopMap(pub Vec<(String, f32)>);

impl Serialize for TopMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

/// One choice of a streamed chat chunk.
#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    /// The choice's index (`n`).
    pub index: usize,
    /// What this chunk adds.
    pub delta: Delta,
    /// This chunk's token's log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// Set on the choice's last chunk.
    pub finish_reason: Option<&'static str>,
}

/// A streamed chat chunk (a completions chunk is an
/// `Envelope<TextChoice>`).
pub type Chunk = Envelope<ChunkChoice>;

/// What one chat chunk adds to a choice's message.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Delta {
    /// `assistant`, on a choice's first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// A call's start (index, id, type, name) or its arguments.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// One piece of a streamed tool call, as OpenAI sends them: first the
/// index, id, type and name with empty arguments, then the arguments.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ToolCallDelta {
    /// Which call of the message.
    pub index: usize,
    /// The call's id (first piece only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first piece only).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// The name (first piece) and arguments.
    pub function: FunctionDelta,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FunctionDelta {
    /// The name (first piece only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Argument text.
    pub arguments: String,
}

/// Serializes an answer (serde_json cannot fail on these types: every key
/// is a string and no value is a non-finite float written as a number).
pub(crate) fn to_value(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
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

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn id_of(kind: Kind, request_id: &str) -> String {
    match kind {
        Kind::Chat => format!("chatcmpl-{request_id}"),
        Kind::Completion => format!("cmpl-{request_id}"),
    }
}

/// One choice's text and log-probabilities as they accumulate.
#[derive(Default)]
pub(crate) struct ChoiceAcc {
    pub(crate) text: String,
    pub(crate) finish: Option<&'static str>,
    /// Chat: `logprobs.content`.
    pub(crate) chat_logprobs: ChatLogprobs,
    /// Completions: tokens, token_logprobs, top_logprobs, text_offset.
    pub(crate) text_logprobs: TextLogprobs,
    pub(crate) prompt_tokens: u32,
    pub(crate) cached_tokens: u32,
    pub(crate) generated: u32,
}

/// A token's alternatives, as the completions API writes them.
/// Two token ids with one text keep the likelier's entry, once.
pub(crate) fn top_map(top: &[TopLogprob]) -> TopMap {
    let mut out: Vec<(String, f32)> = Vec::with_capacity(top.len());
    for t in top {
        if !out.iter().any(|(token, _)| *token == t.token) {
            out.push((t.token.clone(), t.logprob));
        }
    }
    TopMap(out)
}

/// The chat log-probabilities of one streamed token.
pub(crate) fn token_logprobs(m: &InferResponse) -> Option<ChatLogprobs> {
    m.logprob.map(|lp| ChatLogprobs {
        content: vec![TokenLogprob::of(&m.token, lp, &m.top_logprobs)],
    })
}

impl ChoiceAcc {
    pub(crate) fn add(&mut self, m: &InferResponse) {
        if let Some(lp) = m.logprob {
            self.chat_logprobs
                .content
                .push(TokenLogprob::of(&m.token, lp, &m.top_logprobs));
            let t = &mut self.text_logprobs;
            t.text_offset.push(self.text.len());
            t.tokens.push(m.token.clone());
            t.token_logprobs.push(lp);
            t.top_logprobs.push(top_map(&m.top_logprobs));
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
pub(crate) fn usage(choices: &[ChoiceAcc]) -> Usage {
    let prompt = choices.iter().map(|c| c.prompt_tokens).max().unwrap_or(0);
    let cached = choices.iter().map(|c| c.cached_tokens).max().unwrap_or(0);
    let completion: u32 = choices.iter().map(|c| c.generated).sum();
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: cached,
        },
    }
}

/// Reads every message of a non-streaming request into one response.
pub(crate) async fn collect(mut call: Call, shape: &Shape) -> Result<Value, Status> {
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
    let id = id_of(shape.kind, &call.request_id);
    let usage = Some(Some(usage(&choices)));
    Ok(match shape.kind {
        Kind::Chat => to_value(&ChatCompletion {
            id,
            object: "chat.completion",
            created: unix_now(),
            model,
            choices: choices
                .into_iter()
                .enumerate()
                .map(|(i, c)| chat_choice(i, c, shape, &call.request_id))
                .collect(),
            usage,
        }),
        Kind::Completion => {
            let echo = shape.echo.as_deref().unwrap_or("");
            to_value(&TextCompletion {
                id,
                object: "text_completion",
                created: unix_now(),
                model,
                choices: choices
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let mut logprobs = c.text_logprobs;
                        for o in &mut logprobs.text_offset {
                            *o += echo.len();
                        }
                        TextChoice {
                            index: i,
                            text: format!("{echo}{}", c.text),
                            logprobs: shape.logprobs.then_some(logprobs),
                            finish_reason: c.finish,
                        }
                    })
                    .collect(),
                usage,
            })
        }
    })
}

/// A finished chat choice: its text, or with tools the calls read from it.
fn chat_choice(i: usize, c: ChoiceAcc, shape: &Shape, request_id: &str) -> ChatChoice {
    if shape.tools {
        let (message, finish) = tools::message(
            &c.text,
            c.finish,
            &format!("{request_id}_{i}"),
            shape.tool_format,
        );
        return ChatChoice {
            index: i,
            message,
            logprobs: None,
            finish_reason: finish,
        };
    }
    ChatChoice {
        index: i,
        message: AssistantMessage::text(c.text),
        logprobs: shape.logprobs.then_some(c.chat_logprobs),
        finish_reason: c.finish,
    }
}
