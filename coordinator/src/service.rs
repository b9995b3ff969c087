//! `nanoinfer.InferService`: the gRPC front. [`Front::start`] does the
//! work both APIs share (key, span, validation, relays); this turns its
//! channel into the response stream.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use nanoinfer_proto::nanoinfer::{
    infer_service_server::InferService, DetokenizeRequest, DetokenizeResponse, HealthRequest,
    HealthResponse, InferRequest, InferResponse, TokenizeRequest, TokenizeResponse,
};
use nanoinfer_registry::DiscoveryStatus;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::error::REQUEST_ID_HEADER;
use crate::front::Front;
use crate::metrics::Api;

/// The public gRPC service.
pub struct InferServiceImpl {
    front: Arc<Front>,
}

impl InferServiceImpl {
    /// The service over the shared request path.
    pub fn new(front: Arc<Front>) -> Self {
        Self { front }
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
        let routable = *self.front.routable.borrow();
        // Revoked keys first: with them no request can succeed, whatever
        // the workers' state.
        let status = match self
            .front
            .api_keys
            .as_ref()
            .and_then(|k| k.health_problem())
        {
            Some(problem) => problem.to_string(),
            None => health_status(routable, &self.front.discovery.borrow()),
        };
        Ok(Response::new(HealthResponse {
            status,
            live_workers: routable as u32,
        }))
    }

    type InferStream = InferStream;

    async fn infer(
        &self,
        request: Request<InferRequest>,
    ) -> Result<Response<Self::InferStream>, Status> {
        let (metadata, _, request) = request.into_parts();
        let call = self.front.start(Api::Grpc, request, &metadata).await?;
        let mut response: Response<InferStream> =
            Response::new(Box::pin(call.rx.map(|m| m.map(|m| *m))));
        if let Ok(value) = MetadataValue::try_from(call.request_id.as_str()) {
            response.metadata_mut().insert(REQUEST_ID_HEADER, value);
        }
        Ok(response)
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        self.front
            .tokenize(request, &metadata)
            .await
            .map(Response::new)
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        self.front
            .detokenize(request, &metadata)
            .await
            .map(Response::new)
    }
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
