//! The one request pipeline: route → notify → deliver, and the access log. HTTP/1.1 (the own
//! engine, [`http1::server`]) and HTTP/2 (hyper, in the edge) hand every request to the
//! same [`Pipeline`], so admission, limits, parsing, delivery, refusals and logging are written
//! once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http1::timer::Deadline;
use http1::{Answer, BodyError, BodyLimits, Exchange, HeaderBlock, Refused, Reply, RequestHead};

use crate::client::ConnInfo;
use crate::deliver::managed::{self, Answered};
use crate::deliver::passthrough::{self, Buffers};
use crate::managed_graph::inbound::{self, Outcome};
use crate::managed_graph::GraphKeeper;
use crate::metrics::Metrics;
use crate::notify::{Notifications, ReceiverAnswer};
use crate::receiver::Receiver;
use crate::route::{Refusal, Route, Router, Source};
use crate::subscriptions::Manager;

/// The request handler shared by all connections.
#[derive(Debug)]
pub struct Pipeline {
    router: Router,
    notify: Notifications,
    receiver: Arc<Receiver>,
    /// Managed mode: the relay answers Exchange itself for the subscriptions it owns.
    manager: Option<Arc<Manager>>,
    /// Managed Graph mode: the relay answers Graph itself on its own callback URLs.
    graph: Option<Arc<GraphKeeper>>,
    limits: BodyLimits,
    metrics: Arc<Metrics>,
}

/// What the access log says of an answered request beyond its status and sizes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Detail {
    /// Milliseconds with the receiver, if the request went to it.
    pub upstream_ms: Option<f64>,
}

impl Pipeline {
    /// The pipeline over its parts.
    pub fn new(
        router: Router,
        notify: Notifications,
        receiver: Arc<Receiver>,
        manager: Option<Arc<Manager>>,
        graph: Option<Arc<GraphKeeper>>,
        limits: BodyLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            router,
            notify,
            receiver,
            manager,
            graph,
            limits,
            metrics,
        }
    }

    /// `--upstream-timeout`: the longest the pipeline waits inside [`http1::Handler::respond`].
    pub fn upstream_timeout(&self) -> Duration {
        self.receiver.timeout()
    }

    /// A notification the relay answers in managed mode; `None` to pass it through.
    async fn managed(
        &self,
        n: &ews::NotificationSummary<'_>,
        head: &RequestHead<'_>,
        body: &[u8],
        client: &ConnInfo,
    ) -> Option<Answer<Detail>> {
        let manager = self.manager.as_deref()?;
        let status = match managed::answer(manager, n, head, body, client).await? {
            Answered::Status(status) => status,
            Answered::NotStored => {
                return Some(Answer {
                    reply: Reply::plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "notification not stored; retry\n",
                    ),
                    ready: None,
                    detail: Detail::default(),
                })
            }
        };
        // Answered by the relay, not the receiver: recorded as such, so the tracker and the
        // metrics never show it as the receiver's answer.
        let now = Instant::now();
        self.notify
            .observe(n, client, ReceiverAnswer::Relay(status), now);
        let mut headers = HeaderBlock::with_capacity(40);
        headers.push(b"content-type", b"text/xml; charset=utf-8");
        Some(Answer {
            reply: Reply {
                status: StatusCode::OK,
                headers,
                body: Bytes::from_static(ews::send_notification_result(status).as_bytes()),
            },
            ready: Some(now),
            detail: Detail::default(),
        })
    }
}

impl Pipeline {
    /// The receiver's exchange as the answer to the client: its reply (and what `classify`
    /// makes of it), or 502/504 when it failed (counted and logged).
    fn receiver_reply(
        &self,
        result: Result<Reply, crate::receiver::UpstreamError>,
        client: &ConnInfo,
        classify: impl FnOnce(&Reply) -> Option<ReceiverAnswer>,
    ) -> (Reply, Option<ReceiverAnswer>) {
        match result {
            Ok(reply) => {
                let answer = classify(&reply);
                (reply, answer)
            }
            Err(e) => {
                self.metrics.upstream_error(e.kind);
                tracing::warn!(
                    peer = %client.peer,
                    receiver = self.receiver.authority(),
                    error = %e,
                    status = e.status().as_u16(),
                    "receiver exchange failed"
                );
                (
                    Reply::plain(e.status(), upstream_message(e.status())),
                    Some(ReceiverAnswer::Unreachable),
                )
            }
        }
    }

    /// A request under `--graph-path-prefix`: the validation handshake, a change notification
    /// collection for the relay's own subscriptions (managed Graph mode), or one for the
    /// receiver's (passthrough).
    async fn graph(
        &self,
        head: &RequestHead<'_>,
        body: &[u8],
        client: &ConnInfo,
        buffers: &mut Buffers,
        deadline: &mut Deadline,
    ) -> Answer<Detail> {
        let started = Instant::now();
        let refuse = |refusal: Refusal| Answer {
            reply: refusal.reply(),
            ready: None,
            detail: Detail::default(),
        };
        let query = head.path_and_query.split_once('?').map_or("", |(_, q)| q);
        let token = match graph::validation_token(query) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(peer = %client.peer, error = %e, "malformed validationToken; answered 400");
                return refuse(Refusal::BadValidationToken);
            }
        };
        let own = self.graph.as_ref().filter(|k| k.owns_path(head.path()));
        if let Some(token) = token {
            let Some(keeper) = own else {
                // The receiver's own subscription: it answers its validation.
                self.metrics.graph_validation("forwarded");
                return self
                    .forward_graph(head, body, client, buffers, deadline, None)
                    .await;
            };
            if !keeper.expects_validation(head.path()) {
                self.metrics.graph_validation("refused");
                tracing::info!(peer = %client.peer, path = head.path(), "Graph validation request while no subscription is being created: refused (400)");
                return refuse(Refusal::UnexpectedValidation);
            }
            self.metrics.graph_validation("answered");
            let mut headers = HeaderBlock::with_capacity(48);
            headers.push(b"content-type", b"text/plain; charset=utf-8");
            return Answer {
                reply: Reply {
                    status: StatusCode::OK,
                    headers,
                    body: Bytes::from(token),
                },
                ready: Some(Instant::now()),
                detail: Detail::default(),
            };
        }
        let collection = match graph::parse_collection(body) {
            Ok(c) => Some(c),
            Err(_) if own.is_none() && self.notify.accepts_any_body() => None,
            Err(e) => {
                self.metrics.rejected_body(Source::Graph);
                tracing::debug!(peer = %client.peer, error = %e, "not a Graph change notification collection; answered 400");
                return refuse(Refusal::NotGraphNotification);
            }
        };
        match (own, collection) {
            (Some(keeper), Some(c)) => {
                let reply = match inbound::answer(keeper, &c, head, client, started).await {
                    Outcome::Accepted => Reply {
                        status: StatusCode::ACCEPTED,
                        headers: HeaderBlock::default(),
                        body: Bytes::new(),
                    },
                    Outcome::Forbidden => {
                        Reply::plain(StatusCode::FORBIDDEN, "clientState does not match\n")
                    }
                    Outcome::NotStored => {
                        let mut r = Reply::plain(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "notification not stored; retry\n",
                        );
                        r.headers.push(b"retry-after", b"5");
                        r
                    }
                };
                Answer {
                    reply,
                    ready: Some(Instant::now()),
                    detail: Detail::default(),
                }
            }
            (_, c) => {
                self.forward_graph(head, body, client, buffers, deadline, c.as_ref())
                    .await
            }
        }
    }

    /// Passthrough of a Graph request: the receiver answers it; a notification collection is
    /// recorded with the receiver's answer.
    async fn forward_graph(
        &self,
        head: &RequestHead<'_>,
        body: &[u8],
        client: &ConnInfo,
        buffers: &mut Buffers,
        deadline: &mut Deadline,
        collection: Option<&graph::Collection>,
    ) -> Answer<Detail> {
        let forwarded =
            passthrough::forward(&self.receiver, head, body, client, buffers, deadline).await;
        let (reply, answer) = self.receiver_reply(forwarded.result, client, |reply| {
            collection.map(|_| {
                if reply.status.is_success() {
                    ReceiverAnswer::Ok
                } else {
                    ReceiverAnswer::HttpError(reply.status.as_u16())
                }
            })
        });
        if let (Some(c), Some(answer)) = (collection, answer) {
            self.notify.observe_graph(c, client, answer, forwarded.done);
        }
        Answer {
            reply,
            ready: Some(forwarded.done),
            detail: Detail {
                upstream_ms: Some(millis(
                    forwarded.done.saturating_duration_since(forwarded.start),
                )),
            },
        }
    }
}

impl http1::Handler for Pipeline {
    type Conn = ConnInfo;
    type Admitted = Route;
    type State = Buffers;
    type Detail = Detail;

    fn limits(&self) -> BodyLimits {
        self.limits
    }

    fn admit(
        &self,
        head: &RequestHead<'_>,
        conn: &ConnInfo,
        declared_length: Option<u64>,
    ) -> Result<Route, Refused> {
        self.router
            .route(head, conn, declared_length)
            .map_err(|refusal| Refused {
                reply: refusal.reply(),
                drain: refusal.drain(),
            })
    }

    async fn respond(
        &self,
        head: &RequestHead<'_>,
        body: &[u8],
        conn: &ConnInfo,
        route: &Route,
        buffers: &mut Buffers,
        deadline: &mut Deadline,
    ) -> Answer<Detail> {
        let client = route.named_client.as_ref().unwrap_or(conn);
        if route.source == Source::Graph {
            // Boxed: Graph's future is large, and EWS requests must not carry its size.
            return Box::pin(self.graph(head, body, client, buffers, deadline)).await;
        }
        let notification = match self.notify.parse(body, client) {
            Ok(n) => n,
            Err(_) => {
                return Answer {
                    reply: Refusal::NotNotification.reply(),
                    ready: None,
                    detail: Detail::default(),
                }
            }
        };
        // Boxed (the managed future is large) only in managed mode: passthrough requests must
        // not pay an allocation for a branch they never take.
        if let (Some(n), true) = (&notification, self.manager.is_some()) {
            if let Some(answer) = Box::pin(self.managed(n, head, body, client)).await {
                return answer;
            }
        }
        let forwarded =
            passthrough::forward(&self.receiver, head, body, client, buffers, deadline).await;
        let (reply, answer) = self.receiver_reply(forwarded.result, client, |reply| {
            notification
                .as_ref()
                .map(|_| self.notify.classify(reply.status, &reply.body))
        });
        if let (Some(n), Some(answer)) = (&notification, answer) {
            self.notify.observe(n, client, answer, forwarded.done);
        }
        Answer {
            reply,
            ready: Some(forwarded.done),
            detail: Detail {
                upstream_ms: Some(millis(
                    forwarded.done.saturating_duration_since(forwarded.start),
                )),
            },
        }
    }

    fn body_refused(&self, error: BodyError) -> Reply {
        match error {
            BodyError::TooLarge => Refusal::TooLarge,
            BodyError::Timeout => Refusal::BodyTimeout,
            BodyError::Malformed => Refusal::BadBody,
        }
        .reply()
    }

    fn log(&self, conn: &ConnInfo, route: Option<&Route>, exchange: Exchange<'_, '_, Detail>) {
        let client = route.and_then(|r| r.named_client.as_ref()).unwrap_or(conn);
        self.metrics.request(exchange.status);
        let Some(head) = exchange.head else {
            // Refused before its head could be parsed.
            tracing::info!(
                target: "ews_relay::access",
                peer = %client.peer,
                method = "-",
                path = "-",
                status = exchange.status.as_u16(),
                bytes_in = 0,
                bytes_out = 0,
            );
            return;
        };
        self.metrics
            .request_duration
            .observe(exchange.elapsed.as_secs_f64());
        tracing::info!(
            target: "ews_relay::access",
            peer = %client.peer,
            method = head.method,
            path = head.path(),
            status = exchange.status.as_u16(),
            bytes_in = exchange.bytes_in,
            bytes_out = exchange.bytes_out,
            total_ms = millis(exchange.elapsed),
            upstream_ms = exchange.detail.and_then(|d| d.upstream_ms),
        );
    }
}

/// Milliseconds with microsecond resolution, for log lines people read.
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1e3
}

fn upstream_message(status: StatusCode) -> &'static str {
    if status == StatusCode::GATEWAY_TIMEOUT {
        "receiver did not answer in time\n"
    } else {
        "receiver unreachable or failed\n"
    }
}
