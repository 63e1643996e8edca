//! Live reloads: certificate and allow-list changes take effect without a restart and without
//! dropping open connections; bad new files are refused and the old ones stay.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// A client configuration trusting every certificate given.
fn trusting(certs: &[&CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add((*c).clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The certificate a fresh handshake is served.
async fn served(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> CertificateDer<'static> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// A relay serving the certificate files of `cert`, which the test may then replace.
async fn relay_with(receiver: SocketAddr, cert: &TestCert) -> Relay {
    let words: Vec<String> = [
        "ews-relay",
        "--upstream",
        &format!("http://{receiver}"),
        "--tls-cert",
        cert.cert_path.to_str().unwrap(),
        "--tls-key",
        cert.key_path.to_str().unwrap(),
        "--allow",
        "127.0.0.0/8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Relay::start_words(&words, "127.0.0.1:0").await
}

/// Replace a file the way certbot and Kubernetes do: write beside it, rename over it.
fn swap(path: &Path, from: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn certificate_swapped_under_an_open_connection() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let a = test_cert();
    let b = test_cert();
    let relay = relay_with(receiver.addr, &a).await;
    let both = trusting(&[&a.der, &b.der]);
    // A keep-alive connection opened with certificate A.
    let mut open = https_client(relay.addr, &a.der, None).await.unwrap();
    let status = fixture("send-notification-status.xml");
    assert_eq!(
        send(&mut open, post("/", status.clone())).await.0,
        StatusCode::OK
    );
    assert_eq!(served(relay.addr, both.clone()).await, a.der);

    swap(&a.cert_path, &b.cert_path);
    swap(&a.key_path, &b.key_path);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served(relay.addr, both.clone()).await != b.der {
        assert!(
            Instant::now() < deadline,
            "new certificate not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection opened before the swap keeps working.
    assert_eq!(send(&mut open, post("/", status)).await.0, StatusCode::OK);
    assert_eq!(
        relay
            .metric("ews_relay_reloads_total{what=\"certificate\",outcome=\"applied\"}")
            .await,
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn broken_new_pair_is_refused_and_the_old_one_stays() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let a = test_cert();
    let b = test_cert();
    let relay = relay_with(receiver.addr, &a).await;
    let both = trusting(&[&a.der, &b.der]);
    // B's certificate with A's key: they do not belong together.
    swap(&a.cert_path, &b.cert_path);
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay
        .metric("ews_relay_reloads_total{what=\"certificate\",outcome=\"refused\"}")
        .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "refusal not reported within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        served(relay.addr, both.clone()).await,
        a.der,
        "old certificate still served"
    );
    // An empty key file is refused too.
    std::fs::write(&a.key_path, "").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(served(relay.addr, both).await, a.der);
    assert_eq!(
        relay
            .metric("ews_relay_reloads_total{what=\"certificate\",outcome=\"applied\"}")
            .await,
        0.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn allow_list_file_change_takes_effect_without_restart() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("allow.txt");
    std::fs::write(&file, "# only another host\n127.0.0.2/32\n").unwrap();
    let relay = Relay::start(receiver.addr, &["--allow-file", file.to_str().unwrap()]).await;
    assert!(
        https_client(relay.addr, &relay.cert, None).await.is_err(),
        "127.0.0.1 denied"
    );

    let next = dir.path().join("allow.next");
    std::fs::write(&next, "127.0.0.1/32\n").unwrap();
    swap(&file, &next);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        if let Ok(c) = https_client(relay.addr, &relay.cert, None).await {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "new allow-list not applied within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = fixture("send-notification-status.xml");
    assert_eq!(send(&mut client, post("/", status)).await.0, StatusCode::OK);

    // A malformed list never replaces a good one.
    std::fs::write(&next, "127.0.0.1/32\nnot-a-network\n").unwrap();
    swap(&file, &next);
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay
        .metric("ews_relay_reloads_total{what=\"allow_list\",outcome=\"refused\"}")
        .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "refusal not reported within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        https_client(relay.addr, &relay.cert, None).await.is_ok(),
        "good list kept"
    );
    relay.stop().await;
}

#[tokio::test]
async fn expiry_is_exported() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let relay = Relay::start(receiver.addr, &[]).await;
    // rcgen's default validity runs to 4096: far away, and positive.
    let secs = relay.metric("ews_relay_cert_expiry_seconds").await;
    assert!(secs > 365.0 * 86_400.0, "{secs}");
    relay.stop().await;
}
