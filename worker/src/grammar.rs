//! Structured outputs: a JSON Schema that every completion ending by EOS
//! satisfies, enforced in the sampler by masking the tokens the schema
//! cannot continue with (llguidance's Earley parser over the model's own
//! token trie).
//!
//! # Shape of the JSON
//! Compact, one space after `:` and `,` (`{"a": 1, "b": [2, 3]}`), no other
//! whitespace: flexible whitespace lets a small model pad a completion with
//! newlines until `max_tokens` runs out, and the schema's value is the same.
//!
//! # Integers
//! An integer the schema leaves unbounded is kept within ±(2^53 − 1)
//! (`nanoinfer_proto::schema::INTEGER_LIMIT`).
//!
//! # Refusals
//! A schema keyword the engine cannot enforce (`Unimplemented keys: [...]`),
//! an unknown `format`, a `$ref` it cannot resolve or a schema no value can
//! satisfy is refused when the request arrives, naming `response_format`;
//! nothing is silently ignored.
//!
//! # Cost
//! The token trie of the vocabulary (262,144 tokens for Gemma 3) is built
//! once per model, on the first constrained request. Per token, one mask
//! over the vocabulary (see `docs/benchmarks.md`, Sampler) plus a copy of
//! the logits with the masked tokens at -inf.

use std::sync::{Arc, OnceLock};

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use nanoinfer_proto::limits::MAX_JSON_SCHEMA_BYTES;
use toktrie::SimpleVob;

/// One model's grammar compiler: its token trie, built on first use.
pub struct Grammars {
    model: Arc<LlamaModel>,
    factory: OnceLock<Result<Engine, String>>,
}

/// What every constraint of one model shares.
#[derive(Clone)]
struct Engine {
    factory: Arc<ParserFactory>,
    /// The end-of-generation tokens (allowed where the JSON is complete).
    eos: Arc<SimpleVob>,
}

impl Grammars {
    /// The compiler for `model`'s vocabulary (nothing is built yet).
    pub fn new(model: Arc<LlamaModel>) -> Self {
        Self {
            model,
            factory: OnceLock::new(),
        }
    }

    fn engine(&self) -> Result<Engine, String> {
        self.factory
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let env = LlamaSampler::llguidance_tok_env(&self.model);
                let mut factory = ParserFactory::new_simple(&env)
                    .map_err(|e| format!("building the grammar engine's token trie: {e}"))?;
                // Its own log lines go to stderr at level 1; ours say enough.
                factory.quiet();
                tracing::info!(
                    build_ms = started.elapsed().as_millis() as u64,
                    "structured outputs: token trie built"
                );
                let eos = Arc::new(env.tok_trie().eos_token_set());
                Ok(Engine {
                    factory: Arc::new(factory),
                    eos,
                })
            })
            .clone()
    }

    /// Compiles `schema` (JSON Schema text) into a constraint. Blocking (the
    /// first call builds the token trie): call it off the async runtime.
    /// The error says what in the schema cannot be enforced.
    pub fn compile(&self, schema: &str) -> Result<Grammar, String> {
        if schema.len() > MAX_JSON_SCHEMA_BYTES {
            return Err(format!(
                "the schema is {} bytes; the limit is {MAX_JSON_SCHEMA_BYTES}",
                schema.len()
            ));
        }
        let value: serde_json::Value =
            serde_json::from_str(schema).map_err(|e| format!("the schema is not JSON: {e}"))?;
        let value = nanoinfer_proto::schema::prepare(value)?;
        self.build(TopLevelGrammar::from_json_schema(value))
    }

    /// Compiles a Lark grammar (llguidance's dialect; a `%json { … }` in it
    /// is taken as written, so it should come from
    /// [`nanoinfer_proto::schema::prepare`]). Blocking, like [`Self::compile`].
    pub fn compile_lark(&self, grammar: &str) -> Result<Grammar, String> {
        if grammar.len() > MAX_JSON_SCHEMA_BYTES {
            return Err(format!(
                "the grammar is {} bytes; the limit is {MAX_JSON_SCHEMA_BYTES}",
                grammar.len()
            ));
        }
        self.build(TopLevelGrammar::from_lark(grammar.to_string()))
    }

    fn build(&self, grammar: TopLevelGrammar) -> Result<Grammar, String> {
        let engine = self.engine()?;
        let parser = engine
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Grammar {
            matcher,
            eos: engine.eos,
        })
    }
}

/// One sequence's constraint: where it stands in the grammar.
pub struct Grammar {
    matcher: Matcher,
    eos: Arc<SimpleVob>,
}

impl Clone for Grammar {
    /// An independent copy (each of a request's `n` sequences advances its
    /// own).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            eos: self.eos.clone(),
        }
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("stopped", &self.matcher.is_stopped())
            .field("error", &self.matcher.get_error())
            .finish()
    }
}

impl Grammar {
    /// Writes `logits` into `out` with every token the grammar cannot take
    /// next at -inf. Where the grammar is complete only the end-of-
    /// generation tokens are left; a matcher in error (a token it could
    /// not take, e.g. a resumed one) leaves those too, so the sequence
    /// ends rather than running unconstrained.
    pub fn mask(&mut self, logits: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.extend_from_slice(logits);
        match self.matcher.compute_mask_or_eos() {
            Ok(mask) => apply(mask.as_slice(), out),
            Err(e) => {
                tracing::warn!(error = %e, "structured outputs: the constraint failed; ending the sequence");
                apply(self.eos.as_slice(), out);
            }
        }
    }

    /// Advances past `token` (the sampler's pick, or a resumed token).
    /// End-of-generation tokens end the sequence and are not fed.
    pub fn accept(&mut self, token: u32) {
        if self.matcher.is_stopped() {
            return;
        }
        if self.eos.is_allowed(token) {
            return;
        }
        if let Err(e) = self.matcher.consume_token(token) {
            tracing::debug!(token, error = %e, "structured outputs: token refused by the constraint");
        }
    }
}

/// Sets every logit whose bit in `words` (32 tokens a word, bit j of word w
/// for token 32w + j) is clear to -inf; tokens past the mask's end too.
fn apply(words: &[u32], logits: &mut [f32]) {
    let mut chunks = logits.chunks_mut(32);
    for (&w, chunk) in words.iter().zip(&mut chunks) {
        if w == u32::MAX {
            continue;
        }
        if w == 0 {
            chunk.fill(f32::NEG_INFINITY);
            continue;
        }
        for (j, v) in chunk.iter_mut().enumerate() {
            if w >> j & 1 == 0 {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    for chunk in chunks {
        chunk.fill(f32::NEG_INFINITY);
    }
}

#[cfg(test)]
mod tests {
    use super::apply;

    #[test]
    fn the_mask_keeps_exactly_its_set_bits() {
        let mut logits: Vec<f32> = (0..70).map(|i| i as f32).collect();
        // Word 0: tokens 0 and 31; word 1: all; no word 2 (tokens 64..70).
        apply(&[1 | 1 << 31, u32::MAX], &mut logits);
        for (i, &v) in logits.iter().enumerate() {
            let kept = i == 0 || i == 31 || (32..64).contains(&i);
            assert_eq!(v.is_finite(), kept, "token {i}");
            if kept {
                assert_eq!(v, i as f32);
            }
        }
    }
}
