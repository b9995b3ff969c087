//! Draft-free speculation on the real model (Gemma 3 270M,
//! `NANOINFER_TEST_MODEL` or `scripts/fetch-model gemma3-270m`): two engines
//! on one loaded model, one with speculation off and one with it on, given
//! the same requests one at a time. On a prompt that asks for a passage to
//! be copied, the speculating engine proposes and keeps tokens, and its
//! greedy output is the same token for token: alone, under a JSON schema
//! (the constraint advances only over kept tokens), with a stop sequence
//! and with `max_tokens` falling inside a run of proposals, and on prose
//! where proposals are rejected. Sampled with a seed, penalties and
//! log-probabilities, a request keeps proposals too.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nanoinfer_proto::limits::SamplingControls;
use nanoinfer_worker::engine::{
    Engine, EngineConfig, Event, FinishReason, Generation, KvCacheType, SpecConfig,
};
use nanoinfer_worker::metrics::WorkerMetrics;
use nanoinfer_worker::model;

use common::{fetched, generation};

fn test_model() -> PathBuf {
    fetched("NANOINFER_TEST_MODEL", "gemma3-270m")
}

const PASSAGE: &str = "The harbour town of Kessel sits where two rivers meet the sea. Its \
fishermen leave before dawn in narrow boats painted blue and yellow, and they return in the \
early afternoon with herring, mackerel and, in good years, a few cod. The market opens at two \
o'clock. Buyers from the inland towns arrive by the old railway, which runs three times a day \
along the northern river.";

fn copy_prompt() -> String {
    format!("Passage:\n{PASSAGE}\n\nThe same passage, copied word for word:\n")
}

/// What a generation gave: token ids (indices checked to run 0, 1, 2 …),
/// the text, the log-probabilities of each token, and the finish reason.
#[derive(Debug, PartialEq)]
struct Output {
    ids: Vec<i32>,
    text: String,
    logprobs: Vec<Option<f32>>,
    finish: FinishReason,
    generated: u32,
}

async fn run(engine: &Engine, g: Generation) -> Output {
    let mut rx = engine.submit(g).unwrap();
    let (mut ids, mut text, mut logprobs) = (Vec::new(), String::new(), Vec::new());
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token {
                id,
                index,
                text: t,
                logprobs: lp,
            } => {
                assert_eq!(index as usize, ids.len(), "indices run in order");
                ids.push(id);
                text.push_str(&t);
                logprobs.push(lp.map(|l| l.logprob));
            }
            Event::Admitted => {}
            Event::Finished {
                reason,
                text: t,
                generated_tokens,
                ..
            } => {
                text.push_str(&t);
                return Output {
                    ids,
                    text,
                    logprobs,
                    finish: reason,
                    generated: generated_tokens,
                };
            }
            Event::Failed(f) => panic!("generation failed: {f}"),
        }
    }
    panic!("the stream ended without its final event");
}

fn config(spec: SpecConfig) -> EngineConfig {
    EngineConfig {
        ctx_size: 1024,
        parallel: 2,
        step_tokens: 256,
        step_tokens_decoding: 32,
        // No prefix reuse: each request computes its prompt the same way
        // on both engines.
        prefix_cache_tokens: 0,
        prefix_cache_ram_bytes: 0,
        threads: 2,
        queue: 8,
        queue_timeout: Duration::from_secs(60),
        spec,
        draft: None,
        kv_cache_type: KvCacheType::default(),
        failpoint: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_keeps_every_output_token_for_token() {
    let m = model::load(&test_model(), None, None).expect("load the test model");
    let on_metrics = Arc::new(WorkerMetrics::default());
    let off = Engine::start(
        m.backend.clone(),
        m.model.clone(),
        config(SpecConfig::OFF),
        Arc::new(WorkerMetrics::default()),
    )
    .await
    .unwrap();
    let spec = SpecConfig {
        draft_max: 8,
        ngram_min: 2,
        ngram_max: 4,
        step_ratio: None,
    };
    let on = Engine::start(
        m.backend.clone(),
        m.model.clone(),
        config(spec),
        on_metrics.clone(),
    )
    .await
    .unwrap();
    let prompt = copy_prompt();
    let same = |what: &str, a: &Output, b: &Output| {
        assert_eq!(a, b, "{what}: off {:?}\non {:?}", a.text, b.text);
    };

    // Greedy: the model copies, speculation keeps most of what it proposes.
    let want = run(&off, generation(&m, &prompt, 64)).await;
    let got = run(&on, generation(&m, &prompt, 64)).await;
    println!("greedy: {:?}", got.text);
    same("greedy", &want, &got);
    let proposed = on_metrics.spec_proposed_tokens.get();
    let kept = on_metrics.spec_accepted_tokens.get();
    println!("proposed {proposed}, kept {kept}");
    assert!(kept > 16, "proposed {proposed}, kept {kept}");
    assert!(kept <= proposed);

    // Greedy on prose with little to copy: proposals are rejected and
    // their cells removed, and the text is still the same.
    for p in [
        "Once upon a time, in a small village by the sea,",
        "def fibonacci(n):\n",
    ] {
        let want = run(&off, generation(&m, p, 48)).await;
        let got = run(&on, generation(&m, p, 48)).await;
        same(p, &want, &got);
    }
    println!(
        "proposed {}, kept {}",
        on_metrics.spec_proposed_tokens.get(),
        on_metrics.spec_accepted_tokens.get()
    );

    // Sampled with a seed, penalties and log-probabilities on.
    let sampled = |seed| {
        let mut g = generation(&m, &prompt, 48);
        g.temperature = 0.9;
        g.top_p = 0.95;
        g.seed = seed;
        g.controls = SamplingControls {
            top_k: 40,
            repetition_penalty: 1.05,
            logprobs: true,
            top_logprobs: 2,
            ..SamplingControls::default()
        };
        g
    };
    // Sampled: each kept token is drawn from the verify batch's logits
    // with the request's own random stream. ggml's CPU kernels give a row
    // of a many-token batch (and a sequence in other KV cells) slightly
    // different logits than a one-token decode (see docs/operations.md), so
    // the sampled text is not compared; it runs to its end, with its
    // log-probabilities, keeping proposals.
    let kept_before = on_metrics.spec_accepted_tokens.get();
    for seed in [1234, 7] {
        let got = run(&on, sampled(seed)).await;
        assert_eq!(got.generated, 48);
        assert_eq!(got.ids.len(), 48);
        assert!(got.logprobs.iter().all(Option::is_some));
    }
    assert!(
        on_metrics.spec_accepted_tokens.get() > kept_before,
        "kept while sampling"
    );

    // max_tokens inside a run of proposals: exactly that many tokens.
    for max_tokens in [1, 2, 5, 13] {
        let want = run(&off, generation(&m, &prompt, max_tokens)).await;
        let got = run(&on, generation(&m, &prompt, max_tokens)).await;
        same(&format!("max_tokens {max_tokens}"), &want, &got);
        assert_eq!(got.generated, max_tokens);
        assert_eq!(got.finish, FinishReason::Length);
    }

    // A stop sequence inside the copied text ends both at the same place.
    let mut stopped = generation(&m, &prompt, 64);
    stopped.stop = vec!["narrow boats".into()];
    let want = run(&off, stopped.clone()).await;
    let got = run(&on, stopped).await;
    same("stop", &want, &got);
    assert_eq!(got.finish, FinishReason::StopSequence);

    // Under a JSON schema: the constraint sees only kept tokens.
    let schema = r#"{"type": "object", "properties": {"passage": {"type": "string"}},
        "required": ["passage"], "additionalProperties": false}"#;
    let json_prompt = format!("{prompt}As JSON: ");
    let constrained = || {
        let mut g = generation(&m, &json_prompt, 80);
        g.grammar = Some(m.grammars.compile(schema).expect("compile the schema"));
        g
    };
    let before = on_metrics.spec_accepted_tokens.get();
    let want = run(&off, constrained()).await;
    let got = run(&on, constrained()).await;
    same("json schema", &want, &got);
    println!("json: {:?}", got.text);
    assert!(
        on_metrics.spec_accepted_tokens.get() > before,
        "kept under the schema"
    );
    if got.finish == FinishReason::Eos {
        let v: serde_json::Value = serde_json::from_str(&got.text).expect("valid JSON");
        assert!(v["passage"].is_string());
    }

    // Two at once on the speculating engine: both run to their end with
    // their tokens in order (batch invariance across sequences is not
    // promised, so the texts are not compared with a lone run).
    let (a, b) = tokio::join!(
        run(&on, generation(&m, &prompt, 32)),
        run(&on, generation(&m, "Once upon a time", 32)),
    );
    assert_eq!((a.generated, a.ids.len()), (32, 32));
    assert_eq!(b.generated as usize, b.ids.len());
}
