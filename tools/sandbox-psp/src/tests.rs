//! The sandbox served in-process, with a tiny webhook receiver beside it.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::{signature_header, verify_signature, Sandbox};

const SECRET: &str = "whsec_sandbox_test";
/// How long a test waits for something asynchronous before it fails.
const DEADLINE: Duration = Duration::from_secs(15);

#[derive(Clone)]
struct Received {
    signature: String,
    content_type: String,
    body: Bytes,
}

/// Records every webhook; answers 500 to the first `failures_left` ones.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    failures_left: Arc<AtomicU32>,
}

impl Receiver {
    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    receiver.got.lock().unwrap().push(Received {
        signature: header("psp-signature"),
        content_type: header("content-type"),
        body,
    });
    let failed = receiver
        .failures_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failed {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// Polls `probe` until it finds something, failing the test after [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Harness {
    psp: String,
    client: reqwest::Client,
    receiver: Receiver,
}

/// The sandbox and a receiver; the receiver is the webhook endpoint when `register`.
async fn harness(register: bool, failures: u32) -> Harness {
    let psp = serve(Sandbox::default().router()).await;
    let receiver = Receiver::default();
    receiver.failures_left.store(failures, Ordering::SeqCst);
    let hooks = serve(
        Router::new()
            .route("/hooks", post(receive))
            .with_state(receiver.clone()),
    )
    .await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let harness = Harness {
        psp,
        client,
        receiver,
    };
    if register {
        let endpoint = json!({"url": format!("{hooks}/hooks"), "secret": SECRET});
        let (status, _) = harness
            .post("/v1/sandbox/webhook-endpoint", None, &endpoint)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    harness
}

impl Harness {
    async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> (StatusCode, Value) {
        let mut request = self.client.post(format!("{}{path}", self.psp)).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.unwrap();
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.psp))
            .send()
            .await
            .unwrap();
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn authorize(&self, key: &str, token: &str, reference: &str) -> Value {
        let body = json!({"amount": "42.50", "currency": "USD", "token": token,
                          "reference": reference, "returnUrl": "https://shop.test/return?o=1"});
        let (status, reply) = self.post("/v1/authorizations", Some(key), &body).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
        reply
    }

    /// The status `GET /v1/authorizations?reference=` shows.
    async fn status_of(&self, reference: &str) -> String {
        let (_, found) = self
            .get(&format!("/v1/authorizations?reference={reference}"))
            .await;
        found["authorizations"][0]["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn answer(&self, url: &str, outcome: &str) -> reqwest::Response {
        self.client
            .post(url)
            .form(&[("outcome", outcome)])
            .send()
            .await
            .unwrap()
    }

    async fn events(&self) -> Vec<Value> {
        let (_, list) = self.get("/v1/sandbox/webhooks").await;
        list["events"].as_array().unwrap().clone()
    }

    /// The webhooks received so far, once `n` have arrived, each checked and parsed.
    async fn received(&self, n: usize) -> Vec<Value> {
        let got = eventually(&format!("{n} webhooks"), || async {
            let got = self.receiver.received();
            (got.len() >= n).then_some(got)
        })
        .await;
        got.iter().map(signed_event).collect()
    }
}

/// A received webhook's event, after checking its headers and signature.
fn signed_event(received: &Received) -> Value {
    assert_eq!(received.content_type, "application/json");
    assert!(
        verify_signature(SECRET, &received.signature, &received.body),
        "bad signature {}",
        received.signature
    );
    let t: i64 = received.signature[2..received.signature.find(',').unwrap()]
        .parse()
        .unwrap();
    assert!((chrono::Utc::now().timestamp() - t).abs() < 60);
    serde_json::from_slice(&received.body).unwrap()
}

#[test]
fn the_signature_is_hmac_sha256_of_the_timestamp_dot_the_body() {
    let body = br#"{"id":"evt_0","type":"authorization.succeeded"}"#;
    let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_known").unwrap();
    mac.update(b"1700000000.");
    mac.update(body);
    let expected = hex::encode(mac.finalize().into_bytes());
    assert_eq!(expected.len(), 64);
    assert!(!expected.chars().any(|c| c.is_ascii_uppercase()));

    let header = signature_header("whsec_known", 1_700_000_000, body);
    assert_eq!(header, format!("t=1700000000,v1={expected}"));
    assert!(verify_signature("whsec_known", &header, body));
    assert!(!verify_signature("whsec_other", &header, body));
    assert!(!verify_signature("whsec_known", &header, b"{}"));
    let moved = header.replace("t=1700000000", "t=1700000001");
    assert!(!verify_signature("whsec_known", &moved, body));
    assert!(!verify_signature(
        "whsec_known",
        &format!("v1={expected}"),
        body
    ));
    assert!(!verify_signature("whsec_known", "t=1700000000,v1=zz", body));
}

#[tokio::test]
async fn an_async_authorization_settles_and_sends_a_signed_webhook() {
    let h = harness(true, 0).await;
    let reply = h.authorize("key-async", "tok_async", "order-async").await;
    assert_eq!(reply["status"], "pending");
    assert!(reply.get("nextAction").is_none());
    assert_eq!(reply["riskScore"], 10);
    assert!(reply["expiresAt"].is_string());
    let id = reply["id"].as_str().unwrap().to_owned();
    assert_eq!(h.status_of("order-async").await, "pending");

    let events = h.received(1).await;
    let event = &events[0];
    assert_eq!(event["type"], "authorization.succeeded");
    assert!(event["id"].as_str().unwrap().starts_with("evt_"));
    assert_eq!(event["id"].as_str().unwrap().len(), 4 + 32);
    assert!(event["created"].is_i64());
    assert_eq!(
        event["data"],
        json!({"authorizationId": id, "reference": "order-async", "amount": "42.50",
               "currency": "USD", "status": "authorized", "declineCode": null})
    );
    assert_eq!(h.status_of("order-async").await, "authorized");
    let (_, ledger) = h.get("/v1/ledger?reference=order-async").await;
    assert_eq!(ledger["entries"][0]["status"], "authorized");

    let recorded = eventually("the delivery recorded", || async {
        let events = h.events().await;
        (events.len() == 1 && events[0]["delivered"] == true).then(|| events[0].clone())
    })
    .await;
    assert_eq!(recorded["attempts"], 1);
    assert_eq!(recorded["lastStatus"], 200);
    assert_eq!(&recorded["body"], event);

    // The replay answers the first reply, whatever the status is now.
    let replay = h.authorize("key-async", "tok_async", "order-async").await;
    assert_eq!(replay, reply);
}

#[tokio::test]
async fn an_approved_challenge_redirects_and_sends_a_webhook() {
    let h = harness(true, 0).await;
    let reply = h.authorize("key-3ds", "tok_3ds", "order-3ds").await;
    assert_eq!(reply["status"], "requires_action");
    assert_eq!(reply["declineCode"], Value::Null);
    assert_eq!(reply["nextAction"]["type"], "redirect_to_url");
    let id = reply["id"].as_str().unwrap().to_owned();
    let url = reply["nextAction"]["url"].as_str().unwrap().to_owned();
    assert_eq!(url, format!("{}/challenge/{id}", h.psp));
    assert_eq!(h.status_of("order-3ds").await, "requires_action");
    let (_, ledger) = h.get("/v1/ledger?reference=order-3ds").await;
    assert_eq!(ledger["entries"][0]["status"], "requires_action");
    let capture = format!("/v1/authorizations/{id}/capture");
    let (status, refused) = h.post(&capture, Some("cap-early"), &json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"]["code"], "invalid_state");

    let page = h.client.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    for needle in [
        "42.50",
        "USD",
        "order-3ds",
        "name=\"outcome\"",
        "value=\"approve\"",
    ] {
        assert!(page.contains(needle), "{needle} not in {page}");
    }

    let answered = h.answer(&url, "approve").await;
    assert_eq!(answered.status(), 303);
    assert_eq!(
        answered.headers()["location"],
        "https://shop.test/return?o=1"
    );
    let events = h.received(1).await;
    assert_eq!(events[0]["type"], "authorization.succeeded");
    assert_eq!(events[0]["data"]["authorizationId"], id.as_str());
    assert_eq!(events[0]["data"]["reference"], "order-3ds");
    assert_eq!(h.status_of("order-3ds").await, "authorized");
    let (_, ledger) = h.get("/v1/ledger?reference=order-3ds").await;
    assert_eq!(ledger["entries"][0]["status"], "authorized");

    // A second answer changes nothing and sends nothing.
    let again = h.answer(&url, "deny").await;
    assert_eq!(again.status(), 409);
    assert_eq!(h.events().await.len(), 1);
    assert_eq!(h.status_of("order-3ds").await, "authorized");
    let replay = h.authorize("key-3ds", "tok_3ds", "order-3ds").await;
    assert_eq!(replay, reply);
    let (status, _) = h.post(&capture, Some("cap-late"), &json!({})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_denied_challenge_fails_without_a_return_url() {
    let h = harness(true, 0).await;
    let body =
        json!({"amount": "10", "currency": "USD", "token": "tok_3ds", "reference": "order-deny"});
    let (_, reply) = h.post("/v1/authorizations", Some("key-deny"), &body).await;
    let url = reply["nextAction"]["url"].as_str().unwrap().to_owned();

    let bad = h.answer(&url, "maybe").await;
    assert_eq!(bad.status(), 400);
    let unknown = h
        .answer(&format!("{}/challenge/auth_nope", h.psp), "approve")
        .await;
    assert_eq!(unknown.status(), 404);
    let missing = h
        .client
        .get(format!("{}/challenge/auth_nope", h.psp))
        .send()
        .await;
    assert_eq!(missing.unwrap().status(), 404);

    let answered = h.answer(&url, "deny").await;
    assert_eq!(answered.status(), 200);
    assert!(answered.text().await.unwrap().contains("denied"));
    let events = h.received(1).await;
    assert_eq!(events[0]["type"], "authorization.failed");
    assert_eq!(events[0]["data"]["status"], "failed");
    assert_eq!(events[0]["data"]["declineCode"], "authentication_failed");
    assert_eq!(events[0]["data"]["amount"], "10");
    assert_eq!(h.status_of("order-deny").await, "failed");
}

#[tokio::test]
async fn a_voided_challenge_cannot_be_answered() {
    let h = harness(true, 0).await;
    let reply = h.authorize("key-void", "tok_3ds", "order-void").await;
    let id = reply["id"].as_str().unwrap();
    let url = reply["nextAction"]["url"].as_str().unwrap();
    let (status, voided) = h
        .post(
            &format!("/v1/authorizations/{id}/void"),
            Some("void-1"),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{voided}");
    assert_eq!(voided["status"], "voided");
    assert_eq!(h.status_of("order-void").await, "voided");

    let answered = h.answer(url, "approve").await;
    assert_eq!(answered.status(), 409);
    assert_eq!(h.status_of("order-void").await, "voided");
    assert!(h.events().await.is_empty());
    assert!(h.receiver.received().is_empty());
}

#[tokio::test]
async fn refused_deliveries_are_retried_and_can_be_sent_again() {
    let h = harness(true, 1).await;
    h.authorize("key-retry", "tok_async", "order-retry").await;
    let recorded = eventually("a delivery after a retry", || async {
        let events = h.events().await;
        (events.len() == 1 && events[0]["delivered"] == true).then(|| events[0].clone())
    })
    .await;
    assert_eq!(recorded["attempts"], 2);
    assert_eq!(recorded["lastStatus"], 200);
    let first_two = h.received(2).await;
    assert_eq!(first_two[0], first_two[1]);

    let event_id = recorded["id"].as_str().unwrap();
    let resend = format!("/v1/sandbox/webhooks/{event_id}/resend");
    let (status, resent) = h.post(&resend, None, &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resent, json!({"status": 200}));
    let all = h.received(3).await;
    assert_eq!(all[2], all[0]);
    assert_eq!(h.events().await[0]["attempts"], 3);
    let (status, _) = h
        .post("/v1/sandbox/webhooks/evt_nope/resend", None, &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn events_without_an_endpoint_are_kept() {
    let h = harness(false, 0).await;
    h.authorize("key-kept", "tok_async", "order-kept").await;
    let kept = eventually("the event", || async { h.events().await.pop() }).await;
    assert_eq!(kept["type"], "authorization.succeeded");
    assert_eq!(kept["attempts"], 0);
    assert_eq!(kept["delivered"], false);
    assert_eq!(kept["lastStatus"], Value::Null);
    let resend = format!(
        "/v1/sandbox/webhooks/{}/resend",
        kept["id"].as_str().unwrap()
    );
    let (status, resent) = h.post(&resend, None, &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resent, json!({"status": null}));
}

#[tokio::test]
async fn an_outage_answers_503_until_it_ends() {
    let h = harness(false, 0).await;
    let (status, _) = h
        .post("/v1/sandbox/outage", None, &json!({"seconds": 30}))
        .await;
    assert!(status.is_success());
    let body =
        json!({"amount": "1", "currency": "USD", "token": "tok_visa", "reference": "order-down"});
    let (status, reply) = h.post("/v1/authorizations", Some("key-down"), &body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply["error"]["code"], "unavailable");
    let (status, _) = h.get("/v1/authorizations?reference=order-down").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.get("/v1/sandbox/webhooks").await.0, StatusCode::OK);
    assert_eq!(h.get("/v1/ledger").await.0, StatusCode::OK);

    let ended = h
        .client
        .delete(format!("{}/v1/sandbox/outage", h.psp))
        .send()
        .await;
    assert!(ended.unwrap().status().is_success());
    let (status, reply) = h.post("/v1/authorizations", Some("key-down"), &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["status"], "authorized");
}
