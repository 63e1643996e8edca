//! Repairs: what an error inside a stream asks for, per mailbox (resubscribe, resync,
//! rediscover) or for the anchor; the resync signal, and the gap a badly ended connection
//! leaves.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{lock, GroupState, GroupTask, LOSS_MEMORY};

use crate::store::MailboxState;
use crate::streaming::connection::{Connection, End};
use crate::subscriptions::backoff;
use crate::subscriptions::client::Failure;
use ews::Action;

impl GroupTask {
    /// Resync the mailboxes of `conn` whose events it may have lost (see the module's "Gaps").
    pub(super) async fn resync_gap(&mut self, conn: &Connection, end: &End) {
        if self.ctx.stopping.load(Ordering::Acquire) || !conn.may_have_lost(end) {
            // A stop leaves `stream_open` set when it is not clean: the next start resyncs.
            return;
        }
        let n = self
            .resync_where(|id| conn.ids.iter().any(|i| i == id) && !conn.moved.contains(id))
            .await;
        if n > 0 {
            tracing::warn!(
                connection = conn.id,
                end = end.label(),
                mailboxes = n,
                "a streaming connection ended without Closed after it had opened; events in flight may be lost, so its mailboxes get the resync signal"
            );
        }
    }

    /// Send the resync signal to every member whose subscription id passes `hit`; how many.
    pub(super) async fn resync_where(&mut self, hit: impl Fn(&str) -> bool) -> usize {
        let affected: Vec<String> = {
            let s = lock(&self.state);
            s.members
                .iter()
                .filter(|(_, m)| m.record.subscription_id.as_deref().is_some_and(&hit))
                .map(|(a, _)| a.clone())
                .collect()
        };
        for address in &affected {
            self.resync(address, "stream gap").await;
        }
        affected.len()
    }

    /// A connection refused for a reason that concerns its anchor mailbox: the anchor moved
    /// (Autodiscover it again; another member anchors), or cannot be impersonated or does not
    /// exist (another member anchors). Without this one bad mailbox would keep its whole group
    /// from streaming.
    pub(super) async fn anchor_trouble(&mut self, f: &Failure, conn_anchor: &str) {
        let (anchor, anchor_id) = {
            let s = lock(&self.state);
            let id = s
                .members
                .get(&s.anchor)
                .and_then(|m| m.record.subscription_id.clone());
            (s.anchor.clone(), id)
        };
        if anchor != conn_anchor {
            // Another anchor was chosen since that connection was asked for.
            return;
        }
        if f.action == Action::Rediscover {
            tracing::warn!(anchor = %anchor, code = %f.code, "the group's anchor mailbox moved; discovering it again, another member anchors");
            if anchor_id.is_some() {
                // Its subscription is abandoned with whatever it held.
                self.resync(&anchor, &f.code).await;
            }
            self.moved(&anchor).await;
            return;
        }
        if ANCHOR_CODES.contains(&f.code.as_str()) {
            let mut s = lock(&self.state);
            if elect_anchor(&mut s, Some(&anchor)) {
                tracing::warn!(old = %anchor, new = %s.anchor, code = %f.code, "the group's anchor mailbox cannot carry the connection; another member anchors");
            }
        }
    }

    pub(super) fn member_of(&self, subscription_id: &str) -> Option<String> {
        lock(&self.state)
            .members
            .iter()
            .find(|(_, m)| m.record.subscription_id.as_deref() == Some(subscription_id))
            .map(|(a, _)| a.clone())
    }

    pub(super) async fn subscription_error(
        &mut self,
        conn: u64,
        code: &str,
        subscription_id: &str,
    ) {
        let Some(address) = self.member_of(subscription_id) else {
            tracing::debug!(
                code,
                "streaming error for a subscription no member has (removed?)"
            );
            return;
        };
        match code {
            "ErrorNewEventStreamConnectionOpened" if self.is_draining(conn) => {
                // Our renewal took it over: from here its events travel on the new connection.
                if let Some(c) = self.conn_mut(conn) {
                    c.moved.insert(subscription_id.to_owned());
                }
            }
            "ErrorNewEventStreamConnectionOpened" => {
                // Someone else opened a stream for our subscription: its events went there.
                tracing::warn!(mailbox = %address, "another connection took this mailbox's subscription; reconnecting and asking the receiver to resynchronise");
                self.resync(&address, "taken by another connection").await;
                self.want_reconnect("taken");
            }
            "ErrorMissedNotificationEvents" => {
                tracing::warn!(mailbox = %address, "Exchange dropped events (ErrorMissedNotificationEvents); receiver told to resynchronise");
                self.resync(&address, "ErrorMissedNotificationEvents").await;
            }
            "ErrorProxyRequestNotAllowed" | "ErrorReadEventsFailed" => {
                tracing::warn!(mailbox = %address, code, "mailbox moved; Autodiscover again, regroup, resynchronise");
                self.resync(&address, code).await;
                self.moved(&address).await;
            }
            _ => {
                // ErrorSubscriptionNotFound, ErrorExpiredSubscription, ErrorInvalidSubscription
                // and anything unknown: the subscription is gone, and with it any events since.
                tracing::warn!(mailbox = %address, code, "streaming subscription lost; subscribing again, receiver told to resynchronise");
                self.resync(&address, code).await;
                let record = {
                    let mut s = lock(&self.state);
                    s.members.get_mut(&address).map(|m| {
                        let now = Instant::now();
                        let in_a_row = m.last_loss.is_some_and(|t| now - t < LOSS_MEMORY);
                        m.losses = if in_a_row { m.losses + 1 } else { 1 };
                        m.last_loss = Some(now);
                        m.record.subscription_id = None;
                        m.record.state = MailboxState::Lost;
                        m.record.last_error = Some(code.to_owned());
                        // The first loss is repaired at once; one that keeps coming back
                        // (an affinity problem, a server that forgets) waits longer each time.
                        m.retry_at = (m.losses > 1).then(|| {
                            now + backoff::delay(
                                m.losses - 1,
                                backoff::TRANSIENT_BASE,
                                backoff::TRANSIENT_CAP,
                                backoff::random(),
                            )
                        });
                        m.record.clone()
                    })
                };
                if let Some(r) = record {
                    self.ctx.save(r).await;
                }
                self.ctx.metrics.resubscribe("stream_error");
                self.want_reconnect("resubscribed");
            }
        }
    }

    /// Queue the resync signal for `address` behind what is waiting for it.
    pub(super) async fn resync(&mut self, address: &str, why: &str) {
        if let Err(e) = self.ctx.delivery.request_resync(address).await {
            tracing::error!(mailbox = address, error = %e, why, "cannot queue the resync signal");
        }
        let record = {
            let mut s = lock(&self.state);
            s.members.get_mut(address).map(|m| {
                m.record.resync_pending = true;
                m.record.clone()
            })
        };
        if let Some(r) = record {
            self.ctx.save(r).await;
        }
    }
}

/// Connection-level refusals that concern the anchor mailbox itself, not the group.
const ANCHOR_CODES: [&str; 4] = [
    "ErrorNonExistentMailbox",
    "ErrorImpersonateUserDenied",
    "ErrorImpersonationFailed",
    "ErrorMailboxMoveInProgress",
];

/// Make another member the anchor instead of `not` (a member with a subscription first: it is
/// known to work with this backend); true when the anchor changed.
pub(super) fn elect_anchor(s: &mut GroupState, not: Option<&str>) -> bool {
    let next = s
        .members
        .iter()
        .filter(|(a, _)| Some(a.as_str()) != not)
        .max_by_key(|(_, m)| m.record.subscription_id.is_some())
        .map(|(a, _)| a.clone());
    match next {
        Some(a) if a != s.anchor => {
            s.anchor = a;
            true
        }
        _ => false,
    }
}

/// What a connection-level error code asks for. `ews::classify` does not know the streaming
/// codes (it calls them permanent); they are handled here by name.
pub(super) fn connection_action(code: &str, back_off: Option<Duration>) -> Action {
    match code {
        // The per-account limit on open connections: others of ours (or an overlap) hold them.
        "ErrorExceededConnectionCount" => Action::Transient,
        "ErrorServerBusy" => back_off.map_or(Action::Transient, Action::BackOff),
        other => match ews::classify(other, back_off) {
            Action::Permanent => Action::Transient,
            a => a,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn streaming_codes_are_not_permanent() {
        assert_eq!(
            connection_action("ErrorExceededConnectionCount", None),
            Action::Transient
        );
        assert_eq!(
            connection_action("ErrorServerBusy", Some(Duration::from_secs(3))),
            Action::BackOff(Duration::from_secs(3))
        );
        assert_eq!(
            connection_action("ErrorSomethingNew", None),
            Action::Transient
        );
    }
}
