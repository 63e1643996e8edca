//! Credentials for outbound EWS calls: the OAuth client-credentials token cache and Basic auth,
//! plus the HTTP client all outbound calls share.
//!
//! A token is fetched once and reused until shortly before it expires; concurrent callers wait
//! for the one fetch in progress instead of each asking the token endpoint. A 401 from EWS
//! invalidates the cached token so the next call fetches a fresh one (refresh once, then report).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::sync::Mutex;

use crate::config::{Auth, Secret};

/// A token is renewed this long before Microsoft says it expires, so a request never leaves
/// with a token that dies on the way.
const RENEW_BEFORE_EXPIRY: Duration = Duration::from_secs(300);
/// Whole-request limit for outbound calls (token, Autodiscover, EWS); Exchange answers a
/// Subscribe in well under a second unless it is in trouble.
pub const OUTBOUND_TIMEOUT: Duration = Duration::from_secs(60);
/// TCP+TLS connect limit for outbound calls.
const OUTBOUND_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A token endpoint answer larger than this is not a token.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// Why credentials could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token endpoint could not be reached.
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    /// The token endpoint refused (wrong client id/secret, app not consented, …).
    #[error("token endpoint refused: HTTP {status}: {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// `error` and `error_description` from the answer.
        detail: String,
    },
    /// The answer was not a token.
    #[error("token endpoint answered something that is not a token: {0}")]
    Malformed(String),
}

/// Why the HTTP client for outbound calls could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    /// The extra CA file could not be read or is not PEM.
    #[error("{path}: {source}")]
    CaFile {
        /// The CA file.
        path: std::path::PathBuf,
        /// What the PEM reader reported.
        source: rustls_pki_types::pem::Error,
    },
    /// The extra CA file holds no certificate.
    #[error("{path}: no certificate found (empty file, or not PEM)")]
    CaFileEmpty {
        /// The CA file.
        path: std::path::PathBuf,
    },
    /// A certificate in the CA file is not usable as a trust anchor.
    #[error("{path}: not a usable CA certificate: {source}")]
    CaCertificate {
        /// The CA file.
        path: std::path::PathBuf,
        /// What rustls reported.
        source: rustls::Error,
    },
    /// rustls refused the client configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    /// reqwest could not build the client.
    #[error("HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

impl HttpClientError {
    /// Whether the CA file named by a flag is at fault (a configuration error), rather than
    /// the environment.
    pub fn is_ca_file(&self) -> bool {
        matches!(
            self,
            HttpClientError::CaFile { .. }
                | HttpClientError::CaFileEmpty { .. }
                | HttpClientError::CaCertificate { .. }
        )
    }
}

/// Build the HTTP client for outbound calls: the system's trusted roots plus `ca_file`, our
/// ring-based rustls configuration (TLS 1.2+), HTTPS_PROXY honoured by reqwest.
pub fn http_client(ca_file: Option<&Path>) -> Result<reqwest::Client, HttpClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|source| HttpClientError::CaFile {
                path: path.to_owned(),
                source,
            })?;
        if certs.is_empty() {
            return Err(HttpClientError::CaFileEmpty {
                path: path.to_owned(),
            });
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|source| HttpClientError::CaCertificate {
                    path: path.to_owned(),
                    source,
                })?;
        }
    } else if added == 0 {
        tracing::warn!("no system CA certificates found (install ca-certificates); outbound HTTPS will fail unless --ews-ca-file is given");
    }
    let tls = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(HttpClientError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(OUTBOUND_TIMEOUT)
        .connect_timeout(OUTBOUND_CONNECT_TIMEOUT)
        .user_agent(concat!("ews-relay/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

struct Token {
    header: HeaderValue,
    renew_at: Instant,
}

/// The relay's credentials for EWS.
pub struct Credentials {
    auth: Auth,
    http: reqwest::Client,
    token: Mutex<Option<Token>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    token_type: Option<String>,
}

#[derive(serde::Deserialize, Default)]
struct TokenError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl Credentials {
    /// Credentials of the given kind, fetching tokens with `http`.
    pub fn new(auth: Auth, http: reqwest::Client) -> Arc<Self> {
        Arc::new(Self {
            auth,
            http,
            token: Mutex::new(None),
        })
    }

    /// Add the credentials to an outbound request.
    pub async fn apply(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, AuthError> {
        Ok(match &self.auth {
            Auth::None => req,
            Auth::Basic { username, password } => req.basic_auth(username, Some(password.expose())),
            Auth::OAuth { .. } => match self.bearer().await? {
                Some(h) => req.header(http::header::AUTHORIZATION, h),
                None => req,
            },
        })
    }

    /// The cached or freshly fetched Bearer header (OAuth only).
    async fn bearer(&self) -> Result<Option<HeaderValue>, AuthError> {
        match &self.auth {
            Auth::None | Auth::Basic { .. } => Ok(None),
            Auth::OAuth {
                token_url,
                client_id,
                secret,
            } => {
                let mut cached = self.token.lock().await;
                if let Some(t) = cached.as_ref() {
                    if Instant::now() < t.renew_at {
                        return Ok(Some(t.header.clone()));
                    }
                }
                let token = self.fetch(token_url, client_id, secret).await?;
                let header = token.header.clone();
                *cached = Some(token);
                Ok(Some(header))
            }
        }
    }

    /// Whether fresh credentials may cure a 401: an OAuth token can be fetched again, a Basic
    /// password cannot (sending it again only counts towards the account's lockout).
    pub fn refreshable(&self) -> bool {
        matches!(self.auth, Auth::OAuth { .. })
    }

    /// Forget the cached token (EWS answered 401 with it).
    pub async fn invalidate(&self) {
        *self.token.lock().await = None;
    }

    async fn fetch(&self, url: &str, client_id: &str, secret: &Secret) -> Result<Token, AuthError> {
        // The scope is the EWS resource of the token's audience; Exchange Online's is fixed.
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret.expose()),
            ("scope", "https://outlook.office365.com/.default"),
        ];
        let started = Instant::now();
        let resp = self
            .http
            .post(url)
            .form(&form)
            .send()
            .await
            .map_err(|e| AuthError::Unreachable(without_url_secrets(&e.to_string())))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| AuthError::Unreachable(e.to_string()))?;
        if body.len() > MAX_TOKEN_RESPONSE {
            return Err(AuthError::Malformed(format!("{} bytes", body.len())));
        }
        if !status.is_success() {
            let e: TokenError = serde_json::from_slice(&body).unwrap_or_default();
            return Err(AuthError::Refused {
                status: status.as_u16(),
                detail: format!("{} {}", e.error, first_line(&e.error_description)),
            });
        }
        let answer: TokenAnswer =
            serde_json::from_slice(&body).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if answer
            .token_type
            .as_deref()
            .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
        {
            return Err(AuthError::Malformed("token_type is not Bearer".into()));
        }
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600));
        // Renew before expiry; for very short lifetimes (tests, odd servers) at half-life.
        let renew_in = lifetime
            .checked_sub(RENEW_BEFORE_EXPIRY)
            .filter(|d| *d >= lifetime / 2)
            .unwrap_or(lifetime / 2);
        let mut header =
            HeaderValue::try_from(format!("Bearer {}", answer.access_token)).map_err(|_| {
                AuthError::Malformed("token has characters not allowed in a header".into())
            })?;
        header.set_sensitive(true);
        tracing::debug!(lifetime_s = lifetime.as_secs(), "OAuth token fetched");
        Ok(Token {
            header,
            renew_at: started + renew_in,
        })
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// reqwest errors include the URL; ours carry no secrets in URLs, but strip any query anyway.
fn without_url_secrets(s: &str) -> String {
    match s.find('?') {
        Some(i) => format!("{}?…", &s[..i]),
        None => s.to_owned(),
    }
}
