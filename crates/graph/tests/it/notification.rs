use crate::fixture;
use graph::notification::{ItemProblem, MAX_ITEMS};
use graph::{format_time, parse_collection, LifecycleEvent, ParseError};

fn err(body: &str) -> ParseError {
    match parse_collection(body.as_bytes()) {
        Ok(c) => panic!("accepted {body:?}: {c:?}"),
        Err(e) => e,
    }
}

fn item_problem(body: &str) -> (usize, ItemProblem) {
    match err(body) {
        ParseError::Item { item, problem } => (item, problem),
        other => panic!("{other}"),
    }
}

const OK_ITEM: &str = r#"{"subscriptionId":"s","changeType":"created"}"#;

#[test]
fn single_created_item() {
    let c = parse_collection(fixture("change_created.json").as_bytes()).unwrap();
    assert_eq!(c.items.len(), 1);
    let n = &c.items[0];
    assert_eq!(n.subscription_id, "7f105c7d-2dc5-4530-97cd-4e7ae6534c07");
    assert_eq!(n.client_state.as_deref(), Some("s3cr3t-for-room-42"));
    assert_eq!(n.change_type.as_deref(), Some("created"));
    assert_eq!(
        n.resource.as_deref(),
        Some("Users/5b6f1a2c-0e27-4b0c-9a1e-2d3f4a5b6c7d/Messages/AAMkAGUwNjQ4ZjIxAAA=")
    );
    assert_eq!(
        n.tenant_id.as_deref(),
        Some("84bd8158-6d4d-4958-8b9f-9d6445542f95")
    );
    assert_eq!(n.lifecycle_event, None);
    assert_eq!(
        format_time(n.subscription_expiration.unwrap()),
        "2026-12-10T11:00:00.0000000Z"
    );
}

#[test]
fn items_for_two_subscriptions_keep_their_order() {
    let c = parse_collection(fixture("two_subscriptions.json").as_bytes()).unwrap();
    let ids: Vec<_> = c.items.iter().map(|n| n.subscription_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa",
            "bbbbbbbb-2222-4222-8222-bbbbbbbbbbbb",
            "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa"
        ]
    );
    let types: Vec<_> = c
        .items
        .iter()
        .map(|n| n.change_type.as_deref().unwrap())
        .collect();
    assert_eq!(types, ["updated", "deleted", "created"]);
    assert_eq!(c.items[1].client_state.as_deref(), Some("state-B"));
    // "-08:00" offset and two fractional digits, as Graph may send them.
    assert_eq!(
        format_time(c.items[0].subscription_expiration.unwrap()),
        "2026-12-10T11:00:00.0000000Z"
    );
    assert_eq!(
        format_time(c.items[1].subscription_expiration.unwrap()),
        "2026-12-09T18:30:00.9500000Z"
    );
}

#[test]
fn lifecycle_items_of_each_kind() {
    for (file, event) in [
        (
            "lifecycle_reauthorizationRequired.json",
            LifecycleEvent::ReauthorizationRequired,
        ),
        (
            "lifecycle_subscriptionRemoved.json",
            LifecycleEvent::SubscriptionRemoved,
        ),
        ("lifecycle_missed.json", LifecycleEvent::Missed),
    ] {
        let c = parse_collection(fixture(file).as_bytes()).unwrap();
        let n = &c.items[0];
        assert_eq!(n.lifecycle_event.as_ref(), Some(&event), "{file}");
        assert_eq!(n.change_type, None);
        assert_eq!(n.client_state.as_deref(), Some("s3cr3t-for-room-42"));
        assert!(n.for_receiver().contains(event.as_str()));
    }
    let c = parse_collection(br#"{"value":[{"subscriptionId":"s","lifecycleEvent":"newThing"}]}"#)
        .unwrap();
    assert_eq!(
        c.items[0].lifecycle_event,
        Some(LifecycleEvent::Other("newThing".into()))
    );
}

#[test]
fn unknown_keys_and_rich_notifications_are_accepted() {
    let c = parse_collection(fixture("rich_with_validation_tokens.json").as_bytes()).unwrap();
    assert_eq!(c.items.len(), 1);
    assert!(c.items[0].for_receiver().contains("encryptedContent"));
}

#[test]
fn for_receiver_drops_client_state_and_keeps_everything_else_in_order() {
    let c = parse_collection(fixture("change_created.json").as_bytes()).unwrap();
    let out = c.items[0].for_receiver();
    assert!(!out.contains("clientState"), "{out}");
    assert!(!out.contains("s3cr3t"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 7);
    assert_eq!(
        obj["resourceData"]["@odata.etag"],
        "W/\"CQAAABYAAADkrWGo7bouTKlsgTZMr9KwAAAUWRHf\""
    );
    // Graph's key order, checked on the text (serde_json::Map may sort).
    let keys = [
        "\"id\"",
        "\"subscriptionId\"",
        "\"subscriptionExpirationDateTime\"",
        "\"changeType\"",
        "\"resource\"",
        "\"tenantId\"",
        "\"resourceData\"",
    ];
    let positions: Vec<usize> = keys.iter().map(|k| out.find(k).unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{out}");
    // clientState last in two_subscriptions: no dangling comma.
    let c = parse_collection(fixture("two_subscriptions.json").as_bytes()).unwrap();
    for n in &c.items {
        let out = n.for_receiver();
        assert!(!out.contains("clientState"), "{out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap();
    }
}

#[test]
fn for_receiver_drops_an_escaped_client_state_key_too() {
    let body = r#"{"value":[{"subscriptionId":"s","changeType":"created","client\u0053tate":"x","n":1.50}]}"#;
    let c = parse_collection(body.as_bytes()).unwrap();
    assert_eq!(c.items[0].client_state.as_deref(), Some("x"));
    assert_eq!(
        c.items[0].for_receiver(),
        r#"{"subscriptionId":"s","changeType":"created","n":1.50}"#
    );
}

#[test]
fn for_receiver_without_client_state_is_the_item() {
    let c = parse_collection(format!(r#"{{"value":[{OK_ITEM}]}}"#).as_bytes()).unwrap();
    assert_eq!(c.items[0].for_receiver(), OK_ITEM);
    assert_eq!(c.items[0].raw(), OK_ITEM);
}

#[test]
fn not_json() {
    for body in ["", "{", "{\"value\": [}", "nope", "\u{feff}{}"] {
        assert!(matches!(err(body), ParseError::NotJson { .. }), "{body:?}");
    }
    let e = err("{\"value\"  x");
    assert!(
        e.to_string().starts_with("not JSON at line 1 column "),
        "{e}"
    );
}

#[test]
fn trailing_garbage() {
    let body = format!(r#"{{"value":[{OK_ITEM}]}} x"#);
    let e = err(&body);
    assert!(matches!(e, ParseError::NotJson { .. }), "{e}");
    assert!(e.to_string().contains("trailing characters"), "{e}");
    // Two documents back to back are garbage too.
    let body = format!(r#"{{"value":[{OK_ITEM}]}}{{}}"#);
    assert!(matches!(err(&body), ParseError::NotJson { .. }));
    // Trailing whitespace is fine.
    parse_collection(format!("{{\"value\":[{OK_ITEM}]}}\r\n").as_bytes()).unwrap();
}

#[test]
fn not_object() {
    for body in ["[]", "\"value\"", "1", "null", "true"] {
        assert!(matches!(err(body), ParseError::NotObject), "{body}");
    }
    assert_eq!(err("[]").to_string(), "not a JSON object");
}

#[test]
fn no_value() {
    assert!(matches!(err("{}"), ParseError::NoValue));
    assert!(matches!(err(r#"{"Value":[]}"#), ParseError::NoValue));
    assert_eq!(err("{}").to_string(), "no `value` array");
}

#[test]
fn value_not_array() {
    for body in [r#"{"value":{}}"#, r#"{"value":null}"#, r#"{"value":"[]"}"#] {
        assert!(matches!(err(body), ParseError::ValueNotArray), "{body}");
    }
}

#[test]
fn empty_value() {
    assert!(matches!(err(r#"{"value":[]}"#), ParseError::EmptyValue));
    assert!(matches!(err(r#"{"value":[ ]}"#), ParseError::EmptyValue));
}

#[test]
fn item_not_object() {
    let body = format!(r#"{{"value":[{OK_ITEM},"x"]}}"#);
    assert_eq!(item_problem(&body), (2, ItemProblem::NotObject));
    assert_eq!(err(&body).to_string(), "item 2: not an object");
    assert_eq!(
        item_problem(r#"{"value":[null]}"#),
        (1, ItemProblem::NotObject)
    );
}

#[test]
fn missing_or_non_string_subscription_id() {
    for item in [
        r#"{"changeType":"created"}"#,
        r#"{"subscriptionId":5,"changeType":"created"}"#,
        r#"{"subscriptionId":null,"changeType":"created"}"#,
        r#"{"subscriptionId":["s"],"changeType":"created"}"#,
    ] {
        let body = format!(r#"{{"value":[{OK_ITEM},{item}]}}"#);
        assert_eq!(
            item_problem(&body),
            (2, ItemProblem::NoSubscriptionId),
            "{item}"
        );
        assert_eq!(err(&body).to_string(), "item 2: no subscriptionId");
    }
}

#[test]
fn neither_change_type_nor_lifecycle_event() {
    assert_eq!(
        item_problem(r#"{"value":[{"subscriptionId":"s"}]}"#),
        (1, ItemProblem::NoChangeTypeOrLifecycleEvent)
    );
    assert_eq!(
        item_problem(r#"{"value":[{"subscriptionId":"s","changeType":null}]}"#),
        (1, ItemProblem::NoChangeTypeOrLifecycleEvent)
    );
}

#[test]
fn mistyped_fields() {
    assert_eq!(
        item_problem(r#"{"value":[{"subscriptionId":"s","changeType":1}]}"#),
        (1, ItemProblem::NotAString("changeType"))
    );
    assert_eq!(
        item_problem(
            r#"{"value":[{"subscriptionId":"s","changeType":"created","clientState":{}}]}"#
        ),
        (1, ItemProblem::NotAString("clientState"))
    );
    assert_eq!(
        item_problem(
            r#"{"value":[{"subscriptionId":"s","changeType":"created","subscriptionExpirationDateTime":"tomorrow"}]}"#
        ),
        (1, ItemProblem::BadTime)
    );
}

#[test]
fn duplicate_key_at_top_level() {
    let body = format!(r#"{{"value":[{OK_ITEM}],"value":[{OK_ITEM}]}}"#);
    match err(&body) {
        ParseError::DuplicateKey(k) => assert_eq!(k, "value"),
        other => panic!("{other}"),
    }
    // Spelled differently but the same key once unescaped.
    let body = format!(r#"{{"value":[{OK_ITEM}],"v\u0061lue":[]}}"#);
    assert!(matches!(err(&body), ParseError::DuplicateKey(_)));
    // A duplicate unknown key is refused as well.
    let body = format!(r#"{{"x":1,"value":[{OK_ITEM}],"x":2}}"#);
    assert_eq!(err(&body).to_string(), "duplicate key `x`");
}

#[test]
fn duplicate_key_in_an_item() {
    let body = r#"{"value":[{"subscriptionId":"a","changeType":"created","subscriptionId":"b"}]}"#;
    assert_eq!(
        item_problem(body),
        (1, ItemProblem::DuplicateKey("subscriptionId".into()))
    );
    let body = r#"{"value":[{"subscriptionId":"a","changeType":"created","clientState":"x","clientState":"y"}]}"#;
    assert_eq!(
        item_problem(body),
        (1, ItemProblem::DuplicateKey("clientState".into()))
    );
}

#[test]
fn too_many_items() {
    let items = |n: usize| vec![OK_ITEM; n].join(",");
    let body = format!(r#"{{"value":[{}]}}"#, items(MAX_ITEMS));
    assert_eq!(
        parse_collection(body.as_bytes()).unwrap().items.len(),
        MAX_ITEMS
    );
    let body = format!(r#"{{"value":[{}]}}"#, items(MAX_ITEMS + 1));
    assert!(matches!(err(&body), ParseError::TooManyItems(n) if n == MAX_ITEMS + 1));
}

#[test]
fn too_deep() {
    let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    // The object and the `value` array count: two levels.
    let ok = format!(
        r#"{{"value":[{{"subscriptionId":"s","changeType":"created","x":{}}}]}}"#,
        nest(125)
    );
    parse_collection(ok.as_bytes()).unwrap();
    let deep = format!(
        r#"{{"value":[{{"subscriptionId":"s","changeType":"created","x":{}}}]}}"#,
        nest(126)
    );
    assert!(matches!(err(&deep), ParseError::TooDeep));
    let very_deep = format!(r#"{{"value":[{OK_ITEM}],"x":{}}}"#, nest(100_000));
    assert!(matches!(err(&very_deep), ParseError::TooDeep));
}
