//! Fuzzes the fast path of `summarize_send_notification` against the full walk it stands in
//! for. The one invariant: whenever the fast path returns a summary, the full walk returns
//! `Ok` with the same summary. Giving up (`None`) is always allowed; a panic, a hang, or a
//! summary the full walk does not agree with is a bug. Seed with tests/fixtures and bench/.
#![no_main]


use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Some(fast) = ews::summarize_send_notification_fast(body) else {
        return;
    };
    match ews::summarize_send_notification_slow(body) {
        Ok(slow) => assert_eq!(fast, slow, "fast and slow disagree"),
        Err(e) => panic!("fast path accepted what the full walk refuses: {e}"),
    }
    // And it is what the relay's entry point returns.
    assert_eq!(
        ews::summarize_send_notification(body).expect("fast path took it"),
        fast
    );
});
