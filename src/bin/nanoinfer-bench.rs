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
//! - output tok/s: every token received / wall time of the measured phase;
//! - p50/p90/p99 of TTFT, TPOT ((end-to-end − TTFT) / (generated − 1)),
//!   inter-token latency (every gap) and end-to-end latency — the definitions
//!   of `vllm bench serve`; requests/s; failed requests by status code.
//!
//! With `--request-rate R` the requests (`--requests` × `--concurrency` of
//! them) arrive as a Poisson process of rate R per second instead of from
//! closed-loop streams.
//!
//! Routing (`scripts/bench-routing`): `--coordinator` takes a
//! comma-separated list of addresses and the streams (or Poisson arrivals)
//! take them in turn, as clients behind one Service spread over replicas.
//! With `--tenants` the report adds the prompt tokens the workers reused
//! (the final message's usage) against the ideal: every request of a tenant
//! after its first reuses the tenant's whole shared prefix (its length in
//! tokens asked of the coordinator's `Tokenize`), and the success rate.
//!
//! Router tax, measured per token: against the test-double worker
//! (`examples/paced_worker.rs --stamp`), every token's text carries the
//! wall-clock time it was sent, so the bench reports each token's transit
//! time (worker send → client receive) directly and through the
//! coordinator; the difference of their percentiles is what the coordinator
//! adds per token. `--rss-pid` samples a process's resident memory while the
//! streams are open (the coordinator's memory per open stream).
//! `--connections N` multiplexes the streams over N HTTP/2 connections per
//! target (default: one connection per stream).
//!
//! ```text
//! nanoinfer-bench --coordinator http://127.0.0.1:50052 --worker http://127.0.0.1:50061
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use nanoinfer::{connect_with, stamp};
use nanoinfer_proto::nanoinfer::{infer_service_client::InferServiceClient, InferRequest};
use nanoinfer_proto::worker::{worker_service_client::WorkerServiceClient, GenerateRequest};
use tonic::transport::Channel;

/// Benchmark of a nanoinfer worker and coordinator.
#[derive(Debug, Parser)]
#[command(name = "nanoinfer-bench", version)]
struct Args {
    /// Coordinator address (public API), or several separated by commas,
    /// which the streams take in turn; omit to skip.
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
    /// Poisson arrivals at this many requests per second (open loop)
    /// instead of `--concurrency` closed-loop streams.
    #[arg(long)]
    request_rate: Option<f64>,
    /// Send the same prompt every time, so the worker's prefix cache serves
    /// all but the first (by default each prompt starts with a unique
    /// number, so every request pays its full prefill).
    #[arg(long)]
    same_prompt: bool,
    /// Tenants: each round of N requests has one request of every tenant,
    /// in a scrambled order; a tenant's prompt starts with its own shared
    /// system prompt of --shared-prefix-words words, followed by a unique
    /// question of --prompt-words words (the workload prefix-aware routing
    /// is for). 0: off.
    #[arg(long, default_value_t = 0)]
    tenants: u32,
    /// With --tenants: words in each tenant's shared system prompt.
    #[arg(long, default_value_t = 400)]
    shared_prefix_words: usize,
    /// HTTP/2 connections per target, shared round-robin by the streams
    /// (0: one per stream).
    #[arg(long, default_value_t = 0)]
    connections: usize,
    /// Sample this process's resident memory (VmRSS) before the bench
    /// connects and while the streams run, and report the growth per stream,
    /// connections included, and its CPU time per token (e.g. the
    /// coordinator's pid).
    #[arg(long)]
    rss_pid: Option<u32>,
    /// Constrain every request to the JSON Schema in this file (structured
    /// outputs: the request's `json_schema`), to measure the constraint's
    /// cost against the same run without it.
    #[arg(long, value_parser = read_schema)]
    json_schema: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// TLS to the targets (a coordinator run with --tls-cert; a worker's
    /// cluster port takes --cert/--key and --tls-server-name).
    #[command(flatten)]
    tls: nanoinfer::ClientTlsArgs,
}

/// One request's timings.
#[derive(Debug, Clone)]
struct Sample {
    ttft: Duration,
    e2e: Duration,
    token_times: Vec<Instant>,
    /// Per token stamped by the sender (`@<unix nanos>`): its transit time
    /// in µs.
    transit_us: Vec<f64>,
    prompt_tokens: u32,
    /// Prompt tokens the worker reused from its KV cache.
    cached_tokens: u32,
    /// The tenant the request belonged to (with `--tenants`).
    tenant: Option<u64>,
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
    /// Finished requests / wall time of the measured phase.
    requests_per_s: f64,
    /// p50, p90, p99 in ms.
    ttft_p: [f64; 3],
    tpot_p: [f64; 3],
    itl_p: [f64; 3],
    e2e_p: [f64; 3],
    /// p50, p90, p99 of stamped tokens' transit time, in µs (empty when
    /// the worker does not stamp its tokens).
    transit_p: Option<[f64; 3]>,
    /// Resident memory of `--rss-pid`: before this target's connections were
    /// opened, and its peak while the streams ran, in bytes.
    rss: Option<(u64, u64)>,
    /// Closed loop only: streams × the mean per-stream decode rate, the
    /// figure `llama-batched-bench` reports as S_TG (decode only, no
    /// prefill).
    decode_all_streams_tps: Option<f64>,
    /// CPU seconds `--rss-pid` used during the measured phase.
    cpu_s: Option<f64>,
    /// Tokens received in the measured phase.
    tokens: usize,
    /// Failed requests by gRPC code.
    errors: std::collections::BTreeMap<String, u32>,
    /// Requests sent and requests that finished, in the measured phase.
    sent: usize,
    succeeded: usize,
    /// Prompt tokens and the part of them the workers reused, over the
    /// measured requests that finished.
    prompt_tokens_total: u64,
    cached_tokens_total: u64,
    /// With `--tenants`: the reuse an ideal router would get on the same
    /// requests (each tenant's shared prefix on all but its first request
    /// of the run, the warm-up included), in tokens.
    ideal_cached_tokens: Option<u64>,
}

/// p50, p90 and p99 of `values` (nearest rank), in the same unit.
fn percentiles(mut values: Vec<f64>) -> [f64; 3] {
    if values.is_empty() {
        return [0.0; 3];
    }
    values.sort_by(f64::total_cmp);
    let at =
        |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    [at(0.5), at(0.9), at(0.99)]
}

/// Arrival offsets of a Poisson process of `rate` per second (fixed seed).
fn poisson_offsets(n: u32, rate: f64) -> Vec<Duration> {
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = ((state >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            t += -u.ln() / rate;
            Duration::from_secs_f64(t)
        })
        .collect()
}

/// `--json-schema FILE` → the schema's text.
fn read_schema(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))
}

/// Distinguishes prompts when `--same-prompt` is off.
static PROMPT_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The next request's prompt, and its tenant (with `--tenants`).
fn prompt_for(args: &Args) -> (String, Option<u64>) {
    let text = prompt(args.prompt_words);
    if args.tenants > 0 {
        let n = PROMPT_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tenant = tenant_of(n, u64::from(args.tenants));
        return (
            tenant_prompt(args, tenant, &format!("Question {n}: {text}")),
            Some(tenant),
        );
    }
    if args.same_prompt {
        (text, None)
    } else {
        let n = PROMPT_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (format!("{n}. {text}"), None)
    }
}

/// Tenant `tenant`'s prompt: its shared system prompt, then `question`.
fn tenant_prompt(args: &Args, tenant: u64, question: &str) -> String {
    format!(
        "You are the assistant of tenant {tenant}. {}\n{question}",
        prompt(args.shared_prefix_words)
    )
}

/// The tenant of request `n` among `tenants`: every round of `tenants`
/// requests holds each tenant once, in an order scrambled per round, so
/// each tenant gets its share of requests and round-robin routing cannot
/// line up with the order by accident.
fn tenant_of(n: u64, tenants: u64) -> u64 {
    let round = n / tenants;
    let mut order: Vec<u64> = (0..tenants).collect();
    order.sort_by_key(|t| scramble(round.wrapping_mul(0x1_0000_0001) ^ t));
    order[(n % tenants) as usize]
}

/// SplitMix64's output function: a fixed, well-mixed permutation of `n`.
fn scramble(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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

async fn via_coordinator(
    channel: Channel,
    args: &Args,
) -> Result<Sample, Box<dyn std::error::Error>> {
    let mut client = InferServiceClient::new(channel);
    let (prompt, tenant) = prompt_for(args);
    let req = InferRequest {
        prompt,
        max_tokens: args.max_tokens,
        temperature: Some(args.temperature),
        top_p: Some(args.top_p),
        seed: Some(1),
        json_schema: args.json_schema.clone().unwrap_or_default(),
        ..Default::default()
    };
    let started = Instant::now();
    let stream = client.infer(req).await?.into_inner();
    let mut sample = time_stream(
        started,
        stream,
        |m| m.usage.map(|u| (u.prompt_tokens, u.cached_prompt_tokens)),
        |m| &m.token,
        |_| false,
    )
    .await?;
    sample.tenant = tenant;
    Ok(sample)
}

async fn via_worker(channel: Channel, args: &Args) -> Result<Sample, Box<dyn std::error::Error>> {
    let mut client = WorkerServiceClient::new(channel);
    let (prompt, tenant) = prompt_for(args);
    let req = GenerateRequest {
        request_id: "bench".into(),
        prompt,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: 1,
        stop: Vec::new(),
        resume_token_ids: Vec::new(),
        messages: Vec::new(),
        json_schema: args.json_schema.clone().unwrap_or_default(),
        ..Default::default()
    };
    let started = Instant::now();
    let stream = client.generate(req).await?.into_inner();
    let mut sample = time_stream(
        started,
        stream,
        |m| m.finished.map(|f| (f.prompt_tokens, f.cached_tokens)),
        |m| &m.text,
        // The worker's `admitted` message carries no token.
        |m| m.admitted,
    )
    .await?;
    sample.tenant = tenant;
    Ok(sample)
}

/// CPU time (user + system) a process has used so far, in seconds (Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses: utime and
    // stime are the 12th and 13th of them, in clock ticks (100 a second on
    // Linux unless the kernel is configured otherwise).
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Resident memory of a process, in bytes (Linux).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reads a token stream to its end, noting when each token arrived.
/// `final_usage` recognises the final message and reads its prompt and
/// reused prompt tokens.
async fn time_stream<M>(
    started: Instant,
    mut stream: tonic::Streaming<M>,
    final_usage: impl Fn(&M) -> Option<(u32, u32)>,
    token_text: impl Fn(&M) -> &str,
    no_token: impl Fn(&M) -> bool,
) -> Result<Sample, Box<dyn std::error::Error>> {
    let mut times = Vec::new();
    let mut transit = Vec::new();
    while let Some(msg) = stream.message().await? {
        if no_token(&msg) {
            continue;
        }
        let now = stamp::unix_nanos();
        if let Some((prompt_tokens, cached_tokens)) = final_usage(&msg) {
            return Ok(Sample {
                ttft: times
                    .first()
                    .map(|t: &Instant| *t - started)
                    .unwrap_or_default(),
                e2e: started.elapsed(),
                token_times: times,
                transit_us: transit,
                prompt_tokens,
                cached_tokens,
                tenant: None,
            });
        }
        times.push(Instant::now());
        transit.extend(stamp::transit_us(token_text(&msg), now));
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

/// Each tenant's shared prefix in tokens, as the coordinator's model
/// tokenizes it: the common prefix of two of its prompts with different
/// questions.
async fn shared_prefix_tokens(
    channel: Channel,
    args: &Args,
) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    let mut client = InferServiceClient::new(channel);
    let mut out = Vec::new();
    for tenant in 0..u64::from(args.tenants) {
        let mut ids = Vec::new();
        for question in ["Question 1: a b c", "Question 2: x y z"] {
            let r = client
                .tokenize(nanoinfer_proto::nanoinfer::TokenizeRequest {
                    prompt: tenant_prompt(args, tenant, question),
                    add_special: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            ids.push(r.tokens);
        }
        let common = ids[0]
            .iter()
            .zip(&ids[1])
            .take_while(|(a, b)| a == b)
            .count();
        out.push(common as u64);
    }
    Ok(out)
}

/// The model `addr` serves, for the report: a worker's `Load` answer, or
/// the model a coordinator's worker names when tokenizing a word.
async fn model_of(name: &str, addr: &str, args: &Args) -> Option<String> {
    let addr = addr.split(',').next()?.trim();
    let channel = connect_with(addr, args.tls.config().ok()?).await.ok()?;
    if name == "worker" {
        let load = WorkerServiceClient::new(channel)
            .load(nanoinfer_proto::worker::LoadRequest {})
            .await
            .ok()?
            .into_inner();
        Some(format!("{} ({})", load.model_name, load.model))
    } else {
        let r = InferServiceClient::new(channel)
            .tokenize(nanoinfer_proto::nanoinfer::TokenizeRequest {
                prompt: "x".into(),
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner();
        Some(r.model)
    }
}

async fn measure(
    name: &str,
    addr: &str,
    args: &Args,
) -> Result<Summary, Box<dyn std::error::Error>> {
    let run = |channel: Channel| async move {
        if name == "worker" {
            via_worker(channel, args).await
        } else {
            via_coordinator(channel, args).await
        }
    };
    let total = args.requests * args.concurrency.max(1);
    let streams = if args.request_rate.is_some() {
        total as usize
    } else {
        args.concurrency.max(1) as usize
    };
    // The watched process's memory before any of this run's connections.
    let rss_before = args.rss_pid.and_then(rss_bytes);
    // A coordinator target may name several replicas: connection k goes to
    // the (k mod n)-th, so streams and arrivals take them in turn.
    let addrs: Vec<&str> = addr.split(',').map(str::trim).collect();
    let mut channels = Vec::new();
    for k in 0..if args.connections == 0 {
        streams
    } else {
        args.connections.min(streams)
    }
    .max(addrs.len())
    {
        channels.push(connect_with(addrs[k % addrs.len()], args.tls.config()?).await?);
    }
    let channel = |k: usize| channels[k % channels.len()].clone();
    let warm_up = run(channel(0)).await?;
    // With tenants, on a coordinator: each tenant's shared prefix in tokens.
    let shared_tokens = if args.tenants > 0 && name == "coordinator" {
        Some(shared_prefix_tokens(channel(0), args).await?)
    } else {
        None
    };
    let cpu_before = args.rss_pid.and_then(cpu_seconds);
    let rss_peak = std::sync::atomic::AtomicU64::new(rss_before.unwrap_or(0));
    let done = std::sync::atomic::AtomicU32::new(0);
    let progress = || {
        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        eprint!("\r{name}: {n}/{total} requests");
    };
    let status_of = |e: Box<dyn std::error::Error>| match e.downcast::<tonic::Status>() {
        Ok(status) => *status,
        Err(other) => tonic::Status::unknown(other.to_string()),
    };
    let started = Instant::now();
    let mut results: Vec<Result<Sample, tonic::Status>> = Vec::new();
    let work = async {
        if let Some(rate) = args.request_rate {
            let arrivals = poisson_offsets(total, rate).into_iter().enumerate().map(
                |(k, offset)| async move {
                    tokio::time::sleep_until((started + offset).into()).await;
                    let r = run(channel(k)).await.map_err(status_of);
                    progress();
                    r
                },
            );
            results = futures::future::join_all(arrivals).await;
        } else {
            let streams = (0..streams).map(|k| async move {
                let mut out = Vec::new();
                for _ in 0..args.requests {
                    out.push(run(channel(k)).await.map_err(status_of));
                    progress();
                }
                out
            });
            for stream in futures::future::join_all(streams).await {
                results.extend(stream);
            }
        }
    };
    // Sample the watched process's memory every 50 ms while streams run.
    let sample_rss = async {
        let Some(pid) = args.rss_pid else {
            return std::future::pending().await;
        };
        loop {
            if let Some(rss) = rss_bytes(pid) {
                rss_peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        () = work => {}
        () = sample_rss => {}
    }
    let wall = started.elapsed().as_secs_f64();
    eprintln!();
    let mut errors = std::collections::BTreeMap::new();
    let mut samples = Vec::new();
    for r in results {
        match r {
            Ok(sample) => samples.push(sample),
            Err(status) => *errors.entry(format!("{:?}", status.code())).or_insert(0) += 1,
        }
    }
    let mut summary = summarize(&samples);
    summary.sent = total as usize;
    summary.succeeded = samples.len();
    summary.prompt_tokens_total = samples.iter().map(|s| u64::from(s.prompt_tokens)).sum();
    summary.cached_tokens_total = samples.iter().map(|s| u64::from(s.cached_tokens)).sum();
    summary.ideal_cached_tokens = shared_tokens.map(|shared| {
        let mut seen: std::collections::HashSet<u64> = warm_up.tenant.into_iter().collect();
        samples
            .iter()
            .filter_map(|s| s.tenant)
            .map(|t| {
                if seen.insert(t) {
                    0
                } else {
                    shared[t as usize]
                }
            })
            .sum()
    });
    let tokens: usize = samples.iter().map(|s| s.token_times.len()).sum();
    summary.output_tps = tokens as f64 / wall;
    summary.requests_per_s = samples.len() as f64 / wall;
    summary.errors = errors;
    let transit: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.transit_us.iter().copied())
        .collect();
    summary.transit_p = (!transit.is_empty()).then(|| percentiles(transit));
    summary.rss = rss_before.map(|before| (before, rss_peak.into_inner()));
    summary.cpu_s = cpu_before
        .zip(args.rss_pid.and_then(cpu_seconds))
        .map(|(before, after)| after - before);
    summary.tokens = tokens;
    summary.decode_all_streams_tps = args
        .request_rate
        .is_none()
        .then_some(streams as f64 * summary.decode_tps);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    summary.ttft_p = percentiles(samples.iter().map(|s| ms(s.ttft)).collect());
    summary.e2e_p = percentiles(samples.iter().map(|s| ms(s.e2e)).collect());
    summary.tpot_p = percentiles(
        samples
            .iter()
            .filter(|s| s.token_times.len() > 1)
            .map(|s| ms(s.e2e - s.ttft) / (s.token_times.len() - 1) as f64)
            .collect(),
    );
    summary.itl_p = percentiles(
        samples
            .iter()
            .flat_map(|s| s.token_times.windows(2).map(|w| ms(w[1] - w[0])))
            .collect(),
    );
    Ok(summary)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.coordinator.is_none() && args.worker.is_none() {
        return Err("give --coordinator and/or --worker".into());
    }
    let target = args.worker.as_deref().map(|a| ("worker", a));
    let target = target.or(args.coordinator.as_deref().map(|a| ("coordinator", a)));
    let model = match target {
        Some((name, addr)) => model_of(name, addr, &args).await,
        None => None,
    };
    let model = model.unwrap_or_else(|| "unknown".into());
    let mut results = Vec::new();
    if let Some(addr) = &args.worker {
        results.push(("worker", measure("worker", addr, &args).await?));
    }
    if let Some(addr) = &args.coordinator {
        results.push(("coordinator", measure("coordinator", addr, &args).await?));
    }
    if args.json {
        let mut out = serde_json::Map::new();
        out.insert("model".into(), serde_json::json!(model));
        for (name, s) in &results {
            let p = |v: [f64; 3]| serde_json::json!({"p50": v[0], "p90": v[1], "p99": v[2]});
            out.insert(
                name.to_string(),
                serde_json::json!({
                    "prompt_tokens": s.prompt_tokens,
                    "generated_tokens": s.generated,
                    "ttft_ms": s.ttft_ms,
                    "prompt_tokens_per_s": s.prompt_tps,
                    "decode_tokens_per_s": s.decode_tps,
                    "inter_token_ms": s.itl_ms,
                    "output_tokens_per_s": s.output_tps,
                    "decode_tokens_per_s_all_streams": s.decode_all_streams_tps,
                    "requests_per_s": s.requests_per_s,
                    "ttft_ms_percentiles": p(s.ttft_p),
                    "tpot_ms_percentiles": p(s.tpot_p),
                    "itl_ms_percentiles": p(s.itl_p),
                    "e2e_ms_percentiles": p(s.e2e_p),
                    "token_transit_us_percentiles": s.transit_p.map(p),
                    "rss_bytes_before": s.rss.map(|r| r.0),
                    "rss_bytes_peak": s.rss.map(|r| r.1),
                    "watched_cpu_seconds": s.cpu_s,
                    "errors": s.errors,
                    "requests_sent": s.sent,
                    "requests_succeeded": s.succeeded,
                    "prompt_tokens_total": s.prompt_tokens_total,
                    "cached_prompt_tokens_total": s.cached_tokens_total,
                    "ideal_cached_prompt_tokens": s.ideal_cached_tokens,
                }),
            );
        }
        println!("{}", serde_json::Value::Object(out));
        return Ok(());
    }
    println!("model: {model}");
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
    println!(
        "{:<12} {:>22} {:>22} {:>22} {:>22} {:>8}",
        "p50/p90/p99", "TTFT ms", "TPOT ms", "ITL ms", "E2E ms", "req/s"
    );
    let fmt = |v: [f64; 3]| format!("{:.1}/{:.1}/{:.1}", v[0], v[1], v[2]);
    for (name, s) in &results {
        println!(
            "{:<12} {:>22} {:>22} {:>22} {:>22} {:>8.2}",
            name,
            fmt(s.ttft_p),
            fmt(s.tpot_p),
            fmt(s.itl_p),
            fmt(s.e2e_p),
            s.requests_per_s
        );
        if !s.errors.is_empty() {
            println!("{:<12} errors: {:?}", "", s.errors);
        }
    }
    for (name, s) in &results {
        let pct = |part: u64| 100.0 * part as f64 / s.prompt_tokens_total.max(1) as f64;
        let mut line = format!(
            "{name:<12} succeeded {}/{}; workers reused {} of {} prompt tokens ({:.1}%)",
            s.succeeded,
            s.sent,
            s.cached_tokens_total,
            s.prompt_tokens_total,
            pct(s.cached_tokens_total)
        );
        if let Some(ideal) = s.ideal_cached_tokens {
            line.push_str(&format!(", ideal {:.1}%", pct(ideal)));
        }
        println!("{line}");
    }
    for (name, s) in &results {
        if let (Some(all), true) = (s.decode_all_streams_tps, args.concurrency > 1) {
            println!(
                "{name:<12} decode of all streams together: {all:.1} tok/s (streams x per-stream decode rate; prefill excluded, like llama-batched-bench's S_TG)"
            );
        }
        if let Some(t) = s.transit_p {
            println!(
                "{name:<12} token transit (send stamp -> client) p50/p90/p99: {:.0}/{:.0}/{:.0} us",
                t[0], t[1], t[2]
            );
        }
        if let Some((before, peak)) = s.rss {
            let per_stream = peak.saturating_sub(before) as f64 / args.concurrency.max(1) as f64;
            println!(
                "{name:<12} pid {} RSS {:.1} MB before, {:.1} MB peak: {:.1} KB per stream",
                args.rss_pid.unwrap_or(0),
                before as f64 / 1e6,
                peak as f64 / 1e6,
                per_stream / 1e3
            );
        }
        if let Some(cpu) = s.cpu_s {
            println!(
                "{name:<12} pid {} used {:.2} CPU s: {:.1} us per token received",
                args.rss_pid.unwrap_or(0),
                cpu,
                cpu * 1e6 / s.tokens.max(1) as f64
            );
        }
    }
    if let [(_, w), (_, c)] = results.as_slice() {
        println!(
            "{}",
            overhead_line(
                c.ttft_ms - w.ttft_ms,
                c.itl_ms - w.itl_ms,
                c.decode_tps / w.decode_tps
            )
        );
        if let (Some(wt), Some(ct)) = (w.transit_p, c.transit_p) {
            println!(
                "coordinator adds per token (transit difference): p50 {:+.0} us, p90 {:+.0} us, p99 {:+.0} us",
                ct[0] - wt[0],
                ct[1] - wt[1],
                ct[2] - wt[2]
            );
        }
    }
    Ok(())
}

/// The coordinator's cost as a difference between the two targets, which
/// ran one after the other: a negative difference is said to be noise, not
/// printed as the coordinator "adding" a negative time.
fn overhead_line(ttft_diff_ms: f64, itl_diff_ms: f64, decode_ratio: f64) -> String {
    let mut line = format!(
        "through the coordinator minus direct: TTFT {ttft_diff_ms:+.2} ms, inter-token {itl_diff_ms:+.3} ms (decode ratio {decode_ratio:.3})"
    );
    if ttft_diff_ms < 0.0 || itl_diff_ms < 0.0 {
        line.push_str(
            "; a negative difference is run-to-run noise (the targets ran one after the other), not a gain",
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_overhead_is_called_noise() {
        let up = overhead_line(0.5, 0.02, 0.99);
        assert!(
            up.contains("TTFT +0.50 ms") && !up.contains("noise"),
            "{up}"
        );
        let down = overhead_line(-8.26, 0.1, 1.0);
        assert!(
            down.contains("TTFT -8.26 ms") && down.contains("noise"),
            "{down}"
        );
        assert!(!down.contains("adds"), "{down}");
    }

    #[test]
    fn every_round_holds_each_tenant_once() {
        for tenants in [1u64, 3, 6] {
            for round in 0..5 {
                let mut got: Vec<u64> = (0..tenants)
                    .map(|i| tenant_of(round * tenants + i, tenants))
                    .collect();
                got.sort_unstable();
                assert_eq!(got, (0..tenants).collect::<Vec<_>>());
            }
        }
        // Scrambled: the order is not the same every round.
        let order = |round: u64| {
            (0..6)
                .map(|i| tenant_of(round * 6 + i, 6))
                .collect::<Vec<_>>()
        };
        assert!((1..5).any(|r| order(r) != order(0)));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(values), [50.0, 90.0, 99.0]);
        assert_eq!(percentiles(vec![7.0]), [7.0; 3]);
        assert_eq!(percentiles(Vec::new()), [0.0; 3]);
    }

    #[test]
    fn this_process_has_memory_and_cpu_time() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 1 << 20);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert_eq!(rss_bytes(u32::MAX), None);
    }
}
