//! Managed Graph mode's answer to a POST on one of the relay's own Graph callback URLs.
//!
//! Every item's `clientState` is checked (in constant time) against the secret of its
//! subscription before anything is trusted; one mismatch refuses the whole POST (403, counted,
//! nothing delivered), since Graph never sends one and a forger must not get part of a batch
//! through. Then, in order: lifecycle events go to the keeper, notifications of retired
//! subscriptions are acknowledged and dropped (the current subscription of the resource reports
//! the same changes), and every other notification is handed to the delivery side as its own
//! JSON without `clientState`. Graph hears 202 only once every item is delivered or durably
//! spooled, and within its deadline: direct deliveries get a bounded share of it and are spooled
//! when the receiver is slower.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http1::{HeaderBlock, RequestHead};

use super::keeper::GraphKeeper;
use crate::client::ConnInfo;
use crate::deliver::passthrough::forwarded_fields;
use crate::spool::graph_queue;

/// The whole answer to Graph is due within this after the body arrived: Graph counts endpoints
/// slower than about 3 s as slow. The rest of the 3 s is for the network and the write.
pub const GRAPH_ANSWER_BUDGET: Duration = Duration::from_millis(2500);

/// What the relay answers Graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 202: every item is delivered, spooled, or needed no delivery.
    Accepted,
    /// 403: a `clientState` did not match, or a subscription id the relay never created.
    Forbidden,
    /// 503: an item could be neither delivered nor spooled (or its queue stayed busy past the
    /// deadline): Graph retries the POST.
    NotStored,
}

/// Answer a change notification collection posted to the relay's own callback URL.
pub async fn answer(
    keeper: &GraphKeeper,
    collection: &graph::Collection,
    head: &RequestHead<'_>,
    conn: &ConnInfo,
    started: Instant,
) -> Outcome {
    let deadline = started + GRAPH_ANSWER_BUDGET;
    // Check everything first: nothing of a POST with one forged item goes anywhere.
    let mut checked = Vec::with_capacity(collection.items.len());
    for item in &collection.items {
        let sent = item.client_state.as_deref().unwrap_or("");
        let known = match keeper.lookup(&item.subscription_id).await {
            Some(k) => Some(k),
            None if !sent.is_empty() => keeper.adopt_orphan(&item.subscription_id, sent).await,
            None => None,
        };
        let Some(k) = known else {
            keeper.client_state_refused("unknown_subscription");
            tracing::warn!(peer = %conn.peer, subscription = %crate::subscriptions::abbreviate(&item.subscription_id), "Graph notification for a subscription the relay did not create: refused (403)");
            return Outcome::Forbidden;
        };
        if !graph::constant_time_eq(sent.as_bytes(), k.client_state.expose().as_bytes()) {
            keeper.client_state_refused("mismatch");
            tracing::warn!(peer = %conn.peer, resource = %k.resource, "Graph notification with a wrong clientState: refused (403), not delivered");
            return Outcome::Forbidden;
        }
        checked.push(k);
    }
    let mut headers = HeaderBlock::with_capacity(256);
    forwarded_fields(head, conn, &mut headers);
    for (item, k) in collection.items.iter().zip(checked) {
        keeper.notified(&k.resource);
        if let Some(event) = &item.lifecycle_event {
            if k.retired {
                continue;
            }
            if let Err(e) = keeper
                .lifecycle(&k.resource, &item.subscription_id, event)
                .await
            {
                tracing::error!(resource = %k.resource, error = %e, "cannot act on a lifecycle event; Graph will send it again");
                return Outcome::NotStored;
            }
            continue;
        }
        if k.retired {
            keeper.retired_notification();
            continue;
        }
        let accepted = keeper
            .delivery()
            .accept(
                &graph_queue(&k.resource),
                &item.subscription_id,
                headers.clone(),
                Bytes::from(item.for_receiver()),
                Some(tokio::time::Instant::from_std(deadline)),
            )
            .await;
        match accepted {
            Ok(_) => keeper.delivered(item.change_type.as_deref()),
            Err(e) => {
                tracing::debug!(resource = %k.resource, error = %e, "Graph notification not accepted; answering 503 so Graph retries");
                return Outcome::NotStored;
            }
        }
    }
    Outcome::Accepted
}
