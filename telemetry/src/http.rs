//! The operational HTTP endpoint every process serves on its own port
//! (`--metrics-listen`): Prometheus metrics and liveness/readiness probes.
//!
//! - `GET /metrics`: the process's registry in the OpenMetrics text format.
//! - `GET /healthz`: 200 while the process is up (liveness).
//! - `GET /readyz`: 200 when the process can serve, 503 otherwise (readiness;
//!   what "ready" means is the process's call, through a `watch<bool>`).

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use nanoinfer_proto::server::Server;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    ready: watch::Receiver<bool>,
}

/// Content type of the OpenMetrics text exposition.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], body),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encoding metrics: {e}\n"),
        ),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if *state.ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until
/// `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("metrics listening on {addr}");
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { registry, ready });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Starts [`serve`] as the process's "metrics endpoint" [`Server`] (with
/// the process's own CPU, memory and file-descriptor figures added to
/// `registry`): it runs until the server is drained or dropped.
pub fn spawn(
    listener: TcpListener,
    mut registry: Registry,
    ready: watch::Receiver<bool>,
) -> Server {
    registry.register_collector(Box::new(ProcessCollector));
    let registry = Arc::new(registry);
    Server::spawn("metrics endpoint", move |mut stop| {
        serve(
            listener,
            registry,
            ready,
            async move { stop.requested().await },
        )
    })
}

/// Histogram buckets for request-level latencies (queue time, time to first
/// token, end to end): 1 ms to 20 minutes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1200.0,
];

/// Histogram buckets for per-token latencies (inter-token latency, time per
/// output token): 0.5 ms to 5 s.
pub const TOKEN_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
];

/// A histogram with `buckets`.
pub fn histogram(buckets: &[f64]) -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(buckets.iter().copied())
}

/// A counter whose value is read from a function at each scrape: for counts
/// kept outside any registry, such as the protobuf codec's decode failures
/// (`nanoinfer_proto::codec::decode_errors`), which happen inside tonic
/// before any handler runs.
#[derive(Debug)]
pub struct FnCounter {
    /// Metric name, without the registry's prefix and the `_total` suffix.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Where the value comes from.
    pub read: fn() -> u64,
}

impl prometheus_client::collector::Collector for FnCounter {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let counter = prometheus_client::metrics::counter::ConstCounter::new((self.read)());
        let metric =
            encoder.encode_descriptor(self.name, self.help, None, counter.metric_type())?;
        counter.encode(metric)
    }
}

/// The standard `process_*` metrics (as Prometheus' client libraries export
/// them), read from `/proc/self` at each scrape: CPU seconds, resident and
/// virtual memory, open and maximum file descriptors, threads, start time.
/// On a system without `/proc` it exports nothing.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// Clock ticks per second of `/proc/self/stat` times (USER_HZ, 100 on
/// Linux on every architecture this runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of `/proc/self`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
    /// Resident set size in bytes.
    pub resident_bytes: u64,
    /// Virtual memory size in bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors.
    pub max_fds: u64,
    /// Threads.
    pub threads: u64,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads `/proc/self`; `None` where there is none.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        // Fields after the command name, which is in parentheses and may
        // hold spaces: state is field 3, utime 14, stime 15, starttime 22.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        let kb = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line[key.len()..]
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .ok()
        };
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
            })
            .unwrap_or(0);
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) / TICKS_PER_SECOND,
            resident_bytes: kb("VmRSS:").unwrap_or(0) * 1024,
            virtual_bytes: kb("VmSize:").unwrap_or(0) * 1024,
            open_fds: std::fs::read_dir("/proc/self/fd")
                .map(|d| d.count() as u64)
                .unwrap_or(0),
            max_fds,
            threads: kb("Threads:").unwrap_or(0),
            start_time_seconds: boot_time + field(22)? / TICKS_PER_SECOND,
        })
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let Some(s) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 6] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds as f64,
            ),
            ("process_threads", "Number of OS threads", s.threads as f64),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                s.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod fn_counter_tests {
    use super::*;

    fn seven() -> u64 {
        7
    }

    #[test]
    fn a_function_counter_is_read_at_scrape_time() {
        let mut registry = Registry::default();
        registry
            .sub_registry_with_prefix("p")
            .register_collector(Box::new(FnCounter {
                name: "things",
                help: "Things",
                read: seven,
            }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("p_things_total 7"), "{text}");
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let s = ProcessStats::read().expect("/proc/self on Linux");
        assert!(s.resident_bytes > 1 << 20, "{s:?}");
        assert!(s.virtual_bytes >= s.resident_bytes, "{s:?}");
        assert!(s.open_fds >= 3 && s.max_fds >= s.open_fds, "{s:?}");
        assert!(s.threads >= 1, "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            (now - 3600.0..=now + 5.0).contains(&s.start_time_seconds),
            "{s:?}"
        );
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }
}
