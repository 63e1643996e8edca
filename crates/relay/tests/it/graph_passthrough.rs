//! Microsoft Graph in passthrough, end to end over real TLS: with `--graph-path-prefix /graph`
//! the validation handshake reaches the receiver unchanged, change notification collections are
//! checked, forwarded and tracked (`/api/subscriptions`, metrics with `source="graph"`), and
//! the tracker's Graph states (expiring, renewed, expired, removed, error) follow the traffic.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;

const HOUR: Duration = Duration::from_secs(3600);

/// A POST of JSON to `path`, as Graph sends it.
fn post_json(path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json; charset=utf-8")
        .body(Full::new(body.into()))
        .unwrap()
}

/// One change notification item (Microsoft's shape) for subscription `id`.
fn change(id: &str, change_type: &str, expires: SystemTime, message: &str) -> String {
    format!(
        r##"{{"subscriptionId":"{id}","subscriptionExpirationDateTime":"{exp}","changeType":"{change_type}","resource":"Users/6f1b2c3d-aaaa-bbbb-cccc-0123456789ab/Messages/{message}","resourceData":{{"@odata.type":"#Microsoft.Graph.Message","@odata.id":"Users/6f1b2c3d-aaaa-bbbb-cccc-0123456789ab/Messages/{message}","id":"{message}"}},"clientState":"secret-of-the-receiver","tenantId":"84bd8158-6d4d-4958-8b9f-9d6445542f95"}}"##,
        exp = graph::format_time(expires)
    )
}

/// One lifecycle notification item for subscription `id`.
fn lifecycle(id: &str, event: &str, expires: SystemTime) -> String {
    format!(
        r#"{{"subscriptionId":"{id}","subscriptionExpirationDateTime":"{exp}","lifecycleEvent":"{event}","clientState":"secret-of-the-receiver","tenantId":"84bd8158-6d4d-4958-8b9f-9d6445542f95"}}"#,
        exp = graph::format_time(expires)
    )
}

/// POST a collection of `items` under the Graph prefix; the status the relay answered.
async fn post_items(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    items: Vec<String>,
) -> StatusCode {
    send(c, post_json("/graph/notify", collection(&items)))
        .await
        .0
}

fn collection(items: &[String]) -> String {
    format!(r#"{{"value":[{}]}}"#, items.join(","))
}

/// A receiver that answers validations with the decoded token (text/plain), Graph
/// notifications with 202, a body mentioning `fail-me` with 500, and anything else (EWS) with
/// `SendNotificationResult` OK.
async fn graph_receiver() -> TestReceiver {
    TestReceiver::with(Arc::new(|seen: Seen| {
        Box::pin(async move {
            let b = http::Response::builder();
            if let Some((_, q)) = seen.path.split_once("?validationToken=") {
                // The test's token only: "+" is a space, %3A ':' and %2B '+'.
                let token = q.replace('+', " ").replace("%3A", ":").replace("%2B", "+");
                return b
                    .status(200)
                    .header("content-type", "text/plain")
                    .body(Full::new(Bytes::from(token)))
                    .unwrap();
            }
            if String::from_utf8_lossy(&seen.body).contains("fail-me") {
                return b.status(500).body(Full::new(Bytes::new())).unwrap();
            }
            if seen.path.starts_with("/graph") {
                return b.status(202).body(Full::new(Bytes::new())).unwrap();
            }
            b.status(200)
                .header("content-type", "text/xml; charset=utf-8")
                .body(Full::new(Bytes::from(fixture(
                    "send-notification-result-ok.xml",
                ))))
                .unwrap()
        })
    }))
    .await
}

async fn api(relay: &Relay) -> Value {
    let (status, body) = admin_get(relay.admin, "/api/subscriptions").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    serde_json::from_str(&body).unwrap()
}

/// The `/api/subscriptions` row of `id`.
async fn row(relay: &Relay, id: &str) -> Value {
    let v = api(relay).await;
    v["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subscription_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {v:#}"))
        .clone()
}

async fn start(receiver: &TestReceiver, extra: &[&str]) -> Relay {
    let mut args = vec!["--graph-path-prefix", "/graph"];
    args.extend_from_slice(extra);
    Relay::start(receiver.addr, &args).await
}

#[tokio::test]
async fn validation_reaches_the_receiver_unchanged_and_its_answer_comes_back() {
    let receiver = graph_receiver().await;
    let relay = start(&receiver, &[]).await;
    let mut c = relay.client().await;
    let path = "/graph/notify?validationToken=Validation%3A+Testing%2Bx";
    let (s, h, body) = send(&mut c, post_json(path, "")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["content-type"], "text/plain");
    assert_eq!(&body[..], b"Validation: Testing+x");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, path, "query passed on as Graph sent it");
    assert_eq!(
        relay
            .metric("ews_relay_graph_validations_total{outcome=\"forwarded\"}")
            .await,
        1.0
    );
    // A validation is not a notification: nothing tracked.
    assert_eq!(api(&relay).await["subscriptions"], serde_json::json!([]));

    // A malformed token is refused before the receiver.
    let (s, _, _) = send(&mut c, post_json("/graph/notify?validationToken=%G1", "")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(receiver.seen().len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_collection_is_forwarded_and_tracked_with_source_graph() {
    let receiver = graph_receiver().await;
    let relay = start(&receiver, &[]).await;
    let mut c = relay.client().await;
    let expires = SystemTime::now() + 48 * HOUR;
    let body = collection(&[
        change("sub-a", "created", expires, "m1"),
        change("sub-a", "updated", expires, "m2"),
        change("sub-b", "deleted", expires, "m3"),
    ]);
    let (s, _, answer) = send(&mut c, post_json("/graph/notify", body.clone())).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert!(answer.is_empty());
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, Bytes::from(body), "forwarded unchanged");

    let a = row(&relay, "sub-a").await;
    assert_eq!(a["source"], "graph");
    assert_eq!(a["state"], "alive");
    assert_eq!(
        a["resource"],
        "Users/6f1b2c3d-aaaa-bbbb-cccc-0123456789ab/Messages"
    );
    assert_eq!(
        a["last_resource"],
        "Users/6f1b2c3d-aaaa-bbbb-cccc-0123456789ab/Messages/m2"
    );
    assert_eq!(a["change_types"], serde_json::json!(["created", "updated"]));
    assert_eq!(
        a["changes"],
        serde_json::json!({"created": 1, "updated": 1})
    );
    assert_eq!(
        a["expiration"],
        humantime::format_rfc3339_seconds(expires).to_string()
    );
    assert!(a["seconds_to_expiry"].as_i64().unwrap() > 47 * 3600);
    assert_eq!(a["renewal_seen"], false);
    assert_eq!(a["receiver_answer"], "OK");
    assert_eq!(a["answered_by"], "receiver");
    assert_eq!(a["tenant_id"], "84bd8158-6d4d-4958-8b9f-9d6445542f95");
    assert_eq!(a["peer"], "127.0.0.1");
    assert_eq!(a["lifecycle"]["last"], Value::Null);
    let b = row(&relay, "sub-b").await;
    assert_eq!(b["change_types"], serde_json::json!(["deleted"]));

    let m = relay.metrics().await;
    for (series, want) in [
        (
            "ews_relay_receiver_answers_total{answer=\"OK\",source=\"graph\"}",
            1.0,
        ),
        (
            "ews_relay_receiver_answers_total{answer=\"OK\",source=\"ews\"}",
            0.0,
        ),
        (
            "ews_relay_notification_events_total{type=\"created\",source=\"graph\"}",
            1.0,
        ),
        (
            "ews_relay_notification_events_total{type=\"updated\",source=\"graph\"}",
            1.0,
        ),
        (
            "ews_relay_notification_events_total{type=\"deleted\",source=\"graph\"}",
            1.0,
        ),
        (
            "ews_relay_subscriptions{state=\"alive\",source=\"graph\"}",
            2.0,
        ),
        (
            "ews_relay_subscriptions{state=\"alive\",source=\"ews\"}",
            0.0,
        ),
    ] {
        assert_eq!(metric_value(&m, series), want, "{series} in\n{m}");
    }
    relay.stop().await;
}

#[tokio::test]
async fn bodies_that_are_not_collections_get_400_and_never_reach_the_receiver() {
    let receiver = graph_receiver().await;
    let relay = start(&receiver, &[]).await;
    let mut c = relay.client().await;
    let expires = SystemTime::now() + 48 * HOUR;
    let item = change("sub-a", "created", expires, "m1");
    for bad in [
        String::from_utf8(fixture("send-notification-events.xml")).unwrap(),
        "{\"value\": [".to_owned(),
        "{\"notvalue\": []}".to_owned(),
        format!("{{\"value\":[{item}],\"value\":[{item}]}}"),
    ] {
        let (s, _, body) = send(&mut c, post_json("/graph/notify", bad.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            String::from_utf8_lossy(&body).contains("Graph"),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    assert!(
        receiver.seen().is_empty(),
        "no bad body reached the receiver"
    );
    assert_eq!(
        relay
            .metric("ews_relay_rejected_bodies_total{source=\"graph\"}")
            .await,
        4.0
    );
    // Under the EWS prefix, the EWS check applies: a Graph collection is not a notification.
    let (s, _, _) = send(&mut c, post_json("/", collection(&[item]))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(receiver.seen().is_empty());
    assert_eq!(
        relay
            .metric("ews_relay_rejected_bodies_total{source=\"ews\"}")
            .await,
        1.0
    );
    assert_eq!(api(&relay).await["subscriptions"], serde_json::json!([]));
    relay.stop().await;
}

#[tokio::test]
async fn accept_any_body_lets_bad_bodies_through_under_graph_untracked() {
    let receiver = graph_receiver().await;
    let relay = start(&receiver, &["--accept-any-body"]).await;
    let mut c = relay.client().await;
    for bad in [
        String::from_utf8(fixture("send-notification-events.xml")).unwrap(),
        "{\"value\": [".to_owned(),
    ] {
        let (s, _, _) = send(&mut c, post_json("/graph/notify", bad)).await;
        assert_eq!(s, StatusCode::ACCEPTED);
    }
    assert_eq!(receiver.seen().len(), 2);
    assert_eq!(api(&relay).await["subscriptions"], serde_json::json!([]));
    // A malformed validation token is still refused: it is not a body.
    let (s, _, _) = send(&mut c, post_json("/graph/n?validationToken=%G1", "")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(receiver.seen().len(), 2);
    relay.stop().await;
}

#[tokio::test]
async fn lifecycle_expiry_renewal_and_errors_set_the_graph_states() {
    let receiver = graph_receiver().await;
    let relay = start(&receiver, &[]).await;
    let mut c = relay.client().await;
    let now = SystemTime::now();
    // Removed: Graph says so.
    assert_eq!(
        post_items(
            &mut c,
            vec![
                change("sub-removed", "created", now + 48 * HOUR, "m1"),
                lifecycle("sub-removed", "subscriptionRemoved", now + 48 * HOUR),
            ]
        )
        .await,
        StatusCode::ACCEPTED
    );
    // Expired: its expiration has passed.
    assert_eq!(
        post_items(
            &mut c,
            vec![change("sub-expired", "updated", now - HOUR, "m2")]
        )
        .await,
        StatusCode::ACCEPTED
    );
    // Expiring: half an hour left, no renewal seen.
    assert_eq!(
        post_items(
            &mut c,
            vec![change("sub-renewed", "created", now + HOUR / 2, "m3")]
        )
        .await,
        StatusCode::ACCEPTED
    );
    // Error: the receiver fails.
    assert_eq!(
        post_items(
            &mut c,
            vec![change("sub-fail-me", "created", now + 48 * HOUR, "m4")]
        )
        .await,
        StatusCode::INTERNAL_SERVER_ERROR
    );

    let removed = row(&relay, "sub-removed").await;
    assert_eq!(removed["state"], "removed");
    assert_eq!(removed["lifecycle"]["last"], "subscriptionRemoved");
    assert_eq!(
        removed["lifecycle"]["counts"],
        serde_json::json!({"subscriptionRemoved": 1})
    );
    assert!(removed["lifecycle"]["last_at"].is_string());
    assert_eq!(row(&relay, "sub-expired").await["state"], "expired");
    assert!(
        row(&relay, "sub-expired").await["seconds_to_expiry"]
            .as_i64()
            .unwrap()
            < 0
    );
    let renewed = row(&relay, "sub-renewed").await;
    assert_eq!(renewed["state"], "expiring");
    assert_eq!(renewed["renewal_seen"], false);
    let failing = row(&relay, "sub-fail-me").await;
    assert_eq!(failing["state"], "error");
    assert_eq!(failing["receiver_answer"], "http_error");
    assert_eq!(failing["receiver_http_status"], 500);

    let m = relay.metrics().await;
    for (series, want) in [
        (
            "ews_relay_subscriptions{state=\"removed\",source=\"graph\"}",
            1.0,
        ),
        (
            "ews_relay_subscriptions{state=\"expired\",source=\"graph\"}",
            1.0,
        ),
        (
            "ews_relay_subscriptions{state=\"expiring\",source=\"graph\"}",
            1.0,
        ),
        (
            "ews_relay_subscriptions{state=\"error\",source=\"graph\"}",
            1.0,
        ),
        (
            "ews_relay_subscriptions{state=\"alive\",source=\"graph\"}",
            0.0,
        ),
        (
            "ews_relay_notification_events_total{type=\"subscriptionRemoved\",source=\"graph\"}",
            1.0,
        ),
        (
            "ews_relay_receiver_answers_total{answer=\"http_error\",source=\"graph\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric_value(&m, series), want, "{series} in\n{m}");
    }

    // A later expiration: the renewal is seen, and the subscription is alive again.
    assert_eq!(
        post_items(
            &mut c,
            vec![change("sub-renewed", "updated", now + 72 * HOUR, "m3")]
        )
        .await,
        StatusCode::ACCEPTED
    );
    let renewed = row(&relay, "sub-renewed").await;
    assert_eq!(renewed["state"], "alive");
    assert_eq!(renewed["renewal_seen"], true);
    assert_eq!(renewed["renewals"], 1);
    // Graph rows never go stale by silence (Graph has no keep-alives): waiting changes nothing.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        relay
            .metric("ews_relay_subscriptions{state=\"stale\",source=\"graph\"}")
            .await,
        0.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn ews_and_graph_side_by_side_are_tracked_with_their_source() {
    let receiver = graph_receiver().await;
    // A short --stale-after would make the EWS row stale, never the Graph one.
    let relay = start(&receiver, &["--stale-after", "200ms"]).await;
    let mut c = relay.client().await;
    let (s, _, _) = send(&mut c, post("/", fixture("send-notification-events.xml"))).await;
    assert_eq!(s, StatusCode::OK);
    let expires = SystemTime::now() + 48 * HOUR;
    let (s, _, _) = send(
        &mut c,
        post_json(
            "/graph/notify",
            collection(&[change("graph-sub", "created", expires, "m1")]),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let v = api(&relay).await;
    let subs = v["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 2, "{v:#}");
    let sources: Vec<(&str, &str)> = subs
        .iter()
        .map(|s| (s["source"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert!(sources.contains(&("ews", "stale")), "{sources:?}");
    assert!(sources.contains(&("graph", "alive")), "{sources:?}");
    let ews = subs.iter().find(|s| s["source"] == "ews").unwrap();
    assert_eq!(ews["receiver_answer"], "OK");
    assert!(ews["events"].is_object(), "EWS fields kept: {ews:#}");

    let m = relay.metrics().await;
    for (series, want) in [
        (
            "ews_relay_receiver_answers_total{answer=\"OK\",source=\"ews\"}",
            1.0,
        ),
        (
            "ews_relay_receiver_answers_total{answer=\"OK\",source=\"graph\"}",
            1.0,
        ),
        (
            "ews_relay_subscriptions{state=\"stale\",source=\"ews\"}",
            1.0,
        ),
        (
            "ews_relay_subscriptions{state=\"alive\",source=\"graph\"}",
            1.0,
        ),
        (
            "ews_relay_notification_events_total{type=\"NewMailEvent\",source=\"ews\"}",
            1.0,
        ),
        (
            "ews_relay_notification_events_total{type=\"created\",source=\"graph\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric_value(&m, series), want, "{series} in\n{m}");
    }
    relay.stop().await;
}
