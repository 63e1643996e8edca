//! Notify: what a notification says and what became of it. Parses the body of a request the
//! router admitted (an EWS `SendNotification`), and records each notification with the answer
//! Exchange got in the subscription [`tracker`] and the metrics. Graph change notification
//! collections forwarded in passthrough are recorded the same way ([`Notifications::observe_graph`]).

pub mod tracker;

use std::sync::Arc;
use std::time::Instant;

use ews::NotificationSummary;

use crate::client::ConnInfo;
use crate::metrics::Metrics;
use crate::source::Source;
pub use tracker::{AnswerCache, GraphSubscription, ReceiverAnswer, State, StateCounts, Tracker};

/// A body that is not an EWS `SendNotification`: answered 400, never forwarded.
#[derive(Debug, thiserror::Error)]
#[error("not an EWS SendNotification: {0}")]
pub struct NotANotification(#[source] pub ews::EwsError);

/// Parses and records notifications.
#[derive(Debug)]
pub struct Notifications {
    /// `--accept-any-body`: bodies that are not notifications are forwarded untracked.
    accept_any_body: bool,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    /// The receiver's usual answer, classified once.
    answers: AnswerCache,
}

impl Notifications {
    /// Recording into `tracker` and `metrics`.
    pub fn new(accept_any_body: bool, tracker: Arc<Tracker>, metrics: Arc<Metrics>) -> Self {
        Self {
            accept_any_body,
            tracker,
            metrics,
            answers: AnswerCache::default(),
        }
    }

    /// The notification in `body`, parsed once and borrowing from it (the receiver gets the
    /// same bytes). `Ok(None)`: not a notification, forwarded as it is (`--accept-any-body`).
    pub fn parse<'b>(
        &self,
        body: &'b [u8],
        conn: &ConnInfo,
    ) -> Result<Option<NotificationSummary<'b>>, NotANotification> {
        match ews::summarize_send_notification(body) {
            Ok(n) => Ok(Some(n)),
            Err(_) if self.accept_any_body => Ok(None),
            Err(e) => {
                self.metrics.rejected_body(Source::Ews);
                tracing::debug!(peer = %conn.peer, error = %e, "not a SendNotification; answered 400");
                Err(NotANotification(e))
            }
        }
    }

    /// `--accept-any-body`.
    pub fn accepts_any_body(&self) -> bool {
        self.accept_any_body
    }

    /// Records a Graph change notification collection the receiver answered (passthrough).
    pub fn observe_graph(
        &self,
        c: &graph::Collection,
        conn: &ConnInfo,
        answer: ReceiverAnswer,
        now: Instant,
    ) {
        self.tracker.record_graph(c, conn.peer_ip, answer, now);
        self.metrics.answer(Source::Graph, answer.metric_index());
        for n in &c.items {
            // Indices into `metrics::GRAPH_EVENT_TYPES`: change types, then lifecycle events.
            let index = match (&n.change_type, &n.lifecycle_event) {
                (_, Some(graph::LifecycleEvent::Other(_))) => 6,
                (_, Some(ev)) => 3 + tracker::lifecycle_index(ev),
                (Some(ct), None) => match tracker::change_type_index(ct) {
                    i @ 0..=2 => i,
                    _ => 6,
                },
                (None, None) => continue,
            };
            self.metrics.graph_event(index);
        }
    }

    /// What the receiver's answer (status and body) said to Exchange.
    pub fn classify(&self, status: http::StatusCode, body: &bytes::Bytes) -> ReceiverAnswer {
        self.answers.classify(status, body)
    }

    /// Records a notification and the answer Exchange got in the tracker and the metrics.
    pub fn observe(
        &self,
        n: &NotificationSummary<'_>,
        conn: &ConnInfo,
        answer: ReceiverAnswer,
        now: Instant,
    ) {
        self.tracker.record(n, conn.peer_ip, answer, now);
        self.metrics.answer(Source::Ews, answer.metric_index());
        for m in &n.messages {
            for (counter, &count) in self.metrics.events.iter().zip(&m.event_counts) {
                if count > 0 {
                    counter.inc_by(u64::from(count));
                }
            }
        }
    }
}
