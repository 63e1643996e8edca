//! Managed mode end to end: the relay keeps mailboxes subscribed at the EWS simulator, answers
//! the simulator's pushes itself and delivers notifications to a test receiver, all over real
//! sockets and real TLS (see `common/managed.rs` for the lab). Each test names the promise of
//! the README's "Managed mode" section it checks.

use crate::common;
use crate::common::managed as lab;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use ews::{parse_send_notification, EventType};
use ews_sim::{Auth, EndReason, SubscriptionState};

use lab::*;

const ROOM_A: &str = "room-a@contoso.example";
const ROOM_B: &str = "room-b@contoso.example";
const ROOM_C: &str = "room-c@contoso.example";

/// Validates a whole SOAP envelope against Microsoft's schema with xmllint, as
/// `tests/ews_builders.rs` does; says so and skips when xmllint is missing.
fn assert_schema_valid(xml: &str) {
    let schema = format!(
        "{}/../ews/tests/schema/soap-envelope.xsd",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(xml.as_bytes()).unwrap();
    let output = match Command::new("xmllint")
        .args(["--noout", "--schema", &schema])
        .arg(file.path())
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "SKIPPED schema check: xmllint not found (Debian: apt-get install libxml2-utils)"
            );
            return;
        }
        Err(e) => panic!("running xmllint: {e}"),
    };
    assert!(
        output.status.success(),
        "Subscribe body fails the schema:\n{}{}\n{xml}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// 1. Subscribing
// ---------------------------------------------------------------------------------------

/// Promise: every configured mailbox is subscribed, one Subscribe each, with
/// `X-AnchorMailbox` and `ExchangeImpersonation` naming it, the callback URL and
/// StatusFrequency, in a schema-valid body; the relay shows each mailbox `active`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mailbox_is_subscribed_with_anchor_impersonation_and_callback() {
    let rooms = [ROOM_A, ROOM_B, ROOM_C];
    let lab = Lab::start(&rooms, |_| {}, Setup::new(&rooms)).await;
    let ids = lab.wait_active(&rooms).await;

    for (room, id) in rooms.iter().zip(&ids) {
        let sub = lab.sim.subscription(id).expect("simulator knows the id");
        assert_eq!(sub.url, lab.callback_url(), "{room}: callback URL");
        assert_eq!(sub.status_frequency, 1, "{room}: StatusFrequency");
        assert_eq!(sub.state, SubscriptionState::Active);
        let requests = subscribes_for(&lab.sim, room);
        assert_eq!(requests.len(), 1, "{room}: exactly one Subscribe");
        let (req, parsed) = &requests[0];
        assert_eq!(req_header(req, "x-anchormailbox"), Some(*room));
        assert!(req.body.contains("ExchangeImpersonation"), "{}", req.body);
        assert_eq!(parsed.mailbox, *room, "impersonated mailbox");
        assert_eq!(parsed.url, lab.callback_url());
        assert_eq!(parsed.status_frequency, 1);
        assert_eq!(
            parsed.watermark, None,
            "first subscription has no watermark"
        );
        assert_eq!(req.response_code.as_deref(), Some("NoError"));
    }
    let (first, _) = &subscribes(&lab.sim)[0];
    assert_schema_valid(&first.body);
}

// ---------------------------------------------------------------------------------------
// 2. Delivering
// ---------------------------------------------------------------------------------------

/// Promise: events reach the receiver as the simulator's own SendNotification plus
/// `X-EWS-Mailbox` and `X-EWS-Subscription-Id`; keep-alives are answered by the relay and not
/// forwarded; Exchange hears `OK`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_receiver_with_mailbox_and_subscription_headers() {
    let rooms = [ROOM_A, ROOM_B];
    let lab = Lab::start(&rooms, |_| {}, Setup::new(&rooms)).await;
    let ids = lab.wait_active(&rooms).await;

    let created = lab
        .sim
        .create_events(ROOM_A, EventType::Created, 3)
        .unwrap();
    let created_b = lab
        .sim
        .create_events(ROOM_B, EventType::NewMail, 1)
        .unwrap();
    let got = lab.receiver.wait_events(ROOM_A, &created, WAIT).await;
    assert_eq!(got, created);
    lab.receiver.wait_events(ROOM_B, &created_b, WAIT).await;

    for (room, id) in rooms.iter().zip(&ids) {
        for seen in lab.receiver.accepted_for(room) {
            assert_eq!(header(&seen, "x-ews-subscription-id"), Some(id.as_str()));
            assert_eq!(seen.method, "POST");
            assert_eq!(seen.path, CALLBACK_PATH);
            let n = parse_send_notification(&seen.body).expect("a SendNotification body");
            let note = n.messages[0].notification.as_ref().expect("events");
            assert_eq!(note.subscription_id, id.as_str(), "body and header agree");
            assert!(
                note.events.iter().all(|e| e.kind != EventType::Status),
                "a keep-alive was forwarded"
            );
        }
    }

    // Let a few keep-alives pass: none of them may reach the receiver.
    let before = lab
        .sim
        .subscription(&ids[0])
        .unwrap()
        .counters
        .status_events;
    let id = ids[0].clone();
    sim_wait(&lab.sim, WAIT, "three more keep-alives", |h| {
        (h.subscription(&id)?.counters.status_events >= before + 3).then_some(())
    })
    .await;
    let all = lab.receiver.all();
    assert_eq!(all.len(), 2, "only the two event notifications: {all:?}");
    for (id, events) in ids.iter().zip([3, 1]) {
        let sub = lab.sim.subscription(id).unwrap();
        assert_eq!(sub.state, SubscriptionState::Active, "Exchange heard OK");
        assert_eq!(sub.counters.pushes_failed, 0);
        assert_eq!(sub.counters.events_delivered, events);
    }
}

// ---------------------------------------------------------------------------------------
// 3. Lost keep-alives
// ---------------------------------------------------------------------------------------

/// Promise: a subscription silent for `--heartbeat-timeout` is resubscribed from its last
/// watermark, events created meanwhile are delivered, and the other mailboxes keep their
/// subscriptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_subscription_is_resubscribed_from_its_last_watermark() {
    let rooms = [ROOM_A, ROOM_B, ROOM_C];
    let lab = Lab::start(&rooms, |_| {}, Setup::new(&rooms)).await;
    let ids = lab.wait_active(&rooms).await;
    let before = lab
        .sim
        .create_events(ROOM_A, EventType::Created, 2)
        .unwrap();
    lab.receiver.wait_events(ROOM_A, &before, WAIT).await;

    let stopped = Instant::now();
    lab.sim.stop_keepalives(&ids[0]).unwrap();
    // Meanwhile, with no subscription pushing them: these must not be lost.
    let meanwhile = lab
        .sim
        .create_events(ROOM_A, EventType::Modified, 3)
        .unwrap();

    // The last watermark the relay holds while the old subscription is still its current one.
    let old = ids[0].clone();
    let mut last_watermark = None;
    let new_id = lab
        .wait_relay(
            HEARTBEAT + Duration::from_secs(5),
            "a new subscription for room A",
            |v| {
                let view = mailbox_view(v, ROOM_A)?;
                if view["subscription_id"].as_str() == Some(old.as_str()) {
                    last_watermark = view["last_watermark"].as_str().map(str::to_owned);
                    return None;
                }
                (view["state"] == "active")
                    .then(|| view["subscription_id"].as_str().unwrap().to_owned())
            },
        )
        .await;
    let took = stopped.elapsed();
    assert!(
        took <= HEARTBEAT + Duration::from_millis(1500),
        "resubscribed {took:?} after the keep-alives stopped (timeout {HEARTBEAT:?})"
    );
    let subs = subscribes_for(&lab.sim, ROOM_A);
    assert_eq!(subs.len(), 2, "one resubscribe");
    let (req, parsed) = &subs[1];
    assert_eq!(req.response_code.as_deref(), Some("NoError"));
    assert!(last_watermark.is_some());
    assert_eq!(
        parsed.watermark, last_watermark,
        "resubscribed from the last watermark"
    );

    let got = lab.receiver.wait_events(ROOM_A, &meanwhile, WAIT).await;
    assert_in_order_none_lost(&[before, meanwhile.clone()].concat(), &got);
    for seen in lab.receiver.accepted_for(ROOM_A).iter().skip(1) {
        if event_watermarks(&seen.body)
            .iter()
            .any(|w| meanwhile.contains(w))
        {
            assert_eq!(header(seen, "x-ews-subscription-id"), Some(new_id.as_str()));
        }
    }
    // The others were not touched.
    for (room, id) in rooms.iter().zip(&ids).skip(1) {
        assert_eq!(
            subscribes_for(&lab.sim, room).len(),
            1,
            "{room} resubscribed"
        );
        assert!(lab.sim.subscription(id).unwrap().is_live(), "{room}");
        let v = lab.api().await;
        assert_eq!(
            mailbox_view(&v, room).unwrap()["subscription_id"],
            id.as_str()
        );
    }
    assert_eq!(
        lab.sim.subscription(&old).unwrap().state,
        SubscriptionState::Ended(EndReason::Dropped)
    );
}

// ---------------------------------------------------------------------------------------
// 4. Errors, one class at a time
// ---------------------------------------------------------------------------------------

/// The first two Subscribe attempts for `mailbox`: (failed one, the retry).
fn first_retry(lab: &Lab, mailbox: &str) -> (Duration, Option<String>) {
    let subs = subscribes_for(&lab.sim, mailbox);
    assert!(subs.len() >= 2, "no retry: {:?}", subs.len());
    let gap = req_time(&subs[1].0)
        .duration_since(req_time(&subs[0].0))
        .unwrap();
    (gap, subs[0].0.response_code.clone())
}

/// Promise: `ErrorServerBusy` is waited out for its `BackOffMilliseconds` before retrying,
/// and the mailbox shows it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_busy_waits_back_off_milliseconds() {
    let mut lab = Lab::prepare(&[ROOM_A], |_| {}, Setup::new(&[ROOM_A])).await;
    lab.sim.server_busy(1, Duration::from_millis(1500));
    lab.launch().await;
    lab.wait_relay(WAIT, "room A backing off on ErrorServerBusy", |v| {
        let m = mailbox_view(v, ROOM_A)?;
        (m["state"] == "backing-off" && m["last_error"].as_str()?.contains("ErrorServerBusy"))
            .then_some(())
    })
    .await;
    lab.wait_active(&[ROOM_A]).await;
    let (gap, code) = first_retry(&lab, ROOM_A);
    assert_eq!(code.as_deref(), Some("ErrorServerBusy"));
    assert!(gap >= Duration::from_millis(1500), "retried after {gap:?}");
    assert_eq!(subscribes_for(&lab.sim, ROOM_A).len(), 2);
}

/// Promise: HTTP 503 is waited out for its `Retry-After` before retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_503_waits_retry_after() {
    let mut lab = Lab::prepare(&[ROOM_A], |_| {}, Setup::new(&[ROOM_A])).await;
    lab.sim.unavailable(1, Some(1));
    lab.launch().await;
    lab.wait_relay(WAIT, "room A backing off on HTTP 503", |v| {
        let m = mailbox_view(v, ROOM_A)?;
        (m["state"] == "backing-off" && m["last_error"].as_str()?.contains("503")).then_some(())
    })
    .await;
    lab.wait_active(&[ROOM_A]).await;
    // The 503 comes before the body is read, so the failed attempt is found by its status.
    let ews: Vec<_> = lab
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path.eq_ignore_ascii_case("/EWS/Exchange.asmx"))
        .collect();
    assert_eq!(ews.len(), 2, "one refused, one retry");
    assert_eq!(ews[0].status, 503);
    assert_eq!(ews[1].response_code.as_deref(), Some("NoError"));
    let gap = req_time(&ews[1]).duration_since(req_time(&ews[0])).unwrap();
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}");
}

/// Promise: `ErrorProxyRequestNotAllowed` (the mailbox moved) makes the relay run Autodiscover
/// again, then subscribe successfully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_mailbox_is_rediscovered_then_subscribed() {
    let rooms = [ROOM_A, ROOM_B];
    let mut setup = Setup::new(&rooms);
    setup.endpoint = Endpoint::Autodiscover;
    let lab = Lab::start(&rooms, |_| {}, setup).await;
    let ids = lab.wait_active(&rooms).await;
    assert!(!autodiscovers(&lab.sim).is_empty(), "Autodiscover first");

    lab.sim.move_mailbox(ROOM_A).unwrap();
    let mark = lab.sim.requests().last().unwrap().seq;
    // Make the relay subscribe again: Exchange dropped the subscription in the move.
    lab.sim.stop_keepalives(&ids[0]).unwrap();
    let old = ids[0].clone();
    lab.wait_relay(WAIT, "room A active on a new subscription", |v| {
        let m = mailbox_view(v, ROOM_A)?;
        (m["state"] == "active" && m["subscription_id"].as_str()? != old).then_some(())
    })
    .await;
    let after: Vec<_> = lab
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.seq > mark)
        .collect();
    let refused = after
        .iter()
        .position(|r| r.response_code.as_deref() == Some("ErrorProxyRequestNotAllowed"))
        .expect("a Subscribe refused with ErrorProxyRequestNotAllowed");
    let discovered = after
        .iter()
        .position(|r| {
            r.path
                .eq_ignore_ascii_case("/autodiscover/autodiscover.svc")
                && r.body.contains(ROOM_A)
        })
        .expect("Autodiscover asked again about room A");
    let subscribed = after
        .iter()
        .rposition(|r| r.response_code.as_deref() == Some("NoError") && r.body.contains(ROOM_A))
        .expect("a successful Subscribe");
    assert!(
        refused < discovered && discovered < subscribed,
        "{after:#?}"
    );
    assert!(!lab.sim.mailboxes().iter().any(|m| m.moved));
    assert!(
        lab.sim.subscription(&ids[1]).unwrap().is_live(),
        "room B untouched"
    );
}

/// Promise: an error push (`ErrorReadEventsFailed`) is answered, then the mailbox is
/// rediscovered and resubscribed from its last watermark at once (not after the heartbeat
/// timeout), and no event is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_push_rediscovers_and_resubscribes_at_once() {
    let mut setup = Setup::new(&[ROOM_A]);
    setup.endpoint = Endpoint::Autodiscover;
    setup.heartbeat = Duration::from_secs(30);
    let lab = Lab::start(&[ROOM_A], |_| {}, setup).await;
    let ids = lab.wait_active(&[ROOM_A]).await;
    let before = lab
        .sim
        .create_events(ROOM_A, EventType::Created, 2)
        .unwrap();
    lab.receiver.wait_events(ROOM_A, &before, WAIT).await;

    let mark = lab.sim.requests().last().unwrap().seq;
    let asked = Instant::now();
    lab.sim.push_error_notification(&ids[0]).unwrap();
    let meanwhile = lab
        .sim
        .create_events(ROOM_A, EventType::Deleted, 2)
        .unwrap();
    let old = ids[0].clone();
    lab.wait_relay(WAIT, "room A active on a new subscription", |v| {
        let m = mailbox_view(v, ROOM_A)?;
        (m["state"] == "active" && m["subscription_id"].as_str()? != old).then_some(())
    })
    .await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "took {:?}: waited for the heartbeat instead of acting on the error",
        asked.elapsed()
    );
    // The relay answers the error push `Unsubscribe`; either way Exchange has ended it.
    assert!(!lab.sim.subscription(&old).unwrap().is_live());
    let after: Vec<_> = lab
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.seq > mark)
        .collect();
    let discovered = after
        .iter()
        .position(|r| {
            r.path
                .eq_ignore_ascii_case("/autodiscover/autodiscover.svc")
        })
        .expect("a fresh Autodiscover");
    let subs = subscribes_for(&lab.sim, ROOM_A);
    let (last, parsed) = subs.last().unwrap();
    assert!(
        last.seq > after[discovered].seq,
        "Autodiscover before the Subscribe"
    );
    assert!(
        parsed.watermark.is_some(),
        "resubscribed from the last watermark"
    );
    let got = lab.receiver.wait_events(ROOM_A, &meanwhile, WAIT).await;
    assert_in_order_none_lost(&[before, meanwhile].concat(), &got);
}

/// Promise: a refused watermark (`ErrorInvalidWatermark`) makes the relay subscribe without
/// one and send the receiver `X-EWS-Resync-Required: <smtp>` (empty body), in order before
/// the mailbox's next notifications; the status page shows the resync until it is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_watermark_resubscribes_without_one_and_asks_for_a_resync() {
    let lab = Lab::start(&[ROOM_A], |_| {}, Setup::new(&[ROOM_A])).await;
    let ids = lab.wait_active(&[ROOM_A]).await;
    lab.sim.invalidate_watermarks(ROOM_A).unwrap();
    lab.sim.stop_keepalives(&ids[0]).unwrap();
    let old = ids[0].clone();
    let new_id = lab
        .wait_relay(WAIT, "room A active on a new subscription", |v| {
            let m = mailbox_view(v, ROOM_A)?;
            let id = m["subscription_id"].as_str()?;
            (m["state"] == "active" && id != old).then(|| id.to_owned())
        })
        .await;
    let subs = subscribes_for(&lab.sim, ROOM_A);
    assert_eq!(subs.len(), 3, "first, refused, without watermark");
    assert!(subs[1].1.watermark.is_some());
    assert_eq!(
        subs[1].0.response_code.as_deref(),
        Some("ErrorInvalidWatermark")
    );
    assert_eq!(subs[2].1.watermark, None, "subscribed without a watermark");
    assert_eq!(subs[2].0.response_code.as_deref(), Some("NoError"));

    let events = lab
        .sim
        .create_events(ROOM_A, EventType::Created, 1)
        .unwrap();
    lab.receiver.wait_events(ROOM_A, &events, WAIT).await;
    let seen = lab.receiver.accepted_for(ROOM_A);
    let resync = seen
        .iter()
        .position(|s| header(s, "x-ews-resync-required").is_some())
        .expect("a resync POST");
    assert_eq!(header(&seen[resync], "x-ews-resync-required"), Some(ROOM_A));
    assert!(seen[resync].body.is_empty(), "resync POST has no body");
    let first_event = seen
        .iter()
        .position(|s| !event_watermarks(&s.body).is_empty())
        .unwrap();
    assert!(
        resync < first_event,
        "resync signal after the events it precedes"
    );
    assert_eq!(
        header(&seen[first_event], "x-ews-subscription-id"),
        Some(new_id.as_str())
    );
    lab.wait_relay(WAIT, "resync no longer pending once delivered", |v| {
        (mailbox_view(v, ROOM_A)?["resync_pending"] == false).then_some(())
    })
    .await;
}

/// Promise: a permanent error (no such mailbox) is shown as `failed` with its code and retried
/// rarely (minutes), not at the transient rate (seconds); other mailboxes are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_fails_the_mailbox_and_is_not_retried_at_full_rate() {
    const GHOST: &str = "nobody@contoso.example";
    let lab = Lab::start(&[ROOM_A], |_| {}, Setup::new(&[ROOM_A, GHOST])).await;
    lab.wait_active(&[ROOM_A]).await;
    lab.wait_relay(WAIT, "the unknown mailbox failed", |v| {
        let m = mailbox_view(v, GHOST)?;
        (m["state"] == "failed"
            && m["last_error"]
                .as_str()?
                .contains("ErrorNonExistentMailbox"))
        .then_some(())
    })
    .await;
    // A negative check needs a window: a transient error would be retried within 2 s
    // (TRANSIENT_BASE, jittered 1..2 s); a permanent one not before minutes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = subscribes_for(&lab.sim, GHOST);
    assert_eq!(attempts.len(), 1, "retried at full rate");
    assert_eq!(
        attempts[0].0.response_code.as_deref(),
        Some("ErrorNonExistentMailbox")
    );
    let v = lab.api().await;
    assert_eq!(mailbox_view(&v, GHOST).unwrap()["state"], "failed");
    assert_eq!(mailbox_view(&v, ROOM_A).unwrap()["state"], "active");
}

// ---------------------------------------------------------------------------------------
// 5. and 6. The spool
// ---------------------------------------------------------------------------------------

/// Creates `count` events in `mailbox` and waits until the simulator got an answer for them
/// (the relay spooled or delivered them); returns their watermarks.
async fn pushed(lab: &Lab, mailbox: &str, count: usize) -> Vec<String> {
    let before: u64 = lab
        .sim
        .subscriptions()
        .iter()
        .filter(|s| s.mailbox == mailbox)
        .map(|s| s.counters.events_delivered)
        .sum();
    let created = lab
        .sim
        .create_events(mailbox, EventType::Created, count)
        .unwrap();
    let want = before + count as u64;
    sim_wait(&lab.sim, WAIT, "the events pushed and answered", |h| {
        let done: u64 = h
            .subscriptions()
            .iter()
            .filter(|s| s.mailbox == mailbox)
            .map(|s| s.counters.events_delivered)
            .sum();
        (done >= want).then_some(())
    })
    .await;
    created
}

/// Promise: while the receiver is down, notifications are spooled and Exchange still hears
/// `OK` (its subscriptions stay alive); once the receiver is back, everything is delivered in
/// order per mailbox, marked `X-EWS-Received-At`, nothing lost, without waiting out a back-off
/// that grew with the number of notifications rather than the outage's length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_outage_is_spooled_and_replayed_in_order() {
    let rooms = [ROOM_A, ROOM_B];
    let lab = Lab::start(&rooms, |_| {}, Setup::new(&rooms)).await;
    let ids = lab.wait_active(&rooms).await;
    let first = pushed(&lab, ROOM_A, 1).await;

    lab.receiver.set_down(true);
    let mut created_a = first.clone();
    for _ in 0..3 {
        created_a.extend(pushed(&lab, ROOM_A, 2).await);
    }
    let created_b = pushed(&lab, ROOM_B, 2).await;
    let v = lab
        .wait_relay(WAIT, "four notifications spooled", |v| {
            (v["spool_depth"].as_u64()? == 4).then(|| v.clone())
        })
        .await;
    assert_eq!(mailbox_view(&v, ROOM_A).unwrap()["spool_depth"], 3);
    assert_eq!(mailbox_view(&v, ROOM_B).unwrap()["spool_depth"], 1);
    for id in &ids {
        let sub = lab.sim.subscription(id).unwrap();
        assert_eq!(sub.state, SubscriptionState::Active, "Exchange heard OK");
        assert_eq!(
            sub.counters.pushes_failed, 0,
            "Exchange heard OK every time"
        );
    }
    assert!(
        lab.receiver.all().len() > 1,
        "the relay did try the receiver"
    );

    lab.receiver.set_down(false);
    let back = Instant::now();
    let got_a = lab.receiver.wait_events(ROOM_A, &created_a, WAIT).await;
    let got_b = lab.receiver.wait_events(ROOM_B, &created_b, WAIT).await;
    // The outage lasted about a second; back-off that grows with time replays within a few.
    assert!(
        back.elapsed() < Duration::from_secs(5),
        "replayed {:?} after the receiver came back",
        back.elapsed()
    );
    assert_in_order_none_lost(&created_a, &got_a);
    assert_in_order_none_lost(&created_b, &got_b);
    let replayed: Vec<_> = lab
        .receiver
        .accepted()
        .into_iter()
        .filter(|s| header(s, "x-ews-received-at").is_some())
        .collect();
    assert_eq!(
        replayed.len(),
        4,
        "the spooled ones carry X-EWS-Received-At"
    );
    for s in &replayed {
        humantime::parse_rfc3339(header(s, "x-ews-received-at").unwrap()).unwrap();
    }
    lab.wait_relay(WAIT, "an empty spool", |v| {
        (v["spool_depth"].as_u64()? == 0).then_some(())
    })
    .await;
}

/// The simulator for restart tests: Exchange's retry schedule scaled so a push that fails
/// during the restart is retried after 1.5 s, and the subscription lives 3 s without answers.
fn slow_retries(c: &mut ews_sim::SimConfig) {
    c.time_factor = 0.05;
}

/// Promise: spooled notifications survive a restart of the relay (shutdown while the
/// receiver is down), and the restarted relay answers its stored subscription instead of
/// making a new one; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_and_subscriptions_survive_a_restart() {
    let mut setup = Setup::new(&[ROOM_A]);
    setup.heartbeat = Duration::from_secs(4);
    let mut lab = Lab::start(&[ROOM_A], slow_retries, setup).await;
    let ids = lab.wait_active(&[ROOM_A]).await;
    lab.receiver.set_down(true);
    let mut created = pushed(&lab, ROOM_A, 2).await;
    created.extend(pushed(&lab, ROOM_A, 1).await);
    lab.wait_relay(WAIT, "two notifications spooled", |v| {
        (v["spool_depth"].as_u64()? == 2).then_some(())
    })
    .await;

    lab.stop_relay().await;
    // While no relay listens: Exchange's push fails and is retried.
    created.extend(
        lab.sim
            .create_events(ROOM_A, EventType::Modified, 1)
            .unwrap(),
    );
    lab.start_again().await;

    lab.receiver.set_down(false);
    let got = lab.receiver.wait_events(ROOM_A, &created, WAIT).await;
    assert_in_order_none_lost(&created, &got);
    let v = lab.api().await;
    assert_eq!(
        mailbox_view(&v, ROOM_A).unwrap()["subscription_id"],
        ids[0].as_str(),
        "the restarted relay kept its stored subscription"
    );
    assert_eq!(
        subscribes_for(&lab.sim, ROOM_A).len(),
        1,
        "no new Subscribe"
    );
    let sub = lab.sim.subscription(&ids[0]).unwrap();
    assert!(
        sub.is_live(),
        "the stored subscription was answered OK: {sub:?}"
    );
}

/// Promise: the same after `kill -9` of the real binary: the spool and the subscription ids
/// are durable without any shutdown path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_and_subscriptions_survive_kill_9() {
    let mut setup = Setup::new(&[ROOM_A]);
    setup.heartbeat = Duration::from_secs(4);
    let mut lab = Lab::prepare(&[ROOM_A], slow_retries, setup).await;
    let mut binary = lab.spawn_binary().await;
    let admin = binary.admin;
    let sim = lab.sim.handle.clone();
    let id = wait_api(admin, WAIT, "room A active", |v| {
        let m = mailbox_view(v, ROOM_A)?;
        let id = m["subscription_id"].as_str()?;
        (m["state"] == "active" && live_subscription(&sim, ROOM_A)?.id == id).then(|| id.to_owned())
    })
    .await;
    lab.receiver.set_down(true);
    let mut created = pushed(&lab, ROOM_A, 2).await;
    created.extend(pushed(&lab, ROOM_A, 1).await);
    wait_api(admin, WAIT, "two notifications spooled", |v| {
        (v["spool_depth"].as_u64()? == 2).then_some(())
    })
    .await;

    binary.kill_9();
    created.extend(
        lab.sim
            .create_events(ROOM_A, EventType::Modified, 1)
            .unwrap(),
    );
    lab.start_again().await;

    lab.receiver.set_down(false);
    let got = lab.receiver.wait_events(ROOM_A, &created, WAIT).await;
    assert_in_order_none_lost(&created, &got);
    let v = lab.api().await;
    assert_eq!(
        mailbox_view(&v, ROOM_A).unwrap()["subscription_id"],
        id.as_str(),
        "the restarted relay kept its stored subscription"
    );
    assert_eq!(
        subscribes_for(&lab.sim, ROOM_A).len(),
        1,
        "no new Subscribe"
    );
    assert!(lab.sim.subscription(&id).unwrap().is_live());
}

// ---------------------------------------------------------------------------------------
// 7. Ending subscriptions
// ---------------------------------------------------------------------------------------

/// Promise: a mailbox removed from `--mailboxes-file` is ended (its subscription answered
/// `Unsubscribe`) and one added is subscribed, without touching the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailboxes_file_changes_unsubscribe_removed_and_subscribe_added() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mailboxes.txt");
    write_mailboxes(&file, &[ROOM_A, ROOM_B]);
    let mut setup = Setup::new(&[]);
    setup.mailboxes_file = Some(file.clone());
    let rooms = [ROOM_A, ROOM_B, ROOM_C];
    let lab = Lab::start(&rooms, |_| {}, setup).await;
    let ids = lab.wait_active(&[ROOM_A, ROOM_B]).await;

    write_mailboxes(&file, &[ROOM_A, ROOM_C]);
    let removed = ids[1].clone();
    sim_wait(
        &lab.sim,
        WAIT,
        "room B's subscription ended by Unsubscribe",
        |h| {
            (h.subscription(&removed)?.state == SubscriptionState::Ended(EndReason::Unsubscribed))
                .then_some(())
        },
    )
    .await;
    lab.wait_active(&[ROOM_C]).await;
    let v = lab.api().await;
    assert!(mailbox_view(&v, ROOM_B).is_none(), "room B still listed");
    assert_eq!(
        mailbox_view(&v, ROOM_A).unwrap()["subscription_id"],
        ids[0].as_str()
    );
    assert!(lab.sim.subscription(&ids[0]).unwrap().is_live());
    assert_eq!(
        subscribes_for(&lab.sim, ROOM_B).len(),
        1,
        "room B not resubscribed"
    );
}

/// Promise: a subscription the relay replaced is answered `Unsubscribe` when Exchange next
/// pushes to it (Exchange Online allows only 20 per mailbox). Here keep-alives come every
/// 2.5 s but the relay gives up after 1 s of silence, so each subscription is replaced while
/// Exchange still has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_subscription_is_answered_unsubscribe() {
    let mut setup = Setup::new(&[ROOM_A]);
    setup.heartbeat = Duration::from_secs(1);
    let lab = Lab::start(
        &[ROOM_A],
        |c| c.status_period = Duration::from_millis(2500),
        setup,
    )
    .await;
    let first = sim_wait(&lab.sim, WAIT, "a first subscription", |h| {
        live_subscription(h, ROOM_A).map(|s| s.id)
    })
    .await;
    sim_wait(
        &lab.sim,
        WAIT,
        "the first subscription ended by Unsubscribe",
        |h| {
            (h.subscription(&first)?.state == SubscriptionState::Ended(EndReason::Unsubscribed))
                .then_some(())
        },
    )
    .await;
    assert!(
        subscribes_for(&lab.sim, ROOM_A).len() >= 2,
        "it was replaced"
    );
    let v = lab.api().await;
    assert_ne!(
        mailbox_view(&v, ROOM_A).unwrap()["subscription_id"],
        first.as_str()
    );
}

// ---------------------------------------------------------------------------------------
// 8. OAuth
// ---------------------------------------------------------------------------------------

/// The relay flags for the simulator's OAuth (see [`sim_oauth`]).
pub(crate) fn oauth(lab: &mut Lab) {
    let secret = lab.cert.dir.path().join("client-secret");
    std::fs::write(&secret, "s3cret-value\n").unwrap();
    lab.setup.auth = vec![
        "--auth".into(),
        "oauth".into(),
        "--oauth-token-url".into(),
        lab.sim.token_url(),
        "--client-id".into(),
        "relay-app".into(),
        "--client-secret-file".into(),
        secret.display().to_string(),
    ];
}

pub(crate) fn sim_oauth(lifetime: Duration) -> impl FnOnce(&mut ews_sim::SimConfig) {
    move |c| {
        c.auth = Auth::OAuth {
            client_id: "relay-app".into(),
            client_secret: "s3cret-value".into(),
            token_lifetime: lifetime,
        }
    }
}

fn token_requests(lab: &Lab) -> Vec<ews_sim::RecordedRequest> {
    lab.sim
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/oauth2/v2.0/token"))
        .collect()
}

/// Promise: one token is fetched and reused for every mailbox, and fetched again once it
/// nears expiry (before EWS would refuse it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_is_reused_and_renewed_before_expiry() {
    let rooms = [ROOM_A, ROOM_B, ROOM_C];
    let lifetime = Duration::from_secs(3);
    let mut lab = Lab::prepare(&rooms, sim_oauth(lifetime), Setup::new(&rooms)).await;
    oauth(&mut lab);
    lab.launch().await;
    let ids = lab.wait_active(&rooms).await;
    let tokens = token_requests(&lab);
    assert_eq!(tokens.len(), 1, "one token for three Subscribes");
    assert!(tokens[0].body.contains("grant_type=client_credentials"));
    assert!(tokens[0].body.contains("client_id=relay-app"));
    for (req, _) in subscribes(&lab.sim) {
        assert!(
            req_header(&req, "authorization").is_some_and(|a| a.starts_with("Bearer ")),
            "Subscribe without a Bearer token"
        );
    }

    // The resubscribe comes after the heartbeat timeout (1.5 s), past the token's half-life.
    lab.sim.stop_keepalives(&ids[0]).unwrap();
    let old = ids[0].clone();
    lab.wait_relay(WAIT, "room A on a new subscription", |v| {
        let m = mailbox_view(v, ROOM_A)?;
        (m["state"] == "active" && m["subscription_id"].as_str()? != old).then_some(())
    })
    .await;
    assert_eq!(token_requests(&lab).len(), 2, "renewed");
    assert!(
        lab.sim.requests().iter().all(|r| r.status != 401),
        "a request went out with an expired token"
    );
}

/// Promise: when EWS answers 401 (token revoked), the relay fetches a fresh token once and
/// retries, and the Subscribe succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_is_refreshed_on_401() {
    let lifetime = Duration::from_secs(3600);
    let mut lab = Lab::prepare(&[ROOM_A], sim_oauth(lifetime), Setup::new(&[ROOM_A])).await;
    oauth(&mut lab);
    lab.launch().await;
    let ids = lab.wait_active(&[ROOM_A]).await;
    assert_eq!(token_requests(&lab).len(), 1);

    assert_eq!(lab.sim.revoke_tokens(), 1);
    let mark = lab.sim.requests().last().unwrap().seq;
    lab.sim.stop_keepalives(&ids[0]).unwrap();
    let old = ids[0].clone();
    lab.wait_relay(WAIT, "room A on a new subscription", |v| {
        let m = mailbox_view(v, ROOM_A)?;
        (m["state"] == "active" && m["subscription_id"].as_str()? != old).then_some(())
    })
    .await;
    let after: Vec<_> = lab
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.seq > mark)
        .collect();
    let kinds: Vec<String> = after
        .iter()
        .map(|r| {
            if r.path.ends_with("/oauth2/v2.0/token") {
                "token".to_owned()
            } else {
                r.status.to_string()
            }
        })
        .collect();
    assert_eq!(kinds, ["401", "token", "200"], "{after:#?}");
    assert_eq!(lab.sim.snapshot().tokens_issued, 2);
}

// ---------------------------------------------------------------------------------------
// 9. Someone else's subscriptions
// ---------------------------------------------------------------------------------------

/// Promise: notifications for subscription ids the relay did not create pass through to the
/// receiver as in passthrough mode: same body, no `X-EWS-Mailbox`, the receiver's answer
/// returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_subscription_ids_pass_through() {
    let lab = Lab::start(&[ROOM_A], |_| {}, Setup::new(&[ROOM_A])).await;
    lab.wait_active(&[ROOM_A]).await;
    let body = common::fixture("send-notification-events.xml");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", lab.port).parse().unwrap();
    let mut client = common::https_client(addr, &lab.cert.der, None)
        .await
        .unwrap();
    let (status, _, answer) =
        common::send(&mut client, common::post(CALLBACK_PATH, body.clone())).await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&answer).contains(">OK<"),
        "the receiver's answer is returned"
    );
    let seen = lab.receiver.accepted();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, body, "forwarded unchanged");
    assert!(header(&seen[0], "x-ews-mailbox").is_none());
    assert!(header(&seen[0], "x-ews-subscription-id").is_none());
    assert_eq!(header(&seen[0], "x-forwarded-for"), Some("127.0.0.1"));
}

/// A mailbox removed while its Subscribe is in flight must not come back: the subscription
/// Exchange creates for it is answered `Unsubscribe`, and the mailbox stays removed.
#[tokio::test]
async fn mailbox_removed_during_its_subscribe_stays_removed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mailboxes.txt");
    write_mailboxes(&file, &[ROOM_A]);
    let mut setup = Setup::new(&[]);
    setup.mailboxes_file = Some(file.clone());
    let lab = Lab::start(&[ROOM_A, ROOM_B], |_| {}, setup).await;
    lab.wait_active(&[ROOM_A]).await;
    // Every EWS answer now takes 3 s: room B's Subscribe is still in flight when it is removed.
    lab.sim.set_response_delay(Duration::from_secs(3));
    write_mailboxes(&file, &[ROOM_A, ROOM_B]);
    sim_wait(&lab.sim, WAIT, "room B's Subscribe sent", |h| {
        (!subscribes_for(h, ROOM_B).is_empty()).then_some(())
    })
    .await;
    write_mailboxes(&file, &[ROOM_A]);
    // The simulator creates the subscription, pushes its first StatusEvent, and the relay
    // answers Unsubscribe.
    sim_wait(
        &lab.sim,
        WAIT,
        "room B's new subscription ended by Unsubscribe",
        |h| {
            h.subscriptions()
                .into_iter()
                .find(|s| s.mailbox.eq_ignore_ascii_case(ROOM_B))
                .filter(|s| s.state == SubscriptionState::Ended(EndReason::Unsubscribed))
                .map(|_| ())
        },
    )
    .await;
    lab.sim.set_response_delay(Duration::ZERO);
    let v = lab.api().await;
    assert!(
        mailbox_view(&v, ROOM_B).is_none(),
        "room B came back: {v:#}"
    );
}
