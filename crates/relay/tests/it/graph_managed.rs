//! Managed Graph mode end to end: the relay keeps Graph resources subscribed at the simulated
//! Microsoft Graph (ews-sim), answers the validation handshake and Graph's POSTs itself over real
//! TLS, and delivers each notification to a test receiver. Each test names the promise of the
//! README's "Microsoft Graph" section it checks.

use crate::common::managed as lab;
use crate::common::{self, metric_value};

use std::time::{Duration, Instant};

use ews_sim::{ChangeType, DeliveryKind, GraphSubscriptionInfo, GraphTarget, SimHandle};

use lab::*;

const EVENTS_A: &str = "users/room-a@contoso.example/events";
const EVENTS_B: &str = "users/room-b@contoso.example/events";

/// The live Graph subscription of `resource` (the newest if several).
pub fn live_graph(sim: &SimHandle, resource: &str) -> Option<GraphSubscriptionInfo> {
    sim.graph_subscriptions()
        .into_iter()
        .rfind(|s| s.resource == resource && s.is_live())
}

/// Waits until the simulator has a live subscription for each resource; returns their ids.
pub async fn wait_graph_live(sim: &SimHandle, resources: &[&str]) -> Vec<String> {
    sim_wait(sim, WAIT, "a live Graph subscription per resource", |s| {
        resources
            .iter()
            .map(|r| live_graph(s, r).map(|x| x.id))
            .collect()
    })
    .await
}

/// Receiver deliveries of one resource (by `X-Graph-Resource`), resyncs left out.
pub fn graph_deliveries(receiver: &Receiver, resource: &str) -> Vec<common::Seen> {
    receiver
        .accepted()
        .into_iter()
        .filter(|s| header(s, "x-graph-resource") == Some(resource))
        .filter(|s| header(s, "x-graph-resync-required").is_none())
        .collect()
}

/// The `resourceData.id`s the receiver got for `resource`, in arrival order.
pub fn delivered_ids(receiver: &Receiver, resource: &str) -> Vec<String> {
    graph_deliveries(receiver, resource)
        .iter()
        .map(|s| {
            let v: serde_json::Value = serde_json::from_slice(&s.body).expect("JSON delivery");
            v["resourceData"]["id"]
                .as_str()
                .expect("resourceData.id")
                .to_owned()
        })
        .collect()
}

/// Waits until the receiver got every id of `want` for `resource`; returns all it got.
pub async fn wait_delivered(receiver: &Receiver, resource: &str, want: &[String]) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = delivered_ids(receiver, resource);
        if want.iter().all(|w| got.contains(w)) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "receiver did not get every notification of {resource}: want {want:?}, got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Resync signals the receiver accepted for `resource`.
pub fn resyncs(receiver: &Receiver, resource: &str) -> usize {
    receiver
        .accepted()
        .iter()
        .filter(|s| header(s, "x-graph-resync-required") == Some(resource))
        .count()
}

fn changes(sim: &SimHandle, id: &str, n: usize) -> Vec<String> {
    sim.graph_change(
        &GraphTarget::Subscription(id.to_owned()),
        ChangeType::Created,
        n,
    )
    .expect("graph change")
    .into_iter()
    .flat_map(|c| c.ids)
    .collect()
}

/// Every POST the simulated Graph made to the relay was answered with 2xx within Graph's
/// ~3 s (the relay must never look slow to Graph).
fn assert_graph_always_answered_fast(sim: &SimHandle) {
    for d in sim.graph_deliveries() {
        if d.kind == DeliveryKind::Validation {
            continue;
        }
        assert!(
            d.elapsed_ms < 3000,
            "Graph waited {} ms for the relay: {d:?}",
            d.elapsed_ms
        );
    }
}

/// Promise: each configured resource gets one subscription with the relay's callback and
/// lifecycle URLs, a fresh clientState of its own, and the longest lifetime Outlook resources
/// allow (just under 7 days); Graph's validation handshake succeeds; every notification reaches
/// the receiver once, in order, as its own JSON without clientState, with headers naming the
/// resource, mailbox, subscription and change type; Graph hears 202 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_are_subscribed_and_notifications_delivered_in_order() {
    let lab = Lab::start(&[], |_| {}, Setup::graph(&[EVENTS_A, EVENTS_B])).await;
    let ids = wait_graph_live(&lab.sim, &[EVENTS_A, EVENTS_B]).await;
    let subs: Vec<_> = ids
        .iter()
        .map(|id| lab.sim.graph_subscription(id).unwrap())
        .collect();
    for s in &subs {
        assert_eq!(s.notification_url, lab.graph_callback_url());
        assert_eq!(
            s.lifecycle_url.as_deref(),
            Some(lab.graph_lifecycle_url().as_str())
        );
        assert_eq!(s.change_type, "created,updated,deleted");
        let cs = s.client_state.as_deref().expect("clientState set");
        assert!(cs.len() >= 43 && cs.len() <= 128, "{cs}");
        let expires = graph::parse_time(&s.expiration).expect("Graph's expiration");
        let days = expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .as_secs_f64()
            / 86400.0;
        assert!(days > 6.9 && days < 7.0, "lifetime {days} days");
    }
    assert_ne!(
        subs[0].client_state, subs[1].client_state,
        "one secret each"
    );
    // Validation handshakes (notification and lifecycle URL) all succeeded.
    let validations: Vec<_> = lab
        .sim
        .graph_deliveries()
        .into_iter()
        .filter(|d| d.kind == DeliveryKind::Validation)
        .collect();
    assert!(validations.len() >= 2, "{validations:?}");
    assert!(validations.iter().all(|d| d.ok), "{validations:?}");

    let created = changes(&lab.sim, &ids[0], 5);
    let got = wait_delivered(&lab.receiver, EVENTS_A, &created).await;
    assert_eq!(got, created, "once each, in order");
    for s in graph_deliveries(&lab.receiver, EVENTS_A) {
        assert_eq!(header(&s, "x-graph-subscription-id"), Some(ids[0].as_str()));
        assert_eq!(header(&s, "x-graph-change-type"), Some("created"));
        assert_eq!(
            header(&s, "x-graph-mailbox"),
            Some("room-a@contoso.example")
        );
        assert_eq!(s.path, GRAPH_CALLBACK_PATH);
        assert!(header(&s, "content-type")
            .unwrap_or("")
            .starts_with("application/json"));
        let body = String::from_utf8_lossy(&s.body);
        assert!(!body.contains("clientState"), "secret forwarded: {body}");
        assert!(
            !body.contains(subs[0].client_state.as_deref().unwrap()),
            "secret forwarded: {body}"
        );
        let v: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(v["subscriptionId"], ids[0].as_str());
        assert_eq!(v["changeType"], "created");
    }
    assert!(delivered_ids(&lab.receiver, EVENTS_B).is_empty());
    let notified: Vec<_> = lab
        .sim
        .graph_deliveries()
        .into_iter()
        .filter(|d| d.kind == DeliveryKind::Notification)
        .collect();
    assert!(!notified.is_empty());
    assert!(
        notified.iter().all(|d| d.status == Some(202)),
        "{notified:?}"
    );
    assert_graph_always_answered_fast(&lab.sim);
    // The admin API shows both resources active with their ids.
    let api = lab.api().await;
    for (r, id) in [EVENTS_A, EVENTS_B].iter().zip(&ids) {
        let row = api["graph_resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["resource"] == *r)
            .unwrap_or_else(|| panic!("{r} in {api:#}"));
        assert_eq!(row["state"], "active", "{row:#}");
        assert_eq!(row["subscription_id"], id.as_str());
    }
}

/// Promise: the relay answers a validation request on its own callback URL only while it is
/// creating a subscription; otherwise 400. A validation for another path under
/// `--graph-path-prefix` goes to the receiver (its own subscription).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexpected_validations_are_refused_and_others_forwarded() {
    let lab = Lab::start(&[], |_| {}, Setup::graph(&[EVENTS_A])).await;
    wait_graph_live(&lab.sim, &[EVENTS_A]).await;
    // Until the relay has read Graph's 201, its create is in flight (validations expected).
    lab.wait_relay(WAIT, "the resource active", |v| {
        v["graph_resources"]
            .as_array()?
            .iter()
            .find(|r| r["state"] == "active")
            .map(|_| ())
    })
    .await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", lab.port).parse().unwrap();
    let mut client = common::https_client(addr, &lab.cert.der, None)
        .await
        .unwrap();
    let (status, _, _) = common::send(
        &mut client,
        common::post(
            &format!("{GRAPH_CALLBACK_PATH}?validationToken=Validation%3A+x"),
            "",
        ),
    )
    .await;
    assert_eq!(status, 400, "no create in flight: refused");
    let before = lab.receiver.all().len();
    let (status, _, _) = common::send(
        &mut client,
        common::post("/graph/app?validationToken=abc", ""),
    )
    .await;
    assert_eq!(status, 200, "the receiver answered its own validation");
    let all = lab.receiver.all();
    assert_eq!(all.len(), before + 1);
    assert!(all.last().unwrap().path.starts_with("/graph/app"));
}

/// Promise: a notification whose clientState does not match its subscription's secret is
/// refused with 403, counted, and never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_client_state_is_refused_and_never_delivered() {
    // Graph retries the refused POST until its budget is spent (scaled down here), and holds
    // later notifications for the URL behind it meanwhile.
    let lab = Lab::start(
        &[],
        |c| c.graph.retry_budget = Duration::from_secs(100),
        Setup::graph(&[EVENTS_A]),
    )
    .await;
    let ids = wait_graph_live(&lab.sim, &[EVENTS_A]).await;
    lab.sim.graph_wrong_client_state(&ids[0]).unwrap();
    sim_wait(&lab.sim, WAIT, "a 403 to the forged notification", |s| {
        s.graph_deliveries()
            .into_iter()
            .find(|d| d.kind == DeliveryKind::Notification && d.status == Some(403))
    })
    .await;
    assert!(
        delivered_ids(&lab.receiver, EVENTS_A).is_empty(),
        "a forged notification reached the receiver"
    );
    let metrics = common::admin_get(lab.admin(), "/metrics").await.unwrap().1;
    assert!(
        metric_value(
            &metrics,
            "ews_relay_graph_refused_total{reason=\"mismatch\"}"
        ) >= 1.0,
        "{metrics}"
    );
    // Genuine notifications still pass.
    let created = changes(&lab.sim, &ids[0], 1);
    wait_delivered(&lab.receiver, EVENTS_A, &created).await;
}

/// Promise: the relay honours the expiration Graph answers, however short, and renews the
/// subscription (PATCH) before it runs out; the subscription stays the same and alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_renewed_before_they_expire() {
    let lab = Lab::start(
        &[],
        |c| c.graph.lifetime_cap = Some(Duration::from_secs(3)),
        Setup::graph(&[EVENTS_A]),
    )
    .await;
    let ids = wait_graph_live(&lab.sim, &[EVENTS_A]).await;
    let renewed = sim_wait(&lab.sim, Duration::from_secs(15), "three renewals", |s| {
        s.graph_subscription(&ids[0]).filter(|x| x.renewed >= 3)
    })
    .await;
    assert!(renewed.is_live() && !renewed.expired, "{renewed:?}");
    assert_eq!(
        live_graph(&lab.sim, EVENTS_A).unwrap().id,
        ids[0],
        "renewed, not replaced"
    );
    let created = changes(&lab.sim, &ids[0], 2);
    wait_delivered(&lab.receiver, EVENTS_A, &created).await;
}

/// Promise: `subscriptionRemoved` makes the relay create a new subscription at once (with a new
/// secret), and tell the receiver to resynchronise the resource, since changes between the two
/// subscriptions were not observed; the old id is no longer trusted as current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_removed_is_replaced_and_the_receiver_resyncs() {
    let lab = Lab::start(&[], |_| {}, Setup::graph(&[EVENTS_A])).await;
    let ids = wait_graph_live(&lab.sim, &[EVENTS_A]).await;
    let old_secret = lab.sim.graph_subscription(&ids[0]).unwrap().client_state;
    lab.sim.graph_remove_subscription(&ids[0], true).unwrap();
    let new = sim_wait(&lab.sim, WAIT, "a new subscription", |s| {
        live_graph(s, EVENTS_A).filter(|x| x.id != ids[0])
    })
    .await;
    assert_ne!(new.client_state, old_secret, "a fresh secret");
    let deadline = Instant::now() + WAIT;
    while resyncs(&lab.receiver, EVENTS_A) == 0 {
        assert!(Instant::now() < deadline, "no resync signal");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let created = changes(&lab.sim, &new.id, 2);
    wait_delivered(&lab.receiver, EVENTS_A, &created).await;
    let lifecycle: Vec<_> = lab
        .sim
        .graph_deliveries()
        .into_iter()
        .filter(|d| d.kind == DeliveryKind::Lifecycle)
        .collect();
    assert!(
        lifecycle.iter().all(|d| d.status == Some(202)),
        "{lifecycle:?}"
    );
    assert!(lifecycle.iter().all(|d| d.url == lab.graph_lifecycle_url()));
}

/// Promise: a subscription Graph dropped without a word (expired, removed silently) is found at
/// the next renewal (404) and replaced, with the resync signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_lost_subscription_is_replaced_at_the_next_renewal() {
    let lab = Lab::start(
        &[],
        |c| c.graph.lifetime_cap = Some(Duration::from_secs(3)),
        Setup::graph(&[EVENTS_A]),
    )
    .await;
    let ids = wait_graph_live(&lab.sim, &[EVENTS_A]).await;
    lab.sim.graph_remove_subscription(&ids[0], false).unwrap();
    let new = sim_wait(&lab.sim, WAIT, "a new subscription", |s| {
        live_graph(s, EVENTS_A).filter(|x| x.id != ids[0])
    })
    .await;
    let deadline = Instant::now() + WAIT;
    while resyncs(&lab.receiver, EVENTS_A) == 0 {
        assert!(Instant::now() < deadline, "no resync signal");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let created = changes(&lab.sim, &new.id, 1);
    wait_delivered(&lab.receiver, EVENTS_A, &created).await;
}

/// Promise: `missed` tells the receiver to resynchronise the resource (the same resync signal
/// EWS uses, with `X-Graph-Resync-Required`), and the subscription carries on unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_tells_the_receiver_to_resync() {
    let lab = Lab::start(&[], |_| {}, Setup::graph(&[EVENTS_A])).await;
    let ids = wait_graph_live(&lab.sim, &[EVENTS_A]).await;
    lab.sim.graph_missed(&ids[0]).unwrap();
    let deadline = Instant::now() + WAIT;
    while resyncs(&lab.receiver, EVENTS_A) == 0 {
        assert!(Instant::now() < deadline, "no resync signal");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let signal = lab
        .receiver
        .accepted()
        .into_iter()
        .find(|s| header(s, "x-graph-resync-required").is_some())
        .unwrap();
    assert!(signal.body.is_empty(), "the signal is a header, no body");
    assert_eq!(header(&signal, "x-graph-resource"), Some(EVENTS_A));
    assert_eq!(live_graph(&lab.sim, EVENTS_A).unwrap().id, ids[0]);
    let metrics = common::admin_get(lab.admin(), "/metrics").await.unwrap().1;
    assert!(
        metric_value(
            &metrics,
            "ews_relay_graph_lifecycle_events_total{event=\"missed\"}"
        ) >= 1.0,
        "{metrics}"
    );
}

/// Promise: `reauthorizationRequired` is answered at once (reauthorize), so Graph does not
/// remove the subscription; it stays the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauthorization_required_is_answered_at_once() {
    let lab = Lab::start(
        &[],
        |c| c.graph.reauthorization_grace = Duration::from_secs(5),
        Setup::graph(&[EVENTS_A]),
    )
    .await;
    let ids = wait_graph_live(&lab.sim, &[EVENTS_A]).await;
    lab.sim.graph_require_reauthorization(&ids[0]).unwrap();
    let sub = sim_wait(&lab.sim, WAIT, "a reauthorization", |s| {
        s.graph_subscription(&ids[0])
            .filter(|x| x.reauthorized >= 1 && !x.reauthorization_pending)
    })
    .await;
    assert!(sub.is_live());
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        lab.sim.graph_subscription(&ids[0]).unwrap().is_live(),
        "removed after the grace: the reauthorization did not count"
    );
    assert_eq!(live_graph(&lab.sim, EVENTS_A).unwrap().id, ids[0]);
}

/// Promise: a subscription Graph made while the relay died during the create (so its id was
/// never stored) is recognised by the secret stored before the call when it first notifies:
/// acknowledged, not delivered, and deleted at Graph; a stranger's id is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_of_an_interrupted_create_is_recognised_and_deleted() {
    let mut lab = Lab::prepare(&[], |_| {}, Setup::graph(&[EVENTS_A])).await;
    // The state a kill -9 during a create leaves: the secret stored, no id.
    {
        let store = ews_relay::store::Store::open(lab.state.path()).unwrap();
        let mut record = ews_relay::store::GraphRecord::new(EVENTS_A);
        record.pending_client_state = Some("orphan-secret-0123456789".into());
        store.put_graph(&record).unwrap();
    }
    lab.launch().await;
    wait_graph_live(&lab.sim, &[EVENTS_A]).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", lab.port).parse().unwrap();
    let mut client = common::https_client(addr, &lab.cert.der, None)
        .await
        .unwrap();
    let orphan = "0f3c5a2e-1111-4222-8333-944455556666";
    let post = |client_state: &str| {
        let body = serde_json::json!({"value": [{
            "subscriptionId": orphan,
            "clientState": client_state,
            "changeType": "created",
            "resource": "Users/x/Events/orphan-1",
            "resourceData": {"id": "orphan-1"},
            "tenantId": "t"
        }]});
        http::Request::post(GRAPH_CALLBACK_PATH)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap()
    };
    let (status, _, _) = common::send(&mut client, post("not-the-secret")).await;
    assert_eq!(status, 403, "a stranger's subscription is refused");
    let (status, _, _) = common::send(&mut client, post("orphan-secret-0123456789")).await;
    assert_eq!(status, 202, "the orphan is acknowledged");
    sim_wait(&lab.sim, WAIT, "a DELETE of the orphan", |s| {
        s.requests()
            .into_iter()
            .find(|r| r.method == "DELETE" && r.path.ends_with(&format!("/subscriptions/{orphan}")))
    })
    .await;
    assert!(
        delivered_ids(&lab.receiver, EVENTS_A).is_empty(),
        "the orphan's notification was delivered"
    );
}

/// Promise: with `--auth oauth`, Graph calls carry a token for Graph's scope
/// (`https://graph.microsoft.com/.default`), apart from EWS's: the simulated Graph refuses any
/// other audience, as Graph does. One token serves every Graph call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_calls_use_a_graph_scoped_token() {
    let mut lab = Lab::prepare(
        &["room-e@contoso.example"],
        crate::managed::sim_oauth(Duration::from_secs(3600)),
        {
            let mut s = Setup::graph(&[EVENTS_A, EVENTS_B]);
            s.mailboxes = vec!["room-e@contoso.example".into()];
            s
        },
    )
    .await;
    crate::managed::oauth(&mut lab);
    lab.launch().await;
    wait_graph_live(&lab.sim, &[EVENTS_A, EVENTS_B]).await;
    lab.wait_active(&["room-e@contoso.example"]).await;
    let tokens: Vec<_> = lab
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/oauth2/v2.0/token"))
        .collect();
    let graph_tokens = tokens
        .iter()
        .filter(|r| r.body.contains("graph.microsoft.com"))
        .count();
    let ews_tokens = tokens
        .iter()
        .filter(|r| r.body.contains("outlook.office365.com"))
        .count();
    assert_eq!(
        (graph_tokens, ews_tokens),
        (1, 1),
        "one token per audience: {tokens:#?}"
    );
    let graph_calls: Vec<_> = lab
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/v1.0/"))
        .collect();
    assert!(graph_calls.len() >= 2);
    assert!(
        graph_calls.iter().all(|r| r.status != 401),
        "a Graph call was refused: {graph_calls:#?}"
    );
}
