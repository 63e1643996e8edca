//! The embedded store on real files: every field survives a reopen, the spool keeps per-mailbox
//! order, acknowledged appends survive `kill -9`, concurrent appends share commits, retired
//! subscription ids are recognised and pruned, and unusable files are refused by name.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ews_relay::store::{
    MailboxRecord, MailboxState, NewSpoolEntry, SpoolSeq, Store, StoreError, StoreWriter,
    SubscriptionOwner, WriterConfig, DEFAULT_RETIRED_ID_MAX_AGE, SCHEMA_VERSION, STORE_FILE_NAME,
};

/// A subscription id shaped like Exchange Online's (long base64, not a GUID).
const SUB_A: &str =
    "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAAB9c1Qm0VhIRb3ZkRf0x2aa";
const SUB_B: &str =
    "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAACkGm2Fhz9CTYx5mQ9Xh3l0";
const DAY_MS: u64 = 24 * 3600 * 1000;
/// The env var that turns [`kill9_child`] into the appending child of [`survives_kill_9`].
const CHILD_ENV: &str = "EWS_RELAY_STORE_CHILD_DIR";

fn full_record() -> MailboxRecord {
    MailboxRecord {
        address: "alice@contoso.com".into(),
        subscription_id: Some(SUB_A.into()),
        watermark: Some("AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQcwQAAAAAAAAE=".into()),
        state: MailboxState::BackingOff,
        last_error: Some("ErrorServerBusy: back off 30000 ms".into()),
        last_heartbeat: Some(1_700_000_000_123),
        last_event: Some(1_700_000_000_456),
        ews_url: Some("https://outlook.office365.com/EWS/Exchange.asmx".into()),
        grouping: Some("PR05CA0001, NAMPR05".into()),
        resync_pending: true,
        stream_open: true,
        stream_cookie: Some("pr05mb0001=abc".into()),
    }
}

fn body(tag: &str, len: usize) -> Bytes {
    let mut b = format!("<{tag}/>").into_bytes();
    b.resize(len.max(b.len()), b'x');
    Bytes::from(b)
}

#[test]
fn mailbox_fields_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let record = full_record();
    {
        let store = Store::open(dir.path()).unwrap();
        // The address is normalised: Exchange compares SMTP addresses case-insensitively.
        let mut shouted = record.clone();
        shouted.address = " Alice@Contoso.COM ".into();
        store.put_mailbox(&shouted, 1).unwrap();
        let mut minimal = MailboxRecord::new("bob@contoso.com");
        minimal.state = MailboxState::Failed;
        store.put_mailbox(&minimal, 1).unwrap();
    }
    assert!(dir.path().join(STORE_FILE_NAME).is_file());
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.mailbox("ALICE@contoso.com").unwrap(),
        Some(record.clone())
    );
    let all = store.mailboxes().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], record);
    assert_eq!(all[1].address, "bob@contoso.com");
    assert_eq!(all[1].state, MailboxState::Failed);
    assert_eq!(all[1].subscription_id, None);
    assert!(!all[1].resync_pending);
    assert_eq!(store.mailbox("nobody@contoso.com").unwrap(), None);
    // Every state round-trips.
    for state in [
        MailboxState::Subscribing,
        MailboxState::Active,
        MailboxState::Lost,
        MailboxState::BackingOff,
        MailboxState::Failed,
    ] {
        let mut r = record.clone();
        r.state = state;
        store.put_mailbox(&r, 2).unwrap();
        assert_eq!(store.mailbox(&r.address).unwrap().unwrap().state, state);
    }
}

#[test]
fn subscription_ids_current_retired_and_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = 1_700_000_000_000;
    {
        let store = Store::open(dir.path()).unwrap();
        let mut r = MailboxRecord::new("alice@contoso.com");
        r.subscription_id = Some(SUB_A.into());
        store.put_mailbox(&r, t0).unwrap();
        assert_eq!(
            store.subscription_owner(SUB_A).unwrap(),
            Some(SubscriptionOwner {
                mailbox: "alice@contoso.com".into(),
                retired_at: None
            })
        );
        // Resubscribing replaces the id: the old one is retired, not forgotten.
        r.subscription_id = Some(SUB_B.into());
        store.put_mailbox(&r, t0 + DAY_MS).unwrap();
        // Writing the same id again (a heartbeat update) changes nothing in the map.
        r.last_heartbeat = Some(t0 + 2 * DAY_MS);
        store.put_mailbox(&r, t0 + 2 * DAY_MS).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let a = store.subscription_owner(SUB_A).unwrap().unwrap();
    assert_eq!(a.mailbox, "alice@contoso.com");
    assert_eq!(a.retired_at, Some(t0 + DAY_MS));
    assert_eq!(
        store.subscription_owner(SUB_B).unwrap().unwrap().retired_at,
        None
    );
    assert_eq!(store.subscription_owner("not-ours").unwrap(), None);

    // Removing the mailbox retires its current id, so Exchange's next post gets Unsubscribe.
    assert!(store
        .remove_mailbox("Alice@contoso.com", t0 + 9 * DAY_MS)
        .unwrap());
    assert!(!store
        .remove_mailbox("alice@contoso.com", t0 + 9 * DAY_MS)
        .unwrap());
    assert_eq!(store.mailbox("alice@contoso.com").unwrap(), None);
    assert_eq!(
        store.subscription_owner(SUB_B).unwrap().unwrap().retired_at,
        Some(t0 + 9 * DAY_MS)
    );

    // Eight days after A was retired: A goes, B (retired today) stays.
    let now = t0 + 9 * DAY_MS;
    assert_eq!(
        store
            .prune_retired(DEFAULT_RETIRED_ID_MAX_AGE, now)
            .unwrap(),
        1
    );
    assert_eq!(store.subscription_owner(SUB_A).unwrap(), None);
    assert!(store.subscription_owner(SUB_B).unwrap().is_some());
    assert_eq!(
        store
            .prune_retired(DEFAULT_RETIRED_ID_MAX_AGE, now)
            .unwrap(),
        0
    );
    // Current ids are never pruned, however old.
    let mut c = MailboxRecord::new("carol@contoso.com");
    c.subscription_id = Some("current-id".into());
    store.put_mailbox(&c, 0).unwrap();
    store.prune_retired(Duration::ZERO, u64::MAX).unwrap();
    assert!(store.subscription_owner("current-id").unwrap().is_some());
    assert_eq!(store.subscription_owner(SUB_B).unwrap(), None);
}

#[test]
fn spool_keeps_per_mailbox_order_and_acks_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let mailboxes = ["a@contoso.com", "b@contoso.com", "c@contoso.com"];
    let mut expected: BTreeMap<&str, Vec<(SpoolSeq, Bytes)>> = BTreeMap::new();
    let mut last = SpoolSeq(0);
    {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.spool_oldest_age(1_000).unwrap(), None);
        // Interleaved: a b c a b c … with a different count per mailbox.
        for round in 0..6u64 {
            for (i, mb) in mailboxes.iter().enumerate() {
                if round >= 2 + 2 * i as u64 {
                    continue;
                }
                let b = body(&format!("{mb}-{round}"), 100 + round as usize);
                let seq = store
                    .spool_append(&mb.to_uppercase(), SUB_A, &b, 1_000 + round * 10)
                    .unwrap();
                assert!(seq > last, "sequence must increase");
                last = seq;
                expected.entry(mb).or_default().push((seq, b));
            }
        }
        let batch: Vec<NewSpoolEntry> = (0..3)
            .map(|i| NewSpoolEntry {
                mailbox: "a@contoso.com".into(),
                subscription_id: SUB_B.into(),
                body: body(&format!("batch-{i}"), 10),
                received_at: 2_000,
            })
            .collect();
        let seqs = store.spool_append_batch(&batch).unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]) && seqs[0] > last);
        for (s, e) in seqs.iter().zip(&batch) {
            expected
                .get_mut("a@contoso.com")
                .unwrap()
                .push((*s, e.body.clone()));
        }
    }
    let store = Store::open(dir.path()).unwrap();
    for mb in mailboxes {
        let got = store.spool_peek(mb, usize::MAX).unwrap();
        let want = &expected[mb];
        assert_eq!(got.len(), want.len(), "{mb}");
        for (g, (seq, b)) in got.iter().zip(want) {
            assert_eq!((g.seq, &g.body, g.mailbox.as_str()), (*seq, b, mb));
            assert_eq!(g.attempts, 0);
        }
        assert_eq!(store.spool_peek(mb, 2).unwrap(), got[..2].to_vec());
    }
    let a = store.spool_peek("a@contoso.com", usize::MAX).unwrap();
    assert_eq!(a[0].subscription_id, SUB_A);
    assert_eq!(a[0].received_at, 1_000);
    assert_eq!(a.last().unwrap().subscription_id, SUB_B);

    let depth = store.spool_depth().unwrap();
    assert_eq!(depth.entries, 2 + 4 + 6 + 3);
    let per: Vec<(&str, u64)> = depth
        .per_mailbox
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        per,
        [
            ("a@contoso.com", 5),
            ("b@contoso.com", 4),
            ("c@contoso.com", 6)
        ]
    );
    let bytes: u64 = expected
        .values()
        .flatten()
        .map(|(_, b)| b.len() as u64)
        .sum();
    assert_eq!(depth.bytes, bytes);
    assert_eq!(store.spool_mailboxes().unwrap(), mailboxes);
    assert_eq!(
        store.spool_oldest_age(1_500).unwrap(),
        Some(Duration::from_millis(500))
    );

    // Attempts are counted on one entry only.
    assert_eq!(
        store
            .spool_record_attempt("A@contoso.com", a[1].seq)
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        store
            .spool_record_attempt("a@contoso.com", a[1].seq)
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        store
            .spool_record_attempt("a@contoso.com", SpoolSeq(9_999))
            .unwrap(),
        None
    );
    // Ack of a middle entry removes exactly that one.
    assert!(store.spool_ack("a@contoso.com", a[1].seq).unwrap());
    assert!(!store.spool_ack("a@contoso.com", a[1].seq).unwrap());
    assert!(
        !store.spool_ack("b@contoso.com", a[0].seq).unwrap(),
        "wrong mailbox"
    );
    let after = store.spool_peek("a@contoso.com", usize::MAX).unwrap();
    let mut want = a.clone();
    want.remove(1);
    assert_eq!(after, want);
    assert_eq!(store.spool_depth().unwrap().entries, 14);

    // Drain a and c: the oldest is now b's first entry, received at 1_000 + 0 too; drain b's
    // first to move it.
    for e in store.spool_peek("a@contoso.com", usize::MAX).unwrap() {
        assert!(store.spool_ack("a@contoso.com", e.seq).unwrap());
    }
    let b_first = store.spool_peek("b@contoso.com", 1).unwrap().remove(0);
    store.spool_ack("b@contoso.com", b_first.seq).unwrap();
    assert_eq!(
        store.spool_oldest_received_at().unwrap(),
        Some(1_000),
        "c's first entry"
    );
    for e in store.spool_peek("c@contoso.com", usize::MAX).unwrap() {
        store.spool_ack("c@contoso.com", e.seq).unwrap();
    }
    assert_eq!(store.spool_oldest_received_at().unwrap(), Some(1_010));
    assert_eq!(store.spool_mailboxes().unwrap(), ["b@contoso.com"]);
    for e in store.spool_peek("b@contoso.com", usize::MAX).unwrap() {
        store.spool_ack("b@contoso.com", e.seq).unwrap();
    }
    let depth = store.spool_depth().unwrap();
    assert_eq!(
        (depth.entries, depth.bytes, depth.per_mailbox.len()),
        (0, 0, 0)
    );
    assert_eq!(store.spool_oldest_age(5_000).unwrap(), None);

    // Sequence numbers never repeat, even once the spool is empty and the file reopened.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let next = store
        .spool_append("a@contoso.com", SUB_A, b"x", 3_000)
        .unwrap();
    assert!(next > last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_commits() {
    const WRITES: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let writer = Arc::new(StoreWriter::start(store.clone(), WriterConfig::default()));
    let commits_before = store.commits();

    let mut tasks = Vec::new();
    for i in 0..WRITES {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let mailbox = format!("user{}@contoso.com", i % 7);
            let b = body(&format!("n{i}"), 4096);
            let seq = writer
                .append(NewSpoolEntry {
                    mailbox: mailbox.clone(),
                    subscription_id: SUB_A.into(),
                    body: b.clone(),
                    received_at: 1_000 + i as u64,
                })
                .await
                .unwrap();
            (mailbox, seq, b)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let commits = store.commits() - commits_before;
    eprintln!("{WRITES} concurrent appends in {commits} commits");
    assert!(
        commits * 4 <= WRITES as u64,
        "{WRITES} appends took {commits} commits"
    );
    // Every caller got its own sequence, and the entry under it is its own.
    let mut seqs: Vec<SpoolSeq> = results.iter().map(|r| r.1).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), WRITES);
    let s = store.clone();
    let spooled = store
        .blocking(move |_| {
            (0..7)
                .flat_map(|m| {
                    s.spool_peek(&format!("user{m}@contoso.com"), usize::MAX)
                        .unwrap()
                })
                .map(|e| ((e.mailbox.clone(), e.seq), e.body))
                .collect::<BTreeMap<_, _>>()
        })
        .await;
    assert_eq!(spooled.len(), WRITES);
    for (mailbox, seq, b) in &results {
        assert_eq!(&spooled[&(mailbox.clone(), *seq)], b);
    }

    // The other writes go through the same thread.
    let (mailbox, seq, _) = &results[0];
    assert_eq!(writer.record_attempt(mailbox, *seq).await.unwrap(), Some(1));
    assert!(writer.ack(mailbox, *seq).await.unwrap());
    assert!(!writer.ack(mailbox, *seq).await.unwrap());
    writer.put_mailbox(full_record(), 5).await.unwrap();
    assert_eq!(
        store.mailbox("alice@contoso.com").unwrap(),
        Some(full_record())
    );
    Arc::into_inner(writer).unwrap().shutdown().await;
}

/// Appends with a lone caller and with many, 4 KB bodies, and prints the rates. Run with
/// `cargo test --release --test store -- --ignored --nocapture bench_append`; the directory is
/// `$EWS_RELAY_BENCH_DIR` or a temporary one (which must be on a real disk, not tmpfs, to mean
/// anything); `$EWS_RELAY_BENCH_LINGER_MS` sets [`WriterConfig::linger`].
#[test]
#[ignore]
fn bench_append_4k() {
    let base = std::env::var_os("EWS_RELAY_BENCH_DIR").map(std::path::PathBuf::from);
    let dir = match &base {
        Some(b) => tempfile::tempdir_in(b).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let b = body("bench", 4096);

    let n = 300;
    let start = Instant::now();
    for i in 0..n {
        store
            .spool_append(&format!("u{}@c.com", i % 10), SUB_A, &b, 0)
            .unwrap();
    }
    let single = n as f64 / start.elapsed().as_secs_f64();
    println!("single: {n} appends, one commit each: {single:.0}/s");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let linger = std::env::var("EWS_RELAY_BENCH_LINGER_MS")
        .ok()
        .map_or(Duration::ZERO, |ms| {
            Duration::from_millis(ms.parse().unwrap())
        });
    for concurrency in [1usize, 16, 64, 256] {
        let config = WriterConfig {
            linger,
            ..WriterConfig::default()
        };
        let writer = Arc::new(StoreWriter::start(store.clone(), config));
        let per_task = 6_000 / concurrency;
        let total = per_task * concurrency;
        let commits = store.commits();
        let start = Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = (0..concurrency)
                .map(|t| {
                    let writer = writer.clone();
                    let b = b.clone();
                    tokio::spawn(async move {
                        for _ in 0..per_task {
                            writer
                                .append(NewSpoolEntry {
                                    mailbox: format!("u{t}@c.com"),
                                    subscription_id: SUB_A.into(),
                                    body: b.clone(),
                                    received_at: 0,
                                })
                                .await
                                .unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let rate = total as f64 / start.elapsed().as_secs_f64();
        let commits = store.commits() - commits;
        println!(
            "writer (linger {linger:?}), {concurrency} concurrent callers: {total} appends in {commits} commits: {rate:.0}/s"
        );
        rt.block_on(Arc::into_inner(writer).unwrap().shutdown());
    }
}

/// The child half of [`survives_kill_9`]: does nothing unless [`CHILD_ENV`] names a directory;
/// then appends through a [`StoreWriter`] from four tasks and prints `ACK <mailbox> <seq> <n>`
/// after each append is acknowledged, until killed.
#[test]
#[ignore]
fn kill9_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = Arc::new(Store::open(std::path::Path::new(&dir)).unwrap());
    let writer = Arc::new(StoreWriter::start(store, WriterConfig::default()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    let mailbox = format!("m{t}@contoso.com");
                    // Bounded, in case the parent never kills us.
                    for n in 0..20_000u64 {
                        let seq = writer
                            .append(NewSpoolEntry {
                                mailbox: mailbox.clone(),
                                subscription_id: SUB_A.into(),
                                body: body(&format!("{mailbox} #{n}"), 4096),
                                received_at: n,
                            })
                            .await
                            .unwrap();
                        println!("ACK {mailbox} {} {n}", seq.0);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn survives_kill_9() {
    use std::os::unix::process::ExitStatusExt;

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "store::kill9_child", "--nocapture"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked: Vec<(String, u64, u64)> = Vec::new();
    fn parse(line: &str, acked: &mut Vec<(String, u64, u64)>) {
        // libtest may print its own text on the same line before ours.
        if let Some(at) = line.find("ACK ") {
            let f: Vec<&str> = line[at + 4..].split_whitespace().collect();
            acked.push((
                f[0].to_string(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            ));
        }
    }
    while acked.len() < 400 {
        let line = lines
            .next()
            .expect("the child stopped before being killed")
            .unwrap();
        parse(&line, &mut acked);
    }
    let killed = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Whatever the child printed before it died was acknowledged too.
    for line in lines {
        match line {
            Ok(line) => parse(&line, &mut acked),
            Err(_) => break,
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the child must die by SIGKILL");
    assert!(acked.len() >= 400);

    let store = Store::open(dir.path()).unwrap();
    let mut present: BTreeMap<(String, u64), Bytes> = BTreeMap::new();
    for m in 0..4 {
        let mailbox = format!("m{m}@contoso.com");
        let entries = store.spool_peek(&mailbox, usize::MAX).unwrap();
        // Order of arrival is kept: n (the child's counter) increases with seq.
        let ns: Vec<u64> = entries.iter().map(|e| e.received_at).collect();
        assert!(ns.windows(2).all(|w| w[1] == w[0] + 1), "{mailbox}: {ns:?}");
        for e in entries {
            present.insert((mailbox.clone(), e.seq.0), e.body);
        }
    }
    for (mailbox, seq, n) in &acked {
        let b = present
            .get(&(mailbox.clone(), *seq))
            .unwrap_or_else(|| panic!("acknowledged {mailbox} seq {seq} lost after kill -9"));
        assert!(b.starts_with(format!("<{mailbox} #{n}/>").as_bytes()));
    }
    eprintln!(
        "{} acknowledged before kill -9, {} present after reopening",
        acked.len(),
        present.len()
    );
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    let path = dir.path().join(STORE_FILE_NAME);
    {
        // What a future ews-relay would leave behind: the documented `meta` table, a higher version.
        const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", SCHEMA_VERSION + 1)
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, StoreError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(path.to_str().unwrap()) && msg.contains("newer"),
        "{msg}"
    );
}

#[test]
fn non_redb_file_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STORE_FILE_NAME);
    let garbage: Vec<u8> = (0..16_384u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    // The file is left alone for the operator to inspect.
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}

#[test]
fn damaged_store_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.put_mailbox(&full_record(), 1).unwrap();
        store
            .spool_append("alice@contoso.com", SUB_A, &body("x", 50_000), 1)
            .unwrap();
    }
    let path = dir.path().join(STORE_FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    // Keep the header's magic number, wreck the rest.
    for b in &mut bytes[16..] {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
}

#[test]
fn foreign_redb_file_and_second_opener_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STORE_FILE_NAME);
    {
        const OTHER: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("other_app");
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(OTHER).unwrap().insert(1, 2).unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Foreign { .. }), "{err:?}");

    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
    assert!(err.to_string().contains(STORE_FILE_NAME));
}
