//! Managed mode end to end, the parts about finding and reaching Exchange: Autodiscover
//! grouping and server affinity, the 200-mailbox group limit, Autodiscover redirects (and their
//! bound), Basic authentication without leaking the password, and the cap on concurrent EWS
//! requests. Same lab as `tests/managed.rs` (see `common/managed.rs`); each test names the
//! promise of design/PROTOCOL.md ("Affinity and Autodiscover", "Authentication") or of the
//! README it checks.

use crate::common;
use crate::common::managed as lab;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ews_relay::subscriptions::client::MAX_AUTODISCOVER_REDIRECTS;
use ews_sim::{Auth, MailboxConfig, MailboxRedirect, RecordedRequest, SimConfig};

use lab::*;

/// `X-AnchorMailbox` of a recorded request.
fn anchor(r: &RecordedRequest) -> String {
    req_header(r, "x-anchormailbox")
        .expect("every request carries X-AnchorMailbox")
        .to_owned()
}

/// Hosts `grouped` mailboxes in their `GroupingInformation`.
fn with_groupings(grouped: Vec<(String, &'static str)>) -> impl FnOnce(&mut SimConfig) {
    move |c| {
        c.mailboxes = grouped
            .into_iter()
            .map(|(m, g)| MailboxConfig::new(m).grouping(g))
            .collect();
    }
}

/// Autodiscover requests that ask about `mailbox` (bodies name the mailboxes asked about).
fn autodiscovers_about(lab: &Lab, mailbox: &str) -> usize {
    autodiscovers(&lab.sim)
        .iter()
        .filter(|r| r.body.contains(&format!(">{mailbox}<")))
        .count()
}

// ---------------------------------------------------------------------------------------
// 1. Grouping and affinity
// ---------------------------------------------------------------------------------------

/// Promise (PROTOCOL.md "Affinity and Autodiscover"): the relay Autodiscovers the mailboxes in
/// one `GetUserSettings` batch before subscribing, groups them by ExternalEwsUrl +
/// GroupingInformation, and sends every Subscribe with `X-PreferServerAffinity: true` and the
/// group's first mailbox as `X-AnchorMailbox` while impersonating the mailbox itself; once the
/// group's first Subscribe has returned `X-BackEndOverrideCookie`, the group's later Subscribes
/// carry it, and the other group's do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autodiscover_groups_mailboxes_and_subscribes_with_affinity() {
    let a: Vec<String> = (1..=3).map(|i| format!("a{i}@contoso.example")).collect();
    let b: Vec<String> = (1..=2).map(|i| format!("b{i}@contoso.example")).collect();
    let all: Vec<&str> = a.iter().chain(&b).map(String::as_str).collect();
    let grouped = a
        .iter()
        .map(|m| (m.clone(), "GRP-A"))
        .chain(b.iter().map(|m| (m.clone(), "GRP-B")))
        .collect();
    let mut setup = Setup::new(&all);
    setup.endpoint = Endpoint::Autodiscover;
    let lab = Lab::start(&all, with_groupings(grouped), setup).await;
    lab.wait_active(&all).await;

    // One GetUserSettings for all five, before any Subscribe.
    let requests = lab.sim.requests();
    let discovery = autodiscovers(&lab.sim);
    assert_eq!(discovery.len(), 1, "one batch: {discovery:#?}");
    for m in &all {
        assert!(discovery[0].body.contains(&format!(">{m}<")), "{m} asked");
    }
    assert!(
        requests[0]
            .path
            .eq_ignore_ascii_case("/autodiscover/autodiscover.svc"),
        "Autodiscover comes first: {requests:#?}"
    );

    // The anchor is the first mailbox of the group (configured order is sorted order here).
    for (group, anchor_of_group) in [(&a, &a[0]), (&b, &b[0])] {
        let mut reqs: Vec<RecordedRequest> = Vec::new();
        for m in group {
            let mine = subscribes_for(&lab.sim, m);
            assert_eq!(mine.len(), 1, "{m}: one Subscribe");
            let (req, parsed) = &mine[0];
            assert_eq!(parsed.mailbox, *m, "impersonates the mailbox itself");
            assert_eq!(&anchor(req), anchor_of_group, "{m}: anchored on its group");
            assert_eq!(
                req_header(req, "x-preferserveraffinity"),
                Some("true"),
                "{m}"
            );
            assert_eq!(req.response_code.as_deref(), Some("NoError"));
            reqs.push(req.clone());
        }
        // The group's first Subscribe has no cookie yet; every later one carries it.
        reqs.sort_by_key(|r| r.seq);
        assert!(
            !reqs[0].carried_affinity_cookie,
            "the first has no cookie yet"
        );
        for r in &reqs[1..] {
            assert!(
                r.carried_affinity_cookie,
                "a later Subscribe of the group without the group's cookie: {reqs:#?}"
            );
        }
    }
    // The cookies carried are each group's own (the simulator's value names the grouping).
    for (req, parsed) in subscribes(&lab.sim) {
        let Some(cookie) = req_header(&req, "cookie") else {
            continue;
        };
        let own = if parsed.mailbox.starts_with('a') {
            "GRP-A"
        } else {
            "GRP-B"
        };
        assert!(
            cookie.contains(&format!("X-BackEndOverrideCookie=1-{own}~")),
            "{}: carried {cookie}",
            parsed.mailbox
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. The group size limit
// ---------------------------------------------------------------------------------------

/// Promise (PROTOCOL.md "Affinity and Autodiscover"): groups are split at 200 mailboxes; with
/// 205 mailboxes sharing one ExternalEwsUrl and GroupingInformation, the first 200 share one
/// anchor and the other 5 another, each a member of its own group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_split_at_200_mailboxes() {
    const N: usize = 205;
    const LIMIT: usize = 200;
    // Zero-padded so configured (sorted) order is numeric order.
    let rooms: Vec<String> = (0..N)
        .map(|i| format!("room-{i:03}@contoso.example"))
        .collect();
    let refs: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let mut setup = Setup::new(&refs);
    setup.endpoint = Endpoint::Autodiscover;
    // Keep-alives are not what this test is about: one per minute, and a heartbeat timeout
    // far beyond the test, so 205 subscriptions cost 205 pushes.
    setup.heartbeat = Duration::from_secs(300);
    let lab = Lab::start(&refs, |c| c.status_period = Duration::from_secs(60), setup).await;
    let started = Instant::now();
    lab.wait_relay(Duration::from_secs(30), "205 mailboxes active", |v| {
        let active = v["mailboxes"]
            .as_array()?
            .iter()
            .filter(|m| m["state"] == "active")
            .count();
        (active == N).then_some(())
    })
    .await;
    eprintln!(
        "205 mailboxes discovered and subscribed in {:?}",
        started.elapsed()
    );

    // GetUserSettings takes at most 100 users: 205 mailboxes are asked in three batches.
    assert_eq!(autodiscovers(&lab.sim).len(), N.div_ceil(100));
    let by_mailbox: BTreeMap<String, RecordedRequest> = subscribes(&lab.sim)
        .into_iter()
        .map(|(r, p)| (p.mailbox, r))
        .collect();
    assert_eq!(by_mailbox.len(), N, "one Subscribe per mailbox");
    let anchors: BTreeSet<String> = by_mailbox.values().map(anchor).collect();
    assert_eq!(
        anchors,
        BTreeSet::from([rooms[0].clone(), rooms[LIMIT].clone()]),
        "two groups, each anchored on its first mailbox"
    );
    for (i, room) in rooms.iter().enumerate() {
        let want = if i < LIMIT { &rooms[0] } else { &rooms[LIMIT] };
        assert_eq!(&anchor(&by_mailbox[room]), want, "{room}");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Autodiscover redirects
// ---------------------------------------------------------------------------------------

const PLAIN: &str = "plain@contoso.example";
/// Autodiscover answers RedirectAddress → [`PRIMARY`] for it (a secondary address).
const ALIAS: &str = "alias@contoso.example";
const PRIMARY: &str = "primary@contoso.example";
/// Autodiscover answers RedirectUrl → a second simulator that hosts it (another site).
const ELSEWHERE: &str = "elsewhere@contoso.example";
/// Autodiscover answers RedirectUrl → its own Autodiscover URL: a loop.
const LOOPING: &str = "looping@contoso.example";

/// Promise (PROTOCOL.md "Affinity and Autodiscover": "follow them (bounded)"): a
/// RedirectAddress and a RedirectUrl are followed and the mailboxes subscribed where they
/// lead; a redirect loop ends after [`MAX_AUTODISCOVER_REDIRECTS`] hops with the mailbox in an
/// error state saying why, and is not asked about again at full rate.
///
/// The RedirectUrl that resolves points at a second simulator: the simulator answers a
/// redirected mailbox with the redirect whatever URL it is asked at, so a RedirectUrl back to
/// its own Autodiscover URL is the loop case here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autodiscover_redirects_are_followed_and_loops_are_bounded() {
    let configured = [PLAIN, ALIAS, ELSEWHERE, LOOPING];
    let mut setup = Setup::new(&configured);
    setup.endpoint = Endpoint::Autodiscover;
    let mut lab = Lab::prepare(&[PLAIN, ALIAS, PRIMARY, ELSEWHERE, LOOPING], |_| {}, setup).await;
    let other = Sim::start(sim_config(&[ELSEWHERE], &lab.cert.der)).await;
    lab.sim
        .add_mailbox(MailboxConfig::new(ALIAS).redirect(MailboxRedirect::Address(PRIMARY.into())));
    lab.sim.add_mailbox(
        MailboxConfig::new(ELSEWHERE).redirect(MailboxRedirect::Url(other.autodiscover_url())),
    );
    let own_url = lab.sim.autodiscover_url();
    lab.sim
        .add_mailbox(MailboxConfig::new(LOOPING).redirect(MailboxRedirect::Url(own_url)));
    lab.launch().await;

    // Resolved and subscribed: the alias at this simulator, the other one at the second.
    lab.wait_relay(WAIT, "the redirected mailboxes active", |v| {
        [PLAIN, ALIAS, ELSEWHERE]
            .iter()
            .all(|m| mailbox_view(v, m).is_some_and(|m| m["state"] == "active"))
            .then_some(())
    })
    .await;
    assert!(
        live_subscription(&lab.sim, ALIAS).is_some(),
        "alias subscribed here"
    );
    assert!(
        autodiscovers_about(&lab, PRIMARY) >= 1,
        "the RedirectAddress was asked about"
    );
    assert!(
        live_subscription(&other, ELSEWHERE).is_some(),
        "subscribed where the RedirectUrl led"
    );
    assert!(live_subscription(&lab.sim, ELSEWHERE).is_none());
    assert_eq!(
        autodiscovers(&other).len(),
        1,
        "the second site was asked once"
    );

    // The loop: an error state that says why.
    let error = lab
        .wait_relay(WAIT, "the looping mailbox in an error state", |v| {
            let m = mailbox_view(v, LOOPING)?;
            let error = m["last_error"].as_str()?.to_owned();
            (m["state"] == "backing-off" || m["state"] == "failed").then_some(error)
        })
        .await;
    assert!(
        error.contains("redirect"),
        "the error does not say it is a redirect loop: {error:?}"
    );
    assert!(live_subscription(&lab.sim, LOOPING).is_none());
    assert!(
        subscribes_for(&lab.sim, LOOPING).is_empty(),
        "never subscribed"
    );

    // Bounded: each Autodiscover round asks at most 1 + MAX_AUTODISCOVER_REDIRECTS times, and
    // failed rounds are retried with back-off (1 s and more), not in a loop. A window of
    // 2.5 s holds at most two more rounds.
    let per_round = 1 + MAX_AUTODISCOVER_REDIRECTS;
    let before = autodiscovers_about(&lab, LOOPING);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let during = autodiscovers_about(&lab, LOOPING) - before;
    assert!(
        during <= 2 * per_round,
        "{during} GetUserSettings about the looping mailbox in 2.5 s ({before} before)"
    );
    assert!(
        before <= 2 * per_round,
        "{before} GetUserSettings about the looping mailbox before it showed its error"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Basic authentication
// ---------------------------------------------------------------------------------------

const ROOM: &str = "room@contoso.example";
const USER: &str = "svc";
const PASSWORD: &str = "Corr3ct-Horse-Battery";

/// A lab whose simulator wants Basic `svc` / [`PASSWORD`] and whose relay gives `given`, with
/// `--trace-dir` set; the relay is not started yet.
async fn basic_lab(given: &str) -> Lab {
    let mut lab = Lab::prepare(
        &[ROOM],
        |c| {
            c.auth = Auth::Basic {
                user: USER.into(),
                password: PASSWORD.into(),
            }
        },
        Setup::new(&[ROOM]),
    )
    .await;
    let file = lab.cert.dir.path().join("password");
    std::fs::write(&file, format!("{given}\n")).unwrap();
    lab.setup.auth = vec![
        "--auth".into(),
        "basic".into(),
        "--username".into(),
        USER.into(),
        "--password-file".into(),
        file.display().to_string(),
    ];
    let trace = lab.cert.dir.path().join("trace");
    lab.setup
        .extra
        .extend(["--trace-dir".into(), trace.display().to_string()]);
    lab
}

/// The trace file of a [`basic_lab`].
fn trace_text(lab: &Lab) -> String {
    std::fs::read_to_string(lab.cert.dir.path().join("trace/ews-trace.log")).unwrap_or_default()
}

/// Asserts that `secret` (and its Basic encoding) appears nowhere the operator can read: the
/// admin API, the status page, the relay's log, the trace.
async fn assert_secret_kept(lab: &Lab, relay: &BinaryRelay, secret: &str) {
    // The credentials as they went over the wire (base64 of `user:password`).
    let sent = lab.sim.requests();
    let encoded = sent
        .iter()
        .find_map(|r| req_header(r, "authorization")?.strip_prefix("Basic "))
        .expect("Basic credentials were sent");
    let (_, api) = common::admin_get(relay.admin, "/api/subscriptions")
        .await
        .unwrap();
    let (_, status) = common::admin_get(relay.admin, "/status").await.unwrap();
    let log = relay.log();
    let trace = trace_text(lab);
    // Make sure the right things are being searched: the relay's own log lines, its trace,
    // the page with the mailbox's row.
    assert!(
        log.contains("subscribe"),
        "no tracing output in the log:\n{log}"
    );
    assert!(trace.contains("POST "), "nothing traced");
    assert!(
        status.contains(ROOM),
        "no mailbox row on /status:\n{status}"
    );
    for (place, text) in [
        ("/api/subscriptions", &api),
        ("/status", &status),
        ("the log", &log),
        ("the trace", &trace),
    ] {
        assert!(
            !text.contains(secret),
            "the password is in {place}:\n{text}"
        );
        assert!(
            !text.contains(encoded),
            "Basic credentials in {place}:\n{text}"
        );
    }
    assert!(
        trace.contains("authorization: <redacted>"),
        "the trace shows no redacted Authorization:\n{trace}"
    );
}

/// Promise (PROTOCOL.md "Authentication", README `--auth basic`): with Basic credentials the
/// relay authenticates every EWS request as the service account and subscribes; the password
/// is in no admin page, log line (debug level included) or trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_subscribes_and_keeps_the_password_secret() {
    let mut lab = basic_lab(PASSWORD).await;
    let relay = lab
        .spawn_binary_logging(&[("RUST_LOG", "debug,rustls=error")])
        .await;
    wait_api(relay.admin, WAIT, "the mailbox active", |v| {
        (mailbox_view(v, ROOM)?["state"] == "active").then_some(())
    })
    .await;
    let reqs = subscribes_for(&lab.sim, ROOM);
    assert_eq!(reqs.len(), 1);
    assert!(
        req_header(&reqs[0].0, "authorization").is_some_and(|a| a.starts_with("Basic ")),
        "Subscribe without Basic credentials"
    );
    assert_eq!(reqs[0].0.response_code.as_deref(), Some("NoError"));
    assert_secret_kept(&lab, &relay, PASSWORD).await;
}

/// Promise (README "Managed mode": permanent errors are shown and retried rarely): a wrong
/// password shows the mailbox failed with HTTP 401, is not retried at the transient rate,
/// and the wrong password is sent once per attempt and shown nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_basic_password_fails_with_401_and_is_not_retried_at_full_rate() {
    const WRONG: &str = "Wr0ng-Staple-Guess";
    let mut lab = basic_lab(WRONG).await;
    let relay = lab
        .spawn_binary_logging(&[("RUST_LOG", "debug,rustls=error")])
        .await;
    let error = wait_api(relay.admin, WAIT, "the mailbox failed", |v| {
        let m = mailbox_view(v, ROOM)?;
        (m["state"] == "failed").then(|| m["last_error"].as_str().unwrap_or("").to_owned())
    })
    .await;
    assert!(error.contains("HTTP 401"), "{error:?}");
    // A transient error would be retried within 2 s; a permanent one not before minutes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused: Vec<RecordedRequest> = lab
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.status == 401)
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "a wrong password sent more than once: {refused:#?}"
    );
    assert!(lab.sim.subscriptions().is_empty());
    assert_secret_kept(&lab, &relay, WRONG).await;
}

// ---------------------------------------------------------------------------------------
// 5. --max-concurrent-ews
// ---------------------------------------------------------------------------------------

/// Promise (PROTOCOL.md "Retries and liveness": self-throttle well below Exchange's ~27
/// concurrent requests; README `--max-concurrent-ews`): with N = 2 no more than two EWS
/// requests are in flight at once.
///
/// Measured from the simulator's arrival times: every Subscribe takes at least `DELAY` (the
/// simulator's response delay), so with at most two in flight the request two places later
/// cannot arrive before `DELAY` after this one; three in flight would arrive within `DELAY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_ews_caps_requests_in_flight() {
    const DELAY: Duration = Duration::from_millis(300);
    /// Recorded times have millisecond resolution.
    const SLACK: Duration = Duration::from_millis(5);
    let rooms: Vec<String> = (1..=6)
        .map(|i| format!("room-{i}@contoso.example"))
        .collect();
    let refs: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let mut setup = Setup::new(&refs);
    setup.extra = vec!["--max-concurrent-ews".into(), "2".into()];
    setup.heartbeat = Duration::from_secs(30);
    let mut lab = Lab::prepare(&refs, |_| {}, setup).await;
    lab.sim.set_response_delay(DELAY);
    lab.launch().await;
    lab.wait_active(&refs).await;

    let mut arrivals: Vec<_> = subscribes(&lab.sim)
        .iter()
        .map(|(r, _)| req_time(r))
        .collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), rooms.len());
    for (i, w) in arrivals.windows(3).enumerate() {
        let gap = w[2].duration_since(w[0]).unwrap_or_default();
        assert!(
            gap + SLACK >= DELAY,
            "requests {i}..{} arrived within {gap:?}: three in flight",
            i + 2
        );
    }
    // And the cap is two, not one: pairs leave together.
    let paired = arrivals
        .windows(2)
        .any(|w| w[1].duration_since(w[0]).unwrap_or_default() < DELAY / 2);
    assert!(paired, "never two in flight: {arrivals:?}");
}
