//! Integration: routing and failure handling with a real etcd, several real
//! workers and a real coordinator.

use crate::common;

use std::time::{Duration, Instant};

use common::{collect, eventually, greedy, start_coordinator, Cluster, Etcd, PROMPT};
use nanoinfer_proto::nanoinfer::{HealthRequest, InferRequest};
use tonic::Code;

/// Request ids a worker's log says it served.
fn served(worker: &common::Proc, ids: &[String]) -> usize {
    let log = worker.log();
    ids.iter()
        .filter(|id| {
            log.lines()
                .any(|l| l.contains("generate queued") && l.contains(id.as_str()))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_use_both_workers() {
    let cluster = Cluster::start(2, &[], &[]).await;
    let client = cluster.client().await;
    let ids: Vec<String> = (0..4).map(|i| format!("concurrent-{i}")).collect();
    let mut tasks = Vec::new();
    for id in &ids {
        let mut c = client.clone();
        let req = InferRequest {
            request_id: id.clone(),
            ..greedy(PROMPT, 8)
        };
        tasks.push(tokio::spawn(async move { collect(&mut c, req).await }));
    }
    for t in tasks {
        let msgs = t.await.unwrap().unwrap();
        assert_eq!(msgs.last().unwrap().usage.unwrap().generated_tokens, 8);
    }
    let (a, b) = (
        served(&cluster.workers[0], &ids),
        served(&cluster.workers[1], &ids),
    );
    assert_eq!(a + b, 4, "every request was served once");
    assert!(a > 0 && b > 0, "both workers served traffic ({a} and {b})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_leaves_after_its_lease_and_requests_go_to_the_other() {
    let mut cluster = Cluster::start(2, &[], &[]).await;
    cluster.workers[0].kill();
    // Requests succeed even before the lease expires (the coordinator moves
    // on from a worker it cannot reach)...
    let mut client = cluster.client().await;
    let msgs = collect(&mut client, greedy(PROMPT, 2)).await.unwrap();
    assert_eq!(msgs.last().unwrap().usage.unwrap().generated_tokens, 2);
    // ...the unreachable worker is ejected from routing at once...
    assert_eq!(cluster.live_workers().await, 1);
    // ...and once the 3 s lease expires its record leaves etcd.
    let started = Instant::now();
    common::eventually(Duration::from_secs(15), "the lease to expire", || async {
        cluster.etcd.worker_ids().await == vec!["w2".to_string()]
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(15));
    let ids: Vec<String> = (0..3).map(|i| format!("after-kill-{i}")).collect();
    for id in &ids {
        let req = InferRequest {
            request_id: id.clone(),
            ..greedy(PROMPT, 2)
        };
        collect(&mut client, req).await.unwrap();
    }
    assert_eq!(served(&cluster.workers[1], &ids), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_worker_leaves_at_once_and_exits_cleanly() {
    // A long lease: leaving quickly can only come from the revocation.
    let mut cluster = Cluster::start(2, &["--lease-ttl", "60"], &[]).await;
    let started = Instant::now();
    cluster.workers[0].terminate();
    assert_eq!(
        cluster.workers[0].wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );
    cluster.wait_live(1).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "left in {:?}",
        started.elapsed()
    );
    assert!(cluster.workers[0].log().contains("lease revoked"));
    let mut client = cluster.client().await;
    collect(&mut client, greedy(PROMPT, 2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_stream_finish() {
    let mut cluster = Cluster::start(1, &["--lease-ttl", "60"], &[]).await;
    let mut client = cluster.client().await;
    let mut stream = client.infer(greedy(PROMPT, 40)).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    let worker_addr = cluster.workers[0].listen_addr().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        nanoinfer::connect(&worker_addr).await.unwrap(),
    );
    let check = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let status = health
        .check(check.clone())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, serving);
    cluster.workers[0].terminate();
    // Health goes NOT_SERVING first, while the stream is still running.
    eventually(Duration::from_secs(5), "worker health NOT_SERVING", || {
        let (mut h, c) = (health.clone(), check.clone());
        async move {
            h.check(c)
                .await
                .map(|r| r.into_inner().status != serving)
                .unwrap_or(false)
        }
    })
    .await;
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        last = Some(m);
    }
    let usage = last.unwrap().usage.unwrap();
    assert_eq!(usage.generated_tokens, 40, "the stream ran to completion");
    assert_eq!(
        cluster.workers[0].wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_is_unavailable_quickly() {
    let etcd = Etcd::start().await;
    let (_coordinator, addr) = start_coordinator(&etcd, &[]).await;
    let mut client = nanoinfer_proto::nanoinfer::infer_service_client::InferServiceClient::new(
        nanoinfer::connect(&addr).await.unwrap(),
    );
    let health = client.health(HealthRequest {}).await.unwrap().into_inner();
    assert_ne!(health.status, "OK");
    assert_eq!(health.live_workers, 0);
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        collect(&mut client, greedy(PROMPT, 2)),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_keeps_serving_its_last_known_set_while_etcd_is_down() {
    let cluster = Cluster::start(1, &[], &[]).await;
    let Cluster {
        etcd,
        workers,
        coordinator,
        addr,
    } = cluster;
    drop(etcd);
    let mut client = nanoinfer_proto::nanoinfer::infer_service_client::InferServiceClient::new(
        nanoinfer::connect(&addr).await.unwrap(),
    );
    // Give the coordinator time to notice etcd is gone.
    eventually(Duration::from_secs(20), "the coordinator to notice", || {
        let log = coordinator.log();
        async move { log.contains("etcd discovery interrupted") }
    })
    .await;
    let msgs = collect(&mut client, greedy(PROMPT, 2)).await.unwrap();
    assert_eq!(msgs.last().unwrap().usage.unwrap().generated_tokens, 2);
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_is_lost_registers_again() {
    let mut cluster = Cluster::start(1, &[], &[]).await;
    // Revoke the worker's lease behind its back, as an expiry would.
    let mut etcd = etcd_client::Client::connect([cluster.etcd.endpoint.clone()], None)
        .await
        .unwrap();
    let leases = etcd.leases().await.unwrap();
    assert_eq!(leases.leases().len(), 1);
    etcd.lease_revoke(leases.leases()[0].id()).await.unwrap();
    assert!(cluster.etcd.worker_ids().await.is_empty());
    // The keep-alive notices and puts the record back under a new lease.
    cluster.workers[0]
        .wait_for_line("re-registered in etcd", Duration::from_secs(15))
        .await;
    assert_eq!(cluster.etcd.worker_ids().await, vec!["w1".to_string()]);
    cluster.wait_live(1).await;
    let mut client = cluster.client().await;
    collect(&mut client, greedy(PROMPT, 2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_coordinator_finishes_open_streams_then_exits() {
    let mut cluster = Cluster::start(1, &[], &[]).await;
    let mut client = cluster.client().await;
    let mut stream = client.infer(greedy(PROMPT, 40)).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    cluster.coordinator.terminate();
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        last = Some(m);
    }
    assert_eq!(last.unwrap().usage.unwrap().generated_tokens, 40);
    assert_eq!(
        cluster.coordinator.wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );
}
