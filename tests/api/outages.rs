//! Outages and crashes of whole processes under load: SIGKILL and restart, SIGTERM, and a
//! PostgreSQL outage longer than any retry budget. Every accepted order ends, nothing is
//! charged or taken from stock twice, and the audit finds nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checkout::app::Role;
use tokio_util::sync::CancellationToken;

use crate::helpers::{eventually, harness, wait_ready, PgServer, TestApp, TestDb};

/// Buyers that keep checking out one unit each until stopped, through whatever happens.
struct Load {
    accepted: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<usize>>,
    stop: CancellationToken,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(app: &TestApp, workers: usize, cards: &'static [&'static str]) -> Self {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        let stop = CancellationToken::new();
        let handles = (0..workers)
            .map(|w| {
                let (accepted, refused, stop) = (accepted.clone(), refused.clone(), stop.clone());
                let base = app.base.clone();
                let secret = app.settings.auth.jwt_secret.expose().to_owned();
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("client");
                tokio::spawn(async move {
                    let mut n = 0usize;
                    while !stop.is_cancelled() {
                        n += 1;
                        let user = format!("w{w}-{n}");
                        // Offset per worker: the mix is even at every moment, not in lockstep.
                        let card = cards[(n + w) % cards.len()];
                        if let Some(id) = buy_once(&http, &base, &secret, &user, card).await {
                            accepted.lock().expect("lock").push(id)
                        } else {
                            *refused.lock().expect("lock") += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                })
            })
            .collect();
        Self {
            accepted,
            refused,
            stop,
            workers: handles,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.lock().expect("lock").len()
    }

    /// Stops the buyers; the ids of the checkouts that were accepted (202).
    async fn finish(self) -> (Vec<String>, usize) {
        self.stop.cancel();
        for w in self.workers {
            let _ = w.await;
        }
        let refused = *self.refused.lock().expect("lock");
        let accepted = self.accepted.lock().expect("lock").clone();
        (accepted, refused)
    }
}

/// Adds one unit to a cart and checks out; the order id if the checkout was accepted.
async fn buy_once(
    http: &reqwest::Client,
    base: &str,
    secret: &str,
    user: &str,
    card: &str,
) -> Option<String> {
    let token = checkout::auth::mint(secret, user, false, Duration::from_secs(3600)).ok()?;
    let added: serde_json::Value = http
        .post(format!("{base}/api/cart/items"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"sku": "TEE", "qty": 1}))
        .send()
        .await
        .ok()
        .filter(|r| r.status().is_success())?
        .json()
        .await
        .ok()?;
    let cart = added["cartId"].as_str()?;
    let reply = http
        .post(format!("{base}/api/checkout"))
        .bearer_auth(&token)
        .header("Idempotency-Key", "k")
        .json(&crate::helpers::checkout_body(cart, card))
        .send()
        .await
        .ok()?;
    assert!(
        reply.status() == 202 || reply.status() == 503,
        "a checkout is accepted or refused as unavailable, never {}",
        reply.status()
    );
    if reply.status() != 202 {
        return None;
    }
    let body: serde_json::Value = reply.json().await.ok()?;
    body["orderId"].as_str().map(str::to_owned)
}

/// Every checkout in the database has its order, each order at most one authorization at
/// the provider, stock matches its ledger, and nothing is dead-lettered.
async fn assert_every_order_ended(app: &TestApp, within: Duration) -> Duration {
    let started = Instant::now();
    eventually(
        "every accepted checkout to have an order",
        within,
        || async {
            app.count(
                "SELECT count(*) FROM edge.checkouts c
             WHERE NOT EXISTS (SELECT 1 FROM orders.orders o WHERE o.order_id = c.order_id)",
            )
            .await
                == 0
        },
    )
    .await;
    let drained = started.elapsed();
    assert_eq!(app.dead_letters().await, 0, "nothing dead-lettered");
    app.audit().await;
    drained
}

#[tokio::test]
async fn sigkill_under_load_then_restart_ends_every_order_within_ack_wait() {
    let (app, mut process) = harness().await;
    app.product("TEE", "5.00", 100_000).await;
    // Flaky cards fail twice per order: the backlog after the crash is full of retries.
    let load = Load::start(
        &app,
        12,
        &["tok_visa", "tok_visa", "tok_flaky", "tok_declined"],
    );
    eventually("a backlog in flight", Duration::from_secs(30), || async {
        load.accepted() >= 150
    })
    .await;
    process.kill();
    let (accepted, _) = load.finish().await;
    process.restart();
    wait_ready(&app.http, &app.base).await;
    // Redelivery of what the dead process held waits ack_wait (3 s in tests); then the
    // backlog drains in seconds, not minutes.
    let drained = assert_every_order_ended(&app, Duration::from_secs(30)).await;
    eprintln!(
        "{} checkouts accepted before the SIGKILL; every order ended {drained:?} after the restart",
        accepted.len()
    );
    assert!(
        drained < app.settings.nats.ack_wait + Duration::from_secs(5),
        "drained in {drained:?}"
    );
    for id in accepted.iter().take(40) {
        assert!(app.ledger_count(id, "authorization").await <= 1, "{id}");
    }
    let (confirmed,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM orders.orders WHERE status = 'confirmed'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert!(confirmed > 0);
}

#[tokio::test]
async fn sigterm_stops_within_seconds_and_what_was_in_flight_ends_after_restart() {
    let (app, mut process) = harness().await;
    app.product("TEE", "5.00", 100_000).await;
    let load = Load::start(&app, 8, &["tok_visa", "tok_slow", "tok_flaky"]);
    eventually("work in flight", Duration::from_secs(30), || async {
        load.accepted() >= 40
    })
    .await;
    let stopped = process.terminate(Duration::from_secs(15)).await;
    let (accepted, _) = load.finish().await;
    let (took, status) = stopped.expect("the process exits after SIGTERM");
    assert!(status.success(), "clean exit: {status}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(!accepted.is_empty());
    process.restart();
    wait_ready(&app.http, &app.base).await;
    // Handed back (nak) or finished: nothing waits for ack_wait, nothing is lost.
    assert_every_order_ended(&app, Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_database_outage_longer_than_any_retry_budget_strands_nothing() {
    let pg = PgServer::start();
    let app = TestApp::spawn_on(TestDb::on(&pg.url()), &Role::ALL, |s| {
        s.payments.rate_limit_per_s = 100_000.0;
    })
    .await;
    app.product("TEE", "5.00", 100_000).await;
    let load = Load::start(&app, 8, &["tok_visa", "tok_declined"]);
    eventually("work in flight", Duration::from_secs(30), || async {
        load.accepted() >= 60
    })
    .await;
    pg.stop();
    // Longer than the old budget (ten deliveries) and than ack_wait: every step keeps
    // failing and retrying, and the edge answers 503.
    tokio::time::sleep(Duration::from_secs(8)).await;
    pg.up();
    let before = load.accepted();
    eventually(
        "checkouts accepted again",
        Duration::from_secs(30),
        || async { load.accepted() >= before + 10 },
    )
    .await;
    let (accepted, refused) = load.finish().await;
    assert!(
        refused > 0,
        "the edge refused checkouts while the database was down"
    );
    assert!(accepted.len() >= 60);
    assert_every_order_ended(&app, Duration::from_secs(40)).await;
    // The stall an accepted order saw: acceptance (before or after the outage) to its end.
    let (stall_ms,): (f64,) = sqlx::query_as(
        "SELECT coalesce(max(extract(epoch FROM o.created_at - c.created_at) * 1000), 0)::float8
         FROM orders.orders o JOIN edge.checkouts c USING (order_id)",
    )
    .fetch_one(&app.pool)
    .await
    .expect("stall");
    eprintln!(
        "PostgreSQL down 8 s under load: {} accepted, {refused} refused with 503, longest \
         acceptance-to-end {:.1} s",
        accepted.len(),
        stall_ms / 1000.0
    );
    // The outage plus the steps' capped backoff (nak_max_delay) and a pool reconnect.
    assert!(stall_ms < 20_000.0, "{stall_ms} ms");
}

#[tokio::test]
async fn sigterm_stops_within_seconds_while_nats_is_down() {
    let (mut app, mut process) = harness().await;
    app.product("TEE", "5.00", 10).await;
    app.nats.kill();
    let stopped = process.terminate(Duration::from_secs(30)).await;
    let (took, _) = stopped.expect("the process exits after SIGTERM with NATS down");
    // Draining is bounded by consumer.drain_timeout; nothing may wait for NATS to return.
    assert!(
        took < app.settings.consumer.drain_timeout + Duration::from_secs(5),
        "took {took:?}"
    );
}

#[tokio::test]
async fn admin_changes_are_answered_while_nats_is_down() {
    let (mut app, _process) = harness().await;
    app.product("TEE", "5.00", 10).await;
    app.nats.kill();
    let admin = app.admin();
    // Each change commits, then announces itself to the other edges over NATS; the notice
    // may be lost, the answer may not wait for NATS to return.
    let changes = [
        (
            "/api/admin/products/TEE",
            serde_json::json!({"name": "Tee", "price": "6.00", "currency": "USD", "weightGrams": 100}),
            "/price",
            "6.00",
        ),
        (
            "/api/admin/tax-rates/DE",
            serde_json::json!({"rates": {"standard": "0.20", "reduced": "0.10"}}),
            "/rates/standard",
            "0.20",
        ),
    ];
    for (path, body, field, stored) in changes {
        let started = Instant::now();
        let sent = app
            .request(reqwest::Method::PUT, path)
            .token(&admin)
            .json(body)
            .send();
        let (status, body) = tokio::time::timeout(Duration::from_secs(20), sent)
            .await
            .unwrap_or_else(|_| panic!("{path} still unanswered after 20 s with NATS down"));
        assert_eq!(status, reqwest::StatusCode::OK, "{path}: {body}");
        assert_eq!(
            body.pointer(field),
            Some(&serde_json::json!(stored)),
            "{path}: {body}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{path} took {:?}",
            started.elapsed()
        );
    }
}

/// A statement the database cancels (SQLSTATE 57014: a `statement_timeout`, an operator's
/// `pg_cancel_backend`, a shutdown) is transient: the buyer gets `503` and `Retry-After`,
/// also when the product was read through the edge's catalog cache, which shares one error
/// between every buyer waiting on the same read.
#[tokio::test]
async fn a_cancelled_catalog_read_is_a_503_not_a_500() {
    let app = TestApp::spawn().await;
    app.product("TEE", "5.00", 10).await;
    let alice = app.token("alice");
    let mut lock = app.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE catalog.products IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock the catalog");
    let add = {
        let (http, base) = (app.http.clone(), app.base.clone());
        tokio::spawn(async move {
            http.post(format!("{base}/api/cart/items"))
                .bearer_auth(alice)
                .json(&serde_json::json!({"sku": "TEE", "qty": 1}))
                .send()
                .await
                .expect("an answer")
        })
    };
    app.until_waiting_for_a_lock("the catalog read").await;
    sqlx::query(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .execute(&app.pool)
    .await
    .expect("cancel the read");
    let answer = add.await.expect("the request ends");
    assert_eq!(answer.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.headers().contains_key("retry-after"));
    let body: serde_json::Value = answer.json().await.expect("json");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    lock.rollback().await.expect("unlock");
    // Nothing of the failure is remembered: the next read serves the buyer.
    let alice = app.token("alice");
    app.add(&alice, "TEE", 1).await;
}

/// The committed outbox row is the promise: with NATS away, a checkout is answered `202` as
/// soon as it commits, without holding an admission slot while a publish times out, and the
/// saga runs it once NATS is back.
#[tokio::test]
async fn checkouts_are_answered_at_once_while_nats_is_down_and_confirm_when_it_returns() {
    const BUYERS: usize = 500;
    let mut app = TestApp::spawn_with(|s| {
        // As in production: a publish waits up to 5 s for a PublishAck that cannot come.
        s.nats.publish_timeout = Duration::from_secs(5);
        s.payments.rate_limit_per_s = 100_000.0;
    })
    .await;
    app.product("TEE", "5.00", BUYERS as i64).await;
    let mut carts = Vec::new();
    for n in 0..BUYERS {
        let token = app.token(&format!("buyer-{n}"));
        let cart = app.add(&token, "TEE", 1).await;
        carts.push((token, cart));
    }
    app.nats.kill();
    let answers = futures::future::join_all(carts.iter().map(|(token, cart)| {
        let app = &app;
        async move {
            let started = Instant::now();
            let (status, body) = app.checkout(token, "k", cart, "tok_visa").await;
            (status, body, started.elapsed())
        }
    }))
    .await;
    let mut took: Vec<Duration> = answers.iter().map(|(_, _, t)| *t).collect();
    took.sort();
    let p99 = took[BUYERS * 99 / 100 - 1];
    eprintln!(
        "{BUYERS} checkouts with NATS down: p50 {:?}, p99 {p99:?}, max {:?}",
        took[BUYERS / 2],
        took[BUYERS - 1]
    );
    for (status, body, _) in &answers {
        assert_eq!(*status, reqwest::StatusCode::ACCEPTED, "{body}");
    }
    // No answer waited for a publish to time out (5 s).
    assert!(
        took[BUYERS - 1] < Duration::from_secs(5),
        "slowest {:?}",
        took[BUYERS - 1]
    );

    app.nats.restart();
    for ((token, _), (_, body, _)) in carts.iter().zip(&answers) {
        let id = body["orderId"].as_str().expect("id");
        let order = app.settled(token, id).await;
        assert_eq!(order["status"], "confirmed", "{order}");
    }
    assert_eq!(app.stock("TEE").await, (0, 0, 0));
    app.audit().await;
}

/// A live order stream left open (`?follow=all` on a confirmed order waits for a shipment
/// that may come next week) must not keep the edge from stopping: SIGTERM ends it with a
/// `reconnect` event, and the process exits.
#[tokio::test]
async fn sigterm_ends_open_live_streams_and_the_edge_stops() {
    let (app, mut process) = harness().await;
    app.product("TEE", "5.00", 10).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    let mut live = app
        .http
        .get(format!("{}/api/orders/{id}/events?follow=all", app.base))
        .bearer_auth(&token)
        .header("Accept", "text/event-stream")
        .send()
        .await
        .expect("stream");
    assert_eq!(live.status(), reqwest::StatusCode::OK);
    let mut seen = String::new();
    while !seen.contains("event: confirmed") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), live.chunk())
            .await
            .expect("the story so far")
            .expect("chunk")
            .expect("open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let stopped = process.terminate(Duration::from_secs(15)).await;
    let (took, status) = stopped.expect("the edge exits within 15 s with a live stream open");
    assert!(status.success(), "{status:?} after {took:?}");
    // The stream said why it ended before it closed.
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_secs(5), live.chunk()).await
    {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: reconnect"), "{seen}");
    assert!(seen.contains("retry: 1000"), "{seen}");
}
