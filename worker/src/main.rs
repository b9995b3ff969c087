//! `nanoinfer-worker`: parse flags, start telemetry, bind, run until SIGTERM/SIGINT, flush.

use clap::Parser;
use nanoinfer_worker::{run, Args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = nanoinfer_telemetry::init("nanoinfer-worker", &args.telemetry)?;
    let (listen, metrics_listen) = (args.listen, args.metrics_listen);
    let config = args.validate().map_err(anyhow::Error::msg)?;
    // A wrong model path or file fails now, before any port is bound.
    nanoinfer_worker::model::check_file(&config.model).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let metrics_listener = tokio::net::TcpListener::bind(metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {metrics_listen} for metrics: {e}"))?;
    let result = run(
        config,
        listener,
        metrics_listener,
        nanoinfer_telemetry::shutdown_signal(),
    )
    .await;
    // Flush spans last, whatever happened.
    telemetry.shutdown().await;
    Ok(result?)
}
