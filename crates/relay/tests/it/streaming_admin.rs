//! What an administrator sees of `--transport streaming`: each group's connection and each
//! mailbox in `/api/subscriptions`, on the status page and in the metrics; and how mailboxes
//! are grouped when `--ews-url` names the server directly (no Autodiscover).

use std::time::Duration;

use crate::common::managed::{Endpoint, Lab, Setup};
use crate::common::{admin_get, metric_value, test_cert};
use crate::streaming::{events_arrive, lab, sim_tls, wait_streamed, A, B, LONG};

/// The group whose anchor is `anchor`, once it shows an open connection that has heard from
/// Exchange.
fn open_group<'a>(v: &'a serde_json::Value, anchor: &str) -> Option<&'a serde_json::Value> {
    v["streaming_groups"]
        .as_array()?
        .iter()
        .find(|g| g["anchor"] == anchor && g["open_since"].is_string())
        .filter(|g| g["seconds_since_keepalive"].is_u64())
}

#[tokio::test]
async fn api_status_page_and_metrics_show_each_group_connection() {
    let (lab, _c) = lab(&[A, B], |_| {}, &["--listen", "none"], &[A, B]).await;
    let ids = wait_streamed(&lab.sim, &[A, B]).await;
    let anchor = lab
        .sim
        .streaming_connections()
        .into_iter()
        .find(|c| c.open)
        .and_then(|c| c.anchor)
        .expect("an anchored connection");

    let v = lab
        .wait_relay(LONG, "an open streaming group", |v| {
            open_group(v, &anchor).cloned().map(|g| (v.clone(), g))
        })
        .await;
    let (api, group) = v;
    assert_eq!(api["mode"], "managed");
    assert_eq!(api["transport"], "streaming");
    assert_eq!(api["streaming_groups"].as_array().unwrap().len(), 1);
    assert_eq!(group["mailboxes"], 2);
    assert_eq!(group["connections"], 1);
    assert!(group["ews_url"].as_str().unwrap().starts_with("https://"));
    assert!(group["last_error"].is_null(), "{group:#}");
    // Keep-alives every 100 ms: the age stays well under the 1 s silence window.
    assert!(group["seconds_since_keepalive"].as_u64().unwrap() <= 1);
    for (mailbox, id) in [(A, &ids[0]), (B, &ids[1])] {
        let row = api["mailboxes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mailbox"] == mailbox)
            .unwrap_or_else(|| panic!("no row for {mailbox}: {api:#}"));
        assert_eq!(row["state"], "active");
        assert_eq!(row["subscription_id"], id.as_str());
        assert!(
            row["last_watermark"].is_null(),
            "streaming has no watermark"
        );
    }
    let before = group["reconnects"].as_u64().unwrap();

    // A cut connection: counted, reopened, and shown with its new open time.
    assert!(lab.sim.streaming_cut(None) >= 1);
    let after = lab
        .wait_relay(LONG, "a reconnect counted", |v| {
            open_group(v, &anchor)
                .filter(|g| g["reconnects"].as_u64() > Some(before))
                .cloned()
        })
        .await;
    assert_eq!(after["connections"], 1);
    events_arrive(&lab, A, 1).await;

    let (status, html) = admin_get(lab.admin(), "/status").await.unwrap();
    assert_eq!(status, 200);
    for want in [
        "<h2 id=\"rows-h\">Mailboxes</h2>",
        "<h3 id=\"stream-h\">Streaming connections</h3>",
        "<table id=\"stream-groups\">",
        "</span> connected</td>",
        &format!("<td class=\"id\">{anchor}</td>"),
        "<span class=\"n\">1</span> streaming connections <small>(1 groups)</small>",
    ] {
        assert!(html.contains(want), "missing {want} in\n{html}");
    }
    assert!(html.contains(A) && html.contains(B), "mailbox rows");

    // The gauges are published on a timer: wait for the values that follow the reconnect.
    let deadline = std::time::Instant::now() + LONG;
    let metrics = loop {
        let (_, m) = admin_get(lab.admin(), "/metrics").await.unwrap();
        if metric_value(&m, "ews_relay_stream_connections") == 1.0
            && metric_value(&m, "ews_relay_stream_reconnects_total{reason=\"broken\"}") >= 1.0
        {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stream metrics never settled:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(metric_value(&metrics, "ews_relay_stream_groups"), 1.0);
    assert!(metric_value(&metrics, "ews_relay_stream_keepalive_age_seconds") <= 1.0);
}

/// Without Autodiscover every mailbox has the same EWS URL and no GroupingInformation: the
/// relay still cuts them into groups of at most 200, each with its own anchor and connection.
#[tokio::test]
async fn direct_ews_url_groups_mailboxes_by_two_hundred() {
    let names: Vec<String> = (0..250)
        .map(|i| format!("room{i:03}@contoso.example"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let ews_cert = test_cert();
    let tls = sim_tls(&ews_cert);
    let mut setup = Setup::new(&refs);
    setup.endpoint = Endpoint::Ews;
    setup.extra = vec![
        "--transport".into(),
        "streaming".into(),
        "--ews-ca-file".into(),
        ews_cert.cert_path.display().to_string(),
        "--max-concurrent-ews".into(),
        "16".into(),
    ];
    let lab = Lab::start(
        &refs,
        |c| {
            c.tls = Some(tls);
            c.streaming_keepalive = Duration::from_millis(200);
        },
        setup,
    )
    .await;
    let conns = crate::common::managed::sim_wait(
        &lab.sim,
        Duration::from_secs(60),
        "250 mailboxes streamed",
        |h| {
            let conns: Vec<_> = h
                .streaming_connections()
                .into_iter()
                .filter(|c| c.open)
                .collect();
            (conns.iter().map(|c| c.serving.len()).sum::<usize>() == 250).then_some(conns)
        },
    )
    .await;
    assert_eq!(conns.len(), 2, "{conns:#?}");
    assert!(conns.iter().all(|c| c.serving.len() <= 200));
    let anchors: std::collections::BTreeSet<_> =
        conns.iter().filter_map(|c| c.anchor.clone()).collect();
    assert_eq!(
        anchors.len(),
        2,
        "each group has its own anchor: {conns:#?}"
    );
    assert!(conns.iter().all(|c| c.carried_cookie));
    let groups = lab
        .wait_relay(LONG, "two open groups", |v| {
            let g = v["streaming_groups"].as_array()?;
            (g.len() == 2 && g.iter().all(|g| g["open_since"].is_string())).then(|| g.clone())
        })
        .await;
    let mut sizes: Vec<u64> = groups
        .iter()
        .map(|g| g["mailboxes"].as_u64().unwrap())
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [50, 200]);
    assert!(groups.iter().all(|g| g["grouping"] == ""));
    events_arrive(&lab, &names[0], 1).await;
    events_arrive(&lab, &names[249], 1).await;
}
