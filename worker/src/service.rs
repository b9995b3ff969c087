//! `nanoinfer.worker.v1.WorkerService`: validates, tokenizes, queues into the
//! engine and turns engine events into the response stream, which also ends
//! at the call's deadline (`grpc-timeout`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use llama_cpp_2::token::LlamaToken;
use nanoinfer_proto::worker::{
    self as pb, worker_service_server::WorkerService, DetokenizeRequest, DetokenizeResponse,
    GenerateRequest, GenerateResponse, KvEventsRequest, LoadRequest, LoadResponse, TokenizeRequest,
    TokenizeResponse,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use nanoinfer_proto::limits::{self, FieldError, Limits, SamplingControls};

use crate::engine::{Alternative, Engine, Event, Failure, FinishReason, Generation};
use crate::error::WorkerError;
use crate::model::{ChatMessage, Model};

/// The worker's gRPC service.
pub struct WorkerServiceImpl {
    model: Arc<Model>,
    engine: Engine,
    limits: Limits,
    /// The vocabulary-only GGUF, built on the first `Vocabulary` call.
    vocab: tokio::sync::OnceCell<Arc<Vec<u8>>>,
}

/// Bytes per `VocabularyChunk`.
const VOCABULARY_CHUNK: usize = 1 << 20;

impl From<FieldError> for WorkerError {
    fn from(e: FieldError) -> Self {
        WorkerError::invalid(e.field, e.message)
    }
}

impl WorkerServiceImpl {
    /// A service over a loaded model and its running engine, refusing
    /// requests beyond `limits`.
    pub fn new(model: Arc<Model>, engine: Engine, limits: Limits) -> Self {
        Self {
            model,
            engine,
            limits,
            vocab: tokio::sync::OnceCell::new(),
        }
    }

    /// Validates the request and tokenizes its prompt (off the async
    /// runtime: a prompt may be a megabyte, and tokenizing it would stall
    /// every other stream on this runtime thread).
    async fn to_generation(
        &self,
        req: GenerateRequest,
        deadline: Option<Instant>,
        span: Span,
    ) -> Result<Generation, WorkerError> {
        // The coordinator's checks, again (one module, one set of
        // messages): a caller that reaches the worker directly gets no more.
        // (The request id was checked on arrival, before it was escaped.)
        let controls = controls(&req);
        let messages: Vec<ChatMessage> = req.messages.into_iter().map(ChatMessage::from).collect();
        self.limits.check_prompt_or_messages(
            &req.prompt,
            &nanoinfer_vocab::roles_and_contents(&messages),
        )?;
        let tools = limits::check_tools(&req.tools)?;
        limits::check_grammar(&req.grammar, &req.json_schema)?;
        if !req.tools.is_empty() {
            if messages.is_empty() {
                return Err(WorkerError::invalid(
                    "tools",
                    "are rendered by the chat template: send messages, not a prompt",
                ));
            }
            let renders = self.model.template.as_ref().map(|t| t.tool_format());
            if matches!(renders, None | Some(nanoinfer_vocab::ToolFormat::None)) {
                // Never dropped in silence (the OpenAI API describes tools
                // in a system message instead for such a model).
                return Err(WorkerError::invalid(
                    "tools",
                    "the model's chat template has no tool section",
                ));
            }
        }
        self.limits.check_max_tokens(req.max_tokens)?;
        limits::check_sampling(req.temperature, req.top_p)?;
        limits::check_stop(&req.stop)?;
        controls.check()?;
        let resume = check_resume(&req.resume_token_ids, self.model.n_vocab(), req.max_tokens)?;
        let logit_bias = limits::check_logit_bias(&req.logit_bias, Some(self.model.n_vocab()))?;
        limits::check_json_schema(&req.json_schema)?;
        let chat = !messages.is_empty();
        let model = self.model.clone();
        let text = req.prompt;
        let schema = req.json_schema;
        let lark = req.grammar;
        let (prompt, grammar) = tokio::task::spawn_blocking(move || {
            // The constraint first: a refused one costs no tokenizing.
            let grammar = if !schema.is_empty() {
                Some(
                    model
                        .grammars
                        .compile(&schema)
                        .map_err(|e| WorkerError::invalid("json_schema", e))?,
                )
            } else if !lark.is_empty() {
                Some(
                    model
                        .grammars
                        .compile_lark(&lark)
                        .map_err(|e| WorkerError::invalid("grammar", e))?,
                )
            } else {
                None
            };
            let prompt = if messages.is_empty() {
                Ok(model.tokenize(&text))
            } else {
                model
                    .render_chat(&messages, tools.as_ref())
                    .map(|(_, tokens)| tokens)
            };
            let prompt = prompt.map_err(|e| match e {
                crate::model::ChatError::NoTemplate => {
                    WorkerError::FailedPrecondition(e.to_string())
                }
                crate::model::ChatError::Render(_) => {
                    WorkerError::invalid("messages", e.to_string())
                }
            })?;
            Ok::<_, WorkerError>((prompt, grammar))
        })
        .await
        .map_err(|e| Failure::Internal(format!("tokenizing the prompt: {e}")))??;
        let ctx = self.engine.ctx_size() as usize;
        let field = if chat { "messages" } else { "prompt" };
        if prompt.len() >= ctx {
            return Err(WorkerError::ContextLength {
                field,
                message: format!(
                    "{} tokens leave no room in the context window of {ctx} tokens",
                    prompt.len()
                ),
            });
        }
        // vLLM's rule for a client's own max_tokens: refused up front
        // rather than cut at the window.
        let asked = prompt.len() + req.max_tokens as usize;
        if req.strict_max_tokens && asked > ctx {
            return Err(WorkerError::ContextLength {
                field,
                message: format!(
                    "the context window is {ctx} tokens; this request asks for {asked} ({} in the {field}, {} in max_tokens): shorten the {field} or lower max_tokens",
                    prompt.len(),
                    req.max_tokens
                ),
            });
        }
        if prompt.len() + resume.len() >= ctx {
            return Err(WorkerError::invalid(
                "resume_token_ids",
                format!(
                    "{} prompt tokens and {} resumed tokens leave no room in the context \
                     window of {ctx} tokens",
                    prompt.len(),
                    resume.len()
                ),
            ));
        }
        Ok(Generation {
            request_id: req.request_id,
            prompt,
            resume,
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            controls,
            logit_bias,
            grammar,
            stop: req.stop,
            deadline,
            span,
        })
    }
}

/// The request's sampling controls, unset ones off.
fn controls(req: &GenerateRequest) -> SamplingControls {
    let off = SamplingControls::default();
    SamplingControls {
        top_k: req.top_k.unwrap_or(off.top_k),
        min_p: req.min_p.unwrap_or(off.min_p),
        repetition_penalty: req.repetition_penalty.unwrap_or(off.repetition_penalty),
        presence_penalty: req.presence_penalty.unwrap_or(off.presence_penalty),
        frequency_penalty: req.frequency_penalty.unwrap_or(off.frequency_penalty),
        logprobs: req.logprobs,
        top_logprobs: req.top_logprobs,
    }
}

/// Checks `resume_token_ids` (see [`Generation::resume`]): every id in the
/// vocabulary, and fewer of them than `max_tokens` (at least one token is
/// left to generate).
fn check_resume(
    ids: &[i32],
    n_vocab: i32,
    max_tokens: u32,
) -> Result<Vec<LlamaToken>, WorkerError> {
    if ids.len() as u64 >= u64::from(max_tokens) {
        return Err(WorkerError::invalid(
            "resume_token_ids",
            format!(
                "{} resumed tokens leave nothing to generate within max_tokens {max_tokens}",
                ids.len()
            ),
        ));
    }
    if let Some((at, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| !(0..n_vocab).contains(&id))
    {
        return Err(WorkerError::invalid(
            "resume_token_ids",
            format!("id {id} at {at} is not in the vocabulary (0..{n_vocab})"),
        ));
    }
    Ok(ids.iter().map(|&id| LlamaToken(id)).collect())
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

fn top_logprob(a: Alternative) -> pb::TopLogprob {
    pb::TopLogprob {
        token_id: a.id,
        text: a.text,
        logprob: a.logprob,
    }
}

fn to_response(event: Event, request_id: &str) -> Result<GenerateResponse, Status> {
    Ok(match event {
        Event::Admitted => GenerateResponse {
            admitted: true,
            ..Default::default()
        },
        Event::Token {
            text,
            id,
            index,
            logprobs,
        } => {
            let (logprob, top_logprobs) = match logprobs {
                Some(l) => (
                    Some(l.logprob),
                    l.top.into_iter().map(top_logprob).collect(),
                ),
                None => (None, Vec::new()),
            };
            GenerateResponse {
                text,
                token_id: Some(id),
                index,
                finished: None,
                logprob,
                top_logprobs,
                admitted: false,
            }
        }
        Event::Finished {
            reason,
            text,
            prompt_tokens,
            generated_tokens,
            cached_tokens,
        } => GenerateResponse {
            text,
            token_id: None,
            index: generated_tokens,
            finished: Some(pb::Finished {
                reason: finish_reason(reason) as i32,
                prompt_tokens,
                generated_tokens,
                load: None,
                cached_tokens,
            }),
            logprob: None,
            top_logprobs: Vec::new(),
            admitted: false,
        },
        Event::Failed(failure) => return Err(WorkerError::from(failure).status(request_id)),
    })
}

/// State of one response stream.
struct Relay {
    events: mpsc::Receiver<Event>,
    deadline: Option<tokio::time::Instant>,
    request_id: String,
    done: bool,
    /// Where the final message's load report comes from.
    engine: Option<Engine>,
}

/// The load a finished request reports to its coordinator.
fn load_report(engine: &Engine) -> pb::WorkerLoad {
    let load = engine.load();
    pb::WorkerLoad {
        running: load.running,
        queued: load.queued,
        slots: engine.slots(),
        kv_cache_usage: engine.kv_cache_usage() as f32,
        ram_restore_cost: engine.ram_restore_cost(),
    }
}

/// The response stream of one request: its engine events, ended with
/// DEADLINE_EXCEEDED at the deadline (the receiver is dropped, so the engine
/// stops at its next step), and with INTERNAL if the engine dropped the
/// channel without a last event (its thread died).
fn response_stream(relay: Relay) -> GenerateStream {
    // One timer for the whole stream: a `sleep_until` made for each token
    // would be inserted into the timer wheel and removed again per token.
    let timer = relay
        .deadline
        .map(|at| Box::pin(tokio::time::sleep_until(at)));
    let state = (relay, timer);
    Box::pin(futures::stream::unfold(
        state,
        |(mut relay, mut timer)| async move {
            if relay.done {
                return None;
            }
            let deadline = async {
                match timer.as_mut() {
                    Some(timer) => timer.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            let item = tokio::select! {
                // Events already there go out before the deadline's error.
                biased;
                event = relay.events.recv() => match event {
                    Some(event) => {
                        relay.done = !matches!(event, Event::Token { .. } | Event::Admitted);
                        let mut response = to_response(event, &relay.request_id);
                        if let (Ok(GenerateResponse { finished: Some(f), .. }), Some(engine)) =
                            (&mut response, &relay.engine)
                        {
                            f.load = Some(load_report(engine));
                        }
                        response
                    }
                    None => {
                        relay.done = true;
                        let failure = Failure::Internal(
                            "the engine stopped before the generation finished".into(),
                        );
                        Err(WorkerError::from(failure).status(&relay.request_id))
                    }
                },
                () = deadline => {
                    relay.done = true;
                    Err(WorkerError::from(Failure::DeadlineExceeded).status(&relay.request_id))
                }
            };
            Some((item, (relay, timer)))
        },
    ))
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerServiceImpl {
    type GenerateStream = GenerateStream;
    type KvEventsStream = crate::kv_events::KvEventStream;
    type VocabularyStream = Pin<Box<dyn Stream<Item = Result<pb::VocabularyChunk, Status>> + Send>>;

    async fn vocabulary(
        &self,
        _: Request<pb::VocabularyRequest>,
    ) -> Result<Response<Self::VocabularyStream>, Status> {
        let model = self.model.clone();
        let file = self
            .vocab
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || model.vocab_gguf().map(Arc::new))
                    .await
                    .map_err(|e| e.to_string())?
            })
            .await
            .map_err(|e| Status::internal(format!("cannot build the vocabulary file: {e}")))?
            .clone();
        let total_bytes = file.len() as u64;
        let model_name = self.model.model_name.clone();
        let chunks: Vec<Result<pb::VocabularyChunk, Status>> = file
            .chunks(VOCABULARY_CHUNK)
            .map(|data| {
                Ok(pb::VocabularyChunk {
                    data: data.to_vec(),
                    total_bytes,
                    model_name: model_name.clone(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn kv_events(
        &self,
        _: Request<KvEventsRequest>,
    ) -> Result<Response<Self::KvEventsStream>, Status> {
        Ok(Response::new(self.engine.kv_hub().subscribe()))
    }

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
            trace_id = Empty,
            gen_ai.request.max_tokens = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        nanoinfer_telemetry::propagation::set_remote_parent(&span, request.metadata());
        // The deadline counts from the request's arrival.
        let timeout = nanoinfer_proto::deadline::from_metadata(request.metadata());
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut req = request.into_inner();
        // A direct caller's id may hold control characters or be huge:
        // checked as sent, refused below, and escaped here before any log
        // line or span can carry it.
        let bad_id = limits::check_request_id(&req.request_id).err();
        if bad_id.is_some() {
            // Escaped and cut to the limit: kept findable in logs and
            // spans, but never raw and never echoed back in full.
            req.request_id = req
                .request_id
                .escape_debug()
                .take(limits::MAX_REQUEST_ID_BYTES)
                .collect();
        }
        span.record("request_id", req.request_id.as_str());
        let request_id = if bad_id.is_some() {
            String::new()
        } else {
            req.request_id.clone()
        };
        let result = async {
            if let Some(e) = bad_id {
                return Err(e.into());
            }
            let generation = self.to_generation(req, deadline, span.clone()).await?;
            span.record("gen_ai.request.max_tokens", generation.max_tokens);
            span.record("gen_ai.usage.input_tokens", generation.prompt.len());
            tracing::info!(
                prompt_tokens = generation.prompt.len(),
                resumed_tokens = generation.resume.len(),
                max_tokens = generation.max_tokens,
                timeout_ms = timeout.map(|t| t.as_millis() as u64),
                "generate queued"
            );
            Ok::<_, WorkerError>(self.engine.submit(generation)?)
        }
        .instrument(span.clone())
        .await;
        match result {
            Ok(events) => Ok(Response::new(response_stream(Relay {
                events,
                deadline: deadline.map(tokio::time::Instant::from_std),
                request_id,
                done: false,
                engine: Some(self.engine.clone()),
            }))),
            Err(e) => {
                let _entered = span.enter();
                tracing::info!(error = %e, "generate refused");
                nanoinfer_telemetry::mark_span_error(&span, &e.to_string());
                Err(e.status(&request_id))
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
            model_name: self.model.model_name.clone(),
        }))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let req = request.into_inner();
        let messages: Vec<ChatMessage> = req.messages.into_iter().map(ChatMessage::from).collect();
        self.limits
            .check_prompt_or_messages(&req.text, &nanoinfer_vocab::roles_and_contents(&messages))
            .map_err(|e| WorkerError::from(e).status(""))?;
        let tools = limits::check_tools(&req.tools).map_err(|e| WorkerError::from(e).status(""))?;
        let model = self.model.clone();
        let (text, add_special) = (req.text, req.add_special);
        // Off the runtime: a prompt may be a megabyte.
        let (tokens, pieces) = tokio::task::spawn_blocking(move || {
            let tokens = if messages.is_empty() {
                Ok(model
                    .model
                    .vocab()
                    .tokenize(text.as_bytes(), add_special, false))
            } else {
                model
                    .render_chat(&messages, tools.as_ref())
                    .map(|(_, tokens)| tokens)
            }?;
            let pieces = tokens.iter().map(|&t| model.piece(t)).collect();
            Ok::<_, crate::model::ChatError>((tokens, pieces))
        })
        .await
        .map_err(|e| Status::internal(format!("tokenizing: {e}")))?
        .map_err(|e| match e {
            crate::model::ChatError::NoTemplate => {
                WorkerError::FailedPrecondition(e.to_string()).status("")
            }
            crate::model::ChatError::Render(_) => {
                WorkerError::invalid("messages", e.to_string()).status("")
            }
        })?;
        Ok(Response::new(TokenizeResponse {
            tokens: tokens.iter().map(|t| t.0).collect(),
            pieces,
            max_model_len: self.engine.ctx_size(),
        }))
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        let ids = request.into_inner().tokens;
        let tokens = check_token_ids(&ids, self.model.n_vocab())
            .map_err(|e| WorkerError::from(e).status(""))?;
        let model = self.model.clone();
        let text = tokio::task::spawn_blocking(move || model.detokenize(&tokens))
            .await
            .map_err(|e| Status::internal(format!("detokenizing: {e}")))?;
        Ok(Response::new(DetokenizeResponse { text }))
    }
}

/// Token ids for detokenizing: at most [`limits::MAX_DETOKENIZE_TOKENS`],
/// each in `0..n_vocab` (the error names the first bad one).
pub fn check_token_ids(ids: &[i32], n_vocab: i32) -> Result<Vec<LlamaToken>, FieldError> {
    limits::check_token_ids(ids)?;
    if let Some(i) = ids.iter().position(|&id| id < 0 || id >= n_vocab) {
        return Err(FieldError {
            field: "tokens",
            message: format!(
                "tokens[{i}] = {} is not in the vocabulary (0..{n_vocab})",
                ids[i]
            ),
        });
    }
    Ok(ids.iter().map(|&id| LlamaToken(id)).collect())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;

    fn relay(deadline: Option<Duration>) -> (mpsc::Sender<Event>, GenerateStream) {
        let (tx, events) = mpsc::channel(4);
        let stream = response_stream(Relay {
            events,
            deadline: deadline.map(|d| tokio::time::Instant::now() + d),
            request_id: "r1".into(),
            done: false,
            engine: None,
        });
        (tx, stream)
    }

    fn token(index: u32) -> Event {
        Event::Token {
            text: "a".into(),
            id: 7,
            index,
            logprobs: None,
        }
    }

    #[tokio::test]
    async fn a_stream_the_engine_drops_without_its_last_event_is_internal() {
        let (tx, mut stream) = relay(None);
        tx.send(token(0)).await.unwrap();
        drop(tx);
        assert_eq!(stream.next().await.unwrap().unwrap().index, 0);
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(err.message().contains("r1"), "{err:?}");
        assert!(stream.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_the_stream_after_what_was_already_sent() {
        let (tx, mut stream) = relay(Some(Duration::from_secs(1)));
        tx.send(token(0)).await.unwrap();
        assert!(stream.next().await.unwrap().is_ok());
        // Nothing more comes: at the deadline, DEADLINE_EXCEEDED, and the
        // engine sees the receiver gone.
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(stream.next().await.is_none());
        drop(stream);
        assert!(tx.is_closed());
    }

    #[tokio::test]
    async fn failures_keep_their_codes_in_the_stream() {
        let (tx, mut stream) = relay(None);
        tx.send(Event::Failed(Failure::QueueTimeout(Duration::from_secs(
            30,
        ))))
        .await
        .unwrap();
        // A queue timeout means "busy", not "down": the coordinator tries
        // another worker or holds the request, and never ejects this one.
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(stream.next().await.is_none());
    }

    #[test]
    fn resumed_ids_must_be_in_the_vocabulary_and_leave_a_token() {
        assert_eq!(
            check_resume(&[0, 5, 99], 100, 4).unwrap(),
            vec![LlamaToken(0), LlamaToken(5), LlamaToken(99)]
        );
        assert!(check_resume(&[], 100, 1).unwrap().is_empty());
        for (ids, max_tokens) in [
            (&[1, 2, 3][..], 3),
            (&[1][..], 1),
            (&[100][..], 4),
            (&[-1][..], 4),
        ] {
            let err = check_resume(ids, 100, max_tokens).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.to_string().starts_with("resume_token_ids"), "{err}");
        }
    }

    #[test]
    fn unset_controls_are_off_and_bad_ones_name_their_field() {
        assert_eq!(
            controls(&GenerateRequest::default()),
            SamplingControls::default()
        );
        let req = GenerateRequest {
            top_k: Some(40),
            min_p: Some(0.05),
            repetition_penalty: Some(1.1),
            presence_penalty: Some(-0.5),
            frequency_penalty: Some(0.5),
            logprobs: true,
            top_logprobs: 20,
            ..Default::default()
        };
        let c = controls(&req);
        assert_eq!(
            c,
            SamplingControls {
                top_k: 40,
                min_p: 0.05,
                repetition_penalty: 1.1,
                presence_penalty: -0.5,
                frequency_penalty: 0.5,
                logprobs: true,
                top_logprobs: 20,
            }
        );
        assert!(c.check().is_ok());
        for (req, field) in [
            (
                GenerateRequest {
                    min_p: Some(f32::NAN),
                    ..Default::default()
                },
                "min_p",
            ),
            (
                GenerateRequest {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                GenerateRequest {
                    frequency_penalty: Some(3.0),
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                GenerateRequest {
                    logprobs: true,
                    top_logprobs: 21,
                    ..Default::default()
                },
                "top_logprobs",
            ),
        ] {
            let err = WorkerError::from(controls(&req).check().unwrap_err());
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }

    #[test]
    fn a_tokens_logprobs_go_out_in_its_message() {
        let event = Event::Token {
            text: String::new(),
            id: 7,
            index: 3,
            logprobs: Some(crate::engine::TokenLogprobs {
                logprob: -0.5,
                top: vec![
                    Alternative {
                        id: 7,
                        text: "a".into(),
                        logprob: -0.5,
                    },
                    Alternative {
                        id: 2,
                        text: "<eos>".into(),
                        logprob: -1.5,
                    },
                ],
            }),
        };
        let msg = to_response(event, "r").unwrap();
        assert_eq!(msg.token_id, Some(7));
        assert_eq!(msg.logprob, Some(-0.5));
        assert_eq!(
            msg.top_logprobs,
            [
                pb::TopLogprob {
                    token_id: 7,
                    text: "a".into(),
                    logprob: -0.5,
                },
                pb::TopLogprob {
                    token_id: 2,
                    text: "<eos>".into(),
                    logprob: -1.5,
                },
            ]
        );
        let msg = to_response(token(0), "r").unwrap();
        assert_eq!((msg.logprob, msg.top_logprobs.len()), (None, 0));
    }
}
