//! Managed EWS mode with `--transport streaming` through the simulator's harder faults: a
//! connection cut inside an envelope, a malformed envelope, a renewal whose new connection is
//! slow to open, an anchor that cannot be subscribed or has moved, one mailbox refused by the
//! receiver, and the `Unsubscribe` and `Subscribe` details app-only OAuth and server affinity
//! depend on. Each test names the promise it checks.

use std::time::{Duration, Instant};

use ews_sim::stream_soap::{parse_ews_request, EwsRequest};
use ews_sim::{ConnectionEnd, RecordedRequest, SimHandle};

use crate::common::managed::{autodiscovers, req_header, req_time, sim_wait};
use crate::streaming::{
    assert_each_once, create, events_arrive, file_lab, lab, prepare_lab, received, resyncs,
    wait_received, wait_resync, wait_streamed, A, B, C, LONG,
};

/// The one open connection serving every id in `ids`: its simulator id.
fn serving_connection(sim: &SimHandle, ids: &[String]) -> u64 {
    let conns = sim.streaming_connections();
    conns
        .iter()
        .find(|c| c.open && ids.iter().all(|id| c.serving.contains(id)))
        .unwrap_or_else(|| panic!("no open connection serves {ids:?}: {conns:#?}"))
        .id
}

/// Waits until connection `id` has ended and an open one serves each of `mailboxes`.
async fn wait_replaced(sim: &SimHandle, id: u64, mailboxes: &[&str]) {
    sim_wait(sim, LONG, "the connection ended", |h| {
        h.streaming_connection(id).and_then(|c| c.end)
    })
    .await;
    wait_streamed(sim, mailboxes).await;
}

/// Recorded streaming `Subscribe` requests with the mailbox each impersonates, oldest first.
fn streaming_subscribes(sim: &SimHandle) -> Vec<(RecordedRequest, String)> {
    sim.requests()
        .into_iter()
        .filter(|r| r.path.eq_ignore_ascii_case("/EWS/Exchange.asmx"))
        .filter_map(|r| match parse_ews_request(r.body.as_bytes()) {
            Ok(EwsRequest::StreamingSubscribe(s)) => Some((r, s.mailbox)),
            _ => None,
        })
        .collect()
}

/// Promise: a connection cut inside an envelope may have carried events the relay never read
/// whole, so every mailbox of that connection gets the resync signal; events created
/// afterwards arrive.
#[tokio::test]
async fn mid_envelope_cut_asks_every_mailbox_of_the_connection_to_resynchronise() {
    let (lab, _c) = lab(&[A, B, C], |_| {}, &[], &[A, B, C]).await;
    let ids = wait_streamed(&lab.sim, &[A, B, C]).await;
    let id = serving_connection(&lab.sim, &ids);
    // Frozen first so A's events are still waiting: they go into the envelope that is cut.
    assert_eq!(lab.sim.streaming_stall(Some(id)), 1);
    create(&lab, A, 2);
    assert_eq!(lab.sim.streaming_cut_mid_envelope(Some(id)), 1);
    let cut = sim_wait(&lab.sim, LONG, "the mid-envelope cut", |h| {
        h.streaming_connection(id).filter(|c| c.end.is_some())
    })
    .await;
    assert_eq!(cut.end, Some(ConnectionEnd::Cut), "{cut:#?}");
    assert!(cut.cut_mid_envelope.is_some_and(|n| n > 0), "{cut:#?}");
    for m in [A, B, C] {
        wait_resync(&lab, m).await;
    }
    wait_streamed(&lab.sim, &[A, B, C]).await;
    for m in [A, B, C] {
        let created = events_arrive(&lab, m, 2).await;
        let got = received(&lab, m);
        for id in &created {
            assert_eq!(got.iter().filter(|g| *g == id).count(), 1, "{got:?}");
        }
    }
}

/// Promise: an envelope that cannot be read ends its connection (a new one replaces it), and
/// since what the stream carried can no longer be trusted, each of its mailboxes gets the
/// resync signal; later events arrive.
#[tokio::test]
async fn malformed_envelope_replaces_the_connection_and_asks_for_resync() {
    let (lab, _c) = lab(&[A, B], |_| {}, &[], &[A, B]).await;
    let ids = wait_streamed(&lab.sim, &[A, B]).await;
    let id = serving_connection(&lab.sim, &ids);
    let before = create(&lab, A, 1);
    wait_received(&lab, A, &before).await;
    assert_eq!(lab.sim.streaming_malformed_envelope(Some(id)), 1);
    wait_replaced(&lab.sim, id, &[A, B]).await;
    let info = lab.sim.streaming_connection(id).unwrap();
    assert_eq!(info.malformed, 1, "{info:#?}");
    assert!(
        matches!(
            info.end,
            Some(ConnectionEnd::ClientGone | ConnectionEnd::Replaced)
        ),
        "the relay gave the connection up or replaced it: {info:#?}"
    );
    wait_resync(&lab, A).await;
    wait_resync(&lab, B).await;
    events_arrive(&lab, A, 2).await;
    events_arrive(&lab, B, 2).await;
}

/// Promise: a renewal whose new `GetStreamingEvents` is slow to be answered loses nothing:
/// the old connection keeps serving until the new one is actually open; events created all
/// through the delay arrive in order, none lost, none twice, and no resync is sent.
///
/// The delay, 15 s, is longer than the relay's 10 s overlap drain limit plus the 3 s a stopped
/// connection keeps reading (`STOP_READ_LIMIT`): a relay that counts the drain from when it
/// asked for the new connection gives the old one up before the new one is open.
#[tokio::test]
async fn slow_renewal_keeps_the_old_connection_until_the_new_one_is_open() {
    let (lab, _c) = lab(&[A], |_| {}, &["--stream-reconnect-after", "1s"], &[A]).await;
    wait_streamed(&lab.sim, &[A]).await;
    let delay = Duration::from_secs(15);
    lab.sim.streaming_delay_head(1, delay);
    let started = Instant::now();
    let mut created = Vec::new();
    while started.elapsed() < delay + Duration::from_secs(2) {
        created.extend(create(&lab, A, 1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        lab.sim.snapshot().faults.streaming_head_delay_remaining,
        0,
        "a GetStreamingEvents was delayed"
    );
    let got = wait_received(&lab, A, &created).await;
    assert_each_once(&created, &got);
    assert_eq!(got.len(), created.len(), "no event delivered twice");
    assert_eq!(resyncs(&lab, A), 0, "a slow renewal needs no resync");
    // Every connection the relay replaced was replaced by Exchange moving its subscription to
    // an open newer one (Replaced); none was given up by the relay while it still served A.
    let conns = lab.sim.streaming_connections();
    let given_up: Vec<_> = conns
        .iter()
        .filter(|c| c.end == Some(ConnectionEnd::ClientGone))
        .map(|c| c.id)
        .collect();
    assert!(
        given_up.is_empty(),
        "connections {given_up:?} were dropped before a newer one was open: {conns:#?}"
    );
}

/// Promise: a group whose anchor mailbox cannot be subscribed (deleted: every Subscribe for it,
/// and anything anchored on it, is refused for good) still streams its other mailboxes: the
/// relay anchors the group on a mailbox that works.
#[tokio::test]
async fn group_whose_anchor_cannot_be_subscribed_streams_the_others() {
    let (mut lab, _c) = prepare_lab(&[A, B, C], |_| {}, &[], &[A, B, C]).await;
    // A is the group's first mailbox, the relay's natural anchor.
    lab.sim.delete_mailbox(A).unwrap();
    lab.launch().await;
    wait_streamed(&lab.sim, &[B, C]).await;
    let refused_a = streaming_subscribes(&lab.sim).into_iter().any(|(r, m)| {
        m.eq_ignore_ascii_case(A) && r.response_code.as_deref() == Some("ErrorNonExistentMailbox")
    });
    assert!(refused_a, "A's Subscribe was refused");
    let conns = lab.sim.streaming_connections();
    let open: Vec<_> = conns.iter().filter(|c| c.open).collect();
    assert!(!open.is_empty());
    assert!(
        open.iter().all(|c| c.anchor.as_deref() != Some(A)),
        "no connection anchored on the deleted mailbox: {conns:#?}"
    );
    events_arrive(&lab, B, 2).await;
    events_arrive(&lab, C, 2).await;
}

/// Promise: when the group's anchor has moved, `GetStreamingEvents` fails as a whole with a
/// connection-level `ErrorProxyRequestNotAllowed` (no `ErrorSubscriptionIds`); the relay asks
/// Autodiscover again and events for every member keep arriving.
#[tokio::test]
async fn connection_level_proxy_error_rediscovers_and_every_member_streams_on() {
    let (lab, _c) = lab(&[A, B, C], |_| {}, &[], &[A, B, C]).await;
    let ids = wait_streamed(&lab.sim, &[A, B, C]).await;
    let id = serving_connection(&lab.sim, &ids);
    let anchor = lab.sim.streaming_connection(id).unwrap().anchor;
    assert_eq!(anchor.as_deref(), Some(A), "A anchors the group");
    // Frozen, so the open connection does not report the move per subscription; then moved
    // and cut: the reconnect meets the moved anchor.
    assert_eq!(lab.sim.streaming_stall(Some(id)), 1);
    lab.sim.move_mailbox(A).unwrap();
    assert_eq!(lab.sim.streaming_cut(Some(id)), 1);
    let refused = sim_wait(&lab.sim, LONG, "a connection-level proxy error", |h| {
        h.streaming_connections().into_iter().find(|c| {
            c.refused_code.as_deref() == Some("ErrorProxyRequestNotAllowed")
                && c.errors.iter().all(|e| e.subscription_ids.is_empty())
        })
    })
    .await;
    let refused_at = humantime::parse_rfc3339(&refused.opened).unwrap();
    sim_wait(&lab.sim, LONG, "Autodiscover asked again", |h| {
        autodiscovers(h)
            .iter()
            .any(|r| req_time(r) >= refused_at)
            .then_some(())
    })
    .await;
    wait_streamed(&lab.sim, &[A, B, C]).await;
    for m in [A, B, C] {
        events_arrive(&lab, m, 1).await;
    }
}

/// Promise: one mailbox whose deliveries the receiver refuses (past `--spool-max-age`) does
/// not stall its group: the other mailbox's events keep arriving meanwhile; once the refused
/// mailbox is accepted again it gets the resync signal (what it missed was dropped).
#[tokio::test]
async fn one_refused_mailbox_does_not_stall_its_group() {
    let (lab, _c) = lab(&[A, B], |_| {}, &["--spool-max-age", "1s"], &[A, B]).await;
    let ids = wait_streamed(&lab.sim, &[A, B]).await;
    assert_eq!(
        serving_connection(&lab.sim, &ids),
        serving_connection(&lab.sim, &ids[..1]),
        "A and B share a connection"
    );
    lab.receiver.set_refused(A, true);
    // A's and B's events, before, while and after A's backlog ages past --spool-max-age (from
    // then on the relay cannot spool A's notifications any more).
    let mut created_b = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        create(&lab, A, 1);
        created_b.extend(create(&lab, B, 1));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let got = wait_received(&lab, B, &created_b).await;
    assert_each_once(&created_b, &got);
    assert!(
        received(&lab, A).is_empty(),
        "nothing of A was accepted while refused"
    );
    let refused = lab.receiver.all().len() - lab.receiver.accepted().len();
    lab.receiver.set_refused(A, false);
    wait_resync(&lab, A).await;
    // A's new events join A's queue: until its backlog has drained, they are still refused for
    // age (dropped, resync); once drained, they flow again.
    lab.wait_relay(LONG, "A's backlog drained", |v| {
        crate::common::managed::mailbox_view(v, A)
            .filter(|m| m["spool_depth"] == 0 && m["resync_pending"] == false)
            .map(|_| ())
    })
    .await;
    // Every notification dropped for age asked for a resync, but a signal already waiting is
    // not queued twice: one (or two, if one was being sent when the next was asked for).
    assert!(
        (1..=2).contains(&resyncs(&lab, A)),
        "{} resync signals for A after {refused} refused deliveries",
        resyncs(&lab, A)
    );
    events_arrive(&lab, A, 1).await;
    events_arrive(&lab, B, 1).await;
}

/// Promise: the `Unsubscribe` of a mailbox removed from the mailboxes file impersonates that
/// mailbox (`ExchangeImpersonation` with its address, `X-AnchorMailbox` too), as app-only
/// OAuth requires.
#[tokio::test]
async fn removed_mailbox_is_unsubscribed_impersonating_it() {
    let (lab, _cert, _dir, file) = file_lab(&[A, B]).await;
    let ids = wait_streamed(&lab.sim, &[A, B]).await;
    crate::common::managed::write_mailboxes(&file, &[A]);
    let (request, unsubscribe) = sim_wait(&lab.sim, LONG, "B's Unsubscribe", |h| {
        h.requests()
            .into_iter()
            .find_map(|r| match parse_ews_request(r.body.as_bytes()) {
                Ok(EwsRequest::Unsubscribe(u)) if u.id == ids[1] => Some((r, u)),
                _ => None,
            })
    })
    .await;
    assert!(
        unsubscribe
            .impersonated
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case(B)),
        "Unsubscribe impersonates the removed mailbox: {}",
        request.body
    );
    assert!(
        req_header(&request, "x-anchormailbox").is_some_and(|m| m.eq_ignore_ascii_case(B)),
        "{:?}",
        request.headers
    );
    assert_eq!(request.response_code.as_deref(), Some("NoError"));
}

/// Promise: while a group has no backend cookie yet, its Subscribes go one at a time (a failed
/// one, here ServerBusy, hands the turn to the next member, so one bad mailbox cannot hold the
/// group); once one has succeeded, every later streaming Subscribe carries the
/// `X-BackEndOverrideCookie` it brought.
#[tokio::test]
async fn failed_first_subscribe_sends_no_other_subscribe_without_the_cookie() {
    let (mut lab, _c) = prepare_lab(&[A, B, C], |_| {}, &[], &[A, B, C]).await;
    lab.sim.server_busy(1, Duration::from_millis(200));
    lab.launch().await;
    wait_streamed(&lab.sim, &[A, B, C]).await;
    let subs = streaming_subscribes(&lab.sim);
    assert_eq!(
        subs[0].0.response_code.as_deref(),
        Some("ErrorServerBusy"),
        "the first Subscribe failed: {subs:#?}"
    );
    let first_ok = subs
        .iter()
        .position(|(r, _)| r.response_code.as_deref() == Some("NoError"))
        .expect("a Subscribe succeeded");
    // Before the first success: one try per mailbox at most, the failed one not retried first.
    let before: Vec<&str> = subs[..=first_ok].iter().map(|(_, m)| m.as_str()).collect();
    let mut distinct = before.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), before.len(), "{before:?}");
    assert!(
        first_ok < 3,
        "the turn passed on after the failure instead of waiting for the failed mailbox"
    );
    for (r, m) in &subs[first_ok + 1..] {
        assert!(
            r.carried_affinity_cookie,
            "Subscribe for {m} (seq {}) without X-BackEndOverrideCookie",
            r.seq
        );
    }
    for m in [A, B, C] {
        events_arrive(&lab, m, 1).await;
    }
}
