//! The chaos suite: real etcd, real workers on the real model, a real
//! coordinator, steady client load, and one fault per test — a worker
//! SIGKILLed mid-stream, a worker SIGSTOPped, etcd stopped for 30 s, the
//! coordinator and a worker started with etcd down, a rolling restart of
//! both workers, a malformed worker record, a client that stops reading, a
//! client deadline.
//!
//! Each test prints one summary line —
//! `chaos <name>: sent=… completed=… failed={CODE: n} resumed=… lost=…` —
//! and requires `lost=0`: every request either completes as one unbroken
//! stream (contiguous indexes, final usage counting every token) or ends
//! with a clear status; none hangs, none is cut short, none is UNKNOWN.

use crate::common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nanoinfer_proto::nanoinfer::{infer_service_client::InferServiceClient, InferRequest};
use tonic::transport::Channel;
use tonic::Code;

/// Tokens per request: short, so the load turns over on 2 cores.
const TOKENS: u32 = 24;
/// Longer than any healthy request here; a request past it is lost.
const REQUEST_BOUND: Duration = Duration::from_secs(40);

#[derive(Default)]
struct Tally {
    sent: u64,
    completed: u64,
    failed: BTreeMap<String, u64>,
    lost: u64,
    lost_why: Vec<String>,
    slowest: Duration,
}

/// Steady load: `clients` loops sending greedy requests until stopped.
struct Load {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The outcome of one request: `Ok(())` completed, `Err(Ok(code))` failed
/// cleanly, `Err(Err(why))` lost.
async fn one_request(
    client: &mut InferServiceClient<Channel>,
    req: InferRequest,
) -> Result<(), Result<Code, String>> {
    let run = async {
        let mut stream = client.infer(req).await.map_err(Ok)?.into_inner();
        let mut tokens = 0u32;
        loop {
            match stream.message().await {
                Ok(Some(m)) if m.usage.is_none() => {
                    if m.index != tokens {
                        return Err(Err(format!("index {} after {tokens} tokens", m.index)));
                    }
                    tokens += 1;
                }
                Ok(Some(m)) => {
                    let usage = m.usage.unwrap();
                    if usage.generated_tokens != tokens || m.index != tokens {
                        return Err(Err(format!(
                            "final says {} tokens (index {}), stream had {tokens}",
                            usage.generated_tokens, m.index
                        )));
                    }
                    return Ok(());
                }
                Ok(None) => {
                    return Err(Err(format!(
                        "stream ended after {tokens} tokens without a final message"
                    )))
                }
                Err(status) => return Err(Ok(status)),
            }
        }
    };
    match tokio::time::timeout(REQUEST_BOUND, run).await {
        Err(_) => Err(Err(format!("no end within {REQUEST_BOUND:?}"))),
        Ok(Ok(())) => Ok(()),
        Ok(Err(Err(why))) => Err(Err(why)),
        Ok(Err(Ok(status))) if status.code() == Code::Unknown => {
            Err(Err(format!("UNKNOWN: {}", status.message())))
        }
        Ok(Err(Ok(status))) => Err(Ok(status.code())),
    }
}

impl Load {
    async fn start(addr: &str, clients: usize) -> Self {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let mut client = InferServiceClient::new(nanoinfer::connect(addr).await.unwrap());
            let (tally, stop) = (tally.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let id = format!("chaos-{c}-{n}");
                    let req = InferRequest {
                        request_id: id.clone(),
                        ..greedy(&format!("{PROMPT} (client {c}, request {n})"), TOKENS)
                    };
                    tally.lock().unwrap().sent += 1;
                    let started = Instant::now();
                    let outcome = one_request(&mut client, req).await;
                    let mut t = tally.lock().unwrap();
                    t.slowest = t.slowest.max(started.elapsed());
                    match outcome {
                        Ok(()) => t.completed += 1,
                        Err(Ok(code)) => *t.failed.entry(format!("{code:?}")).or_default() += 1,
                        Err(Err(why)) => {
                            t.lost += 1;
                            t.lost_why.push(format!("{id}: {why}"));
                        }
                    }
                }
            }));
        }
        Self { tally, stop, tasks }
    }

    /// Waits until `n` more requests completed.
    async fn wait_completed(&self, n: u64, timeout: Duration) {
        let target = self.tally.lock().unwrap().completed + n;
        eventually(timeout, &format!("{n} more completed requests"), || async {
            self.tally.lock().unwrap().completed >= target
        })
        .await;
    }

    /// Stops the load, prints the summary line and returns the tally.
    async fn finish(self, name: &str, coordinator: &mut Proc) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let metrics = scrape(coordinator).await;
        let resumed = metrics
            .get("nanoinfer_coordinator_resumes_total")
            .copied()
            .unwrap_or(0.0);
        let tally = std::mem::take(&mut *self.tally.lock().unwrap());
        report(format!(
            "chaos {name}: sent={} completed={} failed={:?} resumed={resumed} lost={} slowest={:.1}s",
            tally.sent,
            tally.completed,
            tally.failed,
            tally.lost,
            tally.slowest.as_secs_f64()
        ));
        if tally.lost > 0 {
            let ids: Vec<&str> = tally
                .lost_why
                .iter()
                .filter_map(|w| w.split(':').next())
                .collect();
            let lines: Vec<String> = coordinator
                .log()
                .lines()
                .filter(|l| {
                    ids.iter().any(|id| {
                        l.contains(&format!("{id} "))
                            || l.contains(&format!("{id}\""))
                            || l.ends_with(id)
                    })
                })
                .map(String::from)
                .collect();
            panic!(
                "lost requests: {:?}\ncoordinator log of them:\n{}",
                tally.lost_why,
                lines.join("\n")
            );
        }
        assert_eq!(
            tally.sent,
            tally.completed + tally.failed.values().sum::<u64>()
        );
        tally
    }
}

/// Prints a chaos summary line where it is seen: straight to stderr, past
/// the test harness's output capture, so `scripts/test` shows it.
fn report(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn signal(proc: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(proc.pid().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// Two real workers and a coordinator.
async fn cluster(coordinator_args: &[&str]) -> Cluster {
    Cluster::start(2, &["--ctx-size", "512"], coordinator_args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_resumes_on_the_other_worker() {
    let mut cluster = cluster(&[]).await;
    let load = Load::start(&cluster.addr, 2).await;
    load.wait_completed(2, Duration::from_secs(60)).await;
    // Kill a worker while both clients' streams are running.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.workers[0].kill();
    load.wait_completed(4, Duration::from_secs(60)).await;
    let tally = load.finish("sigkill", &mut cluster.coordinator).await;
    assert!(tally.failed.is_empty(), "{:?}", tally.failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_under_load_moves_requests_within_seconds() {
    let mut cluster = cluster(&[]).await;
    let load = Load::start(&cluster.addr, 2).await;
    load.wait_completed(2, Duration::from_secs(60)).await;
    signal(&cluster.workers[0], "STOP");
    let stopped = Instant::now();
    let coordinator = &cluster.coordinator;
    eventually(
        Duration::from_secs(10),
        "the stopped worker to be ejected",
        || async { coordinator.log().contains("worker ejected") },
    )
    .await;
    report(format!(
        "chaos sigstop: hung worker ejected {:.1}s after SIGSTOP",
        stopped.elapsed().as_secs_f64()
    ));
    load.wait_completed(4, Duration::from_secs(60)).await;
    let detected = cluster.coordinator.log();
    signal(&cluster.workers[0], "CONT");
    let tally = load.finish("sigstop", &mut cluster.coordinator).await;
    assert!(tally.failed.is_empty(), "{:?}", tally.failed);
    assert!(detected.contains("worker ejected"), "{detected}");
    assert!(
        tally.slowest < Duration::from_secs(12),
        "a request waited {:?} (stopped {:?} ago)",
        tally.slowest,
        stopped.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_for_30_seconds_costs_nothing() {
    let mut cluster = cluster(&[]).await;
    let load = Load::start(&cluster.addr, 2).await;
    load.wait_completed(2, Duration::from_secs(60)).await;
    cluster.etcd.stop();
    let down = Instant::now();
    let mut client = cluster.client().await;
    eventually(
        Duration::from_secs(20),
        "Health to say ETCD_UNAVAILABLE",
        || {
            let mut c = client.clone();
            async move {
                c.health(nanoinfer_proto::nanoinfer::HealthRequest {})
                    .await
                    .is_ok_and(|r| r.into_inner().status.starts_with("ETCD_UNAVAILABLE"))
            }
        },
    )
    .await;
    while down.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.etcd.resume().await;
    load.wait_completed(2, Duration::from_secs(60)).await;
    let health = client
        .health(nanoinfer_proto::nanoinfer::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    let tally = load.finish("etcd-outage", &mut cluster.coordinator).await;
    assert!(tally.failed.is_empty(), "{:?}", tally.failed);
    assert!(tally.completed >= 4);
    drop(health);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_worker_started_with_etcd_down_serve_once_it_is_up() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut coordinator = Proc::spawn(
        "coordinator",
        Command::new(bin("nanoinfer-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--etcd-endpoints", &endpoint]),
    );
    let addr = format!("http://{}", coordinator.listen_addr().await);
    let mut worker = Proc::spawn(
        "w1",
        Command::new(bin("nanoinfer-worker"))
            .arg("--model")
            .arg(model_path())
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--threads", "1", "--ctx-size", "512", "--lease-ttl", "3"])
            .args(["--id", "w1", "--etcd-endpoints", &endpoint]),
    );
    let mut client = InferServiceClient::new(nanoinfer::connect(&addr).await.unwrap());
    let status = client
        .health(nanoinfer_proto::nanoinfer::HealthRequest {})
        .await
        .unwrap()
        .into_inner()
        .status;
    assert!(status.starts_with("ETCD_UNAVAILABLE"), "{status}");
    let err = collect(&mut client, greedy(PROMPT, 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The worker keeps trying rather than exiting (it says so once its
    // model is loaded and its engine has measured its step costs).
    worker.wait_for_line("etcd", Duration::from_secs(60)).await;
    let _etcd = Etcd::start_on(port).await;
    worker
        .wait_for_line("worker ready", Duration::from_secs(60))
        .await;
    eventually(Duration::from_secs(20), "a completion", || {
        let mut c = client.clone();
        async move { collect(&mut c, greedy(PROMPT, 2)).await.is_ok() }
    })
    .await;
    report("chaos etcd-down-at-start: coordinator and worker served once etcd came up".into());
    coordinator.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_both_workers_fails_nothing() {
    let mut cluster = cluster(&[]).await;
    let load = Load::start(&cluster.addr, 2).await;
    load.wait_completed(2, Duration::from_secs(60)).await;
    for i in 0..2 {
        let id = format!("w{}", i + 1);
        cluster.workers[i].terminate();
        let code = cluster.workers[i].wait_exit(Duration::from_secs(40)).await;
        assert_eq!(code, Some(0), "{}", cluster.workers[i].log());
        cluster.workers[i] = start_worker(&cluster.etcd, &id, &["--ctx-size", "512"]).await;
        cluster.wait_live(2).await;
        load.wait_completed(2, Duration::from_secs(60)).await;
    }
    let tally = load
        .finish("rolling-restart", &mut cluster.coordinator)
        .await;
    assert!(tally.failed.is_empty(), "{:?}", tally.failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_record_fails_nothing() {
    let mut cluster = cluster(&[]).await;
    let load = Load::start(&cluster.addr, 2).await;
    cluster
        .etcd
        .put(
            "/nanoinfer/workers/bad",
            r#"{"id":"bad","address":"my host:15063","model":"m","capacity":{"slots":1,"queue":1,"context_length":1},"version":"0"}"#,
        )
        .await;
    load.wait_completed(4, Duration::from_secs(60)).await;
    let tally = load
        .finish("malformed-record", &mut cluster.coordinator)
        .await;
    assert!(tally.failed.is_empty(), "{:?}", tally.failed);
    assert_eq!(cluster.live_workers().await, 2);
}

/// Waits until the worker runs and queues nothing.
async fn wait_worker_idle(worker: &mut Proc, timeout: Duration) {
    let addr = worker.metrics_addr().await;
    eventually(timeout, "the worker to be idle", || {
        let addr = addr.clone();
        async move {
            let (_, body) = http_get(&addr, "/metrics").await;
            let m = parse_metrics(&body);
            m.get("nanoinfer_worker_num_requests_running") == Some(&0.0)
                && m.get("nanoinfer_worker_num_requests_waiting") == Some(&0.0)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_slot_after_the_stall_timeout() {
    let mut cluster = Cluster::start(
        1,
        &["--ctx-size", "2048"],
        &["--stalled-stream-timeout", "2"],
    )
    .await;
    let channel = tonic::transport::Endpoint::from_shared(cluster.addr.clone())
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    let mut client = InferServiceClient::new(channel);
    let mut stream = client
        .infer(greedy(PROMPT, 1500))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    // Not reading: the slot is freed after the 2 s timeout, not after 1500
    // tokens (about a minute here).
    let started = Instant::now();
    wait_worker_idle(&mut cluster.workers[0], Duration::from_secs(30)).await;
    let freed = started.elapsed();
    let m = scrape(&mut cluster.coordinator).await;
    report(format!(
        "chaos stalled-client: slot freed {:.1}s after the client stopped reading",
        freed.as_secs_f64()
    ));
    assert_eq!(m["nanoinfer_coordinator_stalled_streams_total"], 1.0);
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_frees_the_worker_within_a_second() {
    let mut cluster = Cluster::start(1, &["--ctx-size", "2048"], &[]).await;
    let mut client = cluster.client().await;
    let mut req = tonic::Request::new(greedy(PROMPT, 1500));
    req.set_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let mut stream = client.infer(req).await.unwrap().into_inner();
    let mut tokens = 0;
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => tokens += 1,
            Ok(None) => panic!("finished 1500 tokens within 2 s?"),
            Err(e) => break e,
        }
    };
    let at = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(tokens > 0, "a partial stream before the deadline");
    wait_worker_idle(&mut cluster.workers[0], Duration::from_secs(1)).await;
    report(format!(
        "chaos deadline: DEADLINE_EXCEEDED after {tokens} tokens at {:.2}s; worker idle {:.2}s later",
        at.as_secs_f64(),
        (started.elapsed() - at).as_secs_f64()
    ));
}

/// Median of `xs` (sorted here).
fn median(xs: &mut [Duration]) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_stream_resumed_after_sigkill_is_measured_against_an_uninterrupted_one() {
    const N: u32 = 32;
    let mut cluster = cluster(&[]).await;
    let mut client = cluster.client().await;
    let (mut same, mut rounds) = (0, 0);
    let (mut gaps, mut itls) = (Vec::new(), Vec::new());
    for (round, cut) in [4u32, 12, 20].into_iter().enumerate() {
        let prompt = format!("{PROMPT} (round {round})");
        let reference = text(&collect(&mut client, greedy(&prompt, N)).await.unwrap());
        let id = format!("cut-{round}");
        let req = InferRequest {
            request_id: id.clone(),
            ..greedy(&prompt, N)
        };
        let mut stream = client.infer(req).await.unwrap().into_inner();
        let (mut got, mut tokens, mut killed) = (String::new(), 0u32, None);
        let mut last = Instant::now();
        while let Some(m) = stream.message().await.unwrap() {
            got += &m.token;
            if let Some(usage) = m.usage {
                assert_eq!(usage.generated_tokens, N);
                break;
            }
            assert_eq!(m.index, tokens, "contiguous across the resume");
            let gap = last.elapsed();
            last = Instant::now();
            if tokens == cut {
                gaps.push(gap);
            } else if tokens > 0 {
                itls.push(gap);
            }
            tokens += 1;
            if tokens == cut && killed.is_none() {
                let serving = cluster
                    .workers
                    .iter()
                    .position(|w| w.log().contains(&id))
                    .expect("a worker logged the request");
                cluster.workers[serving].kill();
                last = Instant::now();
                killed = Some(serving);
            }
        }
        rounds += 1;
        same += usize::from(got == reference);
        if got != reference {
            println!("round {round}: resumed {got:?}\n  uninterrupted {reference:?}");
        }
        let i = killed.expect("a worker was killed");
        let id = format!("w{}", i + 1);
        cluster.workers[i] = start_worker(&cluster.etcd, &id, &["--ctx-size", "512"]).await;
        cluster.wait_live(2).await;
    }
    let resumed = scrape(&mut cluster.coordinator).await["nanoinfer_coordinator_resumes_total"];
    assert_eq!(resumed, 3.0);
    let model = model_path();
    report(format!(
        "chaos greedy-resume ({}, {N} tokens, SIGKILL after 4/12/20): identical text {same}/{rounds}; \
         gap at the resume p50 {:.0} ms against inter-token p50 {:.0} ms",
        model.file_name().unwrap_or_default().to_string_lossy(),
        median(&mut gaps).as_secs_f64() * 1e3,
        median(&mut itls).as_secs_f64() * 1e3
    ));
}
