//! Test harness: real etcd, real worker and coordinator binaries, the real
//! model, all on ephemeral loopback ports. Every process is killed when its
//! handle drops, and every wait is bounded.

#![allow(dead_code)]

pub mod fake_worker;
pub mod in_process;
pub mod raw;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanoinfer_proto::nanoinfer::{
    infer_service_client::InferServiceClient, HealthRequest, InferRequest, InferResponse,
};
use tonic::transport::Channel;

/// A release binary of the workspace (this test binary lives in
/// `<target>/release/deps/`, the binaries one level up).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries and examples first (cargo build --release --workspace --bins --examples)",
        path.display()
    );
    path
}

/// Path of the tests' model: `NANOINFER_TEST_MODEL`, else
/// `scripts/fetch-model gemma3-270m`. A base model that keeps talking, so
/// length-bound tests get the tokens they ask for (an instruction-tuned
/// model ends its answers early); the chat tests use [`chat_model_path`].
pub fn model_path() -> PathBuf {
    fetched_model("NANOINFER_TEST_MODEL", "gemma3-270m")
}

/// The instruction-tuned model for chat tests: `NANOINFER_TEST_CHAT_MODEL`,
/// else `scripts/fetch-model smollm2-135m-instruct`.
pub fn chat_model_path() -> PathBuf {
    fetched_model("NANOINFER_TEST_CHAT_MODEL", "smollm2-135m-instruct")
}

/// The path in `env_var`, else the one `scripts/fetch-model <key>` prints
/// (it downloads and verifies the file the first time).
pub fn fetched_model(env_var: &str, key: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env_var) {
        return PathBuf::from(p);
    }
    let out = Command::new(repo_root().join("scripts/fetch-model"))
        .arg(key)
        .output()
        .expect("run scripts/fetch-model");
    assert_ok(&out, &format!("scripts/fetch-model {key}"));
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("fetch-model prints the path")
            .trim(),
    )
}

/// The repository's root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Panics with `what`, the exit status and stderr unless `out` succeeded.
pub fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The project venv's Python (scripts/setup installs the openai client
/// there), found the way the scripts find it.
pub fn venv_python() -> PathBuf {
    let out = Command::new("bash")
        .arg("-c")
        .arg(". scripts/common.sh >/dev/null && echo \"$VENV/bin/python\"")
        .current_dir(repo_root())
        .output()
        .expect("run bash");
    assert_ok(&out, "locating the venv");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A free loopback port (the OS picks it; released before use).
/// grpcurl prints one JSON object per message; split them.
pub fn json_messages(out: &str) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_str(out)
        .into_iter::<serde_json::Value>()
        .map(Result::unwrap)
        .collect()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 50 ms until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    // The runtime's clock: under a paused clock the wait is virtual too.
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A child process whose stderr is captured line by line; killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info")
            // Export spans promptly when a test configures a collector.
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            name: name.to_string(),
            child,
            lines,
        }
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for a log line containing `needle` and returns it.
    pub async fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        match self.try_wait_for_line(needle, timeout).await {
            Ok(line) => line,
            Err(exited) => panic!("{exited}"),
        }
    }

    /// Like [`Proc::wait_for_line`], but an exit before the line is an
    /// `Err` (with the log) rather than a panic.
    pub async fn try_wait_for_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return Ok(l.clone());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader thread a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!(
                    "{} exited ({status}) before logging {needle:?}:\n{}",
                    self.name,
                    self.log()
                ));
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not log {needle:?} within {timeout:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The gRPC address in the process's `nanoinfer-… listening on ADDR` line.
    pub async fn listen_addr(&mut self) -> String {
        let name = if self.name == "coordinator" {
            "nanoinfer-coordinator"
        } else {
            "nanoinfer-worker"
        };
        self.addr_after(&format!("{name} listening on ")).await
    }

    /// The coordinator's OpenAI-compatible HTTP address (`HTTP API
    /// listening on ADDR`).
    pub async fn http_addr(&mut self) -> String {
        self.addr_after("HTTP API listening on ").await
    }

    /// The address in the process's `metrics listening on ADDR` line.
    pub async fn metrics_addr(&mut self) -> String {
        self.addr_after("metrics listening on ").await
    }

    async fn addr_after(&mut self, needle: &str) -> String {
        let line = self.wait_for_line(needle, Duration::from_secs(30)).await;
        // Text logs end the line with the address; JSON logs close the
        // message with a quote.
        let rest = line.rsplit(needle).next().unwrap().trim();
        rest.split(['"', ' ']).next().unwrap().to_string()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {timeout:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway single-member etcd on loopback ports. It can be stopped and
/// started again on the same ports and data (an etcd outage).
pub struct Etcd {
    pub endpoint: String,
    proc: Option<Proc>,
    data_dir: PathBuf,
    peer: String,
}

impl Etcd {
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    /// An etcd on `client_port`, which may have been handed out before
    /// (e.g. to a process started while etcd was down).
    pub async fn start_on(client_port: u16) -> Self {
        let peer_port = free_port();
        let data_dir = std::env::temp_dir().join(format!(
            "nanoinfer-etcd-{}-{client_port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut etcd = Self {
            endpoint: format!("http://127.0.0.1:{client_port}"),
            proc: None,
            data_dir,
            peer: format!("http://127.0.0.1:{peer_port}"),
        };
        etcd.resume().await;
        etcd
    }

    /// Stops the server (SIGKILL); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the server again on the same ports and data.
    pub async fn resume(&mut self) {
        let fresh = !self.data_dir.exists();
        let mut attempt = 0;
        let proc = loop {
            attempt += 1;
            let (endpoint, peer) = (self.endpoint.clone(), self.peer.clone());
            let mut proc = Proc::spawn(
                "etcd",
                Command::new("etcd")
                    .arg("--name=test")
                    .arg(format!("--data-dir={}", self.data_dir.display()))
                    .arg(format!("--listen-client-urls={endpoint}"))
                    .arg(format!("--advertise-client-urls={endpoint}"))
                    .arg(format!("--listen-peer-urls={peer}"))
                    .arg(format!("--initial-advertise-peer-urls={peer}"))
                    .arg(format!("--initial-cluster=test={peer}")),
            );
            match proc
                .try_wait_for_line("ready to serve client requests", Duration::from_secs(30))
                .await
            {
                Ok(_) => break proc,
                // A port handed out by free_port can be taken again before
                // etcd binds it (as another process's ephemeral port): try
                // again, with a new peer port while the data dir is new.
                Err(log) if log.contains("address already in use") && attempt < 10 => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if fresh {
                        let _ = std::fs::remove_dir_all(&self.data_dir);
                        self.peer = format!("http://127.0.0.1:{}", free_port());
                    }
                }
                Err(log) => panic!("{log}"),
            }
        };
        let endpoint = self.endpoint.clone();
        self.proc = Some(proc);
        eventually(Duration::from_secs(10), "etcd to answer", || {
            let endpoint = endpoint.clone();
            async move {
                match etcd_client::Client::connect([endpoint], None).await {
                    Ok(mut c) => c.status().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
    }

    /// Puts `value` at `key` (no lease).
    pub async fn put(&self, key: &str, value: &str) {
        let mut c = etcd_client::Client::connect([self.endpoint.clone()], None)
            .await
            .unwrap();
        c.put(key, value, None).await.unwrap();
    }

    /// Worker ids registered now.
    pub async fn worker_ids(&self) -> Vec<String> {
        let mut c = etcd_client::Client::connect([self.endpoint.clone()], None)
            .await
            .unwrap();
        let resp = c
            .get(
                "/nanoinfer/workers/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        resp.kvs()
            .iter()
            .map(|kv| {
                let info: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
                info["id"].as_str().unwrap().to_string()
            })
            .collect()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

impl Etcd {
    /// A client with no credentials.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint.clone()], None)
            .await
            .unwrap()
    }

    /// The value at `key` and the lease it is attached to (0: none), or
    /// `None` when there is no such key.
    pub async fn kv(&self, key: &str) -> Option<(String, i64)> {
        let resp = self.client().await.get(key, None).await.unwrap();
        resp.kvs()
            .first()
            .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
    }
}

/// The command of a worker serving `model`: `--threads 1`, ephemeral
/// ports (unless `extra` names a `--listen` address) and a 3 s lease
/// (unless `extra` sets one).
fn worker_command(etcd: &Etcd, id: &str, model: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("nanoinfer-worker"));
    cmd.arg("--model").arg(model);
    if !extra.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--threads", "1"])
        .args(["--id", id, "--etcd-endpoints", &etcd.endpoint])
        .args(extra);
    if !extra.contains(&"--lease-ttl") {
        cmd.args(["--lease-ttl", "3"]);
    }
    cmd
}

/// A worker process started like [`start_worker_with`] (`--threads 1`, a
/// 3 s lease unless `extra` sets one) without waiting for it to register.
pub fn spawn_worker(etcd: &Etcd, id: &str, model: &Path, extra: &[&str]) -> Proc {
    Proc::spawn(id, &mut worker_command(etcd, id, model, extra))
}

/// Starts a worker with `--threads 1` and (unless `extra` sets one) a 3 s
/// lease; returns once it is registered.
pub async fn start_worker(etcd: &Etcd, id: &str, extra: &[&str]) -> Proc {
    start_worker_with(etcd, id, &model_path(), extra).await
}

/// [`start_worker`] serving `model` (on an ephemeral port unless `extra`
/// names a `--listen` address).
pub async fn start_worker_with(etcd: &Etcd, id: &str, model: &Path, extra: &[&str]) -> Proc {
    let mut workers = start_workers_with(etcd, &[id], model, |_| extra.to_vec()).await;
    workers.pop().expect("one worker")
}

/// Workers `ids` serving `model`, each with the arguments `extra` gives
/// for its index in `ids`, started together: all are spawned before any is waited
/// for, so their starts (the model's load and the engine's measurement of
/// its step costs, about 3 s at `--threads 1` here) overlap instead of
/// adding up. Returns them in the order of `ids`, each registered.
pub async fn start_workers_with<'a>(
    etcd: &Etcd,
    ids: &[&str],
    model: &Path,
    extra: impl Fn(usize) -> Vec<&'a str>,
) -> Vec<Proc> {
    let mut workers: Vec<Proc> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| spawn_worker(etcd, id, model, &extra(i)))
        .collect();
    for worker in &mut workers {
        worker
            .wait_for_line("worker ready", Duration::from_secs(60))
            .await;
    }
    workers
}

/// Starts a coordinator; returns it and its `http://` address.
pub async fn start_coordinator(etcd: &Etcd, extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(bin("nanoinfer-coordinator"));
    cmd.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--etcd-endpoints", &etcd.endpoint])
        .args(extra);
    if !extra.contains(&"--http-listen") {
        cmd.args(["--http-listen", "127.0.0.1:0"]);
    }
    // Tests that count which worker served what expect requests to spread
    // by load alone; the default policy (prefix affinity) keeps requests
    // with a shared prompt together, and is tested by tests that ask for
    // it (tests/routing.rs) and by the scripted cluster (tests/e2e.rs).
    if !extra.contains(&"--routing") {
        cmd.args(["--routing", "least-loaded"]);
    }
    let mut proc = Proc::spawn("coordinator", &mut cmd);
    let addr = proc.listen_addr().await;
    (proc, format!("http://{addr}"))
}

/// etcd, `workers` workers (ids `w1`, `w2`, …) and a coordinator that sees
/// all of them.
pub struct Cluster {
    pub etcd: Etcd,
    pub workers: Vec<Proc>,
    pub coordinator: Proc,
    pub addr: String,
}

impl Cluster {
    pub async fn start(workers: usize, worker_args: &[&str], coordinator_args: &[&str]) -> Self {
        let etcd = Etcd::start().await;
        let ids: Vec<String> = (1..=workers).map(|i| format!("w{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let procs = start_workers_with(&etcd, &ids, &model_path(), |_| worker_args.to_vec()).await;
        let (coordinator, addr) = start_coordinator(&etcd, coordinator_args).await;
        let cluster = Self {
            etcd,
            workers: procs,
            coordinator,
            addr,
        };
        cluster.wait_live(workers as u32).await;
        cluster
    }

    pub async fn client(&self) -> InferServiceClient<Channel> {
        InferServiceClient::new(
            nanoinfer::connect(&self.addr)
                .await
                .expect("connect to coordinator"),
        )
    }

    /// Live workers as the coordinator reports them.
    pub async fn live_workers(&self) -> u32 {
        let mut c = self.client().await;
        c.health(HealthRequest {})
            .await
            .map(|r| r.into_inner().live_workers)
            .unwrap_or(u32::MAX)
    }

    /// Waits until the coordinator reports `n` live workers.
    pub async fn wait_live(&self, n: u32) {
        eventually(
            Duration::from_secs(20),
            &format!("{n} live workers"),
            || async move { self.live_workers().await == n },
        )
        .await;
    }
}

/// The coordinator at `addr`'s `Health`: (status, routable workers), or
/// (empty, u32::MAX) when it does not answer.
pub async fn health_of(addr: &str) -> (String, u32) {
    let Ok(channel) = nanoinfer::connect(addr).await else {
        return (String::new(), u32::MAX);
    };
    match InferServiceClient::new(channel)
        .health(HealthRequest {})
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            (r.status, r.live_workers)
        }
        Err(_) => (String::new(), u32::MAX),
    }
}

/// Waits until the coordinator at `addr` routes to `n` workers.
pub async fn wait_routable(addr: &str, n: u32) {
    eventually(
        Duration::from_secs(20),
        &format!("{n} routable workers"),
        || async move { health_of(addr).await.1 == n },
    )
    .await;
}

/// A greedy request for `prompt` with `max_tokens`.
pub fn greedy(prompt: &str, max_tokens: u32) -> InferRequest {
    InferRequest {
        prompt: prompt.into(),
        max_tokens,
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// Runs a request to completion and returns every message.
pub async fn collect(
    client: &mut InferServiceClient<Channel>,
    req: InferRequest,
) -> Result<Vec<InferResponse>, tonic::Status> {
    let mut stream = client.infer(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.push(msg);
    }
    Ok(out)
}

/// A client of the coordinator at `addr`.
pub async fn client(addr: &str) -> InferServiceClient<Channel> {
    InferServiceClient::new(
        nanoinfer::connect(addr)
            .await
            .expect("connect to coordinator"),
    )
}

/// The text of a finished stream (token messages and the final message).
pub fn text(msgs: &[InferResponse]) -> String {
    msgs.iter().map(|m| m.token.as_str()).collect()
}

/// A prompt that keeps the model talking.
pub const PROMPT: &str = "The history of the Roman Empire begins with";

/// `GET path` over plain HTTP/1.0; returns the status code and body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("HTTP response within 10 s")
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// Runs curl with `args` plus `-w` for the status; (status, body).
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(args)
        .args(["-w", "\n%{http_code}"])
        .output()
        .expect("run curl");
    assert_ok(&out, "curl");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

/// Parsed Prometheus text: `name{labels}` → value.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The process's metrics now.
pub async fn scrape(proc: &mut Proc) -> std::collections::HashMap<String, f64> {
    let addr = proc.metrics_addr().await;
    let (status, body) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    parse_metrics(&body)
}

/// Runs `scripts/gen-certs dir ids…` (openssl) and returns `dir`.
pub fn gen_certs(dir: &Path, ids: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/gen-certs"))
        .arg(dir)
        .args(ids)
        .output()
        .expect("run scripts/gen-certs");
    assert!(
        out.status.success(),
        "gen-certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_path_buf()
}

/// A fresh temporary directory for this test process and `name`.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nanoinfer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TLS channel to `addr` trusting `ca`, with a client certificate
/// (`cert`, `key`) and an expected server name when given.
pub async fn tls_channel(
    addr: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    server_name: Option<&str>,
) -> Result<Channel, tonic::transport::Error> {
    let config = nanoinfer_proto::tls::client_config(ca, identity, server_name.map(str::to_string))
        .expect("client TLS config");
    nanoinfer::connect_with(addr, Some(config)).await
}

/// A ChatML template with a tool section in Hermes' form
/// (`tests/fixtures/hermes-style.jinja`, written for the tests: SmolLM2's
/// own template has none), for a worker's `--chat-template-file`.
pub const HERMES_STYLE: &str = include_str!("../fixtures/hermes-style.jinja");

/// A worker on the chat model started with [`HERMES_STYLE`] as its
/// `--chat-template-file`, and `extra` arguments.
pub async fn start_hermes_style_worker(etcd: &Etcd, id: &str, extra: &[&str]) -> Proc {
    let template = hermes_style_template();
    let mut args = vec!["--chat-template-file", template.to_str().unwrap()];
    args.extend_from_slice(extra);
    start_worker_with(etcd, id, &chat_model_path(), &args).await
}

/// [`HERMES_STYLE`] in a file of this test process.
pub fn hermes_style_template() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nanoinfer-hermes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("hermes-style.jinja");
    std::fs::write(&path, HERMES_STYLE).unwrap();
    path
}
