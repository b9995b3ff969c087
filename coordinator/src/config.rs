//! Command-line flags (each also read from a `NANOINFER_…` env var).

use std::net::SocketAddr;

use clap::Parser;

use crate::validate::Limits;

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
    #[command(flatten)]
    pub etcd: nanoinfer_registry::EtcdArgs,
    /// `max_tokens` used when a request leaves it at 0.
    #[arg(long, env = "NANOINFER_DEFAULT_MAX_TOKENS", default_value_t = 128)]
    pub default_max_tokens: u32,
    /// Largest `max_tokens` a request may ask for; above it, INVALID_ARGUMENT.
    #[arg(long, env = "NANOINFER_MAX_TOKENS_LIMIT", default_value_t = 4096)]
    pub max_tokens_limit: u32,
    /// Largest prompt accepted, in bytes; above it, INVALID_ARGUMENT.
    #[arg(long, env = "NANOINFER_MAX_PROMPT_BYTES", default_value_t = 1 << 20)]
    pub max_prompt_bytes: usize,
    /// Seconds open streams get to finish after SIGTERM.
    #[arg(long, env = "NANOINFER_GRACE_PERIOD", default_value_t = 20)]
    pub grace_period: u64,
    #[command(flatten)]
    pub telemetry: nanoinfer_telemetry::TelemetryArgs,
}

/// Validated coordinator configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// etcd endpoints.
    pub etcd_endpoints: Vec<String>,
    /// Request defaults and limits.
    pub limits: Limits,
    /// Drain time on shutdown.
    pub grace_period: std::time::Duration,
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
        Ok(CoordinatorConfig {
            etcd_endpoints: self.etcd.validate()?,
            limits: Limits {
                default_max_tokens: self.default_max_tokens,
                max_tokens_limit: self.max_tokens_limit,
                max_prompt_bytes: self.max_prompt_bytes,
            },
            grace_period: std::time::Duration::from_secs(self.grace_period),
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
        assert_eq!(c.limits.max_tokens_limit, 4096);
        assert_eq!(c.etcd_endpoints, vec!["http://127.0.0.1:2379".to_string()]);
    }

    #[test]
    fn inconsistent_limits_are_refused() {
        let err = args(&["--max-tokens-limit", "64"]).unwrap_err();
        assert!(err.contains("--default-max-tokens"), "{err}");
        assert!(args(&["--max-tokens-limit", "0"]).is_err());
        assert!(args(&["--max-tokens-limit", "64", "--default-max-tokens", "64"]).is_ok());
    }
}
