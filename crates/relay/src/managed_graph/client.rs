//! Outbound Microsoft Graph calls of the Graph keeper: create, renew, reauthorize and delete a
//! subscription, with the credentials, a concurrency cap, and every failure turned into a
//! [`GraphAction`] the keeper can act on.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use tokio::sync::Semaphore;

use crate::subscriptions::auth::{AuthError, Credentials};

/// Graph calls in flight at most. Graph throttles per app and tenant; the keeper's calls are a
/// few per resource per days, so a small cap only smooths a start-up with many resources.
const MAX_CONCURRENT: usize = 8;
/// Largest Graph answer read; a subscription is about 1 KiB.
const MAX_RESPONSE: usize = 1 << 20;
/// Back-off after 429/503 without `Retry-After`.
const DEFAULT_THROTTLE_BACKOFF: Duration = Duration::from_secs(30);
/// Longest `Retry-After` honoured: a bigger value is taken as this, so a garbled header cannot
/// stop the keeper for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What the keeper should do after a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphAction {
    /// Throttled (429, 503 with `Retry-After`): wait this long.
    Throttled(Duration),
    /// Try again with back-off (network, 5xx, a failed validation handshake).
    Transient,
    /// Only a configuration or permission change cures it (403, a bad resource): retry rarely.
    Permanent,
    /// 404 for a subscription: Graph no longer has it.
    Gone,
    /// The expiration asked for is beyond what the resource allows: at most this many minutes.
    ExpirationTooLong(u64),
}

/// A failed Graph call: what to do, and what to tell the operator.
#[derive(Debug, Clone)]
pub struct GraphFailure {
    /// What the keeper should do.
    pub action: GraphAction,
    /// Graph's error code or the HTTP status (`ResourceNotFound`, `HTTP 503`).
    pub code: String,
    /// Human-readable detail for the status page.
    pub detail: String,
}

impl GraphFailure {
    fn new(action: GraphAction, code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            action,
            code: code.into(),
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for GraphFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// The Graph side of the keeper.
pub struct GraphClient {
    http: reqwest::Client,
    /// `--graph-url`, without a trailing `/`.
    base: String,
    credentials: Arc<Credentials>,
    limit: Semaphore,
}

impl std::fmt::Debug for GraphClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl GraphClient {
    /// A client for Graph at `base` (`--graph-url`) with Graph-scoped `credentials`.
    pub fn new(http: reqwest::Client, base: &str, credentials: Arc<Credentials>) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            credentials,
            limit: Semaphore::new(MAX_CONCURRENT),
        }
    }

    /// `POST /subscriptions`. Graph validates the callback URLs before it answers, so this takes
    /// up to about 10 s longer than other calls.
    pub async fn create(
        &self,
        request: &graph::NewSubscription<'_>,
    ) -> Result<graph::Subscription, GraphFailure> {
        let body = serde_json::to_vec(request).expect("a subscription request serialises");
        let url = format!("{}/subscriptions", self.base);
        let (status, headers, answer) = self.call(reqwest::Method::POST, &url, Some(body)).await?;
        if status == StatusCode::CREATED || status == StatusCode::OK {
            return parse(&answer);
        }
        Err(failure(status, &headers, &answer, Op::Create))
    }

    /// `PATCH /subscriptions/{id}` with a new expiration: the renewal.
    pub async fn renew(
        &self,
        id: &str,
        expiration: SystemTime,
    ) -> Result<graph::Subscription, GraphFailure> {
        let body = serde_json::to_vec(&graph::Renewal {
            expiration_date_time: expiration,
        })
        .expect("a renewal serialises");
        let url = self.subscription_url(id)?;
        let (status, headers, answer) = self.call(reqwest::Method::PATCH, &url, Some(body)).await?;
        if status.is_success() {
            return parse(&answer);
        }
        Err(failure(status, &headers, &answer, Op::Existing))
    }

    /// `POST /subscriptions/{id}/reauthorize`, the answer to `reauthorizationRequired`.
    pub async fn reauthorize(&self, id: &str) -> Result<(), GraphFailure> {
        let url = format!("{}/reauthorize", self.subscription_url(id)?);
        let (status, headers, answer) = self.call(reqwest::Method::POST, &url, None).await?;
        if status.is_success() {
            return Ok(());
        }
        Err(failure(status, &headers, &answer, Op::Existing))
    }

    /// `DELETE /subscriptions/{id}`; a 404 counts as done (it is gone either way).
    pub async fn delete(&self, id: &str) -> Result<(), GraphFailure> {
        let url = self.subscription_url(id)?;
        let (status, headers, answer) = self.call(reqwest::Method::DELETE, &url, None).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(failure(status, &headers, &answer, Op::Existing))
    }

    /// The URL of one subscription; ids are Graph's GUIDs, anything else is refused rather than
    /// put in a path.
    fn subscription_url(&self, id: &str) -> Result<String, GraphFailure> {
        if id.is_empty()
            || id.len() > 128
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(GraphFailure::new(
                GraphAction::Gone,
                "InvalidId",
                "not a Graph subscription id",
            ));
        }
        Ok(format!("{}/subscriptions/{id}", self.base))
    }

    /// One call with credentials, refreshing an OAuth token once on 401.
    async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, http::HeaderMap, bytes::Bytes), GraphFailure> {
        let _permit = self.limit.acquire().await.map_err(|_| {
            GraphFailure::new(GraphAction::Transient, "ShuttingDown", "client closed")
        })?;
        for attempt in 0..2 {
            let mut req = self.http.request(method.clone(), url);
            if let Some(b) = &body {
                req = req.header(CONTENT_TYPE, "application/json").body(b.clone());
            }
            let req = self.credentials.apply(req).await.map_err(auth_failure)?;
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    return Err(GraphFailure::new(
                        GraphAction::Transient,
                        "ConnectionFailed",
                        without_url(&e),
                    ))
                }
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && attempt == 0 && self.credentials.refreshable()
            {
                tracing::info!("Graph answered 401; fetching a fresh token and retrying once");
                self.credentials.invalidate().await;
                continue;
            }
            let headers = resp.headers().clone();
            let answer = read_limited(resp).await?;
            if status == StatusCode::UNAUTHORIZED {
                let detail = graph::parse_error(&answer).map_or_else(
                    || "Graph refused the credentials".to_owned(),
                    |e| {
                        format!(
                            "{} (check the app's Graph application permissions and admin consent)",
                            e.message
                        )
                    },
                );
                return Err(GraphFailure::new(
                    GraphAction::Permanent,
                    "HTTP 401",
                    detail,
                ));
            }
            return Ok((status, headers, answer));
        }
        unreachable!("the loop returns on its second pass")
    }
}

/// Which kind of call failed: a 404 means another thing for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// A create: 404 is the resource (a bad path or a mailbox that does not exist).
    Create,
    /// A call on an existing subscription: 404 is the subscription, gone.
    Existing,
}

fn parse(answer: &[u8]) -> Result<graph::Subscription, GraphFailure> {
    graph::parse_subscription(answer).map_err(|e| {
        GraphFailure::new(
            GraphAction::Transient,
            "MalformedAnswer",
            format!("Graph's answer is not a subscription: {e}"),
        )
    })
}

/// Classify an error answer.
fn failure(status: StatusCode, headers: &http::HeaderMap, body: &[u8], op: Op) -> GraphFailure {
    let error = graph::parse_error(body);
    let code = error
        .as_ref()
        .map(|e| e.code.clone())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
    let message = error.map(|e| e.message).unwrap_or_default();
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
    let action = match status {
        StatusCode::TOO_MANY_REQUESTS => {
            GraphAction::Throttled(retry_after.unwrap_or(DEFAULT_THROTTLE_BACKOFF))
        }
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT if retry_after.is_some() => {
            GraphAction::Throttled(retry_after.unwrap_or(DEFAULT_THROTTLE_BACKOFF))
        }
        StatusCode::NOT_FOUND if op == Op::Existing => GraphAction::Gone,
        StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => GraphAction::Permanent,
        StatusCode::BAD_REQUEST => match graph::max_minutes_in_error(&message) {
            Some(max) => GraphAction::ExpirationTooLong(max),
            // Graph could not validate the callback: the listener, the certificate or the
            // path is wrong, or the internet path to it; worth retrying, not for ever often.
            None if code.contains("Validation") || message.contains("validation") => {
                GraphAction::Transient
            }
            None => GraphAction::Permanent,
        },
        s if s.is_server_error() => GraphAction::Transient,
        _ => GraphAction::Permanent,
    };
    let detail = if message.is_empty() {
        format!("HTTP {}", status.as_u16())
    } else {
        message
    };
    GraphFailure::new(action, code, detail)
}

async fn read_limited(resp: reqwest::Response) -> Result<bytes::Bytes, GraphFailure> {
    let too_large = || {
        GraphFailure::new(
            GraphAction::Transient,
            "ResponseTooLarge",
            "Graph answer too large",
        )
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE as u64)
    {
        return Err(too_large());
    }
    let body = resp.bytes().await.map_err(|e| {
        GraphFailure::new(GraphAction::Transient, "ConnectionFailed", without_url(&e))
    })?;
    if body.len() > MAX_RESPONSE {
        return Err(too_large());
    }
    Ok(body)
}

/// A reqwest error with its causes (reqwest's own text says only "error sending request"; the
/// cause, e.g. "connection refused", is what the operator needs), without the URL.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s
            .replace(&format!(" ({url})"), "")
            .replace(url.as_str(), "");
    }
    let s = s.trim_end_matches(" for url").to_owned();
    let mut out = s;
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

fn auth_failure(e: AuthError) -> GraphFailure {
    match e {
        AuthError::Unreachable(d) => {
            GraphFailure::new(GraphAction::Transient, "TokenEndpointUnreachable", d)
        }
        AuthError::Refused { status, detail } => GraphFailure::new(
            GraphAction::Permanent,
            format!("Token HTTP {status}"),
            detail,
        ),
        AuthError::Malformed(d) => GraphFailure::new(GraphAction::Transient, "TokenMalformed", d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, retry_after: Option<&str>, body: &str, op: Op) -> GraphAction {
        let mut h = http::HeaderMap::new();
        if let Some(r) = retry_after {
            h.insert(RETRY_AFTER, r.parse().unwrap());
        }
        failure(
            StatusCode::from_u16(status).unwrap(),
            &h,
            body.as_bytes(),
            op,
        )
        .action
    }

    #[test]
    fn failures_map_to_actions() {
        let err =
            |code: &str, msg: &str| format!(r#"{{"error":{{"code":"{code}","message":"{msg}"}}}}"#);
        assert_eq!(
            classify(429, Some("7"), "", Op::Create),
            GraphAction::Throttled(Duration::from_secs(7))
        );
        assert_eq!(
            classify(429, None, "", Op::Existing),
            GraphAction::Throttled(DEFAULT_THROTTLE_BACKOFF)
        );
        assert_eq!(
            classify(503, Some("99999999"), "", Op::Create),
            GraphAction::Throttled(MAX_RETRY_AFTER)
        );
        assert_eq!(classify(503, None, "", Op::Create), GraphAction::Transient);
        assert_eq!(classify(404, None, "", Op::Existing), GraphAction::Gone);
        assert_eq!(classify(404, None, "", Op::Create), GraphAction::Permanent);
        assert_eq!(
            classify(
                403,
                None,
                &err(
                    "ExtensionError",
                    "Operation: Create; Exception: [Status Code: Forbidden]"
                ),
                Op::Create
            ),
            GraphAction::Permanent
        );
        assert_eq!(
            classify(
                400,
                None,
                &err(
                    "ExtensionError",
                    "Subscription expiration can only be 4230 minutes in the future."
                ),
                Op::Create
            ),
            GraphAction::ExpirationTooLong(4230)
        );
        assert_eq!(
            classify(
                400,
                None,
                &err("ValidationError", "Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request."),
                Op::Create
            ),
            GraphAction::Transient
        );
        assert_eq!(
            classify(
                400,
                None,
                &err("InvalidRequest", "Unsupported change type"),
                Op::Create
            ),
            GraphAction::Permanent
        );
    }
}
