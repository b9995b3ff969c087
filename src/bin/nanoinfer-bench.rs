//! `nanoinfer-bench`: latency and throughput figures, direct to
//! a worker (internal `Generate`) and through the coordinator (public
//! `Infer`), side by side.
//!
//! For each target it runs one warm-up request, then `--concurrency` streams
//! each sending `--requests` requests one after another, and reports (means
//! over the measured requests):
//! - TTFT: request sent → first token message received (client side);
//! - prompt tok/s: prompt tokens / TTFT (prefill plus request overhead);
//! - decode tok/s: (generated − 1) / (last token − first token);
//! - inter-token latency: the mean gap between consecutive tokens;
//! - output tok/s: every token received / wall time of the measured phase.
//!
//! ```text
//! nanoinfer-bench --coordinator http://127.0.0.1:50052 --worker http://127.0.0.1:50061
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use nanoinfer::connect;
use nanoinfer_proto::nanoinfer::{infer_service_client::InferServiceClient, InferRequest};
use nanoinfer_proto::worker::{worker_service_client::WorkerServiceClient, GenerateRequest};

/// Benchmark of a nanoinfer worker and coordinator.
#[derive(Debug, Parser)]
#[command(name = "nanoinfer-bench", version)]
struct Args {
    /// Coordinator address (public API); omit to skip.
    #[arg(long)]
    coordinator: Option<String>,
    /// Worker address (internal API, bypassing the coordinator); omit to skip.
    #[arg(long)]
    worker: Option<String>,
    /// Measured requests per stream (after one warm-up).
    #[arg(long, default_value_t = 5)]
    requests: u32,
    /// Concurrent streams, each sending `--requests` requests in turn.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// Prompt length in words (roughly 1.1 tokens each).
    #[arg(long, default_value_t = 64)]
    prompt_words: usize,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// One request's timings.
#[derive(Debug, Clone)]
struct Sample {
    ttft: Duration,
    token_times: Vec<Instant>,
    prompt_tokens: u32,
}

#[derive(Debug, Clone, Default)]
struct Summary {
    prompt_tokens: f64,
    generated: f64,
    ttft_ms: f64,
    prompt_tps: f64,
    decode_tps: f64,
    itl_ms: f64,
    /// All tokens received / wall time of the measured phase.
    output_tps: f64,
}

fn prompt(words: usize) -> String {
    const TEXT: &str = "The history of distributed computing is a story of machines learning to \
        cooperate across unreliable networks, sharing work and state while tolerating failures \
        of individual parts and keeping the whole system available to its users";
    TEXT.split_whitespace()
        .cycle()
        .take(words.max(1))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn via_coordinator(addr: &str, args: &Args) -> Result<Sample, Box<dyn std::error::Error>> {
    let mut client = InferServiceClient::new(connect(addr).await?);
    let req = InferRequest {
        prompt: prompt(args.prompt_words),
        max_tokens: args.max_tokens,
        temperature: Some(args.temperature),
        top_p: Some(args.top_p),
        seed: Some(1),
        ..Default::default()
    };
    let started = Instant::now();
    let stream = client.infer(req).await?.into_inner();
    time_stream(started, stream, |m| m.usage.map(|u| u.prompt_tokens)).await
}

async fn via_worker(addr: &str, args: &Args) -> Result<Sample, Box<dyn std::error::Error>> {
    let mut client = WorkerServiceClient::new(connect(addr).await?);
    let req = GenerateRequest {
        request_id: "bench".into(),
        prompt: prompt(args.prompt_words),
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: 1,
        stop: Vec::new(),
    };
    let started = Instant::now();
    let stream = client.generate(req).await?.into_inner();
    time_stream(started, stream, |m| m.finished.map(|f| f.prompt_tokens)).await
}

/// Reads a token stream to its end, noting when each token arrived.
/// `final_prompt_tokens` recognises the final message and reads its usage.
async fn time_stream<M>(
    started: Instant,
    mut stream: tonic::Streaming<M>,
    final_prompt_tokens: impl Fn(&M) -> Option<u32>,
) -> Result<Sample, Box<dyn std::error::Error>> {
    let mut times = Vec::new();
    while let Some(msg) = stream.message().await? {
        if let Some(prompt_tokens) = final_prompt_tokens(&msg) {
            return Ok(Sample {
                ttft: times
                    .first()
                    .map(|t: &Instant| *t - started)
                    .unwrap_or_default(),
                token_times: times,
                prompt_tokens,
            });
        }
        times.push(Instant::now());
    }
    Err("stream ended without a final message".into())
}

fn summarize(samples: &[Sample]) -> Summary {
    let n = samples.len() as f64;
    let mut s = Summary::default();
    for x in samples {
        let ttft = x.ttft.as_secs_f64();
        let gen = x.token_times.len();
        s.prompt_tokens += x.prompt_tokens as f64 / n;
        s.generated += gen as f64 / n;
        s.ttft_ms += ttft * 1e3 / n;
        s.prompt_tps += x.prompt_tokens as f64 / ttft / n;
        if gen > 1 {
            let span = (x.token_times[gen - 1] - x.token_times[0]).as_secs_f64();
            s.decode_tps += (gen - 1) as f64 / span / n;
            s.itl_ms += span * 1e3 / (gen - 1) as f64 / n;
        }
    }
    s
}

async fn measure(
    name: &str,
    addr: &str,
    args: &Args,
) -> Result<Summary, Box<dyn std::error::Error>> {
    let run = |addr: String| async move {
        if name == "worker" {
            via_worker(&addr, args).await
        } else {
            via_coordinator(&addr, args).await
        }
    };
    run(addr.to_string()).await?; // warm-up
    let total = args.requests * args.concurrency;
    let done = std::sync::atomic::AtomicU32::new(0);
    let started = Instant::now();
    let streams = (0..args.concurrency.max(1)).map(|_| async {
        let mut samples = Vec::new();
        for _ in 0..args.requests {
            samples.push(run(addr.to_string()).await?);
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            eprint!("\r{name}: {n}/{total} requests");
        }
        Ok::<_, Box<dyn std::error::Error>>(samples)
    });
    let mut samples = Vec::new();
    for result in futures::future::join_all(streams).await {
        samples.extend(result?);
    }
    let wall = started.elapsed().as_secs_f64();
    eprintln!();
    let mut summary = summarize(&samples);
    let tokens: usize = samples.iter().map(|s| s.token_times.len()).sum();
    summary.output_tps = tokens as f64 / wall;
    Ok(summary)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.coordinator.is_none() && args.worker.is_none() {
        return Err("give --coordinator and/or --worker".into());
    }
    let mut results = Vec::new();
    if let Some(addr) = &args.worker {
        results.push(("worker", measure("worker", addr, &args).await?));
    }
    if let Some(addr) = &args.coordinator {
        results.push(("coordinator", measure("coordinator", addr, &args).await?));
    }
    if args.json {
        let rows: Vec<String> = results
            .iter()
            .map(|(name, s)| {
                format!(
                    "\"{name}\":{{\"prompt_tokens\":{:.0},\"generated_tokens\":{:.1},\"ttft_ms\":{:.2},\
                     \"prompt_tokens_per_s\":{:.1},\"decode_tokens_per_s\":{:.2},\"inter_token_ms\":{:.3},\
                     \"output_tokens_per_s\":{:.2}}}",
                    s.prompt_tokens, s.generated, s.ttft_ms, s.prompt_tps, s.decode_tps, s.itl_ms, s.output_tps
                )
            })
            .collect();
        println!("{{{}}}", rows.join(","));
        return Ok(());
    }
    println!(
        "{} stream(s) x {} measured requests, prompt ~{} words, max_tokens {}, temperature {}, top_p {}",
        args.concurrency,
        args.requests,
        args.prompt_words,
        args.max_tokens,
        args.temperature,
        args.top_p
    );
    println!(
        "{:<12} {:>8} {:>8} {:>10} {:>12} {:>12} {:>10} {:>12}",
        "target", "prompt", "gen", "TTFT ms", "prompt t/s", "decode t/s", "ITL ms", "output t/s"
    );
    for (name, s) in &results {
        println!(
            "{:<12} {:>8.0} {:>8.1} {:>10.2} {:>12.1} {:>12.2} {:>10.3} {:>12.2}",
            name,
            s.prompt_tokens,
            s.generated,
            s.ttft_ms,
            s.prompt_tps,
            s.decode_tps,
            s.itl_ms,
            s.output_tps
        );
    }
    if let [(_, w), (_, c)] = results.as_slice() {
        println!(
            "coordinator adds {:+.2} ms to TTFT and {:+.3} ms per token (decode ratio {:.3})",
            c.ttft_ms - w.ttft_ms,
            c.itl_ms - w.itl_ms,
            c.decode_tps / w.decode_tps
        );
    }
    Ok(())
}
