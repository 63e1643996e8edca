//! The admin listener's `GET /status` page: what an administrator needs at a glance.
//!
//! One self-contained HTML5 document (inline CSS and script, no external assets, works offline)
//! with, from top to bottom: alerts, summary counts, the relay's facts (certificate, receiver,
//! admitted networks, version, uptime), denied connections, and one row per mailbox (managed
//! mode) or subscription (passthrough), problems first.
//!
//! Every row carries a [`Health`]: green, amber or red. The mapping from the domain states:
//!
//! | mode        | green    | amber                      | red                          |
//! |-------------|----------|----------------------------|------------------------------|
//! | managed     | `active` | `subscribing`, `backing-off` | `lost`, `failed`           |
//! | passthrough | `alive`  | `stale`                    | `unsubscribed`, `error`      |
//!
//! Amber means "the relay is working on it or has not heard for a while"; red means "no
//! notifications will reach the receiver for this one until something changes". The page shows
//! the same mapping as a legend, and the state as text next to the colour.
//!
//! Rendering is split from gathering so it can be tested on plain values: [`StatusPage`] holds
//! the facts, [`StatusPage::collect`] reads them from the running relay, and
//! [`StatusPage::render`] writes the HTML into one pre-sized `String`, escaping every dynamic
//! value with [`escape_into`].
//!
//! The page refreshes itself: its script re-fetches `/status` every [`REFRESH_SECS`] seconds and
//! swaps the live parts in place (so the filter box keeps its text and the scroll position
//! stays); without script, a `<noscript>` meta refresh reloads the page. The response's
//! Content-Security-Policy admits only this module's own script and style, by hash.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use crate::admin::AdminState;
use crate::notify::tracker::{ReceiverAnswer, State, Subscription};
use crate::subscriptions::manager::MailboxView;

/// Seconds between refreshes: often enough to watch a keep-alive period (Exchange's
/// StatusFrequency is at least a minute), rare enough that a page left open for months costs
/// nothing.
pub const REFRESH_SECS: u32 = 10;
/// The certificate turns amber this long before it expires: two weeks leaves time to renew
/// through a change process, and matches what certificate monitors usually warn at.
pub const CERT_WARN_BEFORE: Duration = Duration::from_secs(14 * 86_400);
/// A denied connection this recent, with no notification arriving in the same window, raises
/// the "is Microsoft's traffic reaching us at all?" alert. Fifteen minutes covers several
/// keep-alive periods, so a working subscription would have been heard from.
pub const DENIED_ALERT_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Bytes reserved per row before rendering; a typical row is 250–400 bytes, so one allocation
/// usually suffices even for thousands of rows.
const ROW_BYTES: usize = 420;
/// Bytes reserved for everything but the rows (head, style, script, facts).
const PAGE_BYTES: usize = 16 * 1024;

/// How a row, or a fact about the relay, looks: the page's traffic light.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    /// Something is broken: notifications will not flow until it changes. Sorted first.
    Red,
    /// Transitional or silent for a while: worth a look.
    Amber,
    /// Working.
    Green,
}

impl Health {
    /// The CSS class and the word shown on the page.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Red => "red",
            Health::Amber => "amber",
            Health::Green => "green",
        }
    }

    /// The start of a table row of this colour, up to the state word.
    fn row_open(self) -> &'static str {
        match self {
            Health::Red => {
                "<tr class=\"red\"><td class=\"st\"><span class=\"tag red\">\
                 <span aria-hidden=\"true\">\u{2716}</span> red</span> "
            }
            Health::Amber => {
                "<tr class=\"amber\"><td class=\"st\"><span class=\"tag amber\">\
                 <span aria-hidden=\"true\">\u{25B2}</span> amber</span> "
            }
            Health::Green => {
                "<tr class=\"green\"><td class=\"st\"><span class=\"tag green\">\
                 <span aria-hidden=\"true\">\u{2714}</span> green</span> "
            }
        }
    }

    /// A symbol shown beside the word, so the state never depends on colour vision.
    fn symbol(self) -> &'static str {
        match self {
            Health::Red => "\u{2716}",
            Health::Amber => "\u{25B2}",
            Health::Green => "\u{2714}",
        }
    }
}

/// Passthrough mapping: alive is green, stale amber, unsubscribed and error red.
pub fn subscription_health(state: State) -> Health {
    match state {
        State::Alive => Health::Green,
        State::Stale => Health::Amber,
        State::Unsubscribed | State::Error => Health::Red,
    }
}

/// Managed mapping: active is green; subscribing and backing-off amber (the relay is working on
/// it); lost and failed red. An unknown label is amber, so a new state is never shown as fine.
pub fn mailbox_health(state: &str) -> Health {
    match state {
        "active" => Health::Green,
        "lost" | "failed" => Health::Red,
        _ => Health::Amber,
    }
}

/// Which view of the traffic the rows come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The relay keeps mailboxes subscribed itself: rows are mailboxes.
    Managed,
    /// The relay only forwards: rows are subscriptions seen in the traffic.
    Passthrough,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Managed => "managed",
            Mode::Passthrough => "passthrough",
        }
    }
}

/// One table row: a mailbox (managed) or a subscription (passthrough).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Its colour.
    pub health: Health,
    /// Its state in the domain's words (`active`, `stale`, …), shown next to the colour.
    pub state: &'static str,
    /// The mailbox address (managed) or subscription id (passthrough).
    pub name: String,
    /// Managed: the current subscription id.
    pub subscription_id: Option<String>,
    /// Passthrough: where its latest notification came from.
    pub peer: Option<IpAddr>,
    /// Seconds since its last keep-alive or event (passthrough: any notification).
    pub since_heartbeat: Option<u64>,
    /// Managed: seconds since its last notification carrying events.
    pub since_event: Option<u64>,
    /// Passthrough: events seen, keep-alives excluded.
    pub events: Option<u64>,
    /// Managed: notifications waiting in its spool.
    pub spool: Option<u64>,
    /// Its last error, or what is wrong with it, in words.
    pub last_error: Option<String>,
}

impl Row {
    /// A managed mailbox.
    pub fn from_mailbox(v: MailboxView) -> Row {
        let mut last_error = v.last_error;
        if v.resync_pending {
            let note = "receiver asked to resynchronise (not yet acknowledged)";
            last_error = Some(match last_error {
                Some(e) => format!("{e}; {note}"),
                None => note.to_owned(),
            });
        }
        Row {
            health: mailbox_health(v.state),
            state: v.state,
            name: v.mailbox,
            subscription_id: v.subscription_id,
            peer: None,
            since_heartbeat: v.seconds_since_heartbeat,
            since_event: v.seconds_since_event,
            events: None,
            spool: Some(v.spool_depth),
            last_error,
        }
    }

    /// A subscription seen in the traffic (passthrough).
    pub fn from_subscription(id: String, s: &Subscription, state: State, now: SystemTime) -> Row {
        let exchange_code = s.last_response_code.as_deref().unwrap_or("no code");
        let last_error = match (s.last_response_class, s.receiver_answer) {
            (ews::ResponseClass::Error, _) => Some(format!("Exchange: {exchange_code}")),
            (_, Some(ReceiverAnswer::HttpError(code))) => {
                Some(format!("receiver answered HTTP {code}"))
            }
            (_, Some(ReceiverAnswer::Unreachable)) => Some("receiver unreachable".to_owned()),
            (_, Some(ReceiverAnswer::Unsubscribe)) => {
                Some("receiver answered Unsubscribe".to_owned())
            }
            (_, Some(ReceiverAnswer::Unparsed)) => {
                Some("receiver's answer was not a SendNotificationResult".to_owned())
            }
            (ews::ResponseClass::Warning, _) => Some(format!("Exchange warning: {exchange_code}")),
            _ => None,
        };
        let status = ews::EventType::Status.index();
        let events = s
            .events
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != status)
            .map(|(_, n)| n)
            .sum();
        Row {
            health: subscription_health(state),
            state: state.as_str(),
            name: id,
            subscription_id: None,
            peer: Some(s.peer),
            since_heartbeat: Some(secs_since(now, s.last_seen)),
            since_event: None,
            events: Some(events),
            spool: None,
            last_error,
        }
    }
}

/// Problems first: red, then amber, then green; by name within a colour, so rows keep their
/// place between refreshes.
pub fn sort_rows(rows: &mut [Row]) {
    rows.sort_unstable_by(|a, b| a.health.cmp(&b.health).then_with(|| a.name.cmp(&b.name)));
}

/// The served certificate, as shown.
#[derive(Debug, Clone)]
pub struct CertFacts {
    /// Subject distinguished name.
    pub subject: String,
    /// End of validity.
    pub not_after: SystemTime,
    /// SHA-256 fingerprint.
    pub sha256: String,
    /// Generated by the relay: Exchange Online will not call back to it.
    pub self_signed: bool,
}

impl CertFacts {
    /// Red when expired or self-signed, amber within [`CERT_WARN_BEFORE`] of expiry.
    pub fn health(&self, now: SystemTime) -> Health {
        match self.not_after.duration_since(now) {
            Err(_) => Health::Red,
            Ok(_) if self.self_signed => Health::Red,
            Ok(left) if left < CERT_WARN_BEFORE => Health::Amber,
            Ok(_) => Health::Green,
        }
    }
}

/// Everything the page shows, gathered at one instant.
#[derive(Debug, Clone)]
pub struct StatusPage {
    /// Managed or passthrough.
    pub mode: Mode,
    /// The rows, in any order ([`StatusPage::render`] does not sort; [`StatusPage::collect`]
    /// does).
    pub rows: Vec<Row>,
    /// Managed: notifications waiting in the spool, all mailboxes together.
    pub spool_depth: Option<u64>,
    /// Connections refused by the source filter since start.
    pub denied_total: u64,
    /// The most recent denied addresses with when, oldest first (as [`crate::allow::DeniedLog`]
    /// keeps them).
    pub denied_recent: Vec<(IpAddr, SystemTime)>,
    /// The admitted networks, described.
    pub admitted: String,
    /// The served certificate.
    pub cert: CertFacts,
    /// The receiver's `host:port`.
    pub receiver: String,
    /// Whether the receiver accepted a connection lately or on a probe now.
    pub receiver_reachable: bool,
    /// When the receiver last accepted a connection or answered.
    pub receiver_since: Option<Duration>,
    /// Passthrough: `--stale-after`.
    pub stale_after: Option<Duration>,
    /// `--path-prefix`.
    pub path_prefix: String,
    /// The relay's version.
    pub version: &'static str,
    /// Time since the relay started.
    pub uptime: Duration,
    /// When this was gathered.
    pub now: SystemTime,
    /// `--acme-domain`: waiting for the first certificate, or failing repeatedly.
    pub acme: Option<crate::edge::acme::AcmeAlarm>,
}

impl StatusPage {
    /// Read the running relay's state; `receiver_reachable` is the admin endpoint's readiness
    /// verdict (recent contact or a probe). Rows come out sorted, problems first.
    pub fn collect(state: &AdminState, receiver_reachable: bool) -> StatusPage {
        let now = SystemTime::now();
        let (mode, mut rows, spool_depth, stale_after) = match state.manager.as_deref() {
            Some(m) => (
                Mode::Managed,
                m.views().into_iter().map(Row::from_mailbox).collect(),
                Some(m.delivery().waiting()),
                None,
            ),
            None => (
                Mode::Passthrough,
                state
                    .tracker
                    .snapshot()
                    .into_iter()
                    .map(|(id, s, st)| Row::from_subscription(id, &s, st, now))
                    .collect::<Vec<_>>(),
                None,
                Some(state.tracker.stale_after()),
            ),
        };
        sort_rows(&mut rows);
        let info = state.certs.current().info.clone();
        StatusPage {
            mode,
            rows,
            spool_depth,
            denied_total: state.metrics.denied_source_total(),
            denied_recent: state.denied.recent(),
            admitted: state.allow.load().describe(),
            cert: CertFacts {
                subject: info.subject,
                not_after: info.not_after,
                sha256: info.sha256,
                self_signed: info.self_signed,
            },
            receiver: state.receiver.authority().to_owned(),
            receiver_reachable,
            receiver_since: state.receiver.since_reachable(),
            stale_after,
            path_prefix: state.path_prefix.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime: state.started.elapsed(),
            now,
            acme: state.certs.acme().and_then(|a| a.alarm()),
        }
    }

    /// How many rows are red, amber and green.
    pub fn counts(&self) -> [usize; 3] {
        let mut c = [0; 3];
        for r in &self.rows {
            c[r.health as usize] += 1;
        }
        c
    }

    /// Whether connections were denied within [`DENIED_ALERT_WINDOW`] while no notification
    /// arrived in it: Exchange may be calling from outside the admitted networks.
    pub fn denied_without_traffic(&self) -> bool {
        let window = DENIED_ALERT_WINDOW.as_secs();
        let recent_denial = self
            .denied_recent
            .iter()
            .any(|(_, t)| secs_since(self.now, *t) < window);
        let heard = self
            .rows
            .iter()
            .filter_map(|r| r.since_heartbeat)
            .any(|s| s < window);
        recent_denial && !heard
    }

    /// The whole HTML document.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(PAGE_BYTES + self.rows.len() * ROW_BYTES);
        let [red, amber, green] = self.counts();
        let _ = write!(
            out,
            "<!DOCTYPE html>\n<html lang=\"en\" data-refresh=\"{REFRESH_SECS}\">\n<head>\n\
             <meta charset=\"utf-8\">\n"
        );
        out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
        let _ = write!(
            out,
            "<noscript><meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\"></noscript>\n\
             <title>ews-relay: {red} red, {amber} amber, {green} green</title>\n<style>"
        );
        out.push_str(STYLE);
        out.push_str("</style>\n</head>\n<body>\n<header>\n<h1>ews-relay status</h1>\n<p>");
        let _ = write!(out, "version {} · up ", escape(self.version));
        push_duration(&mut out, self.uptime.as_secs());
        out.push_str(" · page generated ");
        push_time(&mut out, self.now);
        let _ = write!(
            out,
            " · refreshes every {REFRESH_SECS} s · <a href=\"metrics\">/metrics</a> · \
             <a href=\"api/subscriptions\">/api/subscriptions</a></p>\n</header>\n<main>\n"
        );

        out.push_str("<div id=\"live-top\">\n");
        self.render_alerts(&mut out);
        self.render_summary(&mut out, [red, amber, green]);
        out.push_str("<div class=\"panels\">\n");
        self.render_facts(&mut out);
        self.render_denied(&mut out);
        out.push_str("</div>\n</div>\n");

        self.render_table(&mut out);
        render_legend(&mut out);
        out.push_str("</main>\n<script>");
        out.push_str(SCRIPT);
        out.push_str("</script>\n</body>\n</html>\n");
        out
    }

    fn render_alerts(&self, out: &mut String) {
        if self.denied_without_traffic() {
            out.push_str(
                "<p class=\"alert red\" role=\"alert\"><strong>Is Microsoft's traffic reaching \
                 us?</strong> Connections were refused by the source filter in the last ",
            );
            push_duration(out, DENIED_ALERT_WINDOW.as_secs());
            out.push_str(" and no notification arrived in that time. Newest denied: ");
            if let Some((ip, t)) = self.denied_recent.last() {
                let _ = write!(out, "<code>{ip}</code> ");
                push_ago(out, Some(secs_since(self.now, *t)));
            }
            out.push_str(
                ". If that is Exchange, its addresses are outside the admitted networks (",
            );
            escape_into(out, &self.admitted);
            out.push_str("): check <code>--allow</code> / <code>--allow-file</code>.</p>\n");
        }
        if let Some(alarm) = &self.acme {
            use crate::edge::acme::AcmeAlarm;
            let (class, text) = match alarm {
                AcmeAlarm::Waiting(t) => ("amber", t),
                AcmeAlarm::Failing(t) => ("red", t),
            };
            let _ = write!(out, "<p class=\"alert {class}\" role=\"alert\"><strong>");
            escape_into(out, text);
            out.push_str("</strong></p>\n");
        } else if self.cert.self_signed {
            out.push_str(
                "<p class=\"alert red\" role=\"alert\"><strong>SELF-SIGNED certificate.</strong> \
                 Exchange Online will not call back to it: give <code>--tls-cert</code> / \
                 <code>--tls-key</code> from a public CA.</p>\n",
            );
        }
        match self.cert.not_after.duration_since(self.now) {
            Err(_) => out.push_str(
                "<p class=\"alert red\" role=\"alert\"><strong>The certificate has \
                 EXPIRED.</strong> Exchange cannot call back until it is replaced.</p>\n",
            ),
            Ok(left) if left < CERT_WARN_BEFORE => {
                out.push_str(
                    "<p class=\"alert amber\" role=\"alert\"><strong>The certificate expires \
                     in ",
                );
                push_duration(out, left.as_secs());
                out.push_str(".</strong> Renew it soon.</p>\n");
            }
            Ok(_) => {}
        }
        if !self.receiver_reachable {
            out.push_str(
                "<p class=\"alert red\" role=\"alert\"><strong>The receiver is not accepting \
                 connections</strong> at <code>",
            );
            escape_into(out, &self.receiver);
            out.push_str("</code>.</p>\n");
        }
    }

    fn render_summary(&self, out: &mut String, [red, amber, green]: [usize; 3]) {
        let what = match self.mode {
            Mode::Managed => "mailboxes",
            Mode::Passthrough => "subscriptions",
        };
        out.push_str("<section class=\"summary\" aria-label=\"Summary\">\n");
        for (h, n) in [
            (Health::Red, red),
            (Health::Amber, amber),
            (Health::Green, green),
        ] {
            let dim = if n == 0 { " zero" } else { "" };
            let _ = writeln!(
                out,
                "<div class=\"card {c}{dim}\"><span class=\"n\">{n}</span> \
                 <span aria-hidden=\"true\">{s}</span> {c}</div>",
                c = h.as_str(),
                s = h.symbol(),
            );
        }
        let _ = writeln!(
            out,
            "<div class=\"card info\"><span class=\"n\">{}</span> {what} · <strong>{}</strong> \
             mode</div>",
            self.rows.len(),
            self.mode.as_str()
        );
        match self.spool_depth {
            Some(d) => {
                let c = if d > 0 { "amber" } else { "info" };
                let _ = writeln!(
                    out,
                    "<div class=\"card {c}\"><span class=\"n\">{d}</span> waiting in the \
                     spool</div>"
                );
            }
            None => out.push_str(
                "<div class=\"card info\">no spool <small>(passthrough answers \
                 synchronously)</small></div>\n",
            ),
        }
        out.push_str("</section>\n");
    }

    fn render_facts(&self, out: &mut String) {
        out.push_str("<section class=\"panel\">\n<h2>Relay</h2>\n<dl>\n");
        let mut ch = self.cert.health(self.now);
        // Waiting for ACME: the self-signed placeholder is expected until the CA issues.
        if matches!(self.acme, Some(crate::edge::acme::AcmeAlarm::Waiting(_)))
            && ch == Health::Red
            && self.cert.not_after > self.now
        {
            ch = Health::Amber;
        }
        let _ = write!(
            out,
            "<dt>Certificate</dt><dd><span class=\"tag {c}\">{s} {c}</span> ",
            c = ch.as_str(),
            s = ch.symbol()
        );
        escape_into(out, &self.cert.subject);
        if self.cert.self_signed {
            out.push_str(" <strong class=\"loud\">SELF-SIGNED</strong>");
        }
        out.push_str("<br>expires ");
        push_time(out, self.cert.not_after);
        match self.cert.not_after.duration_since(self.now) {
            Ok(left) => {
                out.push_str(" (in ");
                push_duration(out, left.as_secs());
                out.push(')');
            }
            Err(_) => out.push_str(" (<strong>expired</strong>)"),
        }
        out.push_str("<br><small>SHA-256 <code class=\"wrap\">");
        escape_into(out, &self.cert.sha256);
        out.push_str("</code></small></dd>\n");

        let rh = if self.receiver_reachable {
            Health::Green
        } else {
            Health::Red
        };
        let _ = write!(
            out,
            "<dt>Receiver</dt><dd><span class=\"tag {c}\">{s} {c}</span> <code>",
            c = rh.as_str(),
            s = rh.symbol()
        );
        escape_into(out, &self.receiver);
        out.push_str("</code> ");
        out.push_str(if self.receiver_reachable {
            "reachable"
        } else {
            "<strong>not accepting connections</strong>"
        });
        out.push_str("; last contact ");
        push_ago(out, self.receiver_since.map(|d| d.as_secs()));
        out.push_str("</dd>\n<dt>Admitted networks</dt><dd>");
        escape_into(out, &self.admitted);
        out.push_str("</dd>\n<dt>Path prefix</dt><dd><code>");
        escape_into(out, &self.path_prefix);
        out.push_str("</code></dd>\n");
        if let Some(s) = self.stale_after {
            let _ = writeln!(
                out,
                "<dt>Stale after</dt><dd>{} without a notification</dd>",
                humantime::format_duration(s)
            );
        }
        out.push_str("<dt>Version</dt><dd>");
        escape_into(out, self.version);
        out.push_str("</dd>\n<dt>Uptime</dt><dd>");
        push_duration(out, self.uptime.as_secs());
        out.push_str("</dd>\n</dl>\n</section>\n");
    }

    fn render_denied(&self, out: &mut String) {
        let loud = if self.denied_without_traffic() {
            " loud-panel"
        } else {
            ""
        };
        let _ = write!(
            out,
            "<section class=\"panel{loud}\">\n<h2>Denied connections</h2>\n<p><span \
             class=\"big\">{}</span> refused by the source filter since start.</p>\n",
            self.denied_total
        );
        if self.denied_recent.is_empty() {
            out.push_str("<p>None recently.</p>\n</section>\n");
            return;
        }
        // Newest first, one line per address (the log keeps the last few dozen denials).
        let mut seen: Vec<(IpAddr, SystemTime, usize)> = Vec::new();
        for (ip, t) in self.denied_recent.iter().rev() {
            match seen.iter_mut().find(|(a, _, _)| a == ip) {
                Some(e) => e.2 += 1,
                None => seen.push((*ip, *t, 1)),
            }
        }
        out.push_str(
            "<table class=\"small\">\n<caption>Most recent denied sources</caption>\n<thead><tr>\
             <th scope=\"col\">Address</th><th scope=\"col\">Last denied</th>\
             <th scope=\"col\">Times (recent)</th></tr></thead>\n<tbody>\n",
        );
        for (ip, t, n) in seen {
            let _ = write!(out, "<tr><td><code>{ip}</code></td><td>");
            push_ago(out, Some(secs_since(self.now, t)));
            out.push_str(" <small>");
            push_time(out, t);
            let _ = writeln!(out, "</small></td><td>{n}</td></tr>");
        }
        out.push_str("</tbody>\n</table>\n</section>\n");
    }

    fn render_table(&self, out: &mut String) {
        let (what, name_col) = match self.mode {
            Mode::Managed => ("Mailboxes", "Mailbox"),
            Mode::Passthrough => ("Subscriptions", "Subscription"),
        };
        let _ = write!(
            out,
            "<section aria-labelledby=\"rows-h\">\n<h2 id=\"rows-h\">{what}</h2>\n\
             <div class=\"filter\" id=\"filter\" hidden>\n<label>Filter \
             <input type=\"search\" id=\"q\" placeholder=\"text, address, error…\" \
             autocomplete=\"off\"></label>\n<label>State <select id=\"h\">\
             <option value=\"\">all</option><option value=\"problems\">red and amber</option>\
             <option value=\"red\">red</option><option value=\"amber\">amber</option>\
             <option value=\"green\">green</option></select></label>\n\
             <span id=\"shown\" aria-live=\"polite\"></span>\n</div>\n"
        );
        out.push_str("<div id=\"live-rows\">\n");
        if self.rows.is_empty() {
            out.push_str(match self.mode {
                Mode::Managed => "<p class=\"empty\">No mailboxes are configured.</p>\n",
                Mode::Passthrough => {
                    "<p class=\"empty\">No notification has passed yet: subscriptions appear \
                     here when Exchange first calls back.</p>\n"
                }
            });
            out.push_str("</div>\n</section>\n");
            return;
        }
        let _ = write!(
            out,
            "<table id=\"rows\">\n<thead><tr><th scope=\"col\">State</th>\
             <th scope=\"col\">{name_col}</th>"
        );
        match self.mode {
            Mode::Managed => out.push_str(
                "<th scope=\"col\">Subscription</th><th scope=\"col\">Last keep-alive</th>\
                 <th scope=\"col\">Last event</th><th scope=\"col\">Spool</th>",
            ),
            Mode::Passthrough => out.push_str(
                "<th scope=\"col\">From</th><th scope=\"col\">Last notification</th>\
                 <th scope=\"col\">Events</th>",
            ),
        }
        out.push_str("<th scope=\"col\">Last error</th></tr></thead>\n<tbody>\n");
        // The hot loop of a big page: plain pushes, no formatting machinery.
        for r in &self.rows {
            out.push_str(r.health.row_open());
            out.push_str(r.state);
            out.push_str("</td><td class=\"id\">");
            escape_into(out, &r.name);
            match self.mode {
                Mode::Managed => {
                    out.push_str("</td><td class=\"id\">");
                    escape_into(out, r.subscription_id.as_deref().unwrap_or("—"));
                    out.push_str("</td><td>");
                    push_ago(out, r.since_heartbeat);
                    out.push_str("</td><td>");
                    push_ago(out, r.since_event);
                    out.push_str("</td><td class=\"num\">");
                    push_u64(out, r.spool.unwrap_or(0));
                }
                Mode::Passthrough => {
                    out.push_str("</td><td>");
                    if let Some(p) = r.peer {
                        let _ = write!(out, "{p}");
                    }
                    out.push_str("</td><td>");
                    push_ago(out, r.since_heartbeat);
                    out.push_str("</td><td class=\"num\">");
                    push_u64(out, r.events.unwrap_or(0));
                }
            }
            out.push_str("</td><td>");
            if let Some(e) = &r.last_error {
                escape_into(out, e);
            }
            out.push_str("</td></tr>\n");
        }
        out.push_str("</tbody>\n</table>\n</div>\n</section>\n");
    }
}

fn render_legend(out: &mut String) {
    out.push_str(
        "<section class=\"legend\" aria-label=\"Legend\">\n<h2>Legend</h2>\n<ul>\n\
         <li><span class=\"tag red\"><span aria-hidden=\"true\">\u{2716}</span> red</span> \
         no notifications will flow until something changes — managed: <em>lost</em>, \
         <em>failed</em>; passthrough: <em>unsubscribed</em> (the receiver answered \
         Unsubscribe), <em>error</em> (Exchange reported an error, or the receiver failed).</li>\n\
         <li><span class=\"tag amber\"><span aria-hidden=\"true\">\u{25B2}</span> amber</span> \
         in progress or silent — managed: <em>subscribing</em>, <em>backing-off</em>; \
         passthrough: <em>stale</em> (nothing arrived within the stale-after time).</li>\n\
         <li><span class=\"tag green\"><span aria-hidden=\"true\">\u{2714}</span> green</span> \
         working — managed: <em>active</em>; passthrough: <em>alive</em>.</li>\n\
         <li>Certificate: amber within 14 days of expiry, red once expired or when \
         self-signed. Problems are listed first.</li>\n</ul>\n</section>\n",
    );
}

/// Whole seconds from `then` to `now`, 0 if `then` is in the future.
fn secs_since(now: SystemTime, then: SystemTime) -> u64 {
    now.duration_since(then).unwrap_or_default().as_secs()
}

/// `12 s`, `5 min`, `3 h 20 min`, `4 d 2 h`: short enough for a table cell.
fn push_duration(out: &mut String, secs: u64) {
    let (big, big_unit, small, small_unit) = match secs {
        0..60 => (secs, " s", None, ""),
        60..3600 => (secs / 60, " min", None, ""),
        3600..86_400 => (secs / 3600, " h ", Some(secs % 3600 / 60), " min"),
        _ => (secs / 86_400, " d ", Some(secs % 86_400 / 3600), " h"),
    };
    push_u64(out, big);
    out.push_str(big_unit);
    if let Some(n) = small {
        push_u64(out, n);
        out.push_str(small_unit);
    }
}

/// Decimal digits of `n`, without the formatting machinery (it dominates a big page's time).
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[i..]).unwrap_or_default());
}

/// `12 s ago`, or `never`.
fn push_ago(out: &mut String, secs: Option<u64>) {
    match secs {
        Some(s) => {
            push_duration(out, s);
            out.push_str(" ago");
        }
        None => out.push_str("never"),
    }
}

/// An RFC 3339 UTC timestamp in a `<time>` element.
fn push_time(out: &mut String, t: SystemTime) {
    let stamp = humantime::format_rfc3339_seconds(t);
    let _ = write!(out, "<time datetime=\"{stamp}\">{stamp}</time>");
}

/// Append `s` to `out` with the five HTML-significant characters replaced by entities, so it is
/// safe both as element text and inside a double- or single-quoted attribute.
pub fn escape_into(out: &mut String, s: &str) {
    // A byte scan: the five characters are ASCII, so they never occur inside a multi-byte
    // UTF-8 sequence and slicing at them stays on character boundaries.
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let entity = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'\'' => "&#39;",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        out.push_str(entity);
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

/// `s` escaped for HTML (see [`escape_into`]); borrowed when nothing needed escaping.
pub fn escape(s: &str) -> Cow<'_, str> {
    if s.contains(['&', '<', '>', '"', '\'']) {
        let mut out = String::with_capacity(s.len() + 16);
        escape_into(&mut out, s);
        Cow::Owned(out)
    } else {
        Cow::Borrowed(s)
    }
}

/// The `Content-Security-Policy` for the page: nothing may load, and only this module's own
/// `<style>` and `<script>` (by SHA-256) may apply or run, so even a value that escaped
/// [`escape_into`] could not execute; `connect-src 'self'` lets the script re-fetch the page.
pub fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        let hash =
            |s: &str| base64(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref());
        format!(
            "default-src 'none'; style-src 'sha256-{}'; script-src 'sha256-{}'; \
             connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            hash(STYLE),
            hash(SCRIPT)
        )
    })
}

/// Standard base64 with padding, for the CSP hashes (the crate has no base64 dependency).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> shift & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The page's style sheet: system fonts, a traffic-light palette that keeps contrast for text,
/// and rows marked by a coloured left border as well as by their state tag.
const STYLE: &str = r##"
:root{--red:#b3261e;--red-bg:#fde7e5;--amber:#8a5a00;--amber-bg:#fff3d6;--green:#1e6b2e;--green-bg:#e3f4e6;--line:#d7dbe0;--muted:#5b6570}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1b1f24;background:#f5f6f8}
header{background:#1b2733;color:#fff;padding:10px 20px}
header h1{margin:0;font-size:20px}
header p{margin:2px 0 0;color:#c9d3dd;font-size:13px}
header a{color:#9fd0ff}
main{padding:12px 20px 40px}
h2{font-size:16px;margin:0 0 8px}
code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
.alert{margin:0 0 10px;padding:10px 14px;border-radius:6px;border-left:6px solid}
.alert.red{background:var(--red-bg);border-color:var(--red);color:#5c0f0a}
.alert.amber{background:var(--amber-bg);border-color:#d99a00;color:#4a3000}
.summary{display:flex;flex-wrap:wrap;gap:10px;margin:4px 0 14px}
.card{background:#fff;border:1px solid var(--line);border-top:5px solid var(--muted);border-radius:6px;padding:8px 14px;min-width:120px;font-size:14px}
.card .n{font-size:26px;font-weight:700;margin-right:4px}
.card.red{border-top-color:var(--red);color:var(--red)}
.card.amber{border-top-color:#d99a00;color:var(--amber)}
.card.green{border-top-color:var(--green);color:var(--green)}
.card.zero{opacity:.55}
.panels{display:grid;grid-template-columns:repeat(auto-fit,minmax(380px,1fr));gap:12px;margin-bottom:16px}
.panel{background:#fff;border:1px solid var(--line);border-radius:6px;padding:12px 14px}
.loud-panel{border:2px solid var(--red);background:var(--red-bg)}
.loud{color:#fff;background:var(--red);padding:0 6px;border-radius:3px;letter-spacing:.04em}
.big{font-size:22px;font-weight:700}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:0}
dt{font-weight:600;color:var(--muted)}
dd{margin:0;min-width:0}
.wrap,.id{overflow-wrap:anywhere;word-break:break-all}
.tag{display:inline-block;padding:0 7px;border-radius:10px;font-size:12px;font-weight:700;white-space:nowrap}
.tag.red{background:var(--red);color:#fff}
.tag.amber{background:#f2b705;color:#2b1d00}
.tag.green{background:var(--green);color:#fff}
.filter{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:0 0 8px}
.filter input{width:280px;padding:5px 8px;font:inherit;border:1px solid #aab2bb;border-radius:4px}
.filter select{padding:4px;font:inherit}
#shown{color:var(--muted)}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid var(--line)}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eceef1;vertical-align:top}
thead th{background:#eef1f4;position:sticky;top:0}
table.small{font-size:13px;margin-top:6px}
caption{text-align:left;font-weight:600;padding:4px 0;color:var(--muted)}
tr.red td:first-child{border-left:5px solid var(--red)}
tr.amber td:first-child{border-left:5px solid #f2b705}
tr.green td:first-child{border-left:5px solid var(--green)}
tr.red{background:#fff8f7}
td.st{white-space:nowrap}
td.id{max-width:360px;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
td.num{text-align:right}
.empty{background:#fff;border:1px dashed var(--line);padding:14px;border-radius:6px}
.legend{margin-top:18px;color:var(--muted)}
.legend ul{margin:0;padding-left:18px}
.legend li{margin:3px 0}
html[data-stale] header{background:#7a1d16}
html[data-stale] header h1::after{content:" \2014  not updating: the relay does not answer";font-size:14px;font-weight:400}
"##;

/// The page's script: shows the filter box, filters rows by text and colour (also from and into
/// `#q=…&h=…` in the address, so a filtered view can be linked), and every [`REFRESH_SECS`]
/// seconds re-fetches the page and swaps in its live parts, skipping hidden tabs.
const SCRIPT: &str = r##"
(function(){
"use strict";
var q=document.getElementById("q"),h=document.getElementById("h"),shown=document.getElementById("shown");
var rows=[],texts=[],timer=0;
function index(){
  var t=document.getElementById("rows");
  rows=t?Array.prototype.slice.call(t.tBodies[0].rows):[];
  texts=rows.map(function(r){return r.textContent.toLowerCase();});
}
function apply(){
  var needle=q.value.trim().toLowerCase(),want=h.value,n=0;
  for(var i=0;i<rows.length;i++){
    var c=rows[i].className;
    var ok=(!want||c===want||(want==="problems"&&c!=="green"))&&(!needle||texts[i].indexOf(needle)>=0);
    if(rows[i].hidden===ok){rows[i].hidden=!ok;}
    if(ok){n++;}
  }
  shown.textContent=rows.length?("showing "+n+" of "+rows.length):"";
}
function remember(){
  var p=[];
  if(q.value){p.push("q="+encodeURIComponent(q.value));}
  if(h.value){p.push("h="+encodeURIComponent(h.value));}
  history.replaceState(null,"",p.length?"#"+p.join("&"):location.pathname+location.search);
}
function changed(){clearTimeout(timer);timer=setTimeout(function(){apply();remember();},120);}
location.hash.replace(/^#/,"").split("&").forEach(function(kv){
  var i=kv.indexOf("=");if(i<0){return;}
  var k=kv.slice(0,i),v=decodeURIComponent(kv.slice(i+1));
  if(k==="q"){q.value=v;}else if(k==="h"){h.value=v;}
});
q.addEventListener("input",changed);
h.addEventListener("change",changed);
document.getElementById("filter").hidden=false;
index();apply();
function refresh(){
  if(document.hidden){return;}
  fetch(location.pathname,{cache:"no-store",credentials:"same-origin"}).then(function(r){
    if(!r.ok){throw new Error("HTTP "+r.status);}
    return r.text();
  }).then(function(text){
    var doc=new DOMParser().parseFromString(text,"text/html");
    ["live-top","live-rows"].forEach(function(id){
      var fresh=doc.getElementById(id),old=document.getElementById(id);
      if(fresh&&old){old.replaceWith(document.importNode(fresh,true));}
    });
    document.title=doc.title;
    var root=document.documentElement;
    root.removeAttribute("data-stale");
    root.setAttribute("data-refreshes",String(+(root.getAttribute("data-refreshes")||0)+1));
    index();apply();
  }).catch(function(){document.documentElement.setAttribute("data-stale","");});
}
setInterval(refresh,(+document.documentElement.getAttribute("data-refresh")||10)*1000);
document.documentElement.setAttribute("data-js","on");
})();
"##;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const NOW_SECS: u64 = 1_750_000_000;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS)
    }

    fn page(mode: Mode, rows: Vec<Row>) -> StatusPage {
        StatusPage {
            mode,
            rows,
            spool_depth: (mode == Mode::Managed).then_some(0),
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
            receiver_reachable: true,
            receiver_since: Some(Duration::from_secs(3)),
            stale_after: (mode == Mode::Passthrough).then_some(Duration::from_secs(1800)),
            path_prefix: "/".into(),
            version: "0.0.0-test",
            uptime: Duration::from_secs(3 * 86_400 + 7200),
            now: now(),
            acme: None,
        }
    }

    fn row(health: Health, state: &'static str, name: &str) -> Row {
        Row {
            health,
            state,
            name: name.into(),
            subscription_id: None,
            peer: Some("40.92.1.2".parse().unwrap()),
            since_heartbeat: Some(42),
            since_event: None,
            events: Some(3),
            spool: None,
            last_error: None,
        }
    }

    fn view(mailbox: &str, state: &'static str) -> MailboxView {
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
        let mut r = row(Health::Red, "error", evil);
        r.last_error = Some(evil.into());
        r.since_heartbeat = None;
        let mut p = page(Mode::Passthrough, vec![r]);
        p.cert.subject = evil.into();
        p.cert.sha256 = evil.into();
        p.admitted = evil.into();
        p.receiver = evil.into();
        p.path_prefix = evil.into();
        p.receiver_reachable = false;
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
                ("error", "red")
            ]
        );
        for (state, want) in [
            ("active", Health::Green),
            ("subscribing", Health::Amber),
            ("backing-off", Health::Amber),
            ("lost", Health::Red),
            ("failed", Health::Red),
            ("something-new", Health::Amber),
        ] {
            assert_eq!(mailbox_health(state), want, "{state}");
        }
    }

    #[test]
    fn problems_come_first() {
        let mut rows = vec![
            row(Health::Green, "alive", "a"),
            row(Health::Amber, "stale", "b"),
            row(Health::Red, "error", "z"),
            row(Health::Green, "alive", "0"),
            row(Health::Red, "unsubscribed", "c"),
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
        let mut lost = view("lost@contoso.example", "lost");
        lost.last_error = Some("no keep-alive for 3 min".into());
        lost.spool_depth = 7;
        lost.seconds_since_event = Some(4000);
        let mut failed = view("failed@contoso.example", "failed");
        failed.last_error = Some("ErrorNonExistentMailbox".into());
        failed.subscription_id = None;
        failed.seconds_since_heartbeat = None;
        let mut active = view("active@contoso.example", "active");
        active.resync_pending = true;
        let mut rows: Vec<Row> = [
            active,
            view("backoff@contoso.example", "backing-off"),
            lost,
            view("new@contoso.example", "subscribing"),
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
            "<span class=\"n\">2</span> <span aria-hidden=\"true\">\u{2716}</span> red",
        ] {
            assert!(html.contains(want), "missing {want} in\n{html}");
        }
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
        p.rows = vec![row(Health::Green, "alive", "s")];
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
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
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
        let hash =
            |s: &str| base64(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref());
        let csp = content_security_policy();
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(csp.contains(&format!("style-src 'sha256-{}'", hash(&style))));
        assert!(csp.contains(&format!("script-src 'sha256-{}'", hash(&script))));
        assert!(!csp.contains("unsafe"), "{csp}");
    }

    #[test]
    fn five_thousand_rows_render_fast_and_small() {
        let states = [
            (Health::Green, "alive"),
            (Health::Amber, "stale"),
            (Health::Red, "error"),
            (Health::Red, "unsubscribed"),
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
