//! The status page's HTML: the page's skeleton, style and script are files of their own
//! (`admin/page/status.{html,css,js}`, included at build time); this fills the skeleton's
//! `{{slots}}` from a [`StatusPage`], escaping every dynamic value with [`escape_into`].
//!
//! The rows are the hot loop of a big page: written with plain pushes into one pre-sized
//! `String`, without the formatting machinery.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::SystemTime;

use super::model::{Counts, Fragment, Health, Mode, Problem, StatusPage};
use super::REFRESH_SECS;

/// The page's skeleton: static HTML with `{{slot}}`s (see [`Slot`]).
pub(super) const TEMPLATE: &str = include_str!("../page/status.html");
/// The page's style sheet, inlined into `<style>` (its hash is in the CSP).
pub(super) const STYLE: &str = include_str!("../page/status.css");
/// The page's script, inlined into `<script>` (its hash is in the CSP).
pub(super) const SCRIPT: &str = include_str!("../page/status.js");

/// Bytes reserved per row before rendering; a typical row is 250–400 bytes, so one allocation
/// usually suffices even for thousands of rows.
pub(super) const ROW_BYTES: usize = 420;
/// Bytes reserved for everything but the rows (head, style, script, facts).
pub(super) const PAGE_BYTES: usize = 16 * 1024;

/// A dynamic part of the skeleton.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Refresh,
    Title,
    Style,
    Script,
    Version,
    Uptime,
    Generated,
    Alerts,
    Summary,
    Facts,
    Denied,
    RowsHeading,
    Rows,
}

impl Slot {
    fn from_name(name: &str) -> Option<Slot> {
        Some(match name {
            "refresh" => Slot::Refresh,
            "title" => Slot::Title,
            "style" => Slot::Style,
            "script" => Slot::Script,
            "version" => Slot::Version,
            "uptime" => Slot::Uptime,
            "generated" => Slot::Generated,
            "alerts" => Slot::Alerts,
            "summary" => Slot::Summary,
            "facts" => Slot::Facts,
            "denied" => Slot::Denied,
            "rows_heading" => Slot::RowsHeading,
            "rows" => Slot::Rows,
            _ => return None,
        })
    }
}

/// A piece of the skeleton: static text, or a slot to fill.
#[derive(Debug, Clone, Copy)]
enum Piece {
    Text(&'static str),
    Slot(Slot),
}

/// [`TEMPLATE`] cut at its slots, once. An unknown slot name is a bug in the template, caught
/// by the tests on the first render.
fn pieces() -> &'static [Piece] {
    static PIECES: OnceLock<Vec<Piece>> = OnceLock::new();
    PIECES.get_or_init(|| {
        let mut out = Vec::new();
        let mut rest = TEMPLATE;
        while let Some(open) = rest.find("{{") {
            let close = open + rest[open..].find("}}").expect("unclosed {{ in status.html");
            let name = &rest[open + 2..close];
            let slot = Slot::from_name(name)
                .unwrap_or_else(|| panic!("unknown slot {{{{{name}}}}} in status.html"));
            out.push(Piece::Text(&rest[..open]));
            out.push(Piece::Slot(slot));
            rest = &rest[close + 2..];
        }
        out.push(Piece::Text(rest));
        out
    })
}

impl Health {
    /// The start of a table row of this colour, up to the state word.
    pub(super) fn row_open(self) -> &'static str {
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

impl StatusPage {
    /// The whole HTML document.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(
            PAGE_BYTES + (self.rows.len() + self.graph_rows.len()) * ROW_BYTES,
        );
        let problems = self.problems();
        let counts = self.counts(&problems);
        for piece in pieces() {
            let slot = match piece {
                Piece::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Piece::Slot(s) => *s,
            };
            match slot {
                Slot::Refresh => push_u64(&mut out, u64::from(REFRESH_SECS)),
                Slot::Title => {
                    let _ = write!(
                        out,
                        "ews-relay: {} red, {} amber, {} green",
                        counts.red, counts.amber, counts.green
                    );
                }
                Slot::Style => out.push_str(STYLE),
                Slot::Script => out.push_str(SCRIPT),
                Slot::Version => escape_into(&mut out, self.version),
                Slot::Uptime => push_duration(&mut out, self.uptime.as_secs()),
                Slot::Generated => push_time(&mut out, self.now),
                Slot::Alerts => render_alerts(&mut out, &problems),
                Slot::Summary => self.render_summary(&mut out, &counts),
                Slot::Facts => self.render_facts(&mut out),
                Slot::Denied => self.render_denied(&mut out),
                Slot::RowsHeading => out.push_str(match self.mode {
                    Mode::Managed => "Mailboxes",
                    Mode::Passthrough => "Subscriptions",
                }),
                Slot::Rows => {
                    self.render_rows(&mut out);
                    self.render_stream_groups(&mut out);
                    self.render_graph_rows(&mut out);
                }
            }
        }
        out
    }

    fn render_summary(&self, out: &mut String, c: &Counts) {
        out.push_str("<section class=\"summary\" aria-label=\"Summary\">\n");
        for (h, n, parts, rows) in [
            (Health::Red, c.red, &c.red_parts, c.red_rows),
            (Health::Amber, c.amber, &c.amber_parts, c.amber_rows),
            (Health::Green, c.green, &Vec::new(), c.green),
        ] {
            let dim = if n == 0 { " zero" } else { "" };
            let _ = write!(
                out,
                "<div class=\"card {c}{dim}\"><span class=\"n\">{n}</span> \
                 <span aria-hidden=\"true\">{s}</span> {c}",
                c = h.as_str(),
                s = h.symbol(),
            );
            // What the number is made of, so "1 red" next to all-green rows explains itself.
            let mut what: Vec<Cow<'_, str>> = parts.iter().map(|p| Cow::Borrowed(*p)).collect();
            if rows > 0 {
                let noun = match (self.mode, rows) {
                    (Mode::Managed, 1) => "mailbox",
                    (Mode::Passthrough, 1) => "subscription",
                    (m, _) => m.rows_are(),
                };
                what.push(Cow::Owned(format!("{rows} {noun}")));
            }
            let graph_rows = match h {
                Health::Red => c.red_graph_rows,
                Health::Amber => c.amber_graph_rows,
                Health::Green => 0,
            };
            if graph_rows > 0 {
                what.push(Cow::Owned(format!("{graph_rows} Graph")));
            }
            if !what.is_empty() && h != Health::Green {
                out.push_str(" <small>");
                out.push_str(&what.join(", "));
                out.push_str("</small>");
            }
            out.push_str("</div>\n");
        }
        let _ = writeln!(
            out,
            "<div class=\"card info\"><span class=\"n\">{}</span> {} · <strong>{}</strong> \
             mode</div>",
            self.rows.len(),
            self.mode.rows_are(),
            self.mode.as_str()
        );
        self.render_stream_card(out);
        if self.graph_section() {
            let _ = writeln!(
                out,
                "<div class=\"card info\"><span class=\"n\">{}</span> Graph</div>",
                self.graph_rows.len()
            );
        }
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
        let ch = self.cert_health();
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

        let check = &self.receiver_check;
        let rh = if check.ok { Health::Green } else { Health::Red };
        let _ = write!(
            out,
            "<dt>Receiver</dt><dd><span class=\"tag {c}\">{s} {c}</span> <code>",
            c = rh.as_str(),
            s = rh.symbol()
        );
        escape_into(out, &self.receiver);
        out.push_str("</code> ");
        let r = &check.reachability;
        match (check.ok, r.last_failure) {
            (true, _) => out.push_str("reachable"),
            (false, Some((ago, failure))) => {
                out.push_str("<strong>failed</strong> ");
                push_ago(out, Some(ago.as_secs()));
                let _ = write!(out, ": {failure}");
            }
            (false, None) => out.push_str("<strong>not accepting connections</strong>"),
        }
        out.push_str("; last success ");
        push_ago(out, r.last_success.map(|d| d.as_secs()));
        out.push_str("</dd>\n<dt>Admitted networks</dt><dd>");
        escape_into(out, &self.admitted);
        out.push_str("</dd>\n<dt>Path prefix</dt><dd><code>");
        escape_into(out, &self.path_prefix);
        out.push_str("</code></dd>\n");
        if let Some(p) = &self.graph_path_prefix {
            out.push_str("<dt>Graph path prefix</dt><dd><code>");
            escape_into(out, p);
            out.push_str("</code></dd>\n");
        }
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
            push_ago(out, Some(super::model::secs_since(self.now, t)));
            out.push_str(" <small>");
            push_time(out, t);
            let _ = writeln!(out, "</small></td><td>{n}</td></tr>");
        }
        out.push_str("</tbody>\n</table>\n</section>\n");
    }

    fn render_rows(&self, out: &mut String) {
        let name_col = match self.mode {
            Mode::Managed => "Mailbox",
            Mode::Passthrough => "Subscription",
        };
        if self.rows.is_empty() {
            out.push_str(match self.mode {
                Mode::Managed => "<p class=\"empty\">No mailboxes are configured.</p>\n",
                Mode::Passthrough => {
                    "<p class=\"empty\">No notification has passed yet: subscriptions appear \
                     here when Exchange first calls back.</p>\n"
                }
            });
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
        for r in &self.rows {
            out.push_str(r.health.row_open());
            out.push_str(r.state.as_str());
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
        out.push_str("</tbody>\n</table>\n");
    }
}

impl StatusPage {
    /// Whether the page has a Graph table: Graph is routed, or Graph rows exist.
    fn graph_section(&self) -> bool {
        self.graph_path_prefix.is_some() || !self.graph_rows.is_empty()
    }

    /// The Microsoft Graph table, after the EWS one (in the same live part, so it refreshes and
    /// filters with it).
    fn render_graph_rows(&self, out: &mut String) {
        if !self.graph_section() {
            return;
        }
        out.push_str("<h3 id=\"graph-h\">Microsoft Graph</h3>\n");
        if self.graph_rows.is_empty() {
            out.push_str(
                "<p class=\"empty\">No Graph notification has passed yet: Graph subscriptions \
                 appear here when Graph first calls back.</p>\n",
            );
            return;
        }
        out.push_str(
            "<table id=\"graph-rows\">\n<thead><tr><th scope=\"col\">State</th>\
             <th scope=\"col\">Subscription</th><th scope=\"col\">Resource</th>\
             <th scope=\"col\">Expires</th><th scope=\"col\">Last notification</th>\
             <th scope=\"col\">Lifecycle</th><th scope=\"col\">Spool</th>\
             <th scope=\"col\">Last error</th></tr></thead>\n<tbody>\n",
        );
        for r in &self.graph_rows {
            out.push_str(r.health.row_open());
            out.push_str(r.state.as_str());
            out.push_str("</td><td class=\"id\">");
            escape_into(out, r.subscription_id.as_deref().unwrap_or("—"));
            out.push_str("</td><td class=\"id\">");
            escape_into(out, r.resource.as_deref().unwrap_or("—"));
            out.push_str("</td><td>");
            match r.expires_in {
                Some(s) if s >= 0 => {
                    out.push_str("in ");
                    push_duration(out, s as u64);
                }
                Some(s) => {
                    out.push_str("<strong>expired</strong> ");
                    push_ago(out, Some(s.unsigned_abs()));
                }
                None => out.push('—'),
            }
            out.push_str("</td><td>");
            push_ago(out, r.since_heartbeat);
            out.push_str("</td><td>");
            match &r.lifecycle {
                Some((event, ago)) => {
                    escape_into(out, event);
                    if let Some(ago) = ago {
                        out.push(' ');
                        push_ago(out, Some(*ago));
                    }
                }
                None => out.push('—'),
            }
            out.push_str("</td><td class=\"num\">");
            match r.spool {
                Some(n) => push_u64(out, n),
                None => out.push('—'),
            }
            out.push_str("</td><td>");
            if let Some(e) = &r.last_error {
                escape_into(out, e);
            }
            out.push_str("</td></tr>\n");
        }
        out.push_str("</tbody>\n</table>\n");
    }
}

/// One alert per problem, in the order [`StatusPage::problems`] lists them.
fn render_alerts(out: &mut String, problems: &[Problem]) {
    for p in problems {
        let _ = write!(
            out,
            "<p class=\"alert {}\" role=\"alert\"><strong>",
            p.severity.as_str()
        );
        escape_text_into(out, &p.headline);
        out.push_str("</strong> ");
        for f in &p.detail {
            match f {
                Fragment::Text(t) => escape_into(out, t),
                Fragment::Code(c) => {
                    out.push_str("<code>");
                    escape_into(out, c);
                    out.push_str("</code>");
                }
            }
        }
        out.push_str("</p>\n");
    }
}

/// `12 s`, `5 min`, `3 h 20 min`, `4 d 2 h`: short enough for a table cell.
pub fn push_duration(out: &mut String, secs: u64) {
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
pub(super) fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// `12 s ago`, or `never`.
pub(super) fn push_ago(out: &mut String, secs: Option<u64>) {
    match secs {
        Some(s) => {
            push_duration(out, s);
            out.push_str(" ago");
        }
        None => out.push_str("never"),
    }
}

/// An RFC 3339 UTC timestamp in a `<time>` element.
pub(super) fn push_time(out: &mut String, t: SystemTime) {
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

/// Append `s` as element text: only `&`, `<` and `>` replaced, so a headline keeps its
/// apostrophes. Never for attribute values, nor for values from outside the relay (those go
/// through [`escape_into`]).
fn escape_text_into(out: &mut String, s: &str) {
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let entity = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
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
