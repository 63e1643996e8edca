//! The receiver: HTTP/1.1 over a small keep-alive pool, spoken in the caller's own task.
//!
//! Each request writes its head and body with one `writev` on a pooled connection and reads the
//! answer on it, in the task that handles the client's request: no connection task, no channel
//! between them. The relay knows whether a failed request went out on a reused connection: only
//! then is it retried once on a fresh one (the receiver closed an idle keep-alive connection
//! just as the request left), while a failure on a fresh connection is the receiver's answer and
//! is reported as such.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Upstream;
use crate::metrics::{Metrics, UpstreamErrorKind};
use http1::chunked::Decoder;
use http1::timer::Deadline;
use http1::{self, Framing, FramingFields, HeaderBlock, Reply};

/// An idle connection is dropped after this long: shorter than the keep-alive timeouts of
/// common receivers (Node.js 5 s, Go 90 s, HTTP.sys 120 s), so the relay rarely sends on a
/// connection the receiver is closing.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Idle connections kept at most; above it a finished connection is closed instead.
const POOL_MAX_IDLE: usize = 256;
/// The receiver's answer is buffered (it is a few hundred bytes of SOAP); anything larger than
/// this is not an EWS answer and becomes a 502.
pub const MAX_RESPONSE_BODY: usize = 1 << 20;
/// Largest response head accepted from the receiver.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most header fields accepted in one response head.
const MAX_RESPONSE_HEADERS: usize = 100;
/// Read buffer of a receiver connection: a whole EWS answer fits.
const READ_BUFFER: usize = 8 * 1024;

/// A failed exchange with the receiver.
#[derive(Debug, thiserror::Error)]
#[error("{}: {detail}", kind.as_str())]
pub struct UpstreamError {
    /// What kind of failure, for metrics and the status code.
    pub kind: UpstreamErrorKind,
    /// Human-readable detail for the log.
    pub detail: String,
}

impl UpstreamError {
    fn new(kind: UpstreamErrorKind, detail: impl ToString) -> Self {
        Self {
            kind,
            detail: detail.to_string(),
        }
    }

    /// The status the client gets: 504 when the receiver did not answer in time, else 502.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            UpstreamErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// A request ready to go to the receiver: its head serialized once, so a retry costs nothing.
#[derive(Debug, Clone)]
pub struct Outgoing {
    head: Vec<u8>,
    body: Bytes,
}

impl Outgoing {
    /// The request [`write_request_head`] describes, with `body`.
    pub fn new(
        method: &str,
        path_and_query: &str,
        host: &[u8],
        headers: &HeaderBlock,
        body: Bytes,
    ) -> Self {
        let mut head = Vec::with_capacity(64 + path_and_query.len() + headers.as_bytes().len());
        write_request_head(&mut head, method, path_and_query, host, headers, body.len());
        Self { head, body }
    }

    /// The serialized head, for tests and traces.
    pub fn head(&self) -> &[u8] {
        &self.head
    }
}

/// Appends a request head for the receiver to `out`: `method path_and_query HTTP/1.1`, `host`,
/// then `headers` (end-to-end fields only: the caller removed hop-by-hop, framing and `Host`
/// fields) and `content-length: body_len`. `method` and `path_and_query` come from a parsed
/// request line or the configuration, so they hold no white space or control characters.
pub fn write_request_head(
    out: &mut Vec<u8>,
    method: &str,
    path_and_query: &str,
    host: &[u8],
    headers: &HeaderBlock,
    body_len: usize,
) {
    debug_assert!(
        !path_and_query.is_empty()
            && path_and_query.bytes().all(|b| b.is_ascii_graphic())
            && method.bytes().all(|b| b.is_ascii_graphic())
    );
    out.reserve(64 + path_and_query.len() + host.len() + headers.as_bytes().len());
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(headers.as_bytes());
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

/// One connection to the receiver, with the bytes read from it and not yet used.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The receiver and its connection pool.
pub struct Receiver {
    upstream: Upstream,
    connect_timeout: Duration,
    timeout: Duration,
    idle: Mutex<VecDeque<Idle>>,
    metrics: Arc<Metrics>,
    epoch: Instant,
    /// Milliseconds after `epoch` of the latest success (see [`Reachability`]); 0 = never.
    last_success_ms: AtomicU64,
    /// Milliseconds after `epoch` of the latest failure; 0 = never.
    last_failure_ms: AtomicU64,
    /// What that failure was, as [`ReceiverFailure::code`].
    last_failure: AtomicU32,
}

/// How an exchange with the receiver failed, for readiness and the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverFailure {
    /// It did not accept a TCP connection (refused, unresolvable, or not within the connect
    /// timeout).
    NotAccepting,
    /// It accepted the connection but gave no complete answer within `--upstream-timeout`.
    NoAnswer,
    /// It answered something that is not a valid HTTP answer, or one too large.
    BadAnswer,
    /// It answered with this 5xx status: up, but failing.
    Status(u16),
}

impl ReceiverFailure {
    /// From a failed exchange.
    pub fn from_error(e: &UpstreamError) -> Self {
        match e.kind {
            UpstreamErrorKind::Connect | UpstreamErrorKind::ConnectTimeout => Self::NotAccepting,
            UpstreamErrorKind::Timeout => Self::NoAnswer,
            UpstreamErrorKind::Protocol | UpstreamErrorKind::ResponseTooLarge => Self::BadAnswer,
        }
    }

    /// Whether the receiver accepted the connection before failing: then a fresh TCP connect
    /// (the readiness probe) says nothing about whether it works again.
    pub fn after_connecting(self) -> bool {
        !matches!(self, Self::NotAccepting)
    }

    fn code(self) -> u32 {
        match self {
            Self::NotAccepting => 1,
            Self::NoAnswer => 2,
            Self::BadAnswer => 3,
            Self::Status(s) => 1000 + u32::from(s),
        }
    }

    fn from_code(code: u32) -> Self {
        match code {
            2 => Self::NoAnswer,
            3 => Self::BadAnswer,
            c if c >= 1000 => Self::Status(u16::try_from(c - 1000).unwrap_or(500)),
            _ => Self::NotAccepting,
        }
    }
}

impl std::fmt::Display for ReceiverFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotAccepting => f.write_str("not accepting connections"),
            Self::NoAnswer => f.write_str("no complete answer in time"),
            Self::BadAnswer => f.write_str("not a valid HTTP answer"),
            Self::Status(s) => write!(f, "answered HTTP {s}"),
        }
    }
}

/// What the relay's exchanges with the receiver say about it.
///
/// A *success* is a complete answer with a status below 500 (a 4xx is the receiver working and
/// disagreeing with one request), or a connection accepted by [`Receiver::probe`]. A *failure*
/// is no connection, no complete answer, an invalid answer, or a 5xx answer. Both passthrough
/// forwarding and managed delivery count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reachability {
    /// How long ago the latest success was.
    pub last_success: Option<Duration>,
    /// How long ago the latest failure was, and what it was.
    pub last_failure: Option<(Duration, ReceiverFailure)>,
}

impl Reachability {
    /// Whether the receiver failed since its latest success (a failure in the same
    /// millisecond as a success counts as later): what the relay last learned is bad news.
    pub fn failing(&self) -> bool {
        match (self.last_failure, self.last_success) {
            (Some((failed, _)), Some(succeeded)) => failed <= succeeded,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("upstream", &self.upstream.authority)
            .finish_non_exhaustive()
    }
}

/// How an exchange on one connection failed.
enum Failure {
    /// Nothing of an answer arrived: the connection was closed or reset before or while the
    /// request went out. Safe to send again on another connection.
    NoAnswer(UpstreamError),
    /// Anything else.
    Other(UpstreamError),
}

impl Failure {
    fn into_error(self) -> UpstreamError {
        match self {
            Failure::NoAnswer(e) | Failure::Other(e) => e,
        }
    }
}

impl Receiver {
    /// A receiver with an empty pool.
    pub fn new(
        upstream: Upstream,
        connect_timeout: Duration,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            upstream,
            connect_timeout,
            timeout,
            idle: Mutex::new(VecDeque::new()),
            metrics,
            epoch: Instant::now(),
            last_success_ms: AtomicU64::new(0),
            last_failure_ms: AtomicU64::new(0),
            last_failure: AtomicU32::new(0),
        }
    }

    /// The receiver's `host:port`.
    pub fn authority(&self) -> &str {
        self.upstream.authority.as_str()
    }

    /// `--upstream-timeout`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The `Host` header value to send.
    pub fn host_header(&self) -> &http::HeaderValue {
        &self.upstream.host_header
    }

    /// Send `req` and buffer the answer, within `--upstream-timeout` in all. The answer's
    /// hop-by-hop and framing fields are removed.
    pub async fn send(&self, req: &Outgoing) -> Result<Reply, UpstreamError> {
        let now = Instant::now();
        let mut deadline = Deadline::new(now.into(), self.timeout);
        self.send_by(&req.head, &req.body, &mut deadline, now)
            .await
            .map(|(reply, _)| reply)
    }

    /// [`Receiver::send`] for a request serialized by the caller (`head` as
    /// [`write_request_head`] writes it), timed by the caller's connection timer; `now` is the
    /// time it starts. Returns the answer and the time it was complete.
    pub async fn send_by(
        &self,
        head: &[u8],
        body: &[u8],
        deadline: &mut Deadline,
        now: Instant,
    ) -> Result<(Reply, Instant), UpstreamError> {
        deadline.set((now + self.timeout).into());
        let result = match deadline.run(self.send_with_retry(head, body, now)).await {
            Some(r) => r,
            None => Err(UpstreamError::new(
                UpstreamErrorKind::Timeout,
                format!("no complete answer within {:?}", self.timeout),
            )),
        };
        match &result {
            Ok((reply, done)) if reply.status.is_server_error() => {
                self.mark_failed(*done, ReceiverFailure::Status(reply.status.as_u16()))
            }
            Ok((_, done)) => self.mark_success(*done),
            Err(e) => self.mark_failed(Instant::now(), ReceiverFailure::from_error(e)),
        }
        result
    }

    async fn send_with_retry(
        &self,
        head: &[u8],
        body: &[u8],
        now: Instant,
    ) -> Result<(Reply, Instant), UpstreamError> {
        if let Some(conn) = self.checkout(now) {
            match self.exchange(conn, head, body).await {
                Ok(done) => return Ok(done),
                Err(Failure::NoAnswer(e)) => {
                    self.metrics.upstream_retries.inc();
                    tracing::debug!(error = %e, "pooled receiver connection failed before answering; retrying on a fresh one");
                }
                Err(Failure::Other(e)) => return Err(e),
            }
        }
        // Boxed: connecting (resolving included) is a large state on a rare path, and the
        // request's state is part of every client connection's task.
        let conn = Box::pin(self.connect()).await?;
        self.exchange(conn, head, body)
            .await
            .map_err(Failure::into_error)
    }

    /// One request and its answer on `conn`, which goes back to the pool if it can be reused;
    /// returns the answer and when it was complete.
    async fn exchange(
        &self,
        mut conn: Conn,
        head: &[u8],
        body: &[u8],
    ) -> Result<(Reply, Instant), Failure> {
        let no_answer = |e: std::io::Error| {
            Failure::NoAnswer(UpstreamError::new(UpstreamErrorKind::Protocol, e))
        };
        write_all_vectored(&mut conn.stream, head, body)
            .await
            .map_err(no_answer)?;
        let (reply, reusable) = read_answer(&mut conn).await?;
        let done = Instant::now();
        if reusable {
            self.checkin(conn, done);
        }
        Ok((reply, done))
    }

    /// Take the most recently used connection that is not too old at `now`.
    fn checkout(&self, now: Instant) -> Option<Conn> {
        let mut pool = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(idle) = pool.pop_back() {
            if now.saturating_duration_since(idle.since) < POOL_IDLE_TIMEOUT {
                return Some(idle.conn);
            }
            // The rest are older still.
            pool.clear();
        }
        None
    }

    fn checkin(&self, conn: Conn, now: Instant) {
        let mut pool = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX_IDLE {
            pool.push_back(Idle { conn, since: now });
        }
    }

    /// Close idle connections older than [`POOL_IDLE_TIMEOUT`] or closed by the receiver;
    /// called periodically so that a quiet relay does not hold connections the receiver has
    /// given up on.
    pub fn reap_idle(&self) {
        let mut pool = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Oldest at the front.
        while pool
            .front()
            .is_some_and(|i| i.since.elapsed() >= POOL_IDLE_TIMEOUT)
        {
            pool.pop_front();
        }
        // An idle connection has nothing to read: readable means closed (or garbage).
        pool.retain(|i| {
            matches!(i.conn.stream.try_read(&mut [0u8; 1]), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
    }

    /// Open a new connection to the receiver.
    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let stream = self.tcp_connect().await?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
        })
    }

    async fn tcp_connect(&self) -> Result<TcpStream, UpstreamError> {
        let connect = async {
            let addrs = self.resolve().await?;
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(UpstreamError::new(
                UpstreamErrorKind::Connect,
                last.map_or_else(|| "no address".to_owned(), |e| e.to_string()),
            ))
        };
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| {
                UpstreamError::new(
                    UpstreamErrorKind::ConnectTimeout,
                    format!("connect not finished within {:?}", self.connect_timeout),
                )
            })??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn resolve(&self) -> Result<Vec<SocketAddr>, UpstreamError> {
        let authority = self.upstream.authority.as_str();
        if let Ok(addr) = authority.parse::<SocketAddr>() {
            return Ok(vec![addr]);
        }
        tokio::net::lookup_host(authority)
            .await
            .map(Iterator::collect)
            .map_err(|e| {
                UpstreamError::new(
                    UpstreamErrorKind::Connect,
                    format!("resolve {authority}: {e}"),
                )
            })
    }

    fn millis(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.epoch).as_millis() as u64).max(1)
    }

    fn mark_success(&self, at: Instant) {
        self.last_success_ms
            .fetch_max(self.millis(at), Ordering::Relaxed);
    }

    fn mark_failed(&self, at: Instant, failure: ReceiverFailure) {
        // The kind first: a reader that sees the new time sees at worst the previous kind.
        self.last_failure.store(failure.code(), Ordering::Relaxed);
        self.last_failure_ms
            .fetch_max(self.millis(at), Ordering::Relaxed);
    }

    /// What the latest exchanges with the receiver said.
    pub fn reachability(&self) -> Reachability {
        let now = self.epoch.elapsed();
        let ago = |ms: u64| (ms > 0).then(|| now.saturating_sub(Duration::from_millis(ms)));
        let failure = ReceiverFailure::from_code(self.last_failure.load(Ordering::Relaxed));
        Reachability {
            last_success: ago(self.last_success_ms.load(Ordering::Relaxed)),
            last_failure: ago(self.last_failure_ms.load(Ordering::Relaxed)).map(|d| (d, failure)),
        }
    }

    /// Check that the receiver accepts TCP connections now (for `/readyz`); the outcome counts
    /// in [`Receiver::reachability`] like any exchange.
    pub async fn probe(&self) -> bool {
        match self.tcp_connect().await {
            Ok(_) => {
                self.mark_success(Instant::now());
                true
            }
            Err(e) => {
                self.mark_failed(Instant::now(), ReceiverFailure::from_error(&e));
                false
            }
        }
    }
}

/// Writes `head` and `body` with as few `writev` calls as the socket allows (one, normally).
async fn write_all_vectored(
    stream: &mut TcpStream,
    head: &[u8],
    body: &[u8],
) -> std::io::Result<()> {
    let mut written = 0;
    let total = head.len() + body.len();
    while written < total {
        let n = if written < head.len() {
            let bufs = [IoSlice::new(&head[written..]), IoSlice::new(body)];
            stream.write_vectored(&bufs).await?
        } else {
            stream.write(&body[written - head.len()..]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        written += n;
    }
    Ok(())
}

fn protocol(detail: impl ToString) -> Failure {
    Failure::Other(UpstreamError::new(UpstreamErrorKind::Protocol, detail))
}

/// Reads more from the receiver into `conn.buf`; `Ok(0)` at the end of the stream.
async fn fill(conn: &mut Conn) -> std::io::Result<usize> {
    if conn.buf.capacity() - conn.buf.len() < 1024 {
        conn.buf.reserve(READ_BUFFER);
    }
    conn.stream.read_buf(&mut conn.buf).await
}

/// What a response head says, once parsed.
struct Head {
    len: usize,
    status: StatusCode,
    headers: HeaderBlock,
    framing: Framing,
    close: bool,
}

/// Reads one answer (after any 1xx interim answers); says whether the connection can carry
/// another request.
async fn read_answer(conn: &mut Conn) -> Result<(Reply, bool), Failure> {
    let mut received_any = false;
    let head = loop {
        match parse_head(&conn.buf)? {
            Some(head) if head.status.is_informational() => {
                // 100 Continue and friends: the final answer follows.
                conn.buf.advance(head.len);
                received_any = true;
                continue;
            }
            Some(head) => break head,
            None if conn.buf.len() >= MAX_RESPONSE_HEAD => {
                return Err(protocol("answer head larger than 64 KiB"));
            }
            None => {}
        }
        match fill(conn).await {
            Ok(0) if conn.buf.is_empty() && !received_any => {
                return Err(Failure::NoAnswer(UpstreamError::new(
                    UpstreamErrorKind::Protocol,
                    "connection closed before any answer",
                )));
            }
            Ok(0) => return Err(protocol("connection closed inside the answer head")),
            Ok(_) => {}
            Err(e) if conn.buf.is_empty() && !received_any => {
                return Err(Failure::NoAnswer(UpstreamError::new(
                    UpstreamErrorKind::Protocol,
                    e,
                )));
            }
            Err(e) => return Err(protocol(e)),
        }
    };
    conn.buf.advance(head.len);
    let (body, until_close) = match head.framing {
        _ if http1::no_body(head.status) => (Bytes::new(), false),
        Framing::Length(n) => {
            let n = usize::try_from(n)
                .ok()
                .filter(|&n| n <= MAX_RESPONSE_BODY)
                .ok_or_else(too_large)?;
            while conn.buf.len() < n {
                match fill(conn).await {
                    Ok(0) => return Err(protocol("connection closed inside the answer body")),
                    Ok(_) => {}
                    Err(e) => return Err(protocol(e)),
                }
            }
            let body = Bytes::copy_from_slice(&conn.buf[..n]);
            conn.buf.advance(n);
            (body, false)
        }
        Framing::Chunked => {
            let mut decoder = Decoder::new(MAX_RESPONSE_BODY as u64);
            let mut body = Vec::new();
            loop {
                let used = decoder.decode(&conn.buf, &mut body).map_err(|e| match e {
                    http1::chunked::ChunkedError::TooLarge => too_large(),
                    e => protocol(e),
                })?;
                conn.buf.advance(used);
                if decoder.is_done() {
                    break;
                }
                match fill(conn).await {
                    Ok(0) => return Err(protocol("connection closed inside the answer body")),
                    Ok(_) => {}
                    Err(e) => return Err(protocol(e)),
                }
            }
            (Bytes::from(body), false)
        }
        Framing::UntilClose => {
            loop {
                if conn.buf.len() > MAX_RESPONSE_BODY {
                    return Err(too_large());
                }
                match fill(conn).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Err(protocol(e)),
                }
            }
            (conn.buf.split().freeze(), true)
        }
    };
    // Bytes after the answer were never asked for: the connection is not trusted again.
    let reusable = !head.close && !until_close && conn.buf.is_empty();
    Ok((
        Reply {
            status: head.status,
            headers: head.headers,
            body,
        },
        reusable,
    ))
}

fn too_large() -> Failure {
    Failure::Other(UpstreamError::new(
        UpstreamErrorKind::ResponseTooLarge,
        format!("answer larger than {MAX_RESPONSE_BODY} bytes"),
    ))
}

/// Parses a response head if `buf` holds a whole one.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Failure> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut fields =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(protocol(format!("invalid answer head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| protocol(format!("invalid status {code}")))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(protocol("receiver switched protocols"));
    }
    let http10 = resp.version == Some(0);
    let mut framing = FramingFields::default();
    let mut close = false;
    let mut keep_alive = false;
    // Fields `Connection` names beyond the hop-by-hop ones; usually none, so the block is
    // built in one pass and only rebuilt when there are.
    let mut named = false;
    let mut headers = HeaderBlock::with_capacity(len);
    for f in resp.headers.iter() {
        let name = f.name.as_bytes();
        if name.len() == 10 && name.eq_ignore_ascii_case(b"connection") {
            for token in http1::list_elements(f.value) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                named |= !http1::is_hop_by_hop(token);
            }
        }
        if framing.see(name, f.value) || http1::is_hop_by_hop(name) {
            continue;
        }
        headers.push_parsed(name, f.value);
    }
    if named {
        let named: Vec<&[u8]> = resp
            .headers
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case("connection"))
            .flat_map(|f| http1::list_elements(f.value))
            .collect();
        headers.clear();
        for f in resp.headers.iter() {
            let name = f.name.as_bytes();
            if !FramingFields::is_framing(name)
                && !http1::is_hop_by_hop(name)
                && !named.iter().any(|t| t.eq_ignore_ascii_case(name))
            {
                headers.push_parsed(name, f.value);
            }
        }
    }
    let framing = framing
        .response()
        .map_err(|e| protocol(format!("answer framing: {e}")))?;
    Ok(Some(Head {
        len,
        status,
        headers,
        framing,
        close: close || (http10 && !keep_alive),
    }))
}
