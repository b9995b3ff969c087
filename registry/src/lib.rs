//! etcd registry shared by workers and the coordinator.
//!
//! # Layout
//! - [`schema`]: the one definition of the key layout (`/nanoinfer/workers/<id>`)
//!   and of the JSON value a worker publishes ([`WorkerInfo`]).
//! - [`registration`]: worker side — a lease, a keep-alive task that re-registers
//!   after a lost lease, and revocation on graceful shutdown.
//! - [`discovery`]: coordinator side — list the prefix, watch from the next
//!   revision, keep the last known set while etcd is unreachable.

#![forbid(unsafe_code)]

pub mod discovery;
pub mod registration;
pub mod schema;

pub use discovery::{spawn_discovery, Discovery, DiscoveryStatus, WorkerSet};
pub use registration::Registration;
pub use schema::{validate_address, Capacity, WorkerInfo, WORKERS_PREFIX};

use std::time::Duration;

/// The etcd flags both processes take (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long = "etcd-endpoints",
        env = "NANOINFER_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,
}

impl EtcdArgs {
    /// The endpoints, or an error naming the flag when there are none.
    pub fn validate(self) -> Result<Vec<String>, String> {
        let endpoints: Vec<String> = self
            .endpoints
            .into_iter()
            .filter(|e| !e.trim().is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err("--etcd-endpoints must name at least one endpoint".into());
        }
        Ok(endpoints)
    }
}

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// An etcd request failed (unreachable, timed out, rejected).
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// A worker value is not valid JSON for [`WorkerInfo`].
    #[error("worker value at {key}: {source}")]
    Value {
        /// The etcd key whose value is malformed.
        key: String,
        /// The decoding error.
        source: serde_json::Error,
    },
    /// A configuration value is out of range.
    #[error("{0}")]
    Config(String),
    /// The worker's lease was lost or its keep-alive went unanswered.
    #[error("lease: {0}")]
    Lease(String),
    /// The discovery watch ended or was cancelled by etcd.
    #[error("watch: {0}")]
    Watch(String),
}

/// How long a single etcd connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one etcd request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to etcd with bounded connect and request timeouts, so a dead
/// endpoint never hangs the caller.
pub async fn connect(endpoints: &[String]) -> Result<etcd_client::Client, RegistryError> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    Ok(etcd_client::Client::connect(endpoints, Some(options)).await?)
}
