//! The simulated Microsoft Graph end to end: the simulator on 127.0.0.1 port 0, a real HTTPS
//! callback (rcgen certificate for 127.0.0.1) that answers validations rightly or wrongly and
//! notifications with 202 or 500, and Graph's REST API driven over real sockets.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use ews_sim::graph_state::parse_graph_time;
use ews_sim::{
    Auth, CallbackTrust, ChangeType, DeliveryKind, GraphTarget, GraphThrottle, RemovalReason,
    SimConfig, SimHandle,
};

const WAIT: Duration = Duration::from_secs(10);
const RESOURCE: &str = "users/room-4.12@contoso.example/events";

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

struct Sim {
    handle: SimHandle,
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Sim {
    async fn start(config: SimConfig) -> Sim {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = SimHandle::new(config).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(handle.clone().serve(listener, async {
            let _ = rx.await;
        }));
        Sim {
            handle,
            addr,
            stop: Some(tx),
        }
    }

    /// Fast retries, trusting the callback.
    fn config(cb: &Callback) -> SimConfig {
        let mut config = SimConfig::new(["room-4.12@contoso.example"]);
        config.callback_trust = CallbackTrust::Roots(vec![cb.cert.clone()]);
        config.graph.first_retry = Duration::from_millis(50);
        config.graph.retry_budget = Duration::from_secs(5);
        config.graph.validation_timeout = Duration::from_millis(800);
        config.graph.notification_timeout = Duration::from_secs(2);
        config.graph.reauthorization_grace = Duration::from_millis(400);
        config
    }

    async fn request(&self, method: &str, path: &str, auth: Option<&str>, body: Value) -> Reply {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "graph.microsoft.com")
            .header("content-type", "application/json");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let body = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let response = sender
            .send_request(request.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    async fn create(&self, body: Value) -> Reply {
        self.request("POST", "/v1.0/subscriptions", None, body)
            .await
    }

    async fn created(&self, body: Value) -> Value {
        let reply = self.create(body).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        reply.json()
    }

    async fn control(&self, route: &str, body: Value) -> Reply {
        self.request("POST", &format!("/_sim/graph/{route}"), None, body)
            .await
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    /// `error.code` of a Graph error, checking the shape.
    fn graph_error(&self) -> (String, String) {
        let json = self.json();
        let error = &json["error"];
        assert!(error["innerError"]["request-id"].is_string(), "{json}");
        assert!(error["innerError"]["date"].is_string(), "{json}");
        (
            error["code"].as_str().unwrap().to_owned(),
            error["message"].as_str().unwrap().to_owned(),
        )
    }
}

fn in_minutes(minutes: u64) -> String {
    ews_sim::graph_state::graph_time(SystemTime::now() + Duration::from_secs(minutes * 60))
}

/// How the callback answers validations.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Validation {
    Right,
    WrongToken,
    WrongContentType,
    Slow(Duration),
}

/// One request the callback received.
#[derive(Debug)]
struct Received {
    path: String,
    content_type: String,
    user_agent: String,
    body: Bytes,
}

impl Received {
    fn items(&self) -> Vec<Value> {
        let json: Value = serde_json::from_slice(&self.body).unwrap();
        json["value"].as_array().unwrap().clone()
    }
}

/// An HTTPS callback for 127.0.0.1: answers validations per [`Validation`], notifications
/// 202 (or 500 while failing), and reports everything it receives.
struct Callback {
    base: String,
    cert: rustls_pki_types::CertificateDer<'static>,
    validation: Arc<Mutex<Validation>>,
    failing: Arc<Mutex<bool>>,
    received: mpsc::UnboundedReceiver<Received>,
}

impl Callback {
    async fn start() -> Callback {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().clone();
        let private = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], private)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let validation = Arc::new(Mutex::new(Validation::Right));
        let failing = Arc::new(Mutex::new(false));
        let (tx, received) = mpsc::unbounded_channel();
        let (v2, f2) = (validation.clone(), failing.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, tx, v, f) = (acceptor.clone(), tx.clone(), v2.clone(), f2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| {
                            let (tx, v, f) = (tx.clone(), v.clone(), f.clone());
                            async move { Ok::<_, std::convert::Infallible>(answer(req, tx, v, f).await) }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Callback {
            base: format!("https://127.0.0.1:{port}"),
            cert: der,
            validation,
            failing,
            received,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn validation(&self, v: Validation) {
        *self.validation.lock().unwrap() = v;
    }

    fn fail(&self, failing: bool) {
        *self.failing.lock().unwrap() = failing;
    }

    async fn next(&mut self) -> Received {
        tokio::time::timeout(WAIT, self.received.recv())
            .await
            .expect("a request in time")
            .unwrap()
    }

    /// The next notification POST (validations skipped).
    async fn next_post(&mut self) -> Received {
        loop {
            let r = self.next().await;
            if !r.path.contains("validationToken=") {
                return r;
            }
        }
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    tx: mpsc::UnboundedSender<Received>,
    validation: Arc<Mutex<Validation>>,
    failing: Arc<Mutex<bool>>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path_and_query().unwrap().to_string();
    let header = |n: &str| {
        req.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (content_type, user_agent) = (header("content-type"), header("user-agent"));
    let token = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|p| p.strip_prefix("validationToken="))
            .map(form_decode)
    });
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let _ = tx.send(Received {
        path,
        content_type,
        user_agent,
        body,
    });
    let reply = |status: u16, ct: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ct)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    if let Some(token) = token {
        let mode = *validation.lock().unwrap();
        return match mode {
            Validation::Right => reply(200, "text/plain; charset=utf-8", token),
            Validation::WrongToken => reply(200, "text/plain", format!("{token}x")),
            Validation::WrongContentType => reply(200, "application/json", token),
            Validation::Slow(d) => {
                tokio::time::sleep(d).await;
                reply(200, "text/plain", token)
            }
        };
    }
    if *failing.lock().unwrap() {
        reply(500, "text/plain", "down".into())
    } else {
        reply(202, "text/plain", String::new())
    }
}

/// `application/x-www-form-urlencoded` value decoding, as a web framework does it.
fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn create_body(cb: &Callback, lifecycle: bool) -> Value {
    let mut body = json!({
        "changeType": "created,updated,deleted",
        "notificationUrl": cb.url("/graph/notify"),
        "resource": RESOURCE,
        "expirationDateTime": in_minutes(60 * 24),
        "clientState": "s3cret-state",
    });
    if lifecycle {
        body["lifecycleNotificationUrl"] = cb.url("/graph/lifecycle").into();
    }
    body
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn create_validates_both_endpoints_and_answers_like_graph() {
    let mut cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;

    let sub = sim.created(create_body(&cb, true)).await;
    for path in [
        "/graph/notify?validationToken=",
        "/graph/lifecycle?validationToken=",
    ] {
        let v = cb.next().await;
        assert!(v.path.starts_with(path), "{}", v.path);
        // .NET-style encoding: spaces as '+', lower-case escapes for ':'.
        assert!(
            v.path.contains("Validation%3a+Testing+client"),
            "{}",
            v.path
        );
        assert_eq!(v.content_type, "text/plain; charset=utf-8");
        assert!(v.body.is_empty());
    }
    assert_eq!(sub["resource"], RESOURCE);
    assert_eq!(sub["changeType"], "created,updated,deleted");
    assert_eq!(sub["clientState"], "s3cret-state");
    assert_eq!(sub["latestSupportedTlsVersion"], "v1_2");
    assert_eq!(sub["id"].as_str().unwrap().len(), 36);
    let exp = sub["expirationDateTime"].as_str().unwrap();
    assert_eq!(exp.len(), "2016-11-20T18:23:45.9356913Z".len(), "{exp}");
    let deliveries = sim.handle.graph_deliveries();
    assert_eq!(deliveries.len(), 2);
    assert!(deliveries
        .iter()
        .all(|d| d.kind == DeliveryKind::Validation && d.ok && d.status == Some(200)));

    let list = sim
        .request("GET", "/v1.0/subscriptions", None, Value::Null)
        .await;
    assert_eq!(list.json()["value"].as_array().unwrap().len(), 1);

    // Validation failures: each is 400 ValidationError, and nothing is created.
    for mode in [
        Validation::WrongToken,
        Validation::WrongContentType,
        Validation::Slow(Duration::from_millis(1500)),
    ] {
        cb.validation(mode);
        let reply = sim.create(create_body(&cb, false)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{mode:?}");
        let (code, message) = reply.graph_error();
        assert_eq!(code, "ValidationError");
        assert_eq!(message, "Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request.");
    }
    assert_eq!(sim.handle.graph_subscriptions().len(), 1);
    cb.validation(Validation::Right);

    // Checks before any validation.
    let mut http = create_body(&cb, false);
    http["notificationUrl"] = "http://127.0.0.1:9/x".into();
    assert_eq!(sim.create(http).await.status, StatusCode::BAD_REQUEST);
    let mut http = create_body(&cb, true);
    http["lifecycleNotificationUrl"] = "http://127.0.0.1:9/x".into();
    assert_eq!(sim.create(http).await.status, StatusCode::BAD_REQUEST);
    let mut bad = create_body(&cb, false);
    bad["changeType"] = "created,moved".into();
    assert_eq!(sim.create(bad).await.status, StatusCode::BAD_REQUEST);
    let mut bad = create_body(&cb, false);
    bad["clientState"] = "x".repeat(129).into();
    assert_eq!(sim.create(bad).await.status, StatusCode::BAD_REQUEST);
    let mut bad = create_body(&cb, false);
    bad["resource"] = "".into();
    assert_eq!(sim.create(bad).await.status, StatusCode::BAD_REQUEST);
    let mut bad = create_body(&cb, false);
    bad["expirationDateTime"] = in_minutes(10_081).into();
    let reply = sim.create(bad).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.graph_error().1,
        "Subscription expiration can only be 10080 minutes in the future."
    );

    // Under 45 minutes is raised to 45.
    let mut short = create_body(&cb, false);
    short["expirationDateTime"] = in_minutes(5).into();
    let sub = sim.created(short).await;
    let exp = parse_graph_time(sub["expirationDateTime"].as_str().unwrap()).unwrap();
    let lifetime = exp.duration_since(SystemTime::now()).unwrap();
    assert!(lifetime > Duration::from_secs(44 * 60), "{lifetime:?}");
}

#[tokio::test]
async fn lifetime_cap_shortens_expiration_and_the_subscription_really_expires() {
    let cb = Callback::start().await;
    let mut config = Sim::config(&cb);
    config.graph.lifetime_cap = Some(Duration::from_millis(1500));
    let sim = Sim::start(config).await;
    let sub = sim.created(create_body(&cb, false)).await;
    let id = sub["id"].as_str().unwrap().to_owned();
    let exp = parse_graph_time(sub["expirationDateTime"].as_str().unwrap()).unwrap();
    assert!(exp <= SystemTime::now() + Duration::from_millis(1500));

    let path = format!("/v1.0/subscriptions/{id}");
    let renew = json!({"expirationDateTime": in_minutes(60)});
    let reply = sim.request("PATCH", &path, None, renew.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(sim.handle.graph_subscription(&id).unwrap().renewed, 1);

    tokio::time::sleep(Duration::from_millis(1700)).await;
    let reply = sim.request("PATCH", &path, None, renew).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.graph_error().0, "ResourceNotFound");
    assert_eq!(
        sim.request("GET", &path, None, Value::Null).await.status,
        StatusCode::NOT_FOUND
    );
    assert!(sim.handle.graph_subscription(&id).unwrap().expired);
    assert!(sim
        .handle
        .graph_change(&GraphTarget::Subscription(id), ChangeType::Created, 1)
        .is_err());
}

#[tokio::test]
async fn notifications_arrive_in_order_and_are_retried_after_a_failure() {
    let mut cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    let sub = sim.created(create_body(&cb, false)).await;
    let id = sub["id"].as_str().unwrap().to_owned();
    cb.next().await; // validation

    cb.fail(true);
    let made = sim
        .handle
        .graph_change(
            &GraphTarget::Subscription(id.clone()),
            ChangeType::Created,
            3,
        )
        .unwrap();
    assert_eq!(made[0].ids, ["evt-000001", "evt-000002", "evt-000003"]);
    let failed = cb.next_post().await;
    assert_eq!(failed.items().len(), 3);
    cb.fail(false);

    let info = sim
        .handle
        .wait_until(WAIT, |h| {
            h.graph_subscription(&id).filter(|s| s.delivered == 3)
        })
        .await
        .expect("3 delivered");
    // The callback reports a POST before answering it: the last one reported is the one that
    // succeeded (earlier ones are failed tries of the same batch).
    let mut last = None;
    while let Ok(post) = cb.received.try_recv() {
        last = Some(post);
    }
    let post = last.expect("the successful POST");
    assert_eq!(post.content_type, "application/json; charset=utf-8");
    assert!(!post.user_agent.is_empty());
    let mut ids = Vec::new();
    for item in post.items() {
        assert_eq!(item["subscriptionId"], id.as_str());
        assert_eq!(item["clientState"], "s3cret-state");
        assert_eq!(item["changeType"], "created");
        assert_eq!(
            item["resourceData"]["@odata.type"],
            "#Microsoft.Graph.Event"
        );
        assert!(item["resource"].as_str().unwrap().starts_with("Users/"));
        assert!(item["tenantId"].is_string());
        ids.push(item["resourceData"]["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids, ["evt-000001", "evt-000002", "evt-000003"]);
    assert_eq!(info.dropped, 0);
    let posts: Vec<_> = sim
        .handle
        .graph_deliveries()
        .into_iter()
        .filter(|d| d.kind == DeliveryKind::Notification)
        .collect();
    assert_eq!(posts[0].status, Some(500));
    assert!(!posts[0].ok);
    assert!(posts.last().unwrap().ok);
    assert!(posts.iter().all(|d| d.elapsed_ms < 3000));

    // Control route, by resource, and the next id follows on.
    let reply = sim
        .control(
            "changes",
            json!({"resource": format!("/{RESOURCE}"), "change_type": "updated"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()[0]["ids"][0], "evt-000004");
    let post = cb.next_post().await;
    assert_eq!(post.items()[0]["changeType"], "updated");

    // Wrong clientState, once.
    let reply = sim
        .control("faults/wrong-client-state", json!({"subscription_id": id}))
        .await;
    assert_eq!(reply.json()["id"], "evt-000005");
    let post = cb.next_post().await;
    assert_ne!(post.items()[0]["clientState"], "s3cret-state");
}

#[tokio::test]
async fn items_are_dropped_after_the_retry_budget() {
    let mut cb = Callback::start().await;
    let mut config = Sim::config(&cb);
    config.graph.retry_budget = Duration::from_millis(300);
    let sim = Sim::start(config).await;
    let sub = sim.created(create_body(&cb, false)).await;
    let id = sub["id"].as_str().unwrap().to_owned();
    cb.next().await;
    cb.fail(true);
    sim.handle
        .graph_change(&GraphTarget::All, ChangeType::Deleted, 2)
        .unwrap();
    let info = sim
        .handle
        .wait_until(WAIT, |h| {
            h.graph_subscription(&id).filter(|s| s.dropped == 2)
        })
        .await
        .expect("dropped");
    assert_eq!(info.delivered, 0);
    assert!(sim.handle.graph_deliveries().iter().any(|d| d.dropped));
    // Delivery works again afterwards, with the next id.
    cb.fail(false);
    sim.handle
        .graph_change(&GraphTarget::All, ChangeType::Deleted, 1)
        .unwrap();
    loop {
        let post = cb.next_post().await;
        if post.items()[0]["resourceData"]["id"] == "evt-000003" {
            break;
        }
    }
}

#[tokio::test]
async fn lifecycle_notifications_of_each_kind() {
    let mut cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    let sub = sim.created(create_body(&cb, true)).await;
    let id = sub["id"].as_str().unwrap().to_owned();

    let lifecycle = |r: &Received| {
        assert!(r.path.starts_with("/graph/lifecycle"), "{}", r.path);
        let item = r.items()[0].clone();
        assert_eq!(item["clientState"], "s3cret-state");
        assert!(item.get("changeType").is_none());
        item["lifecycleEvent"].as_str().unwrap().to_owned()
    };

    sim.handle.graph_missed(&id).unwrap();
    assert_eq!(lifecycle(&cb.next_post().await), "missed");

    // Reauthorization answered in time: kept.
    sim.handle.graph_require_reauthorization(&id).unwrap();
    assert_eq!(lifecycle(&cb.next_post().await), "reauthorizationRequired");
    assert!(
        sim.handle
            .graph_subscription(&id)
            .unwrap()
            .reauthorization_pending
    );
    let path = format!("/v1.0/subscriptions/{id}/reauthorize");
    let reply = sim.request("POST", &path, None, Value::Null).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let info = sim.handle.graph_subscription(&id).unwrap();
    assert!(info.is_live() && info.reauthorized == 1 && !info.reauthorization_pending);

    // Not answered: removed with subscriptionRemoved after the grace.
    sim.control(
        "faults/reauthorization-required",
        json!({"subscription_id": id}),
    )
    .await;
    assert_eq!(lifecycle(&cb.next_post().await), "reauthorizationRequired");
    assert_eq!(lifecycle(&cb.next_post().await), "subscriptionRemoved");
    let info = sim.handle.graph_subscription(&id).unwrap();
    assert_eq!(info.removal, Some(RemovalReason::NotReauthorized));
    let reply = sim
        .request(
            "GET",
            &format!("/v1.0/subscriptions/{id}"),
            None,
            Value::Null,
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);

    // Removed with a notification, and silently.
    let loud = sim.created(create_body(&cb, true)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let quiet = sim.created(create_body(&cb, true)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sim.handle.graph_remove_subscription(&quiet, false).unwrap();
    sim.handle.graph_remove_subscription(&loud, true).unwrap();
    let removed = cb.next_post().await;
    assert_eq!(lifecycle(&removed), "subscriptionRemoved");
    assert_eq!(removed.items()[0]["subscriptionId"], loud.as_str());
    assert!(sim.handle.graph_missed(&quiet).is_err());

    // No lifecycle URL: no lifecycle notifications.
    let plain = sim.created(create_body(&cb, false)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sim.handle.graph_missed(&plain).unwrap();
    sim.handle.graph_expire_now(&plain).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(r) = cb.received.try_recv() {
        assert!(r.path.contains("validationToken="), "unexpected {}", r.path);
    }
    assert!(sim.handle.graph_subscription(&plain).unwrap().expired);
}

#[tokio::test]
async fn throttling_answers_429_and_503_with_retry_after() {
    let cb = Callback::start().await;
    let sim = Sim::start(Sim::config(&cb)).await;
    sim.handle
        .graph_throttle(2, GraphThrottle::TooManyRequests, 7);
    for _ in 0..2 {
        let reply = sim
            .request("GET", "/v1.0/subscriptions", None, Value::Null)
            .await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(reply.headers["retry-after"], "7");
        assert_eq!(reply.graph_error().0, "TooManyRequests");
    }
    let reply = sim
        .request("GET", "/v1.0/subscriptions", None, Value::Null)
        .await;
    assert_eq!(reply.status, StatusCode::OK);

    let reply = sim
        .control(
            "faults/throttle",
            json!({"status": 503, "retry_after_secs": 3}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = sim.create(create_body(&cb, false)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "3");
    assert_eq!(sim.handle.snapshot().graph_requests, 4);
}

#[tokio::test]
async fn graph_routes_take_only_tokens_for_graph() {
    let cb = Callback::start().await;
    let mut config = Sim::config(&cb);
    config.auth = Auth::OAuth {
        client_id: "app-1".into(),
        client_secret: "s3cret".into(),
        token_lifetime: Duration::from_secs(3600),
    };
    let sim = Sim::start(config).await;
    let token = |scope: &'static str| {
        let sim = &sim;
        async move {
            let tcp = TcpStream::connect(sim.addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let body = format!(
                "grant_type=client_credentials&client_id=app-1&client_secret=s3cret&scope={scope}"
            );
            let request = Request::post("/contoso.onmicrosoft.com/oauth2/v2.0/token")
                .header("host", "login")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let reply = sender.send_request(request).await.unwrap();
            let body = reply.into_body().collect().await.unwrap().to_bytes();
            let json: Value = serde_json::from_slice(&body).unwrap();
            format!("Bearer {}", json["access_token"].as_str().unwrap())
        }
    };
    let ews = token("https%3A%2F%2Foutlook.office365.com%2F.default").await;
    let graph = token("https%3A%2F%2Fgraph.microsoft.com%2F.default").await;

    let reply = sim
        .request("GET", "/v1.0/subscriptions", None, Value::Null)
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.graph_error().0, "InvalidAuthenticationToken");
    let reply = sim
        .request("GET", "/v1.0/subscriptions", Some(&ews), Value::Null)
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let (code, message) = reply.graph_error();
    assert_eq!(code, "InvalidAuthenticationToken");
    assert!(message.contains("audience"), "{message}");
    let reply = sim
        .request("GET", "/v1.0/subscriptions", Some(&graph), Value::Null)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = sim
        .request(
            "POST",
            "/v1.0/subscriptions",
            Some(&graph),
            create_body(&cb, false),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());

    // The control API shows it all.
    let subs = sim
        .request("GET", "/_sim/graph/subscriptions", None, Value::Null)
        .await
        .json();
    assert_eq!(subs.as_array().unwrap().len(), 1);
    let deliveries = sim
        .request("GET", "/_sim/graph/deliveries", None, Value::Null)
        .await
        .json();
    assert_eq!(deliveries[0]["kind"], "validation");
}

#[tokio::test]
async fn subscriptions_sharing_a_url_share_capped_batches() {
    let mut cb = Callback::start().await;
    let mut config = Sim::config(&cb);
    config.graph.max_batch = 3;
    let sim = Sim::start(config).await;
    let a = sim.created(create_body(&cb, false)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = sim.created(create_body(&cb, false)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let made = sim
        .handle
        .graph_change(&GraphTarget::All, ChangeType::Created, 2)
        .unwrap();
    assert_eq!(made.len(), 2);
    let first = cb.next_post().await.items();
    let second = cb.next_post().await.items();
    assert_eq!((first.len(), second.len()), (3, 1));
    let owners: Vec<&str> = first
        .iter()
        .chain(&second)
        .map(|i| i["subscriptionId"].as_str().unwrap())
        .collect();
    assert_eq!(owners, [a.as_str(), a.as_str(), b.as_str(), b.as_str()]);
    let posts: Vec<_> = sim
        .handle
        .graph_deliveries()
        .into_iter()
        .filter(|d| d.kind == DeliveryKind::Notification)
        .collect();
    assert_eq!(posts[0].subscription_ids, [a.clone(), b.clone()]);
    assert_eq!(posts[0].items, 3);
}
