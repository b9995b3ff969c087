//! End to end: the README's path. The local cluster script starts etcd, two
//! real workers on the real model and a coordinator; `test.sh` (grpcurl over
//! reflection) and the `nanoinfer` CLI drive it.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{free_port, json_messages};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The target dir this test binary was built into (`<target>/release/deps/x`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

struct LocalCluster {
    env: Vec<(String, String)>,
    addr: String,
    worker_addr: String,
}

impl LocalCluster {
    fn script(&self, args: &[&str]) -> Output {
        Command::new(root().join("deploy/local-cluster.sh"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap()
    }

    /// The plain cluster on the tests' base model (its length-bound
    /// assertions need a model that keeps talking).
    fn start() -> Self {
        Self::start_with("plain", &["start"], Some(common::model_path()))
    }

    /// `model`: NANOINFER_MODEL for the script; `None` = its default model.
    fn start_with(name: &str, args: &[&str], model: Option<PathBuf>) -> Self {
        let cluster = Self::prepare(name, model);
        let run_dir = cluster.run_dir();
        let out = cluster.script(args);
        if !out.status.success() {
            // Every process's log tail, so a failure on CI can be read.
            let mut logs = String::new();
            for entry in std::fs::read_dir(&run_dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                    logs += &format!("\n--- {} (last 40 lines)\n{tail}\n", path.display());
                }
            }
            panic!(
                "local-cluster.sh start failed:\n{}{logs}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster
    }

    fn run_dir(&self) -> PathBuf {
        PathBuf::from(&self.env[0].1)
    }

    /// The environment of a cluster on free ports, not started.
    fn prepare(name: &str, model: Option<PathBuf>) -> Self {
        let run_dir =
            std::env::temp_dir().join(format!("nanoinfer-e2e-{name}-{}", std::process::id()));
        let coordinator = free_port();
        let worker = free_port();
        let mut env = vec![
            ("NANOINFER_RUN_DIR".into(), run_dir.display().to_string()),
            ("NANOINFER_COORDINATOR_PORT".into(), coordinator.to_string()),
            (
                "NANOINFER_WORKER_PORTS".into(),
                format!("{worker} {}", free_port()),
            ),
            (
                "NANOINFER_WORKER_METRICS_PORTS".into(),
                format!("{} {}", free_port(), free_port()),
            ),
            (
                "NANOINFER_COORDINATOR_METRICS_PORT".into(),
                free_port().to_string(),
            ),
            (
                "NANOINFER_COORDINATOR_HTTP_PORT".into(),
                free_port().to_string(),
            ),
            ("NANOINFER_ETCD_PORT".into(), free_port().to_string()),
            ("NANOINFER_ETCD_PEER_PORT".into(), free_port().to_string()),
            (
                "CARGO_TARGET_DIR".into(),
                target_dir().display().to_string(),
            ),
        ];
        if let Some(model) = model {
            env.push(("NANOINFER_MODEL".into(), model.display().to_string()));
        }
        Self {
            env,
            addr: format!("127.0.0.1:{coordinator}"),
            worker_addr: format!("127.0.0.1:{worker}"),
        }
    }

    fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    fn test_sh(&self, args: &[&str]) -> String {
        self.test_sh_at(&self.addr, args)
    }

    fn test_sh_at(&self, addr: &str, args: &[&str]) -> String {
        let out = self.test_sh_with(addr, args, &[]);
        assert!(
            out.status.success(),
            "test.sh {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn test_sh_with(&self, addr: &str, args: &[&str], env: &[(String, String)]) -> Output {
        Command::new(root().join("test.sh"))
            .args(args)
            .env("NANOINFER_ADDR", addr)
            .env_remove("NANOINFER_CA")
            .env_remove("NANOINFER_API_KEY")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap()
    }

    /// The settings a secure cluster writes for clients (`secure.env`).
    fn secure_env(&self) -> Vec<(String, String)> {
        let run_dir = &self.env[0].1;
        let text = std::fs::read_to_string(Path::new(run_dir).join("secure.env")).unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_nanoinfer"))
            .args(["--addr", &format!("http://{}", self.addr)])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let out = self.script(&["stop"]);
        assert!(out.status.success() || std::thread::panicking());
    }
}

#[test]
fn a_taken_port_fails_the_start_at_once_and_starts_nothing() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    for var in [
        "NANOINFER_COORDINATOR_HTTP_PORT",
        "NANOINFER_WORKER_PORTS",
        "NANOINFER_ETCD_PORT",
    ] {
        let mut cluster = LocalCluster::prepare("busy", Some(common::model_path()));
        let value = match var {
            "NANOINFER_WORKER_PORTS" => format!("{} {port}", free_port()),
            _ => port.clone(),
        };
        cluster.set_env(var, &value);
        let started = std::time::Instant::now();
        let out = cluster.script(&["start"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}: {stderr}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "{var}: took {:?}",
            started.elapsed()
        );
        assert!(
            stderr.contains(&format!("port {port} (")) && stderr.contains("already in use"),
            "{var}: {stderr}"
        );
        assert!(stderr.contains(var), "{var}: {stderr}");
        // Nothing was started: no process left a pid file.
        let pids: Vec<_> = std::fs::read_dir(cluster.run_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .map(|e| e.path())
            .collect();
        assert!(pids.is_empty(), "{var}: left running: {pids:?}");
    }
}

#[test]
fn readme_path_local_cluster_test_sh_and_cli() {
    let cluster = LocalCluster::start();

    let health = json_messages(&cluster.test_sh(&["health"]));
    assert_eq!(health[0]["status"], "OK");
    assert_eq!(health[0]["liveWorkers"], 2);

    let services = cluster.test_sh(&["list"]);
    for s in [
        "nanoinfer.InferService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.lines().any(|l| l == s),
            "{s} missing in {services}"
        );
    }
    assert!(cluster.test_sh(&["describe"]).contains(
        "rpc Infer ( .nanoinfer.InferRequest ) returns ( stream .nanoinfer.InferResponse )"
    ));

    let default = json_messages(&cluster.test_sh(&["infer"]));
    let last = default.last().unwrap();
    assert_eq!(last["finishReason"], "FINISH_REASON_LENGTH");
    assert_eq!(last["usage"]["generatedTokens"], 32);

    let custom = json_messages(&cluster.test_sh(&["infer", "Custom prompt", "20"]));
    assert_eq!(custom.len(), 21, "20 tokens and the final message");
    let id = custom[0]["requestId"].as_str().unwrap();
    assert!(custom.iter().all(|m| m["requestId"] == id));
    assert_eq!(custom[20]["usage"]["generatedTokens"], 20);

    // A request carrying its own traceparent; its request id names the trace.
    let traced = json_messages(&cluster.test_sh(&["trace", "Hello", "3"]));
    let id = traced[0]["requestId"].as_str().unwrap();
    assert!(id.starts_with("trace-") && id.len() == 38, "{id}");
    assert_eq!(traced.last().unwrap()["usage"]["generatedTokens"], 3);

    // Workers serve health and reflection too.
    let services = cluster.test_sh_at(&cluster.worker_addr, &["list"]);
    for s in ["nanoinfer.worker.v1.WorkerService", "grpc.health.v1.Health"] {
        assert!(
            services.lines().any(|l| l == s),
            "{s} missing in {services}"
        );
    }

    let out = cluster.cli(&["health"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "OK (live workers: 2)"
    );

    let out = cluster.cli(&[
        "infer",
        "The capital of France is",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--request-id",
        "cli-1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert!(
        stderr.contains("request_id=cli-1 finish_reason=LENGTH")
            && stderr.contains("generated_tokens=6"),
        "{stderr}"
    );
    // Gemma (a base model) has no chat template: the question went as a
    // plain prompt, and the CLI said so.
    assert!(stderr.contains("no chat template"), "{stderr}");

    // The benchmark program, through the CLI, against the coordinator.
    let out = cluster.cli(&[
        "bench",
        "--requests",
        "1",
        "--max-tokens",
        "4",
        "--prompt-words",
        "8",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let coordinator = &report["coordinator"];
    // The bench names the model; without --model-name a worker registers
    // the GGUF's general.name.
    assert_eq!(report["model"], "Gemma 3 270m", "{report}");
    assert_eq!(coordinator["generated_tokens"], 4.0, "{report}");
    assert!(coordinator["ttft_ms"].as_f64().unwrap() > 0.0, "{report}");
    assert!(coordinator["errors"].as_object().unwrap().is_empty());
    assert!(
        report.get("worker").is_none(),
        "only the coordinator measured"
    );

    let out = cluster.cli(&["infer", "hi", "--top-p", "2"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("top_p"),
        "{stderr}"
    );
}

#[test]
fn secure_local_cluster_works_with_test_sh_and_the_cli() {
    // The default model (SmolLM2-135M-Instruct), as `scripts/demo` runs it.
    let cluster = LocalCluster::start_with("secure", &["start", "--secure"], None);
    let env = cluster.secure_env();
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["NANOINFER_ADDR", "NANOINFER_CA", "NANOINFER_API_KEY"]
    );

    let ok = cluster.test_sh_with(&cluster.addr, &["infer", "Hello", "4"], &env);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let msgs = json_messages(&String::from_utf8(ok.stdout).unwrap());
    let generated = msgs.last().unwrap()["usage"]["generatedTokens"].as_u64();
    assert!(matches!(generated, Some(1..=4)), "{msgs:?}");

    // Without the key: UNAUTHENTICATED; without the CA (plaintext): refused.
    let no_key: Vec<_> = env
        .iter()
        .filter(|(k, _)| k != "NANOINFER_API_KEY")
        .cloned()
        .collect();
    let out = cluster.test_sh_with(&cluster.addr, &["infer", "Hello", "4"], &no_key);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster.test_sh_with(&cluster.addr, &["health"], &[]);
    assert!(!out.status.success(), "plaintext health was answered");

    // The CLI reads the same settings from the environment; the default
    // model answers the README's kind of question through its template.
    let out = Command::new(env!("CARGO_BIN_EXE_nanoinfer"))
        .args([
            "infer",
            "--chat",
            "What is the capital of France? Answer in one sentence.",
        ])
        .args(["--temperature", "0", "--max-tokens", "40"])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("Paris"), "{answer}");

    // The OpenAI-compatible API takes the same TLS files and key, and lists
    // the name the local cluster gives the default model.
    let get = |name: &str| {
        let all = env.iter().chain(cluster.env.iter());
        all.filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .next()
            .unwrap()
    };
    let url = format!(
        "https://127.0.0.1:{}/v1/models",
        get("NANOINFER_COORDINATOR_HTTP_PORT")
    );
    let out = Command::new("curl")
        .args(["-sS", "--cacert", &get("NANOINFER_CA"), "-H"])
        .arg(format!(
            "authorization: Bearer {}",
            get("NANOINFER_API_KEY")
        ))
        .arg(&url)
        .output()
        .unwrap();
    let models = String::from_utf8_lossy(&out.stdout);
    assert!(
        models.contains(r#""id":"smollm2-135m-instruct""#),
        "{models}"
    );
    let out = Command::new("curl")
        .args(["-sS", "--cacert", &get("NANOINFER_CA")])
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("invalid_api_key"),
        "no key: refused"
    );
    let plain = Command::new("curl")
        .args(["-sS", &url.replace("https", "http")])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plaintext HTTP was answered");
}
