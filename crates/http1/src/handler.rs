//! What the engine asks of the application: one [`Handler`] serves every request of every
//! connection, and the engine owns everything about the wire (framing, limits, timeouts,
//! keep-alive, `100 Continue`). The same steps serve requests that reach the application by
//! another engine (the relay's HTTP/2), so that admission, answers and the access log are
//! written once.

use std::future::Future;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::timer::Deadline;
use crate::{Reply, RequestHead};

/// The limits a handler puts on request bodies; the engine enforces them while reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest body accepted, in bytes, declared or chunked.
    pub max_body: u64,
    /// From the start of a request to the last byte of its body.
    pub body_timeout: Duration,
}

/// Why the engine could not read a request's body; the handler says how to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// More than [`BodyLimits::max_body`] bytes.
    #[error("body larger than the limit")]
    TooLarge,
    /// Not complete within [`BodyLimits::body_timeout`].
    #[error("body not complete in time")]
    Timeout,
    /// The client closed or reset the connection inside the body, or chunked it badly.
    #[error("body malformed or cut short")]
    Malformed,
}

/// A request turned away from its head alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The answer.
    pub reply: Reply,
    /// Read (and drop) the body so that the connection can serve another request. False when
    /// the body is too large to be worth reading: the connection closes after the answer.
    pub drain: bool,
}

/// What a handler answered, with what the access log wants to know of it.
#[derive(Debug)]
pub struct Answer<D> {
    /// The answer.
    pub reply: Reply,
    /// When the answer became ready, if the handler knows it (it read the clock last): the
    /// engine dates the answer with it instead of reading the clock again.
    pub ready: Option<Instant>,
    /// Handler-specific detail for [`Handler::log`] (e.g. the time spent upstream).
    pub detail: D,
}

/// One finished request, for [`Handler::log`].
#[derive(Debug)]
pub struct Exchange<'a, 'h, D> {
    /// The head, `None` when it could not be parsed.
    pub head: Option<&'a RequestHead<'h>>,
    /// The status answered.
    pub status: StatusCode,
    /// Body bytes received.
    pub bytes_in: usize,
    /// Body bytes answered.
    pub bytes_out: usize,
    /// From the first byte of the request (or its head) to the answer written.
    pub elapsed: Duration,
    /// What [`Handler::respond`] said of it; `None` when it never ran.
    pub detail: Option<&'a D>,
}

/// The application behind the engine.
///
/// Per request, the engine calls [`Handler::admit`] once the head is read and framing checked,
/// then, once it has the whole body, [`Handler::respond`], and after writing the answer
/// [`Handler::log`] (also for requests refused by the engine itself).
pub trait Handler {
    /// What the handler knows of the connection (e.g. the client's address), made by the caller
    /// once per connection. Its `Display` form names the peer in the engine's debug logs.
    type Conn: std::fmt::Display;
    /// What admission decided for a request, handed on to [`Handler::respond`] and
    /// [`Handler::log`] (e.g. the client a trusted proxy named).
    type Admitted;
    /// What the handler keeps from one request to the next on a connection (its buffers).
    type State: Default;
    /// Detail of an answer for the access log.
    type Detail;

    /// The limits on request bodies.
    fn limits(&self) -> BodyLimits;

    /// Decides on a request from its head, before a byte of its body is read.
    /// `declared_length` is the `Content-Length`, if the body is framed by one.
    fn admit(
        &self,
        head: &RequestHead<'_>,
        conn: &Self::Conn,
        declared_length: Option<u64>,
    ) -> Result<Self::Admitted, Refused>;

    /// The answer to an admitted request with its whole body. `deadline` is the connection's
    /// timer, free for the handler's own waits until it returns.
    fn respond(
        &self,
        head: &RequestHead<'_>,
        body: &[u8],
        conn: &Self::Conn,
        admitted: &Self::Admitted,
        state: &mut Self::State,
        deadline: &mut Deadline,
    ) -> impl Future<Output = Answer<Self::Detail>>;

    /// The answer to a request whose body could not be read.
    fn body_refused(&self, error: BodyError) -> Reply;

    /// Counts and logs a finished request. `admitted` is `None` when admission refused it or
    /// never ran.
    fn log(
        &self,
        conn: &Self::Conn,
        admitted: Option<&Self::Admitted>,
        exchange: Exchange<'_, '_, Self::Detail>,
    );
}
