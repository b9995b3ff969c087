//! Every coordinator failure path, fast: the coordinator in this test's
//! process (`tests/common/in_process.rs`: `run_with` on loopback ports, the
//! worker set handed over by the test) and programmable fake workers
//! (`tests/common/fake_worker.rs`, on the test's runtime) that die, hang,
//! refuse or start slowly on command, on a paused clock: a timeout of
//! seconds passes as soon as every task waits for it, so the tests check
//! the coordinator's clock (first-token and stall timeouts, deadlines, the
//! admission wait, probe back-off, load reports' age) in milliseconds of
//! real time. What needs etcd (malformed
//! records, etcd coming up late) or the process's log (escaped ids) runs
//! the real coordinator binary on a real etcd. The real-process versions
//! of these faults are in `tests/chaos.rs`.

use crate::common;

use std::time::Duration;

use tokio::time::Instant;

use common::fake_worker::{fake_text, FakeWorker, Fault};
use common::in_process::InProcess;
use common::*;
use nanoinfer_proto::nanoinfer::{infer_service_client::InferServiceClient, InferRequest};
use tonic::transport::Channel;
use tonic::Code;

async fn client(addr: &str) -> InferServiceClient<Channel> {
    InferServiceClient::new(nanoinfer::connect(addr).await.unwrap())
}

/// A client on its own connection with tiny HTTP/2 windows: when it stops
/// reading, its stream stalls after a few messages.
async fn small_window_client(addr: &str) -> InferServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(addr.to_string())
        .unwrap()
        .initial_stream_window_size(1024)
        .initial_connection_window_size(65535)
        .connect()
        .await
        .unwrap();
    InferServiceClient::new(channel)
}

/// Short timeouts for the fakes (`--first-token-timeout 2` unless `extra`
/// sets it).
fn with_defaults<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = extra.to_vec();
    if !args.contains(&"--first-token-timeout") {
        args.extend(["--first-token-timeout", "2"]);
    }
    args
}

/// The coordinator binary on a real etcd, with short timeouts.
async fn coordinator(etcd: &Etcd, extra: &[&str]) -> (Proc, String) {
    start_coordinator(etcd, &with_defaults(extra)).await
}

/// A fake worker on this test's runtime, registered nowhere.
async fn fake(id: &str) -> FakeWorker {
    FakeWorker::builder(id).local().start().await
}

/// The coordinator in this process, routing over `workers` (no etcd), with
/// short timeouts.
async fn in_process(extra: &[&str], workers: &[&FakeWorker]) -> InProcess {
    InProcess::start(&with_defaults(extra), workers).await
}

fn request(id: &str, max_tokens: u32) -> InferRequest {
    InferRequest {
        request_id: id.into(),
        ..greedy("hello", max_tokens)
    }
}

/// The stream's messages are one unbroken stream: indexes 0.., the final
/// one last with the usage of every token.
fn assert_unbroken(msgs: &[nanoinfer_proto::nanoinfer::InferResponse], n: u32) {
    assert_eq!(msgs.len(), n as usize + 1, "{msgs:?}");
    for (i, m) in msgs[..n as usize].iter().enumerate() {
        assert_eq!(m.index, i as u32, "contiguous indexes: {msgs:?}");
        assert!(m.usage.is_none());
    }
    let last = msgs.last().unwrap();
    assert_eq!(last.index, n);
    assert_eq!(last.usage.unwrap().generated_tokens, n);
    assert_eq!(text(msgs), fake_text(n));
}

async fn scrape_addr(coordinator: &mut Proc) -> std::collections::HashMap<String, f64> {
    scrape(coordinator).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_record_never_poisons_routing() {
    let etcd = Etcd::start().await;
    let _w = FakeWorker::start(&etcd.endpoint, "good", 5).await;
    etcd.put(
        "/nanoinfer/workers/bad",
        r#"{"id":"bad","address":"my host:15063","model":"m","capacity":{"slots":1,"queue":1,"context_length":1},"version":"0"}"#,
    )
    .await;
    etcd.put("/nanoinfer/workers/junk", "not json").await;
    let (mut coordinator, addr) = coordinator(&etcd, &[]).await;
    wait_routable(&addr, 1).await;
    let mut c = client(&addr).await;
    for i in 0..10 {
        let msgs = collect(&mut c, request(&format!("r{i}"), 3)).await.unwrap();
        assert_unbroken(&msgs, 3);
    }
    let m = scrape_addr(&mut coordinator).await;
    assert_eq!(m["nanoinfer_coordinator_malformed_worker_records"], 2.0);
    assert!(coordinator
        .log()
        .contains("skipping malformed worker record"));
    // A record that turns bad later is skipped too, and the good one stays.
    etcd.put("/nanoinfer/workers/bad", "{}").await;
    let msgs = collect(&mut c, request("after", 2)).await.unwrap();
    assert_unbroken(&msgs, 2);
}

#[tokio::test(start_paused = true)]
async fn a_worker_dying_mid_stream_is_resumed_elsewhere_and_ejected() {
    let a = fake("a").await;
    let b = fake("b").await;
    a.set_fault(Fault::DieAfter(7));
    b.set_fault(Fault::DieAfter(7));
    let coordinator = in_process(&[], &[&a, &b]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 2).await;
    let mut c = client(&addr).await;
    // Whoever takes it dies after 7 tokens; the other resumes it.
    let msgs = collect(&mut c, request("long", 20)).await.unwrap();
    assert_unbroken(&msgs, 20);
    let (first, second) = if a.is_dead() { (&a, &b) } else { (&b, &a) };
    assert!(!second.is_dead());
    let resumed = second.calls().last().unwrap().clone();
    assert_eq!(resumed.request_id, "long");
    assert_eq!(
        resumed.resume_token_ids,
        (0..7).map(|i| 1000 + i).collect::<Vec<_>>(),
        "resumed from the token ids the client has"
    );
    assert_eq!(resumed.max_tokens, 20);
    // The dead worker is out of routing at once (its lease lives 30 s):
    // the next requests go straight to the live one.
    let m = coordinator.scrape().await;
    assert_eq!(m["nanoinfer_coordinator_resumes_total"], 1.0);
    assert_eq!(
        m[&format!(
            "nanoinfer_coordinator_worker_ejections_total{{worker=\"{}\"}}",
            first.id
        )],
        1.0
    );
    let before = second.calls().len();
    for i in 0..5 {
        collect(&mut c, request(&format!("next{i}"), 2))
            .await
            .unwrap();
    }
    assert_eq!(second.calls().len(), before + 5);
    let m = coordinator.scrape().await;
    assert_eq!(
        m["nanoinfer_coordinator_retries_total"], 0.0,
        "no request tried the dead worker"
    );
    assert_eq!(health_of(&addr).await.1, 1);
}

#[tokio::test(start_paused = true)]
async fn failures_before_the_first_token_are_retried_on_another_worker() {
    let dying = fake("a").await;
    let busy = fake("b").await;
    let good = fake("c").await;
    dying.set_fault(Fault::DieAfter(0));
    busy.set_fault(Fault::Exhausted);
    let coordinator = in_process(&[], &[&dying, &busy, &good]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 3).await;
    let mut c = client(&addr).await;
    // Picks are partly random: until one has met the dying worker (and at
    // least 6), every request completes, from its first token.
    let mut sent = 0;
    while sent < 6 || (dying.calls().is_empty() && sent < 40) {
        let msgs = collect(&mut c, request(&format!("r{sent}"), 4))
            .await
            .unwrap();
        assert_unbroken(&msgs, 4);
        sent += 1;
    }
    assert!(
        dying.is_dead(),
        "the dying worker was never picked in {sent}"
    );
    assert_eq!(good.calls().len(), sent);
    assert!(
        good.calls().iter().all(|c| c.resume_token_ids.is_empty()),
        "nothing was delivered, so nothing is resumed"
    );
    let m = coordinator.scrape().await;
    // The dead worker's requests are retries; a full worker's answer only
    // sends the request back to wait for room (no attempt used).
    assert!(m["nanoinfer_coordinator_retries_total"] >= 1.0, "{m:?}");
}

#[tokio::test(start_paused = true)]
async fn every_worker_full_is_resource_exhausted_naming_each_one() {
    let a = fake("a").await;
    let b = fake("b").await;
    a.set_fault(Fault::Exhausted);
    b.set_fault(Fault::Exhausted);
    // Full workers hold the request in the admission queue until its
    // timeout, then it is refused, before any output, with a retry hint.
    let coordinator = in_process(&["--admission-timeout", "2"], &[&a, &b]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 2).await;
    let mut c = client(&addr).await;
    let err = collect(&mut c, request("full", 4)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let message = err.message();
    assert!(message.contains("request full"), "{message}");
    assert!(
        message.contains("a: ") && message.contains("b: "),
        "{message}"
    );
    assert!(
        message.contains("no worker had room within 2 s"),
        "{message}"
    );
    assert_eq!(err.metadata().get("x-request-id").unwrap(), "full");
    assert_eq!(err.metadata().get("retry-after").unwrap(), "1");
    assert!(
        !a.calls().is_empty() && !b.calls().is_empty(),
        "each worker tried, and tried again after a wait"
    );
    // Full workers are healthy: not ejected.
    assert_eq!(health_of(&addr).await.1, 2);
}

#[tokio::test(start_paused = true)]
async fn a_silent_worker_loses_the_request_after_the_first_token_timeout() {
    let hung = fake("a").await;
    let good = fake("b").await;
    hung.set_fault(Fault::Hang);
    good.set_fault(Fault::SlowStart(Duration::from_millis(300)));
    let coordinator = in_process(&["--first-token-timeout", "1"], &[&hung, &good]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 2).await;
    let mut c = client(&addr).await;
    for i in 0..3 {
        let started = Instant::now();
        let msgs = collect(&mut c, request(&format!("r{i}"), 3)).await.unwrap();
        assert_unbroken(&msgs, 3);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(!hung.calls().is_empty(), "the silent worker was tried");
}

#[tokio::test(start_paused = true)]
async fn time_in_a_workers_queue_is_not_silence() {
    // One busy worker that holds each request in its queue 3 s before
    // admitting it: three times --first-token-timeout. The clock starts at
    // admission, so nothing fails, moves or ejects the worker.
    let busy = fake("a").await;
    busy.set_fault(Fault::Queued(Duration::from_secs(3)));
    let coordinator = in_process(&["--first-token-timeout", "1"], &[&busy]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 1).await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mut c = client(&addr).await;
        tasks.push(tokio::spawn(async move {
            collect(&mut c, request(&format!("q{i}"), 3)).await
        }));
    }
    for t in tasks {
        let msgs = t.await.unwrap().expect("a queued request completes");
        assert_unbroken(&msgs, 3);
    }
    assert_eq!(
        busy.calls().len(),
        4,
        "each request went to the worker once"
    );
    let m = coordinator.scrape().await;
    assert_eq!(
        m.get("nanoinfer_coordinator_retries_total"),
        Some(&0.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("nanoinfer_coordinator_worker_ejections_total{worker=\"a\"}")
            .copied()
            .unwrap_or(0.0),
        0.0,
        "{m:?}"
    );
    assert_eq!(health_of(&addr).await.1, 1);
}

#[tokio::test(start_paused = true)]
async fn the_clients_deadline_travels_to_the_worker_and_ends_the_stream() {
    let slow = fake("a").await;
    slow.set_fault(Fault::SlowStart(Duration::from_secs(30)));
    let coordinator = in_process(&["--first-token-timeout", "60"], &[&slow]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 1).await;
    let mut c = client(&addr).await;
    let mut req = tonic::Request::new(request("deadline", 4));
    req.set_timeout(Duration::from_millis(1500));
    let started = Instant::now();
    let result = async {
        let mut stream = c.infer(req).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let call = &slow.calls()[0];
    let timeout = call.timeout.expect("grpc-timeout reached the worker");
    assert!(
        timeout <= Duration::from_millis(1500) && timeout > Duration::from_millis(1000),
        "{timeout:?}"
    );
    // The worker's stream was dropped at the deadline.
    eventually(
        Duration::from_secs(2),
        "the worker stream to be dropped",
        || async { slow.abandoned() == 1 },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_cancelled_and_frees_its_worker() {
    let w = fake("a").await;
    let coordinator = in_process(&["--stalled-stream-timeout", "1"], &[&w]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 1).await;
    // A client with a tiny HTTP/2 window that reads one message, then stops.
    let mut c = small_window_client(&addr).await;
    let mut stream = c
        .infer(request("stalled", 4000))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    eventually(
        Duration::from_secs(10),
        "the stalled stream to be cancelled",
        || async { w.abandoned() == 1 },
    )
    .await;
    let m = coordinator.scrape().await;
    assert_eq!(m["nanoinfer_coordinator_stalled_streams_total"], 1.0);
    assert_eq!(
        m["nanoinfer_coordinator_worker_requests_in_flight{worker=\"a\"}"],
        0.0
    );
    drop(stream);
}

#[tokio::test(start_paused = true)]
async fn no_worker_left_to_resume_on_is_unavailable_with_the_count() {
    let a = fake("a").await;
    a.set_fault(Fault::DieAfter(3));
    let coordinator = in_process(&[], &[&a]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 1).await;
    let mut c = client(&addr).await;
    let mut stream = c.infer(request("orphan", 10)).await.unwrap().into_inner();
    let mut got = 0;
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(got, 3);
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("orphan") && err.message().contains("3 tokens"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_etcd_is_down_rather_than_no_workers() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut cmd = std::process::Command::new(bin("nanoinfer-coordinator"));
    cmd.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--http-listen", "127.0.0.1:0"])
        .args(["--etcd-endpoints", &endpoint]);
    let mut coordinator = Proc::spawn("coordinator", &mut cmd);
    let addr = format!("http://{}", coordinator.listen_addr().await);
    eventually(Duration::from_secs(10), "ETCD_UNAVAILABLE", || async {
        health_of(&addr).await.0.starts_with("ETCD_UNAVAILABLE")
    })
    .await;
    let etcd = Etcd::start_on(port).await;
    let _w = FakeWorker::start(&etcd.endpoint, "a", 30).await;
    eventually(Duration::from_secs(20), "OK once etcd is up", || async {
        health_of(&addr).await == ("OK".to_string(), 1)
    })
    .await;
    let msgs = collect(&mut client(&addr).await, request("up", 2))
        .await
        .unwrap();
    assert_unbroken(&msgs, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bytes_and_bad_ids_are_invalid_argument() {
    let etcd = Etcd::start().await;
    let _w = FakeWorker::start(&etcd.endpoint, "a", 30).await;
    let (mut coordinator, addr) = coordinator(&etcd, &[]).await;
    wait_routable(&addr, 1).await;
    // A request_id that would forge a log line.
    let mut c = client(&addr).await;
    let forged = "x\nINFO forged line\u{1b}[0m";
    let err = collect(&mut c, request(forged, 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("request_id"), "{err:?}");
    assert!(
        !coordinator
            .log()
            .lines()
            .any(|l| l.starts_with("INFO forged")),
        "logs escape the id:\n{}",
        coordinator.log()
    );
    // An InferRequest whose prompt (field 2) is not UTF-8.
    let mut body = vec![0x12, 3, 0xff, 0xfe, 0xfd];
    body.extend_from_slice(&[0x18, 2]); // max_tokens = 2
    let err = raw::call(&addr, "/nanoinfer.InferService/Infer", body)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("prompt"), "{err:?}");
    let metrics = coordinator.metrics_addr().await;
    eventually(
        Duration::from_secs(5),
        "the decode error to be counted",
        || {
            let metrics = metrics.clone();
            async move {
                let (_, body) = http_get(&metrics, "/metrics").await;
                parse_metrics(&body).get("nanoinfer_coordinator_request_decode_errors_total")
                    == Some(&1.0)
            }
        },
    )
    .await;
}

/// Clients that stop reading leave their worker's tokens buffered in the
/// coordinator's HTTP/2 connection to that worker. Tokens are small DATA
/// frames, and h2 closes a connection whose buffered small frames pass a
/// budget (half its connection window) with ENHANCE_YOUR_CALM: with the
/// default windows a few stalled clients broke every other stream on the
/// same worker. The upstream windows bound what one stalled stream buffers.
#[tokio::test(start_paused = true)]
async fn stalled_clients_do_not_break_other_streams_on_their_worker() {
    let w = fake("a").await;
    let coordinator = in_process(&["--stalled-stream-timeout", "60"], &[&w]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 1).await;
    let mut stalled = Vec::new();
    for i in 0..16 {
        let mut c = small_window_client(&addr).await;
        let mut stream = c
            .infer(request(&format!("stalled-{i}"), 4_000))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap();
        stalled.push((c, stream));
    }
    // 16 stalled streams at 200 tokens/s each: with h2's default budget the
    // upstream connection broke within about 4 s.
    let mut c = client(&addr).await;
    let msgs = collect(&mut c, request("reader", 1_500)).await.unwrap();
    assert_unbroken(&msgs, 1_500);
    let m = coordinator.scrape().await;
    let errors: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("nanoinfer_coordinator_worker_errors_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(errors, 0.0, "{m:?}");
    assert_eq!(w.abandoned(), 0);
    drop(stalled);
    eventually(
        Duration::from_secs(10),
        "the stalled streams to be cancelled",
        || async { w.abandoned() == 16 },
    )
    .await;
}

/// Probes of an ejected worker back off from 200 ms, doubling, to at most
/// 5 s, each ±25% (`routing::probe_delay`); a worker that answers SERVING
/// again is re-admitted at the next probe and routed to.
#[tokio::test(start_paused = true)]
async fn an_ejected_worker_is_probed_with_capped_backoff_and_readmitted() {
    let hung = fake("hung").await;
    let good = fake("good").await;
    hung.set_fault(Fault::Hang);
    hung.set_serving(false);
    let coordinator = in_process(&["--first-token-timeout", "1"], &[&hung, &good]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 2).await;
    let mut c = client(&addr).await;
    // Until a request meets the silent worker and it is ejected.
    for i in 0..4 {
        collect(&mut c, request(&format!("r{i}"), 2)).await.unwrap();
        if !hung.calls().is_empty() {
            break;
        }
    }
    assert_eq!(hung.calls().len(), 1);
    assert_eq!(health_of(&addr).await.1, 1, "the silent worker is ejected");
    // A minute of probes answered NOT_SERVING.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let checks = hung.health_checks();
    let gaps: Vec<f64> = checks
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    assert!(gaps.len() >= 12, "{gaps:?}");
    // 200, 400, 800, 1600, 3200 ms, then 5 s: each within ±25%.
    for (i, gap) in gaps.iter().enumerate() {
        let base = (0.2 * 2f64.powi(i as i32 + 1)).min(5.0);
        assert!(
            *gap >= base * 0.75 - 0.01 && *gap <= base * 1.25 + 0.01,
            "probe gap {i}: {gap} s against {base} s ±25%: {gaps:?}"
        );
    }
    let readmitted = "nanoinfer_coordinator_worker_readmissions_total{worker=\"hung\"}";
    let m = coordinator.scrape().await;
    assert_eq!(m.get(readmitted).copied().unwrap_or(0.0), 0.0, "{m:?}");
    // Healthy again: re-admitted at the next probe, within the capped delay.
    hung.set_fault(Fault::None);
    hung.set_serving(true);
    let back = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the worker re-admitted",
        || async { health_of(&addr).await.1 == 2 },
    )
    .await;
    assert!(
        back.elapsed() <= Duration::from_millis(6_300),
        "{:?}",
        back.elapsed()
    );
    assert_eq!(coordinator.scrape().await[readmitted], 1.0);
    let before = hung.calls().len();
    for i in 0..4 {
        collect(&mut c, request(&format!("again{i}"), 2))
            .await
            .unwrap();
    }
    assert!(
        hung.calls().len() > before,
        "the re-admitted worker got none of 4"
    );
}

/// A worker's report of other coordinators' requests keeps this
/// coordinator's requests away only while it is fresh (REPORT_TTL, 10 s):
/// an old report must not keep a worker idle for ever.
#[tokio::test(start_paused = true)]
async fn a_load_report_counts_for_ten_seconds() {
    let busy = fake("busy").await;
    let idle = fake("idle").await;
    busy.report_load(9, 0);
    let coordinator = in_process(&[], &[&busy, &idle]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 2).await;
    let mut c = client(&addr).await;
    // Until `busy` has served one request it has reported nothing.
    for i in 0..8 {
        if !busy.calls().is_empty() {
            break;
        }
        collect(&mut c, request(&format!("first{i}"), 1))
            .await
            .unwrap();
    }
    assert_eq!(busy.calls().len(), 1, "rotation reached it");
    // Fresh, its report sends every request to the other worker.
    for i in 0..6 {
        collect(&mut c, request(&format!("fresh{i}"), 1))
            .await
            .unwrap();
    }
    assert_eq!(busy.calls().len(), 1, "9 requests of others on it");
    // Ten seconds later the report is stale: it is routed to again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    for i in 0..2 {
        collect(&mut c, request(&format!("stale{i}"), 1))
            .await
            .unwrap();
    }
    assert_eq!(busy.calls().len(), 2, "an equal tie alternates");
}
