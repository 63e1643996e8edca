//! Pushes: one task per subscription POSTs `SendNotification` to the callback URL, the way
//! Exchange does: a StatusEvent at once, events as they happen, a StatusEvent keep-alive when
//! idle, and on failure retries after 30 s doubling until the next wait would pass
//! StatusFrequency minutes (both scaled by the time factor), after which the subscription is
//! dead.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::soap::{self, PushEvent};
use super::state::{EndReason, SubscriptionState};
use super::{CallbackTrust, Shared};
use ews::{parse_send_notification_result, EventType, SubscriptionStatus};

/// Largest answer read from a callback: a `SendNotificationResult` is a few hundred bytes.
const MAX_ANSWER: usize = 64 * 1024;

/// Exchange's first retry wait; later ones double (PROTOCOL.md, "Retries and liveness").
const FIRST_RETRY: Duration = Duration::from_secs(30);

/// The User-Agent Exchange's push client sends, so a callback logging it sees something real.
const USER_AGENT: &str = "ExchangeServicesClient/15.20.8722.12";

/// Why one push got no good answer.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The callback URL cannot be used.
    #[error("callback URL: {0}")]
    Url(String),
    /// TCP connect or TLS handshake failed.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The callback answered something other than 200.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The answer is not a `SendNotificationResult`.
    #[error("answer: {0}")]
    Answer(String),
    /// No answer within the push timeout.
    #[error("timed out")]
    Timeout,
}

/// Makes the client TLS configuration for HTTPS callbacks.
pub fn client_tls(trust: &CallbackTrust) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?;
    let mut config = match trust {
        CallbackTrust::Roots(certs) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs {
                roots.add(cert.clone())?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        CallbackTrust::InsecureAcceptAny => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `--callback-insecure`: accepts any certificate but still checks handshake signatures, so
/// the connection is at least encrypted to whoever holds the presented key.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// POSTs one `SendNotification` and reads the callback's verdict.
pub async fn post(
    shared: &Shared,
    url: &str,
    body: String,
) -> Result<SubscriptionStatus, PushError> {
    match tokio::time::timeout(shared.config.push_timeout, post_inner(shared, url, body)).await {
        Ok(result) => result,
        Err(_) => Err(PushError::Timeout),
    }
}

async fn post_inner(
    shared: &Shared,
    url: &str,
    body: String,
) -> Result<SubscriptionStatus, PushError> {
    let answer = send(shared, url, "text/xml; charset=utf-8", USER_AGENT, body).await?;
    if answer.status != http::StatusCode::OK {
        return Err(PushError::Status(answer.status.as_u16()));
    }
    parse_send_notification_result(&answer.body).map_err(|e| PushError::Answer(e.to_string()))
}

/// A callback's answer to one POST.
#[derive(Debug)]
pub(crate) struct Answer {
    /// Its status.
    pub status: http::StatusCode,
    /// Its `Content-Type`, if any.
    pub content_type: Option<String>,
    /// Its body (at most [`MAX_ANSWER`] bytes read).
    pub body: Bytes,
}

/// POSTs `body` to `url` on a new connection (HTTPS with the callback trust, or HTTP) and
/// reads the answer. No timeout here: each caller has its own limit. Shared by EWS pushes and
/// Graph's validation and notification POSTs, which differ only in what they send and expect.
pub(crate) async fn send(
    shared: &Shared,
    url: &str,
    content_type: &'static str,
    user_agent: &'static str,
    body: String,
) -> Result<Answer, PushError> {
    let uri: Uri = url.parse().map_err(|e| PushError::Url(format!("{e}")))?;
    let https = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(PushError::Url("not http or https".into())),
    };
    let host = uri.host().ok_or_else(|| PushError::Url("no host".into()))?;
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.to_owned());
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let tcp = TcpStream::connect((bare_host.as_str(), port))
        .await
        .map_err(PushError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let request = Request::post(path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::USER_AGENT, user_agent)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| PushError::Http(e.to_string()))?;
    if https {
        let name = ServerName::try_from(bare_host)
            .map_err(|e| PushError::Url(format!("host name: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(shared.client_tls.clone())
            .connect(name, tcp)
            .await
            .map_err(PushError::Connect)?;
        exchange(TokioIo::new(tls), request).await
    } else {
        exchange(TokioIo::new(tcp), request).await
    }
}

async fn exchange<T>(io: T, request: Request<Full<Bytes>>) -> Result<Answer, PushError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| PushError::Http(e.to_string()))?;
    let connection = tokio::spawn(connection);
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| PushError::Http(e.to_string()))?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| PushError::Http(e.to_string()))?
            .to_bytes();
        Ok(Answer {
            status,
            content_type,
            body,
        })
    }
    .await;
    // One push per connection, as Exchange opens them; closing is not our concern.
    connection.abort();
    result
}

/// What the next push carries.
enum Job {
    Status,
    Events {
        events: Vec<PushEvent>,
        cursor: u64,
        more: bool,
    },
    ReadEventsFailed,
}

/// Starts the push task of a new subscription.
pub fn spawn(shared: &Arc<Shared>, id: String) {
    let task_shared = shared.clone();
    let mut tasks = shared.lock_tasks();
    // Reap finished tasks so the set stays as big as the live subscriptions.
    while tasks.try_join_next().is_some() {}
    tasks.spawn(push_loop(task_shared, id));
}

async fn push_loop(shared: Arc<Shared>, id: String) {
    let mut shutdown = shared.shutdown.subscribe();
    let Some(wake) = shared.lock().subscriptions.get(&id).map(|s| s.wake.clone()) else {
        return;
    };
    let mut last_ok = Instant::now();
    loop {
        // Decide what to send, or wait until there is something.
        let job = loop {
            let next = {
                let mut state = shared.lock();
                let Some(sub) = state.subscriptions.get(&id) else {
                    return;
                };
                if matches!(sub.state, SubscriptionState::Ended(_)) {
                    return;
                }
                if sub.error_requested {
                    Some(Job::ReadEventsFailed)
                } else if !sub.initial_sent {
                    Some(Job::Status)
                } else {
                    match state.next_events(&id) {
                        Some((events, cursor, _)) if events.is_empty() => {
                            // Only events of types it did not ask for: pass them silently.
                            if let Some(sub) = state.subscriptions.get_mut(&id) {
                                sub.cursor = cursor;
                            }
                            continue;
                        }
                        Some((events, cursor, more)) => Some(Job::Events {
                            events,
                            cursor,
                            more,
                        }),
                        None => None,
                    }
                }
            };
            if let Some(job) = next {
                break job;
            }
            let due = last_ok + shared.config.status_period;
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep_until(due) => break Job::Status,
                _ = shutdown.changed() => return,
            }
        };

        // Build the body; a StatusEvent gets a fresh watermark at the cursor.
        let mut last_watermark = None;
        let (url, body, frequency) = {
            let mut state = shared.lock();
            let Some(sub) = state.subscriptions.get(&id) else {
                return;
            };
            let (url, mailbox, cursor, previous) = (
                sub.url.clone(),
                sub.mailbox.clone(),
                sub.cursor,
                sub.previous_watermark.clone(),
            );
            let frequency = sub.status_frequency;
            let body = match &job {
                Job::ReadEventsFailed => soap::send_notification_error(&id),
                Job::Status => {
                    let watermark = state.watermark(&mailbox, cursor);
                    last_watermark = Some(watermark.clone());
                    let status = PushEvent {
                        kind: EventType::Status,
                        watermark,
                        timestamp: None,
                        item_id: None,
                        parent_folder_id: None,
                    };
                    soap::send_notification(&id, &previous, false, &[status])
                }
                Job::Events { events, more, .. } => {
                    last_watermark = events.last().map(|e| e.watermark.clone());
                    soap::send_notification(&id, &previous, *more, events)
                }
            };
            (url, body, frequency)
        };
        // Deliver, retrying on Exchange's schedule.
        let factor = shared.config.time_factor;
        let budget = Duration::from_secs(u64::from(frequency) * 60).mul_f64(factor);
        let mut wait = FIRST_RETRY.mul_f64(factor);
        let mut waited = Duration::ZERO;
        let verdict = loop {
            let outcome = post(&shared, &url, body.clone()).await;
            // Decide under the lock, in a block so the guard is gone before the next await.
            let decision = {
                let mut state = shared.lock();
                match state.subscriptions.get_mut(&id) {
                    None => None,
                    Some(sub) if matches!(sub.state, SubscriptionState::Ended(_)) => None,
                    Some(sub) => match outcome {
                        Ok(verdict) => {
                            sub.counters.pushes_ok += 1;
                            sub.state = SubscriptionState::Active;
                            Some(Ok(verdict))
                        }
                        Err(e) => {
                            sub.counters.pushes_failed += 1;
                            sub.state = SubscriptionState::Retrying;
                            tracing::debug!(subscription = %id, error = %e, "push failed");
                            if waited + wait > budget {
                                tracing::info!(subscription = %id, "no answer within StatusFrequency: subscription dead");
                                state.end(&id, EndReason::RetriesExhausted);
                                None
                            } else {
                                Some(Err(()))
                            }
                        }
                    },
                }
            };
            shared.changed();
            match decision {
                None => return,
                Some(Ok(verdict)) => break verdict,
                Some(Err(())) => {}
            }
            let deadline = Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = wake.notified() => {
                        let ended = shared.lock().subscriptions.get(&id)
                            .is_none_or(|s| matches!(s.state, SubscriptionState::Ended(_)));
                        if ended {
                            return;
                        }
                    }
                    _ = shutdown.changed() => return,
                }
            }
            waited += wait;
            wait *= 2;
        };

        // Commit what was delivered.
        last_ok = Instant::now();
        {
            let mut state = shared.lock();
            let Some(sub) = state.subscriptions.get_mut(&id) else {
                return;
            };
            sub.last_push_ok = Some(SystemTime::now());
            if let Some(watermark) = last_watermark {
                sub.previous_watermark = watermark;
            }
            let ended = match job {
                Job::Status => {
                    sub.initial_sent = true;
                    sub.counters.status_events += 1;
                    None
                }
                Job::Events { events, cursor, .. } => {
                    sub.cursor = cursor;
                    sub.counters.events_delivered += events.len() as u64;
                    None
                }
                Job::ReadEventsFailed => Some(EndReason::ReadEventsFailed),
            };
            let ended = match verdict {
                SubscriptionStatus::Unsubscribe => Some(EndReason::Unsubscribed),
                SubscriptionStatus::Ok => ended,
            };
            if let Some(reason) = ended {
                state.end(&id, reason);
            }
        }
        shared.changed();
    }
}
