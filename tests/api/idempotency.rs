//! Checkout retries: the same key returns the same order, never a second one.

use reqwest::StatusCode;

use crate::helpers::{checkout_body, TestApp};

#[tokio::test]
async fn the_same_key_and_body_return_the_same_order_even_after_it_settled() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "TEE", 1).await;
    let (s1, b1) = app.checkout(&alice, "retry-me", &cart, "tok_visa").await;
    assert_eq!(s1, StatusCode::ACCEPTED);
    let order_id = b1["orderId"].as_str().expect("id").to_owned();
    app.settled(&alice, &order_id).await;

    let (s2, b2) = app.checkout(&alice, "retry-me", &cart, "tok_visa").await;
    assert_eq!(s2, StatusCode::ACCEPTED);
    assert_eq!(b2["orderId"], order_id.as_str());
    assert_eq!(app.count("SELECT count(*) FROM orders.orders").await, 1);
    assert_eq!(app.ledger_count(&order_id, "authorization").await, 1);
    app.eventually("one decrement", || async {
        app.stock("TEE").await == (4, 0, 4)
    })
    .await;
}

#[tokio::test]
async fn the_same_key_with_another_body_is_refused() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "TEE", 1).await;
    let (status, _) = app.checkout(&alice, "k", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = app.checkout(&alice, "k", &cart, "tok_declined").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
}

#[tokio::test]
async fn keys_are_scoped_to_the_user() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    let (alice, bob) = (app.token("alice"), app.token("bob"));
    let cart_a = app.add(&alice, "TEE", 1).await;
    let cart_b = app.add(&bob, "TEE", 1).await;
    let (_, a) = app.checkout(&alice, "same", &cart_a, "tok_visa").await;
    let (status, b) = app.checkout(&bob, "same", &cart_b, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    assert_ne!(a["orderId"], b["orderId"]);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_make_one_order() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 50).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "TEE", 1).await;
    let body = checkout_body(&cart, "tok_visa");
    let requests = (0..12).map(|_| {
        app.http
            .post(format!("{}/api/checkout", app.base))
            .bearer_auth(&alice)
            .header("Idempotency-Key", "together")
            .json(&body)
            .send()
    });
    let responses = futures::future::join_all(requests).await;
    let mut ids = Vec::new();
    for r in responses {
        let r = r.expect("response");
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let v: serde_json::Value = r.json().await.expect("json");
        ids.push(v["orderId"].as_str().expect("id").to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one order id for every request: {ids:?}");
    let order = app.settled(&alice, &ids[0]).await;
    assert_eq!(order["status"], "confirmed");
    assert_eq!(app.count("SELECT count(*) FROM edge.checkouts").await, 1);
    assert_eq!(app.ledger_count(&ids[0], "authorization").await, 1);
}

#[tokio::test]
async fn a_duplicate_that_read_before_the_first_committed_gets_the_first_order() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 50).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "TEE", 1).await;
    let (status, body) = app.checkout(&alice, "once", &cart, "tok_declined").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let first = body["orderId"].as_str().expect("id").to_owned();
    let order = app.settled(&alice, &first).await;
    assert_eq!(order["status"], "failed", "{order}");
    // Rewind to the moment before the first request committed: its key row is gone (kept
    // aside), and its cart, whose order failed, may be checked out again.
    let (hash, event): (Vec<u8>, Vec<u8>) = sqlx::query_as(
        "DELETE FROM edge.checkouts WHERE idempotency_key = 'once' RETURNING request_hash, event",
    )
    .fetch_one(&app.pool)
    .await
    .expect("the first request's row");
    // The identical request reads now (no key yet) and then waits for the cart's lock...
    let mut first_commits = app.lock_cart(&cart).await;
    let duplicate = app.checkout(&alice, "once", &cart, "tok_declined");
    let first_lands = async {
        app.until_waiting_for_a_lock("the duplicate waiting for the cart's lock")
            .await;
        // ...while the first request's row commits under the same key.
        sqlx::query(
            "INSERT INTO edge.checkouts (user_id, idempotency_key, request_hash, order_id, cart_id, event)
             VALUES ('alice', 'once', $1, $2::uuid, $3::uuid, $4)",
        )
        .bind(&hash)
        .bind(&first)
        .bind(&cart)
        .bind(&event)
        .execute(&mut *first_commits)
        .await
        .expect("the first request's row again");
        first_commits.commit().await.expect("commit");
    };
    let ((status, body), ()) = tokio::join!(duplicate, first_lands);
    // The same request under the same key: the first one's order, not "key reused".
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["orderId"], first.as_str());
    assert_eq!(app.count("SELECT count(*) FROM edge.checkouts").await, 1);
}
