//! Whole (non-streamed) answers: the completions collected into OpenAI's
//! JSON, and the pieces streamed answers share (ids, finish reasons,
//! log-probabilities, usage).

use super::*;

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

pub(crate) fn top_entries(top: &[TopLogprob]) -> Vec<Value> {
    top.iter()
        .map(|t| json!({"token": t.token, "logprob": t.logprob, "bytes": t.token.as_bytes()}))
        .collect()
}

/// One choice's text and log-probabilities as they accumulate.
#[derive(Default)]
pub(crate) struct ChoiceAcc {
    pub(crate) text: String,
    pub(crate) finish: Option<&'static str>,
    /// Chat: `logprobs.content` entries.
    pub(crate) chat_logprobs: Vec<Value>,
    /// Completions: tokens, token_logprobs, top_logprobs, text_offset.
    pub(crate) tokens: Vec<String>,
    pub(crate) token_logprobs: Vec<f32>,
    pub(crate) top: Vec<Value>,
    pub(crate) offsets: Vec<usize>,
    pub(crate) prompt_tokens: u32,
    pub(crate) cached_tokens: u32,
    pub(crate) generated: u32,
}

impl ChoiceAcc {
    pub(crate) fn add(&mut self, m: &InferResponse) {
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
pub(crate) fn usage(choices: &[ChoiceAcc]) -> Value {
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
