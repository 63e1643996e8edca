//! `EnvelopeSplitter`: a stream of envelopes cut at every possible point comes out as the same
//! envelopes; what is not a stream of envelopes is refused, and nothing grows without bound.

use ews::{parse_streaming_events, EnvelopeSplitter, EwsError, DEFAULT_MAX_ENVELOPE};

use crate::builders::fixture;

/// The fixture's root element alone: what the splitter hands out for it (the XML declaration
/// before the root is dropped, as is the line end after it).
fn root_of(xml: &str) -> &str {
    let start = xml
        .find("<soap:Envelope")
        .or_else(|| xml.find("<s:Envelope"));
    xml[start.expect("an envelope")..].trim_end()
}

/// Everything `splitter` yields now.
fn drain(splitter: &mut EnvelopeSplitter) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(envelope) = splitter.next_envelope().expect("splits") {
        out.push(envelope);
    }
    out
}

/// Feeds `stream` in the pieces `cuts` makes and collects every envelope.
fn split_at(stream: &[u8], cuts: &[usize], max: usize) -> Result<Vec<Vec<u8>>, EwsError> {
    let mut splitter = EnvelopeSplitter::new(max);
    let mut out = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain([&stream.len()]) {
        splitter.feed(&stream[from..cut]);
        from = cut;
        while let Some(envelope) = splitter.next_envelope()? {
            out.push(envelope);
        }
    }
    splitter.finish()?;
    Ok(out)
}

/// Two envelopes as Exchange streams them: an XML declaration before each, a line end after.
fn two_envelopes() -> (String, [String; 2]) {
    let first = fixture("streaming-events.xml");
    let second = fixture("streaming-closed.xml");
    let expected = [root_of(&first).to_string(), root_of(&second).to_string()];
    (format!("{first}\r\n{second}"), expected)
}

#[test]
fn every_split_point_of_two_envelopes() {
    let (stream, expected) = two_envelopes();
    let stream = stream.as_bytes();
    for cut in 0..=stream.len() {
        let out = split_at(stream, &[cut], DEFAULT_MAX_ENVELOPE).expect("splits");
        assert_eq!(out.len(), 2, "cut at {cut}");
        assert_eq!(out[0], expected[0].as_bytes(), "cut at {cut}");
        assert_eq!(out[1], expected[1].as_bytes(), "cut at {cut}");
    }
    // Each one parses, and they are what was sent.
    let out = split_at(stream, &[], DEFAULT_MAX_ENVELOPE).expect("splits");
    let first = parse_streaming_events(&out[0]).expect("first parses");
    assert_eq!(first.notifications().count(), 2);
    assert!(parse_streaming_events(&out[1])
        .expect("second parses")
        .is_closed());
}

#[test]
fn byte_by_byte() {
    let (stream, expected) = two_envelopes();
    let stream = stream.as_bytes();
    let mut splitter = EnvelopeSplitter::new(DEFAULT_MAX_ENVELOPE);
    let mut out = Vec::new();
    for (at, byte) in stream.iter().enumerate() {
        splitter.feed(std::slice::from_ref(byte));
        let got = drain(&mut splitter);
        // An envelope comes out exactly when its last byte arrives, not before, not later.
        if let Some(envelope) = got.first() {
            assert_eq!(&stream[at + 1 - envelope.len()..=at], &envelope[..]);
        }
        out.extend(got);
        // Between envelopes nothing but the envelope under way is kept.
        assert!(splitter.buffered() <= expected[0].len().max(expected[1].len()));
    }
    splitter.finish().expect("ends between envelopes");
    assert_eq!(out, [expected[0].as_bytes(), expected[1].as_bytes()]);
}

#[test]
fn every_pair_of_split_points_in_a_short_stream() {
    // Markup the scanner must not be fooled by: `>` and `/` in attribute values, an empty
    // element, a comment and a processing instruction inside and between envelopes, CDATA
    // holding what looks like an end tag, and a root that is an empty element.
    let one = r#"<s:Envelope d="/>" a="x>/y" b='"/>'><s:Body><?pi a></s:Body>?><x/><!-- a>b </s:Envelope> --><![CDATA[1>0</s:Envelope>]]]]></s:Body></s:Envelope>"#;
    let two = "<e:Envelope xmlns:e='u'/>";
    let stream = format!("<?xml version=\"1.0\"?>\n{one} <!-- between > -->\t<?pi x?>{two}\n");
    let stream = stream.as_bytes();
    for first in 0..=stream.len() {
        for second in first..=stream.len() {
            let out = split_at(stream, &[first, second], 1024).expect("splits");
            assert_eq!(
                out,
                [one.as_bytes(), two.as_bytes()],
                "cuts {first}, {second}"
            );
        }
    }
}

#[test]
fn many_envelopes_in_one_read() {
    let keep_alive = fixture("streaming-keepalive.xml");
    let stream = keep_alive.repeat(50);
    let out = split_at(stream.as_bytes(), &[], DEFAULT_MAX_ENVELOPE).expect("splits");
    assert_eq!(out.len(), 50);
    for envelope in &out {
        assert!(parse_streaming_events(envelope)
            .expect("parses")
            .is_keep_alive());
    }
}

#[test]
fn oversize_envelope_is_an_error() {
    let body = fixture("streaming-events.xml");
    let root = root_of(&body);
    // Exactly the bound passes, one byte less does not, however it is fed.
    assert_eq!(
        split_at(body.as_bytes(), &[], root.len())
            .expect("fits")
            .len(),
        1
    );
    for cuts in [vec![], vec![100], (1..body.len()).step_by(7).collect()] {
        match split_at(body.as_bytes(), &cuts, root.len() - 1) {
            Err(EwsError::TooMany { limit, .. }) => assert_eq!(limit, root.len() - 1),
            other => panic!("expected TooMany, got {other:?}"),
        }
    }

    // A root that never closes is refused once past the bound, holding no more than that
    // plus one read.
    let mut splitter = EnvelopeSplitter::new(4096);
    splitter.feed(b"<s:Envelope xmlns:s='http://schemas.xmlsoap.org/soap/envelope/'>");
    let chunk = [b'a'; 1000];
    let mut failed = false;
    for _ in 0..10 {
        splitter.feed(&chunk);
        assert!(splitter.buffered() <= 4096 + chunk.len() + 100);
        if splitter.next_envelope().is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "no error past the bound");
    // The error is final, and the buffer was released.
    splitter.feed(b"</s:Envelope>");
    assert!(splitter.next_envelope().is_err());
    assert!(splitter.finish().is_err());
    assert_eq!(splitter.buffered(), 0);

    // A comment between envelopes is bounded too.
    let mut splitter = EnvelopeSplitter::new(64);
    splitter.feed(b"<!--");
    splitter.feed(&[b'x'; 100]);
    assert!(matches!(
        splitter.next_envelope(),
        Err(EwsError::TooMany { .. })
    ));
}

#[test]
fn garbage_between_envelopes_is_an_error() {
    let keep_alive = fixture("streaming-keepalive.xml");
    for garbage in [
        "x",
        "HTTP/1.1 200 OK",
        "}",
        "&amp;",
        "</s:Envelope>",
        "< a>",
        "<>",
    ] {
        let stream = format!("{keep_alive}{garbage}{keep_alive}");
        let mut splitter = EnvelopeSplitter::default();
        splitter.feed(stream.as_bytes());
        // The envelope before the garbage is whole and comes out; then the error.
        let first = splitter.next_envelope().expect("first envelope");
        assert!(first.is_some(), "{garbage}");
        assert!(splitter.next_envelope().is_err(), "{garbage}");
        assert!(
            splitter.next_envelope().is_err(),
            "{garbage}: the error is final"
        );
    }
    // Garbage before the first envelope, and a DOCTYPE.
    for stream in [
        "garbage<s:Envelope/>",
        "<!DOCTYPE x><s:Envelope/>",
        "<![CDATA[x]]>",
    ] {
        let mut splitter = EnvelopeSplitter::default();
        splitter.feed(stream.as_bytes());
        assert!(splitter.next_envelope().is_err(), "{stream}");
    }
    let mut splitter = EnvelopeSplitter::default();
    splitter.feed(b"<!DOCTYPE x>");
    assert!(matches!(
        splitter.next_envelope(),
        Err(EwsError::DtdForbidden)
    ));
}

#[test]
fn end_of_stream_inside_an_envelope_is_an_error() {
    let (stream, _) = two_envelopes();
    let stream = stream.as_bytes();
    // Ending anywhere inside the first envelope or in the second's markup is refused; ending
    // between the two, or after both, is not.
    let first_end = stream
        .windows(b"</soap:Envelope>".len())
        .position(|w| w == b"</soap:Envelope>")
        .expect("end tag")
        + b"</soap:Envelope>".len();
    for end in [1, 10, 200, first_end - 1, first_end + 5, stream.len() - 3] {
        let mut splitter = EnvelopeSplitter::default();
        splitter.feed(&stream[..end]);
        drain(&mut splitter);
        assert!(splitter.finish().is_err(), "ending at {end}");
    }
    for end in [0, first_end, first_end + 2, stream.len()] {
        let mut splitter = EnvelopeSplitter::default();
        splitter.feed(&stream[..end]);
        drain(&mut splitter);
        splitter.finish().expect("ends between envelopes");
    }
}

#[test]
fn byte_order_marks_and_white_space_between_envelopes() {
    let keep_alive = root_of(&fixture("streaming-keepalive.xml")).to_string();
    let stream =
        format!("\u{FEFF}{keep_alive}\n\n \t\u{FEFF}<?xml version=\"1.0\"?>{keep_alive}   ");
    let out = split_at(stream.as_bytes(), &[3, 50], DEFAULT_MAX_ENVELOPE).expect("splits");
    assert_eq!(out, [keep_alive.as_bytes(), keep_alive.as_bytes()]);
}
