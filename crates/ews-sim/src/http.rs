//! The simulator's one listener: accepts connections (TLS when configured), serves HTTP/1.1,
//! and routes to EWS, Autodiscover, the token endpoint and the control API.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CONTENT_TYPE, COOKIE, RETRY_AFTER, SET_COOKIE, WWW_AUTHENTICATE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};

use super::soap::{self, RequestError, UserAnswer};
use super::state::{
    IssuedToken, RecordedRequest, Subscription, SubscriptionCounters, SubscriptionState,
};
use super::stream_soap::{self, EwsRequest};
use super::streaming;
use super::util::{base64, parse_form, random_bytes, random_token, unbase64};
use super::{graph, push, Auth, MailboxRedirect, Shared, SimError, SimHandle, SHUTDOWN_GRACE};
use ews::EventType;

/// The EWS endpoint path (matched case-insensitively, as IIS does).
pub const EWS_PATH: &str = "/EWS/Exchange.asmx";
/// The SOAP Autodiscover endpoint path.
pub const AUTODISCOVER_PATH: &str = "/autodiscover/autodiscover.svc";
/// The token endpoint path without a tenant.
pub const TOKEN_PATH: &str = "/oauth2/v2.0/token";
/// Prefix of the control API.
pub const CONTROL_PREFIX: &str = "/_sim/";

/// Largest request body accepted. A Subscribe is about 1 KiB and a GetUserSettings for 100
/// mailboxes about 10 KiB; anything near this limit is not Exchange traffic.
pub const MAX_BODY: usize = 256 * 1024;

/// Connections served at once; more wait in the accept queue. Exchange itself allows about 27
/// concurrent requests per account; a simulator needs no more than a few hundred.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a client may take to send request headers before the connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a whole request body may take to arrive.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Name of the affinity cookie Exchange returns to `X-PreferServerAffinity: true`.
pub const AFFINITY_COOKIE: &str = "X-BackEndOverrideCookie";

type Body = Full<Bytes>;

/// What the listener answers with: a whole body, or a `GetStreamingEvents` stream.
pub(crate) type OutBody = BoxBody<Bytes, std::io::Error>;

/// A whole-body response as the listener's body type.
fn boxed(response: Response<Body>) -> Response<OutBody> {
    response.map(|body| body.map_err(|never| match never {}).boxed())
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let acceptor = shared
        .config
        .tls
        .clone()
        .map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let service = service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(shared, req).await) }
        });
        match &acceptor {
            None => {
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                // The handshake runs in the connection's task, bounded like the headers.
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls =
                        tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await;
                    if let Ok(Ok(tls)) = tls {
                        let conn = builder.serve_connection(TokioIo::new(tls), service);
                        let _ = watcher.watch(conn).await;
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    // Streaming connections would hold the drain for the whole grace: tell them (and the push
    // tasks) to stop now.
    shared.shutdown.send_replace(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<OutBody> {
    let path = req.uri().path().to_owned();
    let lower = path.to_ascii_lowercase();
    if let Some(route) = path.strip_prefix(CONTROL_PREFIX) {
        let route = route.to_owned();
        return boxed(control(shared, req, &route).await);
    }
    if let Some(rest) = graph_rest(&path) {
        let rest = rest.to_owned();
        let (parts, body) = req.into_parts();
        let body = match read_body(body).await {
            Ok(body) => body,
            Err(status) => return boxed(text(status, "request body too large or too slow\n")),
        };
        let seq = record(&shared, &parts, &body);
        let response = graph::handle(&shared, &parts.method, &rest, &parts.headers, &body).await;
        shared
            .lock()
            .finish_request(seq, response.status().as_u16(), None);
        shared.changed();
        return boxed(response);
    }
    if req.method() != Method::POST {
        return boxed(text(StatusCode::METHOD_NOT_ALLOWED, "POST only\n"));
    }
    let (parts, body) = req.into_parts();
    let body = match read_body(body).await {
        Ok(body) => body,
        Err(status) => return boxed(text(status, "request body too large or too slow\n")),
    };
    if lower == EWS_PATH.to_ascii_lowercase() {
        let seq = record(&shared, &parts, &body);
        let (response, code) = ews(&shared, &parts.headers, &body).await;
        shared
            .lock()
            .finish_request(seq, response.status().as_u16(), code);
        shared.changed();
        response
    } else if lower == AUTODISCOVER_PATH {
        let seq = record(&shared, &parts, &body);
        let response = autodiscover(&shared, &parts.headers, &body);
        shared
            .lock()
            .finish_request(seq, response.status().as_u16(), None);
        shared.changed();
        boxed(response)
    } else if lower == TOKEN_PATH || is_tenant_token_path(&lower) {
        // The record is readable by anyone on the control API: keep the secret out of it.
        let redacted: Vec<String> = String::from_utf8_lossy(&body)
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some(("client_secret", _)) => "client_secret=REDACTED".to_owned(),
                _ => pair.to_owned(),
            })
            .collect();
        let seq = record(&shared, &parts, &Bytes::from(redacted.join("&")));
        let response = token(&shared, &parts.headers, &body);
        shared
            .lock()
            .finish_request(seq, response.status().as_u16(), None);
        shared.changed();
        boxed(response)
    } else {
        boxed(text(
            StatusCode::NOT_FOUND,
            "not an endpoint of the EWS simulator\n",
        ))
    }
}

/// The part after `/v1.0` of a Graph API path (Graph matches the version case-insensitively).
fn graph_rest(path: &str) -> Option<&str> {
    let prefix = path.get(..graph::GRAPH_PREFIX.len())?;
    let rest = &path[prefix.len()..];
    (prefix.eq_ignore_ascii_case(graph::GRAPH_PREFIX) && rest.starts_with('/')).then_some(rest)
}

/// `/{tenant}/oauth2/v2.0/token`.
fn is_tenant_token_path(path: &str) -> bool {
    path.strip_suffix(TOKEN_PATH)
        .and_then(|tenant| tenant.strip_prefix('/'))
        .is_some_and(|tenant| !tenant.is_empty() && !tenant.contains('/'))
}

async fn read_body(body: Incoming) -> Result<Bytes, StatusCode> {
    match tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(_)) => Err(StatusCode::PAYLOAD_TOO_LARGE),
        Err(_) => Err(StatusCode::REQUEST_TIMEOUT),
    }
}

fn record(shared: &Shared, parts: &http::request::Parts, body: &Bytes) -> u64 {
    let headers = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let request = RecordedRequest {
        seq: 0,
        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.to_string()),
        headers,
        body: String::from_utf8_lossy(body).into_owned(),
        carried_affinity_cookie: affinity_cookie(&parts.headers).is_some(),
        status: 0,
        response_code: None,
    };
    shared.lock().record(request)
}

/// The `X-BackEndOverrideCookie` value of the request's `Cookie` headers.
fn affinity_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            name.eq_ignore_ascii_case(AFFINITY_COOKIE)
                .then(|| value.to_owned())
        })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn xml(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/xml; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_default()
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap_or_default()
}

/// Checks the `Authorization` header against the configured scheme: `None` if it passes,
/// else the 401 to send.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Option<Response<Body>> {
    let given = header(headers, AUTHORIZATION.as_str());
    let (ok, challenge) = match &shared.config.auth {
        Auth::None => return None,
        Auth::Basic { user, password } => {
            let ok = given
                .and_then(|v| strip_scheme(v, "Basic"))
                .and_then(unbase64)
                .is_some_and(|decoded| decoded == format!("{user}:{password}").as_bytes());
            (ok, "Basic realm=\"ews-sim\"")
        }
        Auth::OAuth { .. } => {
            let ok = given
                .and_then(|v| strip_scheme(v, "Bearer"))
                .is_some_and(|token| {
                    shared
                        .lock()
                        .tokens
                        .get(token)
                        .is_some_and(|t| t.is_valid(Instant::now()))
                });
            (ok, "Bearer realm=\"ews-sim\", error=\"invalid_token\"")
        }
    };
    if ok {
        return None;
    }
    let mut response = text(StatusCode::UNAUTHORIZED, "401 Unauthorized\n");
    if let Ok(value) = challenge.parse() {
        response.headers_mut().insert(WWW_AUTHENTICATE, value);
    }
    Some(response)
}

fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, rest) = value.split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

/// `POST /EWS/Exchange.asmx`: the response and the EWS code it carries, for the record.
async fn ews(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    body: &[u8],
) -> (Response<OutBody>, Option<String>) {
    match ews_plain(shared, headers, body).await {
        EwsAnswer::Stream(response, code) => (response, code),
        EwsAnswer::Whole(response, code) => (boxed(response), code),
    }
}

/// An EWS answer: a whole body, or a `GetStreamingEvents` stream.
enum EwsAnswer {
    Whole(Response<Body>, Option<String>),
    Stream(Response<OutBody>, Option<String>),
}

impl From<(Response<Body>, Option<String>)> for EwsAnswer {
    fn from((response, code): (Response<Body>, Option<String>)) -> Self {
        EwsAnswer::Whole(response, code)
    }
}

/// [`ews`] before the body type is settled.
async fn ews_plain(shared: &Arc<Shared>, headers: &HeaderMap, body: &[u8]) -> EwsAnswer {
    let delay = shared.lock().faults.response_delay_ms;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    // Front-end queuing comes before anything reads the request.
    let unavailable = {
        let mut state = shared.lock();
        let faults = &mut state.faults;
        (faults.unavailable_remaining > 0).then(|| {
            faults.unavailable_remaining -= 1;
            faults.unavailable_retry_after
        })
    };
    if let Some(retry_after) = unavailable {
        let mut response = text(StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable\n");
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(RETRY_AFTER, seconds.into());
        }
        return (response, Some("HTTP 503".into())).into();
    }
    if let Some(response) = authenticate(shared, headers) {
        return (response, Some("HTTP 401".into())).into();
    }
    let busy = {
        let mut state = shared.lock();
        let faults = &mut state.faults;
        (faults.server_busy_remaining > 0).then(|| {
            faults.server_busy_remaining -= 1;
            faults.server_busy_back_off_ms
        })
    };
    if let Some(back_off) = busy {
        let body = soap::fault(
            "ErrorServerBusy",
            "The server cannot service this request right now. Try again later.",
            Some(back_off),
        );
        return (
            xml(StatusCode::INTERNAL_SERVER_ERROR, body),
            Some("ErrorServerBusy".into()),
        )
            .into();
    }
    match stream_soap::parse_ews_request(body) {
        Err(e) => refuse(&e).into(),
        Ok(EwsRequest::PushSubscribe) => match soap::parse_subscribe(body) {
            Ok(request) => subscribe(shared, headers, request).into(),
            Err(e) => refuse(&e).into(),
        },
        Ok(EwsRequest::StreamingSubscribe(request)) => {
            streaming_subscribe(shared, headers, request).into()
        }
        Ok(EwsRequest::GetStreamingEvents(request)) => {
            let head_delay = {
                let mut state = shared.lock();
                let faults = &mut state.faults;
                (faults.streaming_head_delay_remaining > 0).then(|| {
                    faults.streaming_head_delay_remaining -= 1;
                    faults.streaming_head_delay_ms
                })
            };
            if let Some(ms) = head_delay {
                // A slow front end: nothing is routed (no subscription moves) until it answers.
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            get_streaming_events(shared, headers, request)
        }
        Ok(EwsRequest::Unsubscribe(request)) => {
            let code = streaming::unsubscribe(&mut shared.lock(), &request.id);
            EwsAnswer::Whole(
                xml(StatusCode::OK, stream_soap::unsubscribe_response(code)),
                Some(code.to_owned()),
            )
        }
    }
}

fn refuse(error: &RequestError) -> (Response<Body>, Option<String>) {
    let body = soap::fault(error.code(), &error.to_string(), None);
    (
        xml(StatusCode::INTERNAL_SERVER_ERROR, body),
        Some(error.code().into()),
    )
}

/// A valid Subscribe: route checks, mailbox checks, then a new subscription.
fn subscribe(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    request: soap::ParsedSubscribe,
) -> (Response<Body>, Option<String>) {
    let key = request.mailbox.to_ascii_lowercase();
    let anchor = header(headers, "x-anchormailbox").map(str::to_ascii_lowercase);
    let prefer_affinity =
        header(headers, "x-preferserveraffinity").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let carried_cookie = affinity_cookie(headers);
    let mut state = shared.lock();

    if let Some(refusal) = anchor_refusal(
        &state,
        anchor.as_deref(),
        &key,
        prefer_affinity || carried_cookie.is_some(),
        &request.mailbox,
    ) {
        return refusal;
    }

    // Streaming subscriptions count against the same limit; forget the expired ones first.
    let lifetime = shared.config.streaming_subscription_lifetime_scaled();
    state.streaming.expire_idle(Instant::now(), lifetime);
    let outcome: Result<String, &'static str> = (|| {
        let mailbox = state.mailboxes.get(&key).ok_or("ErrorNonExistentMailbox")?;
        if mailbox.deleted || anchor_deleted(&state, anchor.as_deref()) {
            return Err("ErrorNonExistentMailbox");
        }
        if mailbox.moved {
            return Err("ErrorProxyRequestNotAllowed");
        }
        if !soap::valid_push_url(&request.url) {
            return Err("ErrorInvalidPushSubscriptionUrl");
        }
        let head = mailbox.head;
        let cursor = match &request.watermark {
            Some(watermark) => state
                .resolve_watermark(&key, watermark)
                .ok_or("ErrorInvalidWatermark")?,
            None => head,
        };
        if state.live_count(&key) >= super::MAX_SUBSCRIPTIONS_PER_MAILBOX {
            return Err("ErrorExceededSubscriptionCount");
        }
        let watermark = state.watermark(&key, cursor);
        let id = subscription_id();
        state.subscriptions.insert(
            id.clone(),
            Subscription {
                id: id.clone(),
                mailbox: key.clone(),
                url: request.url.clone(),
                event_types: request.event_types.clone(),
                folders: request.folders.clone(),
                status_frequency: request.status_frequency,
                state: SubscriptionState::Active,
                cursor,
                previous_watermark: watermark.clone(),
                initial_sent: false,
                error_requested: false,
                created: SystemTime::now(),
                last_push_ok: None,
                counters: SubscriptionCounters::default(),
                wake: Arc::new(Notify::new()),
            },
        );
        if let Some(m) = state.mailboxes.get_mut(&key) {
            m.subscriptions_created += 1;
        }
        Ok(format!("{id}\n{watermark}"))
    })();

    let (body, code, new_id) = match &outcome {
        Ok(pair) => {
            let (id, watermark) = pair.split_once('\n').unwrap_or((pair, ""));
            (
                soap::subscribe_response(Ok((id, watermark))),
                "NoError",
                Some(id.to_owned()),
            )
        }
        Err(code) => (soap::subscribe_response(Err(code)), *code, None),
    };
    let set_cookie = affinity_set_cookie(
        &mut state,
        prefer_affinity,
        carried_cookie.as_deref(),
        anchor.as_deref(),
    );
    drop(state);
    if let Some(id) = new_id {
        push::spawn(shared, id);
    }
    let mut response = xml(StatusCode::OK, body);
    if let Some(cookie) = set_cookie.and_then(|c| c.parse().ok()) {
        response.headers_mut().insert(SET_COOKIE, cookie);
    }
    (response, Some(code.to_owned()))
}

/// Whether `X-AnchorMailbox` names a mailbox the delete-mailbox fault removed: the front end
/// cannot route by it.
fn anchor_deleted(state: &super::state::State, anchor: Option<&str>) -> bool {
    anchor
        .and_then(|a| state.mailboxes.get(a))
        .is_some_and(|m| m.deleted)
}

/// `X-AnchorMailbox` must name the impersonated mailbox; in an affinity group it may name the
/// group's anchor, a mailbox with the same `GroupingInformation`. The fault to answer if not.
fn anchor_refusal(
    state: &super::state::State,
    anchor: Option<&str>,
    key: &str,
    in_group: bool,
    mailbox: &str,
) -> Option<(Response<Body>, Option<String>)> {
    let ok = match anchor {
        Some(anchor) if anchor == key => true,
        Some(anchor) if in_group => match (state.mailboxes.get(anchor), state.mailboxes.get(key)) {
            (Some(a), Some(m)) => a.grouping == m.grouping,
            _ => false,
        },
        _ => false,
    };
    if ok {
        return None;
    }
    let message = format!(
        "X-AnchorMailbox {:?} does not match the impersonated mailbox {mailbox}",
        anchor.unwrap_or_default(),
    );
    let body = soap::fault("ErrorInvalidRequest", &message, None);
    Some((
        xml(StatusCode::INTERNAL_SERVER_ERROR, body),
        Some("ErrorInvalidRequest".into()),
    ))
}

/// The `Set-Cookie` of the first Subscribe of an affinity group (`X-PreferServerAffinity:
/// true` without the cookie yet): the group's backend cookie, for the others to carry.
fn affinity_set_cookie(
    state: &mut super::state::State,
    prefer_affinity: bool,
    carried_cookie: Option<&str>,
    anchor: Option<&str>,
) -> Option<String> {
    (prefer_affinity && carried_cookie.is_none()).then(|| {
        let value = group_cookie(state, anchor);
        format!("{AFFINITY_COOKIE}={value}; path=/; secure; HttpOnly")
    })
}

/// The backend cookie of the anchor's group, made on first use.
fn group_cookie(state: &mut super::state::State, anchor: Option<&str>) -> String {
    let group = anchor
        .and_then(|a| state.mailboxes.get(a))
        .map_or_else(|| "default".to_owned(), |m| m.grouping.clone());
    state
        .affinity_cookies
        .entry(group.clone())
        .or_insert_with(|| format!("1-{group}~{}", random_token(12)))
        .clone()
}

/// A streaming `Subscribe`: the push side's routing and mailbox checks, then a subscription
/// with an id and no watermark.
fn streaming_subscribe(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    request: stream_soap::StreamingSubscribe,
) -> (Response<Body>, Option<String>) {
    let key = request.mailbox.to_ascii_lowercase();
    let anchor = header(headers, "x-anchormailbox").map(str::to_ascii_lowercase);
    let prefer_affinity =
        header(headers, "x-preferserveraffinity").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let carried_cookie = affinity_cookie(headers);
    let mut guard = shared.lock();
    let state = &mut *guard;
    if let Some(refusal) = anchor_refusal(
        state,
        anchor.as_deref(),
        &key,
        prefer_affinity || carried_cookie.is_some(),
        &request.mailbox,
    ) {
        return refusal;
    }
    let lifetime = shared.config.streaming_subscription_lifetime_scaled();
    state.streaming.expire_idle(Instant::now(), lifetime);
    let set_cookie = affinity_set_cookie(
        state,
        prefer_affinity,
        carried_cookie.as_deref(),
        anchor.as_deref(),
    );
    let outcome: Result<String, &'static str> = (|| {
        let mailbox = state.mailboxes.get(&key).ok_or("ErrorNonExistentMailbox")?;
        if mailbox.deleted || anchor_deleted(state, anchor.as_deref()) {
            return Err("ErrorNonExistentMailbox");
        }
        if mailbox.moved {
            return Err("ErrorProxyRequestNotAllowed");
        }
        let (grouping, head) = (mailbox.grouping.clone(), mailbox.head);
        if state.live_count(&key) >= super::MAX_SUBSCRIPTIONS_PER_MAILBOX {
            return Err("ErrorExceededSubscriptionCount");
        }
        // Made with affinity (asked for, or riding on the group's cookie): its
        // GetStreamingEvents must come with that cookie to reach its mailbox server.
        let cookie = (prefer_affinity || carried_cookie.is_some())
            .then(|| group_cookie(state, anchor.as_deref()));
        let id = subscription_id();
        state.streaming.subscriptions.insert(
            id.clone(),
            streaming::new_subscription(
                id.clone(),
                key.clone(),
                grouping,
                cookie,
                request.event_types.clone(),
                request.folders.clone(),
                head,
            ),
        );
        if let Some(m) = state.mailboxes.get_mut(&key) {
            m.subscriptions_created += 1;
        }
        Ok(id)
    })();
    drop(guard);
    let (body, code) = match &outcome {
        Ok(id) => (soap::subscribe_response(Ok((id, ""))), "NoError"),
        Err(code) => (soap::subscribe_response(Err(code)), *code),
    };
    let mut response = xml(StatusCode::OK, body);
    if let Some(cookie) = set_cookie.and_then(|c| c.parse().ok()) {
        response.headers_mut().insert(SET_COOKIE, cookie);
    }
    (response, Some(code.to_owned()))
}

/// `GetStreamingEvents`: a stream (`Ok`), or a whole answer when it is refused outright.
fn get_streaming_events(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    request: stream_soap::GetStreamingEvents,
) -> EwsAnswer {
    let anchor = header(headers, "x-anchormailbox").map(str::to_ascii_lowercase);
    let cookie = affinity_cookie(headers);
    // The budget is the target mailbox's: a connection opened impersonating m1 is charged to
    // (a copy of) m1's budget, one opened without impersonation to the caller's ("Maintain
    // affinity between a group of subscriptions and the Mailbox server", throttling section).
    let account = match &request.impersonated {
        Some(mailbox) => mailbox.to_ascii_lowercase(),
        None => caller(shared),
    };
    let prefer_affinity =
        header(headers, "x-preferserveraffinity").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let route = streaming::Route {
        anchor: anchor.as_deref(),
        cookie: cookie.as_deref(),
        prefer_affinity,
        account,
    };
    match streaming::open(shared, request, route) {
        streaming::Opened::Refused(body, code) => {
            EwsAnswer::Whole(xml(StatusCode::OK, body), Some(code))
        }
        streaming::Opened::Stream(body) => {
            let response = Response::builder()
                .status(StatusCode::OK)
                .header(CONTENT_TYPE, "text/xml; charset=utf-8")
                .body(BodyExt::boxed(body))
                .unwrap_or_default();
            EwsAnswer::Stream(response, Some("NoError".into()))
        }
    }
}

/// Who is calling, for per-account limits: the Basic user, the OAuth application, or nobody.
fn caller(shared: &Shared) -> String {
    match &shared.config.auth {
        Auth::None => "anonymous".into(),
        Auth::Basic { user, .. } => user.to_ascii_lowercase(),
        Auth::OAuth { client_id, .. } => format!("app:{client_id}"),
    }
}

/// A new subscription id: opaque, base64, about as long as Exchange Online's.
fn subscription_id() -> String {
    let mut bytes = vec![0x26, 0x00];
    bytes.extend_from_slice(b"sim01mb001.ews-sim.example");
    bytes.extend_from_slice(&random_bytes(30));
    base64(&bytes)
}

/// `POST /autodiscover/autodiscover.svc`.
fn autodiscover(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Response<Body> {
    if let Some(response) = authenticate(shared, headers) {
        return response;
    }
    let mailboxes = match soap::parse_get_user_settings(body) {
        Ok(mailboxes) => mailboxes,
        Err(e) => {
            let body = soap::fault("ErrorSchemaValidation", &e.to_string(), None);
            return xml(StatusCode::INTERNAL_SERVER_ERROR, body);
        }
    };
    let ews_url = format!("{}{EWS_PATH}", shared.base_url());
    let mut state = shared.lock();
    let answers: Vec<UserAnswer> = mailboxes
        .iter()
        .map(
            |smtp| match state.mailboxes.get_mut(&smtp.to_ascii_lowercase()) {
                None => UserAnswer::InvalidUser(smtp.clone()),
                Some(m) => match &m.redirect {
                    Some(MailboxRedirect::Address(to)) => UserAnswer::RedirectAddress(to.clone()),
                    Some(MailboxRedirect::Url(to)) => UserAnswer::RedirectUrl(to.clone()),
                    None => {
                        // Asking Autodiscover is what a client does after a move: it now works.
                        m.moved = false;
                        UserAnswer::Settings {
                            ews_url: ews_url.clone(),
                            grouping: m.grouping.clone(),
                        }
                    }
                },
            },
        )
        .collect();
    drop(state);
    xml(StatusCode::OK, soap::get_user_settings_response(&answers))
}

/// `POST [/{tenant}]/oauth2/v2.0/token`: client credentials.
fn token(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Response<Body> {
    let Auth::OAuth {
        client_id,
        client_secret,
        token_lifetime,
    } = &shared.config.auth
    else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "unauthorized_client", "error_description": "the simulator runs without OAuth (--auth oauth enables it)"}),
        );
    };
    let form_type = header(headers, CONTENT_TYPE.as_str()).unwrap_or_default();
    if !form_type
        .to_ascii_lowercase()
        .starts_with("application/x-www-form-urlencoded")
    {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": "expected an application/x-www-form-urlencoded body"}),
        );
    }
    let form = parse_form(body);
    let field = |name: &str| {
        form.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    if field("grant_type") != Some("client_credentials") {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type", "error_description": "only grant_type=client_credentials is supported"}),
        );
    }
    if !field("scope").is_some_and(|s| s.ends_with("/.default")) {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_scope", "error_description": "scope must be a resource's /.default, e.g. https://outlook.office365.com/.default"}),
        );
    }
    if field("client_id") != Some(client_id.as_str())
        || field("client_secret") != Some(client_secret.as_str())
    {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}),
        );
    }
    let token = format!("eyJ0eXAiOiJKV1QiLCJzaW0iOnRydWV9.{}", random_token(48));
    let mut state = shared.lock();
    let now = Instant::now();
    // Forget expired tokens so the table stays as big as the valid ones.
    state.tokens.retain(|_, t| t.is_valid(now));
    // The scope is kept so Graph routes can refuse a token issued for EWS (its audience).
    let issued = IssuedToken {
        expires: now + *token_lifetime,
        scope: field("scope").unwrap_or_default().to_owned(),
    };
    state.tokens.insert(token.clone(), issued);
    state.tokens_issued += 1;
    drop(state);
    json_response(
        StatusCode::OK,
        json!({
            "token_type": "Bearer",
            "expires_in": token_lifetime.as_secs_f64().ceil() as u64,
            "ext_expires_in": token_lifetime.as_secs_f64().ceil() as u64,
            "access_token": token,
        }),
    )
}

/// Bodies of the control API's POSTs.
#[derive(Debug, Deserialize)]
struct EventsBody {
    mailbox: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "one")]
    count: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize)]
struct SubscriptionBody {
    subscription_id: String,
}

#[derive(Debug, Deserialize)]
struct MailboxBody {
    mailbox: String,
}

#[derive(Debug, Deserialize)]
struct BusyBody {
    #[serde(default = "one_u32")]
    count: u32,
    #[serde(default = "default_back_off")]
    back_off_ms: u64,
}

fn one_u32() -> u32 {
    1
}

fn default_back_off() -> u64 {
    2500
}

#[derive(Debug, Deserialize)]
struct UnavailableBody {
    #[serde(default = "one_u32")]
    count: u32,
    retry_after_secs: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct ConnectionBody {
    /// One connection; every open one when absent.
    connection: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct CountBody {
    #[serde(default = "one_u32")]
    count: u32,
}

#[derive(Debug, Deserialize)]
struct DelayHeadBody {
    #[serde(default = "one_u32")]
    count: u32,
    ms: u64,
}

#[derive(Debug, Deserialize)]
struct DelayBody {
    ms: u64,
}

#[derive(Debug, Deserialize)]
struct AddMailboxBody {
    smtp: String,
    grouping: Option<String>,
    redirect_address: Option<String>,
    redirect_url: Option<String>,
}

/// The control API: `GET` to read, `POST` with a JSON body to act.
async fn control(shared: Arc<Shared>, req: Request<Incoming>, route: &str) -> Response<Body> {
    let handle = SimHandle { shared };
    let method = req.method().clone();
    let body = match read_body(req.into_body()).await {
        Ok(body) => body,
        Err(status) => {
            return json_response(status, json!({"error": "body too large or too slow"}))
        }
    };
    if let Some(graph_route) = route.strip_prefix("graph/") {
        let answer = graph::control(
            &handle,
            &method,
            graph_route,
            &body,
            parse::<serde_json::Value>,
        );
        if let Some(result) = answer {
            return match result {
                Ok(value) => json_response(StatusCode::OK, value),
                Err((status, message)) => json_response(status, json!({"error": message})),
            };
        }
    }
    let result = match (&method, route) {
        (&Method::GET, "state") => to_json(handle.snapshot()),
        (&Method::GET, "subscriptions") => to_json(handle.subscriptions()),
        (&Method::GET, "mailboxes") => to_json(handle.mailboxes()),
        (&Method::GET, "requests") => to_json(handle.requests()),
        (&Method::DELETE, "requests") => {
            handle.clear_requests();
            Ok(json!({"cleared": true}))
        }
        (&Method::POST, "mailboxes") => parse::<AddMailboxBody>(&body).map(|b| {
            let mut mailbox = super::MailboxConfig::new(b.smtp);
            if let Some(grouping) = b.grouping {
                mailbox = mailbox.grouping(grouping);
            }
            if let Some(to) = b.redirect_address {
                mailbox = mailbox.redirect(MailboxRedirect::Address(to));
            } else if let Some(to) = b.redirect_url {
                mailbox = mailbox.redirect(MailboxRedirect::Url(to));
            }
            handle.add_mailbox(mailbox);
            json!({"ok": true})
        }),
        (&Method::POST, "events") => parse::<EventsBody>(&body).and_then(|b| {
            let kind = EventType::from_name(&b.kind)
                .ok_or_else(|| refused(SimError::InvalidEventType(b.kind.clone())))?;
            let watermarks = handle
                .create_events(&b.mailbox, kind, b.count)
                .map_err(refused)?;
            Ok(json!({"created": watermarks.len(), "watermarks": watermarks}))
        }),
        (&Method::POST, "faults/stop-keepalives") => parse::<SubscriptionBody>(&body)
            .and_then(|b| handle.stop_keepalives(&b.subscription_id).map_err(refused))
            .map(|()| json!({"ok": true})),
        (&Method::POST, "faults/drop-all") => {
            Ok(json!({"dropped": handle.drop_all_subscriptions()}))
        }
        (&Method::POST, "faults/server-busy") => parse::<BusyBody>(&body).map(|b| {
            handle.server_busy(b.count, Duration::from_millis(b.back_off_ms));
            json!({"ok": true})
        }),
        (&Method::POST, "faults/unavailable") => parse::<UnavailableBody>(&body).map(|b| {
            handle.unavailable(b.count, b.retry_after_secs);
            json!({"ok": true})
        }),
        (&Method::POST, "faults/invalidate-watermarks") => parse::<MailboxBody>(&body)
            .and_then(|b| handle.invalidate_watermarks(&b.mailbox).map_err(refused))
            .map(|()| json!({"ok": true})),
        (&Method::POST, "faults/move-mailbox") => parse::<MailboxBody>(&body)
            .and_then(|b| handle.move_mailbox(&b.mailbox).map_err(refused))
            .map(|()| json!({"ok": true})),
        (&Method::POST, "faults/error-notification") => parse::<SubscriptionBody>(&body)
            .and_then(|b| {
                handle
                    .push_error_notification(&b.subscription_id)
                    .map_err(refused)
            })
            .map(|()| json!({"ok": true})),
        (&Method::POST, "faults/delay") => parse::<DelayBody>(&body).map(|b| {
            handle.set_response_delay(Duration::from_millis(b.ms));
            json!({"ok": true})
        }),
        (&Method::POST, "faults/revoke-tokens") => Ok(json!({"revoked": handle.revoke_tokens()})),
        (&Method::GET, "streaming/subscriptions") => to_json(handle.streaming_subscriptions()),
        (&Method::GET, "streaming/connections") => to_json(handle.streaming_connections()),
        (&Method::POST, "faults/streaming/cut") => parse::<ConnectionBody>(&body)
            .map(|b| json!({"cut": handle.streaming_cut(b.connection)})),
        (&Method::POST, "faults/streaming/stall") => parse::<ConnectionBody>(&body)
            .map(|b| json!({"stalled": handle.streaming_stall(b.connection)})),
        (&Method::POST, "faults/streaming/expire") => parse::<SubscriptionBody>(&body)
            .and_then(|b| handle.streaming_expire(&b.subscription_id).map_err(refused))
            .map(|()| json!({"ok": true})),
        (&Method::POST, "faults/streaming/missed-events") => parse::<SubscriptionBody>(&body)
            .and_then(|b| {
                handle
                    .streaming_missed_events(&b.subscription_id)
                    .map_err(refused)
            })
            .map(|()| json!({"ok": true})),
        (&Method::POST, "faults/streaming/refuse-connections") => {
            parse::<CountBody>(&body).map(|b| {
                handle.streaming_refuse_connections(b.count);
                json!({"ok": true})
            })
        }
        (&Method::POST, "faults/streaming/cut-mid-envelope") => parse::<ConnectionBody>(&body)
            .map(|b| json!({"cut": handle.streaming_cut_mid_envelope(b.connection)})),
        (&Method::POST, "faults/streaming/malformed-envelope") => parse::<ConnectionBody>(&body)
            .map(|b| json!({"armed": handle.streaming_malformed_envelope(b.connection)})),
        (&Method::POST, "faults/streaming/delay-head") => parse::<DelayHeadBody>(&body).map(|b| {
            handle.streaming_delay_head(b.count, Duration::from_millis(b.ms));
            json!({"ok": true})
        }),
        (&Method::POST, "faults/delete-mailbox") => parse::<MailboxBody>(&body)
            .and_then(|b| handle.delete_mailbox(&b.mailbox).map_err(refused))
            .map(|()| json!({"ok": true})),
        (&Method::POST, "faults/clear") => {
            handle.clear_faults();
            Ok(json!({"ok": true}))
        }
        _ => Err((
            StatusCode::NOT_FOUND,
            format!("no control route {method} /_sim/{route}"),
        )),
    };
    match result {
        Ok(value) => json_response(StatusCode::OK, value),
        Err((status, message)) => json_response(status, json!({"error": message})),
    }
}

/// A control error: 404 for what does not exist, 400 for what cannot be done.
type ControlError = (StatusCode, String);

fn refused(error: SimError) -> ControlError {
    let status = match error {
        SimError::UnknownMailbox(_) | SimError::UnknownSubscription(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    };
    (status, error.to_string())
}

fn to_json(value: impl serde::Serialize) -> Result<serde_json::Value, ControlError> {
    serde_json::to_value(value).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ControlError> {
    // An empty body means "all defaults".
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| (StatusCode::BAD_REQUEST, format!("JSON body: {e}")))
}
