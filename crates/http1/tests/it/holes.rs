//! The framing holes the differential test against nginx and HAProxy found, one test each:
//! each failed before its fix.

use crate::{exchange, outline};

/// A request after the one under test: if it is answered, the engine found where the first
/// ended, which is exactly what it must not guess at.
const NEXT: &str = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";

/// RFC 9112 §6.1, §6.3: a `Transfer-Encoding` field that is present counts, whatever its value:
/// empty, `,` or blanks are no coding at all, so `chunked` is not the final one.
#[tokio::test]
async fn present_but_empty_transfer_encoding_is_refused() {
    for te in ["", ",", " , ", ",,"] {
        // With Content-Length: both framings at once, 400 and close, the next request unread.
        let with_length = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\nContent-Length: 5\r\n\r\nhello{NEXT}"
        );
        assert_eq!(
            outline(&exchange(with_length.as_bytes()).await),
            [(400, true)],
            "Transfer-Encoding: {te:?} with Content-Length"
        );
        // Alone: a coding the engine does not know how to end, 400 or 501 and close.
        let alone = format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n{NEXT}");
        let seen = outline(&exchange(alone.as_bytes()).await);
        assert!(
            matches!(seen.as_slice(), [(400 | 501, true)]),
            "Transfer-Encoding: {te:?} alone: {seen:?}"
        );
    }
}

/// RFC 9112 §7.1: the trailer section ends at CRLF; a bare LF or a NUL where a trailer line or
/// the final CRLF belongs is refused, not taken as the start of a trailer line that then
/// swallows the next request's head.
#[tokio::test]
async fn bare_lf_or_nul_after_the_last_chunk_is_refused() {
    for after_last in ["\n", "\0", "\0\r\n"] {
        let request = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n{after_last}{NEXT}"
        );
        assert_eq!(
            outline(&exchange(request.as_bytes()).await),
            [(400, true)],
            "{after_last:?} after the last chunk"
        );
    }
}

/// RFC 9112 §3.2 and RFC 3986 §3.2.2: `Host` is `uri-host [":" port]`; anything else is 400,
/// never passed to the handler (which forwards it as `X-Forwarded-Host`).
#[tokio::test]
async fn invalid_host_syntax_is_refused() {
    for host in [
        "a/b@evil",
        "user@example.com",
        "exa mple.com",
        "example.com evil",
        "example.com:80x",
        "example.com:99999",
        "[::1",
        "[not-ip]:80",
        "a\"b",
        "a<b>",
        "",
    ] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n{NEXT}");
        assert_eq!(
            outline(&exchange(request.as_bytes()).await),
            [(400, true)],
            "Host: {host:?}"
        );
    }
    // The authority of an absolute-form target stands for Host (RFC 9112 §3.2.2): the same
    // syntax, and userinfo is an error (RFC 9110 §4.2.4).
    for authority in ["user@example.com", "a b", "example.com:x"] {
        let request = format!("GET http://{authority}/ HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            outline(&exchange(request.as_bytes()).await),
            [(400, true)],
            "absolute-form authority {authority:?}"
        );
    }
    for host in [
        "example.com",
        "EXAMPLE.com:8443",
        "127.0.0.1",
        "127.0.0.1:80",
        "[::1]",
        "[2001:db8::1]:443",
        "xn--caf-dma.example",
        "a_b.example",
        "%41.example",
        "example.com:",
    ] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let seen = exchange(request.as_bytes()).await;
        assert_eq!(outline(&seen), [(200, false)], "Host: {host:?}");
        assert_eq!(seen[0].text(), format!("GET / host={host}\n"));
    }
}

/// A chunk extension is read and dropped; left unbounded per body, 1-byte chunks with 4 KiB
/// extensions would make a client's body a thousand times its data on the wire, all of it read
/// within the body timeout by the engine.
#[tokio::test]
async fn chunk_extensions_are_bounded_per_body() {
    let ext = format!(";e={}", "x".repeat(4000));
    let mut request = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..64 {
        request.extend_from_slice(format!("1{ext}\r\nx\r\n").as_bytes());
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request.extend_from_slice(NEXT.as_bytes());
    assert_eq!(outline(&exchange(&request).await), [(400, true)]);
}

/// RFC 9112 §3.2: the target is a URI, ASCII; bytes above 0x7F (raw UTF-8 or not) are refused,
/// never handed on (the relay's writer of the forwarded head asserts the target is ASCII).
#[tokio::test]
async fn non_ascii_request_target_is_refused() {
    for target in [
        &b"/caf\xc3\xa9"[..],
        b"/\xff",
        b"/ews?q=\xc3\xa9",
        b"http://example.com/\xc3\xa9",
    ] {
        let request = [
            b"GET ",
            target,
            b" HTTP/1.1\r\nHost: a\r\n\r\n",
            NEXT.as_bytes(),
        ]
        .concat();
        assert_eq!(
            outline(&exchange(&request).await),
            [(400, true)],
            "{:?}",
            String::from_utf8_lossy(target)
        );
    }
}
