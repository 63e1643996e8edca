//! Credentials for outbound EWS and Microsoft Graph calls: the OAuth client-credentials token
//! cache (client secret or certificate) and Basic auth, plus the HTTP client all outbound calls
//! share.
//!
//! A token is fetched once and reused until shortly before it expires; concurrent callers wait
//! for the one fetch in progress instead of each asking the token endpoint. A 401 from EWS
//! invalidates the cached token so the next call fetches a fresh one (refresh once, then report).
//! A token is good for one resource only, so EWS and Graph each have their own [`Credentials`]
//! (same identity, different scope).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::HeaderValue;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::sync::Mutex;

use crate::config::{Auth, ClientCertificate, ClientCredential};

/// OAuth scope of Exchange Online's EWS (and Autodiscover): its resource's `/.default`.
pub const EWS_SCOPE: &str = "https://outlook.office365.com/.default";
/// OAuth scope of Microsoft Graph: its resource's `/.default`.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

/// `client_assertion_type` of a certificate-signed JWT (RFC 7523).
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long a client assertion is valid: Microsoft asks for 5 to 10 minutes at most; it is
/// used at once, so this only has to cover the request and modest clock skew.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

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
    /// The token endpoint could not be reached (or, very rarely, the client assertion could
    /// not be signed for want of randomness; equally worth retrying).
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

/// The relay's credentials for one resource (EWS or Graph).
pub struct Credentials {
    auth: Auth,
    /// The OAuth scope tokens are asked for, e.g. [`EWS_SCOPE`].
    scope: &'static str,
    http: reqwest::Client,
    token: Mutex<Option<Token>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("auth", &self.auth)
            .field("scope", &self.scope)
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
    /// Credentials of the given kind, fetching tokens for `scope` ([`EWS_SCOPE`],
    /// [`GRAPH_SCOPE`]) with `http`. Basic and no auth ignore the scope.
    pub fn new(auth: Auth, http: reqwest::Client, scope: &'static str) -> Arc<Self> {
        Arc::new(Self {
            auth,
            scope,
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
                credential,
            } => {
                let mut cached = self.token.lock().await;
                if let Some(t) = cached.as_ref() {
                    if Instant::now() < t.renew_at {
                        return Ok(Some(t.header.clone()));
                    }
                }
                let token = self.fetch(token_url, client_id, credential).await?;
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

    async fn fetch(
        &self,
        url: &str,
        client_id: &str,
        credential: &ClientCredential,
    ) -> Result<Token, AuthError> {
        let assertion;
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
        ];
        match credential {
            ClientCredential::Secret(secret) => form.push(("client_secret", secret.expose())),
            ClientCredential::Certificate(cert) => {
                // A fresh assertion per request: its jti must not repeat, and it expires soon.
                assertion = client_assertion(cert, client_id, url, SystemTime::now())?;
                form.push(("client_assertion_type", JWT_BEARER));
                form.push(("client_assertion", &assertion));
            }
        }
        form.push(("scope", self.scope));
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

/// The JWT that proves possession of `cert`'s key to the token endpoint `aud`, as Microsoft's
/// "certificate credentials" page describes it: header `alg` PS256, `typ` JWT, `x5t#S256`;
/// claims `aud` (the token endpoint), `iss` = `sub` = the client id, a fresh GUID `jti`,
/// `nbf`/`iat` now and `exp` [`ASSERTION_LIFETIME`] later.
pub fn client_assertion(
    cert: &ClientCertificate,
    client_id: &str,
    aud: &str,
    now: SystemTime,
) -> Result<String, AuthError> {
    let unsigned = |e| AuthError::Unreachable(format!("could not sign the client assertion: {e}"));
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = serde_json::json!({
        "alg": "PS256",
        "typ": "JWT",
        "x5t#S256": cert.thumbprint(),
    });
    let claims = serde_json::json!({
        "aud": aud,
        "iss": client_id,
        "sub": client_id,
        "jti": random_guid().map_err(unsigned)?,
        "nbf": now,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME.as_secs(),
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = cert.sign(signing_input.as_bytes()).map_err(unsigned)?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// A random (version 4) GUID, lower-case hex with dashes.
fn random_guid() -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{byte:02x}"));
    }
    Ok(s)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_cert() -> ClientCertificate {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        ClientCertificate::from_pem_files(&dir.join("client-cert.pem"), &dir.join("client-key.pem"))
            .unwrap()
    }

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn client_assertion_has_microsofts_header_and_claims_and_verifies() {
        let cert = fixture_cert();
        let aud = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token";
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let jwt = client_assertion(&cert, "app-1", aud, now).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{jwt}");

        let header = decode(parts[0]);
        assert_eq!(header["alg"], "PS256");
        assert_eq!(header["typ"], "JWT");
        let sha256 = ring::digest::digest(&ring::digest::SHA256, cert.cert_der().as_ref());
        assert_eq!(header["x5t#S256"], URL_SAFE_NO_PAD.encode(sha256));
        assert_eq!(header.as_object().unwrap().len(), 3);

        let claims = decode(parts[1]);
        assert_eq!(claims["aud"], aud);
        assert_eq!(claims["iss"], "app-1");
        assert_eq!(claims["sub"], "app-1");
        assert_eq!(claims["nbf"], 1_700_000_000u64);
        assert_eq!(claims["iat"], 1_700_000_000u64);
        assert_eq!(claims["exp"], 1_700_000_600u64);
        let jti = claims["jti"].as_str().unwrap();
        assert_eq!(jti.len(), 36, "{jti}");
        assert_eq!(jti.as_bytes()[14], b'4', "version 4 GUID: {jti}");

        let (_, x509) = x509_parser::parse_x509_certificate(cert.cert_der().as_ref()).unwrap();
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PSS_2048_8192_SHA256,
            x509.public_key().subject_public_key.data.as_ref(),
        );
        let signed = format!("{}.{}", parts[0], parts[1]);
        public
            .verify(
                signed.as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .expect("signature verifies with the certificate's public key");

        let again = client_assertion(&cert, "app-1", aud, now).unwrap();
        assert_ne!(decode(again.split('.').nth(1).unwrap())["jti"], jti);
    }

    #[test]
    fn guids_are_random_version_4() {
        let a = random_guid().unwrap();
        let b = random_guid().unwrap();
        assert_ne!(a, b);
        for g in [&a, &b] {
            let groups: Vec<usize> = g.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12], "{g}");
            assert!(matches!(g.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{g}");
        }
    }
}
