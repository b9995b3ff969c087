//! Prefix-affinity routing on two real workers: requests of one "tenant"
//! (a long shared system prompt, short unique questions) land on the same
//! worker, which reuses the prefix from its KV cache; tenants spread over
//! both workers. And load reports, on fake workers with the coordinator in
//! this test's process on a paused clock: a worker that says other
//! coordinators keep it busy gets fewer requests from this one, under each
//! policy; and `--upstream-connections` on a fake worker.

use crate::common;

use std::collections::HashMap;

use common::fake_worker::FakeWorker;
use common::in_process::InProcess;
use common::{collect, greedy, scrape, wait_routable, Cluster};
use nanoinfer_proto::nanoinfer::infer_service_client::InferServiceClient;
use nanoinfer_proto::nanoinfer::InferRequest;

/// A fake worker on this test's runtime, registered nowhere.
async fn fake(id: &str) -> FakeWorker {
    FakeWorker::builder(id).local().start().await
}

#[tokio::test(start_paused = true)]
async fn requests_take_a_workers_upstream_connections_in_turn() {
    let w = fake("a").await;
    let coordinator = InProcess::start(&["--upstream-connections", "3"], &[&w]).await;
    let addr = coordinator.addr.clone();
    wait_routable(&addr, 1).await;
    let mut client = InferServiceClient::new(nanoinfer::connect(&addr).await.unwrap());
    for k in 0..6 {
        collect(&mut client, greedy(&format!("q{k}"), 2))
            .await
            .unwrap();
    }
    let peers: Vec<_> = w.calls().iter().map(|c| c.peer.expect("peer")).collect();
    let distinct: std::collections::HashSet<_> = peers.iter().collect();
    assert_eq!(distinct.len(), 3, "{peers:?}");
    // In turn: the same connection every third request.
    assert_eq!(peers[0], peers[3], "{peers:?}");
    assert_eq!(peers[1], peers[4], "{peers:?}");
}

#[tokio::test(start_paused = true)]
async fn a_worker_reporting_other_coordinators_load_gets_less_traffic() {
    for routing in ["least-loaded", "prefix-affinity", "cache-aware"] {
        let busy = fake("busy").await;
        let idle = fake("idle").await;
        let coordinator = InProcess::start(&["--routing", routing], &[&busy, &idle]).await;
        let addr = coordinator.addr.clone();
        wait_routable(&addr, 2).await;
        let mut client = InferServiceClient::new(nanoinfer::connect(&addr).await.unwrap());
        // Until a request of ours finishes there, this coordinator cannot
        // know: one request reaches each worker first (both idle to it).
        busy.report_load(6, 3);
        let mut k = 0;
        while busy.calls().is_empty() {
            assert!(k < 20, "{routing}: no request reached the busy worker");
            collect(&mut client, greedy(&format!("warm-up {k}"), 2))
                .await
                .unwrap();
            k += 1;
        }
        // Now it knows of 9 requests of others there: sequential requests
        // all go to the other worker, whatever their prompt.
        let before = (busy.calls().len(), idle.calls().len());
        for k in 0..6 {
            collect(&mut client, greedy(&format!("question {k}"), 2))
                .await
                .unwrap();
        }
        assert_eq!(busy.calls().len(), before.0, "{routing}");
        assert_eq!(idle.calls().len(), before.1 + 6, "{routing}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_tenant_requests_go_to_the_worker_holding_their_prefix() {
    let mut cluster =
        Cluster::start(2, &["--parallel", "2"], &["--routing", "prefix-affinity"]).await;
    let mut client = cluster.client().await;
    let hits = "nanoinfer_worker_prefix_cache_hit_tokens_total";
    let mut before = 0.0;
    for w in cluster.workers.iter_mut() {
        before += scrape(w).await.get(hits).copied().unwrap_or(0.0);
    }
    let tenants = ["acme", "globex", "initech"];
    for round in 0..3 {
        for tenant in tenants {
            let system = format!(
                "You are the assistant of {tenant}. Answer questions about {tenant}'s products \
                 politely and briefly. "
            )
            .repeat(4);
            let request = InferRequest {
                request_id: format!("{tenant}-{round}"),
                ..greedy(
                    &format!("{system}Question {round}: what do you sell? Answer:"),
                    2,
                )
            };
            collect(&mut client, request).await.unwrap();
        }
    }

    // Where each request went, from the coordinator's routing log lines.
    let log = cluster.coordinator.log();
    let mut worker_of: HashMap<String, String> = HashMap::new();
    for line in log.lines().filter(|l| l.contains("routing request")) {
        let field = |name: &str| {
            line.split(&format!("{name}="))
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(|v| v.trim_matches('"').to_string())
        };
        if let (Some(id), Some(worker)) = (field("request_id"), field("worker")) {
            worker_of.insert(id, worker);
        }
    }
    let mut used = Vec::new();
    for tenant in tenants {
        let first = &worker_of[&format!("{tenant}-0")];
        for round in 1..3 {
            assert_eq!(
                &worker_of[&format!("{tenant}-{round}")],
                first,
                "{tenant}'s requests stay on one worker: {worker_of:?}"
            );
        }
        used.push(first.clone());
    }
    used.sort();
    used.dedup();
    assert_eq!(
        used.len(),
        2,
        "tenants spread over both workers: {worker_of:?}"
    );

    // The coordinator counted 6 hits and 3 misses; the workers reused the
    // shared prefixes.
    let metrics = scrape(&mut cluster.coordinator).await;
    let picks = |o: &str| {
        metrics
            .get(&format!(
                "nanoinfer_coordinator_prefix_affinity_picks_total{{outcome=\"{o}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
    };
    assert_eq!((picks("hit"), picks("miss")), (6.0, 3.0));
    let mut after = 0.0;
    for w in cluster.workers.iter_mut() {
        after += scrape(w).await.get(hits).copied().unwrap_or(0.0);
    }
    assert!(
        after - before > 6.0 * 50.0,
        "{} tokens reused",
        after - before
    );
}
