//! The PROXY protocol (HAProxy's spec, versions 1 and 2): a load balancer in front of the relay
//! prepends the client's real address to the TCP stream, before the TLS handshake.
//!
//! The header is read with `peek` and then consumed to the exact byte, so the TLS handshake that
//! follows starts where it should; nothing beyond the header is ever read here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 line is at most 107 bytes including CRLF (the spec's bound).
const V1_MAX: usize = 107;
/// A v2 header's address block plus TLVs we accept (the spec allows 65535; load balancers send
/// well under 1 KiB).
const V2_MAX_PAYLOAD: usize = 4096;
/// The header must arrive this fast: a load balancer sends it at once.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// What a PROXY header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The original client's address.
    Proxied(SocketAddr),
    /// A connection of the proxy's own (health check: v1 `UNKNOWN`, v2 `LOCAL`): no client.
    Local,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    /// Not a PROXY header at all.
    #[error("no PROXY protocol header")]
    Missing,
    /// A PROXY header that does not follow the spec.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// The header did not arrive within the deadline.
    #[error("PROXY header not received within {HEADER_TIMEOUT:?}")]
    Timeout,
    /// The connection failed.
    #[error("connection error while reading the PROXY header")]
    Io,
}

/// Parse a header at the start of `buf`: `Ok(Some((header, length)))` when complete, `Ok(None)`
/// when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] == V2_SIGNATURE[0] {
        let n = buf.len().min(12);
        if buf[..n] != V2_SIGNATURE[..n] {
            return Err(ProxyHeaderError::Missing);
        }
        return parse_v2(buf);
    }
    if buf[0] == b'P' {
        let n = buf.len().min(6);
        if buf[..n] != b"PROXY "[..n] {
            return Err(ProxyHeaderError::Missing);
        }
        return parse_v1(buf);
    }
    Err(ProxyHeaderError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"))
        } else {
            Ok(None)
        };
    };
    if end + 2 > V1_MAX {
        return Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"));
    }
    let line = std::str::from_utf8(&buf[..end])
        .map_err(|_| ProxyHeaderError::Malformed("v1 not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let header = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header::Local,
        ["PROXY", proto @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("v1 source address"))?;
            if (*proto == "TCP4") != ip.is_ipv4() {
                return Err(ProxyHeaderError::Malformed("v1 address family mismatch"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("v1 source port"))?;
            Header::Proxied(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyHeaderError::Malformed("v1 fields")),
    };
    Ok(Some((header, end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version"));
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > V2_MAX_PAYLOAD {
        return Err(ProxyHeaderError::Malformed("v2 header too long"));
    }
    let total = 16 + len;
    if buf.len() < total {
        return Ok(None);
    }
    let payload = &buf[16..total];
    let header = match ver_cmd & 0x0f {
        0x0 => Header::Local,
        0x1 => match buf[13] >> 4 {
            // AF_INET: src addr, dst addr, src port, dst port.
            0x1 => {
                if payload.len() < 12 {
                    return Err(ProxyHeaderError::Malformed("v2 IPv4 block too short"));
                }
                let ip = Ipv4Addr::new(payload[0], payload[1], payload[2], payload[3]);
                let port = u16::from_be_bytes([payload[8], payload[9]]);
                Header::Proxied(SocketAddr::new(IpAddr::V4(ip), port))
            }
            0x2 => {
                if payload.len() < 36 {
                    return Err(ProxyHeaderError::Malformed("v2 IPv6 block too short"));
                }
                let mut a = [0u8; 16];
                a.copy_from_slice(&payload[..16]);
                let port = u16::from_be_bytes([payload[32], payload[33]]);
                Header::Proxied(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
            }
            // AF_UNSPEC or AF_UNIX: no usable client address.
            _ => Header::Local,
        },
        _ => return Err(ProxyHeaderError::Malformed("v2 command")),
    };
    Ok(Some((header, total)))
}

/// Read the header from `stream` within [`HEADER_TIMEOUT`], consuming exactly its bytes.
pub async fn read(stream: &mut TcpStream) -> Result<Header, ProxyHeaderError> {
    tokio::time::timeout(HEADER_TIMEOUT, async {
        let mut buf = vec![0u8; 16 + V2_MAX_PAYLOAD];
        loop {
            let n = stream
                .peek(&mut buf)
                .await
                .map_err(|_| ProxyHeaderError::Io)?;
            if n == 0 {
                return Err(ProxyHeaderError::Missing);
            }
            if let Some((header, len)) = parse(&buf[..n])? {
                let mut consumed = vec![0u8; len];
                stream
                    .read_exact(&mut consumed)
                    .await
                    .map_err(|_| ProxyHeaderError::Io)?;
                return Ok(header);
            }
            if n == buf.len() {
                return Err(ProxyHeaderError::Malformed("header longer than accepted"));
            }
            // Incomplete: wait for more bytes (peek returns at once while data is buffered).
            stream.readable().await.map_err(|_| ProxyHeaderError::Io)?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .map_err(|_| ProxyHeaderError::Timeout)?
}

/// A v2 header for `client` (used by tests and the benchmark's load balancer stand-in).
pub fn encode_v2(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21); // version 2, PROXY
    match (client, server) {
        (SocketAddr::V4(c), SocketAddr::V4(s)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c.ip().octets());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&c.port().to_be_bytes());
            out.extend_from_slice(&s.port().to_be_bytes());
        }
        (c, s) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(c).octets());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&c.port().to_be_bytes());
            out.extend_from_slice(&s.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n\x16\x03\x01";
        let (header, len) = parse(h).unwrap().unwrap();
        assert_eq!(header, Header::Proxied("192.0.2.7:56324".parse().unwrap()));
        assert_eq!(&h[len..], b"\x16\x03\x01", "exactly the header consumed");
        let (header, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 443\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(header, Header::Proxied("[2001:db8::1]:1".parse().unwrap()));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().0,
            Header::Local
        );
        assert_eq!(parse(b"PROXY TCP4 192.0.2.7").unwrap(), None, "incomplete");
        assert!(parse(b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 99999 443\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
        assert_eq!(
            parse(b"\x16\x03\x01\x02\x00"),
            Err(ProxyHeaderError::Missing),
            "TLS, not PROXY"
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyHeaderError::Missing));
    }

    #[test]
    fn v2() {
        let client: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let server: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let mut h = encode_v2(client, server);
        let len = h.len();
        h.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(parse(&h).unwrap().unwrap(), (Header::Proxied(client), len));
        for cut in 0..len {
            assert_eq!(parse(&h[..cut]).unwrap(), None, "incomplete at {cut}");
        }
        let c6: SocketAddr = "[2001:db8::7]:5000".parse().unwrap();
        let h6 = encode_v2(c6, "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(parse(&h6).unwrap().unwrap().0, Header::Proxied(c6));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&local).unwrap().unwrap().0, Header::Local);
        let mut bad = h.clone();
        bad[12] = 0x11; // version 1 in a v2 header
        assert!(parse(&bad).is_err());
        let mut long = V2_SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(parse(&long).is_err());
    }
}
