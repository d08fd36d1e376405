//! What a test does through the edge and looks at afterwards: one method per call on
//! `TestApp`, the request builder, and the saga's state read from JetStream and the database.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use super::app::{audit, TestApp};

impl TestApp {
    /// A buyer's bearer token.
    pub fn token(&self, user: &str) -> String {
        checkout::auth::mint(
            self.settings.auth.jwt_secret.expose(),
            user,
            false,
            Duration::from_secs(3600),
        )
        .expect("token")
    }

    /// An admin's bearer token.
    pub fn admin(&self) -> String {
        checkout::auth::mint(
            self.settings.auth.jwt_secret.expose(),
            "admin",
            true,
            Duration::from_secs(3600),
        )
        .expect("token")
    }

    /// Creates a USD product and stocks it.
    pub async fn product(&self, sku: &str, price: &str, on_hand: i64) {
        let admin = self.admin();
        let (status, body) = self
            .request(reqwest::Method::PUT, format!("/api/admin/products/{sku}"))
            .token(&admin)
            .json(json!({"name": sku, "price": price, "currency": "USD", "weightGrams": 100}))
            .send()
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        self.set_stock(sku, on_hand).await;
    }

    /// Sets a SKU's on-hand stock.
    pub async fn set_stock(&self, sku: &str, on_hand: i64) {
        let (status, body) = self
            .request(reqwest::Method::PUT, format!("/api/admin/stock/{sku}"))
            .token(&self.admin())
            .json(json!({"onHand": on_hand}))
            .send()
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// A SKU's stock as `(onHand, reserved, available)`.
    pub async fn stock(&self, sku: &str) -> (i64, i64, i64) {
        let (status, body) = self
            .request(reqwest::Method::GET, format!("/api/admin/stock/{sku}"))
            .token(&self.admin())
            .send()
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            body["onHand"].as_i64().expect("onHand"),
            body["reserved"].as_i64().expect("reserved"),
            body["available"].as_i64().expect("available"),
        )
    }

    /// Adds to the caller's cart and returns the cart id.
    pub async fn add(&self, token: &str, sku: &str, qty: i64) -> String {
        let (status, body) = self
            .request(reqwest::Method::POST, "/api/cart/items")
            .token(token)
            .json(json!({"sku": sku, "qty": qty}))
            .send()
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["cartId"].as_str().expect("cartId").to_owned()
    }

    /// Posts a checkout.
    pub async fn checkout(
        &self,
        token: &str,
        key: &str,
        cart_id: &str,
        card: &str,
    ) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, "/api/checkout")
            .token(token)
            .json(checkout_body(cart_id, card))
            .header("Idempotency-Key", key)
            .send()
            .await
    }

    /// Gets the caller's cart.
    pub async fn cart(&self, token: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, "/api/cart")
            .token(token)
            .send()
            .await
    }

    /// Gets an order.
    pub async fn order(&self, token: &str, order_id: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, format!("/api/orders/{order_id}"))
            .token(token)
            .send()
            .await
    }

    /// Polls an order until it leaves `pending`, with a deadline.
    pub async fn settled(&self, token: &str, order_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.order(token, order_id).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if body["status"] != "pending" {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "order {order_id} still pending: {body}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Polls until `check` holds, with a deadline.
    pub async fn eventually<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The PSP ledger entries of an order.
    pub async fn ledger(&self, order_id: &str) -> Vec<Value> {
        let body: Value = self
            .http
            .get(format!("{}/v1/ledger?reference={order_id}", self.psp))
            .send()
            .await
            .expect("ledger")
            .json()
            .await
            .expect("ledger json");
        body["entries"].as_array().cloned().unwrap_or_default()
    }

    /// How many ledger entries of a kind an order has.
    pub async fn ledger_count(&self, order_id: &str, kind: &str) -> usize {
        self.ledger(order_id)
            .await
            .iter()
            .filter(|e| e["kind"] == kind)
            .count()
    }

    /// A row count from the test's database.
    pub async fn count(&self, sql: &str) -> i64 {
        let (n,): (i64,) = sqlx::query_as(sql)
            .fetch_one(&self.pool)
            .await
            .expect("count query");
        n
    }

    /// A JetStream context on the test's server.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.nats.url()).await.expect("nats");
        async_nats::jetstream::new(client)
    }

    /// A transaction holding a cart's row lock, as a concurrent change of that cart would.
    pub async fn lock_cart(&self, cart_id: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = self.pool.begin().await.expect("begin");
        sqlx::query("SELECT 1 FROM edge.carts WHERE cart_id = $1::uuid FOR UPDATE")
            .bind(cart_id)
            .execute(&mut *tx)
            .await
            .expect("lock the cart");
        tx
    }

    /// Polls until one session of the test's database waits for a lock (`what` waits).
    pub async fn until_waiting_for_a_lock(&self, what: &str) {
        self.eventually(what, || async {
            self.count(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await
                == 1
        })
        .await;
    }

    /// Publishes the last message of `subject` again under another `Nats-Msg-Id`, as a replay
    /// with the `nats` CLI makes it; returns its stream sequence.
    pub async fn replay_last(&self, subject: &str) -> u64 {
        let js = self.jetstream().await;
        let stream = js.get_stream("CHECKOUT").await.expect("stream");
        let last = stream
            .get_last_raw_message_by_subject(subject)
            .await
            .expect("the message to replay");
        let mut headers = last.headers.clone();
        headers.insert("Nats-Msg-Id", format!("replay-{}", last.sequence).as_str());
        js.publish_with_headers(last.subject.to_string(), headers, last.payload.clone())
            .await
            .expect("publish")
            .await
            .expect("stored")
            .sequence
    }

    /// A consumer of the saga's stream, by durable name.
    pub async fn consumer(&self, durable: &str) -> async_nats::jetstream::consumer::PullConsumer {
        let js = self.jetstream().await;
        let stream = js.get_stream("CHECKOUT").await.expect("stream");
        stream.get_consumer(durable).await.expect("consumer")
    }

    /// Deliveries a consumer has made so far, redeliveries included (each takes a consumer
    /// sequence number).
    pub async fn deliveries(&self, durable: &str) -> u64 {
        let mut consumer = self.consumer(durable).await;
        consumer
            .info()
            .await
            .expect("info")
            .delivered
            .consumer_sequence
    }

    /// Polls until `durable` has acked the stream's message `seq`.
    pub async fn until_acked(&self, durable: &str, seq: u64) {
        let consumer = self.consumer(durable).await;
        self.eventually(&format!("{durable} acking message {seq}"), || {
            let mut c = consumer.clone();
            async move {
                c.info()
                    .await
                    .is_ok_and(|i| i.ack_floor.stream_sequence >= seq)
            }
        })
        .await;
    }
}

/// A request to the edge being built (see `TestApp::request`).
pub struct Request<'a> {
    app: &'a TestApp,
    method: reqwest::Method,
    path: String,
    token: Option<String>,
    body: Option<Value>,
    headers: Vec<(String, String)>,
}

impl Request<'_> {
    /// As this bearer token.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// With this JSON body.
    pub fn json(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    /// With this header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sends it; the status and the JSON body (Null when not JSON).
    pub async fn send(self) -> (StatusCode, Value) {
        let app = self.app;
        let mut req = app
            .http
            .request(self.method, format!("{}{}", app.base, self.path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = &self.body {
            req = req.json(b);
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// A valid checkout body.
pub fn checkout_body(cart_id: &str, card: &str) -> Value {
    json!({
        "cartId": cart_id,
        "paymentMethod": {"token": card},
        "address": {"name": "Ada Lovelace", "line1": "1 Analytical St", "city": "London",
                    "postalCode": "N1 9GU", "country": "GB"}
    })
}

impl TestApp {
    /// Asks to ship an order (admin).
    pub async fn ship(&self, order_id: &str) -> (StatusCode, Value) {
        let path = format!("/api/orders/{order_id}/ship");
        self.request(reqwest::Method::POST, path)
            .token(&self.admin())
            .send()
            .await
    }

    /// Asks to refund a shipped order (admin).
    pub async fn refund(&self, order_id: &str) -> (StatusCode, Value) {
        let path = format!("/api/orders/{order_id}/refund");
        self.request(reqwest::Method::POST, path)
            .token(&self.admin())
            .send()
            .await
    }

    /// Applies a promotion code to the caller's cart.
    pub async fn apply_promo(&self, token: &str, code: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, "/api/cart/promo")
            .token(token)
            .json(json!({"code": code}))
            .send()
            .await
    }

    /// Removes the promotion from the caller's cart.
    pub async fn remove_promo(&self, token: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::DELETE, "/api/cart/promo")
            .token(token)
            .send()
            .await
    }

    /// Prices the caller's cart for shipping to `address`.
    pub async fn quote(&self, token: &str, address: Value) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, "/api/cart/quote")
            .token(token)
            .json(json!({ "address": address }))
            .send()
            .await
    }

    /// Starts a request to the edge: `app.request(Method::PUT, path).token(t).json(b).send()`.
    pub fn request(&self, method: reqwest::Method, path: impl Into<String>) -> Request<'_> {
        Request {
            app: self,
            method,
            path: path.into(),
            token: None,
            body: None,
            headers: Vec::new(),
        }
    }

    /// Asks to cancel an order, as `token`.
    pub async fn cancel(&self, token: &str, order_id: &str) -> (StatusCode, Value) {
        let path = format!("/api/orders/{order_id}/cancel");
        self.request(reqwest::Method::POST, path)
            .token(token)
            .send()
            .await
    }

    /// Makes the sandbox PSP misbehave (see `lib/psp.rs`).
    pub async fn psp_fault(&self, fault: Value) {
        let resp = self
            .http
            .post(format!("{}/v1/sandbox/faults", self.psp))
            .json(&fault)
            .send()
            .await
            .expect("fault set");
        assert!(resp.status().is_success(), "{}", resp.status());
    }

    /// Puts one unit of `sku` in a new buyer's cart and checks out; the order id.
    pub async fn buy(&self, user: &str, sku: &str, card: &str) -> (String, String) {
        let token = self.token(user);
        let cart = self.add(&token, sku, 1).await;
        let (status, body) = self.checkout(&token, "k", &cart, card).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        (token, body["orderId"].as_str().expect("id").to_owned())
    }

    /// Publishes a saga event as its producer would (subject, message id, headers).
    pub async fn bus_publish(
        &self,
        js: &async_nats::jetstream::Context,
        out: &checkout::saga::Outgoing,
    ) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Checkout-Event", out.kind.as_str());
        headers.insert("Checkout-Order-Id", out.order_id.to_string().as_str());
        headers.insert("Checkout-Schema", "2");
        headers.insert("Nats-Msg-Id", out.msg_id.as_str());
        js.publish_with_headers(out.subject.clone(), headers, out.payload.clone().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    /// Messages in the dead-letter stream.
    pub async fn dead_letters(&self) -> u64 {
        let js = self.jetstream().await;
        let mut stream = js
            .get_stream("DEADLETTER")
            .await
            .expect("dead-letter stream");
        stream.info().await.expect("info").state.messages
    }

    /// Runs `checkout audit`'s checks and fails the test on any finding.
    pub async fn audit(&self) {
        audit(&self.pool, &self.psp, &self.settings).await;
    }
}
