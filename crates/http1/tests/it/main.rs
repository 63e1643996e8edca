//! The engine on the wire: raw request bytes into [`http1::server::serve`], the answers it
//! writes parsed back. The handler is the smallest that shows what the engine handed it (an echo
//! of method, target, `Host` and body), so that every test speaks of the engine alone.
//!
//! - `holes`: one test per framing hole found by the differential test against nginx and
//!   HAProxy.
//! - `rfc9112`: the framing rules, table-driven, one table per section of RFC 9112.
//! - `splits`: property tests: any split of the input into reads gives the same answers.

mod holes;
mod rfc9112;
mod splits;

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::StatusCode;
use http1::handler::{Answer, BodyError, BodyLimits, Exchange, Handler, Refused};
use http1::server::{serve, Timeouts};
use http1::timer::Deadline;
use http1::{Reply, RequestHead};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

/// The largest body the test handler takes: small, so that the limit is easy to cross.
pub const MAX_BODY: u64 = 64 * 1024;

/// Long enough never to fire in a test that does not wait for it: every test ends its input,
/// and the engine sees the end.
const TIMEOUTS: Timeouts = Timeouts {
    header: Duration::from_secs(10),
    idle: Duration::from_secs(10),
    period: Duration::from_secs(1),
};

/// The peer, for the engine's debug logs.
pub struct Peer;

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("test peer")
    }
}

/// Admits every request but `/refuse` (403, body drained) and answers 200 with
/// `METHOD target host=HOST\n` and the body it was given.
pub struct Echo;

impl Handler for Echo {
    type Conn = Peer;
    type Admitted = ();
    type State = ();
    type Detail = ();

    fn limits(&self) -> BodyLimits {
        BodyLimits {
            max_body: MAX_BODY,
            body_timeout: Duration::from_secs(10),
        }
    }

    fn admit(&self, head: &RequestHead<'_>, _: &Peer, _: Option<u64>) -> Result<(), Refused> {
        if head.path() == "/refuse" {
            return Err(Refused {
                reply: Reply::plain(StatusCode::FORBIDDEN, "refused\n"),
                drain: true,
            });
        }
        Ok(())
    }

    async fn respond(
        &self,
        head: &RequestHead<'_>,
        body: &[u8],
        _: &Peer,
        _: &(),
        _: &mut (),
        _: &mut Deadline,
    ) -> Answer<()> {
        let host = head.authority.map(str::as_bytes).or(head.field("host"));
        let mut echo = format!(
            "{} {} host={}\n",
            head.method,
            head.path_and_query,
            String::from_utf8_lossy(host.unwrap_or(b"-"))
        )
        .into_bytes();
        echo.extend_from_slice(body);
        let mut reply = Reply::plain(StatusCode::OK, "");
        reply.body = echo.into();
        Answer {
            reply,
            ready: None,
            detail: (),
        }
    }

    fn body_refused(&self, error: BodyError) -> Reply {
        match error {
            BodyError::TooLarge => Reply::plain(StatusCode::PAYLOAD_TOO_LARGE, "too large\n"),
            BodyError::Timeout => Reply::plain(StatusCode::REQUEST_TIMEOUT, "timeout\n"),
            BodyError::Malformed => Reply::plain(StatusCode::BAD_REQUEST, "malformed body\n"),
        }
    }

    fn log(&self, _: &Peer, _: Option<&()>, _: Exchange<'_, '_, ()>) {}
}

/// One answer as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The status.
    pub status: u16,
    /// The answer says `connection: close`: the engine closes after it.
    pub close: bool,
    /// The body (the echo, for a served request).
    pub body: Vec<u8>,
}

impl Seen {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Serves `input` over an in-memory duplex pipe: the client writes it all and ends its side,
/// then reads until the engine closes. The final answers (interim `1xx` left out), in order.
pub async fn exchange(input: &[u8]) -> Vec<Seen> {
    let (mut client, server) = tokio::io::duplex(4 << 20);
    let (_stop, mut shutdown) = watch::channel(false);
    let served = serve(server, &Echo, &Peer, TIMEOUTS, &mut shutdown);
    let talk = async {
        // The engine may refuse and close before it read everything: not an error.
        let _ = client.write_all(input).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        out
    };
    let ((), out) = tokio::join!(served, talk);
    parse_answers(&out)
}

/// [`exchange`] on a fresh runtime, for property tests.
pub fn exchange_blocking(pieces: Vec<Vec<u8>>) -> Vec<Seen> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(exchange_in_pieces(pieces))
}

/// Serves `pieces` with one read per piece (a read takes at most one piece, or the part of it
/// the engine has room for), then the end of the input: read boundaries exactly where the
/// pieces end, which a pipe or socket cannot promise.
pub async fn exchange_in_pieces(pieces: Vec<Vec<u8>>) -> Vec<Seen> {
    let mut io = Pieces {
        pieces: pieces.into_iter().filter(|p| !p.is_empty()).collect(),
        out: Vec::new(),
    };
    let (_stop, mut shutdown) = watch::channel(false);
    serve(&mut io, &Echo, &Peer, TIMEOUTS, &mut shutdown).await;
    parse_answers(&io.out)
}

/// A client connection that delivers its input in given pieces and records what is written.
struct Pieces {
    pieces: VecDeque<Vec<u8>>,
    out: Vec<u8>,
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(front) = self.pieces.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.drain(..n);
            if front.is_empty() {
                self.pieces.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Pieces {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The answers in `out`, interim ones left out. Fails the test on anything but well-formed
/// answers framed by `Content-Length`, or on an answer after one that announced the close.
pub fn parse_answers(mut out: &[u8]) -> Vec<Seen> {
    let mut seen: Vec<Seen> = Vec::new();
    while !out.is_empty() {
        assert!(
            !seen.last().is_some_and(|s| s.close),
            "bytes after an answer with connection: close: {:?}",
            String::from_utf8_lossy(out)
        );
        let end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("answer head: {:?}", String::from_utf8_lossy(out)));
        let head = std::str::from_utf8(&out[..end]).expect("ASCII answer head");
        out = &out[end + 4..];
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.strip_prefix("HTTP/1.1 "))
            .and_then(|l| l.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line of {head:?}"));
        let (mut length, mut close) = (0, false);
        for line in lines {
            let (name, value) = line.split_once(": ").expect("header line");
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().expect("content-length");
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        if (100..200).contains(&status) {
            continue;
        }
        seen.push(Seen {
            status,
            close,
            body: out[..length].to_vec(),
        });
        out = &out[length..];
    }
    seen
}

/// `(status, close)` of each answer, for tables.
pub fn outline(seen: &[Seen]) -> Vec<(u16, bool)> {
    seen.iter().map(|s| (s.status, s.close)).collect()
}
