//! The `nanoinfer` command-line client and the benchmark program share this
//! small client library.
//!
//! # Layout
//! - [`connect`], [`connect_with`], [`ClientTlsArgs`]: a channel to a
//!   coordinator (or worker) address, plaintext or TLS.
//! - [`finish_reason_name`]: short names for the public finish reasons.
//! - [`code_name`]: the canonical name of a gRPC code (`RESOURCE_EXHAUSTED`).
//! - [`stamp`]: the send-time stamp a test-double worker writes into its
//!   tokens and the benchmark reads back.

#![forbid(unsafe_code)]

use std::time::Duration;

use nanoinfer_proto::nanoinfer::FinishReason;
use std::path::PathBuf;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// The coordinator address clients use when neither `--addr` nor
/// `NANOINFER_ADDR` is given: 127.0.0.1 on `NANOINFER_COORDINATOR_PORT` (the
/// local cluster's port variable, kept as a deprecated alias) or 50052.
pub fn default_addr() -> String {
    let port = std::env::var("NANOINFER_COORDINATOR_PORT")
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok())
        .unwrap_or(50052);
    format!("http://127.0.0.1:{port}")
}

/// A failed connection in one line: the address, the innermost cause
/// ("Connection refused", "dns error" …) rather than the transport's debug
/// dump, and what to check.
pub fn connect_error(addr: &str, error: &tonic::transport::Error) -> String {
    let mut cause: &dyn std::error::Error = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let cause = cause.to_string();
    let cause = if cause.is_empty() {
        error.to_string()
    } else {
        cause
    };
    format!(
        "cannot connect to the coordinator at {addr}: {cause} (is it running? deploy/local-cluster.sh status; \
         --addr or NANOINFER_ADDR sets the address)"
    )
}

/// Connects to `addr` (`http://host:port` or `host:port`), failing within
/// a few seconds when nothing listens there.
pub async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
    connect_with(addr, None).await
}

/// Connects to `addr`, over TLS when `tls` is given (the scheme becomes
/// `https`), failing within a few seconds when nothing listens there.
pub async fn connect_with(
    addr: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let hostport = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let url = match (&tls, addr.contains("://")) {
        (Some(_), _) => format!("https://{hostport}"),
        (None, true) => addr.to_string(),
        (None, false) => format!("http://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint.connect().await
}

/// TLS flags of the CLI and the benchmark (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// CA (PEM) that signs the server's certificate; turns TLS on (the
    /// coordinator runs with --tls-cert). scripts/gen-certs writes ca.pem.
    #[arg(long, global = true, env = "NANOINFER_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for a server started with --tls-client-ca
    /// (or a worker's cluster port).
    #[arg(long, global = true, env = "NANOINFER_CLIENT_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, global = true, env = "NANOINFER_CLIENT_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Name to expect on the server's certificate, when it is not the
    /// address's host (e.g. `w1.worker.nanoinfer` for a worker).
    #[arg(long, global = true, env = "NANOINFER_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

impl ClientTlsArgs {
    /// The TLS configuration, `None` without --ca; an error names the file.
    pub fn config(&self) -> Result<Option<ClientTlsConfig>, String> {
        if self.ca.is_none() && (self.cert.is_some() || self.tls_server_name.is_some()) {
            return Err("--cert and --tls-server-name need --ca (TLS)".into());
        }
        let Some(ca) = &self.ca else { return Ok(None) };
        let identity = self.cert.as_deref().zip(self.key.as_deref());
        nanoinfer_proto::tls::client_config(ca, identity, self.tls_server_name.clone()).map(Some)
    }
}

/// The finish reason as users read it (`LENGTH`, `STOP_SEQUENCE`, …).
pub fn finish_reason_name(reason: i32) -> &'static str {
    match FinishReason::try_from(reason) {
        Ok(FinishReason::Length) => "LENGTH",
        Ok(FinishReason::StopSequence) => "STOP_SEQUENCE",
        Ok(FinishReason::Eos) => "EOS",
        Ok(FinishReason::ContextLength) => "CONTEXT_LENGTH",
        Ok(FinishReason::Cancelled) => "CANCELLED",
        Ok(FinishReason::Unspecified) | Err(_) => "UNSPECIFIED",
    }
}

pub use nanoinfer_proto::code_name;

pub mod stamp {
    //! Token send stamps for router benchmarks: `examples/paced_worker.rs
    //! --stamp` makes each token's text `@<nanoseconds since the Unix
    //! epoch>`, and `nanoinfer-bench` turns it into the token's transit time.
    //! Both ends run on one machine, so they read the same clock.

    /// Nanoseconds since the Unix epoch.
    pub fn unix_nanos() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    }

    /// A token text carrying the send time `now`.
    pub fn text(now: u128) -> String {
        format!(" @{now}")
    }

    /// The transit time in µs of a token whose text is a send stamp (spaces
    /// allowed around it), received at `now`; `None` for any other text.
    pub fn transit_us(text: &str, now: u128) -> Option<f64> {
        let sent: u128 = text.trim().strip_prefix('@')?.parse().ok()?;
        Some(now.saturating_sub(sent) as f64 / 1e3)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn stamped_tokens_give_their_transit_time() {
            assert_eq!(transit_us(&text(1_000_000), 1_250_000), Some(250.0));
            assert_eq!(transit_us("@5000", 5_000), Some(0.0));
            // A clock that went backwards reads as 0, not a huge number.
            assert_eq!(transit_us("@9000", 5_000), Some(0.0));
            for text in [" tok", "", "@", "@12x", "1000"] {
                assert_eq!(transit_us(text, 1), None, "{text:?}");
            }
        }
    }
}
