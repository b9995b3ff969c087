//! Telemetry shared by every nanoinfer process: the one place that decides
//! how logs, traces and metrics leave a process.
//!
//! # Layout
//! - [`init`] / [`TelemetryArgs`]: logging (stderr, `RUST_LOG` filter, text or
//!   JSON) and, when an OTLP endpoint is configured, span export over
//!   OTLP/gRPC with W3C trace-context propagation. Prompts and generated text
//!   are never logged at info or above by any nanoinfer crate.
//! - [`propagation`]: trace context in and out of gRPC metadata.
//! - [`http`]: the `/metrics`, `/healthz`, `/readyz` endpoint and the
//!   histogram buckets both processes use.
//! - [`shutdown_signal`]: SIGTERM / SIGINT.

#![forbid(unsafe_code)]

pub mod http;
pub mod propagation;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line format, chosen with `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, fields included, for log shippers.
    Json,
}

/// Logging and tracing flags both processes take (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// Log line format.
    #[arg(long, env = "NANOINFER_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint to export spans to (Jaeger listens on
    /// http://HOST:4317). Unset: no span export. The standard
    /// OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER(_ARG), OTEL_EXPORTER_OTLP_TIMEOUT
    /// and OTEL_BSP_* variables are honoured.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (bad endpoint URL).
    #[error("--otlp-endpoint: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("installing the log subscriber: {0}")]
    Subscriber(String),
}

/// Handle to the installed telemetry; call [`Telemetry::shutdown`] last so
/// buffered spans are exported.
#[must_use = "call shutdown() at exit to flush spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// How long shutdown waits for the last spans to leave.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs logging and, with an OTLP endpoint, span export, for the
/// service `service` (overridden by `OTEL_SERVICE_NAME`). Call once, first
/// thing in `main`, inside the tokio runtime.
pub fn init(service: &'static str, args: &TelemetryArgs) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,opentelemetry_sdk=warn")
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match args.log_format {
        LogFormat::Text => fmt.boxed(),
        // The current span only (its fields: request_id, trace_id, …);
        // the list of every enclosing span repeated the same data.
        LogFormat::Json => fmt.json().with_span_list(false).boxed(),
    };
    let provider = match &args.otlp_endpoint {
        Some(endpoint) if !endpoint.trim().is_empty() => Some(tracer_provider(service, endpoint)?),
        _ => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("nanoinfer"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    if let Some(endpoint) = &args.otlp_endpoint {
        tracing::info!(%endpoint, "exporting spans over OTLP/gRPC");
    }
    Ok(Telemetry { provider })
}

/// An OTLP/gRPC exporter behind a batch processor: ending a span is a
/// non-blocking enqueue (spans are dropped when the queue is full), and the
/// export runs on the processor's own thread, so a slow or dead collector
/// never blocks a request. The sampler comes from OTEL_TRACES_SAMPLER(_ARG)
/// (default: parent-based, always on).
fn tracer_provider(
    service: &'static str,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    Ok(SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_resource(resource.build())
        .build())
}

impl Telemetry {
    /// Exports what is buffered (bounded wait) and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let result =
                tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
                    .await;
            if let Ok(Err(e)) = result {
                eprintln!("flushing spans at shutdown: {e}");
            }
        }
    }
}

/// Sets `span`'s status to error with `message` (the span must declare the
/// `otel.status_code` and `otel.status_description` fields).
pub fn mark_span_error(span: &tracing::Span, message: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", message);
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
