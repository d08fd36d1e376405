//! The saga end to end: confirmed, out of stock, declined, and who may see an order.

use reqwest::{Method, StatusCode};

use crate::helpers::TestApp;

#[tokio::test]
async fn a_checkout_reaches_confirmed_and_decrements_stock() {
    let app = TestApp::spawn().await;
    app.product("TEE", "12.50", 5).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "TEE", 2).await;

    let (status, body) = app.checkout(&alice, "key-1", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "pending");
    let order_id = body["orderId"].as_str().expect("orderId").to_owned();

    let order = app.settled(&alice, &order_id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    // To London: 20 % VAT on the goods and on shipping (9.99, 200 g to the europe zone).
    assert_eq!(order["subtotal"], "25.00");
    assert_eq!(order["shipping"], "9.99");
    assert_eq!(order["tax"], "7.00");
    assert_eq!(order["total"], "41.99");
    assert_eq!(order["items"][0]["sku"], "TEE");
    assert_eq!(order["items"][0]["qty"], 2);
    assert_eq!(order["payment"]["status"], "authorized");
    // Stock is finalized by inventory reacting to `confirmed`: eventually consistent.
    app.eventually("stock committed", || async {
        app.stock("TEE").await == (3, 0, 3)
    })
    .await;
    assert_eq!(app.ledger_count(&order_id, "authorization").await, 1);
}

#[tokio::test]
async fn the_order_is_visible_as_pending_with_a_location_right_after_checkout() {
    let app = TestApp::spawn().await;
    app.product("MUG", "8.00", 5).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "MUG", 1).await;
    let resp = app
        .http
        .post(format!("{}/api/checkout", app.base))
        .bearer_auth(&alice)
        .header("Idempotency-Key", "k")
        .json(&crate::helpers::checkout_body(&cart, "tok_visa"))
        .send()
        .await
        .expect("checkout");
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("Location header")
        .to_owned();
    let (status, body) = app
        .request(Method::GET, location)
        .token(&alice)
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "never 404 for the owner: {body}");
    assert!(
        ["pending", "confirmed"].contains(&body["status"].as_str().unwrap_or_default()),
        "{body}"
    );
}

#[tokio::test]
async fn two_buyers_racing_for_the_last_unit_get_one_order() {
    let app = TestApp::spawn().await;
    app.product("LAST", "99.00", 1).await;
    let (alice, bob) = (app.token("alice"), app.token("bob"));
    let cart_a = app.add(&alice, "LAST", 1).await;
    let cart_b = app.add(&bob, "LAST", 1).await;

    let (a, b) = tokio::join!(
        app.checkout(&alice, "a", &cart_a, "tok_visa"),
        app.checkout(&bob, "b", &cart_b, "tok_visa")
    );
    // The loser learns it one of two ways: its checkout was accepted and the reserve step
    // refused it, or the winner's reservation had already announced the SKU sold out and the
    // edge answered 409 at once. Either way exactly one order is confirmed.
    let mut confirmed = 0;
    for ((status, body), token) in [(a, &alice), (b, &bob)] {
        if status == StatusCode::CONFLICT {
            assert_eq!(body["error"]["code"], "out_of_stock", "{body}");
            continue;
        }
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let order = app
            .settled(token, body["orderId"].as_str().expect("id"))
            .await;
        if order["status"] == "confirmed" {
            confirmed += 1;
        } else {
            assert_eq!(order["status"], "failed", "{order}");
            assert_eq!(order["reason"], "out_of_stock", "{order}");
            assert_eq!(
                order["payment"]["status"], "none",
                "no authorization for a rejected order"
            );
        }
    }
    assert_eq!(confirmed, 1, "exactly one buyer gets the last unit");
    app.eventually("stock settled", || async {
        app.stock("LAST").await == (0, 0, 0)
    })
    .await;
}

#[tokio::test]
async fn a_decline_releases_the_reservation_and_reopens_the_cart() {
    let app = TestApp::spawn().await;
    app.product("BOOK", "20.00", 1).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "BOOK", 1).await;

    let (_, body) = app.checkout(&alice, "first", &cart, "tok_declined").await;
    let order_id = body["orderId"].as_str().expect("id").to_owned();
    let order = app.settled(&alice, &order_id).await;
    assert_eq!(order["status"], "failed");
    assert_eq!(order["reason"], "payment_declined");
    assert_eq!(order["payment"]["status"], "declined");
    assert_eq!(
        app.stock("BOOK").await,
        (1, 0, 1),
        "the reservation was released"
    );

    // The same cart is open again: its owner can change it and check out with a new key.
    let (status, cart_now) = app.cart(&alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cart_now["cartId"], cart.as_str());
    assert_eq!(cart_now["items"][0]["sku"], "BOOK");
    let (status, body) = app.checkout(&alice, "second", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let retry = app
        .settled(&alice, body["orderId"].as_str().expect("id"))
        .await;
    assert_eq!(retry["status"], "confirmed", "{retry}");
    assert_ne!(body["orderId"], order_id.as_str());
}

#[tokio::test]
async fn a_cart_checked_out_under_another_key_is_a_conflict() {
    let app = TestApp::spawn().await;
    app.product("PEN", "1.00", 10).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "PEN", 1).await;
    let (status, _) = app.checkout(&alice, "one", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = app.checkout(&alice, "two", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "cart_already_checked_out");
    // Adding again starts a new cart rather than touching the checked-out one.
    let next = app.add(&alice, "PEN", 2).await;
    assert_ne!(next, cart);
}

#[tokio::test]
async fn orders_and_carts_of_other_users_are_not_found() {
    let app = TestApp::spawn().await;
    app.product("HAT", "15.00", 3).await;
    let (alice, bob) = (app.token("alice"), app.token("bob"));
    let cart = app.add(&alice, "HAT", 1).await;

    let (status, body) = app.checkout(&bob, "bob-key", &cart, "tok_visa").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "cart_not_found");

    let (_, body) = app.checkout(&alice, "k", &cart, "tok_visa").await;
    let order_id = body["orderId"].as_str().expect("id").to_owned();
    let (status, body) = app.order(&bob, &order_id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    app.settled(&alice, &order_id).await;
    let (status, _) = app.order(&bob, &order_id).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.order(&app.admin(), &order_id).await;
    assert_eq!(status, StatusCode::OK, "admins see every order");
}

#[tokio::test]
async fn a_buyers_concurrent_first_requests_fill_one_cart() {
    let app = TestApp::spawn().await;
    let skus: Vec<String> = (0..12).map(|i| format!("SKU-{i}")).collect();
    for sku in &skus {
        app.product(sku, "2.00", 10).await;
    }
    let alice = app.token("alice");
    // Twelve first requests at once, no cart yet: one cart must come out with every line.
    let adds = skus.iter().map(|sku| app.add(&alice, sku, 1));
    let mut carts = futures::future::join_all(adds).await;
    carts.dedup();
    assert_eq!(carts.len(), 1, "one cart for every request: {carts:?}");
    assert_eq!(
        app.count("SELECT count(*) FROM edge.carts WHERE status = 'open'")
            .await,
        1
    );
    let (status, cart) = app.cart(&alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cart["items"].as_array().map(Vec::len), Some(12), "{cart}");
}

#[tokio::test]
async fn a_line_added_while_the_checkout_is_priced_goes_into_the_order() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    app.product("MUG", "4.00", 5).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "TEE", 1).await;
    // A change of this cart holds its lock, as another request of alice's adding a line would.
    let mut change = app.lock_cart(&cart).await;
    // The checkout reads and prices the cart (one TEE) without the lock, then waits for it.
    let checkout = app.checkout(&alice, "key-1", &cart, "tok_visa");
    let change_lands = async {
        app.until_waiting_for_a_lock("the checkout waiting for the cart's lock")
            .await;
        sqlx::query(
            "INSERT INTO edge.cart_items (cart_id, sku, qty, currency) VALUES ($1::uuid, 'MUG', 2, 'USD')",
        )
        .bind(&cart)
        .execute(&mut *change)
        .await
        .expect("add a line");
        change.commit().await.expect("commit");
    };
    let ((status, body), ()) = tokio::join!(checkout, change_lands);
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let order_id = body["orderId"].as_str().expect("orderId");
    // What was priced is not what is in the cart any more: the checkout priced it again.
    let order = app.settled(&alice, order_id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    let mut skus: Vec<&str> = order["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["sku"].as_str())
        .collect();
    skus.sort_unstable();
    assert_eq!(skus, ["MUG", "TEE"], "{order}");
    assert_eq!(order["subtotal"], "18.00", "{order}");
}

#[tokio::test]
async fn a_cart_made_while_the_failed_order_was_pending_wins_over_reopening() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 5).await;
    app.product("MUG", "4.00", 5).await;
    let alice = app.token("alice");
    let first = app.add(&alice, "TEE", 1).await;
    let (_, body) = app.checkout(&alice, "first", &first, "tok_declined").await;
    let order = app
        .settled(&alice, body["orderId"].as_str().expect("orderId"))
        .await;
    assert_eq!(order["status"], "failed", "{order}");
    // Another request of alice's saw the order still pending and made a new cart, under the
    // checked-out cart's lock: this one is waiting for that lock, to reopen the cart.
    let mut other = app.lock_cart(&first).await;
    let made = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO edge.carts (cart_id, user_id, status) VALUES ($1, 'alice', 'open')")
        .bind(made)
        .execute(&mut *other)
        .await
        .expect("make a new cart");
    let add = app.add(&alice, "MUG", 1);
    let other_commits = async {
        app.until_waiting_for_a_lock("the add waiting for the cart's lock")
            .await;
        other.commit().await.expect("commit");
    };
    // Not a second open cart (the index refuses it), not an error: the new cart.
    let (cart, ()) = tokio::join!(add, other_commits);
    assert_eq!(cart, made.to_string());
    assert_eq!(
        app.count("SELECT count(*) FROM edge.carts WHERE status = 'open'")
            .await,
        1
    );
}
