//! HTTP/1.1 connections (plain or TLS) to the coordinator's HTTP API and
//! metrics endpoint, and its metrics parsed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls;

/// Where an HTTP endpoint is and how to reach it.
#[derive(Clone)]
pub struct HttpTarget {
    /// `host:port` to connect to.
    pub addr: String,
    /// The `Host` header.
    pub authority: String,
    /// The URL's path, without a trailing `/`.
    pub path: String,
    pub tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl HttpTarget {
    /// `url`: `http://host:port[/path]`, `https://…` (with `tls`), or
    /// `host:port`.
    pub fn parse(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        server_name: Option<&str>,
    ) -> Result<Self, String> {
        let (https, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            Some((scheme, _)) => return Err(format!("{url}: scheme {scheme} is not http(s)")),
            None => (false, url),
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => return Err(format!("{url}: no host:port")),
        };
        let tls = match (https, tls) {
            (false, _) => None,
            (true, None) => return Err(format!("{url}: https needs --ca")),
            (true, Some(config)) => {
                let name = server_name.unwrap_or(host.trim_matches(['[', ']']));
                let name = rustls::pki_types::ServerName::try_from(name.to_string())
                    .map_err(|e| format!("{url}: server name {name}: {e}"))?;
                Some((tokio_rustls::TlsConnector::from(config), name))
            }
        };
        Ok(Self {
            addr: authority.to_string(),
            authority: authority.to_string(),
            path: path.trim_end_matches('/').to_string(),
            tls,
        })
    }

    /// An HTTP/1.1 connection, ready for one request at a time.
    pub async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(TokioIo::new(tcp)).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS to {}: {e}", self.addr))?;
                handshake(TokioIo::new(tls)).await
            }
        }
    }

    pub fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> hyper::Request<Full<Bytes>> {
        let mut request = hyper::Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = path.parse().unwrap_or_default();
        let host = self.authority.parse().expect("checked host:port");
        request.headers_mut().insert(header::HOST, host);
        request
    }
}

pub async fn handshake<I>(io: I) -> Result<SendRequest<Full<Bytes>>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// A rustls client configuration from the TLS flags (`None` without --ca).
pub fn rustls_config(
    tls: &nanoinfer::ClientTlsArgs,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    let Some(ca) = &tls.ca else { return Ok(None) };
    let mut roots = rustls::RootCertStore::empty();
    for cert in nanoinfer_proto::tls::load_certs(ca, "CA")? {
        roots
            .add(cert)
            .map_err(|e| format!("CA {}: {e}", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
            let certs = nanoinfer_proto::tls::load_certs(cert, "certificate")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// A coordinator's metrics, parsed from the Prometheus text format.
#[derive(Debug, Default)]
pub struct Metrics {
    /// `name{labels}` → value.
    pub series: BTreeMap<String, f64>,
    /// Metric names declared by `# TYPE` (a counter also as `…_total`):
    /// a family with no label set yet has no series, but is exported.
    pub declared: BTreeSet<String>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut m = Self::default();
        for line in text.lines() {
            if let Some(declaration) = line.strip_prefix("# TYPE ") {
                let mut words = declaration.split_whitespace();
                if let (Some(name), kind) = (words.next(), words.next()) {
                    if kind == Some("counter") {
                        m.declared.insert(format!("{name}_total"));
                    }
                    m.declared.insert(name.to_string());
                }
            } else if let Some((series, value)) =
                line.rsplit_once(' ').filter(|_| !line.starts_with('#'))
            {
                if let Ok(value) = value.parse() {
                    m.series.insert(series.to_string(), value);
                }
            }
        }
        m
    }

    /// Whether this coordinator exports metric `name`.
    pub fn exports(&self, name: &str) -> bool {
        self.declared.contains(name) || self.series.keys().any(|s| series_of(s, name))
    }

    /// The sum of `name` over its label sets.
    pub fn total(&self, name: &str) -> f64 {
        self.series
            .iter()
            .filter(|(series, _)| series_of(series, name))
            .map(|(_, v)| v)
            .sum()
    }

    /// `name`'s value by its `worker` label.
    pub fn by_worker(&self, name: &str) -> BTreeMap<String, f64> {
        let prefix = format!("{name}{{worker=\"");
        self.series
            .iter()
            .filter_map(|(series, v)| {
                let worker = series.strip_prefix(&prefix)?.split('"').next()?;
                Some((worker.to_string(), *v))
            })
            .collect()
    }
}

/// Whether `series` (`name{labels}`) is one of metric `name`'s.
pub fn series_of(series: &str, name: &str) -> bool {
    series
        .strip_prefix(name)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
}

pub const EJECTIONS: &str = "nanoinfer_coordinator_worker_ejections_total";
pub const READMISSIONS: &str = "nanoinfer_coordinator_worker_readmissions_total";
pub const RETRIES: &str = "nanoinfer_coordinator_retries_total";
pub const RESUMES: &str = "nanoinfer_coordinator_resumes_total";
pub const IN_FLIGHT: &str = "nanoinfer_coordinator_worker_requests_in_flight";
pub const ADMISSION_QUEUED: &str = "nanoinfer_coordinator_admission_queued_total";
pub const ADMISSION_FULL: &str = "nanoinfer_coordinator_admission_rejected_full_total";
pub const ADMISSION_TIMEOUTS: &str = "nanoinfer_coordinator_admission_timeouts_total";

pub async fn scrape(target: &HttpTarget) -> Result<Metrics, String> {
    let mut sender = target.connect().await?;
    let path = if target.path.is_empty() {
        "/metrics"
    } else {
        &target.path
    };
    let request = target.request(hyper::Method::GET, path, Bytes::new());
    let response = tokio::time::timeout(Duration::from_secs(10), async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    })
    .await
    .map_err(|_| "metrics: no answer within 10 s".to_string())?
    .map_err(|e| format!("metrics: {e}"))?;
    if !response.0.is_success() {
        return Err(format!("metrics: HTTP {}", response.0));
    }
    Ok(Metrics::parse(&String::from_utf8_lossy(&response.1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_workers() {
        let m = Metrics::parse(
            "# HELP x\n\
             # TYPE nanoinfer_coordinator_worker_ejections counter\n\
             nanoinfer_coordinator_worker_ejections_total{worker=\"w1\"} 2\n\
             nanoinfer_coordinator_worker_ejections_total{worker=\"w2\"} 1\n\
             nanoinfer_coordinator_worker_ejections_total_other 9\n\
             # TYPE nanoinfer_coordinator_retries counter\n\
             nanoinfer_coordinator_resumes_total 4\n\
             nanoinfer_coordinator_worker_requests_in_flight{worker=\"w2\"} 7\n",
        );
        assert_eq!(m.total(EJECTIONS), 3.0);
        assert_eq!(m.total(RESUMES), 4.0);
        assert_eq!(m.total(RETRIES), 0.0);
        assert_eq!(m.by_worker(IN_FLIGHT), BTreeMap::from([("w2".into(), 7.0)]));
        // Declared with no series yet, or with series, is exported; a
        // metric this coordinator lacks is not.
        assert!(m.exports(RETRIES) && m.exports(RESUMES) && m.exports(EJECTIONS));
        assert!(!m.exports(ADMISSION_QUEUED));
    }

    #[test]
    fn urls_become_targets() {
        let t = HttpTarget::parse("http://127.0.0.1:8080/v1/", None, None).unwrap();
        assert_eq!(
            (t.addr.as_str(), t.path.as_str()),
            ("127.0.0.1:8080", "/v1")
        );
        let t = HttpTarget::parse("127.0.0.1:9052", None, None).unwrap();
        assert_eq!((t.addr.as_str(), t.path.as_str()), ("127.0.0.1:9052", ""));
        assert!(HttpTarget::parse("https://127.0.0.1:8080", None, None).is_err());
        assert!(HttpTarget::parse("ftp://h:1", None, None).is_err());
        assert!(HttpTarget::parse("http://nohost", None, None).is_err());
    }
}
