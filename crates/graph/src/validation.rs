//! The subscription handshake: before creating a subscription Graph POSTs to each URL with
//! `?validationToken=<URL-encoded token>` and expects, within 10 seconds, 200 with
//! `Content-Type: text/plain` and the decoded token as the whole body.

/// Why a query string's `validationToken` cannot be read (the relay answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadQuery {
    /// A `%` not followed by two hex digits, at this byte offset of the parameter's value.
    #[error("bad percent-escape at byte {0} of validationToken")]
    BadEscape(usize),
    /// The decoded token is not UTF-8 (it is answered as text).
    #[error("validationToken is not UTF-8 once decoded")]
    NotUtf8,
    /// The parameter appears more than once: which one Graph meant is ambiguous.
    #[error("validationToken given more than once")]
    Repeated,
}

/// The query parameter Graph's handshake carries.
const PARAMETER: &str = "validationToken";

/// The decoded `validationToken` of a request's query string (the part after `?`; `None`: the
/// query has none). Decoding as Graph's URL encoding: `%XX` and `+` (space). Err for bad
/// percent-escapes, a token that is not UTF-8 after decoding, or the parameter given twice
/// (ambiguous). A parameter written `validationToken` without `=` has the empty token.
pub fn validation_token(query: &str) -> Result<Option<String>, BadQuery> {
    let mut found = None;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        // A name with a bad escape cannot be ours; an escaped spelling of ours still counts,
        // so the token cannot be given twice in disguise.
        let is_ours = match decode(name) {
            Ok(bytes) => bytes == PARAMETER.as_bytes(),
            Err(_) => false,
        };
        if !is_ours {
            continue;
        }
        if found.is_some() {
            return Err(BadQuery::Repeated);
        }
        let bytes = decode(value)?;
        found = Some(String::from_utf8(bytes).map_err(|_| BadQuery::NotUtf8)?);
    }
    Ok(found)
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn decode(s: &str) -> Result<Vec<u8>, BadQuery> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|b| hex(*b));
                let lo = bytes.get(i + 2).and_then(|b| hex(*b));
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(BadQuery::BadEscape(i)),
                }
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_basics() {
        assert_eq!(decode("a%2Bb+c%20d").unwrap(), b"a+b c d");
        assert_eq!(decode("%e2%82%ac").unwrap(), "€".as_bytes());
        assert_eq!(decode("ab%"), Err(BadQuery::BadEscape(2)));
    }
}
