//! One request's life after validation, as a task: pick a worker, open
//! `Generate`, relay its tokens into the client's bounded channel, and when
//! a worker fails, move the request (STYLE 7: a bounded `mpsc` feeds the
//! response stream; a failed send or `closed()` means the client left).
//!
//! - **Waiting for room**: while no worker has room the request waits in the
//!   coordinator's [admission queue](crate::admission) (bounded; retries and
//!   resumes first; API keys take turns); a worker that answers "full"
//!   (RESOURCE_EXHAUSTED) sends it back there, which costs no attempt.
//! - **Liveness is progress**: a worker is judged hung by its connection
//!   (HTTP/2 keepalive) or by a request it has *admitted* (taken into a
//!   slot) that produces no token for `--first-token-timeout`, never by time
//!   the request spent in its queue.
//! - **Before the first token** a failed attempt (connect error, the worker
//!   dying while the request was queued or prefilling, no progress after
//!   admission) is retried on another worker.
//! - **After tokens were relayed** the request resumes on another worker from
//!   the token ids already delivered ([`crate::upstream::generate_request`]),
//!   so the client sees one unbroken stream: `index` stays contiguous and the
//!   final usage counts the original prompt and every generated token.
//! - Never the same worker twice, at most `--max-attempts` workers, with a
//!   short jittered backoff between attempts.
//! - The deadline (the client's `grpc-timeout`, at most `--request-timeout`)
//!   travels to each worker; when it passes the client gets
//!   DEADLINE_EXCEEDED after the tokens it already has.
//! - A client that reads nothing for `--stalled-stream-timeout` (its HTTP/2
//!   window and this channel full) is cancelled, which frees its worker
//!   slot, and its stream ends with ABORTED (through [`Abort`], which jumps
//!   the full channel), never with an OK that lacks the final message.

use std::sync::Arc;
use std::time::Duration;

use nanoinfer_proto::nanoinfer::{FinishReason, InferResponse, TopLogprob, UsageMetrics};
use nanoinfer_proto::worker::{self as wpb, worker_service_client::WorkerServiceClient};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::{Code, Status};
use tracing::Span;

use crate::admission::Tenant;
use crate::config::UpstreamConfig;
use crate::error::CoordinatorError;
use crate::metrics::{code_name, CoordinatorMetrics, RequestRecorder, WorkerCodeLabel};
use crate::routing::{jitter, Pick, Picked, Router};
use crate::upstream::{finish_label, generate_request, judge, Failure};
use crate::validate::InferParams;

/// Messages buffered between the relay task and the client's stream. Small:
/// h2 already buffers up to the client's window, and memory per stream is
/// what a coordinator with 10,000 streams pays.
pub const RELAY_BUFFER: usize = 4;

/// Items of the client's stream. Boxed: tokio's channel allocates its slots
/// 32 at a time, and 32 inline messages (136 bytes each) would cost every
/// open stream 4 KiB.
pub type Item = Result<Box<InferResponse>, Status>;

/// A call's way to end its stream with an error at once, ahead of messages
/// still waiting in the full channel (a stalled client). Shared by the
/// call's relays; the first error wins.
#[derive(Clone)]
pub struct Abort(Arc<std::sync::Mutex<Option<oneshot::Sender<Status>>>>);

impl Abort {
    /// A new abort and the receiver the call's stream watches.
    pub fn new() -> (Self, oneshot::Receiver<Status>) {
        let (tx, rx) = oneshot::channel();
        (Self(Arc::new(std::sync::Mutex::new(Some(tx)))), rx)
    }

    /// Ends the call's stream with `status` (if nothing did yet).
    pub fn abort(&self, status: Status) {
        if let Some(tx) = self.0.lock().expect("abort lock").take() {
            let _ = tx.send(status);
        }
    }
}

/// Everything one relay needs.
pub struct Relay {
    /// The validated request.
    pub params: InferParams,
    /// When the request must be over.
    pub deadline: Instant,
    /// Worker choice and ejection.
    pub router: Arc<Router>,
    /// Timeouts and attempt bound.
    pub upstream: UpstreamConfig,
    /// Metrics.
    pub metrics: Arc<CoordinatorMetrics>,
    /// This request's metrics.
    pub recorder: RequestRecorder,
    /// The request's span (the task runs inside it).
    pub span: Span,
    /// Which of the request's `n` completions this relay produces.
    pub choice: u32,
    /// The prompt's prefix blocks, for prefix-affinity routing (empty
    /// under the other policies).
    pub prefix: Arc<[u64]>,
    /// With `n` > 1: one worker runs every completion, so it copies the
    /// prompt's KV cells between them instead of computing them again.
    pub affinity: Affinity,
    /// Whose turn it is in the admission queue (the API key's hash).
    pub tenant: Tenant,
    /// Ends the call's stream past a full channel.
    pub abort: Abort,
}

/// Where the completions of one request go.
pub enum Affinity {
    /// A single completion: the router picks.
    None,
    /// The first completion: its pick is sent to the others.
    Lead(tokio::sync::watch::Sender<Option<String>>),
    /// A later completion: it tries the first one's worker first.
    Follow(tokio::sync::watch::Receiver<Option<String>>),
}

/// How one attempt on one worker ended.
enum Attempt {
    /// The final message reached the client's channel.
    Done,
    /// The client went away.
    ClientGone,
    /// The worker failed.
    Failed(String, Failure),
    /// The request is over for a reason no other worker changes.
    End(CoordinatorError),
}

struct State {
    relay: Relay,
    tx: mpsc::Sender<Item>,
    /// Until the first worker accepted the request: where a failure goes so
    /// the call itself fails (trailers only), as before any streaming.
    opened: Option<oneshot::Sender<Result<(), Status>>>,
    /// Token ids the client has received, in order.
    delivered: Vec<i32>,
    /// Workers tried, never tried again.
    tried: Vec<String>,
    /// Workers that answered "full" since the request last waited in the
    /// admission queue: skipped until then.
    busy: Vec<String>,
    /// `worker: what went wrong`, for the final error.
    notes: Vec<String>,
    /// Whether to pause before the next attempt (the last failure was an
    /// answer, not a dead connection).
    backoff: bool,
    /// When the request first waited in the admission queue.
    waiting_since: Option<Instant>,
    /// Cache-aware routing: the prompt's leading blocks the index said the
    /// current attempt's worker holds.
    predicted_blocks: Option<usize>,
}

/// How a wait in the admission queue ended.
enum Waited {
    /// Look for a worker again.
    Again,
    /// The client went away.
    ClientGone,
}

/// Runs the relay; `opened` learns whether the first worker took the
/// request (the call's headers wait for it) and `tx` feeds the client.
pub async fn run(
    relay: Relay,
    tx: mpsc::Sender<Item>,
    opened: oneshot::Sender<Result<(), Status>>,
) {
    let mut state = State {
        relay,
        tx,
        opened: Some(opened),
        delivered: Vec::new(),
        tried: Vec::new(),
        busy: Vec::new(),
        notes: Vec::new(),
        backoff: false,
        waiting_since: None,
        predicted_blocks: None,
    };
    if let Err(e) = state.serve().await {
        state.fail(e).await;
    }
}

/// A jittered pause before retry `n` (1-based) after a worker refused: 20 ms
/// doubling, at most 320 ms, times a factor in [0.5, 1.5) from `jitter` in
/// [0, 1).
pub fn retry_delay(n: usize, jitter: f64) -> Duration {
    let base = 20.0 * 2f64.powi(n.saturating_sub(1).min(4) as i32);
    Duration::from_micros((base * (0.5 + jitter) * 1000.0) as u64)
}

impl State {
    async fn serve(&mut self) -> Result<(), CoordinatorError> {
        loop {
            if self.tried.len() >= self.relay.upstream.max_attempts {
                return Err(self.out_of_workers());
            }
            // Back off only from workers that answered (full, draining):
            // after a dead one the next worker is a different target, and
            // a resume should not wait.
            if self.backoff {
                tokio::select! {
                    _ = tokio::time::sleep(retry_delay(self.tried.len(), jitter())) => {}
                    _ = self.tx.closed() => return Ok(()),
                }
            }
            let model = self.relay.params.model.as_deref();
            let preferred = match &mut self.relay.affinity {
                Affinity::Follow(first) if self.tried.is_empty() => {
                    // The lead picks at once; if it ends without a worker
                    // (its sender dropped), pick as usual.
                    let id = first
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|v| v.clone());
                    id.and_then(|id| self.relay.router.pick_worker(&id))
                }
                _ => None,
            };
            let prefix = &self.relay.prefix;
            let epoch = self.relay.router.admission().epoch();
            let pick = match preferred {
                Some(p) => Pick::Worker(p),
                None if self.busy.is_empty() => {
                    self.relay.router.pick_with_room(&self.tried, model, prefix)
                }
                None => {
                    let skip: Vec<String> = self.tried.iter().chain(&self.busy).cloned().collect();
                    self.relay.router.pick_with_room(&skip, model, prefix)
                }
            };
            let picked = match pick {
                Pick::Worker(picked) => picked,
                // Every worker left is full (or said so): wait for room.
                Pick::Busy => match self.wait_for_room(epoch).await? {
                    Waited::Again => continue,
                    Waited::ClientGone => return Ok(()),
                },
                Pick::None if !self.busy.is_empty() => match self.wait_for_room(epoch).await? {
                    Waited::Again => continue,
                    Waited::ClientGone => return Ok(()),
                },
                Pick::None => {
                    return Err(
                        if let Some(m) = model.filter(|m| !self.relay.router.knows_model(m)) {
                            CoordinatorError::ModelNotFound(m.to_string())
                        } else if self.tried.is_empty() {
                            CoordinatorError::NoWorkers
                        } else {
                            self.out_of_workers()
                        },
                    )
                }
            };
            if let Affinity::Lead(tx) = &self.relay.affinity {
                tx.send_replace(Some(picked.id.clone()));
            }
            tracing::info!(request_id = %self.relay.params.request_id, worker = %picked.id,
                address = %picked.address, attempt = self.tried.len() + 1,
                resume_from = self.delivered.len(), "routing request");
            self.relay.span.record("worker", picked.id.as_str());
            match self.attempt(picked).await {
                Attempt::Done => return Ok(()),
                Attempt::ClientGone => {
                    // Counted as CANCELLED by the recorder; said here too, so
                    // a request that "stopped" can be found in the logs.
                    tracing::info!(request_id = %self.relay.params.request_id,
                        delivered = self.delivered.len(),
                        "client cancelled the request (stream closed); worker call dropped");
                    return Ok(());
                }
                Attempt::End(e) => return Err(e),
                Attempt::Failed(worker, failure) => self.failed(worker, failure)?,
            }
        }
    }

    /// Waits in the admission queue until some worker may have room.
    /// Retries and resumes wait ahead of new requests and are never
    /// refused; a request that has streamed output waits up to its deadline
    /// only, any other up to `--admission-timeout` too.
    async fn wait_for_room(&mut self, epoch: u64) -> Result<Waited, CoordinatorError> {
        let r = &self.relay;
        let admission = r.router.admission().clone();
        let urgent = !self.tried.is_empty() || !self.busy.is_empty();
        let now = Instant::now();
        let since = *self.waiting_since.get_or_insert_with(|| {
            admission.metrics().queued.inc();
            tracing::debug!(request_id = %r.params.request_id, urgent,
                "no worker has room; waiting in the admission queue");
            now
        });
        let queue_limit = since + r.upstream.admission_timeout;
        let limit = if self.delivered.is_empty() {
            queue_limit.min(r.deadline)
        } else {
            r.deadline
        };
        let timed_out = |deadline: Instant| {
            if deadline >= r.deadline {
                CoordinatorError::DeadlineExceeded {
                    delivered: self.delivered.len() as u32,
                }
            } else {
                admission.metrics().timed_out.inc();
                CoordinatorError::QueueTimeout {
                    seconds: r.upstream.admission_timeout.as_secs(),
                    tried: self.notes.clone(),
                }
            }
        };
        if now >= limit {
            return Err(timed_out(limit));
        }
        let waiter = match admission.wait(r.tenant, urgent, epoch) {
            Ok(Some(waiter)) => waiter,
            // Room was released since the pick: look again at once.
            Ok(None) => return Ok(Waited::Again),
            Err(full) => {
                return Err(CoordinatorError::QueueFull {
                    capacity: full.capacity,
                })
            }
        };
        tokio::select! {
            () = waiter.woken() => {}
            () = tokio::time::sleep_until(limit) => return Err(timed_out(limit)),
            () = self.tx.closed() => return Ok(Waited::ClientGone),
        }
        // Workers that said "full" may have room again.
        self.busy.clear();
        Ok(Waited::Again)
    }

    /// Books a worker failure; `Err` when the request must end with it.
    fn failed(&mut self, worker: String, failure: Failure) -> Result<(), CoordinatorError> {
        let verdict = judge(&failure);
        let (code, what) = match &failure {
            Failure::Status(s) => (s.code(), with_causes(s)),
            Failure::Truncated => (
                Code::Unavailable,
                "stream closed before the final message".into(),
            ),
            Failure::FirstTokenTimeout => (
                Code::Unavailable,
                format!(
                    "no progress within {} s on a request it was running",
                    self.relay.upstream.first_token_timeout.as_secs()
                ),
            ),
        };
        self.relay
            .metrics
            .worker_errors
            .get_or_create(&WorkerCodeLabel {
                worker: worker.clone(),
                code: code_name(code),
            })
            .inc();
        if verdict.eject {
            self.relay.router.eject(&worker, &what);
        }
        if !verdict.retry {
            return Err(match failure {
                Failure::Status(status) => CoordinatorError::Upstream { worker, status },
                Failure::Truncated => CoordinatorError::Truncated(worker),
                Failure::FirstTokenTimeout => CoordinatorError::FirstTokenTimeout {
                    worker,
                    seconds: self.relay.upstream.first_token_timeout.as_secs(),
                },
            });
        }
        if code == Code::ResourceExhausted && !verdict.eject {
            // Full, not broken: no attempt used; it waits for room (this
            // worker included, once the request has waited).
            tracing::info!(request_id = %self.relay.params.request_id, worker = %worker,
                error = %what.escape_debug(), delivered = self.delivered.len(),
                "worker is full; the request waits for room");
            self.notes.push(format!("{worker}: {what}"));
            self.busy.push(worker);
            self.backoff = false;
            return Ok(());
        }
        self.backoff = !verdict.eject;
        tracing::warn!(request_id = %self.relay.params.request_id, worker = %worker,
            code = code_name(code), error = %what.escape_debug(), delivered = self.delivered.len(),
            "worker failed the request; moving it");
        self.notes.push(format!("{worker}: {what}"));
        self.tried.push(worker);
        if self.delivered.is_empty() {
            self.relay.metrics.retries.inc();
        } else {
            // Also a span event of the request's span.
            tracing::info!(request_id = %self.relay.params.request_id,
                delivered = self.delivered.len(), "resuming the stream on another worker");
            self.relay.metrics.resumes.inc();
        }
        Ok(())
    }

    fn out_of_workers(&mut self) -> CoordinatorError {
        CoordinatorError::OutOfWorkers {
            delivered: self.delivered.len() as u32,
            tried: std::mem::take(&mut self.notes),
        }
    }

    async fn attempt(&mut self, picked: Picked) -> Attempt {
        let Picked {
            id: worker,
            channel,
            model_name,
            guard: _guard,
            predicted_blocks,
            mut prefill,
            sent: _sent,
            ..
        } = picked;
        // A resumed attempt's prompt is longer than the one predicted for.
        self.predicted_blocks = predicted_blocks.filter(|_| self.delivered.is_empty());
        let now = Instant::now();
        let deadline = self.relay.deadline;
        if now >= deadline {
            return self.deadline_passed();
        }
        let silence = self.relay.upstream.first_token_timeout;
        let mut request = generate_request(&self.relay.params, &self.delivered, deadline - now);
        nanoinfer_telemetry::propagation::inject(&self.relay.span, request.metadata_mut());
        let mut client = WorkerServiceClient::new(channel);
        // Created once per attempt, not once per token: a timer polled in
        // a fresh `sleep_until` is inserted into (and removed from) the
        // timer wheel every time, and `closed()` registers a waiter. The
        // progress timer first bounds the call's opening (a worker answers
        // as soon as it has queued the request), then runs only once the
        // worker has admitted the request: it is moved forward lazily, when
        // it fires, to the last progress plus the timeout.
        let progress_timer = tokio::time::sleep_until(now + silence);
        let deadline_timer = tokio::time::sleep_until(deadline);
        let tx = self.tx.clone();
        let client_gone = tx.closed();
        tokio::pin!(progress_timer, deadline_timer, client_gone);
        let opened = tokio::select! {
            r = client.generate(request) => r,
            _ = &mut progress_timer => return Attempt::Failed(worker, Failure::FirstTokenTimeout),
            _ = &mut deadline_timer => return self.deadline_passed(),
            _ = &mut client_gone => return Attempt::ClientGone,
        };
        let mut stream = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => return Attempt::Failed(worker, Failure::Status(status)),
        };
        self.relay.recorder.served_by(&model_name);
        if let Some(opened) = self.opened.take() {
            self.relay.recorder.upstream_opened();
            let _ = opened.send(Ok(()));
        }
        // Queued until the worker says it admitted the request: no clock.
        let mut admitted = false;
        let mut last_progress = Instant::now();
        loop {
            let message = tokio::select! {
                // A message already there wins over a timer that expired
                // while this task was busy handing the last one over.
                biased;
                m = stream.message() => m,
                _ = &mut deadline_timer => return self.deadline_passed(),
                _ = &mut client_gone => return Attempt::ClientGone,
                _ = &mut progress_timer, if admitted => {
                    let due = last_progress + silence;
                    if Instant::now() < due {
                        progress_timer.as_mut().reset(due);
                        continue;
                    }
                    return Attempt::Failed(worker, Failure::FirstTokenTimeout);
                }
            };
            let msg = match message {
                Ok(Some(msg)) => msg,
                Ok(None) => return Attempt::Failed(worker, Failure::Truncated),
                Err(status) => return Attempt::Failed(worker, Failure::Status(status)),
            };
            if msg.admitted {
                if !admitted {
                    admitted = true;
                    last_progress = Instant::now();
                    progress_timer.as_mut().reset(last_progress + silence);
                }
                continue;
            }
            match msg.finished {
                None => {
                    // Prefilled: no longer pending work on the worker.
                    prefill.take();
                    let index = self.delivered.len() as u32;
                    if msg.index != index {
                        // The worker's count and ours disagree: a resume
                        // went wrong somewhere. Say so loudly.
                        tracing::warn!(request_id = %self.relay.params.request_id,
                            worker = %worker, worker_index = msg.index, delivered = index,
                            "worker token index differs from the tokens delivered");
                    }
                    if let Some(ttft) = self.relay.recorder.token() {
                        self.relay
                            .span
                            .record("nanoinfer.time_to_first_token_ms", ttft * 1e3);
                    }
                    let response = InferResponse {
                        request_id: self.relay.params.request_id.clone(),
                        token: msg.text,
                        index,
                        finish_reason: FinishReason::Unspecified as i32,
                        usage: None,
                        logprob: msg.logprob,
                        top_logprobs: public_top_logprobs(msg.top_logprobs),
                        choice: self.relay.choice,
                        // Named on the first token (and the final message),
                        // so a streaming client knows it at once.
                        model: if index == 0 {
                            model_name.clone()
                        } else {
                            String::new()
                        },
                    };
                    if let Some(end) = self.send(response).await {
                        return end;
                    }
                    // Only a token the client has is resumed from.
                    self.delivered.push(msg.token_id.unwrap_or_default());
                    // After the hand-over: time a slow client took to read
                    // is not the worker's silence.
                    last_progress = Instant::now();
                }
                Some(f) => {
                    let mut response = self.finish(&worker, msg.text, f);
                    response.logprob = msg.logprob;
                    response.top_logprobs = public_top_logprobs(msg.top_logprobs);
                    response.model = model_name;
                    return self.send(response).await.unwrap_or(Attempt::Done);
                }
            }
        }
    }

    /// The final message; records the request's outcome.
    fn finish(&mut self, worker: &str, text: String, f: wpb::Finished) -> InferResponse {
        let r = &mut self.relay;
        if let Some(load) = &f.load {
            r.router.report(worker, load);
        }
        let label = finish_label(f.reason);
        // What the index predicted against what the worker reused, in
        // whole blocks.
        if let Some(predicted) = self.predicted_blocks {
            let reused = f.cached_tokens as usize / nanoinfer_proto::kv::BLOCK_TOKENS;
            let reason = match reused.cmp(&predicted) {
                std::cmp::Ordering::Equal => "agree",
                std::cmp::Ordering::Greater => "more",
                std::cmp::Ordering::Less => "fewer",
            };
            r.router.kv_prediction(reason);
        }
        r.recorder.tokens(f.prompt_tokens, f.generated_tokens);
        r.recorder.finished(label);
        r.span.record("gen_ai.usage.input_tokens", f.prompt_tokens);
        r.span
            .record("gen_ai.usage.output_tokens", f.generated_tokens);
        r.span.record("gen_ai.response.finish_reasons", label);
        tracing::info!(request_id = %r.params.request_id, worker = %worker,
            finish_reason = label, prompt_tokens = f.prompt_tokens,
            generated_tokens = f.generated_tokens, workers_tried = self.tried.len() + 1,
            e2e_ms = (r.recorder.elapsed() * 1e3) as u64, "request finished");
        InferResponse {
            request_id: r.params.request_id.clone(),
            token: text,
            index: self.delivered.len() as u32,
            finish_reason: public_finish_reason(f.reason) as i32,
            usage: Some(UsageMetrics {
                prompt_tokens: f.prompt_tokens,
                generated_tokens: f.generated_tokens,
                total_tokens: f.prompt_tokens + f.generated_tokens,
                cached_prompt_tokens: f.cached_tokens,
            }),
            logprob: None,
            top_logprobs: Vec::new(),
            choice: r.choice,
            model: String::new(),
        }
    }

    /// Hands a message to the client; `Some` when the request is over
    /// (client gone, or stalled past the timeout).
    async fn send(&mut self, response: InferResponse) -> Option<Attempt> {
        let stall = self.relay.upstream.stalled_stream_timeout;
        match self.tx.send_timeout(Ok(Box::new(response)), stall).await {
            Ok(()) => None,
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Some(Attempt::ClientGone),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                self.relay.metrics.stalled_streams.inc();
                Some(Attempt::End(CoordinatorError::Stalled {
                    seconds: stall.as_secs(),
                }))
            }
        }
    }

    fn deadline_passed(&self) -> Attempt {
        Attempt::End(CoordinatorError::DeadlineExceeded {
            delivered: self.delivered.len() as u32,
        })
    }

    /// Ends the request with `error`: counted, logged, marked on the span,
    /// and sent to the client (through the call itself if nothing was
    /// streamed yet).
    async fn fail(&mut self, error: CoordinatorError) {
        let r = &mut self.relay;
        let code = error.code();
        r.recorder.failed(code);
        tracing::warn!(request_id = %r.params.request_id, error = %error, "request failed");
        nanoinfer_telemetry::mark_span_error(&r.span, &error.to_string());
        let stalled = matches!(error, CoordinatorError::Stalled { .. });
        let status = error.into_status(Some(&r.params.request_id));
        if let Some(opened) = self.opened.take() {
            let _ = opened.send(Err(status));
        } else if stalled {
            // Past whatever the channel holds: a stalled client's channel
            // is full, and a status queued behind it would never go out.
            r.abort.abort(status);
        } else {
            // Behind the tokens already queued, so the client has them
            // all; bounded, then past them.
            let status = match self
                .tx
                .send_timeout(Err(status), Duration::from_secs(1))
                .await
            {
                Ok(()) => return,
                Err(
                    mpsc::error::SendTimeoutError::Timeout(Err(status))
                    | mpsc::error::SendTimeoutError::Closed(Err(status)),
                ) => status,
                Err(_) => return,
            };
            r.abort.abort(status);
        }
    }
}

/// A worker's status message followed by its causes (a transport error's
/// h2 or I/O reason is only in its source chain).
fn with_causes(status: &Status) -> String {
    let mut text = status.message().to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

fn public_top_logprobs(top: Vec<wpb::TopLogprob>) -> Vec<TopLogprob> {
    top.into_iter()
        .map(|t| TopLogprob {
            token: t.text,
            logprob: t.logprob,
        })
        .collect()
}

fn public_finish_reason(reason: i32) -> FinishReason {
    match wpb::FinishReason::try_from(reason).unwrap_or(wpb::FinishReason::Unspecified) {
        wpb::FinishReason::Unspecified => FinishReason::Unspecified,
        wpb::FinishReason::Length => FinishReason::Length,
        wpb::FinishReason::StopSequence => FinishReason::StopSequence,
        wpb::FinishReason::Eos => FinishReason::Eos,
        wpb::FinishReason::ContextLength => FinishReason::ContextLength,
        wpb::FinishReason::Cancelled => FinishReason::Cancelled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_with_jitter_and_a_cap() {
        assert_eq!(retry_delay(1, 0.5), Duration::from_millis(20));
        assert_eq!(retry_delay(2, 0.5), Duration::from_millis(40));
        assert_eq!(retry_delay(9, 0.5), Duration::from_millis(320));
        assert_eq!(retry_delay(1, 0.0), Duration::from_millis(10));
        assert!(retry_delay(9, 0.999) < Duration::from_millis(481));
    }

    #[test]
    fn a_status_message_carries_its_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let status = Status::from_error(Box::new(io));
        assert!(
            with_causes(&status).ends_with("connection reset"),
            "{}",
            with_causes(&status)
        );
        assert_eq!(with_causes(&Status::unavailable("full")), "full");
    }

    #[test]
    fn finish_reasons_map_one_to_one() {
        assert_eq!(
            public_finish_reason(wpb::FinishReason::Eos as i32),
            FinishReason::Eos
        );
        assert_eq!(
            public_finish_reason(wpb::FinishReason::Cancelled as i32),
            FinishReason::Cancelled
        );
        assert_eq!(public_finish_reason(99), FinishReason::Unspecified);
    }
}
