//! Bad input gets a clear 4xx JSON error and changes nothing.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{checkout_body, TestApp};

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no code>")
}

#[tokio::test]
async fn requests_without_a_valid_token_are_unauthorized() {
    let app = TestApp::spawn().await;
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "alice", "exp": 1_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"test-secret"),
    )
    .expect("token");
    let forged = checkout::auth::mint(
        "other-secret",
        "alice",
        true,
        std::time::Duration::from_secs(60),
    )
    .expect("token");
    for token in [
        None,
        Some("garbage"),
        Some(expired.as_str()),
        Some(forged.as_str()),
    ] {
        let request = app.request(Method::GET, "/api/cart");
        let request = match token {
            Some(t) => request.token(t),
            None => request,
        };
        let (status, body) = request.send().await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
        assert_eq!(code(&body), "unauthorized");
    }
    let (status, body) = app
        .request(Method::GET, "/api/cart")
        .header("Authorization", "Basic abc")
        .send()
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

#[tokio::test]
async fn admin_routes_need_the_admin_role() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let (status, body) = app
        .request(Method::PUT, "/api/admin/products/TEE")
        .token(&alice)
        .json(json!({"name": "Tee", "price": "1.00", "currency": "USD", "weightGrams": 1}))
        .send()
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(code(&body), "forbidden");
    assert_eq!(app.count("SELECT count(*) FROM catalog.products").await, 0);
}

#[tokio::test]
async fn invalid_products_and_stock_are_refused() {
    let app = TestApp::spawn().await;
    let admin = app.admin();
    let cases = [
        (
            json!({"name": "T", "price": "12.345", "currency": "USD", "weightGrams": 1}),
            "invalid_price",
        ),
        (
            json!({"name": "T", "price": "-1", "currency": "USD", "weightGrams": 1}),
            "invalid_price",
        ),
        (
            json!({"name": "T", "price": 12.5, "currency": "USD", "weightGrams": 1}),
            "invalid_body",
        ),
        (
            json!({"name": "T", "price": "1.00", "currency": "XXX", "weightGrams": 1}),
            "invalid_currency",
        ),
        (
            json!({"name": "", "price": "1.00", "currency": "USD", "weightGrams": 1}),
            "invalid_name",
        ),
        (
            json!({"name": "a\u{0}b", "price": "1.00", "currency": "USD", "weightGrams": 1}),
            "invalid_name",
        ),
        (
            json!({"name": "T", "price": "1.00", "currency": "USD", "weightGrams": -1}),
            "invalid_weight",
        ),
    ];
    for (body, expected) in cases {
        let (status, reply) = app
            .request(Method::PUT, "/api/admin/products/TEE")
            .token(&admin)
            .json(body.clone())
            .send()
            .await;
        assert!(status.is_client_error(), "{body}: {status} {reply}");
        assert_eq!(code(&reply), expected, "{body}");
    }
    let (status, reply) = app
        .request(Method::PUT, "/api/admin/products/bad%20sku")
        .token(&admin)
        .json(json!({"name": "T", "price": "1.00", "currency": "USD", "weightGrams": 1}))
        .send()
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(app.count("SELECT count(*) FROM catalog.products").await, 0);

    app.product("TEE", "1.00", 3).await;
    let (status, reply) = app
        .request(Method::PUT, "/api/admin/stock/TEE")
        .token(&admin)
        .json(json!({"onHand": -1}))
        .send()
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    let (status, reply) = app
        .request(Method::PUT, "/api/admin/stock/NOPE")
        .token(&admin)
        .json(json!({"onHand": 1}))
        .send()
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{reply}");
    assert_eq!(app.stock("TEE").await, (3, 0, 3));
}

#[tokio::test]
async fn invalid_cart_changes_leave_the_cart_unchanged() {
    let app = TestApp::spawn().await;
    app.product("TEE", "5.00", 10).await;
    let alice = app.token("alice");
    app.add(&alice, "TEE", 2).await;
    for qty in [
        json!(0),
        json!(1001),
        json!(1.5),
        json!("2"),
        json!(-1),
        json!(null),
    ] {
        let (status, body) = app
            .request(Method::POST, "/api/cart/items")
            .token(&alice)
            .json(json!({"sku": "TEE", "qty": qty}))
            .send()
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "qty {qty}: {body}"
        );
        assert_eq!(code(&body), "invalid_quantity", "qty {qty}");
    }
    // 999 more would exceed 1000 units on one line.
    let (status, body) = app
        .request(Method::POST, "/api/cart/items")
        .token(&alice)
        .json(json!({"sku": "TEE", "qty": 999}))
        .send()
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = app
        .request(Method::POST, "/api/cart/items")
        .token(&alice)
        .json(json!({"sku": "NOPE", "qty": 1}))
        .send()
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(code(&body), "unknown_sku");
    let (status, body) = app
        .request(Method::PUT, "/api/cart/items/NOPE")
        .token(&alice)
        .json(json!({"qty": 1}))
        .send()
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = app
        .http
        .post(format!("{}/api/cart/items", app.base))
        .bearer_auth(&alice)
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .map(|r| (r.status(), r))
        .expect("sent");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let body: Value = body.json().await.expect("json error");
    assert_eq!(code(&body), "invalid_json");

    let (_, cart) = app.cart(&alice).await;
    assert_eq!(cart["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(cart["items"][0]["qty"], 2);
    assert_eq!(cart["total"], "10.00");
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let app = TestApp::spawn().await;
    let alice = app.token("alice");
    let big = format!("{{\"sku\":\"{}\",\"qty\":1}}", "A".repeat(2 * 1024 * 1024));
    let resp = app
        .http
        .post(format!("{}/api/cart/items", app.base))
        .bearer_auth(&alice)
        .header("Content-Type", "application/json")
        .body(big)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn invalid_checkouts_are_refused_without_an_order() {
    let app = TestApp::spawn().await;
    app.product("TEE", "5.00", 10).await;
    let alice = app.token("alice");

    // An empty cart.
    let (_, cart) = app.cart(&alice).await;
    let empty_id = cart["cartId"].as_str().expect("cart id").to_owned();
    let (status, body) = app.checkout(&alice, "k1", &empty_id, "tok_visa").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(code(&body), "empty_cart");

    let cart = app.add(&alice, "TEE", 1).await;
    // No Idempotency-Key.
    let (status, body) = app
        .request(Method::POST, "/api/checkout")
        .token(&alice)
        .json(checkout_body(&cart, "tok_visa"))
        .send()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(code(&body), "idempotency_key_required");
    let long_key = "k".repeat(256);
    let (status, _) = app.checkout(&alice, &long_key, &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let mut bad_country = checkout_body(&cart, "tok_visa");
    bad_country["address"]["country"] = json!("Narnia");
    let mut nul_name = checkout_body(&cart, "tok_visa");
    nul_name["address"]["name"] = json!("a\u{0}b");
    let mut no_address = checkout_body(&cart, "tok_visa");
    no_address
        .as_object_mut()
        .expect("object")
        .remove("address");
    let mut empty_token = checkout_body(&cart, "tok_visa");
    empty_token["paymentMethod"]["token"] = json!("");
    let unknown_cart = checkout_body("00000000-0000-0000-0000-000000000000", "tok_visa");
    let garbage_cart = checkout_body("not-a-uuid", "tok_visa");
    for (body, status_expected, code_expected) in [
        (
            bad_country,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_address",
        ),
        (
            nul_name,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_address",
        ),
        (no_address, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (
            empty_token,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_payment_method",
        ),
        (unknown_cart, StatusCode::NOT_FOUND, "cart_not_found"),
        (garbage_cart, StatusCode::NOT_FOUND, "cart_not_found"),
    ] {
        let (status, reply) = app
            .request(Method::POST, "/api/checkout")
            .token(&alice)
            .json(body.clone())
            .header("Idempotency-Key", "k2")
            .send()
            .await;
        assert_eq!(status, status_expected, "{body}: {reply}");
        assert_eq!(code(&reply), code_expected, "{body}");
    }
    let (status, _) = app.order(&alice, "not-an-id").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    assert_eq!(app.count("SELECT count(*) FROM edge.checkouts").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM orders.orders").await, 0);
    assert_eq!(app.stock("TEE").await, (10, 0, 10));
    // A refused request did not burn the key: it still works with a valid body.
    let (status, body) = app.checkout(&alice, "k2", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test]
async fn carts_are_capped_so_no_saga_event_outgrows_the_server() {
    let app = TestApp::spawn_with(|s| s.edge.cart_max_lines = 2).await;
    for sku in ["A", "B", "C"] {
        app.product(sku, "1.00", 10).await;
    }
    let alice = app.token("alice");
    app.add(&alice, "A", 1).await;
    app.add(&alice, "B", 1).await;
    let (status, reply) = app
        .request(Method::POST, "/api/cart/items")
        .token(&alice)
        .json(json!({"sku": "C", "qty": 1}))
        .send()
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(code(&reply), "too_many_lines");
    let (status, reply) = app
        .request(Method::PUT, "/api/cart/items/C")
        .token(&alice)
        .json(json!({"qty": 1}))
        .send()
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    // Lines already in the cart can still change.
    let cart = app.add(&alice, "A", 2).await;
    let (_, body) = app.cart(&alice).await;
    assert_eq!(body["cartId"], cart.as_str());
    assert_eq!(body["items"].as_array().map(Vec::len), Some(2), "{body}");
}

#[tokio::test]
async fn promo_limits_the_data_cannot_hold_are_4xx_not_5xx() {
    let app = TestApp::spawn().await;
    let admin = app.admin();
    let put = |body: Value| {
        let app = &app;
        let admin = admin.clone();
        async move {
            app.request(Method::PUT, "/api/admin/promos/SALE")
                .token(&admin)
                .json(body)
                .send()
                .await
        }
    };
    let (status, _) = put(json!({"kind": "percent", "value": "10", "usageLimit": 5})).await;
    assert_eq!(status, StatusCode::OK);
    sqlx::query("UPDATE pricing.promos SET used = 3 WHERE code = 'sale'")
        .execute(&app.pool)
        .await
        .expect("used");
    let (status, body) = put(json!({"kind": "percent", "value": "10", "usageLimit": 2})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(code(&body), "usage_limit_below_used");
    let (status, body) = put(json!({"kind": "fixed", "value": "1e30"})).await;
    assert!(status.is_client_error(), "{status}: {body}");
    let (status, body) =
        put(json!({"kind": "percent", "value": "10", "usageLimit": 99999999999u64})).await;
    assert!(status.is_client_error(), "{status}: {body}");
}
