//! The fast path of `summarize_send_notification` against the full walk it stands in for. The
//! one invariant: whenever the fast path returns a summary, the full walk returns `Ok` with the
//! same summary. The fast path may give up on anything, but not on the bodies Exchange sends,
//! so the tests also count how often it takes them.

use std::borrow::Cow;

use ews::{
    parse_send_notification, summarize_send_notification, summarize_send_notification_fast,
    summarize_send_notification_slow, EventType, NotificationSummary, ResponseClass,
};

fn read(path: &str) -> Vec<u8> {
    let path = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every fixture, with its path.
fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let mut fixtures: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.expect("fixture").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "xml"))
        .map(|path| {
            let name = format!(
                "tests/fixtures/{}",
                path.file_name().expect("file").to_string_lossy()
            );
            (name, std::fs::read(&path).expect("fixture"))
        })
        .collect();
    fixtures.sort();
    fixtures
}

/// Every fixture the full walk accepts as a SendNotification, and the body the benchmarks
/// post.
fn send_notifications() -> Vec<(String, Vec<u8>)> {
    let mut bodies: Vec<_> = fixtures()
        .into_iter()
        .filter(|(_, body)| summarize_send_notification_slow(body).is_ok())
        .collect();
    let bench = "../../bench/send-notification-events.xml";
    bodies.push((bench.to_owned(), read(bench)));
    bodies
}

/// Checks the invariant on `body`; returns whether the fast path took it.
fn check(body: &[u8]) -> bool {
    let Some(fast) = summarize_send_notification_fast(body) else {
        return false;
    };
    match summarize_send_notification_slow(body) {
        Ok(slow) => assert_eq!(
            fast,
            slow,
            "fast and slow disagree on\n{}",
            String::from_utf8_lossy(body)
        ),
        Err(e) => panic!(
            "fast path accepted what the full walk refuses ({e}):\n{}",
            String::from_utf8_lossy(body)
        ),
    }
    true
}

/// The summary of a body the fast path must take.
fn fast(body: &str) -> NotificationSummary<'_> {
    assert!(check(body.as_bytes()), "fast path gave up on\n{body}");
    summarize_send_notification_fast(body.as_bytes()).expect("checked")
}

/// Asserts the fast path leaves `body` to the full walk; returns the full walk's verdict.
fn bails(body: &str) -> Result<NotificationSummary<'_>, String> {
    assert!(
        summarize_send_notification_fast(body.as_bytes()).is_none(),
        "fast path took\n{body}"
    );
    summarize_send_notification_slow(body.as_bytes()).map_err(|e| e.to_string())
}

const SOAP: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const MESSAGES: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";
const TYPES: &str = "http://schemas.microsoft.com/exchange/services/2006/types";

/// A SendNotification holding `messages`, with `s:`, `m:` and `t:` bound as Exchange binds them.
fn envelope(messages: &str) -> String {
    format!(
        concat!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n",
            "<s:Envelope xmlns:s=\"{}\"><s:Body>",
            "<m:SendNotification xmlns:m=\"{}\" xmlns:t=\"{}\">",
            "<m:ResponseMessages>{}</m:ResponseMessages>",
            "</m:SendNotification></s:Body></s:Envelope>\n",
        ),
        SOAP, MESSAGES, TYPES, messages
    )
}

/// A successful response message whose notification holds `events`.
fn success(subscription_id: &str, events: &str) -> String {
    format!(
        concat!(
            "<m:SendNotificationResponseMessage ResponseClass=\"Success\">",
            "<m:ResponseCode>NoError</m:ResponseCode><m:Notification>",
            "<t:SubscriptionId>{}</t:SubscriptionId>{}",
            "</m:Notification></m:SendNotificationResponseMessage>",
        ),
        subscription_id, events
    )
}

fn status_event(watermark: &str) -> String {
    format!("<t:StatusEvent><t:Watermark>{watermark}</t:Watermark></t:StatusEvent>")
}

fn counts(pairs: &[(EventType, u32)]) -> [u32; EventType::ALL.len()] {
    let mut counts = [0; EventType::ALL.len()];
    for &(kind, n) in pairs {
        counts[kind.index()] = n;
    }
    counts
}

#[test]
fn every_send_notification_takes_the_fast_path() {
    let bodies = send_notifications();
    // The status, events and error fixtures, and the bench body at least.
    assert!(
        bodies.len() >= 4,
        "{:?}",
        bodies.iter().map(|b| &b.0).collect::<Vec<_>>()
    );
    for (path, body) in &bodies {
        assert!(check(body), "{path} left the fast path");
        let summary = summarize_send_notification_fast(body).expect("checked");
        // The full parse agrees too, and the values are borrowed from the body.
        assert_eq!(
            summary,
            parse_send_notification(body).expect("parses").summary()
        );
        for message in &summary.messages {
            for value in [&message.code, &message.subscription_id] {
                assert!(matches!(value, Some(Cow::Borrowed(_))), "{path}: {value:?}");
            }
        }
        // And it is what the relay's entry point returns.
        assert_eq!(summarize_send_notification(body).expect("parses"), summary);
    }
    // What the fixtures say, spelled out, so a fast path that agrees with a broken slow one
    // would still be caught.
    let body = read("tests/fixtures/send-notification-events.xml");
    let events = summarize_send_notification_fast(&body)
        .expect("fast")
        .messages;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].class, ResponseClass::Success);
    assert_eq!(events[0].code.as_deref(), Some("NoError"));
    assert_eq!(
        events[0].subscription_id.as_deref(),
        Some("JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAAB9c1Qm0VhIRb3ZkRf0x2aa")
    );
    assert_eq!(
        events[0].event_counts,
        counts(&[
            (EventType::NewMail, 1),
            (EventType::Created, 1),
            (EventType::Modified, 1),
            (EventType::Moved, 1),
            (EventType::Deleted, 1),
        ])
    );
    assert_eq!(
        events[0].last_watermark.as_deref(),
        Some("AQAAAJ3nQ2Vb9UlHkCq0S6n1ZWQcwQAAAAAAAAE=")
    );
    let body = read("tests/fixtures/send-notification-error.xml");
    let error = summarize_send_notification_fast(&body)
        .expect("fast")
        .messages;
    assert_eq!(error[0].class, ResponseClass::Error);
    assert_eq!(error[0].code.as_deref(), Some("ErrorReadEventsFailed"));
    assert_eq!(
        error[0].subscription_id.as_deref(),
        Some("JgBhbTNwcjA1bWIxMTQubmFtcHJkMDUucHJvZC5vdXRsb29rLmNvbRAAAACkGm2Fhz9CTYx5mQ9Xh3l0")
    );
    assert_eq!(error[0].event_counts, [0; EventType::ALL.len()]);
    assert_eq!(error[0].last_watermark, None);
}

/// Every other fixture (results, Subscribe, faults, Autodiscover) is left to the full walk,
/// which refuses it.
#[test]
fn other_messages_are_left_to_the_full_walk() {
    let mut others = 0;
    for (path, body) in fixtures() {
        if summarize_send_notification_slow(&body).is_err() {
            assert!(summarize_send_notification_fast(&body).is_none(), "{path}");
            others += 1;
        }
    }
    assert!(others >= 8, "{others}");
}

#[test]
fn truncated_at_every_offset() {
    for (_, body) in send_notifications() {
        for end in 0..body.len() {
            check(&body[..end]);
        }
        // Cut inside the root element, nothing can be taken.
        for end in 0..body.trim_ascii_end().len() {
            assert!(summarize_send_notification_fast(&body[..end]).is_none());
        }
    }
}

/// splitmix64: a deterministic stream, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The markup of a body: every `<…>` as a byte range, and every element as the range from its
/// start tag through its end tag. For well-formed fixtures without `>` in values.
struct Markup {
    tags: Vec<(usize, usize)>,
    elements: Vec<(usize, usize)>,
}

fn markup(body: &[u8]) -> Markup {
    let mut tags = Vec::new();
    let mut elements = Vec::new();
    let mut open = Vec::new();
    let mut at = 0;
    while let Some(lt) = body[at..].iter().position(|&b| b == b'<').map(|p| at + p) {
        let Some(gt) = body[lt..]
            .iter()
            .position(|&b| b == b'>')
            .map(|p| lt + p + 1)
        else {
            break;
        };
        tags.push((lt, gt));
        match body[lt + 1] {
            b'?' | b'!' => {}
            b'/' => {
                if let Some(start) = open.pop() {
                    elements.push((start, gt));
                }
            }
            _ if body[gt - 2] == b'/' => elements.push((lt, gt)),
            _ => open.push(lt),
        }
        at = gt;
    }
    Markup { tags, elements }
}

/// Bytes that matter to a tokenizer, then some that don't.
const ALPHABET: &[u8] = b"<>\"'&/:=! ?\t\r\n-_;#xtmsaZ0\x00\xC3\xA9\x80";

/// Values to put where text was: empty, padded, boolean, numbers in and out of `u32`.
const TEXTS: &[&str] = &[
    "",
    "  padded  ",
    "\n\tw\n",
    "true",
    "1",
    "0",
    "false",
    "yes",
    "7",
    "+7",
    "-1",
    "4294967295",
    "4294967296",
    "x y",
    "a\r\nb",
    "Success",
];

/// Elements to insert anywhere: the ones the walk looks for, in and out of place, and markup
/// the fast path leaves to the full walk.
const SNIPPETS: &[&str] = &[
    "<t:StatusEvent><t:Watermark>inserted</t:Watermark></t:StatusEvent>",
    "<t:NewMailEvent><t:ItemId Id=\"i\"/></t:NewMailEvent>",
    "<t:ModifiedEvent><t:UnreadCount>2</t:UnreadCount></t:ModifiedEvent>",
    "<t:DeletedEvent><t:ItemId/></t:DeletedEvent>",
    "<t:FutureEvent><t:Watermark>future</t:Watermark></t:FutureEvent>",
    "<t:Watermark>loose</t:Watermark>",
    "<t:Watermark/>",
    "<t:SubscriptionId>inserted-id</t:SubscriptionId>",
    "<t:MoreEvents>maybe</t:MoreEvents>",
    "<m:Notification><t:SubscriptionId>n2</t:SubscriptionId></m:Notification>",
    "<m:Notification/>",
    "<m:ResponseCode>ErrorInserted</m:ResponseCode>",
    "<m:MessageXml><t:Value Name=\"SubscriptionId\">from-xml</t:Value></m:MessageXml>",
    "<m:MessageXml/>",
    "<m:SendNotificationResponseMessage ResponseClass=\"Warning\"/>",
    "<m:SendNotificationResponseMessage ResponseClass=\"Error\"><m:ResponseCode>E</m:ResponseCode></m:SendNotificationResponseMessage>",
    "<m:SendNotificationResponseMessage/>",
    "<m:ResponseMessages/>",
    "<x:Other xmlns:x=\"urn:other\"><x:Deeper a='1' b=\"2\"/></x:Other>",
    "<Unqualified/>",
    "<n xmlns=\"http://schemas.microsoft.com/exchange/services/2006/types\"><Watermark>d</Watermark></n>",
    "<t:StatusEvent xmlns:t=\"urn:not-types\"><t:Watermark>rebound</t:Watermark></t:StatusEvent>",
    "<!-- a comment -->",
    "<?pi data?>",
    "<![CDATA[cdata]]>",
    "&amp;",
    "&#65;",
    "<!DOCTYPE x>",
    "<s:Body/>",
];

const PREFIXES: &[&str] = &["s", "soap11", "m", "t", "e", "x", "xml", "xmlns", ""];

const URIS: &[&str] = &[
    SOAP,
    MESSAGES,
    TYPES,
    "http://schemas.microsoft.com/exchange/services/2006/errors",
    "http://www.w3.org/XML/1998/namespace",
    "http://www.w3.org/2000/xmlns/",
    "urn:other",
    "",
];

/// Where `needle` starts in `hay`, every time.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// Replaces `body[start..end]` with `with`.
fn splice(body: &mut Vec<u8>, start: usize, end: usize, with: &[u8]) {
    body.splice(start..end, with.iter().copied());
}

/// Gives the element at `span` the prefix `to` (none when empty) on its start and end tags.
fn rename_element(body: &mut Vec<u8>, (start, end): (usize, usize), to: &str) {
    let tag_end = |at: usize, body: &[u8]| {
        at + body[at..]
            .iter()
            .position(|&b| matches!(b, b' ' | b'>' | b'/' | b'\n'))
            .unwrap_or(0)
    };
    let renamed = |name: &[u8]| -> Vec<u8> {
        let local = name.splitn(2, |&b| b == b':').last().unwrap_or(name);
        let mut out = to.as_bytes().to_vec();
        if !to.is_empty() {
            out.push(b':');
        }
        out.extend_from_slice(local);
        out
    };
    // The end tag first, so the start tag's offsets stay valid.
    if body[end - 2] != b'/' {
        let close = start
            + body[start..end]
                .iter()
                .rposition(|&b| b == b'<')
                .unwrap_or(0);
        let name_end = tag_end(close + 2, body);
        let name = renamed(&body[close + 2..name_end]);
        splice(body, close + 2, name_end, &name);
    }
    let name_end = tag_end(start + 1, body);
    let name = renamed(&body[start + 1..name_end]);
    splice(body, start + 1, name_end, &name);
}

/// One mutation of `body`: byte edits that mostly break it, and
/// structural ones that mostly keep it well-formed but change what it says.
fn mutate(rng: &mut Rng, body: &mut Vec<u8>) {
    let m = &markup(body);
    if m.elements.is_empty() {
        body.push(*rng.pick(ALPHABET));
        return;
    }
    let len = body.len().max(1);
    match rng.below(16) {
        0 => {
            let at = rng.below(len).min(body.len().saturating_sub(1));
            if !body.is_empty() {
                body[at] = if rng.below(4) == 0 {
                    rng.next() as u8
                } else {
                    *rng.pick(ALPHABET)
                };
            }
        }
        1 => {
            let at = rng.below(len + 1).min(body.len());
            body.insert(at, *rng.pick(ALPHABET));
        }
        2 => {
            let at = rng.below(len).min(body.len());
            let end = (at + 1 + rng.below(16)).min(body.len());
            body.drain(at..end);
        }
        3 => {
            // A span copied somewhere else.
            let at = rng.below(len).min(body.len());
            let end = (at + 1 + rng.below(64)).min(body.len());
            let span = body[at..end].to_vec();
            let to = rng.below(body.len() + 1);
            splice(body, to, to, &span);
        }
        4 => {
            let &(start, end) = rng.pick(&m.elements);
            body.drain(start..end);
        }
        5 => {
            // An element repeated in place or elsewhere.
            let &(start, end) = rng.pick(&m.elements);
            let element = body[start..end].to_vec();
            let to = if rng.below(2) == 0 {
                end
            } else {
                rng.pick(&m.tags).0
            };
            splice(body, to, to, &element);
        }
        6 => {
            // An element moved before another tag.
            let &(start, end) = rng.pick(&m.elements);
            let element = body[start..end].to_vec();
            let to = rng.pick(&m.tags).0;
            if to <= start {
                body.drain(start..end);
                splice(body, to, to, &element);
            } else if to >= end {
                splice(body, to, to, &element);
                body.drain(start..end);
            }
        }
        7 => {
            let &span = rng.pick(&m.elements);
            let to = *rng.pick(PREFIXES);
            rename_element(body, span, to);
        }
        8 => {
            // A prefix renamed everywhere, or only where it is used, or only where declared.
            let from = rng.pick(&["s", "soap11", "m", "t", "e"]);
            let to = rng.pick(PREFIXES);
            let text = String::from_utf8_lossy(body).into_owned();
            let text = match rng.below(3) {
                0 => text
                    .replace(&format!("<{from}:"), &format!("<{to}:"))
                    .replace(&format!("</{from}:"), &format!("</{to}:"))
                    .replace(&format!("xmlns:{from}="), &format!("xmlns:{to}=")),
                1 => text
                    .replace(&format!("<{from}:"), &format!("<{to}:"))
                    .replace(&format!("</{from}:"), &format!("</{to}:")),
                _ => text.replacen(&format!("xmlns:{from}="), &format!("xmlns:{to}="), 1),
            };
            *body = text.into_bytes();
        }
        9 => {
            // One namespace URI swapped for another.
            let from = rng.pick(&URIS[..4]);
            let to = rng.pick(URIS);
            let hits = find_all(body, from.as_bytes());
            if !hits.is_empty() {
                let at = *rng.pick(&hits);
                splice(body, at, at + from.len(), to.as_bytes());
            }
        }
        10 => {
            // A text replaced.
            let &(_, end) = rng.pick(&m.tags);
            if let Some(next) = body
                .get(end..)
                .and_then(|r| r.iter().position(|&b| b == b'<'))
            {
                splice(body, end, end + next, rng.pick(TEXTS).as_bytes());
            }
        }
        11 => {
            // Before a tag, or after one: so also first inside a text element.
            let &(start, end) = rng.pick(&m.tags);
            let at = if rng.below(2) == 0 { start } else { end };
            splice(body, at, at, rng.pick(SNIPPETS).as_bytes());
        }
        12 => {
            // White space added inside a tag, before its `>` or `/>`, or after its name.
            let &(start, end) = rng.pick(&m.tags);
            let space = rng.pick(&[" ", "\n\t", "  \r\n"]).as_bytes();
            let at = if rng.below(2) == 0 {
                end - 1 - usize::from(body[end - 2] == b'/')
            } else {
                start
                    + 1
                    + body[start + 1..end]
                        .iter()
                        .take_while(|&&b| b != b' ')
                        .count()
            };
            splice(body, at, at, space);
        }
        13 => {
            // An attribute's double quotes made single.
            let &(start, end) = rng.pick(&m.tags);
            let quotes: Vec<usize> = (start..end).filter(|&i| body[i] == b'"').collect();
            if quotes.len() >= 2 {
                let pair = rng.below(quotes.len() / 2) * 2;
                body[quotes[pair]] = b'\'';
                body[quotes[pair + 1]] = b'\'';
            }
        }
        14 => {
            // An attribute value replaced.
            let attr = rng.pick(&["ResponseClass=\"", "Name=\"", "Id=\""]);
            if let Some(&at) = find_all(body, attr.as_bytes()).first() {
                let value = at + attr.len();
                let close = value + find_all(&body[value..], b"\"").first().unwrap_or(&0);
                let to = rng.pick(&[
                    "Success",
                    "Warning",
                    "Error",
                    "error",
                    "",
                    "SubscriptionId",
                    "BackOffMilliseconds",
                    "x y",
                ]);
                splice(body, value, close, to.as_bytes());
            }
        }
        _ => {
            // An attribute removed, or one added to a start tag.
            let &(start, end) = rng.pick(&m.tags);
            if body[start + 1] != b'/' && body[start + 1] != b'?' {
                let at = start
                    + 1
                    + body[start + 1..end]
                        .iter()
                        .take_while(|&&b| !matches!(b, b' ' | b'>' | b'/'))
                        .count();
                let attr = rng.pick(&[
                    " Id=\"added\"",
                    " Id=\"dup\" Id=\"dup\"",
                    " xmlns=\"http://schemas.microsoft.com/exchange/services/2006/types\"",
                    " xmlns:t=\"http://schemas.microsoft.com/exchange/services/2006/messages\"",
                    " xmlns:m=\"urn:other\"",
                    " xmlns:xml=\"http://www.w3.org/XML/1998/namespace\"",
                    " a='>'",
                    " b=\"<\"",
                    " c = \"spaced\"",
                    " ResponseClass=\"Error\"",
                ]);
                splice(body, at, at, attr.as_bytes());
            }
        }
    }
}

/// The differential test: thousands of mutants of every SendNotification, each checked for
/// the invariant; and most of those the full walk accepts must take the fast path, so the test
/// cannot pass by giving up on everything.
#[test]
fn mutants_agree_with_the_full_walk() {
    const MUTANTS_PER_BODY: usize = 6_000;
    let (mut valid, mut taken, mut total) = (0usize, 0usize, 0usize);
    for (seed, (_, original)) in send_notifications().into_iter().enumerate() {
        let mut rng = Rng(0x5EED_0000 + seed as u64);
        for _ in 0..MUTANTS_PER_BODY {
            let mut body = original.clone();
            for _ in 0..1 + rng.below(3) {
                mutate(&mut rng, &mut body);
            }
            total += 1;
            let took = check(&body);
            if summarize_send_notification_slow(&body).is_ok() {
                valid += 1;
                taken += usize::from(took);
            }
        }
    }
    eprintln!("{total} mutants: {valid} valid, {taken} of those on the fast path");
    // Enough valid mutants that the semantics got exercised, not only the tokenizer.
    assert!(
        valid * 5 > total,
        "only {valid} of {total} mutants are valid"
    );
    // Mutants the fast path leaves alone on purpose (a comment, an entity, a CR in a value,
    // a text element with a child …) are a minority of the valid ones.
    assert!(
        taken * 10 > valid * 8,
        "only {taken} of {valid} valid mutants were fast"
    );
}

#[test]
fn prefixes_rebound_in_inner_scopes() {
    // `t` is the messages namespace outside Notification and the types namespace inside it.
    let body = format!(
        concat!(
            "<s:Envelope xmlns:s=\"{soap}\"><s:Body>",
            "<t:SendNotification xmlns:t=\"{m}\"><t:ResponseMessages>",
            "<t:SendNotificationResponseMessage ResponseClass=\"Success\">",
            "<t:ResponseCode>NoError</t:ResponseCode>",
            "<m:Notification xmlns:m=\"{m}\" xmlns:t=\"{t}\">",
            "<t:SubscriptionId>rebound</t:SubscriptionId>",
            "<t:StatusEvent><t:Watermark>w1</t:Watermark></t:StatusEvent>",
            "</m:Notification>",
            "</t:SendNotificationResponseMessage></t:ResponseMessages></t:SendNotification>",
            "</s:Body></s:Envelope>",
        ),
        soap = SOAP,
        m = MESSAGES,
        t = TYPES
    );
    let summary = fast(&body);
    assert_eq!(
        summary.messages[0].subscription_id.as_deref(),
        Some("rebound")
    );
    assert_eq!(
        summary.messages[0].event_counts,
        counts(&[(EventType::Status, 1)])
    );
    // The bindings end with the element that made them: after Notification `t` is the
    // messages namespace again, and `m` is bound to nothing.
    let body = body.replace(
        "</t:ResponseMessages>",
        concat!(
            "<t:SendNotificationResponseMessage ResponseClass=\"Warning\"/>",
            "<m:SendNotificationResponseMessage ResponseClass=\"Error\"/>",
            "</t:ResponseMessages>",
        ),
    );
    let summary = fast(&body);
    assert_eq!(summary.messages.len(), 2);
    assert_eq!(summary.messages[1].class, ResponseClass::Warning);
    assert_eq!(summary.messages[1].subscription_id, None);
    // Rebound on the element itself, `t:Notification` is in the types namespace: not read.
    let body = body
        .replace("<m:Notification xmlns:m", "<t:Notification xmlns:m")
        .replace("</m:Notification>", "</t:Notification>");
    assert_eq!(fast(&body).messages[0].subscription_id, None);
}

#[test]
fn default_namespaces() {
    let body = format!(
        concat!(
            "<Envelope xmlns=\"{soap}\"><Header><Anything xmlns=\"urn:x\"/></Header><Body>",
            "<SendNotification xmlns=\"{m}\"><ResponseMessages>",
            "<SendNotificationResponseMessage ResponseClass=\"Success\"><Notification>",
            "<SubscriptionId xmlns=\"{t}\">sid</SubscriptionId>",
            "<NewMailEvent xmlns=\"{t}\"><Watermark>w</Watermark><ItemId Id=\"i\"/></NewMailEvent>",
            // Unqualified in the messages namespace: not an event.
            "<NewMailEvent><Watermark>not-types</Watermark></NewMailEvent>",
            "</Notification></SendNotificationResponseMessage>",
            "</ResponseMessages></SendNotification></Body></Envelope>",
        ),
        soap = SOAP,
        m = MESSAGES,
        t = TYPES
    );
    let summary = fast(&body);
    assert_eq!(summary.messages[0].subscription_id.as_deref(), Some("sid"));
    assert_eq!(
        summary.messages[0].event_counts,
        counts(&[(EventType::NewMail, 1)])
    );
    assert_eq!(summary.messages[0].last_watermark.as_deref(), Some("w"));
    // A default namespace undeclared with xmlns="": SubscriptionId is in no namespace.
    let body = body.replace(
        &format!("<SubscriptionId xmlns=\"{TYPES}\">"),
        "<SubscriptionId xmlns=\"\">",
    );
    assert_eq!(
        bails(&body).unwrap_err(),
        "missing or invalid t:SubscriptionId"
    );
}

#[test]
fn namespaces_that_do_not_match() {
    let good = envelope(&success("sid", &status_event("w")));
    fast(&good);
    // t: bound to the wrong URI: no SubscriptionId in the types namespace.
    let wrong_types = good.replace(
        TYPES,
        "http://schemas.microsoft.com/exchange/services/2007/types",
    );
    assert!(bails(&wrong_types).is_err());
    // SubscriptionId in the messages namespace.
    let in_messages = good.replace("t:SubscriptionId", "m:SubscriptionId");
    assert!(bails(&in_messages).is_err());
    // Events in the wrong namespace are not events, but the message is still good.
    let body = envelope(&success(
        "sid",
        "<m:StatusEvent><m:Watermark>m</m:Watermark></m:StatusEvent><x:NewMailEvent xmlns:x=\"urn:x\"/>",
    ));
    let summary = fast(&body);
    assert_eq!(summary.messages[0].event_counts, [0; EventType::ALL.len()]);
    assert_eq!(summary.messages[0].last_watermark, None);
    // A Watermark outside the types namespace does not count.
    let body = envelope(&success(
        "sid",
        "<t:StatusEvent><m:Watermark>m</m:Watermark></t:StatusEvent>",
    ));
    let summary = fast(&body);
    assert_eq!(
        summary.messages[0].event_counts,
        counts(&[(EventType::Status, 1)])
    );
    assert_eq!(summary.messages[0].last_watermark, None);
    // An unbound prefix resolves to no namespace, as in the full walk.
    let body = envelope(&success("sid", "<q:StatusEvent/>"));
    assert_eq!(
        fast(&body).messages[0].event_counts,
        [0; EventType::ALL.len()]
    );
    // The envelope in another namespace is not SOAP.
    let body = good.replace(SOAP, "http://www.w3.org/2003/05/soap-envelope");
    assert_eq!(bails(&body).unwrap_err(), "not a SOAP 1.1 envelope");
}

#[test]
fn message_xml_names_the_subscription_of_an_error() {
    let error = |message_xml: &str| {
        envelope(&format!(
            concat!(
                "<m:SendNotificationResponseMessage ResponseClass=\"Error\">",
                "<m:MessageText>gone</m:MessageText>",
                "<m:ResponseCode>ErrorReadEventsFailed</m:ResponseCode>{}",
                "</m:SendNotificationResponseMessage>",
            ),
            message_xml
        ))
    };
    let body = error(concat!(
        "<m:MessageXml><t:Value Name=\"BackOffMilliseconds\">5</t:Value>",
        "<t:Value Name=\"Other\"><x/></t:Value>",
        "<t:Value Name=\"SubscriptionId\"> from-xml </t:Value></m:MessageXml>",
    ));
    let summary = fast(&body);
    assert_eq!(summary.messages[0].class, ResponseClass::Error);
    assert_eq!(
        summary.messages[0].code.as_deref(),
        Some("ErrorReadEventsFailed")
    );
    assert_eq!(
        summary.messages[0].subscription_id.as_deref(),
        Some("from-xml")
    );
    // A later MessageXml without the value replaces the earlier one's.
    let body = error(concat!(
        "<m:MessageXml><t:Value Name=\"SubscriptionId\">first</t:Value></m:MessageXml>",
        "<m:MessageXml/>",
    ));
    assert_eq!(fast(&body).messages[0].subscription_id, None);
    // The value in the messages namespace, or named in another case, is not it.
    let body = error("<m:MessageXml><m:Value Name=\"SubscriptionId\">m</m:Value></m:MessageXml>");
    assert_eq!(fast(&body).messages[0].subscription_id, None);
    let body = error("<m:MessageXml><t:Value Name=\"subscriptionid\">m</t:Value></m:MessageXml>");
    assert_eq!(fast(&body).messages[0].subscription_id, None);
    // A Notification's subscription wins over MessageXml's, whatever the order.
    let body = error(concat!(
        "<m:Notification><t:SubscriptionId>from-notification</t:SubscriptionId></m:Notification>",
        "<m:MessageXml><t:Value Name='SubscriptionId'>from-xml</t:Value></m:MessageXml>",
    ));
    assert_eq!(
        fast(&body).messages[0].subscription_id.as_deref(),
        Some("from-notification")
    );
}

#[test]
fn multiple_messages_and_notifications() {
    let body = envelope(&format!(
        "{}<m:Other/>{}{}",
        success("one", &status_event("w1")),
        success(
            "two",
            "<t:CreatedEvent><t:Watermark>w2</t:Watermark></t:CreatedEvent><t:CreatedEvent/>"
        ),
        "<m:SendNotificationResponseMessage ResponseClass=\"Warning\"><m:ResponseCode>ErrorX</m:ResponseCode></m:SendNotificationResponseMessage>",
    ));
    let summary = fast(&body);
    let ids: Vec<_> = summary
        .messages
        .iter()
        .map(|m| m.subscription_id.as_deref())
        .collect();
    assert_eq!(ids, [Some("one"), Some("two"), None]);
    assert_eq!(
        summary.messages[1].event_counts,
        counts(&[(EventType::Created, 2)])
    );
    // The last event had no watermark: the one before it is the last.
    assert_eq!(summary.messages[1].last_watermark.as_deref(), Some("w2"));
    assert_eq!(summary.messages[2].code.as_deref(), Some("ErrorX"));
    // Two Notifications in one message: the events add up, the last one names it.
    let body = envelope(&success(
        "first",
        &format!(
            "{}</m:Notification><m:Notification><t:SubscriptionId>second</t:SubscriptionId>{}",
            status_event("w1"),
            "<t:StatusEvent/>"
        ),
    ));
    let summary = fast(&body);
    assert_eq!(
        summary.messages[0].subscription_id.as_deref(),
        Some("second")
    );
    assert_eq!(
        summary.messages[0].event_counts,
        counts(&[(EventType::Status, 2)])
    );
    assert_eq!(summary.messages[0].last_watermark.as_deref(), Some("w1"));
    // Two ResponseMessages elements are both read.
    let body = envelope(&format!(
        "{}</m:ResponseMessages><m:ResponseMessages>{}",
        success("a", ""),
        success("b", "")
    ));
    assert_eq!(fast(&body).messages.len(), 2);
    // No response message at all.
    assert!(bails(&envelope("")).is_err());
}

#[test]
fn empty_elements_and_whitespace_inside_tags() {
    let body = envelope(&format!(
        concat!(
            "<m:SendNotificationResponseMessage\n\tResponseClass = 'Success' >",
            "<m:ResponseCode/><m:Notification >",
            "<t:SubscriptionId\n>\n  sid \t</t:SubscriptionId\n>",
            "<t:MoreEvents > 1 </t:MoreEvents >",
            "<t:ModifiedEvent><t:Watermark >{}</t:Watermark >",
            "<t:FolderId Id='f' ChangeKey=\"c\" /><t:UnreadCount> +3 </t:UnreadCount></t:ModifiedEvent>",
            "<t:StatusEvent><t:Watermark/></t:StatusEvent>",
            "</m:Notification></m:SendNotificationResponseMessage>",
        ),
        "  w  "
    ));
    let summary = fast(&body);
    let message = &summary.messages[0];
    assert_eq!(message.code.as_deref(), Some(""));
    assert_eq!(message.subscription_id.as_deref(), Some("sid"));
    assert_eq!(
        message.event_counts,
        counts(&[(EventType::Modified, 1), (EventType::Status, 1)])
    );
    // `<t:Watermark/>` is an empty watermark, and the last one.
    assert_eq!(message.last_watermark.as_deref(), Some(""));
    // Attribute values may hold `>` and the other quote.
    let body = envelope(&success(
        "sid",
        "<t:NewMailEvent><t:ItemId Id=\"a>b\" ChangeKey=\"it's\"/></t:NewMailEvent>",
    ));
    fast(&body);
}

#[test]
fn invalid_values_are_left_to_the_full_walk() {
    for events in [
        "<t:MoreEvents>yes</t:MoreEvents>",
        "<t:ModifiedEvent><t:UnreadCount>4294967296</t:UnreadCount></t:ModifiedEvent>",
        "<t:ModifiedEvent><t:UnreadCount>-1</t:UnreadCount></t:ModifiedEvent>",
        "<t:ModifiedEvent><t:UnreadCount/></t:ModifiedEvent>",
        "<t:NewMailEvent><t:ItemId ChangeKey=\"c\"/></t:NewMailEvent>",
        "<t:MovedEvent><t:OldParentFolderId t:Id=\"prefixed\"/></t:MovedEvent>",
    ] {
        let body = envelope(&success("sid", events));
        assert!(bails(&body).is_err(), "{events}");
    }
    let body = envelope(&success("sid", "")).replace("Success", "success");
    assert_eq!(
        bails(&body).unwrap_err(),
        "missing or invalid ResponseClass attribute"
    );
    let body =
        envelope(&success("sid", "")).replace("<t:SubscriptionId>sid</t:SubscriptionId>", "");
    assert_eq!(
        bails(&body).unwrap_err(),
        "missing or invalid t:SubscriptionId"
    );
}

/// Markup the fast path does not read, on bodies the full walk accepts: every one goes to the
/// full walk, which still gets the same answer as on the plain body.
#[test]
fn unusual_markup_is_left_to_the_full_walk() {
    let plain = envelope(&success("sid", &status_event("w")));
    let expected = fast(&plain);
    let variants = [
        plain.replacen("<m:Notification>", "<m:Notification><!-- note -->", 1),
        plain.replacen("<m:Notification>", "<m:Notification><?pi x?>", 1),
        plain.replacen(">sid<", "><![CDATA[sid]]><", 1),
        plain.replacen(">sid<", ">s&#105;d<", 1),
        plain.replacen("<s:Envelope", "<!-- before --><s:Envelope", 1),
        plain.replacen("encoding=\"utf-8\"", "encoding=\"ISO-8859-1\"", 1),
        // Declarations other than the plain one: the full walk does not read them.
        plain.replacen("version=\"1.0\"", "version=\"1.1\"", 1),
        plain.replacen("encoding=\"utf-8\"", "standalone=\"maybe\"", 1),
        plain.replacen(
            "version=\"1.0\" encoding=\"utf-8\"",
            "encoding=\"utf-8\" version=\"1.0\"",
            1,
        ),
        // A text element with a child: the full walk reads the text around it.
        plain.replacen(">sid<", ">s<x/>id<", 1),
        plain.replacen(">sid<", "><x/>sid<", 1),
        plain.replacen(">sid<", "><x>y</x>sid<", 1),
        plain.replacen("NoError", "No<b>x</b>Error", 1),
        // Attribute games the full walk lets through.
        plain.replacen(
            "<s:Body>",
            "<s:Body xmlns:xml=\"http://www.w3.org/XML/1998/namespace\">",
            1,
        ),
        plain.replacen("<s:Body>", "<s:Body a=\"1\"b=\"2\">", 1),
        plain.replacen("<s:Body>", "<s:Body a=\"<\">", 1),
        plain.replacen("<s:Body>", "<s:Body a=\"&lt;\">", 1),
        // `>` in text.
        plain.replacen("<m:Notification>", "<m:Notification>a > b", 1),
        // Names outside the simple grammar.
        plain.replacen("<m:Notification>", "<m:Notification><é/>", 1),
        plain.replacen(
            "<m:Notification>",
            "<m:Notification><a:b:c xmlns:a=\"urn:a\"/>",
            1,
        ),
    ];
    for variant in &variants {
        let slow = bails(variant).unwrap_or_else(|e| panic!("{e}:\n{variant}"));
        assert_eq!(slow, expected, "{variant}");
    }
    // A CR inside a value the summary keeps: the full walk normalises it to LF.
    let body = plain.replacen(">sid<", ">s\rid<", 1);
    assert_eq!(
        bails(&body).expect("parses").messages[0]
            .subscription_id
            .as_deref(),
        Some("s\nid")
    );
    // At either end it is trimmed away, by both.
    let body = plain.replacen(">sid<", ">\r\nsid\r<", 1);
    assert_eq!(fast(&body), expected);
    // A byte order mark is handled, as in the full walk.
    let bom = format!("\u{FEFF}{plain}");
    assert_eq!(fast(&bom), expected);
}

#[test]
fn broken_bodies_are_left_to_the_full_walk() {
    let plain = envelope(&success("sid", &status_event("w")));
    for broken in [
        plain.replacen("</t:Watermark>", "</t:WaterMark>", 1),
        plain.replacen("</s:Envelope>", "", 1),
        plain.replacen("</s:Envelope>", "</s:Envelope><s:Envelope/>", 1),
        plain.replacen("</s:Envelope>", "</s:Envelope>text", 1),
        plain.replacen("<?xml", "text<?xml", 1),
        plain.replacen("<?xml", " <?xml", 1),
        plain.replacen("<s:Body>", "<s:Body a=\"1\" a=\"1\">", 1),
        plain.replacen("<s:Body>", "<s:Body a=1>", 1),
        plain.replacen("<s:Body>", "<s:Body a>", 1),
        plain.replacen("<s:Body>", "<s:Body a=\"1>", 1),
        plain.replacen("<s:Body>", "<s:Body xmlns:xmlns=\"urn:x\">", 1),
        plain.replacen(
            "<s:Body>",
            "<s:Body xmlns:p=\"http://www.w3.org/2000/xmlns/\">",
            1,
        ),
        plain.replacen("<s:Body>", "<s:Body xmlns:xml=\"urn:x\">", 1),
        plain.replacen("<s:Body>", "<!DOCTYPE x><s:Body>", 1),
        plain.replacen("sid", "&unknown;", 1),
    ] {
        if let Ok(summary) = bails(&broken) {
            // The full walk may be lenient where the fast path is not (`<?xml` after text);
            // either way the invariant held, as `bails` saw the fast path give up.
            assert!(!summary.messages.is_empty());
        }
    }
    let mut body = plain.clone().into_bytes();
    body[200] = 0xFF;
    assert!(summarize_send_notification_fast(&body).is_none());
}

#[test]
fn limits_are_left_to_the_full_walk() {
    let plain = envelope(&success("sid", &status_event("w")));
    // As deep as the full walk allows, and one deeper.
    let nest = |depth: usize| {
        let open: String = (0..depth).map(|_| "<d>").collect();
        let close: String = (0..depth).map(|_| "</d>").collect();
        plain.replacen(
            "<m:Notification>",
            &format!("<m:Notification>{open}{close}"),
            1,
        )
    };
    // The Notification is the sixth element from the root.
    fast(&nest(64 - 6));
    assert_eq!(
        bails(&nest(64 - 5)).unwrap_err(),
        "XML nested deeper than 64 elements"
    );
    // 32 attributes are fine, 33 are not.
    let attrs = |n: usize| {
        let attrs: String = (0..n).map(|i| format!(" a{i}=\"v\"")).collect();
        plain.replacen("<s:Body>", &format!("<s:Body{attrs}>"), 1)
    };
    fast(&attrs(32));
    assert!(bails(&attrs(33)).is_err());
    // A value of 64 KiB is fine, one byte more is not.
    let long = |n: usize| plain.replacen(">sid<", &format!(">{}<", "x".repeat(n)), 1);
    fast(&long(64 * 1024));
    assert!(bails(&long(64 * 1024 + 1)).is_err());
    let long_attr =
        |n: usize| plain.replacen("<s:Body>", &format!("<s:Body a=\"{}\">", "x".repeat(n)), 1);
    fast(&long_attr(64 * 1024));
    assert!(bails(&long_attr(64 * 1024 + 1)).is_err());
    // As many events as the full walk allows, and one more.
    let events = |n: usize| envelope(&success("sid", &"<t:StatusEvent/>".repeat(n)));
    fast(&events(10_000));
    assert!(bails(&events(10_001)).is_err());
    // As many response messages as the full walk allows, and one more.
    let messages = |n: usize| envelope(&success("sid", "").repeat(n));
    fast(&messages(10_000));
    assert!(bails(&messages(10_001)).is_err());
    // Text between elements the walk passes over is limited too, and so is the white space
    // before the root (which follows the declaration's newline here).
    let between = |n: usize| {
        plain.replacen(
            "<m:Notification>",
            &format!("<m:Notification>{}", " ".repeat(n)),
            1,
        )
    };
    fast(&between(64 * 1024));
    assert!(bails(&between(64 * 1024 + 1)).is_err());
    let before =
        |n: usize| plain.replacen("<s:Envelope", &format!("{}<s:Envelope", " ".repeat(n)), 1);
    fast(&before(64 * 1024 - 1));
    assert!(bails(&before(64 * 1024)).is_err());
    // Trailing white space is one text node, limited like any other.
    let trailing = |n: usize| format!("{plain}{}", " ".repeat(n));
    fast(&trailing(64 * 1024 - 1));
    assert!(bails(&trailing(64 * 1024 + 1)).is_err());
}
