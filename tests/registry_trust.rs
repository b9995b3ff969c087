//! Trust in the etcd registry (DESIGN.md "Trust": each worker may write only
//! its own etcd key), on a real etcd with real workers and coordinators:
//! - a record whose id or model name could forge log lines is skipped, not
//!   routed;
//! - with the per-worker users of `deploy/etcd-auth.sh`, one worker's
//!   credential cannot write another worker's key;
//! - a live worker whose record is overwritten or deleted writes it back
//!   within seconds and counts it; while another live lease holds it the
//!   worker is not ready, and takes it back when that lease ends;
//! - a second worker with an id in use fails to start, while a restart
//!   after the first's lease is gone registers.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fake_worker::FakeWorker;
use common::*;
use etcd_client::PutOptions;

const PREFIX: &str = "/nanoinfer/workers/";

fn record(id: &str, address: &str, model_name: &str) -> String {
    serde_json::json!({
        "id": id,
        "address": address,
        "model": "fake",
        "model_name": model_name,
        "capacity": {"slots": 1, "queue": 1, "context_length": 64},
        "version": "test",
    })
    .to_string()
}

/// The count of skipped worker records on the coordinator whose metrics
/// listen on `metrics`.
async fn skipped(metrics: &str) -> f64 {
    let (_, body) = http_get(metrics, "/metrics").await;
    parse_metrics(&body)
        .get("nanoinfer_coordinator_malformed_worker_records")
        .copied()
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_whose_id_or_model_name_could_forge_log_lines_are_not_routed() {
    let etcd = Etcd::start().await;
    let good = FakeWorker::start(&etcd.endpoint, "good", 30).await;
    // Each points at a real worker, so only the record itself is at fault.
    let forged_id = "evil\nFORGED worker joined";
    etcd.put(
        &format!("{PREFIX}{forged_id}"),
        &record(forged_id, &good.addr, "gemma"),
    )
    .await;
    etcd.put(
        &format!("{PREFIX}quoted"),
        &record("quoted", &good.addr, r#"gemma" injected="1"#),
    )
    .await;
    etcd.put(
        &format!("{PREFIX}dotted.id"),
        &record("dotted.id", &good.addr, "gemma"),
    )
    .await;
    let (mut coordinator, addr) = start_coordinator(&etcd, &[]).await;
    let metrics = coordinator.metrics_addr().await;
    eventually(Duration::from_secs(20), "3 skipped records", || async {
        skipped(&metrics).await == 3.0
    })
    .await;
    wait_routable(&addr, 1).await;

    // A record that arrives by the watch, not the first listing.
    let forged_model = "gemma\nFORGED model line";
    etcd.put(
        &format!("{PREFIX}late"),
        &record("late", &good.addr, forged_model),
    )
    .await;
    eventually(Duration::from_secs(10), "4 skipped records", || async {
        skipped(&metrics).await == 4.0
    })
    .await;
    assert_eq!(health_of(&addr).await.1, 1, "only the good worker routes");

    let log = coordinator.log();
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a record forged a log line:\n{log}"
    );
    assert!(log.contains("skipping malformed worker record"), "{log}");
    assert!(log.contains(r"evil\nFORGED"), "escaped in the log:\n{log}");
}

/// `deploy/etcd-auth.sh`, killed if it runs past a minute.
fn etcd_auth_command() -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg("60").arg(repo_root().join("deploy/etcd-auth.sh"));
    cmd
}

/// Runs `deploy/etcd-auth.sh dir ids…` against `endpoint`.
fn etcd_auth(endpoint: &str, dir: &Path, args: &[&str]) -> std::process::Output {
    etcd_auth_command()
        .arg(dir)
        .args(args)
        .env("ETCDCTL_ENDPOINTS", endpoint)
        .env_remove("ETCDCTL_USER")
        .env_remove("ETCDCTL_PASSWORD")
        .output()
        .expect("run deploy/etcd-auth.sh")
}

/// A client logged in as `user` with the password in `dir/file`.
async fn client_as(etcd: &Etcd, dir: &Path, user: &str, file: &str) -> etcd_client::Client {
    let password = std::fs::read_to_string(dir.join(file)).unwrap();
    let options = etcd_client::ConnectOptions::new()
        .with_user(user, password.trim_end())
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5));
    etcd_client::Client::connect([etcd.endpoint.clone()], Some(options))
        .await
        .unwrap()
}

fn denied<T: std::fmt::Debug>(result: Result<T, etcd_client::Error>, what: &str) {
    let err = result.expect_err(what);
    assert!(
        err.to_string().contains("permission denied"),
        "{what}: {err}"
    );
}

/// The flags of a worker `id` logged in as its own etcd user.
fn worker_auth(dir: &Path, id: &str) -> [String; 4] {
    [
        "--etcd-username".into(),
        format!("nanoinfer-worker-{id}"),
        "--etcd-password-file".into(),
        dir.join(format!("etcd-worker-{id}.password"))
            .display()
            .to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_workers_etcd_credential_cannot_write_another_workers_key() {
    let etcd = Etcd::start().await;
    let dir = temp_dir("registry-trust-auth");

    // --help touches nothing: pointed at a closed port, it still succeeds.
    let help = etcd_auth_command()
        .arg("--help")
        .env(
            "ETCDCTL_ENDPOINTS",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .output()
        .unwrap();
    assert_ok(&help, "etcd-auth.sh --help");
    let usage = String::from_utf8_lossy(&help.stdout);
    assert!(
        usage.contains("WORKER_ID") && usage.contains("nanoinfer-worker-<id>"),
        "{usage}"
    );
    let bad = etcd_auth(&etcd.endpoint, &dir, &["bad.id"]);
    assert_eq!(bad.status.code(), Some(2), "a bad id is refused");

    let out = etcd_auth(&etcd.endpoint, &dir, &["w1", "w2"]);
    assert_ok(&out, "etcd-auth.sh DIR w1 w2");

    // Real workers register as their own users (a transaction, a lease and
    // a watch on their own key), and the coordinator reads them as its own.
    let model = model_path();
    let ids = ["w1", "w2"];
    let auth: Vec<[String; 4]> = ids.iter().map(|id| worker_auth(&dir, id)).collect();
    let _workers = start_workers_with(&etcd, &ids, &model, |i| {
        auth[i].iter().map(String::as_str).collect()
    })
    .await;
    let coordinator_file = dir.join("etcd-coordinator.password");
    let (_coordinator, addr) = start_coordinator(
        &etcd,
        &[
            "--etcd-username",
            "nanoinfer-coordinator",
            "--etcd-password-file",
            coordinator_file.to_str().unwrap(),
        ],
    )
    .await;
    wait_routable(&addr, 2).await;

    let mut root = client_as(&etcd, &dir, "root", "etcd-root.password").await;
    let w2_key = format!("{PREFIX}w2");
    let before = root.get(w2_key.as_str(), None).await.unwrap();
    let before = before.kvs()[0].clone();

    // As w1: its own key only.
    let mut w1 = client_as(
        &etcd,
        &dir,
        "nanoinfer-worker-w1",
        "etcd-worker-w1.password",
    )
    .await;
    let hijack = record("w2", "127.0.0.1:1", "gemma");
    denied(
        w1.put(w2_key.as_str(), hijack.as_str(), None).await,
        "w1 puts w2's key",
    );
    denied(
        w1.delete(w2_key.as_str(), None).await,
        "w1 deletes w2's key",
    );
    denied(
        w1.put(format!("{PREFIX}w10"), hijack.as_str(), None).await,
        "w1 puts w10's key (no prefix grant)",
    );
    denied(
        w1.delete(
            PREFIX,
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await,
        "w1 deletes the prefix",
    );
    denied(w1.get(w2_key.as_str(), None).await, "w1 reads w2's key");
    let own = w1.get(format!("{PREFIX}w1"), None).await.unwrap();
    assert_eq!(own.kvs().len(), 1, "w1 reads its own key");
    // The coordinator reads, and writes nothing.
    let mut coordinator = client_as(
        &etcd,
        &dir,
        "nanoinfer-coordinator",
        "etcd-coordinator.password",
    )
    .await;
    denied(
        coordinator
            .put(w2_key.as_str(), hijack.as_str(), None)
            .await,
        "the coordinator puts a key",
    );

    let after = root.get(w2_key.as_str(), None).await.unwrap();
    let after = &after.kvs()[0];
    assert_eq!(
        (after.value(), after.lease(), after.mod_revision()),
        (before.value(), before.lease(), before.mod_revision()),
        "w2's record is untouched"
    );
    assert_eq!(health_of(&addr).await.1, 2);

    // Run again with a new id while auth is on: it adds only that worker.
    let out = etcd_auth(&etcd.endpoint, &dir, &["w3"]);
    assert_ok(&out, "etcd-auth.sh DIR w3 with auth on");
    let mut w3 = client_as(
        &etcd,
        &dir,
        "nanoinfer-worker-w3",
        "etcd-worker-w3.password",
    )
    .await;
    w3.put(format!("{PREFIX}w3"), "x", None).await.unwrap();
    w3.delete(format!("{PREFIX}w3"), None).await.unwrap();
    denied(w3.put(w2_key.as_str(), "x", None).await, "w3 puts w2's key");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until `key` holds `value` on `lease`; returns how long it took.
async fn until_restored(etcd: &Etcd, key: &str, value: &str, lease: i64, what: &str) -> Duration {
    let started = Instant::now();
    eventually(Duration::from_secs(5), what, || async {
        etcd.kv(key).await == Some((value.to_string(), lease))
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwritten_or_deleted_record_of_a_live_worker_is_repaired_at_once() {
    let etcd = Etcd::start().await;
    // A long lease: the record must come back because the worker watches
    // it, not because its lease ran out and it registered again.
    let mut worker = start_worker(&etcd, "w1", &["--lease-ttl", "60"]).await;
    let (coordinator, addr) = start_coordinator(&etcd, &[]).await;
    wait_routable(&addr, 1).await;
    let key = format!("{PREFIX}w1");
    let (value, lease) = etcd.kv(&key).await.expect("registered");
    assert_ne!(lease, 0);
    let mut c = etcd.client().await;

    // Overwritten with another address, on no lease (as `etcdctl put` by
    // anyone allowed to write the key does).
    let v: serde_json::Value = serde_json::from_str(&value).unwrap();
    let hijack = record("w1", "127.0.0.1:1", v["model_name"].as_str().unwrap());
    c.put(key.as_str(), hijack.as_str(), None).await.unwrap();
    let took = until_restored(&etcd, &key, &value, lease, "the overwritten record back").await;
    println!("overwritten record repaired in {took:?}");

    // The same value, detached from the lease.
    c.put(key.as_str(), value.as_str(), None).await.unwrap();
    let took = until_restored(&etcd, &key, &value, lease, "the record back on its lease").await;
    println!("detached record repaired in {took:?}");

    // Deleted.
    c.delete(key.as_str(), None).await.unwrap();
    let took = until_restored(&etcd, &key, &value, lease, "the deleted record back").await;
    println!("deleted record repaired in {took:?}");

    // Repeatedly: each is repaired, none is fought over.
    for i in 0..3 {
        c.put(key.as_str(), format!("junk {i}"), None)
            .await
            .unwrap();
        until_restored(&etcd, &key, &value, lease, "the record back again").await;
    }
    let log = worker.log();
    assert!(log.contains("record was overwritten; repaired"), "{log}");
    assert!(log.contains("record was deleted; repaired"), "{log}");
    let metrics = worker.metrics_addr().await;
    let repairs = || async {
        let (_, body) = http_get(&metrics, "/metrics").await;
        parse_metrics(&body)["nanoinfer_worker_etcd_record_repairs_total"]
    };
    assert_eq!(repairs().await, 6.0);

    // Taken by another live lease (a second process with w1's credential):
    // not fought over, and the worker says it is not ready meanwhile...
    let other = c.lease_grant(60, None).await.unwrap().id();
    c.put(
        key.as_str(),
        hijack.as_str(),
        Some(PutOptions::new().with_lease(other)),
    )
    .await
    .unwrap();
    let readyz = || async { http_get(&metrics, "/readyz").await.0 };
    eventually(
        Duration::from_secs(5),
        "w1 not ready while displaced",
        || async { readyz().await == 503 },
    )
    .await;
    assert_eq!(etcd.kv(&key).await, Some((hijack.clone(), other)));
    // ...until that lease ends: the record comes back and so does readiness.
    c.lease_revoke(other).await.unwrap();
    until_restored(
        &etcd,
        &key,
        &value,
        lease,
        "the record back after the other lease",
    )
    .await;
    eventually(Duration::from_secs(5), "w1 ready again", || async {
        readyz().await == 200
    })
    .await;
    assert_eq!(repairs().await, 7.0);
    // The coordinator followed: it knows the worker at its own address.
    let address = v["address"].as_str().unwrap();
    eventually(
        Duration::from_secs(5),
        "the coordinator back on w1's address",
        || async {
            let log = coordinator.log();
            let last = log.lines().rfind(|l| l.contains("worker joined"));
            last.is_some_and(|l| l.contains(&format!("address={address}")))
        },
    )
    .await;
    assert_eq!(health_of(&addr).await.1, 1);

    // A graceful stop still removes the record (the guard does not put it
    // back after the revoke).
    worker.terminate();
    assert_eq!(worker.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(etcd.kv(&key).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_with_an_id_in_use_fails_to_start() {
    let etcd = Etcd::start().await;
    let model = model_path();
    let key = format!("{PREFIX}w1");
    let mut first = start_worker(&etcd, "w1", &[]).await;
    let held = etcd.kv(&key).await.expect("registered");

    let mut second = spawn_worker(&etcd, "w1", &model, &[]);
    let code = second.wait_exit(Duration::from_secs(60)).await;
    let log = second.log();
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains(r#"worker id "w1" is in use"#), "{log}");
    assert!(!log.contains("worker ready"), "{log}");
    assert_eq!(
        etcd.kv(&key).await,
        Some(held.clone()),
        "the first keeps its record"
    );
    assert_eq!(etcd.worker_ids().await, ["w1"]);

    // Killed without revoking its lease: a restart waits that lease out
    // (3 s here) and registers.
    first.kill();
    let started = Instant::now();
    let mut restarted = start_worker(&etcd, "w1", &[]).await;
    println!(
        "registered {:?} after the first was killed",
        started.elapsed()
    );
    let (value, lease) = etcd.kv(&key).await.expect("registered again");
    assert_ne!(lease, held.1);
    assert_ne!(value, held.0, "a new address");

    // Stopped gracefully (lease revoked): a restart registers at once.
    restarted.terminate();
    assert_eq!(restarted.wait_exit(Duration::from_secs(30)).await, Some(0));
    let mut again = spawn_worker(&etcd, "w1", &model, &[]);
    again
        .wait_for_line("worker ready", Duration::from_secs(60))
        .await;
    assert!(
        !again.log().contains("held by another lease"),
        "{}",
        again.log()
    );
}
