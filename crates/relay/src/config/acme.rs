//! The ACME flags: `--acme-domain` turns certificates from an ACME CA on.

use std::path::PathBuf;

use base64::Engine as _;

use super::parse::validate_hostname;
use super::{Args, ConfigError};

/// Certificates from an ACME CA, answered with TLS-ALPN-01 on `--listen`.
#[derive(Debug, Clone)]
pub struct Acme {
    /// Names the certificate covers; the first is its subject. Lower-cased.
    pub domains: Vec<String>,
    /// Contact address, without `mailto:`.
    pub email: Option<String>,
    /// Directory URL.
    pub directory: String,
    /// Extra CA certificates to trust for the ACME server.
    pub ca_file: Option<PathBuf>,
    /// External account binding: key id and HMAC key.
    pub eab: Option<(String, EabKey)>,
    /// Where the account key and certificates are kept (`--state-dir`/acme).
    pub dir: PathBuf,
}

/// An external account binding HMAC key: never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct EabKey(Vec<u8>);

impl EabKey {
    /// The key bytes, for the one place that signs with them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for EabKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EabKey(***)")
    }
}

/// The ACME settings, or `None` without `--acme-domain`.
pub(super) fn acme(args: &Args) -> Result<Option<Acme>, ConfigError> {
    if args.acme_domain.is_empty() {
        for (set, flag) in [
            (args.acme_email.is_some(), "--acme-email"),
            (args.acme_ca_file.is_some(), "--acme-ca-file"),
            (args.acme_eab_kid.is_some(), "--acme-eab-kid"),
            (args.acme_eab_hmac_file.is_some(), "--acme-eab-hmac-file"),
        ] {
            if set {
                return Err(ConfigError::new(flag, "only used with --acme-domain"));
            }
        }
        return Ok(None);
    }
    if args.tls_cert.is_some() || args.tls_key.is_some() {
        return Err(ConfigError::new(
            "--acme-domain",
            "not with --tls-cert/--tls-key: the certificate comes either from the ACME CA or \
             from files; drop one of them",
        ));
    }
    let mut domains = Vec::with_capacity(args.acme_domain.len());
    for d in &args.acme_domain {
        let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
        // TLS-ALPN-01 proves control of one name per handshake: wildcards need DNS-01, and
        // ACME CAs issue for IP addresses only with other challenges or profiles.
        if d.starts_with("*.") || d.parse::<std::net::IpAddr>().is_ok() {
            return Err(ConfigError::new(
                "--acme-domain",
                format!("'{d}': TLS-ALPN-01 covers DNS names only, not wildcards or addresses"),
            ));
        }
        validate_hostname(&d).map_err(|e| ConfigError::new("--acme-domain", e.message))?;
        if !domains.contains(&d) {
            domains.push(d);
        }
    }
    if let Some(e) = &args.acme_email {
        let e = e.trim_start_matches("mailto:");
        if !e.contains('@') || e.contains(char::is_whitespace) {
            return Err(ConfigError::new(
                "--acme-email",
                format!("'{e}' is not an e-mail address"),
            ));
        }
    }
    let directory = args.acme_directory.trim().to_owned();
    match directory.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => {}
        _ => {
            return Err(ConfigError::new(
                "--acme-directory",
                format!("'{directory}' is not an https:// URL (RFC 8555 requires HTTPS)"),
            ))
        }
    }
    if let Some(ca) = &args.acme_ca_file {
        if let Err(e) = std::fs::metadata(ca) {
            return Err(ConfigError::new(
                "--acme-ca-file",
                format!("{}: {e}", ca.display()),
            ));
        }
    }
    let eab = match (&args.acme_eab_kid, &args.acme_eab_hmac_file) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::new(
                "--acme-eab-hmac-file",
                "required with --acme-eab-kid",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "--acme-eab-kid",
                "required with --acme-eab-hmac-file",
            ))
        }
        (Some(kid), Some(path)) => {
            let err = |m: String| ConfigError::new("--acme-eab-hmac-file", m);
            let text = std::fs::read_to_string(path)
                .map_err(|e| err(format!("{}: {e}", path.display())))?;
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(text.trim().trim_end_matches('='))
                .map_err(|e| err(format!("{}: not base64url: {e}", path.display())))?;
            if key.is_empty() {
                return Err(err(format!("{}: empty key", path.display())));
            }
            Some((kid.clone(), EabKey(key)))
        }
    };
    Ok(Some(Acme {
        domains,
        email: args
            .acme_email
            .as_ref()
            .map(|e| e.trim_start_matches("mailto:").to_owned()),
        directory,
        ca_file: args.acme_ca_file.clone(),
        eab,
        dir: args.state_dir.join("acme"),
    }))
}
