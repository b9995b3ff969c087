//! Cost of a structured-output constraint per generated token, on a real
//! model: the worker's sampler with a JSON Schema (llguidance's mask, then
//! the usual passes) against the same sampler unconstrained on the same
//! logits, and llama.cpp's own grammar sampler (the same schema written as
//! GBNF) applied to the whole vocabulary, as llama.cpp's server does when a
//! request carries a grammar.
//!
//! Each side runs its own real generations (the model computes the logits
//! of what was picked), so every timing is on logits a constrained
//! generation meets.
//!
//! cargo run --release -p nanoinfer-worker --example grammar_bench -- MODEL [THREADS] [GENERATIONS]

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use nanoinfer_worker::grammar::Grammars;
use nanoinfer_worker::sampler::Sampler;

/// The schema of tests/structured_client.py's judge: nesting, an enum, an
/// array with maxItems, strings with maxLength.
const SCHEMA: &str = r#"{"type": "object", "properties": {
  "destination": {"type": "object", "properties": {
      "city": {"type": "string", "maxLength": 40},
      "country": {"type": "string", "maxLength": 40}},
    "required": ["city", "country"], "additionalProperties": false},
  "season": {"enum": ["spring", "summer", "autumn", "winter"]},
  "activities": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3},
  "nights": {"type": "integer"}},
  "required": ["destination", "season", "activities", "nights"],
  "additionalProperties": false}"#;

/// The same language in llama.cpp's GBNF (the compact layout the worker
/// imposes: one space after ':' and ',').
const GBNF: &str = r##"root ::= "{\"destination\": " place ", \"season\": " season ", \"activities\": " acts ", \"nights\": " int "}"
place ::= "{\"city\": " name ", \"country\": " name "}"
season ::= "\"spring\"" | "\"summer\"" | "\"autumn\"" | "\"winter\""
acts ::= "[]" | "[" name (", " name)? (", " name)? "]"
name ::= "\"" char{0,40} "\""
char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
int ::= "-"? ([0-9] | [1-9] [0-9]{0,15})
"##;

const PROMPT: &[u8] = b"Plan a short holiday trip. The plan as JSON: ";
const MAX_TOKENS: usize = 200;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model_path = args
        .first()
        .cloned()
        .expect("usage: grammar_bench MODEL [THREADS] [GENERATIONS]");
    let threads: i32 = args
        .get(1)
        .map_or(2, |s| s.parse().expect("numeric THREADS"));
    let generations: u64 = args
        .get(2)
        .map_or(5, |s| s.parse().expect("numeric GENERATIONS"));
    let mut backend = LlamaBackend::init().unwrap();
    backend.void_logs();
    let model = Arc::new(
        LlamaModel::load_from_file(&backend, &model_path, &LlamaModelParams::default()).unwrap(),
    );
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(512))
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(&backend, params).unwrap();
    let n_vocab = model.n_vocab();
    println!("vocabulary {n_vocab} tokens; {generations} generations of each kind, at most {MAX_TOKENS} tokens");

    // The worker's constraint: the first compile builds the token trie.
    let grammars = Grammars::new(model.clone());
    let t = Instant::now();
    grammars.compile(SCHEMA).expect("the schema compiles");
    let first = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    grammars.compile(SCHEMA).expect("the schema compiles");
    println!(
        "nanoinfer (llguidance): first compile {first:.0} ms (token trie), then {:.2} ms a schema",
        t.elapsed().as_secs_f64() * 1e3
    );

    let mut constrained = Vec::new();
    let mut free = Vec::new();
    let mut valid = 0;
    for seed in 0..generations {
        let mut s =
            Sampler::new(0.8, 0.95, seed).with_grammar(Some(grammars.compile(SCHEMA).unwrap()));
        let mut plain = Sampler::new(0.8, 0.95, seed);
        let text = generate(&model, &mut ctx, |logits| {
            let t = Instant::now();
            let token = s.pick(logits).token;
            constrained.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            std::hint::black_box(plain.pick(logits));
            free.push(t.elapsed().as_secs_f64() * 1e6);
            token
        });
        if serde_json::from_str::<serde_json::Value>(&text).is_ok() {
            valid += 1;
        }
        if std::env::var_os("GRAMMAR_BENCH_SHOW").is_some() {
            println!("  {text}");
        }
    }
    println!(
        "  {} tokens, {valid}/{generations} generations parse as JSON",
        constrained.len()
    );
    report(
        "  constrained pick (mask + t=0.8 top-p 0.95)",
        &mut constrained,
    );
    report("  same sampler unconstrained, same logits", &mut free);

    // llama.cpp's grammar sampler over every token, then the most likely
    // token it leaves.
    let mut applied = Vec::new();
    let mut valid = 0;
    for _ in 0..generations {
        let mut g = LlamaSampler::grammar(&model, GBNF, "root").expect("the GBNF parses");
        let text = generate(&model, &mut ctx, |logits| {
            let mut data = LlamaTokenDataArray::from_iter(
                logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
                false,
            );
            let t = Instant::now();
            g.apply(&mut data);
            applied.push(t.elapsed().as_secs_f64() * 1e6);
            let best = data
                .data
                .iter()
                .filter(|d| d.logit().is_finite())
                .max_by(|a, b| a.logit().total_cmp(&b.logit()))
                .expect("the grammar leaves a token");
            g.accept(best.id());
            best.id().0 as u32
        });
        if serde_json::from_str::<serde_json::Value>(&text).is_ok() {
            valid += 1;
        }
    }
    println!(
        "llama.cpp grammar sampler: {} tokens, {valid}/{generations} generations parse as JSON",
        applied.len()
    );
    report("  apply over the vocabulary", &mut applied);
}

/// One generation from [`PROMPT`]: `pick` chooses each token from the
/// logits the model computed; ends at end-of-generation or
/// [`MAX_TOKENS`]. Returns the text.
fn generate(
    model: &LlamaModel,
    ctx: &mut LlamaContext,
    mut pick: impl FnMut(&[f32]) -> u32,
) -> String {
    ctx.clear_kv_cache();
    let prompt = model.vocab().tokenize(PROMPT, true, false);
    let mut batch = LlamaBatch::new(512, 1);
    for (i, t) in prompt.iter().enumerate() {
        batch
            .add(*t, i as i32, &[0], i + 1 == prompt.len())
            .unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    let mut last = batch.n_tokens() - 1;
    let mut text = Vec::new();
    for pos in prompt.len()..prompt.len() + MAX_TOKENS {
        let token = LlamaToken(pick(ctx.get_logits_ith(last)) as i32);
        if model.vocab().is_eog(token) {
            break;
        }
        text.extend(model.vocab().token_to_piece(token, false, None));
        batch.clear();
        batch.add(token, pos as i32, &[0], true).unwrap();
        last = 0;
        ctx.decode(&mut batch).unwrap();
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Prints mean, p50, p99 and max of `us` (microseconds).
fn report(what: &str, us: &mut [f64]) {
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize];
    println!(
        "{what:<48} mean {:>8.1} µs, p50 {:>8.1}, p99 {:>8.1}, max {:>8.1}",
        us.iter().sum::<f64>() / us.len() as f64,
        at(0.5),
        at(0.99),
        at(1.0)
    );
}
