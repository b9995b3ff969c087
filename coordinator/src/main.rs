//! `nanoinfer-coordinator`: parse flags, start telemetry, bind, run until SIGTERM/SIGINT, flush.

use clap::Parser;
use nanoinfer_coordinator::{run, Args};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.runtime_threads > 0 {
        runtime.worker_threads(args.runtime_threads);
    }
    runtime.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let telemetry = nanoinfer_telemetry::init("nanoinfer-coordinator", &args.telemetry)?;
    let (listen, metrics_listen, http_listen) =
        (args.listen, args.metrics_listen, args.http_listen);
    let config = args.validate().map_err(anyhow::Error::msg)?;
    match nanoinfer_coordinator::raise_open_file_limit() {
        Ok(limit) => tracing::info!(
            open_files = limit.map_or("unlimited".to_string(), |n| n.to_string()),
            "open-file limit (each client connection takes one)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let metrics_listener = tokio::net::TcpListener::bind(metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {metrics_listen} for metrics: {e}"))?;
    let http_listener = match http_listen.0 {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {addr} for HTTP (--http-listen): {e}")
        })?),
        None => None,
    };
    let result = run(
        config,
        listener,
        metrics_listener,
        http_listener,
        nanoinfer_telemetry::shutdown_signal(),
    )
    .await;
    // Flush spans last, whatever happened.
    telemetry.shutdown().await;
    Ok(result?)
}
