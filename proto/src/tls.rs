//! TLS for both processes (rustls with the ring provider).
//!
//! - [`ServerTls`]: a server certificate, key and optional client CA read
//!   from PEM files, read again when a file changes (checked every second),
//!   so a rotation needs no restart. A file that fails to load keeps the old
//!   configuration in force and is reported, once per change.
//! - [`incoming`]: a TCP listener turned into a stream of TLS connections
//!   for tonic's `serve_with_incoming`; each handshake runs in its own task
//!   (bounded by [`HANDSHAKE_TIMEOUT`]), so a slow or silent client never
//!   holds up the accept loop. Failures are counted
//!   ([`handshake_failures`]).
//! - [`ClusterTls`]: the cluster CA and this process's own certificate
//!   (`--cluster-ca`, `--cluster-cert`, `--cluster-key`), used by the worker
//!   to serve and by the coordinator to connect. Trust names roles, not just
//!   the CA: a worker must chain to the CA **and** name its registered id as
//!   the DNS SAN [`worker_server_name`] (`<id>.worker.nanoinfer`); a caller
//!   of a worker must chain to the CA **and** name [`COORDINATOR_NAME`]
//!   (`coordinator.nanoinfer`, checked by [`RequireClientName`]), so etcd's
//!   or another worker's certificate from the same CA gets no prompt.
//! - [`client_config`]: a tonic client configuration from a CA file and an
//!   optional client certificate (the CLI, the benchmark, the coordinator).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{
    self,
    client::danger::ServerCertVerifier,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

mod client_role;
pub use client_role::RequireClientName;

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// The DNS suffix of worker certificate names.
pub const WORKER_NAME_SUFFIX: &str = "worker.nanoinfer";

/// The DNS SAN that gives a certificate the coordinator role: a worker
/// serves only callers whose certificate chains to the cluster CA and names
/// it. Part of the same contract as [`worker_server_name`].
pub const COORDINATOR_NAME: &str = "coordinator.nanoinfer";

/// The name a worker's certificate must carry as a DNS SAN: the contract
/// between the coordinator and any PKI that issues worker certificates.
pub fn worker_server_name(id: &str) -> String {
    format!("{id}.{WORKER_NAME_SUFFIX}")
}

static HANDSHAKE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// TLS handshakes this process refused or lost as a server since it started
/// (plaintext clients, unknown certificates, timeouts); exported as a metric.
pub fn handshake_failures() -> u64 {
    HANDSHAKE_FAILURES.load(Ordering::Relaxed)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The certificates in a PEM file (at least one).
pub fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no CERTIFICATE block in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path, what)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{what} {}: no PEM private key: {e}", path.display()))
}

fn roots(path: &Path, what: &str) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path, what)? {
        store
            .add(cert)
            .map_err(|e| format!("{what} {}: not a usable CA: {e}", path.display()))?;
    }
    Ok(Arc::new(store))
}

/// What a TLS server is configured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate chaining to this CA.
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        paths.extend(self.client_ca.as_deref());
        paths
    }

    /// Reads the files into a rustls server configuration (HTTP/2 only).
    pub fn build(&self) -> Result<ServerConfig, String> {
        self.build_requiring(None)
    }

    /// [`ServerTlsFiles::build`], and when `client_name` is given a client
    /// certificate must also be valid for that DNS name (a role, see
    /// [`RequireClientName`]); that needs `client_ca`.
    pub fn build_requiring(&self, client_name: Option<&str>) -> Result<ServerConfig, String> {
        if let (None, Some(name)) = (&self.client_ca, client_name) {
            return Err(format!(
                "client certificates required to name {name} need a client CA"
            ));
        }
        let certs = load_certs(&self.cert, "certificate")?;
        let key = load_key(&self.key, "key")?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots(ca, "client CA")?, provider)
                        .build()
                        .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
                match client_name {
                    Some(name) => builder.with_client_cert_verifier(Arc::new(
                        RequireClientName::new(verifier, name)?,
                    )),
                    None => builder.with_client_cert_verifier(verifier),
                }
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            format!(
                "certificate {} with key {}: {e}",
                self.cert.display(),
                self.key.display()
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// Size and modification time of each file: what "changed" means.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(paths: &[&Path]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// A server TLS configuration that follows its files.
pub struct ServerTls {
    files: ServerTlsFiles,
    /// The DNS name client certificates must carry, if any.
    client_name: Option<String>,
    what: &'static str,
    current: RwLock<Arc<ServerConfig>>,
    seen: Mutex<Stamp>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .field("client_name", &self.client_name)
            .finish()
    }
}

impl ServerTls {
    /// Loads `files` (an error names the file and what is wrong with it);
    /// `what` names the port in logs ("public", "worker").
    pub fn load(files: ServerTlsFiles, what: &'static str) -> Result<Arc<Self>, String> {
        Self::load_with(files, None, what)
    }

    /// [`ServerTls::load`], and client certificates must also name
    /// `client_name` as a DNS SAN ([`ServerTlsFiles::build_requiring`]),
    /// after every reload too.
    pub fn load_requiring_client_name(
        files: ServerTlsFiles,
        client_name: &str,
        what: &'static str,
    ) -> Result<Arc<Self>, String> {
        Self::load_with(files, Some(client_name.to_string()), what)
    }

    fn load_with(
        files: ServerTlsFiles,
        client_name: Option<String>,
        what: &'static str,
    ) -> Result<Arc<Self>, String> {
        let seen = stamp(&files.paths());
        let config = files.build_requiring(client_name.as_deref())?;
        Ok(Arc::new(Self {
            files,
            client_name,
            what,
            current: RwLock::new(Arc::new(config)),
            seen: Mutex::new(seen),
        }))
    }

    /// The configuration new connections get.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls lock").clone()
    }

    /// Reloads when a file changed since the last look: `Ok(true)` when the
    /// new files are in force, `Err` when they changed but do not load (the
    /// old configuration stays).
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = stamp(&self.files.paths());
        {
            let mut seen = self.seen.lock().expect("tls lock");
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let config = self.files.build_requiring(self.client_name.as_deref())?;
        *self.current.write().expect("tls lock") = Arc::new(config);
        Ok(true)
    }

    /// Checks the files every [`RELOAD_INTERVAL`] and logs what happened.
    pub fn spawn_reload(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match self.reload_if_changed() {
                    Ok(false) => {}
                    Ok(true) => tracing::info!(port = self.what, cert = %self.files.cert.display(),
                        "TLS certificate reloaded"),
                    Err(e) => tracing::error!(port = self.what, error = %e,
                        "TLS files changed but do not load; the previous certificate stays in use"),
                }
            }
        })
    }
}

/// Accepts TCP connections on `listener` and yields those that complete a
/// TLS handshake with `tls`'s current configuration (no Nagle: tokens are
/// small writes that must leave at once). Ends when the consumer drops it.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            let what = tls.what;
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(port = what, %peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(port = what, %peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A client configuration trusting `ca`, presenting `identity` (cert, key)
/// when given, and expecting `domain` (the URI's host when `None`). Reads
/// and checks the files now, so a bad file is an error at start-up.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    domain: Option<String>,
) -> Result<ClientTlsConfig, String> {
    load_certs(ca, "CA")?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "CA")?));
    if let Some((cert, key)) = identity {
        load_certs(cert, "certificate")?;
        load_key(key, "key")?;
        config = config.identity(Identity::from_pem(
            read(cert, "certificate")?,
            read(key, "key")?,
        ));
    }
    if let Some(domain) = domain {
        config = config.domain_name(domain);
    }
    Ok(config)
}

/// Checks that the certificate in `cert` chains to `ca` and is valid for
/// `name`: what a client will check during the handshake, said at start-up
/// instead of as refused connections.
pub fn check_server_name(cert: &Path, ca: &Path, name: &str) -> Result<(), String> {
    let chain = load_certs(cert, "certificate")?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca, "CA")?, provider())
            .build()
            .map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|e| format!("{name:?} is not a valid DNS name: {e}"))?;
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &server_name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| {
            format!(
                "certificate {} is not valid for {name} under CA {}: {e}",
                cert.display(),
                ca.display()
            )
        })
}

/// Checks that the certificate in `cert` chains to `ca`, may be used by a
/// client, and names `name` as a DNS SAN: what a worker checks of its
/// callers ([`RequireClientName`]), said at start-up instead of as refused
/// calls.
pub fn check_client_name(cert: &Path, ca: &Path, name: &str) -> Result<(), String> {
    use rustls::server::danger::ClientCertVerifier;
    let chain = load_certs(cert, "certificate")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca, "CA")?, provider())
        .build()
        .map_err(|e| format!("CA {}: {e}", ca.display()))?;
    RequireClientName::new(verifier, name)?
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map(|_| ())
        .map_err(|e| {
            format!(
                "certificate {} is not a client certificate for {name} under CA {}: {e}",
                cert.display(),
                ca.display()
            )
        })
}

/// The cluster flags both processes take (`#[command(flatten)]`): mutual
/// TLS between the coordinator and its workers.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterTlsArgs {
    /// CA that signs every cluster certificate (PEM). With --cluster-cert
    /// and --cluster-key it turns on mutual TLS between coordinator and
    /// workers: a worker serves only clients whose certificate chains to
    /// this CA and names `coordinator.nanoinfer` as a DNS SAN; the
    /// coordinator connects only to workers whose certificate chains to it
    /// and names `<worker id>.worker.nanoinfer`.
    #[arg(long, env = "NANOINFER_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// This process's cluster certificate chain (PEM). A worker's must name
    /// `<its id>.worker.nanoinfer`, a coordinator's `coordinator.nanoinfer`
    /// (and carry clientAuth).
    #[arg(long, env = "NANOINFER_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// The private key of --cluster-cert (PEM).
    #[arg(long, env = "NANOINFER_CLUSTER_KEY")]
    pub cluster_key: Option<PathBuf>,
}

/// Validated cluster TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTls {
    /// The cluster CA.
    pub ca: PathBuf,
    /// This process's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

impl ClusterTlsArgs {
    /// `None` when no cluster flag is set; an error naming the missing flags
    /// when only some are.
    pub fn validate(self) -> Result<Option<ClusterTls>, String> {
        match (self.cluster_ca, self.cluster_cert, self.cluster_key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => {
                load_certs(&ca, "--cluster-ca")?;
                load_certs(&cert, "--cluster-cert")?;
                load_key(&key, "--cluster-key")?;
                Ok(Some(ClusterTls { ca, cert, key }))
            }
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    ("--cluster-ca", ca.is_none()),
                    ("--cluster-cert", cert.is_none()),
                    ("--cluster-key", key.is_none()),
                ]
                .into_iter()
                .filter_map(|(flag, missing)| missing.then_some(flag))
                .collect();
                Err(format!(
                    "cluster TLS needs --cluster-ca, --cluster-cert and --cluster-key together; missing {}",
                    missing.join(", ")
                ))
            }
        }
    }
}

impl ClusterTls {
    /// The worker's server files: its certificate, and the cluster CA that
    /// clients must chain to ([`ClusterTls::worker_server`] adds the role).
    pub fn server_files(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: Some(self.ca.clone()),
        }
    }

    /// The worker's port: [`ClusterTls::server_files`], serving only clients
    /// with the coordinator role ([`COORDINATOR_NAME`]), reloaded as its
    /// files change.
    pub fn worker_server(&self) -> Result<Arc<ServerTls>, String> {
        ServerTls::load_requiring_client_name(self.server_files(), COORDINATOR_NAME, "worker")
    }

    /// The coordinator's side of a connection to worker `id`.
    pub fn client_for_worker(&self, id: &str) -> Result<ClientTlsConfig, String> {
        client_config(
            &self.ca,
            Some((&self.cert, &self.key)),
            Some(worker_server_name(id)),
        )
    }

    /// Size and modification time of the three files (to notice rotation).
    pub fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        stamp(&[&self.ca, &self.cert, &self.key])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_follow_the_contract() {
        assert_eq!(worker_server_name("w1"), "w1.worker.nanoinfer");
    }

    #[test]
    fn cluster_flags_come_together() {
        assert_eq!(ClusterTlsArgs::default().validate(), Ok(None));
        let err = ClusterTlsArgs {
            cluster_ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(
            err.contains("missing --cluster-cert, --cluster-key"),
            "{err}"
        );
        let err = ClusterTlsArgs {
            cluster_ca: Some("/nonexistent/ca.pem".into()),
            cluster_cert: Some("/nonexistent/c.pem".into()),
            cluster_key: Some("/nonexistent/k.pem".into()),
        }
        .validate()
        .unwrap_err();
        assert!(
            err.starts_with("--cluster-ca /nonexistent/ca.pem:"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let dir = std::env::temp_dir().join(format!("nanoinfer-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("junk.pem");
        std::fs::write(&file, "hello").unwrap();
        let err = load_certs(&file, "CA").unwrap_err();
        assert!(err.contains("no CERTIFICATE block"), "{err}");
        let err = ServerTlsFiles {
            cert: file.clone(),
            key: file.clone(),
            client_ca: None,
        }
        .build()
        .unwrap_err();
        assert!(err.starts_with("certificate "), "{err}");
        // A role to check needs a CA to check it under.
        let err = ServerTlsFiles {
            cert: file.clone(),
            key: file.clone(),
            client_ca: None,
        }
        .build_requiring(Some(COORDINATOR_NAME))
        .unwrap_err();
        assert!(err.contains("need a client CA"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
