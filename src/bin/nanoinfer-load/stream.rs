//! One stream per API, read to its end and classified.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header;
use nanoinfer::code_name;
use nanoinfer_proto::nanoinfer::{
    infer_service_client::InferServiceClient, FinishReason, InferRequest,
};
use serde_json::Value;
use tokio::time::timeout_at;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Grpc,
    Http,
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Completed,
    /// An error before any token, by code.
    Rejected(String),
    /// An error after at least one token, by code.
    Failed(String),
    /// A clean end with no final message.
    OkWithoutFinal,
    /// No end within --stream-timeout-s.
    TimedOut,
}

/// What one stream saw.
#[derive(Debug)]
pub struct Stream {
    pub api: Api,
    pub id: String,
    pub end: End,
    pub ttft: Option<Duration>,
    pub tokens: u32,
    /// The first break of token order this stream showed.
    pub violation: Option<String>,
    pub retry_after: bool,
    /// Why it did not complete (the error message).
    pub detail: String,
}

impl Stream {
    pub fn new(api: Api, id: String) -> Self {
        Self {
            api,
            id,
            end: End::TimedOut,
            ttft: None,
            tokens: 0,
            violation: None,
            retry_after: false,
            detail: String::new(),
        }
    }

    /// Ends the stream with an error `code`: rejected before any token,
    /// failed after one.
    pub fn error(mut self, code: &str, detail: impl Into<String>) -> Self {
        self.end = if self.tokens == 0 {
            End::Rejected(code.to_string())
        } else {
            End::Failed(code.to_string())
        };
        self.detail = detail.into();
        self
    }

    pub fn ended(mut self, end: End, detail: impl Into<String>) -> Self {
        self.end = end;
        self.detail = detail.into();
        self
    }

    pub fn violate(&mut self, why: String) {
        self.violation.get_or_insert(why);
    }

    /// A token arrived (the first one sets the TTFT).
    pub fn token(&mut self, sent: Instant, seen: &AtomicU64) {
        if self.tokens == 0 {
            self.ttft = Some(sent.elapsed());
        }
        self.tokens += 1;
        seen.fetch_add(1, Ordering::Relaxed);
    }
}

/// One gRPC `Infer` stream, read to its end.
pub async fn grpc_stream(
    mut client: InferServiceClient<Channel>,
    request: InferRequest,
    api_key: Option<MetadataValue<Ascii>>,
    deadline: tokio::time::Instant,
    seen: &AtomicU64,
) -> Stream {
    let mut s = Stream::new(Api::Grpc, request.request_id.clone());
    let mut request = tonic::Request::new(request);
    if let Some(key) = api_key {
        request.metadata_mut().insert("authorization", key);
    }
    let sent = Instant::now();
    let mut stream = match timeout_at(deadline, client.infer(request)).await {
        Err(_) => return s.ended(End::TimedOut, "no response headers"),
        Ok(Err(status)) => {
            s.retry_after = status.metadata().contains_key("retry-after");
            return s.error(code_name(status.code()), status.message());
        }
        Ok(Ok(response)) => response.into_inner(),
    };
    let mut finished = false;
    loop {
        match timeout_at(deadline, stream.message()).await {
            Err(_) if finished => {
                s.violate("no end of stream after the final message".into());
                return s.ended(End::Completed, "");
            }
            Err(_) => {
                let tokens = s.tokens;
                return s.ended(End::TimedOut, format!("after {tokens} tokens"));
            }
            Ok(Ok(Some(_))) if finished => s.violate("a message after the final one".into()),
            Ok(Ok(Some(m))) if m.finish_reason != FinishReason::Unspecified as i32 => {
                finished = true;
                let generated = m.usage.map(|u| u.generated_tokens);
                if m.index != s.tokens || generated != Some(s.tokens) {
                    s.violate(format!(
                        "final message says index {} and {generated:?} generated tokens after {} tokens",
                        m.index, s.tokens
                    ));
                }
            }
            Ok(Ok(Some(m))) => {
                if m.usage.is_some() {
                    s.violate("usage on a message without a finish reason".into());
                }
                if m.index != s.tokens {
                    s.violate(format!("index {} after {} tokens", m.index, s.tokens));
                }
                s.token(sent, seen);
            }
            Ok(Ok(None)) if finished => return s.ended(End::Completed, ""),
            Ok(Ok(None)) => {
                let tokens = s.tokens;
                return s.ended(
                    End::OkWithoutFinal,
                    format!("status OK after {tokens} tokens and no final message"),
                );
            }
            Ok(Err(status)) if finished => {
                s.violate(format!(
                    "{} after the final message",
                    code_name(status.code())
                ));
                return s.ended(End::Completed, "");
            }
            Ok(Err(status)) => return s.error(code_name(status.code()), status.message()),
        }
    }
}

/// What an SSE body said so far.
#[derive(Debug, Default)]
pub struct Sse {
    /// Bytes of an event not yet complete.
    pub buf: Vec<u8>,
    /// Token chunks (a choice without a finish reason).
    pub tokens: u32,
    pub finish: bool,
    pub done: bool,
    /// `usage.completion_tokens` of the usage chunk.
    pub usage: Option<u64>,
    /// An error event: (type, message).
    pub error: Option<(String, String)>,
    /// A chunk that was not JSON, or `[DONE]` twice.
    pub malformed: Option<String>,
}

impl Sse {
    /// Feeds body bytes; returns how many token chunks they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> u32 {
        self.buf.extend_from_slice(bytes);
        let before = self.tokens;
        while let Some(end) = find(&self.buf, b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            let event = String::from_utf8_lossy(&event).replace('\r', "");
            for line in event.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    self.data(data.trim());
                }
            }
        }
        self.tokens - before
    }

    pub fn data(&mut self, data: &str) {
        if self.done || self.error.is_some() {
            self.malformed
                .get_or_insert(format!("an event after the end: {data}"));
            return;
        }
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            self.malformed.get_or_insert(format!("not JSON: {data}"));
            return;
        };
        if let Some(e) = v.get("error") {
            let kind = e["type"].as_str().unwrap_or("error").to_string();
            let message = e["message"].as_str().unwrap_or_default().to_string();
            self.error = Some((kind, message));
            return;
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            self.usage = Some(n);
        }
        for choice in v["choices"].as_array().into_iter().flatten() {
            if choice["finish_reason"].is_null() {
                self.tokens += 1;
            } else {
                self.finish = true;
            }
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP SSE stream on its own connection, read to `[DONE]` or an end.
pub async fn http_stream(
    connection: Result<SendRequest<Full<Bytes>>, String>,
    request: hyper::Request<Full<Bytes>>,
    id: String,
    deadline: tokio::time::Instant,
    seen: &AtomicU64,
) -> Stream {
    let s = Stream::new(Api::Http, id);
    let mut sender = match connection {
        Ok(sender) => sender,
        Err(e) => return s.error("CONNECT", e),
    };
    let sent = Instant::now();
    let response = match timeout_at(deadline, sender.send_request(request)).await {
        Err(_) => return s.ended(End::TimedOut, "no response headers"),
        Ok(Err(e)) => return s.error("IO", e.to_string()),
        Ok(Ok(response)) => response,
    };
    read_sse(s, response, sent, deadline, seen).await
}

pub async fn read_sse(
    mut s: Stream,
    response: hyper::Response<hyper::body::Incoming>,
    sent: Instant,
    deadline: tokio::time::Instant,
    seen: &AtomicU64,
) -> Stream {
    s.retry_after = response.headers().contains_key(header::RETRY_AFTER);
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let text = match timeout_at(deadline, body.collect()).await {
            Ok(Ok(collected)) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            _ => String::new(),
        };
        return s.error(status.as_str(), text);
    }
    let mut sse = Sse::default();
    loop {
        let frame = match timeout_at(deadline, body.frame()).await {
            Err(_) => {
                let tokens = s.tokens;
                return s.ended(End::TimedOut, format!("after {tokens} tokens"));
            }
            Ok(None) => None,
            Ok(Some(Err(e))) => return s.error("IO", e.to_string()),
            Ok(Some(Ok(frame))) => frame.into_data().ok(),
        };
        if let Some(data) = &frame {
            for _ in 0..sse.feed(data) {
                s.token(sent, seen);
            }
        }
        if let Some(why) = sse.malformed.take() {
            s.violate(why);
        }
        if let Some((kind, message)) = sse.error.take() {
            return s.error(&kind, message);
        }
        if sse.done {
            if let Some(n) = sse.usage.filter(|&n| n != u64::from(s.tokens)) {
                s.violate(format!("usage says {n} tokens, {} chunks came", s.tokens));
            }
            return if sse.finish {
                s.ended(End::Completed, "")
            } else {
                let tokens = s.tokens;
                s.ended(
                    End::OkWithoutFinal,
                    format!("[DONE] after {tokens} tokens and no finish_reason"),
                )
            };
        }
        if frame.is_none() {
            let tokens = s.tokens;
            return s.ended(
                End::OkWithoutFinal,
                format!("body ended after {tokens} tokens without [DONE]"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(chunks: &[&str]) -> Sse {
        let mut s = Sse::default();
        for c in chunks {
            s.feed(c.as_bytes());
        }
        s
    }

    #[test]
    fn sse_events_split_across_reads_are_counted_once() {
        let body = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n\
                    data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"},\"finish_reason\":null}]}\r\n\r\n\
                    data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n\
                    data: {\"choices\":[],\"usage\":{\"completion_tokens\":2}}\n\n\
                    data: [DONE]\n\n";
        for cut in [1, 7, 40, 100, body.len() - 3] {
            let s = sse(&[&body[..cut], &body[cut..]]);
            assert_eq!(
                (s.tokens, s.finish, s.done, s.usage),
                (2, true, true, Some(2))
            );
            assert!(s.error.is_none() && s.malformed.is_none(), "{s:?}");
        }
    }

    #[test]
    fn sse_error_events_and_garbage_are_seen() {
        let s =
            sse(&["data: {\"error\":{\"type\":\"service_unavailable\",\"message\":\"gone\"}}\n\n"]);
        assert_eq!(s.error, Some(("service_unavailable".into(), "gone".into())));
        let s = sse(&["data: [DONE]\n\ndata: [DONE]\n\n"]);
        assert!(s.malformed.is_some());
        let s = sse(&["data: {oops\n\n"]);
        assert!(s.malformed.is_some());
    }

    #[test]
    fn a_stream_is_rejected_before_its_first_token_and_failed_after() {
        let s = Stream::new(Api::Grpc, "a".into()).error("UNAVAILABLE", "x");
        assert_eq!(s.end, End::Rejected("UNAVAILABLE".into()));
        let mut s = Stream::new(Api::Grpc, "b".into());
        s.token(Instant::now(), &AtomicU64::new(0));
        let s = s.error("UNAVAILABLE", "x");
        assert_eq!(s.end, End::Failed("UNAVAILABLE".into()));
        assert!(s.ttft.is_some());
    }
}
