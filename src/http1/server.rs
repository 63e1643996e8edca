//! HTTP/1.1 on a client connection: one task reads a request, has [`Proxy`] answer it and
//! writes the answer, then the next; no channels, no second task.
//!
//! Strict where request smuggling lives: a request with both `Transfer-Encoding` and
//! `Content-Length`, differing lengths, an unknown transfer coding, bad chunking or two `Host`
//! fields is refused and the connection closed. Bounded everywhere: the head (64 KiB, 100
//! fields) within `--header-timeout`, the body within `--max-body` and `--body-timeout`, the
//! wait for the next request within `--idle-timeout`.

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::timeout_at;

use super::chunked::Decoder;
use super::{spans_of, FieldSpan, Framing, FramingError, FramingFields, Reply, RequestHead};
use crate::proxy::{ConnInfo, Proxy, Refusal};

/// Largest request head (request line and fields) accepted; an EWS notification's head is well
/// under 2 KiB.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Most header fields in one request.
pub const MAX_REQUEST_HEADERS: usize = 100;
/// Read size: a whole notification (3–8 KiB) usually arrives in one read.
const READ_CHUNK: usize = 8 * 1024;
/// The first read of a connection.
const FIRST_READ: usize = 1024;
/// Buffers that grew beyond this for one large message are given back afterwards.
const KEEP_BUFFER: usize = 64 * 1024;

/// The timeouts of a client connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From the first byte of a request (or the handshake, for the first) to its whole head.
    pub header: Duration,
    /// Between requests on a kept-alive connection.
    pub idle: Duration,
}

/// A request head parsed in the read buffer, its fields' places in `Conn::spans`.
struct Parsed {
    len: usize,
    method: (usize, usize),
    target: (usize, usize),
    http10: bool,
    framing: Result<Framing, FramingError>,
    keep_alive: bool,
    expect_continue: bool,
    hosts: u32,
}

/// Why no request head could be read.
enum HeadError {
    /// The client closed or broke the connection, or stayed silent too long: nothing to answer.
    Gone,
    /// An answer to send before closing.
    Answer(StatusCode, &'static str),
}

struct Conn<'a, S> {
    io: S,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    spans: Vec<FieldSpan>,
    proxy: &'a Proxy,
    info: &'a ConnInfo,
    timeouts: Timeouts,
    /// Shutdown has begun: finish the request in progress, then close.
    closing: bool,
}

/// Serves requests on `io` until the client closes, a timeout or error ends the connection, or
/// shutdown begins (the request in progress is finished first).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    proxy: &Proxy,
    info: &ConnInfo,
    timeouts: Timeouts,
    shutdown: &mut watch::Receiver<bool>,
) {
    let mut conn = Conn {
        io,
        // Allocated at the first read and write: an idle connection holds only TLS state.
        rbuf: BytesMut::new(),
        wbuf: Vec::new(),
        spans: Vec::new(),
        proxy,
        info,
        timeouts,
        closing: *shutdown.borrow(),
    };
    let mut first = true;
    loop {
        let parsed = match conn.read_head(first, shutdown).await {
            Ok(Some(p)) => p,
            Ok(None) | Err(HeadError::Gone) => return,
            Err(HeadError::Answer(status, text)) => {
                conn.answer_and_close(Reply::plain(status, text)).await;
                return;
            }
        };
        first = false;
        // Boxed: an idle connection's task then holds only what waiting for a head needs,
        // not the state of a request in flight (one allocation per request).
        if !Box::pin(conn.serve_one(parsed)).await || conn.closing {
            let _ = conn.io.shutdown().await;
            return;
        }
        if conn.rbuf.capacity() > KEEP_BUFFER && conn.rbuf.is_empty() {
            conn.rbuf = BytesMut::with_capacity(READ_CHUNK);
        }
        if conn.wbuf.capacity() > KEEP_BUFFER {
            conn.wbuf = Vec::with_capacity(1024);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<'_, S> {
    /// Reads until a whole head is buffered. `Ok(None)`: the connection ended cleanly between
    /// requests (client close, idle timeout, shutdown).
    async fn read_head(
        &mut self,
        first: bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<Parsed>, HeadError> {
        // Before a request's first byte the connection is idle (for the first request, at most
        // --header-timeout either); from that byte the head has --header-timeout to arrive.
        let mut started = !self.rbuf.is_empty();
        let mut deadline = Instant::now()
            + if started {
                self.timeouts.header
            } else if first {
                self.timeouts.idle.min(self.timeouts.header)
            } else {
                self.timeouts.idle
            };
        loop {
            if !self.rbuf.is_empty() {
                if let Some(parsed) = self.parse_head()? {
                    return Ok(Some(parsed));
                }
                if self.rbuf.len() >= MAX_REQUEST_HEAD {
                    return Err(HeadError::Answer(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request head larger than 64 KiB\n",
                    ));
                }
            } else if self.closing {
                return Ok(None);
            }
            if self.rbuf.capacity() == 0 {
                // A new connection may stay silent: as nginx does, hold only a small buffer
                // until its first bytes arrive.
                self.rbuf.reserve(FIRST_READ);
            } else if self.rbuf.capacity() - self.rbuf.len() < 1024 {
                self.rbuf.reserve(READ_CHUNK);
            }
            let read = tokio::select! {
                biased;
                r = timeout_at(deadline.into(), self.io.read_buf(&mut self.rbuf)) => r,
                _ = shutdown.changed(), if !self.closing => {
                    self.closing = true;
                    continue;
                }
            };
            match read {
                Err(_) => {
                    if started {
                        tracing::debug!(peer = %self.info.peer, "request head not received within --header-timeout");
                    } else {
                        tracing::debug!(peer = %self.info.peer, "idle timeout");
                    }
                    return Ok(None);
                }
                Ok(Ok(0)) => {
                    if !self.rbuf.is_empty() {
                        tracing::debug!(peer = %self.info.peer, "client closed inside a request head");
                    }
                    return Ok(None);
                }
                Ok(Ok(_)) => {
                    if !started {
                        started = true;
                        deadline = Instant::now() + self.timeouts.header;
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.info.peer, error = %e, "client connection failed");
                    return Err(HeadError::Gone);
                }
            }
        }
    }

    /// Parses the head at the start of the read buffer if it is complete.
    fn parse_head(&mut self) -> Result<Option<Parsed>, HeadError> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        let buf = &self.rbuf[..];
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) if len > MAX_REQUEST_HEAD => {
                return Err(HeadError::Answer(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request head larger than 64 KiB\n",
                ))
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(HeadError::Answer(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "more than 100 header fields\n",
                ))
            }
            Err(e) => {
                tracing::debug!(peer = %self.info.peer, error = %e, "malformed request head");
                return Err(HeadError::Answer(
                    StatusCode::BAD_REQUEST,
                    "malformed request head\n",
                ));
            }
        };
        let method = req.method.unwrap_or_default();
        let target = req.path.unwrap_or_default();
        let http10 = req.version == Some(0);
        let mut framing = FramingFields::default();
        let (mut close, mut keep_alive_token, mut expect_continue, mut hosts) =
            (false, false, false, 0);
        for f in req.headers.iter() {
            let name = f.name.as_bytes();
            if framing.see(name, f.value) {
                continue;
            }
            if name.eq_ignore_ascii_case(b"connection") {
                for token in super::list_elements(f.value) {
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if name.eq_ignore_ascii_case(b"host") {
                hosts += 1;
            } else if name.eq_ignore_ascii_case(b"expect") {
                expect_continue = f.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
        }
        let framing = match framing.request() {
            // HTTP/1.0 has no chunked coding: a Transfer-Encoding there is a smuggling attempt.
            Ok(Framing::Chunked) if http10 => Err(FramingError::UnsupportedCoding),
            other => other,
        };
        let parsed = Parsed {
            len,
            method: (
                super::offset_in(buf, method.as_bytes()),
                super::offset_in(buf, method.as_bytes()) + method.len(),
            ),
            target: (
                super::offset_in(buf, target.as_bytes()),
                super::offset_in(buf, target.as_bytes()) + target.len(),
            ),
            http10,
            framing,
            keep_alive: if http10 {
                keep_alive_token && !close
            } else {
                !close
            },
            expect_continue: expect_continue && !http10,
            hosts,
        };
        spans_of(buf, req.headers, &mut self.spans);
        Ok(Some(parsed))
    }

    /// Serves the request whose head was just parsed; false when the connection must close.
    async fn serve_one(&mut self, p: Parsed) -> bool {
        let start = Instant::now();
        let spans = std::mem::take(&mut self.spans);
        let keep = self.serve_parsed(&p, &spans, start).await;
        self.spans = spans;
        keep
    }

    async fn serve_parsed(&mut self, p: &Parsed, spans: &[FieldSpan], start: Instant) -> bool {
        let (proxy, base) = (self.proxy, self.info);
        // The head leaves the buffer; the body, if any, is now at its front.
        let message = self.rbuf.split_to(p.len);
        let Some(head) = request_head(&message, p, spans) else {
            let raw = RequestHead::new(
                str_at(&message, p.method),
                str_at(&message, p.target),
                None,
                &message,
                spans,
            );
            let reply = Reply::plain(StatusCode::BAD_REQUEST, "invalid request target\n");
            self.answer(&raw, reply, false, false, start, 0, None, base)
                .await;
            return false;
        };
        let head_only = head.method == "HEAD";
        if p.hosts > 1 || (p.hosts == 0 && !p.http10) {
            let reply = Reply::plain(
                StatusCode::BAD_REQUEST,
                "exactly one Host header field required\n",
            );
            self.answer(&head, reply, false, head_only, start, 0, None, base)
                .await;
            return false;
        }
        let framing = match p.framing {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(peer = %base.peer, error = %e, "request framing refused");
                let reply = match e {
                    FramingError::UnsupportedCoding => Reply::plain(
                        StatusCode::NOT_IMPLEMENTED,
                        "transfer coding not supported\n",
                    ),
                    _ => Reply::plain(StatusCode::BAD_REQUEST, "invalid message framing\n"),
                };
                self.answer(&head, reply, false, head_only, start, 0, None, base)
                    .await;
                return false;
            }
        };
        let declared = match framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        let named = match proxy.admit(&head, base, declared) {
            Ok(named) => named,
            Err(refusal) => {
                // The body is read and dropped so the connection can go on, unless it is too
                // large or a client waiting for `100 Continue` may or may not send it.
                let drain = refusal != Refusal::TooLarge
                    && !(p.expect_continue && self.rbuf.is_empty() && declared != Some(0));
                let keep = p.keep_alive && drain && self.read_body(framing).await.is_ok();
                return self
                    .answer(
                        &head,
                        refusal.reply(),
                        keep,
                        head_only,
                        start,
                        0,
                        None,
                        base,
                    )
                    .await
                    && keep;
            }
        };
        let info = named.as_ref().unwrap_or(base);
        if p.expect_continue && self.rbuf.is_empty() && declared != Some(0) {
            if let Err(e) = write_flush(&mut self.io, b"HTTP/1.1 100 Continue\r\n\r\n").await {
                tracing::debug!(peer = %base.peer, error = %e, "client connection failed");
                return false;
            }
        }
        let body = match self.read_body(framing).await {
            Ok(body) => body,
            Err(refusal) => {
                self.answer(
                    &head,
                    refusal.reply(),
                    false,
                    head_only,
                    start,
                    0,
                    None,
                    info,
                )
                .await;
                return false;
            }
        };
        let bytes_in = body.len();
        let relayed = proxy.relay(&head, body, info).await;
        self.answer(
            &head,
            relayed.reply,
            p.keep_alive,
            head_only,
            start,
            bytes_in,
            relayed.upstream_ms,
            info,
        )
        .await
            && p.keep_alive
    }

    /// Writes the answer and logs the request; false if the write failed.
    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &mut self,
        head: &RequestHead<'_>,
        reply: Reply,
        keep: bool,
        head_only: bool,
        start: Instant,
        bytes_in: usize,
        upstream_ms: Option<f64>,
        info: &ConnInfo,
    ) -> bool {
        let close = !keep || self.closing;
        self.wbuf.clear();
        reply.write_to(&mut self.wbuf, close, head_only);
        let result = write_flush(&mut self.io, &self.wbuf).await;
        self.proxy.log(
            info,
            head,
            reply.status,
            bytes_in,
            reply.body.len(),
            start,
            upstream_ms,
        );
        if let Err(e) = result {
            tracing::debug!(peer = %info.peer, error = %e, "client connection failed while answering");
            return false;
        }
        true
    }

    /// Answers an unparseable request and closes the connection.
    async fn answer_and_close(&mut self, reply: Reply) {
        self.wbuf.clear();
        reply.write_to(&mut self.wbuf, true, false);
        let _ = write_flush(&mut self.io, &self.wbuf).await;
        self.proxy.log_unparsed(self.info, reply.status);
        let _ = self.io.shutdown().await;
    }

    /// Reads the body at the front of the buffer and takes it out, leaving whatever follows.
    async fn read_body(&mut self, framing: Framing) -> Result<Bytes, Refusal> {
        let deadline = Instant::now() + self.proxy.body_timeout();
        match framing {
            Framing::Length(0) => Ok(Bytes::new()),
            Framing::Length(n) => {
                // admit() checked n against --max-body.
                let n = usize::try_from(n).map_err(|_| Refusal::TooLarge)?;
                while self.rbuf.len() < n {
                    let missing = n - self.rbuf.len();
                    if self.rbuf.capacity() - self.rbuf.len() < missing.min(READ_CHUNK) {
                        // Grown as bytes arrive, not as declared: a slow client declaring
                        // --max-body holds only what it sent.
                        self.rbuf.reserve(missing.min(4 * READ_CHUNK));
                    }
                    self.fill(deadline).await?;
                }
                Ok(self.rbuf.split_to(n).freeze())
            }
            Framing::Chunked => {
                let mut decoder = Decoder::new(self.proxy.max_body());
                let mut body = Vec::new();
                loop {
                    let used = decoder.decode(&self.rbuf, &mut body).map_err(|e| match e {
                        super::chunked::ChunkedError::TooLarge => Refusal::TooLarge,
                        e => {
                            tracing::debug!(peer = %self.info.peer, error = %e, "chunked body refused");
                            Refusal::BadBody
                        }
                    })?;
                    self.rbuf.advance(used);
                    if decoder.is_done() {
                        return Ok(Bytes::from(body));
                    }
                    if self.rbuf.capacity() - self.rbuf.len() < 1024 {
                        self.rbuf.reserve(READ_CHUNK);
                    }
                    self.fill(deadline).await?;
                }
            }
            Framing::UntilClose => unreachable!("requests are never framed by close"),
        }
    }

    /// One read into the buffer before `deadline`.
    async fn fill(&mut self, deadline: Instant) -> Result<(), Refusal> {
        match timeout_at(deadline.into(), self.io.read_buf(&mut self.rbuf)).await {
            Err(_) => Err(Refusal::BodyTimeout),
            Ok(Ok(0)) => {
                tracing::debug!(peer = %self.info.peer, "client closed inside a request body");
                Err(Refusal::BadBody)
            }
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.info.peer, error = %e, "client connection failed inside a request body");
                Err(Refusal::BadBody)
            }
        }
    }
}

async fn write_flush<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

fn str_at(bytes: &[u8], (start, end): (usize, usize)) -> &str {
    // httparse only accepts token methods and visible-ASCII targets.
    std::str::from_utf8(&bytes[start..end]).unwrap_or_default()
}

/// The head of a parsed request, with its target in origin form; `None` for a target that is
/// neither origin form (`/path`) nor absolute form (`http://host/path`).
fn request_head<'a>(
    bytes: &'a [u8],
    p: &Parsed,
    spans: &'a [FieldSpan],
) -> Option<RequestHead<'a>> {
    let method = str_at(bytes, p.method);
    let target = str_at(bytes, p.target);
    let (path, authority) = if target.starts_with('/') {
        (target, None)
    } else {
        let rest = strip_scheme(target)?;
        let split = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.is_empty() || authority.contains(['?', '#']) {
            return None;
        }
        (if path.is_empty() { "/" } else { path }, Some(authority))
    };
    Some(RequestHead::new(method, path, authority, bytes, spans))
}

fn strip_scheme(target: &str) -> Option<&str> {
    for scheme in ["http://", "https://"] {
        if target.len() > scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(&target[scheme.len()..]);
        }
    }
    None
}
