//! One streamed notification to the receiver, through the spool, as a push `SendNotification`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{lock, GroupTask};

use bytes::Bytes;

use crate::spool::NotAccepted;
use crate::store;

/// Delivery refused (spool full, disk full): retry this often, reading paused meanwhile.
const ACCEPT_RETRY_MIN: Duration = Duration::from_millis(200);
/// ... at most this far apart.
const ACCEPT_RETRY_MAX: Duration = Duration::from_secs(10);

impl GroupTask {
    /// Deliver one notification as a push `SendNotification`; retried until accepted (the
    /// stream waits meanwhile: Exchange cannot be asked to send it again).
    pub(super) async fn deliver(&mut self, n: &ews::Notification<'_>) {
        if n.events.iter().all(|e| e.kind == ews::EventType::Status) {
            return;
        }
        let Some(address) = self.member_of(&n.subscription_id) else {
            tracing::debug!("events for a subscription no member has (removed?); dropped");
            return;
        };
        let body = match ews::send_notification_from_stream(n, ews::DEFAULT_SERVER_VERSION) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(mailbox = %address, error = %e, "streamed events cannot be written as a SendNotification; receiver told to resynchronise");
                self.resync(&address, "unwritable events").await;
                return;
            }
        };
        let mut wait = ACCEPT_RETRY_MIN;
        loop {
            match self
                .ctx
                .delivery
                .accept(
                    &address,
                    &n.subscription_id,
                    http1::HeaderBlock::default(),
                    body.clone(),
                    None,
                )
                .await
            {
                Ok(_) => break,
                Err(e @ NotAccepted::OverAge { .. }) => {
                    // This mailbox's backlog is too old (its receiver keeps refusing it): the
                    // spool refuses only it. Holding the stream for it would stop the whole
                    // group, so the notification is dropped and the mailbox resynchronised.
                    tracing::warn!(mailbox = %address, error = %e, "streamed notification dropped; receiver told to resynchronise the mailbox");
                    self.resync(&address, "spool over age").await;
                    return;
                }
                Err(e) if self.ctx.stopping.load(Ordering::Acquire) => {
                    // Stopping with the spool refusing: the stream stays marked open in the
                    // store, so the next start resyncs these mailboxes.
                    tracing::warn!(mailbox = %address, error = %e, "stopping while the spool refuses; the mailbox is resynchronised at the next start");
                    self.unclean = true;
                    return;
                }
                Err(e) => {
                    tracing::debug!(mailbox = %address, error = %e, "streamed notification not accepted; retrying, stream paused");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(ACCEPT_RETRY_MAX);
                }
            }
        }
        let now = store::now_millis();
        if let Some(m) = lock(&self.state).members.get_mut(&address) {
            m.record.last_event = Some(now);
            m.record.last_heartbeat = Some(now);
        }
    }
}
