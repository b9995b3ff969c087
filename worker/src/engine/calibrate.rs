//! Measures what a decode step costs by its rows on the engine's own
//! context, once at start, for speculation's trade ([`StepCost`]): how
//! many proposed positions pay depends on the model, the machine and the
//! threads (on a CPU with Gemma 3 270M a 16-row step cost about 7 one-row
//! steps here, a 2-row step 2.5), so the worker measures rather than
//! guesses.

use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;

use super::speculate::StepCost;

/// Cells of context the measured steps attend to.
const CONTEXT: usize = 64;
/// Timed steps per row count (the fastest counts: noise only adds time).
const REPEATS: usize = 2;

/// Times one-sequence steps of [`StepCost::sample_rows`]`(max_rows)` rows,
/// every row with logits, after a short prompt in sequence 0, and leaves
/// the KV cache empty.
pub(super) fn step_cost(
    ctx: &mut LlamaContext<'_>,
    model: &LlamaModel,
    batch: &mut LlamaBatch<'_>,
    max_rows: usize,
) -> Result<StepCost, String> {
    let started = Instant::now();
    let token = model.vocab().bos();
    let rows = StepCost::sample_rows(max_rows);
    let fill = |batch: &mut LlamaBatch<'_>, from: usize, n: usize, all: bool| {
        batch.clear();
        for i in 0..n {
            batch
                .add(token, (from + i) as i32, &[0], all || i + 1 == n)
                .map_err(|e| format!("calibration batch: {e}"))?;
        }
        Ok::<(), String>(())
    };
    fill(batch, 0, CONTEXT, false)?;
    ctx.decode(batch)
        .map_err(|e| format!("calibration prompt: {e}"))?;
    let mut step = |n: usize| {
        fill(batch, CONTEXT, n, true)?;
        let t = Instant::now();
        ctx.decode(batch)
            .map_err(|e| format!("calibration step of {n} rows: {e}"))?;
        let seconds = t.elapsed().as_secs_f64();
        ctx.clear_kv_cache_seq(Some(0), Some(CONTEXT as u32), None)
            .map_err(|e| format!("calibration: {e}"))?;
        Ok::<f64, String>(seconds)
    };
    // One untimed step of the most rows first: it grows llama.cpp's output
    // buffers and warms the caches that every smaller step then uses.
    step(*rows.last().expect("at least one row count"))?;
    let mut points: Vec<(usize, f64)> = rows.iter().map(|&n| (n, f64::INFINITY)).collect();
    for _ in 0..REPEATS {
        for point in &mut points {
            point.1 = point.1.min(step(point.0)?);
        }
    }
    ctx.clear_kv_cache();
    let cost = StepCost::measured(points);
    tracing::info!(
        took_ms = started.elapsed().as_millis() as u64,
        steps = %cost
            .points()
            .iter()
            .map(|(r, s)| format!("{r}:{:.1}ms", s * 1e3))
            .collect::<Vec<_>>()
            .join(" "),
        "speculation: measured a decode step's cost by rows"
    );
    Ok(cost)
}
