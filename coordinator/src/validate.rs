//! Public `InferRequest` → validated [`InferParams`], at the edge.

use nanoinfer_proto::limits::{self, FieldError, Limits as SharedLimits, SamplingControls};
use nanoinfer_proto::nanoinfer::InferRequest;

use crate::error::CoordinatorError;

/// Defaults and limits applied to every request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `max_tokens` when the client sends 0.
    pub default_max_tokens: u32,
    /// The limits the worker applies too (`max_tokens`, prompt bytes).
    pub checks: SharedLimits,
}

/// Default temperature when unset.
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
/// Default top-p when unset.
pub const DEFAULT_TOP_P: f32 = 0.95;
pub use nanoinfer_proto::limits::{MAX_REQUEST_ID_BYTES, MAX_STOP_BYTES, MAX_STOP_SEQUENCES};

/// A validated request with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct InferParams {
    /// The client's id, or a generated UUID.
    pub request_id: String,
    /// The prompt (empty when `messages` is used).
    pub prompt: String,
    /// A conversation (empty when `prompt` is used).
    pub messages: Vec<nanoinfer_vocab::ChatMessage>,
    /// Tools for the chat template, a JSON array (empty: none).
    pub tools: String,
    /// A Lark grammar constraint (empty: none).
    pub grammar: String,
    /// 1..=limit.
    pub max_tokens: u32,
    /// ≥ 0, finite; 0 = greedy.
    pub temperature: f32,
    /// (0, 1].
    pub top_p: f32,
    /// Sampler seed (random when the client sent none).
    pub seed: u64,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// top-k, min-p, penalties, log-probabilities.
    pub controls: SamplingControls,
    /// Completions to generate, 1..=8.
    pub n: u32,
    /// Only workers serving this model name (`None`: any).
    pub model: Option<String>,
    /// Token id → bias, sorted by id (the worker checks the ids against
    /// its vocabulary).
    pub logit_bias: Vec<(u32, f32)>,
    /// The structured-output schema (empty: none; the worker compiles it).
    pub json_schema: String,
    /// Refuse a prompt + `max_tokens` beyond the context window up front.
    pub strict_max_tokens: bool,
}

impl From<FieldError> for CoordinatorError {
    fn from(e: FieldError) -> Self {
        CoordinatorError::InvalidArgument {
            field: e.field,
            message: e.message,
        }
    }
}

impl Limits {
    /// Validates `req` with the checks the worker shares
    /// ([`nanoinfer_proto::limits`]). `seed` supplies a seed when the
    /// request has none.
    pub fn validate(
        &self,
        req: InferRequest,
        seed: impl FnOnce() -> u64,
    ) -> Result<InferParams, CoordinatorError> {
        limits::check_request_id(&req.request_id)?;
        let messages: Vec<nanoinfer_vocab::ChatMessage> = req
            .messages
            .into_iter()
            .map(nanoinfer_vocab::ChatMessage::from)
            .collect();
        self.checks.check_prompt_or_messages(
            &req.prompt,
            &nanoinfer_vocab::roles_and_contents(&messages),
        )?;
        limits::check_tools(&req.tools)?;
        if !req.tools.is_empty() && messages.is_empty() {
            return Err(FieldError {
                field: "tools",
                message: "are rendered by the chat template: send messages, not a prompt".into(),
            }
            .into());
        }
        let max_tokens = match req.max_tokens {
            0 => self.default_max_tokens,
            n => n,
        };
        self.checks.check_max_tokens(max_tokens)?;
        let temperature = req.temperature.unwrap_or(DEFAULT_TEMPERATURE);
        let top_p = req.top_p.unwrap_or(DEFAULT_TOP_P);
        limits::check_sampling(temperature, top_p)?;
        limits::check_stop(&req.stop)?;
        let off = SamplingControls::default();
        let controls = SamplingControls {
            top_k: req.top_k.unwrap_or(off.top_k),
            min_p: req.min_p.unwrap_or(off.min_p),
            repetition_penalty: req.repetition_penalty.unwrap_or(off.repetition_penalty),
            presence_penalty: req.presence_penalty.unwrap_or(off.presence_penalty),
            frequency_penalty: req.frequency_penalty.unwrap_or(off.frequency_penalty),
            logprobs: req.logprobs,
            top_logprobs: req.top_logprobs,
        };
        controls.check()?;
        if controls.top_logprobs > 0 && !controls.logprobs {
            return Err(FieldError {
                field: "top_logprobs",
                message: "needs logprobs set to true".into(),
            }
            .into());
        }
        let n = limits::check_n(req.n)?;
        let logit_bias = limits::check_logit_bias(&req.logit_bias, None)?;
        limits::check_json_schema(&req.json_schema)?;
        limits::check_grammar(&req.grammar, &req.json_schema)?;
        if !req.model.is_empty() {
            nanoinfer_registry::schema::validate_model_name(&req.model).map_err(|message| {
                CoordinatorError::InvalidArgument {
                    field: "model",
                    message,
                }
            })?;
        }
        let request_id = if req.request_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            req.request_id
        };
        Ok(InferParams {
            request_id,
            prompt: req.prompt,
            messages,
            tools: req.tools,
            grammar: req.grammar,
            max_tokens,
            temperature,
            top_p,
            seed: req.seed.unwrap_or_else(seed),
            stop: req.stop,
            controls,
            n,
            model: (!req.model.is_empty()).then_some(req.model),
            logit_bias,
            json_schema: req.json_schema,
            strict_max_tokens: req.strict_max_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            default_max_tokens: 128,
            checks: SharedLimits {
                max_tokens_limit: 4096,
                max_prompt_bytes: 1000,
            },
        }
    }

    fn req(prompt: &str) -> InferRequest {
        InferRequest {
            prompt: prompt.into(),
            ..Default::default()
        }
    }

    fn field_of(r: Result<InferParams, CoordinatorError>) -> &'static str {
        match r {
            Err(CoordinatorError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn defaults_fill_unset_fields() {
        let p = limits().validate(req("hi"), || 7).unwrap();
        assert_eq!(p.max_tokens, 128);
        assert_eq!(p.temperature, DEFAULT_TEMPERATURE);
        assert_eq!(p.top_p, DEFAULT_TOP_P);
        assert_eq!(p.seed, 7);
        assert_eq!(p.request_id.len(), 36, "a UUID is generated");
    }

    #[test]
    fn explicit_zero_temperature_is_greedy_not_default() {
        let r = InferRequest {
            temperature: Some(0.0),
            seed: Some(1),
            request_id: "abc".into(),
            ..req("hi")
        };
        let p = limits().validate(r, || 7).unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.seed, 1);
        assert_eq!(p.request_id, "abc");
    }

    #[test]
    fn bad_fields_are_named() {
        let l = limits();
        assert_eq!(field_of(l.validate(req(""), || 0)), "prompt");
        assert_eq!(field_of(l.validate(req(&"x".repeat(1001)), || 0)), "prompt");
        let cases = [
            (
                InferRequest {
                    temperature: Some(-0.1),
                    ..req("a")
                },
                "temperature",
            ),
            (
                InferRequest {
                    temperature: Some(f32::NAN),
                    ..req("a")
                },
                "temperature",
            ),
            (
                InferRequest {
                    temperature: Some(f32::INFINITY),
                    ..req("a")
                },
                "temperature",
            ),
            (
                InferRequest {
                    top_p: Some(0.0),
                    ..req("a")
                },
                "top_p",
            ),
            (
                InferRequest {
                    top_p: Some(1.01),
                    ..req("a")
                },
                "top_p",
            ),
            (
                InferRequest {
                    top_p: Some(f32::NAN),
                    ..req("a")
                },
                "top_p",
            ),
            (
                InferRequest {
                    max_tokens: 4097,
                    ..req("a")
                },
                "max_tokens",
            ),
            (
                InferRequest {
                    stop: vec![String::new()],
                    ..req("a")
                },
                "stop",
            ),
            (
                InferRequest {
                    stop: vec!["s".into(); 9],
                    ..req("a")
                },
                "stop",
            ),
            (
                InferRequest {
                    request_id: "r".repeat(129),
                    ..req("a")
                },
                "request_id",
            ),
            (
                InferRequest {
                    request_id: "ok\nINFO forged line".into(),
                    ..req("a")
                },
                "request_id",
            ),
            (
                InferRequest {
                    request_id: "a\rb".into(),
                    ..req("a")
                },
                "request_id",
            ),
            (
                InferRequest {
                    request_id: "\u{1b}[31mred".into(),
                    ..req("a")
                },
                "request_id",
            ),
        ];
        for (r, field) in cases {
            assert_eq!(field_of(l.validate(r, || 0)), field);
        }
    }

    #[test]
    fn limits_are_inclusive() {
        let r = InferRequest {
            max_tokens: 4096,
            top_p: Some(1.0),
            ..req("a")
        };
        assert_eq!(limits().validate(r, || 0).unwrap().max_tokens, 4096);
    }
}
