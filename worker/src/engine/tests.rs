//! The engine on the real test model (`NANOINFER_TEST_MODEL`, else
//! `scripts/fetch-model gemma3-270m`): sampling controls and
//! log-probabilities reach the events, and penalties count the prompt and
//! resumed tokens. One test: llama.cpp's backend is initialised once per
//! process.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::model::{self, Model};

fn test_model() -> PathBuf {
    if let Ok(p) = std::env::var("NANOINFER_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(root.join("scripts/fetch-model"))
        .arg("gemma3-270m")
        .output()
        .expect("run scripts/fetch-model");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(stdout.lines().last().unwrap().trim())
}

fn generation(
    m: &Model,
    prompt: &str,
    temperature: f32,
    controls: SamplingControls,
    resume: &[i32],
) -> Generation {
    Generation {
        request_id: "t".into(),
        prompt: m.tokenize(prompt),
        resume: resume.iter().map(|&id| LlamaToken(id)).collect(),
        max_tokens: 12,
        temperature,
        top_p: 0.95,
        seed: 7,
        controls,
        logit_bias: Vec::new(),
        grammar: None,
        stop: Vec::new(),
        deadline: None,
        span: tracing::Span::none(),
    }
}

/// The token events of a generation, as (id, index, logprobs).
async fn tokens(engine: &Engine, g: Generation) -> Vec<(i32, u32, Option<TokenLogprobs>)> {
    let mut rx = engine.submit(g).unwrap();
    let mut out = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token {
                id,
                index,
                logprobs,
                ..
            } => out.push((id, index, logprobs)),
            Event::Admitted => assert!(out.is_empty(), "admitted after a token"),
            Event::Finished { .. } => return out,
            Event::Failed(f) => panic!("generation failed: {f}"),
        }
    }
    panic!("the stream ended without its final event");
}

#[tokio::test]
async fn controls_and_logprobs_reach_the_events() {
    let m = model::load(&test_model(), None, None).expect("load the test model");
    let config = EngineConfig {
        ctx_size: 512,
        parallel: 2,
        step_tokens: 256,
        step_tokens_decoding: 32,
        prefix_cache_tokens: 0,
        prefix_cache_ram_bytes: 0,
        threads: 2,
        queue: 8,
        queue_timeout: Duration::from_secs(60),
        spec: SpecConfig::OFF,
        draft: None,
        kv_cache_type: KvCacheType::default(),
        failpoint: None,
    };
    let metrics = Arc::new(WorkerMetrics::default());
    let engine = Engine::start(m.backend.clone(), m.model.clone(), config, metrics)
        .await
        .unwrap();
    let off = SamplingControls::default();
    let prompt = "one two one two one two one two";

    // Greedy with five alternatives: each token is its position's most
    // likely, with that alternative's log-probability.
    let logprobs = SamplingControls {
        logprobs: true,
        top_logprobs: 5,
        ..off
    };
    let greedy = tokens(&engine, generation(&m, prompt, 0.0, logprobs, &[])).await;
    assert!(!greedy.is_empty());
    for (id, _, lp) in &greedy {
        let lp = lp.as_ref().expect("asked for logprobs");
        assert_eq!(lp.top.len(), 5);
        assert_eq!(lp.top[0].id, *id);
        assert!((lp.top[0].logprob - lp.logprob).abs() < 1e-6, "{lp:?}");
        assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        assert!(lp.top.iter().all(|a| a.logprob <= 0.0));
        let piece = m.model.vocab().token_to_piece(LlamaToken(*id), true, None);
        assert_eq!(lp.top[0].text, String::from_utf8_lossy(&piece));
    }
    // The same without: none.
    let plain = tokens(&engine, generation(&m, prompt, 0.0, off, &[])).await;
    assert_eq!(
        plain.iter().map(|t| t.0).collect::<Vec<_>>(),
        greedy.iter().map(|t| t.0).collect::<Vec<_>>()
    );
    assert!(plain.iter().all(|t| t.2.is_none()));

    // Heavy penalties: no generated token twice, none of the prompt's and
    // none of the resumed ones either (they count as generated).
    let penalties = SamplingControls {
        repetition_penalty: 10.0,
        presence_penalty: 2.0,
        frequency_penalty: 2.0,
        ..off
    };
    let prompt_ids: Vec<i32> = m.tokenize(prompt).iter().map(|t| t.0).collect();
    let first = tokens(&engine, generation(&m, prompt, 0.0, penalties, &[])).await;
    let ids: Vec<i32> = first.iter().map(|t| t.0).collect();
    println!(
        "greedy {:?}\npenalised {ids:?}",
        plain.iter().map(|t| t.0).collect::<Vec<_>>()
    );
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    assert!(ids.iter().all(|id| !prompt_ids.contains(id)), "{ids:?}");
    let resumed = &ids[..4];
    let rest = tokens(&engine, generation(&m, prompt, 0.0, penalties, resumed)).await;
    assert_eq!(rest.first().map(|t| t.1), Some(4), "indices go on");
    assert!(
        rest.iter()
            .all(|t| !resumed.contains(&t.0) && !prompt_ids.contains(&t.0)),
        "{rest:?}"
    );

    // Sampled with every control on: it runs, with three alternatives each.
    let all = SamplingControls {
        top_k: 40,
        min_p: 0.05,
        repetition_penalty: 1.1,
        presence_penalty: 0.5,
        frequency_penalty: 0.5,
        logprobs: true,
        top_logprobs: 3,
    };
    let sampled = tokens(&engine, generation(&m, prompt, 0.9, all, &[])).await;
    assert!(!sampled.is_empty());
    for (id, _, lp) in &sampled {
        let lp = lp.as_ref().unwrap();
        assert_eq!(lp.top.len(), 3);
        // A pick among the 40 most likely has at most the top one's.
        assert!(lp.logprob <= lp.top[0].logprob + 1e-6, "{id}: {lp:?}");
    }
}
