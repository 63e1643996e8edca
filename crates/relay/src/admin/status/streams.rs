//! The status page's streaming connections (`--transport streaming`): one row per group's
//! `GetStreamingEvents` connection, in a table after the mailboxes, and one [`Problem`] per
//! colour for the groups that are not connected.
//!
//! | state        | health | meaning                                                          |
//! |--------------|--------|------------------------------------------------------------------|
//! | `connected`  | green  | the group's connection is open                                   |
//! | `renewing`   | green  | a new connection overlaps the old one before its timeout         |
//! | `connecting` | amber  | subscribed, the first connection has not opened yet              |
//! | `down`       | red    | the last connection failed and no new one has opened: Exchange holds the group's events until one does |
//!
//! The mailboxes of a group have rows of their own in the mailbox table (same states as push);
//! a group row says whether their events can flow at all.

use std::fmt::Write as _;

use super::model::{code, text, Health, Problem, StatusPage};
use super::render::{escape_into, push_ago, push_duration, push_time, push_u64};
use crate::streaming::GroupView;

/// A group's colour and state word.
pub fn group_state(g: &GroupView) -> (Health, &'static str) {
    match (g.opened.is_some(), g.connections, &g.last_error) {
        (true, 2.., _) => (Health::Green, "renewing"),
        (true, _, _) => (Health::Green, "connected"),
        (false, _, Some(_)) => (Health::Red, "down"),
        (false, _, None) => (Health::Amber, "connecting"),
    }
}

/// Problems first (red, amber, green), then by anchor mailbox.
pub fn sort_groups(groups: &mut [GroupView]) {
    groups.sort_by(|a, b| {
        let rank = |g: &GroupView| match group_state(g).0 {
            Health::Red => 0,
            Health::Amber => 1,
            Health::Green => 2,
        };
        rank(a).cmp(&rank(b)).then_with(|| a.anchor.cmp(&b.anchor))
    });
}

impl StatusPage {
    /// The summary's card: how many connections, how many groups.
    pub(super) fn render_stream_card(&self, out: &mut String) {
        let Some(groups) = &self.stream_groups else {
            return;
        };
        let open: u64 = groups.iter().map(|g| u64::from(g.connections)).sum();
        let _ = writeln!(
            out,
            "<div class=\"card info\"><span class=\"n\">{open}</span> streaming connections \
             <small>({} groups)</small></div>",
            groups.len()
        );
    }

    /// The streaming connections table, after the mailbox table (in the same live part, so it
    /// refreshes and filters with it).
    pub(super) fn render_stream_groups(&self, out: &mut String) {
        let Some(groups) = &self.stream_groups else {
            return;
        };
        out.push_str("<h3 id=\"stream-h\">Streaming connections</h3>\n");
        if groups.is_empty() {
            out.push_str(
                "<p class=\"empty\">No group yet: mailboxes join a group once Autodiscover \
                 has answered for them.</p>\n",
            );
            return;
        }
        out.push_str(
            "<table id=\"stream-groups\">\n<thead><tr><th scope=\"col\">State</th>\
             <th scope=\"col\">Anchor mailbox</th><th scope=\"col\">EWS URL</th>\
             <th scope=\"col\">Mailboxes</th><th scope=\"col\">Open since</th>\
             <th scope=\"col\">Last keep-alive</th><th scope=\"col\">Reconnects</th>\
             <th scope=\"col\">Last error</th></tr></thead>\n<tbody>\n",
        );
        for g in groups {
            let (health, state) = group_state(g);
            out.push_str(health.row_open());
            out.push_str(state);
            out.push_str("</td><td class=\"id\">");
            escape_into(out, &g.anchor);
            out.push_str("</td><td class=\"id\">");
            escape_into(out, &g.ews_url);
            if !g.grouping.is_empty() {
                out.push_str("<br><small>");
                escape_into(out, &g.grouping);
                out.push_str("</small>");
            }
            out.push_str("</td><td class=\"num\">");
            push_u64(out, g.mailboxes as u64);
            out.push_str("</td><td>");
            match g.opened {
                Some(t) => {
                    push_time(out, t);
                    if let Ok(d) = self.now.duration_since(t) {
                        out.push_str(" (");
                        push_duration(out, d.as_secs());
                        out.push(')');
                    }
                }
                None => out.push('—'),
            }
            out.push_str("</td><td>");
            push_ago(out, g.seconds_since_keepalive);
            out.push_str("</td><td class=\"num\">");
            push_u64(out, g.reconnects);
            out.push_str("</td><td>");
            if let Some(e) = &g.last_error {
                escape_into(out, e);
            }
            out.push_str("</td></tr>\n");
        }
        out.push_str("</tbody>\n</table>\n");
    }

    /// One problem per colour for the groups without a connection, naming the first few.
    pub(super) fn stream_problems(&self) -> Vec<Problem> {
        /// Groups named in a problem; the table has them all.
        const NAMED: usize = 3;
        let Some(groups) = &self.stream_groups else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for severity in [Health::Red, Health::Amber] {
            let hit: Vec<&GroupView> = groups
                .iter()
                .filter(|g| group_state(g).0 == severity)
                .collect();
            if hit.is_empty() {
                continue;
            }
            let members: usize = hit.iter().map(|g| g.mailboxes).sum();
            let (headline, why) = match severity {
                Health::Red => (
                    format!(
                        "Streaming connections down: {} of {} ({members} mailboxes).",
                        hit.len(),
                        groups.len()
                    ),
                    "Exchange keeps these mailboxes' events while their subscriptions live (up \
                     to 30 minutes without a connection); the relay reconnects, with back-off \
                     after errors, and asks the receiver to resynchronise any mailbox whose \
                     subscription is lost. Check that this host reaches the EWS URL. ",
                ),
                _ => (
                    format!(
                        "Streaming connections opening: {} of {} ({members} mailboxes).",
                        hit.len(),
                        groups.len()
                    ),
                    "Their mailboxes are subscribed; events flow once the connection opens. ",
                ),
            };
            let mut detail = vec![text(why)];
            for (i, g) in hit.iter().take(NAMED).enumerate() {
                if i > 0 {
                    detail.push(text(", "));
                }
                detail.push(code(g.anchor.clone()));
                if let Some(e) = &g.last_error {
                    detail.push(text(format!(" ({e})")));
                }
            }
            if hit.len() > NAMED {
                detail.push(text(format!(" and {} more", hit.len() - NAMED)));
            }
            detail.push(text("."));
            out.push(Problem {
                severity,
                what: "streaming",
                headline,
                detail,
            });
        }
        out
    }
}
