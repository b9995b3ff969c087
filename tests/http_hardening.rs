//! The HTTP API port under hostile or unusual clients: slowloris
//! connections on plaintext (the coordinator in this test's process, on a
//! paused clock: the timeouts are the coordinator's own, in virtual time),
//! and TLS stalled before or after the handshake (the real coordinator
//! binary, as every other test here), are closed within the header timeout
//! while normal requests go on; open connections and requests per
//! connection are capped; HTTP/1.1-only clients (`curl --http1.1`, the
//! official `openai` Python SDK) stream over TLS; and an emptied or deleted
//! API keys file revokes every key until it holds keys again.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::in_process::InProcess;

use common::fake_worker::FakeWorker;
use common::*;
use nanoinfer_proto::nanoinfer::infer_service_client::InferServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Reads until the server closes `stream` (EOF or a reset), at most
/// `within`; returns how long that took, or `None` if it stayed open.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    // The runtime's clock: virtual under a paused clock.
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// Opens `n` connections to `addr` and sends each `first` (possibly
/// nothing).
async fn open(addr: &str, n: usize, first: &[u8]) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if !first.is_empty() {
            s.write_all(first).await.unwrap();
        }
        conns.push(s);
    }
    conns
}

/// Asserts that the server closes every one of `conns` within `within`.
async fn all_closed(conns: &mut [TcpStream], within: Duration, what: &str) {
    let waits = conns.iter_mut().map(|c| closed_within(c, within));
    let closed = futures::future::join_all(waits).await;
    let open = closed.iter().filter(|c| c.is_none()).count();
    assert_eq!(
        open,
        0,
        "{open} of {} {what} still open after {within:?}",
        closed.len()
    );
}

/// One HTTP/1.1 request on `stream`, kept alive; (status, head, body).
async fn request(stream: &mut TcpStream, addr: &str, path: &str) -> (u16, String, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Duration::from_secs(10);
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("content-length");
            if data.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&data[end + 4..end + 4 + length]).to_string();
                let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                return (status, head.to_lowercase(), body);
            }
        }
        let n = tokio::time::timeout(deadline, stream.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(start_paused = true)]
async fn slowloris_connections_are_closed_within_the_header_timeout() {
    let w = FakeWorker::builder("a").local().start().await;
    let coordinator = InProcess::start(
        &[
            "--http-header-timeout-ms",
            "500",
            "--http-idle-timeout",
            "3",
        ],
        &[&w],
    )
    .await;
    let (addr, http) = (coordinator.addr.clone(), coordinator.http_addr.clone());
    wait_routable(&addr, 1).await;

    // 50 clients that start a request line and never finish it, 10 that
    // send nothing at all.
    let mut partial = open(&http, 50, b"GET /v1/models HT").await;
    let mut silent = open(&http, 10, b"").await;
    // Meanwhile a normal client is served.
    let (status, body) = http_get(&http, "/health").await;
    assert_eq!(status, 200, "{body}");
    all_closed(&mut partial, Duration::from_secs(5), "partial requests").await;
    all_closed(&mut silent, Duration::from_secs(5), "silent connections").await;

    // A keep-alive connection: served twice a second apart, then closed
    // after the idle timeout (3 s), not the header timeout (0.5 s); a next
    // request that stalls mid-head gets the header timeout.
    let mut conn = TcpStream::connect(&http).await.unwrap();
    for _ in 0..2 {
        let (status, head, _) = request(&mut conn, &http, "/health").await;
        assert_eq!(status, 200, "{head}");
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let idle = closed_within(&mut conn, Duration::from_secs(5))
        .await
        .expect("an idle connection is closed");
    assert!(idle >= Duration::from_millis(1500), "closed after {idle:?}");
    let mut conn = TcpStream::connect(&http).await.unwrap();
    request(&mut conn, &http, "/health").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.write_all(b"GET /health HTTP/1.1\r\nHo").await.unwrap();
    let stalled = closed_within(&mut conn, Duration::from_secs(5))
        .await
        .expect("a stalled head is closed");
    assert!(
        stalled < Duration::from_millis(1600),
        "closed after {stalled:?}"
    );

    // A body that trickles in (slow POST) is cut at the idle timeout.
    let mut conn = TcpStream::connect(&http).await.unwrap();
    conn.write_all(
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"prompt\""
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(8), conn.read_to_end(&mut answer))
        .await
        .expect("a slow body is cut within the idle timeout")
        .ok();
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    let (status, _) = http_get(&http, "/health").await;
    assert_eq!(status, 200);
    let m = coordinator.scrape().await;
    let closed = |reason: &str| {
        m.get(&format!(
            "nanoinfer_coordinator_http_connections_closed_total{{reason=\"{reason}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    assert!(closed("header_timeout") >= 61.0, "{m:?}");
    assert!(closed("idle_timeout") >= 1.0, "{m:?}");
    assert_eq!(closed("body_timeout"), 1.0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_and_requests_per_connection_are_capped() {
    let etcd = Etcd::start().await;
    let _w = FakeWorker::start(&etcd.endpoint, "a", 30).await;
    let (mut coordinator, _addr) = start_coordinator(
        &etcd,
        &[
            "--http-max-connections",
            "4",
            "--http-max-requests-per-connection",
            "3",
        ],
    )
    .await;
    let http = coordinator.http_addr().await;

    // Requests per connection: the third response says `connection: close`
    // and the server closes the connection after it.
    let mut conn = TcpStream::connect(&http).await.unwrap();
    for i in 1..=3 {
        let (status, head, _) = request(&mut conn, &http, "/health").await;
        assert!(status == 200 || status == 503, "{head}");
        assert_eq!(
            head.contains("connection: close"),
            i == 3,
            "request {i}: {head}"
        );
    }
    closed_within(&mut conn, Duration::from_secs(5))
        .await
        .expect("closed after the last allowed request");
    let metrics = coordinator.metrics_addr().await;
    eventually(Duration::from_secs(5), "no open connection", || {
        let metrics = metrics.clone();
        async move {
            let (_, text) = http_get(&metrics, "/metrics").await;
            parse_metrics(&text).get("nanoinfer_coordinator_http_connections_open") == Some(&0.0)
        }
    })
    .await;

    // Open connections: four held, the fifth is closed at once; when one
    // goes, a new one is served again.
    let mut held = open(&http, 4, b"").await;
    let mut extra = TcpStream::connect(&http).await.unwrap();
    let refused = closed_within(&mut extra, Duration::from_secs(2))
        .await
        .expect("the connection beyond the limit is closed");
    assert!(refused < Duration::from_millis(500), "after {refused:?}");
    drop(held.pop());
    eventually(Duration::from_secs(5), "a slot to free up", || {
        let http = http.clone();
        async move {
            let Ok(mut c) = TcpStream::connect(&http).await else {
                return false;
            };
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .is_ok()
                && {
                    let mut out = Vec::new();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut out)).await;
                    out.starts_with(b"HTTP/1.1 ")
                }
        }
    })
    .await;
    let m = scrape(&mut coordinator).await;
    assert!(
        m["nanoinfer_coordinator_http_connections_refused_total"] >= 1.0,
        "{m:?}"
    );
    assert!(
        coordinator.log().contains("--http-max-connections"),
        "refusals are logged"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_clients_are_closed_and_http1_clients_negotiate() {
    let dir = temp_dir("http-hardening-tls");
    let certs = gen_certs(&dir, &[]);
    let ca = certs.join("ca.pem");
    let etcd = Etcd::start().await;
    let _w = FakeWorker::start(&etcd.endpoint, "a", 30).await;
    let (mut coordinator, addr) = start_coordinator(
        &etcd,
        &[
            "--tls-cert",
            p(&certs.join("server.pem")),
            "--tls-key",
            p(&certs.join("server.key")),
            "--http-header-timeout-ms",
            "500",
            "--http-tls-handshake-timeout-ms",
            "500",
        ],
    )
    .await;
    let http = coordinator.http_addr().await;
    let _ = addr;

    // TCP connected, no ClientHello ever sent.
    let mut silent = open(&http, 30, b"").await;
    // Handshake completed (ALPN http/1.1), then nothing.
    let mut stalled: Vec<_> = (0..5)
        .map(|_| {
            Command::new("openssl")
                .args(["s_client", "-connect", &http, "-CAfile", p(&ca)])
                .args(["-alpn", "http/1.1", "-verify_return_error"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("run openssl s_client")
        })
        .collect();
    all_closed(
        &mut silent,
        Duration::from_secs(5),
        "connections without a handshake",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for child in &mut stalled {
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("a TLS client stalled after its handshake was not disconnected");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut out = String::new();
        use std::io::Read;
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(
            out.contains("ALPN protocol: http/1.1"),
            "the handshake completed with http/1.1: {out}"
        );
    }

    // curl over HTTP/1.1 and HTTP/2 both get answers.
    let url = format!("https://{http}/health");
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = Command::new("curl")
            .args(["-sS", flag, "--cacert", p(&ca), "-o", "/dev/null"])
            .args(["-w", "%{http_version}", &url])
            .output()
            .unwrap();
        assert_ok(&out, "curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), version, "{flag}");
    }
    // The gRPC port still offers h2 alone.
    assert_eq!(
        tls_channel(addr.trim_start_matches("http://"), &ca, None, None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Ok(())
    );
    let m = scrape(&mut coordinator).await;
    assert!(
        m["nanoinfer_coordinator_http_connections_closed_total{reason=\"tls_handshake_timeout\"}"]
            >= 30.0,
        "{m:?}"
    );
    assert!(
        m["nanoinfer_coordinator_http_connections_closed_total{reason=\"header_timeout\"}"] >= 5.0,
        "{m:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

const KEY: &str = "sk-http-hardening-0123";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_stream_chat_over_tls_from_a_real_model() {
    let dir = temp_dir("http-hardening-sdk");
    let certs = gen_certs(&dir, &[]);
    let ca = certs.join("ca.pem");
    let keys = dir.join("api-keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let etcd = Etcd::start().await;
    let _worker = start_worker_with(
        &etcd,
        "w1",
        &chat_model_path(),
        &["--model-name", "smollm2"],
    )
    .await;
    let (mut coordinator, addr) = start_coordinator(
        &etcd,
        &[
            "--tls-cert",
            p(&certs.join("server.pem")),
            "--tls-key",
            p(&certs.join("server.key")),
            "--api-keys-file",
            p(&keys),
        ],
    )
    .await;
    let http = coordinator.http_addr().await;
    let channel = tls_channel(addr.trim_start_matches("http://"), &ca, None, None)
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "a routable worker", || {
        let mut client = InferServiceClient::new(channel.clone());
        async move {
            client
                .health(nanoinfer_proto::nanoinfer::HealthRequest {})
                .await
                .is_ok_and(|r| r.into_inner().live_workers == 1)
        }
    })
    .await;

    // curl, HTTP/1.1 only: SSE to the end.
    let body = r#"{"model":"smollm2","messages":[{"role":"user","content":"Say hi."}],"max_tokens":8,"temperature":0,"stream":true}"#;
    let auth = format!("authorization: Bearer {KEY}");
    let (status, text) = curl(&[
        "-sS",
        "-N",
        "--http1.1",
        "--cacert",
        p(&ca),
        "-H",
        "content-type: application/json",
        "-H",
        &auth,
        "--data-binary",
        body,
        &format!("https://{http}/v1/chat/completions"),
    ]);
    assert_eq!(status, 200, "{text}");
    assert!(text.starts_with("data: {"), "{text:?}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text:?}");

    // The official SDK (httpx offers http/1.1 alone in its handshake).
    let script = r#"
import ssl, sys, openai
base, model, ca = sys.argv[1:4]
client = openai.OpenAI(base_url=base, max_retries=0, timeout=60,
    http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca)))
chunks = list(client.chat.completions.create(model=model, temperature=0, max_tokens=16,
    messages=[{"role": "user", "content": "What is the capital of France?"}], stream=True))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert text and len(finish) == 1, (text, finish)
print("streamed:", repr(text), finish[0])
"#;
    let out = Command::new(venv_python())
        .args(["-c", script])
        .arg(format!("https://{http}/v1"))
        .arg("smollm2")
        .arg(&ca)
        .env("OPENAI_API_KEY", KEY)
        .output()
        .expect("run the openai SDK");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert_ok(&out, "the openai SDK over TLS");
    let _ = std::fs::remove_dir_all(&dir);
}

async fn grpc_call(addr: &str, key: &str) -> Result<(), tonic::Status> {
    let mut client = InferServiceClient::new(nanoinfer::connect(addr).await.unwrap());
    let mut req = tonic::Request::new(greedy("hello", 2));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let mut stream = client.infer(req).await?.into_inner();
    while stream.message().await?.is_some() {}
    Ok(())
}

/// `POST /v1/completions` with `key`; (status, body).
fn http_call(http: &str, key: &str) -> (u16, String) {
    curl(&[
        "-sS",
        "-H",
        "content-type: application/json",
        "-H",
        &format!("authorization: Bearer {key}"),
        "--data-binary",
        r#"{"prompt":"hello","max_tokens":2}"#,
        &format!("http://{http}/v1/completions"),
    ])
}

const REVOKED_LOG: &str = "no valid API key: EVERY request is refused";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_or_deleted_keys_file_refuses_everyone_until_it_holds_keys() {
    let dir = temp_dir("http-hardening-revoke");
    let keys = dir.join("api-keys");
    std::fs::write(&keys, "# production\nleaked-key\n").unwrap();
    let etcd = Etcd::start().await;
    let _w = FakeWorker::start(&etcd.endpoint, "a", 30).await;
    let (mut coordinator, addr) = start_coordinator(&etcd, &["--api-keys-file", p(&keys)]).await;
    let http = coordinator.http_addr().await;
    wait_routable(&addr, 1).await;
    grpc_call(&addr, "leaked-key").await.unwrap();
    let (status, body) = http_call(&http, "leaked-key");
    assert_eq!(status, 200, "{body}");

    // Emptied: within ~2 s every request is refused, on both APIs, and
    // Health says why.
    std::fs::write(&keys, "").unwrap();
    let emptied = Instant::now();
    eventually(Duration::from_secs(3), "the revocation", || async {
        http_call(&http, "leaked-key").0 == 401
    })
    .await;
    assert!(
        emptied.elapsed() < Duration::from_millis(2500),
        "{:?}",
        emptied.elapsed()
    );
    let (status, body) = http_call(&http, "leaked-key");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("no valid API keys"), "{body}");
    assert!(!body.contains(p(&keys)), "the path is not told: {body}");
    let refused = grpc_call(&addr, "leaked-key").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("no valid API keys"),
        "{refused:?}"
    );
    let (health, routable) = health_of(&addr).await;
    assert!(health.starts_with("NO_API_KEYS"), "{health}");
    assert_eq!(routable, 1);
    let (status, body) = http_get(&http, "/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("NO_API_KEYS"), "{body}");
    // Logged at error level once for the change, not once per request or
    // per reload.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let logged = |log: &str| log.lines().filter(|l| l.contains(REVOKED_LOG)).count();
    assert_eq!(logged(&coordinator.log()), 1, "{}", coordinator.log());
    assert!(coordinator
        .log()
        .lines()
        .any(|l| l.contains(REVOKED_LOG) && l.contains("ERROR")));

    // Deleted: still refused.
    std::fs::remove_file(&keys).unwrap();
    coordinator
        .wait_for_line("No such file", Duration::from_secs(5))
        .await;
    assert_eq!(http_call(&http, "leaked-key").0, 401);
    let refused = grpc_call(&addr, "leaked-key").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // A new key restores service; the leaked one stays out.
    std::fs::write(&keys, "fresh-key\n").unwrap();
    eventually(Duration::from_secs(3), "the new key", || async {
        http_call(&http, "fresh-key").0 == 200
    })
    .await;
    grpc_call(&addr, "fresh-key").await.unwrap();
    assert_eq!(http_call(&http, "leaked-key").0, 401);
    assert_eq!(health_of(&addr).await.0, "OK");
    assert_eq!(http_get(&http, "/health").await.0, 200);
    let m = scrape(&mut coordinator).await;
    assert!(
        m["nanoinfer_coordinator_auth_rejections_total{reason=\"no_keys\"}"] >= 4.0,
        "{m:?}"
    );
    assert!(!coordinator.log().contains("leaked-key") && !coordinator.log().contains("fresh-key"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_http_streams_finish_and_refuses_new_connections() {
    use std::io::{BufRead, BufReader, Read};
    let etcd = Etcd::start().await;
    let _w = FakeWorker::start(&etcd.endpoint, "a", 30).await;
    let (mut coordinator, addr) = start_coordinator(&etcd, &[]).await;
    let http = coordinator.http_addr().await;
    wait_routable(&addr, 1).await;
    // 300 fake tokens at 5 ms: a stream of about 1.5 s.
    let mut curl = Command::new("curl")
        .args(["-sS", "-N", "-H", "content-type: application/json"])
        .args([
            "--data-binary",
            r#"{"prompt":"hello","max_tokens":300,"stream":true}"#,
        ])
        .arg(format!("http://{http}/v1/completions"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(curl.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: {"), "{first:?}");
    coordinator.terminate();
    coordinator
        .wait_for_line("stopped accepting", Duration::from_secs(5))
        .await;
    let refused = TcpStream::connect(&http).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during the drain"
    );
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(curl.wait().unwrap().success());
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest:?}");
    let text: String = format!("{first}{rest}")
        .split_terminator("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["text"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(
        text,
        common::fake_worker::fake_text(300),
        "every token came"
    );
    assert_eq!(
        coordinator.wait_exit(Duration::from_secs(10)).await,
        Some(0)
    );
}
