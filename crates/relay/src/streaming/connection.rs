//! One `GetStreamingEvents` connection: open it, cut its body into envelopes, hand each to the
//! group's task, and say how it ended. Reading waits while the group is busy delivering (the
//! channel is bounded), so a slow receiver slows the stream instead of filling memory.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::store;
use crate::subscriptions::client::{EwsClient, Failure, Target};

/// Envelopes read ahead of the group's task. Small: what is read but not delivered is what a
/// crash can lose (the reason for the start-up resync after an unclean stop).
pub(super) const READ_AHEAD: usize = 4;
/// On a clean stop, the connection keeps reading until it has been quiet this long, so events
/// Exchange already wrote are delivered rather than left in the socket.
const STOP_QUIET: Duration = Duration::from_millis(300);
/// ... but not longer than this in all.
const STOP_READ_LIMIT: Duration = Duration::from_secs(3);
/// Beyond the `ConnectionTimeout`, how long the request may live before the HTTP client gives
/// up on it (Exchange closes it at the timeout; this only bounds a server that does not).
const LIFETIME_MARGIN: Duration = Duration::from_secs(120);

/// What a connection tells its group.
#[derive(Debug)]
pub(super) enum ConnEvent {
    /// Exchange answered 200: from here it may write events into the connection.
    Opened,
    /// One complete SOAP envelope.
    Envelope(Vec<u8>),
    /// The connection is over; nothing follows.
    Ended(End),
}

/// How a connection ended.
#[derive(Debug)]
pub(super) enum End {
    /// The body ended between envelopes (after `ConnectionStatus` `Closed`, or an answer that
    /// was a single error envelope).
    BodyEnded,
    /// Transport error, or a body cut inside an envelope.
    Broken {
        /// What broke.
        why: String,
        /// Bytes of an unfinished envelope were dropped: events in it are lost.
        partial: bool,
    },
    /// No envelope for the whole silence window.
    Silent(Duration),
    /// Exchange did not answer 200, or not in time.
    Refused(Failure),
    /// Stopped by the group; `partial` when bytes of an unfinished envelope were dropped.
    Stopped {
        /// An envelope was cut short: events in it may be lost.
        partial: bool,
    },
}

impl End {
    /// An envelope was cut short.
    pub(super) fn partial(&self) -> bool {
        matches!(
            self,
            End::Broken { partial: true, .. } | End::Stopped { partial: true }
        )
    }

    /// The `reason` label of `ews_relay_stream_reconnects_total`.
    pub(super) fn label(&self) -> &'static str {
        match self {
            End::BodyEnded => "closed",
            End::Broken { .. } => "broken",
            End::Silent(_) => "silence",
            End::Refused(_) => "refused",
            End::Stopped { .. } => "stopped",
        }
    }
}

/// Where a group's connection goes and who it impersonates.
#[derive(Debug, Clone)]
pub(super) struct Route {
    /// EWS URL.
    pub ews_url: String,
    /// `X-AnchorMailbox`, impersonated too.
    pub anchor: String,
    /// `X-PreferServerAffinity: true`.
    pub affinity: bool,
    /// The group's backend cookie.
    pub cookie: Option<String>,
}

impl Route {
    pub(super) fn target(&self) -> Target<'_> {
        Target {
            ews_url: &self.ews_url,
            anchor: &self.anchor,
            affinity: self.affinity,
            backend_cookie: self.cookie.as_deref(),
        }
    }
}

/// A running connection, as its group holds it.
#[derive(Debug)]
pub(super) struct Connection {
    /// Unique within the group.
    pub id: u64,
    /// When it was asked for.
    pub opened: Instant,
    /// Unix ms of its latest envelope (0: none yet).
    pub last_seen: Arc<AtomicU64>,
    /// Envelopes read.
    pub envelopes: u64,
    /// Exchange said `Closed`.
    pub closed_seen: bool,
    /// A connection-level error Exchange answered with (`ErrorExceededConnectionCount` …).
    pub failure: Option<Failure>,
    /// The subscription ids it was opened for.
    pub ids: Vec<String>,
    /// The anchor mailbox it was opened with.
    pub anchor: String,
    /// Of those, the ones Exchange said it moved to a newer connection
    /// (`ErrorNewEventStreamConnectionOpened`): their events travel there from then on.
    pub moved: HashSet<String>,
    /// When Exchange answered 200 (Unix ms): from then events may have been written into it.
    pub opened_ms: Option<store::UnixMillis>,
    /// An envelope of it has reached the group.
    pub heard: bool,
    /// An envelope of it could not be read: the events in it are lost.
    pub lost_data: bool,
    stop: watch::Sender<bool>,
}

impl Connection {
    /// Whether events Exchange wrote into it may not have reached the relay: it broke, went
    /// silent, or was stopped with an envelope half read after it had opened, or an envelope
    /// was unreadable. Not when Exchange closed it (`Closed`) or never opened it.
    pub(super) fn may_have_lost(&self, end: &End) -> bool {
        if self.lost_data || end.partial() {
            return true;
        }
        // Exchange closed it, never opened it, or refused it in-band: nothing was in flight.
        if self.closed_seen || self.opened_ms.is_none() || self.failure.is_some() {
            return false;
        }
        matches!(
            end,
            End::Broken { .. } | End::Silent(_) | End::Stopped { .. }
        )
    }

    /// Ask it to stop (it reads what is already on its way, then ends with `Stopped`).
    pub(super) fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Decrements the open-connections gauge however the task ends.
struct Open(Arc<Metrics>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.stream_connection(-1);
    }
}

/// Start connection `id` for the subscriptions `ids` (in `body`).
#[allow(clippy::too_many_arguments)]
pub(super) fn open(
    id: u64,
    ids: Vec<String>,
    client: Arc<EwsClient>,
    route: Route,
    body: String,
    connection_timeout: Duration,
    silence: Duration,
    tx: mpsc::Sender<(u64, ConnEvent)>,
    metrics: Arc<Metrics>,
) -> Connection {
    let (stop, stop_rx) = watch::channel(false);
    let anchor = route.anchor.clone();
    let last_seen = Arc::new(AtomicU64::new(0));
    let seen = last_seen.clone();
    tokio::spawn(async move {
        let end = run(
            &client,
            &route,
            body,
            connection_timeout + LIFETIME_MARGIN,
            silence,
            &tx,
            id,
            &seen,
            stop_rx,
            &metrics,
        )
        .await;
        let _ = tx.send((id, ConnEvent::Ended(end))).await;
    });
    Connection {
        id,
        opened: Instant::now(),
        last_seen,
        envelopes: 0,
        closed_seen: false,
        failure: None,
        ids,
        anchor,
        moved: HashSet::new(),
        opened_ms: None,
        heard: false,
        lost_data: false,
        stop,
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    client: &EwsClient,
    route: &Route,
    body: String,
    lifetime: Duration,
    silence: Duration,
    tx: &mpsc::Sender<(u64, ConnEvent)>,
    id: u64,
    seen: &AtomicU64,
    mut stop: watch::Receiver<bool>,
    metrics: &Arc<Metrics>,
) -> End {
    let opening = client.open_stream(route.target(), body, lifetime);
    let mut resp = tokio::select! {
        r = opening => match r {
            Ok(r) => r,
            Err(f) => return End::Refused(f),
        },
        _ = stop.changed() => return End::Stopped { partial: false },
    };
    metrics.stream_connection(1);
    let _open = Open(metrics.clone());
    if tx.send((id, ConnEvent::Opened)).await.is_err() {
        return End::Stopped { partial: false };
    }
    let mut splitter = ews::EnvelopeSplitter::default();
    let mut deadline = Instant::now() + silence;
    let mut stopping: Option<Instant> = None;
    loop {
        // While stopping: read on until quiet (or the limit), then end.
        let wait_until = match stopping {
            Some(limit) => (Instant::now() + STOP_QUIET).min(limit),
            None => deadline,
        };
        let chunk = tokio::select! {
            c = tokio::time::timeout_at(wait_until, resp.chunk()) => c,
            _ = stop.changed(), if stopping.is_none() => {
                stopping = Some(Instant::now() + STOP_READ_LIMIT);
                continue;
            }
        };
        let bytes = match chunk {
            Err(_) if stopping.is_some() => {
                return End::Stopped {
                    partial: splitter.buffered() > 0,
                }
            }
            Err(_) => return End::Silent(silence),
            Ok(Err(e)) => {
                return End::Broken {
                    why: error_chain(&e),
                    partial: splitter.buffered() > 0,
                }
            }
            Ok(Ok(None)) => {
                return match splitter.finish() {
                    Ok(()) => End::BodyEnded,
                    Err(e) => End::Broken {
                        why: format!("the stream ended inside an envelope: {e}"),
                        partial: true,
                    },
                }
            }
            Ok(Ok(Some(b))) => b,
        };
        splitter.feed(&bytes);
        loop {
            match splitter.next_envelope() {
                Ok(Some(envelope)) => {
                    seen.store(store::now_millis(), Ordering::Relaxed);
                    if tx.send((id, ConnEvent::Envelope(envelope))).await.is_err() {
                        return End::Stopped { partial: false };
                    }
                    // Time spent waiting for the group is not the server's silence.
                    deadline = Instant::now() + silence;
                }
                Ok(None) => break,
                Err(e) => {
                    return End::Broken {
                        why: e.to_string(),
                        partial: true,
                    }
                }
            }
        }
    }
}

/// An error with its causes ("error decoding response body: connection reset …").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
