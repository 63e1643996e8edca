//! Subscribing a group's members: the first Subscribe alone (it brings the backend cookie),
//! the rest together; outcomes recorded per member with back-off; a moved mailbox handed back
//! to be discovered again.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{lock, GroupTask};

use crate::store::MailboxState;
use crate::streaming::connection::Route;
use crate::streaming::Ctx;
use crate::subscriptions::backoff;
use crate::subscriptions::client::Failure;
use ews::{Action, Folders};

use super::repair::elect_anchor;

impl GroupTask {
    /// Subscribe members without a subscription whose retry time has come. The first
    /// Subscribe of a group without a cookie runs alone: it brings the cookie.
    pub(super) async fn subscribe_due(&mut self) {
        if self.ctx.stopping.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        let (mut due, has_cookie): (Vec<String>, bool) = {
            let s = lock(&self.state);
            let mut due: Vec<(u32, String)> = s
                .members
                .iter()
                .filter(|(_, m)| {
                    m.record.subscription_id.is_none() && m.retry_at.is_none_or(|t| t <= now)
                })
                .map(|(a, m)| (m.failures, a.clone()))
                .collect();
            // Those that failed least first: one bad mailbox does not go first every round.
            due.sort();
            (
                due.into_iter().map(|(_, a)| a).collect(),
                s.cookie.is_some(),
            )
        };
        if due.is_empty() {
            return;
        }
        let mut subscribed_any = false;
        if !has_cookie {
            // Until one Subscribe has succeeded the group has no backend cookie to send: one
            // at a time until one succeeds (a failed one backs off on its own), then the rest
            // together.
            while !due.is_empty() && !subscribed_any {
                if self.ctx.stopping.load(Ordering::Acquire) {
                    return;
                }
                let first = due.remove(0);
                subscribed_any = self.subscribe_one(first).await;
            }
            if !subscribed_any {
                return;
            }
        }
        let mut set = tokio::task::JoinSet::new();
        for address in due {
            let ctx = self.ctx.clone();
            let route = self.route();
            set.spawn(async move {
                let r = subscribe(&ctx, &route, &address).await;
                (address, r)
            });
        }
        while let Some(joined) = set.join_next().await {
            if let Ok((address, result)) = joined {
                subscribed_any |= self.after_subscribe(&address, result).await;
            }
        }
        if subscribed_any && (self.current.is_some() || self.reconnect.is_some()) {
            self.want_reconnect("membership");
        }
    }

    pub(super) async fn subscribe_one(&mut self, address: String) -> bool {
        let route = self.route();
        let result = subscribe(&self.ctx, &route, &address).await;
        self.after_subscribe(&address, result).await
    }

    /// Record a Subscribe's outcome; true when the member now has a subscription.
    pub(super) async fn after_subscribe(
        &mut self,
        address: &str,
        result: Result<(String, Option<String>), Failure>,
    ) -> bool {
        let record = {
            let mut s = lock(&self.state);
            if let Ok((_, Some(cookie))) = &result {
                if s.cookie.is_none() {
                    s.cookie = Some(cookie.clone());
                }
            }
            let cookie = s.cookie.clone();
            let Some(m) = s.members.get_mut(address) else {
                return false;
            };
            match &result {
                Ok((id, _)) => {
                    m.record.subscription_id = Some(id.clone());
                    m.record.stream_cookie = cookie;
                    m.record.state = MailboxState::Active;
                    m.record.last_error = None;
                    m.failures = 0;
                    m.retry_at = None;
                    self.ctx.metrics.subscribe("success");
                }
                Err(f) => {
                    m.failures += 1;
                    let r = backoff::random();
                    let wait = match f.action {
                        Action::BackOff(d) => d.max(Duration::from_millis(100)),
                        Action::Permanent => backoff::delay(
                            m.failures,
                            backoff::PERMANENT_BASE,
                            backoff::PERMANENT_CAP,
                            r,
                        ),
                        _ => backoff::delay(
                            m.failures,
                            backoff::TRANSIENT_BASE,
                            backoff::TRANSIENT_CAP,
                            r,
                        ),
                    };
                    m.retry_at = Some(Instant::now() + wait);
                    m.record.state = if f.action == Action::Permanent {
                        MailboxState::Failed
                    } else {
                        MailboxState::BackingOff
                    };
                    m.record.last_error = Some(format!("{}: {}", f.code, f.detail));
                    self.ctx.metrics.subscribe("failure");
                }
            }
            let record = m.record.clone();
            if matches!(&result, Err(f) if f.action == Action::Permanent) && s.anchor == address {
                // The anchor cannot be subscribed (deleted, no licence, impersonation
                // refused): the group's connection impersonates it, so it must not stay the
                // anchor.
                elect_anchor(&mut s, Some(address));
            }
            record
        };
        match result {
            Ok(_) => {
                tracing::info!(mailbox = address, "streaming subscription made");
                self.ctx.save(record).await;
                true
            }
            Err(f) if f.action == Action::Rediscover => {
                tracing::warn!(mailbox = address, code = %f.code, "mailbox moved; Autodiscover again");
                self.moved(address).await;
                false
            }
            Err(f) => {
                tracing::warn!(mailbox = address, code = %f.code, detail = %f.detail, "streaming Subscribe failed");
                self.ctx.save(record).await;
                false
            }
        }
    }

    /// The mailbox moved: hand it back to the keeper to be discovered and placed again
    /// (after a back-off when it keeps moving, so a stale answer cannot make a loop).
    pub(super) async fn moved(&mut self, address: &str) {
        let member = {
            let mut s = lock(&self.state);
            let m = s.members.remove(address);
            if s.anchor == address {
                elect_anchor(&mut s, Some(address));
            }
            m
        };
        let Some(mut m) = member else { return };
        let had_id = m.record.subscription_id.is_some();
        m.record.subscription_id = None;
        m.record.stream_cookie = None;
        m.record.state = MailboxState::Subscribing;
        m.record.ews_url = None;
        let wait = self.ctx.move_delay(address);
        let regroup = self.ctx.regroup.clone();
        if wait.is_zero() {
            let _ = regroup.send(m.record);
        } else {
            tracing::info!(mailbox = address, wait = ?wait, "mailbox moved again; discovering it after a back-off");
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = regroup.send(m.record);
            });
        }
        if had_id && self.current.is_some() {
            self.want_reconnect("regroup");
        }
    }
}

/// One streaming Subscribe of `address` at `route`.
async fn subscribe(
    ctx: &Ctx,
    route: &Route,
    address: &str,
) -> Result<(String, Option<String>), Failure> {
    let folders: Vec<&str> = ctx.cfg.folders.iter().map(String::as_str).collect();
    let request = ews::StreamingSubscribeRequest {
        server_version: ews::DEFAULT_SERVER_VERSION,
        mailbox: address,
        folders: Folders::from_names(&folders),
        event_types: &ctx.cfg.event_types,
    };
    ctx.client
        .subscribe_streaming(route.target(), &request)
        .await
}
