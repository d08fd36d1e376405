//! Asynchronous payments: 3-D Secure challenges answered in the provider's page, providers that
//! answer by webhook, and the webhooks themselves (signed, stored, deduplicated, in any order,
//! before their payment), all over real HTTP against the sandbox provider.

use std::time::Duration;

use checkout::app::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{TestApp, TEST_WEBHOOK_SECRET};

/// Every role, with the sandbox's webhooks pointed at the edge.
async fn shop(tweak: impl FnOnce(&mut checkout::config::Settings)) -> TestApp {
    let app = TestApp::spawn_roles(&Role::ALL, tweak).await;
    app.register_webhooks().await;
    app.product("TEE", "10.00", 5).await;
    app
}

/// Polls the order until the provider's challenge is waiting; its URL.
async fn challenge_of(app: &TestApp, token: &str, id: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, order) = app.order(token, id).await;
        if order["stage"] == "requires_action" {
            assert_eq!(order["status"], "pending", "{order}");
            assert_eq!(order["nextAction"]["type"], "redirect_to_url", "{order}");
            return order["nextAction"]["url"]
                .as_str()
                .expect("a challenge URL")
                .to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the order never waited for the buyer: {order}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The buyer answers the challenge page (a form POST, as a browser sends it).
async fn answer(app: &TestApp, url: &str, outcome: &str) -> StatusCode {
    let page = app.http.get(url).send().await.expect("challenge page");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap_or_default().contains("outcome"));
    app.http
        .post(url)
        .form(&[("outcome", outcome)])
        .send()
        .await
        .expect("challenge answer")
        .status()
}

/// The stock row's (on hand, reserved).
async fn held(app: &TestApp) -> (i64, i64) {
    let (on_hand, reserved, _) = app.stock("TEE").await;
    (on_hand, reserved)
}

#[tokio::test]
async fn a_challenge_approved_in_the_providers_page_confirms_the_order_and_ships() {
    let app = shop(|_| {}).await;
    let (token, id) = app.buy("alice", "TEE", "tok_3ds").await;
    let url = challenge_of(&app, &token, &id).await;
    // Waiting for the buyer holds the stock, for longer than a card's hold.
    assert_eq!(held(&app).await, (5, 1));
    assert!(answer(&app, &url, "approve").await.is_success());
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert!(order.get("nextAction").is_none(), "{order}");
    let (status, _) = app.ship(&id).await;
    assert!(status.is_success());
    // Wait for the shipment's end, not the capture's ledger row: CI once ran the audit between
    // the two and found the order's capture not yet recorded as ours.
    app.eventually("shipped", || async {
        app.order(&token, &id).await.1["status"] == "shipped"
    })
    .await;
    assert_eq!(app.ledger_count(&id, "capture").await, 1);
    let timeline = app.timeline(&token, &id).await;
    for kind in [
        "action_required",
        "provider_update",
        "authorized",
        "confirmed",
    ] {
        assert!(
            timeline.contains(&kind.to_owned()),
            "{kind} in {timeline:?}"
        );
    }
    app.audit().await;
}

#[tokio::test]
async fn the_challenge_sends_the_buyer_back_to_the_shops_return_url() {
    let app = shop(|_| {}).await;
    let token = app.token("ivy");
    let cart = app.add(&token, "TEE", 1).await;
    let mut body = crate::helpers::checkout_body(&cart, "tok_3ds");
    body["paymentMethod"]["returnUrl"] = json!("ftp://shop.example/back");
    let (status, refused) = app
        .request(reqwest::Method::POST, "/api/checkout")
        .token(&token)
        .json(body.clone())
        .header("Idempotency-Key", "bad-return")
        .send()
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(refused["error"]["code"], "invalid_return_url");
    body["paymentMethod"]["returnUrl"] = json!("https://shop.example/orders/thanks");
    let (status, accepted) = app
        .request(reqwest::Method::POST, "/api/checkout")
        .token(&token)
        .json(body)
        .header("Idempotency-Key", "with-return")
        .send()
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let id = accepted["orderId"].as_str().expect("id").to_owned();
    let url = challenge_of(&app, &token, &id).await;
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let answered = browser
        .post(&url)
        .form(&[("outcome", "approve")])
        .send()
        .await
        .expect("answer");
    assert_eq!(answered.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        answered.headers()["location"],
        "https://shop.example/orders/thanks"
    );
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
}

#[tokio::test]
async fn a_denied_challenge_fails_the_order_and_gives_the_stock_back() {
    let app = shop(|_| {}).await;
    let (token, id) = app.buy("bob", "TEE", "tok_3ds").await;
    let url = challenge_of(&app, &token, &id).await;
    assert!(answer(&app, &url, "deny").await.is_success());
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "failed", "{order}");
    assert_eq!(order["reason"], "authentication_failed", "{order}");
    app.eventually("the stock back", || async { held(&app).await == (5, 0) })
        .await;
    app.audit().await;
}

#[tokio::test]
async fn an_abandoned_challenge_times_out_and_a_late_approval_is_voided_never_captured() {
    let app = shop(|s| s.payments.action_timeout = Duration::from_secs(1)).await;
    let (token, id) = app.buy("carol", "TEE", "tok_3ds").await;
    let url = challenge_of(&app, &token, &id).await;
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "failed", "{order}");
    assert_eq!(order["reason"], "authentication_timeout", "{order}");
    // The buyer comes back to the page: the provider's hold is gone, nothing is authorized.
    let late = app
        .http
        .post(&url)
        .form(&[("outcome", "approve")])
        .send()
        .await
        .expect("a late answer");
    assert_eq!(late.status(), StatusCode::CONFLICT);
    // And an approval the provider sends anyway (a race we lost) is voided, never captured.
    let auth_id = auth_of(&app, &id).await;
    let (status, body) = app
        .deliver(&late_approval(&app, &id, &auth_id, "evt_late_1").await)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.eventually("the late approval voided", || async {
        app.count(
            "SELECT count(*) FROM payments.provider_events
             WHERE event_id = 'evt_late_1' AND applied = 'voided'",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(app.ledger_count(&id, "capture").await, 0);
    let provider: Value = app.provider_authorization(&id).await;
    assert_eq!(provider["status"], "voided", "{provider}");
    assert_eq!(held(&app).await, (5, 0));
    app.audit().await;
}

#[tokio::test]
async fn a_provider_that_answers_by_webhook_confirms_the_order() {
    let app = shop(|_| {}).await;
    let (token, id) = app.buy("dave", "TEE", "tok_async").await;
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(
        app.count("SELECT count(*) FROM payments.provider_events WHERE applied = 'applied'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_webhook_that_never_comes_is_made_up_for_by_asking_the_provider() {
    // The provider's webhooks go nowhere (no endpoint registered): it decides, nobody hears.
    let app = TestApp::spawn_roles(&Role::ALL, |s| {
        s.payments.webhook_grace = Duration::from_millis(500);
    })
    .await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("hana", "TEE", "tok_async").await;
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM payments.provider_events
             WHERE event_id LIKE 'reconciled:%' AND applied = 'applied'"
        )
        .await,
        1
    );
    assert_eq!(app.sandbox_webhooks().await[0]["delivered"], false);
}

#[tokio::test]
async fn the_same_webhook_three_times_or_a_stale_one_after_it_changes_nothing() {
    let app = shop(|_| {}).await;
    let (token, id) = app.buy("erin", "TEE", "tok_async").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    let sent = app.sandbox_webhooks().await;
    let event_id = sent[0]["id"].as_str().expect("event id").to_owned();
    // The provider delivers it twice more: both acknowledged, neither applied again.
    for _ in 0..2 {
        let resent: Value = app
            .http
            .post(format!("{}/v1/sandbox/webhooks/{event_id}/resend", app.psp))
            .send()
            .await
            .expect("resend")
            .json()
            .await
            .expect("json");
        assert_eq!(resent["status"], 200, "{resent}");
    }
    // A failure it sends after the success (out of order) does not move the payment back.
    let auth_id = auth_of(&app, &id).await;
    let mut stale = late_approval(&app, &id, &auth_id, "evt_stale_1").await;
    stale["type"] = json!("authorization.failed");
    stale["data"]["status"] = json!("failed");
    assert_eq!(app.deliver(&stale).await.0, StatusCode::OK);
    app.eventually("the stale event looked at", || async {
        app.count(
            "SELECT count(*) FROM payments.provider_events
             WHERE event_id = 'evt_stale_1' AND applied = 'ignored'",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        app.count("SELECT count(*) FROM payments.provider_events")
            .await,
        2,
        "one row per provider event"
    );
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    assert_eq!(app.ledger_count(&id, "authorization").await, 1);
    let (status, _) = app.ship(&id).await;
    assert!(status.is_success());
    app.eventually("one capture", || async {
        app.ledger_count(&id, "capture").await == 1
    })
    .await;
    app.audit().await;
}

#[tokio::test]
async fn a_bad_signature_an_old_timestamp_or_a_wrong_amount_is_refused_and_changes_nothing() {
    let app = shop(|_| {}).await;
    let (token, id) = app.buy("frank", "TEE", "tok_3ds").await;
    challenge_of(&app, &token, &id).await;
    let auth_id = auth_of(&app, &id).await;
    let event = late_approval(&app, &id, &auth_id, "evt_forged").await;
    let body = serde_json::to_vec(&event).expect("json");
    let now = chrono::Utc::now().timestamp();
    let refusals = [
        (
            sign("not-the-secret", now, &body),
            body.clone(),
            StatusCode::UNAUTHORIZED,
            "signature_invalid",
        ),
        (
            sign(TEST_WEBHOOK_SECRET, now - 301, &body),
            body.clone(),
            StatusCode::UNAUTHORIZED,
            "timestamp_out_of_tolerance",
        ),
        (
            String::new(),
            body.clone(),
            StatusCode::BAD_REQUEST,
            "signature_missing",
        ),
    ];
    for (signature, body, status, code) in refusals {
        let (got, answer) = app.deliver_raw(&signature, body).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{answer}"
        );
    }
    let mut wrong = event.clone();
    wrong["data"]["amount"] = json!("1.00");
    let (got, answer) = app.deliver(&wrong).await;
    assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "amount_mismatch");
    assert_eq!(
        app.count("SELECT count(*) FROM payments.provider_events")
            .await,
        0
    );
    let (_, order) = app.order(&token, &id).await;
    assert_eq!(order["stage"], "requires_action", "{order}");
}

#[tokio::test]
async fn a_webhook_that_arrives_before_its_payment_is_parked_then_applied() {
    // No authorize role yet: the checkout waits, reserved, while the provider already answers.
    let roles = [Role::Edge, Role::Reserve, Role::Order, Role::Compensate];
    let app = TestApp::spawn_roles(&roles, |_| {}).await;
    app.register_webhooks().await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("gina", "TEE", "tok_async").await;
    app.eventually("the stock held", || async { held(&app).await == (5, 1) })
        .await;
    // The provider got the request (as from an authorize process that then crashed before
    // recording it), and its webhook comes while nothing is recorded.
    let (_, order) = app.order(&token, &id).await;
    let first: Value = app
        .http
        .post(format!("{}/v1/authorizations", app.psp))
        .header("Idempotency-Key", format!("{id}:authorize"))
        .json(&json!({"amount": order["total"], "currency": "USD", "token": "tok_async", "reference": id}))
        .send()
        .await
        .expect("authorize")
        .json()
        .await
        .expect("json");
    assert_eq!(first["status"], "pending", "{first}");
    app.eventually(
        "the webhook stored, with no payment to apply it to",
        || async {
            app.count("SELECT count(*) FROM payments.provider_events WHERE applied IS NULL")
                .await
                == 1
        },
    )
    .await;
    assert_eq!(app.count("SELECT count(*) FROM payments.payments").await, 0);
    let _authorize = app.start_roles(&[Role::Authorize]).await;
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(
        app.count("SELECT count(*) FROM payments.provider_events WHERE applied = 'applied'")
            .await,
        1
    );
    assert_eq!(app.ledger_count(&id, "authorization").await, 1);
}

/// The provider's authorization id of an order's payment.
async fn auth_of(app: &TestApp, order_id: &str) -> String {
    let auth: Option<String> =
        sqlx::query_scalar("SELECT auth_id FROM payments.payments WHERE order_id = $1::uuid")
            .bind(order_id)
            .fetch_one(&app.pool)
            .await
            .expect("a payment");
    auth.expect("an authorization id")
}

/// An `authorization.succeeded` for the order's total, as the provider would send it.
async fn late_approval(app: &TestApp, order_id: &str, auth_id: &str, event_id: &str) -> Value {
    let (total,): (rust_decimal::Decimal,) =
        sqlx::query_as("SELECT amount FROM payments.payments WHERE order_id = $1::uuid")
            .bind(order_id)
            .fetch_one(&app.pool)
            .await
            .expect("a payment");
    json!({
        "id": event_id,
        "type": "authorization.succeeded",
        "created": chrono::Utc::now().timestamp(),
        "data": {"authorizationId": auth_id, "reference": order_id,
                 "amount": total.normalize().to_string(), "currency": "USD",
                 "status": "authorized", "declineCode": null}
    })
}

/// `Psp-Signature` as the provider computes it.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = t.to_string().into_bytes();
    signed.push(b'.');
    signed.extend_from_slice(body);
    format!("t={t},v1={}", hex::encode(ring::hmac::sign(&key, &signed)))
}

impl TestApp {
    /// Points the sandbox's webhooks at this app's edge.
    pub async fn register_webhooks(&self) {
        let response = self
            .http
            .post(format!("{}/v1/sandbox/webhook-endpoint", self.psp))
            .json(
                &json!({"url": format!("{}/api/webhooks/psp/sandbox", self.base),
                          "secret": TEST_WEBHOOK_SECRET}),
            )
            .send()
            .await
            .expect("register webhooks");
        assert!(response.status().is_success());
    }

    /// Delivers a provider event signed with the test secret, now.
    pub async fn deliver(&self, event: &Value) -> (StatusCode, Value) {
        let body = serde_json::to_vec(event).expect("json");
        let signature = sign(TEST_WEBHOOK_SECRET, chrono::Utc::now().timestamp(), &body);
        self.deliver_raw(&signature, body).await
    }

    /// Delivers raw bytes with a given `Psp-Signature` (none when empty).
    pub async fn deliver_raw(&self, signature: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(format!("{}/api/webhooks/psp/sandbox", self.base))
            .header("Content-Type", "application/json")
            .body(body);
        if !signature.is_empty() {
            request = request.header("Psp-Signature", signature);
        }
        let response = request.send().await.expect("webhook");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The events the sandbox sent.
    pub async fn sandbox_webhooks(&self) -> Vec<Value> {
        let body: Value = self
            .http
            .get(format!("{}/v1/sandbox/webhooks", self.psp))
            .send()
            .await
            .expect("webhooks")
            .json()
            .await
            .expect("json");
        body["events"].as_array().cloned().unwrap_or_default()
    }

    /// The provider's own record of the order's authorization.
    pub async fn provider_authorization(&self, order_id: &str) -> Value {
        let body: Value = self
            .http
            .get(format!(
                "{}/v1/authorizations?reference={order_id}",
                self.psp
            ))
            .send()
            .await
            .expect("authorizations")
            .json()
            .await
            .expect("json");
        body["authorizations"][0].clone()
    }

    /// The kinds on the order's timeline, in order.
    pub async fn timeline(&self, token: &str, order_id: &str) -> Vec<String> {
        let (status, body) = self
            .request(
                reqwest::Method::GET,
                format!("/api/orders/{order_id}/events"),
            )
            .token(token)
            .send()
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["events"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .filter_map(|e| e["type"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[tokio::test]
async fn killing_the_authorize_process_amid_asynchronous_payments_doubles_nothing() {
    use checkout::app::App;

    // Everything but authorize in-process; authorize as a real process we can SIGKILL between
    // the provider's answer and our record.
    let nats = crate::helpers::NatsServer::start();
    let db = crate::helpers::TestDb::new();
    let mut settings = crate::helpers::test_settings(&nats, &db);
    let roles = [Role::Edge, Role::Reserve, Role::Order, Role::Compensate];
    let psp = crate::helpers::SandboxPsp::start().await;
    settings.psp.url = psp.url().to_owned();
    let app = App::build(settings.clone(), &roles)
        .await
        .expect("app starts");
    let app = TestApp::attach(app, settings, psp, nats, db).await;
    app.register_webhooks().await;
    let spawn_authorize = || {
        let mut env = crate::helpers::process_env(&app.settings, crate::helpers::port(), &app.psp);
        env.push(("CHECKOUT__NATS__ACK_WAIT".into(), "2s".into()));
        crate::helpers::CheckoutProcess::start("authorize", env)
    };
    app.product("TEE", "2.00", 100).await;
    let mut orders = Vec::new();
    for i in 0..20 {
        let card = if i % 2 == 0 { "tok_async" } else { "tok_visa" };
        orders.push(app.buy(&format!("buyer-{i}"), "TEE", card).await);
    }
    let mut first = spawn_authorize();
    app.eventually("a first payment recorded", || async {
        app.count("SELECT count(*) FROM payments.payments").await > 0
    })
    .await;
    first.kill();
    let mut second = spawn_authorize();
    for (token, order_id) in &orders {
        let order = app.settled(token, order_id).await;
        assert_eq!(order["status"], "confirmed", "{order}");
        assert_eq!(
            app.ledger_count(order_id, "authorization").await,
            1,
            "{order_id}"
        );
    }
    second.kill();
    assert_eq!(
        app.count("SELECT count(*) FROM payments.provider_events WHERE applied = 'applied'")
            .await,
        10,
        "one applied outcome per asynchronous payment"
    );
    app.eventually("20 units committed once", || async {
        app.stock("TEE").await == (80, 0, 80)
    })
    .await;
    app.audit().await;
}
