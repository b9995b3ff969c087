//! Baseline for the worker's figures: llama.cpp's own prompt and decode rate
//! for a model, measured straight through the C API of the very build the
//! worker links — no sampler, no channels, no gRPC. It mirrors what
//! `llama-bench` measures (pp: one batch of prompt tokens; tg: tokens
//! decoded one at a time), since the vendored llama.cpp in llama-cpp-sys-2
//! does not ship llama-bench's sources.
//!
//! With PARALLEL > 1 it also measures what `llama-batched-bench` reports as
//! S_TG: PARALLEL sequences in one unified KV cache, each given a PP-token
//! prompt, then TG steps that decode one token of every sequence in one
//! batch; total decode tok/s = PARALLEL × TG / decode time.
//!
//! With `KV_CACHE_TYPE=q8_0` the KV cache is 8-bit, as the worker's is by
//! default; with `GGML_CPU_TILED_MM=0` ggml's tiled K-quant kernel is off,
//! as the worker turns it off (both for the seed promise,
//! docs/operations.md).
//!
//! With `VERIFY_ROWS=1,2,9,49` it also times a step as speculation
//! verifies proposals: after a PP-token prompt, one batch of that many
//! positions of one sequence, logits at every position (the cost that
//! `--spec-step-ratio` models), then removes them again.
//!
//! cargo run --release -p nanoinfer-worker --example raw_decode -- MODEL [THREADS] [PP] [TG] [REPS] [PARALLEL]

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .map(|s| s.parse().expect("numeric argument"))
        .unwrap_or(default)
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
    (m, v.sqrt())
}

fn main() {
    let model_path = std::env::args()
        .nth(1)
        .expect("usage: raw_decode MODEL [THREADS] [PP] [TG] [REPS] [PARALLEL]");
    let threads = arg(2, 2) as i32;
    let pp = arg(3, 32);
    let tg = arg(4, 128);
    let reps = arg(5, 5);
    let parallel = arg(6, 1).max(1);
    let mut backend = LlamaBackend::init().unwrap();
    backend.void_logs();
    let model =
        LlamaModel::load_from_file(&backend, &model_path, &LlamaModelParams::default()).unwrap();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new((2048 * parallel) as u32))
        .with_n_batch(512)
        .with_n_ubatch(512)
        .with_n_seq_max(parallel as u32)
        .with_kv_unified(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    // KV_CACHE_TYPE=q8_0 stores the cache as the worker does by default
    // (f16 otherwise, llama.cpp's default).
    let params = match std::env::var("KV_CACHE_TYPE").as_deref() {
        Ok("q8_0") => params
            .with_type_k(llama_cpp_2::context::params::KvCacheType::Q8_0)
            .with_type_v(llama_cpp_2::context::params::KvCacheType::Q8_0),
        Ok("bf16") => params
            .with_type_k(llama_cpp_2::context::params::KvCacheType::BF16)
            .with_type_v(llama_cpp_2::context::params::KvCacheType::BF16),
        _ => params,
    };
    let mut ctx = model.new_context(&backend, params).unwrap();
    let token = model.vocab().bos();
    let mut batch = LlamaBatch::new(512, 1);
    let (mut pp_rates, mut tg_rates, mut batched_rates) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..=reps {
        // pp: one batch of `pp` prompt tokens.
        ctx.clear_kv_cache();
        batch.clear();
        for i in 0..pp {
            batch.add(token, i as i32, &[0], i == pp - 1).unwrap();
        }
        let t = Instant::now();
        ctx.decode(&mut batch).unwrap();
        let pp_rate = pp as f64 / t.elapsed().as_secs_f64();
        // tg: `tg` tokens decoded one at a time.
        ctx.clear_kv_cache();
        let t = Instant::now();
        for i in 0..tg {
            batch.clear();
            batch.add(token, i as i32, &[0], true).unwrap();
            ctx.decode(&mut batch).unwrap();
        }
        let tg_rate = tg as f64 / t.elapsed().as_secs_f64();
        // Batched tg: every sequence gets its prompt, then decodes together.
        let batched_rate = (parallel > 1).then(|| {
            ctx.clear_kv_cache();
            for seq in 0..parallel {
                batch.clear();
                for i in 0..pp {
                    batch
                        .add(token, i as i32, &[seq as i32], i == pp - 1)
                        .unwrap();
                }
                ctx.decode(&mut batch).unwrap();
            }
            let t = Instant::now();
            for i in 0..tg {
                batch.clear();
                for seq in 0..parallel {
                    batch
                        .add(token, (pp + i) as i32, &[seq as i32], true)
                        .unwrap();
                }
                ctx.decode(&mut batch).unwrap();
            }
            (parallel * tg) as f64 / t.elapsed().as_secs_f64()
        });
        if rep > 0 {
            // rep 0 warms up.
            pp_rates.push(pp_rate);
            tg_rates.push(tg_rate);
            batched_rates.extend(batched_rate);
        }
    }
    let verify_rows: Vec<usize> = std::env::var("VERIFY_ROWS")
        .map(|v| {
            v.split(',')
                .map(|x| x.trim().parse().expect("VERIFY_ROWS: numbers"))
                .collect()
        })
        .unwrap_or_default();
    if !verify_rows.is_empty() {
        ctx.clear_kv_cache();
        batch.clear();
        for i in 0..pp {
            batch.add(token, i as i32, &[0], i == pp - 1).unwrap();
        }
        ctx.decode(&mut batch).unwrap();
        for &rows in &verify_rows {
            let mut times = Vec::new();
            for _ in 0..=reps {
                batch.clear();
                for r in 0..rows {
                    batch.add(token, (pp + r) as i32, &[0], true).unwrap();
                }
                let t = Instant::now();
                ctx.decode(&mut batch).unwrap();
                times.push(t.elapsed().as_secs_f64() * 1e3);
                ctx.clear_kv_cache_seq(Some(0), Some(pp as u32), None)
                    .unwrap();
            }
            let (m, s) = mean_sd(&times[1..]);
            println!("verify step, {rows} rows after pp{pp}: {m:.2} ± {s:.2} ms");
        }
    }
    let (pm, ps) = mean_sd(&pp_rates);
    let (tm, ts) = mean_sd(&tg_rates);
    println!("model {model_path} threads {threads} reps {reps}");
    println!("pp{pp}: {pm:.1} ± {ps:.1} tok/s");
    println!("tg{tg}: {tm:.1} ± {ts:.1} tok/s");
    if parallel > 1 {
        let (bm, bs) = mean_sd(&batched_rates);
        println!("{parallel} sequences, pp{pp} each, tg{tg}: {bm:.1} ± {bs:.1} tok/s total decode");
    }
}
