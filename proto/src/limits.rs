//! Request limits both processes apply, with one set of messages: the
//! coordinator at the door, and the worker again for callers that reach it
//! directly (defence in depth). Each check names the field it refuses.

/// Most stop sequences per request.
pub const MAX_STOP_SEQUENCES: usize = 8;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Longest client request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Default of `--max-tokens-limit` on both processes.
pub const DEFAULT_MAX_TOKENS_LIMIT: u32 = 4096;
/// Default of `--max-prompt-bytes` on both processes.
pub const DEFAULT_MAX_PROMPT_BYTES: usize = 1 << 20;

/// Every field name a refusal may carry (the HTTP API's `param`).
pub const FIELDS: &[&str] = &[
    "request_id",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "top_logprobs",
    "logprobs",
    "n",
    "seed",
    "stop",
    "model",
    "tokens",
    "resume_token_ids",
    "logit_bias",
    "json_schema",
    "tools",
    "grammar",
];

/// Status metadata naming the refused field of an `INVALID_ARGUMENT` (the
/// HTTP API's `param`): set by the worker and passed on by the coordinator,
/// so no process reads a field back out of a message's text.
pub const INVALID_FIELD_HEADER: &str = "x-nanoinfer-invalid-field";

/// The refused field `status` carries in [`INVALID_FIELD_HEADER`], if it
/// is one of [`FIELDS`].
pub fn invalid_field(status: &tonic::Status) -> Option<&'static str> {
    let field = status.metadata().get(INVALID_FIELD_HEADER)?.to_str().ok()?;
    FIELDS.iter().find(|f| **f == field).copied()
}

/// Status metadata naming why a request was refused, where a client API
/// has a code for it (the OpenAI error's `code`).
pub const ERROR_CODE_HEADER: &str = "x-nanoinfer-error-code";

/// [`ERROR_CODE_HEADER`]'s value for a prompt (with `max_tokens`, when the
/// request holds it to that) that does not fit the context window.
pub const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";

/// The reason code `status` carries in [`ERROR_CODE_HEADER`], if any.
pub fn error_code(status: &tonic::Status) -> Option<&str> {
    status
        .metadata()
        .get(ERROR_CODE_HEADER)
        .and_then(|v| v.to_str().ok())
}

/// A refused field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's name in the API.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn refuse(field: &'static str, message: impl Into<String>) -> Result<(), FieldError> {
    Err(FieldError {
        field,
        message: message.into(),
    })
}

/// The configurable limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest `max_tokens` accepted.
    pub max_tokens_limit: u32,
    /// Largest prompt accepted, in bytes.
    pub max_prompt_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tokens_limit: DEFAULT_MAX_TOKENS_LIMIT,
            max_prompt_bytes: DEFAULT_MAX_PROMPT_BYTES,
        }
    }
}

/// A client request id (empty is allowed: the coordinator makes one).
/// Control characters are refused: ids end up in logs, span attributes and
/// response headers, where a newline or an escape sequence could forge a
/// log line.
pub fn check_request_id(id: &str) -> Result<(), FieldError> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return refuse(
            "request_id",
            format!("must be at most {MAX_REQUEST_ID_BYTES} bytes"),
        );
    }
    if id.chars().any(char::is_control) {
        return refuse(
            "request_id",
            "must not contain control characters (newline, carriage return, escape, …)",
        );
    }
    Ok(())
}

/// Sampling parameters: temperature ≥ 0 and finite (0 = greedy), top_p in
/// (0, 1].
pub fn check_sampling(temperature: f32, top_p: f32) -> Result<(), FieldError> {
    if !temperature.is_finite() || temperature < 0.0 {
        return refuse(
            "temperature",
            format!("must be a finite number >= 0, got {temperature}"),
        );
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return refuse("top_p", format!("must be in (0, 1], got {top_p}"));
    }
    Ok(())
}

/// Most alternatives `top_logprobs` may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most completions one request may ask for (`n`).
pub const MAX_N: u32 = 8;
/// Largest `repetition_penalty`.
pub const MAX_REPETITION_PENALTY: f32 = 10.0;

/// The sampling controls beyond temperature and top-p, with their "off"
/// values as defaults. Both APIs and both processes share these ranges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingControls {
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: u32,
    /// In [0, 1]: drop tokens below `min_p` × the top probability; 0 = off.
    pub min_p: f32,
    /// In (0, 10]; 1 = off.
    pub repetition_penalty: f32,
    /// In [-2, 2]; 0 = off.
    pub presence_penalty: f32,
    /// In [-2, 2]; 0 = off.
    pub frequency_penalty: f32,
    /// Return log-probabilities.
    pub logprobs: bool,
    /// Alternatives per position, 0..=20.
    pub top_logprobs: u32,
}

impl Default for SamplingControls {
    fn default() -> Self {
        Self {
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

impl SamplingControls {
    /// Each field within its range; the error names the field.
    pub fn check(&self) -> Result<(), FieldError> {
        if !(0.0..=1.0).contains(&self.min_p) {
            return refuse("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        let r = self.repetition_penalty;
        if !(r > 0.0 && r <= MAX_REPETITION_PENALTY) {
            return refuse(
                "repetition_penalty",
                format!("must be in (0, {MAX_REPETITION_PENALTY}], got {r}"),
            );
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return refuse(field, format!("must be in [-2, 2], got {v}"));
            }
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return refuse(
                "top_logprobs",
                format!(
                    "must be at most {MAX_TOP_LOGPROBS}, got {}",
                    self.top_logprobs
                ),
            );
        }
        Ok(())
    }

    /// Whether any control changes the distribution (penalties, top-k,
    /// min-p); log-probabilities do not.
    pub fn shapes(&self) -> bool {
        self.top_k != 0
            || self.min_p != 0.0
            || self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// Most entries of `logit_bias`.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// Largest bias magnitude (OpenAI's range).
pub const MAX_BIAS: f32 = 100.0;

/// `logit_bias`: at most [`MAX_LOGIT_BIAS`] entries, ids ≥ 0 (below
/// `n_vocab` when it is known), biases in [-[`MAX_BIAS`], [`MAX_BIAS`]].
/// Returns the entries sorted by id.
pub fn check_logit_bias(
    bias: &std::collections::HashMap<i32, f32>,
    n_vocab: Option<i32>,
) -> Result<Vec<(u32, f32)>, FieldError> {
    if bias.len() > MAX_LOGIT_BIAS {
        return Err(FieldError {
            field: "logit_bias",
            message: format!(
                "holds {} entries; the limit is {MAX_LOGIT_BIAS}",
                bias.len()
            ),
        });
    }
    let mut out = Vec::with_capacity(bias.len());
    for (&id, &b) in bias {
        if id < 0 || n_vocab.is_some_and(|n| id >= n) {
            let range =
                n_vocab.map_or_else(|| "a token id ≥ 0".to_string(), |n| format!("in 0..{n}"));
            return Err(FieldError {
                field: "logit_bias",
                message: format!("token id {id} is not in the vocabulary (must be {range})"),
            });
        }
        if !(-MAX_BIAS..=MAX_BIAS).contains(&b) {
            return Err(FieldError {
                field: "logit_bias",
                message: format!("the bias of token {id} must be in [-100, 100], got {b}"),
            });
        }
        out.push((id as u32, b));
    }
    out.sort_unstable_by_key(|&(id, _)| id);
    Ok(out)
}

/// Largest `json_schema` (bytes).
pub const MAX_JSON_SCHEMA_BYTES: usize = 64 * 1024;

/// `json_schema`: empty (none), or at most [`MAX_JSON_SCHEMA_BYTES`] of
/// JSON holding an object or a boolean (what a schema can be). Whether the
/// worker can enforce it is the worker's check.
pub fn check_json_schema(schema: &str) -> Result<(), FieldError> {
    let refuse = |message: String| FieldError {
        field: "json_schema",
        message,
    };
    if schema.is_empty() {
        return Ok(());
    }
    if schema.len() > MAX_JSON_SCHEMA_BYTES {
        return Err(refuse(format!(
            "is {} bytes; the limit is {MAX_JSON_SCHEMA_BYTES}",
            schema.len()
        )));
    }
    let trimmed = schema.trim_start();
    if !(trimmed.starts_with('{') || trimmed.starts_with("true") || trimmed.starts_with("false")) {
        return Err(refuse(
            "must be a JSON Schema: a JSON object (or true/false)".to_string(),
        ));
    }
    Ok(())
}

/// Largest `tools` (bytes of JSON).
pub const MAX_TOOLS_BYTES: usize = 256 * 1024;

/// `tools`: empty (none), or at most [`MAX_TOOLS_BYTES`] of JSON holding
/// an array of objects, which is returned parsed (what the chat template
/// is handed).
pub fn check_tools(tools: &str) -> Result<Option<serde_json::Value>, FieldError> {
    if tools.is_empty() {
        return Ok(None);
    }
    if tools.len() > MAX_TOOLS_BYTES {
        return Err(FieldError {
            field: "tools",
            message: format!("is {} bytes; the limit is {MAX_TOOLS_BYTES}", tools.len()),
        });
    }
    match serde_json::from_str::<serde_json::Value>(tools) {
        Ok(v @ serde_json::Value::Array(_))
            if v.as_array()
                .is_some_and(|a| a.iter().all(serde_json::Value::is_object)) =>
        {
            Ok(Some(v))
        }
        _ => Err(FieldError {
            field: "tools",
            message: "must be a JSON array of tool objects".into(),
        }),
    }
}

/// `grammar`: empty (none), or at most [`MAX_JSON_SCHEMA_BYTES`], and not
/// beside a `json_schema` (one constraint per request).
pub fn check_grammar(grammar: &str, json_schema: &str) -> Result<(), FieldError> {
    if grammar.is_empty() {
        return Ok(());
    }
    if !json_schema.is_empty() {
        return refuse(
            "grammar",
            "and json_schema were both sent; send one of them",
        );
    }
    if grammar.len() > MAX_JSON_SCHEMA_BYTES {
        return refuse(
            "grammar",
            format!(
                "is {} bytes; the limit is {MAX_JSON_SCHEMA_BYTES}",
                grammar.len()
            ),
        );
    }
    Ok(())
}

/// Most token ids one detokenize request may hold.
pub const MAX_DETOKENIZE_TOKENS: usize = 1 << 20;

/// Token ids to detokenize: at most [`MAX_DETOKENIZE_TOKENS`] (the worker
/// also checks each against its vocabulary).
pub fn check_token_ids(ids: &[i32]) -> Result<(), FieldError> {
    if ids.len() > MAX_DETOKENIZE_TOKENS {
        return refuse(
            "tokens",
            format!(
                "holds {} ids; the limit is {MAX_DETOKENIZE_TOKENS}",
                ids.len()
            ),
        );
    }
    Ok(())
}

/// `n`, the number of completions: 1..=[`MAX_N`] (0 means 1).
pub fn check_n(n: u32) -> Result<u32, FieldError> {
    match n {
        0 => Ok(1),
        1..=MAX_N => Ok(n),
        _ => Err(FieldError {
            field: "n",
            message: format!("must be in 1..={MAX_N}, got {n}"),
        }),
    }
}

/// Stop sequences: at most [`MAX_STOP_SEQUENCES`], each 1..=[`MAX_STOP_BYTES`].
pub fn check_stop(stop: &[String]) -> Result<(), FieldError> {
    if stop.len() > MAX_STOP_SEQUENCES {
        return refuse("stop", format!("at most {MAX_STOP_SEQUENCES} sequences"));
    }
    if let Some(s) = stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return refuse(
            "stop",
            format!(
                "each sequence must be 1..={MAX_STOP_BYTES} bytes, got {}",
                s.len()
            ),
        );
    }
    Ok(())
}

/// Most messages one conversation may hold.
pub const MAX_MESSAGES: usize = 256;
/// The roles a chat message may have.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

impl Limits {
    /// Exactly one of a prompt and a conversation (`(role, content)` pairs,
    /// borrowed or owned), then the checks of that one.
    pub fn check_prompt_or_messages<S: AsRef<str>>(
        &self,
        prompt: &str,
        messages: &[(S, S)],
    ) -> Result<(), FieldError> {
        match (prompt.is_empty(), messages.is_empty()) {
            (false, false) => refuse("prompt", "and messages were both sent; send one of them"),
            (_, true) => self.check_prompt(prompt),
            (true, false) => self.check_messages(messages),
        }
    }

    /// At most [`MAX_MESSAGES`] messages with known roles, their contents
    /// within `max_prompt_bytes` together.
    pub fn check_messages<S: AsRef<str>>(&self, messages: &[(S, S)]) -> Result<(), FieldError> {
        if messages.len() > MAX_MESSAGES {
            return refuse(
                "messages",
                format!(
                    "holds {} messages; the limit is {MAX_MESSAGES}",
                    messages.len()
                ),
            );
        }
        for (i, (role, _)) in messages.iter().enumerate() {
            let role = role.as_ref();
            if !ROLES.contains(&role) {
                return refuse(
                    "messages",
                    format!(
                        "messages[{i}].role must be system, user, assistant or tool, got {:?}",
                        role.chars().take(32).collect::<String>()
                    ),
                );
            }
        }
        let bytes: usize = messages.iter().map(|(_, c)| c.as_ref().len()).sum();
        if bytes > self.max_prompt_bytes {
            return refuse(
                "messages",
                format!(
                    "contents are {bytes} bytes together; the limit is {}",
                    self.max_prompt_bytes
                ),
            );
        }
        Ok(())
    }

    /// A non-empty prompt within `max_prompt_bytes`.
    pub fn check_prompt(&self, prompt: &str) -> Result<(), FieldError> {
        if prompt.is_empty() {
            return refuse("prompt", "must not be empty");
        }
        if prompt.len() > self.max_prompt_bytes {
            return refuse(
                "prompt",
                format!(
                    "is {} bytes; the limit is {}",
                    prompt.len(),
                    self.max_prompt_bytes
                ),
            );
        }
        Ok(())
    }

    /// `max_tokens` in 1..=`max_tokens_limit` (the coordinator turns 0 into
    /// its default before this).
    pub fn check_max_tokens(&self, n: u32) -> Result<(), FieldError> {
        if n == 0 {
            return refuse("max_tokens", "must be at least 1");
        }
        if n > self.max_tokens_limit {
            return refuse(
                "max_tokens",
                format!("{n} exceeds the limit of {}", self.max_tokens_limit),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<(), FieldError>) -> &'static str {
        r.unwrap_err().field
    }

    #[test]
    fn logit_bias_is_bounded_and_sorted() {
        use std::collections::HashMap;
        let ok = HashMap::from([(7, -100.0), (2, 5.5), (0, 100.0)]);
        assert_eq!(
            check_logit_bias(&ok, Some(8)).unwrap(),
            vec![(0, 100.0), (2, 5.5), (7, -100.0)]
        );
        assert!(check_logit_bias(&HashMap::new(), None).unwrap().is_empty());
        let refused = |m: HashMap<i32, f32>, n: Option<i32>| {
            let e = check_logit_bias(&m, n).unwrap_err();
            assert_eq!(e.field, "logit_bias");
            e.message
        };
        assert!(refused(HashMap::from([(8, 1.0)]), Some(8)).contains("0..8"));
        assert!(refused(HashMap::from([(-1, 1.0)]), None).contains("-1"));
        assert!(refused(HashMap::from([(1, 100.5)]), None).contains("[-100, 100]"));
        assert!(refused(HashMap::from([(1, f32::NAN)]), None).contains("[-100, 100]"));
        let many: HashMap<i32, f32> = (0..=MAX_LOGIT_BIAS as i32).map(|i| (i, 1.0)).collect();
        assert!(refused(many, None).contains("1024"));
    }

    #[test]
    fn each_check_names_its_field() {
        let l = Limits {
            max_tokens_limit: 10,
            max_prompt_bytes: 4,
        };
        assert_eq!(field(check_request_id(&"r".repeat(129))), "request_id");
        assert_eq!(field(check_request_id("a\nb")), "request_id");
        assert_eq!(field(check_request_id("\u{1b}[31m")), "request_id");
        assert!(check_request_id("").is_ok());
        assert!(check_request_id("é-123").is_ok());
        assert_eq!(field(check_sampling(-0.1, 1.0)), "temperature");
        assert_eq!(field(check_sampling(f32::NAN, 1.0)), "temperature");
        assert_eq!(field(check_sampling(0.0, 0.0)), "top_p");
        assert_eq!(field(check_sampling(0.0, 1.01)), "top_p");
        assert!(check_sampling(0.0, 1.0).is_ok());
        assert_eq!(field(check_stop(&[String::new()])), "stop");
        assert_eq!(field(check_stop(&vec!["s".into(); 9])), "stop");
        assert_eq!(field(check_stop(&["x".repeat(257)])), "stop");
        assert!(check_stop(&vec!["s".into(); 8]).is_ok());
        assert_eq!(field(l.check_prompt("")), "prompt");
        // A conversation instead of a prompt.
        let chat = [("system", "be"), ("user", "hi")];
        assert!(l.check_prompt_or_messages("", &chat).is_ok());
        assert_eq!(field(l.check_prompt_or_messages("x", &chat)), "prompt");
        let none: &[(&str, &str)] = &[];
        assert_eq!(field(l.check_prompt_or_messages("", none)), "prompt");
        let bad = l.check_prompt_or_messages("", &[("user", "a"), ("bot", "b")]);
        assert_eq!(
            bad.unwrap_err().message,
            "messages[1].role must be system, user, assistant or tool, got \"bot\""
        );
        assert_eq!(
            field(l.check_messages(&[("user", "123"), ("assistant", "45")])),
            "messages"
        );
        let many = vec![("user", ""); MAX_MESSAGES + 1];
        assert_eq!(field(l.check_messages(&many)), "messages");
        assert_eq!(field(l.check_prompt("12345")), "prompt");
        assert!(l.check_prompt("1234").is_ok());
        assert_eq!(field(l.check_max_tokens(0)), "max_tokens");
        assert_eq!(field(l.check_max_tokens(11)), "max_tokens");
        assert!(l.check_max_tokens(10).is_ok());
    }

    #[test]
    fn sampling_controls_check_their_ranges() {
        let off = SamplingControls::default();
        assert!(off.check().is_ok());
        assert!(!off.shapes());
        let with = |f: fn(&mut SamplingControls)| {
            let mut c = off;
            f(&mut c);
            c.check()
        };
        // Edges of each range are accepted.
        for ok in [
            with(|c| c.top_k = u32::MAX),
            with(|c| c.min_p = 0.0),
            with(|c| c.min_p = 1.0),
            with(|c| c.repetition_penalty = f32::MIN_POSITIVE),
            with(|c| c.repetition_penalty = MAX_REPETITION_PENALTY),
            with(|c| c.presence_penalty = -2.0),
            with(|c| c.presence_penalty = 2.0),
            with(|c| c.frequency_penalty = -2.0),
            with(|c| c.frequency_penalty = 2.0),
            with(|c| c.top_logprobs = MAX_TOP_LOGPROBS),
            with(|c| c.logprobs = true),
        ] {
            assert!(ok.is_ok(), "{ok:?}");
        }
        // Outside them, and NaN or infinite, the field is named.
        for (bad, name) in [
            (with(|c| c.min_p = -0.01), "min_p"),
            (with(|c| c.min_p = 1.01), "min_p"),
            (with(|c| c.min_p = f32::NAN), "min_p"),
            (with(|c| c.repetition_penalty = 0.0), "repetition_penalty"),
            (with(|c| c.repetition_penalty = -1.0), "repetition_penalty"),
            (with(|c| c.repetition_penalty = 10.01), "repetition_penalty"),
            (
                with(|c| c.repetition_penalty = f32::NAN),
                "repetition_penalty",
            ),
            (
                with(|c| c.repetition_penalty = f32::INFINITY),
                "repetition_penalty",
            ),
            (with(|c| c.presence_penalty = 2.01), "presence_penalty"),
            (with(|c| c.presence_penalty = f32::NAN), "presence_penalty"),
            (with(|c| c.frequency_penalty = -2.01), "frequency_penalty"),
            (
                with(|c| c.frequency_penalty = f32::NEG_INFINITY),
                "frequency_penalty",
            ),
            (
                with(|c| c.frequency_penalty = f32::NAN),
                "frequency_penalty",
            ),
            (
                with(|c| c.top_logprobs = MAX_TOP_LOGPROBS + 1),
                "top_logprobs",
            ),
        ] {
            assert_eq!(field(bad), name);
        }
        // Only the controls that change the distribution shape it.
        for shaping in [
            SamplingControls { top_k: 1, ..off },
            SamplingControls { min_p: 0.1, ..off },
            SamplingControls {
                repetition_penalty: 1.1,
                ..off
            },
            SamplingControls {
                presence_penalty: -0.5,
                ..off
            },
            SamplingControls {
                frequency_penalty: 0.5,
                ..off
            },
        ] {
            assert!(shaping.shapes(), "{shaping:?}");
        }
        let logprobs = SamplingControls {
            logprobs: true,
            top_logprobs: 5,
            ..off
        };
        assert!(!logprobs.shapes());
    }

    #[test]
    fn n_defaults_to_one_and_is_bounded() {
        assert_eq!(check_n(0), Ok(1));
        assert_eq!(check_n(1), Ok(1));
        assert_eq!(check_n(MAX_N), Ok(MAX_N));
        let err = check_n(MAX_N + 1).unwrap_err();
        assert_eq!(err.field, "n");
        assert!(err.message.contains("1..=8"), "{}", err.message);
        assert_eq!(check_n(u32::MAX).unwrap_err().field, "n");
    }

    #[test]
    fn a_json_schema_is_an_object_or_boolean_and_bounded() {
        for ok in ["", "{}", r#" {"type": "object"}"#, "true", "false"] {
            assert_eq!(check_json_schema(ok), Ok(()), "{ok:?}");
        }
        for bad in ["[1]", "\"string\"", "3", "null"] {
            let err = check_json_schema(bad).unwrap_err();
            assert_eq!(err.field, "json_schema");
            assert!(err.message.contains("JSON Schema"), "{}", err.message);
        }
        let big = format!(
            "{{\"description\": \"{}\"}}",
            "x".repeat(MAX_JSON_SCHEMA_BYTES)
        );
        let err = check_json_schema(&big).unwrap_err();
        assert_eq!(err.field, "json_schema");
        assert!(err.message.contains("65536"), "{}", err.message);
    }
}
