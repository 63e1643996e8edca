//! `GET /status` end to end: a real relay with subscriptions in every passthrough state and a
//! denied source, the page's HTML checked row by row, then the same page loaded in a real
//! headless Chromium (scripts run under the page's Content-Security-Policy; a screenshot is
//! kept under `target/test-artifacts/status.png`). Without Chromium the browser part says
//! `SKIPPED` and the HTML checks still run. One managed-mode check uses the EWS simulator lab.

use crate::common;
use crate::common::managed as lab;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Subscription ids of the fixtures, and the ids the test gives its copies.
const EVENTS_SUB: &str =
    "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAAB9c1Qm0VhIRb3ZkRf0x2aa";
const STATUS_SUB: &str =
    "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAACkGm2Fhz9CTYx5mQ9Xh3l0";
const STALE_SUB: &str = "StaleSubscriptionAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
/// Ends up as `Unsub<b>&"x'…` once the XML entities are decoded: the page must escape it.
const UNSUB_SUB_XML: &str = "Unsub&lt;b&gt;&amp;&quot;x&apos;BBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
const UNSUB_SUB_HTML: &str = "Unsub&lt;b&gt;&amp;&quot;x&#39;BBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
/// `--stale-after` of the passthrough relay: short, the stale subscription waits it out.
const STALE_AFTER: Duration = Duration::from_millis(800);
/// A headless browser run is killed after this.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(30);
/// The admitted network: 127.0.0.2 is outside it.
const ALLOW: &str = "127.0.0.1/32";

/// A fixture with its subscription id replaced.
fn fixture_for(name: &str, from: &str, to: &str) -> Vec<u8> {
    String::from_utf8(fixture(name))
        .unwrap()
        .replace(from, to)
        .into_bytes()
}

/// `GET path` on the admin listener: status, headers, body.
async fn admin_fetch(addr: SocketAddr, path: &str) -> (StatusCode, HeaderMap, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

/// A TLS attempt from 127.0.0.2, refused by the source filter; returns once the page lists it.
async fn denied_connection(relay: &Relay) {
    let outsider: IpAddr = "127.0.0.2".parse().unwrap();
    assert!(
        tls_connect(relay.addr, &relay.cert, Some(outsider))
            .await
            .is_err(),
        "127.0.0.2 is outside --allow {ALLOW}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !admin_fetch(relay.admin, "/status")
        .await
        .2
        .contains("<code>127.0.0.2</code>")
    {
        assert!(Instant::now() < deadline, "denial never shown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `<tr class=…>` of every body row, in page order.
fn row_classes(html: &str) -> Vec<&str> {
    html.split("<tr class=\"")
        .skip(1)
        .map(|s| &s[..s.find('"').unwrap()])
        .collect()
}

/// The row whose name cell is `name`, from `<tr` to `</tr>`.
fn row_of<'a>(html: &'a str, name: &str) -> &'a str {
    let at = html
        .find(&format!("<td class=\"id\">{name}</td>"))
        .unwrap_or_else(|| panic!("no row for {name} in\n{html}"));
    let start = html[..at].rfind("<tr").unwrap();
    &html[start..at + html[at..].find("</tr>").unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_every_state_and_renders_in_a_browser() {
    let receiver = TestReceiver::with(Arc::new(|seen: Seen| {
        // The receiver ends the subscription whose id starts "Unsub", keeps the others.
        let answer = if String::from_utf8_lossy(&seen.body).contains("Unsub&lt;b") {
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
    let stale_after = format!("{}ms", STALE_AFTER.as_millis());
    let relay = Relay::start(
        receiver.addr,
        &["--allow", ALLOW, "--stale-after", &stale_after],
    )
    .await;
    let mut c = relay.client().await;

    // Stale: heard once, then silent for longer than --stale-after.
    let stale = fixture_for("send-notification-status.xml", STATUS_SUB, STALE_SUB);
    assert_eq!(send(&mut c, post("/", stale)).await.0, StatusCode::OK);
    tokio::time::sleep(STALE_AFTER + Duration::from_millis(200)).await;
    // Unsubscribed: the receiver answers Unsubscribe.
    let unsub = fixture_for("send-notification-status.xml", STATUS_SUB, UNSUB_SUB_XML);
    assert_eq!(send(&mut c, post("/", unsub)).await.0, StatusCode::OK);
    // Error: Exchange reports ErrorReadEventsFailed for the fixture's status subscription.
    let error = fixture("send-notification-error.xml");
    assert_eq!(send(&mut c, post("/", error)).await.0, StatusCode::OK);
    // Alive: events, and keep-alives from now on so it stays alive while the browser runs.
    let alive = fixture("send-notification-events.xml");
    assert_eq!(
        send(&mut c, post("/", alive.clone())).await.0,
        StatusCode::OK
    );
    let keepalive = fixture_for("send-notification-status.xml", STATUS_SUB, EVENTS_SUB);
    let pinger = tokio::spawn({
        let mut c = relay.client().await;
        async move {
            loop {
                tokio::time::sleep(STALE_AFTER / 4).await;
                send(&mut c, post("/", keepalive.clone())).await;
            }
        }
    });
    denied_connection(&relay).await;

    let (status, headers, html) = admin_fetch(relay.admin, "/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-store");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none';"), "{csp}");
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(!csp.contains("unsafe-eval"), "{csp}");

    assert!(html.starts_with("<!DOCTYPE html>\n<html lang=\"en\""));
    assert!(html.ends_with("</html>\n"));
    assert!(
        html.contains("<title>ews-relay: 2 red, 1 amber, 1 green</title>"),
        "{html}"
    );
    assert_eq!(row_classes(&html), ["red", "red", "amber", "green"]);
    for (name, class, state, detail) in [
        (
            EVENTS_SUB,
            "green",
            "alive",
            "</td><td class=\"num\">5</td><td></td>",
        ),
        (STALE_SUB, "amber", "stale", "127.0.0.1"),
        (
            UNSUB_SUB_HTML,
            "red",
            "unsubscribed",
            "receiver answered Unsubscribe",
        ),
        (
            STATUS_SUB,
            "red",
            "error",
            "Exchange: ErrorReadEventsFailed",
        ),
    ] {
        let row = row_of(&html, name);
        assert!(row.starts_with(&format!("<tr class=\"{class}\">")), "{row}");
        assert!(
            row.contains(&format!("</span> {class}</span> {state}</td>")),
            "state as text: {row}"
        );
        assert!(row.contains(detail), "{detail} in {row}");
    }
    assert!(!html.contains("Unsub<b>"), "subscription id escaped");
    for want in [
        "<strong>passthrough</strong> mode",
        "<th scope=\"col\">Subscription</th>",
        "<th scope=\"col\">Last notification</th>",
        "<code>127.0.0.2</code>",
        "<span class=\"big\">1</span> refused by the source filter",
        "<dt>Admitted networks</dt><dd>1 networks from",
        &format!("<dt>Version</dt><dd>{}</dd>", env!("CARGO_PKG_VERSION")),
        "<dt>Receiver</dt><dd><span class=\"tag green\">",
        "<div class=\"filter\" id=\"filter\" hidden>",
        "<noscript><meta http-equiv=\"refresh\" content=\"10\"></noscript>",
        "<section class=\"legend\"",
    ] {
        assert!(html.contains(want), "missing {want} in\n{html}");
    }
    // Notifications are arriving: the denial is not the headline.
    assert!(!html.contains("Is Microsoft"), "{html}");

    browser_checks(relay.admin).await;
    pinger.abort();
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_traffic_and_no_notification_raise_the_alarm() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let relay = Relay::start(receiver.addr, &["--allow", ALLOW]).await;
    denied_connection(&relay).await;
    let (_, _, html) = admin_fetch(relay.admin, "/status").await;
    assert!(
        html.contains("<p class=\"alert red\" role=\"alert\"><strong>Is Microsoft's traffic"),
        "{html}"
    );
    assert!(html.contains("Newest denied: <code>127.0.0.2</code>"));
    assert!(html.contains("<section class=\"panel loud-panel\">"));
    assert!(html.contains("No notification has passed yet"));
    assert!(row_classes(&html).is_empty());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_mode_lists_mailboxes_problems_first() {
    const ROOM: &str = "room-a@contoso.example";
    const GHOST: &str = "nobody@contoso.example";
    let lab = lab::Lab::start(&[ROOM], |_| {}, lab::Setup::new(&[ROOM, GHOST])).await;
    let ids = lab.wait_active(&[ROOM]).await;
    lab.wait_relay(lab::WAIT, "the unknown mailbox failed", |v| {
        (lab::mailbox_view(v, GHOST)?["state"] == "failed").then_some(())
    })
    .await;
    let (status, _, html) = admin_fetch(lab.admin(), "/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(row_classes(&html), ["red", "green"], "{html}");
    let ghost = row_of(&html, GHOST);
    assert!(ghost.contains("</span> failed</td>"), "{ghost}");
    assert!(ghost.contains("ErrorNonExistentMailbox"), "{ghost}");
    let room = row_of(&html, ROOM);
    assert!(room.contains("</span> active</td>"), "{room}");
    assert!(room.contains(&ids[0]), "subscription id shown: {room}");
    for want in [
        "<strong>managed</strong> mode",
        "<th scope=\"col\">Mailbox</th>",
        "<th scope=\"col\">Last keep-alive</th>",
        "<th scope=\"col\">Spool</th>",
        "waiting in the spool",
    ] {
        assert!(html.contains(want), "missing {want} in\n{html}");
    }
}

/// The newcomer's finding (passthrough): the Receiver line said "reachable" next to rows saying
/// "receiver unreachable", and `/readyz` said 200 for 30 s after a 502. A receiver that just
/// failed is shown failed and makes the relay unready at once, whether it answers 5xx or stops
/// accepting connections, and is shown working again as soon as it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_just_failed_is_shown_failed_and_unready_at_once() {
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let receiver = TestReceiver::with(Arc::new(move |_| {
        let fail = f.load(Ordering::SeqCst);
        Box::pin(async move {
            // One request per connection: once the receiver is gone, no pooled connection
            // to it outlives it.
            let answer = http::Response::builder().header("connection", "close");
            if fail {
                answer
                    .status(503)
                    .body(Full::new(Bytes::from_static(b"busy")))
                    .unwrap()
            } else {
                answer
                    .header("content-type", "text/xml; charset=utf-8")
                    .body(Full::new(Bytes::from(fixture(
                        "send-notification-result-ok.xml",
                    ))))
                    .unwrap()
            }
        })
    }))
    .await;
    let addr = receiver.addr;
    let relay = Relay::start(addr, &[]).await;
    let mut c = relay.client().await;
    let events = fixture("send-notification-events.xml");
    let receiver_line = |html: &str| {
        let start = html.find("<dt>Receiver</dt>").unwrap();
        html[start..start + html[start..].find("</dd>").unwrap()].to_owned()
    };

    assert_eq!(
        send(&mut c, post("/", events.clone())).await.0,
        StatusCode::OK
    );
    assert_eq!(admin_fetch(relay.admin, "/readyz").await.0, StatusCode::OK);
    let (_, _, html) = admin_fetch(relay.admin, "/status").await;
    assert!(
        receiver_line(&html).contains("<span class=\"tag green\">"),
        "{html}"
    );

    // It answers 503: still accepting connections, but failing.
    failing.store(true, Ordering::SeqCst);
    let (s, _, _) = send(&mut c, post("/", events.clone())).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "its answer passed back");
    let (s, _, body) = admin_fetch(relay.admin, "/readyz").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("answered HTTP 503"), "{body}");
    let (_, _, html) = admin_fetch(relay.admin, "/status").await;
    let line = receiver_line(&html);
    assert!(line.contains("<span class=\"tag red\">"), "{line}");
    assert!(line.contains("<strong>failed</strong> "), "{line}");
    assert!(line.contains(" ago: answered HTTP 503"), "{line}");
    assert!(
        row_of(&html, EVENTS_SUB).contains("receiver answered HTTP 503"),
        "{html}"
    );
    // The receiver and the row, both counted.
    assert!(
        html.contains("<title>ews-relay: 2 red, 0 amber, 0 green</title>"),
        "{html}"
    );

    // It answers again: ready at once.
    failing.store(false, Ordering::SeqCst);
    assert_eq!(
        send(&mut c, post("/", events.clone())).await.0,
        StatusCode::OK
    );
    assert_eq!(admin_fetch(relay.admin, "/readyz").await.0, StatusCode::OK);

    // It is gone: the relay answers 502, and is unready at once (it used to say 200 for 30 s).
    drop(receiver);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the receiver's port stays open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, _, _) = send(&mut c, post("/", events.clone())).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    let (s, _, body) = admin_fetch(relay.admin, "/readyz").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("not accepting connections"), "{body}");
    let (_, _, html) = admin_fetch(relay.admin, "/status").await;
    let line = receiver_line(&html);
    assert!(line.contains("<span class=\"tag red\">"), "{line}");
    assert!(line.contains("not accepting connections"), "{line}");
    assert!(!line.contains("reachable"), "{line}");
    assert!(row_of(&html, EVENTS_SUB).contains("receiver unreachable"));
    relay.stop().await;
}

/// The newcomer's finding (managed): with the receiver down, the counters showed "0 red 2
/// green" and every mailbox row was green while notifications waited in the spool. Now the
/// receiver is red, the spool and the mailbox it holds notifications for amber, everything is
/// counted, and all is green again once the spool is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_receiver_down_with_a_spool_is_not_green() {
    const ROOM: &str = "room-a@contoso.example";
    const QUIET: &str = "room-b@contoso.example";
    let lab = lab::Lab::start(&[ROOM, QUIET], |_| {}, lab::Setup::new(&[ROOM, QUIET])).await;
    lab.wait_active(&[ROOM, QUIET]).await;
    lab.receiver.set_down(true);
    lab.sim
        .create_events(ROOM, ews::EventType::Created, 2)
        .unwrap();
    let v = lab
        .wait_relay(lab::WAIT, "a notification spooled", |v| {
            (v["spool_depth"].as_u64()? >= 1).then(|| v.clone())
        })
        .await;
    // The API keeps its words.
    assert_eq!(lab::mailbox_view(&v, ROOM).unwrap()["state"], "active");

    let (s, _, body) = admin_fetch(lab.admin(), "/readyz").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("answered HTTP 503"), "{body}");
    // The spool's counts are read without waiting for a replay in progress: ask again if one
    // was.
    let deadline = Instant::now() + lab::WAIT;
    let html = loop {
        let (_, _, html) = admin_fetch(lab.admin(), "/status").await;
        if row_classes(&html) == ["amber", "green"] || Instant::now() > deadline {
            break html;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(row_classes(&html), ["amber", "green"], "{html}");
    let room = row_of(&html, ROOM);
    assert!(room.contains("</span> active</td>"), "{room}");
    assert!(
        room.contains("waiting in the spool for the receiver"),
        "{room}"
    );
    assert!(
        html.contains("<dt>Receiver</dt><dd><span class=\"tag red\">"),
        "{html}"
    );
    // Red: the receiver; amber: the spool and the waiting mailbox; green: the quiet one.
    assert!(
        html.contains("<title>ews-relay: 1 red, 2 amber, 1 green</title>"),
        "{html}"
    );
    assert!(html.contains("notifications wait in the spool."), "{html}");

    lab.receiver.set_down(false);
    lab.wait_relay(lab::WAIT, "an empty spool", |v| {
        (v["spool_depth"].as_u64()? == 0).then_some(())
    })
    .await;
    assert_eq!(admin_fetch(lab.admin(), "/readyz").await.0, StatusCode::OK);
    let (_, _, html) = admin_fetch(lab.admin(), "/status").await;
    assert_eq!(row_classes(&html), ["green", "green"], "{html}");
    assert!(
        html.contains("<title>ews-relay: 0 red, 0 amber, 2 green</title>"),
        "{html}"
    );
}

// ---------------------------------------------------------------------------------------
// The headless browser
// ---------------------------------------------------------------------------------------

/// Debian's Chromium, or `chromium` on the PATH.
fn chromium() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/bin/chromium");
    if debian.exists() {
        return Some(debian);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("chromium"))
            .find(|c| c.exists())
    })
}

/// Where test artifacts are kept: `$CARGO_TARGET_DIR/test-artifacts` or `target/…`.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run headless Chromium with `args` plus the isolating flags, killed after
/// [`BROWSER_TIMEOUT`]; returns its standard output.
fn run_chromium(chromium: &Path, args: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let stdout_path = profile.path().join("stdout");
    let stderr_path = profile.path().join("stderr");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        // Its own process group, so a timeout kills its helper processes too.
        .process_group(0)
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within {BROWSER_TIMEOUT:?}: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "chromium failed ({status}): {}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    std::fs::read_to_string(&stdout_path).unwrap()
}

/// Load the page in Chromium: the script ran under the CSP (`data-js`), showed the filter box,
/// applied the filter from the address, and the screenshot is a real picture.
async fn browser_checks(admin: SocketAddr) {
    let Some(chromium) = chromium() else {
        eprintln!(
            "SKIPPED: chromium not found (Debian: apt-get install chromium); HTML checks ran"
        );
        println!("SKIPPED: chromium not found");
        return;
    };
    assert!(
        admin.ip().is_loopback(),
        "the browser only visits the relay"
    );
    let url = format!("http://{admin}/status");

    // Only the problems: the filter in the address hides the green row.
    let dom = {
        let (chromium, url) = (chromium.clone(), format!("{url}#h=problems"));
        tokio::task::spawn_blocking(move || run_chromium(&chromium, &["--dump-dom".into(), url]))
            .await
            .unwrap()
    };
    assert!(
        dom.contains("data-js=\"on\""),
        "the page's script did not run (CSP hash?):\n{dom}"
    );
    assert!(
        dom.contains("<div class=\"filter\" id=\"filter\">"),
        "filter box shown:\n{dom}"
    );
    assert!(dom.contains("<input type=\"search\" id=\"q\""));
    assert!(
        dom.contains("<span id=\"shown\" aria-live=\"polite\">showing 3 of 4</span>"),
        "{dom}"
    );
    assert_eq!(
        dom.matches("<tr class=\"green\" hidden=\"\">").count(),
        1,
        "{dom}"
    );
    assert_eq!(dom.matches("<tr class=\"red\">").count(), 2, "{dom}");
    assert_eq!(dom.matches("<tr class=\"amber\">").count(), 1, "{dom}");

    // The page refreshes itself: ten (virtual) seconds later it has re-fetched and swapped in
    // the live parts, and the filter from the address still applies.
    let dom = {
        let (chromium, url) = (chromium.clone(), format!("{url}#h=problems"));
        tokio::task::spawn_blocking(move || {
            run_chromium(
                &chromium,
                &[
                    "--virtual-time-budget=12000".into(),
                    "--dump-dom".into(),
                    url,
                ],
            )
        })
        .await
        .unwrap()
    };
    assert!(
        dom.contains("data-refreshes=\"1\""),
        "not refreshed:\n{dom}"
    );
    assert_eq!(
        dom.matches("<tr class=\"green\" hidden=\"\">").count(),
        1,
        "{dom}"
    );
    assert_eq!(dom.matches("<tr class=\"red\">").count(), 2, "{dom}");

    let png = artifacts_dir().join("status.png");
    let _ = std::fs::remove_file(&png);
    {
        let args = vec![
            format!("--screenshot={}", png.display()),
            "--window-size=1280,1024".into(),
            url,
        ];
        tokio::task::spawn_blocking(move || run_chromium(&chromium, &args))
            .await
            .unwrap();
    }
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(
        bytes.len() > 10 * 1024,
        "screenshot {} is only {} bytes",
        png.display(),
        bytes.len()
    );
    println!("screenshot: {} ({} bytes)", png.display(), bytes.len());
}

/// Graph subscriptions seen in passthrough are rows of a Graph table next to the EWS one:
/// removed red, expiring amber, alive green, each red and amber one also an alert, all counted
/// in the title; `--graph-path-prefix` is among the relay's facts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_rows_show_next_to_ews_rows_with_their_colours() {
    let receiver = TestReceiver::with(Arc::new(|seen: Seen| {
        let graph = seen.path.starts_with("/graph");
        Box::pin(async move {
            if graph {
                return http::Response::builder()
                    .status(202)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
            }
            http::Response::builder()
                .header("content-type", "text/xml; charset=utf-8")
                .body(Full::new(Bytes::from(fixture(
                    "send-notification-result-ok.xml",
                ))))
                .unwrap()
        })
    }))
    .await;
    let relay = Relay::start(receiver.addr, &["--graph-path-prefix", "/graph"]).await;
    let mut c = relay.client().await;
    let alive = fixture("send-notification-events.xml");
    assert_eq!(send(&mut c, post("/", alive)).await.0, StatusCode::OK);
    let now = std::time::SystemTime::now();
    let item = |id: &str, hours_left: u64, kind: &str| {
        format!(
            r#"{{"subscriptionId":"{id}","subscriptionExpirationDateTime":"{}",{kind},"resource":"Users/u1/Events/e1","tenantId":"t"}}"#,
            graph::format_time(now + Duration::from_secs(hours_left * 1800))
        )
    };
    let body = format!(
        r#"{{"value":[{},{},{}]}}"#,
        item("graph-alive", 96, r#""changeType":"created""#),
        item(
            "graph-removed",
            96,
            r#""lifecycleEvent":"subscriptionRemoved""#
        ),
        item("graph-expiring", 1, r#""changeType":"updated""#),
    );
    let req = http::Request::post("/graph/notify")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    assert_eq!(send(&mut c, req).await.0, StatusCode::ACCEPTED);

    let (status, _, html) = admin_fetch(relay.admin, "/status").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains("<title>ews-relay: 2 red, 2 amber, 2 green</title>"),
        "{html}"
    );
    // The EWS table first, then the Graph one, each problems first.
    assert_eq!(row_classes(&html), ["green", "red", "amber", "green"]);
    let graph_at = html
        .find("<h3 id=\"graph-h\">Microsoft Graph</h3>")
        .unwrap();
    assert!(
        html.find(&format!("<td class=\"id\">{EVENTS_SUB}</td>"))
            .unwrap()
            < graph_at
    );
    for (name, class, state, detail) in [
        (
            "graph-removed",
            "red",
            "removed",
            "<td>subscriptionRemoved 0 s ago</td>",
        ),
        ("graph-expiring", "amber", "expiring", "<td>in 29 min</td>"),
        (
            "graph-alive",
            "green",
            "alive",
            "<td class=\"id\">Users/u1/Events</td>",
        ),
    ] {
        let row = row_of(&html, name);
        assert!(row.starts_with(&format!("<tr class=\"{class}\">")), "{row}");
        assert!(
            row.contains(&format!("</span> {class}</span> {state}</td>")),
            "state as text: {row}"
        );
        assert!(row.contains(detail), "{detail} in {row}");
    }
    for want in [
        "<dt>Graph path prefix</dt><dd><code>/graph</code></dd>",
        "<p class=\"alert red\" role=\"alert\"><strong>Graph subscription: 1 removed.</strong>",
        "<p class=\"alert amber\" role=\"alert\"><strong>Graph subscription: 1 expiring.</strong>",
        "<code>graph-removed</code>",
        "<span class=\"n\">3</span> Graph</div>",
    ] {
        assert!(html.contains(want), "missing {want} in\n{html}");
    }
    relay.stop().await;
}
