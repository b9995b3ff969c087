//! Integration: `/metrics`, `/healthz` and `/readyz` of the real coordinator
//! and worker, scraped before and after real requests.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{
    collect, eventually, greedy, http_get, scrape, start_coordinator, start_worker, Etcd, PROMPT,
};
use nanoinfer_proto::nanoinfer::infer_service_client::InferServiceClient;

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    let value = |m: &HashMap<String, f64>| m.get(series).copied().unwrap_or(0.0);
    assert!(after.contains_key(series), "{series} is exported");
    value(after) - value(before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_follow_real_requests() {
    let etcd = Etcd::start().await;
    let (mut coordinator, addr) = start_coordinator(&etcd, &[]).await;
    let coordinator_http = coordinator.metrics_addr().await;

    // Live but not ready while no worker is registered.
    assert_eq!(http_get(&coordinator_http, "/healthz").await.0, 200);
    assert_eq!(http_get(&coordinator_http, "/readyz").await.0, 503);

    let mut worker = start_worker(&etcd, "w1", &["--model-name", "gemma"]).await;
    let worker_http = worker.metrics_addr().await;
    assert_eq!(http_get(&worker_http, "/healthz").await.0, 200);
    assert_eq!(http_get(&worker_http, "/readyz").await.0, 200);
    eventually(Duration::from_secs(10), "coordinator ready", || {
        let a = coordinator_http.clone();
        async move { http_get(&a, "/readyz").await.0 == 200 }
    })
    .await;

    let c0 = scrape(&mut coordinator).await;
    let w0 = scrape(&mut worker).await;

    let mut client = InferServiceClient::new(nanoinfer::connect(&addr).await.unwrap());
    let mut prompt_tokens = 0.0;
    for _ in 0..3 {
        let msgs = collect(&mut client, greedy(PROMPT, 5)).await.unwrap();
        prompt_tokens += msgs.last().unwrap().usage.unwrap().prompt_tokens as f64;
    }
    let bad = collect(&mut client, greedy("", 5)).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let c1 = scrape(&mut coordinator).await;
    let w1 = scrape(&mut worker).await;

    // Coordinator.
    let ok = r#"nanoinfer_coordinator_requests_total{api="grpc",model_name="gemma",code="OK",finish_reason="length"}"#;
    assert_eq!(delta(&c0, &c1, ok), 3.0);
    let invalid = r#"nanoinfer_coordinator_requests_total{api="grpc",model_name="",code="INVALID_ARGUMENT",finish_reason=""}"#;
    assert_eq!(delta(&c0, &c1, invalid), 1.0);
    for (series, n) in [
        (
            "nanoinfer_coordinator_time_to_first_token_seconds_count",
            3.0,
        ),
        (
            "nanoinfer_coordinator_inter_token_latency_seconds_count",
            12.0,
        ),
        (
            "nanoinfer_coordinator_e2e_request_latency_seconds_count",
            3.0,
        ),
        (
            "nanoinfer_coordinator_request_queue_time_seconds_count",
            3.0,
        ),
    ] {
        assert_eq!(delta(&c0, &c1, series), n, "{series}");
    }
    assert_eq!(c1["nanoinfer_coordinator_live_workers"], 1.0);
    assert_eq!(c1["nanoinfer_coordinator_num_requests_running"], 0.0);
    assert_eq!(
        c1[r#"nanoinfer_coordinator_worker_requests_in_flight{worker="w1"}"#],
        0.0
    );

    // Worker.
    assert_eq!(
        delta(&w0, &w1, "nanoinfer_worker_prompt_tokens_total"),
        prompt_tokens
    );
    assert_eq!(
        delta(&w0, &w1, "nanoinfer_worker_generation_tokens_total"),
        15.0
    );
    assert_eq!(
        delta(
            &w0,
            &w1,
            r#"nanoinfer_worker_requests_total{finish_reason="length"}"#
        ),
        3.0
    );
    for (series, n) in [
        ("nanoinfer_worker_time_to_first_token_seconds_count", 3.0),
        ("nanoinfer_worker_time_per_output_token_seconds_count", 3.0),
        ("nanoinfer_worker_request_prefill_time_seconds_count", 3.0),
        ("nanoinfer_worker_request_decode_time_seconds_count", 3.0),
        ("nanoinfer_worker_request_queue_time_seconds_count", 3.0),
    ] {
        assert_eq!(delta(&w0, &w1, series), n, "{series}");
    }
    assert!(delta(&w0, &w1, "nanoinfer_worker_request_decode_time_seconds_sum") > 0.0);
    assert_eq!(w1["nanoinfer_worker_num_requests_running"], 0.0);
    assert_eq!(w1["nanoinfer_worker_num_requests_waiting"], 0.0);
    assert_eq!(w1["nanoinfer_worker_kv_cache_usage_perc"], 0.0);
    // Every generated token came out of an engine step; the finished
    // requests' tokens stay warm for prefix reuse, within the default budget.
    assert_eq!(
        delta(
            &c0,
            &c1,
            r#"nanoinfer_coordinator_request_prompt_tokens_sum{model_name="gemma"}"#
        ),
        prompt_tokens
    );
    assert_eq!(
        delta(
            &c0,
            &c1,
            r#"nanoinfer_coordinator_request_generation_tokens_sum{model_name="gemma"}"#
        ),
        15.0
    );
    let steps = delta(&w0, &w1, "nanoinfer_worker_step_duration_seconds_count");
    assert!(steps >= 1.0, "{steps} steps");
    assert_eq!(delta(&w0, &w1, "nanoinfer_worker_step_tokens_count"), steps);
    assert!(delta(&w0, &w1, "nanoinfer_worker_step_tokens_sum") >= steps);
    let kept = w1["nanoinfer_worker_prefix_cache_tokens"];
    assert!(kept > 0.0 && kept <= 2048.0, "{kept} tokens kept");
    assert_eq!(w1["nanoinfer_worker_context_length"], 2048.0);
    assert_eq!(w1["nanoinfer_worker_capacity_slots"], 4.0);
    assert!(w1["nanoinfer_worker_model_load_seconds"] > 0.0);

    // A client that leaves mid-stream is counted as cancelled on the
    // coordinator and as client_left on the worker.
    let mut stream = client
        .infer(greedy(PROMPT, 2000))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    drop(stream);
    let cancelled = r#"nanoinfer_coordinator_requests_total{api="grpc",model_name="gemma",code="CANCELLED",finish_reason=""}"#;
    let left = r#"nanoinfer_worker_requests_total{finish_reason="client_left"}"#;
    // Bounded poll (20 s): scrape both until the outcome shows up.
    let mut counted = false;
    for _ in 0..200 {
        let (c2, w2) = (scrape(&mut coordinator).await, scrape(&mut worker).await);
        if c2.get(cancelled) == Some(&1.0) && w2.get(left) == Some(&1.0) {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted, "the abandoned request was counted on both sides");

    // Shutting down: the worker is not ready any more while it drains.
    worker.terminate();
    assert_eq!(worker.wait_exit(Duration::from_secs(30)).await, Some(0));
    eventually(Duration::from_secs(10), "coordinator not ready", || {
        let a = coordinator_http.clone();
        async move { http_get(&a, "/readyz").await.0 == 503 }
    })
    .await;
}
