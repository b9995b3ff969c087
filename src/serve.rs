//! `nanoinfer serve [MODEL.gguf]`: the whole cluster on one machine, in the
//! foreground, the way one tries `vllm serve MODEL` or `llama-server -m
//! MODEL`.
//!
//! It starts a private etcd (fresh data in a temp dir), the workers and the
//! coordinator as child processes, waits until the coordinator routes to
//! every worker, prints where to reach it, and runs until SIGINT (Ctrl-C),
//! SIGTERM or SIGHUP. Then it stops the children in the cluster's order
//! (coordinator, workers, etcd; SIGTERM, SIGKILL after 30 s) and removes the
//! temp dir. A child that exits on its own stops the rest and fails the
//! command with the end of the child's log (the logs are kept then).
//!
//! Each child runs in its own process group, so a Ctrl-C at the terminal
//! reaches this process alone and the children stop in order rather than
//! all at once. The flip side is that nothing else stops them: [`Cluster`]
//! SIGKILLs whatever still runs when it is dropped (an error, a panic).
//! `deploy/local-cluster.sh` is the long-lived, configurable counterpart.

use std::error::Error;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nanoinfer_proto::nanoinfer::{infer_service_client::InferServiceClient, HealthRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How often start-up and the foreground loop look at signals, children
/// and the coordinator's health.
const POLL: Duration = Duration::from_millis(200);
/// How long etcd may take to answer its health check.
const ETCD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the workers may take to load the model and register.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How often a progress line is printed while the workers load.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How long a child may take to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The workers' etcd lease (seconds): short, so a worker that dies leaves
/// the routing table quickly.
const LEASE_TTL: &str = "3";
/// The file `scripts/fetch-model` fetches by default, and the name the
/// local cluster serves it under.
const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";

/// Arguments of `nanoinfer serve`.
#[derive(Debug, clap::Args)]
// Apart from the client options every subcommand lists.
#[command(next_help_heading = "Server options")]
pub struct ServeArgs {
    /// The GGUF model to serve. Default: the one `scripts/fetch-model`
    /// fetches, `<cache dir>/models/SmolLM2-135M-Instruct.Q4_1.gguf`
    /// (cache dir: NANOINFER_CACHE_DIR, else /var/cache/nanoinfer as root,
    /// else ${XDG_CACHE_HOME:-~/.cache}/nanoinfer).
    #[arg(value_name = "MODEL.gguf", env = "NANOINFER_MODEL")]
    model: Option<PathBuf>,
    /// Address the coordinator's gRPC, HTTP and metrics ports bind; etcd
    /// and the workers always stay on 127.0.0.1.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    host: IpAddr,
    /// The coordinator's gRPC port (`nanoinfer.InferService`).
    #[arg(long, default_value_t = 50052, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// The OpenAI-compatible HTTP API's port (`/v1/...`).
    #[arg(long, default_value_t = 8080, value_parser = clap::value_parser!(u16).range(1..))]
    http_port: u16,
    /// The coordinator's metrics port (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, default_value_t = 9052, value_parser = clap::value_parser!(u16).range(1..))]
    metrics_port: u16,
    /// Worker processes, each with its own copy of the model.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Threads per worker. Default: the machine's cores shared out equally
    /// among the workers (at least 1 each).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Sequences each worker decodes at once (the worker's --parallel;
    /// default: the worker's).
    #[arg(long)]
    parallel: Option<u32>,
    /// The name clients ask for the model by (`model` in both APIs).
    /// Default: smollm2-135m-instruct for the default model, else the name
    /// the GGUF carries.
    #[arg(long, env = "NANOINFER_MODEL_NAME")]
    model_name: Option<String>,
}

/// Runs `nanoinfer serve` to the end: `Err` (one line) when it cannot start
/// at all, a failure code when the cluster failed on the way.
pub async fn run(args: ServeArgs) -> Result<ExitCode, Box<dyn Error>> {
    let binaries = Binaries::find()?;
    let (model, model_name) = model(&args)?;
    let public = [
        (args.port, "--port", "gRPC"),
        (args.http_port, "--http-port", "OpenAI HTTP API"),
        (args.metrics_port, "--metrics-port", "metrics"),
    ];
    check_ports(args.host, &public)?;
    // Before the first child: from here on no stop signal can end this
    // process without stopping the children.
    let mut signals = StopSignals::install()?;
    let dir = std::env::temp_dir().join(format!("nanoinfer-serve-{}", std::process::id()));
    // A leftover of an earlier process that had this pid.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut cluster = Cluster {
        dir,
        children: Vec::new(),
        keep_logs: false,
    };
    let plan = Plan {
        binaries,
        model,
        model_name,
        threads: args
            .threads
            .unwrap_or_else(|| default_threads(args.workers)),
        args,
    };
    let Err(stop) = serve(&mut cluster, &plan, &mut signals).await;
    if let Stop::Signal(name) = stop {
        eprintln!(
            "{name}: stopping the coordinator, the workers and etcd (Ctrl-C again kills them)…"
        );
        cluster.stop(&mut signals).await;
        eprintln!("stopped");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("error: {}", cluster.describe(&stop));
    cluster.stop(&mut signals).await;
    cluster.keep_logs = true;
    eprintln!("stopped; logs kept in {}", cluster.dir.display());
    Ok(ExitCode::FAILURE)
}

/// What `serve` resolved before starting anything.
struct Plan {
    binaries: Binaries,
    model: PathBuf,
    model_name: Option<String>,
    threads: u32,
    args: ServeArgs,
}

/// Starts the cluster, waits until it is ready and runs it until something
/// says to stop; only ever returns why it stopped.
async fn serve(
    cluster: &mut Cluster,
    plan: &Plan,
    signals: &mut StopSignals,
) -> Result<std::convert::Infallible, Stop> {
    let args = &plan.args;
    eprintln!(
        "starting etcd, {} and the coordinator; logs in {}",
        plural(args.workers, "worker"),
        cluster.dir.display()
    );
    let etcd = start_etcd(cluster, &plan.binaries.etcd, signals).await?;
    for i in 1..=args.workers {
        let mut cmd = Command::new(&plan.binaries.worker);
        cmd.arg("--model").arg(&plan.model);
        // Port 0: the worker binds a free port and registers the address
        // it got, so there is no window in which another process takes it.
        cmd.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--etcd-endpoints", &etcd, "--lease-ttl", LEASE_TTL])
            .args(["--id", &format!("serve-worker{i}")])
            .args(["--threads", &plan.threads.to_string()]);
        if let Some(parallel) = args.parallel {
            cmd.args(["--parallel", &parallel.to_string()]);
        }
        if let Some(name) = &plan.model_name {
            cmd.args(["--model-name", name]);
        }
        cluster.spawn(&format!("worker{i}"), Role::Worker, cmd)?;
    }
    let public = |port| SocketAddr::new(args.host, port).to_string();
    let mut cmd = Command::new(&plan.binaries.coordinator);
    cmd.args(["--listen", &public(args.port)])
        .args(["--http-listen", &public(args.http_port)])
        .args(["--metrics-listen", &public(args.metrics_port)])
        .args(["--etcd-endpoints", &etcd]);
    cluster.spawn("coordinator", Role::Coordinator, cmd)?;

    // Clients on this machine reach a wildcard bind through loopback.
    let reach = |port| SocketAddr::new(loopback_for(args.host), port);
    let grpc = reach(args.port);
    let started = Instant::now();
    let mut next_progress = PROGRESS_EVERY;
    loop {
        let live = live_workers(&format!("http://{grpc}")).await;
        if live >= args.workers {
            break;
        }
        cluster.tick(signals).await?;
        let waited = started.elapsed();
        if waited >= READY_TIMEOUT {
            return Err(Stop::Failed(format!(
                "the coordinator sees {live} of {} live after {} s",
                plural(args.workers, "worker"),
                waited.as_secs()
            )));
        }
        if waited >= next_progress {
            eprintln!(
                "waiting for {} to load the model… ({} s)",
                plural(args.workers - live, "worker"),
                waited.as_secs()
            );
            next_progress += PROGRESS_EVERY;
        }
    }
    eprintln!(
        "{}",
        banner(plan, grpc, reach(args.http_port), reach(args.metrics_port))
    );
    loop {
        cluster.tick(signals).await?;
    }
}

/// The ready message: addresses, the model, two commands to try.
fn banner(plan: &Plan, grpc: SocketAddr, http: SocketAddr, metrics: SocketAddr) -> String {
    let args = &plan.args;
    let mut model = plan.model.display().to_string();
    if let Some(name) = &plan.model_name {
        let _ = write!(model, " (as {name})");
    }
    // The CLI's own default needs no --addr.
    let addr = if format!("http://{grpc}") == nanoinfer::default_addr()
        && std::env::var_os("NANOINFER_ADDR").is_none()
    {
        String::new()
    } else {
        format!("--addr {grpc} ")
    };
    let model_field = plan
        .model_name
        .as_ref()
        .map(|name| format!("\"model\": \"{name}\", "))
        .unwrap_or_default();
    format!(
        "ready: {} with {} threads each\n  \
         gRPC:        {grpc} (nanoinfer.InferService)\n  \
         OpenAI API:  http://{http}/v1\n  \
         metrics:     http://{metrics}/metrics\n  \
         model:       {model}\n\
         try:\n  \
         nanoinfer {addr}infer \"What is the capital of France?\"\n  \
         curl -s http://{http}/v1/chat/completions -H 'content-type: application/json' \
         -d '{{{model_field}\"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]}}'\n\
         Ctrl-C to stop",
        plural(args.workers, "worker"),
        plan.threads,
    )
}

/// Starts etcd with fresh data on two free loopback ports and waits until
/// it is healthy; returns its client URL. Another process can take a port
/// between the check and etcd's bind: that is tried again on new ports.
async fn start_etcd(
    cluster: &mut Cluster,
    etcd: &Path,
    signals: &mut StopSignals,
) -> Result<String, Stop> {
    let data = cluster.dir.join("etcd-data");
    let mut attempt = 0;
    'attempts: loop {
        attempt += 1;
        let _ = std::fs::remove_dir_all(&data);
        let (client, peer) = free_ports()?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new(etcd);
        cmd.args(["--name", "nanoinfer-serve"])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("nanoinfer-serve={peer_url}")]);
        cluster.spawn("etcd", Role::Etcd, cmd)?;
        let started = Instant::now();
        while !etcd_healthy(client).await {
            match cluster.tick(signals).await {
                Err(Stop::Exited { index, .. })
                    if attempt < 3
                        && cluster
                            .log_tail(index, 20)
                            .contains("address already in use") =>
                {
                    cluster.children.remove(index);
                    continue 'attempts;
                }
                other => other?,
            }
            if started.elapsed() >= ETCD_TIMEOUT {
                return Err(Stop::Failed(format!(
                    "etcd did not answer within {} s",
                    ETCD_TIMEOUT.as_secs()
                )));
            }
        }
        return Ok(client_url);
    }
}

/// Whether etcd on 127.0.0.1:`port` says it is healthy (`GET /health` on
/// its client port answers `{"health":"true"}` once it serves requests).
async fn etcd_healthy(port: u16) -> bool {
    let check = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        std::io::Result::Ok(response.contains("\"health\":\"true\""))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), check).await,
        Ok(Ok(true))
    )
}

/// The coordinator's count of live workers; 0 while it does not answer.
async fn live_workers(url: &str) -> u32 {
    let health = async {
        let channel = nanoinfer::connect(url).await.ok()?;
        let response = InferServiceClient::new(channel)
            .health(HealthRequest {})
            .await
            .ok()?;
        Some(response.into_inner().live_workers)
    };
    tokio::time::timeout(Duration::from_secs(2), health)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Why the cluster stops.
enum Stop {
    /// A stop signal (its name): the normal end.
    Signal(&'static str),
    /// A child (its index in [`Cluster::children`]) exited on its own.
    Exited { index: usize, status: ExitStatus },
    /// Anything else that ends it (a failed start, a timeout), in one line.
    Failed(String),
}

impl<E: Into<Box<dyn Error>>> From<E> for Stop {
    fn from(e: E) -> Self {
        Self::Failed(e.into().to_string())
    }
}

/// What a child is, for the order they stop in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Etcd,
    Worker,
    Coordinator,
}

/// A started child and its log file.
struct Process {
    name: String,
    role: Role,
    log: PathBuf,
    child: Child,
}

/// The children (in start order) and the temp dir that holds their logs
/// and etcd's data. Dropping it SIGKILLs any child still running and
/// removes the dir (the logs stay when `keep_logs` is set).
struct Cluster {
    dir: PathBuf,
    children: Vec<Process>,
    keep_logs: bool,
}

impl Cluster {
    /// Starts `cmd` as `name`, with stdout and stderr to `<dir>/<name>.log`.
    fn spawn(&mut self, name: &str, role: Role, mut cmd: Command) -> Result<(), Stop> {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            // Its own process group: a terminal's Ctrl-C is ours to act on.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        self.children.push(Process {
            name: name.to_string(),
            role,
            log,
            child,
        });
        Ok(())
    }

    /// Waits one [`POLL`] for a stop signal, then checks that every child
    /// still runs: `Err` with the reason to stop when not.
    async fn tick(&mut self, signals: &mut StopSignals) -> Result<(), Stop> {
        if let Ok(name) = tokio::time::timeout(POLL, signals.recv()).await {
            return Err(Stop::Signal(name));
        }
        for (index, process) in self.children.iter_mut().enumerate() {
            if let Ok(Some(status)) = process.child.try_wait() {
                return Err(Stop::Exited { index, status });
            }
        }
        Ok(())
    }

    /// `stop` in words, with the end of the log of a child that exited.
    fn describe(&self, stop: &Stop) -> String {
        match stop {
            Stop::Signal(name) => format!("stopped by {name}"),
            Stop::Failed(message) => message.clone(),
            Stop::Exited { index, status } => {
                let process = &self.children[*index];
                let mut text = format!(
                    "{} exited ({status}); the end of {}:",
                    process.name,
                    process.log.display()
                );
                for line in self.log_tail(*index, 5).lines() {
                    let _ = write!(text, "\n  {line}");
                }
                text
            }
        }
    }

    /// The last `n` lines of child `index`'s log, up to the stack
    /// backtrace that follows an error or a panic when RUST_BACKTRACE is
    /// set (the message is above it).
    fn log_tail(&self, index: usize, n: usize) -> String {
        let text = std::fs::read_to_string(&self.children[index].log).unwrap_or_default();
        let end = ["\nStack backtrace:", "\nstack backtrace:"]
            .iter()
            .filter_map(|marker| text.rfind(marker))
            .max()
            .unwrap_or(text.len());
        let lines: Vec<&str> = text[..end].trim_end().lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops every child still running in the cluster's order (see
    /// [`Cluster::stop_in_order`]); a second stop signal meanwhile kills
    /// them all at once.
    async fn stop(&mut self, signals: &mut StopSignals) {
        tokio::select! {
            () = self.stop_in_order() => {}
            name = signals.recv() => {
                eprintln!("{name} again: killing them");
                self.kill_all();
            }
        }
    }

    /// SIGTERM to the coordinator (it stops taking requests and drains),
    /// then the workers (they revoke their leases), then etcd, each group
    /// waited for; SIGKILL to one that has not exited [`STOP_TIMEOUT`]
    /// later.
    async fn stop_in_order(&mut self) {
        for role in [Role::Coordinator, Role::Worker, Role::Etcd] {
            for process in self.children.iter().filter(|p| p.role == role) {
                let pid = process
                    .child
                    .id()
                    .and_then(|id| rustix::process::Pid::from_raw(i32::try_from(id).ok()?));
                // None: already exited and reaped.
                if let Some(pid) = pid {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
            }
            for process in self.children.iter_mut().filter(|p| p.role == role) {
                if tokio::time::timeout(STOP_TIMEOUT, process.child.wait())
                    .await
                    .is_err()
                {
                    eprintln!(
                        "{} did not stop within {} s; killing it",
                        process.name,
                        STOP_TIMEOUT.as_secs()
                    );
                    let _ = process.child.kill().await;
                }
            }
        }
    }

    /// SIGKILL to every child not yet reaped (the runtime reaps them in
    /// the background).
    fn kill_all(&mut self) {
        for process in &mut self.children {
            // Reaped children have no id.
            if process.child.id().is_some() {
                let _ = process.child.start_kill();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        // etcd preallocates tens of MB of write-ahead log: never keep it.
        let _ = std::fs::remove_dir_all(self.dir.join("etcd-data"));
        if !self.keep_logs {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The signals that stop `serve`, caught from before the first child
/// starts.
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            // A closed terminal: the children, in their own process groups,
            // would not hear of it.
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The name of the next stop signal.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

/// The programs `serve` runs.
struct Binaries {
    coordinator: PathBuf,
    worker: PathBuf,
    etcd: PathBuf,
}

impl Binaries {
    /// The coordinator and worker next to this executable (where the build
    /// puts them), etcd on PATH.
    fn find() -> Result<Self, String> {
        const SETUP: &str = "run scripts/setup (it builds the binaries and installs etcd)";
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot locate this program: {e}"))?;
        let beside = |name: &str| {
            let path = exe.with_file_name(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "{name} not found next to {}: {SETUP}",
                    exe.display()
                ))
            }
        };
        let etcd = std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("etcd"))
                    .find(|path| path.is_file())
            })
            .ok_or(format!("etcd not found on PATH: {SETUP}"))?;
        Ok(Self {
            coordinator: beside("nanoinfer-coordinator")?,
            worker: beside("nanoinfer-worker")?,
            etcd,
        })
    }
}

/// The model file and the name to serve it under (`None`: the name the
/// GGUF carries). Without a path it is the default model, named as the
/// local cluster names it.
fn model(args: &ServeArgs) -> Result<(PathBuf, Option<String>), String> {
    if let Some(path) = &args.model {
        if !path.is_file() {
            return Err(format!(
                "model {} not found: pass the path of a GGUF file (scripts/fetch-model fetches one)",
                path.display()
            ));
        }
        return Ok((path.clone(), args.model_name.clone()));
    }
    let candidate = default_model_dir().map(|dir| dir.join(DEFAULT_MODEL_FILE));
    let path = candidate
        .clone()
        .filter(|path| path.is_file())
        .ok_or_else(|| {
            let looked = candidate
                .map(|path| format!(" (looked for {})", path.display()))
                .unwrap_or_default();
            format!("no model given and the default one is missing{looked}: run scripts/fetch-model, or pass a GGUF path")
        })?;
    let name = args
        .model_name
        .clone()
        .unwrap_or_else(|| DEFAULT_MODEL_NAME.to_string());
    Ok((path, Some(name)))
}

/// Where `scripts/fetch-model` puts models: NANOINFER_MODEL_DIR, else
/// `<cache dir>/models` with the cache dir chosen as scripts/common.sh
/// chooses it.
fn default_model_dir() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("NANOINFER_MODEL_DIR") {
        return Some(dir);
    }
    let cache = if let Some(dir) = var("NANOINFER_CACHE_DIR") {
        dir
    } else if rustix::process::geteuid().is_root() {
        PathBuf::from("/var/cache/nanoinfer")
    } else {
        var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|home| home.join(".cache")))?
            .join("nanoinfer")
    };
    Some(cache.join("models"))
}

/// Fails naming the port and the flag that moves it when one of `ports`
/// (port, flag, what it is for) is taken on `host`, or two are the same.
fn check_ports(host: IpAddr, ports: &[(u16, &str, &str)]) -> Result<(), String> {
    for (i, &(port, flag, what)) in ports.iter().enumerate() {
        if let Some((_, other, _)) = ports[..i].iter().find(|(p, ..)| *p == port) {
            return Err(format!(
                "{other} and {flag} are both {port}: give them different ports"
            ));
        }
        // Bound and released at once: the coordinator binds it moments later.
        match TcpListener::bind((host, port)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(format!(
                    "port {port} ({what}) on {host} is already in use: free it or pick another with {flag}"
                ))
            }
            Err(e) => return Err(format!("cannot bind {host} port {port} ({what}, {flag}): {e}")),
        }
    }
    Ok(())
}

/// Two distinct free loopback ports (for etcd's client and peer URLs),
/// released for etcd to bind.
fn free_ports() -> std::io::Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// Threads per worker when not given: the cores shared out equally.
fn default_threads(workers: u32) -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (u32::try_from(cores).unwrap_or(u32::MAX) / workers).max(1)
}

/// The loopback address of `host`'s family when `host` is a wildcard
/// (a client cannot connect to 0.0.0.0), else `host`.
fn loopback_for(host: IpAddr) -> IpAddr {
    match host {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// "1 worker", "2 workers".
fn plural(n: u32, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_names_the_flag_that_moves_it() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let err = check_ports(host, &[(port, "--port", "gRPC")]).unwrap_err();
        assert!(
            err.contains(&port.to_string()) && err.contains("--port"),
            "{err}"
        );
        drop(held);
        let free = free_ports().unwrap().0;
        check_ports(host, &[(free, "--port", "gRPC")]).unwrap();
        let err = check_ports(
            host,
            &[(free, "--port", "gRPC"), (free, "--http-port", "HTTP")],
        )
        .unwrap_err();
        assert!(err.contains("--port and --http-port"), "{err}");
    }

    #[test]
    fn threads_are_shared_out_and_at_least_one() {
        assert!(default_threads(1) >= 1);
        assert_eq!(default_threads(u32::MAX), 1);
    }

    #[test]
    fn wildcard_hosts_are_reached_through_loopback() {
        assert_eq!(
            loopback_for("0.0.0.0".parse().unwrap()),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            loopback_for("::".parse().unwrap()),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        );
        let lan: IpAddr = "192.168.1.2".parse().unwrap();
        assert_eq!(loopback_for(lan), lan);
    }
}
