//! The one request path both public APIs take (gRPC `Infer` and the
//! OpenAI-compatible HTTP routes): the API-key check, the request's span,
//! validation, the deadline, and one [`relay`](crate::relay) task per
//! completion (`n`), all feeding one bounded channel. The API in front only
//! translates its wire format to an [`InferRequest`] and the stream of
//! [`InferResponse`](nanoinfer_proto::nanoinfer::InferResponse)s back.

use std::sync::Arc;

use nanoinfer_proto::nanoinfer::{
    DetokenizeRequest, DetokenizeResponse, InferRequest, TokenizeRequest, TokenizeResponse,
};
use nanoinfer_proto::worker::{self as wpb, worker_service_client::WorkerServiceClient};
use nanoinfer_registry::DiscoveryStatus;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::metadata::MetadataMap;
use tonic::Status;
use tracing::field::Empty;
use tracing::Instrument;

use crate::auth::ApiKeys;
use crate::config::UpstreamConfig;
use crate::error::CoordinatorError;
use crate::metrics::{Api, CoordinatorMetrics, ReasonLabel, RequestRecorder};
use crate::relay::{self, Abort, Affinity, Item, Relay, RELAY_BUFFER};
use crate::routing::{Picked, Router};
use crate::validate::{InferParams, Limits};

/// A started request: its id and the messages of every completion, in the
/// order they were produced (each carries its `choice`). The channel ends
/// when every completion has sent its final message (or an error).
pub struct Call {
    /// The request's id (the client's, or a generated UUID).
    pub request_id: String,
    /// Completions that will each end with a final message.
    pub n: u32,
    /// The messages.
    pub rx: Messages,
}

/// The messages of a call, as both fronts read them. It ends truthfully:
/// with every completion's final message, or with an error — an abort
/// (a stalled client) jumps the messages still queued, and a channel that
/// closes before every final message ends with INTERNAL, never as if the
/// request had succeeded.
pub struct Messages {
    rx: mpsc::Receiver<Item>,
    /// `None` once every relay dropped its [`Abort`] unused (a finished
    /// oneshot must not be polled again).
    abort: Option<oneshot::Receiver<Status>>,
    n: u32,
    finals: u32,
    done: bool,
}

impl Messages {
    /// The next message; `None` after the last (or after an error).
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Item>> {
        use std::future::Future;
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(abort) = self.abort.as_mut() {
            if let Poll::Ready(aborted) = std::pin::Pin::new(abort).poll(cx) {
                self.abort = None;
                if let Ok(status) = aborted {
                    self.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(m))) => {
                self.finals += u32::from(m.usage.is_some());
                Poll::Ready(Some(Ok(m)))
            }
            Poll::Ready(Some(Err(status))) => {
                self.done = true;
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(None) => {
                self.done = true;
                if self.finals >= self.n {
                    return Poll::Ready(None);
                }
                // A relay ended without its last word: an aborted stream
                // whose status raced the channel's end, or a bug.
                if let Some(Ok(status)) = self.abort.take().map(|mut a| a.try_recv()) {
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Err(Status::internal(format!(
                    "the stream ended after {} of {} final messages",
                    self.finals, self.n
                )))))
            }
        }
    }

    /// The next message; `None` after the last (or after an error).
    pub async fn recv(&mut self) -> Option<Item> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl futures::Stream for Messages {
    type Item = Item;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Item>> {
        self.get_mut().poll_recv(cx)
    }
}

/// Shared state of the public APIs.
pub struct Front {
    /// Worker choice and ejection.
    pub router: Arc<Router>,
    /// Routable workers, as the count changes.
    pub routable: watch::Receiver<usize>,
    /// Whether etcd answers.
    pub discovery: watch::Receiver<DiscoveryStatus>,
    /// Request defaults and limits.
    pub limits: Limits,
    /// Timeouts and attempt bound.
    pub upstream: UpstreamConfig,
    /// Metrics.
    pub metrics: Arc<CoordinatorMetrics>,
    /// Required API keys (`None`: no authentication).
    pub api_keys: Option<Arc<ApiKeys>>,
}

impl Front {
    /// Checks the `authorization: Bearer` key when keys are required;
    /// rejections are counted and logged (never the key).
    pub fn authorize(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(keys) = &self.api_keys else {
            return Ok(());
        };
        keys.check(metadata).map_err(|rejection| {
            self.metrics
                .auth_rejections
                .get_or_create(&ReasonLabel {
                    reason: rejection.label(),
                })
                .inc();
            tracing::info!(reason = rejection.label(), "request refused: API key");
            Status::unauthenticated(rejection.message())
        })
    }

    /// How `model`'s chat template writes tool calls, from its vocabulary
    /// (fetched from a worker once, and shared with cache-aware routing);
    /// [`nanoinfer_vocab::ToolFormat::None`] when it has no tool section or
    /// its vocabulary could not be had within `vocab::LOAD_WAIT` (tools then
    /// use the OpenAI API's generic format).
    pub async fn tool_format(&self, model: Option<&str>) -> nanoinfer_vocab::ToolFormat {
        match self.router.vocabulary(model).await {
            Some(t) => t.tool_format(),
            None => nanoinfer_vocab::ToolFormat::None,
        }
    }

    /// Starts `request`: authorizes, validates, and runs its completions on
    /// workers. `metadata` carries the key, `traceparent` and
    /// `grpc-timeout`. Fails (with the status the client gets) when the
    /// request is refused or no worker took it; later failures arrive as an
    /// `Err` item in the stream.
    pub async fn start(
        &self,
        api: Api,
        request: InferRequest,
        metadata: &MetadataMap,
    ) -> Result<Call, Status> {
        self.authorize(metadata)?;
        let span = request_span(api, &request);
        nanoinfer_telemetry::propagation::set_remote_parent(&span, metadata);
        let started = tokio::time::Instant::now();
        let timeout = nanoinfer_proto::deadline::from_metadata(metadata)
            .map_or(self.upstream.request_timeout, |t| {
                t.min(self.upstream.request_timeout)
            });
        let params = self.validate(api, &span, request)?;
        let request_id = params.request_id.clone();
        let n = params.n;
        let (tx, rx) = mpsc::channel(RELAY_BUFFER * n as usize);
        let prefix = self.prefix_of(&params).await;
        let (lead, follow) = tokio::sync::watch::channel(None);
        let mut lead = Some(lead);
        let (abort, aborted) = Abort::new();
        let tenant =
            crate::admission::tenant_of(metadata.get("authorization").map(|v| v.as_bytes()));
        let mut opened = Vec::with_capacity(n as usize);
        for choice in 0..n {
            let (opened_tx, opened_rx) = oneshot::channel();
            let mut params = params.clone();
            // Completion i samples with seed + i: different texts, each
            // reproducible.
            params.seed = params.seed.wrapping_add(u64::from(choice));
            let relay = Relay {
                params,
                deadline: started + timeout,
                router: self.router.clone(),
                upstream: self.upstream.clone(),
                metrics: self.metrics.clone(),
                recorder: RequestRecorder::start(self.metrics.clone(), api),
                span: span.clone(),
                choice,
                prefix: prefix.clone(),
                affinity: match (n, choice) {
                    (1, _) => Affinity::None,
                    (_, 0) => Affinity::Lead(lead.take().expect("one lead")),
                    _ => Affinity::Follow(follow.clone()),
                },
                tenant,
                abort: abort.clone(),
            };
            tokio::spawn(relay::run(relay, tx.clone(), opened_tx).instrument(span.clone()));
            opened.push(opened_rx);
        }
        drop(tx);
        for opened_rx in opened {
            match opened_rx.await {
                Ok(Ok(())) => {}
                Ok(Err(status)) => return Err(status),
                Err(_) => {
                    return Err(Status::internal(format!(
                        "request {}: relay ended without an answer",
                        request_id.escape_debug()
                    )))
                }
            }
        }
        Ok(Call {
            request_id,
            n,
            rx: Messages {
                rx,
                abort: Some(aborted),
                n,
                finals: 0,
                done: false,
            },
        })
    }

    /// Validates `request` inside its span and records what it asks for
    /// there; a refusal is counted, marked on the span and returned as the
    /// status the client gets.
    fn validate(
        &self,
        api: Api,
        span: &tracing::Span,
        request: InferRequest,
    ) -> Result<InferParams, Status> {
        let client_id = (!request.request_id.is_empty()).then(|| request.request_id.clone());
        let validated = {
            let _entered = span.enter();
            // (Recorded inside the span: tracing-opentelemetry drops values
            // recorded before a span is first entered.) Known before
            // validation, so even a rejected request is findable; escaped,
            // since it is not validated yet.
            if let Some(id) = &client_id {
                span.record("request_id", id.escape_debug().to_string());
            }
            self.limits
                .validate(request, rand_seed)
                .inspect_err(|e| tracing::info!(error = %e, "request rejected"))
        };
        let params = match validated {
            Ok(params) => params,
            Err(e) => {
                RequestRecorder::start(self.metrics.clone(), api).failed(e.code());
                nanoinfer_telemetry::mark_span_error(span, &e.to_string());
                return Err(e.into_status(client_id.as_deref()));
            }
        };
        span.record("request_id", params.request_id.as_str());
        if let Some(model) = &params.model {
            span.record("gen_ai.request.model", model.as_str());
        }
        span.record("gen_ai.request.max_tokens", params.max_tokens);
        span.record(
            "gen_ai.request.temperature",
            shortest_f64(params.temperature),
        );
        span.record("gen_ai.request.top_p", shortest_f64(params.top_p));
        span.record("gen_ai.request.seed", params.seed);
        if params.n > 1 {
            span.record("gen_ai.request.choice.count", params.n);
        }
        Ok(params)
    }

    /// The prompt's blocks for routing: text blocks under prefix affinity,
    /// the workers' own token blocks under cache-aware routing (once the
    /// model's vocabulary is loaded), else none.
    async fn prefix_of(&self, params: &InferParams) -> Arc<[u64]> {
        if self.router.wants_prefix() {
            if params.messages.is_empty() {
                crate::affinity::prefix_blocks(&params.prompt).into()
            } else {
                let text = crate::affinity::conversation_text(
                    params
                        .messages
                        .iter()
                        .map(|m| (m.role.as_str(), m.content.as_str())),
                );
                crate::affinity::prefix_blocks(&text).into()
            }
        } else if let Some(tokenizer) = self.router.tokenizer(params.model.as_deref()).await {
            kv_blocks(tokenizer, params).await
        } else {
            Arc::from(Vec::new())
        }
    }
}

/// The request's span: a root here (a child of the client's `traceparent`
/// once [`nanoinfer_telemetry::propagation::set_remote_parent`] has run),
/// carrying the GenAI semantic-convention attributes.
fn request_span(api: Api, request: &InferRequest) -> tracing::Span {
    let operation = if request.messages.is_empty() {
        "text_completion"
    } else {
        "chat"
    };
    tracing::info_span!(
        parent: None,
        "Infer",
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "nanoinfer.InferService",
        rpc.method = "Infer",
        nanoinfer.api = api.label(),
        gen_ai.operation.name = operation,
        request_id = Empty,
        trace_id = Empty,
        worker = Empty,
        gen_ai.request.model = Empty,
        gen_ai.request.max_tokens = Empty,
        gen_ai.request.temperature = Empty,
        gen_ai.request.top_p = Empty,
        gen_ai.request.seed = Empty,
        gen_ai.request.choice.count = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        gen_ai.response.finish_reasons = Empty,
        nanoinfer.time_to_first_token_ms = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    )
}

impl Front {
    /// A worker for a one-shot call (tokenize, detokenize): the least
    /// loaded serving `model`.
    fn pick_for(&self, model: &str) -> Result<Picked, CoordinatorError> {
        if !model.is_empty() {
            nanoinfer_registry::schema::validate_model_name(model)
                .map_err(|m| CoordinatorError::invalid("model", m))?;
        }
        let model = (!model.is_empty()).then_some(model);
        self.router
            .pick(&[], model, &[])
            .ok_or_else(|| match model {
                Some(m) if !self.router.knows_model(m) => CoordinatorError::ModelNotFound(m.into()),
                _ => CoordinatorError::NoWorkers,
            })
    }

    /// A worker's answer to a one-shot call, its failures as statuses.
    fn upstream<T>(picked: &Picked, r: Result<tonic::Response<T>, Status>) -> Result<T, Status> {
        r.map(tonic::Response::into_inner).map_err(|status| {
            CoordinatorError::Upstream {
                worker: picked.id.clone(),
                status,
            }
            .into_status(None)
        })
    }

    /// The tokens a worker serving the request's model makes of its prompt
    /// or conversation.
    pub async fn tokenize(
        &self,
        request: TokenizeRequest,
        metadata: &MetadataMap,
    ) -> Result<TokenizeResponse, Status> {
        self.authorize(metadata)?;
        let messages: Vec<(&str, &str)> = request
            .messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        self.limits
            .checks
            .check_prompt_or_messages(&request.prompt, &messages)
            .map_err(|e| CoordinatorError::from(e).into_status(None))?;
        let picked = self
            .pick_for(&request.model)
            .map_err(|e| e.into_status(None))?;
        let mut call = tonic::Request::new(wpb::TokenizeRequest {
            text: request.prompt,
            messages: request
                .messages
                .into_iter()
                .map(|m| wpb::ChatMessage::from(&nanoinfer_vocab::ChatMessage::from(m)))
                .collect(),
            add_special: request.add_special,
            tools: request.tools,
        });
        call.set_timeout(self.upstream.request_timeout);
        let answer = WorkerServiceClient::new(picked.channel.clone())
            .tokenize(call)
            .await;
        let r = Self::upstream(&picked, answer)?;
        Ok(TokenizeResponse {
            tokens: r.tokens,
            pieces: r.pieces,
            max_model_len: r.max_model_len,
            model: picked.model_name.clone(),
        })
    }

    /// The text of token ids, from a worker serving the request's model.
    pub async fn detokenize(
        &self,
        request: DetokenizeRequest,
        metadata: &MetadataMap,
    ) -> Result<DetokenizeResponse, Status> {
        self.authorize(metadata)?;
        nanoinfer_proto::limits::check_token_ids(&request.tokens)
            .map_err(|e| CoordinatorError::from(e).into_status(None))?;
        let picked = self
            .pick_for(&request.model)
            .map_err(|e| e.into_status(None))?;
        let mut call = tonic::Request::new(wpb::DetokenizeRequest {
            tokens: request.tokens,
        });
        call.set_timeout(self.upstream.request_timeout);
        let answer = WorkerServiceClient::new(picked.channel.clone())
            .detokenize(call)
            .await;
        let r = Self::upstream(&picked, answer)?;
        Ok(DetokenizeResponse {
            text: r.text,
            model: picked.model_name.clone(),
        })
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

/// The KV block hashes of the prompt the worker will compute for `params`
/// (cache-aware routing), tokenized off the async runtime. Empty when the
/// conversation cannot be rendered (the worker answers that error).
async fn kv_blocks(tokenizer: Arc<crate::vocab::Tokenizer>, params: &InferParams) -> Arc<[u64]> {
    let prompt = params.prompt.clone();
    let messages = params.messages.clone();
    // Checked when the request was validated.
    let tools = nanoinfer_proto::limits::check_tools(&params.tools)
        .ok()
        .flatten();
    tokio::task::spawn_blocking(move || {
        let tokens = if messages.is_empty() {
            tokenizer.prompt(&prompt)
        } else {
            tokenizer
                .chat(&messages, tools.as_ref())
                .unwrap_or_default()
        };
        Arc::from(nanoinfer_proto::kv::block_hashes(&tokens))
    })
    .await
    .unwrap_or_else(|_| Arc::from(Vec::new()))
}
