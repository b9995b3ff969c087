//! Server-sent events: the one encoder every streamed answer uses
//! ([`encode`]), and the chat and completions chunk stream ([`Events`]).

use super::*;

/// A server-sent event stream's response.
pub(crate) fn sse_response(body: Body) -> Response {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The SSE event stream of a streaming request.
pub(crate) struct Events {
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

/// One server-sent event: `event: <name>` when it is named (the Responses
/// API's typed events), then `data: <json>` on one line (serde writes no
/// raw newline), then the blank line that ends it.
pub(crate) fn encode(name: Option<&str>, data: &Value) -> Bytes {
    match name {
        Some(name) => Bytes::from(format!("event: {name}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

/// The end of a chat or completions stream.
pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

/// A chat or completions chunk.
pub(crate) fn event(value: &Value) -> Bytes {
    encode(None, value)
}

impl Events {
    pub(crate) fn new(call: Call, shape: Shape) -> Self {
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

    pub(crate) fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Bytes>> {
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
                    let last: Chunk = Envelope {
                        choices: Vec::new(),
                        usage: Some(Some(usage(&self.choices))),
                        ..self.envelope()
                    };
                    tail.extend_from_slice(&event(&to_value(&last)));
                }
                tail.extend_from_slice(DONE);
                Poll::Ready(Some(Bytes::from(tail)))
            }
        }
    }

    pub(crate) fn object(&self) -> &'static str {
        match self.shape.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        }
    }

    pub(crate) fn chunk(&mut self, m: &InferResponse) -> Bytes {
        if !m.model.is_empty() {
            self.model = m.model.clone();
        }
        let i = m.choice as usize;
        if i >= self.choices.len() {
            return Bytes::new();
        }
        let offset = self.choices[i].text.len();
        self.choices[i].add(m);
        let finish = (m.finish_reason != FinishReason::Unspecified as i32)
            .then(|| finish_reason(m.finish_reason));
        if self.shape.tools {
            return self.tool_chunks(i, finish);
        }
        let first = !std::mem::replace(&mut self.opened[i], true);
        match self.shape.kind {
            Kind::Chat => {
                let delta = Delta {
                    role: first.then_some("assistant"),
                    content: (!m.token.is_empty() || (first && finish.is_none()))
                        .then(|| m.token.clone()),
                    tool_calls: Vec::new(),
                };
                self.wrap(ChunkChoice {
                    index: i,
                    delta,
                    logprobs: token_logprobs(m),
                    finish_reason: finish,
                })
            }
            Kind::Completion => {
                let echo = self.shape.echo.as_deref().unwrap_or("");
                let (echo, offset) = if first {
                    (echo, offset + echo.len())
                } else {
                    ("", offset + echo.len())
                };
                let logprobs = m.logprob.map(|lp| TextLogprobs {
                    tokens: vec![m.token.clone()],
                    token_logprobs: vec![lp],
                    top_logprobs: vec![top_map(&m.top_logprobs)],
                    text_offset: vec![offset],
                });
                self.wrap(TextChoice {
                    index: i,
                    text: format!("{echo}{}", m.token),
                    logprobs,
                    finish_reason: finish,
                })
            }
        }
    }

    /// The fields every chunk of this stream shares, with no choice.
    fn envelope<C>(&self) -> Envelope<C> {
        Envelope {
            id: self.id.clone(),
            object: self.object(),
            created: self.created,
            model: self.model.clone(),
            choices: Vec::new(),
            // Every chunk before the usage chunk carries `usage: null`.
            usage: self.shape.include_usage.then_some(None),
        }
    }

    /// One chunk event holding `choice`.
    pub(crate) fn wrap<C: serde::Serialize>(&self, choice: C) -> Bytes {
        let chunk = Envelope {
            choices: vec![choice],
            ..self.envelope()
        };
        event(&to_value(&chunk))
    }

    /// With tools: nothing until choice `i` finishes (its answer is one
    /// JSON object), then its deltas in OpenAI's order (the role and each
    /// call's id and name, then its arguments; or the content) and a last
    /// chunk with the finish reason.
    pub(crate) fn tool_chunks(&mut self, i: usize, finish: Option<&'static str>) -> Bytes {
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
        let chunk = |delta: Delta, finish: Option<&'static str>| {
            self.wrap(ChunkChoice {
                index: i,
                delta,
                logprobs: None,
                finish_reason: finish,
            })
        };
        for (k, mut delta) in deltas.into_iter().enumerate() {
            if k == 0 {
                delta.role = Some("assistant");
            }
            out.extend_from_slice(&chunk(delta, None));
        }
        out.extend_from_slice(&chunk(Delta::default(), finish));
        Bytes::from(out)
    }
}
