//! ACME against a real ACME server on loopback: Debian's `pebble` (Let's Encrypt's test CA),
//! validating with TLS-ALPN-01 against the relay's own port. Skipped, saying so, when pebble is
//! not installed (`apt-get install pebble`; `.ci/run` installs it).
//!
//! The relay admits only 127.0.0.2 here, and the test client connects from there: pebble's
//! validation comes from 127.0.0.1, outside the allow-list, as a real CA's does.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::common::{admin_get, metric_value, post, send, Relay, TestReceiver};

/// How long a test waits for a certificate from pebble: issuance takes about a second, a retry
/// after a failure starts at 10 s (±25%).
const ISSUE_WAIT: Duration = Duration::from_secs(60);
/// The address the test client connects from, the only one the relay admits.
const CLIENT_IP: &str = "127.0.0.2";

fn pebble_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EWS_RELAY_TEST_PEBBLE") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("pebble"))
        .find(|p| p.is_file())
}

macro_rules! pebble_or_skip {
    () => {
        match pebble_binary() {
            Some(p) => p,
            None => {
                eprintln!("SKIPPED: pebble not installed (apt-get install pebble)");
                return;
            }
        }
    };
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pebble process and what the relay needs to use it.
struct Pebble {
    child: Option<Child>,
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl Pebble {
    /// Configure pebble to validate on `tls_port`, issuing certificates valid for `validity`
    /// seconds and refusing `blocked` names; `start` runs it.
    fn new(binary: PathBuf, tls_port: u16, validity: u64, blocked: &[&str]) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        let port = free_port();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{}", free_port()),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": free_port(),
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "domainBlocklist": blocked,
                "certificateValidityPeriod": validity,
            }
        });
        std::fs::write(
            dir.path().join("pebble.json"),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        Pebble {
            child: None,
            binary,
            dir,
            port,
        }
    }

    /// Require external account binding with `kid` and the base64url HMAC `key`.
    fn require_eab(&self, kid: &str, key: &str) {
        let path = self.dir.path().join("pebble.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        config["pebble"]["externalAccountBindingRequired"] = true.into();
        config["pebble"]["externalAccountMACKeys"] = serde_json::json!({ kid: key });
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("pebble.log")).unwrap();
        let child = Command::new(&self.binary)
            .arg("-config")
            .arg(self.dir.path().join("pebble.json"))
            // Validate at once, for real, and never reject a nonce or reuse an authorization:
            // every order goes through a TLS-ALPN-01 handshake with the relay.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_VA_ALWAYS_VALID", "0")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pebble");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "pebble did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The relay with ACME from `pebble` for `domain`, on 127.0.0.1:`port`, state in `state`.
async fn relay(
    pebble: &Pebble,
    port: u16,
    domain: &str,
    state: &Path,
    upstream: SocketAddr,
) -> Relay {
    relay_with(pebble, port, domain, state, upstream, &[]).await
}

/// [`relay`] with `extra` flags.
async fn relay_with(
    pebble: &Pebble,
    port: u16,
    domain: &str,
    state: &Path,
    upstream: SocketAddr,
    extra: &[&str],
) -> Relay {
    let words: Vec<String> = [
        "ews-relay",
        "--upstream",
        &format!("http://{upstream}"),
        "--allow",
        &format!("{CLIENT_IP}/32"),
        "--acme-domain",
        domain,
        "--acme-directory",
        &pebble.directory(),
        "--acme-ca-file",
        &pebble.ca_file().display().to_string(),
        "--acme-email",
        "ops@example.com",
        "--state-dir",
        &state.display().to_string(),
        "--cert-dir",
        &state.join("certs").display().to_string(),
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    Relay::start_words(&words, &format!("127.0.0.1:{port}")).await
}

/// Accepts any certificate: the tests look at what is served, not whether it verifies.
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
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn any_cert_config() -> Arc<rustls::ClientConfig> {
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// A TLS connection from the admitted address, SNI `domain`.
async fn connect(
    addr: SocketAddr,
    domain: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = crate::common::tcp_from(addr, Some(CLIENT_IP.parse::<IpAddr>().unwrap())).await?;
    tokio_rustls::TlsConnector::from(any_cert_config())
        .connect(ServerName::try_from(domain.to_owned()).unwrap(), tcp)
        .await
}

/// The served leaf certificate's issuer and DER.
async fn served(addr: SocketAddr, domain: &str) -> (String, Vec<u8>) {
    let tls = connect(addr, domain).await.expect("TLS connect");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    (cert.issuer().to_string(), leaf)
}

/// Wait until the relay serves a certificate issued by pebble other than `not`.
async fn wait_for_pebble_cert(
    relay: &Relay,
    domain: &str,
    not: Option<&[u8]>,
    pebble: &Pebble,
) -> Vec<u8> {
    let deadline = Instant::now() + ISSUE_WAIT;
    loop {
        let (issuer, der) = served(relay.addr, domain).await;
        if issuer.contains("Pebble") && not != Some(der.as_slice()) {
            return der;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate from pebble within {ISSUE_WAIT:?}; serving {issuer}; status page:\n{}\npebble log:\n{}",
            status_page(relay).await,
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn status_page(relay: &Relay) -> String {
    admin_get(relay.admin, "/status").await.unwrap().1
}

#[tokio::test]
async fn first_issuance_then_reuse_after_restart_without_new_order() {
    let binary = pebble_or_skip!();
    let port = free_port();
    let mut pebble = Pebble::new(binary, port, 3600, &[]);
    pebble.start();
    let state = tempfile::tempdir().unwrap();
    let receiver = TestReceiver::answering(b"ok".to_vec()).await;

    let r = relay(&pebble, port, "localhost", state.path(), receiver.addr).await;
    let first = wait_for_pebble_cert(&r, "localhost", None, &pebble).await;
    let metrics = r.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"ews_relay_acme_orders_total{kind="issue",outcome="ok"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert!(metric_value(&metrics, "ews_relay_acme_challenges_total") >= 1.0);
    assert!(metric_value(&metrics, "ews_relay_cert_expiry_seconds") > 3000.0);
    assert!(
        !status_page(&r).await.contains("Waiting for ACME"),
        "status page still waiting"
    );
    // Keys are the relay's alone.
    use std::os::unix::fs::PermissionsExt;
    let acme_dir = std::fs::read_dir(state.path().join("acme"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for f in ["account.json", "key.pem", "cert.pem"] {
        let mode = std::fs::metadata(acme_dir.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    // An admitted client is served as usual on the ACME certificate.
    let mut client = {
        let tls = connect(r.addr, "localhost").await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    };
    let (status, _, _) = send(&mut client, post("/", "<x/>")).await;
    assert!(status.is_success() || status.is_client_error(), "{status}");
    drop(client);
    r.stop().await;

    // Restart on the same state: the stored certificate serves from the first handshake and
    // nothing is ordered.
    let r = relay(&pebble, port, "localhost", state.path(), receiver.addr).await;
    let (_, der) = served(r.addr, "localhost").await;
    assert_eq!(der, first, "restart did not reuse the stored certificate");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = r.metrics().await;
    assert!(
        !metrics.contains("ews_relay_acme_orders_total{"),
        "ordered again after restart:\n{metrics}"
    );
    r.stop().await;
}

#[tokio::test]
async fn renews_short_lived_certificate_without_dropping_connections() {
    let binary = pebble_or_skip!();
    let port = free_port();
    // 15 s certificates: renewed two thirds in, at about 10 s.
    let mut pebble = Pebble::new(binary, port, 15, &[]);
    pebble.start();
    let state = tempfile::tempdir().unwrap();
    let receiver = TestReceiver::answering(b"ok".to_vec()).await;
    let r = relay(&pebble, port, "localhost", state.path(), receiver.addr).await;
    let first = wait_for_pebble_cert(&r, "localhost", None, &pebble).await;

    // A connection opened on the first certificate...
    let tls = connect(r.addr, "localhost").await.unwrap();
    assert_eq!(
        tls.get_ref().1.peer_certificates().unwrap()[0].as_ref(),
        first.as_slice()
    );
    let (mut client, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (before, _, _) = send(&mut client, post("/", "<x/>")).await;

    let second = wait_for_pebble_cert(&r, "localhost", Some(&first), &pebble).await;
    assert_ne!(first, second);
    // ...still works after the swap.
    let (after, _, _) = send(&mut client, post("/", "<x/>")).await;
    assert_eq!(before, after);
    let metrics = r.metrics().await;
    assert!(
        metric_value(
            &metrics,
            r#"ews_relay_acme_orders_total{kind="renew",outcome="ok"}"#
        ) >= 1.0,
        "{metrics}"
    );
    r.stop().await;
}

#[tokio::test]
async fn ca_down_at_start_serves_self_signed_then_issues() {
    let binary = pebble_or_skip!();
    let port = free_port();
    let mut pebble = Pebble::new(binary, port, 3600, &[]);
    let state = tempfile::tempdir().unwrap();
    let receiver = TestReceiver::answering(b"ok".to_vec()).await;
    let r = relay(&pebble, port, "localhost", state.path(), receiver.addr).await;

    // The CA is down: the self-signed certificate serves, the page says why.
    let deadline = Instant::now() + Duration::from_secs(10);
    while r
        .metric(r#"ews_relay_acme_orders_total{kind="issue",outcome="error"}"#)
        .await
        < 1.0
    {
        assert!(Instant::now() < deadline, "no failed attempt counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (issuer, _) = served(r.addr, "localhost").await;
    assert!(!issuer.contains("Pebble"), "{issuer}");
    let page = status_page(&r).await;
    assert!(page.contains("Waiting for ACME"), "{page}");
    assert!(page.contains("alert amber"), "{page}");
    assert!(
        page.contains("<dt>Certificate</dt><dd><span class=\"tag amber\">"),
        "{page}"
    );

    pebble.start();
    wait_for_pebble_cert(&r, "localhost", None, &pebble).await;
    assert!(!status_page(&r).await.contains("Waiting for ACME"));
    r.stop().await;
}

#[tokio::test]
async fn refused_order_shows_the_error_and_backs_off() {
    let binary = pebble_or_skip!();
    let port = free_port();
    let mut pebble = Pebble::new(binary, port, 3600, &["blocked.example"]);
    pebble.start();
    let state = tempfile::tempdir().unwrap();
    let receiver = TestReceiver::answering(b"ok".to_vec()).await;
    let r = relay(
        &pebble,
        port,
        "blocked.example",
        state.path(),
        receiver.addr,
    )
    .await;

    let series = r#"ews_relay_acme_orders_total{kind="issue",outcome="error"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.metric(series).await < 1.0 {
        assert!(Instant::now() < deadline, "no failed attempt counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = status_page(&r).await;
    assert!(page.contains("Waiting for ACME"), "{page}");
    assert!(
        page.contains("rejectedIdentifier"),
        "CA's error not shown:\n{page}"
    );
    // No crash loop: the next attempt waits out the back-off; the relay keeps serving.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(r.metric(series).await, 1.0);
    let (issuer, _) = served(r.addr, "blocked.example").await;
    assert!(!issuer.contains("Pebble"));
    r.stop().await;
}

#[tokio::test]
async fn external_account_binding() {
    let binary = pebble_or_skip!();
    let port = free_port();
    let mut pebble = Pebble::new(binary, port, 3600, &[]);
    let key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    pebble.require_eab("kid-1", key);
    pebble.start();
    let state = tempfile::tempdir().unwrap();
    let hmac = state.path().join("eab-hmac");
    std::fs::write(&hmac, format!("{key}\n")).unwrap();
    let receiver = TestReceiver::answering(b"ok".to_vec()).await;

    // Without the binding the CA refuses the account, and the page says so.
    let bare = tempfile::tempdir().unwrap();
    let r = relay(&pebble, port, "localhost", bare.path(), receiver.addr).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while r
        .metric(r#"ews_relay_acme_orders_total{kind="issue",outcome="error"}"#)
        .await
        < 1.0
    {
        assert!(Instant::now() < deadline, "no failed attempt counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = status_page(&r).await;
    assert!(page.contains("externalAccountRequired"), "{page}");
    r.stop().await;

    let r = relay_with(
        &pebble,
        port,
        "localhost",
        state.path(),
        receiver.addr,
        &[
            "--acme-eab-kid",
            "kid-1",
            "--acme-eab-hmac-file",
            &hmac.display().to_string(),
        ],
    )
    .await;
    wait_for_pebble_cert(&r, "localhost", None, &pebble).await;
    r.stop().await;
}
