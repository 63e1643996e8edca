//! SendNotification fixtures parse to the values written in them, whatever the prefixes; the
//! callback's answers are byte-for-byte the fixtures and parse back.

use std::borrow::Cow;
use std::time::Duration;

use ews::{
    is_send_notification, parse_send_notification, parse_send_notification_result,
    send_notification_result, summarize_send_notification, Action, EventType, Id, ObjectId,
    ResponseClass, SubscriptionStatus,
};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn id<'a>(id: &'a str, change_key: &'a str) -> Id<'a> {
    Id {
        id: Cow::Borrowed(id),
        change_key: Some(Cow::Borrowed(change_key)),
    }
}

#[test]
fn status_event_keep_alive() {
    let body = fixture("send-notification-status.xml");
    let parsed = parse_send_notification(body.as_bytes()).expect("parses");
    assert_eq!(parsed.messages.len(), 1);
    let message = &parsed.messages[0];
    assert_eq!(message.status.class, ResponseClass::Success);
    assert_eq!(message.status.code.as_deref(), Some("NoError"));
    assert_eq!(message.status.action(), Action::Success);
    let id = "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAACkGm2Fhz9CTYx5mQ9Xh3l0";
    assert_eq!(message.subscription_id.as_deref(), Some(id));
    let notification = message.notification.as_ref().expect("notification");
    assert_eq!(notification.subscription_id, id);
    assert_eq!(
        notification.previous_watermark.as_deref(),
        Some("AQAAAOpvG0LURVdOhQkPOWZLPcJFVQUAAAAAAAE=")
    );
    assert!(!notification.more_events);
    assert_eq!(notification.events.len(), 1);
    let event = &notification.events[0];
    assert_eq!(event.kind, EventType::Status);
    assert_eq!(
        event.watermark.as_deref(),
        Some("AQAAAOpvG0LURVdOhQkPOWZLPcJGVQUAAAAAAAE=")
    );
    assert_eq!(event.timestamp, None);
    assert_eq!(event.object, None);
    assert_eq!(
        notification.last_watermark(),
        Some("AQAAAOpvG0LURVdOhQkPOWZLPcJGVQUAAAAAAAE=")
    );
}

/// The summary the relay tracks by, spelled out once rather than derived.
#[test]
fn summary_of_a_batch_and_of_an_error() {
    let body = fixture("send-notification-events.xml");
    let summary = summarize_send_notification(body.as_bytes()).expect("parses");
    let [message] = &summary.messages[..] else {
        panic!("one message");
    };
    assert_eq!(message.class, ResponseClass::Success);
    assert_eq!(message.code.as_deref(), Some("NoError"));
    assert_eq!(
        message.subscription_id.as_deref(),
        Some("JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAAB9c1Qm0VhIRb3ZkRf0x2aa")
    );
    let mut expected = [0; EventType::ALL.len()];
    for kind in [
        EventType::NewMail,
        EventType::Created,
        EventType::Modified,
        EventType::Moved,
        EventType::Deleted,
    ] {
        expected[kind.index()] = 1;
    }
    assert_eq!(message.event_counts, expected);
    assert_eq!(
        message.last_watermark.as_deref(),
        Some("AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQcwQAAAAAAAAE=")
    );
    // Borrowed from the body, as the full parse's values are.
    assert!(matches!(message.last_watermark, Some(Cow::Borrowed(_))));

    let body = fixture("send-notification-error.xml");
    let summary = summarize_send_notification(body.as_bytes()).expect("parses");
    let full = parse_send_notification(body.as_bytes()).expect("parses");
    assert_eq!(summary, full.summary());
    let message = &summary.messages[0];
    assert_eq!(message.class, ResponseClass::Error);
    assert!(message.subscription_id.is_some());
    assert_eq!(message.event_counts, [0; EventType::ALL.len()]);
    assert_eq!(message.last_watermark, None);

    for (i, kind) in EventType::ALL.into_iter().enumerate() {
        assert_eq!(kind.index(), i);
    }
}

#[test]
fn batch_of_events() {
    let body = fixture("send-notification-events.xml");
    let parsed = parse_send_notification(body.as_bytes()).expect("parses");
    assert_eq!(parsed.messages.len(), 1);
    let message = &parsed.messages[0];
    assert_eq!(message.status.class, ResponseClass::Success);
    assert_eq!(message.status.code.as_deref(), Some("NoError"));
    let notification = message.notification.as_ref().expect("notification");
    assert_eq!(
        notification.subscription_id,
        "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAAB9c1Qm0VhIRb3ZkRf0x2aa"
    );
    assert_eq!(
        notification.previous_watermark.as_deref(),
        Some("AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQXwQAAAAAAAAE=")
    );
    assert!(notification.more_events);

    let kinds: Vec<_> = notification.events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventType::NewMail,
            EventType::Created,
            EventType::Modified,
            EventType::Moved,
            EventType::Deleted
        ]
    );
    let [new_mail, created, modified, moved, deleted] = &notification.events[..] else {
        panic!("five events");
    };
    let item = |i, ck| Some(ObjectId::Item(id(i, ck)));

    assert_eq!(
        new_mail.watermark.as_deref(),
        Some("AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQYwQAAAAAAAAE=")
    );
    assert_eq!(new_mail.timestamp.as_deref(), Some("2026-11-20T08:15:02Z"));
    assert_eq!(
        new_mail.object,
        item(
            "AAMkADk0ZTI3NTYxLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OABGAAAAAAC",
            "CQAAABYAAAB2n3Xo"
        )
    );
    assert_eq!(
        new_mail.parent_folder_id,
        Some(id(
            "AAMkADk0ZTI3NTYxLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OAAuAAAAAAA",
            "AQAAAA=="
        ))
    );
    assert_eq!(new_mail.old_object, None);
    assert_eq!(new_mail.old_parent_folder_id, None);
    assert_eq!(new_mail.unread_count, None);

    assert_eq!(created.timestamp.as_deref(), Some("2026-11-20T08:15:03Z"));
    assert_eq!(
        created.object,
        item(
            "AAMkADk0ZTI3NTYxLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OABGAAAAAAD",
            "DwAAABYAAAB2n3Xp"
        )
    );

    assert_eq!(
        modified.watermark.as_deref(),
        Some("AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQawQAAAAAAAAE=")
    );
    assert_eq!(
        modified.object,
        Some(ObjectId::Folder(id(
            "AAMkADk0ZTI3NTYxLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OAAuAAAAAAB",
            "AQAAAA=="
        )))
    );
    assert_eq!(
        modified.parent_folder_id,
        Some(id(
            "AAMkADk0ZTI3NTYxLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OAAuAAAAAAC",
            "AQAAAA=="
        ))
    );
    assert_eq!(modified.unread_count, Some(3));

    assert_eq!(moved.timestamp.as_deref(), Some("2026-11-20T08:15:05Z"));
    assert_eq!(
        moved.object,
        item(
            "AAMkADk0ZTI3NTYxLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OABGAAAAAAE",
            "CQAAABYAAAB2n3Xq"
        )
    );
    assert_eq!(
        moved.parent_folder_id,
        Some(id(
            "AAMkADk0ZTI3NTYxLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OAAuAAAAAAD",
            "AQAAAA=="
        ))
    );
    assert_eq!(
        moved.old_object,
        item(
            "AAMkADk0ZTI3NTYxLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OABGAAAAAAF",
            "CQAAABYAAAB2n3Xr"
        )
    );
    assert_eq!(
        moved.old_parent_folder_id,
        Some(id(
            "AAMkADk0ZTI3NTYxLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OAAuAAAAAAB",
            "AQAAAA=="
        ))
    );

    assert_eq!(deleted.timestamp.as_deref(), Some("2026-11-20T08:15:06Z"));
    assert_eq!(
        deleted.object,
        item(
            "AAMkADk0ZTI3NTYxLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OABGAAAAAAG",
            "CQAAABYAAAB2n3Xs"
        )
    );
    assert_eq!(
        deleted.parent_folder_id,
        Some(id(
            "AAMkADk0ZTI3NTYxLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OAAuAAAAAAE",
            "AQAAAA=="
        ))
    );
    assert_eq!(
        notification.last_watermark(),
        Some("AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQcwQAAAAAAAAE=")
    );
}

#[test]
fn error_message_without_notification_names_its_subscription() {
    let body = fixture("send-notification-error.xml");
    let parsed = parse_send_notification(body.as_bytes()).expect("parses");
    assert_eq!(parsed.messages.len(), 1);
    let message = &parsed.messages[0];
    assert_eq!(message.status.class, ResponseClass::Error);
    assert_eq!(
        message.status.code.as_deref(),
        Some("ErrorReadEventsFailed")
    );
    assert_eq!(
        message.status.message_text.as_deref(),
        Some(
            "Events for this subscription cannot be read. The subscription must be created again."
        )
    );
    assert_eq!(message.status.action(), Action::Rediscover);
    assert_eq!(message.notification, None);
    assert_eq!(
        message.subscription_id.as_deref(),
        Some("JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAACkGm2Fhz9CTYx5mQ9Xh3l0")
    );
}

#[test]
fn every_notification_fixture_is_a_send_notification() {
    for name in [
        "send-notification-status.xml",
        "send-notification-events.xml",
        "send-notification-error.xml",
    ] {
        assert!(is_send_notification(fixture(name).as_bytes()), "{name}");
    }
    for name in [
        "send-notification-result-ok.xml",
        "subscribe-push-request.xml",
        "subscribe-response-success.xml",
        "fault-server-busy.xml",
        "getusersettings-response.xml",
    ] {
        assert!(!is_send_notification(fixture(name).as_bytes()), "{name}");
    }
}

/// The same messages with other prefixes, default namespaces, or none at all.
#[test]
fn prefixes_do_not_matter() {
    for name in [
        "send-notification-status.xml",
        "send-notification-events.xml",
        "send-notification-error.xml",
    ] {
        let original = fixture(name);
        let expected = parse_send_notification(original.as_bytes()).expect("parses");
        let (soap, m, t) = prefixes(&original);
        let variants = [
            // soap11: ↔ s:
            rename(&original, soap, Some("s")),
            rename(&original, soap, Some("soap11")),
            // a default namespace for the envelope
            rename(&original, soap, None),
            // a default namespace for the messages
            rename(&original, m, None),
            // other prefixes for everything
            rename(&rename(&original, m, Some("msg")), t, Some("typ")),
            // messages prefixed when the fixture had them unprefixed, and the reverse
            rename(&rename(&original, m, Some("m")), soap, None),
        ];
        for variant in variants.iter().chain([&original]) {
            let parsed = parse_send_notification(variant.as_bytes())
                .unwrap_or_else(|e| panic!("{name}: {e}\n{variant}"));
            assert_eq!(parsed, expected, "{name}:\n{variant}");
            // The summary is what the full parse says, on every shape of the same message.
            let summary = summarize_send_notification(variant.as_bytes())
                .unwrap_or_else(|e| panic!("{name}: {e}\n{variant}"));
            assert_eq!(summary, expected.summary(), "{name}:\n{variant}");
        }
    }
}

/// The prefixes a fixture uses for the SOAP, messages and types namespaces ("" = default).
fn prefixes(xml: &str) -> (&'static str, &'static str, &'static str) {
    let find = |candidates: &[&'static str], uri: &str| -> &'static str {
        candidates
            .iter()
            .copied()
            .find(|p| {
                let decl = if p.is_empty() {
                    format!("xmlns=\"{uri}\"")
                } else {
                    format!("xmlns:{p}=\"{uri}\"")
                };
                xml.contains(&decl)
            })
            .unwrap_or_else(|| panic!("no prefix for {uri}"))
    };
    (
        find(
            &["soap11", "s", "soap"],
            "http://schemas.xmlsoap.org/soap/envelope/",
        ),
        find(
            &["m", ""],
            "http://schemas.microsoft.com/exchange/services/2006/messages",
        ),
        find(
            &["t", "e"],
            "http://schemas.microsoft.com/exchange/services/2006/types",
        ),
    )
}

/// Renames prefix `from` ("" = the default namespace) to `to` (`None` = the default namespace)
/// in tags and declarations. Text in the fixtures never contains `<x:` or `xmlns`.
fn rename(xml: &str, from: &str, to: Option<&str>) -> String {
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        let gt = rest[lt..].find('>').expect("tag ends") + lt;
        out.push_str(&rename_tag(&rest[lt..=gt], from, to));
        rest = &rest[gt + 1..];
    }
    out.push_str(rest);
    out
}

fn rename_tag(tag: &str, from: &str, to: Option<&str>) -> String {
    if tag.starts_with("<?") || tag.starts_with("<!") {
        return tag.to_string();
    }
    let close = tag.starts_with("</");
    let body = &tag[if close { 2 } else { 1 }..];
    let name_end = body
        .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
        .expect("name ends");
    let (name, attrs) = body.split_at(name_end);
    let (prefix, local) = name.split_once(':').unwrap_or(("", name));
    let name = if prefix == from {
        match to {
            Some(p) => format!("{p}:{local}"),
            None => local.to_string(),
        }
    } else {
        name.to_string()
    };
    let old_decl = if from.is_empty() {
        "xmlns=".to_string()
    } else {
        format!("xmlns:{from}=")
    };
    let new_decl = match to {
        Some(p) => format!("xmlns:{p}="),
        None => "xmlns=".to_string(),
    };
    let attrs = attrs.replace(&old_decl, &new_decl);
    format!("<{}{name}{attrs}", if close { "/" } else { "" })
}

#[test]
fn answers_are_the_fixtures_and_parse_back() {
    for (status, name) in [
        (SubscriptionStatus::Ok, "send-notification-result-ok.xml"),
        (
            SubscriptionStatus::Unsubscribe,
            "send-notification-result-unsubscribe.xml",
        ),
    ] {
        let built = send_notification_result(status);
        assert_eq!(built, fixture(name), "{name}");
        assert_eq!(
            parse_send_notification_result(built.as_bytes()).ok(),
            Some(status)
        );
    }
}

#[test]
fn entities_and_cdata_in_values_are_decoded() {
    let body = fixture("send-notification-status.xml").replace(
        "<t:Watermark>AQAAAOpvG0LURVdOhQkPOWZLPcJGVQUAAAAAAAE=</t:Watermark>",
        "<t:Watermark>\n  AQ&#65;&amp;<![CDATA[<x>]]>&lt;\n</t:Watermark>",
    );
    let parsed = parse_send_notification(body.as_bytes()).expect("parses");
    let notification = parsed.messages[0]
        .notification
        .as_ref()
        .expect("notification");
    assert_eq!(
        notification.events[0].watermark.as_deref(),
        Some("AQA&<x><")
    );
}

#[test]
fn unknown_elements_and_event_types_are_ignored() {
    let body = fixture("send-notification-status.xml").replace(
        "<t:StatusEvent>",
        concat!(
            "<t:FutureEvent><t:Watermark>x</t:Watermark></t:FutureEvent>",
            "<x:Extra xmlns:x=\"urn:example\"><t:StatusEvent/></x:Extra>",
            "<t:StatusEvent><t:Unknown a=\"b\">text</t:Unknown>"
        ),
    );
    let parsed = parse_send_notification(body.as_bytes()).expect("parses");
    let notification = parsed.messages[0]
        .notification
        .as_ref()
        .expect("notification");
    assert_eq!(notification.events.len(), 1);
    assert_eq!(notification.events[0].kind, EventType::Status);
}

#[test]
fn server_busy_in_a_response_message_carries_its_backoff() {
    let body = fixture("send-notification-error.xml").replace(
        "</m:MessageXml>",
        "<t:Value Name=\"BackOffMilliseconds\">30000</t:Value></m:MessageXml>",
    );
    let body = body.replace("ErrorReadEventsFailed", "ErrorServerBusy");
    let parsed = parse_send_notification(body.as_bytes()).expect("parses");
    let status = &parsed.messages[0].status;
    assert_eq!(status.back_off, Some(Duration::from_secs(30)));
    assert_eq!(status.action(), Action::BackOff(Duration::from_secs(30)));
}

#[test]
fn event_type_names_round_trip() {
    for kind in EventType::ALL {
        assert_eq!(EventType::from_name(kind.as_str()), Some(kind));
    }
    assert_eq!(EventType::from_name("Status"), None);
}

/// Values come out of the body without a copy unless the XML escaped them.
#[test]
fn values_borrow_from_the_body() {
    let body = fixture("send-notification-events.xml");
    let parsed = parse_send_notification(body.as_bytes()).expect("parses");
    let notification = parsed.messages[0]
        .notification
        .as_ref()
        .expect("notification");
    assert!(matches!(notification.subscription_id, Cow::Borrowed(_)));
    let Some(ObjectId::Item(item)) = &notification.events[0].object else {
        panic!("an item id");
    };
    assert!(matches!(item.id, Cow::Borrowed(_)));
    assert!(matches!(item.change_key, Some(Cow::Borrowed(_))));
}

/// .NET writers may start the body with a UTF-8 byte order mark.
#[test]
fn a_byte_order_mark_is_accepted() {
    let mut body = b"\xEF\xBB\xBF".to_vec();
    body.extend_from_slice(fixture("send-notification-status.xml").as_bytes());
    let parsed = parse_send_notification(&body).expect("parses");
    assert_eq!(parsed.messages.len(), 1);
    assert!(is_send_notification(&body));
}
