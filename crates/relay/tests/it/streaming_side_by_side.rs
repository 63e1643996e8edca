//! `--transport streaming` with the TLS listener kept: the relay follows its mailboxes over
//! `GetStreamingEvents` and, on the same run, keeps a Graph resource subscribed and passes
//! pushes from subscriptions it does not own through to the receiver — the promise that
//! streaming leaves the push side working.

use std::time::Duration;

use crate::common::managed::{header, Endpoint, Lab, Setup, PREFIX};
use crate::common::{self, test_cert};
use crate::graph_managed::{graph_deliveries, wait_delivered, wait_graph_live};
use crate::streaming::{events_arrive, sim_tls, wait_streamed, A};

const EVENTS_A: &str = "users/alice@contoso.example/events";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_graph_and_passthrough_pushes_share_one_relay() {
    let ews_cert = test_cert();
    let tls = sim_tls(&ews_cert);
    let mut setup = Setup::new(&[A]);
    setup.endpoint = Endpoint::Autodiscover;
    setup.graph_resources = vec![EVENTS_A.to_owned()];
    setup.extra = vec![
        "--transport".into(),
        "streaming".into(),
        "--ews-ca-file".into(),
        ews_cert.cert_path.display().to_string(),
        "--stream-silence-timeout".into(),
        "1s".into(),
    ];
    let lab = Lab::start(
        &[A],
        |c| {
            c.tls = Some(tls);
            c.streaming_keepalive = Duration::from_millis(100);
        },
        setup,
    )
    .await;
    let stream_ids = wait_streamed(&lab.sim, &[A]).await;
    let graph_id = wait_graph_live(&lab.sim, &[EVENTS_A]).await.remove(0);

    // Streamed EWS events: delivered at --path-prefix, marked as streamed.
    events_arrive(&lab, A, 2).await;
    let streamed = lab.receiver.accepted_for(A);
    assert!(streamed
        .iter()
        .all(|s| header(s, "x-ews-transport") == Some("streaming")
            && header(s, "x-ews-subscription-id") == Some(stream_ids[0].as_str())));

    // Graph notifications over the listener, answered by the relay, delivered with X-Graph-*.
    let changes: Vec<String> = lab
        .sim
        .graph_change(
            &ews_sim::GraphTarget::Subscription(graph_id.clone()),
            ews_sim::ChangeType::Created,
            2,
        )
        .unwrap()
        .into_iter()
        .flat_map(|c| c.ids)
        .collect();
    assert_eq!(
        wait_delivered(&lab.receiver, EVENTS_A, &changes).await,
        changes
    );
    assert!(graph_deliveries(&lab.receiver, EVENTS_A)
        .iter()
        .all(|s| header(s, "x-ews-transport").is_none()));

    // A push for a subscription the relay does not own (another application's, or one made
    // before streaming) passes through to the receiver, which answers it.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", lab.port).parse().unwrap();
    let mut client = common::https_client(addr, &lab.cert.der, None)
        .await
        .unwrap();
    let body = common::fixture("send-notification-status.xml");
    let before = lab.receiver.all().len();
    let (status, _, answer) = common::send(&mut client, common::post(PREFIX, body.clone())).await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&answer).contains("<m:SubscriptionStatus>OK"),
        "the receiver's own answer"
    );
    let all = lab.receiver.all();
    assert_eq!(all.len(), before + 1, "the push reached the receiver");
    let push = all.last().unwrap();
    assert_eq!(push.body, body, "passed through unchanged");
    assert!(header(push, "x-ews-transport").is_none());

    // The admin API shows all three.
    let v = lab.api().await;
    assert_eq!(v["transport"], "streaming");
    assert_eq!(v["streaming_groups"].as_array().unwrap().len(), 1);
    assert!(v["graph_resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["subscription_id"] == graph_id.as_str()));
    assert!(v["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["source"] == "ews" && s["answered_by"] == "receiver"));
    // Events after all that still stream.
    events_arrive(&lab, A, 1).await;
}
