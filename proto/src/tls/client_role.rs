//! Roles on the worker port: a client certificate must chain to the cluster
//! CA **and** name a role as a DNS SAN ([`RequireClientName`]). Every
//! certificate of a cluster comes from one CA (workers', etcd's, the
//! coordinator's), so the CA alone says "one of ours", not "the
//! coordinator"; the name says which.

use std::sync::Arc;

use tokio_rustls::rustls::{
    self,
    client::verify_server_name,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    server::ParsedCertificate,
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
};

/// A client verifier that accepts what `inner` accepts (chain, validity,
/// `clientAuth`) and only when the end-entity certificate is valid for
/// `name` (its DNS SANs, as a client checks a server's name; the subject's
/// CN does not count). A certificate without it fails the handshake with
/// `bad_certificate`, the error naming the expected and presented names.
#[derive(Debug)]
pub struct RequireClientName {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl RequireClientName {
    /// Wraps `inner`; `name` must be a DNS name.
    pub fn new(inner: Arc<dyn ClientCertVerifier>, name: &str) -> Result<Self, String> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("{name:?} is not a valid DNS name: {e}"))?;
        Ok(Self { inner, name })
    }
}

impl ClientCertVerifier for RequireClientName {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The chain first: a stranger's certificate is refused as one, not
        // for its name.
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        verify_server_name(&ParsedCertificate::try_from(end_entity)?, &self.name)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::{CertificateError, RootCertStore};

    // Public certificates only (no keys), made once with `openssl ca`
    // (EC P-256, clientAuth like scripts/gen-certs' coordinator.pem), valid
    // from 2025 to 2125.
    /// The CA.
    const CA: &str = "\
-----BEGIN CERTIFICATE-----
MIIBpjCCAUygAwIBAgIUcqS3/Ll8pa/x4z+miMboF5iTma0wCgYIKoZIzj0EAwIw
MDESMBAGA1UECgwJbmFub2luZmVyMRowGAYDVQQDDBFuYW5vaW5mZXIgdGVzdCBD
QTAgFw0yNTAxMDEwMDAwMDBaGA8yMTI1MDEwMTAwMDAwMFowMDESMBAGA1UECgwJ
bmFub2luZmVyMRowGAYDVQQDDBFuYW5vaW5mZXIgdGVzdCBDQTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABMlM8qlShU5nVp4S85IPEUZwxbJhvXKtJYiYIjrpEmtr
sAOlmTB2YJE1QfM9LAy/qIlWapN13QtAyjvc7PMuYqyjQjBAMA8GA1UdEwEB/wQF
MAMBAf8wDgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQWBBTTxnQUSlwLi+7ySMtEtB9B
wKTPOTAKBggqhkjOPQQDAgNIADBFAiAPs3kYlIQ6LvF4o1KWnBhtxg9rARVNCbOb
biY86xx62AIhANCI2lADc8jwBc6LFnfFP7YglGVU+ruUc9Bzt3jhz9Jy
-----END CERTIFICATE-----
";
    /// From the CA, SAN `coordinator.nanoinfer`.
    const COORDINATOR: &str = "\
-----BEGIN CERTIFICATE-----
MIIB9jCCAZ2gAwIBAgIUapyC9O7dLrjLPMl94ITZv9X/uEYwCgYIKoZIzj0EAwIw
MDESMBAGA1UECgwJbmFub2luZmVyMRowGAYDVQQDDBFuYW5vaW5mZXIgdGVzdCBD
QTAgFw0yNTAxMDEwMDAwMDBaGA8yMTI1MDEwMTAwMDAwMFowKjESMBAGA1UECgwJ
bmFub2luZmVyMRQwEgYDVQQDDAtjb29yZGluYXRvcjBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABAL9jmKCvceDRiRQHM+vmrVaorYqP4qxxaiJ1WkSIwgdpdu2lqI3
pyRums0xRyz+PDFeZF4Ewkj7Z3UCDPTgM52jgZgwgZUwDAYDVR0TAQH/BAIwADAO
BgNVHQ8BAf8EBAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwIwIAYDVR0RBBkwF4IV
Y29vcmRpbmF0b3IubmFub2luZmVyMB0GA1UdDgQWBBRAOleEVZ+gC+Ru7J/Z3tuL
qwzYCTAfBgNVHSMEGDAWgBTTxnQUSlwLi+7ySMtEtB9BwKTPOTAKBggqhkjOPQQD
AgNHADBEAiBsEIqMB4WevQ3VcX1vAp/fKRgjR34G/Zs06u9p6mv7zgIgA9IdcxSW
6w1AcQ6rHOlVfCS0O/MIDzZRUYuDGECuvAg=
-----END CERTIFICATE-----
";
    /// From the CA, SAN `w2.worker.nanoinfer`.
    const WORKER: &str = "\
-----BEGIN CERTIFICATE-----
MIIB7TCCAZKgAwIBAgIUYyfxJvKOuxk9KZSMuOG/FOcT9VUwCgYIKoZIzj0EAwIw
MDESMBAGA1UECgwJbmFub2luZmVyMRowGAYDVQQDDBFuYW5vaW5mZXIgdGVzdCBD
QTAgFw0yNTAxMDEwMDAwMDBaGA8yMTI1MDEwMTAwMDAwMFowITESMBAGA1UECgwJ
bmFub2luZmVyMQswCQYDVQQDDAJ3MjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IA
BGJdEdtVqgB2HViRSAD6+9bbTg5Tjw8c3k1Ce4L2p3naVRwfImPjknYnqRBebxoF
fk+BkBUeobH5J/opFTzwh16jgZYwgZMwDAYDVR0TAQH/BAIwADAOBgNVHQ8BAf8E
BAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwIwHgYDVR0RBBcwFYITdzIud29ya2Vy
Lm5hbm9pbmZlcjAdBgNVHQ4EFgQUUHPgInjtxx+gM9GJ7PF88SRzUkIwHwYDVR0j
BBgwFoAU08Z0FEpcC4vu8kjLRLQfQcCkzzkwCgYIKoZIzj0EAwIDSQAwRgIhAORf
0rRjzQRKX1P1920gMX6lsTK1tBADFE7e/zTTx4RSAiEA2/5t927+4Wq+z6Qii3zJ
HC7f2IOgRaguzinmGg168bE=
-----END CERTIFICATE-----
";
    /// From another CA, SAN `coordinator.nanoinfer`.
    const STRANGER: &str = "\
-----BEGIN CERTIFICATE-----
MIIB8TCCAZagAwIBAgIUGfp0QxMJXqxXS5xN0RTFrK4kGWcwCgYIKoZIzj0EAwIw
KTESMBAGA1UECgwJbmFub2luZmVyMRMwEQYDVQQDDAphbm90aGVyIENBMCAXDTI1
MDEwMTAwMDAwMFoYDzIxMjUwMTAxMDAwMDAwWjAqMRIwEAYDVQQKDAluYW5vaW5m
ZXIxFDASBgNVBAMMC2Nvb3JkaW5hdG9yMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcD
QgAEM3aIxC8ER5kNmHo6A5tZeB/eQSI6supHPtyMyHzx8XG3xzh7SIna0GPbNmeU
OchgAH7zVAOmU4RrLyjy6m00XqOBmDCBlTAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB
/wQEAwIHgDATBgNVHSUEDDAKBggrBgEFBQcDAjAgBgNVHREEGTAXghVjb29yZGlu
YXRvci5uYW5vaW5mZXIwHQYDVR0OBBYEFA8Nhaa0D/J8t+OLdEqL/RlUl+OaMB8G
A1UdIwQYMBaAFFORxo94AVcW/vx/cV064tqYVwP5MAoGCCqGSM49BAMCA0kAMEYC
IQCTu63nSAgioLY+M5Y8H6FniQb9/1weIQhdvUrO4XjpGgIhAN7Q9asbrkIufL+l
cMXFoTvsKDr77Jnc6vIodUyYAMW6
-----END CERTIFICATE-----
";

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn verifier() -> RequireClientName {
        let mut roots = RootCertStore::empty();
        roots.add(der(CA)).unwrap();
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        RequireClientName::new(inner, "coordinator.nanoinfer").unwrap()
    }

    fn verify(pem: &str) -> Result<ClientCertVerified, rustls::Error> {
        verifier().verify_client_cert(&der(pem), &[], UnixTime::now())
    }

    #[test]
    fn the_role_is_required_on_top_of_the_ca() {
        let v = verifier();
        assert!(v.offer_client_auth() && v.client_auth_mandatory());
        verify(COORDINATOR).expect("the coordinator's certificate is accepted");
        // Same CA, another role: refused for its name, which the error says.
        let err = verify(WORKER).unwrap_err();
        assert!(
            matches!(
                &err,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("coordinator.nanoinfer") && text.contains("w2.worker.nanoinfer"),
            "{text}"
        );
        // The right name from another CA: refused for the chain.
        let err = verify(STRANGER).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
    }

    #[test]
    fn the_role_is_a_dns_name() {
        let err = RequireClientName::new(verifier().inner, "not a name").unwrap_err();
        assert!(err.contains("not a valid DNS name"), "{err}");
    }
}
