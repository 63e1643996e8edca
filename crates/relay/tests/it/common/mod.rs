//! Shared test harness: a real relay on ephemeral loopback ports with a real rcgen certificate,
//! real test receivers, and an HTTPS client that trusts the test certificate.
#![allow(dead_code)]

pub mod managed;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A fixture file's bytes.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../ews/tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A test certificate for `localhost` and 127.0.0.1, written as PEM files in a temp dir.
pub struct TestCert {
    pub dir: tempfile::TempDir,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub der: CertificateDer<'static>,
}

pub fn test_cert() -> TestCert {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    TestCert {
        der: cert.der().clone(),
        dir,
        cert_path,
        key_path,
    }
}

/// A running relay.
pub struct Relay {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub cert: CertificateDer<'static>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ews_relay::StartError>>>,
    _cert: Option<TestCert>,
}

impl Relay {
    /// Start a relay in front of `upstream` with a test certificate, admitting 127.0.0.0/8
    /// unless `args` says otherwise, plus `args`.
    pub async fn start(upstream: SocketAddr, args: &[&str]) -> Relay {
        let cert = test_cert();
        let mut words: Vec<String> = vec![
            "ews-relay".into(),
            "--upstream".into(),
            format!("http://{upstream}"),
            "--tls-cert".into(),
            cert.cert_path.display().to_string(),
            "--tls-key".into(),
            cert.key_path.display().to_string(),
        ];
        if !args.iter().any(|a| a.starts_with("--allow")) {
            words.push("--allow".into());
            words.push("127.0.0.0/8".into());
        }
        words.extend(args.iter().map(|s| s.to_string()));
        let der = cert.der.clone();
        let mut relay = Self::start_words(&words, "127.0.0.1:0").await;
        relay.cert = der;
        relay._cert = Some(cert);
        relay
    }

    /// Start a relay from a full command line, listening on `listen`.
    pub async fn start_words(words: &[String], listen: &str) -> Relay {
        let config = ews_relay::Config::parse_from(words).expect("test command line");
        let listeners = ews_relay::Listeners {
            relay: Some(TcpListener::bind(listen).await.unwrap()),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let addr = listeners.relay.as_ref().unwrap().local_addr().unwrap();
        let admin = listeners.admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(ews_relay::run(listeners, config, async {
            let _ = rx.await;
        }));
        let relay = Relay {
            addr,
            admin,
            cert: CertificateDer::from(Vec::new()),
            stop: Some(tx),
            handle: Some(handle),
            _cert: None,
        };
        relay.wait_ready().await;
        relay
    }

    /// Wait until the admin endpoint answers /healthz (the relay has loaded its certificate).
    pub async fn wait_ready(&self) {
        for _ in 0..500 {
            if let Ok((s, _)) = admin_get(self.admin, "/healthz").await {
                if s == StatusCode::OK {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("relay did not become healthy");
    }

    /// Ask the relay to shut down (as SIGTERM does) and wait until `run` returns.
    pub async fn stop(mut self) {
        self.stop_signal();
        self.join().await;
    }

    /// Send the shutdown signal without waiting.
    pub fn stop_signal(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Wait until `run` returns.
    pub async fn join(&mut self) {
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .expect("relay stopped in time")
                .expect("relay task")
                .expect("relay run");
        }
    }

    /// An HTTPS client connection to the relay from 127.0.0.1.
    pub async fn client(&self) -> SendRequest<Full<Bytes>> {
        https_client(self.addr, &self.cert, None)
            .await
            .expect("TLS connect")
    }

    /// The Prometheus metrics text.
    pub async fn metrics(&self) -> String {
        admin_get(self.admin, "/metrics").await.unwrap().1
    }

    /// The value of one metric line (exact series text before the value), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop_signal();
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// A client TLS configuration trusting only `cert`.
pub fn client_tls(cert: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
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

/// TCP connect from an optional local address.
pub async fn tcp_from(addr: SocketAddr, local: Option<IpAddr>) -> std::io::Result<TcpStream> {
    match local {
        None => TcpStream::connect(addr).await,
        Some(ip) => {
            let sock = if ip.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(addr).await
        }
    }
}

/// A TLS stream to the relay.
pub async fn tls_connect(
    addr: SocketAddr,
    cert: &CertificateDer<'static>,
    local: Option<IpAddr>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tcp_from(addr, local).await?;
    let connector = tokio_rustls::TlsConnector::from(client_tls(cert));
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// An HTTP/1.1-over-TLS client connection.
pub async fn https_client(
    addr: SocketAddr,
    cert: &CertificateDer<'static>,
    local: Option<IpAddr>,
) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let tls = tls_connect(addr, cert, local).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Send one request, return status, headers and the whole body.
pub async fn send(
    client: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, Bytes) {
    client.ready().await.expect("client ready");
    let resp = client.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, body)
}

/// A POST of `body` to `path`, addressed to localhost.
pub fn post(path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "localhost")
        .header("content-type", "text/xml; charset=utf-8")
        .body(Full::new(body.into()))
        .unwrap()
}

/// GET on the admin endpoint: status and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(StatusCode, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// What a test receiver saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

type Handler =
    Arc<dyn Fn(Seen) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>> + Send + Sync>;

/// A plain-HTTP receiver built on hyper that records every request.
pub struct TestReceiver {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TestReceiver {
    /// Answer every request with 200 and `body` as `text/xml`.
    pub async fn answering(body: Vec<u8>) -> Self {
        let body = Bytes::from(body);
        Self::with(Arc::new(move |_seen| {
            let body = body.clone();
            Box::pin(async move {
                Response::builder()
                    .status(200)
                    .header("content-type", "text/xml; charset=utf-8")
                    .header("x-receiver", "test")
                    .body(Full::new(body))
                    .unwrap()
            })
        }))
        .await
    }

    /// Answer with whatever `handler` returns.
    pub async fn with(handler: Handler) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen2, conns2) = (seen.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns2.fetch_add(1, Ordering::SeqCst);
                let seen = seen2.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            let handler = handler.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.unwrap().to_bytes();
                                let s = Seen {
                                    method: parts.method.to_string(),
                                    path: parts.uri.to_string(),
                                    headers: parts.headers,
                                    body,
                                };
                                seen.lock().unwrap().push(s.clone());
                                Ok::<_, std::convert::Infallible>(handler(s).await)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            seen,
            connections,
            task,
        }
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for TestReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address with nothing listening (bound, then closed).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// Read one HTTP/1.1 request (head plus Content-Length body) from a raw stream; None at EOF.
pub async fn read_raw_request(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(buf);
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Write a minimal keep-alive HTTP/1.1 200 answer.
pub async fn write_raw_ok(s: &mut TcpStream, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/xml; charset=utf-8\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
}
