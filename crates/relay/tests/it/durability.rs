//! Durability limits: a full disk (a real ENOSPC, from a small tmpfs) and a full spool
//! (`--spool-max-bytes`) make the relay stop acknowledging instead of losing what it already
//! acknowledged; it keeps running, shows the alarm, and catches up once there is room. Also the
//! receiver-outage log lines (once per mailbox, a line when the backlog drains).
//!
//! The disk-full tests mount a tmpfs, which needs root (or CAP_SYS_ADMIN); where that is not
//! possible they say SKIPPED on stderr and pass, so run them as root to have them mean anything.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ews::EventType;
use ews_relay::store::{NewSpoolEntry, Store, StoreWriter, WriterConfig};

use crate::common::managed as lab;
use lab::*;

const ROOM_A: &str = "room-a@contoso.example";
const ROOM_B: &str = "room-b@contoso.example";

/// A tmpfs of a given size mounted on a directory; unmounted on drop.
pub struct Tmpfs {
    path: std::path::PathBuf,
    /// The directory when the tmpfs made it (removed after unmounting).
    _dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mount one of `bytes` on a fresh temporary directory; `None` (after saying SKIPPED)
    /// where mounting is not allowed.
    pub fn mount(bytes: u64, test: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tmpfs::mount_on(dir.path(), bytes, test)?;
        t._dir = Some(dir);
        Some(t)
    }

    /// Mount one of `bytes` on the existing directory `path`.
    pub fn mount_on(path: &Path, bytes: u64, test: &str) -> Option<Tmpfs> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs {
                path: path.to_path_buf(),
                _dir: None,
            }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED {test}: cannot mount a tmpfs (needs root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED {test}: cannot run mount: {e}");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a store thread of a stopped relay may still hold the file for a moment.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the file system at `dir` with a file of `bytes` (written, not sparse), to be removed
/// later to make room.
fn ballast(dir: &Path, bytes: usize) -> std::path::PathBuf {
    let path = dir.join("ballast");
    std::fs::write(&path, vec![0x5a; bytes]).unwrap();
    path
}

/// Fills the file system at `dir` completely with a file, to be removed later to make room.
fn fill_up(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5a; 4096];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    let _ = f.sync_all();
    path
}

fn body(tag: usize, len: usize) -> Bytes {
    let mut b = format!("<n{tag}/>").into_bytes();
    b.resize(len, b'x');
    Bytes::from(b)
}

/// The store on a really full file system: a write fails with an error recognised as a full
/// disk, nothing that was acknowledged before is lost, and once there is room the same store
/// (no restart) takes writes again, reopening the file redb closed after the I/O error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_on_a_full_disk_fails_writes_loses_nothing_and_recovers() {
    let Some(fs) = Tmpfs::mount(4 << 20, "store_on_a_full_disk") else {
        return;
    };
    let room = ballast(fs.path(), 1 << 20);
    let store = Arc::new(Store::open(&fs.path().join("state")).unwrap());
    let writer = StoreWriter::start(store.clone(), WriterConfig::default());
    let mut acked = Vec::new();
    let mut failure = None;
    for i in 0..1000 {
        let b = body(i, 16 * 1024);
        match writer
            .append(NewSpoolEntry {
                mailbox: ROOM_A.into(),
                subscription_id: "sub".into(),
                body: b.clone(),
                received_at: 1_000 + i as u64,
            })
            .await
        {
            Ok(seq) => acked.push((seq, b)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("a 4 MiB file system fills up");
    eprintln!(
        "disk full after {} appends: {failure} (debug: {failure:?})",
        acked.len()
    );
    assert!(
        failure.is_disk_full(),
        "not seen as a full disk: {failure:?}"
    );
    assert!(!acked.is_empty());

    // Still full: writes keep failing as a full disk, and nothing is lost.
    let again = writer
        .append(NewSpoolEntry {
            mailbox: ROOM_A.into(),
            subscription_id: "sub".into(),
            body: body(9999, 16 * 1024),
            received_at: 9_999,
        })
        .await
        .unwrap_err();
    eprintln!("second attempt: {again}");
    assert!(again.is_disk_full(), "{again:?}");

    // Room again: the same store takes writes, and has every acknowledged entry.
    std::fs::remove_file(room).unwrap();
    let extra = body(10_000, 16 * 1024);
    let seq = writer
        .append(NewSpoolEntry {
            mailbox: ROOM_A.into(),
            subscription_id: "sub".into(),
            body: extra.clone(),
            received_at: 10_000,
        })
        .await
        .expect("writes succeed once there is room");
    acked.push((seq, extra));
    let s = store.clone();
    let spooled = store
        .blocking(move |_| s.spool_peek(ROOM_A, usize::MAX))
        .await
        .unwrap();
    let got: Vec<_> = spooled.iter().map(|e| (e.seq, e.body.clone())).collect();
    assert_eq!(got, acked, "every acknowledged append is there, in order");
    writer.shutdown().await;
}

/// The relay's `/metrics` value of one series (0 when absent).
async fn metric(admin: std::net::SocketAddr, series: &str) -> f64 {
    let (_, text) = crate::common::admin_get(admin, "/metrics").await.unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .filter(|rest| rest.starts_with(' '))
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The relay's status page.
async fn status_page(admin: std::net::SocketAddr) -> String {
    let (status, body) = crate::common::admin_get(admin, "/status").await.unwrap();
    assert_eq!(status, http::StatusCode::OK);
    body
}

/// Failed pushes the simulator counted for `mailbox`, over all its subscriptions.
fn pushes_failed(lab: &Lab, mailbox: &str) -> u64 {
    lab.sim
        .subscriptions()
        .iter()
        .filter(|s| s.mailbox == mailbox)
        .map(|s| s.counters.pushes_failed)
        .sum()
}

/// With the receiver down, creates one event at a time in `mailbox` until the relay has
/// refused one for `reason` (metric `ews_relay_spool_refusals_total{reason=…}`); returns the
/// watermarks of every event created.
async fn push_until_refused(lab: &Lab, mailbox: &str, reason: &str) -> Vec<String> {
    let series = format!("ews_relay_spool_refusals_total{{reason=\"{reason}\",source=\"ews\"}}");
    let mut created = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(lab.admin(), &series).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "nothing refused for {reason} after {} events",
            created.len()
        );
        created.extend(
            lab.sim
                .create_events(mailbox, EventType::Created, 1)
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    created
}

/// Promise (README "Managed mode": a full spool): with a tiny `--spool-max-bytes` and the
/// receiver down, the relay spools what fits, then answers Exchange 503 (it retries, then the
/// subscription lapses and is resubscribed from its watermark), keeps running, raises the
/// status-page alarm and the metrics; once the receiver is back, everything spooled is
/// delivered and the watermark brings the rest: every event, in order, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_refuses_with_503_and_loses_nothing() {
    let mut setup = Setup::new(&[ROOM_A, ROOM_B]);
    setup.extra = ["--max-body", "4KiB", "--spool-max-bytes", "4KiB"]
        .map(String::from)
        .to_vec();
    let lab = Lab::start(&[ROOM_A, ROOM_B], |_| {}, setup).await;
    lab.wait_active(&[ROOM_A, ROOM_B]).await;
    let mut created = lab
        .sim
        .create_events(ROOM_A, EventType::Created, 1)
        .unwrap();
    lab.receiver.wait_events(ROOM_A, &created, WAIT).await;

    lab.receiver.set_down(true);
    created.extend(push_until_refused(&lab, ROOM_A, "spool_full").await);
    let spooled = lab
        .wait_relay(WAIT, "something spooled", |v| {
            v["spool_depth"].as_u64().filter(|d| *d > 0)
        })
        .await;
    eprintln!(
        "{} events created, {spooled} notifications spooled",
        created.len()
    );
    assert_eq!(metric(lab.admin(), "ews_relay_spool_full").await, 1.0);
    assert!(metric(lab.admin(), "ews_relay_spool_bytes").await <= 4096.0);
    let page = status_page(lab.admin()).await;
    assert!(
        page.contains("The spool is full (--spool-max-bytes)"),
        "{page}"
    );
    sim_wait(&lab.sim, WAIT, "Exchange told 503", |_| {
        (pushes_failed(&lab, ROOM_A) > 0).then_some(())
    })
    .await;
    // Keeps running. Room B has nothing waiting, but with the receiver down its notification
    // would need the spool too: refused, and retried by Exchange like room A's.
    let (status, _) = crate::common::admin_get(lab.admin(), "/healthz")
        .await
        .unwrap();
    assert_eq!(status, http::StatusCode::OK);
    let created_b = lab
        .sim
        .create_events(ROOM_B, EventType::Created, 1)
        .unwrap();
    // Nothing acknowledged is lost while refusing: the spool keeps its entries.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = lab.api().await;
    assert!(v["spool_depth"].as_u64().unwrap() >= spooled, "{v:#}");

    lab.receiver.set_down(false);
    let got = lab
        .receiver
        .wait_events(ROOM_A, &created, Duration::from_secs(30))
        .await;
    assert_in_order_none_lost(&created, &got);
    let got_b = lab
        .receiver
        .wait_events(ROOM_B, &created_b, Duration::from_secs(30))
        .await;
    assert_in_order_none_lost(&created_b, &got_b);
    lab.wait_relay(WAIT, "an empty spool", |v| {
        (v["spool_depth"].as_u64()? == 0).then_some(())
    })
    .await;
    assert_eq!(metric(lab.admin(), "ews_relay_spool_full").await, 0.0);
    assert!(!status_page(lab.admin())
        .await
        .contains("Notifications refused"));
}

/// Promise (README "Managed mode": a full disk): with `--state-dir` on a file system that is
/// really full (a small tmpfs), the relay refuses what it cannot store (503), keeps running,
/// shows the disk-full alarm and metric; once there is room it stores again without a restart,
/// and every event reaches the receiver in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_with_503_and_recovers_without_restart() {
    let mut lab = Lab::prepare(&[ROOM_A], |_| {}, Setup::new(&[ROOM_A])).await;
    let Some(fs) = Tmpfs::mount_on(lab.state.path(), 4 << 20, "full_disk") else {
        return;
    };
    lab.launch().await;
    lab.wait_active(&[ROOM_A]).await;
    let mut created = lab
        .sim
        .create_events(ROOM_A, EventType::Created, 1)
        .unwrap();
    lab.receiver.wait_events(ROOM_A, &created, WAIT).await;

    lab.receiver.set_down(true);
    // One spooled while there is room, then the disk fills up.
    created.extend(
        lab.sim
            .create_events(ROOM_A, EventType::Created, 1)
            .unwrap(),
    );
    lab.wait_relay(WAIT, "one notification spooled", |v| {
        (v["spool_depth"].as_u64()? == 1).then_some(())
    })
    .await;
    let room = fill_up(fs.path());
    created.extend(push_until_refused(&lab, ROOM_A, "disk_full").await);
    assert_eq!(metric(lab.admin(), "ews_relay_spool_disk_full").await, 1.0);
    assert_eq!(metric(lab.admin(), "ews_relay_spool_full").await, 1.0);
    let page = status_page(lab.admin()).await;
    assert!(page.contains("The disk of --state-dir is full"), "{page}");
    sim_wait(&lab.sim, WAIT, "Exchange told 503", |_| {
        (pushes_failed(&lab, ROOM_A) > 0).then_some(())
    })
    .await;
    let (status, _) = crate::common::admin_get(lab.admin(), "/healthz")
        .await
        .unwrap();
    assert_eq!(status, http::StatusCode::OK, "keeps running");

    std::fs::remove_file(room).unwrap();
    lab.receiver.set_down(false);
    let got = lab
        .receiver
        .wait_events(ROOM_A, &created, Duration::from_secs(30))
        .await;
    assert_in_order_none_lost(&created, &got);
    lab.wait_relay(WAIT, "an empty spool", |v| {
        (v["spool_depth"].as_u64()? == 0).then_some(())
    })
    .await;
    // A later notification is spooled again while the receiver is down: the store works.
    lab.receiver.set_down(true);
    let late = lab
        .sim
        .create_events(ROOM_A, EventType::Created, 1)
        .unwrap();
    lab.wait_relay(WAIT, "spooled again after the disk had room", |v| {
        (v["spool_depth"].as_u64()? == 1).then_some(())
    })
    .await;
    assert_eq!(metric(lab.admin(), "ews_relay_spool_disk_full").await, 0.0);
    lab.receiver.set_down(false);
    lab.receiver.wait_events(ROOM_A, &late, WAIT).await;
    lab.stop_relay().await;
    drop(fs);
}

/// Promise (README "Managed mode", logging): a receiver outage is logged once per mailbox,
/// naming it, however many notifications it spools, and a line says when its backlog drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_outage_is_logged_once_per_mailbox_and_when_drained() {
    let mut lab = Lab::prepare(&[ROOM_A, ROOM_B], |_| {}, Setup::new(&[ROOM_A, ROOM_B])).await;
    let relay = lab
        .spawn_binary_logging(&[("RUST_LOG", "info,rustls=error"), ("NO_COLOR", "1")])
        .await;
    let sim = lab.sim.handle.clone();
    wait_api(relay.admin, WAIT, "both mailboxes active", |v| {
        [ROOM_A, ROOM_B]
            .iter()
            .all(|m| {
                mailbox_view(v, m).is_some_and(|x| x["state"] == "active")
                    && live_subscription(&sim, m).is_some()
            })
            .then_some(())
    })
    .await;
    lab.receiver.set_down(true);
    let mut created_a = Vec::new();
    for _ in 0..4 {
        created_a.extend(
            lab.sim
                .create_events(ROOM_A, EventType::Created, 1)
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let created_b = lab
        .sim
        .create_events(ROOM_B, EventType::Created, 2)
        .unwrap();
    wait_api(relay.admin, WAIT, "both mailboxes spooling", |v| {
        (mailbox_view(v, ROOM_A)?["spool_depth"].as_u64()? >= 2
            && mailbox_view(v, ROOM_B)?["spool_depth"].as_u64()? >= 1)
            .then_some(())
    })
    .await;
    // Let the replay loop fail a few more times.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lab.receiver.set_down(false);
    lab.receiver.wait_events(ROOM_A, &created_a, WAIT).await;
    lab.receiver.wait_events(ROOM_B, &created_b, WAIT).await;
    let deadline = Instant::now() + WAIT;
    let log = loop {
        let log = relay.log();
        if log.matches("backlog drained").count() >= 2 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for m in [ROOM_A, ROOM_B] {
        let started: Vec<_> = log
            .lines()
            .filter(|l| l.contains("receiver not taking notifications") && l.contains(m))
            .collect();
        assert_eq!(started.len(), 1, "outage of {m} logged once:\n{log}");
        let drained: Vec<_> = log
            .lines()
            .filter(|l| l.contains("backlog drained") && l.contains(m))
            .collect();
        assert_eq!(drained.len(), 1, "drain of {m} logged once:\n{log}");
        assert!(drained[0].contains("spooled="), "{}", drained[0]);
    }
    assert!(
        !log.contains("receiver unreachable; notification spooled"),
        "no line per notification any more:\n{log}"
    );
}

/// Promise (README "Managed mode", `--spool-max-age`): a spooled notification older than the
/// max age is never dropped; instead the mailbox's new notifications are refused (503) with
/// the over-age alarm until the receiver has taken the backlog, and then every event arrives,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_age_backlog_refuses_new_notifications_and_drops_nothing() {
    let mut setup = Setup::new(&[ROOM_A]);
    setup.extra = ["--spool-max-age", "1s"].map(String::from).to_vec();
    let lab = Lab::start(&[ROOM_A], |_| {}, setup).await;
    lab.wait_active(&[ROOM_A]).await;
    lab.receiver.set_down(true);
    let mut created = lab
        .sim
        .create_events(ROOM_A, EventType::Created, 1)
        .unwrap();
    lab.wait_relay(WAIT, "one notification spooled", |v| {
        (v["spool_depth"].as_u64()? == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    created.extend(push_until_refused(&lab, ROOM_A, "max_age").await);
    assert_eq!(
        metric(lab.admin(), "ews_relay_spool_over_age_mailboxes").await,
        1.0
    );
    assert_eq!(metric(lab.admin(), "ews_relay_spool_full").await, 0.0);
    let page = status_page(lab.admin()).await;
    assert!(page.contains("older than --spool-max-age"), "{page}");
    let v = lab.api().await;
    assert_eq!(v["spool_depth"], 1, "the old entry is kept: {v:#}");

    lab.receiver.set_down(false);
    let got = lab
        .receiver
        .wait_events(ROOM_A, &created, Duration::from_secs(30))
        .await;
    assert_in_order_none_lost(&created, &got);
    lab.wait_relay(WAIT, "an empty spool", |v| {
        (v["spool_depth"].as_u64()? == 0).then_some(())
    })
    .await;
    assert_eq!(
        metric(lab.admin(), "ews_relay_spool_over_age_mailboxes").await,
        0.0
    );
}
