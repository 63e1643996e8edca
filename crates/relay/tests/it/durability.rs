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
use ews_sim::SubscriptionState;

use crate::common::managed as lab;
use lab::*;

const ROOM_A: &str = "room-a@contoso.example";
const ROOM_B: &str = "room-b@contoso.example";

/// A tmpfs of a given size mounted on a fresh temporary directory; unmounted on drop.
pub struct Tmpfs {
    dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mount one of `bytes`; `None` (after saying SKIPPED) where mounting is not allowed.
    pub fn mount(bytes: u64, test: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir: Some(dir) }),
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
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            // Lazy: a store thread of a stopped relay may still hold the file for a moment.
            let _ = Command::new("umount").arg("-l").arg(dir.path()).status();
            drop(dir);
        }
    }
}

/// Fills the file system at `dir` with a file of `bytes` (written, not sparse), to be removed
/// later to make room.
fn ballast(dir: &Path, bytes: usize) -> std::path::PathBuf {
    let path = dir.join("ballast");
    std::fs::write(&path, vec![0x5a; bytes]).unwrap();
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
