//! Certificates from an ACME CA (RFC 8555), with the TLS-ALPN-01 challenge (RFC 8737) answered on
//! the relay's own TLS port: no port 80, no other process, no key copied around.
//!
//! The protocol is instant-acme's; this module keeps the account key and the certificate under
//! `--state-dir`/acme (mode 0600 for keys), reuses them across restarts, orders only when there
//! is no usable certificate or it is due for renewal (about two thirds into its lifetime, or in
//! the CA's ARI window when the CA offers one), backs off with jitter after a failure, and swaps
//! the new certificate into the [`CertResolver`] for new handshakes (open connections keep
//! theirs, as with a file reload).
//!
//! # The allow-list
//! The CA's validation servers connect from addresses the allow-list refuses (Let's Encrypt does
//! not publish them, and validates from several networks on purpose). While an authorization is
//! pending, and only then, a connection from outside the allow-list is not dropped at accept:
//! its ClientHello is read (no byte is sent), and only if it offers exactly ALPN `acme-tls/1`
//! with an SNI that is one of the pending domains is it answered, with the challenge
//! certificate, and closed. Anything else is dropped before any certificate is sent and counted
//! as denied. No HTTP is ever served to such a connection. Outside an order, the accept path is
//! exactly the usual one.

mod challenge;
mod client;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls_pki_types::CertificateDer;

pub use challenge::{accept, Challenges, Handshake, ACME_TLS_ALPN};

use crate::config::Acme as Settings;
use crate::edge::tls::{CertResolver, LoadedCert};
use crate::metrics::Metrics;

/// First retry after a failed attempt; doubled after each further failure. Short enough that a
/// CA briefly down at start-up costs seconds, long enough not to hammer it.
const RETRY_FIRST: Duration = Duration::from_secs(10);
/// Longest pause between attempts: Let's Encrypt allows 5 failed validations per name per
/// hour, and an hour keeps a persistent failure well under that.
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// Consecutive failures from which the status page shows red instead of amber.
pub const REPEATED_FAILURES: u32 = 3;
/// A whole order (account, authorizations, validation, finalization, download): the crate has
/// no request timeouts of its own, and a hung CA must not stall the renewal loop forever.
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);
/// Waiting for the CA to validate (it connects back to us) and then to issue.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(90);
/// The first poll of an order's state; validation takes a second or two at Let's Encrypt.
const POLL_FIRST: Duration = Duration::from_millis(500);
/// Renewal is re-planned at least this often, so a moved ARI window (a CA revoking early) is
/// seen within hours.
const REPLAN_INTERVAL: Duration = Duration::from_secs(6 * 3600);
/// Asking the CA for ARI must not hold up renewal planning.
const ARI_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an attempt failed; the text is what the status page shows.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA answered with an error or could not be reached.
    #[error("{0}")]
    Protocol(#[from] instant_acme::Error),
    /// The CA did not validate or issue.
    #[error("order for {domains} is {status}: {detail}")]
    Refused {
        /// The names.
        domains: String,
        /// The order's final status.
        status: String,
        /// The CA's explanation.
        detail: String,
    },
    /// The CA offers no TLS-ALPN-01 challenge for a name.
    #[error("{0}: the CA offers no tls-alpn-01 challenge")]
    NoTlsAlpn(String),
    /// `--acme-ca-file` or the TLS client set-up.
    #[error("--acme-ca-file: {0}")]
    CaFile(String),
    /// Making the challenge certificate.
    #[error(transparent)]
    Challenge(#[from] challenge::ChallengeError),
    /// Making the key or CSR.
    #[error("certificate request: {0}")]
    Csr(#[from] rcgen::Error),
    /// Reading or writing under `--state-dir`.
    #[error("{path}: {message}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The whole attempt took too long.
    #[error("no answer from the CA within {0:?}")]
    Timeout(Duration),
}

/// Where issuance stands, for the status page.
#[derive(Debug, Clone, Default)]
pub struct AcmeStatus {
    /// The names asked for.
    pub domains: Vec<String>,
    /// End of validity of the issued certificate in use, if any.
    pub not_after: Option<SystemTime>,
    /// Failed attempts since the last success.
    pub failures: u32,
    /// The last failure's text (the CA's error).
    pub last_error: Option<String>,
    /// When the next attempt is planned.
    pub next_attempt: Option<SystemTime>,
}

/// What the status page should say about ACME, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcmeAlarm {
    /// No certificate issued yet; the self-signed one serves.
    Waiting(String),
    /// [`REPEATED_FAILURES`] or more attempts failed in a row.
    Failing(String),
}

impl AcmeStatus {
    /// Amber while waiting for the first certificate, red after repeated failures (with the
    /// CA's error), nothing while an issued certificate serves and renewal is fine.
    pub fn alarm(&self) -> Option<AcmeAlarm> {
        let names = self.domains.join(", ");
        let error = self.last_error.as_deref().unwrap_or("");
        if self.failures >= REPEATED_FAILURES {
            let serving = if self.not_after.is_some() {
                "the current certificate serves until it expires"
            } else {
                "the self-signed certificate serves meanwhile"
            };
            return Some(AcmeAlarm::Failing(format!(
                "ACME failing for {names} ({} attempts in a row; {serving}): {error}",
                self.failures
            )));
        }
        if self.not_after.is_none() {
            let mut text = format!(
                "Waiting for ACME: a certificate for {names} is being requested; the self-signed \
                 one serves until then."
            );
            if !error.is_empty() {
                text.push_str(" Last attempt: ");
                text.push_str(error);
            }
            return Some(AcmeAlarm::Waiting(text));
        }
        None
    }
}

/// The shared, live [`AcmeStatus`].
#[derive(Debug, Default)]
pub struct AcmeState(Mutex<AcmeStatus>);

impl AcmeState {
    /// A copy of the current status.
    pub fn snapshot(&self) -> AcmeStatus {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut AcmeStatus)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// An issued certificate as stored.
#[derive(Clone)]
struct Issued {
    loaded: LoadedCert,
    der: CertificateDer<'static>,
    not_before: SystemTime,
}

/// Obtains and renews the certificate.
pub struct Acme {
    settings: Settings,
    /// `--state-dir`/acme/<directory hash>: an account belongs to one CA.
    dir: PathBuf,
    challenges: Arc<Challenges>,
    state: Arc<AcmeState>,
    certs: Arc<CertResolver>,
    metrics: Arc<Metrics>,
    current: Option<Issued>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("domains", &self.settings.domains)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Acme {
    /// Set up, and serve a stored certificate at once if one is still usable.
    pub fn new(
        settings: Settings,
        certs: Arc<CertResolver>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, settings.directory.as_bytes());
        let hash: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let dir = settings.dir.join(hash);
        let state = Arc::new(AcmeState::default());
        state.update(|s| s.domains = settings.domains.clone());
        certs.set_acme(state.clone());
        let mut acme = Self {
            challenges: Arc::new(Challenges::new()?),
            settings,
            dir,
            state,
            certs,
            metrics,
            current: None,
        };
        match acme.load_stored() {
            Ok(Some(issued)) => {
                tracing::info!(subject = %issued.loaded.info.subject, sha256 = %issued.loaded.info.sha256, "ACME: stored certificate in use");
                acme.install(issued);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "ACME: stored certificate unusable; a new one will be ordered")
            }
        }
        Ok(acme)
    }

    /// The pending challenges, for the accept path.
    pub fn challenges(&self) -> Arc<Challenges> {
        self.challenges.clone()
    }

    /// Order, renew and retry, forever.
    pub async fn run(mut self) {
        let mut account: Option<Account> = None;
        let mut failures: u32 = 0;
        loop {
            if let Some(current) = self.current.clone() {
                let due = self.renew_at(&current, account.as_ref()).await;
                let wait = due
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                if !wait.is_zero() {
                    self.state.update(|s| s.next_attempt = Some(due));
                    tracing::info!(renew_in = ?wait, "ACME: certificate valid; renewal planned");
                    tokio::time::sleep(wait.min(REPLAN_INTERVAL)).await;
                    continue;
                }
            }
            let renewal = self.current.is_some();
            let kind = if renewal { "renew" } else { "issue" };
            tracing::info!(domains = ?self.settings.domains, kind, "ACME: ordering a certificate");
            let attempt = tokio::time::timeout(ORDER_TIMEOUT, self.attempt(&mut account)).await;
            self.challenges.clear();
            let result = attempt.unwrap_or(Err(AcmeError::Timeout(ORDER_TIMEOUT)));
            match result {
                Ok(issued) => {
                    failures = 0;
                    self.metrics.acme_order(kind, true);
                    tracing::info!(subject = %issued.loaded.info.subject, sha256 = %issued.loaded.info.sha256, "ACME: new certificate in use for new connections");
                    self.state.update(|s| {
                        s.failures = 0;
                        s.last_error = None;
                    });
                    self.install(issued);
                }
                Err(e) => {
                    failures += 1;
                    self.metrics.acme_order(kind, false);
                    if stale_account(&e) {
                        // The CA forgot the account (a test CA restarted, or it was
                        // deactivated): make a new one next time.
                        let _ = std::fs::remove_file(self.dir.join(ACCOUNT_FILE));
                        account = None;
                    }
                    let delay = backoff(failures);
                    let text = with_sources(&e);
                    tracing::warn!(error = %text, failures, retry_in = ?delay, "ACME: attempt failed");
                    self.state.update(|s| {
                        s.failures = failures;
                        s.last_error = Some(text);
                        s.next_attempt = Some(SystemTime::now() + delay);
                    });
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Serve `issued` and remember it.
    fn install(&mut self, issued: Issued) {
        crate::edge::tls::report_expiry(&issued.loaded, &self.metrics);
        self.certs.store(issued.loaded.clone());
        let not_after = issued.loaded.info.not_after;
        self.state.update(|s| s.not_after = Some(not_after));
        self.current = Some(issued);
    }

    /// When to renew `current`: a random time in the CA's ARI window if it has one, else two
    /// thirds into the lifetime (Let's Encrypt's own advice for 90-day certificates).
    async fn renew_at(&self, current: &Issued, account: Option<&Account>) -> SystemTime {
        let not_after = current.loaded.info.not_after;
        let lifetime = not_after
            .duration_since(current.not_before)
            .unwrap_or(Duration::ZERO);
        let two_thirds = current.not_before + lifetime * 2 / 3;
        let Some(account) = account else {
            return two_thirds;
        };
        let Ok(id) = instant_acme::CertificateIdentifier::try_from(&current.der) else {
            return two_thirds;
        };
        match tokio::time::timeout(ARI_TIMEOUT, account.renewal_info(&id)).await {
            Ok(Ok((info, _))) => {
                let start: SystemTime = info.suggested_window.start.into();
                let end: SystemTime = info.suggested_window.end.into();
                let span = end.duration_since(start).unwrap_or(Duration::ZERO);
                start + span.mul_f64(random_fraction())
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "ACME: no renewal information; renewing at two thirds");
                two_thirds
            }
            Err(_) => two_thirds,
        }
    }

    /// One order, start to finish.
    async fn attempt(&self, account: &mut Option<Account>) -> Result<Issued, AcmeError> {
        let acct = match account {
            Some(a) => a.clone(),
            None => {
                let a = self.account().await?;
                *account = Some(a.clone());
                a
            }
        };
        let identifiers: Vec<Identifier> = self
            .settings
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = acct.new_order(&NewOrder::new(&identifiers)).await?;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            let domain = authz.identifier().to_string();
            match authz.status {
                AuthorizationStatus::Pending => {}
                // Still valid from an earlier order: nothing to prove.
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Refused {
                        domains: domain,
                        status: format!("{other:?}").to_lowercase(),
                        detail: "authorization not pending".to_owned(),
                    })
                }
            }
            let mut challenge = authz
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or_else(|| AcmeError::NoTlsAlpn(domain.clone()))?;
            let digest = challenge.key_authorization().digest();
            self.challenges.insert(&domain, digest.as_ref())?;
            challenge.set_ready().await?;
        }
        let policy = RetryPolicy::new()
            .initial_delay(POLL_FIRST)
            .timeout(VALIDATION_TIMEOUT);
        let status = order.poll_ready(&policy).await?;
        if status != OrderStatus::Ready {
            let detail = why_invalid(&mut order).await;
            return Err(AcmeError::Refused {
                domains: self.settings.domains.join(", "),
                status: format!("{status:?}").to_lowercase(),
                detail,
            });
        }
        self.challenges.clear();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(self.settings.domains.clone())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        order.finalize_csr(csr.der()).await?;
        let chain = order.poll_certificate(&policy).await?;
        self.store(&chain, &key.serialize_pem())
    }

    /// The account: stored credentials, or a new account (saved at once, mode 0600).
    async fn account(&self) -> Result<Account, AcmeError> {
        let http = client::http_client(self.settings.ca_file.as_deref())?;
        let path = self.dir.join(ACCOUNT_FILE);
        if let Ok(bytes) = std::fs::read(&path) {
            let credentials: AccountCredentials =
                serde_json::from_slice(&bytes).map_err(|e| AcmeError::Storage {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            return Ok(Account::builder_with_http(http)
                .from_credentials(credentials)
                .await?);
        }
        let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let eab = self
            .settings
            .eab
            .as_ref()
            .map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key.expose()));
        let (account, credentials) = Account::builder_with_http(http)
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.settings.directory.clone(),
                eab.as_ref(),
            )
            .await?;
        let json = serde_json::to_vec(&credentials).map_err(|e| AcmeError::Storage {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_private(&self.dir, ACCOUNT_FILE, &json)?;
        tracing::info!(account = %account.id(), "ACME: account created");
        Ok(account)
    }

    /// Save the new chain and key, then load them back the way a restart will.
    fn store(&self, chain: &str, key_pem: &str) -> Result<Issued, AcmeError> {
        // The key first: a crash in between leaves a new key with the old certificate, which
        // `load_stored` refuses (mismatch) and orders anew, never a certificate without its key.
        write_private(&self.dir, KEY_FILE, key_pem.as_bytes())?;
        write_private(&self.dir, CERT_FILE, chain.as_bytes())?;
        match self.load_stored()? {
            Some(issued) => Ok(issued),
            None => Err(AcmeError::Storage {
                path: self.dir.join(CERT_FILE),
                message: "the issued certificate does not cover every --acme-domain".to_owned(),
            }),
        }
    }

    /// The stored certificate, if it exists, matches its key, covers every domain and has not
    /// expired.
    fn load_stored(&self) -> Result<Option<Issued>, AcmeError> {
        let (cert, key) = (self.dir.join(CERT_FILE), self.dir.join(KEY_FILE));
        if !cert.exists() || !key.exists() {
            return Ok(None);
        }
        let storage = |message: String| AcmeError::Storage {
            path: cert.clone(),
            message,
        };
        let loaded = crate::edge::tls::load_pem(&cert, &key).map_err(|e| storage(e.to_string()))?;
        let der = loaded
            .key
            .cert
            .first()
            .cloned()
            .ok_or_else(|| storage("empty chain".to_owned()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| storage(e.to_string()))?;
        let names: Vec<String> = match parsed.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        if !self.settings.domains.iter().all(|d| names.contains(d)) {
            tracing::info!(stored = ?names, wanted = ?self.settings.domains, "ACME: stored certificate is for other names");
            return Ok(None);
        }
        if loaded.info.not_after <= SystemTime::now() {
            return Ok(None);
        }
        let not_before = SystemTime::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_before.timestamp().max(0) as u64);
        Ok(Some(Issued {
            loaded,
            der: der.into_owned(),
            not_before,
        }))
    }
}

const ACCOUNT_FILE: &str = "account.json";
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// The CA's reasons, from the authorizations' failed challenges.
async fn why_invalid(order: &mut instant_acme::Order) -> String {
    let mut reasons = Vec::new();
    if let Some(e) = &order.state().error {
        reasons.push(e.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let Ok(state) = authz.refresh().await else {
            continue;
        };
        for c in &state.challenges {
            if let Some(e) = &c.error {
                reasons.push(format!("{}: {e}", state.identifier()));
            }
        }
    }
    if reasons.is_empty() {
        "no reason given".to_owned()
    } else {
        reasons.join("; ")
    }
}

/// `e` and its sources, joined: the HTTP client's own text is only "client error (Connect)",
/// and the reason (refused, certificate not trusted) is further down the chain.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// Whether the CA no longer knows the stored account.
fn stale_account(e: &AcmeError) -> bool {
    match e {
        AcmeError::Protocol(instant_acme::Error::Api(p)) => p
            .r#type
            .as_deref()
            .is_some_and(|t| t.ends_with(":accountDoesNotExist")),
        _ => false,
    }
}

/// Pause after the `failures`th failure in a row: doubling from [`RETRY_FIRST`] up to
/// [`RETRY_MAX`], each between 75% and 125% of that so many relays restarted together do not
/// retry in step.
fn backoff(failures: u32) -> Duration {
    let base = RETRY_FIRST
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(RETRY_MAX);
    base.mul_f64(0.75 + random_fraction() / 2.0)
}

/// A number in [0, 1) from the system's random source (0.5 if that fails).
fn random_fraction() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    match ring::rand::SystemRandom::new().fill(&mut b) {
        Ok(()) => f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

/// Write `name` under `dir` via a temporary file and a rename, mode 0600 from the start, so a
/// crash never leaves half a file and a key is never readable by others, not even briefly.
fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), AcmeError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path = dir.join(name);
    let err = |e: std::io::Error| AcmeError::Storage {
        path: path.clone(),
        message: e.to_string(),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        for (n, base) in [(1, 10.0), (2, 20.0), (3, 40.0), (20, 3600.0)] {
            let d = backoff(n).as_secs_f64();
            assert!(d >= base * 0.75 && d <= base * 1.25, "{n}: {d}");
        }
    }

    #[test]
    fn alarm_amber_while_waiting_red_after_repeated_failures() {
        let mut s = AcmeStatus {
            domains: vec!["relay.example.com".into()],
            ..Default::default()
        };
        assert!(matches!(s.alarm(), Some(AcmeAlarm::Waiting(_))));
        s.failures = REPEATED_FAILURES;
        s.last_error = Some("rejectedIdentifier".into());
        match s.alarm() {
            Some(AcmeAlarm::Failing(t)) => assert!(t.contains("rejectedIdentifier"), "{t}"),
            other => panic!("{other:?}"),
        }
        s.failures = 0;
        s.not_after = Some(SystemTime::now());
        assert_eq!(s.alarm(), None);
    }
}
