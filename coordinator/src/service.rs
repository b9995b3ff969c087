//! `nanoinfer.InferService`: the gRPC front. It validates, opens the
//! request's span, and hands the request to its [`relay`](crate::relay)
//! task; the response stream drains that task's bounded channel.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use nanoinfer_proto::nanoinfer::{
    infer_service_server::InferService, HealthRequest, HealthResponse, InferRequest, InferResponse,
};
use nanoinfer_registry::DiscoveryStatus;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::Instrument;

use crate::auth::ApiKeys;
use crate::config::UpstreamConfig;
use crate::error::REQUEST_ID_HEADER;
use crate::metrics::{CoordinatorMetrics, ReasonLabel, RequestRecorder};
use crate::relay::{self, Relay, RELAY_BUFFER};
use crate::routing::Router;
use crate::validate::Limits;

/// The public service.
pub struct InferServiceImpl {
    router: Arc<Router>,
    routable: watch::Receiver<usize>,
    discovery: watch::Receiver<DiscoveryStatus>,
    limits: Limits,
    upstream: UpstreamConfig,
    metrics: Arc<CoordinatorMetrics>,
    api_keys: Option<Arc<ApiKeys>>,
}

impl InferServiceImpl {
    /// A service routing through `router`; `discovery` tells it whether
    /// etcd answers.
    pub fn new(
        router: Arc<Router>,
        discovery: watch::Receiver<DiscoveryStatus>,
        limits: Limits,
        upstream: UpstreamConfig,
        metrics: Arc<CoordinatorMetrics>,
    ) -> Self {
        Self {
            routable: router.routable(),
            router,
            discovery,
            limits,
            upstream,
            metrics,
            api_keys: None,
        }
    }

    /// Requires one of `keys` on `Infer` (none: no authentication).
    pub fn with_api_keys(mut self, keys: Option<Arc<ApiKeys>>) -> Self {
        self.api_keys = keys;
        self
    }
}

/// The `Health` status line: etcd trouble first (an empty set may only mean
/// that etcd was never reached), then an empty routable set.
pub fn health_status(routable: usize, discovery: &DiscoveryStatus) -> String {
    if let Some(error) = &discovery.etcd_error {
        let set = if discovery.listed {
            format!("serving the last known set ({routable} routable workers)")
        } else {
            "no worker set was ever listed".to_string()
        };
        return format!("ETCD_UNAVAILABLE: {error}; {set}");
    }
    if routable == 0 {
        return "NO_WORKERS: no live worker is registered in etcd (or every one is ejected)".into();
    }
    "OK".into()
}

type InferStream = Pin<Box<dyn Stream<Item = Result<InferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl InferService for InferServiceImpl {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let routable = *self.routable.borrow();
        Ok(Response::new(HealthResponse {
            status: health_status(routable, &self.discovery.borrow()),
            live_workers: routable as u32,
        }))
    }

    type InferStream = InferStream;

    async fn infer(
        &self,
        request: Request<InferRequest>,
    ) -> Result<Response<Self::InferStream>, Status> {
        if let Some(keys) = &self.api_keys {
            if let Err(rejection) = keys.check(request.metadata()) {
                self.metrics
                    .auth_rejections
                    .get_or_create(&ReasonLabel {
                        reason: rejection.label(),
                    })
                    .inc();
                tracing::info!(reason = rejection.label(), "request refused: API key");
                return Err(Status::unauthenticated(rejection.message()));
            }
        }
        // The request's span: a child of the client's `traceparent` when it
        // sent one, carrying the GenAI semantic-convention attributes.
        let span = tracing::info_span!(
            parent: None,
            "Infer",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "nanoinfer.InferService",
            rpc.method = "Infer",
            gen_ai.operation.name = "text_completion",
            request_id = Empty,
            trace_id = Empty,
            worker = Empty,
            gen_ai.request.max_tokens = Empty,
            gen_ai.request.temperature = Empty,
            gen_ai.request.top_p = Empty,
            gen_ai.request.seed = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
            nanoinfer.time_to_first_token_ms = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        nanoinfer_telemetry::propagation::set_remote_parent(&span, request.metadata());
        let started = tokio::time::Instant::now();
        let timeout = nanoinfer_proto::deadline::from_metadata(request.metadata())
            .map_or(self.upstream.request_timeout, |t| {
                t.min(self.upstream.request_timeout)
            });
        let mut recorder = RequestRecorder::start(self.metrics.clone());
        let request = request.into_inner();
        let client_id = (!request.request_id.is_empty()).then(|| request.request_id.clone());
        let validated = {
            let _entered = span.enter();
            // (Recorded inside the span: tracing-opentelemetry drops values
            // recorded before a span is first entered.) Known before
            // validation, so even a rejected request is findable; escaped,
            // since it is not validated yet.
            if let Some(id) = &client_id {
                span.record("request_id", id.escape_debug().to_string());
            }
            self.limits
                .validate(request, rand_seed)
                .inspect_err(|e| tracing::info!(error = %e, "request rejected"))
        };
        let params = match validated {
            Ok(params) => params,
            Err(e) => {
                recorder.failed(e.code());
                nanoinfer_telemetry::mark_span_error(&span, &e.to_string());
                return Err(e.into_status(client_id.as_deref()));
            }
        };
        span.record("request_id", params.request_id.as_str());
        span.record("gen_ai.request.max_tokens", params.max_tokens);
        span.record(
            "gen_ai.request.temperature",
            shortest_f64(params.temperature),
        );
        span.record("gen_ai.request.top_p", shortest_f64(params.top_p));
        span.record("gen_ai.request.seed", params.seed);
        let request_id = params.request_id.clone();

        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        let (opened_tx, opened_rx) = oneshot::channel();
        let relay = Relay {
            params,
            deadline: started + timeout,
            router: self.router.clone(),
            upstream: self.upstream.clone(),
            metrics: self.metrics.clone(),
            recorder,
            span: span.clone(),
        };
        tokio::spawn(relay::run(relay, tx, opened_tx).instrument(span));
        match opened_rx.await {
            Ok(Ok(())) => {
                let mut response: Response<InferStream> =
                    Response::new(Box::pin(ReceiverStream::new(rx)));
                if let Ok(value) = MetadataValue::try_from(request_id.as_str()) {
                    response.metadata_mut().insert(REQUEST_ID_HEADER, value);
                }
                Ok(response)
            }
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::internal(format!(
                "request {}: relay ended without an answer",
                request_id.escape_debug()
            ))),
        }
    }
}

/// `x` as the f64 with the same shortest decimal form (0.8f32 → 0.8, not
/// 0.800000011920929), for span attributes people read.
fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

fn rand_seed() -> u64 {
    // A fresh v4 UUID is 122 random bits from the OS generator.
    uuid::Uuid::new_v4().as_u64_pair().0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_tells_etcd_trouble_from_an_empty_cluster() {
        let up = DiscoveryStatus {
            etcd_error: None,
            listed: true,
            ..Default::default()
        };
        assert_eq!(health_status(2, &up), "OK");
        assert!(health_status(0, &up).starts_with("NO_WORKERS"));
        let never = DiscoveryStatus {
            etcd_error: Some("connection refused".into()),
            listed: false,
            ..Default::default()
        };
        let s = health_status(0, &never);
        assert!(s.starts_with("ETCD_UNAVAILABLE: connection refused"), "{s}");
        let down = DiscoveryStatus {
            listed: true,
            ..never
        };
        assert!(health_status(2, &down).contains("last known set (2"));
    }
}
