//! Small helpers: Base64 for identifiers, watermarks and Basic credentials, form and query
//! encoding (the token endpoint, Graph's validation tokens), random bytes and GUIDs.

use ring::rand::{SecureRandom, SystemRandom};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;

/// Standard Base64 with padding, the look of Exchange's subscription ids and watermarks.
pub fn base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes standard Base64 (padding optional); `None` when it is not Base64.
pub fn unbase64(text: &str) -> Option<Vec<u8>> {
    STANDARD_NO_PAD.decode(text.trim_end_matches('=')).ok()
}

/// `n` random bytes from the operating system.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0; n];
    // SystemRandom only fails when the OS has no entropy source at all; zeros would then
    // still give distinct ids through the counters mixed in by callers.
    let _ = SystemRandom::new().fill(&mut bytes);
    bytes
}

/// A random token in URL-safe Base64 without padding (bearer tokens, cookie values).
pub fn random_token(n: usize) -> String {
    URL_SAFE_NO_PAD.encode(random_bytes(n))
}

/// Decodes an `application/x-www-form-urlencoded` body into name/value pairs.
pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    body.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let mut parts = pair.splitn(2, |&b| b == b'=');
            let name = percent_decode(parts.next().unwrap_or_default());
            let value = percent_decode(parts.next().unwrap_or_default());
            (name, value)
        })
        .collect()
}

fn percent_decode(text: &[u8]) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < text.len() => {
                let hex = std::str::from_utf8(&text[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A random GUID in Microsoft's lower-case 8-4-4-4-12 form (version 4), for Graph ids.
pub fn guid() -> String {
    let mut b = random_bytes(16);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Encodes a query value the way .NET's `HttpUtility.UrlEncode` does, which is how Graph's
/// validation tokens arrive: space as `+`, lower-case `%xx`, `-_.!*()` and alphanumerics
/// kept. A callback that decodes `+` as a plus, or only upper-case escapes, fails here as it
/// would against Graph.
pub fn query_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for &b in text.as_bytes() {
        match b {
            b' ' => out.push('+'),
            b'a'..=b'z'
            | b'A'..=b'Z'
            | b'0'..=b'9'
            | b'-'
            | b'_'
            | b'.'
            | b'!'
            | b'*'
            | b'('
            | b')' => out.push(char::from(b)),
            _ => out.push_str(&format!("%{b:02x}")),
        }
    }
    out
}

/// Decodes one `application/x-www-form-urlencoded` value (`+` is a space).
#[cfg(test)]
pub fn query_decode(text: &str) -> String {
    percent_decode(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for n in 0..10 {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 5) as u8).collect();
            assert_eq!(unbase64(&base64(&bytes)).as_deref(), Some(&bytes[..]));
        }
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    }

    #[test]
    fn form_decoding() {
        let form = parse_form(b"a=b+c&scope=https%3A%2F%2Fx%2F.default&bad=%zz&e");
        assert_eq!(form[0], ("a".into(), "b c".into()));
        assert_eq!(form[1].1, "https://x/.default");
        assert_eq!(form[2].1, "%zz");
        assert_eq!(form[3], ("e".into(), String::new()));
    }

    #[test]
    fn query_encoding_round_trips_like_dotnet() {
        let token = "Validation: Testing client+app/x Request-Id: 1f";
        let encoded = query_encode(token);
        assert_eq!(
            encoded,
            "Validation%3a+Testing+client%2bapp%2fx+Request-Id%3a+1f"
        );
        assert_eq!(query_decode(&encoded), token);
    }

    #[test]
    fn guids_look_like_guids() {
        let g = guid();
        assert_eq!(g.len(), 36);
        assert_eq!(g.matches('-').count(), 4);
        assert_eq!(&g[14..15], "4");
        assert_ne!(g, guid());
    }
}
