//! The binary as an operator meets it: flags, exit codes, certificates, signals.

use crate::common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

const BIN: &str = env!("CARGO_BIN_EXE_ews-relay");

/// Run the binary to completion (it must exit on its own: every case here fails at start-up).
fn run_bin(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    (out.status.code().unwrap_or(-1), text)
}

const LOCAL: [&str; 4] = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];

const STREAM: [&str; 6] = [
    "--ews-url",
    "http://127.0.0.1:1/EWS/Exchange.asmx",
    "--mailbox",
    "a@contoso.example",
    "--auth",
    "none",
];
const fn with<const N: usize, const M: usize>(extra: [&'static str; M]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < STREAM.len() {
        out[i] = STREAM[i];
        i += 1;
    }
    let mut j = 0;
    while j < M {
        out[i + j] = extra[j];
        j += 1;
    }
    out
}
const STREAM_PUSH_NONE: [&str; 10] = with([
    "--callback-url",
    "https://relay.example/ews/x",
    "--listen",
    "none",
]);
const STREAM_CALLBACK: [&str; 10] = with([
    "--transport",
    "streaming",
    "--callback-url",
    "https://relay.example/ews/x",
]);
const STREAM_TIMEOUT_0: [&str; 10] = with([
    "--transport",
    "streaming",
    "--stream-connection-timeout",
    "0",
]);
const STREAM_TIMEOUT_31: [&str; 10] = with([
    "--transport",
    "streaming",
    "--stream-connection-timeout",
    "31",
]);
const STREAM_RECONNECT_LATE: [&str; 12] = with([
    "--transport",
    "streaming",
    "--stream-connection-timeout",
    "5",
    "--stream-reconnect-after",
    "5m",
]);
const STREAM_GRAPH_NONE: [&str; 12] = with([
    "--transport",
    "streaming",
    "--listen",
    "none",
    "--graph-path-prefix",
    "/graph",
]);
const STREAM_ACME_NONE: [&str; 12] = with([
    "--transport",
    "streaming",
    "--listen",
    "none",
    "--acme-domain",
    "relay.example.com",
]);
const STREAM_BAD_TRANSPORT: [&str; 8] = with(["--transport", "pull"]);

#[test]
fn bad_flag_values_exit_64_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--max-body", "lots"], "--max-body"),
        (&["--max-body", "4MB"], "--max-body"),
        (&["--listen", "443"], "--listen"),
        (&["--admin-listen", "localhost"], "--admin-listen"),
        (&["--upstream", "https://127.0.0.1:10002"], "--upstream"),
        (&["--upstream", "http://127.0.0.1:10002/path"], "--upstream"),
        (&["--allow", "10.0.0.0/33"], "--allow"),
        (&["--allow-preset", "azure"], "--allow-preset"),
        (&["--allow-file", "/nonexistent/allow.txt"], "--allow-file"),
        (&["--idle-timeout", "0s"], "--idle-timeout"),
        (&["--header-timeout", "soon"], "--header-timeout"),
        (&["--max-connections", "0"], "--max-connections"),
        (&["--path-prefix", "ews"], "--path-prefix"),
        (&["--hostname", "bad_host!"], "--hostname"),
        (&["--log-format", "xml"], "--log-format"),
        (&["--tls-cert", "/tmp/x.pem"], "--tls-key"),
        (&["--no-such-flag"], "--no-such-flag"),
        // Streaming (managed EWS mode): each bad combination names its flag.
        (&["--listen", "none"], "--listen"),
        (&STREAM_PUSH_NONE, "--listen"),
        (&STREAM_CALLBACK, "--callback-url"),
        (&STREAM_TIMEOUT_0, "--stream-connection-timeout"),
        (&STREAM_TIMEOUT_31, "--stream-connection-timeout"),
        (&STREAM_RECONNECT_LATE, "--stream-reconnect-after"),
        (&STREAM_GRAPH_NONE, "--listen"),
        (&STREAM_ACME_NONE, "--listen"),
        (&STREAM_BAD_TRANSPORT, "--transport"),
    ];
    for (args, flag) in cases {
        let (code, text) = run_bin(args, &[]);
        assert_eq!(code, 64, "{args:?} → {text}");
        assert!(
            text.contains(flag),
            "{args:?}: message should name {flag}: {text}"
        );
    }
}

#[test]
fn environment_variables_are_read() {
    let (code, text) = run_bin(&[], &[("EWS_RELAY_MAX_BODY", "huge")]);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("--max-body"), "{text}");
    let (code, text) = run_bin(&[], &[("EWS_RELAY_LISTEN", "nowhere")]);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("--listen"), "{text}");
}

#[test]
fn help_and_version_exit_0() {
    let (code, text) = run_bin(&["--help"], &[]);
    assert_eq!(code, 0);
    for flag in [
        "--listen",
        "--upstream",
        "--allow-preset",
        "--max-body",
        "--shutdown-grace",
    ] {
        assert!(text.contains(flag), "help lists {flag}");
    }
    assert!(text.contains("EWS_RELAY_LISTEN"), "help shows env vars");
    assert_eq!(run_bin(&["--version"], &[]).0, 0);
}

#[test]
fn certificate_problems_are_clear() {
    let a = test_cert();
    let b = test_cert();
    let empty = a.dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let p = |x: &std::path::Path| x.display().to_string();
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec![
                "--tls-cert".into(),
                p(&a.cert_path),
                "--tls-key".into(),
                p(&b.key_path),
            ],
            "--tls-key",
            "does not match",
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&empty),
                "--tls-key".into(),
                p(&a.key_path),
            ],
            "--tls-cert",
            "no certificate found",
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&a.cert_path),
                "--tls-key".into(),
                p(&empty),
            ],
            "--tls-key",
            "no private key found",
        ),
        (
            vec![
                "--tls-cert".into(),
                "/nonexistent/cert.pem".into(),
                "--tls-key".into(),
                p(&a.key_path),
            ],
            "--tls-cert",
            "No such file",
        ),
        (
            // A certificate where the key should be.
            vec![
                "--tls-cert".into(),
                p(&a.cert_path),
                "--tls-key".into(),
                p(&a.cert_path),
            ],
            "--tls-key",
            "no private key found",
        ),
    ];
    for (args, flag, words) in cases {
        let mut all: Vec<&str> = LOCAL.to_vec();
        all.extend(args.iter().map(String::as_str));
        let (code, text) = run_bin(&all, &[]);
        assert_eq!(code, 64, "{args:?} → {text}");
        assert!(
            text.contains(flag) && text.contains(words),
            "{args:?}: {text}"
        );
    }
}

#[tokio::test]
async fn self_signed_certificate_is_generated_once_and_reused() {
    let receiver = TestReceiver::answering(b"ok".to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let words: Vec<String> = [
        "ews-relay",
        "--upstream",
        &format!("http://{}", receiver.addr),
        "--allow",
        "127.0.0.1",
        "--hostname",
        "relay.test",
        "--cert-dir",
        &dir.path().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (cert_path, key_path) = ews_relay::edge::tls::self_signed_paths(dir.path(), "relay.test");

    let relay = Relay::start_words(&words, "127.0.0.1:0").await;
    let first = std::fs::read(&cert_path).expect("certificate written");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "private key readable only by its owner");
    // The relay serves exactly that certificate, valid for the host name.
    let der = first_der(&first);
    let info = ews_relay::edge::tls::cert_info(&der, true).unwrap();
    assert!(info.subject.contains("relay.test"), "{}", info.subject);
    let tls = tls_connect_named(relay.addr, &der, "relay.test").await;
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(served, der);
    relay.stop().await;

    let relay = Relay::start_words(&words, "127.0.0.1:0").await;
    assert_eq!(
        std::fs::read(&cert_path).unwrap(),
        first,
        "reused, not regenerated"
    );
    let tls = tls_connect_named(relay.addr, &der, "relay.test").await;
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], der);
    relay.stop().await;
}

fn first_der(pem: &[u8]) -> rustls_pki_types::CertificateDer<'static> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem).unwrap()
}

async fn tls_connect_named(
    addr: SocketAddr,
    der: &rustls_pki_types::CertificateDer<'static>,
    name: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_tls(der));
    connector
        .connect(
            rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap(),
            tcp,
        )
        .await
        .expect("handshake with the self-signed certificate")
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn sigterm_drains_and_exits_0() {
    let receiver = TestReceiver::answering(b"ok".to_vec()).await;
    let cert = test_cert();
    let (port, admin_port) = (free_port(), free_port());
    let child = Command::new(BIN)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
            "--upstream",
            &format!("http://{}", receiver.addr),
            "--tls-cert",
            &cert.cert_path.display().to_string(),
            "--tls-key",
            &cert.key_path.display().to_string(),
            "--allow",
            "127.0.0.1",
            "--log-format",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(admin_get(admin, "/healthz").await, Ok((StatusCode::OK, _))) {
        assert!(Instant::now() < deadline, "relay binary did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = https_client(addr, &cert.der, None).await.unwrap();
    let (s, _, _) = send(&mut c, post("/", fixture("send-notification-status.xml"))).await;
    assert_eq!(s, StatusCode::OK);
    drop(c);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "clean exit: {stdout}");
    // JSON logs: one object per line, with the access line for the request.
    let access = stdout
        .lines()
        .find(|l| l.contains("ews_relay::access"))
        .unwrap_or_else(|| panic!("access line in {stdout}"));
    assert!(
        access.starts_with('{') && access.contains("\"status\":200"),
        "{access}"
    );
    assert!(stdout.contains("shutdown requested"), "{stdout}");
}
