//! A simulated Exchange for exercising the relay's subscription manager on one machine: EWS
//! push `Subscribe`, SOAP Autodiscover `GetUserSettings`, an OAuth 2.0 client-credentials token
//! endpoint, pushes (`SendNotification`) to the subscriptions' callback URLs with Exchange's
//! keep-alive and retry behaviour, and a control API (`/_sim/…`, and the same operations on
//! [`SimHandle`]) to create events, inspect state and inject faults.
//!
//! Start it with [`run`], or with [`SimHandle::new`] and [`SimHandle::serve`] to keep a handle
//! for tests. The protocol facts it follows are in `design/PROTOCOL.md`.
//!
//! # Endpoints (one listener, HTTP or HTTPS)
//!
//! | route | what |
//! |---|---|
//! | `POST /EWS/Exchange.asmx` | push and streaming `Subscribe`, `GetStreamingEvents`, `Unsubscribe` (other EWS operations: `ErrorSchemaValidation`) |
//! | `POST /autodiscover/autodiscover.svc` | SOAP `GetUserSettings` |
//! | `POST [/{tenant}]/oauth2/v2.0/token` | client-credentials tokens (with [`Auth::OAuth`]) |
//! | `GET /_sim/state` | [`Snapshot`]: mailboxes, subscriptions, faults, token and request counts |
//! | `GET /_sim/subscriptions`, `GET /_sim/mailboxes` | [`SubscriptionInfo`]s, [`MailboxInfo`]s |
//! | `GET /_sim/requests`, `DELETE /_sim/requests` | recorded requests ([`RecordedRequest`]), or forget them |
//! | `POST /_sim/mailboxes` | `{"smtp", "grouping"?, "redirect_address"?, "redirect_url"?}` |
//! | `POST /_sim/events` | `{"mailbox", "type": "NewMailEvent", "count"?: 1}` → `{"created", "watermarks"}` |
//! | `POST /_sim/faults/stop-keepalives` | `{"subscription_id"}`: it dies silently |
//! | `POST /_sim/faults/drop-all` | every live subscription dies silently → `{"dropped"}` |
//! | `POST /_sim/faults/server-busy` | `{"count"?: 1, "back_off_ms"?: 2500}`: next EWS calls get `ErrorServerBusy` |
//! | `POST /_sim/faults/unavailable` | `{"count"?: 1, "retry_after_secs"?}`: next EWS calls get HTTP 503 |
//! | `POST /_sim/faults/invalidate-watermarks` | `{"mailbox"}`: its watermarks become `ErrorInvalidWatermark` |
//! | `POST /_sim/faults/move-mailbox` | `{"mailbox"}`: `ErrorProxyRequestNotAllowed` until Autodiscover is asked |
//! | `POST /_sim/faults/error-notification` | `{"subscription_id"}`: an `ErrorReadEventsFailed` push, then it is gone |
//! | `POST /_sim/faults/delay` | `{"ms"}`: every EWS response waits this long (0 stops) |
//! | `POST /_sim/faults/revoke-tokens` | every token stops working → `{"revoked"}` |
//! | `POST /_sim/faults/clear` | disarm busy, 503, delay, refused and delayed streaming connections and Graph throttling |
//! | `GET /_sim/streaming/subscriptions` | [`StreamingSubscriptionInfo`]s, ended ones included |
//! | `GET /_sim/streaming/connections` | [`StreamingConnectionInfo`]s: ids, anchor, account, times, envelopes, errors, how it ended |
//! | `POST /_sim/faults/streaming/cut` | `{"connection"?}` (default: every open one): TCP dropped, no `Closed` → `{"cut"}` |
//! | `POST /_sim/faults/streaming/stall` | `{"connection"?}`: nothing more is sent, keep-alives included; the socket stays open → `{"stalled"}` |
//! | `POST /_sim/faults/streaming/expire` | `{"subscription_id"}`: gone; `ErrorSubscriptionNotFound` in its stream and after |
//! | `POST /_sim/faults/streaming/missed-events` | `{"subscription_id"}`: `ErrorMissedNotificationEvents` in its stream; waiting events lost |
//! | `POST /_sim/faults/streaming/refuse-connections` | `{"count"?: 1}`: next `GetStreamingEvents` get `ErrorExceededConnectionCount` |
//! | `POST /_sim/faults/streaming/cut-mid-envelope` | `{"connection"?}`: half of the next envelope (events or a keep-alive) is written, then TCP dropped; its events are lost → `{"cut"}` |
//! | `POST /_sim/faults/streaming/malformed-envelope` | `{"connection"?}`: one well-framed envelope that is not a `GetStreamingEventsResponse`, then streaming goes on → `{"armed"}` |
//! | `POST /_sim/faults/streaming/delay-head` | `{"count"?: 1, "ms"}`: next `GetStreamingEvents` answered only after `ms`; nothing routed meanwhile |
//! | `POST /_sim/faults/delete-mailbox` | `{"mailbox"}`: `ErrorNonExistentMailbox` for its Subscribe and for anything anchored on it, for good; Autodiscover still answers |
//!
//! # Streaming notifications
//!
//! A streaming `Subscribe` (`RequestServerVersion` Exchange2010_SP1 or later, impersonation and
//! `X-AnchorMailbox` as for push) answers a `SubscriptionId` without a watermark; with
//! `X-PreferServerAffinity: true` the group's first one sets `X-BackEndOverrideCookie`.
//! `GetStreamingEvents` (1–200 ids, `ConnectionTimeout` 1–30 minutes) answers 200 with a chunked
//! body of SOAP envelopes: events as they happen (one `Notification` per subscription, no
//! watermarks), a keep-alive every [`SimConfig::streaming_keepalive`], and `ConnectionStatus`
//! `Closed` after `ConnectionTimeout` minutes × the time factor (or
//! [`SimConfig::streaming_connection_timeout`]). Routing follows Microsoft's affinity article:
//! `X-PreferServerAffinity: true` with a valid `X-BackEndOverrideCookie` routes to the cookie's
//! mailbox server, else `X-AnchorMailbox` does; `X-AnchorMailbox` is required. Per id, inside
//! the stream: unknown, expired, or not on the server the request reached (no anchor, anchor or
//! cookie of another group, or no cookie when the subscription was made with affinity — the
//! last stricter than Exchange, which would route by the anchor) → `ErrorSubscriptionNotFound`,
//! as Microsoft says a request routed to the wrong mailbox server gets; moved mailbox →
//! `ErrorProxyRequestNotAllowed`. When no id can be served the answer is that one envelope.
//! Refused whole (a connection-level error, no `ErrorSubscriptionIds`): an `X-AnchorMailbox`
//! that has moved (`ErrorProxyRequestNotAllowed`, and the anchor's subscriptions end with it)
//! or was deleted (`ErrorNonExistentMailbox`), more than 200 ids (Microsoft documents the
//! limit, not the code; the simulator answers `ErrorInvalidArgument`), more open connections than
//! [`SimConfig::streaming_connection_limit`] for the account (the impersonated mailbox, else
//! the caller) → `ErrorExceededConnectionCount`. A newer connection for ids another serves takes
//! them; the older one writes `ErrorNewEventStreamConnectionOpened` for them (and `Closed`
//! when it has none left). Events wait in the mailbox's log while no connection is open; a
//! subscription no connection serves for [`SimConfig::streaming_subscription_lifetime`] (×
//! the time factor) expires. `Unsubscribe` ends a streaming subscription.
//!
//! # Microsoft Graph (change notifications)
//!
//! | route | what |
//! |---|---|
//! | `POST /v1.0/subscriptions` | create: checks as Graph, validates `notificationUrl` and `lifecycleNotificationUrl` (`?validationToken=`), 201 |
//! | `GET /v1.0/subscriptions` | the live subscriptions (`{"value": […]}`) |
//! | `GET`, `PATCH`, `DELETE /v1.0/subscriptions/{id}` | read; renew (`expirationDateTime`); delete (204). Gone or expired: 404 `ResourceNotFound` |
//! | `POST /v1.0/subscriptions/{id}/reauthorize` | answers a `reauthorizationRequired` (204) |
//! | `GET /_sim/graph/subscriptions` | [`GraphSubscriptionInfo`]s, removed and expired ones included |
//! | `GET /_sim/graph/deliveries`, `DELETE /_sim/graph/deliveries` | every exchange with a callback ([`GraphDelivery`]), or forget them |
//! | `POST /_sim/graph/changes` | `{"subscription_id"?, "resource"?, "change_type", "count"?: 1}` → `[{"subscription_id", "ids"}]` |
//! | `POST /_sim/graph/faults/remove` | `{"subscription_id", "silent"?: false}`: gone, with `subscriptionRemoved` unless silent |
//! | `POST /_sim/graph/faults/missed` | `{"subscription_id"}`: a `missed` lifecycle notification |
//! | `POST /_sim/graph/faults/reauthorization-required` | `{"subscription_id"}`: `reauthorizationRequired`; removed after the grace unless reauthorized or renewed |
//! | `POST /_sim/graph/faults/expire` | `{"subscription_id"}`: it expires now |
//! | `POST /_sim/graph/faults/wrong-client-state` | `{"subscription_id"}`: one change notification with a wrong `clientState` → `{"id"}` |
//! | `POST /_sim/graph/faults/throttle` | `{"count"?: 1, "retry_after_secs"?: 10, "status"?: 429}`: next Graph calls get 429 (or 503) with `Retry-After` |
//!
//! With [`Auth::OAuth`], Graph routes take only tokens asked for scope
//! `https://graph.microsoft.com/.default` (401 `InvalidAuthenticationToken` otherwise, as
//! Graph's audience check); with [`Auth::Basic`] they refuse everything, as Graph has no Basic.
//! Graph facts the simulator follows are in `design/GRAPH.md`.
//!
//! Control errors are JSON `{"error": "…"}` with 404 (unknown mailbox, subscription or route)
//! or 400 (bad body or value). The control API has no authentication: it is for loopback labs
//! and tests; do not expose it.
#![forbid(unsafe_code)]

pub mod graph;
mod graph_push;
pub mod graph_state;
mod http;
mod push;
pub mod soap;
pub mod state;
pub mod stream_soap;
pub mod streaming;
mod util;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use ews::EventType;
pub use graph_push::ValidationFailure;
pub use graph_state::{ChangeType, DeliveryKind, GraphDelivery, GraphFaults, RemovalReason};
pub use push::PushError;
use state::{millis, State};
pub use state::{
    EndReason, Faults, RecordedRequest, SubscriptionCounters, SubscriptionState,
    MAX_EVENTS_PER_CALL, MAX_EVENTS_PER_PUSH, MAX_SUBSCRIPTIONS_PER_MAILBOX,
};
pub use streaming::{ConnectionEnd, StreamingEnd};

/// Default period between StatusEvent keep-alives on an idle subscription. Exchange uses the
/// subscription's StatusFrequency in minutes; the simulator has its own so tests run fast.
pub const DEFAULT_STATUS_PERIOD: Duration = Duration::from_secs(60);

/// Default lifetime of issued access tokens: Entra ID's usual hour.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Default limit on one push, connect to answer: a stuck callback counts as a failed push
/// after this, and the retry schedule takes over.
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Shortest keep-alive period accepted: shorter would turn keep-alives into a busy loop.
pub const MIN_STATUS_PERIOD: Duration = Duration::from_millis(10);

/// How long in-flight requests and pushes get to finish after shutdown is asked.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Graph's longest lifetime for Outlook message, event and contact subscriptions: 7 days.
pub const DEFAULT_GRAPH_MAX_LIFETIME: Duration = Duration::from_secs(10_080 * 60);

/// How long Graph waits for a validation answer.
pub const DEFAULT_GRAPH_VALIDATION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long Graph waits for an answer to a notification POST before counting it failed.
pub const DEFAULT_GRAPH_NOTIFICATION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long Graph keeps retrying a failed notification POST before dropping it: 4 hours.
pub const DEFAULT_GRAPH_RETRY_BUDGET: Duration = Duration::from_secs(4 * 3600);

/// The first wait after a failed notification POST; later waits double. Graph does not
/// publish its schedule; a minute doubling reaches the 4-hour budget in 8 tries.
pub const DEFAULT_GRAPH_FIRST_RETRY: Duration = Duration::from_secs(60);

/// Items per notification POST by default. Graph batches without a published limit.
pub const DEFAULT_GRAPH_MAX_BATCH: usize = 100;

/// How long a `reauthorizationRequired` may go unanswered before the subscription is removed.
/// Graph does not publish it (it follows the token's lifetime); ten minutes keeps labs short.
pub const DEFAULT_GRAPH_REAUTHORIZATION_GRACE: Duration = Duration::from_secs(600);

/// Default period between keep-alive envelopes on an idle streaming connection. Microsoft does
/// not publish Exchange's; the EWS Managed API gives up on a connection silent for 45 s
/// (`GetStreamingEventsRequest.HeartbeatFrequencyDefault`), so Exchange's must be shorter, and
/// 30 s is what clients commonly observe (not verified against a Microsoft document).
pub const DEFAULT_STREAMING_KEEPALIVE: Duration = Duration::from_secs(30);

/// Default limit on open streaming connections per account: Exchange Online's
/// `HangingConnectionLimit` of 10, not configurable there (Exchange 2013 on-premises defaults
/// to 3). Sources: "Handling notification-related errors in EWS in Exchange" and "Maintain
/// affinity between a group of subscriptions and the Mailbox server in Exchange"
/// (learn.microsoft.com): the budget is the target mailbox's, so a connection impersonating a
/// mailbox counts against (a copy of) that mailbox's budget, one without impersonation against
/// the caller's.
pub const DEFAULT_STREAMING_CONNECTION_LIMIT: usize = 10;

/// Default time a streaming subscription survives with no connection serving it, before the
/// time factor. Microsoft documents only that subscriptions expire and that a connection lasts
/// at most 30 minutes; 30 minutes without a connection is the simulator's assumption (not
/// verified), after which `GetStreamingEvents` answers `ErrorSubscriptionNotFound` for it.
pub const DEFAULT_STREAMING_SUBSCRIPTION_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// The simulated Graph's behaviour.
#[derive(Debug, Clone)]
pub struct GraphConfig {
    /// Longest lifetime a create or renewal may ask; beyond is 400, as Graph refuses it.
    pub max_lifetime: Duration,
    /// Caps the lifetime granted (the `expirationDateTime` answered and really applied),
    /// whatever was asked: lets relay tests see renewals and expiry quickly.
    pub lifetime_cap: Option<Duration>,
    /// Limit on the validation handshake (real time, not scaled).
    pub validation_timeout: Duration,
    /// Limit on one notification POST (real time, not scaled).
    pub notification_timeout: Duration,
    /// Most items in one notification POST.
    pub max_batch: usize,
    /// First retry wait after a failed POST (scaled by the time factor), doubling after.
    pub first_retry: Duration,
    /// Retrying stops, and the items are dropped, after this (scaled by the time factor).
    pub retry_budget: Duration,
    /// Time to answer a `reauthorizationRequired` (real time, not scaled).
    pub reauthorization_grace: Duration,
    /// `tenantId` in notifications.
    pub tenant_id: String,
    /// `applicationId` and `creatorId` of subscriptions.
    pub application_id: String,
}

impl Default for GraphConfig {
    fn default() -> Self {
        Self {
            max_lifetime: DEFAULT_GRAPH_MAX_LIFETIME,
            lifetime_cap: None,
            validation_timeout: DEFAULT_GRAPH_VALIDATION_TIMEOUT,
            notification_timeout: DEFAULT_GRAPH_NOTIFICATION_TIMEOUT,
            max_batch: DEFAULT_GRAPH_MAX_BATCH,
            first_retry: DEFAULT_GRAPH_FIRST_RETRY,
            retry_budget: DEFAULT_GRAPH_RETRY_BUDGET,
            reauthorization_grace: DEFAULT_GRAPH_REAUTHORIZATION_GRACE,
            tenant_id: "5f2d1b3c-7a64-4c2e-9d0b-3e8a6f4c1a20".into(),
            application_id: "1c0e9a7d-2b48-4f5e-8c36-9d7a0b2e4f11".into(),
        }
    }
}

/// Which Graph subscriptions a simulated change is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphTarget {
    /// This one.
    Subscription(String),
    /// Every live one on this resource (compared case-insensitively, leading `/` ignored).
    Resource(String),
    /// Every live one.
    All,
}

/// How throttled Graph calls are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphThrottle {
    /// 429 Too Many Requests, Graph's throttling answer.
    TooManyRequests,
    /// 503 Service Unavailable, which Graph also sends with `Retry-After`.
    ServiceUnavailable,
}

/// Change notifications made for one subscription.
#[derive(Debug, Clone, Serialize)]
pub struct GraphChanges {
    /// The subscription.
    pub subscription_id: String,
    /// The `resourceData.id`s queued, in order (`evt-000001`, …; empty when the subscription
    /// did not ask for that change type).
    pub ids: Vec<String>,
}

/// One Graph subscription, as the control API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GraphSubscriptionInfo {
    /// The id.
    pub id: String,
    /// `resource`.
    pub resource: String,
    /// `changeType`, comma-separated.
    pub change_type: String,
    /// `notificationUrl`.
    pub notification_url: String,
    /// `lifecycleNotificationUrl`.
    pub lifecycle_url: Option<String>,
    /// `expirationDateTime`, as Graph formats it.
    pub expiration: String,
    /// `clientState`.
    pub client_state: Option<String>,
    /// Created (RFC 3339).
    pub created: String,
    /// Successful renewals (PATCH).
    pub renewed: u64,
    /// Successful reauthorize calls.
    pub reauthorized: u64,
    /// A `reauthorizationRequired` is unanswered.
    pub reauthorization_pending: bool,
    /// Gone for a reason other than expiry.
    pub removed: bool,
    /// Why, if removed.
    pub removal: Option<RemovalReason>,
    /// Past its expiration.
    pub expired: bool,
    /// Change items made.
    pub changes_made: u64,
    /// Items (change and lifecycle) acknowledged by a callback.
    pub delivered: u64,
    /// Items given up on.
    pub dropped: u64,
}

impl GraphSubscriptionInfo {
    /// Whether Graph still has it.
    pub fn is_live(&self) -> bool {
        !self.removed && !self.expired
    }
}

/// A configured Autodiscover redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxRedirect {
    /// `RedirectAddress`: Autodiscover tells the caller to ask for this address instead.
    Address(String),
    /// `RedirectUrl`: Autodiscover tells the caller to ask this URL.
    Url(String),
}

/// A mailbox the simulator hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxConfig {
    /// The SMTP address (compared case-insensitively).
    pub smtp: String,
    /// Autodiscover's `GroupingInformation`: mailboxes sharing it may share an affinity group.
    pub grouping: String,
    /// An Autodiscover redirect to answer instead of settings.
    pub redirect: Option<MailboxRedirect>,
}

impl MailboxConfig {
    /// A mailbox in the default group `SIMPR01`.
    pub fn new(smtp: impl Into<String>) -> Self {
        Self {
            smtp: smtp.into(),
            grouping: "SIMPR01".into(),
            redirect: None,
        }
    }

    /// The same mailbox in another group.
    pub fn grouping(mut self, grouping: impl Into<String>) -> Self {
        self.grouping = grouping.into();
        self
    }

    /// The same mailbox, redirected by Autodiscover.
    pub fn redirect(mut self, redirect: MailboxRedirect) -> Self {
        self.redirect = Some(redirect);
        self
    }
}

/// How EWS and Autodiscover requests must authenticate (and Graph's: with `OAuth`, a token
/// asked for Graph's scope; with `None`, nothing; with `Basic`, Graph refuses everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// No check (on-premises lab with anonymous access; not how Exchange is ever set up).
    None,
    /// `Authorization: Basic` with this user and password (on-premises Exchange).
    Basic {
        /// The service account.
        user: String,
        /// Its password.
        password: String,
    },
    /// `Authorization: Bearer` with a token from the simulator's token endpoint (Exchange
    /// Online app-only OAuth).
    OAuth {
        /// The application (client) id the token endpoint accepts.
        client_id: String,
        /// Its secret.
        client_secret: String,
        /// Lifetime of issued tokens.
        token_lifetime: Duration,
    },
}

/// Which certificates the simulator trusts when pushing to an HTTPS callback.
#[derive(Debug, Clone)]
pub enum CallbackTrust {
    /// These roots (a private CA, or the relay's self-signed certificate itself).
    Roots(Vec<CertificateDer<'static>>),
    /// Any certificate (`--callback-insecure`, lab use only).
    InsecureAcceptAny,
}

/// The simulator's configuration, validated by whoever builds it (the CLI or a test).
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The mailboxes it hosts.
    pub mailboxes: Vec<MailboxConfig>,
    /// Period between StatusEvent keep-alives on an idle subscription.
    pub status_period: Duration,
    /// How EWS and Autodiscover requests authenticate.
    pub auth: Auth,
    /// Trust for HTTPS callbacks.
    pub callback_trust: CallbackTrust,
    /// Multiplies Exchange's retry schedule (30 s doubling, within StatusFrequency minutes):
    /// 1.0 is Exchange's, 0.001 makes a StatusFrequency of 1 minute a 60 ms budget. Graph's
    /// notification retries ([`GraphConfig::first_retry`], [`GraphConfig::retry_budget`]) are
    /// scaled by it too.
    pub time_factor: f64,
    /// Serve HTTPS with this configuration; plain HTTP when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The base URL Autodiscover hands out (`{public_url}/EWS/Exchange.asmx`); derived from
    /// the listener's address when `None`.
    pub public_url: Option<String>,
    /// Limit on one push, connect to answer.
    pub push_timeout: Duration,
    /// The Microsoft Graph side.
    pub graph: GraphConfig,
    /// Period between keep-alive envelopes on a streaming connection with nothing else to say
    /// (real time, not scaled).
    pub streaming_keepalive: Duration,
    /// How long every streaming connection stays open, whatever `ConnectionTimeout` it asked
    /// (real time); `None`: its `ConnectionTimeout` minutes, scaled by the time factor.
    pub streaming_connection_timeout: Option<Duration>,
    /// Open streaming connections allowed per account (the impersonated mailbox, or else the
    /// authenticated caller); one more gets `ErrorExceededConnectionCount`.
    pub streaming_connection_limit: usize,
    /// How long a streaming subscription lives with no connection serving it, scaled by the
    /// time factor.
    pub streaming_subscription_lifetime: Duration,
}

impl SimConfig {
    /// The subscription lifetime after the time factor.
    pub(crate) fn streaming_subscription_lifetime_scaled(&self) -> Duration {
        self.streaming_subscription_lifetime
            .mul_f64(self.time_factor)
    }

    /// A plain-HTTP simulator hosting `mailboxes`, without authentication, trusting no HTTPS
    /// callback, on Exchange's time scale.
    pub fn new<S: Into<String>>(mailboxes: impl IntoIterator<Item = S>) -> Self {
        Self {
            mailboxes: mailboxes.into_iter().map(MailboxConfig::new).collect(),
            status_period: DEFAULT_STATUS_PERIOD,
            auth: Auth::None,
            callback_trust: CallbackTrust::Roots(Vec::new()),
            time_factor: 1.0,
            tls: None,
            public_url: None,
            push_timeout: DEFAULT_PUSH_TIMEOUT,
            graph: GraphConfig::default(),
            streaming_keepalive: DEFAULT_STREAMING_KEEPALIVE,
            streaming_connection_timeout: None,
            streaming_connection_limit: DEFAULT_STREAMING_CONNECTION_LIMIT,
            streaming_subscription_lifetime: DEFAULT_STREAMING_SUBSCRIPTION_LIFETIME,
        }
    }
}

/// Why the simulator could not start or a control operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The callback trust could not be turned into a TLS configuration.
    #[error("callback TLS: {0}")]
    CallbackTls(#[from] rustls::Error),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// No such mailbox.
    #[error("unknown mailbox {0}")]
    UnknownMailbox(String),
    /// No such subscription, or it has ended.
    #[error("no live subscription {0}")]
    UnknownSubscription(String),
    /// Not an event type that can be created.
    #[error("{0:?} is not an event type that can be created (CopiedEvent, CreatedEvent, DeletedEvent, ModifiedEvent, MovedEvent, NewMailEvent, FreeBusyChangedEvent)")]
    InvalidEventType(String),
    /// A configuration value the simulator cannot work with.
    #[error("configuration: {0}")]
    InvalidConfig(&'static str),
    /// Not a Graph change type.
    #[error("{0:?} is not a Graph change type (created, updated, deleted)")]
    InvalidChangeType(String),
    /// A count outside 1..=[`MAX_EVENTS_PER_CALL`].
    #[error("count must be 1..={MAX_EVENTS_PER_CALL}")]
    InvalidCount,
}

/// One subscription, as the control API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionInfo {
    /// The subscription id.
    pub id: String,
    /// The mailbox (as configured).
    pub mailbox: String,
    /// The callback URL.
    pub url: String,
    /// Event types pushed.
    pub event_types: Vec<&'static str>,
    /// StatusFrequency in minutes.
    pub status_frequency: u16,
    /// Where it stands.
    #[serde(flatten)]
    pub state: SubscriptionState,
    /// The last watermark delivered.
    pub previous_watermark: String,
    /// Created (RFC 3339).
    pub created: String,
    /// Last push answered well (RFC 3339).
    pub last_push_ok: Option<String>,
    /// Counters.
    pub counters: SubscriptionCounters,
}

impl SubscriptionInfo {
    /// Whether the subscription is still alive (active or retrying).
    pub fn is_live(&self) -> bool {
        !matches!(self.state, SubscriptionState::Ended(_))
    }
}

/// One mailbox, as the control API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MailboxInfo {
    /// The address as configured.
    pub smtp: String,
    /// `GroupingInformation`.
    pub grouping: String,
    /// Configured Autodiscover redirect (`address:…` or `url:…`).
    pub redirect: Option<String>,
    /// Events created so far.
    pub events_created: u64,
    /// The newest event's position in the log.
    pub head: u64,
    /// Live subscriptions, push and streaming.
    pub live_subscriptions: usize,
    /// Subscriptions created so far.
    pub subscriptions_created: u64,
    /// Answering `ErrorProxyRequestNotAllowed` until Autodiscover is asked for it.
    pub moved: bool,
    /// Deleted by the delete-mailbox fault.
    pub deleted: bool,
    /// Watermark generation (bumped by each invalidation).
    pub watermark_generation: u32,
}

/// One streaming subscription, as the control API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamingSubscriptionInfo {
    /// The subscription id.
    pub id: String,
    /// The mailbox (as configured).
    pub mailbox: String,
    /// The mailbox server (`GroupingInformation`) it lives on.
    pub grouping: String,
    /// The affinity cookie a `GetStreamingEvents` for it must carry, if it was created with
    /// affinity.
    pub cookie: Option<String>,
    /// Event types streamed.
    pub event_types: Vec<&'static str>,
    /// Created (RFC 3339).
    pub created: String,
    /// Not ended (it may still expire if no connection comes).
    pub live: bool,
    /// Why it ended.
    pub end: Option<StreamingEnd>,
    /// The open connection serving it.
    pub connection: Option<u64>,
    /// Events in its mailbox's log it has not been sent yet (all types).
    pub pending_events: u64,
    /// Events delivered.
    pub events_delivered: u64,
    /// Connections that served it.
    pub connections: u64,
}

/// An error message a streaming connection wrote.
#[derive(Debug, Clone, Serialize)]
pub struct StreamingErrorInfo {
    /// The response code.
    pub code: String,
    /// Its `ErrorSubscriptionIds`.
    pub subscription_ids: Vec<String>,
}

/// One `GetStreamingEvents` connection, as the control API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamingConnectionInfo {
    /// Arrival order, from 1.
    pub id: u64,
    /// The subscription ids asked for.
    pub subscription_ids: Vec<String>,
    /// The ids it serves now (none once ended).
    pub serving: Vec<String>,
    /// `X-AnchorMailbox` (lower-cased).
    pub anchor: Option<String>,
    /// The account its connection limit is charged to.
    pub account: String,
    /// Whether it carried the affinity cookie.
    pub carried_cookie: bool,
    /// Opened (RFC 3339).
    pub opened: String,
    /// Ended (RFC 3339).
    pub closed: Option<String>,
    /// How long it was to stay open, in milliseconds.
    pub timeout_ms: u64,
    /// Envelopes written (keep-alives and `Closed` included).
    pub envelopes: u64,
    /// Keep-alive envelopes written.
    pub keepalives: u64,
    /// Events written.
    pub events: u64,
    /// Error messages written, in order.
    pub errors: Vec<StreamingErrorInfo>,
    /// Still open.
    pub open: bool,
    /// How it ended.
    pub end: Option<ConnectionEnd>,
    /// The code it was refused with (`end` is `refused`).
    pub refused_code: Option<String>,
    /// Frozen by the stall fault.
    pub stalled: bool,
    /// Malformed envelopes written (the malformed-envelope fault).
    pub malformed: u64,
    /// Bytes of the unfinished envelope written before the mid-envelope cut, if it was cut so.
    pub cut_mid_envelope: Option<usize>,
}

/// Everything at once, for `GET /_sim/state`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// The mailboxes.
    pub mailboxes: Vec<MailboxInfo>,
    /// The subscriptions, ended ones included.
    pub subscriptions: Vec<SubscriptionInfo>,
    /// Armed faults.
    pub faults: Faults,
    /// Tokens issued so far.
    pub tokens_issued: u64,
    /// Tokens currently valid.
    pub tokens_valid: usize,
    /// Requests received so far.
    pub requests_received: u64,
    /// Graph subscriptions, removed and expired ones included.
    pub graph_subscriptions: Vec<GraphSubscriptionInfo>,
    /// Armed Graph faults.
    pub graph_faults: GraphFaults,
    /// Graph API requests (`/v1.0/…`) received so far.
    pub graph_requests: u64,
}

/// What the server side, the push tasks and the handle share.
pub(crate) struct Shared {
    config: SimConfig,
    state: Mutex<State>,
    /// Bumped on every state change, for [`SimHandle::wait_until`].
    version: watch::Sender<u64>,
    /// Set to `true` once to stop everything.
    shutdown: watch::Sender<bool>,
    /// The push tasks.
    tasks: Mutex<JoinSet<()>>,
    /// TLS configuration for HTTPS callbacks.
    client_tls: Arc<rustls::ClientConfig>,
    /// The base URL, known once the listener is.
    base_url: OnceLock<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_tasks(&self) -> MutexGuard<'_, JoinSet<()>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn base_url(&self) -> &str {
        self.base_url
            .get()
            .map_or("http://127.0.0.1", String::as_str)
    }
}

/// A running (or about to run) simulator: inspect and control it directly.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("base_url", &self.shared.base_url.get())
            .finish()
    }
}

/// Runs a simulator on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SimError> {
    SimHandle::new(config)?.serve(listener, shutdown).await
}

impl SimHandle {
    /// A simulator with `config`, not serving yet.
    pub fn new(config: SimConfig) -> Result<Self, SimError> {
        // Duration arithmetic panics on these; refuse them here, once.
        if !(config.time_factor.is_finite() && config.time_factor > 0.0) {
            return Err(SimError::InvalidConfig(
                "time_factor must be a positive number",
            ));
        }
        if config.graph.max_lifetime < graph::MIN_LIFETIME {
            return Err(SimError::InvalidConfig(
                "graph.max_lifetime must be at least 45 minutes",
            ));
        }
        if config.graph.max_batch == 0 {
            return Err(SimError::InvalidConfig(
                "graph.max_batch must be at least 1",
            ));
        }
        if config.streaming_keepalive < MIN_STATUS_PERIOD {
            return Err(SimError::InvalidConfig(
                "streaming_keepalive must be at least 10ms",
            ));
        }
        if config
            .streaming_connection_timeout
            .is_some_and(|t| t < MIN_STATUS_PERIOD)
        {
            return Err(SimError::InvalidConfig(
                "streaming_connection_timeout must be at least 10ms",
            ));
        }
        if config.status_period < MIN_STATUS_PERIOD {
            return Err(SimError::InvalidConfig(
                "status_period must be at least 10ms",
            ));
        }
        let client_tls = push::client_tls(&config.callback_trust)?;
        let state = State::new(&config.mailboxes);
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                version: watch::channel(0).0,
                shutdown: watch::channel(false).0,
                tasks: Mutex::new(JoinSet::new()),
                client_tls,
                base_url: OnceLock::new(),
                config,
            }),
        })
    }

    /// Serves on `listener` until `shutdown` completes, then stops pushes and drains
    /// connections within [`SHUTDOWN_GRACE`].
    ///
    /// Not an `async fn` on purpose: the base URL (and so [`SimHandle::ews_url`] …) is known
    /// as soon as this returns, before the future is first polled or spawned.
    pub fn serve<S: Future<Output = ()>>(
        self,
        listener: TcpListener,
        shutdown: S,
    ) -> impl Future<Output = Result<(), SimError>> {
        let addr = listener.local_addr();
        if let Ok(addr) = &addr {
            let _ = self.shared.base_url.set(self.derive_base_url(*addr));
        }
        async move {
            addr?;
            self.serve_until(listener, shutdown).await
        }
    }

    async fn serve_until(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), SimError> {
        http::serve(self.shared.clone(), listener, shutdown).await;
        // Stop the push tasks: they select on the shutdown signal.
        let _ = self.shared.shutdown.send(true);
        let mut tasks = std::mem::take(&mut *self.shared.lock_tasks());
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
        }
        let mut state = self.shared.lock();
        let live: Vec<String> = state
            .subscriptions
            .iter()
            .filter(|(_, s)| !matches!(s.state, SubscriptionState::Ended(_)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in live {
            state.end(&id, EndReason::Shutdown);
        }
        drop(state);
        self.shared.changed();
        Ok(())
    }

    fn derive_base_url(&self, addr: SocketAddr) -> String {
        if let Some(url) = &self.shared.config.public_url {
            return url.trim_end_matches('/').to_owned();
        }
        let scheme = if self.shared.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let ip = if addr.ip().is_unspecified() {
            if addr.is_ipv4() {
                std::net::IpAddr::from([127, 0, 0, 1])
            } else {
                std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
            }
        } else {
            addr.ip()
        };
        format!("{scheme}://{}", SocketAddr::new(ip, addr.port()))
    }

    /// The base URL (`http(s)://host:port`), once serving.
    pub fn base_url(&self) -> String {
        self.shared.base_url().to_owned()
    }

    /// The EWS endpoint.
    pub fn ews_url(&self) -> String {
        format!("{}{}", self.shared.base_url(), http::EWS_PATH)
    }

    /// The SOAP Autodiscover endpoint.
    pub fn autodiscover_url(&self) -> String {
        format!("{}{}", self.shared.base_url(), http::AUTODISCOVER_PATH)
    }

    /// The OAuth token endpoint (the tenant-less form; `/{tenant}/oauth2/v2.0/token` works too).
    pub fn token_url(&self) -> String {
        format!("{}{}", self.shared.base_url(), http::TOKEN_PATH)
    }

    /// Every subscription, ended ones included, oldest first.
    pub fn subscriptions(&self) -> Vec<SubscriptionInfo> {
        let state = self.shared.lock();
        let mut subs: Vec<SubscriptionInfo> = state
            .subscriptions
            .values()
            .map(|s| SubscriptionInfo {
                id: s.id.clone(),
                mailbox: state
                    .mailboxes
                    .get(&s.mailbox)
                    .map_or_else(|| s.mailbox.clone(), |m| m.smtp.clone()),
                url: s.url.clone(),
                event_types: s.event_types.iter().map(|t| t.as_str()).collect(),
                status_frequency: s.status_frequency,
                state: s.state,
                previous_watermark: s.previous_watermark.clone(),
                created: rfc3339(s.created),
                last_push_ok: s.last_push_ok.map(rfc3339),
                counters: s.counters.clone(),
            })
            .collect();
        subs.sort_by(|a, b| a.created.cmp(&b.created));
        subs
    }

    /// One subscription.
    pub fn subscription(&self, id: &str) -> Option<SubscriptionInfo> {
        self.subscriptions().into_iter().find(|s| s.id == id)
    }

    /// Every mailbox.
    pub fn mailboxes(&self) -> Vec<MailboxInfo> {
        let state = self.shared.lock();
        state
            .mailboxes
            .iter()
            .map(|(key, m)| MailboxInfo {
                smtp: m.smtp.clone(),
                grouping: m.grouping.clone(),
                redirect: m.redirect.as_ref().map(|r| match r {
                    MailboxRedirect::Address(a) => format!("address:{a}"),
                    MailboxRedirect::Url(u) => format!("url:{u}"),
                }),
                events_created: m.events_created,
                head: m.head,
                live_subscriptions: state.live_count(key),
                subscriptions_created: m.subscriptions_created,
                moved: m.moved,
                deleted: m.deleted,
                watermark_generation: m.generation,
            })
            .collect()
    }

    /// Adds a mailbox at run time, or changes a known one's grouping and redirect.
    pub fn add_mailbox(&self, mailbox: MailboxConfig) {
        self.shared.lock().add_mailbox(&mailbox);
        self.shared.changed();
    }

    /// The requests received, oldest first (the last [`state::MAX_RECORDED_REQUESTS`]).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Everything at once.
    pub fn snapshot(&self) -> Snapshot {
        let (faults, tokens_issued, tokens_valid, requests_received, graph_faults, graph_requests) = {
            let state = self.shared.lock();
            let now = Instant::now();
            (
                state.faults.clone(),
                state.tokens_issued,
                state.tokens.values().filter(|t| t.is_valid(now)).count(),
                state.request_seq,
                state.graph.faults.clone(),
                state.graph.requests,
            )
        };
        Snapshot {
            mailboxes: self.mailboxes(),
            subscriptions: self.subscriptions(),
            faults,
            tokens_issued,
            tokens_valid,
            requests_received,
            graph_subscriptions: self.graph_subscriptions(),
            graph_faults,
            graph_requests,
        }
    }

    /// The `ItemId`s of a mailbox's logged events, oldest first: how a streaming client (whose
    /// events carry no watermark here) recognises the events [`SimHandle::create_events`] made.
    pub fn event_item_ids(&self, mailbox: &str) -> Vec<String> {
        let state = self.shared.lock();
        state
            .mailboxes
            .get(&mailbox.to_ascii_lowercase())
            .map(|m| m.log.iter().map(|e| e.item_id.clone()).collect())
            .unwrap_or_default()
    }

    /// Creates `count` events of `kind` in a mailbox and pushes them to its subscriptions.
    /// Returns the new events' watermarks, oldest first.
    pub fn create_events(
        &self,
        mailbox: &str,
        kind: EventType,
        count: usize,
    ) -> Result<Vec<String>, SimError> {
        if kind == EventType::Status {
            return Err(SimError::InvalidEventType(kind.as_str().into()));
        }
        if !(1..=MAX_EVENTS_PER_CALL).contains(&count) {
            return Err(SimError::InvalidCount);
        }
        let key = mailbox.to_ascii_lowercase();
        let mut state = self.shared.lock();
        if !state.mailboxes.contains_key(&key) {
            return Err(SimError::UnknownMailbox(mailbox.into()));
        }
        let watermarks = state.create_events(&key, kind, count);
        drop(state);
        self.shared.changed();
        Ok(watermarks)
    }

    /// Fault: the subscription stops getting keep-alives (and anything else) without a word,
    /// as when Exchange drops it on a failover. It ends with [`EndReason::Dropped`].
    pub fn stop_keepalives(&self, id: &str) -> Result<(), SimError> {
        let ended = self.shared.lock().end(id, EndReason::Dropped);
        self.shared.changed();
        ended
            .then_some(())
            .ok_or_else(|| SimError::UnknownSubscription(id.into()))
    }

    /// Fault: every live subscription is dropped silently (a server restart). Returns how
    /// many were.
    pub fn drop_all_subscriptions(&self) -> usize {
        let mut state = self.shared.lock();
        let live: Vec<String> = state
            .subscriptions
            .iter()
            .filter(|(_, s)| !matches!(s.state, SubscriptionState::Ended(_)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &live {
            state.end(id, EndReason::Dropped);
        }
        drop(state);
        self.shared.changed();
        live.len()
    }

    /// Fault: the next `count` EWS requests get an `ErrorServerBusy` SOAP fault (HTTP 500)
    /// with `BackOffMilliseconds` = `back_off`.
    pub fn server_busy(&self, count: u32, back_off: Duration) {
        let mut state = self.shared.lock();
        state.faults.server_busy_remaining = count;
        state.faults.server_busy_back_off_ms = millis(back_off);
        drop(state);
        self.shared.changed();
    }

    /// Fault: the next `count` EWS requests get HTTP 503, with `Retry-After` if given.
    pub fn unavailable(&self, count: u32, retry_after_secs: Option<u32>) {
        let mut state = self.shared.lock();
        state.faults.unavailable_remaining = count;
        state.faults.unavailable_retry_after = retry_after_secs;
        drop(state);
        self.shared.changed();
    }

    /// Fault: every watermark of the mailbox handed out so far becomes unknown, so the next
    /// Subscribe with one gets `ErrorInvalidWatermark` (as after 30 days or a database move).
    pub fn invalidate_watermarks(&self, mailbox: &str) -> Result<(), SimError> {
        let mut state = self.shared.lock();
        let m = state
            .mailboxes
            .get_mut(&mailbox.to_ascii_lowercase())
            .ok_or_else(|| SimError::UnknownMailbox(mailbox.into()))?;
        m.generation += 1;
        drop(state);
        self.shared.changed();
        Ok(())
    }

    /// Fault: the mailbox "moved": Subscribe for it gets `ErrorProxyRequestNotAllowed` until
    /// Autodiscover is asked about it again; its streaming subscriptions end, reported as
    /// `ErrorProxyRequestNotAllowed` by the connection serving them and by `GetStreamingEvents`
    /// until then (`ErrorSubscriptionNotFound` after).
    pub fn move_mailbox(&self, mailbox: &str) -> Result<(), SimError> {
        let mut state = self.shared.lock();
        let m = state
            .mailboxes
            .get_mut(&mailbox.to_ascii_lowercase())
            .ok_or_else(|| SimError::UnknownMailbox(mailbox.into()))?;
        m.moved = true;
        // Streaming connections serving it report the move at once.
        state.wake_mailbox(&mailbox.to_ascii_lowercase());
        drop(state);
        self.shared.changed();
        Ok(())
    }

    /// Every streaming subscription, ended ones included, oldest first.
    pub fn streaming_subscriptions(&self) -> Vec<StreamingSubscriptionInfo> {
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        let lifetime = self.shared.config.streaming_subscription_lifetime_scaled();
        state.streaming.expire_idle(Instant::now(), lifetime);
        let mut subs: Vec<(SystemTime, StreamingSubscriptionInfo)> = state
            .streaming
            .subscriptions
            .values()
            .map(|s| {
                let mailbox = state.mailboxes.get(&s.mailbox);
                let info = StreamingSubscriptionInfo {
                    id: s.id.clone(),
                    mailbox: mailbox.map_or_else(|| s.mailbox.clone(), |m| m.smtp.clone()),
                    grouping: s.grouping.clone(),
                    cookie: s.cookie.clone(),
                    event_types: s.event_types.iter().map(|t| t.as_str()).collect(),
                    created: rfc3339(s.created),
                    live: s.end.is_none(),
                    end: s.end,
                    connection: s.connection,
                    pending_events: mailbox.map_or(0, |m| m.head.saturating_sub(s.cursor)),
                    events_delivered: s.events_delivered,
                    connections: s.connections,
                };
                (s.created, info)
            })
            .collect();
        subs.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        subs.into_iter().map(|(_, info)| info).collect()
    }

    /// One streaming subscription.
    pub fn streaming_subscription(&self, id: &str) -> Option<StreamingSubscriptionInfo> {
        self.streaming_subscriptions()
            .into_iter()
            .find(|s| s.id == id)
    }

    /// Every streaming connection, ended ones included (the last
    /// [`streaming::MAX_RECORDED_CONNECTIONS`] ended), oldest first.
    pub fn streaming_connections(&self) -> Vec<StreamingConnectionInfo> {
        let state = self.shared.lock();
        state
            .streaming
            .connections
            .values()
            .map(|c| StreamingConnectionInfo {
                id: c.id,
                subscription_ids: c.requested.clone(),
                serving: c.serving.clone(),
                anchor: c.anchor.clone(),
                account: c.account.clone(),
                carried_cookie: c.carried_cookie,
                opened: rfc3339(c.opened),
                closed: c.closed.map(rfc3339),
                timeout_ms: millis(c.timeout),
                envelopes: c.envelopes,
                keepalives: c.keepalives,
                events: c.events,
                errors: c
                    .errors
                    .iter()
                    .map(|(code, ids)| StreamingErrorInfo {
                        code: code.clone(),
                        subscription_ids: ids.clone(),
                    })
                    .collect(),
                open: c.end.is_none(),
                end: c.end,
                refused_code: c.refused_code.clone(),
                stalled: c.stalled,
                malformed: c.malformed,
                cut_mid_envelope: c.cut_mid_envelope,
            })
            .collect()
    }

    /// One streaming connection.
    pub fn streaming_connection(&self, id: u64) -> Option<StreamingConnectionInfo> {
        self.streaming_connections()
            .into_iter()
            .find(|c| c.id == id)
    }

    /// Fault: the open streaming connection `connection` (every open one when `None`) is
    /// dropped at the TCP level, without a `Closed` envelope or the chunked body's end, as a
    /// server crash or a middlebox would. Returns how many were.
    pub fn streaming_cut(&self, connection: Option<u64>) -> usize {
        let n = streaming::cut(&mut self.shared.lock(), connection);
        self.shared.changed();
        n
    }

    /// Fault: the open streaming connection `connection` (every open one when `None`) stops
    /// sending anything, keep-alives included, but stays open until the client gives up.
    /// Returns how many were.
    pub fn streaming_stall(&self, connection: Option<u64>) -> usize {
        let n = streaming::stall(&mut self.shared.lock(), connection);
        self.shared.changed();
        n
    }

    /// Fault: the streaming subscription expires now: its connection reports
    /// `ErrorSubscriptionNotFound` for it, as does every later `GetStreamingEvents`.
    pub fn streaming_expire(&self, id: &str) -> Result<(), SimError> {
        let done = streaming::expire(&mut self.shared.lock(), id);
        self.shared.changed();
        done.then_some(())
            .ok_or_else(|| SimError::UnknownSubscription(id.into()))
    }

    /// Fault: the streaming subscription's next envelope reports
    /// `ErrorMissedNotificationEvents` for it; the events waiting for it are lost. The
    /// subscription lives on.
    pub fn streaming_missed_events(&self, id: &str) -> Result<(), SimError> {
        let done = streaming::miss_events(&mut self.shared.lock(), id);
        self.shared.changed();
        done.then_some(())
            .ok_or_else(|| SimError::UnknownSubscription(id.into()))
    }

    /// Fault: the open streaming connection `connection` (every open one when `None`) writes
    /// the first half of its next envelope (the events waiting, or a keep-alive) and is then
    /// dropped at the TCP level. Events in that envelope are gone, as they would be from a
    /// server that wrote them into a socket that died. Returns how many were armed.
    pub fn streaming_cut_mid_envelope(&self, connection: Option<u64>) -> usize {
        let n = streaming::cut_mid_envelope(&mut self.shared.lock(), connection);
        self.shared.changed();
        n
    }

    /// Fault: the open streaming connection `connection` (every open one when `None`) writes
    /// one well-framed envelope that is not a `GetStreamingEventsResponse`
    /// ([`streaming::MALFORMED_ENVELOPE`]), then goes on streaming as before. Returns how many
    /// were armed.
    pub fn streaming_malformed_envelope(&self, connection: Option<u64>) -> usize {
        let n = streaming::malformed(&mut self.shared.lock(), connection);
        self.shared.changed();
        n
    }

    /// Fault: the next `count` `GetStreamingEvents` are answered only after `delay` (a slow
    /// front end). Nothing is routed meanwhile: the subscriptions they name stay with the
    /// connection serving them until the delay is over.
    pub fn streaming_delay_head(&self, count: u32, delay: Duration) {
        let mut state = self.shared.lock();
        state.faults.streaming_head_delay_remaining = count;
        state.faults.streaming_head_delay_ms = millis(delay);
        drop(state);
        self.shared.changed();
    }

    /// Fault: the mailbox is deleted. Subscribe for it, and any Subscribe or
    /// `GetStreamingEvents` anchored on it (`X-AnchorMailbox`), answer
    /// `ErrorNonExistentMailbox` (a `GetStreamingEvents` as a connection-level error, without
    /// `ErrorSubscriptionIds`); its streaming subscriptions end (their connection reports
    /// `ErrorSubscriptionNotFound`). Autodiscover still answers for it, as a directory that has
    /// not caught up does. Permanent: nothing undoes it.
    pub fn delete_mailbox(&self, mailbox: &str) -> Result<(), SimError> {
        let key = mailbox.to_ascii_lowercase();
        let mut state = self.shared.lock();
        let m = state
            .mailboxes
            .get_mut(&key)
            .ok_or_else(|| SimError::UnknownMailbox(mailbox.into()))?;
        m.deleted = true;
        let ids: Vec<String> = state
            .streaming
            .subscriptions
            .values()
            .filter(|s| s.mailbox == key && s.end.is_none())
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            streaming::expire(&mut state, &id);
        }
        drop(state);
        self.shared.changed();
        Ok(())
    }

    /// Fault: the next `count` `GetStreamingEvents` are refused with
    /// `ErrorExceededConnectionCount`, whatever the connections open.
    pub fn streaming_refuse_connections(&self, count: u32) {
        self.shared.lock().faults.streaming_refuse_remaining = count;
        self.shared.changed();
    }

    /// Fault: the subscription's next push is an `ErrorReadEventsFailed` error notification
    /// (no `Notification`, id in `MessageXml`), after which the subscription is gone.
    pub fn push_error_notification(&self, id: &str) -> Result<(), SimError> {
        let mut state = self.shared.lock();
        let sub = state
            .subscriptions
            .get_mut(id)
            .filter(|s| !matches!(s.state, SubscriptionState::Ended(_)))
            .ok_or_else(|| SimError::UnknownSubscription(id.into()))?;
        sub.error_requested = true;
        sub.wake.notify_one();
        drop(state);
        self.shared.changed();
        Ok(())
    }

    /// Fault: every EWS response is delayed by `delay` (zero to stop).
    pub fn set_response_delay(&self, delay: Duration) {
        self.shared.lock().faults.response_delay_ms = millis(delay);
        self.shared.changed();
    }

    /// Fault: every issued token stops working; the next EWS call with one gets HTTP 401.
    pub fn revoke_tokens(&self) -> usize {
        let mut state = self.shared.lock();
        let n = state.tokens.len();
        state.tokens.clear();
        drop(state);
        self.shared.changed();
        n
    }

    /// Disarms every request fault (busy, 503, delay). Moved mailboxes stay moved until
    /// Autodiscover is asked; invalidated watermarks stay invalid.
    pub fn clear_faults(&self) {
        let mut state = self.shared.lock();
        state.faults = Faults::default();
        state.graph.faults = GraphFaults::default();
        drop(state);
        self.shared.changed();
    }

    /// The Graph API base (`{base}/v1.0`).
    pub fn graph_url(&self) -> String {
        format!("{}{}", self.shared.base_url(), graph::GRAPH_PREFIX)
    }

    /// Every Graph subscription, removed and expired ones included, oldest first.
    pub fn graph_subscriptions(&self) -> Vec<GraphSubscriptionInfo> {
        let state = self.shared.lock();
        let now = SystemTime::now();
        let mut subs: Vec<(SystemTime, GraphSubscriptionInfo)> = state
            .graph
            .subscriptions
            .values()
            .map(|s| {
                let change: Vec<&str> = s.change_types.iter().map(|c| c.as_str()).collect();
                let info = GraphSubscriptionInfo {
                    id: s.id.clone(),
                    resource: s.resource.clone(),
                    change_type: change.join(","),
                    notification_url: s.notification_url.clone(),
                    lifecycle_url: s.lifecycle_url.clone(),
                    expiration: graph_state::graph_time(s.expiration),
                    client_state: s.client_state.clone(),
                    created: rfc3339(s.created),
                    renewed: s.renewed,
                    reauthorized: s.reauthorized,
                    reauthorization_pending: s.reauthorization_pending.is_some(),
                    removed: s.removal.is_some(),
                    removal: s.removal,
                    expired: s.expiration <= now,
                    changes_made: s.changes_made,
                    delivered: s.delivered,
                    dropped: s.dropped,
                };
                (s.created, info)
            })
            .collect();
        subs.sort_by_key(|(created, _)| *created);
        subs.into_iter().map(|(_, info)| info).collect()
    }

    /// One Graph subscription.
    pub fn graph_subscription(&self, id: &str) -> Option<GraphSubscriptionInfo> {
        self.graph_subscriptions().into_iter().find(|s| s.id == id)
    }

    /// Every exchange with a Graph callback, oldest first (the last
    /// [`graph_state::MAX_RECORDED_DELIVERIES`]).
    pub fn graph_deliveries(&self) -> Vec<GraphDelivery> {
        self.shared
            .lock()
            .graph
            .deliveries
            .iter()
            .cloned()
            .collect()
    }

    /// Forgets the recorded Graph callback exchanges.
    pub fn clear_graph_deliveries(&self) {
        self.shared.lock().graph.deliveries.clear();
    }

    /// Makes `count` changes of `change` on the target's live subscriptions (those that asked
    /// for that change type; oldest subscription first) and queues their notifications.
    pub fn graph_change(
        &self,
        target: &GraphTarget,
        change: ChangeType,
        count: usize,
    ) -> Result<Vec<GraphChanges>, SimError> {
        if !(1..=MAX_EVENTS_PER_CALL).contains(&count) {
            return Err(SimError::InvalidCount);
        }
        let tenant = &self.shared.config.graph.tenant_id;
        let mut state = self.shared.lock();
        let now = SystemTime::now();
        let norm = |r: &str| r.trim_start_matches('/').to_ascii_lowercase();
        let ids: Vec<String> = match target {
            GraphTarget::Subscription(id) => {
                if !state
                    .graph
                    .subscriptions
                    .get(id)
                    .is_some_and(|s| s.is_live(now))
                {
                    return Err(SimError::UnknownSubscription(id.clone()));
                }
                vec![id.clone()]
            }
            GraphTarget::Resource(_) | GraphTarget::All => {
                // Oldest first, so a test knows the order items arrive in.
                let mut live: Vec<(SystemTime, String)> = state
                    .graph
                    .subscriptions
                    .values()
                    .filter(|s| s.is_live(now))
                    .filter(|s| match target {
                        GraphTarget::Resource(r) => norm(&s.resource) == norm(r),
                        _ => true,
                    })
                    .map(|s| (s.created, s.id.clone()))
                    .collect();
                live.sort();
                live.into_iter().map(|(_, id)| id).collect()
            }
        };
        let mut made = Vec::with_capacity(ids.len());
        let mut start = Vec::new();
        for id in ids {
            let wanted = state
                .graph
                .subscriptions
                .get(&id)
                .is_some_and(|s| s.change_types.contains(&change));
            let mut ids = Vec::new();
            if wanted {
                if let Some((new, url)) =
                    state.graph.make_changes(&id, change, count, tenant, false)
                {
                    ids = new;
                    start.extend(url);
                }
            }
            made.push(GraphChanges {
                subscription_id: id,
                ids,
            });
        }
        drop(state);
        for url in start {
            graph::start_delivery(&self.shared, Some(url));
        }
        self.shared.changed();
        Ok(made)
    }

    /// Runs `f` on a live Graph subscription under the lock, then starts the delivery task
    /// it asks for.
    fn graph_fault(
        &self,
        id: &str,
        f: impl FnOnce(&mut graph_state::GraphState, &str) -> Option<String>,
    ) -> Result<(), SimError> {
        let mut state = self.shared.lock();
        let now = SystemTime::now();
        if !state
            .graph
            .subscriptions
            .get(id)
            .is_some_and(|s| s.is_live(now))
        {
            return Err(SimError::UnknownSubscription(id.into()));
        }
        let start = f(&mut state.graph, &self.shared.config.graph.tenant_id);
        drop(state);
        graph::start_delivery(&self.shared, start);
        self.shared.changed();
        Ok(())
    }

    /// Fault: Graph removes the subscription, with a `subscriptionRemoved` lifecycle
    /// notification when `notify` (and it has a lifecycle URL), else silently.
    pub fn graph_remove_subscription(&self, id: &str, notify: bool) -> Result<(), SimError> {
        self.graph_fault(id, |graph, tenant| {
            let sub = graph.subscriptions.get_mut(id)?;
            sub.removal = Some(if notify {
                RemovalReason::Removed
            } else {
                RemovalReason::RemovedSilently
            });
            notify
                .then(|| {
                    graph.lifecycle(id, graph_state::LifecycleEvent::SubscriptionRemoved, tenant)
                })
                .flatten()
        })
    }

    /// Fault: a `missed` lifecycle notification (some changes were not delivered).
    pub fn graph_missed(&self, id: &str) -> Result<(), SimError> {
        self.graph_fault(id, |graph, tenant| {
            graph.lifecycle(id, graph_state::LifecycleEvent::Missed, tenant)
        })
    }

    /// Fault: a `reauthorizationRequired` lifecycle notification; unless reauthorize or a
    /// renewal arrives within [`GraphConfig::reauthorization_grace`], the subscription is
    /// then removed with `subscriptionRemoved`.
    pub fn graph_require_reauthorization(&self, id: &str) -> Result<(), SimError> {
        let mut number = 0;
        self.graph_fault(id, |graph, tenant| {
            graph.reauthorization_seq += 1;
            number = graph.reauthorization_seq;
            graph.subscriptions.get_mut(id)?.reauthorization_pending = Some(number);
            graph.lifecycle(
                id,
                graph_state::LifecycleEvent::ReauthorizationRequired,
                tenant,
            )
        })?;
        graph_push::spawn_reauthorization_timer(&self.shared, id.to_owned(), number);
        Ok(())
    }

    /// Fault: the subscription expires now (no notification, as Graph sends none for expiry).
    pub fn graph_expire_now(&self, id: &str) -> Result<(), SimError> {
        self.graph_fault(id, |graph, _| {
            let sub = graph.subscriptions.get_mut(id)?;
            sub.expiration = SystemTime::now();
            None
        })
    }

    /// Fault: one change notification (`updated`) whose `clientState` is wrong, as a forged
    /// POST would carry. Returns its `resourceData.id`.
    pub fn graph_wrong_client_state(&self, id: &str) -> Result<String, SimError> {
        let mut made = String::new();
        self.graph_fault(id, |graph, tenant| {
            let (ids, start) = graph.make_changes(id, ChangeType::Updated, 1, tenant, true)?;
            made = ids.into_iter().next().unwrap_or_default();
            start
        })?;
        Ok(made)
    }

    /// Fault: the next `count` Graph API calls are refused as throttled, with `Retry-After`.
    pub fn graph_throttle(&self, count: u32, status: GraphThrottle, retry_after_secs: u32) {
        let mut state = self.shared.lock();
        let faults = &mut state.graph.faults;
        faults.throttle_remaining = count;
        faults.throttle_status = match status {
            GraphThrottle::TooManyRequests => 429,
            GraphThrottle::ServiceUnavailable => 503,
        };
        faults.throttle_retry_after_secs = retry_after_secs;
        drop(state);
        self.shared.changed();
    }

    /// Waits until `check` returns `Some`, re-checking on every state change, for at most
    /// `timeout`. For tests: no polling sleeps.
    pub async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&SimHandle) -> Option<T>,
    ) -> Option<T> {
        let mut changes = self.shared.version.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                changes.borrow_and_update();
                if let Some(found) = check(self) {
                    return Some(found);
                }
                if changes.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}
