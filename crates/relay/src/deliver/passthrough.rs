//! Passthrough: the request goes to the receiver (`--upstream`) as it came, its header fields
//! rewritten for one more hop, and the receiver's answer goes back to Exchange.

use std::time::Instant;

use http1::timer::Deadline;
use http1::{HeaderBlock, Reply, RequestHead};

use crate::client::ConnInfo;
use crate::receiver::{self, Receiver, UpstreamError};

/// Request header fields never forwarded besides the hop-by-hop ones: the relay frames the body
/// itself (`Content-Length`), already has it (`Expect`), names the receiver (`Host`) and writes
/// the `X-Forwarded-*` fields itself. [`request_field`] knows them by length; a test holds it to
/// this list.
#[cfg(test)]
const NOT_FORWARDED: [&str; 6] = [
    "content-length",
    "expect",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// What a client connection keeps from one request to the next for forwarding: the buffers a
/// forwarded request is written in.
#[derive(Debug, Default)]
pub struct Buffers {
    fields: HeaderBlock,
    head: Vec<u8>,
}

/// The receiver's exchange for one request.
#[derive(Debug)]
pub struct Forwarded {
    /// The receiver's answer, or why there is none.
    pub result: Result<Reply, UpstreamError>,
    /// When the request was sent.
    pub start: Instant,
    /// When the exchange ended (answer complete or failure).
    pub done: Instant,
}

/// Forwards a request to `receiver` within the connection's timer and returns its answer.
pub async fn forward(
    receiver: &Receiver,
    head: &RequestHead<'_>,
    body: &[u8],
    conn: &ConnInfo,
    buffers: &mut Buffers,
    deadline: &mut Deadline,
) -> Forwarded {
    buffers.fields.clear();
    forwarded_fields(head, conn, &mut buffers.fields);
    buffers.head.clear();
    receiver::write_request_head(
        &mut buffers.head,
        head.method,
        head.path_and_query,
        receiver.host_header().as_bytes(),
        &buffers.fields,
        body.len(),
    );
    let start = Instant::now();
    match receiver.send_by(&buffers.head, body, deadline, start).await {
        Ok((reply, done)) => Forwarded {
            result: Ok(reply),
            start,
            done,
        },
        Err(e) => Forwarded {
            result: Err(e),
            start,
            done: Instant::now(),
        },
    }
}

/// Appends to `out` the request's header fields as the receiver gets them (`Host` aside):
/// hop-by-hop fields, those `Connection` names, framing and `X-Forwarded-*` fields dropped;
/// `X-Forwarded-For` (appended to), `X-Forwarded-Proto: https` and `X-Forwarded-Host` (the
/// original host) written by the relay.
pub fn forwarded_fields(head: &RequestHead<'_>, conn: &ConnInfo, out: &mut HeaderBlock) {
    let mut named: Vec<&[u8]> = Vec::new();
    let mut prior_xff: Vec<&[u8]> = Vec::new();
    let mut host = head.authority.map(str::as_bytes);
    for (name, value) in head.fields() {
        match request_field(name) {
            RequestField::Connection => named.extend(http1::list_elements(value)),
            RequestField::ForwardedFor => prior_xff.push(value.trim_ascii()),
            RequestField::Host => host = host.or(Some(value)),
            RequestField::Dropped | RequestField::Forwarded => {}
        }
    }
    for (name, value) in head.fields() {
        if request_field(name) != RequestField::Forwarded
            || named.iter().any(|t| name.eq_ignore_ascii_case(t))
        {
            continue;
        }
        // Fields of a parsed request head: httparse (HTTP/1.1) or http (HTTP/2) checked them.
        out.push_parsed(name, value);
    }
    // Values already checked: an address the relay formatted, earlier values of parsed
    // fields, a constant, and the parsed Host or target authority.
    if prior_xff.is_empty() {
        out.push_parsed(b"x-forwarded-for", conn.peer.as_bytes());
    } else {
        let mut xff = prior_xff.join(&b", "[..]);
        xff.extend_from_slice(b", ");
        xff.extend_from_slice(conn.peer.as_bytes());
        out.push_parsed(b"x-forwarded-for", &xff);
    }
    out.push_parsed(b"x-forwarded-proto", b"https");
    if let Some(host) = host {
        out.push_parsed(b"x-forwarded-host", host);
    }
}

/// What the relay does with a request header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestField {
    /// Passed on to the receiver, unless `Connection` names it.
    Forwarded,
    /// Hop-by-hop or never forwarded (`Content-Length`, `Expect`, `X-Forwarded-Host` and
    /// `-Proto`), and no input to what is forwarded.
    Dropped,
    /// `Connection`: dropped, and names more fields to drop.
    Connection,
    /// `X-Forwarded-For`: dropped, its value carried into the relay's own.
    ForwardedFor,
    /// `Host`: dropped, its value sent as `X-Forwarded-Host`.
    Host,
}

/// Longest name [`named_field`] knows (`proxy-authorization`): a name with `_` longer than it
/// cannot alias one.
const LONGEST_DROPPED: usize = 19;

/// Classifies a request field name: hop-by-hop names, those never forwarded and the three the
/// relay reads. By length first, so that most names cost one comparison or none; a unit test
/// checks it against the two lists.
///
/// A name with `_` that reads as one of those with `-` for `_` (`Content_Length`,
/// `Transfer_Encoding`, `X_Forwarded_For`) is dropped as well: CGI, PHP and several WSGI and
/// Rack servers map both spellings to one variable (`HTTP_CONTENT_LENGTH`), so forwarded it
/// would reach such a receiver as the field the relay removed. Other names with `_` go on, as
/// some deployments use them; nginx drops them all by default, which the relay does not need
/// to (nothing else in a name aliases a field).
fn request_field(name: &[u8]) -> RequestField {
    match named_field(name) {
        RequestField::Forwarded if name.len() <= LONGEST_DROPPED && name.contains(&b'_') => {
            let mut dashed = [0u8; LONGEST_DROPPED];
            let dashed = &mut dashed[..name.len()];
            for (d, &b) in dashed.iter_mut().zip(name) {
                *d = if b == b'_' { b'-' } else { b };
            }
            match named_field(dashed) {
                RequestField::Forwarded => RequestField::Forwarded,
                _ => RequestField::Dropped,
            }
        }
        kind => kind,
    }
}

/// [`request_field`] for names as they are spelled.
fn named_field(name: &[u8]) -> RequestField {
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    let dropped = match name.len() {
        4 if is("host") => return RequestField::Host,
        10 if is("connection") => return RequestField::Connection,
        15 if is("x-forwarded-for") => return RequestField::ForwardedFor,
        2 => is("te"),
        6 => is("expect"),
        7 => is("upgrade") || is("trailer"),
        10 => is("keep-alive"),
        14 => is("content-length"),
        16 => is("proxy-connection") || is("x-forwarded-host"),
        17 => is("transfer-encoding") || is("x-forwarded-proto"),
        18 => is("proxy-authenticate"),
        19 => is("proxy-authorization"),
        _ => false,
    };
    if dropped {
        RequestField::Dropped
    } else {
        RequestField::Forwarded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_fields_follow_the_lists() {
        for name in http1::HOP_BY_HOP.iter().chain(&NOT_FORWARDED) {
            for spelled in [name.to_string(), name.to_ascii_uppercase()] {
                let kind = request_field(spelled.as_bytes());
                assert_ne!(kind, RequestField::Forwarded, "{spelled}");
                let expected = match *name {
                    "connection" => RequestField::Connection,
                    "x-forwarded-for" => RequestField::ForwardedFor,
                    "host" => RequestField::Host,
                    _ => RequestField::Dropped,
                };
                assert_eq!(kind, expected, "{spelled}");
            }
        }
        for name in [
            "content-type",
            "soapaction",
            "user-agent",
            "x-forwarded",
            "tee",
            "hosts",
        ] {
            assert_eq!(
                request_field(name.as_bytes()),
                RequestField::Forwarded,
                "{name}"
            );
        }
    }

    /// A name with `_` that is a dropped field's name once `_` reads `-` is dropped too: a
    /// receiver behind CGI, PHP or some WSGI servers folds both to `HTTP_CONTENT_LENGTH`, so
    /// `Content_Length` forwarded would reach it as the framing field the relay removed.
    #[test]
    fn underscore_aliases_of_dropped_fields_are_dropped() {
        for name in http1::HOP_BY_HOP.iter().chain(&NOT_FORWARDED) {
            if !name.contains('-') {
                continue;
            }
            for spelled in [
                name.replace('-', "_"),
                name.to_ascii_uppercase().replacen('-', "_", 1),
            ] {
                assert_eq!(
                    request_field(spelled.as_bytes()),
                    RequestField::Dropped,
                    "{spelled}"
                );
            }
        }
        for name in [
            "x_custom",
            "content_type",
            "soap_action",
            "_",
            "x_forwarded",
        ] {
            assert_eq!(
                request_field(name.as_bytes()),
                RequestField::Forwarded,
                "{name}"
            );
        }
    }

    #[test]
    fn underscore_aliases_are_not_forwarded() {
        let mut owned = http1::OwnedFields::default();
        for (n, v) in [
            ("Host", "example.com"),
            ("Content_Length", "5"),
            ("Transfer_Encoding", "chunked"),
            ("X_Forwarded_For", "6.6.6.6"),
            ("X_Forwarded_Host", "evil"),
            ("Proxy_Authorization", "Basic x"),
            ("X_Custom", "kept"),
        ] {
            owned.push(n.as_bytes(), v.as_bytes());
        }
        let head = owned.head("POST", "/ews", None);
        let mut out = HeaderBlock::default();
        forwarded_fields(&head, &ConnInfo::new([127, 0, 0, 1].into()), &mut out);
        let names: Vec<String> = out
            .iter()
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "X_Custom",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host"
            ]
        );
        assert_eq!(out.get("x-forwarded-for"), Some(&b"127.0.0.1"[..]));
        assert_eq!(out.get("x-forwarded-host"), Some(&b"example.com"[..]));
    }
}
