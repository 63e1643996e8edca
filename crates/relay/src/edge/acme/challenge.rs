//! TLS-ALPN-01 (RFC 8737): the challenge certificates for pending authorizations, and the
//! handshake that presents one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::PrivateKeyDer;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

/// The ALPN protocol a validation server offers, alone (RFC 8737 section 3).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

type Certs = Arc<RwLock<HashMap<String, Arc<CertifiedKey>>>>;

/// Challenge certificates by domain, while authorizations are pending.
pub struct Challenges {
    certs: Certs,
    /// Fast check on every accept: false whenever `certs` is empty, so the accept path is
    /// exactly the usual one outside an order.
    pending: AtomicBool,
    /// ALPN `acme-tls/1` only, certificate chosen by SNI from `certs`.
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish()
    }
}

/// Why a challenge certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    /// rcgen refused the parameters or key.
    #[error("challenge certificate for {domain}: {source}")]
    Generate {
        /// The domain.
        domain: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// rustls refused the key.
    #[error("challenge certificate for {domain}: {source}")]
    Key {
        /// The domain.
        domain: String,
        /// rustls's error.
        source: rustls::Error,
    },
}

impl Challenges {
    /// No challenge pending.
    pub fn new() -> Result<Self, rustls::Error> {
        let certs = Certs::default();
        let mut config = ServerConfig::builder_with_provider(crate::crypto::provider())
            // RFC 8737 section 4: TLS 1.2 or later; validation servers offer 1.3 today.
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(certs.clone())));
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        Ok(Self {
            certs,
            pending: AtomicBool::new(false),
            config: Arc::new(config),
        })
    }

    /// Whether any authorization is waiting for validation.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Present a certificate for `domain` carrying the SHA-256 `digest` of the key
    /// authorization, until [`Challenges::clear`].
    pub fn insert(&self, domain: &str, digest: &[u8]) -> Result<(), ChallengeError> {
        let generate = |source| ChallengeError::Generate {
            domain: domain.to_owned(),
            source,
        };
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let mut params =
            rcgen::CertificateParams::new(vec![domain.to_owned()]).map_err(generate)?;
        // The acmeIdentifier extension (1.3.6.1.5.5.7.1.31), critical, as RFC 8737 requires.
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
        let cert = params.self_signed(&key).map_err(generate)?;
        let der =
            PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| ChallengeError::Key {
                domain: domain.to_owned(),
                source: rustls::Error::General(e.to_owned()),
            })?;
        // Not `CertifiedKey::from_der`: its key check parses the certificate with webpki,
        // which refuses the critical acmeIdentifier extension it does not know.
        let signing = crate::crypto::provider()
            .key_provider
            .load_private_key(der)
            .map_err(|source| ChallengeError::Key {
                domain: domain.to_owned(),
                source,
            })?;
        let certified = CertifiedKey::new(vec![cert.der().clone()], signing);
        let mut certs = self.certs.write().unwrap_or_else(|e| e.into_inner());
        certs.insert(domain.to_ascii_lowercase(), Arc::new(certified));
        self.pending.store(true, Ordering::Release);
        Ok(())
    }

    /// Forget every challenge: the order is over, whatever its outcome.
    pub fn clear(&self) {
        let mut certs = self.certs.write().unwrap_or_else(|e| e.into_inner());
        certs.clear();
        self.pending.store(false, Ordering::Release);
    }

    /// Whether `hello` is a validation server's: ALPN exactly `acme-tls/1` and SNI a pending
    /// domain. Anything else is not answered with a challenge certificate.
    pub fn is_validation(&self, hello: &ClientHello<'_>) -> bool {
        let mut alpn = match hello.alpn() {
            Some(a) => a,
            None => return false,
        };
        if alpn.next() != Some(ACME_TLS_ALPN) || alpn.next().is_some() {
            return false;
        }
        let Some(name) = hello.server_name() else {
            return false;
        };
        let certs = self.certs.read().unwrap_or_else(|e| e.into_inner());
        certs.contains_key(&name.to_ascii_lowercase())
    }

    /// The configuration that presents the challenge certificates.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }
}

struct Resolver(Certs);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("acme::Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        let certs = self.0.read().unwrap_or_else(|e| e.into_inner());
        certs.get(&name).cloned()
    }
}

/// What a handshake read while challenges are pending turned out to be.
pub enum Handshake {
    /// A validation server's: answered with the challenge certificate and closed.
    Answered,
    /// Anything else, from an address the allow-list refuses: dropped before any certificate
    /// was sent.
    Refused,
    /// Anything else, from an admitted address: the usual handshake, completed.
    Served(Box<TlsStream<TcpStream>>),
}

/// Read the ClientHello first, then answer a validation server with its challenge certificate,
/// or go on with the usual configuration `usual` when the peer is `admitted`.
pub async fn accept(
    stream: TcpStream,
    challenges: &Challenges,
    usual: &Arc<ServerConfig>,
    admitted: bool,
) -> std::io::Result<Handshake> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
    if challenges.is_validation(&start.client_hello()) {
        let mut tls = start.into_stream(challenges.config()).await?;
        // The validation server only looks at the certificate; close politely.
        let _ = tls.shutdown().await;
        return Ok(Handshake::Answered);
    }
    if !admitted {
        return Ok(Handshake::Refused);
    }
    let tls = start.into_stream(usual.clone()).await?;
    Ok(Handshake::Served(Box::new(tls)))
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::DigitallySignedStruct;
    use tokio::net::TcpListener;

    /// The validation server checks the certificate itself, not a chain.
    #[derive(Debug)]
    struct AnyCert;

    impl ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            crate::crypto::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// Connect with `alpn` and `sni`; the server side runs [`accept`] with `admitted`.
    /// Returns the server's verdict and the certificate the client saw, if any.
    async fn exchange(
        challenges: &Challenges,
        alpn: &[&[u8]],
        sni: &str,
        admitted: bool,
    ) -> (&'static str, Option<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert))
            .with_no_client_auth();
        client.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let sni = ServerName::try_from(sni.to_owned()).unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(sni, tcp)
                .await
                .ok()?;
            Some(tls.get_ref().1.peer_certificates()?[0].to_vec())
        });
        let (stream, _) = listener.accept().await.unwrap();
        let usual = crate::edge::tls::server_config(Arc::new(crate::edge::tls::CertResolver::new(
            crate::edge::tls::self_signed(tempfile::tempdir().unwrap().path(), "usual").unwrap(),
        )))
        .unwrap();
        let verdict = match accept(stream, challenges, &usual, admitted).await {
            Ok(Handshake::Answered) => "answered",
            Ok(Handshake::Refused) => "refused",
            Ok(Handshake::Served(_)) => "served",
            Err(_) => "error",
        };
        (verdict, client.await.unwrap())
    }

    #[tokio::test]
    async fn only_a_validation_hello_for_a_pending_name_gets_the_challenge_certificate() {
        let challenges = Challenges::new().unwrap();
        let digest = [7u8; 32];
        challenges.insert("relay.example.com", &digest).unwrap();
        assert!(challenges.pending());

        let (verdict, cert) =
            exchange(&challenges, &[ACME_TLS_ALPN], "relay.example.com", false).await;
        assert_eq!(verdict, "answered");
        let cert = cert.expect("client saw the challenge certificate");
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // An OCTET STRING holding the 32-byte digest.
        assert_eq!(&ext.value[2..], &digest);

        // From outside the allow-list, anything else gets no certificate at all.
        for (alpn, sni) in [
            (&[b"h2".as_slice(), b"http/1.1"][..], "relay.example.com"),
            (&[ACME_TLS_ALPN, b"http/1.1"][..], "relay.example.com"),
            (&[ACME_TLS_ALPN][..], "other.example.com"),
            (&[][..], "relay.example.com"),
        ] {
            let (verdict, cert) = exchange(&challenges, alpn, sni, false).await;
            assert_eq!(
                (verdict, cert.is_some()),
                ("refused", false),
                "{alpn:?} {sni}"
            );
        }
        // From an admitted address, the usual handshake goes on.
        let (verdict, cert) =
            exchange(&challenges, &[b"http/1.1"], "relay.example.com", true).await;
        assert_eq!(verdict, "served");
        assert!(cert.is_some());

        challenges.clear();
        assert!(!challenges.pending());
        let (verdict, _) =
            exchange(&challenges, &[ACME_TLS_ALPN], "relay.example.com", false).await;
        assert_eq!(verdict, "refused");
    }
}
