//! Cost of one sampling decision on a real model's logits: the worker's
//! sampler (greedy, and temperature 0.8 + top-p 0.95) timed over many draws
//! on the logits the model computes for a short prompt, plus how long the
//! same work takes for 8 sequences one after another and split over
//! threads, as the engine does in a step; then the cost of each sampling
//! control (top-k, min-p, penalties over a 64-token history,
//! log-probabilities) on the same logits.
//!
//! cargo run --release -p nanoinfer-worker --example sampler_bench -- MODEL [THREADS] [--controls-only]

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use nanoinfer_proto::limits::SamplingControls;
use nanoinfer_worker::sampler::{self as nucleus, sample_all, Pick, Sampler};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let controls_only = args.iter().any(|a| a == "--controls-only");
    args.retain(|a| a != "--controls-only");
    let model_path = args
        .first()
        .cloned()
        .expect("usage: sampler_bench MODEL [THREADS] [--controls-only]");
    let threads: usize = args
        .get(1)
        .map_or(2, |s| s.parse().expect("numeric THREADS"));
    let mut backend = LlamaBackend::init().unwrap();
    backend.void_logs();
    let model =
        LlamaModel::load_from_file(&backend, &model_path, &LlamaModelParams::default()).unwrap();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(512))
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32);
    let mut ctx = model.new_context(&backend, params).unwrap();
    let prompt = model
        .vocab()
        .tokenize(b"The capital of France is a city where", true, false);
    let mut batch = LlamaBatch::new(512, 1);
    for (i, t) in prompt.iter().enumerate() {
        batch
            .add(*t, i as i32, &[0], i + 1 == prompt.len())
            .unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    let logits = ctx.get_logits_ith(batch.n_tokens() - 1).to_vec();
    let mut nucleus = Vec::new();
    nucleus::nucleus(&logits, 0.8, 0.95, &mut nucleus);
    println!(
        "vocabulary {} tokens; nucleus at t=0.8 top_p=0.95: {} tokens",
        logits.len(),
        nucleus.len()
    );

    // A real generation: 200 tokens sampled at t=0.8 / top-p 0.95, each
    // sampling decision timed on the logits the model just computed.
    let mut s = Sampler::new(0.8, 0.95, 3);
    let mut times = Vec::new();
    let mut sizes = Vec::new();
    let mut generated = Vec::new();
    let mut last = batch.n_tokens() - 1;
    for pos in prompt.len() as i32..prompt.len() as i32 + 200 {
        let logits = ctx.get_logits_ith(last);
        let t = Instant::now();
        let token = s.sample(logits);
        generated.push(token);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        nucleus::nucleus(logits, 0.8, 0.95, &mut nucleus);
        sizes.push(nucleus.len());
        batch.clear();
        batch
            .add(
                llama_cpp_2::token::LlamaToken(token as i32),
                pos,
                &[0],
                true,
            )
            .unwrap();
        last = 0;
        ctx.decode(&mut batch).unwrap();
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    sizes.sort_unstable();
    println!(
        "200 generated tokens, t=0.8 top_p=0.95: mean {:.3} ms, p50 {:.3}, p99 {:.3}, max {:.3} ms; nucleus p50 {} p99 {} max {} tokens",
        times.iter().sum::<f64>() / times.len() as f64,
        sorted[100],
        sorted[197],
        sorted[199],
        sizes[100],
        sizes[197],
        sizes[199]
    );

    let history: Vec<u32> = generated[..64].to_vec();
    let prompt_ids: Vec<u32> = prompt.iter().map(|t| t.0 as u32).collect();
    controls_table(&logits, &prompt_ids, &history);
    if controls_only {
        return;
    }

    let n = 400;
    let t = Instant::now();
    let m = nucleus::max_logit(&logits);
    for _ in 0..n {
        std::hint::black_box(nucleus::max_logit(std::hint::black_box(&logits)));
    }
    println!(
        "max {:.3} ms",
        t.elapsed().as_secs_f64() / f64::from(n) * 1e3
    );
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(nucleus::weight_sum(std::hint::black_box(&logits), m, 1.25));
    }
    println!(
        "sum {:.3} ms",
        t.elapsed().as_secs_f64() / f64::from(n) * 1e3
    );
    for (name, temperature) in [("greedy", 0.0f32), ("t=0.8 top_p=0.95", 0.8)] {
        let mut s = Sampler::new(temperature, 0.95, 1);
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(s.sample(&logits));
        }
        let one = t.elapsed().as_secs_f64() / f64::from(n) * 1e3;
        // Eight sequences of one step: serial, then over `threads`.
        let mut samplers: Vec<Sampler> =
            (0..8).map(|k| Sampler::new(temperature, 0.95, k)).collect();
        let steps = 50;
        let mut time_step = |threads: usize| {
            let t = Instant::now();
            for _ in 0..steps {
                let mut work: Vec<(&mut Sampler, &[f32], Pick)> = samplers
                    .iter_mut()
                    .map(|s| (s, logits.as_slice(), Pick::default()))
                    .collect();
                sample_all(&mut work, threads);
                std::hint::black_box(&work);
            }
            t.elapsed().as_secs_f64() / f64::from(steps) * 1e3
        };
        let serial = time_step(1);
        let parallel = time_step(threads);
        println!(
            "{name}: {one:.3} ms a token; 8 sequences a step: {serial:.2} ms serial, {parallel:.2} ms on {threads} threads"
        );
    }
}

/// Microseconds per sampling decision on `logits` for each set of controls,
/// the penalties over `history` (64 generated tokens, after `prompt`). Each
/// decision starts from a fresh copy of a prepared sampler (copied outside
/// the timing), so the history stays the same size throughout.
fn controls_table(logits: &[f32], prompt: &[u32], history: &[u32]) {
    let off = SamplingControls::default();
    let logprobs = |top_logprobs| SamplingControls {
        logprobs: true,
        top_logprobs,
        ..off
    };
    let all = SamplingControls {
        top_k: 40,
        min_p: 0.05,
        repetition_penalty: 1.1,
        presence_penalty: 0.5,
        frequency_penalty: 0.5,
        logprobs: true,
        top_logprobs: 20,
    };
    let rows: [(&str, f32, SamplingControls); 11] = [
        ("t=0.8 top_p=0.95 (default)", 0.8, off),
        ("+ top_k 40", 0.8, SamplingControls { top_k: 40, ..off }),
        ("+ min_p 0.05", 0.8, SamplingControls { min_p: 0.05, ..off }),
        (
            "+ repetition_penalty 1.1",
            0.8,
            SamplingControls {
                repetition_penalty: 1.1,
                ..off
            },
        ),
        (
            "+ presence 0.5, frequency 0.5",
            0.8,
            SamplingControls {
                presence_penalty: 0.5,
                frequency_penalty: 0.5,
                ..off
            },
        ),
        ("+ logprobs, top_logprobs 5", 0.8, logprobs(5)),
        ("+ logprobs, top_logprobs 20", 0.8, logprobs(20)),
        (
            "all on (k 40, min_p .05, rep 1.1, p/f .5, top 20)",
            0.8,
            all,
        ),
        ("greedy", 0.0, off),
        (
            "greedy + repetition_penalty 1.1",
            0.0,
            SamplingControls {
                repetition_penalty: 1.1,
                ..off
            },
        ),
        ("greedy + logprobs, top_logprobs 5", 0.0, logprobs(5)),
    ];
    println!(
        "controls on {} logits; penalties over a {}-token prompt + {} generated tokens",
        logits.len(),
        prompt.len(),
        history.len()
    );
    println!("{:<52} {:>10} {:>12}", "controls", "µs/sample", "samples/s");
    let n = 1000;
    for (name, temperature, controls) in rows {
        let prepared: Vec<Sampler> = (0..16)
            .map(|seed| {
                let mut s = Sampler::new(temperature, 0.95, seed).with_controls(controls);
                s.prompt(prompt.iter().copied());
                s.resume(history);
                s
            })
            .collect();
        let mut total = 0.0;
        for i in 0..n {
            let mut s = prepared[i % prepared.len()].clone();
            let t = Instant::now();
            std::hint::black_box(s.pick(std::hint::black_box(logits)));
            total += t.elapsed().as_secs_f64();
        }
        let us = total / n as f64 * 1e6;
        println!("{name:<52} {us:>10.1} {:>12.0}", 1e6 / us);
    }
}
