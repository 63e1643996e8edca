//! Property tests: the engine's answers depend on the bytes a client sends, never on how the
//! network cut them into reads. The same stream is delivered whole and in random pieces (one
//! read per piece, see [`crate::exchange_in_pieces`]); the answers must be the same. For valid
//! pipelined requests (Content-Length, chunked with extensions and trailers, no body) they must
//! also be exactly the echoes of those requests; for streams made invalid by a random edit,
//! whatever the engine answers whole it must answer in pieces.

use proptest::prelude::*;

use crate::{exchange_blocking, Seen};

/// Bytes of bodies, paths and edits: the ones framing is made of, and a few others.
const BYTES: &[u8] = b"\r\n\0 \t:;,0159aAfFgx-/=\"";

/// One request of a valid pipeline.
#[derive(Debug, Clone)]
struct Request {
    path: String,
    body: Vec<u8>,
    framing: Framing,
}

#[derive(Debug, Clone)]
enum Framing {
    /// GET, no body.
    None,
    /// POST with Content-Length.
    Length,
    /// POST, chunked at these sizes (the rest in one last chunk), with extensions, trailers.
    Chunked {
        sizes: Vec<usize>,
        extensions: bool,
        trailers: bool,
    },
}

impl Request {
    fn encode(&self, out: &mut Vec<u8>) {
        let method = if matches!(self.framing, Framing::None) {
            "GET"
        } else {
            "POST"
        };
        out.extend_from_slice(
            format!("{method} /{} HTTP/1.1\r\nHost: a\r\n", self.path).as_bytes(),
        );
        match &self.framing {
            Framing::None => out.extend_from_slice(b"\r\n"),
            Framing::Length => {
                out.extend_from_slice(
                    format!("Content-Length: {}\r\n\r\n", self.body.len()).as_bytes(),
                );
                out.extend_from_slice(&self.body);
            }
            Framing::Chunked {
                sizes,
                extensions,
                trailers,
            } => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                let mut rest = &self.body[..];
                let mut sizes = sizes.iter();
                while !rest.is_empty() {
                    let n = sizes.next().map_or(rest.len(), |&n| n.min(rest.len()));
                    let ext = if *extensions { ";e=\"x y\";f" } else { "" };
                    out.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
                    out.extend_from_slice(&rest[..n]);
                    out.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                out.extend_from_slice(b"0\r\n");
                if *trailers {
                    out.extend_from_slice(b"X-Trailer: 1\r\n");
                }
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    /// The answer the echo handler gives.
    fn echo(&self) -> Seen {
        let method = if matches!(self.framing, Framing::None) {
            "GET"
        } else {
            "POST"
        };
        let mut body = format!("{method} /{} host=a\n", self.path).into_bytes();
        if !matches!(self.framing, Framing::None) {
            body.extend_from_slice(&self.body);
        }
        Seen {
            status: 200,
            close: false,
            body,
        }
    }
}

fn request() -> impl Strategy<Value = Request> {
    let path = proptest::collection::vec(proptest::sample::select(&b"abz09-._~/"[..]), 0..12);
    let body = proptest::collection::vec(
        prop_oneof![proptest::sample::select(BYTES), any::<u8>()],
        0..200,
    );
    let framing = prop_oneof![
        Just(Framing::None),
        Just(Framing::Length),
        (
            proptest::collection::vec(1..40usize, 0..8),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(sizes, extensions, trailers)| Framing::Chunked {
                sizes,
                extensions,
                trailers
            }),
    ];
    (path, body, framing).prop_map(|(path, body, framing)| Request {
        path: String::from_utf8(path).unwrap(),
        body,
        framing,
    })
}

/// A stream of 1 to 5 pipelined requests.
fn pipeline() -> impl Strategy<Value = Vec<Request>> {
    proptest::collection::vec(request(), 1..6)
}

/// An edit that may break a stream: a byte replaced, inserted or removed at a position given
/// as a fraction of the stream's length.
#[derive(Debug, Clone)]
enum Edit {
    Replace(f64, u8),
    Insert(f64, u8),
    Remove(f64),
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = 0.0..1.0f64;
    let byte = prop_oneof![proptest::sample::select(BYTES), any::<u8>()];
    prop_oneof![
        (at.clone(), byte.clone()).prop_map(|(a, b)| Edit::Replace(a, b)),
        (at.clone(), byte).prop_map(|(a, b)| Edit::Insert(a, b)),
        at.prop_map(Edit::Remove),
    ]
}

fn apply(stream: &mut Vec<u8>, edit: &Edit) {
    let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len.saturating_sub(1));
    match *edit {
        Edit::Replace(f, b) => {
            let i = at(f, stream.len());
            stream[i] = b;
        }
        Edit::Insert(f, b) => {
            let i = at(f, stream.len() + 1);
            stream.insert(i, b);
        }
        Edit::Remove(f) => {
            let i = at(f, stream.len());
            stream.remove(i);
        }
    }
}

/// `stream` cut at `cuts` (fractions of its length).
fn split(stream: &[u8], cuts: &[f64]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|f| (f * stream.len() as f64) as usize)
        .collect();
    at.push(0);
    at.push(stream.len());
    at.sort_unstable();
    at.windows(2).map(|w| stream[w[0]..w[1]].to_vec()).collect()
}

fn cuts() -> impl Strategy<Value = Vec<f64>> {
    proptest::collection::vec(0.0..1.0f64, 0..40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Valid pipelined requests: every split gives the echo of every request, in order, on a
    /// connection kept open.
    #[test]
    fn valid_pipelines_give_the_same_answers_for_any_split(
        requests in pipeline(),
        cuts in cuts(),
    ) {
        let mut stream = Vec::new();
        for r in &requests {
            r.encode(&mut stream);
        }
        let expected: Vec<Seen> = requests.iter().map(Request::echo).collect();
        prop_assert_eq!(&exchange_blocking(vec![stream.clone()]), &expected);
        prop_assert_eq!(&exchange_blocking(split(&stream, &cuts)), &expected);
    }

    /// Streams with one random edit, valid or not: the answers in pieces are the answers whole.
    #[test]
    fn edited_pipelines_give_the_same_answers_for_any_split(
        requests in pipeline(),
        edits in proptest::collection::vec(edit(), 1..3),
        cuts in cuts(),
    ) {
        let mut stream = Vec::new();
        for r in &requests {
            r.encode(&mut stream);
        }
        for e in &edits {
            apply(&mut stream, e);
        }
        let whole = exchange_blocking(vec![stream.clone()]);
        prop_assert_eq!(&exchange_blocking(split(&stream, &cuts)), &whole);
    }
}

/// The extreme split: one byte per read, for a pipeline of every framing.
#[test]
fn byte_at_a_time_is_the_same_as_whole() {
    let requests = [
        Request {
            path: "a".into(),
            body: b"hello\r\n0\r\n\r\n".to_vec(),
            framing: Framing::Length,
        },
        Request {
            path: "b".into(),
            body: b"0123456789abcdef\r\n".to_vec(),
            framing: Framing::Chunked {
                sizes: vec![1, 3, 7],
                extensions: true,
                trailers: true,
            },
        },
        Request {
            path: "c".into(),
            body: Vec::new(),
            framing: Framing::None,
        },
    ];
    let mut stream = Vec::new();
    for r in &requests {
        r.encode(&mut stream);
    }
    let expected: Vec<Seen> = requests.iter().map(Request::echo).collect();
    let bytes: Vec<Vec<u8>> = stream.iter().map(|&b| vec![b]).collect();
    assert_eq!(exchange_blocking(bytes), expected);
    // A smuggling attempt byte at a time: refused the same way as whole.
    let attack = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n";
    let whole = exchange_blocking(vec![attack.to_vec()]);
    assert_eq!(crate::outline(&whole), [(400, true)]);
    let bytes: Vec<Vec<u8>> = attack.iter().map(|&b| vec![b]).collect();
    assert_eq!(exchange_blocking(bytes), whole);
}
