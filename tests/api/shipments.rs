//! Shipments and refunds in parts (#29): each shipment captures its units' share of the total
//! and the shares add up to the total to the cent; refunds of lines or amounts never give back
//! more than was captured; cancelling after a first shipment releases the rest; an expired
//! authorization fails the shipment that needed it, and nothing else.

use std::str::FromStr;

use reqwest::{Method, StatusCode};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Value};

use crate::helpers::TestApp;

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}

/// A decimal string of the API (or the provider) as a number.
fn dec(v: &Value) -> Decimal {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {v}"));
    Decimal::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// `[{"sku", "qty"}, ...]`.
fn lines(pairs: &[(&str, i64)]) -> Value {
    Value::Array(
        pairs
            .iter()
            .map(|(sku, qty)| json!({"sku": sku, "qty": qty}))
            .collect(),
    )
}

/// `POST /api/orders/{id}/shipments` as the admin, with an Idempotency-Key.
async fn ship_lines(app: &TestApp, id: &str, key: &str, lines: Value) -> (StatusCode, Value) {
    app.request(Method::POST, format!("/api/orders/{id}/shipments"))
        .token(&app.admin())
        .header("Idempotency-Key", key)
        .json(json!({ "lines": lines }))
        .send()
        .await
}

/// `POST /api/orders/{id}/refunds` as the admin, with an Idempotency-Key.
async fn refund_part(app: &TestApp, id: &str, key: &str, body: Value) -> (StatusCode, Value) {
    app.request(Method::POST, format!("/api/orders/{id}/refunds"))
        .token(&app.admin())
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
}

async fn put_promo(app: &TestApp, code: &str, body: Value) {
    let (status, reply) = app
        .request(Method::PUT, format!("/api/admin/promos/{code}"))
        .token(&app.admin())
        .json(body)
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
}

/// A buyer's cart of `items` (with `promo` applied), checked out to the UK (20 % tax, taxed
/// shipping) with a card that approves; the confirmed order.
async fn order_of(
    app: &TestApp,
    user: &str,
    items: &[(&str, i64)],
    promo: Option<&str>,
) -> (String, String, Value) {
    let token = app.token(user);
    let mut cart = String::new();
    for (sku, qty) in items {
        cart = app.add(&token, sku, *qty).await;
    }
    if let Some(code) = promo {
        let (status, body) = app.apply_promo(&token, code).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, body) = app.checkout(&token, "k", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["orderId"].as_str().expect("orderId").to_owned();
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    (token, id, order)
}

async fn get(app: &TestApp, token: &str, id: &str) -> Value {
    let (status, order) = app.order(token, id).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    order
}

/// The order's shipment or refund (`kind`: `shipments` or `refunds`) with this id.
fn part<'a>(order: &'a Value, kind: &str, part_id: &str) -> Option<&'a Value> {
    order[kind]
        .as_array()
        .and_then(|parts| parts.iter().find(|p| p["id"] == part_id))
}

/// Polls until the shipment or refund `part_id` is settled (no longer capturing or
/// refunding); the order then.
async fn settled_part(app: &TestApp, token: &str, id: &str, kind: &str, part_id: &str) -> Value {
    app.eventually(&format!("{kind} {part_id} of {id} settled"), || async {
        let order = get(app, token, id).await;
        part(&order, kind, part_id)
            .is_some_and(|p| !matches!(p["status"].as_str(), Some("capturing" | "refunding")))
    })
    .await;
    get(app, token, id).await
}

/// Ships `units` and waits until the shipment is captured; its view and the order then.
async fn ship_and_wait(
    app: &TestApp,
    token: &str,
    id: &str,
    key: &str,
    units: &[(&str, i64)],
) -> (Value, Value) {
    let (status, body) = ship_lines(app, id, key, lines(units)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["request"], "accepted", "{body}");
    assert_eq!(body["shipment"]["status"], "capturing", "{body}");
    let shipment_id = body["shipment"]["id"].as_str().expect("shipment id");
    let order = settled_part(app, token, id, "shipments", shipment_id).await;
    let shipment = part(&order, "shipments", shipment_id)
        .expect("the shipment")
        .clone();
    assert_eq!(shipment["status"], "shipped", "{order}");
    assert!(shipment["providerRef"].is_string(), "{shipment}");
    assert_eq!(
        shipment["amount"], body["shipment"]["amount"],
        "the amount it was accepted with is the amount it captured"
    );
    (shipment, order)
}

/// The amounts of the provider's ledger entries of `kind` for the order, oldest first.
async fn provider_amounts(app: &TestApp, id: &str, kind: &str) -> Vec<Decimal> {
    app.ledger(id)
        .await
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| dec(&e["amount"]))
        .collect()
}

/// Polls until a SKU's stock is `expected` (`onHand`, `reserved`, `available`).
async fn until_stock(app: &TestApp, sku: &str, expected: (i64, i64, i64)) {
    app.eventually(&format!("{sku} stock {expected:?}"), || async {
        app.stock(sku).await == expected
    })
    .await;
}

fn cents(d: Decimal) -> Decimal {
    d.round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven)
}

#[tokio::test]
async fn five_lines_with_a_promotion_and_taxed_shipping_shipped_in_three_parts_capture_exactly_the_total(
) {
    let app = TestApp::spawn().await;
    for (sku, price) in [
        ("A", "19.99"),
        ("B", "24.99"),
        ("C", "3.33"),
        ("D", "10.00"),
        ("E", "2.50"),
    ] {
        app.product(sku, price, 50).await;
    }
    put_promo(&app, "tenoff", json!({"kind": "percent", "value": "10"})).await;
    let (token, id, order) = order_of(
        &app,
        "alice",
        &[("A", 2), ("B", 1), ("C", 3), ("D", 1), ("E", 4)],
        Some("tenoff"),
    )
    .await;
    // What the order is made of: a discount, tax and taxed shipping all in its total.
    assert!(dec(&order["discount"]) > Decimal::ZERO, "{order}");
    assert!(dec(&order["shipping"]) > Decimal::ZERO, "{order}");
    assert!(dec(&order["tax"]) > Decimal::ZERO, "{order}");
    let total = dec(&order["total"]);
    assert_eq!(
        total,
        dec(&order["subtotal"]) - dec(&order["discount"])
            + dec(&order["tax"])
            + dec(&order["shipping"]),
        "{order}"
    );

    let (first, order) = ship_and_wait(&app, &token, &id, "parcel-1", &[("A", 1), ("C", 2)]).await;
    assert_eq!(order["status"], "partially_shipped", "{order}");
    let (second, order) = ship_and_wait(&app, &token, &id, "parcel-2", &[("B", 1), ("E", 4)]).await;
    assert_eq!(order["status"], "partially_shipped", "{order}");
    let (third, order) = ship_and_wait(
        &app,
        &token,
        &id,
        "parcel-3",
        &[("A", 1), ("C", 1), ("D", 1)],
    )
    .await;
    assert_eq!(order["status"], "shipped", "{order}");

    let amounts: Vec<Decimal> = [&first, &second, &third]
        .iter()
        .map(|s| dec(&s["amount"]))
        .collect();
    for a in &amounts {
        assert!(*a > Decimal::ZERO && a.scale() <= 2, "{a}");
    }
    assert_eq!(
        amounts.iter().copied().sum::<Decimal>(),
        total,
        "the shipments add up to the total to the cent: {amounts:?}"
    );
    let shipments = order["shipments"].as_array().expect("shipments");
    assert_eq!(shipments.len(), 3, "{order}");
    assert!(
        shipments.iter().all(|s| s["status"] == "shipped"),
        "{order}"
    );
    assert_eq!(dec(&order["money"]["authorized"]), total, "{order}");
    assert_eq!(dec(&order["money"]["captured"]), total, "{order}");
    assert_eq!(dec(&order["money"]["refunded"]), Decimal::ZERO, "{order}");
    assert_eq!(dec(&order["money"]["voided"]), Decimal::ZERO, "{order}");

    // The provider captured what we say we captured, one capture per shipment.
    assert_eq!(provider_amounts(&app, &id, "capture").await, amounts);
    let held = app.provider_authorization(&id).await;
    assert_eq!(dec(&held["captured"]), total, "{held}");
    assert_eq!(held["captures"], 3, "{held}");
    app.audit().await;
}

#[tokio::test]
async fn a_returned_line_is_refunded_its_share_and_restocked_then_the_rest_is_refunded() {
    let app = TestApp::spawn().await;
    app.product("TEE", "20.00", 10).await;
    app.product("MUG", "10.00", 10).await;
    app.product("CAP", "5.00", 10).await;
    let (token, id, order) =
        order_of(&app, "alice", &[("TEE", 2), ("MUG", 1), ("CAP", 1)], None).await;
    until_stock(&app, "MUG", (9, 0, 9)).await;
    let (status, body) = app.ship(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.eventually("shipped", || async {
        get(&app, &token, &id).await["status"] == "shipped"
    })
    .await;
    let total = dec(&order["total"]);

    // Every line is taxed at the same 20 %, so the mug's share is its part of the subtotal.
    let mug_line = order["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["sku"] == "MUG")
        .expect("the mug line")
        .clone();
    let share = cents(total * dec(&mug_line["lineTotal"]) / dec(&order["subtotal"]));
    let (status, body) = refund_part(
        &app,
        &id,
        "return-1",
        json!({"lines": lines(&[("MUG", 1)]), "reason": "damaged", "restock": true}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["request"], "accepted", "{body}");
    let refund = &body["refund"];
    assert_eq!(refund["status"], "refunding", "{body}");
    assert_eq!(refund["reason"], "damaged", "{body}");
    assert_eq!(refund["restock"], true, "{body}");
    assert_eq!(dec(&refund["amount"]), share, "{body}");
    let refund_id = refund["id"].as_str().expect("refund id");

    let order = settled_part(&app, &token, &id, "refunds", refund_id).await;
    let done = part(&order, "refunds", refund_id).expect("the refund");
    assert_eq!(done["status"], "refunded", "{order}");
    assert!(done["providerRef"].is_string(), "{done}");
    assert_eq!(order["status"], "partially_refunded", "{order}");
    assert_eq!(dec(&order["money"]["captured"]), total, "{order}");
    assert_eq!(dec(&order["money"]["refunded"]), share, "{order}");
    assert_eq!(
        app.stock("MUG").await,
        (10, 0, 10),
        "the returned mug is back on hand"
    );
    assert_eq!(app.stock("TEE").await, (8, 0, 8), "nothing else came back");

    // The rest of the money back.
    let (status, body) = app.refund(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.eventually("refunded", || async {
        get(&app, &token, &id).await["status"] == "refunded"
    })
    .await;
    let order = get(&app, &token, &id).await;
    assert_eq!(
        order["money"]["refunded"], order["money"]["captured"],
        "{order}"
    );
    assert_eq!(dec(&order["money"]["refunded"]), total, "{order}");
    let refunds = order["refunds"].as_array().expect("refunds");
    assert_eq!(refunds.len(), 2, "{order}");
    assert_eq!(dec(&refunds[1]["amount"]), total - share, "{order}");
    assert_eq!(
        provider_amounts(&app, &id, "refund").await,
        vec![share, total - share]
    );
    // An amount refund never restocks.
    assert_eq!(app.stock("TEE").await, (8, 0, 8));
    assert_eq!(app.stock("MUG").await, (10, 0, 10));
    app.audit().await;
}

#[tokio::test]
async fn two_refunds_of_the_same_money_at_once_refund_it_once() {
    let app = TestApp::spawn().await;
    app.product("TEE", "20.00", 10).await;
    app.product("MUG", "10.00", 10).await;
    let (token, id, _) = order_of(&app, "alice", &[("TEE", 1), ("MUG", 2)], None).await;
    let (status, body) = app.ship(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.eventually("shipped", || async {
        get(&app, &token, &id).await["status"] == "shipped"
    })
    .await;
    let captured = get(&app, &token, &id).await["money"]["captured"].clone();
    let everything = json!({"amount": captured, "reason": "goodwill"});

    let (one, two) = tokio::join!(
        refund_part(&app, &id, "desk-1", everything.clone()),
        refund_part(&app, &id, "desk-2", everything.clone()),
    );
    let accepted: Vec<&(StatusCode, Value)> = [&one, &two]
        .into_iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .collect();
    assert_eq!(accepted.len(), 1, "exactly one accepted: {one:?} {two:?}");
    let (refused_status, refused) = if one.0 == StatusCode::ACCEPTED {
        &two
    } else {
        &one
    };
    assert!(
        matches!(
            (*refused_status, code(refused)),
            (StatusCode::CONFLICT, "action_in_flight")
                | (StatusCode::UNPROCESSABLE_ENTITY, "refund_exceeds_captured")
        ),
        "the other is refused: {refused_status} {refused}"
    );
    let refund_id = accepted[0].1["refund"]["id"].as_str().expect("refund id");
    settled_part(&app, &token, &id, "refunds", refund_id).await;
    app.eventually("refunded", || async {
        get(&app, &token, &id).await["status"] == "refunded"
    })
    .await;
    let order = get(&app, &token, &id).await;
    assert_eq!(order["money"]["refunded"], captured, "{order}");
    assert_eq!(
        order["refunds"].as_array().map(Vec::len),
        Some(1),
        "{order}"
    );
    assert_eq!(app.count("SELECT count(*) FROM orders.refunds").await, 1);
    assert_eq!(app.ledger_count(&id, "refund").await, 1);
    assert_eq!(
        provider_amounts(&app, &id, "refund").await,
        vec![dec(&captured)]
    );
    app.audit().await;
}

#[tokio::test]
async fn cancelling_after_a_first_shipment_releases_the_rest_and_restocks_what_did_not_ship() {
    let app = TestApp::spawn().await;
    app.product("TEE", "20.00", 10).await;
    app.product("MUG", "10.00", 10).await;
    put_promo(&app, "fiveoff", json!({"kind": "fixed", "value": "5.00"})).await;
    let (token, id, order) =
        order_of(&app, "alice", &[("TEE", 3), ("MUG", 2)], Some("fiveoff")).await;
    until_stock(&app, "TEE", (7, 0, 7)).await;
    until_stock(&app, "MUG", (8, 0, 8)).await;
    let (first, order_now) = ship_and_wait(&app, &token, &id, "parcel-1", &[("TEE", 1)]).await;
    assert_eq!(order_now["status"], "partially_shipped", "{order_now}");

    // The buyer cancels what has not shipped.
    let (status, body) = app.cancel(&token, &id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.eventually("the rest cancelled", || async {
        let order = get(&app, &token, &id).await;
        order["status"] == "shipped" && order["stage"].is_null()
    })
    .await;
    let after = get(&app, &token, &id).await;
    let (authorized, captured) = (
        dec(&after["money"]["authorized"]),
        dec(&after["money"]["captured"]),
    );
    assert_eq!(authorized, dec(&order["total"]), "{after}");
    assert_eq!(captured, dec(&first["amount"]), "{after}");
    assert_eq!(
        dec(&after["money"]["voided"]),
        authorized - captured,
        "{after}"
    );
    assert_eq!(dec(&after["money"]["refunded"]), Decimal::ZERO, "{after}");
    assert_eq!(after["shipments"][0]["status"], "shipped", "{after}");
    // The two tees and two mugs that did not ship are back on hand.
    assert_eq!(app.stock("TEE").await, (9, 0, 9));
    assert_eq!(app.stock("MUG").await, (10, 0, 10));
    // The promotion stays redeemed: part of the order was bought with it.
    assert_eq!(
        app.count("SELECT used::bigint FROM pricing.promos WHERE code = 'fiveoff'")
            .await,
        1
    );
    let held = app.provider_authorization(&id).await;
    assert_eq!(dec(&held["voided"]), authorized - captured, "{held}");
    assert_eq!(app.ledger_count(&id, "void").await, 1);

    // Nothing more ships.
    let (status, body) = ship_lines(&app, &id, "parcel-2", lines(&[("MUG", 1)])).await;
    assert!(
        status.is_client_error(),
        "a shipment after the rest was cancelled is refused: {status} {body}"
    );
    assert!(body["shipment"].is_null(), "{body}");
    let (status, body) = app.ship(&id).await;
    assert!(
        (status == StatusCode::ACCEPTED && body["request"] == "done") || status.is_client_error(),
        "{status} {body}"
    );
    assert_eq!(app.count("SELECT count(*) FROM orders.shipments").await, 1);
    assert_eq!(app.ledger_count(&id, "capture").await, 1);
    let order = get(&app, &token, &id).await;
    assert_eq!(order["status"], "shipped", "{order}");
    assert_eq!(order["money"], after["money"], "{order}");
    assert_eq!(app.stock("MUG").await, (10, 0, 10));
    app.audit().await;
}

#[tokio::test]
async fn a_capture_after_the_authorization_expired_fails_that_shipment_and_keeps_the_first() {
    let app = TestApp::spawn().await;
    app.product("TEE", "20.00", 10).await;
    app.product("MUG", "10.00", 10).await;
    let (token, id, _) = order_of(&app, "alice", &[("TEE", 1), ("MUG", 1)], None).await;
    let (first, _) = ship_and_wait(&app, &token, &id, "parcel-1", &[("TEE", 1)]).await;

    // The authorization runs out at the provider before the second parcel goes.
    let auth_id = app.provider_authorization(&id).await["id"]
        .as_str()
        .expect("authorization id")
        .to_owned();
    let expired = app
        .http
        .post(format!(
            "{}/v1/sandbox/authorizations/{auth_id}/expire",
            app.psp
        ))
        .send()
        .await
        .expect("expire");
    assert!(expired.status().is_success(), "{}", expired.status());

    let (status, body) = ship_lines(&app, &id, "parcel-2", lines(&[("MUG", 1)])).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let second_id = body["shipment"]["id"].as_str().expect("shipment id");
    let order = settled_part(&app, &token, &id, "shipments", second_id).await;
    let second = part(&order, "shipments", second_id).expect("the second shipment");
    assert_eq!(second["status"], "failed", "{order}");
    assert_eq!(second["failure"], "authorization_expired", "{order}");
    assert!(second["providerRef"].is_null(), "{second}");
    let kept = part(&order, "shipments", first["id"].as_str().expect("id")).expect("first");
    assert_eq!(kept["status"], "shipped", "{order}");
    assert_eq!(kept["providerRef"], first["providerRef"], "{order}");
    assert_eq!(order["status"], "partially_shipped", "{order}");
    assert_eq!(
        dec(&order["money"]["captured"]),
        dec(&first["amount"]),
        "{order}"
    );
    assert_eq!(app.ledger_count(&id, "capture").await, 1);

    // The lock is free again: a later request is taken, not refused as in flight.
    app.eventually("the ship lock released", || async {
        get(&app, &token, &id).await["stage"].is_null()
    })
    .await;
    let (status, body) = ship_lines(&app, &id, "parcel-3", lines(&[("MUG", 1)])).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let third_id = body["shipment"]["id"].as_str().expect("shipment id");
    let order = settled_part(&app, &token, &id, "shipments", third_id).await;
    let third = part(&order, "shipments", third_id).expect("the third shipment");
    assert_eq!(third["failure"], "authorization_expired", "{order}");
    assert_eq!(app.ledger_count(&id, "capture").await, 1);
}

#[tokio::test]
async fn bad_shipment_and_refund_requests_are_refused_and_write_nothing() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    app.product("MUG", "5.00", 10).await;
    let (token, id, _) = order_of(&app, "alice", &[("TEE", 2), ("MUG", 1)], None).await;
    until_stock(&app, "TEE", (8, 0, 8)).await;

    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    for (why, body, expected) in [
        ("unknown SKU", lines(&[("NOPE", 1)]), "unknown_sku"),
        ("no lines", json!([]), "no_lines"),
        ("qty 0", lines(&[("TEE", 0)]), "invalid_quantity"),
        ("qty over 1000", lines(&[("TEE", 1001)]), "invalid_quantity"),
        (
            "more than ordered",
            lines(&[("TEE", 3)]),
            "quantity_exceeds_remaining",
        ),
    ] {
        let (status, reply) = ship_lines(&app, &id, why, body).await;
        assert_eq!(
            (status, code(&reply)),
            (unprocessable, expected),
            "{why}: {reply}"
        );
    }
    let (status, reply) = app
        .request(Method::POST, format!("/api/orders/{id}/shipments"))
        .token(&app.admin())
        .json(json!({"lines": lines(&[("TEE", 1)])}))
        .send()
        .await;
    assert_eq!(
        (status, code(&reply)),
        (StatusCode::BAD_REQUEST, "idempotency_key_required"),
        "{reply}"
    );
    // A buyer, even the order's own, cannot ship it.
    let (status, reply) = app
        .request(Method::POST, format!("/api/orders/{id}/shipments"))
        .token(&token)
        .header("Idempotency-Key", "mine")
        .json(json!({"lines": lines(&[("TEE", 1)])}))
        .send()
        .await;
    assert_eq!(
        (status, code(&reply)),
        (StatusCode::FORBIDDEN, "forbidden"),
        "{reply}"
    );
    assert_eq!(app.count("SELECT count(*) FROM orders.shipments").await, 0);
    assert_eq!(app.ledger_count(&id, "capture").await, 0);

    // One tee ships; then refunds are checked against what was captured and shipped.
    let (first, _) = ship_and_wait(&app, &token, &id, "parcel-1", &[("TEE", 1)]).await;
    let captured = dec(&first["amount"]);
    let (status, reply) = ship_lines(&app, &id, "parcel-2", lines(&[("TEE", 2)])).await;
    assert_eq!(
        (status, code(&reply)),
        (unprocessable, "quantity_exceeds_remaining"),
        "only one tee is left to ship: {reply}"
    );
    let too_much = (captured + Decimal::new(1, 2)).to_string();
    for (why, body, expected) in [
        (
            "more than captured",
            json!({"amount": too_much, "reason": "goodwill"}),
            "refund_exceeds_captured",
        ),
        (
            "an unshipped line",
            json!({"lines": lines(&[("MUG", 1)]), "reason": "damaged"}),
            "quantity_exceeds_remaining",
        ),
        (
            "more units than shipped",
            json!({"lines": lines(&[("TEE", 2)]), "reason": "damaged"}),
            "quantity_exceeds_remaining",
        ),
        (
            "a line of no SKU ordered",
            json!({"lines": lines(&[("NOPE", 1)]), "reason": "damaged"}),
            "unknown_sku",
        ),
        (
            "no lines",
            json!({"lines": [], "reason": "damaged"}),
            "no_lines",
        ),
        (
            "lines and an amount",
            json!({"lines": lines(&[("TEE", 1)]), "amount": "1.00", "reason": "damaged"}),
            "lines_or_amount",
        ),
        (
            "neither lines nor an amount",
            json!({"reason": "damaged"}),
            "lines_or_amount",
        ),
        (
            "a word for an amount",
            json!({"amount": "lots", "reason": "goodwill"}),
            "invalid_amount",
        ),
        (
            "a zero amount",
            json!({"amount": "0", "reason": "goodwill"}),
            "invalid_amount",
        ),
        (
            "a negative amount",
            json!({"amount": "-1.00", "reason": "goodwill"}),
            "invalid_amount",
        ),
        (
            "fractions of a cent",
            json!({"amount": "1.005", "reason": "goodwill"}),
            "invalid_amount",
        ),
        (
            "an empty reason",
            json!({"amount": "1.00", "reason": "  "}),
            "invalid_reason",
        ),
    ] {
        let (status, reply) = refund_part(&app, &id, why, body).await;
        assert_eq!(
            (status, code(&reply)),
            (unprocessable, expected),
            "{why}: {reply}"
        );
    }
    let (status, reply) = app
        .request(Method::POST, format!("/api/orders/{id}/refunds"))
        .token(&app.admin())
        .json(json!({"amount": "1.00", "reason": "goodwill"}))
        .send()
        .await;
    assert_eq!(
        (status, code(&reply)),
        (StatusCode::BAD_REQUEST, "idempotency_key_required"),
        "{reply}"
    );
    let (status, reply) = app
        .request(Method::POST, format!("/api/orders/{id}/refunds"))
        .token(&token)
        .header("Idempotency-Key", "mine")
        .json(json!({"amount": "1.00", "reason": "goodwill"}))
        .send()
        .await;
    assert_eq!(
        (status, code(&reply)),
        (StatusCode::FORBIDDEN, "forbidden"),
        "{reply}"
    );

    // Nothing was written, nothing moved, and no refusal left the order locked.
    assert_eq!(app.count("SELECT count(*) FROM orders.shipments").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM orders.refunds").await, 0);
    assert_eq!(app.ledger_count(&id, "capture").await, 1);
    assert_eq!(app.ledger_count(&id, "refund").await, 0);
    let order = get(&app, &token, &id).await;
    assert_eq!(order["status"], "partially_shipped", "{order}");
    assert!(order["stage"].is_null(), "{order}");
    assert_eq!(dec(&order["money"]["captured"]), captured, "{order}");
    assert_eq!(dec(&order["money"]["refunded"]), Decimal::ZERO, "{order}");
    assert_eq!(app.stock("TEE").await, (8, 0, 8));
    let (status, reply) = refund_part(
        &app,
        &id,
        "goodwill-1",
        json!({"amount": captured.to_string(), "reason": "goodwill"}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "all that was captured: {reply}"
    );
    let refund_id = reply["refund"]["id"].as_str().expect("refund id");
    let order = settled_part(&app, &token, &id, "refunds", refund_id).await;
    assert_eq!(dec(&order["money"]["refunded"]), captured, "{order}");
}

#[tokio::test]
async fn a_shipment_asked_for_twice_with_the_same_key_ships_and_captures_once() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    app.product("MUG", "5.00", 10).await;
    let (token, id, _) = order_of(&app, "alice", &[("TEE", 2), ("MUG", 1)], None).await;

    let (status, first) = ship_lines(&app, &id, "parcel-1", lines(&[("TEE", 1)])).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, again) = ship_lines(&app, &id, "parcel-1", lines(&[("TEE", 1)])).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["shipment"]["id"], first["shipment"]["id"], "{again}");
    assert_eq!(
        again["shipment"]["amount"], first["shipment"]["amount"],
        "{again}"
    );
    let shipment_id = first["shipment"]["id"].as_str().expect("shipment id");
    let order = settled_part(&app, &token, &id, "shipments", shipment_id).await;
    assert_eq!(
        order["shipments"].as_array().map(Vec::len),
        Some(1),
        "{order}"
    );

    // Once it shipped, the repeat answers the shipped shipment, and starts nothing.
    let (status, later) = ship_lines(&app, &id, "parcel-1", lines(&[("TEE", 1)])).await;
    assert_eq!(status, StatusCode::OK, "{later}");
    assert_eq!(later["request"], "done", "{later}");
    assert_eq!(later["shipment"]["id"], first["shipment"]["id"], "{later}");
    assert_eq!(later["shipment"]["status"], "shipped", "{later}");
    // The same key for other units is a mistake, not a new shipment.
    let (status, reused) = ship_lines(&app, &id, "parcel-1", lines(&[("MUG", 1)])).await;
    assert_eq!(
        (status, code(&reused)),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
        "{reused}"
    );

    assert_eq!(app.count("SELECT count(*) FROM orders.shipments").await, 1);
    assert_eq!(app.ledger_count(&id, "capture").await, 1);
    let order = get(&app, &token, &id).await;
    assert_eq!(order["status"], "partially_shipped", "{order}");
    assert_eq!(
        order["money"]["captured"], first["shipment"]["amount"],
        "{order}"
    );
    assert_eq!(
        provider_amounts(&app, &id, "capture").await,
        vec![dec(&first["shipment"]["amount"])]
    );
}

#[tokio::test]
async fn a_refund_asked_for_once_everything_went_back_is_refused_and_writes_nothing() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let (token, id, _) = order_of(&app, "alice", &[("TEE", 1)], None).await;
    let (status, body) = app.ship(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.eventually("shipped", || async {
        get(&app, &token, &id).await["status"] == "shipped"
    })
    .await;
    let (status, body) = app.refund(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.eventually("refunded", || async {
        get(&app, &token, &id).await["status"] == "refunded"
    })
    .await;

    let (status, reply) = refund_part(
        &app,
        &id,
        "goodwill-1",
        json!({"amount": "1.00", "reason": "goodwill"}),
    )
    .await;
    assert_eq!(
        (status, code(&reply)),
        (StatusCode::UNPROCESSABLE_ENTITY, "refund_exceeds_captured"),
        "nothing captured is left to refund: {reply}"
    );
    let (status, reply) = refund_part(
        &app,
        &id,
        "return-1",
        json!({"lines": lines(&[("TEE", 1)]), "reason": "damaged"}),
    )
    .await;
    assert!(
        status.is_client_error() && reply["refund"].is_null(),
        "the tee's money already went back: {status} {reply}"
    );
    assert_eq!(app.count("SELECT count(*) FROM orders.refunds").await, 1);
    assert_eq!(app.ledger_count(&id, "refund").await, 1);
}

#[tokio::test]
async fn killing_the_capture_between_the_providers_capture_and_our_record_captures_once() {
    use checkout::app::{App, Role};

    // Everything but authorize (which captures) in-process; authorize as a real process we
    // can SIGKILL after the provider captured and before we recorded it.
    let nats = crate::helpers::NatsServer::start();
    let db = crate::helpers::TestDb::new();
    let mut settings = crate::helpers::test_settings(&nats, &db);
    let psp = crate::helpers::SandboxPsp::start().await;
    settings.psp.url = psp.url().to_owned();
    let roles = [Role::Edge, Role::Reserve, Role::Order, Role::Compensate];
    let app = App::build(settings.clone(), &roles)
        .await
        .expect("app starts");
    let app = TestApp::attach(app, settings, psp, nats, db).await;
    let spawn_authorize = || {
        let mut env = crate::helpers::process_env(&app.settings, crate::helpers::port(), &app.psp);
        env.push(("CHECKOUT__NATS__ACK_WAIT".into(), "2s".into()));
        crate::helpers::CheckoutProcess::start("authorize", env)
    };
    app.product("TEE", "10.00", 10).await;
    app.product("MUG", "7.25", 10).await;
    let mut first = spawn_authorize();
    let (token, id, order) = order_of(&app, "alice", &[("TEE", 2), ("MUG", 1)], None).await;
    let total = dec(&order["total"]);

    // The provider captures, then keeps its answer to itself for a while.
    app.psp_fault(
        json!({"status": 503, "afterEffect": true, "delayMs": 20000, "count": 1,
                         "operations": ["capture"]}),
    )
    .await;
    let (status, body) = ship_lines(&app, &id, "parcel-1", lines(&[("TEE", 1)])).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let shipment_id = body["shipment"]["id"].as_str().expect("id").to_owned();
    let amount = dec(&body["shipment"]["amount"]);
    app.eventually("the provider captured", || async {
        provider_amounts(&app, &id, "capture").await.len() == 1
    })
    .await;
    let now = get(&app, &token, &id).await;
    assert_eq!(
        part(&now, "shipments", &shipment_id).expect("shipment")["status"],
        "capturing",
        "we have not recorded it: {now}"
    );
    first.kill();

    // The redelivery asks again under the same key and gets the provider's first answer.
    let mut second = spawn_authorize();
    let order = settled_part(&app, &token, &id, "shipments", &shipment_id).await;
    let shipment = part(&order, "shipments", &shipment_id).expect("shipment");
    assert_eq!(shipment["status"], "shipped", "{order}");
    assert_eq!(provider_amounts(&app, &id, "capture").await, vec![amount]);
    assert_eq!(dec(&order["money"]["captured"]), amount, "{order}");

    // And the order goes on: the rest ships, and the captures add up to the total once.
    let (_, order) = ship_and_wait(&app, &token, &id, "parcel-2", &[("TEE", 1), ("MUG", 1)]).await;
    assert_eq!(order["status"], "shipped", "{order}");
    let captures = provider_amounts(&app, &id, "capture").await;
    assert_eq!(captures.len(), 2, "{captures:?}");
    assert_eq!(captures.iter().sum::<Decimal>(), total);
    second.kill();
    app.audit().await;
}
