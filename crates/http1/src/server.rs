//! HTTP/1.1 on a client connection: one task reads a request, has the [`Handler`] answer it
//! and writes the answer, then the next; no channels, no second task.
//!
//! Strict where request smuggling lives: a request with both `Transfer-Encoding` and
//! `Content-Length`, differing lengths, an unknown transfer coding, bad chunking or two `Host`
//! fields is refused and the connection closed. Bounded everywhere: the head (64 KiB, 100
//! fields) within [`Timeouts::header`], the body within the handler's [`BodyLimits`], the wait
//! for the next request and the client's taking of an answer within [`Timeouts::idle`], all on
//! the connection's one timer ([`crate::timer`]).

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::chunked::{ChunkedError, Decoder};
use crate::handler::{Answer, BodyError, Exchange, Handler, Refused};
use crate::timer::Deadline;
use crate::{
    spans_of, Connection, FieldSpan, Framing, FramingError, FramingFields, Reply, RequestHead,
};

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
    /// Between requests on a kept-alive connection, and for writing an answer: a client that
    /// stops reading is dropped after it.
    pub idle: Duration,
    /// The shortest timeout the connection's timer serves (these two, the body timeout and
    /// whatever the handler waits for): how far ahead it is armed (see [`crate::timer`]).
    pub period: Duration,
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
    /// A `Host` value that is not `uri-host [":" port]` (RFC 9112 §3.2: 400).
    bad_host: bool,
}

/// Why no request head could be read.
enum HeadError {
    /// The client closed or broke the connection, or stayed silent too long: nothing to answer.
    Gone,
    /// An answer to send before closing.
    Answer(StatusCode, &'static str),
}

/// Where the body of the request in progress is.
enum Body {
    /// The first `n` bytes of the read buffer (`Content-Length`).
    Buffered(usize),
    /// Decoded from chunks; the read buffer no longer holds them.
    Decoded(Vec<u8>),
}

/// A request head's bytes and where its fields are in them; kept by the connection so that
/// their allocations serve every request.
#[derive(Default)]
struct Message {
    bytes: Vec<u8>,
    spans: Vec<FieldSpan>,
}

struct Conn<'a, S, H: Handler> {
    io: S,
    /// Bytes read and not yet used: the request in progress (its body, once its head is out),
    /// then whatever the client sent after it.
    rbuf: BytesMut,
    /// The head of the request in progress, moved out of `rbuf` so that its body starts there.
    head: Message,
    wbuf: Vec<u8>,
    /// The connection's one timer.
    deadline: Deadline,
    /// What the handler keeps between requests.
    state: H::State,
    handler: &'a H,
    info: &'a H::Conn,
    timeouts: Timeouts,
    /// Shutdown has begun: finish the request in progress, then close.
    closing: bool,
}

/// Serves requests on `io` until the client closes, a timeout or error ends the connection, or
/// shutdown begins (the request in progress is finished first).
///
/// Not an `async fn`: the connection is built here and moved once into the future, which holds
/// it in place. An `async fn` would keep its arguments and its locals apart, storing the TLS
/// stream (over a kilobyte) twice in every idle connection's task.
pub fn serve<'a, S: AsyncRead + AsyncWrite + Unpin + 'a, H: Handler>(
    io: S,
    handler: &'a H,
    info: &'a H::Conn,
    timeouts: Timeouts,
    shutdown: &'a mut watch::Receiver<bool>,
) -> impl Future<Output = ()> + 'a {
    let now = Instant::now();
    let mut conn = Conn {
        io,
        // Allocated at the first read and write: an idle connection holds only TLS state.
        rbuf: BytesMut::new(),
        head: Message::default(),
        wbuf: Vec::new(),
        deadline: Deadline::new(now.into(), timeouts.period),
        state: H::State::default(),
        handler,
        info,
        timeouts,
        closing: *shutdown.borrow(),
    };
    // Before a request's first byte the connection is idle (for the first request, at most
    // --header-timeout either).
    let mut idle_until = now + timeouts.idle.min(timeouts.header);
    async move {
        // One wait for shutdown for the connection's life: made per request, it would enter
        // and leave the signal's waiter list (a lock each) on every request.
        let mut shutdown = std::pin::pin!(shutdown.changed());
        loop {
            let parsed = match conn.read_head(idle_until, shutdown.as_mut()).await {
                Ok(Some(p)) => p,
                Ok(None) | Err(HeadError::Gone) => return,
                Err(HeadError::Answer(status, text)) => {
                    conn.answer_and_close(Reply::plain(status, text)).await;
                    return;
                }
            };
            let Some(done) = conn.serve_one(parsed).await else {
                let _ = conn.io.shutdown().await;
                return;
            };
            if conn.closing {
                let _ = conn.io.shutdown().await;
                return;
            }
            idle_until = done + timeouts.idle;
            if conn.rbuf.capacity() > KEEP_BUFFER && conn.rbuf.is_empty() {
                conn.rbuf = BytesMut::with_capacity(READ_CHUNK);
            }
            if conn.wbuf.capacity() > KEEP_BUFFER {
                conn.wbuf = Vec::with_capacity(1024);
            }
            if conn.head.bytes.capacity() > KEEP_BUFFER {
                conn.head = Message::default();
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, H: Handler> Conn<'_, S, H> {
    /// Reads until a whole head is buffered. `Ok(None)`: the connection ended cleanly between
    /// requests (client close, idle timeout, shutdown). Until a request's first byte the
    /// connection may wait until `idle_until`; from that byte the head has --header-timeout.
    async fn read_head(
        &mut self,
        idle_until: Instant,
        mut shutdown: Pin<&mut impl Future<Output = Result<(), watch::error::RecvError>>>,
    ) -> Result<Option<Parsed>, HeadError> {
        self.deadline.set(idle_until.into());
        // The head has --header-timeout from its first byte; the deadline is set (and the clock
        // read) only when the head did not come whole with it, as it usually does.
        let mut started = false;
        // Bytes at the front of the buffer known not to end a head: a head ends at a line
        // feed, and parsing again only when one arrived keeps a client that sends its head a
        // byte at a time from making the relay parse it once per byte.
        let mut scanned = 0;
        // The buffer's length when it was last parsed.
        let mut parsed_upto = 0;
        loop {
            if self.rbuf.len() > scanned {
                if memchr::memchr(b'\n', &self.rbuf[scanned..]).is_some() {
                    if let Some(parsed) = self.parse_head()? {
                        return Ok(Some(parsed));
                    }
                    parsed_upto = self.rbuf.len();
                }
                scanned = self.rbuf.len();
                if scanned >= MAX_REQUEST_HEAD {
                    return Err(HeadError::Answer(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request head larger than 64 KiB\n",
                    ));
                }
                if !started {
                    started = true;
                    self.deadline
                        .set((Instant::now() + self.timeouts.header).into());
                }
            } else if self.rbuf.is_empty() && self.closing {
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
                r = self.io.read_buf(&mut self.rbuf) => r,
                () = self.deadline.passed() => {
                    if started {
                        tracing::debug!(peer = %self.info, "request head not received within --header-timeout");
                    } else {
                        tracing::debug!(peer = %self.info, "idle timeout");
                    }
                    return Ok(None);
                }
                // Not polled again once it completed: `closing` stays set.
                _ = &mut shutdown, if !self.closing => {
                    self.closing = true;
                    continue;
                }
            };
            match read {
                Ok(0) => {
                    if self.rbuf.len() > parsed_upto {
                        // Bytes after the last line feed were never parsed (see `scanned`): a
                        // malformed head there gets its 400 as it would have in one read,
                        // rather than a silent close that depends on how the bytes arrived.
                        if let Some(parsed) = self.parse_head()? {
                            return Ok(Some(parsed));
                        }
                    }
                    if !self.rbuf.is_empty() {
                        tracing::debug!(peer = %self.info, "client closed inside a request head");
                    }
                    return Ok(None);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(peer = %self.info, error = %e, "client connection failed");
                    return Err(HeadError::Gone);
                }
            }
        }
    }

    /// Parses the head at the start of the read buffer if it is complete.
    fn parse_head(&mut self) -> Result<Option<Parsed>, HeadError> {
        let mut fields =
            [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_REQUEST_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let buf = &self.rbuf[..];
        let len = match req.parse_with_uninit_headers(buf, &mut fields) {
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
                tracing::debug!(peer = %self.info, error = %e, "malformed request head");
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
        let (mut close, mut keep_alive_token, mut expect_continue, mut hosts, mut bad_host) =
            (false, false, false, 0, false);
        for f in req.headers.iter() {
            let name = f.name.as_bytes();
            if framing.see(name, f.value) {
                continue;
            }
            match name.len() {
                10 if name.eq_ignore_ascii_case(b"connection") => {
                    for token in crate::list_elements(f.value) {
                        close |= token.eq_ignore_ascii_case(b"close");
                        keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
                    }
                }
                4 if name.eq_ignore_ascii_case(b"host") => {
                    hosts += 1;
                    bad_host |= !crate::valid_authority(f.value.trim_ascii());
                }
                6 if name.eq_ignore_ascii_case(b"expect") => {
                    expect_continue = f.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
                }
                _ => {}
            }
        }
        let framing = if http10 && framing.transfer_encoding {
            // HTTP/1.0 has no transfer codings: a Transfer-Encoding there is a smuggling
            // attempt, faulty framing whatever else the head says (RFC 9112 §6.1).
            Err(FramingError::Http10Coding)
        } else {
            framing.request()
        };
        let method_at = crate::offset_in(buf, method.as_bytes());
        let target_at = crate::offset_in(buf, target.as_bytes());
        let parsed = Parsed {
            len,
            method: (method_at, method_at + method.len()),
            target: (target_at, target_at + target.len()),
            http10,
            framing,
            keep_alive: if http10 {
                keep_alive_token && !close
            } else {
                !close
            },
            expect_continue: expect_continue && !http10,
            hosts,
            bad_host,
        };
        spans_of(buf, req.headers, &mut self.head.spans);
        Ok(Some(parsed))
    }

    /// Serves the request whose head was just parsed; `None` when the connection must close,
    /// else the time the answer was written.
    async fn serve_one(&mut self, p: Parsed) -> Option<Instant> {
        let start = Instant::now();
        // The head leaves the buffer, so that the body, if any, is at its front; it is taken
        // out of the connection for the request's time, so that one `RequestHead` borrowing it
        // serves routing, forwarding and the log.
        let mut message = std::mem::take(&mut self.head);
        message.bytes.clear();
        message.bytes.extend_from_slice(&self.rbuf[..p.len]);
        self.rbuf.advance(p.len);
        let (keep, done) = match request_head(&message.bytes, &p, &message.spans) {
            Some(head) => self.serve_parsed(&p, &head, start).await,
            None => {
                let head = RequestHead::new(
                    str_at(&message.bytes, p.method),
                    str_at(&message.bytes, p.target),
                    None,
                    &message.bytes,
                    &message.spans,
                );
                let reply = Reply::plain(StatusCode::BAD_REQUEST, "invalid request target\n");
                let (_, done) = self
                    .answer(&head, p.http10, reply, false, start, Served::refused(None))
                    .await;
                (false, done)
            }
        };
        self.head = message;
        keep.then_some(done)
    }

    /// Whether the connection can go on, and when the answer was written.
    async fn serve_parsed(
        &mut self,
        p: &Parsed,
        head: &RequestHead<'_>,
        start: Instant,
    ) -> (bool, Instant) {
        let (handler, base) = (self.handler, self.info);
        let verdict = if p.hosts > 1 || (p.hosts == 0 && !p.http10) {
            Err(Reply::plain(
                StatusCode::BAD_REQUEST,
                "exactly one Host header field required\n",
            ))
        } else if p.bad_host {
            Err(Reply::plain(
                StatusCode::BAD_REQUEST,
                "invalid Host header field\n",
            ))
        } else {
            p.framing.map_err(|e| {
                tracing::debug!(peer = %base, error = %e, "request framing refused");
                match e {
                    FramingError::UnsupportedCoding => Reply::plain(
                        StatusCode::NOT_IMPLEMENTED,
                        "transfer coding not supported\n",
                    ),
                    _ => Reply::plain(StatusCode::BAD_REQUEST, "invalid message framing\n"),
                }
            })
        };
        let framing = match verdict {
            Ok(f) => f,
            Err(reply) => {
                let (_, done) = self
                    .answer(head, p.http10, reply, false, start, Served::refused(None))
                    .await;
                return (false, done);
            }
        };
        let declared = match framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        // The client holds its body back until `100 Continue` (or until it tires of waiting).
        let awaits_continue = p.expect_continue && self.rbuf.is_empty() && declared != Some(0);
        let admitted = match handler.admit(head, base, declared) {
            Ok(admitted) => admitted,
            Err(Refused { reply, drain }) => {
                // The body is read and dropped so the connection can go on, unless it is too
                // large or a client waiting for `100 Continue` may or may not send it.
                let drain = drain && !awaits_continue;
                let keep = p.keep_alive
                    && drain
                    && match self.read_body(framing, start).await {
                        Ok(Body::Buffered(n)) => {
                            self.rbuf.advance(n);
                            true
                        }
                        Ok(Body::Decoded(_)) => true,
                        Err(_) => false,
                    };
                let (written, done) = self
                    .answer(head, p.http10, reply, keep, start, Served::refused(None))
                    .await;
                return (written && keep, done);
            }
        };
        if awaits_continue {
            self.wbuf.clear();
            self.wbuf
                .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            if !matches!(self.write_out(start).await, Some(Ok(()))) {
                tracing::debug!(peer = %base, "client connection failed or stalled before 100 Continue");
                return (false, start);
            }
        }
        let body = match self.read_body(framing, start).await {
            Ok(body) => body,
            Err(e) => {
                let reply = handler.body_refused(e);
                let (_, done) = self
                    .answer(
                        head,
                        p.http10,
                        reply,
                        false,
                        start,
                        Served::refused(Some(&admitted)),
                    )
                    .await;
                return (false, done);
            }
        };
        let bytes: &[u8] = match &body {
            Body::Buffered(n) => &self.rbuf[..*n],
            Body::Decoded(v) => v,
        };
        let bytes_in = bytes.len();
        let Answer {
            reply,
            ready,
            detail,
        } = handler
            .respond(
                head,
                bytes,
                base,
                &admitted,
                &mut self.state,
                &mut self.deadline,
            )
            .await;
        if let Body::Buffered(n) = body {
            self.rbuf.advance(n);
        }
        let served = Served {
            admitted: Some(&admitted),
            bytes_in,
            ready,
            detail: Some(&detail),
        };
        let (written, done) = self
            .answer(head, p.http10, reply, p.keep_alive, start, served)
            .await;
        (written && p.keep_alive, done)
    }

    /// Writes the answer within the idle timeout and logs the request; whether the write
    /// succeeded, and when it ended.
    async fn answer(
        &mut self,
        head: &RequestHead<'_>,
        http10: bool,
        reply: Reply,
        keep: bool,
        start: Instant,
        served: Served<'_, H>,
    ) -> (bool, Instant) {
        let connection = if !keep || self.closing {
            Connection::Close
        } else if http10 {
            Connection::KeepAlive
        } else {
            Connection::Implied
        };
        // The answer was ready when the handler last read the clock, microseconds ago.
        let now = served.ready.unwrap_or_else(Instant::now);
        self.wbuf.clear();
        reply.write_to(&mut self.wbuf, connection, head.method == "HEAD", now);
        let result = self.write_out(now).await;
        let done = Instant::now();
        self.handler.log(
            self.info,
            served.admitted,
            Exchange {
                head: Some(head),
                status: reply.status,
                bytes_in: served.bytes_in,
                bytes_out: reply.body.len(),
                elapsed: done.saturating_duration_since(start),
                detail: served.detail,
            },
        );
        match result {
            Some(Ok(())) => (true, done),
            Some(Err(e)) => {
                tracing::debug!(peer = %self.info, error = %e, "client connection failed while answering");
                (false, done)
            }
            None => {
                tracing::debug!(peer = %self.info, "client did not take the answer within the idle timeout");
                (false, done)
            }
        }
    }

    /// Writes and flushes the write buffer within the idle timeout of `now`; `None` when the
    /// client did not take it in time.
    async fn write_out(&mut self, now: Instant) -> Option<std::io::Result<()>> {
        self.deadline.set((now + self.timeouts.idle).into());
        self.deadline
            .run(write_flush(&mut self.io, &self.wbuf))
            .await
    }

    /// Answers an unparseable request and closes the connection.
    async fn answer_and_close(&mut self, reply: Reply) {
        let now = Instant::now();
        self.wbuf.clear();
        reply.write_to(&mut self.wbuf, Connection::Close, false, now);
        let _ = self.write_out(now).await;
        self.handler.log(
            self.info,
            None,
            Exchange {
                head: None,
                status: reply.status,
                bytes_in: 0,
                bytes_out: 0,
                elapsed: Duration::ZERO,
                detail: None,
            },
        );
        let _ = self.deadline.run(self.io.shutdown()).await;
    }

    /// Reads the body that follows the head (now at the front of the buffer) within the body
    /// timeout of `start`.
    async fn read_body(&mut self, framing: Framing, start: Instant) -> Result<Body, BodyError> {
        let limits = self.handler.limits();
        self.deadline.set((start + limits.body_timeout).into());
        match framing {
            Framing::Length(0) => Ok(Body::Buffered(0)),
            Framing::Length(n) => {
                if n > limits.max_body {
                    return Err(BodyError::TooLarge);
                }
                let n = usize::try_from(n).map_err(|_| BodyError::TooLarge)?;
                while self.rbuf.len() < n {
                    let missing = n - self.rbuf.len();
                    if self.rbuf.capacity() - self.rbuf.len() < missing.min(READ_CHUNK) {
                        // Grown as bytes arrive, not as declared: a slow client declaring
                        // the largest body allowed holds only what it sent.
                        self.rbuf.reserve(missing.min(4 * READ_CHUNK));
                    }
                    self.fill().await?;
                }
                Ok(Body::Buffered(n))
            }
            Framing::Chunked => {
                let mut decoder = Decoder::new(limits.max_body);
                let mut body = Vec::new();
                loop {
                    let used = decoder.decode(&self.rbuf, &mut body).map_err(|e| match e {
                        ChunkedError::TooLarge => BodyError::TooLarge,
                        e => {
                            tracing::debug!(peer = %self.info, error = %e, "chunked body refused");
                            BodyError::Malformed
                        }
                    })?;
                    self.rbuf.advance(used);
                    if decoder.is_done() {
                        return Ok(Body::Decoded(body));
                    }
                    if self.rbuf.capacity() - self.rbuf.len() < 1024 {
                        self.rbuf.reserve(READ_CHUNK);
                    }
                    self.fill().await?;
                }
            }
            Framing::UntilClose => unreachable!("requests are never framed by close"),
        }
    }

    /// One read into the buffer before the timer's deadline.
    async fn fill(&mut self) -> Result<(), BodyError> {
        match self.deadline.run(self.io.read_buf(&mut self.rbuf)).await {
            None => Err(BodyError::Timeout),
            Some(Ok(0)) => {
                tracing::debug!(peer = %self.info, "client closed inside a request body");
                Err(BodyError::Malformed)
            }
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => {
                tracing::debug!(peer = %self.info, error = %e, "client connection failed inside a request body");
                Err(BodyError::Malformed)
            }
        }
    }
}

/// What the engine knows of a request's handling when it writes the answer.
struct Served<'a, H: Handler> {
    admitted: Option<&'a H::Admitted>,
    bytes_in: usize,
    ready: Option<Instant>,
    detail: Option<&'a H::Detail>,
}

impl<'a, H: Handler> Served<'a, H> {
    /// A request answered without [`Handler::respond`].
    fn refused(admitted: Option<&'a H::Admitted>) -> Self {
        Self {
            admitted,
            bytes_in: 0,
            ready: None,
            detail: None,
        }
    }
}

async fn write_flush<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

fn str_at(bytes: &[u8], (start, end): (usize, usize)) -> &str {
    // httparse only accepts token methods; targets may hold bytes above 0x7F, and
    // `request_head` refuses those before one is used.
    std::str::from_utf8(&bytes[start..end]).unwrap_or_default()
}

/// The head of a parsed request, with its target in origin form; `None` for a target that is
/// neither origin form (`/path`) nor absolute form (`http://host/path`) with a valid authority,
/// or that is not ASCII.
fn request_head<'a>(
    bytes: &'a [u8],
    p: &Parsed,
    spans: &'a [FieldSpan],
) -> Option<RequestHead<'a>> {
    let method = str_at(bytes, p.method);
    // httparse lets bytes above 0x7F and `#` through in a target; a URI has none of the first
    // (RFC 3986 §2) and a request target no fragment (RFC 9112 §3.2), and what the engine
    // hands on must be a target any next hop reads the same way.
    let raw_target = &bytes[p.target.0..p.target.1];
    if raw_target.is_empty() || !raw_target.is_ascii() || raw_target.contains(&b'#') {
        return None;
    }
    let target = str_at(bytes, p.target);
    let (path, authority) = if target.starts_with('/') {
        (target, None)
    } else {
        let rest = strip_scheme(target)?;
        let split = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        // The authority stands for Host (RFC 9112 §3.2.2): the same syntax, no userinfo.
        if !crate::valid_authority(authority.as_bytes()) {
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
