//! The relay's EWS awareness in the forwarding path: non-notifications refused, subscriptions
//! tracked from the traffic, shown in /api/subscriptions and /metrics.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;
use serde_json::Value;

const EVENTS_SUB: &str =
    "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAAB9c1Qm0VhIRb3ZkRf0x2aa";
const EVENTS_LAST_WATERMARK: &str = "AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQcwQAAAAAAAAE=";
const STATUS_SUB: &str =
    "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAACkGm2Fhz9CTYx5mQ9Xh3l0";
const STATUS_WATERMARK: &str = "AQAAAOpvG0LURVdOhQkPOWZLPcJGVQUAAAAAAAE=";

async fn subscriptions(relay: &Relay) -> Vec<Value> {
    let (status, body) = admin_get(relay.admin, "/api/subscriptions").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    v["subscriptions"].as_array().unwrap().clone()
}

fn find<'a>(subs: &'a [Value], id: &str) -> &'a Value {
    subs.iter()
        .find(|s| s["subscription_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {subs:#?}"))
}

#[tokio::test]
async fn junk_post_gets_400_and_never_reaches_the_receiver() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let relay = Relay::start(receiver.addr, &[]).await;
    let mut c = relay.client().await;
    for junk in [
        &b"{\"hello\": \"world\"}"[..],
        b"",
        b"<html><body>hi</body></html>",
        b"<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body><Other/></s:Body></s:Envelope>",
        b"<!DOCTYPE x [<!ENTITY a \"aaaa\">]><x>&a;</x>",
    ] {
        let (s, _, body) = send(&mut c, post("/", junk.to_vec())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(junk));
        assert!(String::from_utf8_lossy(&body).contains("SendNotification"));
    }
    assert!(receiver.seen().is_empty(), "no junk reached the receiver");
    assert_eq!(
        relay
            .metric("ews_relay_rejected_bodies_total{source=\"ews\"}")
            .await,
        5.0
    );
    assert!(subscriptions(&relay).await.is_empty());
    // A real notification on the same connection still goes through.
    let (s, _, _) = send(&mut c, post("/", fixture("send-notification-status.xml"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(receiver.seen().len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn accept_any_body_forwards_junk_untracked() {
    let receiver = TestReceiver::answering(b"fine".to_vec()).await;
    let relay = Relay::start(receiver.addr, &["--accept-any-body"]).await;
    let mut c = relay.client().await;
    let (s, _, body) = send(&mut c, post("/", "{\"not\": \"soap\"}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(&body[..], b"fine");
    assert_eq!(receiver.seen().len(), 1);
    assert!(subscriptions(&relay).await.is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn fixtures_show_up_in_api_and_metrics() {
    // The receiver keeps the events subscription and ends the other one.
    let receiver = TestReceiver::with(Arc::new(|seen: Seen| {
        let ending = String::from_utf8_lossy(&seen.body).contains(STATUS_SUB);
        let answer = if ending {
            fixture("send-notification-result-unsubscribe.xml")
        } else {
            fixture("send-notification-result-ok.xml")
        };
        Box::pin(async move {
            http::Response::builder()
                .header("content-type", "text/xml; charset=utf-8")
                .body(Full::new(Bytes::from(answer)))
                .unwrap()
        })
    }))
    .await;
    let relay = Relay::start(receiver.addr, &[]).await;
    let mut c = relay.client().await;
    let (s, _, body) = send(&mut c, post("/", fixture("send-notification-events.xml"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        body,
        Bytes::from(fixture("send-notification-result-ok.xml")),
        "answer unchanged"
    );
    let (s, _, body) = send(&mut c, post("/", fixture("send-notification-status.xml"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        body,
        Bytes::from(fixture("send-notification-result-unsubscribe.xml")),
        "Unsubscribe passed back unchanged"
    );

    let subs = subscriptions(&relay).await;
    assert_eq!(subs.len(), 2, "{subs:#?}");
    let ev = find(&subs, EVENTS_SUB);
    assert_eq!(ev["state"], "alive");
    assert_eq!(ev["last_watermark"], EVENTS_LAST_WATERMARK);
    assert_eq!(ev["receiver_answer"], "OK");
    assert_eq!(ev["last_response_class"], "Success");
    assert_eq!(ev["last_response_code"], "NoError");
    assert_eq!(ev["peer"], "127.0.0.1");
    for t in [
        "NewMailEvent",
        "CreatedEvent",
        "ModifiedEvent",
        "MovedEvent",
        "DeletedEvent",
    ] {
        assert_eq!(ev["events"][t], 1, "{t} in {ev:#?}");
    }
    let st = find(&subs, STATUS_SUB);
    assert_eq!(st["state"], "unsubscribed");
    assert_eq!(st["last_watermark"], STATUS_WATERMARK);
    assert_eq!(st["events"]["StatusEvent"], 1);

    let m = relay.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "ews_relay_notification_events_total{type=\"NewMailEvent\",source=\"ews\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "ews_relay_notification_events_total{type=\"StatusEvent\",source=\"ews\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "ews_relay_receiver_answers_total{answer=\"OK\",source=\"ews\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "ews_relay_receiver_answers_total{answer=\"Unsubscribe\",source=\"ews\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "ews_relay_subscriptions{state=\"alive\",source=\"ews\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "ews_relay_subscriptions{state=\"unsubscribed\",source=\"ews\"}"
        ),
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn error_push_marks_the_subscription_and_keeps_its_watermark() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let relay = Relay::start(receiver.addr, &[]).await;
    let mut c = relay.client().await;
    send(&mut c, post("/", fixture("send-notification-status.xml"))).await;
    let (s, _, _) = send(&mut c, post("/", fixture("send-notification-error.xml"))).await;
    assert_eq!(s, StatusCode::OK);
    let subs = subscriptions(&relay).await;
    let st = find(&subs, STATUS_SUB);
    assert_eq!(st["state"], "error");
    assert_eq!(st["last_response_class"], "Error");
    assert_eq!(st["last_response_code"], "ErrorReadEventsFailed");
    assert_eq!(
        st["last_watermark"], STATUS_WATERMARK,
        "watermark from the last good push kept"
    );
    relay.stop().await;
}

#[tokio::test]
async fn receiver_failures_mark_subscriptions_error() {
    let receiver = TestReceiver::with(Arc::new(|_| {
        Box::pin(async {
            http::Response::builder()
                .status(500)
                .body(Full::new(Bytes::from_static(b"boom")))
                .unwrap()
        })
    }))
    .await;
    let relay = Relay::start(receiver.addr, &[]).await;
    let mut c = relay.client().await;
    let (s, _, body) = send(&mut c, post("/", fixture("send-notification-events.xml"))).await;
    assert_eq!(
        s,
        StatusCode::INTERNAL_SERVER_ERROR,
        "receiver's status passed back"
    );
    assert_eq!(&body[..], b"boom");
    let subs = subscriptions(&relay).await;
    let ev = find(&subs, EVENTS_SUB);
    assert_eq!(ev["state"], "error");
    assert_eq!(ev["receiver_answer"], "http_error");
    assert_eq!(ev["receiver_http_status"], 500);
    relay.stop().await;

    let down = closed_port().await;
    let relay = Relay::start(down, &[]).await;
    let mut c = relay.client().await;
    let (s, _, _) = send(&mut c, post("/", fixture("send-notification-events.xml"))).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    let subs = subscriptions(&relay).await;
    assert_eq!(find(&subs, EVENTS_SUB)["receiver_answer"], "unreachable");
    assert_eq!(
        relay
            .metric("ews_relay_receiver_answers_total{answer=\"unreachable\",source=\"ews\"}")
            .await,
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn silent_subscriptions_become_stale() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let relay = Relay::start(receiver.addr, &["--stale-after", "300ms"]).await;
    let mut c = relay.client().await;
    send(&mut c, post("/", fixture("send-notification-status.xml"))).await;
    assert_eq!(
        find(&subscriptions(&relay).await, STATUS_SUB)["state"],
        "alive"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        find(&subscriptions(&relay).await, STATUS_SUB)["state"],
        "stale"
    );
    assert_eq!(
        relay
            .metric("ews_relay_subscriptions{state=\"stale\",source=\"ews\"}")
            .await,
        1.0
    );
    // The next keep-alive brings it back.
    send(&mut c, post("/", fixture("send-notification-status.xml"))).await;
    assert_eq!(
        find(&subscriptions(&relay).await, STATUS_SUB)["state"],
        "alive"
    );
    relay.stop().await;
}

/// The newcomer's finding (managed): subscriptions the relay itself replaced showed as `stale`
/// (a WARN, `ews_relay_subscriptions{state="stale"}`), so an alert on stale fired after every
/// normal resubscribe; and the relay's own answers were shown as the receiver's `OK`.
///
/// Here keep-alives come every 2.5 s but the relay gives up after 1 s of silence, so each
/// subscription is replaced (and later answered `Unsubscribe`) over and over, with
/// `--stale-after` shorter than the time a replaced one stays silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_replaced_subscriptions_are_replaced_not_stale() {
    use common::managed::{self as lab, Lab, Setup};
    const ROOM: &str = "room-a@contoso.example";
    let mut setup = Setup::new(&[ROOM]);
    setup.heartbeat = Duration::from_secs(1);
    setup.extra = vec!["--stale-after".into(), "1500ms".into()];
    let lab = Lab::start(
        &[ROOM],
        |c| c.status_period = Duration::from_millis(2500),
        setup,
    )
    .await;
    let first = lab::sim_wait(&lab.sim, lab::WAIT, "a first subscription", |h| {
        lab::live_subscription(h, ROOM).map(|s| s.id)
    })
    .await;
    // Replaced, then silent for longer than --stale-after, then answered Unsubscribe.
    let v = lab
        .wait_relay(
            lab::WAIT,
            "the first subscription answered Unsubscribe",
            |v| {
                let s = v["subscriptions"]
                    .as_array()?
                    .iter()
                    .find(|s| s["subscription_id"] == first.as_str())?;
                (s["relay_answer"] == "Unsubscribe").then(|| s.clone())
            },
        )
        .await;
    assert_eq!(v["state"], "replaced", "{v:#?}");
    assert_eq!(v["answered_by"], "relay");
    assert!(
        v["receiver_answer"].is_null(),
        "the receiver never answered it"
    );

    // Scrape for a while: replaced ones keep coming, none is ever stale.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let mut replaced = 0.0f64;
    while std::time::Instant::now() < until {
        let (_, m) = admin_get(lab.admin(), "/metrics").await.unwrap();
        assert_eq!(
            metric_value(
                &m,
                "ews_relay_subscriptions{state=\"stale\",source=\"ews\"}"
            ),
            0.0,
            "{m}"
        );
        replaced = replaced.max(metric_value(
            &m,
            "ews_relay_subscriptions{state=\"replaced\",source=\"ews\"}",
        ));
        assert_eq!(
            metric_value(
                &m,
                "ews_relay_receiver_answers_total{answer=\"OK\",source=\"ews\"}"
            ),
            0.0,
            "the relay's answers are not the receiver's"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(replaced >= 1.0, "replaced subscriptions counted");
    let (_, m) = admin_get(lab.admin(), "/metrics").await.unwrap();
    assert!(
        metric_value(
            &m,
            "ews_relay_receiver_answers_total{answer=\"relay_ok\",source=\"ews\"}"
        ) >= 1.0
    );
    assert!(
        metric_value(
            &m,
            "ews_relay_receiver_answers_total{answer=\"relay_unsubscribe\",source=\"ews\"}"
        ) >= 1.0
    );
}
