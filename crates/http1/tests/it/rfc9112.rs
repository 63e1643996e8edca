//! The engine's framing rules, a table per section of RFC 9112. Each row: the raw bytes a
//! client sends (then it ends its side), and the answers it gets as `(status, closes)`, where
//! `closes` is the answer announcing `connection: close` (the engine closes after it, and
//! [`crate::parse_answers`] fails on any byte after such an answer). A request the engine
//! does not answer (cut short by the client's end) has no entry. Above each row, the sentence
//! of the RFC it checks.
//!
//! Most rows end with a second request: whether it is answered shows whether the engine knew
//! where the first ended, and kept the connection only then.

use crate::{exchange, outline, MAX_BODY};

/// Served, the connection kept.
const OK: (u16, bool) = (200, false);
/// Served, then closed.
const OK_CLOSE: (u16, bool) = (200, true);
/// Refused as malformed, then closed.
const BAD: (u16, bool) = (400, true);
/// Refused as not implemented, then closed.
const NOT_IMPL: (u16, bool) = (501, true);

/// One row: what it is, the bytes, the answers.
type Row = (&'static str, Vec<u8>, Vec<(u16, bool)>);

/// A GET with `Host: a` after each row's request: served when the engine kept the connection.
const NEXT: &str = "GET /next HTTP/1.1\r\nHost: a\r\n\r\n";

fn row(what: &'static str, request: impl AsRef<[u8]>, expect: &[(u16, bool)]) -> Row {
    (what, request.as_ref().to_vec(), expect.to_vec())
}

/// `request` followed by [`NEXT`].
fn then_next(request: &str) -> Vec<u8> {
    format!("{request}{NEXT}").into_bytes()
}

/// A POST with `fields` (each line ending in CRLF) and `body` after the head.
fn post(fields: &str, body: &str) -> String {
    format!("POST / HTTP/1.1\r\nHost: a\r\n{fields}\r\n{body}")
}

/// A chunked POST with `chunks` as its body (the caller ends it).
fn chunked(chunks: &str) -> Vec<u8> {
    then_next(&post("Transfer-Encoding: chunked\r\n", chunks))
}

async fn check(section: &str, rows: Vec<Row>) {
    let mut failures = Vec::new();
    for (what, request, expect) in rows {
        let seen = outline(&exchange(&request).await);
        if seen != expect {
            failures.push(format!(
                "{what}: expected {expect:?}, got {seen:?} for {:?}",
                String::from_utf8_lossy(&request)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "RFC 9112 {section}:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn section_2_2_message_parsing() {
    check(
        "§2.2",
        vec![
            // "a recipient MAY recognize a single LF as a line terminator and ignore any
            // preceding CR": the head only; the engine rewrites every head it forwards.
            row(
                "bare LF line ends in the head",
                format!("GET / HTTP/1.1\nHost: a\n\n{NEXT}"),
                &[OK, OK],
            ),
            // "A sender MUST NOT generate a bare CR (a CR character not immediately followed by
            // LF) within any protocol elements other than the content. A recipient of such a
            // bare CR MUST consider that element to be invalid or replace each bare CR with SP"
            row(
                "bare CR in the request line",
                then_next("GET /\r HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            row(
                "bare CR in a field value",
                then_next("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n"),
                &[BAD],
            ),
            row(
                "bare CR ending the head",
                then_next("GET / HTTP/1.1\r\nHost: a\r\n\r\r\n"),
                &[BAD],
            ),
            // "a server that is expecting to receive and parse a request-line SHOULD ignore at
            // least one empty line (CRLF) received prior to the request-line"
            row(
                "empty line before the request line",
                then_next("\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[OK, OK],
            ),
            // "A recipient that receives whitespace between the start-line and the first header
            // field MUST either reject the message as invalid or consume each
            // whitespace-preceded line without further processing of it"
            row(
                "white space before the first field",
                then_next("GET / HTTP/1.1\r\n Host: a\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            // A NUL is no part of any protocol element.
            row(
                "NUL in the request line",
                then_next("GET /\0 HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            row(
                "NUL in a field value",
                then_next("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n"),
                &[BAD],
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn section_3_request_line_and_target() {
    let long_head = format!(
        "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
        "a".repeat(http1::server::MAX_REQUEST_HEAD)
    );
    check(
        "§3",
        vec![
            // "A request-line begins with a method token, followed by a single space (SP), the
            // request-target, and another single space (SP), and ends with the protocol
            // version."
            row(
                "origin form",
                then_next("GET /a?b=c HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "two spaces after the method",
                then_next("GET  / HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            row(
                "tab as the separator",
                then_next("GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            row("no version", then_next("GET /\r\nHost: a\r\n\r\n"), &[BAD]),
            // "The method token is case-sensitive": `get` is another method, the handler's
            // to judge.
            row(
                "lower-case method",
                then_next("get / HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "method not a token",
                then_next("G@T / HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            // §2.3: "HTTP-name = %s"HTTP"", case-sensitive; only 1.0 and 1.1 are HTTP/1.
            row(
                "lower-case http",
                then_next("GET / http/1.1\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            row(
                "HTTP/1.2",
                then_next("GET / HTTP/1.2\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            row(
                "HTTP/2.0",
                then_next("GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            // §3.2.2 absolute-form: "a server MUST accept the absolute-form in requests"
            row(
                "absolute form",
                then_next("GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "absolute form, https, no path",
                then_next("GET https://a:443 HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "absolute form, another scheme",
                then_next("GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            // §3.2.3 authority-form "is only used for CONNECT requests", and §3.2.4
            // asterisk-form only for a server-wide OPTIONS: neither is served here.
            row(
                "authority form",
                then_next("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"),
                &[BAD],
            ),
            row(
                "asterisk form",
                then_next("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            // §3.2: origin-form = absolute-path [ "?" query ]: no fragment, ASCII only.
            row(
                "fragment",
                then_next("GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            row(
                "byte above 0x7F",
                [
                    &b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n"[..],
                    NEXT.as_bytes(),
                ]
                .concat(),
                &[BAD],
            ),
            // A head larger than the engine parses is refused whole (431, as nginx).
            row("head over MAX_REQUEST_HEAD", long_head, &[(431, true)]),
        ],
    )
    .await;
}

#[tokio::test]
async fn section_3_2_host() {
    check(
        "§3.2",
        vec![
            // "A server MUST respond with a 400 (Bad Request) status code to any HTTP/1.1
            // request message that lacks a Host header field and to any request message that
            // contains more than one Host header field line or a Host header field with an
            // invalid field value."
            row("no Host", then_next("GET / HTTP/1.1\r\n\r\n"), &[BAD]),
            row(
                "two Host lines",
                then_next("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
            row(
                "Host with userinfo",
                then_next("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n"),
                &[BAD],
            ),
            row(
                "Host with a path",
                then_next("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"),
                &[BAD],
            ),
            row(
                "Host with a space",
                then_next("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
                &[BAD],
            ),
            row(
                "Host, two values",
                then_next("GET / HTTP/1.1\r\nHost: a, b\r\n\r\n"),
                &[BAD],
            ),
            row(
                "Host, bad port",
                then_next("GET / HTTP/1.1\r\nHost: a:x\r\n\r\n"),
                &[BAD],
            ),
            row(
                "Host, empty",
                then_next("GET / HTTP/1.1\r\nHost:\r\n\r\n"),
                &[BAD],
            ),
            row(
                "Host, IPv6 literal and port",
                then_next("GET / HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "Host, with trailing white space",
                then_next("GET / HTTP/1.1\r\nHost: a \r\n\r\n"),
                &[OK, OK],
            ),
            // HTTP/1.0 has no Host requirement; it closes after its answer (§9.3).
            row(
                "HTTP/1.0 without Host",
                then_next("GET / HTTP/1.0\r\n\r\n"),
                &[OK_CLOSE],
            ),
            // §3.2.2: with an absolute-form target "the origin server MUST ignore the received
            // Host header field (if any) and instead use the host information of the
            // request-target" (checked on the echo in a test of its own); its authority must
            // be valid as Host would be.
            row(
                "absolute form with userinfo",
                then_next("GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[BAD],
            ),
        ],
    )
    .await;
}

/// §3.2.2: the authority of an absolute-form target is the one the handler sees.
#[tokio::test]
async fn section_3_2_2_absolute_form_authority_wins_over_host() {
    let seen =
        exchange(b"GET http://target.example:8080/x?y HTTP/1.1\r\nHost: other\r\n\r\n").await;
    assert_eq!(outline(&seen), [OK]);
    assert_eq!(seen[0].text(), "GET /x?y host=target.example:8080\n");
}

#[tokio::test]
async fn section_5_field_syntax() {
    let hundred: String = (0..99).map(|i| format!("X-{i}: {i}\r\n")).collect();
    let too_many = format!("{hundred}X-Last: 1\r\nX-Over: 1\r\n");
    check(
        "§5",
        vec![
            // §5.1: "No whitespace is allowed between the field name and colon. ... A server
            // MUST reject, with a response status code of 400 (Bad Request), any received
            // request message that contains whitespace between a header field name and colon."
            row(
                "space before the colon",
                then_next(&post("Content-Length : 5\r\n", "hello")),
                &[BAD],
            ),
            row(
                "tab before the colon",
                then_next(&post("Transfer-Encoding\t: chunked\r\n", "0\r\n\r\n")),
                &[BAD],
            ),
            // §5.1: field-name = token.
            row(
                "name not a token",
                then_next(&post("X@Y: 1\r\n", "")),
                &[BAD],
            ),
            row("empty name", then_next(&post(": 1\r\n", "")), &[BAD]),
            row("no colon", then_next(&post("X-No-Colon\r\n", "")), &[BAD]),
            // §5.1: "A field value does not include leading or trailing whitespace": OWS around
            // the value is not part of it.
            row(
                "OWS around a value",
                then_next(&post("Content-Length: \t5 \t\r\n", "hello")),
                &[OK, OK],
            ),
            // §5.2: "A server that receives an obs-fold in a request message ... MUST either
            // reject the message by sending a 400 (Bad Request) ... or replace each received
            // obs-fold with one or more SP octets"
            row(
                "obs-fold",
                then_next(&post("X-Folded: a\r\n b\r\n", "")),
                &[BAD],
            ),
            row(
                "obs-fold of Content-Length",
                then_next(&post("Content-Length:\r\n 5\r\n", "hello")),
                &[BAD],
            ),
            // RFC 9110 §5.5: field values may hold obs-text, opaque.
            row(
                "obs-text in a value",
                [
                    post("X-Utf8: caf\u{e9}\r\n", "").as_bytes(),
                    NEXT.as_bytes(),
                ]
                .concat(),
                &[OK, OK],
            ),
            // The engine's bound on fields (MAX_REQUEST_HEADERS, 100): Host and 99 more are
            // served, 102 are refused.
            row("100 fields", then_next(&post(&hundred, "")), &[OK, OK]),
            row(
                "102 fields",
                then_next(&post(&too_many, "")),
                &[(431, true)],
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn section_6_1_transfer_encoding() {
    check(
        "§6.1",
        vec![
            row("chunked", chunked("5\r\nhello\r\n0\r\n\r\n"), &[OK, OK]),
            // "Transfer codings are case-insensitive" (RFC 9110 via §7).
            row(
                "Chunked, any case",
                then_next(&post("Transfer-Encoding: ChUnKeD\r\n", "0\r\n\r\n")),
                &[OK, OK],
            ),
            // Lists may hold empty elements (RFC 9110 §5.6.1).
            row(
                "chunked with an empty element",
                then_next(&post("Transfer-Encoding: , chunked ,\r\n", "0\r\n\r\n")),
                &[OK, OK],
            ),
            // §6.3: "If a Transfer-Encoding header field is present in a request and the
            // chunked transfer coding is not the final encoding, the message body length cannot
            // be determined reliably; the server MUST respond with the 400 (Bad Request) status
            // code and then close the connection."
            row(
                "gzip alone",
                then_next(&post("Transfer-Encoding: gzip\r\n", "hello")),
                &[BAD],
            ),
            row(
                "chunked, then gzip",
                then_next(&post("Transfer-Encoding: chunked, gzip\r\n", "0\r\n\r\n")),
                &[BAD],
            ),
            row(
                "present but empty",
                then_next(&post("Transfer-Encoding: \r\n", "")),
                &[BAD],
            ),
            row(
                "present, only commas",
                then_next(&post("Transfer-Encoding: , ,\r\n", "")),
                &[BAD],
            ),
            // "A sender MUST NOT apply the chunked transfer coding more than once to a message
            // body"
            row(
                "chunked twice, one line",
                then_next(&post("Transfer-Encoding: chunked, chunked\r\n", "0\r\n\r\n")),
                &[BAD],
            ),
            row(
                "chunked twice, two lines",
                then_next(&post(
                    "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                    "0\r\n\r\n",
                )),
                &[BAD],
            ),
            // "A server that receives a request message with a transfer coding it does not
            // understand SHOULD respond with 501 (Not Implemented)."
            row(
                "gzip under chunked",
                then_next(&post("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n")),
                &[NOT_IMPL],
            ),
            row(
                "gzip under chunked, two lines",
                then_next(&post(
                    "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                    "0\r\n\r\n",
                )),
                &[NOT_IMPL],
            ),
            // "A server or client that receives an HTTP/1.0 message containing a
            // Transfer-Encoding header field MUST treat the message as if the framing is faulty,
            // even if a Content-Length is present, and close the connection after processing
            // the message."
            row(
                "HTTP/1.0 chunked",
                then_next("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
                &[BAD],
            ),
            row(
                "HTTP/1.0 with Transfer-Encoding and Content-Length",
                then_next(
                    "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
                ),
                &[BAD],
            ),
            row(
                "HTTP/1.0 gzip under chunked",
                then_next("POST / HTTP/1.0\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
                &[BAD],
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn section_6_2_content_length() {
    check(
        "§6.2",
        vec![
            row(
                "a length",
                then_next(&post("Content-Length: 5\r\n", "hello")),
                &[OK, OK],
            ),
            row(
                "leading zeros",
                then_next(&post("Content-Length: 005\r\n", "hello")),
                &[OK, OK],
            ),
            row(
                "zero",
                then_next(&post("Content-Length: 0\r\n", "")),
                &[OK, OK],
            ),
            // "a recipient MAY either reject the message as invalid or replace that invalid
            // field value with a single instance of the decimal value, since the duplicated
            // values are identical": the same length repeated is the length.
            row(
                "equal list",
                then_next(&post("Content-Length: 5, 5\r\n", "hello")),
                &[OK, OK],
            ),
            row(
                "equal lines",
                then_next(&post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello")),
                &[OK, OK],
            ),
            // "If a message is received without Transfer-Encoding and with an invalid
            // Content-Length header field, then the message framing is invalid and the recipient
            // MUST treat it as an unrecoverable error, unless the field value can be
            // successfully parsed as a comma-separated list, all values in the list are valid,
            // and all values in the list are the same ... the server MUST respond with a 400
            // (Bad Request) status code and then close the connection." (§6.3)
            row(
                "differing list",
                then_next(&post("Content-Length: 5, 6\r\n", "hello!")),
                &[BAD],
            ),
            row(
                "differing lines",
                then_next(&post(
                    "Content-Length: 5\r\nContent-Length: 6\r\n",
                    "hello!",
                )),
                &[BAD],
            ),
            // Content-Length = 1*DIGIT
            row(
                "plus sign",
                then_next(&post("Content-Length: +5\r\n", "hello")),
                &[BAD],
            ),
            row(
                "minus sign",
                then_next(&post("Content-Length: -5\r\n", "hello")),
                &[BAD],
            ),
            row(
                "hex",
                then_next(&post("Content-Length: 0x5\r\n", "hello")),
                &[BAD],
            ),
            row(
                "empty",
                then_next(&post("Content-Length: \r\n", "")),
                &[BAD],
            ),
            row(
                "space inside",
                then_next(&post("Content-Length: 5 5\r\n", "hello")),
                &[BAD],
            ),
            row(
                "empty list element",
                then_next(&post("Content-Length: 5,\r\n", "hello")),
                &[BAD],
            ),
            row(
                "decimal point",
                then_next(&post("Content-Length: 5.0\r\n", "hello")),
                &[BAD],
            ),
            // "a recipient MUST anticipate potentially large decimal numerals and prevent
            // parsing errors due to integer conversion overflows or precision loss"
            row(
                "overflows 64 bits",
                then_next(&post("Content-Length: 18446744073709551621\r\n", "hello")),
                &[BAD],
            ),
            // Above the handler's limit: refused before a byte of it is read, and closed.
            row(
                "above the body limit",
                then_next(&post(&format!("Content-Length: {}\r\n", MAX_BODY + 1), "")),
                &[(413, true)],
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn section_6_3_message_body_length() {
    check(
        "§6.3",
        vec![
            // "If Transfer-Encoding is sent in a request with Content-Length ... the server
            // MUST close the connection after responding to such a request" (§6.1); "such a
            // message might indicate an attempt to perform request smuggling" (§6.3).
            row(
                "chunked and Content-Length",
                then_next(&post(
                    "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                    "0\r\n\r\n",
                )),
                &[BAD],
            ),
            row(
                "Content-Length and chunked",
                then_next(&post(
                    "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                    "0\r\n\r\n",
                )),
                &[BAD],
            ),
            row(
                "empty Transfer-Encoding and Content-Length",
                then_next(&post(
                    "Transfer-Encoding:\r\nContent-Length: 5\r\n",
                    "hello",
                )),
                &[BAD],
            ),
            row(
                "invalid Content-Length and chunked",
                then_next(&post(
                    "Transfer-Encoding: chunked\r\nContent-Length: x\r\n",
                    "0\r\n\r\n",
                )),
                &[BAD],
            ),
            // "If a valid Content-Length header field is present without Transfer-Encoding, its
            // decimal value defines the expected message body length in octets."
            row(
                "body then the next request",
                then_next(&post("Content-Length: 5\r\n", "hello")),
                &[OK, OK],
            ),
            // "If the sender closes the connection or the recipient times out before the
            // indicated number of octets are received, the recipient MUST consider the message
            // to be incomplete and close the connection."
            row(
                "body cut short",
                post("Content-Length: 10\r\n", "hello"),
                &[BAD],
            ),
            // "If this is a request message and none of the above are true, then the message
            // body length is zero (no message body is present)."
            row(
                "no framing: no body",
                then_next("POST / HTTP/1.1\r\nHost: a\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "no framing, bytes after the head are the next request",
                "POST / HTTP/1.1\r\nHost: a\r\n\r\nhello\r\n\r\n",
                &[OK, BAD],
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn section_7_1_chunked() {
    let long_size_line = format!("1;e={}\r\nx\r\n0\r\n\r\n", "x".repeat(4096));
    let big_trailers = format!("0\r\n{}\r\n", "X-T: 1234567890\r\n".repeat(1024));
    let many_extensions: String = (0..20)
        .map(|_| format!("1;e={}\r\nx\r\n", "x".repeat(1000)))
        .chain(["0\r\n\r\n".to_string()])
        .collect();
    let over_limit = format!("{:x}\r\n", MAX_BODY + 1);
    check(
        "§7.1",
        vec![
            // chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF; chunk-size = 1*HEXDIG
            row(
                "two chunks",
                chunked("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "upper-case hex",
                chunked("A\r\n0123456789\r\n0\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "leading zeros",
                chunked("0005\r\nhello\r\n000\r\n\r\n"),
                &[OK, OK],
            ),
            row("empty body", chunked("0\r\n\r\n"), &[OK, OK]),
            row("no hex digit", chunked("\r\nhello\r\n0\r\n\r\n"), &[BAD]),
            row("not hex", chunked("g\r\nhello\r\n0\r\n\r\n"), &[BAD]),
            row("0x prefix", chunked("0x5\r\nhello\r\n0\r\n\r\n"), &[BAD]),
            row("negative", chunked("-5\r\nhello\r\n0\r\n\r\n"), &[BAD]),
            row("plus sign", chunked("+5\r\nhello\r\n0\r\n\r\n"), &[BAD]),
            // "Recipients MUST anticipate potentially large hexadecimal numerals and prevent
            // parsing errors due to integer conversion overflows or precision loss due to
            // integer representation."
            row(
                "size overflows 64 bits",
                chunked("10000000000000005\r\nhello\r\n0\r\n\r\n"),
                &[BAD],
            ),
            row(
                "size of 16 zeros and 5",
                chunked("00000000000000005\r\nhello\r\n0\r\n\r\n"),
                &[BAD],
            ),
            row(
                "size above the body limit",
                chunked(&over_limit),
                &[(413, true)],
            ),
            // §7.1.1: chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] );
            // "A recipient MUST ignore unrecognized chunk extensions."
            row(
                "extension",
                chunked("5;a=b\r\nhello\r\n0\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "quoted extension",
                chunked("5;a=\"b c\";d\r\nhello\r\n0\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "BWS before the extension",
                chunked("5 ;a\r\nhello\r\n0\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "extension on the last chunk",
                chunked("0;a=b\r\n\r\n"),
                &[OK, OK],
            ),
            // "A server ought to limit the total length of chunk extensions received in a
            // request to an amount reasonable for the services provided, in the same way that it
            // applies length limitations and timeouts for other parts of a message, and generate
            // an appropriate 4xx (Client Error) response if that amount is exceeded."
            row("size line over 4 KiB", chunked(&long_size_line), &[BAD]),
            row(
                "extensions over 16 KiB in one body",
                chunked(&many_extensions),
                &[BAD],
            ),
            row(
                "bare LF in an extension",
                chunked("5;a\nhello\r\n0\r\n\r\n"),
                &[BAD],
            ),
            // CRLF, not bare CR or LF, ends every line of the coding.
            row(
                "bare LF after the size",
                chunked("5\nhello\r\n0\r\n\r\n"),
                &[BAD],
            ),
            row(
                "bare CR after the size",
                chunked("5\rhello\r\n0\r\n\r\n"),
                &[BAD],
            ),
            row(
                "bare LF after the data",
                chunked("5\r\nhello\n0\r\n\r\n"),
                &[BAD],
            ),
            row(
                "data longer than its size",
                chunked("5\r\nhello!\r\n0\r\n\r\n"),
                &[BAD],
            ),
            row(
                "data shorter than its size, cut",
                post("Transfer-Encoding: chunked\r\n", "9\r\nhello\r\n0\r\n\r\n"),
                &[BAD],
            ),
            row(
                "no last chunk, cut",
                post("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n"),
                &[BAD],
            ),
            // §7.1.2: trailer-section = *( field-line CRLF ), then CRLF.
            row(
                "trailer field",
                chunked("5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "two trailer fields",
                chunked("0\r\nX-T: 1\r\nX-U: 2\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "bare LF after the last chunk",
                chunked("5\r\nhello\r\n0\r\n\n"),
                &[BAD],
            ),
            row(
                "NUL after the last chunk",
                chunked("5\r\nhello\r\n0\r\n\0\r\n"),
                &[BAD],
            ),
            row(
                "bare LF ending a trailer",
                chunked("0\r\nX-T: 1\n\r\n"),
                &[BAD],
            ),
            row("NUL in a trailer", chunked("0\r\nX-T: \0\r\n\r\n"), &[BAD]),
            row("bare CR ending the trailers", chunked("0\r\n\rX"), &[BAD]),
            row(
                "trailer section over 16 KiB",
                chunked(&big_trailers),
                &[BAD],
            ),
            row(
                "last chunk without the final CRLF, cut",
                post("Transfer-Encoding: chunked\r\n", "0\r\n"),
                &[BAD],
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn section_9_3_persistence() {
    check(
        "§9.3",
        vec![
            // §9.3: "HTTP/1.1 defaults to the use of "persistent connections", allowing multiple
            // requests and responses to be carried over a single connection."
            row("HTTP/1.1 persists", then_next("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), &[OK, OK]),
            // §9.6: "A server that receives a "close" connection option MUST initiate closure
            // of the connection after it sends the final response to the request that
            // contained the "close" connection option. The server SHOULD send a "close"
            // connection option in its final response on that connection. The server MUST NOT
            // process any further requests received on that connection."
            row(
                "Connection: close",
                then_next("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
                &[OK_CLOSE],
            ),
            row(
                "close among other options, any case",
                then_next("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, CLOSE\r\n\r\n"),
                &[OK_CLOSE],
            ),
            // §9.3: "If the received protocol is HTTP/1.0, the "keep-alive" connection option is
            // present, either the recipient is not a proxy or the message is a response, and the
            // recipient wishes to honor the HTTP/1.0 "keep-alive" mechanism, the connection will
            // persist after the current response; otherwise, the connection will close after the
            // current response."
            row("HTTP/1.0 closes", then_next("GET / HTTP/1.0\r\nHost: a\r\n\r\n"), &[OK_CLOSE]),
            row(
                "HTTP/1.0 keep-alive",
                then_next("GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"),
                &[OK, OK],
            ),
            row(
                "HTTP/1.0 keep-alive and close",
                then_next("GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n"),
                &[OK_CLOSE],
            ),
            row(
                "HTTP/1.0 keep-alive, POST with a length",
                then_next(
                    "POST / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello",
                ),
                &[OK, OK],
            ),
            // §9.3.2: "A server MAY process a sequence of pipelined requests in parallel if they
            // all have safe methods, but it MUST send the corresponding responses in the same
            // order that the requests were received." (Order is checked on the echoes in a test
            // of its own.)
            row(
                "three pipelined, length and chunked",
                [
                    post("Content-Length: 5\r\n", "hello"),
                    post("Transfer-Encoding: chunked\r\n", "5\r\nworld\r\n0\r\n\r\n"),
                    NEXT.to_string(),
                ]
                .concat(),
                &[OK, OK, OK],
            ),
            // A request the handler refused from its head, with a body the engine can frame: the
            // body is read and dropped, and the connection goes on.
            row(
                "refused, body drained",
                then_next("POST /refuse HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"),
                &[(403, false), OK],
            ),
            // A malformed request in the middle: what follows it is never read as a request.
            row(
                "malformed in the middle",
                [
                    NEXT,
                    "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                    NEXT,
                ]
                .concat(),
                &[OK, BAD],
            ),
        ],
    )
    .await;
}

/// §9.3.2: answers come in the order of the requests, each with its own body.
#[tokio::test]
async fn section_9_3_2_pipelined_answers_in_order() {
    let input = [
        post("Content-Length: 5\r\n", "first"),
        post(
            "Transfer-Encoding: chunked\r\n",
            "3\r\nsec\r\n3\r\nond\r\n0\r\nX-T: 1\r\n\r\n",
        ),
        "GET /third?x HTTP/1.1\r\nHost: c\r\n\r\n".to_string(),
    ]
    .concat();
    let seen = exchange(input.as_bytes()).await;
    let texts: Vec<String> = seen.iter().map(crate::Seen::text).collect();
    assert_eq!(
        texts,
        [
            "POST / host=a\nfirst",
            "POST / host=a\nsecond",
            "GET /third?x host=c\n"
        ]
    );
}
