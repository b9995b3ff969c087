//! The load targets: 200 gRPC and 200 HTTP (SSE) streams opened at once on
//! two real workers (SmolLM2-135M-Instruct, chat prompts, greedy, short
//! answers) behind a real coordinator, all with their default flags, driven
//! by the `nanoinfer-load` binary (`--json`) — with no fault, with a worker
//! SIGKILLed mid-load, and with a worker SIGSTOPped mid-load.
//!
//! Each test prints one line —
//! `load <name>: sent=… completed=… rejected={…} failed={…} …` — and
//! holds the cluster to what a client may see under load: every stream
//! either completes as one unbroken stream or is refused before its first
//! token; none fails after output, none ends OK without its final message.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// Streams per API.
const STREAMS: u32 = 200;
/// Tokens per request: short answers, so 400 streams turn over on 2 cores.
const MAX_TOKENS: u32 = 8;
/// A stream with no end this long after the run started counts as timed
/// out (the tool's own bound); the test's bound on the tool is above it.
const STREAM_TIMEOUT_S: u64 = 150;
const RUN_BOUND: Duration = Duration::from_secs(STREAM_TIMEOUT_S + 60);
/// When the fault tests signal a worker: tokens are flowing by then.
const FAULT_AT_MS: u64 = 2000;

/// etcd, two workers on the chat model and a coordinator, all on their
/// default flags (the harness's `--threads 1` and 3 s lease aside).
struct LoadCluster {
    _etcd: Etcd,
    workers: Vec<Proc>,
    coordinator: Proc,
    grpc: String,
    http: String,
    metrics: String,
}

async fn cluster() -> LoadCluster {
    let etcd = Etcd::start().await;
    let model = chat_model_path();
    let workers = start_workers_with(&etcd, &["w1", "w2"], &model, |_| vec![]).await;
    // The default routing policy (the harness otherwise picks least-loaded).
    let (mut coordinator, grpc) = start_coordinator(&etcd, &["--routing", "prefix-affinity"]).await;
    let http = format!("http://{}", coordinator.http_addr().await);
    let metrics = format!("http://{}/metrics", coordinator.metrics_addr().await);
    wait_routable(&grpc, 2).await;
    LoadCluster {
        _etcd: etcd,
        workers,
        coordinator,
        grpc,
        http,
        metrics,
    }
}

/// Runs `nanoinfer-load` with the load of every test plus `extra`; returns
/// its report and exit code.
async fn run_load(c: &LoadCluster, name: &str, extra: &[String]) -> (Value, Option<i32>) {
    let mut cmd = tokio::process::Command::new(bin("nanoinfer-load"));
    cmd.args([
        "--addr",
        &c.grpc,
        "--http",
        &c.http,
        "--metrics",
        &c.metrics,
    ])
    .args(["--grpc-streams", &STREAMS.to_string()])
    .args(["--http-streams", &STREAMS.to_string()])
    .args(["--max-tokens", &MAX_TOKENS.to_string()])
    .args(["--chat", "--temperature", "0", "--json"])
    .args(["--stream-timeout-s", &STREAM_TIMEOUT_S.to_string()])
    .args(extra)
    .kill_on_drop(true);
    let out = tokio::time::timeout(RUN_BOUND, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("nanoinfer-load ran past {RUN_BOUND:?}"))
        .expect("run nanoinfer-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "nanoinfer-load printed no report ({e}, {}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    summary(name, &report);
    (report, out.status.code())
}

/// Prints the test's summary line past the harness's capture.
fn summary(name: &str, r: &Value) {
    use std::io::Write;
    let line = format!(
        "load {name}: sent={} completed={} rejected={} failed={} ok_without_final={} timed_out={} \
         order_violations={} counters={} kill={} ttft_ms p50={:.0} p99={:.0} wall={:.1}s",
        r["sent"],
        r["completed"],
        r["rejected_by_code"],
        r["failed_by_code"],
        r["ok_without_final"],
        r["timed_out"],
        r["order_violations"],
        r["metrics"],
        r["kill"],
        r["ttft_ms"]["p50"].as_f64().unwrap_or(0.0),
        r["ttft_ms"]["p99"].as_f64().unwrap_or(0.0),
        r["wall_ms"].as_f64().unwrap_or(0.0) / 1e3,
    );
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn count(r: &Value, key: &str) -> u64 {
    r[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {r:#}"))
}

/// The warnings, errors and panics the cluster's processes logged, each
/// distinct line once with its count (timestamps and thread ids aside), for
/// a failure's message.
fn problems(c: &LoadCluster) -> String {
    let mut out = String::new();
    for p in std::iter::once(&c.coordinator).chain(&c.workers) {
        let log = p.log();
        let mut seen: Vec<(String, usize)> = Vec::new();
        let mut lines = log.lines().peekable();
        while let Some(line) = lines.next() {
            let panic = line.contains("panicked at");
            if !(panic || line.contains("WARN") || line.contains("ERROR")) {
                continue;
            }
            // A panic's message is the line after it.
            let mut text = match (panic, lines.peek()) {
                (true, Some(message)) => format!("{line} {message}"),
                _ => line.to_string(),
            };
            if line.starts_with("20") {
                text = text
                    .split_once(' ')
                    .map_or(text.clone(), |(_, t)| t.to_string());
            }
            let text: String = text
                .split(' ')
                .filter(|w| {
                    !(w.starts_with('(') && w.trim_matches(['(', ')']).parse::<u64>().is_ok())
                })
                .collect::<Vec<_>>()
                .join(" ");
            match seen.iter_mut().find(|(t, _)| *t == text) {
                Some((_, n)) => *n += 1,
                None => seen.push((text, 1)),
            }
        }
        out += &format!("--- {}:\n", p.name);
        for (text, n) in seen.iter().take(30) {
            out += &format!("{n} x {text}\n");
        }
    }
    out
}

/// What no load may ever cost: a stream cut after output, one ended OK
/// without its final message, one that hung, one with broken token order.
fn assert_nothing_broken(c: &LoadCluster, r: &Value, code: Option<i32>) {
    for key in [
        "failed_after_output",
        "ok_without_final",
        "timed_out",
        "order_violations",
    ] {
        assert_eq!(count(r, key), 0, "{key}: {r:#}\n{}", problems(c));
    }
    assert_eq!(
        count(r, "completed") + count(r, "rejected_up_front"),
        count(r, "sent"),
        "{r:#}"
    );
    assert_eq!(code, Some(0), "nanoinfer-load's exit code: {r:#}");
}

fn pid_arg(proc: &Proc, signal: &str) -> Vec<String> {
    [
        "--kill-pid",
        &proc.pid().to_string(),
        "--kill-after-ms",
        &FAULT_AT_MS.to_string(),
        "--kill-signal",
        signal,
    ]
    .map(String::from)
    .to_vec()
}

/// The signal went out with tokens already flowing, to a worker that was
/// serving some of the load.
fn assert_fault_landed_mid_load(r: &Value, worker: &str) {
    let kill = &r["kill"];
    assert!(kill["error"].is_null(), "{r:#}");
    assert!(
        count(kill, "tokens_before") > 0,
        "no tokens before the fault: {r:#}"
    );
    let in_flight = kill["in_flight_before"][worker].as_f64().unwrap_or(0.0);
    assert!(
        in_flight > 0.0,
        "{worker} served nothing when signalled: {r:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_grpc_and_two_hundred_http_streams_on_default_flags_all_complete() {
    let c = cluster().await;
    let (r, code) = run_load(&c, "no-fault", &[]).await;
    assert_nothing_broken(&c, &r, code);
    assert_eq!(count(&r, "rejected_up_front"), 0, "{r:#}");
    assert_eq!(count(&r, "completed"), u64::from(2 * STREAMS), "{r:#}");
    assert_eq!(
        r["metrics"]["worker_ejections"].as_f64(),
        Some(0.0),
        "{r:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_load_fails_nothing_after_output() {
    let c = cluster().await;
    let (r, code) = run_load(&c, "sigkill", &pid_arg(&c.workers[1], "KILL")).await;
    assert_fault_landed_mid_load(&r, "w2");
    assert_nothing_broken(&c, &r, code);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_load_is_ejected_and_its_streams_resume() {
    let c = cluster().await;
    let stopped = &c.workers[1];
    let (r, code) = run_load(&c, "sigstop", &pid_arg(stopped, "STOP")).await;
    // The tool sends SIGCONT when it ends; again here in case it did not,
    // so the worker can be stopped normally.
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &stopped.pid().to_string()])
        .status();
    assert_fault_landed_mid_load(&r, "w2");
    let ejected = r["kill"]["first_ejection_ms"].as_f64();
    assert!(
        ejected.is_some_and(|ms| ms <= 5000.0),
        "the stopped worker was not ejected within 5 s: {r:#}"
    );
    assert!(
        c.coordinator.log().contains("worker ejected"),
        "{}",
        c.coordinator.log()
    );
    assert_nothing_broken(&c, &r, code);
}
