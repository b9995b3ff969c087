//! Integration: spans from the real coordinator and worker processes reach an
//! OTLP collector served by this test, as one trace with the right parents.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{collect, free_port, greedy, Cluster, PROMPT};
use nanoinfer_proto::nanoinfer::InferRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
    /// 0 unset, 1 ok, 2 error.
    status: i32,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                out.push(Received {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(&kv.value)))
                        .collect(),
                    status: span.status.map_or(0, |s| s.code),
                });
            }
        }
        self.spans.lock().unwrap().extend(out);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves the collector on a loopback port; returns its endpoint.
async fn start_collector(collector: Collector) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// Waits (bounded) until every span name in `names` with `trace_id` arrived.
async fn wait_for_spans(collector: &Collector, trace_id: &str, names: &[&str]) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans: Vec<Received> = collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        if names.iter().all(|n| spans.iter().any(|s| &s.name == n)) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans {names:?} of trace {trace_id} did not all arrive; got {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn one<'a>(spans: &'a [Received], name: &str) -> &'a Received {
    let found: Vec<&Received> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "exactly one {name} span: {found:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_client_to_prefill_and_decode() {
    let collector = Collector::default();
    let endpoint = start_collector(collector.clone()).await;
    let otlp = ["--otlp-endpoint", endpoint.as_str(), "--log-format", "json"];
    let mut cluster = Cluster::start(1, &otlp, &otlp).await;
    let mut client = cluster.client().await;

    // The client's own span, sent as a W3C traceparent.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(InferRequest {
        request_id: "traced-1".into(),
        ..greedy(PROMPT, 4)
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").parse().unwrap(),
    );
    let mut stream = client.infer(request).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}

    let spans = wait_for_spans(
        &collector,
        trace_id,
        &["Infer", "Generate", "queue", "prefill", "decode"],
    )
    .await;
    let infer = one(&spans, "Infer");
    let generate = one(&spans, "Generate");
    assert_eq!(infer.service, "nanoinfer-coordinator");
    assert_eq!(generate.service, "nanoinfer-worker");
    assert_eq!(
        infer.parent, client_span,
        "the client's span is the root's parent"
    );
    assert_eq!(generate.parent, infer.span_id, "coordinator → worker");
    for child in ["queue", "prefill", "decode"] {
        let span = one(&spans, child);
        assert_eq!(
            span.parent, generate.span_id,
            "{child} is a child of Generate"
        );
        assert_eq!(span.service, "nanoinfer-worker");
    }
    assert_eq!(infer.attributes["request_id"], "traced-1");
    assert_eq!(generate.attributes["request_id"], "traced-1");
    assert_eq!(infer.attributes["worker"], "w1");
    assert_eq!(infer.attributes["gen_ai.request.max_tokens"], "4");
    assert_eq!(infer.attributes["gen_ai.usage.output_tokens"], "4");
    assert_eq!(infer.attributes["gen_ai.response.finish_reasons"], "length");
    assert!(infer.attributes.contains_key("gen_ai.usage.input_tokens"));
    assert!(infer
        .attributes
        .contains_key("nanoinfer.time_to_first_token_ms"));
    let decode = one(&spans, "decode");
    assert_eq!(
        decode
            .attributes
            .get("generated_tokens")
            .map(String::as_str),
        Some("4"),
        "{decode:#?}"
    );
    assert_ne!(infer.status, 2);

    // JSON log lines inside the request carry its trace id in their span
    // (once: no list of enclosing spans repeating it).
    for (who, proc, needle) in [
        ("coordinator", &mut cluster.coordinator, "routing request"),
        ("worker", &mut cluster.workers[0], "traced-1"),
    ] {
        let line = proc.wait_for_line(needle, Duration::from_secs(5)).await;
        let line: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("{who} log line is not JSON ({e}): {line}"));
        assert_eq!(line["span"]["trace_id"], trace_id, "{who}: {line}");
        assert!(line.get("spans").is_none(), "{who}: {line}");
    }

    // A rejected request is a span with an error status.
    let mut request = tonic::Request::new(InferRequest {
        request_id: "traced-bad".into(),
        top_p: Some(7.0),
        ..greedy(PROMPT, 4)
    });
    let bad_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{bad_trace}-{client_span}-01").parse().unwrap(),
    );
    assert!(client.infer(request).await.is_err());
    let spans = wait_for_spans(&collector, bad_trace, &["Infer"]).await;
    let infer = one(&spans, "Infer");
    assert_eq!(infer.status, 2, "error status on a rejected request");
    assert_eq!(
        infer.attributes.get("request_id").map(String::as_str),
        Some("traced-bad"),
        "{infer:#?}"
    );

    // The OpenAI-compatible HTTP API honours traceparent too: the same
    // spans, the same parent, the api attribute saying which door.
    let http = cluster.coordinator.http_addr().await;
    let http_trace = "6bf92f3577b34da6a3ce929d0e0e4738";
    let out = std::process::Command::new("curl")
        .args(["-sS", "-H", "content-type: application/json"])
        .args([
            "-H",
            &format!("traceparent: 00-{http_trace}-{client_span}-01"),
        ])
        .args(["-H", "x-request-id: traced-http"])
        .args([
            "--data-binary",
            r#"{"prompt":"Hello","max_tokens":3,"temperature":0}"#,
        ])
        .arg(format!("http://{http}/v1/completions"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let spans = wait_for_spans(
        &collector,
        http_trace,
        &["Infer", "Generate", "prefill", "decode"],
    )
    .await;
    let infer = one(&spans, "Infer");
    assert_eq!(infer.parent, client_span);
    assert_eq!(infer.attributes["request_id"], "traced-http");
    assert_eq!(infer.attributes["nanoinfer.api"], "http");
    assert_eq!(one(&spans, "Generate").parent, infer.span_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_succeed_while_the_collector_is_down() {
    // Nothing listens on this port.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let otlp = ["--otlp-endpoint", endpoint.as_str()];
    let cluster = Cluster::start(1, &otlp, &otlp).await;
    let mut client = cluster.client().await;
    for _ in 0..3 {
        let msgs = tokio::time::timeout(
            Duration::from_secs(30),
            collect(&mut client, greedy(PROMPT, 4)),
        )
        .await
        .expect("no request hangs on a dead collector")
        .unwrap();
        assert_eq!(msgs.last().unwrap().usage.unwrap().generated_tokens, 4);
    }
}
