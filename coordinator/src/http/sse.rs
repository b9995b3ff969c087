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
                    tail.extend_from_slice(&event(&json!({
                        "id": self.id,
                        "object": self.object(),
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage(&self.choices),
                    })));
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
    pub(crate) fn wrap(&self, choice: Value) -> Bytes {
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
