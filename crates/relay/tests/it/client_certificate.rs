//! The certificate credential (`--client-certificate`, `--client-certificate-key`) and tokens
//! per audience: what the token endpoint receives, checked by a token endpoint of our own on
//! 127.0.0.1:0 (the simulator's only knows client secrets), and the start-up errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use ews_relay::config::{Auth, ClientCredential};
use ews_relay::subscriptions::auth::{http_client, Credentials, EWS_SCOPE, GRAPH_SCOPE};

use crate::common::test_cert;

const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A token request's form fields, in order.
type Form = Vec<(String, String)>;

/// A token endpoint that records each request's form fields and hands out numbered tokens.
struct TokenEndpoint {
    url: String,
    requests: Arc<Mutex<Vec<Form>>>,
}

impl TokenEndpoint {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Form>>> = Default::default();
        let recorded = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| {
                            let recorded = recorded.clone();
                            async move {
                                let body = req.into_body().collect().await?.to_bytes();
                                let form = parse_form(&String::from_utf8_lossy(&body));
                                let n = {
                                    let mut r = recorded.lock().unwrap();
                                    r.push(form);
                                    r.len()
                                };
                                let answer = format!(
                                    r#"{{"token_type":"Bearer","expires_in":3600,"access_token":"token-{n}"}}"#
                                );
                                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(answer))))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            url: format!("http://{addr}/contoso.onmicrosoft.com/oauth2/v2.0/token"),
            requests,
        }
    }

    fn requests(&self) -> Vec<Form> {
        self.requests.lock().unwrap().clone()
    }
}

fn parse_form(body: &str) -> Form {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Managed-mode flags with `--auth oauth` against `token_url`, plus `extra`.
fn config(token_url: &str, extra: &[&str]) -> Result<ews_relay::Config, String> {
    let mut words = vec![
        "ews-relay",
        "--ews-url",
        "https://ews.example.com/EWS/Exchange.asmx",
        "--mailbox",
        "room1@example.com",
        "--callback-url",
        "https://relay.example.com/ews/push",
        "--path-prefix",
        "/ews",
        "--auth",
        "oauth",
        "--client-id",
        CLIENT_ID,
        "--oauth-token-url",
        token_url,
    ];
    words.extend_from_slice(extra);
    ews_relay::Config::parse_from(words).map_err(|e| e.to_string())
}

fn certificate_flags() -> Vec<String> {
    vec![
        "--client-certificate".into(),
        fixture("client-cert.pem").display().to_string(),
        "--client-certificate-key".into(),
        fixture("client-key.pem").display().to_string(),
    ]
}

fn auth_of(c: &ews_relay::Config) -> Auth {
    c.managed.as_ref().unwrap().auth.clone()
}

/// Fetch a token through `creds` (by authorising a request that is never sent) and return the
/// Authorization header it would carry.
async fn authorize(creds: &Credentials) -> String {
    let http = http_client(None).unwrap();
    let req = creds
        .apply(http.get("http://127.0.0.1:9/EWS/Exchange.asmx"))
        .await
        .unwrap()
        .build()
        .unwrap();
    req.headers()["authorization"].to_str().unwrap().to_owned()
}

fn decode_json(part: &str) -> serde_json::Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// Promise: with a certificate, the token request carries a PS256 client assertion that
/// verifies with the certificate's public key, names the certificate by its SHA-256
/// thumbprint, is addressed to the token endpoint, is issued by the client id, expires soon
/// and has a jti of its own; no client secret is sent.
#[tokio::test]
async fn certificate_token_request_carries_a_verifiable_assertion_and_no_secret() {
    let endpoint = TokenEndpoint::start().await;
    let flags = certificate_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let c = config(&endpoint.url, &flags).unwrap();
    let auth = auth_of(&c);
    assert!(
        matches!(
            &auth,
            Auth::OAuth {
                credential: ClientCredential::Certificate(_),
                ..
            }
        ),
        "{auth:?}"
    );
    let creds = Credentials::new(auth, http_client(None).unwrap(), EWS_SCOPE);
    assert_eq!(authorize(&creds).await, "Bearer token-1");
    assert_eq!(authorize(&creds).await, "Bearer token-1", "cached");
    creds.invalidate().await;
    assert_eq!(authorize(&creds).await, "Bearer token-2", "fetched again");

    let cert_der = CertificateDer::from_pem_file(fixture("client-cert.pem")).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(cert_der.as_ref()).unwrap();
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PSS_2048_8192_SHA256,
        x509.public_key().subject_public_key.data.to_vec(),
    );
    let thumbprint = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        cert_der.as_ref(),
    ));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();

    let requests = endpoint.requests();
    assert_eq!(requests.len(), 2);
    let mut jtis = Vec::new();
    for form in &requests {
        assert_eq!(field(form, "grant_type"), Some("client_credentials"));
        assert_eq!(field(form, "client_id"), Some(CLIENT_ID));
        assert_eq!(field(form, "scope"), Some(EWS_SCOPE));
        assert_eq!(
            field(form, "client_assertion_type"),
            Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        );
        assert_eq!(field(form, "client_secret"), None, "no secret: {form:?}");
        let jwt = field(form, "client_assertion").expect("client_assertion");
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{jwt}");
        public
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .expect("the assertion verifies with the certificate's public key");

        let header = decode_json(parts[0]);
        assert_eq!(header["alg"], "PS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["x5t#S256"], thumbprint.as_str());

        let claims = decode_json(parts[1]);
        assert_eq!(claims["aud"], endpoint.url.as_str());
        assert_eq!(claims["iss"], CLIENT_ID);
        assert_eq!(claims["sub"], CLIENT_ID);
        let (nbf, exp) = (
            claims["nbf"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        assert!(nbf.abs_diff(now) <= 60, "nbf {nbf} now {now}");
        assert_eq!(claims["iat"].as_u64(), Some(nbf));
        assert!(exp > now && exp - nbf <= 600, "nbf {nbf} exp {exp}");
        jtis.push(claims["jti"].as_str().unwrap().to_owned());
    }
    assert_ne!(jtis[0], jtis[1], "every assertion has its own jti");
}

/// Promise: one identity, two audiences: Graph credentials ask for the Graph scope, EWS
/// credentials for the EWS scope, each with its own token.
#[tokio::test]
async fn graph_credentials_ask_for_the_graph_scope_and_ews_for_ews() {
    let endpoint = TokenEndpoint::start().await;
    let flags = certificate_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let auth = auth_of(&config(&endpoint.url, &flags).unwrap());
    let http = http_client(None).unwrap();
    let ews = Credentials::new(auth.clone(), http.clone(), EWS_SCOPE);
    let graph = Credentials::new(auth, http, GRAPH_SCOPE);
    assert_eq!(GRAPH_SCOPE, "https://graph.microsoft.com/.default");
    assert_eq!(EWS_SCOPE, "https://outlook.office365.com/.default");

    let g = authorize(&graph).await;
    let e = authorize(&ews).await;
    assert_ne!(g, e, "a token per audience");
    let requests = endpoint.requests();
    assert_eq!(field(&requests[0], "scope"), Some(GRAPH_SCOPE));
    assert_eq!(field(&requests[1], "scope"), Some(EWS_SCOPE));

    // The same with a client secret.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let auth = auth_of(
        &config(
            &endpoint.url,
            &["--client-secret-file", secret.to_str().unwrap()],
        )
        .unwrap(),
    );
    let http = http_client(None).unwrap();
    authorize(&Credentials::new(auth.clone(), http.clone(), GRAPH_SCOPE)).await;
    authorize(&Credentials::new(auth, http, EWS_SCOPE)).await;
    let requests = endpoint.requests();
    assert_eq!(field(&requests[2], "scope"), Some(GRAPH_SCOPE));
    assert_eq!(field(&requests[3], "scope"), Some(EWS_SCOPE));
    assert_eq!(field(&requests[3], "client_secret"), Some("s3cret"));
    assert_eq!(field(&requests[3], "client_assertion"), None);
}

/// Promise: a wrong certificate configuration stops start-up with a message naming the flag
/// at fault (exit 64 via ConfigError); a PKCS#1 key is as good as a PKCS#8 one.
#[test]
fn certificate_configuration_errors_name_the_flag() {
    let url = "https://login.example.com/t/oauth2/v2.0/token";
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let secret = secret.display().to_string();
    let cert = fixture("client-cert.pem").display().to_string();
    let key = fixture("client-key.pem").display().to_string();
    let other_key = fixture("other-key.pem").display().to_string();
    let missing = dir.path().join("missing.pem").display().to_string();
    let ec = test_cert();
    let ec_cert = ec.cert_path.display().to_string();
    let ec_key = ec.key_path.display().to_string();

    let cases: &[(&[&str], &str, &str)] = &[
        // Both a secret and a certificate.
        (
            &[
                "--client-secret-file",
                &secret,
                "--client-certificate",
                &cert,
                "--client-certificate-key",
                &key,
            ],
            "--client-certificate:",
            "--client-secret-file",
        ),
        // Neither.
        (&[], "--client-secret-file:", "--client-certificate"),
        // A certificate without its key, and a key without its certificate.
        (
            &["--client-certificate", &cert],
            "--client-certificate-key:",
            "required",
        ),
        (
            &["--client-certificate-key", &key],
            "--client-certificate:",
            "required",
        ),
        // A key that is not the certificate's.
        (
            &[
                "--client-certificate",
                &cert,
                "--client-certificate-key",
                &other_key,
            ],
            "--client-certificate-key:",
            "not the private key",
        ),
        // Unreadable files.
        (
            &[
                "--client-certificate",
                &missing,
                "--client-certificate-key",
                &key,
            ],
            "--client-certificate:",
            "missing.pem",
        ),
        (
            &[
                "--client-certificate",
                &cert,
                "--client-certificate-key",
                &missing,
            ],
            "--client-certificate-key:",
            "missing.pem",
        ),
        // The key file holds a certificate, the certificate file a key.
        (
            &[
                "--client-certificate",
                &key,
                "--client-certificate-key",
                &key,
            ],
            "--client-certificate:",
            "no PEM block",
        ),
        (
            &[
                "--client-certificate",
                &cert,
                "--client-certificate-key",
                &cert,
            ],
            "--client-certificate-key:",
            "no PEM block",
        ),
        // An ECDSA certificate: Entra ID's client assertions are RSA.
        (
            &[
                "--client-certificate",
                &ec_cert,
                "--client-certificate-key",
                &ec_key,
            ],
            "--client-certificate:",
            "not an RSA certificate",
        ),
    ];
    for (extra, flag, detail) in cases {
        let e = config(url, extra).unwrap_err();
        assert!(e.starts_with(flag), "{extra:?}: {e}");
        assert!(e.contains(detail), "{extra:?}: {e}");
    }

    let pkcs1 = fixture("client-key-pkcs1.pem").display().to_string();
    let c = config(
        url,
        &[
            "--client-certificate",
            &cert,
            "--client-certificate-key",
            &pkcs1,
        ],
    );
    assert!(c.is_ok(), "PKCS#1 key: {:?}", c.err());
}

/// Promise: the private key never shows in the configuration's Debug output.
#[test]
fn certificate_key_is_not_in_debug_output() {
    let flags = certificate_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let c = config("https://login.example.com/t/oauth2/v2.0/token", &flags).unwrap();
    let debug = format!("{c:?}");
    assert!(debug.contains("ClientCertificate"), "{debug}");

    let pem = std::fs::read_to_string(fixture("client-key.pem")).unwrap();
    for line in pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!debug.contains(line), "a line of the key's PEM is printed");
    }
    let PrivateKeyDer::Pkcs8(der) =
        PrivateKeyDer::from_pem_file(fixture("client-key.pem")).unwrap()
    else {
        panic!("PKCS#8 fixture")
    };
    // The private exponent and primes, as Debug would print bytes (decimal or hex), in pieces.
    let der = der.secret_pkcs8_der();
    for chunk in der[64..].chunks(16).take(8) {
        let decimal = format!("{:?}", chunk);
        let decimal = &decimal[1..decimal.len() - 1];
        let hex: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!debug.contains(decimal), "key bytes printed");
        assert!(!debug.contains(&hex), "key bytes printed in hex");
    }
}
