//! Who sent a request: the client's address as the edge established it (the TCP peer, a PROXY
//! header, or a trusted proxy's header), read by every later stage.

/// What the relay knows about the client connection, computed once per connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// The client address.
    pub peer_ip: std::net::IpAddr,
    /// The client address as written in logs and `X-Forwarded-For`.
    pub peer: String,
    /// The TCP peer is a trusted proxy that names the client in `--client-ip-header`.
    pub via_trusted_proxy: bool,
}

impl ConnInfo {
    /// Describe a client at `ip` (IPv4-mapped IPv6 shown as IPv4).
    pub fn new(ip: std::net::IpAddr) -> Self {
        let ip = ip.to_canonical();
        Self {
            peer_ip: ip,
            peer: ip.to_string(),
            via_trusted_proxy: false,
        }
    }
}

impl std::fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.peer)
    }
}
