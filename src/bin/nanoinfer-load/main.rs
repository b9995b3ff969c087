//! `nanoinfer-load`: a load test against a running cluster, and its report.
//!
//! Opens `--grpc-streams` gRPC `Infer` streams and `--http-streams`
//! OpenAI-compatible SSE streams at once (connections are made first, then
//! every request goes out together), optionally signals a process (a
//! worker) `--kill-after-ms` into the run, and classifies every stream:
//! - **completed**: gRPC: the final message (finish reason and usage) and
//!   then status OK; HTTP: a chunk with a `finish_reason`, then `[DONE]`;
//! - **rejected up front**: an error before any token (by gRPC code, or by
//!   HTTP status / the SSE error's `type`), noting `Retry-After`;
//! - **failed after output**: an error after at least one token;
//! - **OK without final**: gRPC status OK with no final message, or an SSE
//!   body that ended without `[DONE]` (or `[DONE]` with no finish reason):
//!   a protocol violation, never a legitimate outcome;
//! - **timed out**: no end within `--stream-timeout-s`.
//!
//! Separately it counts streams whose tokens were out of order (gRPC: an
//! `index` gap or duplicate, a final `index`/usage that disagrees with the
//! tokens seen, a message after the final one; HTTP: `usage` disagreeing
//! with the chunks seen). With `--metrics` it scrapes the coordinator before
//! and after and reports the increase of its ejection, readmission, retry
//! and resume counters, and after a signal polls for the first ejection.
//!
//! Exit status: 0 when no stream failed after output, ended OK without a
//! final message, timed out or broke token order (rejections up front are
//! allowed: they are admission control); 1 otherwise; 2 when the run could
//! not start.
//!
//! ```text
//! nanoinfer-load --grpc-streams 200 --http-streams 200 --http http://127.0.0.1:8080 \
//!     --chat --max-tokens 16 --metrics http://127.0.0.1:9052/metrics \
//!     --kill-pid 1234 --kill-after-ms 6000
//! ```
//!
//! # Layout
//! - `main.rs`: the flags, the requests, the run;
//! - [`stream`]: one gRPC or SSE stream read to its end and classified;
//! - [`http`]: HTTP/1.1 (and HTTPS) connections, the metrics scrape;
//! - [`fault`]: the signal and the ejection watch;
//! - [`report`]: the counts, the table and the JSON object.

mod fault;
mod http;
mod report;
mod stream;

use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header;
use nanoinfer::connect_with;
use nanoinfer_proto::nanoinfer::{
    infer_service_client::InferServiceClient, ChatMessage, InferRequest,
};
use serde_json::json;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::fault::{send_signal, signal_during, KillSignal};
use crate::http::{rustls_config, scrape, HttpTarget};
use crate::report::{print_table, Report};
use crate::stream::{grpc_stream, http_stream, Api, Stream};

const DEFAULT_PROMPT: &str = "Tell me one short fact about the ocean.";

/// Load test of a running nanoinfer cluster: N concurrent gRPC and HTTP
/// streams, an optional fault, and what every stream saw.
#[derive(Debug, Parser)]
#[command(name = "nanoinfer-load", version)]
struct Args {
    /// Coordinator gRPC address (public API).
    #[arg(long, env = "NANOINFER_ADDR", default_value_t = nanoinfer::default_addr())]
    addr: String,
    /// Base URL of the coordinator's OpenAI-compatible HTTP API (e.g.
    /// `http://127.0.0.1:8080`); needed for --http-streams. `https://`
    /// uses --ca.
    #[arg(long, env = "NANOINFER_HTTP_URL")]
    http: Option<String>,
    /// gRPC `Infer` streams, all opened at once.
    #[arg(long, default_value_t = 0)]
    grpc_streams: u32,
    /// HTTP SSE streams (`/v1/chat/completions` with --chat, else
    /// `/v1/completions`), all opened at once, one connection each.
    #[arg(long, default_value_t = 0)]
    http_streams: u32,
    /// HTTP/2 connections the gRPC streams share in turn (0: one per
    /// stream, like independent clients).
    #[arg(long, default_value_t = 0)]
    grpc_connections: u32,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// The prompt. Each stream appends ` (request N)` so that no two are
    /// the same, unless --same-prompt.
    #[arg(long, default_value = DEFAULT_PROMPT)]
    prompt: String,
    /// Send the prompt as a user message (the worker applies the model's
    /// chat template) instead of raw text.
    #[arg(long)]
    chat: bool,
    /// Send the very same prompt on every stream.
    #[arg(long)]
    same_prompt: bool,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Model to ask for (default: whatever the workers serve).
    #[arg(long)]
    model: Option<String>,
    /// A stream with no end this many seconds after the run started counts
    /// as timed out (and fails the run).
    #[arg(long, default_value_t = 120)]
    stream_timeout_s: u64,
    /// Process to signal during the run (e.g. a worker's pid).
    #[arg(long, requires = "kill_after_ms")]
    kill_pid: Option<i32>,
    /// When to signal --kill-pid, in milliseconds after the streams were
    /// opened.
    #[arg(long, requires = "kill_pid")]
    kill_after_ms: Option<u64>,
    /// The signal: KILL (a crash), STOP (a hang; SIGCONT follows when the
    /// run ends) or TERM (a graceful shutdown).
    #[arg(long, value_enum, ignore_case = true, default_value = "KILL")]
    kill_signal: KillSignal,
    /// The coordinator's metrics endpoint (e.g.
    /// `http://127.0.0.1:9052/metrics`): scraped before and after the run
    /// for its ejection, readmission, retry and resume counters, and polled
    /// after a signal for the first ejection.
    #[arg(long, env = "NANOINFER_METRICS_URL")]
    metrics: Option<String>,
    /// API key sent as `authorization: Bearer <key>` on both APIs (needed
    /// when the coordinator runs with --api-keys-file).
    #[arg(long, env = "NANOINFER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// TLS to the coordinator (a coordinator run with --tls-cert).
    #[command(flatten)]
    tls: nanoinfer::ClientTlsArgs,
}

/// The request of stream `i`.
fn prompt_of(args: &Args, i: u32) -> String {
    if args.same_prompt {
        args.prompt.clone()
    } else {
        format!("{} (request {i})", args.prompt)
    }
}

fn grpc_request(args: &Args, i: u32) -> InferRequest {
    let text = prompt_of(args, i);
    let (prompt, messages) = if args.chat {
        let message = ChatMessage {
            role: "user".into(),
            content: text,
            ..Default::default()
        };
        (String::new(), vec![message])
    } else {
        (text, Vec::new())
    };
    InferRequest {
        request_id: format!("load-g{i}"),
        prompt,
        messages,
        max_tokens: args.max_tokens,
        temperature: Some(args.temperature),
        model: args.model.clone().unwrap_or_default(),
        ..Default::default()
    }
}

fn http_request(args: &Args, target: &HttpTarget, i: u32) -> hyper::Request<Full<Bytes>> {
    let text = prompt_of(args, i);
    let (path, mut body) = if args.chat {
        let body = json!({"messages": [{"role": "user", "content": text}]});
        ("/v1/chat/completions", body)
    } else {
        ("/v1/completions", json!({"prompt": text}))
    };
    body["max_tokens"] = json!(args.max_tokens);
    body["temperature"] = json!(args.temperature);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    if let Some(model) = &args.model {
        body["model"] = json!(model);
    }
    let base = target.path.strip_suffix("/v1").unwrap_or(&target.path);
    let mut request = target.request(
        hyper::Method::POST,
        &format!("{base}{path}"),
        Bytes::from(body.to_string()),
    );
    let headers = request.headers_mut();
    headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    headers.insert(header::ACCEPT, "text/event-stream".parse().unwrap());
    headers.insert("x-request-id", format!("load-h{i}").parse().unwrap());
    if let Some(key) = args.api_key.as_deref() {
        if let Ok(value) = format!("Bearer {key}").parse() {
            headers.insert(header::AUTHORIZATION, value);
        }
    }
    request
}

/// Raises the soft limit on open files to the hard one: every stream here
/// may hold a connection.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
}

/// The run's gRPC channels (`n` of them); the first must connect, the
/// others may fail (their streams count as rejected with `CONNECT`).
async fn grpc_channels(args: &Args, n: usize) -> Result<Vec<Result<Channel, String>>, String> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let tls = args.tls.config()?;
    let first = connect_with(&args.addr, tls.clone())
        .await
        .map_err(|e| nanoinfer::connect_error(&args.addr, &e))?;
    let rest = futures::future::join_all((1..n).map(|_| {
        let tls = tls.clone();
        async move {
            connect_with(&args.addr, tls)
                .await
                .map_err(|e| format!("connect {}: {e}", args.addr))
        }
    }))
    .await;
    Ok(std::iter::once(Ok(first)).chain(rest).collect())
}

async fn run(args: Args) -> Result<bool, String> {
    if args.grpc_streams + args.http_streams == 0 {
        return Err("give --grpc-streams and/or --http-streams".into());
    }
    raise_open_file_limit();
    let rustls = rustls_config(&args.tls)?;
    let server_name = args.tls.tls_server_name.as_deref();
    let http = match (&args.http, args.http_streams) {
        (_, 0) => None,
        (None, _) => return Err("--http-streams needs --http (the HTTP API's base URL)".into()),
        (Some(url), _) => Some(HttpTarget::parse(url, rustls.clone(), server_name)?),
    };
    let metrics = match &args.metrics {
        Some(url) => Some(HttpTarget::parse(url, rustls.clone(), server_name)?),
        None => None,
    };
    let api_key: Option<MetadataValue<Ascii>> = match &args.api_key {
        Some(key) => Some(
            format!("Bearer {key}")
                .parse()
                .map_err(|_| "--api-key: not a valid header value")?,
        ),
        None => None,
    };
    let before = match &metrics {
        Some(m) => Some(scrape(m).await?),
        None => None,
    };

    // Connections first, then every request at once.
    let grpc_streams = args.grpc_streams as usize;
    let n_channels = match args.grpc_connections as usize {
        0 => grpc_streams,
        n => n.min(grpc_streams),
    };
    let channels = grpc_channels(&args, n_channels).await?;
    let mut http_connections = Vec::new();
    if let Some(target) = &http {
        let first = target
            .connect()
            .await
            .map_err(|e| format!("HTTP API: {e}"))?;
        http_connections.push(Ok(first));
        let rest = (1..args.http_streams).map(|_| target.connect());
        http_connections.extend(futures::future::join_all(rest).await);
    }

    let seen = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.stream_timeout_s);
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..args.grpc_streams {
        let request = grpc_request(&args, i);
        let (key, seen) = (api_key.clone(), seen.clone());
        let channel = channels[i as usize % channels.len()].clone();
        tasks.push(tokio::spawn(async move {
            match channel {
                Ok(channel) => {
                    let client = InferServiceClient::new(channel);
                    grpc_stream(client, request, key, deadline, &seen).await
                }
                Err(e) => Stream::new(Api::Grpc, request.request_id).error("CONNECT", e),
            }
        }));
    }
    for (i, connection) in http_connections.into_iter().enumerate() {
        let target = http.as_ref().expect("HTTP streams have a target");
        let request = http_request(&args, target, i as u32);
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            http_stream(connection, request, format!("load-h{i}"), deadline, &seen).await
        }));
    }
    let streams = async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("stream task"));
        }
        let _ = done_tx.send(true);
        out
    };
    let killer = async {
        let (Some(pid), Some(after)) = (args.kill_pid, args.kill_after_ms) else {
            return None;
        };
        let after = Duration::from_millis(after);
        let report = signal_during(
            pid,
            args.kill_signal,
            started,
            after,
            metrics.as_ref(),
            &seen,
            done_rx,
        )
        .await;
        Some(report)
    };
    let (results, kill) = tokio::join!(streams, killer);
    let wall = started.elapsed();
    let after = match &metrics {
        Some(m) => scrape(m).await.ok(),
        None => None,
    };
    if let Some(k) = kill.as_ref().filter(|k| k.sent_ms.is_some()) {
        if k.signal == Some(KillSignal::Stop) {
            if let Err(e) = send_signal(k.pid, rustix::process::Signal::CONT) {
                eprintln!("nanoinfer-load: SIGCONT to {}: {e}", k.pid);
            }
        }
    }
    let counters = before.as_ref().zip(after.as_ref()).map(|(b, a)| {
        let delta = |name: &str| a.total(name) - b.total(name);
        // The admission queue's counters: null from a coordinator without
        // one. (A per-worker family with no worker yet prints nothing, so
        // the others read 0 when absent.)
        let queue = |name: &str| a.exports(name).then(|| delta(name));
        json!({
            "worker_ejections": delta(http::EJECTIONS),
            "worker_readmissions": delta(http::READMISSIONS),
            "retries": delta(http::RETRIES),
            "resumes": delta(http::RESUMES),
            "admission_queued": queue(http::ADMISSION_QUEUED),
            "admission_rejected_full": queue(http::ADMISSION_FULL),
            "admission_timeouts": queue(http::ADMISSION_TIMEOUTS),
        })
    });
    let r = Report::of(&results);
    let report = r.json(wall, counters, kill.as_ref());
    if args.json {
        println!("{report}");
    } else {
        print_table(&args, &r, &report);
    }
    Ok(r.all.ok())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("nanoinfer-load: {e}");
            ExitCode::from(2)
        }
    }
}
