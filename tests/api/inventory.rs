//! Inventory: all or nothing, no oversell under concurrency, expiry, late payments, audit.

use std::time::Duration;

use checkout::app::Role;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::TestApp;

/// Every role but authorize: checkouts stop at `reserved` until a test starts it.
const WITHOUT_AUTHORIZE: [Role; 4] = [Role::Edge, Role::Reserve, Role::Order, Role::Compensate];

async fn assert_ledger_matches_stock(app: &TestApp) {
    let mismatched = app
        .count(
            "SELECT count(*) FROM inventory.stock s
             LEFT JOIN (SELECT sku, sum(on_hand_delta) AS oh, sum(reserved_delta) AS rs
                        FROM inventory.stock_movements GROUP BY sku) m USING (sku)
             WHERE coalesce(m.oh, 0) <> s.on_hand OR coalesce(m.rs, 0) <> s.reserved",
        )
        .await;
    assert_eq!(
        mismatched, 0,
        "the movement ledger must sum to current stock"
    );
}

#[tokio::test]
async fn a_flash_sale_across_two_reserve_processes_never_oversells() {
    let app = TestApp::spawn().await;
    let _second_reserve = app.start_roles(&[Role::Reserve]).await;
    app.product("DROP", "49.00", 10).await;
    let mut buyers = Vec::new();
    for i in 0..60 {
        let token = app.token(&format!("fan-{i}"));
        let cart = app.add(&token, "DROP", 1).await;
        buyers.push((token, cart));
    }
    let checkouts = buyers
        .iter()
        .map(|(token, cart)| app.checkout(token, "k", cart, "tok_visa"));
    let results = futures::future::join_all(checkouts).await;
    let (mut confirmed, mut out_of_stock) = (0, 0);
    for ((token, _), (status, body)) in buyers.iter().zip(results) {
        if status == StatusCode::CONFLICT {
            // The edge already heard the SKU sold out: answered at once, never accepted.
            assert_eq!(body["error"]["code"], "out_of_stock", "{body}");
            out_of_stock += 1;
            continue;
        }
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let order = app
            .settled(token, body["orderId"].as_str().expect("id"))
            .await;
        match (order["status"].as_str(), order["reason"].as_str()) {
            (Some("confirmed"), _) => confirmed += 1,
            (Some("failed"), Some("out_of_stock")) => out_of_stock += 1,
            other => panic!("unexpected outcome {other:?}: {order}"),
        }
    }
    assert_eq!((confirmed, out_of_stock), (10, 50));
    app.eventually("sold out, nothing held", || async {
        app.stock("DROP").await == (0, 0, 0)
    })
    .await;
    assert_ledger_matches_stock(&app).await;
}

#[tokio::test]
async fn one_short_line_fails_the_whole_order_and_holds_nothing() {
    let app = TestApp::spawn().await;
    app.product("PLENTY", "1.00", 5).await;
    app.product("SCARCE", "1.00", 1).await;
    let alice = app.token("alice");
    app.add(&alice, "PLENTY", 2).await;
    let cart = app.add(&alice, "SCARCE", 2).await;
    let (_, body) = app.checkout(&alice, "k", &cart, "tok_visa").await;
    let order = app
        .settled(&alice, body["orderId"].as_str().expect("id"))
        .await;
    assert_eq!(order["status"], "failed");
    assert_eq!(order["reason"], "out_of_stock");
    assert_eq!(app.stock("PLENTY").await, (5, 0, 5));
    assert_eq!(app.stock("SCARCE").await, (1, 0, 1));
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.inventory_reservations")
            .await,
        0,
        "no partial hold was written"
    );
    assert_ledger_matches_stock(&app).await;
}

#[tokio::test]
async fn an_expired_hold_gives_its_units_back() {
    let app = TestApp::spawn_roles(&WITHOUT_AUTHORIZE, |s| {
        s.inventory.reservation_ttl = Duration::from_millis(300);
        s.inventory.expiry_interval = Duration::from_millis(50);
    })
    .await;
    app.product("TEE", "9.00", 3).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "TEE", 2).await;
    let (_, body) = app.checkout(&alice, "k", &cart, "tok_visa").await;
    let order_id = body["orderId"].as_str().expect("id").to_owned();
    app.eventually("the hold", || async { app.stock("TEE").await == (3, 2, 1) })
        .await;
    app.eventually("the hold to expire", || async {
        app.stock("TEE").await == (3, 0, 3)
    })
    .await;
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.inventory_reservations WHERE status = 'expired'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.stock_movements WHERE kind = 'expire'")
            .await,
        1
    );
    let (_, order) = app.order(&alice, &order_id).await;
    assert_eq!(
        order["status"], "pending",
        "the payment has not answered yet: {order}"
    );
    assert_ledger_matches_stock(&app).await;
}

#[tokio::test]
async fn a_late_authorization_takes_the_stock_again_when_it_is_still_there() {
    let app = TestApp::spawn_roles(&WITHOUT_AUTHORIZE, |s| {
        s.inventory.reservation_ttl = Duration::from_millis(200);
        s.inventory.expiry_interval = Duration::from_millis(50);
    })
    .await;
    app.product("TEE", "9.00", 3).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "TEE", 2).await;
    let (_, body) = app.checkout(&alice, "k", &cart, "tok_visa").await;
    let order_id = body["orderId"].as_str().expect("id").to_owned();
    app.eventually("the hold to expire", || async {
        app.count("SELECT count(*) FROM inventory.inventory_reservations WHERE status = 'expired'")
            .await
            == 1
    })
    .await;

    let _authorize = app.start_roles(&[Role::Authorize]).await;
    let order = app.settled(&alice, &order_id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    app.eventually("stock taken once", || async {
        app.stock("TEE").await == (1, 0, 1)
    })
    .await;
    assert_ledger_matches_stock(&app).await;
}

#[tokio::test]
async fn a_late_authorization_is_voided_when_the_stock_is_gone() {
    let app = TestApp::spawn_roles(&WITHOUT_AUTHORIZE, |s| {
        s.inventory.reservation_ttl = Duration::from_millis(200);
        s.inventory.expiry_interval = Duration::from_millis(50);
    })
    .await;
    app.product("LAST", "30.00", 1).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "LAST", 1).await;
    let (_, body) = app.checkout(&alice, "k", &cart, "tok_visa").await;
    let order_id = body["orderId"].as_str().expect("id").to_owned();
    app.eventually("the hold to expire", || async {
        app.count("SELECT count(*) FROM inventory.inventory_reservations WHERE status = 'expired'")
            .await
            == 1
    })
    .await;
    assert_eq!(app.stock("LAST").await, (1, 0, 1));
    // Meanwhile the last unit is gone (sold in the shop, found damaged...).
    app.set_stock("LAST", 0).await;

    let _authorize = app.start_roles(&[Role::Authorize]).await;
    let order = app.settled(&alice, &order_id).await;
    assert_eq!(order["status"], "failed", "{order}");
    assert_eq!(order["reason"], "reservation_expired");
    assert_eq!(order["payment"]["status"], "voided");
    assert_eq!(app.ledger_count(&order_id, "authorization").await, 1);
    assert_eq!(app.ledger_count(&order_id, "void").await, 1);
    assert_eq!(app.stock("LAST").await, (0, 0, 0));
    assert_ledger_matches_stock(&app).await;
}

#[tokio::test]
async fn restocking_below_what_is_held_is_refused() {
    let app = TestApp::spawn_roles(&WITHOUT_AUTHORIZE, |_| {}).await;
    app.product("TEE", "9.00", 5).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "TEE", 3).await;
    app.checkout(&alice, "k", &cart, "tok_visa").await;
    app.eventually("the hold", || async { app.stock("TEE").await == (5, 3, 2) })
        .await;
    let (status, body) = app
        .request(Method::PUT, "/api/admin/stock/TEE")
        .token(&app.admin())
        .json(json!({"onHand": 2}))
        .send()
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "stock_below_reserved");
    assert_eq!(app.stock("TEE").await, (5, 3, 2));
    app.set_stock("TEE", 12).await;
    assert_eq!(app.stock("TEE").await, (12, 3, 9));
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.stock_movements WHERE kind = 'adjust'")
            .await,
        2,
        "the first stocking and the restock"
    );
    assert_ledger_matches_stock(&app).await;
}
