//! `nanoinfer.InferService`: validate, pick a worker, relay its stream.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use nanoinfer_proto::nanoinfer::{
    infer_service_server::InferService, FinishReason, HealthRequest, HealthResponse, InferRequest,
    InferResponse, UsageMetrics,
};
use nanoinfer_proto::worker::{
    self as wpb, worker_service_client::WorkerServiceClient, GenerateRequest, GenerateResponse,
};
use nanoinfer_registry::WorkerSet;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::error::CoordinatorError;
use crate::metrics::{code_name, CodeLabel, CoordinatorMetrics, RequestRecorder};
use crate::routing::{InFlight, Router};
use crate::validate::{InferParams, Limits};

/// Workers tried for one request before giving up (only before its first
/// token, and only on UNAVAILABLE or RESOURCE_EXHAUSTED).
const MAX_ATTEMPTS: usize = 3;

/// The public service.
pub struct InferServiceImpl {
    live: watch::Receiver<WorkerSet>,
    router: Arc<Router>,
    limits: Limits,
    metrics: Arc<CoordinatorMetrics>,
}

impl InferServiceImpl {
    /// A service routing to the workers in `live`.
    pub fn new(
        live: watch::Receiver<WorkerSet>,
        router: Arc<Router>,
        limits: Limits,
        metrics: Arc<CoordinatorMetrics>,
    ) -> Self {
        Self {
            live,
            router,
            limits,
            metrics,
        }
    }

    /// Opens `Generate` on the least-loaded worker, moving on to another one
    /// when a worker is unreachable or full.
    async fn open_upstream(
        &self,
        params: &InferParams,
    ) -> Result<(Streaming<GenerateResponse>, String, InFlight), CoordinatorError> {
        let live = self.live.borrow().clone();
        let mut tried = Vec::new();
        let mut last_error = CoordinatorError::NoWorkers;
        while tried.len() < MAX_ATTEMPTS {
            let Some(picked) = self.router.pick(&live, &tried) else {
                break;
            };
            tracing::info!(request_id = %params.request_id, worker = %picked.id,
                address = %picked.address, "routing request");
            Span::current().record("worker", picked.id.as_str());
            let mut client = WorkerServiceClient::new(picked.channel);
            let mut request = Request::new(to_worker_request(params));
            nanoinfer_telemetry::propagation::inject(&Span::current(), request.metadata_mut());
            match client.generate(request).await {
                Ok(resp) => return Ok((resp.into_inner(), picked.id, picked.guard)),
                Err(status) => {
                    tracing::warn!(request_id = %params.request_id, worker = %picked.id,
                        code = ?status.code(), error = %status.message(), "worker refused request");
                    let code = status.code();
                    count_worker_error(&self.metrics, code);
                    let retry = matches!(code, Code::Unavailable | Code::ResourceExhausted);
                    last_error = CoordinatorError::Upstream {
                        worker: picked.id.clone(),
                        status,
                    };
                    if !retry {
                        break;
                    }
                    tried.push(picked.id);
                }
            }
        }
        Err(last_error)
    }
}

fn to_worker_request(p: &InferParams) -> GenerateRequest {
    GenerateRequest {
        request_id: p.request_id.clone(),
        prompt: p.prompt.clone(),
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_p: p.top_p,
        seed: p.seed,
        stop: p.stop.clone(),
    }
}

/// The metric label of a worker finish reason.
fn finish_label(reason: i32) -> &'static str {
    match wpb::FinishReason::try_from(reason).unwrap_or(wpb::FinishReason::Unspecified) {
        wpb::FinishReason::Unspecified => "unspecified",
        wpb::FinishReason::Length => "length",
        wpb::FinishReason::StopSequence => "stop_sequence",
        wpb::FinishReason::Eos => "eos",
        wpb::FinishReason::ContextLength => "context_length",
        wpb::FinishReason::Cancelled => "cancelled",
    }
}

fn count_worker_error(metrics: &CoordinatorMetrics, code: Code) {
    let label = CodeLabel {
        code: code_name(code),
    };
    metrics.worker_errors.get_or_create(&label).inc();
}

fn finish_reason(reason: i32) -> FinishReason {
    match wpb::FinishReason::try_from(reason).unwrap_or(wpb::FinishReason::Unspecified) {
        wpb::FinishReason::Unspecified => FinishReason::Unspecified,
        wpb::FinishReason::Length => FinishReason::Length,
        wpb::FinishReason::StopSequence => FinishReason::StopSequence,
        wpb::FinishReason::Eos => FinishReason::Eos,
        wpb::FinishReason::ContextLength => FinishReason::ContextLength,
        wpb::FinishReason::Cancelled => FinishReason::Cancelled,
    }
}

/// Converts one worker message into the public one.
pub fn relay_message(request_id: &str, msg: GenerateResponse) -> InferResponse {
    let (finish_reason, usage) = match msg.finished {
        Some(f) => (
            finish_reason(f.reason) as i32,
            Some(UsageMetrics {
                prompt_tokens: f.prompt_tokens,
                generated_tokens: f.generated_tokens,
                total_tokens: f.prompt_tokens + f.generated_tokens,
            }),
        ),
        None => (FinishReason::Unspecified as i32, None),
    };
    InferResponse {
        request_id: request_id.to_string(),
        token: msg.text,
        index: msg.index,
        finish_reason,
        usage,
    }
}

/// State of one relay: the upstream stream, the guard counting it against
/// its worker, the request's metrics and its span (which ends when the relay
/// is dropped, however the stream ends).
struct Relay {
    span: Span,
    upstream: Streaming<GenerateResponse>,
    request_id: String,
    worker: String,
    _guard: InFlight,
    recorder: RequestRecorder,
    metrics: Arc<CoordinatorMetrics>,
    done: bool,
}

impl Relay {
    /// The worker failed mid-stream: count it and end the request with the
    /// worker's code.
    fn worker_failed(&mut self, error: CoordinatorError) -> Status {
        self.done = true;
        let code = error.code();
        count_worker_error(&self.metrics, code);
        self.recorder.failed(code);
        tracing::warn!(request_id = %self.request_id, error = %error, "worker stream failed");
        nanoinfer_telemetry::mark_span_error(&self.span, &error.to_string());
        Status::from(error)
    }
}

type InferStream = Pin<Box<dyn Stream<Item = Result<InferResponse, Status>> + Send>>;

/// The response stream. Pull-based: a token is read from the worker only when
/// the client's stream has room, so a slow client slows its worker instead of
/// growing a buffer; when the client goes away tonic drops this stream, which
/// drops the upstream call, and the worker stops generating.
fn relay(relay: Relay) -> InferStream {
    Box::pin(futures::stream::unfold(relay, |mut r| {
        let span = r.span.clone();
        async move { relay_next(&mut r).await.map(|item| (item, r)) }.instrument(span)
    }))
}

/// The next message of a relay, or `None` once it is over.
async fn relay_next(r: &mut Relay) -> Option<Result<InferResponse, Status>> {
    {
        if r.done {
            return None;
        }
        let item = match r.upstream.message().await {
            Ok(Some(msg)) => {
                match &msg.finished {
                    None => {
                        if let Some(ttft) = r.recorder.token() {
                            r.span
                                .record("nanoinfer.time_to_first_token_ms", ttft * 1e3);
                        }
                    }
                    Some(f) => {
                        r.done = true;
                        r.recorder.finished(finish_label(f.reason));
                        r.span.record("gen_ai.usage.input_tokens", f.prompt_tokens);
                        r.span
                            .record("gen_ai.usage.output_tokens", f.generated_tokens);
                        r.span
                            .record("gen_ai.response.finish_reasons", finish_label(f.reason));
                        tracing::info!(request_id = %r.request_id, worker = %r.worker,
                            finish_reason = finish_label(f.reason), prompt_tokens = f.prompt_tokens,
                            generated_tokens = f.generated_tokens,
                            e2e_ms = (r.recorder.elapsed() * 1e3) as u64, "request finished");
                    }
                }
                Ok(relay_message(&r.request_id, msg))
            }
            Ok(None) => {
                let error = CoordinatorError::Truncated(r.worker.clone());
                Err(r.worker_failed(error))
            }
            Err(status) => {
                let error = CoordinatorError::Upstream {
                    worker: r.worker.clone(),
                    status,
                };
                Err(r.worker_failed(error))
            }
        };
        Some(item)
    }
}

#[tonic::async_trait]
impl InferService for InferServiceImpl {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let live = self.live.borrow().len() as u32;
        let status = if live > 0 {
            "OK".to_string()
        } else {
            "NO_WORKERS: no live worker is registered in etcd".to_string()
        };
        Ok(Response::new(HealthResponse {
            status,
            live_workers: live,
        }))
    }

    type InferStream = InferStream;

    async fn infer(
        &self,
        request: Request<InferRequest>,
    ) -> Result<Response<Self::InferStream>, Status> {
        // The request's span: a child of the client's `traceparent` when it
        // sent one, carrying the GenAI semantic-convention attributes.
        let span = tracing::info_span!(
            parent: None,
            "Infer",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "nanoinfer.InferService",
            rpc.method = "Infer",
            gen_ai.operation.name = "text_completion",
            request_id = Empty,
            worker = Empty,
            gen_ai.request.max_tokens = Empty,
            gen_ai.request.temperature = Empty,
            gen_ai.request.top_p = Empty,
            gen_ai.request.seed = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
            nanoinfer.time_to_first_token_ms = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        nanoinfer_telemetry::propagation::set_remote_parent(&span, request.metadata());
        let mut recorder = RequestRecorder::start(self.metrics.clone());
        let opened = async {
            // (Recorded inside the span: tracing-opentelemetry drops values
            // recorded before a span is first entered.)
            if !request.get_ref().request_id.is_empty() {
                // Known before validation, so even a rejected request is findable.
                Span::current().record("request_id", request.get_ref().request_id.as_str());
            }
            let params = self
                .limits
                .validate(request.into_inner(), rand_seed)
                .inspect_err(|e| tracing::info!(error = %e, "request rejected"))?;
            let span = Span::current();
            span.record("request_id", params.request_id.as_str());
            span.record("gen_ai.request.max_tokens", params.max_tokens);
            span.record(
                "gen_ai.request.temperature",
                shortest_f64(params.temperature),
            );
            span.record("gen_ai.request.top_p", shortest_f64(params.top_p));
            span.record("gen_ai.request.seed", params.seed);
            let opened = self.open_upstream(&params).await.inspect_err(
                |e| tracing::warn!(request_id = %params.request_id, error = %e, "request failed"),
            )?;
            Ok::<_, CoordinatorError>((params, opened))
        }
        .instrument(span.clone())
        .await;
        let (params, (upstream, worker, guard)) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                recorder.failed(e.code());
                nanoinfer_telemetry::mark_span_error(&span, &e.to_string());
                return Err(Status::from(e));
            }
        };
        recorder.upstream_opened();
        Ok(Response::new(relay(Relay {
            span,
            upstream,
            request_id: params.request_id,
            worker,
            _guard: guard,
            recorder,
            metrics: self.metrics.clone(),
            done: false,
        })))
    }
}

/// `x` as the f64 with the same shortest decimal form (0.8f32 → 0.8, not
/// 0.800000011920929), for span attributes people read.
fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

fn rand_seed() -> u64 {
    // A fresh v4 UUID is 122 random bits from the OS generator.
    uuid::Uuid::new_v4().as_u64_pair().0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_final_message_carries_usage() {
        let token = GenerateResponse {
            text: "a".into(),
            token_id: Some(5),
            index: 0,
            finished: None,
        };
        let m = relay_message("r", token);
        assert_eq!(m.finish_reason, FinishReason::Unspecified as i32);
        assert!(m.usage.is_none());
        let last = GenerateResponse {
            text: String::new(),
            token_id: None,
            index: 3,
            finished: Some(wpb::Finished {
                reason: wpb::FinishReason::Length as i32,
                prompt_tokens: 4,
                generated_tokens: 3,
            }),
        };
        let m = relay_message("r", last);
        assert_eq!(m.request_id, "r");
        assert_eq!(m.finish_reason, FinishReason::Length as i32);
        assert_eq!(m.usage.unwrap().total_tokens, 7);
    }
}
