//! Credentials for outbound calls (EWS, Autodiscover, Microsoft Graph): `--auth` and its
//! companions → [`Auth`]. Shared by managed EWS and managed Graph, which use one identity.

use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::RsaKeyPair;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::parse::*;
use super::*;

/// The credentials `--auth` names, with their secrets read from files or the environment.
pub(super) fn auth(args: &Args) -> Result<Auth, ConfigError> {
    Ok(match args.auth {
        AuthKind::None => Auth::None,
        AuthKind::Basic => {
            let username = args
                .username
                .clone()
                .ok_or_else(|| ConfigError::new("--username", "required with --auth basic"))?;
            let password = secret(
                "--password-file",
                args.password_file.as_deref(),
                "EWS_RELAY_PASSWORD",
            )?
            .ok_or_else(|| {
                ConfigError::new(
                    "--password-file",
                    "--auth basic needs the password in --password-file or EWS_RELAY_PASSWORD",
                )
            })?;
            Auth::Basic { username, password }
        }
        AuthKind::Oauth => {
            let client_id = args.client_id.clone().ok_or_else(|| {
                ConfigError::new("--client-id", "required with --auth oauth (the default)")
            })?;
            let token_url = match (&args.oauth_token_url, &args.tenant_id) {
                (Some(u), _) => parse_https_url("--oauth-token-url", u, true)?,
                (None, Some(t))
                    if !t.is_empty()
                        && t.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) =>
                {
                    format!("https://login.microsoftonline.com/{t}/oauth2/v2.0/token")
                }
                (None, Some(t)) => {
                    return Err(ConfigError::new(
                        "--tenant-id",
                        format!("'{t}' is not a tenant id or domain"),
                    ))
                }
                (None, None) => {
                    return Err(ConfigError::new(
                        "--tenant-id",
                        "required with --auth oauth (or give --oauth-token-url)",
                    ))
                }
            };
            Auth::OAuth {
                token_url,
                client_id,
                credential: client_credential(args)?,
            }
        }
    })
}

/// How the application proves who it is to the token endpoint.
#[derive(Debug, Clone)]
pub enum ClientCredential {
    /// A client secret (`--client-secret-file` or `EWS_RELAY_CLIENT_SECRET`).
    Secret(Secret),
    /// A certificate registered with the application (`--client-certificate`): each token
    /// request carries a JWT signed with its key instead of a secret, which never leaves the
    /// relay's host.
    Certificate(ClientCertificate),
}

/// A client certificate and its RSA private key, checked at start-up to belong together.
#[derive(Clone)]
pub struct ClientCertificate {
    /// The certificate (DER), as uploaded to the application's registration.
    cert_der: CertificateDer<'static>,
    /// Base64url SHA-256 of `cert_der`: the assertion's `x5t#S256`, by which Entra ID picks
    /// the certificate among the application's.
    thumbprint: String,
    /// The private key: a secret, so never printed and only reachable through [`Self::sign`].
    key: Arc<RsaKeyPair>,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("thumbprint", &self.thumbprint)
            .field("key", &"***")
            .finish()
    }
}

impl ClientCertificate {
    /// The certificate in `cert` (PEM, the first one) and its RSA key in `key` (PEM, PKCS#8
    /// or PKCS#1); an error names the flag whose file is at fault.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, ConfigError> {
        const CERT: &str = "--client-certificate";
        const KEY: &str = "--client-certificate-key";
        let cert_der = CertificateDer::from_pem_file(cert)
            .map_err(|e| ConfigError::new(CERT, format!("{}: {}", cert.display(), pem_error(e))))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert_der.as_ref()).map_err(|e| {
            ConfigError::new(
                CERT,
                format!("{}: not an X.509 certificate: {e}", cert.display()),
            )
        })?;
        let spki = parsed.public_key();
        if !matches!(
            spki.parsed(),
            Ok(x509_parser::public_key::PublicKey::RSA(_))
        ) {
            return Err(ConfigError::new(
                CERT,
                format!(
                    "{}: not an RSA certificate (Entra ID client assertions are signed with RSA)",
                    cert.display()
                ),
            ));
        }
        // The key's file names the key type; the message never shows the key itself.
        let key_pair = match PrivateKeyDer::from_pem_file(key)
            .map_err(|e| ConfigError::new(KEY, format!("{}: {}", key.display(), pem_error(e))))?
        {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => {
                return Err(ConfigError::new(
                    KEY,
                    format!("{}: not an RSA private key", key.display()),
                ))
            }
        }
        .map_err(|e| {
            ConfigError::new(
                KEY,
                format!("{}: not a usable RSA private key ({e})", key.display()),
            )
        })?;
        // Both hold the RSAPublicKey DER; ring and X.509 encode it the same (canonical DER).
        if key_pair.public().as_ref() != spki.subject_public_key.data.as_ref() {
            return Err(ConfigError::new(
                KEY,
                format!(
                    "{} is not the private key of {} (their public keys differ)",
                    key.display(),
                    cert.display()
                ),
            ));
        }
        if !parsed.validity().is_valid() {
            tracing::warn!(
                "--client-certificate {}: outside its validity period ({} to {}); Entra ID refuses assertions signed with it",
                cert.display(),
                parsed.validity().not_before,
                parsed.validity().not_after
            );
        }
        let thumbprint = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            cert_der.as_ref(),
        ));
        Ok(Self {
            cert_der,
            thumbprint,
            key: Arc::new(key_pair),
        })
    }

    /// The certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Base64url SHA-256 thumbprint of the certificate (`x5t#S256`).
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// Sign `message` with RSASSA-PSS and SHA-256 (JWS `PS256`).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, ring::error::Unspecified> {
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key.sign(
            &ring::signature::RSA_PSS_SHA256,
            &ring::rand::SystemRandom::new(),
            message,
            &mut signature,
        )?;
        Ok(signature)
    }
}

/// A PEM reader's complaint in words; "no items found" means the file holds no such block.
fn pem_error(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM block of that kind found".into(),
        e => e.to_string(),
    }
}

/// `--auth oauth`'s credential: a client secret or a certificate, exactly one.
fn client_credential(args: &Args) -> Result<ClientCredential, ConfigError> {
    let secret = secret(
        "--client-secret-file",
        args.client_secret_file.as_deref(),
        "EWS_RELAY_CLIENT_SECRET",
    )?;
    let certificate = match (&args.client_certificate, &args.client_certificate_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (Some(_), None) => {
            return Err(ConfigError::new(
                "--client-certificate-key",
                "required with --client-certificate (the certificate's private key, PEM)",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "--client-certificate",
                "required with --client-certificate-key (the certificate it belongs to, PEM)",
            ))
        }
        (None, None) => None,
    };
    match (secret, certificate) {
        (Some(secret), None) => Ok(ClientCredential::Secret(secret)),
        (None, Some((cert, key))) => Ok(ClientCredential::Certificate(
            ClientCertificate::from_pem_files(cert, key)?,
        )),
        (Some(_), Some(_)) => Err(ConfigError::new(
            "--client-certificate",
            "give a client secret (--client-secret-file or EWS_RELAY_CLIENT_SECRET) or a certificate (--client-certificate), not both",
        )),
        (None, None) => Err(ConfigError::new(
            "--client-secret-file",
            "--auth oauth needs the client secret in --client-secret-file or EWS_RELAY_CLIENT_SECRET, or a certificate in --client-certificate and --client-certificate-key",
        )),
    }
}

/// A secret from a file (first line, trailing newline removed) or, failing that, from an
/// environment variable; never from a flag, which would show in `ps`.
pub(super) fn secret(
    flag: &'static str,
    file: Option<&std::path::Path>,
    env: &str,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(flag, format!("{}: {e}", path.display())))?;
        let value = text.trim_end_matches(['\r', '\n']).to_owned();
        if value.is_empty() {
            return Err(ConfigError::new(flag, format!("{}: empty", path.display())));
        }
        return Ok(Some(Secret::new(value)));
    }
    Ok(std::env::var(env)
        .ok()
        .filter(|v| !v.is_empty())
        .map(Secret::new))
}
