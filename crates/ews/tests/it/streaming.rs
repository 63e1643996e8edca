//! Streaming notifications: the builders against the fixtures and Microsoft's schema, refused
//! where Exchange would refuse; every streaming fixture parsed to its values; a streamed
//! notification rewritten as a SendNotification that the push parsers read back unchanged.

use std::borrow::Cow;
use std::time::Duration;

use ews::{
    get_streaming_events_request, parse_send_notification, parse_streaming_events,
    parse_subscribe_response, parse_unsubscribe_response, send_notification_from_stream,
    streaming_subscribe_request, summarize_send_notification, summarize_send_notification_fast,
    summarize_send_notification_slow, unsubscribe_request, Action, ConnectionStatus, Event,
    EventType, EwsError, Folders, Id, Notification, ObjectId, ResponseClass,
    StreamingSubscribeRequest, DEFAULT_SERVER_VERSION, MAX_CONNECTION_TIMEOUT,
    MAX_STREAMING_SUBSCRIPTIONS,
};

use crate::builders::{assert_schema_valid, fixture, normalize, xmllint, xpath_value};

const A: &str = "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAAC1c3RyZWFtaW5nLWFhYWE=";
const B: &str = "JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAAC1c3RyZWFtaW5nLWJiYmI=";
const MAILBOX: &str = "room-4.12@contoso.example";

fn invalid_field(result: Result<String, EwsError>) -> &'static str {
    match result {
        Err(EwsError::InvalidInput { field, .. }) => field,
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

fn fixture_subscribe() -> StreamingSubscribeRequest<'static> {
    StreamingSubscribeRequest {
        server_version: DEFAULT_SERVER_VERSION,
        mailbox: MAILBOX,
        folders: Folders::Distinguished(&["calendar"]),
        event_types: &[
            EventType::Created,
            EventType::Modified,
            EventType::Deleted,
            EventType::Moved,
        ],
    }
}

// ---------------------------------------------------------------- builders

#[test]
fn streaming_subscribe_is_the_fixture() {
    let built = streaming_subscribe_request(&fixture_subscribe()).expect("builds");
    assert_eq!(
        normalize(&built),
        normalize(&fixture("subscribe-streaming-request.xml"))
    );
    assert_schema_valid(&built);
    // What a push subscription has and a streaming one must not.
    for absent in [
        "Watermark",
        "StatusFrequency",
        "URL",
        "PushSubscriptionRequest",
    ] {
        assert!(!built.contains(absent), "{absent}");
    }
}

#[test]
fn streaming_subscribe_variants_validate_against_the_schema() {
    let variants = [
        StreamingSubscribeRequest {
            folders: Folders::All,
            ..fixture_subscribe()
        },
        StreamingSubscribeRequest {
            server_version: "Exchange2010_SP1",
            folders: Folders::Distinguished(&["inbox", "calendar", "deleteditems"]),
            event_types: &EventType::ALL[..7],
            ..fixture_subscribe()
        },
        StreamingSubscribeRequest {
            server_version: "V2017_07_11",
            mailbox: "o'brien&\"co\"@contoso.example",
            event_types: &[EventType::NewMail],
            ..fixture_subscribe()
        },
    ];
    for request in &variants {
        assert_schema_valid(&streaming_subscribe_request(request).expect("builds"));
    }
    let all = streaming_subscribe_request(&variants[0]).expect("builds");
    assert!(all.contains(
        r#"<m:StreamingSubscriptionRequest SubscribeToAllFolders="true"><t:EventTypes>"#
    ));
    assert!(!all.contains("FolderIds"));
    let escaped = streaming_subscribe_request(&variants[2]).expect("builds");
    if let Some(value) = xpath_value(&escaped, "SmtpAddress") {
        assert_eq!(value, variants[2].mailbox);
    }
}

#[test]
fn streaming_subscribe_refuses_what_exchange_would() {
    let base = fixture_subscribe();
    let cases = [
        (
            StreamingSubscribeRequest {
                server_version: "Exchange2010",
                ..base
            },
            "server_version",
        ),
        (
            StreamingSubscribeRequest {
                server_version: "Exchange2007_SP1",
                ..base
            },
            "server_version",
        ),
        (
            StreamingSubscribeRequest {
                server_version: "Exchange 2013",
                ..base
            },
            "server_version",
        ),
        (
            StreamingSubscribeRequest {
                mailbox: "no-at-sign",
                ..base
            },
            "mailbox",
        ),
        (
            StreamingSubscribeRequest {
                folders: Folders::Distinguished(&[]),
                ..base
            },
            "folders",
        ),
        (
            StreamingSubscribeRequest {
                folders: Folders::Distinguished(&["Inbox\""]),
                ..base
            },
            "folders",
        ),
        (
            StreamingSubscribeRequest {
                event_types: &[],
                ..base
            },
            "event_types",
        ),
        (
            StreamingSubscribeRequest {
                event_types: &[EventType::Created, EventType::Status],
                ..base
            },
            "event_types",
        ),
    ];
    for (request, field) in cases {
        assert_eq!(
            invalid_field(streaming_subscribe_request(&request)),
            field,
            "{request:?}"
        );
    }
}

#[test]
fn get_streaming_events_is_the_fixture() {
    let built =
        get_streaming_events_request(&[A, B], 30, None, DEFAULT_SERVER_VERSION).expect("builds");
    assert_eq!(
        normalize(&built),
        normalize(&fixture("get-streaming-events-request.xml"))
    );
    assert_schema_valid(&built);
    assert!(!built.contains("ExchangeImpersonation"));

    let impersonated =
        get_streaming_events_request(&[A], 1, Some(MAILBOX), "Exchange2010_SP1").expect("builds");
    assert!(impersonated.contains("<t:SmtpAddress>room-4.12@contoso.example</t:SmtpAddress>"));
    assert!(impersonated.contains("<m:ConnectionTimeout>1</m:ConnectionTimeout>"));
    assert_schema_valid(&impersonated);
}

#[test]
fn get_streaming_events_limits() {
    let ids: Vec<String> = (0..=MAX_STREAMING_SUBSCRIPTIONS)
        .map(|i| format!("subscription-{i}"))
        .collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let build = |ids: &[&str], timeout| {
        get_streaming_events_request(ids, timeout, None, DEFAULT_SERVER_VERSION)
    };

    // The bounds themselves are accepted and valid.
    let most = build(&ids[..MAX_STREAMING_SUBSCRIPTIONS], MAX_CONNECTION_TIMEOUT).expect("200");
    assert_eq!(most.matches("<t:SubscriptionId>").count(), 200);
    assert_schema_valid(&most);
    build(&ids[..1], 1).expect("one id, one minute");

    assert_eq!(invalid_field(build(&[], 30)), "subscription_ids");
    assert_eq!(invalid_field(build(&ids, 30)), "subscription_ids"); // 201
    assert_eq!(
        invalid_field(build(&ids[..1], 0)),
        "connection_timeout_minutes"
    );
    assert_eq!(
        invalid_field(build(&ids[..1], 31)),
        "connection_timeout_minutes"
    );
    assert_eq!(
        invalid_field(build(&ids[..1], u8::MAX)),
        "connection_timeout_minutes"
    );
    assert_eq!(invalid_field(build(&[A, ""], 30)), "subscription_id");
    assert_eq!(invalid_field(build(&["a\u{1}b"], 30)), "subscription_id");
    assert_eq!(
        invalid_field(get_streaming_events_request(
            &[A],
            30,
            Some("x"),
            "Exchange2013"
        )),
        "impersonate"
    );
    assert_eq!(
        invalid_field(get_streaming_events_request(&[A], 30, None, "Exchange2010")),
        "server_version"
    );
}

#[test]
fn get_streaming_events_escapes_ids() {
    let id = "a<b>&c\"d'e";
    let built = get_streaming_events_request(&[id], 5, None, DEFAULT_SERVER_VERSION).expect("ok");
    assert_schema_valid(&built);
    if let Some(value) = xpath_value(&built, "SubscriptionId") {
        assert_eq!(value, id);
    }
}

#[test]
fn unsubscribe_is_the_fixture() {
    let built = unsubscribe_request(A, Some(MAILBOX), DEFAULT_SERVER_VERSION).expect("builds");
    assert_eq!(
        normalize(&built),
        normalize(&fixture("unsubscribe-request.xml"))
    );
    assert_schema_valid(&built);
    let bare = unsubscribe_request("x&y", None, "Exchange2010_SP1").expect("builds");
    assert!(!bare.contains("ExchangeImpersonation"));
    assert!(bare.contains("<m:SubscriptionId>x&amp;y</m:SubscriptionId>"));
    assert_schema_valid(&bare);

    assert_eq!(
        invalid_field(unsubscribe_request("", None, DEFAULT_SERVER_VERSION)),
        "subscription_id"
    );
    assert_eq!(
        invalid_field(unsubscribe_request(
            A,
            Some("nobody"),
            DEFAULT_SERVER_VERSION
        )),
        "impersonate"
    );
    assert_eq!(
        invalid_field(unsubscribe_request(A, None, "")),
        "server_version"
    );
}

// ---------------------------------------------------------------- responses to the builders

#[test]
fn streaming_subscribe_response_has_an_id_and_no_watermark() {
    let body = fixture("subscribe-response-streaming.xml");
    let response = parse_subscribe_response(body.as_bytes()).expect("parses");
    assert_eq!(response.status.action(), Action::Success);
    assert_eq!(response.subscription_id.as_deref(), Some(A));
    assert_eq!(response.watermark, None);
}

#[test]
fn unsubscribe_response() {
    let body = fixture("unsubscribe-response-success.xml");
    let status = parse_unsubscribe_response(body.as_bytes()).expect("parses");
    assert_eq!(status.class, ResponseClass::Success);
    assert_eq!(status.action(), Action::Success);

    let failed = body
        .replace(r#"ResponseClass="Success""#, r#"ResponseClass="Error""#)
        .replace(
            "<m:ResponseCode>NoError</m:ResponseCode>",
            "<m:MessageText>gone</m:MessageText><m:ResponseCode>ErrorSubscriptionNotFound</m:ResponseCode>",
        );
    let status = parse_unsubscribe_response(failed.as_bytes()).expect("parses");
    assert_eq!(status.code.as_deref(), Some("ErrorSubscriptionNotFound"));
    assert_eq!(status.action(), Action::Resubscribe);

    let fault = fixture("streaming-fault-ErrorServerBusy.xml");
    assert!(matches!(
        parse_unsubscribe_response(fault.as_bytes()),
        Err(EwsError::Fault(_))
    ));
    let other = fixture("subscribe-response-streaming.xml");
    assert!(matches!(
        parse_unsubscribe_response(other.as_bytes()),
        Err(EwsError::UnexpectedMessage { .. })
    ));
}

// ---------------------------------------------------------------- streaming envelopes

#[test]
fn keep_alive() {
    let body = fixture("streaming-keepalive.xml");
    let batch = parse_streaming_events(body.as_bytes()).expect("parses");
    assert_eq!(batch.messages.len(), 1);
    let message = &batch.messages[0];
    assert_eq!(message.status.class, ResponseClass::Success);
    assert_eq!(message.status.action(), Action::Success);
    assert_eq!(message.connection_status, Some(ConnectionStatus::Ok));
    assert!(message.notifications.is_empty());
    assert!(message.error_subscription_ids.is_empty());
    assert!(batch.is_keep_alive());
    assert!(!batch.is_closed());
    assert_eq!(batch.notifications().count(), 0);
}

#[test]
fn connection_closed() {
    let body = fixture("streaming-closed.xml");
    let batch = parse_streaming_events(body.as_bytes()).expect("parses");
    assert_eq!(
        batch.messages[0].connection_status,
        Some(ConnectionStatus::Closed)
    );
    assert!(batch.is_closed());
    assert!(!batch.is_keep_alive());

    let odd = body.replace(">Closed<", ">Half-open<");
    assert!(matches!(
        parse_streaming_events(odd.as_bytes()),
        Err(EwsError::MissingElement("m:ConnectionStatus"))
    ));
}

fn item(id: &'static str, change_key: &'static str) -> Option<ObjectId<'static>> {
    Some(ObjectId::Item(folder(id, change_key)))
}

fn folder(id: &'static str, change_key: &'static str) -> Id<'static> {
    Id {
        id: Cow::Borrowed(id),
        change_key: Some(Cow::Borrowed(change_key)),
    }
}

#[test]
fn events_for_two_subscriptions() {
    let body = fixture("streaming-events.xml");
    let batch = parse_streaming_events(body.as_bytes()).expect("parses");
    assert!(!batch.is_keep_alive());
    assert!(!batch.is_closed());
    let message = &batch.messages[0];
    assert_eq!(message.status.action(), Action::Success);
    assert_eq!(message.connection_status, None);
    assert_eq!(message.notifications.len(), 2);

    let [first, second] = &message.notifications[..] else {
        unreachable!()
    };
    assert_eq!(first.subscription_id, A);
    assert_eq!(second.subscription_id, B);
    assert_eq!(first.previous_watermark, None);
    assert!(!first.more_events);
    let kinds: Vec<_> = batch
        .notifications()
        .flat_map(|n| n.events.iter().map(|e| e.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            EventType::Created,
            EventType::NewMail,
            EventType::Modified,
            EventType::Moved,
            EventType::Deleted
        ]
    );
    // Streaming events as Microsoft documents them carry no watermark.
    assert!(batch
        .notifications()
        .flat_map(|n| &n.events)
        .all(|e| e.watermark.is_none()));

    let created = &first.events[0];
    assert_eq!(created.timestamp.as_deref(), Some("2026-11-20T09:41:07Z"));
    assert_eq!(
        created.object,
        item(
            "AAMkAGFhYWFhYWFhLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OABGAAAAAAA",
            "CQAAABYAAAB2n3Xt"
        )
    );
    let modified = &first.events[2];
    assert_eq!(modified.unread_count, Some(1));
    assert!(matches!(modified.object, Some(ObjectId::Folder(_))));

    let moved = &second.events[0];
    assert_eq!(
        moved.old_object,
        item(
            "AAMkAGJiYmJiYmJiLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OABGAAAAAAB",
            "CQAAABYAAAB2n3Xs"
        )
    );
    assert_eq!(
        moved.old_parent_folder_id,
        Some(folder(
            "AAMkAGJiYmJiYmJiLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OAAuAAAAAAC",
            "AQAAAA=="
        ))
    );
    assert_eq!(
        moved.parent_folder_id,
        Some(folder(
            "AAMkAGJiYmJiYmJiLTQ4ZjMtNDFmNy1iNGQ2LWE1ZWE1NjVlYmY1OAAuAAAAAAD",
            "AQAAAA=="
        ))
    );
}

#[test]
fn notification_in_either_namespace() {
    // The schema puts Notification in the types namespace; Exchange writes the messages one.
    let body = fixture("streaming-events.xml").replace("m:Notification>", "t:Notification>");
    let typed = parse_streaming_events(body.as_bytes()).expect("parses");
    let original = fixture("streaming-events.xml");
    let messages = parse_streaming_events(original.as_bytes()).expect("parses");
    assert_eq!(typed, messages);

    // Anywhere else, it is not a notification.
    let other = fixture("streaming-events.xml").replace(
        "<m:Notification>",
        r#"<m:Notification xmlns:m="urn:other">"#,
    );
    let batch = parse_streaming_events(other.as_bytes()).expect("parses");
    assert_eq!(batch.notifications().count(), 0);
}

#[test]
fn missed_notification_events_names_the_subscription() {
    let body = fixture("streaming-ErrorMissedNotificationEvents.xml");
    let batch = parse_streaming_events(body.as_bytes()).expect("parses");
    let message = &batch.messages[0];
    assert_eq!(message.status.class, ResponseClass::Error);
    assert_eq!(
        message.status.code.as_deref(),
        Some("ErrorMissedNotificationEvents")
    );
    assert!(message.status.message_text.is_some());
    assert_eq!(message.error_subscription_ids, [A]);
    assert!(message.notifications.is_empty());
    assert!(!batch.is_keep_alive());

    // The schema's namespace for those ids parses the same.
    let typed = body.replace("m:SubscriptionId>", "t:SubscriptionId>");
    assert_eq!(
        parse_streaming_events(typed.as_bytes()).expect("parses"),
        batch
    );

    let empty = body.replace(A, "");
    assert!(matches!(
        parse_streaming_events(empty.as_bytes()),
        Err(EwsError::MissingElement("t:SubscriptionId"))
    ));
}

#[test]
fn subscription_not_found_names_both_subscriptions() {
    let body = fixture("streaming-ErrorSubscriptionNotFound.xml");
    let batch = parse_streaming_events(body.as_bytes()).expect("parses");
    let message = &batch.messages[0];
    assert_eq!(
        message.status.code.as_deref(),
        Some("ErrorSubscriptionNotFound")
    );
    assert_eq!(message.status.action(), Action::Resubscribe);
    assert_eq!(message.error_subscription_ids, [A, B]);
}

#[test]
fn other_streaming_error_codes() {
    let body = fixture("streaming-ErrorSubscriptionNotFound.xml");
    for code in [
        "ErrorExpiredSubscription",
        "ErrorExceededConnectionCount",
        "ErrorProxyRequestNotAllowed",
        "ErrorNewEventStreamConnectionOpened",
    ] {
        let changed = body.replace("ErrorSubscriptionNotFound", code);
        let batch = parse_streaming_events(changed.as_bytes()).expect(code);
        assert_eq!(batch.messages[0].status.code.as_deref(), Some(code));
        assert_eq!(batch.messages[0].error_subscription_ids, [A, B], "{code}");
    }

    // Throttled per message, with the wait in MessageXml.
    let busy = body
        .replace("ErrorSubscriptionNotFound", "ErrorServerBusy")
        .replace(
            "<m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>",
            r#"<m:DescriptiveLinkKey>0</m:DescriptiveLinkKey><m:MessageXml><t:Value Name="BackOffMilliseconds">4500</t:Value></m:MessageXml>"#,
        );
    let batch = parse_streaming_events(busy.as_bytes()).expect("parses");
    let status = &batch.messages[0].status;
    assert_eq!(status.back_off, Some(Duration::from_millis(4500)));
    assert_eq!(
        status.action(),
        Action::BackOff(Duration::from_millis(4500))
    );

    // An id named only in MessageXml counts as an error id, and is not repeated.
    for (named, expected) in [("extra", vec![A, B, "extra"]), (B, vec![A, B])] {
        let changed = body.replace(
            "<m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>",
            &format!(
                r#"<m:MessageXml><t:Value Name="SubscriptionId">{named}</t:Value></m:MessageXml>"#
            ),
        );
        let batch = parse_streaming_events(changed.as_bytes()).expect("parses");
        assert_eq!(batch.messages[0].error_subscription_ids, expected);
    }
}

#[test]
fn fault_is_an_error() {
    let body = fixture("streaming-fault-ErrorServerBusy.xml");
    match parse_streaming_events(body.as_bytes()) {
        Err(EwsError::Fault(fault)) => {
            assert_eq!(fault.response_code.as_deref(), Some("ErrorServerBusy"));
            assert_eq!(fault.back_off, Some(Duration::from_secs(30)));
            assert_eq!(fault.action(), Action::BackOff(Duration::from_secs(30)));
        }
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[test]
fn not_a_streaming_response() {
    for name in [
        "send-notification-events.xml",
        "subscribe-response-streaming.xml",
    ] {
        let body = fixture(name);
        assert!(
            matches!(
                parse_streaming_events(body.as_bytes()),
                Err(EwsError::UnexpectedMessage { .. })
            ),
            "{name}"
        );
    }
    let no_message = fixture("streaming-keepalive.xml").replace(
        "GetStreamingEventsResponseMessage",
        "SomethingElseResponseMessage",
    );
    assert!(matches!(
        parse_streaming_events(no_message.as_bytes()),
        Err(EwsError::MissingElement(
            "m:GetStreamingEventsResponseMessage"
        ))
    ));
    // Two envelopes at once are not one envelope: split them first.
    let two = format!(
        "{}{}",
        fixture("streaming-keepalive.xml"),
        fixture("streaming-closed.xml")
    );
    assert!(parse_streaming_events(two.as_bytes()).is_err());
    // A truncated envelope is refused.
    let body = fixture("streaming-events.xml");
    assert!(parse_streaming_events(&body.as_bytes()[..body.len() / 2]).is_err());
}

#[test]
fn fixtures_match_the_schema_but_for_the_messages_namespace_quirk() {
    let schema = format!(
        "{}/tests/schema/soap-envelope.xsd",
        env!("CARGO_MANIFEST_DIR")
    );
    for name in [
        "streaming-keepalive.xml",
        "streaming-closed.xml",
        "streaming-fault-ErrorServerBusy.xml",
        "subscribe-response-streaming.xml",
        "unsubscribe-response-success.xml",
    ] {
        assert_schema_valid(&fixture(name));
    }
    // Exchange writes m:Notification and m:SubscriptionId where the schema declares t:; with
    // that changed, the rest of each fixture is valid, and as written it is not.
    for name in [
        "streaming-events.xml",
        "streaming-ErrorMissedNotificationEvents.xml",
        "streaming-ErrorSubscriptionNotFound.xml",
    ] {
        let body = fixture(name);
        let schema_shaped = body
            .replace("m:Notification>", "t:Notification>")
            .replace("m:SubscriptionId>", "t:SubscriptionId>");
        assert_schema_valid(&schema_shaped);
        if let Some((ok, _)) = xmllint(&["--noout", "--schema", &schema], &body) {
            assert!(!ok, "{name} unexpectedly valid as written");
        }
    }
}

// ---------------------------------------------------------------- streaming → push

/// The same notification read back from the SendNotification built for it.
fn round_trip(notification: &Notification<'_>) {
    let built =
        send_notification_from_stream(notification, DEFAULT_SERVER_VERSION).expect("builds");
    assert_schema_valid(&built);

    let parsed = parse_send_notification(built.as_bytes()).expect("parses as a push");
    assert_eq!(parsed.messages.len(), 1);
    let message = &parsed.messages[0];
    assert_eq!(message.status.class, ResponseClass::Success);
    assert_eq!(message.status.code.as_deref(), Some("NoError"));
    assert_eq!(
        message.subscription_id.as_deref(),
        Some(&*notification.subscription_id)
    );
    assert_eq!(message.notification.as_ref(), Some(notification));

    let summary = summarize_send_notification(built.as_bytes()).expect("summarizes");
    assert_eq!(summary, parsed.summary());
    assert_eq!(
        summarize_send_notification_slow(built.as_bytes()).expect("slow path"),
        summary
    );
    assert_eq!(
        summary.messages[0].last_watermark.as_deref(),
        notification.last_watermark()
    );
    let mut counts = [0; EventType::ALL.len()];
    for event in &notification.events {
        counts[event.kind.index()] += 1;
    }
    assert_eq!(summary.messages[0].event_counts, counts);
}

#[test]
fn streamed_notifications_become_push_notifications() {
    let body = fixture("streaming-events.xml");
    let batch = parse_streaming_events(body.as_bytes()).expect("parses");
    for notification in batch.notifications() {
        round_trip(notification);
        // Shaped as Exchange writes pushes, so the fast path takes it.
        let built = send_notification_from_stream(notification, "Exchange2013").expect("builds");
        assert!(summarize_send_notification_fast(built.as_bytes()).is_some());
    }
}

#[test]
fn watermarks_previous_watermark_and_more_events_are_carried() {
    // Streaming events may carry watermarks (the schema allows them on every event): with
    // one on each event, and the notification's own fields set, all survive.
    let body = fixture("streaming-events.xml")
        .replace(
            "<t:TimeStamp>2026-11-20T09:41:07Z",
            "<t:Watermark>AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQYwQAAAAAAAAE=</t:Watermark><t:TimeStamp>2026-11-20T09:41:07Z",
        )
        .replace(
            &format!("<t:SubscriptionId>{B}</t:SubscriptionId>"),
            &format!("<t:SubscriptionId>{B}</t:SubscriptionId><t:PreviousWatermark>AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQXwQAAAAAAAAE=</t:PreviousWatermark><t:MoreEvents>true</t:MoreEvents>"),
        )
        .replace(
            "<t:TimeStamp>2026-11-20T09:41:10Z",
            "<t:Watermark>AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQZwQAAAAAAAAE=</t:Watermark><t:TimeStamp>2026-11-20T09:41:10Z",
        );
    let batch = parse_streaming_events(body.as_bytes()).expect("parses");
    let notifications: Vec<_> = batch.notifications().collect();
    assert_eq!(
        notifications[0].last_watermark(),
        Some("AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQYwQAAAAAAAAE=")
    );
    assert!(notifications[1].more_events);
    assert_eq!(
        notifications[1].last_watermark(),
        Some("AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQZwQAAAAAAAAE=")
    );
    for notification in notifications {
        round_trip(notification);
    }
}

#[test]
fn the_push_fixture_round_trips_too() {
    // Every kind of event Exchange pushes, read from the push fixture, rebuilt, read again.
    let body = fixture("send-notification-events.xml");
    let push = parse_send_notification(body.as_bytes()).expect("parses");
    let notification = push.messages[0].notification.as_ref().expect("events");
    round_trip(notification);
    let status = fixture("send-notification-status.xml");
    let push = parse_send_notification(status.as_bytes()).expect("parses");
    round_trip(
        push.messages[0]
            .notification
            .as_ref()
            .expect("status event"),
    );
}

fn event(kind: EventType) -> Event<'static> {
    Event {
        kind,
        watermark: None,
        timestamp: Some(Cow::Borrowed("2026-11-20T09:41:07Z")),
        object: item("item", "ck"),
        parent_folder_id: Some(folder("parent", "ck")),
        old_object: None,
        old_parent_folder_id: None,
        unread_count: None,
    }
}

#[test]
fn awkward_values_are_escaped_and_come_back() {
    let awkward = "a<b>&c\"d'e\r\nf\tg";
    let notification = Notification {
        subscription_id: Cow::Borrowed("id & <more>"),
        previous_watermark: Some(Cow::Borrowed(awkward)),
        more_events: false,
        events: vec![
            Event {
                watermark: Some(Cow::Borrowed(awkward)),
                object: Some(ObjectId::Item(Id {
                    id: Cow::Borrowed(awkward),
                    change_key: Some(Cow::Borrowed(awkward)),
                })),
                ..event(EventType::Created)
            },
            Event {
                old_object: Some(ObjectId::Folder(folder("old\"folder", "ck"))),
                old_parent_folder_id: Some(folder("old-parent", "'")),
                object: Some(ObjectId::Folder(folder("folder", "ck"))),
                ..event(EventType::Copied)
            },
            Event {
                unread_count: Some(7),
                ..event(EventType::Modified)
            },
            Event {
                object: change_key_less(),
                ..event(EventType::FreeBusyChanged)
            },
            Event {
                kind: EventType::Status,
                watermark: Some(Cow::Borrowed("last")),
                timestamp: None,
                object: None,
                parent_folder_id: None,
                old_object: None,
                old_parent_folder_id: None,
                unread_count: None,
            },
        ],
    };
    round_trip(&notification);
}

fn change_key_less() -> Option<ObjectId<'static>> {
    Some(ObjectId::Item(Id {
        id: Cow::Borrowed("no-change-key"),
        change_key: None,
    }))
}

#[test]
fn send_notification_from_stream_refuses_what_push_could_not_carry() {
    let good = Notification {
        subscription_id: Cow::Borrowed(A),
        previous_watermark: None,
        more_events: false,
        events: vec![event(EventType::NewMail)],
    };
    send_notification_from_stream(&good, DEFAULT_SERVER_VERSION).expect("builds");

    let field =
        |n: &Notification<'_>| invalid_field(send_notification_from_stream(n, "Exchange2013"));
    assert_eq!(
        field(&Notification {
            subscription_id: Cow::Borrowed(""),
            ..good.clone()
        }),
        "subscription_id"
    );
    assert_eq!(
        field(&Notification {
            events: vec![],
            ..good.clone()
        }),
        "events"
    );
    assert_eq!(
        field(&Notification {
            previous_watermark: Some(Cow::Borrowed("")),
            ..good.clone()
        }),
        "previous_watermark"
    );
    let with = |event: Event<'static>| Notification {
        events: vec![event],
        ..good.clone()
    };
    assert_eq!(
        field(&with(Event {
            timestamp: None,
            ..event(EventType::Created)
        })),
        "timestamp"
    );
    assert_eq!(
        field(&with(Event {
            object: None,
            ..event(EventType::Deleted)
        })),
        "object"
    );
    assert_eq!(
        field(&with(Event {
            parent_folder_id: None,
            ..event(EventType::Deleted)
        })),
        "parent_folder_id"
    );
    assert_eq!(field(&with(event(EventType::Moved))), "old_object");
    assert_eq!(
        field(&with(Event {
            old_object: item("old", "ck"),
            ..event(EventType::Moved)
        })),
        "old_parent_folder_id"
    );
    assert_eq!(
        field(&with(Event {
            watermark: Some(Cow::Borrowed("\u{0}")),
            ..event(EventType::Created)
        })),
        "watermark"
    );
    assert_eq!(
        field(&with(Event {
            object: Some(ObjectId::Item(Id {
                id: Cow::Borrowed(""),
                change_key: None
            })),
            ..event(EventType::Created)
        })),
        "id"
    );
    assert_eq!(
        invalid_field(send_notification_from_stream(&good, "")),
        "server_version"
    );
}
