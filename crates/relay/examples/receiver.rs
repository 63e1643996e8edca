//! A stand-in for the internal receiver: listens on plain HTTP, prints each notification it is
//! given, and answers Exchange's way (`SendNotificationResult` with `OK`).
//!
//! Usage: `cargo run --example receiver [ADDR]` (default `127.0.0.1:10002`, the relay's default
//! `--upstream`). Lets an administrator try the relay end to end on one machine.
#![forbid(unsafe_code)]

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The answer every EWS push callback gives to keep its subscription.
const RESULT_OK: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">
  <s:Body>
    <m:SendNotificationResult xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">
      <m:SubscriptionStatus>OK</m:SubscriptionStatus>
    </m:SendNotificationResult>
  </s:Body>
</s:Envelope>
"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:10002".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("receiver listening on http://{addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    println!("--- {} {}", parts.method, parts.uri);
    for (name, value) in &parts.headers {
        println!("{name}: {}", value.to_str().unwrap_or("<binary>"));
    }
    println!("\n{}", String::from_utf8_lossy(&body));
    let mut resp = Response::new(Full::new(Bytes::from_static(RESULT_OK.as_bytes())));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    Ok(resp)
}
