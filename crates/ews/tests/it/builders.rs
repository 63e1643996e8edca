//! What the module builds: the same as the fixtures, valid against Microsoft's schema, and
//! refused when the input would make Exchange refuse the request.
//!
//! Schema validation: `xmllint --schema tests/schema/messages.xsd` validates one EWS element
//! as a document root, not a SOAP envelope, and cutting the body element out of an envelope
//! loses the namespace declarations made on the envelope. So the tests validate the whole
//! envelope against `tests/schema/soap-envelope.xsd`, a small SOAP 1.1 schema that imports
//! `messages.xsd` (and through it `types.xsd`) and checks header and body children strictly:
//! `t:RequestServerVersion` and `t:ExchangeImpersonation` as well as `m:Subscribe`. There is
//! no Autodiscover schema in tests/schema, so `GetUserSettings` is checked for being
//! well-formed and equal to the fixture Microsoft's documentation shape was copied into.

use std::io::Write;
use std::process::Command;

use ews::{
    build_get_user_settings, build_subscribe, parse_send_notification_result,
    send_notification_result, EventType, EwsError, Folders, GetUserSettingsRequest,
    SubscribeRequest, SubscriptionStatus, DEFAULT_SERVER_VERSION, MAX_AUTODISCOVER_USERS,
};

pub(crate) fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// White space between tags dropped, runs of it elsewhere made one space: the builders write
/// compact XML, the fixtures are indented.
pub(crate) fn normalize(xml: &str) -> String {
    xml.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("> <", "><")
}

/// Runs `xmllint` with `args` on `xml`; `None` (after saying so) when xmllint is missing.
pub(crate) fn xmllint(args: &[&str], xml: &str) -> Option<(bool, String)> {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(xml.as_bytes()).expect("write temp file");
    let output = match Command::new("xmllint").args(args).arg(file.path()).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: xmllint not found (Debian: apt-get install libxml2-utils)");
            return None;
        }
        Err(e) => panic!("running xmllint: {e}"),
    };
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Some((output.status.success(), text))
}

/// Validates a whole SOAP envelope against Microsoft's schema (see the module comment).
pub(crate) fn assert_schema_valid(xml: &str) {
    let schema = format!(
        "{}/tests/schema/soap-envelope.xsd",
        env!("CARGO_MANIFEST_DIR")
    );
    if let Some((ok, output)) = xmllint(&["--noout", "--schema", &schema], xml) {
        assert!(ok, "schema validation failed:\n{output}\n{xml}");
    }
}

/// The string value of the first element named `local` in any namespace, as xmllint reads it.
pub(crate) fn xpath_value(xml: &str, local: &str) -> Option<String> {
    let expr = format!("string(//*[local-name()='{local}'])");
    xmllint(&["--xpath", &expr], xml).map(|(ok, out)| {
        assert!(ok, "xmllint --xpath failed: {out}");
        out.strip_suffix('\n').unwrap_or(&out).to_string()
    })
}

fn fixture_subscribe() -> SubscribeRequest<'static> {
    SubscribeRequest {
        server_version: DEFAULT_SERVER_VERSION,
        mailbox: "room-4.12@contoso.example",
        folders: Folders::Distinguished(&["calendar"]),
        event_types: &[
            EventType::Created,
            EventType::Modified,
            EventType::Deleted,
            EventType::Moved,
        ],
        watermark: Some("AQAAAOpvG0LURVdOhQkPOWZLPcJGVQUAAAAAAAE="),
        status_frequency: 1,
        url: "https://relay.contoso.example/ews/k7QeX2vT9mRw",
    }
}

#[test]
fn subscribe_is_the_fixture() {
    let built = build_subscribe(&fixture_subscribe()).expect("builds");
    assert_eq!(
        normalize(&built),
        normalize(&fixture("subscribe-push-request.xml"))
    );
    assert_schema_valid(&built);
}

#[test]
fn subscribe_variants_validate_against_the_schema() {
    let all_events = &EventType::ALL[..7];
    let variants = [
        SubscribeRequest {
            folders: Folders::All,
            watermark: None,
            ..fixture_subscribe()
        },
        SubscribeRequest {
            server_version: "V2017_07_11",
            folders: Folders::Distinguished(&["inbox", "calendar", "deleteditems"]),
            event_types: all_events,
            status_frequency: 1440,
            url: "http://10.0.0.1:8080/callback?mailbox=a&b=<c>",
            ..fixture_subscribe()
        },
        SubscribeRequest {
            mailbox: "o'brien&\"co\"@contoso.example",
            event_types: &[EventType::NewMail],
            watermark: Some("a<b>&c"),
            ..fixture_subscribe()
        },
    ];
    for request in &variants {
        let built = build_subscribe(request).expect("builds");
        assert_schema_valid(&built);
    }

    // Folders::All: the attribute and no FolderIds, as the schema wants.
    let all = build_subscribe(&variants[0]).expect("builds");
    assert!(
        all.contains(r#"<m:PushSubscriptionRequest SubscribeToAllFolders="true"><t:EventTypes>"#)
    );
    assert!(!all.contains("FolderIds") && !all.contains("<t:Watermark>"));
}

/// Build, then read back with xmllint: what went in comes out, escaping undone.
#[test]
fn subscribe_round_trips_through_xmllint() {
    let request = SubscribeRequest {
        mailbox: "o'brien&\"co\"@contoso.example",
        watermark: Some("a<b>&c"),
        url: "https://relay.example/cb?x=1&y=<2>",
        status_frequency: 30,
        ..fixture_subscribe()
    };
    let built = build_subscribe(&request).expect("builds");
    for (element, expected) in [
        ("SmtpAddress", request.mailbox),
        ("Watermark", "a<b>&c"),
        ("URL", request.url),
        ("StatusFrequency", "30"),
    ] {
        if let Some(value) = xpath_value(&built, element) {
            assert_eq!(value, expected, "{element}");
        }
    }
}

#[test]
fn subscribe_refuses_what_exchange_would() {
    let base = fixture_subscribe();
    let long_url = format!("https://relay.example/{}", "a".repeat(2083));
    let cases: Vec<(SubscribeRequest, &str)> = vec![
        (
            SubscribeRequest {
                status_frequency: 0,
                ..base
            },
            "status_frequency",
        ),
        (
            SubscribeRequest {
                status_frequency: 1441,
                ..base
            },
            "status_frequency",
        ),
        (
            SubscribeRequest {
                url: "ftp://relay.example/cb",
                ..base
            },
            "url",
        ),
        (
            SubscribeRequest {
                url: "relay.example/cb",
                ..base
            },
            "url",
        ),
        (
            SubscribeRequest {
                url: "https://",
                ..base
            },
            "url",
        ),
        (
            SubscribeRequest {
                url: "https://relay.example/a b",
                ..base
            },
            "url",
        ),
        (
            SubscribeRequest {
                url: &long_url,
                ..base
            },
            "url",
        ),
        (
            SubscribeRequest {
                event_types: &[],
                ..base
            },
            "event_types",
        ),
        (
            SubscribeRequest {
                event_types: &[EventType::NewMail, EventType::Status],
                ..base
            },
            "event_types",
        ),
        (
            SubscribeRequest {
                folders: Folders::Distinguished(&[]),
                ..base
            },
            "folders",
        ),
        (
            SubscribeRequest {
                folders: Folders::Distinguished(&["Inbox\"/><x"]),
                ..base
            },
            "folders",
        ),
        (
            SubscribeRequest {
                mailbox: "",
                ..base
            },
            "mailbox",
        ),
        (
            SubscribeRequest {
                mailbox: "no-at-sign",
                ..base
            },
            "mailbox",
        ),
        (
            SubscribeRequest {
                mailbox: "a\u{1}@b",
                ..base
            },
            "mailbox",
        ),
        (
            SubscribeRequest {
                watermark: Some(""),
                ..base
            },
            "watermark",
        ),
        (
            SubscribeRequest {
                watermark: Some("\u{0}"),
                ..base
            },
            "watermark",
        ),
        (
            SubscribeRequest {
                server_version: "",
                ..base
            },
            "server_version",
        ),
        (
            SubscribeRequest {
                server_version: "Exchange2013\"",
                ..base
            },
            "server_version",
        ),
    ];
    for (request, field) in cases {
        match build_subscribe(&request) {
            Err(EwsError::InvalidInput { field: f, .. }) => assert_eq!(f, field, "{request:?}"),
            other => panic!("{request:?}: expected InvalidInput({field}), got {other:?}"),
        }
    }
    // The bounds themselves are fine.
    let url = format!("https://relay.example/{}", "a".repeat(2082 - 22));
    assert_eq!(url.len(), 2082);
    assert!(build_subscribe(&SubscribeRequest { url: &url, ..base }).is_ok());
    assert!(build_subscribe(&SubscribeRequest {
        status_frequency: 1440,
        ..base
    })
    .is_ok());
}

#[test]
fn send_notification_results_validate() {
    for status in [SubscriptionStatus::Ok, SubscriptionStatus::Unsubscribe] {
        let built = send_notification_result(status);
        assert_schema_valid(built);
        assert_eq!(
            parse_send_notification_result(built.as_bytes()).ok(),
            Some(status)
        );
    }
}

fn fixture_get_user_settings() -> GetUserSettingsRequest<'static> {
    GetUserSettingsRequest {
        server_version: DEFAULT_SERVER_VERSION,
        url: "https://autodiscover-s.outlook.com/autodiscover/autodiscover.svc",
        mailboxes: &["room-4.12@contoso.example", "room-4.14@contoso.example"],
    }
}

#[test]
fn get_user_settings_is_the_fixture() {
    let built = build_get_user_settings(&fixture_get_user_settings()).expect("builds");
    assert_eq!(
        normalize(&built),
        normalize(&fixture("getusersettings-request.xml"))
    );
    // No Autodiscover schema to validate against: check it is well-formed XML at least.
    if let Some((ok, output)) = xmllint(&["--noout"], &built) {
        assert!(ok, "{output}");
    }
}

#[test]
fn get_user_settings_refuses_bad_input() {
    let base = fixture_get_user_settings();
    let many: Vec<&str> = vec!["a@b.example"; MAX_AUTODISCOVER_USERS + 1];
    let cases: Vec<(GetUserSettingsRequest, &str)> = vec![
        (
            GetUserSettingsRequest {
                mailboxes: &[],
                ..base
            },
            "mailboxes",
        ),
        (
            GetUserSettingsRequest {
                mailboxes: &many,
                ..base
            },
            "mailboxes",
        ),
        (
            GetUserSettingsRequest {
                mailboxes: &["nobody"],
                ..base
            },
            "mailboxes",
        ),
        (
            GetUserSettingsRequest {
                url: "autodiscover.example",
                ..base
            },
            "url",
        ),
        (
            GetUserSettingsRequest {
                server_version: "2013 SP1",
                ..base
            },
            "server_version",
        ),
    ];
    for (request, field) in cases {
        match build_get_user_settings(&request) {
            Err(EwsError::InvalidInput { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected InvalidInput({field}), got {other:?}"),
        }
    }
    let hundred = &many[..MAX_AUTODISCOVER_USERS];
    assert!(build_get_user_settings(&GetUserSettingsRequest {
        mailboxes: hundred,
        ..base
    })
    .is_ok());
}

/// The validation above is not vacuous: out-of-order or out-of-range content fails it.
#[test]
fn schema_validation_catches_mistakes() {
    let built = build_subscribe(&fixture_subscribe()).expect("builds");
    let schema = format!(
        "{}/tests/schema/soap-envelope.xsd",
        env!("CARGO_MANIFEST_DIR")
    );
    let swapped = built.replace(
        "<t:StatusFrequency>1</t:StatusFrequency><t:URL>https://relay.contoso.example/ews/k7QeX2vT9mRw</t:URL>",
        "<t:URL>https://relay.contoso.example/ews/k7QeX2vT9mRw</t:URL><t:StatusFrequency>1</t:StatusFrequency>",
    );
    let status_event = built.replace(
        "<t:EventType>MovedEvent</t:EventType>",
        "<t:EventType>StatusEvent</t:EventType>",
    );
    let no_impersonation_sid = built.replace("t:ConnectingSID>", "t:ConnectingSid>");
    for broken in [swapped, status_event, no_impersonation_sid] {
        assert_ne!(broken, built);
        if let Some((ok, _)) = xmllint(&["--noout", "--schema", &schema], &broken) {
            assert!(!ok, "should not validate:\n{broken}");
        }
    }
}
