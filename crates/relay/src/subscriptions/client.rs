//! Outbound EWS calls of the subscription manager: push `Subscribe` and SOAP Autodiscover
//! `GetUserSettings`, with the headers Exchange routes by, the credentials, a concurrency cap,
//! and every failure turned into an [`Action`] the manager can act on (PROTOCOL.md's table).

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_TYPE, COOKIE, RETRY_AFTER, SET_COOKIE};
use tokio::sync::Semaphore;

use crate::subscriptions::auth::{AuthError, Credentials};
use ews::{self, Action, EwsError};

/// Back-off after an HTTP 503 without `Retry-After`: Exchange is queuing requests.
const DEFAULT_503_BACKOFF: Duration = Duration::from_secs(30);
/// Largest EWS or Autodiscover answer read; a SubscribeResponse is about 1 KiB.
const MAX_EWS_RESPONSE: usize = 1 << 20;
/// Autodiscover redirects followed at most (RedirectAddress / RedirectUrl), against loops.
pub const MAX_AUTODISCOVER_REDIRECTS: usize = 3;
/// The cookie Exchange sets on a group's first Subscribe to pin the group's backend.
const BACKEND_COOKIE: &str = "X-BackEndOverrideCookie";

/// A failed call: what to do about it, and what to tell the operator.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What the manager should do.
    pub action: Action,
    /// The EWS response code or HTTP status, for state and metrics (`ErrorServerBusy`, `HTTP 503`).
    pub code: String,
    /// Human-readable detail for the status page.
    pub detail: String,
}

impl Failure {
    /// A failure with its action, code and detail.
    pub fn new(action: Action, code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            action,
            code: code.into(),
            detail: detail.into(),
        }
    }
}

/// A live subscription as Exchange created it.
#[derive(Debug, Clone)]
pub struct Subscribed {
    /// The new subscription id.
    pub subscription_id: String,
    /// The watermark it starts from.
    pub watermark: String,
    /// The group's backend cookie, when Exchange set one.
    pub backend_cookie: Option<String>,
}

/// How long `GetStreamingEvents` may take to answer with its head (200 and the first bytes of
/// the chunked body, or a refusal). Exchange answers at once; the events come later.
pub const STREAM_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Where and how to send one Subscribe.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// EWS URL for the mailbox.
    pub ews_url: &'a str,
    /// `X-AnchorMailbox`: the mailbox itself, or its group's anchor with affinity.
    pub anchor: &'a str,
    /// Send `X-PreferServerAffinity: true` (Autodiscover grouping).
    pub affinity: bool,
    /// The group's `X-BackEndOverrideCookie` value, once known.
    pub backend_cookie: Option<&'a str>,
}

/// What Autodiscover says about one mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// The mailbox asked about.
    pub mailbox: String,
    /// Its EWS URL, or why there is none.
    pub result: Result<(String, String), String>,
}

/// The EWS side of the manager.
pub struct EwsClient {
    http: reqwest::Client,
    trace: Option<super::trace::Tracer>,
    credentials: Arc<Credentials>,
    limit: Semaphore,
}

impl std::fmt::Debug for EwsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EwsClient").finish_non_exhaustive()
    }
}

impl EwsClient {
    /// A client allowing `max_concurrent` requests in flight.
    pub fn new(
        http: reqwest::Client,
        credentials: Arc<Credentials>,
        max_concurrent: usize,
        trace: Option<super::trace::Tracer>,
    ) -> Self {
        Self {
            http,
            trace,
            credentials,
            limit: Semaphore::new(max_concurrent),
        }
    }

    /// Subscribe `request.mailbox` at `target`.
    pub async fn subscribe(
        &self,
        target: Target<'_>,
        request: &ews::SubscribeRequest<'_>,
    ) -> Result<Subscribed, Failure> {
        let body = ews::build_subscribe(request)
            .map_err(|e| Failure::new(Action::Permanent, "InvalidRequest", e.to_string()))?;
        let (status, headers, answer) = self.post(target.ews_url, target, body).await?;
        let backend_cookie = backend_cookie(&headers);
        match ews::parse_subscribe_response(&answer) {
            Ok(r) => match (r.status.action(), r.subscription_id, r.watermark) {
                (Action::Success, Some(id), Some(w)) => Ok(Subscribed {
                    subscription_id: id.into_owned(),
                    watermark: w.into_owned(),
                    backend_cookie,
                }),
                (Action::Success, _, _) => Err(Failure::new(
                    Action::Transient,
                    "MissingSubscriptionId",
                    "SubscribeResponse without SubscriptionId or Watermark",
                )),
                (action, _, _) => {
                    let code = r.status.code.as_deref().unwrap_or("Error").to_owned();
                    let detail = r.status.message_text.as_deref().unwrap_or("").to_owned();
                    Err(Failure::new(action, code, detail))
                }
            },
            Err(e) => Err(http_failure(status, &headers, &answer, e)),
        }
    }

    /// Autodiscover `mailboxes` at `url`, following redirects (bounded).
    pub async fn discover(
        &self,
        url: &str,
        mailboxes: &[String],
    ) -> Result<Vec<Discovered>, Failure> {
        let mut out = Vec::with_capacity(mailboxes.len());
        // (original mailbox, address to ask, autodiscover url, hops)
        let mut pending: Vec<(String, String, String, usize)> = mailboxes
            .iter()
            .map(|m| (m.clone(), m.clone(), url.to_owned(), 0))
            .collect();
        while !pending.is_empty() {
            // Ask per URL, in batches the request builder accepts.
            let url = pending[0].2.clone();
            let (batch, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|p| p.2 == url);
            pending = rest;
            for chunk in batch.chunks(ews::MAX_AUTODISCOVER_USERS) {
                let asked: Vec<&str> = chunk.iter().map(|p| p.1.as_str()).collect();
                let body = ews::build_get_user_settings(&ews::GetUserSettingsRequest {
                    server_version: ews::DEFAULT_SERVER_VERSION,
                    url: &url,
                    mailboxes: &asked,
                })
                .map_err(|e| Failure::new(Action::Permanent, "InvalidRequest", e.to_string()))?;
                let target = Target {
                    ews_url: &url,
                    anchor: asked[0],
                    affinity: false,
                    backend_cookie: None,
                };
                let (status, headers, answer) = self.post(&url, target, body).await?;
                let parsed = ews::parse_get_user_settings_response(&answer)
                    .map_err(|e| http_failure(status, &headers, &answer, e))?;
                for (i, p) in chunk.iter().enumerate() {
                    let Some(user) = parsed.users.get(i) else {
                        out.push(Discovered {
                            mailbox: p.0.clone(),
                            result: Err("no UserResponse for this mailbox".into()),
                        });
                        continue;
                    };
                    match (&user.redirect, &user.external_ews_url) {
                        (Some(r), _) if p.3 >= MAX_AUTODISCOVER_REDIRECTS => out.push(Discovered {
                            mailbox: p.0.clone(),
                            result: Err(format!("more than {MAX_AUTODISCOVER_REDIRECTS} Autodiscover redirects (last: {r:?})")),
                        }),
                        (Some(ews::Redirect::Address(a)), _) => {
                            pending.push((p.0.clone(), a.to_string(), url.clone(), p.3 + 1))
                        }
                        (Some(ews::Redirect::Url(u)), _) => {
                            pending.push((p.0.clone(), p.1.clone(), u.to_string(), p.3 + 1))
                        }
                        (None, Some(ews_url)) => out.push(Discovered {
                            mailbox: p.0.clone(),
                            result: Ok((
                                ews_url.to_string(),
                                user.grouping_information.as_deref().unwrap_or("").to_owned(),
                            )),
                        }),
                        (None, None) => out.push(Discovered {
                            mailbox: p.0.clone(),
                            result: Err(format!(
                                "{}: {}",
                                user.error_code.as_deref().unwrap_or("no ExternalEwsUrl"),
                                user.error_message.as_deref().unwrap_or("")
                            )),
                        }),
                    }
                }
            }
        }
        Ok(out)
    }

    /// A streaming `Subscribe` of `request.mailbox` at `target`: its id (no watermark: streaming
    /// subscriptions have none) and the backend cookie, when Exchange set one.
    pub async fn subscribe_streaming(
        &self,
        target: Target<'_>,
        request: &ews::StreamingSubscribeRequest<'_>,
    ) -> Result<(String, Option<String>), Failure> {
        let body = ews::streaming_subscribe_request(request)
            .map_err(|e| Failure::new(Action::Permanent, "InvalidRequest", e.to_string()))?;
        let (status, headers, answer) = self.post(target.ews_url, target, body).await?;
        let cookie = backend_cookie(&headers);
        match ews::parse_subscribe_response(&answer) {
            Ok(r) => match (r.status.action(), r.subscription_id) {
                (Action::Success, Some(id)) => Ok((id.into_owned(), cookie)),
                (Action::Success, None) => Err(Failure::new(
                    Action::Transient,
                    "MissingSubscriptionId",
                    "SubscribeResponse without SubscriptionId",
                )),
                (action, _) => Err(Failure::new(
                    action,
                    r.status.code.as_deref().unwrap_or("Error"),
                    r.status.message_text.as_deref().unwrap_or(""),
                )),
            },
            Err(e) => Err(http_failure(status, &headers, &answer, e)),
        }
    }

    /// `Unsubscribe` a streaming subscription (best effort: it expires anyway once no
    /// connection serves it).
    /// `Unsubscribe` subscription `id` of `mailbox`, impersonating it (app-only OAuth needs
    /// `ExchangeImpersonation` on every call, as for the Subscribe that made it).
    pub async fn unsubscribe(
        &self,
        target: Target<'_>,
        mailbox: &str,
        id: &str,
    ) -> Result<(), Failure> {
        let body = ews::unsubscribe_request(id, Some(mailbox), ews::DEFAULT_SERVER_VERSION)
            .map_err(|e| Failure::new(Action::Permanent, "InvalidRequest", e.to_string()))?;
        let (status, headers, answer) = self.post(target.ews_url, target, body).await?;
        match ews::parse_unsubscribe_response(&answer) {
            Ok(s) if s.action() == Action::Success => Ok(()),
            Ok(s) => Err(Failure::new(
                s.action(),
                s.code.as_deref().unwrap_or("Error"),
                s.message_text.as_deref().unwrap_or(""),
            )),
            Err(e) => Err(http_failure(status, &headers, &answer, e)),
        }
    }

    /// Open a `GetStreamingEvents` connection: the response whose body carries the envelopes,
    /// once Exchange answered 200. `lifetime` replaces the client's whole-request timeout (the
    /// body stays open for the connection's `ConnectionTimeout`). The concurrency permit is
    /// held only until the answer's head has arrived.
    pub async fn open_stream(
        &self,
        target: Target<'_>,
        body: String,
        lifetime: Duration,
    ) -> Result<reqwest::Response, Failure> {
        let permit = self
            .limit
            .acquire()
            .await
            .map_err(|_| Failure::new(Action::Transient, "ShuttingDown", "client closed"))?;
        for attempt in 0..2 {
            let req = self
                .request(target.ews_url, target, body.clone())
                .timeout(lifetime);
            let req = self
                .credentials
                .apply(req)
                .await
                .map_err(auth_failure)?
                .build()
                .map_err(|e| Failure::new(Action::Permanent, "InvalidRequest", e.to_string()))?;
            // The whole request may live for `lifetime`, but its answer's head must come
            // soon: a server that accepts and never answers would hold the group without a
            // connection (the silence watchdog starts only with the body).
            let resp = match tokio::time::timeout(STREAM_HEAD_TIMEOUT, self.http.execute(req)).await
            {
                Ok(r) => r.map_err(|e| {
                    Failure::new(Action::Transient, "ConnectionFailed", error_chain(&e))
                })?,
                Err(_) => {
                    return Err(Failure::new(
                        Action::Transient,
                        "Timeout",
                        format!(
                            "no answer to GetStreamingEvents within {}s",
                            STREAM_HEAD_TIMEOUT.as_secs()
                        ),
                    ))
                }
            };
            let status = resp.status();
            if status == reqwest::StatusCode::UNAUTHORIZED
                && attempt == 0
                && self.credentials.refreshable()
            {
                self.credentials.invalidate().await;
                continue;
            }
            if status == reqwest::StatusCode::UNAUTHORIZED {
                return Err(Failure::new(
                    Action::Permanent,
                    "HTTP 401",
                    "EWS refused the credentials",
                ));
            }
            if status.is_success() {
                drop(permit);
                return Ok(resp);
            }
            let headers = resp.headers().clone();
            let answer = read_limited(resp).await?;
            let e = ews::parse_fault(&answer)
                .map(|f| EwsError::Fault(Box::new(f)))
                .unwrap_or_else(|e| e);
            return Err(http_failure(status, &headers, &answer, e));
        }
        unreachable!("the loop returns on its second pass")
    }

    /// A POST with the routing headers Exchange wants (no credentials yet).
    fn request(&self, url: &str, target: Target<'_>, body: String) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "text/xml; charset=utf-8")
            .header("X-AnchorMailbox", target.anchor)
            .body(body);
        if target.affinity {
            req = req.header("X-PreferServerAffinity", "true");
        }
        if let Some(c) = target.backend_cookie {
            req = req.header(COOKIE, format!("{BACKEND_COOKIE}={c}"));
        }
        req
    }

    /// POST a SOAP body with credentials, refreshing an OAuth token once on 401.
    async fn post(
        &self,
        url: &str,
        target: Target<'_>,
        body: String,
    ) -> Result<(reqwest::StatusCode, http::HeaderMap, bytes::Bytes), Failure> {
        let _permit = self
            .limit
            .acquire()
            .await
            .map_err(|_| Failure::new(Action::Transient, "ShuttingDown", "client closed"))?;
        for attempt in 0..2 {
            let mut req = self
                .http
                .post(url)
                .header(CONTENT_TYPE, "text/xml; charset=utf-8")
                .header("X-AnchorMailbox", target.anchor)
                .body(body.clone());
            if target.affinity {
                req = req.header("X-PreferServerAffinity", "true");
            }
            if let Some(c) = target.backend_cookie {
                req = req.header(COOKIE, format!("{BACKEND_COOKIE}={c}"));
            }
            let req = self
                .credentials
                .apply(req)
                .await
                .map_err(auth_failure)?
                .build()
                .map_err(|e| Failure::new(Action::Permanent, "InvalidRequest", e.to_string()))?;
            let request_headers = self.trace.as_ref().map(|_| req.headers().clone());
            let resp = match self.http.execute(req).await {
                Ok(r) => r,
                Err(e) => {
                    if let (Some(t), Some(h)) = (&self.trace, &request_headers) {
                        t.record(url, h, body.as_bytes(), Err(&e.to_string())).await;
                    }
                    return Err(Failure::new(
                        Action::Transient,
                        "ConnectionFailed",
                        e.to_string(),
                    ));
                }
            };
            let status = resp.status();
            if status == reqwest::StatusCode::UNAUTHORIZED
                && attempt == 0
                && self.credentials.refreshable()
            {
                tracing::info!("EWS answered 401; fetching a fresh token and retrying once");
                self.credentials.invalidate().await;
                continue;
            }
            let headers = resp.headers().clone();
            let answer = read_limited(resp).await?;
            if let (Some(t), Some(h)) = (&self.trace, &request_headers) {
                t.record(
                    url,
                    h,
                    body.as_bytes(),
                    Ok((status.as_u16(), &headers, &answer)),
                )
                .await;
            }
            if status == reqwest::StatusCode::UNAUTHORIZED {
                let detail = if self.credentials.refreshable() {
                    "EWS refused the credentials (after a token refresh): check the app's full_access_as_app permission"
                } else {
                    "EWS refused the credentials: check the service account's --username and password"
                };
                return Err(Failure::new(Action::Permanent, "HTTP 401", detail));
            }
            return Ok((status, headers, answer));
        }
        unreachable!("the loop returns on its second pass")
    }
}

/// The `X-BackEndOverrideCookie` value Exchange set, if any.
fn backend_cookie(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| {
            c.split(';')
                .next()
                .and_then(|kv| kv.trim().strip_prefix(BACKEND_COOKIE))
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        })
}

/// An error with its causes, so "error sending request" says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

async fn read_limited(resp: reqwest::Response) -> Result<bytes::Bytes, Failure> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_EWS_RESPONSE as u64)
    {
        return Err(Failure::new(
            Action::Transient,
            "ResponseTooLarge",
            "EWS answer too large",
        ));
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| Failure::new(Action::Transient, "ConnectionFailed", e.to_string()))?;
    if body.len() > MAX_EWS_RESPONSE {
        return Err(Failure::new(
            Action::Transient,
            "ResponseTooLarge",
            "EWS answer too large",
        ));
    }
    Ok(body)
}

/// An answer that did not parse as the expected message: a fault, 503, or garbage.
fn http_failure(
    status: reqwest::StatusCode,
    headers: &http::HeaderMap,
    body: &[u8],
    parse_error: EwsError,
) -> Failure {
    if let EwsError::Fault(f) = &parse_error {
        return Failure::new(
            f.action(),
            f.response_code.clone().unwrap_or_else(|| f.code.clone()),
            f.message.clone(),
        );
    }
    if let Ok(f) = ews::parse_fault(body) {
        return Failure::new(
            f.action(),
            f.response_code.clone().unwrap_or_else(|| f.code.clone()),
            f.message.clone(),
        );
    }
    if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
    {
        let wait = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_503_BACKOFF);
        return Failure::new(
            Action::BackOff(wait),
            format!("HTTP {}", status.as_u16()),
            "EWS is queuing requests",
        );
    }
    if status.is_server_error() {
        return Failure::new(
            Action::Transient,
            format!("HTTP {}", status.as_u16()),
            parse_error.to_string(),
        );
    }
    Failure::new(
        Action::Permanent,
        format!("HTTP {}", status.as_u16()),
        format!("unexpected answer: {parse_error}"),
    )
}

fn auth_failure(e: AuthError) -> Failure {
    match e {
        AuthError::Unreachable(d) => Failure::new(Action::Transient, "TokenEndpointUnreachable", d),
        AuthError::Refused { status, detail } => {
            Failure::new(Action::Permanent, format!("Token HTTP {status}"), detail)
        }
        AuthError::Malformed(d) => Failure::new(Action::Transient, "TokenMalformed", d),
    }
}
