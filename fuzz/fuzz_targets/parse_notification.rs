//! Fuzzes the SendNotification parser, which reads untrusted bodies on the relay's hot path,
//! and the response parsers that share its reader. Any panic, hang or runaway allocation is a
//! bug; errors are the expected outcome for almost every input. Seed with tests/fixtures.
#![no_main]


use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let looks_like_one = ews::is_send_notification(body);
    let parsed = ews::parse_send_notification(body);
    // The relay's summary comes to the same verdict: the same summary, or the same error.
    match (&parsed, ews::summarize_send_notification(body)) {
        (Ok(full), Ok(summary)) => assert_eq!(full.summary(), summary),
        (Err(full), Err(summary)) => assert_eq!(format!("{full:?}"), format!("{summary:?}")),
        (full, summary) => panic!("parse and summary disagree: {full:?} vs {summary:?}"),
    }
    if let Ok(parsed) = parsed {
        // A full parse implies the cheap check agrees.
        assert!(looks_like_one);
        for message in &parsed.messages {
            let _ = message.status.action();
            if let Some(notification) = &message.notification {
                assert!(notification.events.len() <= ews::MAX_EVENTS);
                let _ = notification.last_watermark();
            }
        }
    }
    let _ = ews::parse_send_notification_result(body);
    if let Ok(response) = ews::parse_subscribe_response(body) {
        let _ = response.status.action();
    }
    if let Ok(fault) = ews::parse_fault(body) {
        let _ = fault.action();
    }
    let _ = ews::parse_get_user_settings_response(body);
});
