//! Pricing over HTTP: promotions and their limits, destinations, caches, snapshots.

use std::time::{Duration, Instant};

use checkout::app::Role;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::TestApp;

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
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

async fn apply(app: &TestApp, token: &str, code: &str) -> (StatusCode, Value) {
    app.apply_promo(token, code).await
}

#[tokio::test]
async fn promo_codes_apply_by_their_rules() {
    let app = TestApp::spawn().await;
    app.product("TEE", "20.00", 100).await;
    app.product("MUG", "10.00", 100).await;
    put_promo(&app, "TENOFF", json!({"kind": "percent", "value": "10"})).await;
    put_promo(
        &app,
        "later",
        json!({"kind": "percent", "value": "5", "startsAt": "2999-01-01T00:00:00Z"}),
    )
    .await;
    put_promo(
        &app,
        "gone",
        json!({"kind": "fixed", "value": "5.00", "endsAt": "2001-01-01T00:00:00Z"}),
    )
    .await;
    put_promo(
        &app,
        "big",
        json!({"kind": "fixed", "value": "5.00", "minSubtotal": "100.00"}),
    )
    .await;
    put_promo(
        &app,
        "mugs",
        json!({"kind": "fixed", "value": "50.00", "skus": ["MUG"]}),
    )
    .await;
    put_promo(
        &app,
        "none-left",
        json!({"kind": "percent", "value": "50", "usageLimit": 0}),
    )
    .await;
    put_promo(&app, "shipfree", json!({"kind": "free_shipping"})).await;
    let alice = app.token("alice");
    app.add(&alice, "TEE", 2).await;

    for (promo, expected) in [
        ("nope", "promo_not_found"),
        ("later", "promo_not_started"),
        ("gone", "promo_expired"),
        ("big", "promo_min_subtotal"),
        ("mugs", "promo_not_applicable"),
        ("none-left", "promo_exhausted"),
    ] {
        let (status, body) = apply(&app, &alice, promo).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{promo}: {body}");
        assert_eq!(code(&body), expected, "{promo}");
    }

    // Codes are case-insensitive; percent applies to eligible lines.
    let (status, cart) = apply(&app, &alice, "tenoff").await;
    assert_eq!(status, StatusCode::OK, "{cart}");
    assert_eq!(cart["discount"], "4.00");
    assert_eq!(cart["promo"]["applied"], true);
    // A fixed discount only on its SKUs and never below zero on a line: 10.00 of MUG, not 50.
    app.add(&alice, "MUG", 1).await;
    let (_, cart) = apply(&app, &alice, "MUGS").await;
    assert_eq!(cart["discount"], "10.00", "{cart}");
    assert_eq!(cart["total"], "40.00");
    // Removing the only eligible line leaves the promo in place, shown as not applied.
    let (_, cart) = app
        .request(Method::DELETE, "/api/cart/items/MUG")
        .token(&alice)
        .send()
        .await;
    assert_eq!(cart["promo"]["applied"], false, "{cart}");
    assert_eq!(cart["promo"]["reason"], "promo_not_applicable");
    assert_eq!(cart["discount"], "0.00");
    // Free shipping shows in a quote.
    apply(&app, &alice, "shipfree").await;
    let (status, quote) = app
        .quote(
            &alice,
            json!({"name": "A", "line1": "1", "city": "Berlin", "postalCode": "1", "country": "DE"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{quote}");
    assert_eq!(quote["shipping"], "0.00");
    let (_, cart) = app.remove_promo(&alice).await;
    assert!(cart["promo"].is_null(), "{cart}");
}

#[tokio::test]
async fn a_usage_limit_holds_under_concurrent_checkouts() {
    let app = TestApp::spawn().await;
    app.product("TEE", "20.00", 1000).await;
    put_promo(
        &app,
        "flash",
        json!({"kind": "percent", "value": "20", "usageLimit": 10}),
    )
    .await;
    let mut buyers = Vec::new();
    for i in 0..50 {
        let token = app.token(&format!("fan-{i}"));
        let cart = app.add(&token, "TEE", 1).await;
        let (status, body) = apply(&app, &token, "flash").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        buyers.push((token, cart));
    }
    let results = futures::future::join_all(
        buyers
            .iter()
            .map(|(t, c)| app.checkout(t, "k", c, "tok_visa")),
    )
    .await;
    let (mut confirmed, mut exhausted) = (0, 0);
    for ((token, _), (status, body)) in buyers.iter().zip(results) {
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let id = body["orderId"].as_str().expect("id").to_owned();
        let order = app.settled(token, &id).await;
        match (order["status"].as_str(), order["reason"].as_str()) {
            (Some("confirmed"), _) => {
                assert_eq!(order["discount"], "4.00");
                confirmed += 1;
            }
            (Some("failed"), Some("promo_exhausted")) => {
                assert_eq!(order["payment"]["status"], "voided", "{order}");
                exhausted += 1;
            }
            other => panic!("unexpected {other:?}: {order}"),
        }
    }
    assert_eq!((confirmed, exhausted), (10, 40));
    assert_eq!(
        app.count("SELECT used::bigint FROM pricing.promos WHERE code = 'flash'")
            .await,
        10
    );
    // The refused orders gave their units back.
    app.eventually("stock settled", || async {
        app.stock("TEE").await == (990, 0, 990)
    })
    .await;
}

#[tokio::test]
async fn a_per_customer_limit_is_enforced_and_given_back_on_cancel() {
    let app = TestApp::spawn().await;
    app.product("TEE", "20.00", 100).await;
    put_promo(
        &app,
        "once",
        json!({"kind": "fixed", "value": "5.00", "perCustomerLimit": 1}),
    )
    .await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "TEE", 1).await;
    apply(&app, &alice, "once").await;
    let (_, body) = app.checkout(&alice, "k1", &cart, "tok_visa").await;
    let id = body["orderId"].as_str().expect("id").to_owned();
    assert_eq!(app.settled(&alice, &id).await["status"], "confirmed");

    app.add(&alice, "TEE", 1).await;
    let (status, body) = apply(&app, &alice, "once").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(code(&body), "promo_limit_reached");

    // Cancelling gives the redemption back.
    app.cancel(&alice, &id).await;
    app.eventually("cancelled", || async {
        app.order(&alice, &id).await.1["status"] == "cancelled"
    })
    .await;
    let (status, body) = apply(&app, &alice, "once").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn quotes_price_tax_and_shipping_for_the_destination() {
    let app = TestApp::spawn().await;
    app.product("TEE", "20.00", 100).await;
    let admin = app.admin();
    let (status, _) = app
        .request(Method::PUT, "/api/admin/products/BOOK")
        .token(&admin)
        .json(json!({"name": "Book", "price": "10.00", "currency": "USD", "weightGrams": 400, "taxCode": "reduced"}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK);
    app.set_stock("BOOK", 10).await;
    let alice = app.token("alice");
    app.add(&alice, "TEE", 1).await;
    app.add(&alice, "BOOK", 1).await;
    let quote = |address: Value, method: Option<&str>| {
        let mut body = json!({"address": address});
        if let Some(m) = method {
            body["shippingMethod"] = json!(m);
        }
        app.request(Method::POST, "/api/cart/quote")
            .token(&alice)
            .json(body)
            .send()
    };
    let addr = |country: &str, region: Option<&str>| json!({"name": "A", "line1": "1 St", "city": "X", "postalCode": "1", "country": country, "region": region});
    // California: 7.25 % on the tee and shipping, books are not taxed there (reduced = 0).
    let (status, q) = quote(addr("US", Some("CA")), None).await;
    assert_eq!(status, StatusCode::OK, "{q}");
    assert_eq!(
        (q["subtotal"].as_str(), q["shipping"].as_str()),
        (Some("30.00"), Some("4.99"))
    );
    assert_eq!(
        q["tax"], "1.81",
        "20.00 × 7.25 % = 1.45, shipping 4.99 × 7.25 % = 0.36"
    );
    assert_eq!(q["total"], "36.80");
    // Germany, express: 19 % and 7 %, express band.
    let (_, q) = quote(addr("DE", None), Some("express")).await;
    assert_eq!(q["shipping"], "29.99");
    assert_eq!(q["tax"], "10.20", "3.80 + 0.70 + 29.99 × 19 % = 5.70");
    // Errors: an unknown country, a destination no zone covers, an unknown method.
    let (status, body) = quote(addr("ZZ", None), None).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_address")
    );
    let (status, body) = quote(addr("JP", None), None).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "shipping_unavailable")
    );
    let (status, body) = quote(addr("DE", None), Some("drone")).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_shipping_method")
    );

    // Admin changes take effect at once: a new rate and a new zone.
    let (status, body) = app
        .request(Method::PUT, "/api/admin/tax-rates/DE")
        .token(&admin)
        .json(json!({"rates": {"standard": "0.20", "reduced": "0.10"}}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, q) = quote(addr("DE", None), None).await;
    assert_eq!(q["tax"], "7.00", "4.00 + 1.00 + 9.99 × 20 % = 2.00: {q}");
    let (status, body) = app
        .request(Method::PUT, "/api/admin/shipping-rates/asia")
        .token(&admin)
        .json(json!({"countries": ["JP"], "currency": "USD",
                     "methods": {"standard": {"bands": [{"maxGrams": 2000, "price": "12.00"}]}}}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, q) = quote(addr("JP", None), None).await;
    assert_eq!(status, StatusCode::OK, "{q}");
    assert_eq!(q["shipping"], "12.00");
    // A checkout to a destination we do not ship to creates no order.
    let (_, cart) = app.cart(&alice).await;
    let mut body = crate::helpers::checkout_body(cart["cartId"].as_str().expect("id"), "tok_visa");
    body["address"]["country"] = json!("BR");
    let (status, reply) = app
        .request(Method::POST, "/api/checkout")
        .token(&alice)
        .json(body)
        .header("Idempotency-Key", "k")
        .send()
        .await;
    assert_eq!(
        (status, code(&reply)),
        (StatusCode::UNPROCESSABLE_ENTITY, "shipping_unavailable")
    );
    assert_eq!(app.count("SELECT count(*) FROM edge.checkouts").await, 0);
}

#[tokio::test]
async fn inactive_products_and_other_currencies_cannot_be_added() {
    let app = TestApp::spawn().await;
    app.product("TEE", "20.00", 10).await;
    let admin = app.admin();
    app.request(Method::PUT, "/api/admin/products/OLD")
        .token(&admin)
        .json(json!({"name": "Old", "price": "1.00", "currency": "USD", "weightGrams": 1, "active": false}))
        .send()
        .await;
    app.request(Method::PUT, "/api/admin/products/EURO")
        .token(&admin)
        .json(json!({"name": "Euro", "price": "1.00", "currency": "EUR", "weightGrams": 1}))
        .send()
        .await;
    let alice = app.token("alice");
    app.add(&alice, "TEE", 1).await;
    let (status, body) = app
        .request(Method::POST, "/api/cart/items")
        .token(&alice)
        .json(json!({"sku": "OLD", "qty": 1}))
        .send()
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "product_inactive")
    );
    let (status, body) = app
        .request(Method::POST, "/api/cart/items")
        .token(&alice)
        .json(json!({"sku": "EURO", "qty": 1}))
        .send()
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "currency_mismatch")
    );
}

#[tokio::test]
async fn a_price_change_reaches_every_edge_within_a_second_and_never_changes_an_order() {
    let app = TestApp::spawn().await;
    let second = app.start_roles(&[Role::Edge]).await;
    let second_base = format!("http://{}", second.http_addr().expect("second edge"));
    // A dotted SKU: its change notice must still reach every edge.
    app.product("TEE.RED.L", "20.00", 10).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "TEE.RED.L", 1).await;
    let cart_on_second = || async {
        let r = app
            .http
            .get(format!("{second_base}/api/cart"))
            .bearer_auth(&alice)
            .send()
            .await
            .expect("get");
        r.json::<Value>().await.expect("json")
    };
    // The second edge has the product cached now.
    assert_eq!(cart_on_second().await["subtotal"], "20.00");
    let (_, body) = app.checkout(&alice, "k", &cart, "tok_visa").await;
    let order_id = body["orderId"].as_str().expect("id").to_owned();
    let order = app.settled(&alice, &order_id).await;
    assert_eq!(order["status"], "confirmed");

    // The price changes through the first edge...
    let (status, _) = app
        .request(Method::PUT, "/api/admin/products/TEE.RED.L")
        .token(&app.admin())
        .json(json!({"name": "Tee", "price": "25.00", "currency": "USD", "weightGrams": 100}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK);
    app.add(&alice, "TEE.RED.L", 1).await;
    // ...and the second edge shows it within a second, far inside its cache TTL.
    let changed = Instant::now();
    loop {
        if cart_on_second().await["subtotal"] == "25.00" {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "second edge still shows the old price"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The order keeps the price it was bought at.
    let (_, order) = app.order(&alice, &order_id).await;
    assert_eq!(order["subtotal"], "20.00");
    assert_eq!(order["items"][0]["unitPrice"], "20.00");
}

#[tokio::test]
async fn a_checkout_charges_the_catalogs_price_even_when_this_edge_has_not_heard_of_the_change() {
    let app = TestApp::spawn().await;
    app.product("TEE", "20.00", 10).await;
    let alice = app.token("alice");
    // The edge remembers this cart and caches the product at 20.00...
    let cart = app.add(&alice, "TEE", 2).await;
    // ...and the price changes without a notice reaching it (as when one is lost).
    sqlx::query("UPDATE catalog.products SET price = 25.00 WHERE sku = 'TEE'")
        .execute(&app.pool)
        .await
        .expect("price change");
    let (status, body) = app.checkout(&alice, "k", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let order_id = body["orderId"].as_str().expect("orderId");
    let order = app.settled(&alice, order_id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["items"][0]["unitPrice"], "25.00", "{order}");
    assert_eq!(order["subtotal"], "50.00", "{order}");
}

#[tokio::test]
async fn a_line_added_through_another_edge_goes_into_the_order() {
    let app = TestApp::spawn().await;
    let second = app.start_roles(&[Role::Edge]).await;
    let second_base = format!("http://{}", second.http_addr().expect("second edge"));
    app.product("TEE", "10.00", 10).await;
    app.product("MUG", "4.00", 10).await;
    let alice = app.token("alice");
    // The first edge remembers the cart with one line...
    let cart = app.add(&alice, "TEE", 1).await;
    // ...and the buyer's next change goes through the second.
    let r = app
        .http
        .post(format!("{second_base}/api/cart/items"))
        .bearer_auth(&alice)
        .json(&json!({"sku": "MUG", "qty": 3}))
        .send()
        .await
        .expect("add through the second edge");
    assert_eq!(r.status(), StatusCode::OK);
    let (status, body) = app.checkout(&alice, "k", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let order_id = body["orderId"].as_str().expect("orderId");
    let order = app.settled(&alice, order_id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["subtotal"], "22.00", "{order}");
    assert_eq!(order["items"].as_array().map(Vec::len), Some(2), "{order}");
}

#[tokio::test]
async fn a_product_taken_off_sale_after_it_was_added_is_not_sold() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    app.product("MUG", "4.00", 10).await;
    let alice = app.token("alice");
    app.add(&alice, "TEE", 1).await;
    let cart = app.add(&alice, "MUG", 1).await;
    // Taken off sale (a recall) without a notice reaching the edge: its cache says on sale.
    sqlx::query("UPDATE catalog.products SET active = false WHERE sku = 'MUG'")
        .execute(&app.pool)
        .await
        .expect("off sale");
    let (status, body) = app.checkout(&alice, "k", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(code(&body), "product_inactive", "{body}");
    assert_eq!(app.count("SELECT count(*) FROM edge.checkouts").await, 0);
    // Without it, the rest of the cart checks out.
    let (status, _) = app
        .request(Method::DELETE, "/api/cart/items/MUG")
        .token(&alice)
        .send()
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.checkout(&alice, "k2", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let order = app
        .settled(&alice, body["orderId"].as_str().expect("orderId"))
        .await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["subtotal"], "10.00", "{order}");
}
