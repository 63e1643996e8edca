//! Server certificate: PEM loading, the self-signed default, and a resolver whose certificate can
//! be swapped atomically for new handshakes while open connections keep theirs.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A self-signed certificate is replaced when it has less than this left, so a relay left
/// running on defaults never starts with an expired certificate.
const SELF_SIGNED_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Lifetime of a generated self-signed certificate: a year, under the 398-day ceiling clients
/// apply to server certificates.
const SELF_SIGNED_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Server-side TLS 1.2 session cache entries, so reconnecting Exchange front ends resume
/// instead of paying a full handshake.
const SESSION_CACHE_ENTRIES: usize = 4096;

/// Why a certificate could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no PEM item of the expected kind.
    #[error("{path}: no {what} found (empty file, or not PEM)")]
    Empty {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
    },
    /// Malformed PEM.
    #[error("{path}: invalid PEM: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The key is not one rustls can sign with, or it does not match the certificate.
    #[error("{path}: {message}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Generating or storing the self-signed certificate failed.
    #[error("self-signed certificate in {dir}: {message}")]
    SelfSigned {
        /// The certificate directory.
        dir: PathBuf,
        /// What failed.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A loaded certificate with what the admin side reports about it.
#[derive(Clone)]
pub struct LoadedCert {
    /// The chain and signing key, ready for rustls.
    pub key: Arc<CertifiedKey>,
    /// Facts about the leaf certificate.
    pub info: CertInfo,
}

impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCert")
            .field("info", &self.info)
            .finish()
    }
}

/// What an operator wants to know about the served certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// Subject distinguished name.
    pub subject: String,
    /// End of validity.
    pub not_after: SystemTime,
    /// SHA-256 of the leaf certificate's DER, colon-separated hex (what browsers show).
    pub sha256: String,
    /// Whether the relay generated it.
    pub self_signed: bool,
}

/// The crypto provider used everywhere: ring, with its default suites, which are all AEAD
/// (AES-GCM and ChaCha20-Poly1305 with ECDHE); rustls implements no CBC or RC4 suites.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Load an operator-supplied PEM chain and key, checking that they belong together.
pub fn load_pem(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, TlsError> {
    let cert_pem = read(cert_path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: cert_path.to_owned(),
            what: "certificate",
        });
    }
    let key_pem = read(key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            path: key_path.to_owned(),
            what: "private key",
        },
        e => TlsError::Pem {
            path: key_path.to_owned(),
            message: e.to_string(),
        },
    })?;
    certified(certs, key, key_path, false)
}

fn certified(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    key_path: &Path,
    self_signed: bool,
) -> Result<LoadedCert, TlsError> {
    let info = cert_info(&certs[0], self_signed).map_err(|message| TlsError::Pem {
        path: key_path.with_extension("(certificate)"),
        message,
    })?;
    let key = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsError::Key {
        path: key_path.to_owned(),
        message: match e {
            rustls::Error::InconsistentKeys(_) => {
                "private key does not match the certificate".to_owned()
            }
            e => format!("unusable private key: {e}"),
        },
    })?;
    Ok(LoadedCert {
        key: Arc::new(key),
        info,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Subject, expiry and fingerprint of a DER certificate.
pub fn cert_info(der: &CertificateDer<'_>, self_signed: bool) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let not_after = cert.validity().not_after.timestamp();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    let sha256 = digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        not_after,
        sha256,
        self_signed,
    })
}

/// Paths of the self-signed pair for `hostname` under `dir`.
pub fn self_signed_paths(dir: &Path, hostname: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("self-signed-{hostname}.crt.pem")),
        dir.join(format!("self-signed-{hostname}.key.pem")),
    )
}

/// Reuse the self-signed pair for `hostname` under `dir`, or generate it (ECDSA P-256, key file
/// mode 0600) when missing, unreadable or close to expiry.
pub fn self_signed(dir: &Path, hostname: &str) -> Result<LoadedCert, TlsError> {
    let (cert_path, key_path) = self_signed_paths(dir, hostname);
    if cert_path.exists() && key_path.exists() {
        match load_pem(&cert_path, &key_path) {
            Ok(mut loaded) => {
                let left = loaded
                    .info
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                if left > SELF_SIGNED_RENEW_BEFORE {
                    loaded.info.self_signed = true;
                    return Ok(loaded);
                }
                tracing::info!(cert = %cert_path.display(), "self-signed certificate expires soon; generating a new one");
            }
            Err(e) => {
                tracing::warn!(error = %e, "stored self-signed certificate unusable; generating a new one")
            }
        }
    }
    let err = |message: String| TlsError::SelfSigned {
        dir: dir.to_owned(),
        message,
    };
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| err(e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(vec![hostname.to_owned()]).map_err(|e| err(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + SELF_SIGNED_LIFETIME;
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| err(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    write_atomic(&key_path, key_pair.serialize_pem().as_bytes(), 0o600)
        .map_err(|e| err(format!("{}: {e}", key_path.display())))?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)
        .map_err(|e| err(format!("{}: {e}", cert_path.display())))?;
    let key = PrivateKeyDer::try_from(key_pair.serialize_der()).map_err(|e| err(e.to_string()))?;
    certified(vec![cert.der().clone()], key, &key_path, true)
}

/// Write via a temporary file and rename, so a crash never leaves half a key behind and the key
/// is never readable by others, not even briefly.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Serves the current certificate to every handshake; `store` swaps it for later handshakes.
pub struct CertResolver {
    current: ArcSwap<LoadedCert>,
    /// When an ACME CA issues the certificate: how that stands (for the status page).
    acme: std::sync::OnceLock<Arc<crate::edge::acme::AcmeState>>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("current", &self.current.load().info)
            .finish()
    }
}

impl CertResolver {
    /// Start with `cert`.
    pub fn new(cert: LoadedCert) -> Self {
        Self {
            current: ArcSwap::from_pointee(cert),
            acme: std::sync::OnceLock::new(),
        }
    }

    /// Say that an ACME CA issues the certificates this resolver serves.
    pub fn set_acme(&self, state: Arc<crate::edge::acme::AcmeState>) {
        let _ = self.acme.set(state);
    }

    /// How ACME issuance stands, when the certificate comes from an ACME CA.
    pub fn acme(&self) -> Option<crate::edge::acme::AcmeStatus> {
        self.acme.get().map(|s| s.snapshot())
    }

    /// Replace the certificate for new handshakes.
    pub fn store(&self, cert: LoadedCert) {
        self.current.store(Arc::new(cert));
    }

    /// The certificate being served.
    pub fn current(&self) -> Arc<LoadedCert> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

/// Build the server configuration: TLS 1.3 and 1.2 only, ALPN h2 and http/1.1, session
/// resumption by cache (1.2) and tickets (1.3).
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}
