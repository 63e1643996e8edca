//! The admin listener's `GET /status` page: what an administrator needs at a glance.
//!
//! One self-contained HTML5 document (inline CSS and script, no external assets, works offline)
//! with, from top to bottom: alerts, summary counts, the relay's facts (certificate, receiver,
//! admitted networks, version, uptime), denied connections, and one row per mailbox (managed
//! mode) or subscription (passthrough), problems first.
//!
//! Two concerns, two modules: [`model`] gathers the facts into a view model ([`StatusPage`],
//! with the domain's types: [`Row`]s and [`Problem`]s), and [`render`] writes the HTML from it.
//! The page's skeleton, style and script are files of their own in `admin/page/`
//! (`status.html`, `status.css`, `status.js`), included at build time.
//!
//! Every row carries a [`Health`]: green, amber or red. The mapping from the domain states:
//!
//! | mode        | green                     | amber                                   | red                     |
//! |-------------|---------------------------|-----------------------------------------|-------------------------|
//! | managed     | `active`, nothing spooled | `subscribing`, `backing-off`, `active` with notifications waiting in the spool | `lost`, `failed` |
//! | passthrough | `alive` (`replaced`)      | `stale`                                 | `unsubscribed`, `error` |
//! | Graph, seen in passthrough | `alive`    | `expiring` (near expiry, no renewal seen) | `expired`, `removed`, `error` |
//! | Graph, managed | `active`, nothing spooled | `creating`, `expiring`, `backing-off`, `active` with notifications spooled | `failed` |
//!
//! With `--transport streaming` a table of the groups' `GetStreamingEvents` connections follows
//! the mailboxes ([`streams`]: `connected`/`renewing` green, `connecting` amber, `down` red),
//! and the groups without a connection are a `streaming` [`Problem`] per colour.
//!
//! Graph rows are in a table of their own, after the EWS one (its columns differ: resource,
//! expiry, lifecycle), and the red and amber ones are also summed up as a `graph`
//! [`Problem`] each, naming the first few.
//!
//! Amber means "the relay is working on it, something waits, or it has not been heard from for
//! a while"; red means "no notifications will reach the receiver for this one until something
//! changes". The page shows the same mapping as a legend, and the state as text next to the
//! colour.
//!
//! Problems of the relay itself (receiver failing, certificate expired or near expiry or
//! self-signed, notifications waiting in the spool, traffic denied while none arrives) are
//! [`Problem`]s, listed by [`StatusPage::problems`]: each is an alert at the top and counts in
//! the red/amber summary together with the rows, so the counters never say "0 red" while
//! something on the page is red.
//!
//! The page refreshes itself: its script re-fetches `/status` every [`REFRESH_SECS`] seconds and
//! swaps the live parts in place (so the filter box keeps its text and the scroll position
//! stays); without script, a `<noscript>` meta refresh reloads the page. The response's
//! Content-Security-Policy admits only the page's own script and style, by hash.

pub mod model;
pub mod render;
pub mod streams;

use std::sync::OnceLock;

use base64::Engine as _;

pub use model::{
    graph_resource_health, mailbox_health, sort_rows, subscription_health, CertFacts, Counts,
    Fragment, Health, Mode, Problem, Row, RowState, StatusPage, CERT_WARN_BEFORE,
    DENIED_ALERT_WINDOW,
};
pub use render::{escape, escape_into};

/// Seconds between refreshes: often enough to watch a keep-alive period (Exchange's
/// StatusFrequency is at least a minute), rare enough that a page left open for months costs
/// nothing.
pub const REFRESH_SECS: u32 = 10;

/// The `Content-Security-Policy` for the page: nothing may load, and only the page's own
/// `<style>` and `<script>` (by SHA-256, computed once from the included files) may apply or
/// run, so even a value that escaped [`escape_into`] could not execute; `connect-src 'self'`
/// lets the script re-fetch the page.
pub fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; style-src 'sha256-{}'; script-src 'sha256-{}'; \
             connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            sha256_base64(render::STYLE),
            sha256_base64(render::SCRIPT)
        )
    })
}

/// The CSP source hash of an inline element's text: base64 of its SHA-256.
fn sha256_base64(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

#[cfg(test)]
mod tests {
    use super::render::{push_duration, PAGE_BYTES, ROW_BYTES};
    use super::*;
    use crate::admin::ReceiverCheck;
    use crate::notify::tracker::State;
    use crate::receiver::{Reachability, ReceiverFailure};
    use crate::store::MailboxState;
    use crate::streaming::GroupView;
    use crate::subscriptions::manager::MailboxView;
    use std::borrow::Cow;
    use std::net::IpAddr;
    use std::time::{Duration, Instant, SystemTime};

    const NOW_SECS: u64 = 1_750_000_000;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS)
    }

    fn page(mode: Mode, rows: Vec<Row>) -> StatusPage {
        StatusPage {
            mode,
            rows,
            graph_rows: Vec::new(),
            graph_path_prefix: None,
            stream_groups: None,
            spool_depth: (mode == Mode::Managed).then_some(0),
            spool_alarm: None,
            acme: None,
            denied_total: 0,
            denied_recent: Vec::new(),
            admitted: "2 networks from --allow".into(),
            cert: CertFacts {
                subject: "CN=relay.contoso.example".into(),
                not_after: now() + Duration::from_secs(90 * 86_400),
                sha256: "AB:CD".into(),
                self_signed: false,
            },
            receiver: "127.0.0.1:8080".into(),
            receiver_check: receiver_up(),
            stale_after: (mode == Mode::Passthrough).then_some(Duration::from_secs(1800)),
            path_prefix: "/".into(),
            version: "0.0.0-test",
            uptime: Duration::from_secs(3 * 86_400 + 7200),
            now: now(),
        }
    }

    fn receiver_up() -> ReceiverCheck {
        ReceiverCheck {
            ok: true,
            reachability: Reachability {
                last_success: Some(Duration::from_secs(3)),
                last_failure: None,
            },
        }
    }

    /// The receiver refused a connection 2 s ago; it last answered 40 s ago.
    fn receiver_down() -> ReceiverCheck {
        ReceiverCheck {
            ok: false,
            reachability: Reachability {
                last_success: Some(Duration::from_secs(40)),
                last_failure: Some((Duration::from_secs(2), ReceiverFailure::NotAccepting)),
            },
        }
    }

    fn row(health: Health, state: State, name: &str) -> Row {
        Row {
            source: crate::source::Source::Ews,
            health,
            state: RowState::Subscription(state),
            name: name.into(),
            subscription_id: None,
            peer: Some("40.92.1.2".parse().unwrap()),
            since_heartbeat: Some(42),
            since_event: None,
            events: Some(3),
            spool: None,
            last_error: None,
            resource: None,
            expires_in: None,
            lifecycle: None,
        }
    }

    fn view(mailbox: &str, state: MailboxState) -> MailboxView {
        MailboxView {
            mailbox: mailbox.into(),
            state,
            subscription_id: Some(format!("sub-{mailbox}")),
            seconds_since_heartbeat: Some(61),
            seconds_since_event: None,
            last_watermark: None,
            last_error: None,
            spool_depth: 0,
            resync_pending: false,
        }
    }

    /// The `<tr class=…>` of every body row, in page order.
    fn row_classes(html: &str) -> Vec<&str> {
        html.split("<tr class=\"")
            .skip(1)
            .map(|s| &s[..s.find('"').unwrap()])
            .collect()
    }

    #[test]
    fn escape_replaces_every_html_significant_character() {
        assert_eq!(
            escape(r#"<a href="x" title='y'>&amp;</a>"#),
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;amp;&lt;/a&gt;"
        );
        assert!(matches!(escape("plain ünïcode ✔"), Cow::Borrowed(_)));
        assert_eq!(escape(""), "");
        assert_eq!(escape("&&"), "&amp;&amp;");
        let mut out = String::from("x=");
        escape_into(&mut out, "a<b>ü\"");
        assert_eq!(out, "x=a&lt;b&gt;ü&quot;");
    }

    #[test]
    fn dynamic_values_are_escaped_everywhere() {
        let evil = "<script>alert('x')</script>&\"";
        let mut r = row(Health::Red, State::Error, evil);
        r.last_error = Some(evil.into());
        r.since_heartbeat = None;
        let mut p = page(Mode::Passthrough, vec![r]);
        p.cert.subject = evil.into();
        p.cert.sha256 = evil.into();
        p.admitted = evil.into();
        p.receiver = evil.into();
        p.path_prefix = evil.into();
        p.receiver_check = receiver_down();
        p.denied_recent = vec![("192.0.2.1".parse().unwrap(), now())];
        let html = p.render();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("alert('x')"));
        let escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;";
        // Name, error, subject, fingerprint, admitted (twice: facts and alert), receiver
        // (twice: facts and alert), path prefix.
        assert_eq!(html.matches(escaped).count(), 9, "{html}");
        assert_eq!(
            html.matches("<script>").count(),
            1,
            "only the page's own script"
        );
    }

    #[test]
    fn colour_mapping() {
        let got: Vec<_> = State::ALL
            .iter()
            .map(|s| (s.as_str(), subscription_health(*s).as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("alive", "green"),
                ("stale", "amber"),
                ("unsubscribed", "red"),
                ("error", "red"),
                ("replaced", "green"),
                ("expiring", "amber"),
                ("expired", "red"),
                ("removed", "red"),
            ]
        );
        let got: Vec<_> = crate::managed_graph::keeper::GRAPH_STATES
            .iter()
            .map(|s| {
                (
                    *s,
                    graph_resource_health(s, 0).as_str(),
                    graph_resource_health(s, 3).as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("creating", "amber", "amber"),
                ("active", "green", "amber"),
                ("expiring", "amber", "amber"),
                ("backing-off", "amber", "amber"),
                ("failed", "red", "red"),
            ],
            "(state, nothing spooled, something spooled)"
        );
        let got: Vec<_> = crate::subscriptions::manager::MAILBOX_STATES
            .iter()
            .map(|s| {
                (
                    RowState::Mailbox(*s).as_str(),
                    mailbox_health(*s, 0).as_str(),
                    mailbox_health(*s, 3).as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("subscribing", "amber", "amber"),
                ("active", "green", "amber"),
                ("lost", "red", "red"),
                ("backing-off", "amber", "amber"),
                ("failed", "red", "red"),
            ],
            "(state, nothing spooled, something spooled)"
        );
    }

    #[test]
    fn problems_come_first() {
        let mut rows = vec![
            row(Health::Green, State::Alive, "a"),
            row(Health::Amber, State::Stale, "b"),
            row(Health::Red, State::Error, "z"),
            row(Health::Green, State::Alive, "0"),
            row(Health::Red, State::Unsubscribed, "c"),
        ];
        sort_rows(&mut rows);
        let order: Vec<_> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(order, ["c", "z", "b", "0", "a"]);
        let html = page(Mode::Passthrough, rows).render();
        assert_eq!(
            row_classes(&html),
            ["red", "red", "amber", "green", "green"]
        );
        assert!(html.contains("<title>ews-relay: 2 red, 1 amber, 2 green</title>"));
    }

    #[test]
    fn managed_rows_from_mailbox_views() {
        let mut lost = view("lost@contoso.example", MailboxState::Lost);
        lost.last_error = Some("no keep-alive for 3 min".into());
        lost.spool_depth = 7;
        lost.seconds_since_event = Some(4000);
        let mut failed = view("failed@contoso.example", MailboxState::Failed);
        failed.last_error = Some("ErrorNonExistentMailbox".into());
        failed.subscription_id = None;
        failed.seconds_since_heartbeat = None;
        let mut active = view("active@contoso.example", MailboxState::Active);
        active.resync_pending = true;
        let mut rows: Vec<Row> = [
            active,
            view("backoff@contoso.example", MailboxState::BackingOff),
            lost,
            view("new@contoso.example", MailboxState::Subscribing),
            failed,
        ]
        .into_iter()
        .map(Row::from_mailbox)
        .collect();
        sort_rows(&mut rows);
        let mut p = page(Mode::Managed, rows);
        p.spool_depth = Some(7);
        let html = p.render();
        assert_eq!(
            row_classes(&html),
            ["red", "red", "amber", "amber", "green"]
        );
        for want in [
            "<th scope=\"col\">Mailbox</th>",
            "<th scope=\"col\">Last keep-alive</th>",
            "<th scope=\"col\">Spool</th>",
            "</span> failed</td><td class=\"id\">failed@contoso.example</td><td class=\"id\">—</td><td>never</td><td>never</td><td class=\"num\">0</td><td>ErrorNonExistentMailbox</td>",
            "</span> lost</td><td class=\"id\">lost@contoso.example</td><td class=\"id\">sub-lost@contoso.example</td><td>1 min ago</td><td>1 h 6 min ago</td><td class=\"num\">7</td><td>no keep-alive for 3 min</td>",
            "</span> backing-off</td>",
            "</span> subscribing</td>",
            "receiver asked to resynchronise",
            "<span class=\"n\">7</span> waiting in the spool",
            "<strong>managed</strong> mode",
            "<span class=\"n\">2</span> <span aria-hidden=\"true\">\u{2716}</span> red \
             <small>2 mailboxes</small>",
            // The spool is a problem of its own, counted with the two amber rows.
            "<span class=\"n\">3</span> <span aria-hidden=\"true\">\u{25B2}</span> amber \
             <small>spool, 2 mailboxes</small>",
            "<p class=\"alert amber\" role=\"alert\"><strong>7 notifications wait in the \
             spool.</strong>",
        ] {
            assert!(html.contains(want), "missing {want} in\n{html}");
        }
    }

    /// The newcomer's finding: receiver down, 12 notifications spooled, and the page said
    /// "0 red, 2 green". Now the receiver is red, the spool amber, the waiting mailbox amber, and
    /// the counters count them all.
    #[test]
    fn receiver_down_with_a_spool_is_counted_and_waiting_mailboxes_are_amber() {
        let mut waiting = view("waiting@contoso.example", MailboxState::Active);
        waiting.spool_depth = 12;
        let quiet = view("quiet@contoso.example", MailboxState::Active);
        let mut rows: Vec<Row> = [quiet, waiting]
            .into_iter()
            .map(Row::from_mailbox)
            .collect();
        sort_rows(&mut rows);
        let mut p = page(Mode::Managed, rows);
        p.spool_depth = Some(12);
        p.receiver_check = receiver_down();

        let problems = p.problems();
        let parts: Vec<_> = problems.iter().map(|x| (x.severity, x.what)).collect();
        assert_eq!(parts, [(Health::Red, "receiver"), (Health::Amber, "spool")]);
        let c = p.counts(&problems);
        assert_eq!((c.red, c.amber, c.green), (1, 2, 1), "{c:?}");

        let html = p.render();
        assert_eq!(row_classes(&html), ["amber", "green"]);
        assert!(html.contains("<title>ews-relay: 1 red, 2 amber, 1 green</title>"));
        for want in [
            "</span> active</td><td class=\"id\">waiting@contoso.example</td>",
            "<td>12 waiting in the spool for the receiver</td>",
            "<dt>Receiver</dt><dd><span class=\"tag red\">\u{2716} red</span> \
             <code>127.0.0.1:8080</code> <strong>failed</strong> 2 s ago: not accepting \
             connections; last success 40 s ago</dd>",
            "<p class=\"alert red\" role=\"alert\"><strong>The receiver failed 2 s ago: not \
             accepting connections.</strong> At <code>127.0.0.1:8080</code>; notifications \
             are spooled and replayed once it answers.</p>",
            "<p class=\"alert amber\" role=\"alert\"><strong>12 notifications wait in the \
             spool.</strong> The receiver is failing: they are replayed once it answers.</p>",
            "<span class=\"n\">1</span> <span aria-hidden=\"true\">\u{2716}</span> red \
             <small>receiver</small>",
        ] {
            assert!(html.contains(want), "missing {want} in\n{html}");
        }
        assert!(!html.contains("reachable"), "{html}");
    }

    /// Every alarm is one entry of [`StatusPage::problems`], and the counters count each.
    #[test]
    fn every_problem_on_the_page_is_counted() {
        let mut p = page(
            Mode::Passthrough,
            vec![row(Health::Green, State::Alive, "a")],
        );
        assert!(p.problems().is_empty());
        assert_eq!(p.counts(&p.problems()).red, 0);

        p.receiver_check = receiver_down();
        p.cert.not_after = now() - Duration::from_secs(1);
        p.cert.self_signed = true;
        p.denied_recent = vec![("192.0.2.1".parse().unwrap(), now())];
        p.rows[0].since_heartbeat = Some(DENIED_ALERT_WINDOW.as_secs() + 1);
        let problems = p.problems();
        let c = p.counts(&problems);
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert_eq!(c.red, 4);
        assert_eq!(c.red_parts, ["source filter", "receiver", "certificate"]);
        assert_eq!(c.green, 1);
        let html = p.render();
        assert_eq!(
            html.matches("<p class=\"alert red\" role=\"alert\">")
                .count(),
            4
        );
        assert!(html.contains("<title>ews-relay: 4 red, 0 amber, 1 green</title>"));
        assert!(html.contains("<small>source filter, receiver, certificate</small>"));
        // Passthrough: what Exchange gets meanwhile.
        assert!(html.contains(
            "Exchange&#39;s notifications fail until it answers again. Last success 40 s ago."
        ));
    }

    /// Graph rows: their own table next to the EWS one, problems first, coloured by state,
    /// counted in the summary and listed as problems; the prefix is among the facts.
    #[test]
    fn graph_rows_have_their_table_colours_and_problems() {
        use crate::notify::tracker::{GraphSubscription, Tracker};
        use crate::notify::ReceiverAnswer;
        let tracker = Tracker::new(Duration::from_secs(1800));
        let peer: IpAddr = "52.1.2.3".parse().unwrap();
        // Whole seconds, so the expirations below format back exactly.
        let wall = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            );
        let body = |id: &str, exp: SystemTime, extra: &str| {
            format!(
                r#"{{"value":[{{"subscriptionId":"{id}","subscriptionExpirationDateTime":"{}","resource":"Users/u1/Messages/m1","tenantId":"t",{extra}}}]}}"#,
                graph::format_time(exp)
            )
        };
        let day = Duration::from_secs(86_400);
        for (id, exp, extra) in [
            ("g-alive", wall + 3 * day, r#""changeType":"created""#),
            (
                "g-removed",
                wall + 3 * day,
                r#""lifecycleEvent":"subscriptionRemoved""#,
            ),
            ("g-expiring", wall + day / 48, r#""changeType":"updated""#),
        ] {
            let c = graph::parse_collection(body(id, exp, extra).as_bytes()).unwrap();
            tracker.record_graph(&c, peer, ReceiverAnswer::Ok, Instant::now());
        }
        let mut rows: Vec<Row> = tracker
            .graph_snapshot()
            .into_iter()
            .map(|(id, s, st): (String, GraphSubscription, State)| {
                Row::from_graph_subscription(id, &s, st, wall)
            })
            .collect();
        sort_rows(&mut rows);
        let mut p = page(
            Mode::Passthrough,
            vec![row(Health::Green, State::Alive, "ews")],
        );
        p.graph_rows = rows;
        p.graph_path_prefix = Some("/graph".into());
        let problems = p.problems();
        let parts: Vec<_> = problems.iter().map(|x| (x.severity, x.what)).collect();
        assert_eq!(parts, [(Health::Red, "graph"), (Health::Amber, "graph")]);
        let c = p.counts(&problems);
        assert_eq!((c.red, c.amber, c.green), (2, 2, 2), "{c:?}");
        let html = p.render();
        assert_eq!(row_classes(&html), ["green", "red", "amber", "green"]);
        assert!(html.contains("<title>ews-relay: 2 red, 2 amber, 2 green</title>"));
        for want in [
            "<dt>Graph path prefix</dt><dd><code>/graph</code></dd>",
            "<h3 id=\"graph-h\">Microsoft Graph</h3>",
            "<th scope=\"col\">Expires</th>",
            "</span> removed</td><td class=\"id\">g-removed</td><td class=\"id\">—</td><td>in 3 d 0 h</td>",
            "<td>subscriptionRemoved 0 s ago</td>",
            "</span> expiring</td><td class=\"id\">g-expiring</td><td class=\"id\">Users/u1/Messages</td><td>in 30 min</td>",
            "</span> alive</td><td class=\"id\">g-alive</td>",
            "<strong>Graph subscription: 1 removed.</strong>",
            "<strong>Graph subscription: 1 expiring.</strong>",
            "<code>g-removed</code>",
            "<small>graph, 1 Graph</small>",
        ] {
            assert!(html.contains(want), "missing {want} in\n{html}");
        }
    }

    fn group(anchor: &str, opened: bool, connections: u8, error: Option<&str>) -> GroupView {
        GroupView {
            ews_url: "https://ews.contoso.example/EWS/Exchange.asmx".into(),
            grouping: "G1".into(),
            anchor: anchor.into(),
            mailboxes: 200,
            open_since: None,
            opened: opened.then(|| now() - Duration::from_secs(600)),
            seconds_since_keepalive: opened.then_some(12),
            reconnects: 3,
            connections,
            last_error: error.map(str::to_owned),
        }
    }

    #[test]
    fn streaming_groups_have_their_table_colours_and_problems() {
        use crate::admin::status::streams::{group_state, sort_groups};
        let mut groups = vec![
            group("a@contoso.example", true, 1, None),
            group("b@contoso.example", true, 2, None),
            group(
                "c@contoso.example",
                false,
                0,
                Some("connection broken: <cut>"),
            ),
            group("d@contoso.example", false, 0, None),
        ];
        assert_eq!(group_state(&groups[0]), (Health::Green, "connected"));
        assert_eq!(group_state(&groups[1]), (Health::Green, "renewing"));
        assert_eq!(group_state(&groups[2]), (Health::Red, "down"));
        assert_eq!(group_state(&groups[3]), (Health::Amber, "connecting"));
        sort_groups(&mut groups);
        let mut p = page(Mode::Managed, vec![row(Health::Green, State::Alive, "m")]);
        p.stream_groups = Some(groups);
        let problems = p.problems();
        let parts: Vec<_> = problems.iter().map(|x| (x.severity, x.what)).collect();
        assert_eq!(
            parts,
            [(Health::Red, "streaming"), (Health::Amber, "streaming")]
        );
        let c = p.counts(&problems);
        assert_eq!((c.red, c.amber), (1, 1), "{c:?}");
        let html = p.render();
        assert_eq!(
            row_classes(&html),
            ["green", "red", "amber", "green", "green"],
            "mailbox row, then the groups with problems first"
        );
        for want in [
            "<h3 id=\"stream-h\">Streaming connections</h3>",
            "<table id=\"stream-groups\">",
            "<span class=\"n\">3</span> streaming connections <small>(4 groups)</small>",
            "</span> down</td><td class=\"id\">c@contoso.example</td>",
            "connection broken: &lt;cut&gt;",
            "</span> connected</td><td class=\"id\">a@contoso.example</td><td class=\"id\">https://ews.contoso.example/EWS/Exchange.asmx<br><small>G1</small></td><td class=\"num\">200</td>",
            "(10 min)</td><td>12 s ago</td><td class=\"num\">3</td>",
            "</span> renewing</td>",
            "<strong>Streaming connections down: 1 of 4 (200 mailboxes).</strong>",
            "<strong>Streaming connections opening: 1 of 4 (200 mailboxes).</strong>",
            "<code>c@contoso.example</code>",
        ] {
            assert!(html.contains(want), "missing {want} in\n{html}");
        }
        // Without streaming, no table and no card.
        p.stream_groups = None;
        assert!(!p.render().contains("<table id=\"stream-groups\">"));
    }

    #[test]
    fn the_skeleton_has_every_slot_filled() {
        let html = page(Mode::Managed, Vec::new()).render();
        assert!(!html.contains("{{"), "{html}");
        assert!(!html.contains("}}"), "{html}");
        assert_eq!(html.matches("content=\"10\"").count(), 1);
        assert!(html.contains("data-refresh=\"10\""));
        assert!(html.contains("refreshes every 10 s"));
        assert!(html.contains("<h2 id=\"rows-h\">Mailboxes</h2>"));
        assert!(html.contains("No mailboxes are configured."));
    }

    #[test]
    fn certificate_health_and_alerts() {
        let mut p = page(Mode::Passthrough, Vec::new());
        assert_eq!(p.cert.health(now()), Health::Green);
        let html = p.render();
        assert!(!html.contains("class=\"alert"), "{html}");
        assert!(html.contains("No notification has passed yet"));

        p.cert.not_after = now() + Duration::from_secs(10 * 86_400);
        assert_eq!(p.cert.health(now()), Health::Amber);
        assert!(p.render().contains(
            "<p class=\"alert amber\" role=\"alert\"><strong>The certificate expires in 10 d 0 h."
        ));

        p.cert.not_after = now() - Duration::from_secs(1);
        assert_eq!(p.cert.health(now()), Health::Red);
        assert!(p.render().contains("has EXPIRED"));

        p.cert.not_after = now() + Duration::from_secs(365 * 86_400);
        p.cert.self_signed = true;
        assert_eq!(p.cert.health(now()), Health::Red);
        let html = p.render();
        assert!(html.contains("<strong>SELF-SIGNED certificate.</strong>"));
        assert!(html.contains("<strong class=\"loud\">SELF-SIGNED</strong>"));
    }

    #[test]
    fn denied_traffic_without_notifications_is_prominent() {
        let ip: IpAddr = "52.100.1.1".parse().unwrap();
        let mut p = page(Mode::Passthrough, Vec::new());
        p.denied_total = 5;
        p.denied_recent = vec![
            (ip, now() - Duration::from_secs(100)),
            (
                "198.51.100.7".parse().unwrap(),
                now() - Duration::from_secs(50),
            ),
            (ip, now() - Duration::from_secs(20)),
        ];
        assert!(p.denied_without_traffic());
        let html = p.render();
        assert!(
            html.contains("Is Microsoft's traffic reaching us?"),
            "{html}"
        );
        assert!(html.contains("Newest denied: <code>52.100.1.1</code> 20 s ago"));
        assert!(html.contains("<section class=\"panel loud-panel\">"));
        // Grouped per address, newest first, with how often.
        let a = html
            .find("<tr><td><code>52.100.1.1</code></td><td>20 s ago")
            .unwrap();
        let b = html
            .find("<tr><td><code>198.51.100.7</code></td><td>50 s ago")
            .unwrap();
        assert!(a < b);
        assert!(html[a..b].contains("<td>2</td></tr>"));

        // A subscription heard from recently: the denials are just noise.
        p.rows = vec![row(Health::Green, State::Alive, "s")];
        assert!(!p.denied_without_traffic());
        assert!(!p.render().contains("Is Microsoft"));
        // Old denials, nothing heard: no alarm either.
        p.rows.clear();
        p.denied_recent = vec![(ip, now() - DENIED_ALERT_WINDOW - Duration::from_secs(1))];
        assert!(!p.denied_without_traffic());
    }

    #[test]
    fn durations_read_naturally() {
        let f = |s| {
            let mut o = String::new();
            push_duration(&mut o, s);
            o
        };
        assert_eq!(f(0), "0 s");
        assert_eq!(f(59), "59 s");
        assert_eq!(f(60), "1 min");
        assert_eq!(f(3599), "59 min");
        assert_eq!(f(3600 + 120), "1 h 2 min");
        assert_eq!(f(86_400 * 2 + 3600 * 5 + 7), "2 d 5 h");
    }

    #[test]
    fn csp_hash_is_base64_of_sha256() {
        // The well-known CSP hash of an empty inline element, and of `alert(1)`.
        assert_eq!(
            sha256_base64(""),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(
            sha256_base64("alert(1)"),
            "bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI="
        );
    }

    #[test]
    fn csp_hashes_the_exact_inline_style_and_script() {
        let html = page(Mode::Passthrough, Vec::new()).render();
        let between = |open: &str, close: &str| {
            let start = html.find(open).unwrap() + open.len();
            html[start..start + html[start..].find(close).unwrap()].to_owned()
        };
        let style = between("<style>", "</style>");
        let script = between("<script>", "</script>");
        let hash = sha256_base64;
        let csp = content_security_policy();
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(csp.contains(&format!("style-src 'sha256-{}'", hash(&style))));
        assert!(csp.contains(&format!("script-src 'sha256-{}'", hash(&script))));
        assert!(!csp.contains("unsafe"), "{csp}");
    }

    #[test]
    fn five_thousand_rows_render_fast_and_small() {
        let states = [
            (Health::Green, State::Alive),
            (Health::Amber, State::Stale),
            (Health::Red, State::Error),
            (Health::Red, State::Unsubscribed),
        ];
        let mut rows: Vec<Row> = (0..5_000)
            .map(|i| {
                let (h, s) = states[i % 7 % 4];
                let mut r = row(
                    h,
                    s,
                    &format!(
                        "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAAB9c1Qm{i:06}"
                    ),
                );
                if h == Health::Red {
                    r.last_error = Some("Exchange: ErrorReadEventsFailed & <more>".into());
                }
                r
            })
            .collect();
        sort_rows(&mut rows);
        let p = page(Mode::Passthrough, rows);
        let _warm = p.render();
        let started = Instant::now();
        let html = p.render();
        let took = started.elapsed();
        println!(
            "5000 rows: {took:?}, {} bytes ({} per row)",
            html.len(),
            html.len() / 5_000
        );
        assert_eq!(row_classes(&html).len(), 5_000);
        assert!(took < Duration::from_millis(250), "rendering took {took:?}");
        assert!(html.len() < 3_000_000, "page is {} bytes", html.len());
        assert!(
            html.len() <= PAGE_BYTES + 5_000 * ROW_BYTES,
            "the pre-sized buffer was too small: {} bytes",
            html.len()
        );
        let classes = row_classes(&html);
        let first_green = classes.iter().position(|c| *c == "green").unwrap();
        assert!(classes[..first_green].iter().all(|c| *c != "green"));
        assert!(classes[first_green..].iter().all(|c| *c == "green"));
    }
}
