//! `--trace-dir`: every EWS and Autodiscover exchange written out in full for troubleshooting
//! with Microsoft support, credentials redacted, in size-capped rotating files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A trace file is rotated when it passes this size.
pub const TRACE_FILE_MAX: u64 = 10 * 1024 * 1024;
/// Rotated files kept (`ews-trace.log.1` … `.N`); older ones are deleted.
pub const TRACE_FILES_KEPT: usize = 4;
/// Request/response bodies longer than this are cut in the trace.
const TRACE_BODY_MAX: usize = 256 * 1024;
/// Headers whose values never reach the trace.
const REDACTED: [&str; 3] = ["authorization", "proxy-authorization", "set-cookie"];

/// Appends traces to `<dir>/ews-trace.log`.
#[derive(Debug, Clone)]
pub struct Tracer {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
}

impl Tracer {
    /// A tracer writing under `dir` (created if missing).
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                dir: dir.to_owned(),
                file: None,
                size: 0,
            })),
        })
    }

    /// Format one exchange (headers redacted) and append it off the async runtime.
    pub async fn record(
        &self,
        url: &str,
        request_headers: &http::HeaderMap,
        request_body: &[u8],
        outcome: Result<(u16, &http::HeaderMap, &[u8]), &str>,
    ) {
        let mut text = String::with_capacity(request_body.len() + 1024);
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        text.push_str(&format!("=== {now} POST {url}\n"));
        push_headers(&mut text, request_headers);
        push_body(&mut text, request_body);
        match outcome {
            Ok((status, headers, body)) => {
                text.push_str(&format!("--- response {status}\n"));
                push_headers(&mut text, headers);
                push_body(&mut text, body);
            }
            Err(e) => text.push_str(&format!("--- no response: {e}\n")),
        }
        text.push('\n');
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = me.append(text.as_bytes()) {
                tracing::warn!(error = %e, "cannot write the EWS trace");
            }
        })
        .await;
    }

    fn append(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let path = inner.dir.join("ews-trace.log");
        if inner.size + bytes.len() as u64 > TRACE_FILE_MAX && inner.size > 0 {
            inner.file = None;
            for i in (1..TRACE_FILES_KEPT).rev() {
                let from = inner.dir.join(format!("ews-trace.log.{i}"));
                let _ = std::fs::rename(&from, inner.dir.join(format!("ews-trace.log.{}", i + 1)));
            }
            let _ = std::fs::rename(&path, inner.dir.join("ews-trace.log.1"));
            let _ = std::fs::remove_file(
                inner
                    .dir
                    .join(format!("ews-trace.log.{}", TRACE_FILES_KEPT + 1)),
            );
        }
        if inner.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)?;
            inner.size = f.metadata()?.len();
            inner.file = Some(f);
        }
        if let Some(f) = inner.file.as_mut() {
            f.write_all(bytes)?;
        }
        inner.size += bytes.len() as u64;
        Ok(())
    }
}

fn push_headers(out: &mut String, headers: &http::HeaderMap) {
    for (name, value) in headers {
        let v = if REDACTED.contains(&name.as_str()) {
            "<redacted>"
        } else {
            value.to_str().unwrap_or("<binary>")
        };
        out.push_str(&format!("{name}: {v}\n"));
    }
}

fn push_body(out: &mut String, body: &[u8]) {
    out.push('\n');
    let cut = body.len().min(TRACE_BODY_MAX);
    out.push_str(&String::from_utf8_lossy(&body[..cut]));
    if cut < body.len() {
        out.push_str(&format!("\n[… {} more bytes]", body.len() - cut));
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn redacts_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracer::new(dir.path()).unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer very-secret-token".parse().unwrap());
        h.insert("x-anchormailbox", "room1@example.com".parse().unwrap());
        t.record(
            "https://ews/EWS/Exchange.asmx",
            &h,
            b"<Subscribe/>",
            Ok((200, &h, b"<ok/>")),
        )
        .await;
        let text = std::fs::read_to_string(dir.path().join("ews-trace.log")).unwrap();
        assert!(text.contains("x-anchormailbox: room1@example.com"));
        assert!(text.contains("<Subscribe/>") && text.contains("--- response 200"));
        assert!(!text.contains("very-secret-token"), "{text}");
        let big = vec![b'x'; TRACE_BODY_MAX];
        for _ in 0..(TRACE_FILE_MAX as usize / TRACE_BODY_MAX + 2) {
            t.record("u", &h, &big, Err("timeout")).await;
        }
        assert!(dir.path().join("ews-trace.log.1").exists(), "rotated");
        assert!(
            std::fs::metadata(dir.path().join("ews-trace.log"))
                .unwrap()
                .len()
                <= TRACE_FILE_MAX
        );
    }
}
