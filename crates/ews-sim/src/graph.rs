//! The simulated Microsoft Graph subscription API under `/v1.0`: create (with the validation
//! handshake), list, get, renew (PATCH), delete and reauthorize, with Graph's bearer-token
//! audience check, its limits on `expirationDateTime` and `clientState`, its JSON error shape,
//! and the throttling fault. Also the Graph part of the control API (`/_sim/graph/…`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::Full;
use serde::Deserialize;
use serde_json::{json, Value};

use super::graph_push;
use super::graph_state::{
    graph_time, parse_graph_time, ChangeType, GraphSubscription, ResourceKind,
};
use super::util::guid;
use super::{Auth, GraphTarget, GraphThrottle, Shared, SimError, SimHandle};

/// The path prefix of Graph's API version the simulator serves.
pub const GRAPH_PREFIX: &str = "/v1.0";

/// The scopes whose tokens Graph accepts: its resource URI and its application id, each with
/// `/.default`, as a client-credentials token for Graph is asked.
pub const GRAPH_SCOPES: [&str; 2] = [
    "https://graph.microsoft.com/.default",
    "00000003-0000-0000-c000-000000000000/.default",
];

/// Graph's lower bound on a subscription's lifetime: shorter requests are raised to this.
pub const MIN_LIFETIME: Duration = Duration::from_secs(45 * 60);

/// Longest `clientState` Graph accepts.
pub const MAX_CLIENT_STATE: usize = 128;

/// Graph's response content type for JSON (OData, minimal metadata).
const JSON_CONTENT_TYPE: &str =
    "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8";

type Body = Full<Bytes>;

/// Why a Graph call is refused: the status, Graph's error code and message.
#[derive(Debug, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct GraphError {
    /// HTTP status.
    pub status: StatusCode,
    /// `error.code`.
    pub code: &'static str,
    /// `error.message`.
    pub message: String,
}

impl GraphError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidRequest", message)
    }

    fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            format!("Resource '{id}' does not exist or one of its queried reference-property objects are not present."),
        )
    }

    fn unauthorized(message: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            message,
        )
    }

    /// Graph's error body: `{"error": {"code", "message", "innerError": {"date", "request-id"}}}`.
    fn response(&self, request_id: &str) -> Response<Body> {
        let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let body = json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "innerError": {
                    "date": date.trim_end_matches('Z'),
                    "request-id": request_id,
                    "client-request-id": request_id,
                }
            }
        });
        let mut response = json_response(self.status, &body, request_id);
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\"";
            if let Ok(value) = challenge.parse() {
                response.headers_mut().insert(WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}

fn json_response(status: StatusCode, body: &Value, request_id: &str) -> Response<Body> {
    let mut builder = Response::builder()
        .status(status)
        .header("request-id", request_id)
        .header("client-request-id", request_id);
    let body = if status == StatusCode::NO_CONTENT {
        Bytes::new()
    } else {
        builder = builder.header(CONTENT_TYPE, JSON_CONTENT_TYPE);
        Bytes::from(body.to_string())
    };
    builder.body(Full::new(body)).unwrap_or_default()
}

/// Serves one request under `/v1.0` (`rest` is the path after it).
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    method: &Method,
    rest: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response<Body> {
    let request_id = guid();
    shared.lock().graph.requests += 1;
    shared.changed();
    let result = match authenticate(shared, headers).and_then(|()| throttle(shared)) {
        Err(refusal) => Err(refusal),
        Ok(()) => route(shared, method, rest, body).await,
    };
    match result {
        Ok((status, body)) => json_response(status, &body, &request_id),
        Err(Refusal::Error(e)) => e.response(&request_id),
        Err(Refusal::Throttled {
            status,
            retry_after,
        }) => {
            let (code, message) = if status == StatusCode::TOO_MANY_REQUESTS {
                (
                    "TooManyRequests",
                    "Too many requests. Please retry after the time in Retry-After.",
                )
            } else {
                (
                    "serviceNotAvailable",
                    "Service unavailable. Please retry after the time in Retry-After.",
                )
            };
            let mut response = GraphError::new(status, code, message).response(&request_id);
            response
                .headers_mut()
                .insert(RETRY_AFTER, retry_after.into());
            response
        }
    }
}

/// A refused call: a Graph error, or throttling (which also carries `Retry-After`).
enum Refusal {
    Error(GraphError),
    Throttled {
        status: StatusCode,
        retry_after: u32,
    },
}

impl From<GraphError> for Refusal {
    fn from(e: GraphError) -> Self {
        Refusal::Error(e)
    }
}

/// Graph takes only bearer tokens, and only those issued for Graph (its audience check): an
/// EWS token gets 401 here as it would from Graph.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<(), Refusal> {
    if matches!(shared.config.auth, Auth::None) {
        return Ok(());
    }
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
        .map(|(_, token)| token.trim());
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Err(GraphError::unauthorized("Access token is empty.").into());
    };
    let state = shared.lock();
    match state.tokens.get(token) {
        None => Err(GraphError::unauthorized("Access token validation failure.").into()),
        Some(t) if !t.is_valid(std::time::Instant::now()) => Err(GraphError::unauthorized(
            "Lifetime validation failed, the token is expired.",
        )
        .into()),
        Some(t)
            if !GRAPH_SCOPES
                .iter()
                .any(|s| s.eq_ignore_ascii_case(&t.scope)) =>
        {
            Err(
                GraphError::unauthorized("Access token validation failure. Invalid audience.")
                    .into(),
            )
        }
        Some(_) => Ok(()),
    }
}

fn throttle(shared: &Shared) -> Result<(), Refusal> {
    let mut state = shared.lock();
    let faults = &mut state.graph.faults;
    if faults.throttle_remaining == 0 {
        return Ok(());
    }
    faults.throttle_remaining -= 1;
    Err(Refusal::Throttled {
        status: StatusCode::from_u16(faults.throttle_status)
            .unwrap_or(StatusCode::TOO_MANY_REQUESTS),
        retry_after: faults.throttle_retry_after_secs,
    })
}

async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    rest: &str,
    body: &[u8],
) -> Result<(StatusCode, Value), Refusal> {
    let segments: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let is_subscriptions = segments[0].eq_ignore_ascii_case("subscriptions");
    match (method, segments.as_slice()) {
        (&Method::POST, [_]) if is_subscriptions => create(shared, body).await.map_err(Into::into),
        (&Method::GET, [_]) if is_subscriptions => Ok((StatusCode::OK, list(shared))),
        (&Method::GET, [_, id]) if is_subscriptions => {
            let sub = with_live(shared, id, |s, config| to_json(s, config))?;
            Ok((StatusCode::OK, entity(sub)))
        }
        (&Method::PATCH, [_, id]) if is_subscriptions => {
            renew(shared, id, body).map_err(Into::into)
        }
        (&Method::DELETE, [_, id]) if is_subscriptions => {
            with_live(shared, id, |s, _| {
                s.removal = Some(super::graph_state::RemovalReason::Deleted);
            })?;
            shared.changed();
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (&Method::POST, [_, id, action])
            if is_subscriptions && action.eq_ignore_ascii_case("reauthorize") =>
        {
            with_live(shared, id, |s, _| {
                s.reauthorization_pending = None;
                s.reauthorized += 1;
            })?;
            shared.changed();
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        _ => Err(GraphError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("Resource not found for the segment '{}'.", segments[0]),
        )
        .into()),
    }
}

/// Runs `f` on a live subscription, or answers 404 as Graph does for one it no longer has.
fn with_live<T>(
    shared: &Shared,
    id: &str,
    f: impl FnOnce(&mut GraphSubscription, &super::GraphConfig) -> T,
) -> Result<T, GraphError> {
    let mut state = shared.lock();
    let now = SystemTime::now();
    state
        .graph
        .subscriptions
        .get_mut(id)
        .filter(|s| s.is_live(now))
        .map(|s| f(s, &shared.config.graph))
        .ok_or_else(|| GraphError::not_found(id))
}

/// The subscription as Graph returns it.
fn to_json(sub: &GraphSubscription, config: &super::GraphConfig) -> Value {
    let change_type: Vec<&str> = sub.change_types.iter().map(|c| c.as_str()).collect();
    json!({
        "id": sub.id,
        "resource": sub.resource,
        "applicationId": config.application_id,
        "changeType": change_type.join(","),
        "clientState": sub.client_state,
        "notificationUrl": sub.notification_url,
        "notificationQueryOptions": null,
        "lifecycleNotificationUrl": sub.lifecycle_url,
        "expirationDateTime": graph_time(sub.expiration),
        "creatorId": config.application_id,
        "includeResourceData": false,
        "latestSupportedTlsVersion": "v1_2",
        "encryptionCertificate": null,
        "encryptionCertificateId": null,
        "notificationUrlAppId": null,
    })
}

fn entity(mut sub: Value) -> Value {
    if let Value::Object(map) = &mut sub {
        map.insert(
            "@odata.context".into(),
            "https://graph.microsoft.com/v1.0/$metadata#subscriptions/$entity".into(),
        );
    }
    sub
}

fn list(shared: &Shared) -> Value {
    let state = shared.lock();
    let now = SystemTime::now();
    let value: Vec<Value> = state
        .graph
        .subscriptions
        .values()
        .filter(|s| s.is_live(now))
        .map(|s| to_json(s, &shared.config.graph))
        .collect();
    json!({
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscriptions",
        "value": value,
    })
}

/// The body of a create.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    change_type: Option<String>,
    notification_url: Option<String>,
    lifecycle_notification_url: Option<String>,
    resource: Option<String>,
    expiration_date_time: Option<String>,
    client_state: Option<String>,
}

/// The body of a renewal.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RenewBody {
    expiration_date_time: Option<String>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, GraphError> {
    serde_json::from_slice(body).map_err(|e| {
        GraphError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("Unable to read JSON request payload: {e}"),
        )
    })
}

fn check_https(field: &str, url: &str) -> Result<(), GraphError> {
    let parsed: Option<http::Uri> = url.parse().ok();
    let https = parsed.as_ref().is_some_and(|u| {
        u.scheme_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"))
            && u.host().is_some()
    });
    if https {
        Ok(())
    } else {
        Err(GraphError::bad(format!(
            "Invalid '{field}': the URL must be an absolute https URL."
        )))
    }
}

/// The expiration Graph grants for `asked`: refused beyond the maximum or in the past,
/// raised to [`MIN_LIFETIME`], then shortened to the configured cap.
fn granted_expiration(
    config: &super::GraphConfig,
    asked: Option<&str>,
) -> Result<SystemTime, GraphError> {
    let asked =
        asked.ok_or_else(|| GraphError::bad("expirationDateTime is a required property."))?;
    let asked = parse_graph_time(asked).ok_or_else(|| {
        GraphError::bad(format!(
            "Invalid expirationDateTime '{asked}': not an ISO 8601 date and time."
        ))
    })?;
    let now = SystemTime::now();
    if asked <= now {
        return Err(GraphError::new(
            StatusCode::BAD_REQUEST,
            "ExtensionError",
            "Subscription expiration must be in the future.",
        ));
    }
    if asked > now + config.max_lifetime {
        return Err(GraphError::new(
            StatusCode::BAD_REQUEST,
            "ExtensionError",
            format!(
                "Subscription expiration can only be {} minutes in the future.",
                config.max_lifetime.as_secs() / 60
            ),
        ));
    }
    let mut granted = asked.max(now + MIN_LIFETIME);
    if let Some(cap) = config.lifetime_cap {
        granted = granted.min(now + cap);
    }
    Ok(granted)
}

async fn create(shared: &Arc<Shared>, body: &[u8]) -> Result<(StatusCode, Value), GraphError> {
    let config = &shared.config.graph;
    let b: CreateBody = parse_json(body)?;
    let change_types = b
        .change_type
        .as_deref()
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| GraphError::bad("changeType is a required property."))?
        .split(',')
        .map(|c| {
            ChangeType::from_name(c.trim()).ok_or_else(|| {
                GraphError::bad(format!(
                    "'{c}' is not a valid changeType: use created, updated or deleted."
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let notification_url = b
        .notification_url
        .ok_or_else(|| GraphError::bad("notificationUrl is a required property."))?;
    check_https("notificationUrl", &notification_url)?;
    if let Some(url) = &b.lifecycle_notification_url {
        check_https("lifecycleNotificationUrl", url)?;
    }
    let resource = b
        .resource
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| GraphError::bad("resource is a required property."))?;
    if b.client_state
        .as_ref()
        .is_some_and(|c| c.chars().count() > MAX_CLIENT_STATE)
    {
        return Err(GraphError::bad(format!(
            "clientState must be at most {MAX_CLIENT_STATE} characters."
        )));
    }
    let expiration = granted_expiration(config, b.expiration_date_time.as_deref())?;

    // Both endpoints are validated, each with its own token, before anything is created
    // (Graph's rule for webhooks; the same URL given twice is validated twice).
    let id = guid();
    let mut endpoints = vec![notification_url.clone()];
    endpoints.extend(b.lifecycle_notification_url.clone());
    for url in &endpoints {
        if let Err(e) = graph_push::validate(shared, url, &id).await {
            tracing::info!(%url, error = %e, "Graph validation failed");
            return Err(GraphError::new(
                StatusCode::BAD_REQUEST,
                "ValidationError",
                "Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request.",
            ));
        }
    }

    let mut state = shared.lock();
    let user_id = state.graph.user_id(&resource);
    let sub = GraphSubscription {
        id: id.clone(),
        kind: ResourceKind::of(&resource),
        resource,
        change_types,
        notification_url,
        lifecycle_url: b.lifecycle_notification_url,
        expiration,
        client_state: b.client_state,
        created: SystemTime::now(),
        renewed: 0,
        reauthorized: 0,
        removal: None,
        reauthorization_pending: None,
        user_id,
        changes_made: 0,
        delivered: 0,
        dropped: 0,
    };
    let answer = entity(to_json(&sub, config));
    state.graph.subscriptions.insert(id, sub);
    drop(state);
    shared.changed();
    Ok((StatusCode::CREATED, answer))
}

/// PATCH: a new `expirationDateTime`, with the create's limits. Also answers an outstanding
/// reauthorization, as Graph takes a renewal for one.
fn renew(shared: &Shared, id: &str, body: &[u8]) -> Result<(StatusCode, Value), GraphError> {
    let b: RenewBody = parse_json(body)?;
    with_live(shared, id, |_, _| ())?;
    let expiration = granted_expiration(&shared.config.graph, b.expiration_date_time.as_deref())?;
    let answer = with_live(shared, id, |s, config| {
        s.expiration = expiration;
        s.renewed += 1;
        s.reauthorization_pending = None;
        entity(to_json(s, config))
    })?;
    shared.changed();
    Ok((StatusCode::OK, answer))
}

// ---------------------------------------------------------------------------------------
// Control API: /_sim/graph/…
// ---------------------------------------------------------------------------------------

/// A control error: status and message.
pub(crate) type ControlError = (StatusCode, String);

#[derive(Debug, Deserialize)]
struct ChangesBody {
    subscription_id: Option<String>,
    resource: Option<String>,
    change_type: String,
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
struct RemoveBody {
    subscription_id: String,
    #[serde(default)]
    silent: bool,
}

#[derive(Debug, Deserialize)]
struct ThrottleBody {
    #[serde(default = "one_u32")]
    count: u32,
    #[serde(default = "ten")]
    retry_after_secs: u32,
    #[serde(default = "too_many")]
    status: u16,
}

fn one_u32() -> u32 {
    1
}

fn ten() -> u32 {
    10
}

fn too_many() -> u16 {
    429
}

/// The Graph control routes (`route` is the part after `/_sim/graph/`); `None` when there is
/// no such route.
pub(crate) fn control(
    handle: &SimHandle,
    method: &Method,
    route: &str,
    body: &[u8],
    parse: impl Fn(&[u8]) -> Result<Value, ControlError>,
) -> Option<Result<Value, ControlError>> {
    let refused = |e: SimError| {
        let status = match e {
            SimError::UnknownSubscription(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, e.to_string())
    };
    let body = parse(body);
    fn from<T: serde::de::DeserializeOwned>(
        body: Result<Value, ControlError>,
    ) -> Result<T, ControlError> {
        serde_json::from_value(body?)
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("JSON body: {e}")))
    }
    let ok = || json!({"ok": true});
    Some(match (method, route) {
        (&Method::GET, "subscriptions") => {
            serde_json::to_value(handle.graph_subscriptions()).map_err(internal)
        }
        (&Method::GET, "deliveries") => {
            serde_json::to_value(handle.graph_deliveries()).map_err(internal)
        }
        (&Method::DELETE, "deliveries") => {
            handle.clear_graph_deliveries();
            Ok(json!({"cleared": true}))
        }
        (&Method::POST, "changes") => from::<ChangesBody>(body).and_then(|b| {
            let change = ChangeType::from_name(&b.change_type)
                .ok_or_else(|| refused(SimError::InvalidChangeType(b.change_type.clone())))?;
            let target = match (b.subscription_id, b.resource) {
                (Some(id), _) => GraphTarget::Subscription(id),
                (None, Some(resource)) => GraphTarget::Resource(resource),
                (None, None) => GraphTarget::All,
            };
            let made = handle
                .graph_change(&target, change, b.count)
                .map_err(refused)?;
            serde_json::to_value(made).map_err(internal)
        }),
        (&Method::POST, "faults/remove") => from::<RemoveBody>(body).and_then(|b| {
            handle
                .graph_remove_subscription(&b.subscription_id, !b.silent)
                .map_err(refused)
                .map(|()| ok())
        }),
        (&Method::POST, "faults/missed") => from::<SubscriptionBody>(body).and_then(|b| {
            handle
                .graph_missed(&b.subscription_id)
                .map_err(refused)
                .map(|()| ok())
        }),
        (&Method::POST, "faults/reauthorization-required") => from::<SubscriptionBody>(body)
            .and_then(|b| {
                handle
                    .graph_require_reauthorization(&b.subscription_id)
                    .map_err(refused)
                    .map(|()| ok())
            }),
        (&Method::POST, "faults/expire") => from::<SubscriptionBody>(body).and_then(|b| {
            handle
                .graph_expire_now(&b.subscription_id)
                .map_err(refused)
                .map(|()| ok())
        }),
        (&Method::POST, "faults/wrong-client-state") => {
            from::<SubscriptionBody>(body).and_then(|b| {
                handle
                    .graph_wrong_client_state(&b.subscription_id)
                    .map_err(refused)
                    .map(|id| json!({"id": id}))
            })
        }
        (&Method::POST, "faults/throttle") => from::<ThrottleBody>(body).and_then(|b| {
            let status = match b.status {
                429 => GraphThrottle::TooManyRequests,
                503 => GraphThrottle::ServiceUnavailable,
                other => {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        format!("status {other}: 429 or 503"),
                    ))
                }
            };
            handle.graph_throttle(b.count, status, b.retry_after_secs);
            Ok(ok())
        }),
        _ => return None,
    })
}

fn internal(e: serde_json::Error) -> ControlError {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Starts the delivery task of `url` when enqueueing asked for it.
pub(crate) fn start_delivery(shared: &Arc<Shared>, url: Option<String>) {
    if let Some(url) = url {
        graph_push::spawn_delivery(shared, url);
    }
}
