//! Responses the subscription manager receives (Subscribe, faults, Autodiscover) parse to the
//! values in the fixtures, and every response code maps to the action PROTOCOL.md asks for.

use std::time::Duration;

use ews::{
    classify, parse_fault, parse_get_user_settings_response, parse_send_notification,
    parse_subscribe_response, Action, EwsError, Redirect, ResponseClass,
};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn subscribe_success() {
    let body = fixture("subscribe-response-success.xml");
    let response = parse_subscribe_response(body.as_bytes()).expect("parses");
    assert_eq!(response.status.class, ResponseClass::Success);
    assert_eq!(response.status.code.as_deref(), Some("NoError"));
    assert_eq!(response.status.action(), Action::Success);
    assert_eq!(
        response.subscription_id.as_deref(),
        Some("JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAACkGm2Fhz9CTYx5mQ9Xh3l0")
    );
    assert_eq!(
        response.watermark.as_deref(),
        Some("AQAAAOpvG0LURVdOhQkPOWZLPcJFVQUAAAAAAAE=")
    );
}

#[test]
fn subscribe_errors() {
    for (code, action) in [
        ("ErrorInvalidWatermark", Action::ResubscribeWithoutWatermark),
        ("ErrorProxyRequestNotAllowed", Action::Rediscover),
        ("ErrorNonExistentMailbox", Action::Permanent),
    ] {
        let body = fixture(&format!("subscribe-response-{code}.xml"));
        let response = parse_subscribe_response(body.as_bytes()).expect("parses");
        assert_eq!(response.status.class, ResponseClass::Error, "{code}");
        assert_eq!(response.status.code.as_deref(), Some(code));
        let text = format!("The request failed: {code}.");
        assert_eq!(response.status.message_text.as_deref(), Some(text.as_str()));
        assert_eq!(response.status.action(), action, "{code}");
        assert_eq!(response.subscription_id, None);
        assert_eq!(response.watermark, None);
    }
}

#[test]
fn success_without_a_subscription_id_is_refused() {
    let body = fixture("subscribe-response-success.xml").replace(
        "<m:SubscriptionId>JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAACkGm2Fhz9CTYx5mQ9Xh3l0</m:SubscriptionId>",
        "",
    );
    assert!(matches!(
        parse_subscribe_response(body.as_bytes()),
        Err(EwsError::MissingElement("m:SubscriptionId"))
    ));
}

#[test]
fn server_busy_fault() {
    let body = fixture("fault-server-busy.xml");
    let fault = parse_fault(body.as_bytes()).expect("parses");
    assert_eq!(fault.code, "a:ErrorServerBusy");
    assert_eq!(
        fault.message,
        "The server cannot service this request right now. Try again later."
    );
    assert_eq!(fault.response_code.as_deref(), Some("ErrorServerBusy"));
    assert_eq!(fault.back_off, Some(Duration::from_millis(2500)));
    assert_eq!(fault.action(), Action::BackOff(Duration::from_millis(2500)));

    // Where a Subscribe response was expected, the fault comes back as the error.
    match parse_subscribe_response(body.as_bytes()) {
        Err(EwsError::Fault(f)) => assert_eq!(*f, fault),
        other => panic!("expected a fault, got {other:?}"),
    }
    assert!(matches!(
        parse_get_user_settings_response(body.as_bytes()),
        Err(EwsError::Fault(_))
    ));
    assert!(matches!(
        parse_send_notification(body.as_bytes()),
        Err(EwsError::Fault(_))
    ));
}

#[test]
fn faults_without_detail_classify_by_fault_code() {
    let fault = |code: &str| {
        format!(
            r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>
               <faultcode>{code}</faultcode><faultstring>x</faultstring></s:Fault></s:Body></s:Envelope>"#
        )
    };
    let action = |code: &str| {
        parse_fault(fault(code).as_bytes())
            .expect("parses")
            .action()
    };
    assert_eq!(action("s:Server"), Action::Transient);
    assert_eq!(action("a:ErrorInvalidSubscription"), Action::Resubscribe);
    assert_eq!(action("s:Client"), Action::Permanent);
    // ErrorServerBusy without BackOffMilliseconds: back off the ordinary way.
    assert_eq!(action("a:ErrorServerBusy"), Action::Transient);

    let no_string = r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>
        <faultcode>s:Server</faultcode></s:Fault></s:Body></s:Envelope>"#;
    assert!(matches!(
        parse_fault(no_string.as_bytes()),
        Err(EwsError::MissingElement("faultstring"))
    ));
}

#[test]
fn get_user_settings_response() {
    let body = fixture("getusersettings-response.xml");
    let response = parse_get_user_settings_response(body.as_bytes()).expect("parses");
    assert_eq!(response.error_code.as_deref(), Some("NoError"));
    assert_eq!(response.error_message, None);
    assert_eq!(response.users.len(), 2);

    let found = &response.users[0];
    assert_eq!(found.error_code.as_deref(), Some("NoError"));
    assert_eq!(found.error_message.as_deref(), Some("No error."));
    assert_eq!(
        found.external_ews_url.as_deref(),
        Some("https://outlook.office365.com/EWS/Exchange.asmx")
    );
    assert_eq!(found.grouping_information.as_deref(), Some("AM3PR05"));
    assert_eq!(found.redirect, None);

    let invalid = &response.users[1];
    assert_eq!(invalid.error_code.as_deref(), Some("InvalidUser"));
    assert_eq!(
        invalid.error_message.as_deref(),
        Some("Invalid user: 'room-4.14@contoso.example'")
    );
    assert_eq!(invalid.external_ews_url, None);
    assert_eq!(invalid.grouping_information, None);
    assert_eq!(invalid.redirect, None);
}

#[test]
fn get_user_settings_redirects() {
    let original = fixture("getusersettings-response.xml");
    let redirected = |code: &str, target: &str| {
        let body = original
            .replace("<ErrorCode>InvalidUser</ErrorCode>", &format!("<ErrorCode>{code}</ErrorCode>"))
            .replace(
                "<ErrorMessage>Invalid user: 'room-4.14@contoso.example'</ErrorMessage>\n            <RedirectTarget i:nil=\"true\"/>",
                &format!("<ErrorMessage>Redirect.</ErrorMessage><RedirectTarget>{target}</RedirectTarget>"),
            );
        let response = parse_get_user_settings_response(body.as_bytes()).expect("parses");
        response.users[1].redirect.clone().map(|r| match r {
            Redirect::Address(a) => format!("address {a}"),
            Redirect::Url(u) => format!("url {u}"),
        })
    };
    assert_eq!(
        redirected("RedirectAddress", "room-4.14@fabrikam.example").as_deref(),
        Some("address room-4.14@fabrikam.example")
    );
    assert_eq!(
        redirected(
            "RedirectUrl",
            "https://autodiscover.fabrikam.example/autodiscover/autodiscover.svc"
        )
        .as_deref(),
        Some("url https://autodiscover.fabrikam.example/autodiscover/autodiscover.svc")
    );
}

#[test]
fn a_response_of_another_kind_is_unexpected() {
    let body = fixture("subscribe-response-success.xml");
    match parse_get_user_settings_response(body.as_bytes()) {
        Err(EwsError::UnexpectedMessage { expected, found }) => {
            assert_eq!(expected, "GetUserSettingsResponseMessage");
            assert_eq!(found, "SubscribeResponse");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        parse_subscribe_response(fixture("send-notification-status.xml").as_bytes()),
        Err(EwsError::UnexpectedMessage { .. })
    ));
}

/// PROTOCOL.md's table, row by row.
#[test]
fn classification_follows_the_protocol_table() {
    let busy = Some(Duration::from_millis(2500));
    assert_eq!(classify("NoError", None), Action::Success);
    assert_eq!(
        classify("ErrorServerBusy", busy),
        Action::BackOff(Duration::from_millis(2500))
    );
    assert_eq!(classify("ErrorServerBusy", None), Action::Transient);
    for code in ["ErrorProxyRequestNotAllowed", "ErrorReadEventsFailed"] {
        assert_eq!(classify(code, None), Action::Rediscover, "{code}");
    }
    assert_eq!(
        classify("ErrorInvalidWatermark", None),
        Action::ResubscribeWithoutWatermark
    );
    for code in [
        "ErrorSubscriptionNotFound",
        "ErrorExpiredSubscription",
        "ErrorInvalidSubscription",
    ] {
        assert_eq!(classify(code, None), Action::Resubscribe, "{code}");
    }
    for code in [
        "ErrorMailboxMoveInProgress",
        "ErrorInternalServerTransientError",
        "ErrorConnectionFailed",
        "ErrorTimeoutExpired",
    ] {
        assert_eq!(classify(code, None), Action::Transient, "{code}");
    }
    for code in [
        "ErrorNonExistentMailbox",
        "ErrorImpersonateUserDenied",
        "ErrorSubscriptionAccessDenied",
        "ErrorInvalidPushSubscriptionUrl",
        "ErrorExceededSubscriptionCount",
        // Unknown codes: reported and retried rarely, never hammered.
        "ErrorSomethingNew",
        "",
    ] {
        assert_eq!(classify(code, busy), Action::Permanent, "{code}");
    }
}
