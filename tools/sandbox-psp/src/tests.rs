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
    harness_of(Sandbox::default(), register, failures).await
}

/// [`harness`] around `sandbox`.
async fn harness_of(sandbox: Sandbox, register: bool, failures: u32) -> Harness {
    let psp = serve(sandbox.router()).await;
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

    /// A `tok_visa` authorization of 42.50 for `reference`; answers its id.
    async fn visa(&self, reference: &str) -> String {
        let reply = self
            .authorize(&format!("key-{reference}"), "tok_visa", reference)
            .await;
        assert_eq!(reply["status"], "authorized", "{reply}");
        reply["id"].as_str().unwrap().to_owned()
    }

    /// `POST /v1/authorizations/{id}/{operation}` under `key`, with `amount` when there is one.
    async fn operate(
        &self,
        id: &str,
        operation: &str,
        key: &str,
        amount: Option<&str>,
    ) -> (StatusCode, Value) {
        let body = amount.map_or_else(|| json!({}), |a| json!({ "amount": a }));
        let path = format!("/v1/authorizations/{id}/{operation}");
        self.post(&path, Some(key), &body).await
    }

    /// Like [`Harness::operate`], expecting success; answers the reply.
    async fn done(&self, id: &str, operation: &str, key: &str, amount: Option<&str>) -> Value {
        let (status, reply) = self.operate(id, operation, key, amount).await;
        assert_eq!(status, StatusCode::OK, "{operation} {amount:?}: {reply}");
        reply
    }

    /// Like [`Harness::operate`], expecting a 400 with `code`.
    async fn refused(
        &self,
        id: &str,
        operation: &str,
        key: &str,
        amount: Option<&str>,
        code: &str,
    ) {
        let (status, reply) = self.operate(id, operation, key, amount).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{operation} {amount:?}: {reply}"
        );
        assert_eq!(
            reply["error"]["code"], code,
            "{operation} {amount:?}: {reply}"
        );
    }

    /// The authorization's row in `GET /v1/authorizations?reference=`.
    async fn row_of(&self, reference: &str) -> Value {
        let (_, found) = self
            .get(&format!("/v1/authorizations?reference={reference}"))
            .await;
        found["authorizations"][0].clone()
    }

    /// The ledger entries of `kind` for `reference`.
    async fn entries(&self, reference: &str, kind: &str) -> Vec<Value> {
        let (_, ledger) = self.get(&format!("/v1/ledger?reference={reference}")).await;
        let entries = ledger["entries"].as_array().unwrap();
        entries
            .iter()
            .filter(|e| e["kind"] == kind)
            .cloned()
            .collect()
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

/// The amounts of entries, in order.
fn amounts(entries: &[Value]) -> Vec<&str> {
    entries
        .iter()
        .map(|e| e["amount"].as_str().unwrap())
        .collect()
}

/// How far `expires_at` (RFC 3339) is from now plus `lifetime`, in seconds.
fn off_by(expires_at: &Value, lifetime: chrono::Duration) -> i64 {
    let at = chrono::DateTime::parse_from_rfc3339(expires_at.as_str().unwrap()).unwrap();
    (at.with_timezone(&chrono::Utc) - (chrono::Utc::now() + lifetime))
        .num_seconds()
        .abs()
}

#[tokio::test]
async fn partial_captures_take_the_whole_amount_and_no_more() {
    let h = harness(false, 0).await;
    let id = h.visa("order-thirds").await;
    let mut ids = Vec::new();
    for (key, amount) in [("cap-1", "10.00"), ("cap-2", "20"), ("cap-3", "12.50")] {
        let reply = h.done(&id, "capture", key, Some(amount)).await;
        assert_eq!(reply["status"], "captured");
        assert_eq!(reply["amount"], amount);
        assert_eq!(reply["authorizationId"], id.as_str());
        assert_eq!(h.status_of("order-thirds").await, "captured");
        ids.push(reply["id"].as_str().unwrap().to_owned());
    }
    h.refused(
        &id,
        "capture",
        "cap-4",
        Some("0.01"),
        "amount_exceeds_authorized",
    )
    .await;
    h.refused(&id, "capture", "cap-5", None, "amount_exceeds_authorized")
        .await;

    let captures = h.entries("order-thirds", "capture").await;
    assert_eq!(amounts(&captures), ["10.00", "20", "12.50"]);
    let entry_ids: Vec<&str> = captures.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(entry_ids, ids);
    assert!(ids.iter().all(|i| i.starts_with("capture_")));
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    assert!(captures.iter().all(|e| e["status"] == "captured"));
    let row = h.row_of("order-thirds").await;
    assert_eq!(row["status"], "captured");
    assert_eq!(row["captures"], 3);
    assert_eq!(row["captured"], "42.50");
    assert_eq!(row["refunded"], "0");
    assert_eq!(row["voided"], "0");
}

#[tokio::test]
async fn a_capture_larger_than_the_rest_is_refused_and_records_nothing() {
    let h = harness(false, 0).await;
    let id = h.visa("order-over").await;
    h.refused(
        &id,
        "capture",
        "cap-big",
        Some("42.51"),
        "amount_exceeds_authorized",
    )
    .await;
    assert_eq!(h.status_of("order-over").await, "authorized");
    h.done(&id, "capture", "cap-1", Some("40")).await;
    h.refused(
        &id,
        "capture",
        "cap-2",
        Some("2.51"),
        "amount_exceeds_authorized",
    )
    .await;
    for (key, amount) in [("cap-z", "0"), ("cap-n", "-1"), ("cap-t", "ten")] {
        h.refused(&id, "capture", key, Some(amount), "invalid_amount")
            .await;
    }
    assert_eq!(amounts(&h.entries("order-over", "capture").await), ["40"]);
    assert_eq!(h.row_of("order-over").await["captured"], "40");

    // Without an amount, a capture takes what is left.
    let rest = h.done(&id, "capture", "cap-rest", None).await;
    assert_eq!(rest["amount"], "2.50");
    assert_eq!(h.row_of("order-over").await["captured"], "42.50");
    let unknown = h.operate("auth_nope", "capture", "cap-x", None).await;
    assert_eq!(unknown.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn partial_refunds_never_return_more_than_was_captured() {
    let h = harness(false, 0).await;
    let id = h.visa("order-refunds").await;
    h.refused(&id, "refund", "ref-0", Some("1"), "invalid_state")
        .await;
    h.done(&id, "capture", "cap", None).await;
    let first = h.done(&id, "refund", "ref-1", Some("10")).await;
    let second = h.done(&id, "refund", "ref-2", Some("20.00")).await;
    for reply in [&first, &second] {
        assert_eq!(reply["status"], "captured");
        assert!(reply["id"].as_str().unwrap().starts_with("refund_"));
    }
    assert_ne!(first["id"], second["id"]);
    h.refused(
        &id,
        "refund",
        "ref-3",
        Some("12.51"),
        "amount_exceeds_captured",
    )
    .await;
    h.refused(&id, "refund", "ref-4", Some("0"), "invalid_amount")
        .await;

    let refunds = h.entries("order-refunds", "refund").await;
    assert_eq!(amounts(&refunds), ["10", "20.00"]);
    assert_eq!(refunds[0]["id"], first["id"]);
    assert_eq!(refunds[1]["id"], second["id"]);
    let row = h.row_of("order-refunds").await;
    assert_eq!(row["status"], "captured");
    assert_eq!(row["refunds"], 2);
    assert_eq!(row["refunded"], "30.00");
}

#[tokio::test]
async fn an_authorization_is_refunded_only_once_all_captured_money_is() {
    let h = harness(false, 0).await;
    let id = h.visa("order-all").await;
    h.done(&id, "capture", "cap", Some("30")).await;
    let part = h.done(&id, "refund", "ref-1", Some("10")).await;
    assert_eq!(part["status"], "captured");
    assert_eq!(h.status_of("order-all").await, "captured");

    // Without an amount, a refund returns what is left of the captured money (not the
    // uncaptured 12.50), and the authorization stays open for the rest: a shop may refund
    // its first parcel before it ships the second.
    let rest = h.done(&id, "refund", "ref-2", None).await;
    assert_eq!(rest["status"], "captured");
    assert_eq!(rest["amount"], "20");
    h.done(&id, "capture", "cap-2", None).await;
    let last = h.done(&id, "refund", "ref-3", None).await;
    assert_eq!(last["status"], "refunded");
    assert_eq!(last["amount"], "12.50");
    let row = h.row_of("order-all").await;
    assert_eq!(row["status"], "refunded");
    assert_eq!(row["captured"], "42.50");
    assert_eq!(row["refunded"], "42.50");

    // Nothing is left to refund, and a refunded authorization is done with.
    h.refused(&id, "refund", "ref-4", Some("1"), "invalid_state")
        .await;
    h.refused(&id, "refund", "ref-5", None, "invalid_state")
        .await;
    h.refused(&id, "capture", "cap-3", Some("1"), "invalid_state")
        .await;
    h.refused(&id, "void", "void", None, "invalid_state").await;
    assert_eq!(h.entries("order-all", "refund").await.len(), 3);
}

#[tokio::test]
async fn a_void_after_a_partial_capture_releases_the_remainder() {
    let h = harness(false, 0).await;
    let id = h.visa("order-rest").await;
    h.done(&id, "capture", "cap-1", Some("30")).await;
    let voided = h.done(&id, "void", "void-1", None).await;
    assert_eq!(voided["status"], "captured");
    assert_eq!(voided["amount"], "12.50");
    assert!(voided["id"].as_str().unwrap().starts_with("void_"));
    h.refused(
        &id,
        "capture",
        "cap-2",
        Some("0.01"),
        "amount_exceeds_authorized",
    )
    .await;
    h.refused(&id, "capture", "cap-3", None, "amount_exceeds_authorized")
        .await;
    h.refused(&id, "void", "void-2", None, "invalid_state")
        .await;
    h.refused(&id, "void", "void-3", Some("1"), "invalid_amount")
        .await;

    let row = h.row_of("order-rest").await;
    assert_eq!(row["status"], "captured");
    assert_eq!(row["captured"], "30");
    assert_eq!(row["voided"], "12.50");
    let voids = h.entries("order-rest", "void").await;
    assert_eq!(amounts(&voids), ["12.50"]);
    assert_eq!(voids[0]["id"], voided["id"]);
    assert_eq!(voids[0]["status"], "voided");

    // The captured money can still be refunded, all of it.
    let refund = h.done(&id, "refund", "ref", None).await;
    assert_eq!(refund["amount"], "30");
    assert_eq!(refund["status"], "refunded");
}

#[tokio::test]
async fn a_void_before_any_capture_voids_the_whole_amount() {
    let h = harness(false, 0).await;
    let id = h.visa("order-void-all").await;
    let voided = h.done(&id, "void", "void", None).await;
    assert_eq!(voided["status"], "voided");
    assert_eq!(voided["amount"], "42.50");
    h.refused(&id, "capture", "cap", None, "invalid_state")
        .await;
    let row = h.row_of("order-void-all").await;
    assert_eq!(row["status"], "voided");
    assert_eq!(row["voided"], "42.50");
    assert_eq!(row["captured"], "0");
}

#[tokio::test]
async fn an_expired_authorization_cannot_be_captured() {
    let h = harness(false, 0).await;
    let reply = h.authorize("key-exp", "tok_visa", "order-exp").await;
    assert!(off_by(&reply["expiresAt"], chrono::Duration::days(7)) < 60);
    let id = reply["id"].as_str().unwrap();
    h.done(id, "capture", "cap-1", Some("20")).await;

    let expire = format!("/v1/sandbox/authorizations/{id}/expire");
    let (status, expired) = h.post(&expire, None, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{expired}");
    assert_eq!(expired["id"], id);
    assert!(off_by(&expired["expiresAt"], chrono::Duration::zero()) < 60);
    assert_eq!(
        h.row_of("order-exp").await["expiresAt"],
        expired["expiresAt"]
    );
    h.refused(id, "capture", "cap-2", Some("1"), "authorization_expired")
        .await;
    assert_eq!(h.entries("order-exp", "capture").await.len(), 1);

    // What was captured can still be refunded, and the rest released.
    h.done(id, "refund", "ref", Some("5")).await;
    h.done(id, "void", "void", None).await;
    assert_eq!(h.row_of("order-exp").await["voided"], "22.50");
    let (status, _) = h
        .post(
            "/v1/sandbox/authorizations/auth_nope/expire",
            None,
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_authorization_lifetime_is_configurable() {
    let lifetime = Duration::from_secs(90);
    let h = harness_of(
        Sandbox::default().with_authorization_lifetime(lifetime),
        false,
        0,
    )
    .await;
    let reply = h.authorize("key-short", "tok_visa", "order-short").await;
    assert!(off_by(&reply["expiresAt"], chrono::Duration::seconds(90)) < 5);

    let h = harness_of(
        Sandbox::default().with_authorization_lifetime(Duration::ZERO),
        false,
        0,
    )
    .await;
    let id = h.visa("order-gone").await;
    h.refused(&id, "capture", "cap", None, "authorization_expired")
        .await;
}

#[tokio::test]
async fn a_replayed_partial_capture_answers_the_same_and_captures_once() {
    let h = harness(false, 0).await;
    let id = h.visa("order-replay").await;
    let first = h.done(&id, "capture", "cap-once", Some("12.50")).await;
    let replay = h.done(&id, "capture", "cap-once", Some("12.5")).await;
    assert_eq!(replay, first);
    assert_eq!(h.entries("order-replay", "capture").await.len(), 1);
    assert_eq!(h.row_of("order-replay").await["captured"], "12.50");

    let (status, reused) = h.operate(&id, "capture", "cap-once", Some("13")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused["error"]["code"], "idempotency_key_reused");
    let (status, _) = h.operate(&id, "capture", "cap-once", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // A refusal is remembered too, and replayed as it was.
    let refused = h.operate(&id, "capture", "cap-big", Some("40")).await;
    assert_eq!(refused.1["error"]["code"], "amount_exceeds_authorized");
    assert_eq!(
        h.operate(&id, "capture", "cap-big", Some("40")).await,
        refused
    );
    assert_eq!(h.entries("order-replay", "capture").await.len(), 1);
}

#[tokio::test]
async fn concurrent_refunds_cannot_refund_more_than_was_captured() {
    let h = harness(false, 0).await;
    let id = h.visa("order-race").await;
    h.done(&id, "capture", "cap", None).await;
    let mut refunds = tokio::task::JoinSet::new();
    for i in 0..10 {
        let request = h
            .client
            .post(format!("{}/v1/authorizations/{id}/refund", h.psp))
            .header("Idempotency-Key", format!("ref-{i}"))
            .json(&json!({"amount": "10"}));
        refunds.spawn(async move {
            let response = request.send().await.unwrap();
            let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
            (status, response.json::<Value>().await.unwrap())
        });
    }
    let replies = refunds.join_all().await;
    let ok = replies.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!(ok, 4, "{replies:?}");
    assert!(replies
        .iter()
        .filter(|(s, _)| *s != StatusCode::OK)
        .all(|(_, r)| r["error"]["code"] == "amount_exceeds_captured"));
    let row = h.row_of("order-race").await;
    assert_eq!(row["refunded"], "40");
    assert_eq!(row["status"], "captured");
}
