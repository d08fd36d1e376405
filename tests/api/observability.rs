//! Observability: every metric family moves by exactly what happened, once per order, even
//! when handlers are redelivered; read from a real process's `/metrics`.

use std::collections::HashMap;
use std::time::Duration;

use crate::helpers::{eventually, harness_with, TestApp};

/// `/metrics` as `series -> value` (the series is everything before the value).
async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let text = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    // Kept for CI's `promtool check metrics`.
    let _ = std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/metrics-sample.prom"),
        &text,
    );
    text.lines()
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
    format!(r#"checkout_payment_operations_total{{operation="{operation}",result="{result}"}}"#)
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
    // Gauges are read from JetStream and the database every 200 ms (in this test).
    eventually("the gauges", Duration::from_secs(10), || async {
        let now = scrape(&app).await;
        now.get("checkout_payment_breaker_state") == Some(&0.0)
            && now.get("checkout_deadletter_messages") == Some(&0.0)
            && now.get(r#"checkout_consumer_pending_messages{consumer="reserve"}"#) == Some(&0.0)
            && now.get(r#"checkout_consumer_pending_messages{consumer="compensate"}"#) == Some(&0.0)
            && now.get("checkout_outbox_unpublished") == Some(&0.0)
    })
    .await;
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
            [
                "reserve",
                "authorize",
                "inventory-commit",
                "order",
                "compensate",
            ]
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
