//! Managed Graph mode's durability end to end: receiver outages and slow receivers are absorbed
//! by the spool while Graph hears 202 at once; `kill -9` and restarts lose nothing and keep the
//! subscription ids and secrets; removed resources are deleted at Graph; EWS and Graph share one
//! relay; Graph's throttling and lifetime refusals are honoured. Each test names the promise it
//! checks.

use std::time::{Duration, Instant, SystemTime};

use ews::EventType;
use ews_sim::{
    ChangeType, DeliveryKind, GraphTarget, GraphThrottle, RecordedRequest, RemovalReason, SimHandle,
};

use crate::common::managed as lab;
use crate::common::{self, metric_value};
use crate::graph_managed::*;
use lab::*;

const EVENTS_A: &str = "users/room-a@contoso.example/events";
const EVENTS_B: &str = "users/room-b@contoso.example/events";
const ROOM_A: &str = "room-a@contoso.example";

/// Makes `n` `created` changes on subscription `id`; returns their `resourceData.id`s.
fn make_changes(sim: &SimHandle, id: &str, n: usize) -> Vec<String> {
    let made: Vec<String> = sim
        .graph_change(
            &GraphTarget::Subscription(id.to_owned()),
            ChangeType::Created,
            n,
        )
        .expect("graph change")
        .into_iter()
        .flat_map(|c| c.ids)
        .collect();
    assert_eq!(made.len(), n, "the simulator made the changes");
    made
}

/// Notification items the simulated Graph has had answered 202 (Graph counts them delivered).
fn items_acknowledged(sim: &SimHandle) -> usize {
    sim.graph_deliveries()
        .iter()
        .filter(|d| d.kind == DeliveryKind::Notification && d.status == Some(202))
        .map(|d| d.items)
        .sum()
}

/// Waits until Graph has had `n` notification items answered 202.
async fn wait_acknowledged(sim: &SimHandle, n: usize) {
    let what = format!("{n} notification items answered 202");
    sim_wait(sim, WAIT, &what, |s| {
        (items_acknowledged(s) >= n).then_some(())
    })
    .await;
}

/// Every notification POST Graph made was answered 202 within Graph's ~3 s.
fn assert_every_notification_202_fast(sim: &SimHandle) {
    let notified: Vec<_> = sim
        .graph_deliveries()
        .into_iter()
        .filter(|d| d.kind == DeliveryKind::Notification)
        .collect();
    assert!(!notified.is_empty(), "no notification POST at all");
    for d in &notified {
        assert_eq!(d.status, Some(202), "Graph was not told 202: {notified:#?}");
        assert!(
            d.elapsed_ms < 3000,
            "Graph waited {} ms for the relay: {d:?}",
            d.elapsed_ms
        );
    }
}

/// The `/api/subscriptions` row of one Graph resource.
fn graph_row<'a>(v: &'a serde_json::Value, resource: &str) -> Option<&'a serde_json::Value> {
    v["graph_resources"]
        .as_array()?
        .iter()
        .find(|r| r["resource"] == resource)
}

/// Waits until the relay at `admin` shows `resource` active with subscription `id`.
async fn wait_row_active(admin: std::net::SocketAddr, resource: &str, id: &str) {
    wait_api(admin, WAIT, &format!("{resource} active as {id}"), |v| {
        let row = graph_row(v, resource)?;
        (row["state"] == "active" && row["subscription_id"] == id).then_some(())
    })
    .await;
}

/// The Graph create calls (`POST /v1.0/subscriptions`) the simulator received, oldest first.
fn graph_creates(sim: &SimHandle) -> Vec<RecordedRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .filter(|r| {
            r.path
                .trim_end_matches('/')
                .eq_ignore_ascii_case("/v1.0/subscriptions")
        })
        .collect()
}

/// Promise (receiver outage): while the receiver refuses (503), Graph still hears 202 within
/// ~3 s for every POST, because each notification is durably spooled first (the resource's
/// `spool_depth` shows them); once the receiver is back every notification arrives at least
/// once, first arrivals in creation order, and the replayed ones carry `X-Graph-Received-At`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_outage_is_spooled_with_202_and_replayed_in_order() {
    let lab = Lab::start(&[], |_| {}, Setup::graph(&[EVENTS_A])).await;
    let ids = wait_graph_live(&lab.sim, &[EVENTS_A]).await;
    lab.receiver.set_down(true);
    let before = SystemTime::now();
    let mut created = Vec::new();
    for n in [2, 1, 3] {
        created.extend(make_changes(&lab.sim, &ids[0], n));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_acknowledged(&lab.sim, created.len()).await;
    assert_every_notification_202_fast(&lab.sim);
    let depth = lab
        .wait_relay(WAIT, "every notification spooled", |v| {
            let row = graph_row(v, EVENTS_A)?["spool_depth"].as_u64()?;
            let total = v["spool_depth"].as_u64()?;
            (row == created.len() as u64 && total >= row).then_some(row)
        })
        .await;
    eprintln!("{depth} notifications spooled");
    assert!(
        delivered_ids(&lab.receiver, EVENTS_A).is_empty(),
        "nothing was accepted while down"
    );
    assert!(
        !lab.receiver.all().is_empty(),
        "the relay tried the receiver first"
    );

    lab.receiver.set_down(false);
    let got = wait_delivered(&lab.receiver, EVENTS_A, &created).await;
    assert_in_order_none_lost(&created, &got);
    for s in graph_deliveries(&lab.receiver, EVENTS_A) {
        let at = header(&s, "x-graph-received-at")
            .unwrap_or_else(|| panic!("a replay without X-Graph-Received-At: {s:?}"));
        let at = humantime::parse_rfc3339(at).expect("X-Graph-Received-At is RFC 3339");
        // Whole seconds: allow the one the outage started in.
        assert!(
            at + Duration::from_secs(1) >= before && at <= SystemTime::now(),
            "X-Graph-Received-At {at:?} is not when the notification came"
        );
        assert_eq!(header(&s, "x-graph-subscription-id"), Some(ids[0].as_str()));
        assert_eq!(header(&s, "x-graph-change-type"), Some("created"));
        assert_eq!(s.path, GRAPH_CALLBACK_PATH);
    }
    lab.wait_relay(WAIT, "an empty spool", |v| {
        (graph_row(v, EVENTS_A)?["spool_depth"].as_u64()? == 0).then_some(())
    })
    .await;
    assert_eq!(
        resyncs(&lab.receiver, EVENTS_A),
        0,
        "no resync: nothing lost"
    );
}

/// Promise (slow receiver): a receiver that takes longer than ~2 s does not make Graph wait:
/// the relay gives the direct attempt a bounded share of Graph's deadline, spools the
/// notification, and answers 202 within ~3 s, also for notifications arriving while a slow
/// replay is under way; every notification reaches the receiver, first arrivals in order.
/// Duplicates are expected and tolerated (at least once): the abandoned direct attempt may
/// still have been processed by the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receiver_does_not_delay_graph_and_gets_everything() {
    let lab = Lab::start(&[], |_| {}, Setup::graph(&[EVENTS_A])).await;
    let ids = wait_graph_live(&lab.sim, &[EVENTS_A]).await;
    lab.receiver.set_delay(Duration::from_millis(2200));
    let mut created = make_changes(&lab.sim, &ids[0], 1);
    wait_acknowledged(&lab.sim, 1).await;
    // The first is spooled and its (slow) replay is starting: more arrive meanwhile.
    created.extend(make_changes(&lab.sim, &ids[0], 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    created.extend(make_changes(&lab.sim, &ids[0], 1));
    wait_acknowledged(&lab.sim, created.len()).await;
    assert_every_notification_202_fast(&lab.sim);
    let got = wait_delivered(&lab.receiver, EVENTS_A, &created).await;
    eprintln!("created {created:?}, receiver got {got:?}");
    assert_in_order_none_lost(&created, &got);
}

/// Promise (`kill -9`): what the relay acknowledged to Graph (202) is durable without any
/// shutdown path: after `kill -9` of the real binary and a new start on the same port and state
/// directory, every acknowledged notification (and one Graph retried while the relay was dead)
/// reaches the receiver in order; the relay kept the subscription id and its secret (new
/// notifications for it are accepted, never 403) and made no new subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_notifications_and_ids_survive_kill_9() {
    let mut lab = Lab::prepare(&[], |_| {}, Setup::graph(&[EVENTS_A])).await;
    let mut binary = lab.spawn_binary().await;
    let id = wait_graph_live(&lab.sim, &[EVENTS_A]).await.remove(0);
    wait_row_active(binary.admin, EVENTS_A, &id).await;

    lab.receiver.set_down(true);
    let mut created = make_changes(&lab.sim, &id, 2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    created.extend(make_changes(&lab.sim, &id, 2));
    wait_acknowledged(&lab.sim, created.len()).await;
    assert_every_notification_202_fast(&lab.sim);
    wait_api(binary.admin, WAIT, "four notifications spooled", |v| {
        (graph_row(v, EVENTS_A)?["spool_depth"].as_u64()? == 4).then_some(())
    })
    .await;

    binary.kill_9();
    // Graph keeps this one and retries it until the relay answers again.
    created.extend(make_changes(&lab.sim, &id, 1));
    lab.receiver.set_down(false);
    let binary = lab.spawn_binary().await;

    let got = wait_delivered(&lab.receiver, EVENTS_A, &created).await;
    assert_in_order_none_lost(&created, &got);
    let later = make_changes(&lab.sim, &id, 1);
    let got = wait_delivered(&lab.receiver, EVENTS_A, &later).await;
    assert_eq!(got.last(), later.last(), "the new one came last");
    wait_row_active(binary.admin, EVENTS_A, &id).await;
    let refused: Vec<_> = lab
        .sim
        .graph_deliveries()
        .into_iter()
        .filter(|d| d.status == Some(403))
        .collect();
    assert!(
        refused.is_empty(),
        "the restarted relay did not know its secret: {refused:#?}"
    );
    assert_eq!(
        lab.sim.graph_subscriptions().len(),
        1,
        "no new subscription: {:#?}",
        lab.sim.graph_subscriptions()
    );
    assert_eq!(graph_creates(&lab.sim).len(), 1, "one create call only");
    assert!(lab.sim.graph_subscription(&id).unwrap().is_live());
}

/// Promise (restart): a relay stopped normally and started again on the same state directory
/// knows its subscription: no new one is created, the same id stays live, and renewals of it
/// go on (the lifetime is capped short so they come every few seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_subscription_and_renews_it() {
    let mut lab = Lab::start(
        &[],
        |c| c.graph.lifetime_cap = Some(Duration::from_secs(5)),
        Setup::graph(&[EVENTS_A]),
    )
    .await;
    let id = wait_graph_live(&lab.sim, &[EVENTS_A]).await.remove(0);
    sim_wait(&lab.sim, WAIT, "a first renewal", |s| {
        s.graph_subscription(&id).filter(|x| x.renewed >= 1)
    })
    .await;
    lab.stop_relay().await;
    let renewed = lab.sim.graph_subscription(&id).unwrap().renewed;
    lab.start_again().await;
    wait_row_active(lab.admin(), EVENTS_A, &id).await;
    let after = sim_wait(&lab.sim, WAIT, "a renewal after the restart", |s| {
        s.graph_subscription(&id).filter(|x| x.renewed > renewed)
    })
    .await;
    assert!(after.is_live(), "{after:?}");
    assert_eq!(
        live_graph(&lab.sim, EVENTS_A).map(|s| s.id),
        Some(id.clone()),
        "the same subscription stays live"
    );
    assert_eq!(
        lab.sim.graph_subscriptions().len(),
        1,
        "no new subscription: {:#?}",
        lab.sim.graph_subscriptions()
    );
    let created = make_changes(&lab.sim, &id, 2);
    let got = wait_delivered(&lab.receiver, EVENTS_A, &created).await;
    assert_eq!(got, created);
}

/// Promise (`--graph-resources-file`): a resource removed from the file has its subscription
/// deleted at Graph (`DELETE`, not left to expire) and disappears from the admin API, without
/// touching the others; added back, it gets a new subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_resource_is_deleted_at_graph_and_added_back_anew() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("resources.txt");
    write_mailboxes(&file, &[EVENTS_A, EVENTS_B]);
    let mut setup = Setup::graph(&[]);
    setup.graph_resources_file = Some(file.clone());
    let lab = Lab::start(&[], |_| {}, setup).await;
    let ids = wait_graph_live(&lab.sim, &[EVENTS_A, EVENTS_B]).await;
    wait_row_active(lab.admin(), EVENTS_A, &ids[0]).await;
    wait_row_active(lab.admin(), EVENTS_B, &ids[1]).await;

    write_mailboxes(&file, &[EVENTS_A]);
    let gone = sim_wait(&lab.sim, WAIT, "B's subscription deleted", |s| {
        s.graph_subscription(&ids[1]).filter(|x| !x.is_live())
    })
    .await;
    assert_eq!(gone.removal, Some(RemovalReason::Deleted), "{gone:?}");
    lab.wait_relay(WAIT, "B no longer listed", |v| {
        graph_row(v, EVENTS_B).is_none().then_some(())
    })
    .await;
    let a = lab.sim.graph_subscription(&ids[0]).unwrap();
    assert!(a.is_live(), "A untouched: {a:?}");
    wait_row_active(lab.admin(), EVENTS_A, &ids[0]).await;
    assert!(live_graph(&lab.sim, EVENTS_B).is_none());

    write_mailboxes(&file, &[EVENTS_A, EVENTS_B]);
    let new_b = sim_wait(&lab.sim, WAIT, "a new subscription for B", |s| {
        live_graph(s, EVENTS_B).map(|x| x.id)
    })
    .await;
    assert_ne!(new_b, ids[1]);
    wait_row_active(lab.admin(), EVENTS_B, &new_b).await;
    let created = make_changes(&lab.sim, &new_b, 1);
    wait_delivered(&lab.receiver, EVENTS_B, &created).await;
    assert_eq!(
        lab.sim.graph_subscription(&ids[0]).map(|s| s.is_live()),
        Some(true)
    );
    assert_eq!(graph_creates(&lab.sim).len(), 3, "A, B, and B again");
}

/// Promise (both managed modes at once): one relay keeps an EWS mailbox and a Graph resource
/// subscribed side by side; EWS notifications reach the receiver at the EWS callback path with
/// `X-EWS-*` headers, Graph's at the Graph callback path with `X-Graph-*` headers, each only its
/// own; the admin API lists both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ews_and_graph_side_by_side_on_one_relay() {
    let mut setup = Setup::new(&[ROOM_A]);
    setup.graph_resources = vec![EVENTS_A.to_owned()];
    let lab = Lab::start(&[ROOM_A], |_| {}, setup).await;
    let ews_id = lab.wait_active(&[ROOM_A]).await.remove(0);
    let graph_id = wait_graph_live(&lab.sim, &[EVENTS_A]).await.remove(0);
    wait_row_active(lab.admin(), EVENTS_A, &graph_id).await;

    let events = lab
        .sim
        .create_events(ROOM_A, EventType::Created, 2)
        .unwrap();
    let changes = make_changes(&lab.sim, &graph_id, 2);
    let got_events = lab.receiver.wait_events(ROOM_A, &events, WAIT).await;
    assert_in_order_none_lost(&events, &got_events);
    let got_changes = wait_delivered(&lab.receiver, EVENTS_A, &changes).await;
    assert_eq!(got_changes, changes);

    let ews: Vec<_> = lab.receiver.accepted_for(ROOM_A);
    assert!(!ews.is_empty());
    for s in &ews {
        assert_eq!(s.path, CALLBACK_PATH, "{s:?}");
        assert_eq!(header(s, "x-ews-subscription-id"), Some(ews_id.as_str()));
        assert!(
            !s.headers.keys().any(|k| k.as_str().starts_with("x-graph-")),
            "Graph headers on an EWS delivery: {s:?}"
        );
    }
    for s in graph_deliveries(&lab.receiver, EVENTS_A) {
        assert_eq!(s.path, GRAPH_CALLBACK_PATH, "{s:?}");
        assert_eq!(
            header(&s, "x-graph-subscription-id"),
            Some(graph_id.as_str())
        );
        assert_eq!(header(&s, "x-graph-mailbox"), Some(ROOM_A));
        assert!(
            !s.headers.keys().any(|k| k.as_str().starts_with("x-ews-")),
            "EWS headers on a Graph delivery: {s:?}"
        );
    }
    // Everything the receiver accepted is one or the other.
    for s in lab.receiver.accepted() {
        let is_ews = header(&s, "x-ews-mailbox").is_some();
        let is_graph = header(&s, "x-graph-resource").is_some();
        assert!(is_ews != is_graph, "neither or both kinds: {s:?}");
    }
    let v = lab.api().await;
    assert_eq!(
        mailbox_view(&v, ROOM_A).unwrap()["subscription_id"],
        ews_id.as_str()
    );
    assert_eq!(
        graph_row(&v, EVENTS_A).unwrap()["subscription_id"],
        graph_id.as_str()
    );
}

/// Promise (throttling): a create refused with 429 and `Retry-After` is tried again no sooner
/// than Graph asked (2 s here), and then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_create_waits_retry_after_then_succeeds() {
    let mut lab = Lab::prepare(&[], |_| {}, Setup::graph(&[EVENTS_A])).await;
    lab.sim.graph_throttle(1, GraphThrottle::TooManyRequests, 2);
    lab.launch().await;
    let id = wait_graph_live(&lab.sim, &[EVENTS_A]).await.remove(0);
    // The relay has read the 201 (the simulator records the status once answered).
    wait_row_active(lab.admin(), EVENTS_A, &id).await;
    let creates = graph_creates(&lab.sim);
    assert_eq!(
        creates.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 201],
        "{creates:#?}"
    );
    let gap = req_time(&creates[1])
        .duration_since(req_time(&creates[0]))
        .unwrap_or_default();
    assert!(
        gap >= Duration::from_millis(1990),
        "retried {gap:?} after a 429 with Retry-After: 2"
    );
    assert!(
        gap < Duration::from_secs(6),
        "retried only {gap:?} after a 429 with Retry-After: 2"
    );
    let metrics = common::admin_get(lab.admin(), "/metrics").await.unwrap().1;
    assert!(
        metric_value(
            &metrics,
            "ews_relay_graph_calls_total{op=\"create\",outcome=\"throttled\"}"
        ) >= 1.0,
        "{metrics}"
    );
}

/// Promise (lifetime refused): when Graph refuses a create because the expiration "can only be
/// N minutes in the future", the relay asks again at once with a shorter lifetime and succeeds;
/// the expiration it got is within Graph's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_long_expiration_is_retried_shorter_at_once() {
    let started = Instant::now();
    let lab = Lab::start(
        &[],
        |c| c.graph.max_lifetime = Duration::from_secs(100 * 60),
        Setup::graph(&[EVENTS_A]),
    )
    .await;
    let id = sim_wait(
        &lab.sim,
        Duration::from_secs(5),
        "a live subscription within a few seconds",
        |s| live_graph(s, EVENTS_A).map(|x| x.id),
    )
    .await;
    eprintln!("live {:?} after the start", started.elapsed());
    wait_row_active(lab.admin(), EVENTS_A, &id).await;
    let creates = graph_creates(&lab.sim);
    assert_eq!(
        creates.iter().map(|r| r.status).collect::<Vec<_>>(),
        [400, 201],
        "{creates:#?}"
    );
    let gap = req_time(&creates[1])
        .duration_since(req_time(&creates[0]))
        .unwrap_or_default();
    assert!(gap < Duration::from_secs(1), "not retried at once: {gap:?}");
    let sub = lab.sim.graph_subscription(&id).unwrap();
    let expires = graph::parse_time(&sub.expiration).expect("Graph's expiration");
    let ahead = expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        ahead <= Duration::from_secs(100 * 60) && ahead >= Duration::from_secs(90 * 60),
        "expiration {:.1} minutes ahead",
        ahead.as_secs_f64() / 60.0
    );
    let metrics = common::admin_get(lab.admin(), "/metrics").await.unwrap().1;
    assert!(
        metric_value(
            &metrics,
            "ews_relay_graph_calls_total{op=\"create\",outcome=\"expiration_too_long\"}"
        ) >= 1.0,
        "{metrics}"
    );
    let created = make_changes(&lab.sim, &id, 1);
    wait_delivered(&lab.receiver, EVENTS_A, &created).await;
}
