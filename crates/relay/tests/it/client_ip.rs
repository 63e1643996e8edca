//! Real client addresses behind load balancers (PROXY protocol) and CDNs (a client-address
//! header), honoured only from trusted proxies.

use crate::common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use ews_relay::edge::proxy_protocol::encode_v2;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STATUS: &str = "send-notification-status.xml";

/// TCP from `local`, write `preamble`, then TLS and HTTP/1.1 on the same stream.
async fn client_after(
    relay: &Relay,
    local: Option<IpAddr>,
    preamble: &[u8],
) -> std::io::Result<hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>>> {
    let mut tcp = tcp_from(relay.addr, local).await?;
    tcp.write_all(preamble).await?;
    let tls = tokio_rustls::TlsConnector::from(client_tls(&relay.cert))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Whether the relay closes a connection from `local` after `preamble` without a byte.
async fn closed_silently(relay: &Relay, local: Option<IpAddr>, preamble: &[u8]) -> bool {
    let Ok(mut tcp) = tcp_from(relay.addr, local).await else {
        return true;
    };
    let _ = tcp.write_all(preamble).await;
    let mut buf = [0u8; 8];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_from_trusted_peers_only() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let relay = Relay::start(
        receiver.addr,
        &[
            "--proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--allow",
            "192.0.2.0/24",
        ],
    )
    .await;
    let server: SocketAddr = relay.addr;
    // v1 from the trusted load balancer, naming an admitted client.
    let mut c = client_after(&relay, None, b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n")
        .await
        .expect("v1 accepted");
    assert_eq!(
        send(&mut c, post("/", fixture(STATUS))).await.0,
        StatusCode::OK
    );
    assert_eq!(
        receiver.seen()[0].headers["x-forwarded-for"],
        "192.0.2.7",
        "client from the header"
    );
    // v2, IPv4 and IPv6.
    let v2 = encode_v2("192.0.2.8:5000".parse().unwrap(), server);
    let mut c = client_after(&relay, None, &v2).await.expect("v2 accepted");
    assert_eq!(
        send(&mut c, post("/", fixture(STATUS))).await.0,
        StatusCode::OK
    );
    assert_eq!(receiver.seen()[1].headers["x-forwarded-for"], "192.0.2.8");
    // A header naming a client outside the allow-list: closed before TLS.
    assert!(closed_silently(&relay, None, b"PROXY TCP4 198.51.100.1 10.0.0.1 1 443\r\n").await);
    // A trusted peer without a header (straight TLS): closed.
    assert!(closed_silently(&relay, None, b"\x16\x03\x01\x00\x05hello").await);
    // An untrusted peer with a perfectly good header: closed.
    let outsider: IpAddr = "127.0.0.2".parse().unwrap();
    assert!(
        closed_silently(
            &relay,
            Some(outsider),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 443\r\n"
        )
        .await
    );
    assert!(closed_silently(&relay, Some(outsider), &v2).await);
    assert_eq!(
        receiver.seen().len(),
        2,
        "only the two admitted clients got through"
    );
    let m = relay.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "ews_relay_connections_denied_total{reason=\"untrusted_proxy\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &m,
            "ews_relay_connections_denied_total{reason=\"proxy_header\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(&m, "ews_relay_connections_denied_total{reason=\"source\"}"),
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn client_ip_header_honoured_only_from_a_trusted_peer() {
    let receiver = TestReceiver::answering(fixture("send-notification-result-ok.xml")).await;
    let relay = Relay::start(
        receiver.addr,
        &[
            "--client-ip-header",
            "CF-Connecting-IP",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--allow",
            "192.0.2.0/24,127.0.0.2",
        ],
    )
    .await;
    let with_header = |ip: &str| {
        Request::post("/")
            .header("host", "localhost")
            .header("cf-connecting-ip", ip)
            .body(Full::new(bytes::Bytes::from(fixture(STATUS))))
            .unwrap()
    };
    // From the trusted CDN (127.0.0.1, itself not in the allow-list): the header decides.
    let mut cdn = relay.client().await;
    assert_eq!(
        send(&mut cdn, with_header("192.0.2.9")).await.0,
        StatusCode::OK
    );
    assert_eq!(receiver.seen()[0].headers["x-forwarded-for"], "192.0.2.9");
    assert_eq!(
        send(&mut cdn, with_header("198.51.100.1")).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&mut cdn, post("/", fixture(STATUS))).await.0,
        StatusCode::FORBIDDEN,
        "no header"
    );
    assert_eq!(
        send(&mut cdn, with_header("not-an-ip")).await.0,
        StatusCode::FORBIDDEN
    );
    // From an untrusted but admitted peer: the header is ignored, the TCP peer counts.
    let outsider: IpAddr = "127.0.0.2".parse().unwrap();
    let mut direct = https_client(relay.addr, &relay.cert, Some(outsider))
        .await
        .unwrap();
    assert_eq!(
        send(&mut direct, with_header("192.0.2.9")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        receiver.seen()[1].headers["x-forwarded-for"],
        "127.0.0.2",
        "spoofed header ignored"
    );
    // From an untrusted peer that is not admitted: refused before TLS, header or not.
    let stranger: IpAddr = "127.0.0.3".parse().unwrap();
    assert!(https_client(relay.addr, &relay.cert, Some(stranger))
        .await
        .is_err());
    assert_eq!(receiver.seen().len(), 2);
    assert_eq!(
        relay
            .metric("ews_relay_connections_denied_total{reason=\"client_ip_header\"}")
            .await,
        3.0
    );
    relay.stop().await;
}

#[test]
fn flags_need_trusted_proxies() {
    for args in [
        vec!["ews-relay", "--proxy-protocol"],
        vec!["ews-relay", "--client-ip-header", "CF-Connecting-IP"],
        vec!["ews-relay", "--trusted-proxy", "cloudflare"],
        vec![
            "ews-relay",
            "--proxy-protocol",
            "--trusted-proxy",
            "not-a-net",
        ],
    ] {
        let e = ews_relay::Config::parse_from(&args)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--trusted-proxy"), "{args:?}: {e}");
    }
    let c = ews_relay::Config::parse_from([
        "ews-relay",
        "--client-ip-header",
        "CF-Connecting-IP",
        "--trusted-proxy",
        "cloudflare",
    ])
    .unwrap();
    assert!(c
        .trusted_proxies
        .unwrap()
        .allows("104.16.0.1".parse().unwrap()));
}
