//! Cuts the body of a `GetStreamingEvents` answer into its SOAP envelopes as the bytes arrive.
//!
//! Exchange answers `GetStreamingEvents` with one chunked HTTP response that stays open for the
//! connection's lifetime and carries one complete `<Envelope>…</Envelope>` after another (a
//! keep-alive, a batch of events, finally `ConnectionStatus` `Closed`), possibly with white
//! space or an XML declaration between them; a read from the socket can end anywhere, inside a
//! tag or a value. [`EnvelopeSplitter`] keeps the bytes of the envelope not yet complete and
//! hands out each one as soon as its root element closes, without parsing it:
//! [`crate::parse_streaming_events`] does that.
//!
//! The scan is a small lexer that knows only what it takes to find the end of the root
//! element: tags (with quoted attribute values, which may hold `>`), end tags, empty-element
//! tags, comments, CDATA sections and processing instructions. It looks at every byte once,
//! however the input is cut, and its state is a few bytes, so a byte-by-byte feed costs what
//! one large feed costs. Well-formedness is left to the parser, which sees every envelope.

use super::EwsError;

/// Default bound on one envelope, in bytes. A streaming envelope holds at most a few hundred
/// events of under a kilobyte each; 4 MiB stops a stream that never closes its root element
/// from growing the buffer forever, long before memory is a concern.
pub const DEFAULT_MAX_ENVELOPE: usize = 4 * 1024 * 1024;

/// Where the lexer is. Every state is entered on one byte and left on one byte, so the scan can
/// stop at the end of any read and go on with the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Character data, or white space between envelopes.
    Text,
    /// Just after `<`.
    Open,
    /// Inside a start tag. `quote` is the quote of the attribute value being read (0 outside
    /// one); `slash` whether the byte before was `/` outside a value (so `>` ends an empty
    /// element).
    StartTag { quote: u8, slash: bool },
    /// Inside an end tag `</…`.
    EndTag,
    /// Inside a processing instruction or XML declaration `<?…`; `question` whether the byte
    /// before was `?`.
    Pi { question: bool },
    /// Just after `<!`.
    Bang,
    /// Just after `<!-`.
    BangDash,
    /// Inside `<![CDATA[`: how many bytes of `[CDATA[` have been matched.
    CDataOpen(u8),
    /// Inside a comment; how many `-` in a row were just read (at most 2).
    Comment(u8),
    /// Inside a CDATA section; how many `]` in a row were just read (at most 2).
    CData(u8),
}

/// Splits a stream of SOAP envelopes into single envelopes.
///
/// Feed it the bytes of the response body as they arrive ([`EnvelopeSplitter::feed`]), then
/// take complete envelopes with [`EnvelopeSplitter::next_envelope`] until it returns
/// `Ok(None)`. An envelope is the bytes from its root's `<` through the root's closing `>`:
/// what came before it (white space, `<?xml …?>`, comments) is dropped. At the end of the body,
/// [`EnvelopeSplitter::finish`] says whether it ended between envelopes.
///
/// Errors are final (every later call returns one too): an envelope longer than the bound,
/// text other than white space between envelopes, a `<!DOCTYPE` or other markup declaration,
/// or a tag that cannot begin. The stream is out of step then; the caller drops the
/// connection and opens a new one.
#[derive(Debug)]
pub struct EnvelopeSplitter {
    /// Bytes received and not yet handed out or dropped; `buf[..scanned]` has been lexed.
    buf: Vec<u8>,
    /// How much of `buf` has been lexed.
    scanned: usize,
    /// Where in `buf` the envelope being read starts (its `<`), or the markup between
    /// envelopes being read; `None` while between envelopes in white space.
    start: Option<usize>,
    /// The lexer's state at `scanned`.
    lex: Lex,
    /// Elements open in the current envelope; 0 between envelopes.
    depth: usize,
    /// Whether `start` is an envelope (its root has started) rather than markup between two.
    in_root: bool,
    /// The bound on one envelope, and on any markup between envelopes.
    max_envelope: usize,
    /// Set by the first error: why the splitter gave up.
    failed: Option<String>,
}

impl Default for EnvelopeSplitter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ENVELOPE)
    }
}

impl EnvelopeSplitter {
    /// A splitter that refuses envelopes longer than `max_envelope` bytes.
    pub fn new(max_envelope: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            start: None,
            lex: Lex::Text,
            depth: 0,
            in_root: false,
            max_envelope,
            failed: None,
        }
    }

    /// The bound given to [`EnvelopeSplitter::new`].
    pub fn max_envelope(&self) -> usize {
        self.max_envelope
    }

    /// Bytes held: the part of the envelope under way, plus anything fed and not yet taken.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Appends the next bytes of the body. Nothing is scanned until
    /// [`EnvelopeSplitter::next_envelope`].
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete envelope, or `None` when the bytes fed so far hold none; call it until
    /// `None` after every [`EnvelopeSplitter::feed`].
    pub fn next_envelope(&mut self) -> Result<Option<Vec<u8>>, EwsError> {
        if let Some(why) = &self.failed {
            return Err(EwsError::malformed(format_args!(
                "streamed envelopes: {why}"
            )));
        }
        match self.scan() {
            Ok(Some(end)) => {
                let start = self.start.take().unwrap_or(0);
                let rest = self.buf.split_off(end);
                let mut envelope = std::mem::replace(&mut self.buf, rest);
                envelope.drain(..start);
                self.scanned = 0;
                self.in_root = false;
                self.lex = Lex::Text;
                Ok(Some(envelope))
            }
            Ok(None) => {
                // Between envelopes in white space: nothing before `scanned` is needed again.
                if self.start.is_none() {
                    self.buf.drain(..self.scanned);
                    self.scanned = 0;
                }
                Ok(None)
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                self.buf = Vec::new();
                Err(e)
            }
        }
    }

    /// At the end of the body: `Ok` if it ended between envelopes (after white space or
    /// declarations at most), an error if an envelope or other markup was left incomplete.
    /// Call it once [`EnvelopeSplitter::next_envelope`] has returned `None`.
    pub fn finish(&self) -> Result<(), EwsError> {
        if let Some(why) = &self.failed {
            return Err(EwsError::malformed(format_args!(
                "streamed envelopes: {why}"
            )));
        }
        let pending = self.buf[self.scanned..]
            .iter()
            .any(|b| !b.is_ascii_whitespace());
        if self.start.is_some() || self.lex != Lex::Text || pending {
            return Err(EwsError::malformed(
                "streamed envelopes: the body ends inside an envelope",
            ));
        }
        Ok(())
    }

    /// Lexes on from `scanned`; `Some(end)` when the current envelope's root closed with the
    /// byte before `end`.
    fn scan(&mut self) -> Result<Option<usize>, EwsError> {
        while self.scanned < self.buf.len() {
            let at = self.scanned;
            let b = self.buf[at];
            self.scanned += 1;
            if let Some(start) = self.start {
                if self.scanned - start > self.max_envelope {
                    return Err(EwsError::TooMany {
                        what: "bytes in one streamed envelope",
                        limit: self.max_envelope,
                    });
                }
            }
            self.lex = match self.lex {
                Lex::Text => match b {
                    b'<' => {
                        if self.depth == 0 {
                            self.start = Some(at);
                        }
                        Lex::Open
                    }
                    _ if self.depth > 0 || b.is_ascii_whitespace() => Lex::Text,
                    // The byte order mark a .NET writer may put before each envelope.
                    0xEF | 0xBB | 0xBF => Lex::Text,
                    _ => return Err(EwsError::malformed("text between envelopes")),
                },
                Lex::Open => match b {
                    b'/' if self.depth > 0 => Lex::EndTag,
                    b'?' => Lex::Pi { question: false },
                    b'!' => Lex::Bang,
                    b'/' | b'>' | b'<' | b'=' | b'"' | b'\'' => {
                        return Err(EwsError::malformed("a tag that cannot begin"))
                    }
                    _ if b.is_ascii_whitespace() => {
                        return Err(EwsError::malformed("a tag that cannot begin"))
                    }
                    _ => {
                        self.in_root = true;
                        Lex::StartTag {
                            quote: 0,
                            slash: false,
                        }
                    }
                },
                Lex::StartTag { quote: 0, slash } => match b {
                    b'"' | b'\'' => Lex::StartTag {
                        quote: b,
                        slash: false,
                    },
                    b'>' if slash && self.depth == 0 => return Ok(Some(self.scanned)), // `<Envelope/>`
                    b'>' if slash => Lex::Text,
                    b'>' => {
                        self.depth += 1;
                        Lex::Text
                    }
                    _ => Lex::StartTag {
                        quote: 0,
                        slash: b == b'/',
                    },
                },
                Lex::StartTag { quote, .. } => Lex::StartTag {
                    quote: if b == quote { 0 } else { quote },
                    slash: false,
                },
                Lex::EndTag => match b {
                    b'>' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            return Ok(Some(self.scanned));
                        }
                        Lex::Text
                    }
                    _ => Lex::EndTag,
                },
                Lex::Pi { question } => match b {
                    b'>' if question => self.end_markup(),
                    _ => Lex::Pi {
                        question: b == b'?',
                    },
                },
                Lex::Bang => match b {
                    b'-' => Lex::BangDash,
                    b'[' if self.depth > 0 => Lex::CDataOpen(1),
                    _ => return Err(EwsError::DtdForbidden),
                },
                Lex::BangDash => match b {
                    b'-' => Lex::Comment(0),
                    _ => return Err(EwsError::malformed("a comment that cannot begin")),
                },
                Lex::CDataOpen(n) => {
                    if b != b"[CDATA["[usize::from(n)] {
                        return Err(EwsError::malformed("a CDATA section that cannot begin"));
                    }
                    if n == 6 {
                        Lex::CData(0)
                    } else {
                        Lex::CDataOpen(n + 1)
                    }
                }
                Lex::Comment(dashes) => match b {
                    b'>' if dashes >= 2 => self.end_markup(),
                    b'-' => Lex::Comment((dashes + 1).min(2)),
                    _ => Lex::Comment(0),
                },
                Lex::CData(brackets) => match b {
                    b'>' if brackets >= 2 => Lex::Text,
                    b']' => Lex::CData((brackets + 1).min(2)),
                    _ => Lex::CData(0),
                },
            };
        }
        Ok(None)
    }

    /// The end of a comment or processing instruction: back to text, and between envelopes
    /// the markup is done with, so it no longer counts as an envelope under way.
    fn end_markup(&mut self) -> Lex {
        if !self.in_root {
            self.start = None;
        }
        Lex::Text
    }
}
