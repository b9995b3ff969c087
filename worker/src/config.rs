//! Command-line flags (each also read from a `NANOINFER_…` env var) and
//! their validation into a [`WorkerConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::engine::Failpoint;

/// nanoinfer worker: serves a GGUF model over nanoinfer.worker.v1 and
/// registers itself in etcd.
#[derive(Debug, Clone, Parser)]
#[command(name = "nanoinfer-worker", version)]
pub struct Args {
    /// Path of the GGUF model file to serve.
    #[arg(long, env = "NANOINFER_MODEL")]
    pub model: PathBuf,
    /// Name the model is registered and requested by (`model` in both
    /// APIs, `GET /v1/models`): 1..=128 bytes of letters, digits,
    /// `. _ : / @ + -` and inner spaces. Defaults to the GGUF's
    /// `general.name`, or the file name without `.gguf`.
    #[arg(long, env = "NANOINFER_MODEL_NAME")]
    pub model_name: Option<String>,
    /// A Jinja chat template file to render conversations with instead of
    /// the GGUF's `tokenizer.chat_template` (Hugging Face's format, as
    /// llama.cpp's `--chat-template-file`). Coordinators get it with the
    /// vocabulary, so both render alike.
    #[arg(long, env = "NANOINFER_CHAT_TEMPLATE_FILE")]
    pub chat_template_file: Option<PathBuf>,
    /// Address to listen on for gRPC; port 0 picks a free port (the bound
    /// address is logged).
    #[arg(long, env = "NANOINFER_LISTEN", default_value = "0.0.0.0:50061")]
    pub listen: SocketAddr,
    /// Address of the HTTP endpoint for `/metrics`, `/healthz` and
    /// `/readyz`; port 0 picks a free port (the bound address is logged).
    #[arg(long, env = "NANOINFER_METRICS_LISTEN", default_value = "0.0.0.0:9061")]
    pub metrics_listen: SocketAddr,
    /// Address published in etcd for the coordinator to dial (host:port).
    /// Defaults to the bound address (127.0.0.1 when bound to 0.0.0.0).
    #[arg(long, env = "NANOINFER_ADVERTISE")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub etcd: nanoinfer_registry::EtcdArgs,
    /// Worker id, the last segment of its etcd key: a DNS label (letters,
    /// digits and inner '-', at most 63). Defaults to `<hostname>-<port>`.
    #[arg(long, env = "NANOINFER_ID")]
    pub id: Option<String>,
    /// CPU threads for llama.cpp. Defaults to the number of available cores.
    #[arg(long, env = "NANOINFER_THREADS")]
    pub threads: Option<u32>,
    /// TTL of the etcd lease in seconds; a worker that dies disappears from
    /// the coordinator's set after at most this long.
    #[arg(long, env = "NANOINFER_LEASE_TTL", default_value_t = 10)]
    pub lease_ttl: u32,
    /// Context window in tokens (prompt + generated).
    #[arg(long, env = "NANOINFER_CTX_SIZE", default_value_t = 2048)]
    pub ctx_size: u32,
    /// Requests generated concurrently (continuous-batching slots); each has
    /// its own --ctx-size window in one unified KV cache.
    #[arg(long, env = "NANOINFER_PARALLEL", default_value_t = 4)]
    pub parallel: u32,
    /// Prompt tokens decoded per engine step, shared by requests in prefill
    /// (chunked prefill), while no request is generating: large chunks
    /// prefill fastest.
    #[arg(long, env = "NANOINFER_PREFILL_CHUNK", default_value_t = 128)]
    pub prefill_chunk: u32,
    /// Prompt tokens per engine step while requests are generating (at most
    /// --prefill-chunk): bounds how long a new prompt pauses running streams
    /// between two of their tokens.
    #[arg(long, env = "NANOINFER_PREFILL_CHUNK_DECODING", default_value_t = 32)]
    pub prefill_chunk_decoding: u32,
    /// Tokens of finished requests kept in the KV cache for prefix reuse,
    /// over all idle slots (most recently finished first; a prefix several
    /// slots keep shares its cells and counts once; 0 keeps none).
    /// Kept cells serve a later prompt that shares their prefix, but in
    /// llama.cpp's unified KV cache every decode step's attention spans
    /// them too. The default, as long as the default --ctx-size window,
    /// keeps a conversation warm without letting idle slots fill the cache.
    #[arg(long, env = "NANOINFER_PREFIX_CACHE_TOKENS", default_value_t = 2048)]
    pub prefix_cache_tokens: u32,
    /// Host memory for prefixes evicted from the KV cache (the RAM tier):
    /// a prompt that starts with one gets its cells copied back instead of
    /// computed again. Bytes, or with a K, M or G suffix (powers of 1024);
    /// least recently used prefixes go first; 0 turns the tier off. Outside
    /// the KV cache: the worker's memory grows by up to this much.
    #[arg(long, env = "NANOINFER_PREFIX_CACHE_RAM_BYTES", default_value = "1G", value_parser = parse_bytes)]
    pub prefix_cache_ram_bytes: u64,
    /// What the KV cache stores keys and values as: q8_0 (half of f16's
    /// memory, and one attention path for every batch shape and cache
    /// layout, which the seed promise needs) or f16 (llama.cpp's default:
    /// slightly faster prompts here, but a seeded request's text may then
    /// change with what the cache holds). docs/operations.md.
    #[arg(long, env = "NANOINFER_KV_CACHE_TYPE", value_enum, default_value_t = crate::engine::KvCacheType::default())]
    pub kv_cache_type: crate::engine::KvCacheType,
    /// Draft-free speculation: most tokens a decoding request proposes per
    /// step from an earlier occurrence of its latest n-gram in its own
    /// prompt or output (prompt lookup), verified in the same batch; each
    /// kept token is the sampler's own pick at its position. Proposals are
    /// sized by a step's cost measured at start, so they are made only
    /// where they are likely to pay. 47 (the default, a 48-row step) made
    /// copy-heavy decoding 2.1-2.3x faster here; 0 turns it off
    /// (docs/benchmarks.md).
    #[arg(long, env = "NANOINFER_DRAFT_MAX", default_value_t = 47)]
    pub draft_max: u32,
    /// A small model with the served model's vocabulary (checked at
    /// start) that proposes up to --draft-max tokens when a request's own
    /// context offers nothing to copy; its guesses are verified like
    /// prompt-lookup proposals, so the output is the served model's. Needs
    /// --draft-max above 0. Its KV cache takes --ctx-size x --parallel
    /// cells of its own.
    #[arg(long, env = "NANOINFER_DRAFT_MODEL")]
    pub draft_model: Option<PathBuf>,
    /// Shortest n-gram match that proposes (1 to --spec-ngram-max): on text
    /// with little to copy, what followed a short match is rarely what
    /// comes next.
    #[arg(long, env = "NANOINFER_SPEC_NGRAM_MIN", default_value_t = 4)]
    pub spec_ngram_min: u32,
    /// Longest n-gram looked up for a proposal (the longest match wins).
    #[arg(long, env = "NANOINFER_SPEC_NGRAM_MAX", default_value_t = 12)]
    pub spec_ngram_max: u32,
    /// A fixed model of a decode step's cost instead of measuring it at
    /// start: a step of N positions costs RATIO + N position-times. Unset
    /// (the default), the worker times steps of 1 to --draft-max + 1 rows
    /// when it starts (a second or two) and sizes proposals by that.
    #[arg(long, env = "NANOINFER_SPEC_STEP_RATIO")]
    pub spec_step_ratio: Option<f64>,
    /// Requests that may wait for the engine; beyond it, RESOURCE_EXHAUSTED.
    #[arg(long, env = "NANOINFER_QUEUE", default_value_t = 16)]
    pub queue: u32,
    /// Seconds in-flight requests get to finish after SIGTERM before they
    /// are cancelled. Keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "NANOINFER_GRACE_PERIOD", default_value_t = 20)]
    pub grace_period: u64,
    /// Seconds a request may wait in the queue for a slot; past it, it fails
    /// with UNAVAILABLE so the coordinator can try another worker.
    #[arg(long, env = "NANOINFER_QUEUE_TIMEOUT", default_value_t = 30)]
    pub queue_timeout: u64,
    /// Largest `max_tokens` a request may ask for (counting resumed
    /// tokens); above it, INVALID_ARGUMENT. The coordinator applies the same
    /// limit; the worker checks again for callers that reach it directly.
    #[arg(long, env = "NANOINFER_MAX_TOKENS_LIMIT", default_value_t = nanoinfer_proto::limits::DEFAULT_MAX_TOKENS_LIMIT)]
    pub max_tokens_limit: u32,
    /// Largest prompt accepted, in bytes; above it, INVALID_ARGUMENT (as on
    /// the coordinator).
    #[arg(long, env = "NANOINFER_MAX_PROMPT_BYTES", default_value_t = nanoinfer_proto::limits::DEFAULT_MAX_PROMPT_BYTES)]
    pub max_prompt_bytes: usize,
    /// Test-only fault injection, like etcd's failpoints; never set it in
    /// production. `engine-panic-after-tokens=N`: the engine thread panics
    /// once it has generated N tokens.
    #[arg(long, env = "NANOINFER_FAILPOINT", hide = true)]
    pub failpoint: Option<String>,
    #[command(flatten)]
    pub cluster: nanoinfer_proto::tls::ClusterTlsArgs,
    #[command(flatten)]
    pub telemetry: nanoinfer_telemetry::TelemetryArgs,
}

/// Validated worker configuration.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// GGUF path.
    pub model: PathBuf,
    /// `--model-name` (`None`: from the GGUF).
    pub model_name: Option<String>,
    /// `--chat-template-file`'s text (`None`: the GGUF's template).
    pub chat_template: Option<String>,
    /// Published address; `None` = derive from the bound address.
    pub advertise: Option<String>,
    /// How to reach etcd.
    pub etcd: nanoinfer_registry::EtcdConfig,
    /// Mutual TLS on the worker port (clients need a cluster certificate).
    pub cluster_tls: Option<nanoinfer_proto::tls::ClusterTls>,
    /// Worker id; `None` = `<hostname>-<port>`.
    pub id: Option<String>,
    /// llama.cpp threads.
    pub threads: u32,
    /// Lease TTL in seconds.
    pub lease_ttl: u32,
    /// Context window.
    pub ctx_size: u32,
    /// Wait-queue capacity.
    pub queue: u32,
    /// Batch slots.
    pub parallel: u32,
    /// Prompt tokens per step.
    pub prefill_chunk: u32,
    /// Prompt tokens per step while sequences decode (≤ `prefill_chunk`).
    pub prefill_chunk_decoding: u32,
    /// Tokens of finished sequences kept warm for prefix reuse.
    pub prefix_cache_tokens: u32,
    /// Bytes of evicted prefixes kept in host memory.
    pub prefix_cache_ram_bytes: u64,
    /// Draft-free speculation.
    pub spec: crate::engine::SpecConfig,
    /// The draft model's file.
    pub draft_model: Option<PathBuf>,
    /// What the KV cache stores.
    pub kv_cache_type: crate::engine::KvCacheType,
    /// Drain time on shutdown.
    pub grace_period: Duration,
    /// Longest wait in the queue.
    pub queue_timeout: Duration,
    /// Test-only fault injection.
    pub failpoint: Option<Failpoint>,
    /// Request limits (shared with the coordinator's checks).
    pub limits: nanoinfer_proto::limits::Limits,
}

impl Args {
    /// Checks ranges and fills defaults.
    pub fn validate(self) -> Result<WorkerConfig, String> {
        let threads = match self.threads {
            Some(0) => return Err("--threads must be at least 1".into()),
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
        };
        if !(2..=3600).contains(&self.lease_ttl) {
            return Err(format!(
                "--lease-ttl must be 2..=3600 seconds, got {}",
                self.lease_ttl
            ));
        }
        if !(64..=1 << 20).contains(&self.ctx_size) {
            return Err(format!(
                "--ctx-size must be 64..=1048576, got {}",
                self.ctx_size
            ));
        }
        if !(1..=64).contains(&self.parallel) {
            return Err(format!("--parallel must be 1..=64, got {}", self.parallel));
        }
        // A chunk that does not end its prompt is whole row groups (the
        // seed promise), so a smaller one would never move.
        let chunks = crate::engine::ROW_GROUP as u32..=8192;
        if !chunks.contains(&self.prefill_chunk) {
            return Err(format!(
                "--prefill-chunk must be {}..={}, got {}",
                chunks.start(),
                chunks.end(),
                self.prefill_chunk
            ));
        }
        if !chunks.contains(&self.prefill_chunk_decoding) {
            return Err(format!(
                "--prefill-chunk-decoding must be {}..={}, got {}",
                chunks.start(),
                chunks.end(),
                self.prefill_chunk_decoding
            ));
        }
        if self.queue == 0 {
            return Err("--queue must be at least 1".into());
        }
        if self.max_tokens_limit == 0 {
            return Err("--max-tokens-limit must be at least 1".into());
        }
        if self.max_prompt_bytes == 0 {
            return Err("--max-prompt-bytes must be at least 1".into());
        }
        if let Some(addr) = &self.advertise {
            // The same check the coordinator applies to what it reads from
            // etcd: refused here, at start, rather than ignored there.
            nanoinfer_registry::validate_address(addr).map_err(|e| format!("--advertise: {e}"))?;
        }
        if !(1..=3600).contains(&self.queue_timeout) {
            return Err(format!(
                "--queue-timeout must be 1..=3600 seconds, got {}",
                self.queue_timeout
            ));
        }
        let failpoint = self
            .failpoint
            .as_deref()
            .filter(|f| !f.is_empty())
            .map(parse_failpoint)
            .transpose()?;
        if let Some(id) = &self.id {
            nanoinfer_registry::schema::validate_worker_id(id).map_err(|e| format!("--id: {e}"))?;
        }
        if let Some(name) = &self.model_name {
            nanoinfer_registry::schema::validate_model_name(name)
                .map_err(|e| format!("--model-name: {e}"))?;
        }
        let chat_template = match &self.chat_template_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--chat-template-file {}: {e}", path.display()))?;
                nanoinfer_vocab::ChatTemplate::new(&text, "", "")
                    .map_err(|e| format!("--chat-template-file {}: {e}", path.display()))?;
                Some(text)
            }
        };
        if self.draft_max > 64 {
            return Err(format!("--draft-max: {} is above 64", self.draft_max));
        }
        if self.draft_model.is_some() && self.draft_max == 0 {
            return Err(
                "--draft-model: needs --draft-max above 0 (the most tokens it may propose per step)"
                    .into(),
            );
        }
        if self.spec_ngram_min == 0 || self.spec_ngram_min > self.spec_ngram_max {
            return Err(format!(
                "--spec-ngram-min: must be 1 to --spec-ngram-max ({}), got {}",
                self.spec_ngram_max, self.spec_ngram_min
            ));
        }
        if self.spec_ngram_max > 16 {
            return Err(format!(
                "--spec-ngram-max: {} is above 16",
                self.spec_ngram_max
            ));
        }
        if let Some(ratio) = self.spec_step_ratio {
            if !(0.0..=1024.0).contains(&ratio) {
                return Err(format!("--spec-step-ratio: must be 0 to 1024, got {ratio}"));
            }
        }
        let spec = crate::engine::SpecConfig {
            draft_max: self.draft_max as usize,
            ngram_min: self.spec_ngram_min as usize,
            ngram_max: self.spec_ngram_max as usize,
            step_ratio: self.spec_step_ratio,
        };
        Ok(WorkerConfig {
            model: self.model,
            model_name: self.model_name,
            chat_template,
            advertise: self.advertise,
            etcd: self.etcd.validate()?,
            cluster_tls: self.cluster.validate()?,
            id: self.id,
            threads,
            lease_ttl: self.lease_ttl,
            ctx_size: self.ctx_size,
            queue: self.queue,
            parallel: self.parallel,
            prefill_chunk: self.prefill_chunk,
            prefill_chunk_decoding: self.prefill_chunk_decoding.min(self.prefill_chunk),
            prefix_cache_tokens: self.prefix_cache_tokens,
            prefix_cache_ram_bytes: self.prefix_cache_ram_bytes,
            spec,
            draft_model: self.draft_model.clone(),
            kv_cache_type: self.kv_cache_type,
            grace_period: Duration::from_secs(self.grace_period),
            queue_timeout: Duration::from_secs(self.queue_timeout),
            failpoint,
            limits: nanoinfer_proto::limits::Limits {
                max_tokens_limit: self.max_tokens_limit,
                max_prompt_bytes: self.max_prompt_bytes,
            },
        })
    }
}

/// Parses a `NANOINFER_FAILPOINT` value.
fn parse_failpoint(value: &str) -> Result<Failpoint, String> {
    let bad = || {
        format!(
            "NANOINFER_FAILPOINT (--failpoint) must be engine-panic-after-tokens=N, got {value:?}"
        )
    };
    match value.split_once('=') {
        Some(("engine-panic-after-tokens", n)) => n
            .parse::<u64>()
            .map(Failpoint::EnginePanicAfterTokens)
            .map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// Parses a byte count: a number, or one with a K, M or G suffix (powers
/// of 1024; "KiB", "MiB", "GiB" too).
fn parse_bytes(value: &str) -> Result<u64, String> {
    let bad = || format!("expected bytes, as a number or with a K, M or G suffix, got {value:?}");
    let v = value.trim();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, unit) = v.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(bad()),
    };
    number.checked_mul(scale).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_tier_sizes_take_a_unit() {
        assert_eq!(args(&[]).unwrap().prefix_cache_ram_bytes, 1 << 30);
        for (value, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("512M", 512 << 20),
            ("2GiB", 2 << 30),
            ("64k", 64 << 10),
        ] {
            let c = args(&["--prefix-cache-ram-bytes", value]).unwrap();
            assert_eq!(c.prefix_cache_ram_bytes, bytes, "{value}");
        }
        for value in ["", "G", "1T", "x1", "1.5G", "99999999999G"] {
            let err = Args::try_parse_from([
                "nanoinfer-worker",
                "--model",
                "m.gguf",
                "--prefix-cache-ram-bytes",
                value,
            ])
            .map(|_| ())
            .unwrap_err()
            .to_string();
            assert!(err.contains("--prefix-cache-ram-bytes"), "{value}: {err}");
        }
    }

    fn args(extra: &[&str]) -> Result<WorkerConfig, String> {
        let mut argv = vec!["nanoinfer-worker", "--model", "m.gguf"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap().validate()
    }

    #[test]
    fn defaults_are_valid() {
        let c = args(&[]).unwrap();
        assert_eq!(c.ctx_size, 2048);
        assert_eq!(c.queue_timeout, Duration::from_secs(30));
        assert_eq!(c.failpoint, None);
        assert_eq!(c.lease_ttl, 10);
        assert!(c.threads >= 1);
        assert_eq!((c.prefill_chunk, c.prefill_chunk_decoding), (128, 32));
        // The decoding budget never exceeds the idle one.
        let c = args(&["--prefill-chunk", "16"]).unwrap();
        assert_eq!(c.prefill_chunk_decoding, 16);
    }

    #[test]
    fn out_of_range_flags_name_the_flag() {
        for (flag, value) in [
            ("--threads", "0"),
            ("--lease-ttl", "1"),
            ("--ctx-size", "8"),
            ("--queue", "0"),
            ("--parallel", "0"),
            ("--prefill-chunk", "0"),
            ("--prefill-chunk", "3"),
            ("--prefill-chunk-decoding", "0"),
            ("--advertise", "no-port"),
            ("--advertise", "http://h:1"),
            ("--advertise", "h:0"),
            ("--advertise", "bad host:1"),
            ("--advertise", "h:99999"),
            ("--queue-timeout", "0"),
            ("--failpoint", "explode"),
            ("--draft-max", "65"),
            ("--failpoint", "engine-panic-after-tokens=x"),
            ("--id", "a/b"),
            ("--id", "node-1:50061"),
            ("--id", "evil\nINFO forged"),
            ("--id", "a-"),
            ("--model-name", "a\"b"),
            ("--model-name", "a\nb"),
            ("--model-name", " gemma"),
            ("--etcd-endpoints", ""),
        ] {
            let err = args(&[flag, value]).unwrap_err();
            assert!(err.contains(flag), "{flag} {value}: {err}");
        }
        // A draft model with speculation turned off.
        let err = args(&["--draft-model", "d.gguf", "--draft-max", "0"]).unwrap_err();
        assert!(err.contains("--draft-model"), "{err}");
        assert_eq!(
            args(&["--advertise", "worker-0.workers:50061"])
                .unwrap()
                .advertise
                .as_deref(),
            Some("worker-0.workers:50061")
        );
        assert_eq!(
            args(&["--failpoint", "engine-panic-after-tokens=3"])
                .unwrap()
                .failpoint,
            Some(Failpoint::EnginePanicAfterTokens(3))
        );
    }
}
