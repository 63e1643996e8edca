use crate::fixture;
use graph::subscription::{documented_max_minutes, normalise_resource};
use graph::{
    format_time, mailbox_of, max_lifetime, max_minutes_in_error, parse_error, parse_subscription,
    parse_time, valid_resource, NewSubscription, ParseError, Renewal, CHANGE_TYPES, MIN_LIFETIME,
};
use std::time::Duration;

const MINUTE: u64 = 60;

#[test]
fn new_subscription_body() {
    let t = parse_time("2026-12-10T11:00:00Z").unwrap();
    let change_type = CHANGE_TYPES.join(",");
    let body = NewSubscription {
        change_type: &change_type,
        notification_url: "https://relay.contoso.example/graph/notify",
        lifecycle_notification_url: Some("https://relay.contoso.example/graph/lifecycle"),
        resource: "users/room@contoso.example/events",
        expiration_date_time: t,
        client_state: "s3cr3t",
    };
    assert_eq!(
        serde_json::to_string(&body).unwrap(),
        concat!(
            r#"{"changeType":"created,updated,deleted","#,
            r#""notificationUrl":"https://relay.contoso.example/graph/notify","#,
            r#""lifecycleNotificationUrl":"https://relay.contoso.example/graph/lifecycle","#,
            r#""resource":"users/room@contoso.example/events","#,
            r#""expirationDateTime":"2026-12-10T11:00:00.0000000Z","clientState":"s3cr3t"}"#
        )
    );
    let without = NewSubscription {
        lifecycle_notification_url: None,
        ..body
    };
    assert!(!serde_json::to_string(&without)
        .unwrap()
        .contains("lifecycle"));
}

#[test]
fn renewal_body() {
    let t = parse_time("2026-12-10T11:00:00.5Z").unwrap();
    assert_eq!(
        serde_json::to_string(&Renewal {
            expiration_date_time: t
        })
        .unwrap(),
        r#"{"expirationDateTime":"2026-12-10T11:00:00.5000000Z"}"#
    );
}

#[test]
fn subscription_answer() {
    let s = parse_subscription(fixture("subscription_created.json").as_bytes()).unwrap();
    assert_eq!(s.id, "7f105c7d-2dc5-4530-97cd-4e7ae6534c07");
    assert_eq!(
        s.resource.as_deref(),
        Some("users/room@contoso.example/events")
    );
    assert_eq!(s.change_type.as_deref(), Some("created,updated,deleted"));
    assert_eq!(s.client_state.as_deref(), Some("s3cr3t-for-room-42"));
    assert_eq!(
        s.lifecycle_notification_url.as_deref(),
        Some("https://relay.contoso.example/graph/lifecycle")
    );
    assert_eq!(
        format_time(s.expiration_date_time),
        "2026-12-10T11:00:00.0000000Z"
    );
    // Minimal renewal answer with an offset and nulls.
    let s = parse_subscription(
        br#"{"id":"x","expirationDateTime":"2026-12-10T03:00:00-08:00","clientState":null}"#,
    )
    .unwrap();
    assert_eq!(
        format_time(s.expiration_date_time),
        "2026-12-10T11:00:00.0000000Z"
    );
    assert_eq!(s.client_state, None);
}

#[test]
fn subscription_answer_errors() {
    assert!(matches!(
        parse_subscription(b"{"),
        Err(ParseError::NotJson { .. })
    ));
    for body in [
        r#"{"expirationDateTime":"2026-12-10T11:00:00Z"}"#,
        r#"{"id":"x"}"#,
        r#"{"id":"x","expirationDateTime":"soon"}"#,
        r#"{"id":1,"expirationDateTime":"2026-12-10T11:00:00Z"}"#,
        r#"[]"#,
    ] {
        assert!(
            matches!(
                parse_subscription(body.as_bytes()),
                Err(ParseError::NotASubscription(_))
            ),
            "{body}"
        );
    }
}

#[test]
fn error_bodies() {
    let e = parse_error(fixture("error_expiration.json").as_bytes()).unwrap();
    assert_eq!(e.code, "ExtensionError");
    assert_eq!(max_minutes_in_error(&e.message), Some(10070));
    let e = parse_error(
        br#"{"error":{"code":"ResourceNotFound","message":"The object was not found."}}"#,
    )
    .unwrap();
    assert_eq!(e.code, "ResourceNotFound");
    assert!(parse_error(b"<html>502</html>").is_none());
    assert!(parse_error(br#"{"value":[]}"#).is_none());
    assert!(parse_error(br#"{"error":"nope"}"#).is_none());
}

#[test]
fn max_minutes_from_real_wordings() {
    // Graph's refusal, as reported in microsoftgraph/microsoft-graph-docs#2988 (2018).
    assert_eq!(
        max_minutes_in_error("Subscription expiration can only be 4230 minutes in the future."),
        Some(4230)
    );
    // The same sentence for Outlook resources since the 7-day limit.
    assert_eq!(
        max_minutes_in_error("Subscription expiration can only be 10070 minutes in the future."),
        Some(10070)
    );
    assert_eq!(
        max_minutes_in_error("Subscription expiration can only be 60 minutes in the future."),
        Some(60)
    );
    // Tolerant of a thousands separator and a reworded sentence.
    assert_eq!(
        max_minutes_in_error("The expiration date must be at most 10,080 minutes from now."),
        Some(10080)
    );
    // Not about expiration, or no minutes: None.
    assert_eq!(max_minutes_in_error("Throttled for 5 minutes."), None);
    assert_eq!(
        max_minutes_in_error("Subscription validation request failed. Response must exactly match validationToken query parameter."),
        None
    );
    assert_eq!(
        max_minutes_in_error("Subscription expiration is too far."),
        None
    );
    assert_eq!(
        max_minutes_in_error("Subscription expiration v2 minutesque"),
        None
    );
}

#[test]
fn lifetimes_per_resource() {
    for r in [
        "users/room@contoso.example/events",
        "/users/x/mailFolders('inbox')/messages",
        "users/x/messages",
        "me/events",
        "users/x/contacts",
        "Users/x/calendars/y/events",
        "groups/g/events",
    ] {
        assert_eq!(max_lifetime(r), Duration::from_secs(10070 * MINUTE), "{r}");
    }
    assert_eq!(documented_max_minutes("users"), 41760);
    assert_eq!(documented_max_minutes("groups"), 41760);
    assert_eq!(documented_max_minutes("me/drive/root"), 42300);
    assert_eq!(documented_max_minutes("sites/s/lists/l"), 42300);
    assert_eq!(documented_max_minutes("security/alerts?$filter=x"), 43200);
    assert_eq!(documented_max_minutes("communications/presences/u"), 60);
    assert_eq!(documented_max_minutes("teams/t/channels/c/messages"), 60);
    assert_eq!(documented_max_minutes("chats/getAllMessages"), 60);
    assert_eq!(documented_max_minutes("groups/g/conversations"), 4230);
    assert_eq!(documented_max_minutes("groups/g/threads/t/posts"), 4230);
    assert_eq!(documented_max_minutes("communications/callRecords"), 4230);
    assert_eq!(
        documented_max_minutes("contacts"),
        41760,
        "organisational contacts"
    );
    assert_eq!(documented_max_minutes("me/todo/lists/l/tasks"), 4230);
    assert_eq!(
        max_lifetime("something/new"),
        Duration::from_secs(4220 * MINUTE)
    );
    // Never under Graph's own floor.
    assert_eq!(
        max_lifetime("communications/presences/u"),
        Duration::from_secs(50 * MINUTE)
    );
    assert!(max_lifetime("communications/presences/u") >= MIN_LIFETIME);
    assert_eq!(MIN_LIFETIME, Duration::from_secs(45 * MINUTE));
}

#[test]
fn mailboxes() {
    assert_eq!(
        mailbox_of("users/room@contoso.example/events"),
        Some("room@contoso.example")
    );
    assert_eq!(
        mailbox_of("/users/5b6f1a2c/mailFolders('inbox')/messages"),
        Some("5b6f1a2c")
    );
    assert_eq!(
        mailbox_of("Users/A@B.example/Messages"),
        Some("A@B.example")
    );
    assert_eq!(mailbox_of("USERS/x/events"), Some("x"));
    assert_eq!(mailbox_of("me/events"), None);
    assert_eq!(mailbox_of("users"), None);
    assert_eq!(mailbox_of("users//events"), None);
    assert_eq!(mailbox_of("groups/g/events"), None);
    assert_eq!(mailbox_of("usersx/y/events"), None);
}

#[test]
fn resources() {
    for ok in [
        "users/room@contoso.example/events",
        "users/x/mailFolders('inbox')/messages",
        "/users/x/events",
        "me/events",
    ] {
        assert_eq!(valid_resource(ok), Ok(()), "{ok}");
    }
    for bad in [
        "",
        "/",
        "https://graph.microsoft.com/v1.0/users/x/events",
        "HTTPS://graph.microsoft.com/v1.0/users/x/events",
        "http://x/users",
        "users/x y/events",
        "users/x\t/events",
        "users/x/events\n",
        "users/x/events\u{7f}",
        "users/x/events?$select=id",
        "users/x/events#frag",
    ] {
        assert!(valid_resource(bad).is_err(), "{bad:?}");
    }
    assert!(valid_resource(&format!("users/{}", "x".repeat(1018))).is_ok());
    assert!(valid_resource(&format!("users/{}", "x".repeat(1019))).is_err());
    assert_eq!(normalise_resource("/users/x/events"), "users/x/events");
    assert_eq!(normalise_resource("users/x/events"), "users/x/events");
}
