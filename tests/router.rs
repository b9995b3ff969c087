//! The router-tax measurement path: the paced test-double worker
//! (`examples/paced_worker.rs --stamp`) writes each token's send time into
//! its text, and `nanoinfer-bench` measures every token's transit time
//! direct and through a real coordinator, with the coordinator's memory and
//! CPU time, over streams that share connections.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_each_tokens_transit_direct_and_through_the_coordinator() {
    let etcd = Etcd::start().await;
    let worker_addr = format!("127.0.0.1:{}", free_port());
    let mut worker = Proc::spawn(
        "paced-worker",
        Command::new(bin("examples/paced_worker")).args([
            "--etcd",
            &etcd.endpoint,
            "--listen",
            &worker_addr,
            "--tokens-per-second",
            "100",
            "--stamp",
        ]),
    );
    worker
        .wait_for_line("paced worker on", Duration::from_secs(20))
        .await;
    let (coordinator, addr) = start_coordinator(&etcd, &[]).await;
    wait_routable(&addr, 1).await;

    let out = Command::new(bin("nanoinfer-bench"))
        .args(["--worker", &format!("http://{worker_addr}")])
        .args(["--coordinator", &addr])
        .args([
            "--concurrency",
            "4",
            "--requests",
            "2",
            "--connections",
            "2",
        ])
        .args(["--max-tokens", "10", "--prompt-words", "4"])
        .args(["--rss-pid", &coordinator.pid().to_string(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for target in ["worker", "coordinator"] {
        let r = &report[target];
        assert_eq!(r["generated_tokens"], 10.0, "{target}: {r}");
        assert!(r["errors"].as_object().unwrap().is_empty(), "{target}: {r}");
        let transit = &r["token_transit_us_percentiles"];
        let (p50, p99) = (
            transit["p50"].as_f64().unwrap(),
            transit["p99"].as_f64().unwrap(),
        );
        // Every token crossed loopback after it was stamped: more than
        // nothing, and well under a second on any machine.
        assert!(p50 > 0.0 && p50 <= p99, "{target}: {transit}");
        assert!(p99 < 1e6, "{target}: a token took over a second: {transit}");
    }
    let c = &report["coordinator"];
    let (before, peak) = (
        c["rss_bytes_before"].as_u64().unwrap(),
        c["rss_bytes_peak"].as_u64().unwrap(),
    );
    assert!(before > 0 && peak >= before, "{c}");
    assert!(c["watched_cpu_seconds"].as_f64().unwrap() >= 0.0, "{c}");
    assert!(c["decode_tokens_per_s_all_streams"].as_f64().unwrap() > 0.0);
}
