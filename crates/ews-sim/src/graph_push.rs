//! Graph's side of the callbacks: the `?validationToken=` handshake that a create must pass,
//! and one delivery task per callback URL that POSTs `{"value": [...]}` batches in order,
//! retrying a failed POST with doubling waits (scaled by the time factor) for up to Graph's
//! four hours before dropping its items. Every exchange is recorded for tests.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::time::Instant;

use super::graph_state::{DeliveryKind, GraphDelivery, LifecycleEvent, QueuedItem, RemovalReason};
use super::push::{self, PushError};
use super::state::millis;
use super::util::{guid, query_encode};
use super::Shared;

/// Graph sends no documented User-Agent of its own; this names the simulator honestly while
/// looking like a service client, so a callback logging it sees where the POST came from.
pub const USER_AGENT: &str = "Microsoft-Graph-Change-Notifications-Simulator/1.0 (ews-sim)";

/// Content type of notification POSTs, as Graph sends it.
const NOTIFICATION_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// Content type of the validation POST (its body is empty), as Graph sends it.
const VALIDATION_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Why a validation handshake failed; the create then answers 400 `ValidationError`.
#[derive(Debug, thiserror::Error)]
pub enum ValidationFailure {
    /// The POST itself failed (URL, connection, TLS, HTTP).
    #[error("{0}")]
    Push(#[from] PushError),
    /// No answer within the validation timeout (Graph's 10 seconds).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// An answer other than 200.
    #[error("HTTP status {0}, expected 200")]
    Status(u16),
    /// 200, but not `text/plain`.
    #[error("Content-Type {0:?}, expected text/plain")]
    ContentType(Option<String>),
    /// 200 `text/plain`, but not the decoded token.
    #[error("body is not the decoded validation token")]
    WrongToken,
}

/// A new validation token, in the form Graph's have ("Validation: Testing client application
/// reachability for subscription Request-Id: <guid>"): spaces and colons, so a callback must
/// URL-decode it properly.
pub fn validation_token() -> String {
    format!(
        "Validation: Testing client application reachability for subscription Request-Id: {}",
        guid()
    )
}

/// POSTs the handshake to `url` and checks the answer as Graph does: within the validation
/// timeout, 200, `text/plain`, exactly the decoded token. Records the exchange.
pub async fn validate(
    shared: &Shared,
    url: &str,
    subscription_id: &str,
) -> Result<(), ValidationFailure> {
    let token = validation_token();
    let separator = if url.contains('?') { '&' } else { '?' };
    let target = format!("{url}{separator}validationToken={}", query_encode(&token));
    let limit = shared.config.graph.validation_timeout;
    let started = Instant::now();
    let sent = tokio::time::timeout(
        limit,
        push::send(
            shared,
            &target,
            VALIDATION_CONTENT_TYPE,
            USER_AGENT,
            String::new(),
        ),
    )
    .await;
    let (status, verdict) = match sent {
        Err(_) => (None, Err(ValidationFailure::Timeout(limit))),
        Ok(Err(e)) => (None, Err(e.into())),
        Ok(Ok(answer)) => {
            let status = answer.status.as_u16();
            let plain = answer.content_type.as_deref().is_some_and(|ct| {
                ct.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/plain"))
            });
            let verdict = if status != 200 {
                Err(ValidationFailure::Status(status))
            } else if !plain {
                Err(ValidationFailure::ContentType(answer.content_type))
            } else if answer.body != token.as_bytes() {
                Err(ValidationFailure::WrongToken)
            } else {
                Ok(())
            };
            (Some(status), verdict)
        }
    };
    record(
        shared,
        url,
        DeliveryKind::Validation,
        0,
        vec![subscription_id.to_owned()],
        started,
        status,
        verdict.as_ref().err().map(ToString::to_string),
        false,
    );
    verdict
}

/// Records one callback exchange and wakes waiters.
#[allow(clippy::too_many_arguments)]
fn record(
    shared: &Shared,
    url: &str,
    kind: DeliveryKind,
    items: usize,
    subscription_ids: Vec<String>,
    started: Instant,
    status: Option<u16>,
    error: Option<String>,
    dropped: bool,
) {
    let elapsed = started.elapsed();
    let delivery = GraphDelivery {
        seq: 0,
        time: humantime::format_rfc3339_millis(SystemTime::now() - elapsed).to_string(),
        url: url.to_owned(),
        kind,
        items,
        subscription_ids,
        status,
        ok: error.is_none(),
        error,
        elapsed_ms: millis(elapsed),
        dropped,
    };
    shared.lock().graph.record(delivery);
    shared.changed();
}

/// Starts the delivery task of a callback URL (the caller has marked it running).
pub fn spawn_delivery(shared: &Arc<Shared>, url: String) {
    let task_shared = shared.clone();
    let mut tasks = shared.lock_tasks();
    while tasks.try_join_next().is_some() {}
    tasks.spawn(delivery_loop(task_shared, url));
}

/// The next batch for a URL: the front items of one kind, at most the batch size. Change
/// items of subscriptions that ended while queued are dropped first: Graph does not notify
/// for a subscription it no longer has (lifecycle items, `subscriptionRemoved` above all,
/// still go).
fn next_batch(shared: &Shared, url: &str) -> Option<Vec<QueuedItem>> {
    let max = shared.config.graph.max_batch.max(1);
    let mut state = shared.lock();
    let now = SystemTime::now();
    let graph = &mut state.graph;
    let queue = graph.queues.get_mut(url)?;
    let mut stale = Vec::new();
    queue.items.retain(|item| {
        let live = item.kind != DeliveryKind::Notification
            || graph
                .subscriptions
                .get(&item.subscription_id)
                .is_some_and(|s| s.is_live(now));
        if !live {
            stale.push(item.subscription_id.clone());
        }
        live
    });
    let kind = queue.items.front()?.kind;
    let batch: Vec<QueuedItem> = queue
        .items
        .iter()
        .take_while(|i| i.kind == kind)
        .take(max)
        .cloned()
        .collect();
    for id in stale {
        if let Some(sub) = graph.subscriptions.get_mut(&id) {
            sub.dropped += 1;
        }
    }
    Some(batch)
}

/// Takes the first `n` items of a URL's queue off, counting them as delivered or dropped.
fn settle(shared: &Shared, url: &str, n: usize, delivered: bool) {
    let mut state = shared.lock();
    let graph = &mut state.graph;
    let Some(queue) = graph.queues.get_mut(url) else {
        return;
    };
    let taken: Vec<QueuedItem> = queue.items.drain(..n.min(queue.items.len())).collect();
    for item in taken {
        if let Some(sub) = graph.subscriptions.get_mut(&item.subscription_id) {
            if delivered {
                sub.delivered += 1;
            } else {
                sub.dropped += 1;
            }
        }
    }
    drop(state);
    shared.changed();
}

async fn delivery_loop(shared: Arc<Shared>, url: String) {
    let mut shutdown = shared.shutdown.subscribe();
    let Some(wake) = shared.lock().graph.queues.get(&url).map(|q| q.wake.clone()) else {
        return;
    };
    let graph = &shared.config.graph;
    let factor = shared.config.time_factor;
    loop {
        let Some(batch) = next_batch(&shared, &url) else {
            tokio::select! {
                _ = wake.notified() => continue,
                _ = shutdown.changed() => return,
            }
        };
        let kind = batch[0].kind;
        // The subscriptions in the batch, each once, in order of first appearance.
        let mut ids: Vec<String> = Vec::new();
        for item in &batch {
            if !ids.contains(&item.subscription_id) {
                ids.push(item.subscription_id.clone());
            }
        }
        let body = json!({"value": batch.iter().map(|i| &i.item).collect::<Vec<_>>()}).to_string();
        let budget = graph.retry_budget.mul_f64(factor);
        // The budget runs from the first try: Graph gives up on a notification, not a POST.
        let first_try = Instant::now();
        let mut wait = graph.first_retry.mul_f64(factor);
        loop {
            let started = Instant::now();
            let outcome = tokio::time::timeout(
                graph.notification_timeout,
                push::send(
                    &shared,
                    &url,
                    NOTIFICATION_CONTENT_TYPE,
                    USER_AGENT,
                    body.clone(),
                ),
            )
            .await;
            // Any 2xx is a delivery; anything else, or nothing in time, is retried.
            let (status, error) = match outcome {
                Err(_) => (
                    None,
                    Some(format!("no answer within {:?}", graph.notification_timeout)),
                ),
                Ok(Err(e)) => (None, Some(e.to_string())),
                Ok(Ok(answer)) if answer.status.is_success() => {
                    (Some(answer.status.as_u16()), None)
                }
                Ok(Ok(answer)) => (
                    Some(answer.status.as_u16()),
                    Some(format!("HTTP status {}", answer.status.as_u16())),
                ),
            };
            let ok = error.is_none();
            let give_up = !ok && first_try.elapsed() + wait > budget;
            record(
                &shared,
                &url,
                kind,
                batch.len(),
                ids.clone(),
                started,
                status,
                error,
                give_up,
            );
            if ok || give_up {
                if give_up {
                    tracing::info!(%url, items = batch.len(), "Graph retry budget spent: items dropped");
                }
                settle(&shared, &url, batch.len(), ok);
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            wait *= 2;
        }
    }
}

/// Starts the grace timer of reauthorization request number `number`: if it is still the
/// outstanding one when the grace ends, the subscription is removed with a
/// `subscriptionRemoved` lifecycle notification, as Graph removes one whose access was not
/// refreshed.
pub fn spawn_reauthorization_timer(shared: &Arc<Shared>, id: String, number: u64) {
    let task_shared = shared.clone();
    let grace = shared.config.graph.reauthorization_grace;
    let mut tasks = shared.lock_tasks();
    tasks.spawn(async move {
        let shared = task_shared;
        let mut shutdown = shared.shutdown.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(grace) => {}
            _ = shutdown.changed() => return,
        }
        let start = {
            let mut state = shared.lock();
            let now = SystemTime::now();
            let Some(sub) = state.graph.subscriptions.get_mut(&id) else {
                return;
            };
            if sub.reauthorization_pending != Some(number) || !sub.is_live(now) {
                return;
            }
            sub.reauthorization_pending = None;
            sub.removal = Some(RemovalReason::NotReauthorized);
            let tenant = &shared.config.graph.tenant_id;
            state
                .graph
                .lifecycle(&id, LifecycleEvent::SubscriptionRemoved, tenant)
        };
        shared.changed();
        if let Some(url) = start {
            spawn_delivery(&shared, url);
        }
    });
}
