//! A second provider to fall back on: while the primary's breaker is open, new checkouts are
//! authorized at the fallback; an order whose primary attempt may have landed waits for the
//! primary instead (no order ever holds two authorizations); later operations go to whichever
//! provider holds the payment.

use std::time::Duration;

use checkout::app::Role;
use serde_json::{json, Value};

use crate::helpers::{SandboxPsp, TestApp};

/// How many authorizations a sandbox's ledger holds for an order.
async fn authorizations_at(app: &TestApp, psp: &str, order_id: &str) -> usize {
    let ledger: Value = app
        .http
        .get(format!("{psp}/v1/ledger?reference={order_id}"))
        .send()
        .await
        .expect("ledger")
        .json()
        .await
        .expect("json");
    ledger["entries"].as_array().map_or(0, |e| {
        e.iter().filter(|x| x["kind"] == "authorization").count()
    })
}

/// Entries of a kind in a sandbox's ledger for an order.
async fn entries_at(app: &TestApp, psp: &str, order_id: &str, kind: &str) -> usize {
    let ledger: Value = app
        .http
        .get(format!("{psp}/v1/ledger?reference={order_id}"))
        .send()
        .await
        .expect("ledger")
        .json()
        .await
        .expect("json");
    ledger["entries"]
        .as_array()
        .map_or(0, |e| e.iter().filter(|x| x["kind"] == kind).count())
}

#[tokio::test]
async fn the_primary_in_outage_sends_new_checkouts_to_the_fallback_and_doubles_nothing() {
    let fallback = SandboxPsp::start().await;
    let fallback_url = fallback.url().to_owned();
    let app = TestApp::spawn_roles(&Role::ALL, |s| {
        s.psp.fallback_url = fallback_url.clone();
        s.payments.breaker_min_calls = 2;
        s.payments.breaker_failure_rate = 0.5;
        s.payments.breaker_cooldown = Duration::from_secs(8);
    })
    .await;
    app.product("TEE", "10.00", 10).await;
    let outage = app
        .http
        .post(format!("{}/v1/sandbox/outage", app.psp))
        .json(&json!({"seconds": 120}))
        .send()
        .await
        .expect("outage");
    assert!(outage.status().is_success());
    // Two checkouts meet the outage: their calls fail (the provider's state unknown to us)
    // and the primary's breaker opens.
    let early = [
        app.buy("early-1", "TEE", "tok_visa").await,
        app.buy("early-2", "TEE", "tok_visa").await,
    ];
    app.eventually("both early calls failed", || async {
        app.count("SELECT count(*) FROM payments.attempts WHERE failures > 0")
            .await
            == 2
    })
    .await;
    // New checkouts are authorized at the fallback and confirm while the primary is down.
    let later = [
        app.buy("later-1", "TEE", "tok_visa").await,
        app.buy("later-2", "TEE", "tok_visa").await,
    ];
    for (token, id) in &later {
        let order = app.settled(token, id).await;
        assert_eq!(order["status"], "confirmed", "{order}");
        assert_eq!(order["payment"]["provider"], "fallback", "{order}");
    }
    // The early ones wait for the primary: their first attempt there may have landed.
    for (token, id) in &early {
        let (_, order) = app.order(token, id).await;
        assert_eq!(order["status"], "pending", "{order}");
    }
    let back = app
        .http
        .delete(format!("{}/v1/sandbox/outage", app.psp))
        .send()
        .await
        .expect("outage over");
    assert!(back.status().is_success());
    for (token, id) in &early {
        let order = app.settled(token, id).await;
        assert_eq!(order["status"], "confirmed", "{order}");
        assert_eq!(order["payment"]["provider"], "sandbox", "{order}");
    }
    // One authorization per order, at one provider.
    for (_, id) in early.iter().chain(&later) {
        let (primary, second) = (
            authorizations_at(&app, &app.psp, id).await,
            authorizations_at(&app, fallback.url(), id).await,
        );
        assert_eq!(
            primary + second,
            1,
            "{id}: {primary} at the primary, {second} at the fallback"
        );
    }
    // Shipping captures at the provider holding the payment.
    let (_, fallback_order) = &later[0];
    let (status, _) = app.ship(fallback_order).await;
    assert!(status.is_success());
    app.eventually("the capture at the fallback", || async {
        entries_at(&app, fallback.url(), fallback_order, "capture").await == 1
    })
    .await;
    assert_eq!(
        entries_at(&app, &app.psp, fallback_order, "capture").await,
        0
    );
    app.audit().await;
    // And the audit, reading both providers, would see an order holding two authorizations.
    let (_, early_order) = &early[0];
    let total: Value = app.order(&early[0].0, early_order).await.1["total"].clone();
    let stray = app
        .http
        .post(format!("{}/v1/authorizations", fallback.url()))
        .header("Idempotency-Key", "stray")
        .json(&json!({"amount": total, "currency": "USD", "token": "tok_visa", "reference": early_order}))
        .send()
        .await
        .expect("a stray authorization");
    assert!(stray.status().is_success());
    let providers = checkout::payments::provider(&app.settings).expect("providers");
    let report = checkout::audit::run(
        &app.pool,
        providers.as_ref(),
        app.settings.watchdog.pending_limit,
    )
    .await
    .expect("the audit runs");
    assert!(!report.ok(), "{report}");
    assert!(
        report.to_string().contains("holds 2 authorizations"),
        "{report}"
    );
}

#[tokio::test]
async fn each_provider_verifies_its_webhooks_with_its_own_secrets() {
    let fallback = SandboxPsp::start().await;
    let fallback_url = fallback.url().to_owned();
    let app = TestApp::spawn_roles(&[Role::Edge], |s| {
        s.psp.fallback_url = fallback_url.clone();
        s.psp.fallback_webhook_secrets = checkout::config::Secret::new("whsec_fallback_own");
    })
    .await;
    let event = json!({
        "id": "evt_1", "type": "authorization.succeeded", "created": chrono::Utc::now().timestamp(),
        "data": {"authorizationId": "auth_1", "reference": uuid::Uuid::now_v7().to_string(),
                 "amount": "10.00", "currency": "USD", "status": "authorized", "declineCode": null}
    });
    let body = serde_json::to_vec(&event).expect("json");
    let now = chrono::Utc::now().timestamp();
    let deliver = |provider: &'static str, secret: &'static str| {
        let (app, body) = (&app, body.clone());
        async move {
            app.http
                .post(format!("{}/api/webhooks/psp/{provider}", app.base))
                .header("Content-Type", "application/json")
                .header("Psp-Signature", crate::challenges::sign(secret, now, &body))
                .body(body)
                .send()
                .await
                .expect("webhook")
                .status()
        }
    };
    let primary_secret = crate::helpers::TEST_WEBHOOK_SECRET;
    assert_eq!(deliver("fallback", primary_secret).await, 401);
    assert_eq!(deliver("sandbox", "whsec_fallback_own").await, 401);
    assert_eq!(deliver("fallback", "whsec_fallback_own").await, 200);
    assert_eq!(deliver("nobody", "whsec_fallback_own").await, 404);
    // Stored under the fallback's name, its id qualified as the payments record it.
    let (provider, auth_id): (String, String) =
        sqlx::query_as("SELECT provider, auth_id FROM payments.provider_events")
            .fetch_one(&app.pool)
            .await
            .expect("one stored event");
    assert_eq!(
        (provider.as_str(), auth_id.as_str()),
        ("fallback", "fallback:auth_1")
    );
}
