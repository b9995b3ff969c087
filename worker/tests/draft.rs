//! A draft model (`--draft-model`) on the real models: SmolLM2-135M
//! (`NANOINFER_TEST_CHAT_MODEL` or `scripts/fetch-model
//! smollm2-135m-instruct`) drafting for itself. Prose with nothing to copy
//! gets its proposals from the draft; greedy output is the same token for
//! token as without speculation one request at a time, and two together
//! up to a near tie that ggml's batch-shape rounding may flip; most
//! proposals are kept (the draft is the model). A draft with
//! another vocabulary (Gemma 3 270M's) is refused at load, naming the flag.

mod common;

use std::sync::Arc;
use std::time::Duration;

use nanoinfer_proto::limits::SamplingControls;
use nanoinfer_worker::engine::{
    DraftModel, Engine, EngineConfig, Event, Generation, KvCacheType, SpecConfig,
};
use nanoinfer_worker::metrics::WorkerMetrics;
use nanoinfer_worker::model::{self, Model};

use common::{fetched, generation};

fn config(spec: SpecConfig, draft: Option<DraftModel>) -> EngineConfig {
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
        draft,
        kv_cache_type: KvCacheType::default(),
        failpoint: None,
    }
}

/// Greedy token ids, and at each position how far the most likely token
/// led the second (nats).
async fn ids(engine: &Engine, g: Generation) -> (Vec<i32>, Vec<f32>) {
    let g = Generation {
        controls: SamplingControls {
            logprobs: true,
            top_logprobs: 2,
            ..SamplingControls::default()
        },
        ..g
    };
    let mut rx = engine.submit(g).unwrap();
    let (mut ids, mut leads) = (Vec::new(), Vec::new());
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token { id, logprobs, .. } => {
                ids.push(id);
                let top = logprobs.expect("logprobs asked for").top;
                leads.push(top[0].logprob - top[1].logprob);
            }
            Event::Admitted => {}
            Event::Finished { .. } => return (ids, leads),
            Event::Failed(f) => panic!("generation failed: {f}"),
        }
    }
    panic!("the stream ended without its final event");
}

/// Beside another stream the batch's shape changes ggml's rounding (logits
/// measured up to 1.4 nats apart, docs/operations.md "Same seed, same
/// text"), so two runs may part where the top two tokens were that close;
/// before that they must agree.
fn same_up_to_a_near_tie(want: &(Vec<i32>, Vec<f32>), got: &(Vec<i32>, Vec<f32>)) {
    if let Some(at) = want.0.iter().zip(&got.0).position(|(a, b)| a != b) {
        let lead = want.1[at];
        println!("parted at token {at}, where the top two were {lead} nats apart");
        assert!(
            lead < 1.5,
            "parted at token {at}, not a near tie ({lead} nats): {want:?} {got:?}"
        );
    } else {
        assert_eq!(want.0, got.0);
    }
}

const PROMPTS: [&str; 4] = [
    "Write a short poem about the first morning of autumn.\n\n",
    "Explain in two sentences why the sky is blue.\n\n",
    "List three uses for a paper clip, one per line.\n\n",
    "Tell me about the history of the bicycle.\n\n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_drafting_for_itself_keeps_the_output_token_for_token() {
    let path = fetched("NANOINFER_TEST_CHAT_MODEL", "smollm2-135m-instruct");
    let m: Model = model::load(&path, None, None).expect("load the test model");

    // Another vocabulary is refused, naming the flag.
    let gemma = fetched("NANOINFER_TEST_MODEL", "gemma3-270m");
    let err = model::load_draft(&m.backend, &gemma, &m.model).unwrap_err();
    assert!(
        err.contains("--draft-model") && err.contains("vocabulary"),
        "{err}"
    );

    let draft = model::load_draft(&m.backend, &path, &m.model).expect("the same vocabulary");
    let draft = DraftModel(Arc::new(draft));
    let start = |config: EngineConfig, metrics: Arc<WorkerMetrics>| {
        Engine::start(m.backend.clone(), m.model.clone(), config, metrics)
    };
    let plain = start(
        config(SpecConfig::OFF, None),
        Arc::new(WorkerMetrics::default()),
    )
    .await
    .unwrap();
    let spec = SpecConfig {
        draft_max: 4,
        ngram_min: 2,
        ngram_max: 4,
        step_ratio: None,
    };
    let metrics = Arc::new(WorkerMetrics::default());
    let drafted = start(config(spec, Some(draft)), metrics.clone())
        .await
        .unwrap();

    // One at a time.
    for prompt in PROMPTS {
        let want = ids(&plain, generation(&m, prompt, 48)).await;
        let got = ids(&drafted, generation(&m, prompt, 48)).await;
        assert_eq!(want.0, got.0, "{prompt:?}");
    }
    // Two together on both engines (the draft batches both sequences).
    let want = tokio::join!(
        ids(&plain, generation(&m, PROMPTS[0], 48)),
        ids(&plain, generation(&m, PROMPTS[1], 48)),
    );
    let got = tokio::join!(
        ids(&drafted, generation(&m, PROMPTS[0], 48)),
        ids(&drafted, generation(&m, PROMPTS[1], 48)),
    );
    same_up_to_a_near_tie(&want.0, &got.0);
    same_up_to_a_near_tie(&want.1, &got.1);

    let proposed = metrics.spec_proposed_tokens.get();
    let kept = metrics.spec_accepted_tokens.get();
    println!("proposed {proposed}, kept {kept}");
    assert!(proposed >= 100, "the draft proposed: {proposed}");
    assert!(
        kept * 10 >= proposed * 8,
        "a model drafting for itself is mostly right: {kept} of {proposed}"
    );
}
