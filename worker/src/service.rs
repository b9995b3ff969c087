//! `nanoinfer.worker.v1.WorkerService`: validates, tokenizes, queues into the
//! engine and turns engine events into the response stream.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use nanoinfer_proto::worker::{
    self as pb, worker_service_server::WorkerService, GenerateRequest, GenerateResponse,
    LoadRequest, LoadResponse,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::Span;

use crate::engine::{Engine, Event, FinishReason, Generation};
use crate::error::WorkerError;
use crate::model::Model;

/// The worker's gRPC service.
pub struct WorkerServiceImpl {
    model: Arc<Model>,
    engine: Engine,
}

impl WorkerServiceImpl {
    /// A service over a loaded model and its running engine.
    pub fn new(model: Arc<Model>, engine: Engine) -> Self {
        Self { model, engine }
    }

    fn to_generation(&self, req: GenerateRequest, span: Span) -> Result<Generation, WorkerError> {
        if req.prompt.is_empty() {
            return Err(WorkerError::invalid("prompt", "must not be empty"));
        }
        if req.max_tokens == 0 {
            return Err(WorkerError::invalid("max_tokens", "must be at least 1"));
        }
        if !(req.temperature.is_finite() && req.temperature >= 0.0) {
            return Err(WorkerError::invalid(
                "temperature",
                "must be finite and >= 0",
            ));
        }
        if !(req.top_p > 0.0 && req.top_p <= 1.0) {
            return Err(WorkerError::invalid("top_p", "must be in (0, 1]"));
        }
        let prompt = self.model.tokenize(&req.prompt);
        let ctx = self.engine.ctx_size() as usize;
        if prompt.len() >= ctx {
            return Err(WorkerError::invalid(
                "prompt",
                format!(
                    "{} tokens leave no room in the context window of {ctx} tokens",
                    prompt.len()
                ),
            ));
        }
        Ok(Generation {
            request_id: req.request_id,
            prompt,
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            stop: req.stop,
            span,
        })
    }
}

fn finish_reason(reason: FinishReason) -> pb::FinishReason {
    match reason {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::StopSequence => pb::FinishReason::StopSequence,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::ContextLength => pb::FinishReason::ContextLength,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

fn to_response(event: Event) -> Result<GenerateResponse, Status> {
    Ok(match event {
        Event::Token { text, id, index } => GenerateResponse {
            text,
            token_id: Some(id),
            index,
            finished: None,
        },
        Event::Finished {
            reason,
            text,
            prompt_tokens,
            generated_tokens,
        } => GenerateResponse {
            text,
            token_id: None,
            index: generated_tokens,
            finished: Some(pb::Finished {
                reason: finish_reason(reason) as i32,
                prompt_tokens,
                generated_tokens,
            }),
        },
        Event::Failed(message) => return Err(Status::internal(message)),
    })
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerServiceImpl {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        // Child of the coordinator's span (trace context in the metadata); the
        // engine adds `queue`, `prefill` and `decode` children and ends it.
        let span = tracing::info_span!(
            parent: None,
            "Generate",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "nanoinfer.worker.v1.WorkerService",
            rpc.method = "Generate",
            request_id = Empty,
            gen_ai.request.max_tokens = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        nanoinfer_telemetry::propagation::set_remote_parent(&span, request.metadata());
        let req = request.into_inner();
        let _entered = span.enter();
        span.record("request_id", req.request_id.as_str());
        let result = self
            .to_generation(req, span.clone())
            .and_then(|generation| {
                span.record("gen_ai.request.max_tokens", generation.max_tokens);
                span.record("gen_ai.usage.input_tokens", generation.prompt.len());
                tracing::info!(
                    prompt_tokens = generation.prompt.len(),
                    max_tokens = generation.max_tokens,
                    "generate queued"
                );
                Ok(self.engine.submit(generation)?)
            });
        match result {
            Ok(events) => Ok(Response::new(Box::pin(
                ReceiverStream::new(events).map(to_response),
            ))),
            Err(e) => {
                tracing::info!(error = %e, "generate refused");
                nanoinfer_telemetry::mark_span_error(&span, &e.to_string());
                Err(Status::from(e))
            }
        }
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        let load = self.engine.load();
        Ok(Response::new(LoadResponse {
            running: load.running,
            queued: load.queued,
            slots: self.engine.slots(),
            queue_capacity: self.engine.queue_capacity(),
            context_length: self.engine.ctx_size(),
            model: self.model.name.clone(),
        }))
    }
}
