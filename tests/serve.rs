//! `nanoinfer serve`: the one-command local server starts etcd, a worker
//! and a coordinator on the ports it is given, answers on both APIs, and
//! leaves nothing behind after Ctrl-C; a taken port fails it at once,
//! naming the port and the flag that moves it.

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// A running `nanoinfer serve` whose stderr lines arrive on a channel (read
/// by a thread). Dropped while still running (a failed assertion), it gets
/// SIGINT so it stops its own children, then SIGKILL if it lingers.
struct Serve {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Vec<String>,
}

impl Serve {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(bin("nanoinfer"))
            .arg("serve")
            .args(args)
            // The test's own ports and model, not the caller's settings.
            .env_remove("NANOINFER_MODEL")
            .env_remove("NANOINFER_MODEL_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nanoinfer serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            stderr: Vec::new(),
        }
    }

    /// Everything it wrote to stderr so far.
    fn stderr(&mut self) -> String {
        self.stderr.extend(self.lines.try_iter());
        self.stderr.join("\n")
    }

    /// Waits for a stderr line containing `needle`; panics with what it
    /// wrote when it exits first or `timeout` passes.
    fn wait_for_line(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.stderr.push(line);
                    if found {
                        return;
                    }
                }
                // The reader thread ended: stderr closed, the process is
                // exiting.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().unwrap();
                    panic!(
                        "serve exited ({status}) before printing {needle:?}:\n{}",
                        self.stderr()
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= deadline {
                panic!(
                    "serve did not print {needle:?} within {timeout:?}:\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// Waits for it to exit (and for the last of its stderr); panics when
    /// it runs past `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader thread ends at end of file: then every line is in.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.stderr.push(line);
                }
                return status;
            }
            if Instant::now() >= deadline {
                panic!("serve did not exit within {timeout:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (a `kill` name: INT, TERM, KILL).
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal("INT");
            let deadline = Instant::now() + Duration::from_secs(40);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The processes whose parent is `pid` (from /proc/*/stat).
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if ppid == Some(pid) {
            children.push(child);
        }
    }
    children
}

/// Whether `port` on 127.0.0.1 can be bound (nothing listens there).
fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn serve_answers_on_both_apis_and_stops_cleanly_on_ctrl_c() {
    let (grpc, http, metrics) = (free_port(), free_port(), free_port());
    let model = chat_model_path();
    let model = model.to_str().unwrap();
    let (grpc_s, http_s, metrics_s) = (grpc.to_string(), http.to_string(), metrics.to_string());
    let mut serve = Serve::start(&[
        model,
        "--port",
        &grpc_s,
        "--http-port",
        &http_s,
        "--metrics-port",
        &metrics_s,
        "--threads",
        "1",
        "--model-name",
        "serve-test-model",
    ]);
    serve.wait_for_line("Ctrl-C to stop", Duration::from_secs(180));
    let banner = serve.stderr();
    assert!(
        banner.contains(&format!("http://127.0.0.1:{http}/v1")),
        "{banner}"
    );
    let pid = serve.child.id();
    let children = children_of(pid);
    assert_eq!(
        children.len(),
        3,
        "etcd, a worker and the coordinator: {children:?}"
    );
    let temp = std::env::temp_dir().join(format!("nanoinfer-serve-{pid}"));
    assert!(temp.join("coordinator.log").is_file(), "{}", temp.display());

    // gRPC, through the CLI.
    let out = Command::new(bin("nanoinfer"))
        .args(["--addr", &format!("127.0.0.1:{grpc}")])
        .args(["infer", "What is the capital of France?"])
        .env_remove("NANOINFER_ADDR")
        .output()
        .unwrap();
    assert_ok(&out, "nanoinfer infer");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("Paris"), "{answer}");

    // The OpenAI API, through curl: the worker's --model-name came through.
    let (status, body) = curl(&["-s", &format!("http://127.0.0.1:{http}/v1/models")]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("serve-test-model"), "{body}");

    // Ctrl-C: everything stops, in order, and nothing is left behind.
    serve.signal("INT");
    let status = serve.wait_exit(Duration::from_secs(40));
    let stderr = serve.stderr();
    assert!(status.success(), "serve exited with {status}:\n{stderr}");
    for port in [grpc, http, metrics] {
        assert!(port_free(port), "port {port} still taken:\n{stderr}");
    }
    // Reaped by serve, or by init moments after serve exited.
    let deadline = Instant::now() + Duration::from_secs(5);
    let running = |children: &[u32]| -> Vec<u32> {
        children
            .iter()
            .copied()
            .filter(|c| std::path::Path::new(&format!("/proc/{c}")).exists())
            .collect()
    };
    while !running(&children).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        running(&children),
        Vec::<u32>::new(),
        "children left running"
    );
    assert!(!temp.exists(), "{} was not removed", temp.display());
}

#[test]
fn serve_fails_at_once_when_its_port_is_taken() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let model = chat_model_path();
    let (port_s, http_s, metrics_s) = (
        port.to_string(),
        free_port().to_string(),
        free_port().to_string(),
    );
    let mut serve = Serve::start(&[
        model.to_str().unwrap(),
        "--port",
        &port_s,
        "--http-port",
        &http_s,
        "--metrics-port",
        &metrics_s,
    ]);
    let status = serve.wait_exit(Duration::from_secs(5));
    let stderr = serve.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&port.to_string()) && stderr.contains("--port"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    drop(held);
}
