//! Command-line flags (each also read from a `NANOINFER_…` env var).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::validate::Limits;

/// `--http-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpListen(pub Option<SocketAddr>);

fn parse_http_listen(s: &str) -> Result<HttpListen, String> {
    if s == "off" {
        return Ok(HttpListen(None));
    }
    s.parse()
        .map(|a| HttpListen(Some(a)))
        .map_err(|e| format!("{e}: give host:port, or off"))
}

/// nanoinfer coordinator: the public InferService front door.
#[derive(Debug, Clone, Parser)]
#[command(name = "nanoinfer-coordinator", version)]
pub struct Args {
    /// Address to listen on for gRPC; port 0 picks a free port (the bound
    /// address is logged).
    #[arg(long, env = "NANOINFER_LISTEN", default_value = "0.0.0.0:50052")]
    pub listen: SocketAddr,
    /// Address of the HTTP endpoint for `/metrics`, `/healthz` and
    /// `/readyz`; port 0 picks a free port (the bound address is logged).
    #[arg(long, env = "NANOINFER_METRICS_LISTEN", default_value = "0.0.0.0:9052")]
    pub metrics_listen: SocketAddr,
    /// Threads of the async runtime that serves every connection; 0 means
    /// one per CPU core. With few cores shared with other processes, 1
    /// spends less per token on waking threads (see docs/benchmarks.md,
    /// "Where the time goes").
    #[arg(long, env = "NANOINFER_RUNTIME_THREADS", default_value_t = 0)]
    pub runtime_threads: usize,
    /// Address of the OpenAI-compatible HTTP API (`/v1/chat/completions`,
    /// `/v1/completions`, `/v1/models`); port 0 picks a free port, `off`
    /// serves none. It takes the same TLS files and API keys as the gRPC
    /// port.
    #[arg(long, env = "NANOINFER_HTTP_LISTEN", default_value = "0.0.0.0:8080",
        value_parser = parse_http_listen)]
    pub http_listen: HttpListen,
    #[command(flatten)]
    pub etcd: nanoinfer_registry::EtcdArgs,
    /// How a request's worker is chosen. `cache-aware` (the default): the
    /// lowest cost in prompt blocks, the blocks of the prompt the worker's
    /// KV cache lacks (known from the workers' own KV events) plus the
    /// prefill already pending there plus --cache-aware-load-weight per
    /// request in flight; among equal costs the lighter of two random
    /// workers. `prefix-affinity`: the
    /// worker this coordinator sent the longest shared prompt text to,
    /// unless it has more than --affinity-max-load-gap requests more in
    /// flight than the least loaded (then, as when no worker holds the
    /// prefix, the lighter of two random workers). `least-loaded`: fewest requests in
    /// flight. `random`: any routable worker (a baseline for benchmarks).
    /// Load counts this coordinator's requests plus the others' from the
    /// workers' load reports.
    #[arg(
        long,
        env = "NANOINFER_ROUTING",
        value_enum,
        default_value = "cache-aware"
    )]
    pub routing: crate::affinity::Routing,
    /// With prefix-affinity: how many more requests in flight than the
    /// least-loaded worker the prefix's worker may have and still be chosen.
    #[arg(long, env = "NANOINFER_AFFINITY_MAX_LOAD_GAP", default_value_t = 2)]
    pub affinity_max_load_gap: u32,
    /// With prefix-affinity: bytes of prompt text remembered per worker;
    /// match it to what the worker's prefix cache holds (the default fits
    /// its default 2,048 tokens at ~5 bytes of English per token).
    #[arg(long, env = "NANOINFER_AFFINITY_CACHE_BYTES", default_value_t = 10 << 10)]
    pub affinity_cache_bytes: usize,
    /// With cache-aware routing: what one request in flight on a worker
    /// costs, in prompt blocks (16 tokens) to prefill. At 4, a worker
    /// holding a 480-token prompt (30 blocks) stays the choice over an idle
    /// worker until it has 7.5 requests in flight more (or prefill pending).
    #[arg(long, env = "NANOINFER_CACHE_AWARE_LOAD_WEIGHT", default_value_t = 4.0)]
    pub cache_aware_load_weight: f64,
    /// With cache-aware routing: most KV blocks indexed per worker (8 bytes
    /// each plus the set's overhead); a worker reporting more is routed by
    /// load alone. A worker holds at most its KV cells / 16 blocks (512 with
    /// its defaults).
    #[arg(long, env = "NANOINFER_KV_INDEX_MAX_BLOCKS", default_value_t = 1 << 20)]
    pub kv_index_max_blocks: usize,
    /// `max_tokens` used when a request leaves it at 0.
    #[arg(long, env = "NANOINFER_DEFAULT_MAX_TOKENS", default_value_t = 128)]
    pub default_max_tokens: u32,
    /// Largest `max_tokens` a request may ask for; above it, INVALID_ARGUMENT.
    #[arg(long, env = "NANOINFER_MAX_TOKENS_LIMIT", default_value_t = nanoinfer_proto::limits::DEFAULT_MAX_TOKENS_LIMIT)]
    pub max_tokens_limit: u32,
    /// Largest prompt accepted, in bytes; above it, INVALID_ARGUMENT.
    #[arg(long, env = "NANOINFER_MAX_PROMPT_BYTES", default_value_t = nanoinfer_proto::limits::DEFAULT_MAX_PROMPT_BYTES)]
    pub max_prompt_bytes: usize,
    /// Seconds open streams get to finish after SIGTERM.
    #[arg(long, env = "NANOINFER_GRACE_PERIOD", default_value_t = 20)]
    pub grace_period: u64,
    /// Longest a request may take, in seconds, when its client sets no
    /// deadline (a client's own `grpc-timeout` wins when shorter). At the
    /// deadline the client gets DEADLINE_EXCEEDED after the tokens sent, and
    /// the worker stops generating.
    #[arg(long, env = "NANOINFER_REQUEST_TIMEOUT", default_value_t = 600)]
    pub request_timeout: u64,
    /// Seconds a worker may go without progress on a request it is running:
    /// from admitting it (taking it out of its queue into a slot) to its
    /// first token, and between tokens. Past it the worker is judged hung,
    /// ejected, and the request moves to another worker. Time a request
    /// spends queued never counts (it is bounded by the deadline and the
    /// worker's --queue-timeout).
    #[arg(long, env = "NANOINFER_FIRST_TOKEN_TIMEOUT", default_value_t = 30)]
    pub first_token_timeout: u64,
    /// Requests that may wait in the coordinator for a worker with room
    /// (retries and resumes not counted: they are never refused). Beyond
    /// it a new request is refused at once with RESOURCE_EXHAUSTED (HTTP
    /// 429) and a retry hint.
    #[arg(long, env = "NANOINFER_ADMISSION_QUEUE", default_value_t = 1024)]
    pub admission_queue: u32,
    /// Seconds a request may wait in the admission queue (its deadline
    /// permitting) before it is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "NANOINFER_ADMISSION_TIMEOUT", default_value_t = 120)]
    pub admission_timeout: u64,
    /// Requests sent to a worker beyond its slots, to wait in its own queue
    /// (at most that queue's size), so a freed slot never waits for a round
    /// trip; the rest wait in the coordinator's admission queue.
    #[arg(long, env = "NANOINFER_DISPATCH_QUEUE_DEPTH", default_value_t = 2)]
    pub dispatch_queue_depth: u32,
    /// Seconds a client may go without reading (its HTTP/2 window full)
    /// before its stream is cancelled and its worker slot freed.
    #[arg(long, env = "NANOINFER_STALLED_STREAM_TIMEOUT", default_value_t = 30)]
    pub stalled_stream_timeout: u64,
    /// Milliseconds a TCP connection to a worker may take.
    #[arg(long, env = "NANOINFER_CONNECT_TIMEOUT_MS", default_value_t = 1000)]
    pub connect_timeout_ms: u64,
    /// Milliseconds between HTTP/2 pings on each worker connection; a
    /// worker that does not answer one within --keepalive-timeout-ms is
    /// ejected and its requests move (a hung worker is found in about the
    /// sum of the two).
    #[arg(long, env = "NANOINFER_KEEPALIVE_INTERVAL_MS", default_value_t = 1000)]
    pub keepalive_interval_ms: u64,
    /// Milliseconds a worker has to answer an HTTP/2 ping.
    #[arg(long, env = "NANOINFER_KEEPALIVE_TIMEOUT_MS", default_value_t = 1000)]
    pub keepalive_timeout_ms: u64,
    /// HTTP/2 connections to each worker (1..=64); requests take them in
    /// turn. More than one spreads each worker's streams over several
    /// connections and their locks.
    #[arg(long, env = "NANOINFER_UPSTREAM_CONNECTIONS", default_value_t = 1)]
    pub upstream_connections: u32,
    /// Workers one request may be opened on, first try, retries before the
    /// first token and mid-stream resumes together (never the same worker
    /// twice).
    #[arg(long, env = "NANOINFER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// File of API keys, one per line (`#` comments allowed), read again
    /// every second so keys rotate without a restart. When set, `Infer`
    /// requires `authorization: Bearer <key>` (UNAUTHENTICATED otherwise);
    /// `Health`, grpc.health.v1 and the metrics port stay open. Unset: no
    /// authentication.
    #[arg(long, env = "NANOINFER_API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// Certificate chain (PEM) for TLS on the public gRPC port; with
    /// --tls-key it turns TLS on there (plaintext clients are refused). The
    /// files are read again when they change, so rotation needs no restart.
    #[arg(long, env = "NANOINFER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "NANOINFER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// CA (PEM) whose client certificates the public port requires (with
    /// --tls-cert): clients without one are refused in the handshake.
    #[arg(long, env = "NANOINFER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Milliseconds an HTTP API client has to send a whole request head:
    /// from the connection's start (after TLS) for its first request, and
    /// from the first byte of each later one. A client that trickles its
    /// headers (slowloris) is disconnected when it runs out.
    #[arg(
        long,
        env = "NANOINFER_HTTP_HEADER_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub http_header_timeout_ms: u64,
    /// Seconds an HTTP API connection may sit idle (no request in flight,
    /// no byte of a next one) before it is closed; also the longest a
    /// request body may take to arrive (slow POST: a 400).
    #[arg(long, env = "NANOINFER_HTTP_IDLE_TIMEOUT", default_value_t = 60)]
    pub http_idle_timeout: u64,
    /// Milliseconds an HTTP API client has to complete its TLS handshake.
    #[arg(
        long,
        env = "NANOINFER_HTTP_TLS_HANDSHAKE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub http_tls_handshake_timeout_ms: u64,
    /// Requests one HTTP API connection may carry; after the last, the
    /// connection closes once its responses finish (HTTP/1.1 `connection:
    /// close`, HTTP/2 GOAWAY) and the client opens a new one.
    #[arg(
        long,
        env = "NANOINFER_HTTP_MAX_REQUESTS_PER_CONNECTION",
        default_value_t = 1000
    )]
    pub http_max_requests_per_connection: u64,
    /// Open HTTP API connections (TLS handshakes included); beyond it a new
    /// connection is closed as soon as it is accepted, logged and counted
    /// (`nanoinfer_coordinator_http_connections_refused_total`).
    #[arg(long, env = "NANOINFER_HTTP_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub http_max_connections: usize,
    /// Origins a browser may call the HTTP API from (CORS), comma-separated
    /// (`https://app.example.com,http://localhost:3000`), or `*` for any.
    /// Empty (the default): no CORS headers, and a browser's preflight is
    /// refused (405).
    #[arg(long, env = "NANOINFER_HTTP_CORS_ORIGINS", value_delimiter = ',')]
    pub http_cors_origins: Vec<String>,
    /// HTTP/2 streams (concurrent calls) one client connection may open on
    /// the public gRPC port; more wait for one to finish.
    #[arg(
        long,
        env = "NANOINFER_GRPC_MAX_CONCURRENT_STREAMS",
        default_value_t = 1024
    )]
    pub grpc_max_concurrent_streams: u32,
    #[command(flatten)]
    pub cluster: nanoinfer_proto::tls::ClusterTlsArgs,
    #[command(flatten)]
    pub telemetry: nanoinfer_telemetry::TelemetryArgs,
}

/// Validated coordinator configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// How to reach etcd.
    pub etcd: nanoinfer_registry::EtcdConfig,
    /// Request defaults and limits.
    pub limits: Limits,
    /// Drain time on shutdown.
    pub grace_period: std::time::Duration,
    /// Timeouts and retry bounds of the worker path.
    pub upstream: UpstreamConfig,
    /// The API keys file, when authentication is on.
    pub api_keys_file: Option<std::path::PathBuf>,
    /// TLS on the public port.
    pub public_tls: Option<nanoinfer_proto::tls::ServerTlsFiles>,
    /// Connection limits and timeouts of the HTTP API.
    pub http: HttpServerConfig,
    /// Concurrent streams per client connection on the public gRPC port.
    pub grpc_max_concurrent_streams: u32,
}

/// Connection limits and timeouts of the OpenAI-compatible HTTP API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpServerConfig {
    /// A request head must arrive within this (slowloris).
    pub header_timeout: Duration,
    /// A connection with nothing in flight is closed after this.
    pub idle_timeout: Duration,
    /// The TLS handshake must complete within this.
    pub tls_handshake_timeout: Duration,
    /// Requests per connection before it is closed.
    pub max_requests_per_connection: u64,
    /// Open connections; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// CORS: the origins browsers may call from (`*`: any; empty: off).
    pub cors_origins: Vec<String>,
}

impl Default for HttpServerConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(10),
            max_requests_per_connection: 1000,
            max_connections: 10_000,
            cors_origins: Vec::new(),
        }
    }
}

/// Timeouts and retry bounds of the path to workers.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Default (and longest) request duration.
    pub request_timeout: Duration,
    /// Admission → first token, and token → token, per worker.
    pub first_token_timeout: Duration,
    /// New requests that may wait for a worker with room.
    pub admission_queue: usize,
    /// Longest wait in the admission queue.
    pub admission_timeout: Duration,
    /// Requests a worker gets beyond its slots.
    pub dispatch_queue_depth: usize,
    /// No read progress by the client → cancelled.
    pub stalled_stream_timeout: Duration,
    /// TCP connect to a worker.
    pub connect_timeout: Duration,
    /// HTTP/2 ping period on worker connections.
    pub keepalive_interval: Duration,
    /// HTTP/2 ping answer deadline.
    pub keepalive_timeout: Duration,
    /// Worker attempts per request.
    pub max_attempts: usize,
    /// HTTP/2 connections to each worker.
    pub connections: usize,
    /// Mutual TLS to workers.
    pub cluster_tls: Option<nanoinfer_proto::tls::ClusterTls>,
    /// Worker choice.
    pub routing: crate::affinity::Routing,
    /// Prefix affinity yields to the least-loaded worker beyond this many
    /// more requests in flight.
    pub affinity_max_load_gap: usize,
    /// Prompt bytes remembered per worker for prefix affinity.
    pub affinity_cache_bytes: usize,
    /// Cache-aware routing: one request in flight's cost, in prompt blocks.
    pub cache_aware_load_weight: f64,
    /// Cache-aware routing: the index's bound per worker.
    pub kv_index_max_blocks: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(600),
            first_token_timeout: Duration::from_secs(30),
            admission_queue: 1024,
            admission_timeout: Duration::from_secs(120),
            dispatch_queue_depth: 2,
            stalled_stream_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_millis(1000),
            keepalive_interval: Duration::from_millis(1000),
            keepalive_timeout: Duration::from_millis(1000),
            max_attempts: 3,
            connections: 1,
            cluster_tls: None,
            routing: crate::affinity::Routing::CacheAware,
            affinity_max_load_gap: 2,
            affinity_cache_bytes: 10 << 10,
            cache_aware_load_weight: 4.0,
            kv_index_max_blocks: 1 << 20,
        }
    }
}

impl Args {
    /// Checks ranges.
    pub fn validate(self) -> Result<CoordinatorConfig, String> {
        if self.max_tokens_limit == 0 {
            return Err("--max-tokens-limit must be at least 1".into());
        }
        if !(1..=self.max_tokens_limit).contains(&self.default_max_tokens) {
            return Err(format!(
                "--default-max-tokens must be 1..={} (--max-tokens-limit), got {}",
                self.max_tokens_limit, self.default_max_tokens
            ));
        }
        if !(self.cache_aware_load_weight.is_finite() && self.cache_aware_load_weight >= 0.0) {
            return Err(format!(
                "--cache-aware-load-weight must be a number >= 0, got {}",
                self.cache_aware_load_weight
            ));
        }
        for (flag, value) in [
            ("--request-timeout", self.request_timeout),
            ("--first-token-timeout", self.first_token_timeout),
            ("--admission-timeout", self.admission_timeout),
            ("--stalled-stream-timeout", self.stalled_stream_timeout),
            ("--connect-timeout-ms", self.connect_timeout_ms),
            ("--keepalive-interval-ms", self.keepalive_interval_ms),
            ("--keepalive-timeout-ms", self.keepalive_timeout_ms),
            ("--http-header-timeout-ms", self.http_header_timeout_ms),
            ("--http-idle-timeout", self.http_idle_timeout),
            (
                "--http-tls-handshake-timeout-ms",
                self.http_tls_handshake_timeout_ms,
            ),
            (
                "--http-max-requests-per-connection",
                self.http_max_requests_per_connection,
            ),
            ("--http-max-connections", self.http_max_connections as u64),
            (
                "--grpc-max-concurrent-streams",
                u64::from(self.grpc_max_concurrent_streams),
            ),
        ] {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        for origin in &self.http_cors_origins {
            crate::http::edge::check_origin(origin)
                .map_err(|e| format!("--http-cors-origins: {e}"))?;
        }
        if !(1..=16).contains(&self.max_attempts) {
            return Err(format!(
                "--max-attempts must be 1..=16, got {}",
                self.max_attempts
            ));
        }
        if !(1..=64).contains(&self.upstream_connections) {
            return Err(format!(
                "--upstream-connections must be 1..=64, got {}",
                self.upstream_connections
            ));
        }
        let public_tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => {
                let files = nanoinfer_proto::tls::ServerTlsFiles {
                    cert,
                    key,
                    client_ca: self.tls_client_ca,
                };
                // Fail at start-up, naming the file, not at the first client.
                files.build()?;
                Some(files)
            }
            _ => None,
        };
        Ok(CoordinatorConfig {
            etcd: self.etcd.validate()?,
            limits: Limits {
                default_max_tokens: self.default_max_tokens,
                checks: nanoinfer_proto::limits::Limits {
                    max_tokens_limit: self.max_tokens_limit,
                    max_prompt_bytes: self.max_prompt_bytes,
                },
            },
            grace_period: Duration::from_secs(self.grace_period),
            upstream: UpstreamConfig {
                request_timeout: Duration::from_secs(self.request_timeout),
                first_token_timeout: Duration::from_secs(self.first_token_timeout),
                admission_queue: self.admission_queue as usize,
                admission_timeout: Duration::from_secs(self.admission_timeout),
                dispatch_queue_depth: self.dispatch_queue_depth as usize,
                stalled_stream_timeout: Duration::from_secs(self.stalled_stream_timeout),
                connect_timeout: Duration::from_millis(self.connect_timeout_ms),
                keepalive_interval: Duration::from_millis(self.keepalive_interval_ms),
                keepalive_timeout: Duration::from_millis(self.keepalive_timeout_ms),
                max_attempts: self.max_attempts as usize,
                connections: self.upstream_connections as usize,
                cluster_tls: self.cluster.validate()?,
                routing: self.routing,
                affinity_max_load_gap: self.affinity_max_load_gap as usize,
                affinity_cache_bytes: self.affinity_cache_bytes,
                cache_aware_load_weight: self.cache_aware_load_weight,
                kv_index_max_blocks: self.kv_index_max_blocks,
            },
            api_keys_file: self.api_keys_file,
            public_tls,
            http: HttpServerConfig {
                header_timeout: Duration::from_millis(self.http_header_timeout_ms),
                idle_timeout: Duration::from_secs(self.http_idle_timeout),
                tls_handshake_timeout: Duration::from_millis(self.http_tls_handshake_timeout_ms),
                max_requests_per_connection: self.http_max_requests_per_connection,
                max_connections: self.http_max_connections,
                cors_origins: self.http_cors_origins.clone(),
            },
            grpc_max_concurrent_streams: self.grpc_max_concurrent_streams,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<CoordinatorConfig, String> {
        let mut argv = vec!["nanoinfer-coordinator"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap().validate()
    }

    #[test]
    fn defaults_are_valid() {
        let c = args(&[]).unwrap();
        assert_eq!(c.limits.default_max_tokens, 128);
        assert_eq!(c.limits.checks.max_tokens_limit, 4096);
        assert_eq!(c.etcd.endpoints, vec!["http://127.0.0.1:2379".to_string()]);
    }

    #[test]
    fn inconsistent_limits_are_refused() {
        let err = args(&["--max-tokens-limit", "64"]).unwrap_err();
        assert!(err.contains("--default-max-tokens"), "{err}");
        assert!(args(&["--max-tokens-limit", "0"]).is_err());
        assert!(args(&["--max-tokens-limit", "64", "--default-max-tokens", "64"]).is_ok());
    }

    #[test]
    fn timeouts_must_be_positive() {
        let err = args(&["--stalled-stream-timeout", "0"]).unwrap_err();
        assert!(err.contains("--stalled-stream-timeout"), "{err}");
        assert!(args(&["--max-attempts", "0"]).is_err());
        let c = args(&["--keepalive-interval-ms", "250"]).unwrap();
        assert_eq!(c.upstream.keepalive_interval, Duration::from_millis(250));
        assert_eq!(c.upstream.max_attempts, 3);
    }

    #[test]
    fn upstream_connections_are_bounded() {
        assert_eq!(args(&[]).unwrap().upstream.connections, 1);
        assert_eq!(
            args(&["--upstream-connections", "4"])
                .unwrap()
                .upstream
                .connections,
            4
        );
        for bad in ["0", "65"] {
            let err = args(&["--upstream-connections", bad]).unwrap_err();
            assert!(err.contains("--upstream-connections"), "{err}");
        }
    }

    #[test]
    fn cors_origins_are_a_checked_list_and_off_by_default() {
        assert!(args(&[]).unwrap().http.cors_origins.is_empty());
        let c = args(&[
            "--http-cors-origins",
            "https://a.example,http://localhost:3000",
        ])
        .unwrap();
        assert_eq!(
            c.http.cors_origins,
            vec!["https://a.example", "http://localhost:3000"]
        );
        let e = args(&["--http-cors-origins", "https://a.example/app"]).unwrap_err();
        assert!(e.contains("--http-cors-origins"), "{e}");
    }

    #[test]
    fn http_hardening_flags_have_operator_defaults_and_refuse_zero() {
        let c = args(&[]).unwrap();
        assert_eq!(c.http, HttpServerConfig::default());
        assert_eq!(c.http.header_timeout, Duration::from_secs(10));
        assert_eq!(c.http.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.http.max_requests_per_connection, 1000);
        assert_eq!(c.http.max_connections, 10_000);
        assert_eq!(c.grpc_max_concurrent_streams, 1024);
        let c = args(&[
            "--http-header-timeout-ms",
            "500",
            "--http-idle-timeout",
            "5",
            "--http-tls-handshake-timeout-ms",
            "250",
            "--http-max-requests-per-connection",
            "3",
            "--http-max-connections",
            "7",
            "--grpc-max-concurrent-streams",
            "16",
        ])
        .unwrap();
        assert_eq!(c.http.header_timeout, Duration::from_millis(500));
        assert_eq!(c.http.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.http.tls_handshake_timeout, Duration::from_millis(250));
        assert_eq!(c.http.max_requests_per_connection, 3);
        assert_eq!(c.http.max_connections, 7);
        assert_eq!(c.grpc_max_concurrent_streams, 16);
        for flag in [
            "--http-header-timeout-ms",
            "--http-idle-timeout",
            "--http-tls-handshake-timeout-ms",
            "--http-max-requests-per-connection",
            "--http-max-connections",
            "--grpc-max-concurrent-streams",
        ] {
            let err = args(&[flag, "0"]).unwrap_err();
            assert!(err.contains(flag), "{flag}: {err}");
        }
    }
}
