//! How often a seeded request's text depends on what the KV cache holds: a
//! figure for docs/benchmarks.md ("Same seed, same text"), not a test.
//!
//! Each of a set of prompts is first run alone on a fresh engine (its cold
//! text). Then one engine (4 slots, prefix cache on) serves a fixed mixed
//! sequence of the same prompts one at a time — repeats, prompts sharing a
//! long prefix, prompts sharing nothing — and each answer is compared with
//! its cold text, token ids and log-probabilities. With CONCURRENT=4 the
//! sequence runs four at a time instead (requests beside other streams).
//! `KV_CACHE_TYPE=f16` gives the engine llama.cpp's default KV cache.
//!
//! cargo run --release -p nanoinfer-worker --example seed_check -- MODEL [ROUNDS]

use std::sync::Arc;
use std::time::Duration;

use nanoinfer_proto::limits::SamplingControls;
use nanoinfer_worker::engine::{Engine, EngineConfig, Event, Generation, KvCacheType, SpecConfig};
use nanoinfer_worker::metrics::WorkerMetrics;
use nanoinfer_worker::model::{self, Model};

const PASSAGE: &str = "The harbour town of Kessel sits where two rivers meet the sea. Its \
fishermen leave before dawn in narrow boats painted blue and yellow, and they return in the \
early afternoon with herring, mackerel and, in good years, a few cod. The market opens at two \
o'clock. Buyers from the inland towns arrive by the old railway, which runs three times a day \
along the northern river.";

fn prompts() -> Vec<String> {
    let mut p = vec![
        "Tell me a short story.\n\n".to_string(),
        "Write a haiku about rain.\n\n".to_string(),
        "Write a haiku about rain in the city.\n\n".to_string(),
        "List three colours:".to_string(),
        format!("{PASSAGE}\n\nThe passage in one sentence:"),
    ];
    for q in [
        "Who arrives by railway?",
        "When does the market open?",
        "What colour are the boats?",
        "What fish do they catch?",
    ] {
        p.push(format!(
            "Answer questions about this passage.\n\n{PASSAGE}\n\nQ: {q}\nA:"
        ));
    }
    p
}

async fn engine(m: &Model) -> Engine {
    let config = EngineConfig {
        ctx_size: 2048,
        parallel: 4,
        step_tokens: 128,
        step_tokens_decoding: 32,
        prefix_cache_tokens: 2048,
        prefix_cache_ram_bytes: 1 << 30,
        threads: 2,
        queue: 64,
        queue_timeout: Duration::from_secs(600),
        spec: SpecConfig::OFF,
        draft: None,
        kv_cache_type: std::env::var("KV_CACHE_TYPE").map_or(KvCacheType::default(), |t| {
            clap::ValueEnum::from_str(&t, false).expect("KV_CACHE_TYPE: q8_0 or f16")
        }),
        failpoint: None,
    };
    Engine::start(
        m.backend.clone(),
        m.model.clone(),
        config,
        Arc::new(WorkerMetrics::default()),
    )
    .await
    .unwrap()
}

async fn run(e: &Engine, m: &Model, prompt: &str) -> (Vec<i32>, Vec<u32>, u32) {
    let g = Generation {
        request_id: "seed-check".into(),
        prompt: m.tokenize(prompt),
        resume: Vec::new(),
        max_tokens: 24,
        temperature: 0.9,
        top_p: 1.0,
        seed: 1234,
        controls: SamplingControls {
            logprobs: true,
            ..SamplingControls::default()
        },
        logit_bias: Vec::new(),
        grammar: None,
        stop: Vec::new(),
        deadline: None,
        span: tracing::Span::none(),
    };
    let mut rx = e.submit(g).unwrap();
    let (mut ids, mut lps) = (Vec::new(), Vec::new());
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token { id, logprobs, .. } => {
                ids.push(id);
                lps.push(logprobs.map_or(0, |l| l.logprob.to_bits()));
            }
            Event::Finished { cached_tokens, .. } => return (ids, lps, cached_tokens),
            Event::Failed(f) => panic!("{f}"),
            Event::Admitted => {}
        }
    }
    panic!("no final event")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: seed_check MODEL [ROUNDS]");
    let rounds: usize = std::env::args()
        .nth(2)
        .map_or(4, |r| r.parse().expect("ROUNDS"));
    let concurrent: usize = std::env::var("CONCURRENT")
        .ok()
        .map_or(1, |c| c.parse().expect("CONCURRENT"));
    let m = model::load(std::path::Path::new(&path), None, None).unwrap();
    let prompts = prompts();
    let mut cold = Vec::new();
    for p in &prompts {
        let e = engine(&m).await;
        cold.push(run(&e, &m, p).await);
    }
    // A fixed shuffle (a linear congruential walk over the prompts).
    let mut order = Vec::new();
    let mut x: u64 = 7;
    for _ in 0..rounds * prompts.len() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.push((x >> 33) as usize % prompts.len());
    }
    let e = engine(&m).await;
    let (mut same, mut same_text, mut with_cache, mut with_cache_same) = (0, 0, 0, 0);
    for batch in order.chunks(concurrent) {
        let runs = batch.iter().map(|&i| run(&e, &m, &prompts[i]));
        let outs = futures::future::join_all(runs).await;
        for (&i, (ids, lps, cached)) in batch.iter().zip(outs) {
            let exact = ids == cold[i].0 && lps == cold[i].1;
            same += usize::from(exact);
            same_text += usize::from(ids == cold[i].0);
            if cached > 0 {
                with_cache += 1;
                with_cache_same += usize::from(exact);
            }
        }
    }
    println!(
        "{} requests, {concurrent} at a time: {same} exactly as cold ({same_text} the same text); \
         {with_cache} reused a cached prefix, {with_cache_same} of them exactly as cold",
        order.len()
    );
}
