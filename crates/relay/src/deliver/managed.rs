//! Managed mode's answer: for a subscription the relay owns, the relay answers Exchange itself
//! once the notification is safe (delivered to the receiver or spooled), and tells the keeper
//! what it heard.

use bytes::Bytes;
use ews::EventType;
use http1::{HeaderBlock, RequestHead};

use super::passthrough::forwarded_fields;
use crate::client::ConnInfo;
use crate::subscriptions::{Manager, Owner};

/// What the relay answered Exchange for a subscription it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// A `SendNotificationResult` with this status.
    Status(ews::SubscriptionStatus),
    /// The notification could be neither delivered nor spooled: Exchange must retry (503).
    NotStored,
}

/// Managed mode: answer Exchange for a subscription the relay owns, or `None` to pass the
/// notification through (an id the relay never created).
pub async fn answer(
    manager: &Manager,
    n: &ews::NotificationSummary<'_>,
    head: &RequestHead<'_>,
    body: &[u8],
    conn: &ConnInfo,
) -> Option<Answered> {
    let message = n.messages.first()?;
    let id = message.subscription_id.as_deref()?;
    let status = match manager.owner(id).await? {
        Owner::Retired(mailbox) => {
            tracing::info!(%mailbox, subscription = %crate::subscriptions::abbreviate(id), "notification on a replaced or removed subscription: answering Unsubscribe");
            ews::SubscriptionStatus::Unsubscribe
        }
        Owner::Current(mailbox) => {
            let error = message.class == ews::ResponseClass::Error;
            let watermark = message.last_watermark.as_deref();
            let events = EventType::ALL
                .iter()
                .zip(message.event_counts)
                .any(|(kind, n)| *kind != EventType::Status && n > 0);
            // The heartbeat counts at once; the watermark only moves once the notification
            // is safe (delivered or spooled), so a resubscribe after a failed spool replays
            // it instead of skipping it.
            manager.notified(&mailbox, None, false, error);
            if error {
                // The server already dropped it (e.g. ErrorReadEventsFailed); the manager
                // resubscribes from the last good watermark.
                ews::SubscriptionStatus::Unsubscribe
            } else if !events {
                // A keep-alive: nothing for the receiver, its watermark is safe to keep.
                manager.notified(&mailbox, watermark, false, false);
                ews::SubscriptionStatus::Ok
            } else {
                let mut headers = HeaderBlock::with_capacity(256);
                forwarded_fields(head, conn, &mut headers);
                match manager
                    .delivery()
                    .accept(&mailbox, id, headers, Bytes::copy_from_slice(body), None)
                    .await
                {
                    Ok(_) => {
                        manager.notified(&mailbox, watermark, true, false);
                        ews::SubscriptionStatus::Ok
                    }
                    Err(e) => {
                        // Neither delivered nor stored: Exchange must retry. The delivery side
                        // logs refusals once per episode, not per notification.
                        tracing::debug!(%mailbox, error = %e, "notification not accepted; answering 503 so Exchange retries");
                        return Some(Answered::NotStored);
                    }
                }
            }
        }
    };
    Some(Answered::Status(status))
}
