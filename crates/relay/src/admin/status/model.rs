//! The status page's view model: what the page says, gathered from the running relay at one
//! instant, in the domain's types. No HTML here: [`super::render`] turns it into the page.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use crate::admin::{AdminState, ReceiverCheck};
use crate::managed_graph::keeper::GraphView;
use crate::notify::tracker::{GraphSubscription, ReceiverAnswer, State, Subscription};
use crate::source::Source;
use crate::store::MailboxState;
use crate::subscriptions::manager::{state_label, MailboxView};

/// The certificate turns amber this long before it expires: two weeks leaves time to renew
/// through a change process, and matches what certificate monitors usually warn at.
pub const CERT_WARN_BEFORE: Duration = Duration::from_secs(14 * 86_400);
/// A denied connection this recent, with no notification arriving in the same window, raises
/// the "is Microsoft's traffic reaching us at all?" alert. Fifteen minutes covers several
/// keep-alive periods, so a working subscription would have been heard from.
pub const DENIED_ALERT_WINDOW: Duration = Duration::from_secs(15 * 60);

/// How a row, or a problem, looks: the page's traffic light.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    /// Something is broken: notifications will not flow until it changes. Sorted first.
    Red,
    /// Transitional, waiting or silent for a while: worth a look.
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
}

/// Passthrough mapping: alive is green, stale amber, unsubscribed and error red; replaced (the
/// relay retired it itself) green, as nothing is wrong. Graph: expiring (near expiry, no
/// renewal seen) amber, expired and removed red.
pub fn subscription_health(state: State) -> Health {
    match state {
        State::Alive | State::Replaced => Health::Green,
        State::Stale | State::Expiring => Health::Amber,
        State::Unsubscribed | State::Error | State::Expired | State::Removed => Health::Red,
    }
}

/// Managed Graph mapping, as for mailboxes: active green while nothing waits in its spool,
/// amber while something does; creating, expiring (the renewal is late) and backing-off amber;
/// failed red.
pub fn graph_resource_health(state: &str, spooled: u64) -> Health {
    match state {
        "active" if spooled == 0 => Health::Green,
        "failed" => Health::Red,
        _ => Health::Amber,
    }
}

/// Managed mapping: active is green while nothing waits in its spool, amber while something
/// does (the receiver has not got everything yet); subscribing and backing-off amber (the
/// relay is working on it); lost and failed red.
pub fn mailbox_health(state: MailboxState, spooled: u64) -> Health {
    match state {
        MailboxState::Active if spooled == 0 => Health::Green,
        MailboxState::Active | MailboxState::Subscribing | MailboxState::BackingOff => {
            Health::Amber
        }
        MailboxState::Lost | MailboxState::Failed => Health::Red,
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
    /// As the page says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Managed => "managed",
            Mode::Passthrough => "passthrough",
        }
    }

    /// What a row is, plural.
    pub fn rows_are(self) -> &'static str {
        match self {
            Mode::Managed => "mailboxes",
            Mode::Passthrough => "subscriptions",
        }
    }
}

/// A row's state in the domain's terms; told in words only when rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    /// A managed mailbox.
    Mailbox(MailboxState),
    /// A subscription seen in the traffic (EWS or Graph).
    Subscription(State),
    /// A managed Graph resource, in the keeper's words ([`GraphView::state`]).
    GraphResource(&'static str),
}

impl RowState {
    /// The word shown next to the colour (the API's word for it).
    pub fn as_str(self) -> &'static str {
        match self {
            RowState::Mailbox(s) => state_label(s),
            RowState::Subscription(s) => s.as_str(),
            RowState::GraphResource(s) => s,
        }
    }
}

/// One table row: a mailbox (managed) or a subscription (passthrough); for Graph, a
/// subscription seen in passthrough or a managed resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// EWS or Graph: which table it is in.
    pub source: Source,
    /// Its colour.
    pub health: Health,
    /// Its state, shown as text next to the colour.
    pub state: RowState,
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
    /// Graph: the resource (managed: as configured; passthrough: derived from the items'
    /// paths).
    pub resource: Option<String>,
    /// Graph: seconds until the subscription expires (negative once it has).
    pub expires_in: Option<i64>,
    /// Graph: the latest lifecycle event, and seconds since it when known.
    pub lifecycle: Option<(String, Option<u64>)>,
}

impl Row {
    /// A managed mailbox.
    pub fn from_mailbox(v: MailboxView) -> Row {
        let health = mailbox_health(v.state, v.spool_depth);
        let mut notes: Vec<String> = v.last_error.into_iter().collect();
        if v.resync_pending {
            notes.push("receiver asked to resynchronise (not yet acknowledged)".to_owned());
        }
        if v.state == MailboxState::Active && v.spool_depth > 0 && !v.resync_pending {
            // Why an active mailbox is amber.
            notes.push(format!(
                "{} waiting in the spool for the receiver",
                v.spool_depth
            ));
        }
        Row {
            source: Source::Ews,
            health,
            state: RowState::Mailbox(v.state),
            name: v.mailbox,
            subscription_id: v.subscription_id,
            peer: None,
            since_heartbeat: v.seconds_since_heartbeat,
            since_event: v.seconds_since_event,
            events: None,
            spool: Some(v.spool_depth),
            last_error: (!notes.is_empty()).then(|| notes.join("; ")),
            resource: None,
            expires_in: None,
            lifecycle: None,
        }
    }

    /// A managed Graph resource.
    pub fn from_graph_resource(v: GraphView) -> Row {
        let health = graph_resource_health(v.state, v.spool_depth);
        let mut notes: Vec<String> = v.last_error.into_iter().collect();
        if v.resync_pending {
            notes.push("receiver asked to resynchronise (not yet acknowledged)".to_owned());
        }
        if v.state == "expiring" {
            notes.push("the renewal is late".to_owned());
        }
        if v.state == "active" && v.spool_depth > 0 && !v.resync_pending {
            notes.push(format!(
                "{} waiting in the spool for the receiver",
                v.spool_depth
            ));
        }
        Row {
            source: Source::Graph,
            health,
            state: RowState::GraphResource(v.state),
            name: v.resource.clone(),
            subscription_id: v.subscription_id,
            peer: None,
            since_heartbeat: v.seconds_since_notification,
            since_event: None,
            events: None,
            spool: Some(v.spool_depth),
            last_error: (!notes.is_empty()).then(|| notes.join("; ")),
            resource: Some(v.resource),
            expires_in: v.seconds_to_expiry,
            lifecycle: v.last_lifecycle.map(|e| (e, None)),
        }
    }

    /// A Graph subscription seen in the traffic (passthrough).
    pub fn from_graph_subscription(
        id: String,
        s: &GraphSubscription,
        state: State,
        now: SystemTime,
    ) -> Row {
        let last_error = match (state, s.receiver_answer) {
            (State::Removed, _) => {
                Some("removed by Graph (subscriptionRemoved): create a new subscription".to_owned())
            }
            (State::Expired, _) => {
                Some("expired: no notification with a later expiration arrived".to_owned())
            }
            (_, Some(ReceiverAnswer::HttpError(code))) => {
                Some(format!("receiver answered HTTP {code}"))
            }
            (_, Some(ReceiverAnswer::Unreachable)) => Some("receiver unreachable".to_owned()),
            (State::Expiring, _) => Some("expires soon; no renewal seen".to_owned()),
            _ => None,
        };
        let expires_in = s.expiration.map(|e| match e.duration_since(now) {
            Ok(left) => left.as_secs() as i64,
            Err(past) => -(past.duration().as_secs() as i64),
        });
        Row {
            source: Source::Graph,
            health: subscription_health(state),
            state: RowState::Subscription(state),
            subscription_id: Some(id.clone()),
            name: id,
            peer: Some(s.peer),
            since_heartbeat: Some(secs_since(now, s.last_seen)),
            since_event: None,
            events: Some(s.changes.iter().sum()),
            spool: None,
            last_error,
            resource: s.resource.clone(),
            expires_in,
            lifecycle: s
                .last_lifecycle
                .as_ref()
                .map(|(e, t)| (e.clone(), Some(secs_since(now, *t)))),
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
            (_, Some(ReceiverAnswer::Relay(ews::SubscriptionStatus::Unsubscribe))) => {
                Some("replaced: the relay answered Unsubscribe".to_owned())
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
            source: Source::Ews,
            health: subscription_health(state),
            state: RowState::Subscription(state),
            name: id,
            subscription_id: None,
            peer: Some(s.peer),
            since_heartbeat: Some(secs_since(now, s.last_seen)),
            since_event: None,
            events: Some(events),
            spool: None,
            last_error,
            resource: None,
            expires_in: None,
            lifecycle: None,
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

impl StatusPage {
    /// The served certificate's health: while ACME waits for its first certificate, the
    /// self-signed placeholder is expected, so amber rather than red.
    pub fn cert_health(&self) -> Health {
        let health = self.cert.health(self.now);
        let waiting = matches!(self.acme, Some(crate::edge::acme::AcmeAlarm::Waiting(_)));
        if waiting && health == Health::Red && self.cert.not_after > self.now {
            Health::Amber
        } else {
            health
        }
    }
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

/// A piece of a problem's explanation: prose, or something to type or look for (an address, a
/// flag), shown as code. Escaped when rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fragment {
    /// Plain text.
    Text(String),
    /// A literal: a flag, an address.
    Code(String),
}

pub(super) fn text(s: impl Into<String>) -> Fragment {
    Fragment::Text(s.into())
}

pub(super) fn code(s: impl Into<String>) -> Fragment {
    Fragment::Code(s.into())
}

/// Something on the page that needs a person: shown as an alert at the top, and counted in the
/// summary with the rows of its colour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Red (notifications are not flowing, or will stop) or amber (act soon / waiting).
    pub severity: Health,
    /// The part of the relay it concerns, as the summary names it: `receiver`, `certificate`,
    /// `spool`, `source filter`.
    pub what: &'static str,
    /// The one-line statement, shown in bold: the relay's own words and numbers (escaped as
    /// element text only); anything from outside belongs in `detail`.
    pub headline: String,
    /// What it means and what to do.
    pub detail: Vec<Fragment>,
}

/// The red, amber and green counts of the summary, with what they are made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Red problems and red rows.
    pub red: usize,
    /// Amber problems and amber rows.
    pub amber: usize,
    /// Green rows (a problem is never green).
    pub green: usize,
    /// The parts with a red problem, in page order.
    pub red_parts: Vec<&'static str>,
    /// The parts with an amber problem, in page order.
    pub amber_parts: Vec<&'static str>,
    /// Red rows (EWS).
    pub red_rows: usize,
    /// Amber rows (EWS).
    pub amber_rows: usize,
    /// Red Graph rows.
    pub red_graph_rows: usize,
    /// Amber Graph rows.
    pub amber_graph_rows: usize,
}

/// Everything the page shows, gathered at one instant.
#[derive(Debug, Clone)]
pub struct StatusPage {
    /// Managed or passthrough.
    pub mode: Mode,
    /// The rows, in any order ([`StatusPage::render`] does not sort; [`StatusPage::collect`]
    /// does).
    pub rows: Vec<Row>,
    /// Microsoft Graph rows, shown in a table of their own next to the EWS one: managed Graph
    /// resources and Graph subscriptions seen in passthrough (same order rules as `rows`).
    pub graph_rows: Vec<Row>,
    /// `--graph-path-prefix`, when Graph notifications are routed at all.
    pub graph_path_prefix: Option<String>,
    /// `--transport streaming`: each group's connection, problems first (see
    /// [`super::streams`]); `None` otherwise.
    pub stream_groups: Option<Vec<crate::streaming::GroupView>>,
    /// Managed: notifications waiting in the spool, all mailboxes together.
    pub spool_depth: Option<u64>,
    /// Managed: why notifications are being refused (spool full, disk full, or a backlog over
    /// `--spool-max-age`), if they are.
    pub spool_alarm: Option<&'static str>,
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
    /// The receiver as readiness judges it (see [`crate::admin::check_receiver`]).
    pub receiver_check: ReceiverCheck,
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
    /// Read the running relay's state; `receiver_check` is the admin endpoint's readiness verdict
    /// on the receiver. Rows come out sorted, problems first.
    pub fn collect(state: &AdminState, receiver_check: ReceiverCheck) -> StatusPage {
        let now = SystemTime::now();
        let streaming = state.streams.as_deref().map(|s| s.views());
        let mailboxes = match (state.manager.as_deref(), &streaming) {
            (Some(m), _) => Some(m.views()),
            (None, Some(v)) => Some(v.mailboxes.clone()),
            (None, None) => None,
        };
        let (mode, mut rows, spool_depth, stale_after) = match mailboxes {
            Some(views) => (
                Mode::Managed,
                views.into_iter().map(Row::from_mailbox).collect(),
                state.delivery().map(|d| d.waiting()),
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
        let mut graph_rows: Vec<Row> = state
            .graph
            .as_deref()
            .map(|g| {
                g.views()
                    .into_iter()
                    .map(Row::from_graph_resource)
                    .collect()
            })
            .unwrap_or_default();
        graph_rows.extend(
            state
                .tracker
                .graph_snapshot()
                .into_iter()
                .map(|(id, s, st)| Row::from_graph_subscription(id, &s, st, now)),
        );
        sort_rows(&mut graph_rows);
        let info = state.certs.current().info.clone();
        StatusPage {
            mode,
            rows,
            graph_rows,
            graph_path_prefix: state.graph_path_prefix.clone(),
            stream_groups: streaming.map(|v| {
                let mut groups = v.streaming_groups;
                super::streams::sort_groups(&mut groups);
                groups
            }),
            spool_depth,
            spool_alarm: state.delivery().and_then(|d| d.health().alarm()),
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
            receiver_check,
            stale_after,
            path_prefix: state.path_prefix.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime: state.started.elapsed(),
            now,
            acme: state.certs.acme().and_then(|a| a.alarm()),
        }
    }

    /// Every problem on the page, in the order the alerts show them. This is the one list of
    /// alarms: a new one (spool full, disk full, ACME renewal failing) is one more `if` here,
    /// with the facts it needs on [`StatusPage`]; the alerts and the summary counts follow.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Some(alarm) = self.spool_alarm {
            out.push(Problem {
                severity: Health::Red,
                what: "spool",
                headline: "Notifications refused.".into(),
                detail: vec![text(alarm)],
            });
        }
        if self.denied_without_traffic() {
            let mut detail = vec![text(format!(
                "Connections were refused by the source filter in the last {} and no \
                 notification arrived in that time.",
                duration(DENIED_ALERT_WINDOW.as_secs())
            ))];
            if let Some((ip, t)) = self.denied_recent.last() {
                detail.push(text(" Newest denied: "));
                detail.push(code(ip.to_string()));
                detail.push(text(format!(
                    " {} ago.",
                    duration(secs_since(self.now, *t))
                )));
            }
            detail.extend([
                text(format!(
                    " If that is Exchange, its addresses are outside the admitted networks ({}): \
                     check ",
                    self.admitted
                )),
                code("--allow"),
                text(" / "),
                code("--allow-file"),
                text("."),
            ]);
            out.push(Problem {
                severity: Health::Red,
                what: "source filter",
                headline: "Is Microsoft's traffic reaching us?".into(),
                detail,
            });
        }
        if !self.receiver_check.ok {
            let r = &self.receiver_check.reachability;
            let (headline, mut detail) = match r.last_failure {
                Some((ago, failure)) => (
                    format!(
                        "The receiver failed {} ago: {failure}.",
                        duration(ago.as_secs())
                    ),
                    vec![text("At "), code(self.receiver.clone())],
                ),
                None => (
                    "The receiver is not accepting connections.".to_owned(),
                    vec![text("At "), code(self.receiver.clone())],
                ),
            };
            detail.push(text(match (self.mode, r.last_success) {
                (Mode::Managed, _) => {
                    "; notifications are spooled and replayed once it answers.".to_owned()
                }
                (Mode::Passthrough, Some(s)) => format!(
                    "; Exchange's notifications fail until it answers again. Last success {} ago.",
                    duration(s.as_secs())
                ),
                (Mode::Passthrough, None) => {
                    "; Exchange's notifications fail until it answers. It has not answered yet."
                        .to_owned()
                }
            }));
            out.push(Problem {
                severity: Health::Red,
                what: "receiver",
                headline,
                detail,
            });
        }
        if let Some(alarm) = &self.acme {
            use crate::edge::acme::AcmeAlarm;
            let (severity, headline) = match alarm {
                AcmeAlarm::Waiting(t) => (Health::Amber, t),
                AcmeAlarm::Failing(t) => (Health::Red, t),
            };
            out.push(Problem {
                severity,
                what: "certificate",
                headline: headline.clone(),
                detail: Vec::new(),
            });
        } else if self.cert.self_signed {
            out.push(Problem {
                severity: Health::Red,
                what: "certificate",
                headline: "SELF-SIGNED certificate.".into(),
                detail: vec![
                    text("Exchange Online will not call back to it: give "),
                    code("--tls-cert"),
                    text(" / "),
                    code("--tls-key"),
                    text(" from a public CA."),
                ],
            });
        }
        match self.cert.not_after.duration_since(self.now) {
            Err(_) => out.push(Problem {
                severity: Health::Red,
                what: "certificate",
                headline: "The certificate has EXPIRED.".into(),
                detail: vec![text("Exchange cannot call back until it is replaced.")],
            }),
            Ok(left) if left < CERT_WARN_BEFORE => out.push(Problem {
                severity: Health::Amber,
                what: "certificate",
                headline: format!("The certificate expires in {}.", duration(left.as_secs())),
                detail: vec![text("Renew it soon.")],
            }),
            Ok(_) => {}
        }
        out.extend(self.stream_problems());
        out.extend(self.graph_problems());
        if let Some(waiting @ 1..) = self.spool_depth {
            let why = if self.receiver_check.ok {
                "They are being replayed to the receiver, in order per mailbox."
            } else {
                "The receiver is failing: they are replayed once it answers."
            };
            out.push(Problem {
                severity: Health::Amber,
                what: "spool",
                headline: format!("{waiting} notifications wait in the spool."),
                detail: vec![text(why)],
            });
        }
        out
    }

    /// One problem per colour for the red and amber Graph rows: what they are, the first few
    /// by name, and what to do.
    fn graph_problems(&self) -> Vec<Problem> {
        /// Rows named in a problem; the table has them all.
        const NAMED: usize = 3;
        let mut out = Vec::new();
        for severity in [Health::Red, Health::Amber] {
            let rows: Vec<&Row> = self
                .graph_rows
                .iter()
                .filter(|r| r.health == severity)
                .collect();
            if rows.is_empty() {
                continue;
            }
            // "2 expired, 1 removed": the states in the order they first occur.
            let mut states: Vec<(&'static str, usize)> = Vec::new();
            for r in &rows {
                match states.iter_mut().find(|(s, _)| *s == r.state.as_str()) {
                    Some(e) => e.1 += 1,
                    None => states.push((r.state.as_str(), 1)),
                }
            }
            let states: Vec<String> = states.iter().map(|(s, n)| format!("{n} {s}")).collect();
            let noun = if rows.len() == 1 {
                "Graph subscription"
            } else {
                "Graph subscriptions"
            };
            let mut detail = Vec::new();
            detail.push(text(match severity {
                Health::Red => {
                    "Graph sends nothing more for an expired or removed subscription: the \
                     receiver (or, managed, the relay) must create a new one. "
                }
                _ => {
                    "Renew before it expires (PATCH /subscriptions/{id} with a later \
                     expirationDateTime); the relay sees a renewal in the next notification's \
                     subscriptionExpirationDateTime. "
                }
            }));
            for (i, r) in rows.iter().take(NAMED).enumerate() {
                if i > 0 {
                    detail.push(text(", "));
                }
                detail.push(code(r.name.clone()));
                let mut about = vec![r.state.as_str().to_owned()];
                if let Some(res) = r.resource.as_deref().filter(|res| *res != r.name) {
                    about.push(res.to_owned());
                }
                detail.push(text(format!(" ({})", about.join(", "))));
            }
            if rows.len() > NAMED {
                detail.push(text(format!(" and {} more", rows.len() - NAMED)));
            }
            detail.push(text("."));
            out.push(Problem {
                severity,
                what: "graph",
                headline: format!("{noun}: {}.", states.join(", ")),
                detail,
            });
        }
        out
    }

    /// The summary's counts: every problem and every row, by colour.
    pub fn counts(&self, problems: &[Problem]) -> Counts {
        let mut c = Counts::default();
        for p in problems {
            let (n, parts) = match p.severity {
                Health::Red => (&mut c.red, &mut c.red_parts),
                Health::Amber => (&mut c.amber, &mut c.amber_parts),
                Health::Green => continue,
            };
            *n += 1;
            if !parts.contains(&p.what) {
                parts.push(p.what);
            }
        }
        for r in &self.rows {
            match r.health {
                Health::Red => c.red_rows += 1,
                Health::Amber => c.amber_rows += 1,
                Health::Green => c.green += 1,
            }
        }
        for r in &self.graph_rows {
            match r.health {
                Health::Red => c.red_graph_rows += 1,
                Health::Amber => c.amber_graph_rows += 1,
                Health::Green => c.green += 1,
            }
        }
        c.red += c.red_rows + c.red_graph_rows;
        c.amber += c.amber_rows + c.amber_graph_rows;
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
            .chain(&self.graph_rows)
            .filter_map(|r| r.since_heartbeat)
            .any(|s| s < window);
        recent_denial && !heard
    }
}

/// Whole seconds from `then` to `now`, 0 if `then` is in the future.
pub fn secs_since(now: SystemTime, then: SystemTime) -> u64 {
    now.duration_since(then).unwrap_or_default().as_secs()
}

/// `12 s`, `5 min`, `3 h 20 min`, `4 d 2 h`, as a `String` (for problems; the rows use
/// [`super::render::push_duration`]).
pub fn duration(secs: u64) -> String {
    let mut s = String::new();
    super::render::push_duration(&mut s, secs);
    s
}
