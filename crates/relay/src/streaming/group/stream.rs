//! The group's connections: opening one (or an overlapping one to renew), telling the old
//! and new connection of an overlap apart, and what happens when one ends (see the parent
//! module's "Overlap" and "Gaps").

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{lock, GroupTask};

use super::{DRAIN_LIMIT, MIN_HEALTHY};
use crate::store::{self, MailboxRecord};
use crate::streaming::connection::{self, ConnEvent, Connection, End, Route};
use crate::subscriptions::backoff;
use crate::subscriptions::client::Failure;
use ews::Action;

use super::repair::connection_action;

impl GroupTask {
    /// Open a connection when none is open, or an overlapping one when a reconnect is wanted.
    pub(super) fn connect_if_needed(&mut self) {
        if self.ctx.stopping.load(Ordering::Acquire) || self.draining.is_some() {
            return;
        }
        if self.conn_retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        if self.current.is_some() && self.reconnect.is_none() {
            return;
        }
        let (ids, route): (Vec<String>, Route) = {
            let s = lock(&self.state);
            (
                s.members
                    .values()
                    .filter_map(|m| m.record.subscription_id.clone())
                    .collect(),
                Route {
                    ews_url: s.ews_url.clone(),
                    anchor: s.anchor.clone(),
                    affinity: true,
                    cookie: s.cookie.clone(),
                },
            )
        };
        if ids.is_empty() {
            // Nothing to stream: let any connection run out.
            if let Some(c) = self.current.take() {
                c.stop();
                self.draining = Some(c);
                self.drain_until = Some(Instant::now() + DRAIN_LIMIT);
            }
            self.reconnect = None;
            return;
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let timing = self.ctx.cfg.stream;
        let body = match ews::get_streaming_events_request(
            &refs,
            timing.connection_timeout_minutes,
            Some(&route.anchor),
            ews::DEFAULT_SERVER_VERSION,
        ) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot build GetStreamingEvents");
                self.conn_retry_at = Some(Instant::now() + backoff::TRANSIENT_CAP);
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let conn = connection::open(
            id,
            ids,
            self.ctx.client.clone(),
            route,
            body,
            Duration::from_secs(60 * u64::from(timing.connection_timeout_minutes)),
            timing.silence_timeout,
            self.conn_tx.clone(),
            self.ctx.metrics.clone(),
        );
        if let Some(reason) = self.reconnect.take() {
            if self.current.is_some() {
                self.ctx.metrics.stream_reconnect(reason);
                lock(&self.state).reconnects += 1;
            }
        }
        // Its time has come: kept, it would stay in the past and wake the task for nothing.
        self.conn_retry_at = None;
        let mut s = lock(&self.state);
        s.last_seen = Some(conn.last_seen.clone());
        s.connections = 1 + u8::from(self.current.is_some());
        drop(s);
        if let Some(old) = self.current.replace(conn) {
            // The old one serves until the new one has opened: the drain limit starts with
            // the new one's first envelope (see `connection_event`).
            self.draining = Some(old);
            self.drain_until = None;
        }
        // Up to a tenth earlier, at random: groups started together do not all renew (and
        // briefly double their connections against the account's limit) at the same moment.
        let early = backoff::random() % (timing.reconnect_after.as_millis() as u64 / 10 + 1);
        self.renew_at =
            Some(Instant::now() + timing.reconnect_after - Duration::from_millis(early));
    }

    pub(super) fn is_draining(&self, id: u64) -> bool {
        self.draining.as_ref().is_some_and(|c| c.id == id)
    }

    pub(super) fn conn_mut(&mut self, id: u64) -> Option<&mut Connection> {
        if self.current.as_ref().is_some_and(|c| c.id == id) {
            self.current.as_mut()
        } else if self.draining.as_ref().is_some_and(|c| c.id == id) {
            self.draining.as_mut()
        } else {
            None
        }
    }

    pub(super) async fn connection_event(&mut self, id: u64, event: ConnEvent) {
        match event {
            ConnEvent::Envelope(envelope) => {
                let overlap = self.draining.is_some() && !self.is_draining(id);
                let first = self.conn_mut(id).is_some_and(|c| !c.heard);
                if overlap && first && is_refusal(&envelope) {
                    // The renewal was refused in-band (`ErrorExceededConnectionCount` while
                    // both are open, `ErrorServerBusy`): it never took over, the old one keeps
                    // serving. Handled now: no drain, no hold, no gap.
                    self.envelope(id, &envelope).await;
                    return;
                }
                if let Some(c) = self.conn_mut(id) {
                    if !c.heard && overlap {
                        // The new connection is open: the old one gets its limit now.
                        self.drain_until = Some(Instant::now() + DRAIN_LIMIT);
                    }
                }
                if let Some(c) = self.conn_mut(id) {
                    c.heard = true;
                }
                if overlap {
                    // The new connection of an overlap: after the old one's last envelope.
                    self.held.push_back(envelope);
                } else {
                    self.envelope(id, &envelope).await;
                }
            }
            ConnEvent::Opened => {
                let now = store::now_millis();
                if let Some(c) = self.conn_mut(id) {
                    c.opened_ms = Some(now);
                }
                if self.draining.is_none() && self.current.as_ref().is_some_and(|c| c.id == id) {
                    // Shown as connected from Exchange's answer (keep-alives may be a minute
                    // away); a renewal's connection shows once it has taken over.
                    let mut s = lock(&self.state);
                    s.open_since = Some(now);
                    s.last_error = None;
                }
            }
            ConnEvent::Ended(end) => self.ended(id, end).await,
        }
    }

    pub(super) async fn ended(&mut self, id: u64, end: End) {
        if self.is_draining(id) {
            return self.old_ended(end).await;
        }
        let Some(current) = self.current.as_ref().filter(|c| c.id == id) else {
            return;
        };
        if self.draining.is_some() && current.heard {
            // The new connection of an overlap ended after carrying events: they (and its
            // end) follow the old connection's last envelope.
            self.current_end = Some(end);
            if self.drain_until.is_none() {
                self.drain_until = Some(Instant::now() + DRAIN_LIMIT);
            }
            return;
        }
        self.current_ended(end).await;
    }

    /// The old connection of an overlap has ended: resync what it may have lost, then deliver
    /// what the new one carried meanwhile (and its end, if it came too).
    pub(super) async fn old_ended(&mut self, end: End) {
        self.drain_until = None;
        let Some(old) = self.draining.take() else {
            return;
        };
        lock(&self.state).connections = u8::from(self.current.is_some());
        tracing::debug!(
            connection = old.id,
            end = end.label(),
            "old connection ended"
        );
        self.resync_gap(&old, &end).await;
        if self.current_end.is_none() && self.current.as_ref().is_some_and(|c| c.heard) {
            // A renewal that took over: whatever failed before is behind us.
            self.conn_failures = 0;
            self.conn_retry_at = None;
        }
        let current = self.current.as_ref().map_or(0, |c| c.id);
        while let Some(envelope) = self.held.pop_front() {
            self.envelope(current, &envelope).await;
        }
        if let Some(end) = self.current_end.take() {
            self.current_ended(end).await;
        }
    }

    /// The current connection has ended (and no overlap waits for it).
    pub(super) async fn current_ended(&mut self, end: End) {
        // Its held envelopes first, while it is still registered (their `Closed` and errors
        // count for it).
        let id = self.current.as_ref().map_or(0, |c| c.id);
        while let Some(envelope) = self.held.pop_front() {
            self.envelope(id, &envelope).await;
        }
        let Some(conn) = self.current.take() else {
            return;
        };
        let lived = conn.opened.elapsed();
        // A failure the server wrote into the stream, or its refusal to open one (HTTP 503,
        // a ServerBusy fault with BackOffMilliseconds).
        let failed = conn.failure.clone().or(match &end {
            End::Refused(f) => Some(f.clone()),
            _ => None,
        });
        let label = match (&end, conn.closed_seen, &failed) {
            (End::Refused(_), _, _) => "refused",
            (_, _, Some(_)) => "error",
            (End::BodyEnded, true, _) => "closed",
            (e, _, _) => e.label(),
        };
        if self.draining.is_none() {
            // (With an overlap the old connection still serves whatever was not moved; what
            // was moved is handled below.)
            self.resync_gap(&conn, &end).await;
        }
        let restored = match self.draining.take() {
            Some(old) => {
                // The new connection failed before it carried anything while the old one
                // still reads: keep the old one, and try the renewal again (below). If
                // Exchange had already moved subscriptions to it, their events went into a
                // connection nobody read.
                if !conn.heard && !old.moved.is_empty() {
                    let moved = old.moved.clone();
                    self.resync_where(|id| moved.contains(id)).await;
                }
                self.current = Some(old);
                self.drain_until = None;
                true
            }
            None => {
                self.renew_at = None;
                let mut s = lock(&self.state);
                s.open_since = None;
                s.connections = 0;
                false
            }
        };
        lock(&self.state).connections = u8::from(self.current.is_some());
        if matches!(end, End::Stopped { .. }) && failed.is_none() {
            return;
        }
        if let Some(f) = &failed {
            self.anchor_trouble(f, &conn.anchor).await;
        }
        // Back off after an error or a connection that died young; else reconnect at once.
        let healthy = failed.is_none() && (conn.closed_seen || lived >= MIN_HEALTHY);
        if healthy {
            self.conn_failures = 0;
            self.conn_retry_at = None;
        } else {
            self.conn_failures += 1;
            let r = backoff::random();
            let wait = match failed.as_ref() {
                Some(f) if matches!(f.action, Action::BackOff(_)) => match f.action {
                    Action::BackOff(d) => d.max(Duration::from_millis(100)),
                    _ => unreachable!("matched above"),
                },
                // The account's connections are all taken (ours overlapping, or another
                // application's): retrying at once cannot help.
                Some(f) if f.code == "ErrorExceededConnectionCount" => backoff::delay(
                    self.conn_failures,
                    backoff::TRANSIENT_BASE,
                    backoff::TRANSIENT_CAP,
                    r,
                )
                .max(backoff::TRANSIENT_BASE),
                _ if self.conn_failures <= 1 => Duration::ZERO,
                _ => backoff::delay(
                    self.conn_failures - 1,
                    backoff::TRANSIENT_BASE,
                    backoff::TRANSIENT_CAP,
                    r,
                ),
            };
            self.conn_retry_at = Some(Instant::now() + wait);
        }
        if restored {
            self.renew_at = Some(self.conn_retry_at.unwrap_or_else(Instant::now));
        }
        let detail = match (&failed, &end) {
            (Some(f), _) => Some(format!("{}: {}", f.code, f.detail)),
            (None, End::Broken { why, .. }) => Some(format!("connection broken: {why}")),
            (None, End::Silent(d)) => Some(format!(
                "no event or keep-alive for {}s (--stream-silence-timeout)",
                d.as_secs()
            )),
            _ => None,
        };
        match &detail {
            Some(d) => {
                tracing::warn!(group_anchor = %lock(&self.state).anchor, reason = label, detail = %d, "streaming connection lost; reconnecting")
            }
            None => {
                tracing::debug!(
                    reason = label,
                    "streaming connection closed by Exchange; reconnecting"
                )
            }
        }
        if let Some(d) = detail {
            lock(&self.state).last_error = Some(d);
        }
        if self.current.is_none() {
            // Counted here, not at open: `connect_if_needed` counts replacements only.
            self.ctx.metrics.stream_reconnect(label);
            lock(&self.state).reconnects += 1;
        }
    }

    /// One envelope of connection `id`: deliver its events, repair what its errors name.
    pub(super) async fn envelope(&mut self, id: u64, envelope: &[u8]) {
        let batch = match ews::parse_streaming_events(envelope) {
            Ok(b) => b,
            Err(ews::EwsError::Fault(f)) => {
                let failure = Failure::new(
                    f.action(),
                    f.response_code.clone().unwrap_or_else(|| f.code.clone()),
                    f.message.clone(),
                );
                if let Some(c) = self.conn_mut(id) {
                    c.failure = Some(failure);
                    c.stop();
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "unreadable streaming envelope; reconnecting, its mailboxes get the resync signal");
                if let Some(c) = self.conn_mut(id) {
                    c.lost_data = true;
                    c.failure = Some(Failure::new(
                        Action::Transient,
                        "MalformedEnvelope",
                        e.to_string(),
                    ));
                    c.stop();
                }
                return;
            }
        };
        tracing::trace!(
            connection = id,
            keep_alive = batch.is_keep_alive(),
            notifications = batch.notifications().count(),
            "envelope"
        );
        let first = self.conn_mut(id).map(|c| {
            c.envelopes += 1;
            c.envelopes == 1
        });
        if first == Some(true) && !self.is_draining(id) && !batch_is_refusal(&batch) {
            self.connected().await;
        }
        for message in &batch.messages {
            for n in &message.notifications {
                self.deliver(n).await;
            }
            if message.status.class == ews::ResponseClass::Success {
                continue;
            }
            let code = message.status.code.as_deref().unwrap_or("Error").to_owned();
            if message.error_subscription_ids.is_empty() {
                let action = connection_action(&code, message.status.back_off);
                let text = message.status.message_text.as_deref().unwrap_or("");
                tracing::warn!(code = %code, detail = text, "GetStreamingEvents refused");
                let failure = Failure::new(action, code.clone(), text);
                if let Some(c) = self.conn_mut(id) {
                    c.failure = Some(failure);
                    c.stop();
                }
                continue;
            }
            for sub in &message.error_subscription_ids {
                self.subscription_error(id, &code, sub).await;
            }
        }
        if batch.is_closed() {
            if let Some(c) = self.conn_mut(id) {
                c.closed_seen = true;
            }
        }
    }

    /// The first envelope of a new current connection: it is open. Record in the store that a
    /// stream was open for these mailboxes (cleared by a clean stop).
    pub(super) async fn connected(&mut self) {
        let opened = self
            .current
            .as_ref()
            .and_then(|c| c.opened_ms)
            .unwrap_or_else(store::now_millis);
        let records: Vec<MailboxRecord> = {
            let mut s = lock(&self.state);
            s.open_since = Some(opened);
            s.last_error = None;
            s.members
                .values_mut()
                .filter(|m| m.record.subscription_id.is_some() && !m.record.stream_open)
                .map(|m| {
                    m.record.stream_open = true;
                    m.record.clone()
                })
                .collect()
        };
        self.ctx.save_all(records).await;
    }
}

/// Whether an envelope refuses the connection rather than serving it: a SOAP fault, or an
/// error for the whole connection with no notification.
fn is_refusal(envelope: &[u8]) -> bool {
    match ews::parse_streaming_events(envelope) {
        Ok(batch) => batch_is_refusal(&batch),
        Err(ews::EwsError::Fault(_)) => true,
        Err(_) => false,
    }
}

fn batch_is_refusal(batch: &ews::StreamingBatch<'_>) -> bool {
    batch.notifications().next().is_none()
        && batch.messages.iter().any(|m| {
            m.status.class != ews::ResponseClass::Success && m.error_subscription_ids.is_empty()
        })
}
