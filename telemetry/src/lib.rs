//! Telemetry shared by every nanoinfer process.
//!
//! # Layout
//! - [`init`]: logging (stderr, `RUST_LOG` filter, text or JSON). Prompts and
//!   generated text are never logged at info or above by any nanoinfer crate.
//! - [`http`]: the `/metrics`, `/healthz`, `/readyz` endpoint and the
//!   histogram buckets both processes use.
//! - [`shutdown_signal`]: SIGTERM / SIGINT.

#![forbid(unsafe_code)]

pub mod http;

use tracing_subscriber::EnvFilter;

/// Log line format, chosen with `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, fields included, for log shippers.
    Json,
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
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
