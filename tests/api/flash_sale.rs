//! The peak of a sale: every buyer gets an answer, sold-out buyers are answered at the edge
//! without reaching the saga, and overload is a 503 with Retry-After, never a bare 5xx.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::TestApp;

/// One buyer: add a unit, then check out; the order id, or the 409 code that refused them.
async fn try_to_buy(app: &TestApp, user: &str) -> Result<String, String> {
    let token = app.token(user);
    let (status, body) = app
        .request(Method::POST, "/api/cart/items")
        .token(&token)
        .json(json!({"sku": "HOT", "qty": 1}))
        .send()
        .await;
    if status == StatusCode::CONFLICT {
        return Err(body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned());
    }
    assert_eq!(status, StatusCode::OK, "{body}");
    let cart = body["cartId"].as_str().expect("cart").to_owned();
    let (status, body) = app.checkout(&token, "k", &cart, "tok_visa").await;
    if status == StatusCode::CONFLICT {
        return Err(body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned());
    }
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    Ok(body["orderId"].as_str().expect("id").to_owned())
}

#[tokio::test]
async fn sold_out_buyers_are_answered_at_the_edge_without_reaching_the_saga() {
    let app = TestApp::spawn_with(|s| {
        s.payments.rate_limit_per_s = 100_000.0;
        // Long enough for the second wave; restocks and released holds clear it at once.
        s.edge.sold_out_ttl = Duration::from_secs(60);
    })
    .await;
    app.product("HOT", "5.00", 10).await;
    // Wave 1: twice as many buyers as units; all reach the saga, half are refused by it.
    let first: Vec<_> = futures::future::join_all((0..20).map(|i| {
        let app = &app;
        async move { (format!("a{i}"), try_to_buy(app, &format!("a{i}")).await) }
    }))
    .await;
    let mut confirmed = 0;
    for (user, outcome) in &first {
        let Ok(id) = outcome else { continue };
        let order = app.settled(&app.token(user), id).await;
        if order["status"] == "confirmed" {
            confirmed += 1;
        } else {
            assert_eq!(order["reason"], "out_of_stock", "{order}");
        }
    }
    assert_eq!(confirmed, 10, "exactly the stock was sold");
    let reached = app
        .count("SELECT count(*) FROM inventory.inbox WHERE consumer = 'reserve'")
        .await;
    // Wave 2: the edge has heard the SKU is gone: every buyer is answered 409 at once.
    let second = futures::future::join_all((0..100).map(|i| {
        let app = &app;
        async move { try_to_buy(app, &format!("b{i}")).await }
    }))
    .await;
    assert!(
        second
            .iter()
            .all(|o| o.as_ref().err().map(String::as_str) == Some("out_of_stock")),
        "{second:?}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.inbox WHERE consumer = 'reserve'")
            .await,
        reached,
        "no sold-out buyer of the second wave reached the reserve step"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM edge.carts WHERE user_id LIKE 'b%'")
            .await,
        0,
        "nor wrote anything"
    );
    assert_eq!(app.stock("HOT").await, (0, 0, 0));

    // A cancellation gives a unit back: the edges forget the SKU at once and it sells again.
    let (user, id) = first
        .iter()
        .find_map(|(u, o)| o.as_ref().ok().map(|id| (u.clone(), id.clone())))
        .expect("an order");
    let token = app.token(&user);
    if app.order(&token, &id).await.1["status"] == "confirmed" {
        assert_eq!(app.cancel(&token, &id).await.0, StatusCode::ACCEPTED);
    } else {
        app.set_stock("HOT", 1).await;
    }
    app.eventually("a unit on the shelf", || async {
        app.stock("HOT").await.2 == 1
    })
    .await;
    app.eventually("the last unit sold to a late buyer", || async {
        try_to_buy(&app, "late").await.is_ok()
    })
    .await;
    app.audit().await;
}

#[tokio::test]
async fn overload_is_a_503_with_retry_after_at_once_never_a_500() {
    let app = TestApp::spawn_with(|s| {
        s.edge.max_in_flight = 2;
        s.edge.admission_wait = Duration::from_millis(1);
    })
    .await;
    let token = app.token("alice");
    let answers = futures::future::join_all((0..60).map(|_| {
        let app = &app;
        let token = &token;
        async move {
            app.http
                .get(format!("{}/api/cart", app.base))
                .bearer_auth(token)
                .send()
                .await
                .expect("answer")
        }
    }))
    .await;
    let mut busy = 0;
    for answer in answers {
        match answer.status() {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                let after = answer
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                assert!(after.is_some_and(|s| (1..=30).contains(&s)), "{after:?}");
                let body: serde_json::Value = answer.json().await.expect("json");
                assert_eq!(body["error"]["code"], "overloaded");
                busy += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(busy > 0, "some requests were turned away");
    // Health and metrics are not behind admission control.
    let (status, _) = app.request(Method::GET, "/healthz").send().await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_request_that_finds_every_slot_taken_waits_in_line_and_is_served_when_one_frees() {
    let app = TestApp::spawn_with(|s| {
        s.edge.max_in_flight = 1;
        s.edge.admission_wait = Duration::from_secs(10);
    })
    .await;
    app.product("TEE", "10.00", 5).await;
    let alice = app.token("alice");
    let bob = app.token("bob");
    let cart = app.add(&alice, "TEE", 1).await;
    // Alice's checkout takes the edge's only slot and keeps it while it waits for her cart.
    let lock = app.lock_cart(&cart).await;
    let checkout = app.checkout(&alice, "k", &cart, "tok_visa");
    let bob_waits = async {
        app.until_waiting_for_a_lock("the checkout holding the only slot")
            .await;
        let look = app.request(Method::GET, "/api/cart").token(&bob).send();
        tokio::pin!(look);
        // A turned-away request would be answered (503) at once; this one waits in line...
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut look)
                .await
                .is_err(),
            "bob was answered while the only slot was taken"
        );
        // ...and is served once the slot frees.
        lock.commit().await.expect("release the cart");
        look.await
    };
    let ((status, body), (bob_status, bob_body)) = tokio::join!(checkout, bob_waits);
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(bob_status, StatusCode::OK, "{bob_body}");
}

/// Whether this edge refuses one unit of `sku` at add-to-cart (its sold-out memory).
async fn refused_at_the_edge(app: &TestApp, token: &str, sku: &str) -> bool {
    let (status, body) = app
        .request(Method::POST, "/api/cart/items")
        .token(token)
        .json(json!({"sku": sku, "qty": 1}))
        .send()
        .await;
    status == StatusCode::CONFLICT && body["error"]["code"] == "out_of_stock"
}

#[tokio::test]
async fn a_restock_is_sold_at_once_and_a_shortage_seen_before_it_cannot_undo_it() {
    let app = TestApp::spawn_with(|s| s.edge.sold_out_ttl = Duration::from_secs(60)).await;
    app.product("HOT", "5.00", 3).await;
    app.product("OTHER", "5.00", 0).await;
    let alice = app.token("alice");
    let cart = app.add(&alice, "HOT", 3).await;
    let (_, body) = app.checkout(&alice, "k", &cart, "tok_visa").await;
    let id = body["orderId"].as_str().expect("id");
    assert_eq!(app.settled(&alice, id).await["status"], "confirmed");
    let bob = app.token("bob");
    app.eventually("the edge to know HOT is sold out", || async {
        refused_at_the_edge(&app, &bob, "HOT").await
    })
    .await;

    // The restock answers, and the very next add-to-cart is served.
    app.set_stock("HOT", 10).await;
    let (status, body) = app
        .request(Method::POST, "/api/cart/items")
        .token(&bob)
        .json(json!({"sku": "HOT", "qty": 3}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A shortage the reserve step computed before the restock arrives after it (a slower
    // notice, another process): it is older than what the edge knows and changes nothing.
    let (version,): (i64,) =
        sqlx::query_as("SELECT version FROM inventory.stock WHERE sku = 'HOT'")
            .fetch_one(&app.pool)
            .await
            .expect("version");
    let client = async_nats::connect(app.nats.url()).await.expect("nats");
    let mut stale = async_nats::HeaderMap::new();
    stale.insert("Stock-Version", (version - 1).to_string().as_str());
    client
        .publish_with_headers("stock.short.HOT", stale, "0".into())
        .await
        .expect("stale notice");
    // Notices on one subscription arrive in order: once OTHER is refused, HOT's was read.
    client
        .publish("stock.short.OTHER", "0".into())
        .await
        .expect("marker notice");
    client.flush().await.expect("flushed");
    let carol = app.token("carol");
    app.eventually("the marker notice heard", || async {
        refused_at_the_edge(&app, &carol, "OTHER").await
    })
    .await;
    assert!(
        !refused_at_the_edge(&app, &carol, "HOT").await,
        "a shortage older than the restock marked HOT sold out again"
    );
}
