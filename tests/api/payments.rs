//! Payments: every card token's path, retries without double authorization, the breaker,
//! the rate limit, and capture, cancel and refund.

use std::time::Duration;

use checkout::config::Redeliver;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::TestApp;

/// Checks out one unit of a fresh product with `card` and waits for the outcome.
async fn checkout_with(app: &TestApp, user: &str, card: &str) -> (String, String, Value) {
    let token = app.token(user);
    let cart = app.add(&token, "TEE", 1).await;
    let (status, body) = app.checkout(&token, "k", &cart, card).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let order_id = body["orderId"].as_str().expect("id").to_owned();
    let order = app.settled(&token, &order_id).await;
    (token, order_id, order)
}

#[tokio::test]
async fn each_card_token_reaches_its_final_status() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 100).await;

    let (_, id, order) = checkout_with(&app, "a", "tok_insufficient_funds").await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("failed"), Some("payment_declined"))
    );
    assert_eq!(order["payment"]["declineCode"], "insufficient_funds");
    assert_eq!(app.ledger_count(&id, "authorization").await, 1);

    let (_, id, order) = checkout_with(&app, "b", "tok_fraud").await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("failed"), Some("fraud_suspected"))
    );
    assert_eq!(order["payment"]["status"], "voided");
    assert_eq!(app.ledger_count(&id, "void").await, 1);

    let (_, id, order) = checkout_with(&app, "c", "tok_slow").await;
    assert_eq!(order["status"], "confirmed");
    assert_eq!(app.ledger_count(&id, "authorization").await, 1);

    let (_, id, order) = checkout_with(&app, "d", "tok_flaky").await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(
        order["payment"]["failedAttempts"], 2,
        "two 503s, then approved"
    );
    assert_eq!(
        app.ledger_count(&id, "authorization").await,
        1,
        "retries reused the key"
    );

    // Every failure gave its unit back; the two confirmed orders kept theirs.
    app.eventually("stock settled", || async {
        app.stock("TEE").await == (98, 0, 98)
    })
    .await;
}

#[tokio::test]
async fn a_provider_that_never_answers_fails_the_order_after_bounded_attempts() {
    let app = TestApp::spawn_with(|s| {
        s.psp.timeout = Duration::from_millis(300);
        s.payments.max_attempts = 3;
        s.payments.retry_window = Duration::ZERO;
    })
    .await;
    app.product("TEE", "10.00", 5).await;
    let token = app.token("alice");
    let cart = app.add(&token, "TEE", 1).await;
    let (_, body) = app.checkout(&token, "k", &cart, "tok_timeout").await;
    let order_id = body["orderId"].as_str().expect("id").to_owned();
    let mut saw_payment_pending = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let order = loop {
        let (_, order) = app.order(&token, &order_id).await;
        if order["status"] != "pending" {
            break order;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still pending: {order}"
        );
        saw_payment_pending |= order["stage"] == "payment_pending";
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(saw_payment_pending, "retries show as stage payment_pending");
    assert_eq!(order["status"], "failed");
    assert_eq!(order["reason"], "payment_unavailable");
    assert_eq!(order["payment"]["failedAttempts"], 3);
    assert_eq!(app.ledger_count(&order_id, "authorization").await, 0);
    assert_eq!(app.stock("TEE").await, (5, 0, 5));
}

#[tokio::test]
async fn failing_between_the_provider_answer_and_the_commit_never_authorizes_twice() {
    let app = TestApp::spawn_with(|s| s.chaos.redeliver = Redeliver::AfterProviderCall).await;
    app.product("TEE", "10.00", 5).await;
    for user in ["a", "b", "c"] {
        let (_, id, order) = checkout_with(&app, user, "tok_visa").await;
        assert_eq!(order["status"], "confirmed");
        assert_eq!(app.ledger_count(&id, "authorization").await, 1, "{id}");
    }
    assert_eq!(app.count("SELECT count(*) FROM payments.payments").await, 3);
}

/// The breakers' states as `/readyz` counts them, one entry per authorize process.
async fn breaker_state(app: &TestApp) -> Vec<String> {
    let (_, ready) = app.request(Method::GET, "/readyz").send().await;
    let counts = &ready["payments"]["breakers"];
    ["closed", "half_open", "open"]
        .iter()
        .flat_map(|s| {
            let n = counts[*s].as_u64().unwrap_or(0) as usize;
            std::iter::repeat_n((*s).to_owned(), n)
        })
        .collect()
}

#[tokio::test]
async fn the_breaker_opens_on_failures_and_closes_after_good_probes() {
    let app = TestApp::spawn_with(|s| {
        s.payments.breaker_min_calls = 2;
        s.payments.breaker_failure_rate = 0.5;
        s.payments.breaker_cooldown = Duration::from_millis(1500);
        s.payments.breaker_half_open_probes = 1;
        s.payments.retry_window = Duration::from_secs(60);
    })
    .await;
    app.product("TEE", "10.00", 5).await;
    // The provider is down for a moment: two different requests fail, which opens the breaker.
    app.psp_fault(serde_json::json!({"status": 503, "forMs": 800, "operations": ["authorize"]}))
        .await;
    let first = app.buy("alice", "TEE", "tok_visa").await;
    let second = app.buy("bob", "TEE", "tok_visa").await;
    app.eventually("the breaker to open", || async {
        breaker_state(&app).await.iter().any(|s| s == "open")
    })
    .await;
    for (token, id) in [&first, &second] {
        let order = app.settled(token, id).await;
        assert_eq!(order["status"], "confirmed", "{order}");
        // While it was open, calls were deferred, not attempted.
        assert!(
            order["payment"]["failedAttempts"].as_i64() <= Some(2),
            "deferred calls are not attempts: {order}"
        );
    }
    app.eventually("the breaker to close", || async {
        breaker_state(&app).await.iter().all(|s| s == "closed")
    })
    .await;
}

#[tokio::test]
async fn the_rate_limit_holds_under_a_burst() {
    let app = TestApp::spawn_with(|s| s.payments.rate_limit_per_s = 5.0).await;
    app.product("TEE", "1.00", 100).await;
    let mut buyers = Vec::new();
    for i in 0..15 {
        let token = app.token(&format!("b{i}"));
        let cart = app.add(&token, "TEE", 1).await;
        buyers.push((token, cart));
    }
    let results = futures::future::join_all(
        buyers
            .iter()
            .map(|(t, c)| app.checkout(t, "k", c, "tok_visa")),
    )
    .await;
    let mut times = Vec::new();
    for ((token, _), (_, body)) in buyers.iter().zip(results) {
        let id = body["orderId"].as_str().expect("id").to_owned();
        assert_eq!(app.settled(token, &id).await["status"], "confirmed");
        for entry in app.ledger(&id).await {
            let at = entry["at"].as_str().expect("at");
            times.push(chrono::DateTime::parse_from_rfc3339(at).expect("time"));
        }
    }
    times.sort();
    assert_eq!(times.len(), 15);
    // A bucket of 5 plus 5 per second: never more than 10 in any one-second window...
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|u| **u - *t < chrono::Duration::seconds(1))
            .count();
        assert!(in_window <= 10, "{in_window} calls within a second");
    }
    // ...so 15 calls take at least (15 - 5) / 5 = 2 s.
    let span = *times.last().expect("last") - times[0];
    assert!(span >= chrono::Duration::milliseconds(1800), "span {span}");
}

#[tokio::test]
async fn ship_captures_once_and_refund_refunds_once() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let (token, id, _) = checkout_with(&app, "alice", "tok_visa").await;

    let (status, body) = app
        .request(Method::POST, format!("/api/orders/{id}/ship"))
        .token(&token)
        .send()
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = app.refund(&id).await;
    assert_eq!(status, StatusCode::CONFLICT, "no refund before shipment");

    for _ in 0..2 {
        let (status, body) = app.ship(&id).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    app.eventually("shipped", || async {
        app.order(&token, &id).await.1["status"] == "shipped"
    })
    .await;
    let (status, body) = app.ship(&id).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "a repeat after the fact does nothing more: {body}"
    );
    let (_, order) = app.order(&token, &id).await;
    assert_eq!(order["payment"]["status"], "captured");
    assert_eq!(app.ledger_count(&id, "capture").await, 1);

    let (status, body) = app.cancel(&token, &id).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "no cancel after shipment: {body}"
    );
    assert_eq!(body["error"]["code"], "invalid_order_state");

    for _ in 0..2 {
        let (status, _) = app.refund(&id).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    app.eventually("refunded", || async {
        app.order(&token, &id).await.1["status"] == "refunded"
    })
    .await;
    assert_eq!(
        app.order(&token, &id).await.1["payment"]["status"],
        "refunded"
    );
    assert_eq!(app.ledger_count(&id, "refund").await, 1);
}

#[tokio::test]
async fn cancel_voids_and_restocks_once() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let (token, id, _) = checkout_with(&app, "alice", "tok_visa").await;
    app.eventually("stock committed", || async {
        app.stock("TEE").await == (4, 0, 4)
    })
    .await;
    let bob = app.token("bob");
    let (status, _) = app.cancel(&bob, &id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not bob's order");
    for _ in 0..2 {
        let (status, body) = app.cancel(&token, &id).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    app.eventually("cancelled", || async {
        app.order(&token, &id).await.1["status"] == "cancelled"
    })
    .await;
    let (_, order) = app.order(&token, &id).await;
    assert_eq!(order["reason"], "customer_cancelled");
    assert_eq!(order["payment"]["status"], "voided");
    assert_eq!(app.ledger_count(&id, "void").await, 1);
    assert_eq!(
        app.stock("TEE").await,
        (5, 0, 5),
        "the unit is back on hand"
    );
    let (status, _) = app.ship(&id).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn an_expired_authorization_is_visible_and_not_shipped() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let (token, id, order) = checkout_with(&app, "alice", "tok_visa").await;
    assert_eq!(order["payment"]["expired"], false);
    assert!(order["payment"]["expiresAt"].is_string(), "{order}");
    sqlx::query("UPDATE payments.payments SET expires_at = now() - interval '1 minute' WHERE order_id = $1::uuid")
        .bind(&id)
        .execute(&app.pool)
        .await
        .expect("age the authorization");
    let (_, order) = app.order(&token, &id).await;
    assert_eq!(order["payment"]["expired"], true);
    let (status, body) = app.ship(&id).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "authorization_expired");
}

#[tokio::test]
async fn a_capture_the_provider_refuses_releases_the_ship_lock() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let (token, id, _) = checkout_with(&app, "alice", "tok_visa").await;
    // Someone voided the authorization at the provider behind our back.
    let (auth_id,): (String,) =
        sqlx::query_as("SELECT auth_id FROM payments.payments WHERE order_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .expect("auth id");
    let voided = app
        .http
        .post(format!("{}/v1/authorizations/{auth_id}/void", app.psp))
        .header("Idempotency-Key", "outside")
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("void");
    assert!(voided.status().is_success());

    let (status, _) = app.ship(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    app.eventually("the ship lock released", || async {
        let (_, order) = app.order(&token, &id).await;
        order["status"] == "confirmed" && order["stage"].is_null()
    })
    .await;
    assert_eq!(app.ledger_count(&id, "capture").await, 0);
    // The order can still be cancelled: nothing is stuck.
    let (status, _) = app.cancel(&token, &id).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    app.eventually("cancelled", || async {
        app.order(&token, &id).await.1["status"] == "cancelled"
    })
    .await;
}

/// Rotation: an authorize process that no longer holds the key a token was sealed with (the
/// operator dropped it) cannot pay with it, so the order fails like a declined card instead
/// of retrying forever, and the provider is never called.
#[tokio::test]
async fn a_token_sealed_with_a_dropped_key_fails_its_order_without_calling_the_provider() {
    use checkout::app::{App, Role};
    use checkout::config::Secret;

    let app = TestApp::spawn_roles(
        &[Role::Edge, Role::Reserve, Role::Order, Role::Compensate],
        |_| {},
    )
    .await;
    let mut rotated = app.settings.clone();
    rotated.payments.token_keys = Secret::new("0123456789abcdef".repeat(4));
    let _authorize = App::build(rotated, &[Role::Authorize])
        .await
        .expect("authorize starts");
    app.product("TEE", "10.00", 5).await;
    let (_, id, order) = checkout_with(&app, "a", "tok_visa").await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("failed"), Some("payment_declined")),
        "{order}"
    );
    assert_eq!(order["payment"]["declineCode"], "token_unreadable");
    assert_eq!(app.ledger_count(&id, "authorization").await, 0);
    app.eventually("the hold released", || async {
        app.stock("TEE").await == (5, 0, 5)
    })
    .await;
}

#[tokio::test]
async fn a_young_replay_of_a_reserved_event_authorizes_nothing_again() {
    let app = TestApp::spawn().await;
    app.product("TEE", "12.00", 10).await;
    let (_, order_id, order) = checkout_with(&app, "alice", "tok_visa").await;
    assert_eq!(order["status"], "confirmed", "{order}");
    let before = app.deliveries("authorize").await;
    // The same event seconds later under another Nats-Msg-Id, as a replay with the `nats`
    // CLI makes it: a young first delivery, which authorize handles without its look-up.
    let seq = app
        .replay_last(&format!("checkout.reserved.{order_id}"))
        .await;
    app.until_acked("authorize", seq).await;
    assert_eq!(app.deliveries("authorize").await, before + 1);
    // The provider answered the repeated call from its idempotency key: one authorization,
    // nothing voided, the order as it was.
    assert_eq!(app.ledger_count(&order_id, "authorization").await, 1);
    assert_eq!(app.ledger_count(&order_id, "void").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM payments.payments").await, 1);
    let token = app.token("alice");
    assert_eq!(app.order(&token, &order_id).await.1["status"], "confirmed");
    assert_eq!(app.dead_letters().await, 0);
}

#[tokio::test]
async fn a_replay_after_the_provider_failed_gives_back_the_hold_it_gets() {
    let app = TestApp::spawn_with(|s| {
        s.payments.max_attempts = 2;
        s.payments.retry_window = Duration::ZERO;
        s.payments.reconcile_delay = Duration::ZERO;
        s.watchdog.interval = Duration::from_millis(100);
    })
    .await;
    app.product("TEE", "12.00", 10).await;
    // The provider fails both calls before it binds their idempotency key.
    app.psp_fault(serde_json::json!({"status": 503, "count": 2, "operations": ["authorize"]}))
        .await;
    let (token, order_id, order) = checkout_with(&app, "alice", "tok_visa").await;
    assert_eq!(order["reason"], "payment_unavailable", "{order}");
    app.eventually("the reconciler looked at the failed payment", || async {
        app.count("SELECT count(*) FROM payments.payments WHERE reconciled_at IS NOT NULL")
            .await
            == 1
    })
    .await;
    // The reserved event again under another Nats-Msg-Id, minutes later in a real shop (after
    // the dedup window): a young first delivery, so it goes straight to the provider, which
    // is healthy now and, its key unbound, makes a new hold.
    let seq = app
        .replay_last(&format!("checkout.reserved.{order_id}"))
        .await;
    app.until_acked("authorize", seq).await;
    // The hold the failed order's payment does not hold was given back.
    assert_eq!(app.ledger_count(&order_id, "authorization").await, 1);
    assert_eq!(app.ledger_count(&order_id, "void").await, 1);
    let (_, order) = app.order(&token, &order_id).await;
    assert_eq!(order["status"], "failed", "{order}");
}
