//! etcd registry shared by workers and the coordinator.
//!
//! # Layout
//! - [`schema`]: the one definition of the key layout (`/nanoinfer/workers/<id>`)
//!   and of the JSON value a worker publishes ([`WorkerInfo`]).
//! - [`registration`]: worker side — claim the key with a transaction (never
//!   over another live lease), a keep-alive task that re-registers after a
//!   lost lease and repairs the record when it is overwritten or deleted,
//!   and revocation on graceful shutdown.
//! - [`discovery`]: coordinator side — list the prefix, watch from the next
//!   revision, keep the last known set while etcd is unreachable.

#![forbid(unsafe_code)]

pub mod discovery;
pub mod registration;
pub mod schema;

pub use discovery::{spawn_discovery, Discovery, DiscoveryStatus, WorkerSet};
pub use registration::Registration;
pub use schema::{validate_address, Capacity, WorkerInfo, WORKERS_PREFIX};

use std::path::PathBuf;
use std::time::Duration;

/// The etcd flags both processes take (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated. Use `https://` endpoints with
    /// --etcd-ca.
    #[arg(
        long = "etcd-endpoints",
        env = "NANOINFER_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,
    /// CA (PEM) that signs etcd's server certificate; turns on TLS to etcd.
    #[arg(long, env = "NANOINFER_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's --client-cert-auth (with
    /// --etcd-key and --etcd-ca).
    #[arg(long, env = "NANOINFER_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long, env = "NANOINFER_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd's auth; with --etcd-password-file).
    #[arg(long, env = "NANOINFER_ETCD_USERNAME", requires = "etcd_password_file")]
    pub etcd_username: Option<String>,
    /// File holding the etcd user's password (trailing newline ignored).
    #[arg(long, env = "NANOINFER_ETCD_PASSWORD_FILE", requires = "etcd_username")]
    pub etcd_password_file: Option<PathBuf>,
}

/// How to reach etcd: endpoints, TLS and credentials.
#[derive(Clone, Default)]
pub struct EtcdConfig {
    /// Endpoints (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// TLS settings, when etcd serves TLS.
    pub tls: Option<etcd_client::TlsOptions>,
    /// User and password, when etcd has auth enabled.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdConfig {
    // Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl EtcdConfig {
    /// Plaintext, no auth.
    pub fn plain(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            ..Self::default()
        }
    }
}

fn read(path: &std::path::Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

impl EtcdArgs {
    /// The settings, or an error naming the flag at fault.
    pub fn validate(self) -> Result<EtcdConfig, String> {
        let endpoints: Vec<String> = self
            .endpoints
            .into_iter()
            .filter(|e| !e.trim().is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err("--etcd-endpoints must name at least one endpoint".into());
        }
        let tls = match &self.etcd_ca {
            Some(ca) => {
                if let Some(e) = endpoints.iter().find(|e| e.starts_with("http://")) {
                    return Err(format!(
                        "--etcd-endpoints {e}: use https:// endpoints with --etcd-ca"
                    ));
                }
                let mut tls = etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(ca, "--etcd-ca")?));
                if let (Some(cert), Some(key)) = (&self.etcd_cert, &self.etcd_key) {
                    tls = tls.identity(etcd_client::Identity::from_pem(
                        read(cert, "--etcd-cert")?,
                        read(key, "--etcd-key")?,
                    ));
                }
                Some(tls)
            }
            None => {
                if let Some(e) = endpoints.iter().find(|e| e.starts_with("https://")) {
                    return Err(format!("--etcd-endpoints {e}: https:// needs --etcd-ca"));
                }
                None
            }
        };
        let user = match (self.etcd_username, self.etcd_password_file) {
            (Some(user), Some(file)) => {
                let password = String::from_utf8(read(&file, "--etcd-password-file")?)
                    .map_err(|_| format!("--etcd-password-file {}: not UTF-8", file.display()))?;
                let password = password.trim_end_matches(['\n', '\r']).to_string();
                if password.is_empty() {
                    return Err(format!(
                        "--etcd-password-file {}: the file is empty",
                        file.display()
                    ));
                }
                Some((user, password))
            }
            _ => None,
        };
        Ok(EtcdConfig {
            endpoints,
            tls,
            user,
        })
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
    /// A key kept changing between reading it and writing it.
    #[error("contended: {0}")]
    Contended(String),
    /// Another live process holds this worker id: its record is attached to
    /// a lease that is kept alive.
    #[error("worker id {id:?} is in use: {key} is held by etcd lease {lease} (hex {lease:x}), which another process keeps alive; stop that worker or give this one another --id")]
    IdInUse {
        /// The worker id.
        id: String,
        /// Its key.
        key: String,
        /// The lease holding the key.
        lease: i64,
    },
}

/// How long a single etcd connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one etcd request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to etcd with bounded connect and request timeouts, so a dead
/// endpoint never hangs the caller.
/// With credentials, the auth token is renewed when etcd says it expired.
pub async fn connect(etcd: &EtcdConfig) -> Result<etcd_client::Client, RegistryError> {
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    if let Some(tls) = &etcd.tls {
        options = options.with_tls(tls.clone());
    }
    if let Some((user, password)) = &etcd.user {
        options = options
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    Ok(etcd_client::Client::connect(&etcd.endpoints, Some(options)).await?)
}
