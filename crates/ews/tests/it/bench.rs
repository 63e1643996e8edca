//! Parse cost on the relay's hot path, measured rather than guessed. Ignored by default:
//! `cargo test --release --test ews_bench -- --ignored --nocapture`.
//!
//! The timings are wall clock, best of five rounds, and swing by ±30% on a busy machine. For a
//! steady count, run the test binary under `valgrind --tool=callgrind` with
//! `EWS_BENCH_CALLS=200` and compare the inclusive instruction counts of the functions.
//!
//! Last measured (2-core VM, quiet, µs per call, before → after the parser-perf work):
//! events fixture parse 15.0–16.1 → 9.7–10.5, summary 8.6–8.9; status fixture parse
//! 5.0 → 3.2, summary 3.0–3.1; `is_send_notification` 1.7 → 1.0;
//! `parse_send_notification_result` 1.6 → 0.96; bare `NsReader` loop 7.3–7.8.
//!
//! The summary's fast path (`summary_fast_vs_slow`, 2-core VM under load from other jobs, best
//! of three runs): bench body fast 2.6–2.8 against slow 8.5–9.3; about 39,000 instructions per
//! call against 103,000 (callgrind).
//!
//! After the word-at-a-time fast path (same VM, under load, old and new test binaries run
//! alternately four times each): bench body fast 2.50–2.63 → 1.93–2.37, status fixture
//! 0.97–1.54 → 0.76–1.05, slow unchanged at 8.5–9.7. Callgrind, `summarize_fast` inclusive,
//! per call (`EWS_BENCH_BODY=bench/ EWS_BENCH_CALLS=200`, 1,000 calls): bench body 38,100 →
//! 34,000, status fixture 14,100 → 12,200.
//!
//! After plain word loads in place of the `Stops` iterator, keys compared by their first word,
//! and attributes read out of line (callgrind, same settings): bench body 34,400 → 32,200.
//!
//! After O(1) closes, names and namespace URIs compared in words instead of by `memcmp`, and
//! two-word steps for values and texts, then names ended by one bitmap test (callgrind, same
//! settings, status fixture with `EWS_BENCH_BODY=status`): bench body 32,200 → 29,300 →
//! 28,700, status fixture 12,000 → 11,000 → 10,900. SSE2 is not used in the crate: its
//! `core::arch` intrinsics need `unsafe`, which the crate forbids. Through `safe_arch`'s safe
//! wrappers it was tried outside the crate, as a first pass marking `<`, `>` and quotes for a
//! tag reader to jump between: 28.3k instructions per bench body, no gain (bench/README.md,
//! "The structural index, tried", and bench/structural-index-prototype.rs).

use std::hint::black_box;
use std::time::Instant;

use ews::{
    is_send_notification, parse_send_notification, parse_send_notification_result,
    summarize_send_notification, summarize_send_notification_fast,
    summarize_send_notification_slow,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Calls per round unless `EWS_BENCH_CALLS` says otherwise.
const CALLS: u32 = 20_000;

/// Best of five rounds, in nanoseconds per call.
fn ns_per_call(mut f: impl FnMut()) -> f64 {
    let calls = std::env::var("EWS_BENCH_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CALLS);
    (0..5)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..calls {
                f();
            }
            started.elapsed().as_nanos() as f64 / f64::from(calls)
        })
        .fold(f64::INFINITY, f64::min)
}

/// The summary's fast path against the full walk it stands in for, on the body the relay
/// benchmarks post (bench/send-notification-events.xml) and on the keep-alive.
#[test]
#[ignore = "timing; run with --release --ignored --nocapture"]
fn summary_fast_vs_slow() {
    let bench = format!(
        "{}/../../bench/send-notification-events.xml",
        env!("CARGO_MANIFEST_DIR")
    );
    let bodies = [
        (
            "bench/send-notification-events.xml",
            std::fs::read(&bench).expect("bench body"),
        ),
        (
            "send-notification-status.xml",
            fixture("send-notification-status.xml"),
        ),
    ];
    // `EWS_BENCH_BODY=bench` (or any part of a name) measures one body alone, so a callgrind
    // count divides by one body's calls.
    let only = std::env::var("EWS_BENCH_BODY").unwrap_or_default();
    for (name, body) in bodies.into_iter().filter(|(name, _)| name.contains(&*only)) {
        let fast = ns_per_call(|| {
            black_box(summarize_send_notification_fast(black_box(&body)).expect("fast path"));
        });
        let slow = ns_per_call(|| {
            black_box(summarize_send_notification_slow(black_box(&body)).expect("parses"));
        });
        eprintln!(
            "summary of {name} ({} bytes): fast {:.2} µs, slow {:.2} µs ({:.1}x)",
            body.len(),
            fast / 1e3,
            slow / 1e3,
            slow / fast
        );
    }
}

#[test]
#[ignore = "timing; run with --release --ignored --nocapture"]
fn parse_cost() {
    for name in [
        "send-notification-events.xml",
        "send-notification-status.xml",
    ] {
        let body = fixture(name);
        let ns = ns_per_call(|| {
            let parsed = parse_send_notification(black_box(&body)).expect("parses");
            black_box(parsed);
        });
        let mb_per_s = body.len() as f64 / ns * 1e3;
        eprintln!(
            "parse_send_notification({name}, {} bytes): {ns:.0} ns ({mb_per_s:.0} MB/s)",
            body.len()
        );
        let ns = ns_per_call(|| {
            let summary = summarize_send_notification(black_box(&body)).expect("parses");
            black_box(summary);
        });
        eprintln!("summarize_send_notification({name}): {ns:.0} ns");
        let ns = ns_per_call(|| {
            black_box(is_send_notification(black_box(&body)));
        });
        eprintln!("is_send_notification({name}): {ns:.0} ns");
    }
    let body = fixture("send-notification-result-ok.xml");
    let ns = ns_per_call(|| {
        black_box(parse_send_notification_result(black_box(&body)).expect("parses"));
    });
    eprintln!(
        "parse_send_notification_result(send-notification-result-ok.xml, {} bytes): {ns:.0} ns",
        body.len()
    );
    // The floor: quick-xml's namespace-aware reader alone, doing nothing with the events.
    let body = fixture("send-notification-events.xml");
    let ns = ns_per_call(|| {
        let mut reader = quick_xml::NsReader::from_reader(black_box(&body[..]));
        reader.config_mut().expand_empty_elements = true;
        while !matches!(
            reader.read_resolved_event(),
            Ok((_, quick_xml::events::Event::Eof)) | Err(_)
        ) {}
    });
    eprintln!("bare NsReader loop(send-notification-events.xml): {ns:.0} ns");
}
