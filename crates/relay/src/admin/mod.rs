//! The plain-HTTP admin endpoint: `/healthz`, `/readyz`, `/metrics`, `/api/subscriptions`, and
//! the human-readable `/status` page (see [`status`]).
//!
//! Meant for the container runtime and the monitoring system on the inside network; it never
//! relays anything and is bound to loopback by default.

pub mod status;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::edge::tls::CertResolver;
use crate::metrics::Metrics;
use crate::notify::tracker::{ReceiverAnswer, Tracker};
use crate::receiver::{Reachability, Receiver};

/// How long a success vouches for the receiver, and how long a failure after which a TCP probe
/// cannot tell (the receiver accepted the connection, then failed) holds readiness down; see
/// [`check_receiver`]. Thirty seconds: shorter than Exchange's patience with a failing callback
/// (about 90 s at StatusFrequency 1), long enough not to probe on every scrape.
const READY_WINDOW: Duration = Duration::from_secs(30);
/// An admin request's head must arrive within this (it is a local monitoring client).
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent admin connections; monitoring needs a handful.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// What the admin endpoint reports on.
#[derive(Debug)]
pub struct AdminState {
    /// All metrics.
    pub metrics: Arc<Metrics>,
    /// Subscriptions seen in the traffic.
    pub tracker: Arc<Tracker>,
    /// Managed mode's mailboxes.
    pub manager: Option<Arc<crate::subscriptions::Manager>>,
    /// Managed mode's streaming groups and their mailboxes (`--transport streaming`).
    pub streams: Option<Arc<crate::streaming::Streams>>,
    /// Managed Graph mode's resources.
    pub graph: Option<Arc<crate::managed_graph::GraphKeeper>>,
    /// `--graph-path-prefix`, for display.
    pub graph_path_prefix: Option<String>,
    /// Recently denied source addresses.
    pub denied: Arc<crate::allow::DeniedLog>,
    /// The allow-list in force.
    pub allow: Arc<arc_swap::ArcSwap<crate::allow::AllowList>>,
    /// `--path-prefix`, for display.
    pub path_prefix: String,
    /// The receiver, for readiness.
    pub receiver: Arc<Receiver>,
    /// The served certificate.
    pub certs: Arc<CertResolver>,
    /// Set once the TLS listener is accepting.
    pub listening: AtomicBool,
    /// Process start, for uptime.
    pub started: Instant,
}

impl AdminState {
    /// Managed mode's delivery spool: one, shared by every keeper (EWS push or streaming,
    /// Graph), so any keeper's handle is the same spool.
    pub fn delivery(&self) -> Option<&crate::spool::Delivery> {
        self.manager
            .as_deref()
            .map(|m| &**m.delivery())
            .or_else(|| self.streams.as_deref().map(|s| &**s.delivery()))
            .or_else(|| self.graph.as_deref().map(|g| &**g.delivery()))
    }

    /// Whether any keeper runs (managed mode), as opposed to passthrough only.
    pub fn managed(&self) -> bool {
        self.manager.is_some() || self.streams.is_some() || self.graph.is_some()
    }
}

/// Serve admin requests until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Managed mode: subscriptions the keeper retired are `replaced` in the tracker (its API,
    // metrics and log), not stale. The admin state is where both meet.
    if let Some(manager) = &state.manager {
        let manager = Arc::downgrade(manager);
        state
            .tracker
            .set_retired_check(move |id| manager.upgrade().is_some_and(|m| m.is_retired(id)));
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(permit);
        });
    }
}

async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => readyz(state).await,
        "/status" => status_page(state).await,
        "/api/subscriptions" => {
            let mut r = text(StatusCode::OK, subscriptions_json(state));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        "/metrics" => {
            // Fresh per-state counts and certificate expiry for the scrape.
            state.metrics.set_subscriptions(state.tracker.sweep());
            state
                .metrics
                .set_cert_expiry(state.certs.current().info.not_after);
            let mut r = text(StatusCode::OK, state.metrics.encode());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /status, /healthz, /readyz, /metrics, /api/subscriptions\n".into(),
        ),
    }
}

/// `GET /readyz`: 200 when the relay can do its job, else 503 saying why.
///
/// Ready means both:
/// 1. the TLS listener is accepting connections, and
/// 2. the receiver is judged working by [`check_receiver`]: its latest exchange with the relay
///    succeeded, so a failure (a 502 or 504 to Exchange, a failed managed delivery, a 5xx from
///    the receiver) makes the relay unready at once, not after a grace period.
async fn readyz(state: &AdminState) -> Response<Full<Bytes>> {
    if !state.listening.load(Ordering::Relaxed) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not listening yet\n".into(),
        );
    }
    let check = check_receiver(&state.receiver).await;
    if check.ok {
        return text(StatusCode::OK, "ready\n".into());
    }
    let why = match check.reachability.last_failure {
        Some((ago, failure)) => format!("failed {} s ago: {failure}", ago.as_secs()),
        None => "not accepting connections".to_owned(),
    };
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("receiver {} {why}\n", state.receiver.authority()),
    )
}

/// The receiver as readiness and the status page judge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverCheck {
    /// The verdict: the receiver works.
    pub ok: bool,
    /// What it rests on, after any probe this check made.
    pub reachability: Reachability,
}

/// Judge the receiver from the relay's latest exchanges with it (see
/// [`crate::receiver::Reachability`] for what counts as a success and a failure):
///
/// - failed since its latest success, after accepting the connection (no answer in time, an
///   invalid answer, a 5xx), less than [`READY_WINDOW`] ago: **not working**, without a probe
///   (a TCP connect cannot tell whether it answers again);
/// - succeeded last, less than [`READY_WINDOW`] ago: **working**, without a probe;
/// - otherwise (it refused the connection last, or its latest news is older than
///   [`READY_WINDOW`], or there is none yet): a fresh TCP connect decides **now**, and counts
///   as its latest news. So a receiver that is back is seen as back without waiting for
///   traffic, which a relay taken out of a load balancer would never get.
pub async fn check_receiver(receiver: &Receiver) -> ReceiverCheck {
    let r = receiver.reachability();
    let fresh = |d: Duration| d < READY_WINDOW;
    let decided = match (r.failing(), r.last_failure, r.last_success) {
        (true, Some((ago, failure)), _) if failure.after_connecting() && fresh(ago) => Some(false),
        (false, _, Some(ago)) if fresh(ago) => Some(true),
        _ => None,
    };
    let ok = match decided {
        Some(ok) => ok,
        None => receiver.probe().await,
    };
    ReceiverCheck {
        ok,
        reachability: receiver.reachability(),
    }
}

/// `GET /status`: the HTML status page, never cached, under a policy that lets nothing but its
/// own inline style and script apply.
async fn status_page(state: &AdminState) -> Response<Full<Bytes>> {
    let check = check_receiver(&state.receiver).await;
    let page = crate::admin::status::StatusPage::collect(state, check);
    let mut r = text(StatusCode::OK, page.render());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(crate::admin::status::content_security_policy()),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// One tracked EWS subscription as `/api/subscriptions` shows it.
#[derive(serde::Serialize)]
struct SubscriptionView<'a> {
    subscription_id: &'a str,
    /// Always `ews`.
    source: &'static str,
    state: &'static str,
    first_seen: String,
    last_seen: String,
    seconds_since_last_seen: u64,
    last_watermark: Option<&'a str>,
    events: std::collections::BTreeMap<&'static str, u64>,
    last_response_class: &'static str,
    last_response_code: Option<&'a str>,
    /// Who answered Exchange last: `receiver`, or `relay` (managed mode answers itself).
    answered_by: Option<&'static str>,
    /// The receiver's answer; `None` when the relay answered.
    receiver_answer: Option<&'static str>,
    /// The relay's own answer (managed mode): `OK` or `Unsubscribe`.
    relay_answer: Option<&'static str>,
    receiver_http_status: Option<u16>,
    peer: String,
}

/// One Graph subscription seen in passthrough, as `/api/subscriptions` shows it (see
/// [`crate::notify::GraphSubscription`]).
#[derive(serde::Serialize)]
struct GraphSubscriptionView<'a> {
    subscription_id: &'a str,
    /// Always `graph`.
    source: &'static str,
    /// `alive`, `expiring`, `expired`, `removed` or `error`.
    state: &'static str,
    first_seen: String,
    last_seen: String,
    seconds_since_last_seen: u64,
    /// The collection its changes are in, derived from the items' paths (Graph does not send
    /// the subscription's own `resource`).
    resource: Option<&'a str>,
    /// The `resource` of its latest change notification.
    last_resource: Option<&'a str>,
    /// The change types seen, in `created`, `updated`, `deleted`, `other` order.
    change_types: Vec<&'static str>,
    /// Change notifications seen, by change type.
    changes: std::collections::BTreeMap<&'static str, u64>,
    /// The latest `subscriptionExpirationDateTime` seen (RFC 3339).
    expiration: Option<String>,
    /// Seconds until then (negative once passed).
    seconds_to_expiry: Option<i64>,
    /// Renewals seen: times a later expiration than before arrived.
    renewals: u64,
    /// Whether a renewal was seen at all.
    renewal_seen: bool,
    /// Lifecycle events: the latest, when, and counts by event.
    lifecycle: GraphLifecycleView,
    tenant_id: Option<&'a str>,
    /// Always `receiver` (passthrough) once an answer came back.
    answered_by: Option<&'static str>,
    /// `OK` (any 2xx), `http_error` or `unreachable`.
    receiver_answer: Option<&'static str>,
    receiver_http_status: Option<u16>,
    peer: String,
}

/// A Graph subscription's lifecycle events, as `/api/subscriptions` shows them.
#[derive(serde::Serialize)]
struct GraphLifecycleView {
    last: Option<String>,
    last_at: Option<String>,
    counts: std::collections::BTreeMap<&'static str, u64>,
}

/// A row of `/api/subscriptions`: either source.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum AnySubscriptionView<'a> {
    Ews(SubscriptionView<'a>),
    Graph(GraphSubscriptionView<'a>),
}

fn graph_subscription_view<'a>(
    id: &'a str,
    s: &'a crate::notify::GraphSubscription,
    state: crate::notify::State,
    now: std::time::SystemTime,
) -> GraphSubscriptionView<'a> {
    use crate::notify::tracker::{GRAPH_CHANGE_TYPES, GRAPH_LIFECYCLE_EVENTS};
    let rfc3339 = |t| humantime::format_rfc3339_seconds(t).to_string();
    let counted = |names: [&'static str; 4], counts: [u64; 4]| {
        names
            .into_iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    GraphSubscriptionView {
        subscription_id: id,
        source: crate::source::Source::Graph.as_str(),
        state: state.as_str(),
        first_seen: rfc3339(s.first_seen),
        last_seen: rfc3339(s.last_seen),
        seconds_since_last_seen: now
            .duration_since(s.last_seen)
            .unwrap_or_default()
            .as_secs(),
        resource: s.resource.as_deref(),
        last_resource: s.last_resource.as_deref(),
        change_types: GRAPH_CHANGE_TYPES
            .into_iter()
            .zip(s.changes)
            .filter(|(_, n)| *n > 0)
            .map(|(t, _)| t)
            .collect(),
        changes: counted(GRAPH_CHANGE_TYPES, s.changes),
        expiration: s.expiration.map(rfc3339),
        seconds_to_expiry: s.expiration.map(|e| match e.duration_since(now) {
            Ok(left) => left.as_secs() as i64,
            Err(past) => -(past.duration().as_secs() as i64),
        }),
        renewals: s.renewals,
        renewal_seen: s.renewals > 0,
        lifecycle: GraphLifecycleView {
            last: s.last_lifecycle.as_ref().map(|(e, _)| e.clone()),
            last_at: s.last_lifecycle.as_ref().map(|(_, t)| rfc3339(*t)),
            counts: counted(GRAPH_LIFECYCLE_EVENTS, s.lifecycle),
        },
        tenant_id: s.tenant_id.as_deref(),
        answered_by: s.receiver_answer.map(|_| "receiver"),
        receiver_answer: s.receiver_answer.map(ReceiverAnswer::as_str),
        receiver_http_status: match s.receiver_answer {
            Some(ReceiverAnswer::HttpError(code)) => Some(code),
            _ => None,
        },
        peer: s.peer.to_string(),
    }
}

fn subscriptions_json(state: &AdminState) -> String {
    let tracker = &state.tracker;
    let snapshot = tracker.snapshot();
    let graph_snapshot = tracker.graph_snapshot();
    let now = std::time::SystemTime::now();
    let mut views: Vec<(std::time::SystemTime, AnySubscriptionView<'_>)> = snapshot
        .iter()
        .map(|(id, s, state)| SubscriptionView {
            subscription_id: id,
            source: crate::source::Source::Ews.as_str(),
            state: state.as_str(),
            first_seen: humantime::format_rfc3339_seconds(s.first_seen).to_string(),
            last_seen: humantime::format_rfc3339_seconds(s.last_seen).to_string(),
            seconds_since_last_seen: now
                .duration_since(s.last_seen)
                .unwrap_or_default()
                .as_secs(),
            last_watermark: s.last_watermark.as_deref(),
            events: ews::EventType::ALL
                .iter()
                .zip(s.events)
                .filter(|(_, n)| *n > 0)
                .map(|(t, n)| (t.as_str(), n))
                .collect(),
            last_response_class: match s.last_response_class {
                ews::ResponseClass::Success => "Success",
                ews::ResponseClass::Warning => "Warning",
                ews::ResponseClass::Error => "Error",
            },
            last_response_code: s.last_response_code.as_deref(),
            answered_by: s
                .receiver_answer
                .map(|a| if a.by_relay() { "relay" } else { "receiver" }),
            receiver_answer: s
                .receiver_answer
                .filter(|a| !a.by_relay())
                .map(ReceiverAnswer::as_str),
            relay_answer: match s.receiver_answer {
                Some(ReceiverAnswer::Relay(ews::SubscriptionStatus::Ok)) => Some("OK"),
                Some(ReceiverAnswer::Relay(ews::SubscriptionStatus::Unsubscribe)) => {
                    Some("Unsubscribe")
                }
                _ => None,
            },
            receiver_http_status: match s.receiver_answer {
                Some(ReceiverAnswer::HttpError(code)) => Some(code),
                _ => None,
            },
            peer: s.peer.to_string(),
        })
        .zip(snapshot.iter().map(|e| e.1.last_seen))
        .map(|(v, seen)| (seen, AnySubscriptionView::Ews(v)))
        .collect();
    views.extend(graph_snapshot.iter().map(|(id, s, state)| {
        (
            s.last_seen,
            AnySubscriptionView::Graph(graph_subscription_view(id, s, *state, now)),
        )
    }));
    // Both sources together, most recently seen first (each snapshot is sorted so already).
    views.sort_by_key(|(seen, _)| std::cmp::Reverse(*seen));
    let views: Vec<AnySubscriptionView<'_>> = views.into_iter().map(|(_, v)| v).collect();
    let mut body = serde_json::json!({
        "mode": if state.managed() { "managed" } else { "passthrough" },
        "stale_after_seconds": tracker.stale_after().as_secs(),
        "subscriptions": views,
    });
    if let Some(m) = &state.manager {
        body["transport"] = "push".into();
        body["mailboxes"] = serde_json::to_value(m.views()).unwrap_or_default();
    }
    if let Some(s) = &state.streams {
        // Same mailbox rows as push (no watermark: streaming subscriptions have none), plus
        // each group's connection.
        let views = s.views();
        body["transport"] = "streaming".into();
        body["mailboxes"] = serde_json::to_value(views.mailboxes).unwrap_or_default();
        body["streaming_groups"] = serde_json::to_value(views.streaming_groups).unwrap_or_default();
    }
    if let Some(g) = &state.graph {
        let mut resources = serde_json::to_value(g.views()).unwrap_or_default();
        if let Some(rows) = resources.as_array_mut() {
            for row in rows {
                row["source"] = crate::source::Source::Graph.as_str().into();
            }
        }
        body["graph_resources"] = resources;
    }
    if let Some(d) = state.delivery() {
        body["spool_depth"] = d.waiting().into();
    }
    let mut out = serde_json::to_string_pretty(&body).unwrap_or_else(|_| "{}".to_owned());
    out.push('\n');
    out
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
