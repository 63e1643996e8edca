//! Managed EWS mode with `--transport streaming`, end to end: the relay opens
//! `GetStreamingEvents` connections over real TLS to the simulator and delivers what they carry
//! to the receiver as push notifications, through every fault the simulator can inject.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ews::EventType;
use ews_sim::{
    ConnectionEnd, MailboxConfig, RecordedRequest, SimConfig, SimHandle, StreamingConnectionInfo,
};
use rustls_pki_types::pem::PemObject;

use crate::common::managed::{
    assert_in_order_none_lost, header, req_time, sim_wait, Endpoint, Lab, Setup, PREFIX,
};
use crate::common::{test_cert, TestCert};

pub(crate) const A: &str = "alice@contoso.example";
pub(crate) const B: &str = "bob@contoso.example";
pub(crate) const C: &str = "carol@contoso.example";
/// Generous: the relay reconnects within a silence window plus a reconnect.
pub(crate) const LONG: Duration = Duration::from_secs(20);

/// A rustls server config for the simulator, so the relay's outbound calls run over TLS.
pub(crate) fn sim_tls(cert: &TestCert) -> Arc<rustls::ServerConfig> {
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&cert.key_path).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der.clone()], key)
        .unwrap(),
    )
}

/// A lab whose simulator serves TLS, with fast keep-alives and a relay in streaming mode.
pub(crate) async fn lab(
    hosted: &[&str],
    tune: impl FnOnce(&mut SimConfig),
    relay_flags: &[&str],
    follow: &[&str],
) -> (Lab, TestCert) {
    let (mut lab, cert) = prepare_lab(hosted, tune, relay_flags, follow).await;
    lab.launch().await;
    (lab, cert)
}

/// [`lab`] without the relay started, so faults can be armed before its first request; start
/// it with [`Lab::launch`].
pub(crate) async fn prepare_lab(
    hosted: &[&str],
    tune: impl FnOnce(&mut SimConfig),
    relay_flags: &[&str],
    follow: &[&str],
) -> (Lab, TestCert) {
    if std::env::var_os("STREAM_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("ews_relay=trace")
            .with_test_writer()
            .try_init();
    }
    let ews_cert = test_cert();
    let tls = sim_tls(&ews_cert);
    let mut setup = Setup::new(follow);
    setup.endpoint = Endpoint::Autodiscover;
    setup.extra = [
        "--transport",
        "streaming",
        "--ews-ca-file",
        ews_cert.cert_path.to_str().unwrap(),
        "--stream-silence-timeout",
        "1s",
    ]
    .iter()
    .chain(relay_flags)
    .map(|s| s.to_string())
    .collect();
    let lab = Lab::prepare(
        hosted,
        |c| {
            c.tls = Some(tls);
            c.streaming_keepalive = Duration::from_millis(100);
            // Connections stay open unless a test shortens them.
            c.streaming_connection_timeout = Some(Duration::from_secs(60));
            tune(c);
        },
        setup,
    )
    .await;
    (lab, ews_cert)
}

/// Waits until the simulator has an open connection serving a live subscription of each of
/// `mailboxes`; returns the subscription ids in the same order.
pub(crate) async fn wait_streamed(sim: &SimHandle, mailboxes: &[&str]) -> Vec<String> {
    sim_wait(sim, LONG, "every mailbox streamed", |h| {
        let subs = h.streaming_subscriptions();
        let conns = h.streaming_connections();
        mailboxes
            .iter()
            .map(|m| {
                let s = subs.iter().find(|s| s.live && s.mailbox == *m)?;
                conns
                    .iter()
                    .any(|c| c.open && c.serving.contains(&s.id))
                    .then(|| s.id.clone())
            })
            .collect()
    })
    .await
}

/// Deliveries to the receiver carrying `X-EWS-Resync-Required: mailbox`.
pub(crate) fn resyncs(lab: &Lab, mailbox: &str) -> usize {
    lab.receiver
        .accepted()
        .iter()
        .filter(|s| header(s, "x-ews-resync-required") == Some(mailbox))
        .count()
}

pub(crate) async fn wait_resync(lab: &Lab, mailbox: &str) {
    let deadline = std::time::Instant::now() + LONG;
    while resyncs(lab, mailbox) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no resync signal for {mailbox}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Creates `n` events for `mailbox`; returns their item ids (streamed events carry no
/// watermark in the simulator: the item id tells them apart).
pub(crate) fn create(lab: &Lab, mailbox: &str, n: usize) -> Vec<String> {
    lab.sim
        .create_events(mailbox, EventType::Created, n)
        .unwrap();
    let ids = lab.sim.event_item_ids(mailbox);
    ids[ids.len() - n..].to_vec()
}

/// Item ids of the events the receiver accepted for `mailbox`, in arrival order.
pub(crate) fn received(lab: &Lab, mailbox: &str) -> Vec<String> {
    lab.receiver
        .accepted_for(mailbox)
        .iter()
        .filter(|s| !s.body.is_empty())
        .flat_map(|s| {
            let parsed = ews::parse_send_notification(&s.body).unwrap();
            parsed
                .messages
                .into_iter()
                .filter_map(|m| m.notification)
                .flat_map(|n| n.events)
                .filter_map(|e| match e.object {
                    Some(ews::ObjectId::Item(id)) => Some(id.id.into_owned()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

pub(crate) async fn wait_received(lab: &Lab, mailbox: &str, want: &[String]) -> Vec<String> {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let got = received(lab, mailbox);
        if want.iter().all(|w| got.contains(w)) {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "receiver did not get all events of {mailbox}: want {want:?}, got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Asserts every created event arrived exactly once (no reconnect repeated one), in order.
pub(crate) fn assert_each_once(created: &[String], got: &[String]) {
    assert_in_order_none_lost(created, got);
    for id in created {
        let n = got.iter().filter(|g| *g == id).count();
        assert_eq!(n, 1, "event {id} delivered {n} times: {got:?}");
    }
}

/// Recorded `GetStreamingEvents` requests, oldest first.
pub(crate) fn get_streaming_events(sim: &SimHandle) -> Vec<RecordedRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.path.eq_ignore_ascii_case("/EWS/Exchange.asmx"))
        .filter(|r| {
            r.body.contains("GetStreamingEvents>") || r.body.contains("GetStreamingEvents ")
        })
        .collect()
}

/// When the simulator recorded a streaming connection (or its refusal).
pub(crate) fn opened_at(c: &StreamingConnectionInfo) -> SystemTime {
    humantime::parse_rfc3339(&c.opened).expect("RFC 3339")
}

/// `later - earlier`, zero when `later` is not later.
pub(crate) fn gap(earlier: SystemTime, later: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

/// Creates `n` events for `mailbox` and waits until the receiver has them all.
pub(crate) async fn events_arrive(lab: &Lab, mailbox: &str, n: usize) -> Vec<String> {
    let created = create(lab, mailbox, n);
    wait_received(lab, mailbox, &created).await;
    created
}

#[tokio::test]
async fn streamed_events_reach_the_receiver_as_push_notifications() {
    let (lab, _c) = lab(&[A, B], |_| {}, &["--listen", "none"], &[A, B]).await;
    let ids = wait_streamed(&lab.sim, &[A, B]).await;
    // One connection for the group, anchored on its first mailbox, with affinity cookie.
    let conns = lab.sim.streaming_connections();
    let open: Vec<_> = conns.iter().filter(|c| c.open).collect();
    assert_eq!(open.len(), 1, "{conns:#?}");
    assert!(open[0].serving.contains(&ids[0]) && open[0].serving.contains(&ids[1]));
    assert!(open[0].anchor.is_some());
    assert!(open[0].carried_cookie, "{:#?}", open[0]);

    let created = events_arrive(&lab, A, 3).await;
    assert_each_once(&created, &received(&lab, A));
    let seen = lab.receiver.accepted_for(A);
    let first = &seen[0];
    assert_eq!(first.path, PREFIX, "deliveries go to --path-prefix");
    assert_eq!(header(first, "x-ews-transport"), Some("streaming"));
    assert_eq!(
        header(first, "x-ews-subscription-id"),
        Some(ids[0].as_str())
    );
    // The body is a SendNotification a push receiver reads as such.
    let parsed = ews::parse_send_notification(&first.body).unwrap();
    assert_eq!(parsed.messages.len(), 1);
    events_arrive(&lab, B, 1).await;
    assert!(lab
        .receiver
        .accepted_for(B)
        .iter()
        .all(|s| header(s, "x-ews-mailbox") == Some(B)));
}

#[tokio::test]
async fn renewal_overlaps_connections_without_losing_or_repeating_events() {
    let (lab, _c) = lab(&[A], |_| {}, &["--stream-reconnect-after", "1s"], &[A]).await;
    wait_streamed(&lab.sim, &[A]).await;
    // Events keep coming while connections are replaced every second.
    let mut created = Vec::new();
    for _ in 0..40 {
        created.extend(create(&lab, A, 2));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = wait_received(&lab, A, &created).await;
    assert_in_order_none_lost(&created, &got);
    assert_eq!(got.len(), created.len(), "no event delivered twice");
    let conns = lab.sim.streaming_connections();
    let replaced = conns
        .iter()
        .filter(|c| c.end == Some(ConnectionEnd::Replaced))
        .count();
    assert!(
        replaced >= 2,
        "connections were renewed by overlap: {conns:#?}"
    );
    assert_eq!(resyncs(&lab, A), 0, "an overlap needs no resync");
}

#[tokio::test]
async fn closed_cut_and_silent_connections_are_replaced() {
    let (lab, _c) = lab(
        &[A],
        |c| c.streaming_connection_timeout = Some(Duration::from_millis(700)),
        &[],
        &[A],
    )
    .await;
    wait_streamed(&lab.sim, &[A]).await;
    // Closed by the server (ConnectionTimeout): reopened at once, events keep flowing.
    sim_wait(&lab.sim, LONG, "three connections closed by timeout", |h| {
        (h.streaming_connections()
            .iter()
            .filter(|c| c.end == Some(ConnectionEnd::Closed))
            .count()
            >= 3)
            .then_some(())
    })
    .await;
    let mut created = events_arrive(&lab, A, 2).await;
    // Closed by Exchange: everything written was read; no resync.
    assert_eq!(
        resyncs(&lab, A),
        0,
        "a connection Exchange closed needs no resync"
    );

    // Cut without Closed: what it carried last may never have been read, so the mailbox gets
    // the resync signal.
    assert!(lab.sim.streaming_cut(None) >= 1);
    wait_resync(&lab, A).await;
    created.extend(events_arrive(&lab, A, 2).await);
    let after_cut = resyncs(&lab, A);

    // Silent (stalled): replaced within --stream-silence-timeout plus a reconnect, and the
    // mailbox gets the resync signal again.
    let before = lab.sim.streaming_connections().len();
    assert!(lab.sim.streaming_stall(None) >= 1);
    let stalled_at = std::time::Instant::now();
    created.extend(create(&lab, A, 2));
    wait_received(&lab, A, &created).await;
    assert!(lab.sim.streaming_connections().len() > before);
    assert!(stalled_at.elapsed() < Duration::from_secs(5));
    let deadline = std::time::Instant::now() + LONG;
    while resyncs(&lab, A) <= after_cut {
        assert!(
            std::time::Instant::now() < deadline,
            "no resync signal after the silent connection was given up"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_each_once(&created, &received(&lab, A));
}

#[tokio::test]
async fn expired_subscription_is_remade_and_the_mailbox_resynchronised() {
    let (lab, _c) = lab(&[A, B], |_| {}, &[], &[A, B]).await;
    let ids = wait_streamed(&lab.sim, &[A, B]).await;
    lab.sim.streaming_expire(&ids[0]).unwrap();
    wait_resync(&lab, A).await;
    let again = wait_streamed(&lab.sim, &[A, B]).await;
    assert_ne!(again[0], ids[0], "a new subscription for A");
    assert_eq!(
        again[1], ids[1],
        "B keeps its subscription: errors are per mailbox"
    );
    assert_eq!(resyncs(&lab, B), 0);
    events_arrive(&lab, A, 2).await;
    events_arrive(&lab, B, 1).await;
}

#[tokio::test]
async fn missed_events_ask_for_a_resync_and_the_subscription_lives_on() {
    let (lab, _c) = lab(&[A], |_| {}, &[], &[A]).await;
    let ids = wait_streamed(&lab.sim, &[A]).await;
    lab.sim.streaming_missed_events(&ids[0]).unwrap();
    wait_resync(&lab, A).await;
    events_arrive(&lab, A, 2).await;
    assert_eq!(wait_streamed(&lab.sim, &[A]).await, ids);
}

#[tokio::test]
async fn moved_mailbox_is_discovered_again_and_resynchronised() {
    let (lab, _c) = lab(&[A, B], |_| {}, &[], &[A, B]).await;
    let ids = wait_streamed(&lab.sim, &[A, B]).await;
    lab.sim.move_mailbox(A).unwrap();
    wait_resync(&lab, A).await;
    let again = wait_streamed(&lab.sim, &[A, B]).await;
    assert_ne!(again[0], ids[0]);
    events_arrive(&lab, A, 1).await;
    events_arrive(&lab, B, 1).await;
}

#[tokio::test]
async fn refused_connections_back_off_and_recover() {
    let (lab, _c) = lab(&[A], |c| c.streaming_connection_limit = 10, &[], &[A]).await;
    wait_streamed(&lab.sim, &[A]).await;
    lab.sim.streaming_refuse_connections(2);
    lab.sim.streaming_cut(None);
    sim_wait(&lab.sim, LONG, "two refused connections", |h| {
        (h.streaming_connections()
            .iter()
            .filter(|c| c.refused_code.as_deref() == Some("ErrorExceededConnectionCount"))
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    wait_streamed(&lab.sim, &[A]).await;
    events_arrive(&lab, A, 2).await;
    // After each ErrorExceededConnectionCount the next attempt waits at least TRANSIENT_BASE
    // (2 s): never an immediate retry.
    let conns = lab.sim.streaming_connections();
    let mut checked = 0;
    for (i, c) in conns.iter().enumerate() {
        if c.refused_code.as_deref() != Some("ErrorExceededConnectionCount") {
            continue;
        }
        let next = conns
            .get(i + 1)
            .unwrap_or_else(|| panic!("no attempt after refusal {}: {conns:#?}", c.id));
        let waited = gap(opened_at(c), opened_at(next));
        assert!(
            waited >= Duration::from_millis(2000 - 50),
            "attempt {} came {waited:?} after ErrorExceededConnectionCount {} (want >= 2 s)",
            next.id,
            c.id
        );
        checked += 1;
    }
    assert!(checked >= 2, "{conns:#?}");
}

#[tokio::test]
async fn thousand_mailboxes_in_five_groups() {
    let names: Vec<String> = (0..1000)
        .map(|i| format!("user{i:04}@contoso.example"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (lab, _c) = lab(&refs, |_| {}, &["--max-concurrent-ews", "16"], &refs).await;
    let ids = sim_wait(
        &lab.sim,
        Duration::from_secs(60),
        "1000 mailboxes streamed",
        |h| {
            let conns = h.streaming_connections();
            let serving: usize = conns
                .iter()
                .filter(|c| c.open)
                .map(|c| c.serving.len())
                .sum();
            (serving == 1000).then_some(conns)
        },
    )
    .await;
    let open: Vec<_> = ids.iter().filter(|c| c.open).collect();
    assert!(open.len() >= 5, "{} connections", open.len());
    assert!(open.iter().all(|c| c.serving.len() <= 200));
    for m in [&names[0], &names[499], &names[999]] {
        events_arrive(&lab, m, 1).await;
    }
}

#[tokio::test]
async fn restart_reopens_the_same_subscriptions_and_kill_9_asks_for_resync() {
    let (mut lab, _c) = lab(&[A, C], |_| {}, &[], &[A, C]).await;
    let ids = wait_streamed(&lab.sim, &[A, C]).await;
    events_arrive(&lab, A, 1).await;
    // Clean stop: same subscriptions afterwards, no resync.
    lab.stop_relay().await;
    lab.start_again().await;
    assert_eq!(wait_streamed(&lab.sim, &[A, C]).await, ids);
    events_arrive(&lab, A, 1).await;
    assert_eq!(resyncs(&lab, A), 0);
    lab.stop_relay().await;

    // kill -9 while streaming: at the next start both mailboxes get the resync signal.
    let mut child = lab.spawn_binary().await;
    wait_streamed(&lab.sim, &[A, C]).await;
    // The connection's first envelope marks the stream open in the store.
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill_9();
    lab.start_again().await;
    wait_resync(&lab, A).await;
    wait_resync(&lab, C).await;
    events_arrive(&lab, C, 1).await;
}

#[tokio::test]
async fn mailboxes_in_two_groupings_get_two_connections() {
    let ews_cert = test_cert();
    let tls = sim_tls(&ews_cert);
    let mut setup = Setup::new(&[A, B, C]);
    setup.endpoint = Endpoint::Autodiscover;
    setup.extra = vec![
        "--transport".into(),
        "streaming".into(),
        "--ews-ca-file".into(),
        ews_cert.cert_path.display().to_string(),
    ];
    let lab = Lab::start(
        &[A, B, C],
        |c| {
            c.tls = Some(tls);
            c.streaming_keepalive = Duration::from_millis(100);
            c.mailboxes = vec![
                MailboxConfig::new(A).grouping("G1"),
                MailboxConfig::new(B).grouping("G1"),
                MailboxConfig::new(C).grouping("G2"),
            ];
        },
        setup,
    )
    .await;
    wait_streamed(&lab.sim, &[A, B, C]).await;
    let open = lab
        .sim
        .streaming_connections()
        .into_iter()
        .filter(|c| c.open)
        .count();
    assert_eq!(open, 2);
    events_arrive(&lab, C, 1).await;
}

#[tokio::test]
async fn receiver_outage_spools_streamed_events_and_replays_them_in_order() {
    let (lab, _c) = lab(&[A], |_| {}, &[], &[A]).await;
    wait_streamed(&lab.sim, &[A]).await;
    lab.receiver.set_down(true);
    let mut created = create(&lab, A, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    created.extend(create(&lab, A, 2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(received(&lab, A).is_empty());
    lab.receiver.set_down(false);
    let got = wait_received(&lab, A, &created).await;
    assert_each_once(&created, &got);
    // Replays look like direct deliveries, transport header included.
    let replayed: Vec<_> = lab
        .receiver
        .accepted_for(A)
        .into_iter()
        .filter(|s| header(s, "x-ews-received-at").is_some())
        .collect();
    assert!(!replayed.is_empty());
    assert!(replayed
        .iter()
        .all(|s| header(s, "x-ews-transport") == Some("streaming")));
}

/// A streaming lab following `mailboxes` through `--mailboxes-file` (the returned path; the
/// directory lives as long as the returned guard).
pub(crate) async fn file_lab(
    mailboxes: &[&str],
) -> (Lab, TestCert, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mailboxes.txt");
    crate::common::managed::write_mailboxes(&file, mailboxes);
    let ews_cert = test_cert();
    let tls = sim_tls(&ews_cert);
    let mut setup = Setup::new(&[]);
    setup.mailboxes_file = Some(file.clone());
    setup.endpoint = Endpoint::Autodiscover;
    setup.extra = vec![
        "--transport".into(),
        "streaming".into(),
        "--ews-ca-file".into(),
        ews_cert.cert_path.display().to_string(),
    ];
    let lab = Lab::start(
        mailboxes,
        |c| {
            c.tls = Some(tls);
            c.streaming_keepalive = Duration::from_millis(100);
        },
        setup,
    )
    .await;
    (lab, ews_cert, dir, file)
}

#[tokio::test]
async fn mailbox_removed_from_the_file_is_unsubscribed() {
    let (lab, _cert, _dir, file) = file_lab(&[A, B]).await;
    let ids = wait_streamed(&lab.sim, &[A, B]).await;
    crate::common::managed::write_mailboxes(&file, &[A]);
    sim_wait(&lab.sim, LONG, "B unsubscribed and A still streamed", |h| {
        let b = h.streaming_subscription(&ids[1])?;
        let a_served = h
            .streaming_connections()
            .iter()
            .any(|c| c.open && c.serving.contains(&ids[0]) && !c.serving.contains(&ids[1]));
        (!b.live && a_served).then_some(())
    })
    .await;
    events_arrive(&lab, A, 1).await;
}

#[tokio::test]
async fn server_busy_is_waited_out() {
    let (lab, _c) = lab(&[A], |_| {}, &[], &[A]).await;
    let ids = wait_streamed(&lab.sim, &[A]).await;
    // The next requests (the reconnect after the cut) answer ErrorServerBusy.
    lab.sim.server_busy(2, Duration::from_millis(300));
    lab.sim.streaming_cut(None);
    let created = events_arrive(&lab, A, 2).await;
    assert_each_once(&created, &received(&lab, A));
    assert_eq!(
        wait_streamed(&lab.sim, &[A]).await,
        ids,
        "the subscription survived"
    );
    // BackOffMilliseconds is honoured: after each ServerBusy, the next GetStreamingEvents comes
    // no sooner than 300 ms later.
    let gses = get_streaming_events(&lab.sim);
    let mut busy = 0;
    for (i, r) in gses.iter().enumerate() {
        if r.response_code.as_deref() != Some("ErrorServerBusy") {
            continue;
        }
        busy += 1;
        let next = gses
            .get(i + 1)
            .unwrap_or_else(|| panic!("no GetStreamingEvents after ServerBusy {}", r.seq));
        let waited = gap(req_time(r), req_time(next));
        assert!(
            waited >= Duration::from_millis(300 - 50),
            "GetStreamingEvents {} came {waited:?} after ServerBusy {} (BackOffMilliseconds 300)",
            next.seq,
            r.seq
        );
    }
    assert!(busy >= 1, "a GetStreamingEvents was answered ServerBusy");
    // The cut asks for one resync signal; the ServerBusy answers ask for none.
    assert_eq!(resyncs(&lab, A), 1, "one resync signal, for the cut");
}

#[tokio::test]
async fn listen_none_relay_stops_cleanly() {
    let (mut lab, _c) = lab(&[A], |_| {}, &["--listen", "none"], &[A]).await;
    wait_streamed(&lab.sim, &[A]).await;
    events_arrive(&lab, A, 1).await;
    // `stop` fails the test unless `run` returns within its deadline.
    lab.stop_relay().await;
}
