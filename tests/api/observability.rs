//! Observability: every metric family moves by exactly what happened, once per order, even
//! when handlers are redelivered; read from a real process's `/metrics`.

use std::collections::HashMap;
use std::time::Duration;

use crate::helpers::{eventually, harness, harness_with, TestApp};

/// The `/metrics` exposition.
async fn exposition(app: &TestApp) -> String {
    app.http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// `/metrics` as `series -> value` (the series is everything before the value).
async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    exposition(app)
        .await
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

const CONFIRMED: &str = r#"checkout_orders_total{outcome="confirmed",reason=""}"#;

fn failed(reason: &str) -> String {
    format!(r#"checkout_orders_total{{outcome="failed",reason="{reason}"}}"#)
}

fn payment(operation: &str, result: &str) -> String {
    format!(
        r#"checkout_payment_operations_total{{operation="{operation}",result="{result}",provider="sandbox"}}"#
    )
}

#[tokio::test]
async fn each_family_moves_by_exactly_what_happened() {
    let (app, _process) = harness_with(&[]).await;
    app.product("TEE", "10.00", 10).await;
    app.product("RARE", "10.00", 0).await;
    let before = scrape(&app).await;
    let mut orders = Vec::new();
    for (user, sku, card) in [
        ("a", "TEE", "tok_visa"),
        ("b", "TEE", "tok_visa"),
        ("c", "TEE", "tok_declined"),
        ("d", "TEE", "tok_fraud"),
        ("e", "RARE", "tok_visa"),
    ] {
        let token = app.token(user);
        let cart = app.add(&token, sku, 1).await;
        let (_, body) = app.checkout(&token, "k", &cart, card).await;
        orders.push((token, body["orderId"].as_str().expect("id").to_owned()));
    }
    for (token, id) in &orders {
        app.settled(token, id).await;
    }
    // The fraud void and the backlog gauges land a moment after the orders settle.
    eventually(
        "the fraud void counted",
        Duration::from_secs(10),
        || async { delta(&before, &scrape(&app).await, &payment("void", "succeeded")) == 1.0 },
    )
    .await;
    let after = scrape(&app).await;
    let d = |series: &str| delta(&before, &after, series);
    assert_eq!(d(CONFIRMED), 2.0);
    assert_eq!(d(&failed("payment_declined")), 1.0);
    assert_eq!(d(&failed("fraud_suspected")), 1.0);
    assert_eq!(d(&failed("out_of_stock")), 1.0);
    assert_eq!(d(&payment("authorize", "succeeded")), 3.0);
    assert_eq!(d(&payment("authorize", "declined")), 1.0);
    assert_eq!(d("checkout_fraud_flags_total"), 1.0);
    assert_eq!(d("checkout_stockouts_total"), 1.0);
    assert_eq!(
        d(r#"checkout_end_to_end_seconds_count{outcome="confirmed"}"#),
        2.0
    );
    assert_eq!(
        d(r#"checkout_end_to_end_seconds_count{outcome="failed"}"#),
        3.0
    );
    assert_eq!(
        d(r#"checkout_step_duration_seconds_count{step="reserve"}"#),
        5.0
    );
    assert_eq!(
        d(r#"checkout_http_requests_total{route="/api/checkout",method="POST",status="2xx"}"#),
        5.0
    );
    // Each cart was written by this edge just before its checkout: none had to be read.
    assert_eq!(
        d(r#"checkout_accepted_carts_total{cart="remembered"}"#),
        5.0
    );
    assert_eq!(d(r#"checkout_accepted_carts_total{cart="read"}"#), 0.0);
    // Gauges are read from JetStream and the database every 200 ms (in this test).
    eventually("the gauges", Duration::from_secs(10), || async {
        let now = scrape(&app).await;
        now.get("checkout_payment_breaker_state") == Some(&0.0)
            && now.get("checkout_deadletter_messages") == Some(&0.0)
            && now.get(r#"checkout_consumer_pending_messages{consumer="reserve"}"#) == Some(&0.0)
            && now.get(r#"checkout_consumer_pending_messages{consumer="compensate"}"#) == Some(&0.0)
            && now.get("checkout_outbox_unpublished") == Some(&0.0)
            && now.get("checkout_webhook_held_seconds") == Some(&0.0)
    })
    .await;
    // Kept for CI's `promtool check metrics` and the dashboard check: every family has moved
    // by now (only this test's process has seen them all).
    std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/metrics-sample.prom"),
        exposition(&app).await,
    )
    .expect("metrics sample saved");
}

#[tokio::test]
async fn redelivered_handlers_do_not_count_twice() {
    // Every handler dies once after publishing and before acking: each message is delivered
    // twice and the inbox replays the second time.
    let (app, _process) = harness_with(&[("CHECKOUT__CHAOS__REDELIVER", "after_publish")]).await;
    app.product("TEE", "10.00", 10).await;
    let before = scrape(&app).await;
    let mut orders = Vec::new();
    for (user, card) in [("a", "tok_visa"), ("b", "tok_visa"), ("c", "tok_declined")] {
        let token = app.token(user);
        let cart = app.add(&token, "TEE", 1).await;
        let (_, body) = app.checkout(&token, "k", &cart, card).await;
        orders.push((token, body["orderId"].as_str().expect("id").to_owned()));
    }
    for (token, id) in &orders {
        app.settled(token, id).await;
    }
    // The last redeliveries (of the terminal events' producers) finish after the status shows.
    eventually(
        "every message acknowledged",
        Duration::from_secs(15),
        || async {
            let after = scrape(&app).await;
            ["reserve", "authorize", "order", "compensate"]
                .iter()
                .all(|c| {
                    after.get(&format!(
                        r#"checkout_consumer_pending_messages{{consumer="{c}"}}"#
                    )) == Some(&0.0)
                })
        },
    )
    .await;
    let after = scrape(&app).await;
    assert_eq!(delta(&before, &after, CONFIRMED), 2.0);
    assert_eq!(delta(&before, &after, &failed("payment_declined")), 1.0);
    assert_eq!(
        delta(
            &before,
            &after,
            r#"checkout_end_to_end_seconds_count{outcome="confirmed"}"#
        ),
        2.0
    );
}

fn kinds(timeline: &serde_json::Value) -> Vec<String> {
    timeline["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_timeline_tells_each_orders_story_to_its_owner() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let (alice, paid) = app.buy("alice", "TEE", "tok_visa").await;
    let (bob, declined) = app.buy("bob", "TEE", "tok_declined").await;
    let order = app.settled(&alice, &paid).await;
    app.settled(&bob, &declined).await;
    let timeline = |token: String, id: String| {
        let app = &app;
        async move {
            app.request(reqwest::Method::GET, format!("/api/orders/{id}/events"))
                .token(&token)
                .send()
                .await
        }
    };
    let (status, story) = timeline(alice.clone(), paid.clone()).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{story}");
    assert_eq!(
        kinds(&story),
        ["requested", "reserved", "authorized", "confirmed"]
    );
    // Any query is fine (a repeated `follow` was axum's plain-text 400).
    let (status, same) = app
        .request(
            reqwest::Method::GET,
            format!("/api/orders/{paid}/events?follow=all&follow=x"),
        )
        .token(&alice)
        .send()
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{same}");
    assert_eq!(kinds(&same), kinds(&story));
    let events = story["events"].as_array().expect("events");
    assert_eq!(events[0]["detail"]["total"], order["total"]);
    assert_eq!(events.last().expect("last")["stage"], "confirmed");
    let at: Vec<&str> = events.iter().filter_map(|e| e["at"].as_str()).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "oldest first: {at:?}");

    let (_, story) = timeline(bob.clone(), declined.clone()).await;
    assert_eq!(
        kinds(&story),
        ["requested", "reserved", "declined", "failed"]
    );
    assert_eq!(story["events"][2]["detail"]["declineCode"], "card_declined");
    assert_eq!(story["events"][3]["detail"]["reason"], "payment_declined");

    // Someone else's order does not exist for them; an admin sees it.
    let (status, _) = timeline(bob.clone(), paid.clone()).await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    let (status, _) = timeline(app.admin(), paid.clone()).await;
    assert_eq!(status, reqwest::StatusCode::OK);

    // Shipping adds to the story.
    app.ship(&paid).await;
    app.eventually("shipped in the timeline", || async {
        kinds(&timeline(alice.clone(), paid.clone()).await.1)
            .last()
            .map(String::as_str)
            == Some("shipped")
    })
    .await;
    let (_, story) = timeline(alice.clone(), paid.clone()).await;
    assert_eq!(
        &kinds(&story)[4..],
        ["ship_requested", "captured", "shipped"]
    );
}

#[tokio::test]
async fn the_live_stream_shows_each_step_as_it_happens() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    // The provider takes about a second: the stream must show the first steps before it answers.
    let (token, id) = app.buy("alice", "TEE", "tok_slow").await;
    let mut response = app
        .http
        .get(format!("{}/api/orders/{id}/events", app.base))
        .bearer_auth(&token)
        .header("Accept", "text/event-stream")
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let mut buffer = String::new();
    let mut seen: Vec<String> = Vec::new();
    let mut pending_when_reserved = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Some(chunk) = tokio::time::timeout_at(deadline.into(), response.chunk())
        .await
        .expect("the stream ends by itself")
        .expect("chunk")
    {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let Some(kind) = frame.lines().find_map(|l| l.strip_prefix("event: ")) else {
                continue; // a keep-alive comment
            };
            let data = frame
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("data");
            let event: serde_json::Value = serde_json::from_str(data).expect("json");
            assert_eq!(event["type"], kind);
            if kind == "reserved" {
                // Read as it arrives: the order is still waiting for the provider.
                pending_when_reserved = Some(app.order(&token, &id).await.1["status"].clone());
            }
            seen.push(kind.to_owned());
        }
    }
    assert_eq!(seen, ["requested", "reserved", "authorized", "confirmed"]);
    assert_eq!(pending_when_reserved, Some(serde_json::json!("pending")));
}

#[tokio::test]
async fn backlog_gauges_say_how_old_they_are_when_jetstream_cannot_be_read() {
    let (mut app, _process) = harness().await;
    let reserve = r#"checkout_consumer_pending_messages{consumer="reserve"}"#;
    let age = "checkout_jetstream_read_age_seconds";
    eventually(
        "fresh JetStream readings",
        Duration::from_secs(10),
        || async {
            let now = scrape(&app).await;
            now.contains_key(reserve) && now.get(age).is_some_and(|a| *a < 1.0)
        },
    )
    .await;
    app.nats.kill();
    // Readings every 200 ms in tests: the age grows past them, and the backlog is still
    // exported (its last reading) instead of dropping out.
    eventually(
        "the readings' age to grow",
        Duration::from_secs(20),
        || async {
            let now = scrape(&app).await;
            now.contains_key(reserve) && now.get(age).is_some_and(|a| *a > 3.0)
        },
    )
    .await;
    app.nats.restart();
    eventually("fresh readings again", Duration::from_secs(20), || async {
        scrape(&app).await.get(age).is_some_and(|a| *a < 1.0)
    })
    .await;
}

#[tokio::test]
async fn an_order_that_settles_before_compensation_takes_the_watchdogs_request_is_not_a_timeout() {
    let (app, _process) = harness_with(&[
        ("CHECKOUT__WATCHDOG__PENDING_LIMIT", "300ms"),
        ("CHECKOUT__PAYMENTS__ACTION_TIMEOUT", "200ms"),
        ("CHECKOUT__WATCHDOG__INTERVAL", "100ms"),
    ])
    .await;
    app.product("TEE", "10.00", 10).await;
    // Compensation paused: the watchdog's request waits in the stream while the order settles.
    let js = app.jetstream().await;
    let stream = js.get_stream("CHECKOUT").await.expect("stream");
    let until = async_nats::datetime::add_std_duration(
        async_nats::datetime::now(),
        Duration::from_secs(3600),
    )
    .expect("a time");
    stream
        .pause_consumer("compensate", until)
        .await
        .expect("compensation paused");
    let before = scrape(&app).await;
    // The provider takes about a second: the watchdog asks for compensation meanwhile.
    let (token, id) = app.buy("alice", "TEE", "tok_slow").await;
    let asked = format!("SELECT count(*) FROM orders.timeouts WHERE order_id = '{id}'");
    app.eventually("the watchdog's request", || async {
        app.count(&asked).await == 1
    })
    .await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    stream
        .resume_consumer("compensate")
        .await
        .expect("compensation resumed");
    let request = stream
        .get_last_raw_message_by_subject(&format!("checkout.timed_out.{id}"))
        .await
        .expect("the watchdog's request");
    app.until_acked("compensate", request.sequence).await;
    let after = scrape(&app).await;
    assert_eq!(
        delta(&before, &after, "checkout_watchdog_timeouts_total"),
        0.0
    );
    assert_eq!(delta(&before, &after, &failed("timed_out")), 0.0);
    assert_eq!(app.order(&token, &id).await.1["status"], "confirmed");
}

#[tokio::test]
async fn webhooks_held_back_by_an_open_transaction_show_how_long() {
    const HELD: &str = "checkout_webhook_held_seconds";
    let (app, _process) = harness_with(&[]).await;
    app.product("TEE", "10.00", 10).await;
    // Nobody listens there: the message is written all the same, which is all this needs.
    let url = format!("http://127.0.0.1:{}/hooks", crate::helpers::port());
    crate::merchant_webhooks::register(&app, &url, &["order.confirmed"]).await;
    // A transaction left open (it took an id) before the order: no cursor may read the
    // order's message until it ends.
    let mut open = app.pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .expect("an id taken");
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    assert_eq!(app.settled(&token, &id).await["status"], "confirmed");
    eventually(
        "the gauge to show the message held for a second",
        Duration::from_secs(20),
        || async { scrape(&app).await.get(HELD).is_some_and(|s| *s >= 1.0) },
    )
    .await;
    open.commit().await.expect("commit");
    eventually(
        "the gauge to fall back to zero",
        Duration::from_secs(20),
        || async { scrape(&app).await.get(HELD) == Some(&0.0) },
    )
    .await;
}
