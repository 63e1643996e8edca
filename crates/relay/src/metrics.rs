//! Prometheus metrics. Every labelled series the data path touches is resolved once at start-up,
//! so recording on the request path is an atomic add, never a map lookup or an allocation.
//!
//! Families that describe notifications or subscriptions carry a `source` label, `ews` or
//! `graph` ([`Source`]): `notification_events`, `receiver_answers`, `rejected_bodies`,
//! `subscriptions`, `deliveries` and `spool_refusals` (the last two tell the source from the
//! spool queue's key: Graph queues start with [`crate::store::GRAPH_QUEUE_PREFIX`]).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::source::Source;

type Labels = [(&'static str, &'static str); 1];
/// A label and `source`.
type SourceLabels = [(&'static str, &'static str); 2];

/// Why a connection was not served.
#[derive(Debug, Clone, Copy)]
pub enum DenyReason {
    /// Peer address outside the allow-list.
    Source,
    /// PROXY protocol expected but the peer is not a trusted proxy.
    UntrustedProxy,
    /// A trusted proxy sent no valid PROXY header.
    ProxyHeader,
    /// The client address from a trusted proxy's header is outside the allow-list (or absent).
    ClientIpHeader,
}

/// Which way a TLS handshake failed.
#[derive(Debug, Clone, Copy)]
pub enum HandshakeFailure {
    /// Not finished within `--handshake-timeout`.
    Timeout,
    /// Protocol error (old version, no shared cipher, garbage, reset).
    Error,
}

/// Which body budget turned a request away with 503.
#[derive(Debug, Clone, Copy)]
pub enum BodyBudgetScope {
    /// `--max-body-buffer`, shared by every connection.
    Process,
    /// An HTTP/2 connection's own share (its streams together).
    Connection,
}

/// What went wrong talking to the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// TCP connect refused or failed.
    Connect,
    /// Connect did not finish in time.
    ConnectTimeout,
    /// No complete answer within `--upstream-timeout`.
    Timeout,
    /// The connection broke or the answer was not valid HTTP.
    Protocol,
    /// The answer was larger than the relay buffers.
    ResponseTooLarge,
}

impl UpstreamErrorKind {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::ConnectTimeout => "connect_timeout",
            Self::Timeout => "timeout",
            Self::Protocol => "protocol",
            Self::ResponseTooLarge => "response_too_large",
        }
    }

    const ALL: [Self; 5] = [
        Self::Connect,
        Self::ConnectTimeout,
        Self::Timeout,
        Self::Protocol,
        Self::ResponseTooLarge,
    ];
}

/// The `answer` labels of `receiver_answers`, indexed by what [`Metrics::answer`] takes
/// (the notify layer's answer kinds, in their order; a test there holds the two together).
/// `relay_ok` and `relay_unsubscribe` are managed mode's answers given by the relay itself, so
/// they are not mistaken for the receiver's.
pub const ANSWER_LABELS: [&str; 7] = [
    "OK",
    "Unsubscribe",
    "unparsed",
    "http_error",
    "unreachable",
    "relay_ok",
    "relay_unsubscribe",
];

/// The `state` labels of `subscriptions`, in the order of [`Metrics::set_subscriptions`]'s
/// counts (the tracker's states; a test there holds the two together). `replaced`: managed
/// mode's subscriptions the relay retired itself, kept apart from `stale` so an alert on stale
/// does not fire after every normal resubscribe.
/// `expiring`, `expired` and `removed` are Graph's (see
/// [`crate::notify::tracker::GraphSubscription::state`]); `stale`, `unsubscribed` and
/// `replaced` are EWS's. Every state is published for both sources, so a series never
/// disappears.
pub const SUBSCRIPTION_STATES: [&str; 8] = [
    "alive",
    "stale",
    "unsubscribed",
    "error",
    "replaced",
    "expiring",
    "expired",
    "removed",
];

/// The `type` labels of `notification_events{source="graph"}`: Graph change types
/// (`created`, `updated`, `deleted`) and lifecycle events, with `other` for values Microsoft
/// adds later; see [`Metrics::graph_event`].
pub const GRAPH_EVENT_TYPES: [&str; 7] = [
    "created",
    "updated",
    "deleted",
    "reauthorizationRequired",
    "subscriptionRemoved",
    "missed",
    "other",
];

/// The source of a spool queue, from its key.
fn queue_source(queue: &str) -> Source {
    if queue.starts_with(crate::store::GRAPH_QUEUE_PREFIX) {
        Source::Graph
    } else {
        Source::Ews
    }
}

/// All metrics of the relay, with pre-resolved handles for the hot path.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connections that passed the source filter.
    pub accepted: Counter,
    denied_source: Counter,
    denied_untrusted_proxy: Counter,
    denied_proxy_header: Counter,
    denied_client_ip_header: Counter,
    handshake_timeout: Counter,
    handshake_error: Counter,
    /// Client connections currently open (after the filter).
    pub open_connections: Gauge,
    requests: [Counter; 5],
    upstream_errors: [Counter; 5],
    /// Requests retried on a fresh receiver connection after a pooled one failed.
    pub upstream_retries: Counter,
    /// Total request time, receipt of head to response head.
    pub request_duration: Histogram,
    /// EWS events forwarded, by EWS event type, in `EventType::ALL` order (`source="ews"`).
    pub events: [Counter; 8],
    /// Graph notifications forwarded (passthrough), in [`GRAPH_EVENT_TYPES`] order.
    graph_events: [Counter; GRAPH_EVENT_TYPES.len()],
    /// Receiver answers to notifications, by source and kind.
    answers: [[Counter; ANSWER_LABELS.len()]; Source::ALL.len()],
    /// POSTs refused with 400 because they were not notifications, by source.
    rejected_bodies: [Counter; Source::ALL.len()],
    /// Tracked subscriptions by source and state, in `tracker::State::ALL` order (set by the
    /// sweep).
    subscriptions: [[Gauge; SUBSCRIPTION_STATES.len()]; Source::ALL.len()],
    /// Managed mode: Subscribe calls by outcome.
    subscribes: Family<Labels, Counter>,
    /// Managed mode: resubscriptions by reason.
    resubscribes: Family<Labels, Counter>,
    /// Managed mode: deliveries to the receiver by outcome and source.
    deliveries: Family<SourceLabels, Counter>,
    /// Managed mode: mailboxes by state.
    mailboxes: Family<Labels, Gauge>,
    /// Managed mode: notifications waiting in the spool.
    spool_depth: Gauge,
    /// Managed mode: age of the oldest spooled notification, seconds.
    spool_oldest_age: Gauge,
    /// Managed mode: body bytes waiting in the spool.
    spool_bytes: Gauge,
    /// Managed mode: `--spool-max-bytes`, so an alert can use the ratio.
    spool_max_bytes: Gauge,
    /// Managed mode: 1 while notifications are refused for lack of room (spool or disk).
    spool_full: Gauge,
    /// Managed mode: 1 while spool writes fail because the disk is full.
    spool_disk_full: Gauge,
    /// Managed mode: mailboxes refusing because their backlog is older than --spool-max-age.
    spool_over_age: Gauge,
    /// Managed mode: notifications refused (answered 503), by reason and source.
    spool_refusals: Family<SourceLabels, Counter>,
    /// Seconds until the served certificate expires (negative once expired).
    cert_expiry: Gauge,
    /// Reloads of the certificate and the allow-list, by outcome.
    reloads: Family<[(&'static str, &'static str); 2], Counter>,
    /// Version of the refreshed exchange-online list (the service's numeric version).
    ranges_version: Gauge,
    /// Age of the refreshed exchange-online list.
    ranges_age: Gauge,
    /// Requests answered 503 because a body budget was spent, by budget.
    body_budget_refusals: [Counter; 2],
    /// Bytes of `--max-body-buffer` reserved by requests in flight.
    pub body_buffer_reserved: Gauge,
    /// ACME orders by kind (issue, renew) and outcome (ok, error).
    acme_orders: Family<[(&'static str, &'static str); 2], Counter>,
    /// TLS-ALPN-01 validation handshakes answered with a challenge certificate.
    acme_challenges: Counter,
    /// Managed Graph mode: Graph calls by operation and outcome.
    graph_calls: Family<[(&'static str, &'static str); 2], Counter>,
    /// Managed Graph mode: lifecycle events received, by event.
    graph_lifecycle: Family<Labels, Counter>,
    /// Managed Graph mode: POSTs refused with 403, by reason (`mismatch`, `unknown_subscription`).
    graph_refused: Family<Labels, Counter>,
    /// Managed Graph mode: notifications by what became of them.
    graph_notifications: Family<Labels, Counter>,
    /// Managed Graph mode: validation handshakes by outcome.
    graph_validations: Family<Labels, Counter>,
    /// Managed Graph mode: resources by state.
    graph_resources: Family<Labels, Gauge>,
    /// Streaming: `GetStreamingEvents` connections open now (two per group during an overlap).
    stream_connections: Gauge,
    /// Streaming: groups (one connection each when all is well).
    stream_groups: Gauge,
    /// Streaming: connections replaced, by reason (`renew`, `closed`, `broken`, `silence`, …).
    stream_reconnects: Family<Labels, Counter>,
    /// Streaming: seconds since the least recent keep-alive or event of any open group.
    stream_keepalive_age: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register everything.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ews_relay");
        let accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Client connections admitted by the source filter",
            accepted.clone(),
        );
        let denied = Family::<Labels, Counter>::default();
        registry.register(
            "connections_denied",
            "Client connections closed before TLS, by reason",
            denied.clone(),
        );
        let handshakes = Family::<Labels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes, by reason",
            handshakes.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections currently open",
            open_connections.clone(),
        );
        let requests_family = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by status class",
            requests_family.clone(),
        );
        let upstream_family = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed exchanges with the receiver, by kind",
            upstream_family.clone(),
        );
        let upstream_retries = Counter::default();
        registry.register(
            "upstream_retries",
            "Requests retried on a fresh receiver connection after a pooled one failed",
            upstream_retries.clone(),
        );
        // 0.5 ms .. ~16 s: forwarding is sub-millisecond, a slow receiver takes seconds.
        let request_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            request_duration.clone(),
        );
        let events_family = Family::<SourceLabels, Counter>::default();
        registry.register(
            "notification_events",
            "Notification events forwarded, by type and source (ews: EWS event types, StatusEvent = keep-alive; graph: changeType or lifecycle event)",
            events_family.clone(),
        );
        let events = ews::EventType::ALL
            .map(|t| events_family.get_or_create_owned(&[("type", t.as_str()), ("source", "ews")]));
        let graph_events = GRAPH_EVENT_TYPES
            .map(|t| events_family.get_or_create_owned(&[("type", t), ("source", "graph")]));
        let answers_family = Family::<SourceLabels, Counter>::default();
        registry.register(
            "receiver_answers",
            "The receiver's answers to notifications, by kind and source",
            answers_family.clone(),
        );
        let answers = Source::ALL.map(|source| {
            ANSWER_LABELS.map(|a| {
                answers_family.get_or_create_owned(&[("answer", a), ("source", source.as_str())])
            })
        });
        let rejected_family = Family::<Labels, Counter>::default();
        registry.register(
            "rejected_bodies",
            "POSTs answered 400 because the body was not a notification (ews: not a SendNotification; graph: not a change notification collection), by source",
            rejected_family.clone(),
        );
        let rejected_bodies =
            Source::ALL.map(|s| rejected_family.get_or_create_owned(&[("source", s.as_str())]));
        let subs_family = Family::<SourceLabels, Gauge>::default();
        registry.register(
            "subscriptions",
            "Subscriptions seen in the traffic, by state and source",
            subs_family.clone(),
        );
        let subscriptions = Source::ALL.map(|source| {
            SUBSCRIPTION_STATES.map(|s| {
                subs_family.get_or_create_owned(&[("state", s), ("source", source.as_str())])
            })
        });
        let subscribes = Family::<Labels, Counter>::default();
        registry.register(
            "subscribes",
            "Managed mode: Subscribe calls by outcome",
            subscribes.clone(),
        );
        let resubscribes = Family::<Labels, Counter>::default();
        registry.register(
            "resubscribes",
            "Managed mode: resubscriptions by reason",
            resubscribes.clone(),
        );
        let deliveries = Family::<SourceLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Managed mode: deliveries to the receiver by outcome (delivered, spooled, replayed, failed, resync) and source",
            deliveries.clone(),
        );
        let mailboxes = Family::<Labels, Gauge>::default();
        registry.register(
            "mailboxes",
            "Managed mode: mailboxes by state",
            mailboxes.clone(),
        );
        let spool_depth = Gauge::default();
        registry.register(
            "spool_depth",
            "Managed mode: notifications waiting in the spool",
            spool_depth.clone(),
        );
        let spool_oldest_age = Gauge::default();
        registry.register(
            "spool_oldest_age_seconds",
            "Managed mode: age of the oldest spooled notification",
            spool_oldest_age.clone(),
        );
        let spool_bytes = Gauge::default();
        registry.register(
            "spool_bytes",
            "Managed mode: body bytes of the notifications waiting in the spool",
            spool_bytes.clone(),
        );
        let spool_max_bytes = Gauge::default();
        registry.register(
            "spool_max_bytes",
            "Managed mode: --spool-max-bytes",
            spool_max_bytes.clone(),
        );
        let spool_full = Gauge::default();
        registry.register(
            "spool_full",
            "Managed mode: 1 while notifications are refused because the spool (--spool-max-bytes) or the disk is full",
            spool_full.clone(),
        );
        let spool_disk_full = Gauge::default();
        registry.register(
            "spool_disk_full",
            "Managed mode: 1 while spool writes fail because the disk is full (ENOSPC)",
            spool_disk_full.clone(),
        );
        let spool_over_age = Gauge::default();
        registry.register(
            "spool_over_age_mailboxes",
            "Managed mode: mailboxes whose notifications are refused because their spooled backlog is older than --spool-max-age",
            spool_over_age.clone(),
        );
        let spool_refusals = Family::<SourceLabels, Counter>::default();
        registry.register(
            "spool_refusals",
            "Managed mode: notifications refused with 503 (Microsoft retries them), by reason (spool_full, disk_full, max_age, store_error) and source",
            spool_refusals.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "cert_expiry_seconds",
            "Seconds until the served TLS certificate expires",
            cert_expiry.clone(),
        );
        let reloads = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "reloads",
            "Reloads of the certificate and the allow-list, by outcome",
            reloads.clone(),
        );
        let ranges_version = Gauge::default();
        registry.register(
            "ranges_version",
            "Version of the exchange-online list from the endpoint service (0: built-in snapshot)",
            ranges_version.clone(),
        );
        let ranges_age = Gauge::default();
        registry.register(
            "ranges_age_seconds",
            "Age of the exchange-online list from the endpoint service",
            ranges_age.clone(),
        );
        let budget_family = Family::<Labels, Counter>::default();
        registry.register(
            "body_budget_refusals",
            "Requests answered 503 because the bodies in flight filled a budget (process: --max-body-buffer; connection: one HTTP/2 connection's share)",
            budget_family.clone(),
        );
        let body_budget_refusals =
            ["process", "connection"].map(|b| budget_family.get_or_create_owned(&[("budget", b)]));
        let body_buffer_reserved = Gauge::default();
        registry.register(
            "body_buffer_reserved_bytes",
            "Bytes of --max-body-buffer reserved by requests in flight (declared length, or --max-body when undeclared)",
            body_buffer_reserved.clone(),
        );
        let acme_orders = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "acme_orders",
            "ACME certificate orders by kind (issue, renew) and outcome (ok, error)",
            acme_orders.clone(),
        );
        let acme_challenges = Counter::default();
        registry.register(
            "acme_challenges",
            "TLS-ALPN-01 validation handshakes answered with a challenge certificate",
            acme_challenges.clone(),
        );
        let graph_calls = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "graph_calls",
            "Managed Graph mode: Graph subscription calls, by operation (create, renew, reauthorize, delete) and outcome",
            graph_calls.clone(),
        );
        let graph_lifecycle = Family::<Labels, Counter>::default();
        registry.register(
            "graph_lifecycle_events",
            "Managed Graph mode: lifecycle notifications received, by event",
            graph_lifecycle.clone(),
        );
        let graph_refused = Family::<Labels, Counter>::default();
        registry.register(
            "graph_refused",
            "Managed Graph mode: notification POSTs refused with 403, by reason (mismatch: wrong clientState; unknown_subscription)",
            graph_refused.clone(),
        );
        let graph_notifications = Family::<Labels, Counter>::default();
        registry.register(
            "graph_notifications",
            "Managed Graph mode: change notifications, by outcome (accepted: delivered or spooled; retired: for a replaced subscription, acknowledged only)",
            graph_notifications.clone(),
        );
        let graph_validations = Family::<Labels, Counter>::default();
        registry.register(
            "graph_validations",
            "Graph validation handshakes, by outcome (answered by the relay, refused, forwarded to the receiver)",
            graph_validations.clone(),
        );
        let graph_resources = Family::<Labels, Gauge>::default();
        registry.register(
            "graph_resources",
            "Managed Graph mode: configured resources, by state",
            graph_resources.clone(),
        );
        let stream_connections = Gauge::default();
        registry.register(
            "stream_connections",
            "Streaming: GetStreamingEvents connections open",
            stream_connections.clone(),
        );
        let stream_groups = Gauge::default();
        registry.register(
            "stream_groups",
            "Streaming: groups of mailboxes sharing one connection",
            stream_groups.clone(),
        );
        let stream_reconnects = Family::<Labels, Counter>::default();
        registry.register(
            "stream_reconnects",
            "Streaming: connections replaced, by reason",
            stream_reconnects.clone(),
        );
        let stream_keepalive_age = Gauge::default();
        registry.register(
            "stream_keepalive_age_seconds",
            "Streaming: seconds since the least recent keep-alive or event of an open group",
            stream_keepalive_age.clone(),
        );
        let class = |c: &'static str| requests_family.get_or_create_owned(&[("class", c)]);
        let requests = [
            class("1xx"),
            class("2xx"),
            class("3xx"),
            class("4xx"),
            class("5xx"),
        ];
        let upstream_errors = UpstreamErrorKind::ALL
            .map(|k| upstream_family.get_or_create_owned(&[("kind", k.as_str())]));
        Self {
            registry,
            accepted,
            denied_source: denied.get_or_create_owned(&[("reason", "source")]),
            denied_untrusted_proxy: denied.get_or_create_owned(&[("reason", "untrusted_proxy")]),
            denied_proxy_header: denied.get_or_create_owned(&[("reason", "proxy_header")]),
            denied_client_ip_header: denied.get_or_create_owned(&[("reason", "client_ip_header")]),
            handshake_timeout: handshakes.get_or_create_owned(&[("reason", "timeout")]),
            handshake_error: handshakes.get_or_create_owned(&[("reason", "error")]),
            open_connections,
            requests,
            upstream_errors,
            upstream_retries,
            request_duration,
            events,
            graph_events,
            answers,
            rejected_bodies,
            subscriptions,
            subscribes,
            resubscribes,
            deliveries,
            mailboxes,
            spool_depth,
            spool_oldest_age,
            spool_bytes,
            spool_max_bytes,
            spool_full,
            spool_disk_full,
            spool_over_age,
            spool_refusals,
            cert_expiry,
            reloads,
            ranges_version,
            ranges_age,
            body_budget_refusals,
            body_buffer_reserved,
            acme_orders,
            acme_challenges,
            graph_calls,
            graph_lifecycle,
            graph_refused,
            graph_notifications,
            graph_validations,
            graph_resources,
            stream_connections,
            stream_groups,
            stream_reconnects,
            stream_keepalive_age,
        }
    }

    /// Count an ACME order of `kind` (issue, renew).
    pub fn acme_order(&self, kind: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.acme_orders
            .get_or_create(&[("kind", kind), ("outcome", outcome)])
            .inc();
    }

    /// Count a validation handshake answered.
    pub fn acme_challenge(&self) {
        self.acme_challenges.inc();
    }

    /// Publish the refreshed list's version and age.
    pub fn set_ranges(&self, version: &str, age: std::time::Duration) {
        self.ranges_version.set(version.parse().unwrap_or(0));
        self.ranges_age.set(age.as_secs() as i64);
    }

    /// Publish the served certificate's expiry.
    pub fn set_cert_expiry(&self, not_after: std::time::SystemTime) {
        let secs = match not_after.duration_since(std::time::SystemTime::now()) {
            Ok(left) => left.as_secs() as i64,
            Err(past) => -(past.duration().as_secs() as i64),
        };
        self.cert_expiry.set(secs);
    }

    /// Count a reload of `what` (certificate, allow_list).
    pub fn reload(&self, what: &'static str, ok: bool) {
        let outcome = if ok { "applied" } else { "refused" };
        self.reloads
            .get_or_create(&[("what", what), ("outcome", outcome)])
            .inc();
    }

    /// Count a Graph subscription call's outcome.
    pub fn graph_call(&self, op: &'static str, outcome: &'static str) {
        self.graph_calls
            .get_or_create(&[("op", op), ("outcome", outcome)])
            .inc();
    }

    /// Count a Graph lifecycle event.
    pub fn graph_lifecycle(&self, event: &str) {
        let event = match event {
            "reauthorizationRequired" => "reauthorizationRequired",
            "subscriptionRemoved" => "subscriptionRemoved",
            "missed" => "missed",
            // Bounded label values, whatever Graph invents.
            _ => "other",
        };
        self.graph_lifecycle
            .get_or_create(&[("event", event)])
            .inc();
    }

    /// Count a Graph POST refused with 403.
    pub fn graph_refused(&self, reason: &'static str) {
        self.graph_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Count a Graph change notification's outcome.
    pub fn graph_notification(&self, outcome: &'static str) {
        self.graph_notifications
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// Count a Graph validation handshake's outcome.
    pub fn graph_validation(&self, outcome: &'static str) {
        self.graph_validations
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// Publish Graph resource counts by state.
    pub fn set_graph_resources(&self, counts: &[(&'static str, i64)]) {
        for (state, n) in counts {
            self.graph_resources
                .get_or_create(&[("state", *state)])
                .set(*n);
        }
    }

    /// Count a Subscribe call's outcome.
    pub fn subscribe(&self, outcome: &'static str) {
        self.subscribes.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Count a resubscription and why it happened.
    pub fn resubscribe(&self, reason: &'static str) {
        self.resubscribes.get_or_create(&[("reason", reason)]).inc();
    }

    /// Count a delivery outcome for spool queue `queue` (a mailbox, or a Graph queue).
    pub fn delivery(&self, queue: &str, outcome: &'static str) {
        let source = queue_source(queue).as_str();
        self.deliveries
            .get_or_create(&[("outcome", outcome), ("source", source)])
            .inc();
    }

    /// Publish mailbox counts by state.
    pub fn set_mailboxes(&self, counts: &[(&'static str, i64)]) {
        for (state, n) in counts {
            self.mailboxes.get_or_create(&[("state", *state)]).set(*n);
        }
    }

    /// Publish the spool's depth and the age of its oldest entry.
    pub fn set_spool(&self, depth: u64, oldest: Option<std::time::Duration>) {
        self.spool_depth.set(depth as i64);
        self.spool_oldest_age
            .set(oldest.map_or(0, |d| d.as_secs() as i64));
    }

    /// Publish `--spool-max-bytes`.
    pub fn set_spool_limits(&self, max_bytes: u64) {
        self.spool_max_bytes
            .set(i64::try_from(max_bytes).unwrap_or(i64::MAX));
    }

    /// Publish the body bytes waiting in the spool.
    pub fn set_spool_bytes(&self, bytes: u64) {
        self.spool_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Publish whether notifications are refused for lack of room, and whether the disk is
    /// the reason.
    pub fn set_spool_full(&self, full: bool, disk_full: bool) {
        self.spool_full.set(i64::from(full));
        self.spool_disk_full.set(i64::from(disk_full));
    }

    /// Publish how many mailboxes refuse because their backlog is over the max age.
    pub fn set_spool_over_age(&self, mailboxes: usize) {
        self.spool_over_age.set(mailboxes as i64);
    }

    /// Count a notification for spool queue `queue` refused, by reason (a
    /// [`crate::spool::NotAccepted::label`]).
    pub fn spool_refusal(&self, queue: &str, reason: &'static str) {
        let source = queue_source(queue).as_str();
        self.spool_refusals
            .get_or_create(&[("reason", reason), ("source", source)])
            .inc();
    }

    /// Count a receiver answer to a notification of `source`, by its index in
    /// [`ANSWER_LABELS`].
    pub fn answer(&self, source: Source, label: usize) {
        self.answers[source as usize][label].inc();
    }

    /// Count a POST of `source` refused with 400 because its body was not a notification.
    pub fn rejected_body(&self, source: Source) {
        self.rejected_bodies[source as usize].inc();
    }

    /// Count a Graph notification forwarded (passthrough), by its index in
    /// [`GRAPH_EVENT_TYPES`].
    pub fn graph_event(&self, index: usize) {
        self.graph_events[index].inc();
    }

    /// Publish the sweep's counts, by source and state
    /// ([`crate::notify::tracker::StateCounts`]).
    pub fn set_subscriptions(
        &self,
        counts: [[usize; SUBSCRIPTION_STATES.len()]; Source::ALL.len()],
    ) {
        for (gauges, counts) in self.subscriptions.iter().zip(counts) {
            for (g, n) in gauges.iter().zip(counts) {
                g.set(n as i64);
            }
        }
    }

    /// Count a denied connection.
    pub fn denied(&self, reason: DenyReason) {
        match reason {
            DenyReason::Source => self.denied_source.inc(),
            DenyReason::UntrustedProxy => self.denied_untrusted_proxy.inc(),
            DenyReason::ProxyHeader => self.denied_proxy_header.inc(),
            DenyReason::ClientIpHeader => self.denied_client_ip_header.inc(),
        };
    }

    /// Count a failed handshake.
    pub fn handshake_failed(&self, why: HandshakeFailure) {
        match why {
            HandshakeFailure::Timeout => self.handshake_timeout.inc(),
            HandshakeFailure::Error => self.handshake_error.inc(),
        };
    }

    /// Count an answered request by status class.
    pub fn request(&self, status: http::StatusCode) {
        let i = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.requests[i].inc();
    }

    /// Count a request turned away because a body budget was spent.
    pub fn body_budget_refused(&self, scope: BodyBudgetScope) {
        self.body_budget_refusals[scope as usize].inc();
    }

    /// Count a failed exchange with the receiver.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].inc();
    }

    /// Denied connections for the source reason (for the admin API).
    pub fn denied_source_total(&self) -> u64 {
        self.denied_source.get()
    }

    /// Streaming: a connection opened (`+1`) or ended (`-1`).
    pub fn stream_connection(&self, delta: i64) {
        self.stream_connections.inc_by(delta);
    }

    /// Streaming: count a connection replaced and why.
    pub fn stream_reconnect(&self, reason: &'static str) {
        self.stream_reconnects
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Streaming: publish the number of groups and the oldest keep-alive age.
    pub fn set_stream_groups(&self, groups: usize, oldest_keepalive: std::time::Duration) {
        self.stream_groups.set(groups as i64);
        self.stream_keepalive_age
            .set(oldest_keepalive.as_secs() as i64);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
