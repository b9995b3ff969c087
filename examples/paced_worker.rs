//! A test double for benchmarks: a worker that speaks `nanoinfer.worker.v1`
//! and emits tokens at a fixed rate with no model behind it, registered in
//! etcd like a real worker. It lets `nanoinfer-bench` measure the
//! coordinator alone (its added latency per token and memory per stream) at
//! concurrencies no CPU model could serve. Never part of a deployment.
//!
//! cargo run --release --example paced_worker -- --etcd http://127.0.0.1:2379 \
//!     --listen 127.0.0.1:50070 --tokens-per-second 20 --stamp

use std::pin::Pin;
use std::time::Duration;

use clap::Parser;
use futures::{Stream, StreamExt};
use nanoinfer_proto::worker::worker_service_server::{WorkerService, WorkerServiceServer};
use nanoinfer_proto::worker::{
    FinishReason, Finished, GenerateRequest, GenerateResponse, LoadRequest, LoadResponse,
};
use nanoinfer_registry::{Capacity, Registration, WorkerInfo};
use tonic::{Request, Response, Status};

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

struct Paced {
    interval: Duration,
    stamp: bool,
}

type GenStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for Paced {
    type GenerateStream = GenStream;
    type KvEventsStream =
        Pin<Box<dyn Stream<Item = Result<nanoinfer_proto::worker::KvEventBatch, Status>> + Send>>;

    /// A test double has no KV cache to publish: like a worker from before
    /// KV events, it answers UNIMPLEMENTED (routed by load alone).
    async fn kv_events(
        &self,
        _: Request<nanoinfer_proto::worker::KvEventsRequest>,
    ) -> Result<Response<Self::KvEventsStream>, Status> {
        Err(Status::unimplemented("no KV events from a test double"))
    }

    type VocabularyStream = Pin<
        Box<dyn Stream<Item = Result<nanoinfer_proto::worker::VocabularyChunk, Status>> + Send>,
    >;

    /// A test double has no model: UNIMPLEMENTED (the coordinator then
    /// routes it by load alone).
    async fn vocabulary(
        &self,
        _: Request<nanoinfer_proto::worker::VocabularyRequest>,
    ) -> Result<Response<Self::VocabularyStream>, Status> {
        Err(Status::unimplemented("no vocabulary from a test double"))
    }

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenStream>, Status> {
        let req = request.into_inner();
        let prompt_tokens = req.prompt.split_whitespace().count() as u32;
        let n = req.max_tokens;
        let (interval, stamp) = (self.interval, self.stamp);
        // Message 0 is `admitted` (a real worker's first message), then
        // token i is message i + 1.
        let admitted = futures::stream::once(async {
            Ok(GenerateResponse {
                admitted: true,
                ..Default::default()
            })
        });
        let tokens = futures::stream::unfold(0u32, move |i| async move {
            if i > n {
                return None;
            }
            if i < n {
                tokio::time::sleep(interval).await;
                let text = if stamp {
                    nanoinfer::stamp::text(nanoinfer::stamp::unix_nanos())
                } else {
                    " tok".into()
                };
                let msg = GenerateResponse {
                    text,
                    token_id: Some(i as i32),
                    index: i,
                    finished: None,
                    ..Default::default()
                };
                return Some((Ok(msg), i + 1));
            }
            let last = GenerateResponse {
                text: String::new(),
                token_id: None,
                index: n,
                finished: Some(Finished {
                    reason: FinishReason::Length as i32,
                    prompt_tokens,
                    generated_tokens: n,
                    load: None,
                    cached_tokens: 0,
                }),
                ..Default::default()
            };
            Some((Ok(last), i + 1))
        });
        Ok(Response::new(Box::pin(admitted.chain(tokens))))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        Ok(Response::new(LoadResponse::default()))
    }

    async fn tokenize(
        &self,
        _: Request<nanoinfer_proto::worker::TokenizeRequest>,
    ) -> Result<Response<nanoinfer_proto::worker::TokenizeResponse>, Status> {
        Err(Status::unimplemented("a test double has no tokenizer"))
    }

    async fn detokenize(
        &self,
        _: Request<nanoinfer_proto::worker::DetokenizeRequest>,
    ) -> Result<Response<nanoinfer_proto::worker::DetokenizeResponse>, Status> {
        Err(Status::unimplemented("a test double has no tokenizer"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let info = WorkerInfo {
        id: args.id.clone(),
        address: args.listen.to_string(),
        model: "paced-test-double".into(),
        model_name: "paced-test-double".into(),
        capacity: Capacity {
            slots: 100_000,
            queue: 0,
            context_length: 1 << 20,
        },
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let registration = Registration::register(
        &nanoinfer_registry::EtcdConfig::plain(vec![args.etcd.clone()]),
        info,
        10,
        Default::default(),
    )
    .await?;
    eprintln!(
        "paced worker on {} at {} tok/s per stream",
        args.listen, args.tokens_per_second
    );
    let service = Paced {
        interval: Duration::from_secs_f64(1.0 / args.tokens_per_second),
        stamp: args.stamp,
    };
    let routes = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_connection_window_size(nanoinfer_proto::windows::CONNECTION)
        .add_service(WorkerServiceServer::new(service));
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match args.cluster.validate()? {
        Some(cluster) => {
            let tls = nanoinfer_proto::tls::ServerTls::load(cluster.server_files(), "worker")?;
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            routes
                .serve_with_incoming_shutdown(nanoinfer_proto::tls::incoming(listener, tls), stop)
                .await?
        }
        None => routes.serve_with_shutdown(args.listen, stop).await?,
    }
    registration.revoke().await?;
    Ok(())
}
