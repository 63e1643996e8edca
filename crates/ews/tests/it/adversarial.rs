//! Hostile and broken bodies: each is refused with the error that names the problem, fast,
//! and nothing panics.

use std::time::{Duration, Instant};

use ews::{
    is_send_notification, parse_fault, parse_get_user_settings_response, parse_send_notification,
    parse_send_notification_result, parse_subscribe_response, summarize_send_notification,
    EwsError, MAX_ATTRIBUTES, MAX_EVENTS,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `parse_send_notification`, checking on the way that `summarize_send_notification` comes to
/// the same verdict: the same summary, or the same error.
fn parse(body: &[u8]) -> Result<(), EwsError> {
    let full = parse_send_notification(body);
    let summary = summarize_send_notification(body);
    match (&full, &summary) {
        (Ok(full), Ok(summary)) => assert_eq!(&full.summary(), summary),
        (Err(full), Err(summary)) => assert_eq!(format!("{full:?}"), format!("{summary:?}")),
        _ => panic!("parse and summary disagree: {full:?} vs {summary:?}"),
    }
    full.map(drop)
}

const ENVELOPE_OPEN: &str =
    r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>"#;
const ENVELOPE_CLOSE: &str = "</s:Body></s:Envelope>";
const MESSAGES: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";

/// A SendNotification whose notification holds `events`.
fn notification_with(events: &str) -> String {
    format!(
        concat!(
            "{}<m:SendNotification xmlns:m=\"http://schemas.microsoft.com/exchange/services/2006/messages\"",
            " xmlns:t=\"http://schemas.microsoft.com/exchange/services/2006/types\">",
            "<m:ResponseMessages><m:SendNotificationResponseMessage ResponseClass=\"Success\">",
            "<m:ResponseCode>NoError</m:ResponseCode><m:Notification>",
            "<t:SubscriptionId>abc</t:SubscriptionId>{}",
            "</m:Notification></m:SendNotificationResponseMessage></m:ResponseMessages>",
            "</m:SendNotification>{}"
        ),
        ENVELOPE_OPEN, events, ENVELOPE_CLOSE
    )
}

#[test]
fn the_helper_builds_a_valid_notification() {
    let body = notification_with("<t:StatusEvent><t:Watermark>w</t:Watermark></t:StatusEvent>");
    assert!(parse(body.as_bytes()).is_ok());
}

/// Every fixture cut at every byte offset short of its end: an error from the fixture's own
/// parser every time, and no panic from any parser.
#[test]
fn truncated_at_every_offset() {
    type Parser = fn(&[u8]) -> bool;
    let notification: Parser = |b| parse(b).is_ok();
    let result: Parser = |b| parse_send_notification_result(b).is_ok();
    let subscribe: Parser = |b| parse_subscribe_response(b).is_ok();
    let fault: Parser = |b| parse_fault(b).is_ok();
    let autodiscover: Parser = |b| parse_get_user_settings_response(b).is_ok();
    let fixtures: [(&str, Parser); 12] = [
        ("send-notification-status.xml", notification),
        ("send-notification-events.xml", notification),
        ("send-notification-error.xml", notification),
        ("send-notification-result-ok.xml", result),
        ("send-notification-result-unsubscribe.xml", result),
        ("subscribe-response-success.xml", subscribe),
        ("subscribe-response-ErrorInvalidWatermark.xml", subscribe),
        ("subscribe-response-ErrorNonExistentMailbox.xml", subscribe),
        (
            "subscribe-response-ErrorProxyRequestNotAllowed.xml",
            subscribe,
        ),
        ("fault-server-busy.xml", fault),
        ("getusersettings-response.xml", autodiscover),
        // A request, not a response: only "no panic" applies, checked below.
        ("subscribe-push-request.xml", |_| false),
    ];
    for (name, own_parser) in fixtures {
        let body = fixture(name);
        assert!(
            own_parser(&body) || name.contains("request"),
            "{name} parses whole"
        );
        let end = body.trim_ascii_end().len();
        for cut in 0..end {
            let truncated = &body[..cut];
            assert!(!own_parser(truncated), "{name} cut at {cut} parsed");
            // Nothing else may panic on it either.
            for parser in [notification, result, subscribe, fault, autodiscover] {
                let _ = parser(truncated);
            }
            let _ = is_send_notification(truncated);
        }
    }
}

#[test]
fn malformed_xml() {
    for body in [
        format!("{ENVELOPE_OPEN}<m:SendNotification xmlns:m=\"{MESSAGES}\"></m:SendNotificatio>{ENVELOPE_CLOSE}"),
        format!("{ENVELOPE_OPEN}</s:Envelope></s:Body>"),
        notification_with("<t:StatusEvent b=\"1\" b=\"2\"/>"),
        notification_with("<t:StatusEvent b=1/>"),
        notification_with("<t:StatusEvent><t:Watermark>&bogus;</t:Watermark></t:StatusEvent>"),
        notification_with("<t:StatusEvent><t:Watermark>a & b</t:Watermark></t:StatusEvent>"),
        notification_with("<t:StatusEvent><t:Watermark>&#0;</t:Watermark></t:StatusEvent>"),
        notification_with("<t:StatusEvent/>") + "<second-root/>",
        notification_with("<t:StatusEvent/>") + "trailing text",
        notification_with("<t:MoreEvents>perhaps</t:MoreEvents><t:StatusEvent/>"),
        notification_with("<t:ModifiedEvent><t:UnreadCount>-1</t:UnreadCount></t:ModifiedEvent>"),
    ] {
        let err = parse(body.as_bytes()).expect_err(&body);
        assert!(
            matches!(err, EwsError::Malformed(_) | EwsError::MissingElement(_)),
            "{body}: {err:?}"
        );
    }
    // Not UTF-8.
    let mut body = notification_with("<t:StatusEvent><t:Watermark>X</t:Watermark></t:StatusEvent>")
        .into_bytes();
    let x = body.iter().position(|&b| b == b'X').expect("marker");
    body[x] = 0xff;
    assert!(matches!(parse(&body), Err(EwsError::Malformed(_))));
}

#[test]
fn missing_required_parts() {
    let cases = [
        (
            format!("{ENVELOPE_OPEN}<m:SendNotification xmlns:m=\"http://schemas.microsoft.com/exchange/services/2006/messages\"/>{ENVELOPE_CLOSE}"),
            "m:SendNotificationResponseMessage",
        ),
        (
            notification_with("<t:StatusEvent/>").replace(" ResponseClass=\"Success\"", ""),
            "ResponseClass attribute",
        ),
        (
            notification_with("<t:StatusEvent/>").replace("<t:SubscriptionId>abc</t:SubscriptionId>", ""),
            "t:SubscriptionId",
        ),
        (
            notification_with("<t:CreatedEvent><t:ItemId ChangeKey=\"x\"/></t:CreatedEvent>"),
            "Id attribute",
        ),
        (
            r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Header/></s:Envelope>"#
                .to_string(),
            "soap:Body",
        ),
    ];
    for (body, what) in cases {
        match parse(body.as_bytes()) {
            Err(EwsError::MissingElement(w)) => assert_eq!(w, what, "{body}"),
            other => panic!("{body}: expected MissingElement({what}), got {other:?}"),
        }
    }
}

#[test]
fn deep_nesting() {
    let depth = 10_000;
    let nest = |inner: &str| {
        format!(
            "{ENVELOPE_OPEN}<SendNotification xmlns=\"{MESSAGES}\">{inner}</SendNotification>{ENVELOPE_CLOSE}"
        )
    };
    let deep = nest(&format!("{}{}", "<a>".repeat(depth), "</a>".repeat(depth)));
    assert!(matches!(parse(deep.as_bytes()), Err(EwsError::TooDeep)));
    // Inside a notification, in an element the parser skips.
    let deep = notification_with(&format!(
        "<t:StatusEvent/><x>{}{}</x>",
        "<a>".repeat(depth),
        "</a>".repeat(depth)
    ));
    assert!(matches!(parse(deep.as_bytes()), Err(EwsError::TooDeep)));
    // Unclosed, as an attacker would not bother to close them.
    let deep = format!(
        "{ENVELOPE_OPEN}<SendNotification xmlns=\"{MESSAGES}\">{}",
        "<a>".repeat(depth)
    );
    assert!(matches!(parse(deep.as_bytes()), Err(EwsError::TooDeep)));
}

#[test]
fn huge_values() {
    let big = "A".repeat(10 * 1024 * 1024);
    let started = Instant::now();
    let attribute = format!(
        r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" x="{big}"><s:Body/></s:Envelope>"#
    );
    assert!(matches!(
        parse(attribute.as_bytes()),
        Err(EwsError::TooLarge)
    ));
    let id = notification_with(&format!(
        "<t:CreatedEvent><t:ItemId Id=\"{big}\"/></t:CreatedEvent>"
    ));
    assert!(matches!(parse(id.as_bytes()), Err(EwsError::TooLarge)));
    let text = notification_with(&format!(
        "<t:StatusEvent><t:Watermark>{big}</t:Watermark></t:StatusEvent>"
    ));
    assert!(matches!(parse(text.as_bytes()), Err(EwsError::TooLarge)));
    // Many small pieces adding up to too much in one value.
    let pieces = notification_with(&format!(
        "<t:StatusEvent><t:Watermark>{}</t:Watermark></t:StatusEvent>",
        "a&amp;".repeat(40_000)
    ));
    assert!(matches!(parse(pieces.as_bytes()), Err(EwsError::TooLarge)));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn too_many_attributes() {
    let attrs: String = (0..=MAX_ATTRIBUTES)
        .map(|i| format!(" a{i}=\"v\""))
        .collect();
    let body = notification_with(&format!("<t:StatusEvent{attrs}/>"));
    assert!(matches!(
        parse(body.as_bytes()),
        Err(EwsError::TooMany { limit, .. }) if limit == MAX_ATTRIBUTES
    ));
}

#[test]
fn too_many_events() {
    let event = "<t:StatusEvent><t:Watermark>w</t:Watermark></t:StatusEvent>";
    let at_limit = notification_with(&event.repeat(MAX_EVENTS));
    let parsed = parse_send_notification(at_limit.as_bytes()).expect("the limit itself is fine");
    let events = parsed.messages[0]
        .notification
        .as_ref()
        .map(|n| n.events.len());
    assert_eq!(events, Some(MAX_EVENTS));

    let over = notification_with(&event.repeat(MAX_EVENTS + 1));
    assert!(matches!(
        parse(over.as_bytes()),
        Err(EwsError::TooMany { limit, .. }) if limit == MAX_EVENTS
    ));
}

#[test]
fn billion_laughs() {
    let body = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>&lol9;</s:Body></s:Envelope>"#;
    assert!(matches!(
        parse(body.as_bytes()),
        Err(EwsError::DtdForbidden)
    ));
    assert!(!is_send_notification(body.as_bytes()));
}

#[test]
fn external_entity() {
    let body = r#"<?xml version="1.0"?>
<!DOCTYPE s:Envelope [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>&xxe;</s:Body></s:Envelope>"#;
    assert!(matches!(
        parse(body.as_bytes()),
        Err(EwsError::DtdForbidden)
    ));
    // A DOCTYPE anywhere, even without entities, even after the root has started.
    let late = format!("{ENVELOPE_OPEN}<!DOCTYPE x>{ENVELOPE_CLOSE}");
    assert!(parse(late.as_bytes()).is_err());
    let plain = format!("<!DOCTYPE s:Envelope>{ENVELOPE_OPEN}{ENVELOPE_CLOSE}");
    assert!(matches!(
        parse(plain.as_bytes()),
        Err(EwsError::DtdForbidden)
    ));
}

/// `https://` namespaces, as some published examples have them, are other namespaces.
#[test]
fn wrong_namespace() {
    let body = String::from_utf8(fixture("send-notification-status.xml")).expect("utf-8");
    let all_https = body.replace("http://schemas", "https://schemas");
    assert!(matches!(
        parse(all_https.as_bytes()),
        Err(EwsError::NotSoapEnvelope)
    ));
    let messages_https = body.replace(
        "http://schemas.microsoft.com/exchange/services/2006/messages",
        "https://schemas.microsoft.com/exchange/services/2006/messages",
    );
    assert!(matches!(
        parse(messages_https.as_bytes()),
        Err(EwsError::UnexpectedMessage { .. })
    ));
    assert!(!is_send_notification(messages_https.as_bytes()));
    // Types in the wrong namespace: the notification has no SubscriptionId the parser knows.
    let types_https = body.replace(
        "http://schemas.microsoft.com/exchange/services/2006/types",
        "https://schemas.microsoft.com/exchange/services/2006/types",
    );
    assert!(matches!(
        parse(types_https.as_bytes()),
        Err(EwsError::MissingElement("t:SubscriptionId"))
    ));
    // SOAP 1.2 is not what Exchange sends to a push callback.
    let soap12 = body.replace(
        "http://schemas.xmlsoap.org/soap/envelope/",
        "http://www.w3.org/2003/05/soap-envelope",
    );
    assert!(matches!(
        parse(soap12.as_bytes()),
        Err(EwsError::NotSoapEnvelope)
    ));
}

#[test]
fn not_soap_at_all() {
    for body in [
        &b""[..],
        b"   \n",
        br#"{"value":[{"subscriptionId":"x"}]}"#,
        b"validationToken=abc",
        b"<html><body>hi</body></html>",
        b"<?xml version=\"1.0\"?><Envelope/>",
        b"\x00\x01\x02",
    ] {
        let err = parse(body).expect_err("refused");
        assert!(
            matches!(err, EwsError::NotSoapEnvelope | EwsError::Malformed(_)),
            "{:?}: {err:?}",
            String::from_utf8_lossy(body)
        );
        assert!(!is_send_notification(body));
    }
    // The common cases get the precise answer.
    for body in [&b""[..], br#"{"a":1}"#, b"<html/>"] {
        assert!(matches!(parse(body), Err(EwsError::NotSoapEnvelope)));
    }
}

/// Namespace declarations the Namespaces in XML recommendation forbids are refused, and a
/// prefix declared on an inner element goes out of scope with it.
#[test]
fn namespace_declarations() {
    for bad in [
        r#"<t:StatusEvent xmlns:xml="urn:other"/>"#,
        r#"<t:StatusEvent xmlns:xmlns="urn:other"/>"#,
        r#"<t:StatusEvent xmlns:p="http://www.w3.org/XML/1998/namespace"/>"#,
        r#"<t:StatusEvent xmlns:p="http://www.w3.org/2000/xmlns/"/>"#,
    ] {
        let body = notification_with(bad);
        assert!(
            matches!(parse(body.as_bytes()), Err(EwsError::Malformed(_))),
            "{bad}"
        );
    }
    // The xml prefix may be declared, to its own namespace.
    let body =
        notification_with(r#"<t:StatusEvent xmlns:xml="http://www.w3.org/XML/1998/namespace"/>"#);
    assert!(parse(body.as_bytes()).is_ok());
    // `t` rebound inside an unknown element: the events in there are not EWS events …
    let body = notification_with(concat!(
        r#"<x xmlns:t="urn:other"><t:StatusEvent><t:Watermark>in</t:Watermark></t:StatusEvent></x>"#,
        r#"<t:StatusEvent><t:Watermark>out</t:Watermark></t:StatusEvent>"#,
    ));
    let parsed = parse_send_notification(body.as_bytes()).expect("parses");
    let events = &parsed.messages[0]
        .notification
        .as_ref()
        .expect("notification")
        .events;
    // … and after its end tag `t` is the types namespace again.
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].watermark.as_deref(), Some("out"));
    parse(body.as_bytes()).expect("summary agrees");
    // A prefix nobody declared is no namespace the parsers know.
    let body = notification_with("").replace(
        "<t:SubscriptionId>abc</t:SubscriptionId>",
        "<u:SubscriptionId>abc</u:SubscriptionId>",
    );
    assert!(matches!(
        parse(body.as_bytes()),
        Err(EwsError::MissingElement("t:SubscriptionId"))
    ));
}
