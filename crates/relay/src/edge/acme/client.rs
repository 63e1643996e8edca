//! The HTTPS client instant-acme talks to the CA with: ring, the system's CAs plus
//! `--acme-ca-file`, and a connect timeout (the crate's default client would use the platform
//! verifier and no private CA).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, HttpClient};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::AcmeError;

/// TCP connect to the CA: an unreachable CA fails the attempt quickly, and the attempt is
/// retried with back-off.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Build the client.
pub fn http_client(ca_file: Option<&Path>) -> Result<Box<dyn HttpClient>, AcmeError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let bad = |m: String| AcmeError::CaFile(format!("{}: {m}", path.display()));
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificate found".to_owned()));
        }
        for c in certs {
            roots.add(c).map_err(|e| bad(e.to_string()))?;
        }
    } else if added == 0 {
        tracing::warn!("no system CA certificates found (install ca-certificates); the ACME CA cannot be reached unless --acme-ca-file is given");
    }
    let tls = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| AcmeError::CaFile(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(Box::new(
        Client::builder(TokioExecutor::new()).build::<_, BodyWrapper<Bytes>>(https),
    ))
}
