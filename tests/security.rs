//! TLS at the door and mutual TLS inside the cluster, on the real binaries
//! with certificates from `scripts/gen-certs`:
//! - the public port speaks TLS with the CA and refuses plaintext clients;
//!   a replaced certificate is served without a restart; with
//!   `--tls-client-ca` (the client CA) a client without a certificate, or
//!   with a cluster certificate, is refused;
//! - a worker serves only callers with the coordinator role (a cluster
//!   certificate naming `coordinator.nanoinfer`): not the public client's,
//!   etcd's or another worker's certificate, also after a reload;
//! - fake workers registered in etcd (plaintext, or with a certificate from
//!   another CA) get no prompt while every request succeeds on the real
//!   worker; a real worker's record pointed at an impostor holding another
//!   worker's valid certificate gets no prompt either.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::fake_worker::FakeWorker;
use common::*;
use nanoinfer_proto::nanoinfer::{infer_service_client::InferServiceClient, HealthRequest};
use nanoinfer_proto::tls::ServerTlsFiles;
use nanoinfer_proto::worker::worker_service_client::WorkerServiceClient;
use nanoinfer_proto::worker::{GenerateRequest, LoadRequest};
use tonic::transport::Channel;
use tonic::Code;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

async fn health(channel: Channel) -> Result<String, tonic::Status> {
    InferServiceClient::new(channel)
        .health(HealthRequest {})
        .await
        .map(|r| r.into_inner().status)
}

/// The coordinator's health over TLS with `ca` (and a client certificate).
async fn tls_health(
    addr: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<String, String> {
    let channel = tls_channel(addr, ca, identity, None)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    health(channel).await.map_err(|e| format!("{e:?}"))
}

/// A plaintext client gets no answer from a TLS port (an error, not a hang).
async fn plaintext_refused(addr: &str) {
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        match nanoinfer::connect(addr).await {
            Ok(channel) => health(channel).await.map_err(|e| format!("{e:?}")),
            Err(e) => Err(format!("connect: {e:?}")),
        }
    })
    .await
    .expect("a plaintext client is answered (refused) within 10 s");
    assert!(result.is_err(), "plaintext client was served: {result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_port_serves_tls_refuses_plaintext_and_follows_a_rotated_certificate() {
    let dir = temp_dir("tls-public");
    let certs = gen_certs(&dir.join("a"), &[]);
    let other = gen_certs(&dir.join("b"), &[]);
    // The files the coordinator serves; rotated below by overwriting them.
    let (cert, key) = (dir.join("served.pem"), dir.join("served.key"));
    std::fs::copy(certs.join("server.pem"), &cert).unwrap();
    std::fs::copy(certs.join("server.key"), &key).unwrap();

    let etcd = Etcd::start().await;
    let _w = FakeWorker::start(&etcd.endpoint, "a", 30).await;
    let (mut coordinator, addr) =
        start_coordinator(&etcd, &["--tls-cert", p(&cert), "--tls-key", p(&key)]).await;
    coordinator
        .wait_for_line("TLS on the public port", Duration::from_secs(5))
        .await;
    let addr = addr.trim_start_matches("http://").to_string();
    let ca = certs.join("ca.pem");

    // The handshake works with the CA; requests stream as before.
    assert_eq!(tls_health(&addr, &ca, None).await, Ok("OK".into()));
    let channel = tls_channel(&addr, &ca, None, None).await.unwrap();
    let msgs = collect(&mut InferServiceClient::new(channel), greedy("hi", 3))
        .await
        .unwrap();
    assert_eq!(msgs.last().unwrap().usage.unwrap().generated_tokens, 3);
    // The CLI takes the CA.
    let out = Command::new(bin("nanoinfer"))
        .args([
            "--addr",
            &addr,
            "--ca",
            p(&ca),
            "infer",
            "hello",
            "--max-tokens",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A client that does not trust the CA, and a plaintext one, are refused.
    let wrong = tls_health(&addr, &other.join("ca.pem"), None).await;
    assert!(wrong.is_err(), "{wrong:?}");
    plaintext_refused(&addr).await;

    // Rotation: the other CA's certificate replaces the served one (key
    // first, as a deploy tool writes them); new connections get it.
    std::fs::copy(other.join("server.key"), &key).unwrap();
    std::fs::copy(other.join("server.pem"), &cert).unwrap();
    coordinator
        .wait_for_line("TLS certificate reloaded", Duration::from_secs(10))
        .await;
    eventually(Duration::from_secs(10), "the rotated certificate", || {
        let (addr, ca) = (addr.clone(), other.join("ca.pem"));
        async move { tls_health(&addr, &ca, None).await.is_ok() }
    })
    .await;
    let old = tls_health(&addr, &ca, None).await;
    assert!(old.is_err(), "the old certificate is still served: {old:?}");
    let metrics = scrape(&mut coordinator).await;
    assert!(
        metrics["nanoinfer_coordinator_tls_handshake_failures_total"] >= 2.0,
        "{metrics:?}"
    );
    drop(coordinator);

    // Client certificates: --tls-client-ca (the client CA, not the
    // cluster's) refuses clients without one.
    let (mut coordinator, addr) = start_coordinator(
        &etcd,
        &[
            "--tls-cert",
            p(&certs.join("server.pem")),
            "--tls-key",
            p(&certs.join("server.key")),
            "--tls-client-ca",
            p(&certs.join("client-ca.pem")),
        ],
    )
    .await;
    coordinator
        .wait_for_line("TLS on the public port", Duration::from_secs(5))
        .await;
    let addr = addr.trim_start_matches("http://").to_string();
    let anonymous = tls_health(&addr, &ca, None).await;
    assert!(anonymous.is_err(), "{anonymous:?}");
    let foreign = tls_health(
        &addr,
        &ca,
        Some((&other.join("client.pem"), &other.join("client.key"))),
    )
    .await;
    assert!(foreign.is_err(), "{foreign:?}");
    // A cluster certificate is not a public client's.
    let cluster = tls_health(
        &addr,
        &ca,
        Some((
            &certs.join("coordinator.pem"),
            &certs.join("coordinator.key"),
        )),
    )
    .await;
    assert!(cluster.is_err(), "{cluster:?}");
    let client = (certs.join("client.pem"), certs.join("client.key"));
    assert_eq!(
        tls_health(&addr, &ca, Some((&client.0, &client.1))).await,
        Ok("OK".into())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn generate(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        request_id: "direct".into(),
        prompt: prompt.into(),
        max_tokens: 2,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        stop: vec![],
        resume_token_ids: vec![],
        messages: vec![],
        ..Default::default()
    }
}

/// Runs one Generate on a worker directly; Ok when it streamed to the end.
async fn direct(channel: Result<Channel, tonic::transport::Error>) -> Result<(), String> {
    let channel = channel.map_err(|e| format!("connect: {e:?}"))?;
    let mut stream = WorkerServiceClient::new(channel)
        .generate(generate("hello"))
        .await
        .map_err(|e| format!("{e:?}"))?
        .into_inner();
    while stream
        .message()
        .await
        .map_err(|e| format!("{e:?}"))?
        .is_some()
    {}
    Ok(())
}

/// What a direct caller of a worker got back: the Generate messages that
/// arrived before any error, how the stream ended, and the Load answer.
#[derive(Debug)]
struct DirectCalls {
    generated: usize,
    generate: Result<(), String>,
    load: Result<(), String>,
}

/// Calls Generate and Load on a worker directly over `channel`, each within
/// 20 s (a refusal is an error, never a hang).
async fn direct_calls(channel: Result<Channel, tonic::transport::Error>) -> DirectCalls {
    let channel = match channel {
        Ok(channel) => channel,
        Err(e) => {
            let e = format!("connect: {e:?}");
            return DirectCalls {
                generated: 0,
                generate: Err(e.clone()),
                load: Err(e),
            };
        }
    };
    let limit = Duration::from_secs(20);
    let mut generated = 0;
    let generate = tokio::time::timeout(limit, async {
        let mut stream = WorkerServiceClient::new(channel.clone())
            .generate(generate("a prompt for the coordinator only"))
            .await
            .map_err(|e| format!("{e:?}"))?
            .into_inner();
        while stream
            .message()
            .await
            .map_err(|e| format!("{e:?}"))?
            .is_some()
        {
            generated += 1;
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|_| Err("Generate hung".into()));
    let load = tokio::time::timeout(limit, async {
        WorkerServiceClient::new(channel)
            .load(LoadRequest {})
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    })
    .await
    .unwrap_or_else(|_| Err("Load hung".into()));
    DirectCalls {
        generated,
        generate,
        load,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_only_the_coordinator_role() {
    let dir = temp_dir("tls-roles");
    let certs = gen_certs(&dir.join("certs"), &["w1", "w2"]);
    let cert = |name: &str| certs.join(name);
    let ca = cert("ca.pem");
    let etcd = Etcd::start().await;
    let mut worker = start_worker(
        &etcd,
        "w1",
        &[
            "--cluster-ca",
            p(&ca),
            "--cluster-cert",
            p(&cert("worker-w1.pem")),
            "--cluster-key",
            p(&cert("worker-w1.key")),
        ],
    )
    .await;
    let addr = worker.listen_addr().await;
    let name = Some("w1.worker.nanoinfer");
    let failures_before =
        scrape(&mut worker).await["nanoinfer_worker_tls_handshake_failures_total"];

    // Certificates made by the same script, none with the coordinator role:
    // the public client's (from the client CA), etcd's and another worker's
    // (both from the cluster CA).
    for who in ["client", "etcd", "worker-w2"] {
        let identity = (cert(&format!("{who}.pem")), cert(&format!("{who}.key")));
        let got =
            direct_calls(tls_channel(&addr, &ca, Some((&identity.0, &identity.1)), name).await)
                .await;
        assert_eq!(got.generated, 0, "{who}.pem got tokens: {got:?}");
        assert!(
            got.generate.is_err(),
            "{who}.pem was served Generate: {got:?}"
        );
        assert!(got.load.is_err(), "{who}.pem was served Load: {got:?}");
    }
    // Refusals are logged with the reason (for etcd's and the other
    // worker's: the role their certificate lacks) and counted.
    eventually(Duration::from_secs(5), "the refusals in the log", || {
        let refused = worker
            .log()
            .lines()
            .filter(|l| l.contains("TLS handshake refused"))
            .filter(|l| l.contains("coordinator.nanoinfer"))
            .count();
        async move { refused >= 2 }
    })
    .await;
    let metrics = scrape(&mut worker).await;
    assert!(
        metrics["nanoinfer_worker_tls_handshake_failures_total"] >= failures_before + 3.0,
        "refusals are counted: {metrics:?}\n{}",
        worker.log()
    );

    // The coordinator's certificate is served.
    let identity = (cert("coordinator.pem"), cert("coordinator.key"));
    let got =
        direct_calls(tls_channel(&addr, &ca, Some((&identity.0, &identity.1)), name).await).await;
    assert!(got.generate.is_ok() && got.load.is_ok(), "{got:?}");
    assert!(got.generated > 0, "{got:?}");

    // A reloaded certificate keeps the role check.
    for file in ["worker-w1.key", "worker-w1.pem"] {
        let pem = std::fs::read(cert(file)).unwrap();
        std::fs::write(cert(file), pem).unwrap();
    }
    worker
        .wait_for_line("TLS certificate reloaded", Duration::from_secs(10))
        .await;
    let etcd_identity = (cert("etcd.pem"), cert("etcd.key"));
    let got = direct_calls(
        tls_channel(&addr, &ca, Some((&etcd_identity.0, &etcd_identity.1)), name).await,
    )
    .await;
    assert!(
        got.generated == 0 && got.generate.is_err() && got.load.is_err(),
        "etcd.pem was served after a reload: {got:?}"
    );
    let got =
        direct_calls(tls_channel(&addr, &ca, Some((&identity.0, &identity.1)), name).await).await;
    assert!(got.load.is_ok() && got.generated > 0, "{got:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_workers_with_a_cluster_certificate_for_their_id_get_prompts() {
    let dir = temp_dir("tls-cluster");
    let certs = gen_certs(&dir.join("cluster"), &["w1", "w2"]);
    let stranger = gen_certs(&dir.join("stranger"), &["evil-tls"]);
    let cert = |name: &str| certs.join(name);
    let ca = cert("ca.pem");
    let cluster = |who: &str| {
        vec![
            "--cluster-ca".to_string(),
            p(&ca).to_string(),
            "--cluster-cert".to_string(),
            p(&cert(&format!("{who}.pem"))).to_string(),
            "--cluster-key".to_string(),
            p(&cert(&format!("{who}.key"))).to_string(),
        ]
    };
    let etcd = Etcd::start().await;

    // A process that must refuse to start: its output names `needle`.
    let refuses = |cmd: &mut Command, needle: &str| {
        let out = cmd
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--etcd-endpoints", &etcd.endpoint])
            .args(cluster("worker-w1"))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{said}");
        assert!(said.contains(needle), "{said}");
    };
    // A worker whose certificate names another id...
    refuses(
        Command::new(bin("nanoinfer-worker")).args(["--model", p(&model_path()), "--id", "w3"]),
        "w3.worker.nanoinfer",
    );
    // ...and a coordinator whose cluster certificate lacks the coordinator
    // role (here w1's) refuse to start, naming what is missing.
    refuses(
        Command::new(bin("nanoinfer-coordinator")).args(["--http-listen", "127.0.0.1:0"]),
        "coordinator.nanoinfer",
    );

    let worker_args = cluster("worker-w1");
    let worker_args: Vec<&str> = worker_args.iter().map(String::as_str).collect();
    let mut worker = start_worker(&etcd, "w1", &worker_args).await;
    let worker_addr = worker.listen_addr().await;
    let coordinator_args = cluster("coordinator");
    let coordinator_args: Vec<&str> = coordinator_args.iter().map(String::as_str).collect();
    let (mut coordinator, addr) = start_coordinator(&etcd, &coordinator_args).await;
    coordinator
        .wait_for_line("mutual TLS to workers", Duration::from_secs(5))
        .await;
    wait_routable(&addr, 1).await;

    // The worker's port: a cluster certificate is required.
    let name = Some("w1.worker.nanoinfer");
    let coordinator_identity = (cert("coordinator.pem"), cert("coordinator.key"));
    let plain = direct(nanoinfer::connect(&worker_addr).await).await;
    assert!(plain.is_err(), "plaintext client served: {plain:?}");
    let anonymous = direct(tls_channel(&worker_addr, &ca, None, name).await).await;
    assert!(
        anonymous.is_err(),
        "client without a certificate served: {anonymous:?}"
    );
    let foreign = direct(
        tls_channel(
            &worker_addr,
            &ca,
            Some((&stranger.join("client.pem"), &stranger.join("client.key"))),
            name,
        )
        .await,
    )
    .await;
    assert!(foreign.is_err(), "client of another CA served: {foreign:?}");
    direct(
        tls_channel(
            &worker_addr,
            &ca,
            Some((&coordinator_identity.0, &coordinator_identity.1)),
            name,
        )
        .await,
    )
    .await
    .expect("a cluster client is served");
    // Kubernetes' probes stay plaintext HTTP on the metrics port.
    let metrics_addr = worker.metrics_addr().await;
    assert_eq!(http_get(&metrics_addr, "/readyz").await.0, 200);

    // Two strangers register as workers: one plaintext, one with a
    // certificate for its own name from another CA.
    let plain_fake = FakeWorker::start(&etcd.endpoint, "evil-plain", 30).await;
    let tls_fake = FakeWorker::start_with(
        &etcd.endpoint,
        "evil-tls",
        30,
        Some(ServerTlsFiles {
            cert: stranger.join("worker-evil-tls.pem"),
            key: stranger.join("worker-evil-tls.key"),
            client_ca: None,
        }),
    )
    .await;
    eventually(Duration::from_secs(10), "3 registered workers", || async {
        etcd.worker_ids().await.len() == 3
    })
    .await;
    let channel = nanoinfer::connect(&addr).await.unwrap();
    let mut client = InferServiceClient::new(channel);
    const N: usize = 8;
    for i in 0..N {
        let msgs = collect(&mut client, greedy(&format!("secret prompt {i}"), 2))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "request {i}: {e:?}\ncoordinator:\n{}\nworker:\n{}",
                    coordinator.log(),
                    worker.log()
                )
            });
        assert_eq!(msgs.last().unwrap().usage.unwrap().generated_tokens, 2);
    }
    assert_eq!(
        plain_fake.calls().len(),
        0,
        "the plaintext fake got prompts"
    );
    assert_eq!(tls_fake.calls().len(), 0, "the foreign-CA fake got prompts");
    let metrics = scrape(&mut coordinator).await;
    for fake in ["evil-plain", "evil-tls"] {
        let key = format!("nanoinfer_coordinator_worker_ejections_total{{worker=\"{fake}\"}}");
        assert_eq!(metrics.get(&key), Some(&1.0), "{key} in {metrics:?}");
    }

    // An impostor holding w2's valid cluster certificate takes over w1's
    // record once w1 is gone (a live w1 would write its record back at
    // once): the name does not match, so it gets no prompt, and clients get
    // an error rather than its answer.
    worker.kill();
    let impostor = FakeWorker::start_with(
        &etcd.endpoint,
        "impostor",
        30,
        Some(ServerTlsFiles {
            cert: cert("worker-w2.pem"),
            key: cert("worker-w2.key"),
            client_ca: None,
        }),
    )
    .await;
    drop(plain_fake);
    drop(tls_fake);
    etcd.put(
        "/nanoinfer/workers/w1",
        &serde_json::json!({
            "id": "w1",
            "address": impostor.addr,
            "model": "fake",
            "capacity": {"slots": 4, "queue": 4, "context_length": 4096},
            "version": "test",
        })
        .to_string(),
    )
    .await;
    // The strangers' records and the impostor's own go, so only the
    // hijacked one is left.
    let mut c = etcd_client::Client::connect([etcd.endpoint.clone()], None)
        .await
        .unwrap();
    for id in ["impostor", "evil-plain", "evil-tls"] {
        c.delete(format!("/nanoinfer/workers/{id}"), None)
            .await
            .unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "only the hijacked record",
        || async { etcd.worker_ids().await == vec!["w1".to_string()] },
    )
    .await;
    for i in 0..4 {
        let err = collect(&mut client, greedy(&format!("hijacked prompt {i}"), 2))
            .await
            .expect_err("no worker can serve");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    assert_eq!(impostor.calls().len(), 0, "the impostor got prompts");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An etcd serving TLS only, requiring client certificates, with the roles
/// of `deploy/etcd-auth.sh`.
struct SecureEtcd {
    endpoint: String,
    passwords: std::path::PathBuf,
    _proc: Proc,
}

impl SecureEtcd {
    async fn start(dir: &Path, certs: &Path) -> Self {
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("https://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut proc = Proc::spawn(
            "etcd",
            Command::new("etcd")
                .arg("--name=secure")
                .arg(format!("--data-dir={}", dir.join("etcd-data").display()))
                .arg(format!("--listen-client-urls={endpoint}"))
                .arg(format!("--advertise-client-urls={endpoint}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=secure={peer_url}"))
                .arg(format!("--cert-file={}", certs.join("etcd.pem").display()))
                .arg(format!("--key-file={}", certs.join("etcd.key").display()))
                .arg(format!(
                    "--trusted-ca-file={}",
                    certs.join("ca.pem").display()
                ))
                .arg("--client-cert-auth"),
        );
        proc.wait_for_line("ready to serve client requests", Duration::from_secs(30))
            .await;
        let passwords = dir.join("etcd-passwords");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(root.join("deploy/etcd-auth.sh"))
            .arg(&passwords)
            .arg("w1")
            .env("ETCDCTL_ENDPOINTS", &endpoint)
            .env("ETCDCTL_CACERT", certs.join("ca.pem"))
            .env("ETCDCTL_CERT", certs.join("coordinator.pem"))
            .env("ETCDCTL_KEY", certs.join("coordinator.key"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "etcd-auth.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            endpoint,
            passwords,
            _proc: proc,
        }
    }

    /// A client with `certs`' `who` certificate and, when given, a user.
    async fn client(
        &self,
        certs: &Path,
        who: &str,
        user: Option<&str>,
    ) -> Result<etcd_client::Client, etcd_client::Error> {
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(
                std::fs::read(certs.join("ca.pem")).unwrap(),
            ))
            .identity(etcd_client::Identity::from_pem(
                std::fs::read(certs.join(format!("{who}.pem"))).unwrap(),
                std::fs::read(certs.join(format!("{who}.key"))).unwrap(),
            ));
        let mut options = etcd_client::ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5));
        if let Some(user) = user {
            let file = self.passwords.join(format!("etcd-{user}.password"));
            options = options.with_user(
                format!("nanoinfer-{user}"),
                std::fs::read_to_string(file).unwrap(),
            );
        }
        etcd_client::Client::connect([self.endpoint.clone()], Some(options)).await
    }

    /// The flags of a process with `certs`' `who` certificate as `user`.
    fn flags(&self, certs: &Path, who: &str, user: &str) -> Vec<String> {
        let file = |name: String| p(&certs.join(name)).to_string();
        vec![
            "--etcd-endpoints".into(),
            self.endpoint.clone(),
            "--etcd-ca".into(),
            file("ca.pem".into()),
            "--etcd-cert".into(),
            file(format!("{who}.pem")),
            "--etcd-key".into(),
            file(format!("{who}.key")),
            "--etcd-username".into(),
            format!("nanoinfer-{user}"),
            "--etcd-password-file".into(),
            p(&self.passwords.join(format!("etcd-{user}.password"))).to_string(),
        ]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_coordinator_use_etcd_over_tls_with_their_own_roles() {
    let dir = temp_dir("tls-etcd");
    let certs = gen_certs(&dir.join("certs"), &["w1"]);
    let etcd = SecureEtcd::start(&dir, &certs).await;

    // The roles hold: a coordinator cannot write, a worker cannot write
    // outside its prefix, and without a user nothing can be read.
    let mut coordinator_client = etcd
        .client(&certs, "coordinator", Some("coordinator"))
        .await
        .unwrap();
    let denied = coordinator_client
        .put("/nanoinfer/workers/evil", "{}", None)
        .await
        .unwrap_err();
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    let mut worker_client = etcd
        .client(&certs, "worker-w1", Some("worker-w1"))
        .await
        .unwrap();
    let denied = worker_client
        .put("/elsewhere", "x", None)
        .await
        .unwrap_err();
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    let anonymous = match etcd.client(&certs, "coordinator", None).await {
        Ok(mut c) => c.get("/nanoinfer/workers/", None).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(anonymous.is_err(), "read without a user: {anonymous:?}");

    // A real worker registers, and the coordinator finds and uses it.
    let worker_flags = etcd.flags(&certs, "worker-w1", "worker-w1");
    let mut cmd = Command::new(bin("nanoinfer-worker"));
    cmd.args(["--model", p(&model_path()), "--listen", "127.0.0.1:0"])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--id",
            "w1",
        ])
        .args(&worker_flags);
    let mut worker = Proc::spawn("w1", &mut cmd);
    worker
        .wait_for_line("worker ready", Duration::from_secs(60))
        .await;
    let coordinator_flags = etcd.flags(&certs, "coordinator", "coordinator");
    let mut cmd = Command::new(bin("nanoinfer-coordinator"));
    cmd.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--http-listen", "127.0.0.1:0"])
        .args(&coordinator_flags);
    let mut coordinator = Proc::spawn("coordinator", &mut cmd);
    let addr = format!("http://{}", coordinator.listen_addr().await);
    wait_routable(&addr, 1).await;
    let channel = nanoinfer::connect(&addr).await.unwrap();
    let msgs = collect(&mut InferServiceClient::new(channel), greedy("hello", 2))
        .await
        .unwrap();
    assert_eq!(msgs.last().unwrap().usage.unwrap().generated_tokens, 2);
    let log = worker.log() + &coordinator.log();
    for password in ["worker-w1", "coordinator"] {
        let secret =
            std::fs::read_to_string(etcd.passwords.join(format!("etcd-{password}.password")))
                .unwrap();
        assert!(!log.contains(secret.trim()), "a password was logged");
    }

    // A flag that does not fit is a clear error at start-up.
    let out = Command::new(bin("nanoinfer-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--http-listen", "127.0.0.1:0"])
        .args(["--etcd-endpoints", &etcd.endpoint.replace("https", "http")])
        .args(["--etcd-ca", p(&certs.join("ca.pem"))])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("use https:// endpoints with --etcd-ca"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
