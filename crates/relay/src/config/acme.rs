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
        // Read here so a wrong file stops start-up (exit 64) instead of failing every order.
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ConfigError::new("--acme-ca-file", format!("{}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(ConfigError::new(
                "--acme-ca-file",
                format!("{}: no PEM certificate found", ca.display()),
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

#[cfg(test)]
mod tests {
    use crate::config::{CliError, Config};

    fn flag_of(words: &[&str]) -> (&'static str, String) {
        match Config::parse_from(words.iter().copied()) {
            Err(CliError::Config(e)) => (e.flag, e.message),
            other => panic!("{words:?}: {other:?}"),
        }
    }

    #[test]
    fn acme_domain_sets_up_acme_and_names_the_placeholder() {
        let c = Config::parse_from([
            "ews-relay",
            "--acme-domain",
            "Relay.Example.com.",
            "--acme-domain",
            "relay.example.com,push.example.com",
            "--state-dir",
            "/var/lib/ews-relay",
        ])
        .unwrap();
        let a = c.acme.expect("acme");
        assert_eq!(a.domains, ["relay.example.com", "push.example.com"]);
        assert_eq!(
            a.directory,
            "https://acme-v02.api.letsencrypt.org/directory"
        );
        assert_eq!(a.dir, std::path::Path::new("/var/lib/ews-relay/acme"));
        match c.tls {
            crate::TlsSource::SelfSigned { hostname, .. } => {
                assert_eq!(hostname, "relay.example.com")
            }
            other => panic!("{other:?}"),
        }
        assert!(Config::parse_from(["ews-relay"]).unwrap().acme.is_none());
    }

    #[test]
    fn acme_refuses_tls_files_and_bad_values_naming_the_flag() {
        let (flag, message) = flag_of(&[
            "ews-relay",
            "--acme-domain",
            "relay.example.com",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ]);
        assert_eq!(flag, "--acme-domain");
        assert!(message.contains("--tls-cert/--tls-key"), "{message}");
        for (words, want) in [
            (&["--acme-domain", "*.example.com"][..], "--acme-domain"),
            (&["--acme-domain", "192.0.2.1"][..], "--acme-domain"),
            (&["--acme-domain", "bad_name"][..], "--acme-domain"),
            (
                &[
                    "--acme-domain",
                    "a.example",
                    "--acme-directory",
                    "http://ca/dir",
                ][..],
                "--acme-directory",
            ),
            (
                &["--acme-domain", "a.example", "--acme-email", "nobody"][..],
                "--acme-email",
            ),
            (
                &["--acme-domain", "a.example", "--acme-eab-kid", "k"][..],
                "--acme-eab-hmac-file",
            ),
            (&["--acme-email", "a@b.example"][..], "--acme-email"),
            (
                &[
                    "--acme-domain",
                    "a.example",
                    "--acme-ca-file",
                    "/nonexistent",
                ][..],
                "--acme-ca-file",
            ),
        ] {
            let mut all = vec!["ews-relay"];
            all.extend_from_slice(words);
            assert_eq!(flag_of(&all).0, want, "{words:?}");
        }
    }

    #[test]
    fn eab_key_is_read_decoded_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hmac");
        std::fs::write(&path, "c2VjcmV0LWtleQ\n").unwrap();
        let c = Config::parse_from([
            "ews-relay",
            "--acme-domain",
            "a.example",
            "--acme-eab-kid",
            "kid-1",
            "--acme-eab-hmac-file",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let (kid, key) = c.acme.as_ref().unwrap().eab.clone().unwrap();
        assert_eq!(kid, "kid-1");
        assert_eq!(key.expose(), b"secret-key");
        assert!(!format!("{c:?}").contains("secret"));
    }
}
