//! Managed mode end to end: the relay keeps mailboxes subscribed at the EWS simulator, answers
//! the simulator's pushes itself and delivers notifications to a test receiver, all over real
//! sockets and real TLS (see `common/managed.rs` for the lab). Each test names the promise of
//! the README's "Managed mode" section it checks.

mod common;
#[path = "common/managed.rs"]
mod lab;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use ews_relay::ews::{parse_send_notification, EventType};
use ews_relay::sim::{Auth, EndReason, SubscriptionState};

use lab::*;

const ROOM_A: &str = "room-a@contoso.example";
const ROOM_B: &str = "room-b@contoso.example";
const ROOM_C: &str = "room-c@contoso.example";

/// Validates a whole SOAP envelope against Microsoft's schema with xmllint, as
/// `tests/ews_builders.rs` does; says so and skips when xmllint is missing.
fn assert_schema_valid(xml: &str) {
    let schema = format!(
        "{}/tests/schema/soap-envelope.xsd",
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
