//! An incremental decoder for `Transfer-Encoding: chunked` (RFC 9112 §7.1), strict about
//! everything a smuggling attempt could play with: hex sizes only, CRLF line ends only,
//! extensions and trailers bounded and dropped.

/// Longest chunk-size line (size, extensions) or trailer section accepted, in bytes.
const MAX_LINE: usize = 4096;
/// Longest trailer section accepted, in bytes.
const MAX_TRAILERS: usize = 16 * 1024;
/// Most chunk-extension bytes in one body, all chunks together. Extensions carry nothing the
/// relay uses (it drops them), and no EWS sender writes any; [`MAX_LINE`] alone bounds one
/// line, so 1-byte chunks with 4 KiB extensions would make a body thousands of times its data
/// on the wire, all of it read within the body timeout. 16 KiB, as hyper allows per body,
/// leaves room for any legitimate use.
const MAX_EXTENSIONS: usize = 16 * 1024;

/// Why a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    /// Not valid chunked framing.
    #[error("malformed chunked body: {0}")]
    Malformed(&'static str),
    /// The decoded body exceeds the caller's limit.
    #[error("chunked body larger than the limit")]
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the hex size; `digits` read so far.
    Size { size: u64, digits: u8 },
    /// After the size: extensions up to CR.
    Extension { size: u64 },
    /// Expecting LF after the size line's CR.
    SizeLf { size: u64 },
    /// Inside chunk data, `left` bytes to go.
    Data { left: u64 },
    /// Expecting CR after the data.
    DataCr,
    /// Expecting LF after the data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    /// Expecting LF ending a trailer line.
    TrailerLf,
    /// Expecting LF ending the final empty line.
    EndLf,
    /// The body is complete.
    Done,
}

/// Decodes one chunked body fed in pieces.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    limit: u64,
    decoded: u64,
    line: usize,
    trailers: usize,
    /// Chunk-extension bytes so far, against [`MAX_EXTENSIONS`].
    extensions: usize,
}

impl Decoder {
    /// A decoder refusing bodies of more than `limit` decoded bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            state: State::Size { size: 0, digits: 0 },
            limit,
            decoded: 0,
            line: 0,
            trailers: 0,
            extensions: 0,
        }
    }

    /// Whether the whole body (and its trailers) has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes from `input` what belongs to the body, appending its data to `out`; returns how
    /// many bytes were consumed. Stops at the end of the body: bytes after it are the next
    /// message's.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkedError> {
        let mut i = 0;
        while i < input.len() && self.state != State::Done {
            let b = input[i];
            match self.state {
                State::Size { size, digits } => {
                    if let Some(d) = (b as char).to_digit(16) {
                        if digits >= 15 {
                            return Err(ChunkedError::Malformed("chunk size too long"));
                        }
                        self.state = State::Size {
                            size: size * 16 + u64::from(d),
                            digits: digits + 1,
                        };
                        self.bump_line()?;
                    } else if digits == 0 {
                        return Err(ChunkedError::Malformed("chunk size is not hex"));
                    } else {
                        self.state = self.after_size(b, size)?;
                    }
                    i += 1;
                }
                State::Extension { size } => {
                    if b == b'\r' {
                        self.state = State::SizeLf { size };
                    } else if b == b'\n' || b == 0 {
                        return Err(ChunkedError::Malformed("bare LF in chunk extension"));
                    } else {
                        self.bump_extensions()?;
                    }
                    self.bump_line()?;
                    i += 1;
                }
                State::SizeLf { size } => {
                    if b != b'\n' {
                        return Err(ChunkedError::Malformed("chunk size line not ended by CRLF"));
                    }
                    self.line = 0;
                    self.state = if size == 0 {
                        State::TrailerStart
                    } else {
                        if self.decoded.saturating_add(size) > self.limit {
                            return Err(ChunkedError::TooLarge);
                        }
                        self.decoded += size;
                        State::Data { left: size }
                    };
                    i += 1;
                }
                State::Data { left } => {
                    let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { left }
                    };
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkedError::Malformed("chunk data longer than its size"));
                    }
                    self.state = State::DataLf;
                    i += 1;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::Malformed("chunk data not ended by CRLF"));
                    }
                    self.state = State::Size { size: 0, digits: 0 };
                    i += 1;
                }
                State::TrailerStart => {
                    // Only CR may end the section; a bare LF or a NUL here is no trailer line
                    // either: taken as the start of one, `0\r\n\n` would not end the body and
                    // the next request's head would be read as trailers.
                    self.state = match b {
                        b'\r' => State::EndLf,
                        b'\n' => return Err(ChunkedError::Malformed("bare LF ending the body")),
                        0 => return Err(ChunkedError::Malformed("NUL in trailer section")),
                        _ => State::Trailer,
                    };
                    self.bump_trailers()?;
                    i += 1;
                }
                State::Trailer => {
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    } else if b == b'\n' || b == 0 {
                        return Err(ChunkedError::Malformed("bare LF in trailer"));
                    }
                    self.bump_trailers()?;
                    i += 1;
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::Malformed("trailer line not ended by CRLF"));
                    }
                    self.state = State::TrailerStart;
                    i += 1;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::Malformed("last chunk not ended by CRLF"));
                    }
                    self.state = State::Done;
                    i += 1;
                }
                State::Done => unreachable!("loop stops at Done"),
            }
        }
        Ok(i)
    }

    fn after_size(&mut self, b: u8, size: u64) -> Result<State, ChunkedError> {
        match b {
            b'\r' => Ok(State::SizeLf { size }),
            // Extensions (`;name=value`), possibly after white space, are read and dropped.
            b';' | b' ' | b'\t' => {
                self.bump_line()?;
                self.bump_extensions()?;
                Ok(State::Extension { size })
            }
            _ => Err(ChunkedError::Malformed("chunk size is not hex")),
        }
    }

    fn bump_line(&mut self) -> Result<(), ChunkedError> {
        self.line += 1;
        if self.line > MAX_LINE {
            return Err(ChunkedError::Malformed("chunk size line too long"));
        }
        Ok(())
    }

    fn bump_extensions(&mut self) -> Result<(), ChunkedError> {
        self.extensions += 1;
        if self.extensions > MAX_EXTENSIONS {
            return Err(ChunkedError::Malformed("chunk extensions too long"));
        }
        Ok(())
    }

    fn bump_trailers(&mut self) -> Result<(), ChunkedError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(ChunkedError::Malformed("trailer section too long"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], limit: u64) -> Result<(Vec<u8>, usize), ChunkedError> {
        let mut d = Decoder::new(limit);
        let mut out = Vec::new();
        let n = d.decode(input, &mut out)?;
        assert!(d.is_done(), "incomplete");
        Ok((out, n))
    }

    #[test]
    fn decodes_with_extensions_and_trailers_and_stops_at_the_end() {
        let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let (out, n) = decode_all(input, 100).unwrap();
        assert_eq!(out, b"hello world");
        assert_eq!(&input[n..], b"NEXT");
    }

    #[test]
    fn byte_at_a_time_is_the_same() {
        let input = b"a\r\n0123456789\r\nA\r\nabcdefghij\r\n0\r\n\r\n";
        let mut d = Decoder::new(100);
        let mut out = Vec::new();
        for b in input.iter() {
            assert_eq!(d.decode(std::slice::from_ref(b), &mut out).unwrap(), 1);
        }
        assert!(d.is_done());
        assert_eq!(out, b"0123456789abcdefghij");
    }

    /// Random bodies, chunkings and read boundaries: the decoder gives back the body and
    /// consumes exactly the encoding, wherever the reads split it.
    #[test]
    fn any_chunking_and_any_read_split_round_trip() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        for _ in 0..500 {
            let body: Vec<u8> = (0..next(3000)).map(|_| next(256) as u8).collect();
            let mut encoded = Vec::new();
            let mut rest = &body[..];
            while !rest.is_empty() {
                let n = (1 + next(700) as usize).min(rest.len());
                let ext = if next(4) == 0 { ";name=\"v\"" } else { "" };
                encoded.extend_from_slice(format!("{n:X}{ext}\r\n").as_bytes());
                encoded.extend_from_slice(&rest[..n]);
                encoded.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            encoded.extend_from_slice(b"0\r\n");
            if next(3) == 0 {
                encoded.extend_from_slice(b"X-Checksum: 1\r\n");
            }
            encoded.extend_from_slice(b"\r\n");
            let total = encoded.len();
            encoded.extend_from_slice(b"POST /next");
            let mut d = Decoder::new(1 << 20);
            let (mut out, mut at) = (Vec::new(), 0);
            while !d.is_done() {
                let end = (at + 1 + next(600) as usize).min(encoded.len());
                at += d.decode(&encoded[at..end], &mut out).unwrap();
            }
            assert_eq!(out, body);
            assert_eq!(at, total, "stops right after the body");
        }
    }

    #[test]
    fn refusals() {
        let bad: &[&[u8]] = &[
            b"x\r\n",
            b"-1\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\r0\r\n\r\n",
            b"0\r\nX: 1\n\r\n",
            b"1234567890abcdef0\r\n",
            b"0\r\n\rX",
            b"0\r\n\n",
            b"0\r\n\0\r\n",
            b"5\r\nhello\r\n0\r\n\nPOST / HTTP/1.1\r\n\r\n",
        ];
        for input in bad {
            let mut d = Decoder::new(1 << 20);
            assert!(
                matches!(
                    d.decode(input, &mut Vec::new()),
                    Err(ChunkedError::Malformed(_))
                ),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            decode_all(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", 10),
            Err(ChunkedError::TooLarge)
        );
    }

    #[test]
    fn extensions_are_bounded_per_body_not_only_per_line() {
        let ext = format!(";e={}", "x".repeat(1000));
        let encode = |chunks: usize| {
            let mut body = Vec::new();
            for _ in 0..chunks {
                body.extend_from_slice(format!("1{ext}\r\nx\r\n").as_bytes());
            }
            body.extend_from_slice(b"0\r\n\r\n");
            body
        };
        let within = MAX_EXTENSIONS / ext.len();
        assert_eq!(
            decode_all(&encode(within), 1 << 20).unwrap().0.len(),
            within
        );
        assert_eq!(
            decode_all(&encode(within + 1), 1 << 20),
            Err(ChunkedError::Malformed("chunk extensions too long"))
        );
    }
}
