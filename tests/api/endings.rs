//! Every accepted order ends: provider trouble, refusals, lost messages, rolling deploys and
//! unpublishable rows delay orders but never strand them, and nothing is charged twice.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use checkout::app::Role;
use checkout::saga::{Event, Outgoing};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn a_second_ship_after_a_refused_capture_captures_once() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");

    // The provider refuses the first capture outright (as an issuer refusing it would).
    app.psp_fault(json!({"status": 400, "count": 1, "operations": ["capture"]}))
        .await;
    assert_eq!(app.ship(&id).await.0, StatusCode::ACCEPTED);
    app.eventually("the refused capture to release the ship lock", || async {
        let (_, order) = app.order(&token, &id).await;
        order["status"] == "confirmed" && order["stage"].is_null()
    })
    .await;
    assert_eq!(app.ledger_count(&id, "capture").await, 0);

    // Asking again is a new attempt: new message id, new inbox key, new provider key.
    assert_eq!(app.ship(&id).await.0, StatusCode::ACCEPTED);
    app.eventually("shipped", || async {
        app.order(&token, &id).await.1["status"] == "shipped"
    })
    .await;
    assert_eq!(app.ledger_count(&id, "capture").await, 1);
    // A repeat of the request that succeeded changes nothing.
    let (status, body) = app.ship(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["request"], "done");
    app.audit().await;
}

#[tokio::test]
async fn a_refused_void_fails_the_cancel_without_restocking_and_releases_its_lock() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    app.eventually("the unit committed", || async {
        app.stock("TEE").await == (4, 0, 4)
    })
    .await;

    app.psp_fault(json!({"status": 400, "count": 1, "operations": ["void"]}))
        .await;
    assert_eq!(app.cancel(&token, &id).await.0, StatusCode::ACCEPTED);
    app.eventually("the cancel lock released", || async {
        let (_, order) = app.order(&token, &id).await;
        order["status"] == "confirmed" && order["stage"].is_null()
    })
    .await;
    // Void first: the refusal left the stock where it was and the money held.
    assert_eq!(app.stock("TEE").await, (4, 0, 4));
    assert_eq!(app.ledger_count(&id, "void").await, 0);
    let (_, order) = app.order(&token, &id).await;
    assert_eq!(order["payment"]["status"], "authorized");

    // The buyer asks again; this time the provider voids.
    assert_eq!(app.cancel(&token, &id).await.0, StatusCode::ACCEPTED);
    app.eventually("cancelled", || async {
        app.order(&token, &id).await.1["status"] == "cancelled"
    })
    .await;
    assert_eq!(app.ledger_count(&id, "void").await, 1);
    app.eventually("the unit back on the shelf", || async {
        app.stock("TEE").await == (5, 0, 5)
    })
    .await;
    app.audit().await;
}

#[tokio::test]
async fn provider_401s_delay_orders_and_never_decline_them() {
    // A key rotation gone wrong: every call answers 401 for a while.
    let app = TestApp::spawn_with(|s| {
        s.payments.max_attempts = 2;
        s.payments.retry_window = Duration::from_secs(30);
    })
    .await;
    app.product("TEE", "10.00", 10).await;
    app.psp_fault(json!({"status": 401, "forMs": 2000, "operations": ["authorize"]}))
        .await;
    let mut orders = Vec::new();
    for i in 0..4 {
        orders.push(app.buy(&format!("b{i}"), "TEE", "tok_visa").await);
    }
    for (token, id) in &orders {
        let order = app.settled(token, id).await;
        assert_eq!(order["status"], "confirmed", "{order}");
        assert!(
            order["payment"]["failedAttempts"].as_i64() >= Some(1),
            "{order}"
        );
        assert_eq!(app.ledger_count(id, "authorization").await, 1);
    }
    app.audit().await;
}

#[tokio::test]
async fn a_409_that_raced_an_approval_is_adopted_not_orphaned() {
    // The provider approves, then answers 409 ("same key in flight") to every attempt: our
    // retries never see the approval, but its records do.
    let app = TestApp::spawn_with(|s| {
        s.payments.max_attempts = 2;
        s.payments.retry_window = Duration::ZERO;
    })
    .await;
    app.product("TEE", "10.00", 5).await;
    app.psp_fault(
        json!({"status": 409, "count": 100, "operations": ["authorize"], "afterEffect": true}),
    )
    .await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["payment"]["status"], "authorized");
    assert_eq!(app.ledger_count(&id, "authorization").await, 1);
    app.audit().await;
}

#[tokio::test]
async fn a_psp_outage_longer_than_any_delivery_budget_only_delays_orders() {
    // Short naks: each order is delivered many times during the outage, far more than the
    // ten deliveries the old server-side limit allowed.
    let app = TestApp::spawn_with(|s| {
        s.consumer.nak_base_delay = Duration::from_millis(20);
        s.consumer.nak_max_delay = Duration::from_millis(100);
        s.payments.retry_window = Duration::from_secs(60);
        s.payments.breaker_min_calls = 5;
        s.payments.breaker_cooldown = Duration::from_millis(300);
    })
    .await;
    app.product("TEE", "10.00", 20).await;
    app.psp_fault(json!({"status": 503, "forMs": 4000, "operations": ["authorize"]}))
        .await;
    let mut orders = Vec::new();
    for i in 0..6 {
        orders.push(app.buy(&format!("b{i}"), "TEE", "tok_visa").await);
    }
    for (token, id) in &orders {
        let order = app.settled(token, id).await;
        assert_eq!(order["status"], "confirmed", "{order}");
    }
    let js = app.jetstream().await;
    let mut authorize: PullConsumer = js
        .get_stream("CHECKOUT")
        .await
        .expect("stream")
        .get_consumer("authorize")
        .await
        .expect("consumer");
    let info = authorize.info().await.expect("info");
    // Every delivery, redeliveries included, takes a consumer sequence number.
    assert!(
        info.delivered.consumer_sequence > 6 * 10,
        "more than ten deliveries per order: {}",
        info.delivered.consumer_sequence
    );
    assert_eq!(app.dead_letters().await, 0);
    app.audit().await;
}

#[tokio::test]
async fn an_authorization_that_completes_after_we_gave_up_is_voided() {
    // tok_slow answers after ~1 s; the client gives up at 300 ms and the order fails at once
    // (one attempt, no window). The provider completes the authorization afterwards.
    let app = TestApp::spawn_with(|s| {
        s.psp.timeout = Duration::from_millis(300);
        s.payments.max_attempts = 1;
        s.payments.retry_window = Duration::ZERO;
        s.payments.reconcile_delay = Duration::from_millis(1500);
        s.watchdog.interval = Duration::from_millis(200);
    })
    .await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("alice", "TEE", "tok_slow").await;
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "failed");
    assert_eq!(order["reason"], "payment_unavailable");
    app.eventually(
        "the late authorization voided by reconciliation",
        || async { app.ledger_count(&id, "void").await == 1 },
    )
    .await;
    assert_eq!(app.ledger_count(&id, "authorization").await, 1);
    assert_eq!(app.stock("TEE").await, (5, 0, 5));
    app.audit().await;
}

#[tokio::test]
async fn the_watchdog_ends_an_order_no_step_took_and_a_late_redelivery_changes_nothing() {
    // No reserve role: the checkout's first message is never handled (as if dead-lettered).
    let roles = [Role::Edge, Role::Authorize, Role::Order, Role::Compensate];
    let app = TestApp::spawn_roles(&roles, |s| {
        s.watchdog.pending_limit = Duration::from_secs(1);
        s.payments.action_timeout = Duration::from_millis(500);
        s.watchdog.interval = Duration::from_millis(200);
    })
    .await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "failed");
    assert_eq!(order["reason"], "timed_out");

    // An operator redrives the message (here: reserve finally runs). Stock is held, then the
    // authorize step sees the payment was abandoned and compensation gives the stock back.
    let _reserve = app.start_roles(&[Role::Reserve]).await;
    app.eventually("the late hold taken and given back", || async {
        app.count("SELECT count(*) FROM inventory.stock_movements WHERE kind = 'release'")
            .await
            == 1
    })
    .await;
    assert_eq!(app.stock("TEE").await, (5, 0, 5));
    assert_eq!(app.ledger_count(&id, "authorization").await, 0);
    let (_, order) = app.order(&token, &id).await;
    assert_eq!(order["status"], "failed");
    app.audit().await;
}

#[tokio::test]
async fn the_watchdog_racing_a_slow_authorization_leaves_no_authorization_behind() {
    let app = TestApp::spawn_with(|s| {
        s.watchdog.pending_limit = Duration::from_millis(300);
        s.payments.action_timeout = Duration::from_millis(200);
        s.watchdog.interval = Duration::from_millis(100);
    })
    .await;
    app.product("TEE", "10.00", 5).await;
    // The provider takes ~1 s: the watchdog fails the order while the call is in flight.
    let (token, id) = app.buy("alice", "TEE", "tok_slow").await;
    let order = app.settled(&token, &id).await;
    assert_eq!(order["reason"], "timed_out", "{order}");
    app.eventually("the authorization that completed late voided", || async {
        app.ledger_count(&id, "void").await == 1
    })
    .await;
    assert_eq!(app.ledger_count(&id, "authorization").await, 1);
    app.eventually("the hold given back", || async {
        app.stock("TEE").await == (5, 0, 5)
    })
    .await;
    let (_, order) = app.order(&token, &id).await;
    assert_eq!(order["status"], "failed");
    app.audit().await;
}

#[tokio::test]
async fn messages_from_a_newer_version_are_handed_back_not_dead_lettered() {
    let app =
        TestApp::spawn_with(|s| s.consumer.newer_schema_delay = Duration::from_millis(200)).await;
    let js = app.jetstream().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Checkout-Event", "requested");
    headers.insert("Checkout-Schema", "99");
    // A payload this version cannot read: a newer publisher's, during a rolling deploy.
    let subject = format!("checkout.requested.{}", uuid::Uuid::new_v4());
    js.publish_with_headers(
        subject,
        headers,
        bytes::Bytes::from_static(b"\x81\xa1v\x63"),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    let mut reserve: PullConsumer = js
        .get_stream("CHECKOUT")
        .await
        .expect("stream")
        .get_consumer("reserve")
        .await
        .expect("consumer");
    app.eventually("the message handed back more than once", || {
        let mut c = reserve.clone();
        async move { c.info().await.is_ok_and(|i| i.num_redelivered >= 1) }
    })
    .await;
    assert_eq!(app.dead_letters().await, 0);
    // Still unacknowledged: waiting for a consumer that understands it.
    let info = reserve.info().await.expect("info");
    assert_eq!(info.ack_floor.stream_sequence, 0, "{info:?}");
}

#[tokio::test]
async fn one_unpublishable_outbox_row_does_not_hold_up_the_others() {
    let mut app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    // An old row no server would take (over max_payload), first in line.
    sqlx::query(
        "INSERT INTO edge.outbox (msg_id, subject, payload, created_at)
         VALUES ('stuck', 'checkout.requested.00000000-0000-0000-0000-000000000000', $1,
                 now() - interval '1 minute')",
    )
    .bind(vec![0u8; 2 * 1024 * 1024])
    .execute(&app.pool)
    .await
    .expect("stuck row");
    // A checkout accepted while NATS is down: its publish is owed by the outbox too.
    let token = app.token("alice");
    let cart = app.add(&token, "TEE", 1).await;
    app.nats.kill();
    let (status, body) = app.checkout(&token, "k", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["orderId"].as_str().expect("id").to_owned();
    app.nats.restart();
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    app.eventually("the stuck row counted and backed off", || async {
        app.count(
            "SELECT count(*) FROM edge.outbox
             WHERE msg_id = 'stuck' AND published_at IS NULL AND attempts >= 1
               AND next_attempt_at > now() AND last_error IS NOT NULL",
        )
        .await
            == 1
    })
    .await;
}

#[tokio::test]
async fn a_ship_accepted_while_nats_is_down_goes_out_when_it_returns() {
    let mut app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    app.nats.kill();
    // The lock and the request commit together; the publish is owed, not lost.
    assert_eq!(app.ship(&id).await.0, StatusCode::ACCEPTED);
    app.nats.restart();
    app.eventually("shipped", || async {
        app.order(&token, &id).await.1["status"] == "shipped"
    })
    .await;
    assert_eq!(app.ledger_count(&id, "capture").await, 1);
    app.audit().await;
}

#[tokio::test]
async fn checkout_audit_exits_non_zero_on_a_finding() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    // tokio's Command: the PSP it asks runs on this test's runtime.
    let audit = || async {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_checkout"))
            .arg("audit")
            .env(
                "CHECKOUT__DATABASE__URL",
                app.settings.database.url.expose(),
            )
            .env("CHECKOUT__PSP__URL", &app.psp)
            .output()
            .await
            .expect("checkout audit runs")
    };
    let clean = audit().await;
    let out = String::from_utf8_lossy(&clean.stdout).to_string();
    let err = String::from_utf8_lossy(&clean.stderr);
    assert!(clean.status.success(), "{out}{err}");
    assert_eq!(out.lines().count(), 6, "one line per check: {out}");
    // A unit appears without a movement: the ledger no longer explains the stock.
    sqlx::query("UPDATE inventory.stock SET on_hand = on_hand + 1 WHERE sku = 'TEE'")
        .execute(&app.pool)
        .await
        .expect("corrupted");
    let dirty = audit().await;
    let out = String::from_utf8_lossy(&dirty.stdout).to_string();
    assert_eq!(dirty.status.code(), Some(1), "{out}");
    assert!(out.contains("FAIL stock"), "{out}");
}

/// The last message of `subject` in the saga stream, if any.
async fn last_on(
    app: &TestApp,
    subject: String,
) -> Option<async_nats::jetstream::message::StreamMessage> {
    let js = app.jetstream().await;
    let stream = js.get_stream("CHECKOUT").await.expect("stream");
    stream.get_last_raw_message_by_subject(&subject).await.ok()
}

#[tokio::test]
async fn a_late_committed_event_for_a_confirmed_order_whose_promotion_is_used_up_changes_nothing() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let (status, body) = app
        .request(reqwest::Method::PUT, "/api/admin/promos/ONCE")
        .token(&app.admin())
        .json(json!({"kind": "percent", "value": "10", "usageLimit": 1}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = app.token("alice");
    let cart = app.add(&token, "TEE", 1).await;
    let (status, body) = app.apply_promo(&token, "ONCE").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, body) = app.checkout(&token, "k", &cart, "tok_visa").await;
    let id = body["orderId"].as_str().expect("id").to_owned();
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");

    // An older version's `committed` event for the same order, delivered after `authorized`
    // (around an upgrade): the promotion it would redeem is used up, by this very order.
    let authorized = last_on(&app, format!("checkout.authorized.{id}"))
        .await
        .expect("authorized");
    let Event::Authorized {
        checkout,
        payment_id,
        auth_id,
    } = Event::decode(&authorized.payload).expect("an event")
    else {
        panic!("not an authorized event");
    };
    let late = Event::Committed {
        checkout,
        payment_id,
        auth_id,
    };
    let js = app.jetstream().await;
    app.bus_publish(&js, &Outgoing::new(&late, None).expect("encoded"))
        .await;
    let seq = last_on(&app, format!("checkout.committed.{id}"))
        .await
        .expect("committed")
        .sequence;
    app.until_acked("order", seq).await;
    assert!(
        last_on(&app, format!("checkout.rejected.{id}"))
            .await
            .is_none(),
        "the confirmed order was rejected"
    );
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    assert_eq!(app.ledger_count(&id, "void").await, 0);
    assert_eq!(app.stock("TEE").await, (4, 0, 4));
    app.audit().await;
}

#[tokio::test]
async fn a_replayed_authorization_of_a_cancelled_order_does_not_fail_it() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    let (status, body) = app.cancel(&token, &id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.eventually("the order cancelled", || async {
        app.order(&token, &id).await.1["status"] == "cancelled"
    })
    .await;
    // An operator replays the order's `authorized` event from a backup older than the inbox's
    // retention (the pruner removed its row; here the test does), so the order step takes it
    // as new. Its holds are released now.
    sqlx::query("DELETE FROM orders.inbox WHERE consumer = 'order' AND event_id = $1")
        .bind(format!("{id}.authorized"))
        .execute(&app.pool)
        .await
        .expect("the inbox row pruned");
    let seq = app.replay_last(&format!("checkout.authorized.{id}")).await;
    app.until_acked("order", seq).await;
    assert!(
        last_on(&app, format!("checkout.rejected.{id}"))
            .await
            .is_none(),
        "the cancelled order was rejected"
    );
    assert_eq!(app.order(&token, &id).await.1["status"], "cancelled");
    assert_eq!(app.stock("TEE").await, (5, 0, 5));
    app.audit().await;
}
