use graph::{validation_token, BadQuery};

fn token(q: &str) -> Option<String> {
    validation_token(q).unwrap_or_else(|e| panic!("{q}: {e}"))
}

#[test]
fn absent_is_none() {
    assert_eq!(token(""), None);
    assert_eq!(token("a=1&b=2"), None);
    assert_eq!(
        token("validationtoken=x"),
        None,
        "the name is case-sensitive"
    );
    assert_eq!(token("validationTokens=x"), None);
}

#[test]
fn plus_is_space_and_percent_2b_is_plus() {
    assert_eq!(token("validationToken=a+b").as_deref(), Some("a b"));
    assert_eq!(token("validationToken=a%2Bb").as_deref(), Some("a+b"));
    assert_eq!(token("validationToken=a%2bb").as_deref(), Some("a+b"));
    assert_eq!(token("validationToken=a%20b").as_deref(), Some("a b"));
}

#[test]
fn graph_shaped_token() {
    // What Graph sends: a sentence-like token, URL-encoded.
    let q = "validationToken=Validation%3a+Testing+client+application+reachability+for+subscription+Request-Id%3a+b3f3c5c2-0000-4000-8000-4a8e8b4d0f3e";
    assert_eq!(
        token(q).as_deref(),
        Some("Validation: Testing client application reachability for subscription Request-Id: b3f3c5c2-0000-4000-8000-4a8e8b4d0f3e")
    );
}

#[test]
fn multi_byte_utf8() {
    assert_eq!(
        token("validationToken=%E2%82%AC%C3%A9").as_deref(),
        Some("€é")
    );
    assert_eq!(token("validationToken=caf%C3%A9").as_deref(), Some("café"));
}

#[test]
fn not_utf8() {
    assert_eq!(
        validation_token("validationToken=%FF"),
        Err(BadQuery::NotUtf8)
    );
    assert_eq!(
        validation_token("validationToken=%C3"),
        Err(BadQuery::NotUtf8)
    );
}

#[test]
fn bad_escapes() {
    assert_eq!(
        validation_token("validationToken=%G1"),
        Err(BadQuery::BadEscape(0))
    );
    assert_eq!(
        validation_token("validationToken=ab%4"),
        Err(BadQuery::BadEscape(2))
    );
    assert_eq!(
        validation_token("validationToken=%"),
        Err(BadQuery::BadEscape(0))
    );
    assert_eq!(
        validation_token("validationToken=%1G"),
        Err(BadQuery::BadEscape(0))
    );
}

#[test]
fn given_twice_is_ambiguous() {
    assert_eq!(
        validation_token("validationToken=a&validationToken=b"),
        Err(BadQuery::Repeated)
    );
    assert_eq!(
        validation_token("validationToken=a&validationToken=a"),
        Err(BadQuery::Repeated)
    );
    // An escaped spelling of the name is the same parameter.
    assert_eq!(
        validation_token("validationToken=a&validation%54oken=b"),
        Err(BadQuery::Repeated)
    );
}

#[test]
fn among_other_parameters() {
    assert_eq!(
        token("foo=1&validationToken=abc%3D%3D&bar=%ZZ").as_deref(),
        Some("abc==")
    );
    assert_eq!(token("validationToken=&x=1").as_deref(), Some(""));
    assert_eq!(token("x=validationToken%3Dy").as_deref(), None);
}
