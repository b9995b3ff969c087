//! API keys at the coordinator's door, on the real coordinator binary with
//! a fake worker behind it: a missing or wrong key is UNAUTHENTICATED, the
//! right one is served, probes need none, and a rotated keys file takes
//! effect without a restart. The `nanoinfer` CLI sends its `--api-key`.

use crate::common;

use std::time::Duration;

use common::fake_worker::FakeWorker;
use common::*;
use nanoinfer_proto::nanoinfer::infer_service_client::InferServiceClient;
use tonic::Code;

async fn call(addr: &str, key: Option<&str>) -> Result<(), tonic::Status> {
    let mut client = InferServiceClient::new(nanoinfer::connect(addr).await.unwrap());
    let mut req = tonic::Request::new(greedy("hello", 2));
    if let Some(key) = key {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    let mut stream = client.infer(req).await?.into_inner();
    while stream.message().await?.is_some() {}
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_needs_a_listed_key_and_keys_rotate_without_a_restart() {
    let etcd = Etcd::start().await;
    let _w = FakeWorker::start(&etcd.endpoint, "a", 30).await;
    let dir = std::env::temp_dir().join(format!("nanoinfer-auth-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("api-keys");
    std::fs::write(&keys, "# the team's key\nfirst-secret-key\n").unwrap();
    let (mut coordinator, addr) =
        start_coordinator(&etcd, &["--api-keys-file", keys.to_str().unwrap()]).await;
    coordinator
        .wait_for_line("API keys required", Duration::from_secs(5))
        .await;
    // Health is open without a key.
    wait_routable(&addr, 1).await;

    let missing = call(&addr, None).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    assert!(missing.message().contains("Bearer"), "{missing:?}");
    let wrong = call(&addr, Some("guess")).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    call(&addr, Some("first-secret-key")).await.unwrap();
    assert!(
        !coordinator.log().contains("first-secret-key") && !coordinator.log().contains("guess"),
        "keys are never logged"
    );

    // The CLI sends its key.
    let cli = |key: &str| {
        std::process::Command::new(bin("nanoinfer"))
            .args([
                "--addr",
                &addr,
                "--api-key",
                key,
                "infer",
                "hi",
                "--max-tokens",
                "2",
            ])
            .output()
            .unwrap()
    };
    assert!(cli("first-secret-key").status.success());
    let refused = cli("guess");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"));

    // Rotation: the old key stops working, the new one works, no restart.
    std::fs::write(&keys, "second-secret-key\n").unwrap();
    eventually(
        Duration::from_secs(10),
        "the rotated key to apply",
        || async { call(&addr, Some("second-secret-key")).await.is_ok() },
    )
    .await;
    let old = call(&addr, Some("first-secret-key")).await.unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated);

    let m = scrape(&mut coordinator).await;
    assert_eq!(
        m["nanoinfer_coordinator_auth_rejections_total{reason=\"missing\"}"],
        1.0
    );
    assert!(m["nanoinfer_coordinator_auth_rejections_total{reason=\"invalid\"}"] >= 3.0);
    // Probes stay open.
    let (status, _) = http_get(&coordinator.metrics_addr().await, "/readyz").await;
    assert_eq!(status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_keys_file_auth_is_off_and_says_so() {
    let etcd = Etcd::start().await;
    let (mut coordinator, _addr) = start_coordinator(&etcd, &[]).await;
    coordinator
        .wait_for_line("authentication is off", Duration::from_secs(5))
        .await;
    // A keys file with no key is refused at start.
    let empty = std::env::temp_dir().join(format!("nanoinfer-empty-keys-{}", std::process::id()));
    std::fs::write(&empty, "# none yet\n").unwrap();
    let mut refused = Proc::spawn(
        "coordinator-empty-keys",
        std::process::Command::new(bin("nanoinfer-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--etcd-endpoints", &etcd.endpoint])
            .args(["--api-keys-file", empty.to_str().unwrap()]),
    );
    assert_ne!(refused.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(refused.log().contains("no key in it"), "{}", refused.log());
    let _ = std::fs::remove_file(&empty);
}
