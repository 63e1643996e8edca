//! A strict, bounded HTTP/1.1 server engine, generic over a request [`Handler`], and the
//! message pieces a client of the same protocol needs (framing, chunked decoding, header
//! blocks, answers).
//!
//! Heads are parsed by `httparse` (the parser under hyper); what is here is framing, limits,
//! timeouts and serialization, done in the connection's own task with one read and one write
//! per message where the peer allows. The engine knows nothing of what it serves: the
//! application is a [`Handler`], which admits a request from its head and answers it once the
//! engine has read its body.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chunked;
pub mod handler;
pub mod server;
pub mod timer;

pub use handler::{Answer, BodyError, BodyLimits, Exchange, Handler, Refused};

use std::cell::RefCell;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Header fields that describe one hop and are never forwarded (RFC 9110 §7.6.1), in either
/// direction, besides the ones the `Connection` header names.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` is a hop-by-hop header field.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    // Lengths first: most names are ruled out without a comparison.
    matches!(name.len(), 2 | 7 | 10 | 16..=19)
        && HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// The comma-separated elements of a list-valued header field (`Connection`,
/// `Transfer-Encoding`), trimmed, empty elements dropped.
pub fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|e| !e.is_empty())
}

/// An RFC 9110 `tchar`: what header names and methods are made of.
fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// [`is_tchar`] as a table.
static TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    table
};

/// Whether `value` is an authority as `Host` and an absolute-form target carry it:
/// `uri-host [":" port]` (RFC 9112 §3.2, RFC 3986 §3.2.2 and §3.2.3), where `uri-host` is an
/// IP literal in brackets, an IPv4 address or a reg-name (unreserved, sub-delims and
/// percent-encoded bytes). Refused besides: an empty host (RFC 9110 §4.2.1: an `http` URI with
/// one is invalid), userinfo (`user@`, RFC 9110 §4.2.4), and a port above 65535. Whatever passes
/// is forwarded as `X-Forwarded-Host`, where `/`, `@` or white space would let a client point
/// the receiver's idea of its own address anywhere.
pub fn valid_authority(value: &[u8]) -> bool {
    let (host_ok, port) = if let Some(rest) = value.strip_prefix(b"[") {
        let Some(close) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        (valid_ip_literal(&rest[..close]), &rest[close + 1..])
    } else {
        let colon = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        let (host, port) = value.split_at(colon);
        (!host.is_empty() && valid_reg_name(host), port)
    };
    host_ok
        && match port {
            [] => true,
            [b':', digits @ ..] => valid_port(digits),
            _ => false,
        }
}

/// RFC 3986 `reg-name` (which IPv4 addresses are a case of).
fn valid_reg_name(host: &[u8]) -> bool {
    let mut i = 0;
    while i < host.len() {
        match host[i] {
            b'%' => {
                if !host
                    .get(i + 1..i + 3)
                    .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
                continue;
            }
            b if is_unreserved_or_sub_delim(b) => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// RFC 3986 `unreserved` and `sub-delims`.
fn is_unreserved_or_sub_delim(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}

/// The inside of RFC 3986 `IP-literal`: an IPv6 address (no zone) or `IPvFuture`.
fn valid_ip_literal(inside: &[u8]) -> bool {
    if let Some(future) = inside.strip_prefix(b"v").or(inside.strip_prefix(b"V")) {
        let Some(dot) = future.iter().position(|&b| b == b'.') else {
            return false;
        };
        let (version, rest) = (&future[..dot], &future[dot + 1..]);
        return !version.is_empty()
            && version.iter().all(u8::is_ascii_hexdigit)
            && !rest.is_empty()
            && rest
                .iter()
                .all(|&b| b == b':' || is_unreserved_or_sub_delim(b));
    }
    std::str::from_utf8(inside).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
}

/// RFC 3986 `port` (`*DIGIT`, empty allowed), within the 16 bits a TCP port has.
fn valid_port(digits: &[u8]) -> bool {
    digits.len() <= 5
        && digits.iter().all(u8::is_ascii_digit)
        && digits
            .iter()
            .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'))
            <= u32::from(u16::MAX)
}

/// Header field lines as they go on the wire, `name: value\r\n` each, in order.
///
/// Every push is checked (a token name, a value without CR, LF or NUL), so no header can
/// inject a line into a message the relay writes, whatever its origin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderBlock {
    lines: Vec<u8>,
    /// A `Date` field is among the lines: the writer of an answer need not add one.
    has_date: bool,
}

impl HeaderBlock {
    /// An empty block with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            lines: Vec::with_capacity(bytes),
            has_date: false,
        }
    }

    /// Removes every field, keeping the allocation.
    pub fn clear(&mut self) {
        self.lines.clear();
        self.has_date = false;
    }

    /// Appends `name: value`; returns false (and appends nothing) for a name that is not a
    /// token or a value with CR, LF or NUL.
    pub fn push(&mut self, name: &[u8], value: &[u8]) -> bool {
        if !valid_field(name, value) {
            return false;
        }
        self.push_parsed(name, value);
        true
    }

    /// Appends a field a parser already checked: from `httparse` (token names; values of
    /// tab, visible and obs-text bytes only) or from http's `HeaderName`/`HeaderValue`, or one
    /// the relay built from such values and constants. Skips the per-byte check of
    /// [`HeaderBlock::push`] on the hot path; debug builds still make it.
    pub fn push_parsed(&mut self, name: &[u8], value: &[u8]) {
        debug_assert!(valid_field(name, value), "unchecked header field");
        self.has_date |= name.len() == 4 && name.eq_ignore_ascii_case(b"date");
        self.lines.reserve(name.len() + value.len() + 4);
        self.lines.extend_from_slice(name);
        self.lines.extend_from_slice(b": ");
        self.lines.extend_from_slice(value);
        self.lines.extend_from_slice(b"\r\n");
    }

    /// The fields in order, as (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|&b| b == b':')?;
                Some((&line[..colon], line[colon + 2..].as_ref()))
            })
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The lines, ready to write after a start line.
    pub fn as_bytes(&self) -> &[u8] {
        &self.lines
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The same fields as a [`HeaderMap`], for hyper (HTTP/2) and the spool.
    pub fn to_header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in self.iter() {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                map.append(n, v);
            }
        }
        map
    }

    /// The fields of `map`, in its order.
    pub fn from_header_map(map: &HeaderMap) -> Self {
        let mut block = Self::with_capacity(map.len() * 32);
        for (name, value) in map {
            block.push_parsed(name.as_str().as_bytes(), value.as_bytes());
        }
        block
    }
}

/// A field the relay may write: a token name and a value without CR, LF or NUL.
fn valid_field(name: &[u8], value: &[u8]) -> bool {
    !name.is_empty()
        && name.iter().all(|&b| is_tchar(b))
        && memchr::memchr3(b'\r', b'\n', 0, value).is_none()
}

/// An answer, from the receiver or the relay itself: status, end-to-end header fields (no
/// framing or hop-by-hop ones: the writer adds those) and the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// End-to-end header fields.
    pub headers: HeaderBlock,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// An answer with `content-type: text/plain` and a static body.
    pub fn plain(status: StatusCode, text: &'static str) -> Self {
        let mut headers = HeaderBlock::with_capacity(48);
        headers.push(b"content-type", b"text/plain; charset=utf-8");
        Self {
            status,
            headers,
            body: Bytes::from_static(text.as_bytes()),
        }
    }

    /// The same answer for hyper (HTTP/2).
    pub fn into_response(self) -> http::Response<http_body_util::Full<Bytes>> {
        let mut r = http::Response::new(http_body_util::Full::new(self.body));
        *r.status_mut() = self.status;
        *r.headers_mut() = self.headers.to_header_map();
        r
    }

    /// Appends the whole message as HTTP/1.1 to `out`: status line, fields, `content-length`,
    /// `date` (of `now`) unless the fields have one, the `connection` field `connection` asks
    /// for, and the body unless it answers a HEAD request.
    pub fn write_to(
        &self,
        out: &mut Vec<u8>,
        connection: Connection,
        head_only: bool,
        now: Instant,
    ) {
        out.reserve(96 + self.headers.as_bytes().len() + self.body.len());
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(
            self.status
                .canonical_reason()
                .unwrap_or("Unknown")
                .as_bytes(),
        );
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.headers.as_bytes());
        if !no_body(self.status) {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(self.body.len()).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !self.headers.has_date {
            out.extend_from_slice(b"date: ");
            with_date(now, |d| out.extend_from_slice(d));
            out.extend_from_slice(b"\r\n");
        }
        match connection {
            Connection::Implied => {}
            Connection::Close => out.extend_from_slice(b"connection: close\r\n"),
            Connection::KeepAlive => out.extend_from_slice(b"connection: keep-alive\r\n"),
        }
        out.extend_from_slice(b"\r\n");
        if !head_only && !no_body(self.status) {
            out.extend_from_slice(&self.body);
        }
    }
}

/// The `Connection` field of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// None: HTTP/1.1 persists by default.
    Implied,
    /// `close`: the relay closes the connection after this answer.
    Close,
    /// `keep-alive`: an HTTP/1.0 client that asked for it may send another request.
    KeepAlive,
}

/// Statuses whose answers never carry a body (RFC 9112 §6.3).
pub fn no_body(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// The `Date` value of one second, and until when it is current.
struct CachedDate {
    until: Option<Instant>,
    text: [u8; 29],
}

thread_local! {
    /// The `Date` value, formatted and the wall clock read at most once a second per thread.
    static DATE: RefCell<CachedDate> = const {
        RefCell::new(CachedDate { until: None, text: [0; 29] })
    };
}

/// Calls `f` with the IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) of `now`, a monotonic time
/// the caller has at hand: the wall clock is read only when a new second begins.
pub fn with_date<R>(now: Instant, f: impl FnOnce(&[u8]) -> R) -> R {
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.until.is_none_or(|until| now >= until) {
            let wall = SystemTime::now();
            let text = httpdate::fmt_http_date(wall);
            if text.len() == 29 {
                cached.text.copy_from_slice(text.as_bytes());
                // Current until the wall clock's next second, as seen from `now`.
                let into_second = wall
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let left = Duration::from_nanos(u64::from(1_000_000_000 - into_second));
                cached.until = Some(now + left);
            }
        }
        f(&cached.text)
    })
}

/// Where a header field's name and value are in a head's bytes.
#[derive(Debug, Clone, Copy)]
pub struct FieldSpan {
    name: (u32, u32),
    value: (u32, u32),
}

/// A request head as received, borrowing its bytes: what a [`Handler`] routes and rewrites,
/// from this engine or another (HTTP/2) alike.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a str,
    /// Path and query (origin form), `/` at least.
    pub path_and_query: &'a str,
    /// The authority of an absolute-form target or HTTP/2 `:authority`.
    pub authority: Option<&'a str>,
    bytes: &'a [u8],
    fields: &'a [FieldSpan],
}

impl<'a> RequestHead<'a> {
    /// A head over `bytes`, whose fields are at `fields`.
    pub fn new(
        method: &'a str,
        path_and_query: &'a str,
        authority: Option<&'a str>,
        bytes: &'a [u8],
        fields: &'a [FieldSpan],
    ) -> Self {
        Self {
            method,
            path_and_query,
            authority,
            bytes,
            fields,
        }
    }

    /// The path without the query.
    pub fn path(&self) -> &'a str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query, |(p, _)| p)
    }

    /// The header fields in order, as (name, value).
    pub fn fields(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let bytes = self.bytes;
        self.fields.iter().map(move |f| {
            (
                &bytes[f.name.0 as usize..f.name.1 as usize],
                &bytes[f.value.0 as usize..f.value.1 as usize],
            )
        })
    }

    /// The first value of `name` (case-insensitive).
    pub fn field(&self, name: &str) -> Option<&'a [u8]> {
        self.fields()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }
}

/// Owned storage for a [`RequestHead`] built from parts (HTTP/2, tests).
#[derive(Debug, Default)]
pub struct OwnedFields {
    bytes: Vec<u8>,
    spans: Vec<FieldSpan>,
}

impl OwnedFields {
    /// The fields of `map`.
    pub fn from_header_map(map: &HeaderMap) -> Self {
        let mut me = Self::default();
        for (name, value) in map {
            me.push(name.as_str().as_bytes(), value.as_bytes());
        }
        me
    }

    /// Appends a field.
    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(name);
        let mid = self.bytes.len() as u32;
        self.bytes.extend_from_slice(value);
        let end = self.bytes.len() as u32;
        self.spans.push(FieldSpan {
            name: (start, mid),
            value: (mid, end),
        });
    }

    /// A head with these fields.
    pub fn head<'a>(
        &'a self,
        method: &'a str,
        path_and_query: &'a str,
        authority: Option<&'a str>,
    ) -> RequestHead<'a> {
        RequestHead::new(method, path_and_query, authority, &self.bytes, &self.spans)
    }
}

/// Records where httparse's `headers` are within `base`.
pub(crate) fn spans_of(base: &[u8], headers: &[httparse::Header<'_>], out: &mut Vec<FieldSpan>) {
    let start = base.as_ptr() as usize;
    out.clear();
    for h in headers {
        let name = h.name.as_ptr() as usize - start;
        let value = h.value.as_ptr() as usize - start;
        out.push(FieldSpan {
            name: (name as u32, (name + h.name.len()) as u32),
            value: (value as u32, (value + h.value.len()) as u32),
        });
    }
}

/// Offset of `part` within `base` (a sub-slice of it).
pub(crate) fn offset_in(base: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - base.as_ptr() as usize
}

/// How a message's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

/// Why a head's framing cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Both Transfer-Encoding and Content-Length: the classic request-smuggling vector.
    #[error("both Transfer-Encoding and Content-Length")]
    Both,
    /// Content-Length not a number, or several differing values.
    #[error("invalid Content-Length")]
    BadLength,
    /// Codings under a final `chunked` (`gzip, chunked`): framed, but not understood (501).
    #[error("unsupported transfer coding")]
    UnsupportedCoding,
    /// A Transfer-Encoding whose final coding is not `chunked`, or that applies `chunked` more
    /// than once, or that is empty: the body's length cannot be determined (RFC 9112 §6.3,
    /// MUST 400 and close).
    #[error("chunked is not the final transfer coding, once")]
    NotChunkedLast,
    /// Transfer-Encoding in an HTTP/1.0 message, which has no transfer codings: the framing
    /// is faulty (RFC 9112 §6.1).
    #[error("Transfer-Encoding in an HTTP/1.0 message")]
    Http10Coding,
}

/// Accumulates the framing fields of a head, one field at a time.
#[derive(Debug, Default)]
pub struct FramingFields {
    length: Option<u64>,
    bad_length: bool,
    /// A `Transfer-Encoding` field was seen, whatever its value: an empty one (or only `,` and
    /// blanks) is still a Transfer-Encoding field, one whose final coding is not `chunked`
    /// (RFC 9112 §6.3). Taken as absent, it would let a request framed by Content-Length
    /// through a hop that nginx and HAProxy refuse, and that another parser may frame apart.
    transfer_encoding: bool,
    codings: u32,
    chunked_last: bool,
    /// `chunked` appeared somewhere in the codings, last or not.
    chunked_seen: u32,
}

impl FramingFields {
    /// Takes in one field if it is `Content-Length` or `Transfer-Encoding`; returns whether it
    /// was one of them.
    pub fn see(&mut self, name: &[u8], value: &[u8]) -> bool {
        if name.len() == 14 && name.eq_ignore_ascii_case(b"content-length") {
            // `Content-Length: 5, 5` and repeated equal fields are one length.
            for element in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                match parse_length(element) {
                    Some(n) if self.length.is_none_or(|l| l == n) => self.length = Some(n),
                    _ => self.bad_length = true,
                }
            }
            true
        } else if name.len() == 17 && name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding = true;
            for coding in list_elements(value) {
                self.codings += 1;
                self.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
                self.chunked_seen += u32::from(self.chunked_last);
            }
            true
        } else {
            false
        }
    }

    /// Whether `name` is one of the fields [`FramingFields::see`] takes in.
    pub fn is_framing(name: &[u8]) -> bool {
        name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
    }

    /// The framing of a request: no length and no coding is an empty body.
    pub fn request(&self) -> Result<Framing, FramingError> {
        self.resolve(Framing::Length(0))
    }

    /// The framing of a response to a request that has a body in its answer.
    pub fn response(&self) -> Result<Framing, FramingError> {
        self.resolve(Framing::UntilClose)
    }

    fn resolve(&self, none: Framing) -> Result<Framing, FramingError> {
        if self.transfer_encoding {
            if self.length.is_some() || self.bad_length {
                return Err(FramingError::Both);
            }
            if !self.chunked_last || self.chunked_seen > 1 {
                return Err(FramingError::NotChunkedLast);
            }
            if self.codings == 1 {
                return Ok(Framing::Chunked);
            }
            return Err(FramingError::UnsupportedCoding);
        }
        if self.bad_length {
            return Err(FramingError::BadLength);
        }
        Ok(self.length.map_or(none, Framing::Length))
    }
}

/// `1*DIGIT`, nothing else (no sign, no white space inside), within u64.
fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_block_round_trip_and_refusals() {
        let mut b = HeaderBlock::default();
        assert!(b.push(b"Content-Type", b"text/xml"));
        assert!(b.push(b"x-empty", b""));
        assert!(!b.push(b"bad name", b"x"));
        assert!(!b.push(b"x-inject", b"a\r\nx-evil: 1"));
        assert!(!b.push(b"", b"x"));
        let fields: Vec<_> = b.iter().collect();
        assert_eq!(
            fields,
            vec![(&b"Content-Type"[..], &b"text/xml"[..]), (b"x-empty", b"")]
        );
        assert_eq!(b.get("content-type"), Some(&b"text/xml"[..]));
        assert_eq!(b.to_header_map().len(), 2);
    }

    #[test]
    fn hop_by_hop_and_tokens() {
        for h in HOP_BY_HOP {
            assert!(is_hop_by_hop(h.as_bytes()), "{h}");
            assert!(is_hop_by_hop(h.to_ascii_uppercase().as_bytes()), "{h}");
        }
        for not in ["content-type", "soapaction", "x-forwarded-for", "tee", ""] {
            assert!(!is_hop_by_hop(not.as_bytes()), "{not}");
        }
        let tokens: Vec<u8> = (0..=255u8).filter(|&b| is_tchar(b)).collect();
        assert_eq!(
            tokens,
            b"!#$%&'*+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz|~"
        );
    }

    #[test]
    fn framing_rules() {
        let framing = |fields: &[(&str, &str)]| {
            let mut f = FramingFields::default();
            for (n, v) in fields {
                f.see(n.as_bytes(), v.as_bytes());
            }
            f.request()
        };
        assert_eq!(framing(&[]), Ok(Framing::Length(0)));
        assert_eq!(
            framing(&[("Content-Length", "12")]),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing(&[("Content-Length", "12"), ("content-length", "12")]),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing(&[("Content-Length", "12, 12")]),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing(&[("Content-Length", "12"), ("content-length", "13")]),
            Err(FramingError::BadLength)
        );
        assert_eq!(
            framing(&[("Content-Length", "+5")]),
            Err(FramingError::BadLength)
        );
        assert_eq!(
            framing(&[("Content-Length", "")]),
            Err(FramingError::BadLength)
        );
        assert_eq!(
            framing(&[("Content-Length", "99999999999999999999")]),
            Err(FramingError::BadLength)
        );
        assert_eq!(
            framing(&[("Transfer-Encoding", "chunked")]),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing(&[("Transfer-Encoding", "Chunked ")]),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing(&[("Transfer-Encoding", "chunked"), ("Content-Length", "3")]),
            Err(FramingError::Both)
        );
        assert_eq!(
            framing(&[("Transfer-Encoding", "gzip, chunked")]),
            Err(FramingError::UnsupportedCoding)
        );
        // chunked twice, or not last: no length can be determined (RFC 9112 §6.3: 400, where
        // these were 501 before).
        assert_eq!(
            framing(&[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked")
            ]),
            Err(FramingError::NotChunkedLast)
        );
        assert_eq!(
            framing(&[("Transfer-Encoding", "chunked, identity")]),
            Err(FramingError::NotChunkedLast)
        );
        assert_eq!(
            framing(&[("Transfer-Encoding", "gzip")]),
            Err(FramingError::NotChunkedLast)
        );
        // Present but empty is present: no final `chunked`, and never with a length.
        for empty in ["", ",", " , "] {
            assert_eq!(
                framing(&[("Transfer-Encoding", empty)]),
                Err(FramingError::NotChunkedLast),
                "{empty:?}"
            );
            assert_eq!(
                framing(&[("Transfer-Encoding", empty), ("Content-Length", "3")]),
                Err(FramingError::Both),
                "{empty:?}"
            );
        }
        assert_eq!(
            framing(&[("Transfer-Encoding", "chunked,")]),
            Ok(Framing::Chunked)
        );
    }

    #[test]
    fn authorities() {
        for ok in [
            "example.com",
            "a.b-c_d~e!$&'()*+,;=",
            "%41b",
            "127.0.0.1:443",
            "h:",
            "h:65535",
            "[::1]",
            "[2001:db8::1]:8443",
            "[::ffff:1.2.3.4]",
            "[v1.fe:80]",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "a b",
            "a/b",
            "a@b",
            "a?b",
            "a#b",
            "a\"b",
            "%4",
            "%zz",
            "h:65536",
            "h:123456",
            "h:8x",
            "h:-1",
            "h:80:80",
            "[::1",
            "[::1]x",
            "[fe80::1%25eth0]",
            "[1.2.3.4]",
            "[v.x]",
            "[vz.x]",
            "[v1.]",
            "caf\u{e9}",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn date_is_read_once_a_second() {
        let now = Instant::now();
        let first = with_date(now, <[u8]>::to_vec);
        let text = std::str::from_utf8(&first).unwrap();
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
        let until = DATE.with(|c| c.borrow().until).unwrap();
        assert!(until > now && until <= now + Duration::from_secs(1));
        // Within the second: the cached text.
        assert_eq!(with_date(now, <[u8]>::to_vec), first);
        // Past it: the wall clock is read again and the cache moves on.
        let later = now + Duration::from_secs(2);
        with_date(later, |_| ());
        assert!(DATE.with(|c| c.borrow().until).unwrap() > later);
    }

    #[test]
    fn reply_serialization() {
        let mut out = Vec::new();
        Reply::plain(StatusCode::NOT_FOUND, "not found\n").write_to(
            &mut out,
            Connection::Close,
            false,
            Instant::now(),
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 10\r\ndate: "));
        assert!(text.ends_with("GMT\r\nconnection: close\r\n\r\nnot found\n"));
        let mut out = Vec::new();
        Reply::plain(StatusCode::METHOD_NOT_ALLOWED, "x").write_to(
            &mut out,
            Connection::Implied,
            true,
            Instant::now(),
        );
        assert!(out.ends_with(b"\r\n\r\n"));
    }
}
