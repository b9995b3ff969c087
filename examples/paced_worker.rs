//! A test double for benchmarks: the tests' fake worker
//! (`tests/common/fake_worker.rs`, one definition of the double) paced at a
//! fixed rate, with no model behind it, registered in etcd like a real
//! worker. It lets `nanoinfer-bench` measure the coordinator alone (its added
//! latency per token and memory per stream) at concurrencies no CPU model
//! could serve. Never part of a deployment.
//!
//! cargo run --release --example paced_worker -- --etcd http://127.0.0.1:2379 \
//!     --listen 127.0.0.1:50070 --tokens-per-second 20 --stamp
//!
//! It registers 100,000 slots and no queue (the coordinator never holds its
//! requests back), under a 10 s lease: after the process stops, its record
//! lasts until the lease expires.

use std::time::Duration;

use clap::Parser;

#[allow(dead_code)]
#[path = "../tests/common/fake_worker.rs"]
mod fake_worker;

#[derive(Debug, Parser)]
struct Args {
    /// etcd endpoint to register in.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd: String,
    /// gRPC address to serve on.
    #[arg(long, default_value = "127.0.0.1:50070")]
    listen: std::net::SocketAddr,
    /// Tokens per second per stream.
    #[arg(long, default_value_t = 20.0)]
    tokens_per_second: f64,
    /// Worker id.
    #[arg(long, default_value = "paced-worker")]
    id: String,
    /// Make each token's text its send time (`@<unix nanos>`), so
    /// `nanoinfer-bench` measures every token's transit time.
    #[arg(long)]
    stamp: bool,
    /// Mutual TLS on its port, as a real worker's (the certificate must name
    /// `<id>.worker.nanoinfer`).
    #[command(flatten)]
    cluster: nanoinfer_proto::tls::ClusterTlsArgs,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if !(args.tokens_per_second > 0.0 && args.tokens_per_second.is_finite()) {
        return Err(format!(
            "--tokens-per-second must be a positive number, not {}",
            args.tokens_per_second
        )
        .into());
    }
    let tls = args.cluster.validate()?.map(|c| c.server_files());
    let worker = fake_worker::FakeWorker::builder(&args.id)
        .etcd(&args.etcd, 10)
        .listen(args.listen)
        .tls(tls)
        .paced(
            Duration::from_secs_f64(1.0 / args.tokens_per_second),
            args.stamp,
        )
        .capacity(100_000, 0)
        .start()
        .await;
    eprintln!(
        "paced worker on {} at {} tok/s per stream",
        worker.addr, args.tokens_per_second
    );
    tokio::signal::ctrl_c().await?;
    worker.kill();
    Ok(())
}
