//! `--refresh-ranges` against a local stand-in for Microsoft 365's endpoint web service.

use crate::common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The fake service: answers /version/Worldwide and /endpoints/worldwide, counting requests.
struct FakeService {
    addr: SocketAddr,
    version: Arc<Mutex<String>>,
    endpoints: Arc<Mutex<String>>,
    version_calls: Arc<AtomicUsize>,
    endpoint_calls: Arc<AtomicUsize>,
}

impl FakeService {
    async fn start(version: &str, endpoints: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = Self {
            addr,
            version: Arc::new(Mutex::new(version.into())),
            endpoints: Arc::new(Mutex::new(endpoints.into())),
            version_calls: Default::default(),
            endpoint_calls: Default::default(),
        };
        let (v, e, vc, ec) = (
            me.version.clone(),
            me.endpoints.clone(),
            me.version_calls.clone(),
            me.endpoint_calls.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (v, e, vc, ec) = (v.clone(), e.clone(), vc.clone(), ec.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let path = req.uri().path().to_owned();
                            let has_id = req
                                .uri()
                                .query()
                                .is_some_and(|q| q.contains("ClientRequestId="));
                            let body = if !has_id {
                                "missing ClientRequestId".to_owned()
                            } else if path == "/version/Worldwide" {
                                vc.fetch_add(1, Ordering::SeqCst);
                                format!(
                                    r#"{{"instance":"Worldwide","latest":"{}"}}"#,
                                    v.lock().unwrap()
                                )
                            } else {
                                ec.fetch_add(1, Ordering::SeqCst);
                                e.lock().unwrap().clone()
                            };
                            async move {
                                Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                    Bytes::from(body),
                                )))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        me
    }
}

fn exchange_list(cidrs: &[&str]) -> String {
    let ips: Vec<String> = cidrs.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        r#"[{{"id":1,"serviceArea":"Exchange","ips":[{}],"tcpPorts":"443"}},{{"id":46,"serviceArea":"SharePoint","ips":["127.0.0.9/32"]}}]"#,
        ips.join(",")
    )
}

async fn relay_with_ranges(
    receiver: SocketAddr,
    service: SocketAddr,
    state: &std::path::Path,
) -> Relay {
    Relay::start(
        receiver,
        &[
            "--allow-preset",
            "exchange-online",
            "--refresh-ranges",
            "--ranges-url",
            &format!("http://{service}"),
            "--ranges-interval",
            "200ms",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    )
    .await
}

async fn admitted(relay: &Relay) -> bool {
    https_client(relay.addr, &relay.cert, None).await.is_ok()
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn ranges_follow_the_service_and_never_take_garbage() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let service = FakeService::start(
        "2026110100",
        &exchange_list(&["127.0.0.1/32", "40.96.0.0/13"]),
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let relay = relay_with_ranges(receiver.addr, service.addr, state.path()).await;

    // Changed version (none known yet) → downloaded → 127.0.0.1 is now an "Exchange" address.
    eventually("the new list admits 127.0.0.1", || admitted(&relay)).await;
    assert_eq!(service.endpoint_calls.load(Ordering::SeqCst), 1);
    assert_eq!(relay.metric("ews_relay_ranges_version").await, 2026110100.0);

    // Unchanged version → the list is not downloaded again.
    let before = service.version_calls.load(Ordering::SeqCst);
    eventually("a few more version checks", async || {
        service.version_calls.load(Ordering::SeqCst) >= before + 3
    })
    .await;
    assert_eq!(
        service.endpoint_calls.load(Ordering::SeqCst),
        1,
        "no download while unchanged"
    );

    // A new version whose list is garbage → refused, the good list stays.
    *service.endpoints.lock().unwrap() = "<html>maintenance</html>".into();
    *service.version.lock().unwrap() = "2026120100".into();
    eventually("the garbage is refused", async || {
        relay
            .metric("ews_relay_reloads_total{what=\"ranges\",outcome=\"refused\"}")
            .await
            >= 1.0
    })
    .await;
    assert!(admitted(&relay).await, "good list kept");
    // A list with one bad network is refused whole.
    *service.endpoints.lock().unwrap() = exchange_list(&["127.0.0.2/32", "300.1.1.1/8"]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(admitted(&relay).await, "good list still kept");
    assert_eq!(relay.metric("ews_relay_ranges_version").await, 2026110100.0);

    // A good new version replaces it.
    *service.endpoints.lock().unwrap() = exchange_list(&["127.0.0.2/32"]);
    *service.version.lock().unwrap() = "2026120200".into();
    eventually("127.0.0.1 no longer admitted", async || {
        !admitted(&relay).await
    })
    .await;
    assert_eq!(relay.metric("ews_relay_ranges_version").await, 2026120200.0);
    relay.stop().await;
}

#[tokio::test]
async fn service_down_falls_back_to_the_cache_then_the_snapshot() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let state = tempfile::tempdir().unwrap();
    {
        let service = FakeService::start("7", &exchange_list(&["127.0.0.1/32"])).await;
        let relay = relay_with_ranges(receiver.addr, service.addr, state.path()).await;
        eventually("the list is fetched", || admitted(&relay)).await;
        relay.stop().await;
    }
    assert!(
        state.path().join("exchange-online-ranges.json").exists(),
        "cached"
    );
    // The service is gone: the cached list applies.
    let down = closed_port().await;
    let relay = relay_with_ranges(receiver.addr, down, state.path()).await;
    eventually("the cached list admits 127.0.0.1", || admitted(&relay)).await;
    relay.stop().await;
    // No cache and no service: the built-in snapshot (which does not admit loopback).
    let empty = tempfile::tempdir().unwrap();
    let relay = relay_with_ranges(receiver.addr, down, empty.path()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!admitted(&relay).await, "built-in snapshot in force");
    relay.stop().await;
}

#[test]
fn microsoft_is_asked_at_most_hourly() {
    let e = ews_relay::Config::parse_from([
        "ews-relay",
        "--refresh-ranges",
        "--ranges-interval",
        "10m",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("--ranges-interval"), "{e}");
    let e =
        ews_relay::Config::parse_from(["ews-relay", "--refresh-ranges", "--allow", "10.0.0.0/8"])
            .unwrap_err()
            .to_string();
    assert!(e.contains("exchange-online"), "{e}");
    assert!(ews_relay::Config::parse_from(["ews-relay", "--refresh-ranges"]).is_ok());
}
