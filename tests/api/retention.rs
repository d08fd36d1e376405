//! Storage stays bounded: what only served dedup, retries or debugging is pruned past its
//! retention, the stock ledger is folded into daily totals that still add up, and nothing
//! younger is touched.

use checkout::app::Role;
use checkout::retention::Pruner;

use crate::helpers::TestApp;

#[tokio::test]
async fn the_pruner_removes_only_expired_rows_and_the_stock_ledger_still_adds_up() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 50).await;
    let mut old = Vec::new();
    for user in ["old-1", "old-2", "old-3"] {
        let (token, order) = app.buy(user, "TEE", "tok_visa").await;
        app.settled(&token, &order).await;
        old.push(order);
    }
    // Make those three orders' bookkeeping 100 days old, as if a quarter had passed.
    for sql in [
        "UPDATE inventory.inbox SET handled_at = now() - interval '100 days'",
        "UPDATE payments.inbox SET handled_at = now() - interval '100 days'",
        "UPDATE orders.inbox SET handled_at = now() - interval '100 days'",
        "UPDATE inventory.stock_movements SET created_at = now() - interval '100 days'",
        "UPDATE edge.outbox SET created_at = now() - interval '100 days'
         WHERE published_at IS NOT NULL",
    ] {
        sqlx::query(sql)
            .execute(&app.pool)
            .await
            .expect("back-dated");
    }
    let (token, recent) = app.buy("recent", "TEE", "tok_visa").await;
    app.settled(&token, &recent).await;
    let young = recent_inbox_rows(&app).await;
    assert!(
        young.iter().all(|n| *n > 0),
        "the recent order has inbox rows: {young:?}"
    );

    let pruner = Pruner {
        pool: app.pool.clone(),
        settings: app.settings.retention.clone(),
    };
    let pass = pruner.pass().await.expect("a pass runs");
    assert!(pass.inbox > 0 && pass.stock_movements > 0, "{pass:?}");

    for schema in ["inventory", "payments", "orders"] {
        let left = app
            .count(&format!(
                "SELECT count(*) FROM {schema}.inbox WHERE handled_at < now() - interval '8 days'"
            ))
            .await;
        assert_eq!(left, 0, "{schema}.inbox keeps no row past retention");
    }
    let kept = recent_inbox_rows(&app).await;
    assert_eq!(kept, young, "rows inside retention are untouched");
    // The old movements are folded: 3 reserves and 3 commits of one unit each (one day),
    // the recent order's stay row by row.
    let (movements, on_hand_delta): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(movements), 0)::int8, coalesce(sum(on_hand_delta), 0)::int8
         FROM inventory.stock_movement_days WHERE sku = 'TEE' AND kind = 'commit'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("folded");
    assert_eq!((movements, on_hand_delta), (3, -3));
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM inventory.stock_movements WHERE order_id = '{recent}'"
        ))
        .await,
        2,
        "the recent order's reserve and commit are still there"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM edge.outbox WHERE created_at < now() - interval '2 days'")
            .await,
        0
    );
    // Orders are business records: all four stay, and stock still adds up to the ledger.
    assert_eq!(app.count("SELECT count(*) FROM orders.orders").await, 4);
    assert_eq!(app.stock("TEE").await, (46, 0, 46));
    app.audit().await;

    let second = pruner.pass().await.expect("a second pass runs");
    assert_eq!(second, Default::default(), "nothing left to prune");
}

/// Inbox rows younger than a day, per service.
async fn recent_inbox_rows(app: &TestApp) -> Vec<i64> {
    let mut counts = Vec::new();
    for schema in ["inventory", "payments", "orders"] {
        counts.push(
            app.count(&format!(
                "SELECT count(*) FROM {schema}.inbox WHERE handled_at > now() - interval '1 day'"
            ))
            .await,
        );
    }
    counts
}

#[tokio::test]
async fn webhook_deliveries_that_ended_are_pruned_and_pending_ones_kept() {
    // The edge alone: no compensate process's own pruner takes a share of the pass.
    let app = TestApp::spawn_roles(&[Role::Edge], |_| {}).await;
    let endpoint = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO webhooks.endpoints (endpoint_id, url, events, secret)
         VALUES ($1, 'https://shop.example/hooks', '{order.confirmed}', 'sealed')",
    )
    .bind(endpoint)
    .execute(&app.pool)
    .await
    .expect("endpoint");
    // Three messages from 40 days ago (delivered, given up, still pending: its endpoint was
    // down) and one from today.
    for (id, status, age) in [
        ("msg_old_delivered", "delivered", "40 days"),
        ("msg_old_failed", "failed", "40 days"),
        ("msg_old_pending", "pending", "40 days"),
        ("msg_recent", "delivered", "0 days"),
    ] {
        for sql in [
            "INSERT INTO webhooks.messages (webhook_id, event_type, order_id, body, created_at)
             VALUES ($2, 'order.confirmed', gen_random_uuid(), '{}', now() - $4::interval)",
            "INSERT INTO webhooks.deliveries (endpoint_id, webhook_id, status, created_at)
             VALUES ($1, $2, $3, now() - $4::interval)",
            "INSERT INTO webhooks.attempts (endpoint_id, webhook_id, attempt, latency_ms)
             SELECT $1, $2, 1, 5 WHERE $3 <> 'delivered'",
        ] {
            sqlx::query(sql)
                .bind(endpoint)
                .bind(id)
                .bind(status)
                .bind(age)
                .execute(&app.pool)
                .await
                .expect("webhook rows");
        }
    }
    // Two batches that delivered messages at their first attempt (no delivery rows): one
    // from 40 days ago, whose message goes with it, and one from today.
    for sql in [
        "INSERT INTO webhooks.messages (webhook_id, event_type, order_id, body, created_at)
         VALUES ('msg_old_batched', 'order.confirmed', gen_random_uuid(), '{}',
                 now() - interval '40 days')",
        "INSERT INTO webhooks.sent (endpoint_id, last_tx, last_id, at, ids, codes, latencies)
         VALUES ($1, pg_current_xact_id(), 'msg_old_batched', now() - interval '40 days',
                 '{msg_old_batched}', '{200}', '{5}'),
                ($1, pg_current_xact_id(), 'msg_recent_batched', now(),
                 '{msg_recent_batched}', '{200}', '{5}')",
    ] {
        sqlx::query(sql)
            .bind(endpoint)
            .execute(&app.pool)
            .await
            .expect("batch rows");
    }
    // The endpoint has read the log this far; one more old message after that, which it has
    // yet to be offered (it was paused): no delivery row refers to it, and it stays.
    for sql in [
        "UPDATE webhooks.endpoints SET cursor_tx = pg_snapshot_xmin(pg_current_snapshot())",
        "INSERT INTO webhooks.messages (webhook_id, event_type, order_id, body, created_at)
         VALUES ('msg_old_unread', 'order.confirmed', gen_random_uuid(), '{}',
                 now() - interval '40 days')",
    ] {
        sqlx::query(sql)
            .execute(&app.pool)
            .await
            .expect("cursor and message");
    }
    let pruner = Pruner {
        pool: app.pool.clone(),
        settings: app.settings.retention.clone(),
    };
    let pass = pruner.pass().await.expect("a pass runs");
    assert_eq!(pass.webhooks, 3, "two deliveries and a batch: {pass:?}");
    assert_eq!(
        app.count("SELECT count(*) FROM webhooks.sent WHERE last_id = 'msg_recent_batched'")
            .await,
        1
    );
    assert_eq!(app.count("SELECT count(*) FROM webhooks.sent").await, 1);
    let left: Vec<(String,)> =
        sqlx::query_as("SELECT webhook_id FROM webhooks.messages ORDER BY webhook_id")
            .fetch_all(&app.pool)
            .await
            .expect("messages");
    assert_eq!(
        left,
        [
            ("msg_old_pending".to_owned(),),
            ("msg_old_unread".to_owned(),),
            ("msg_recent".to_owned(),)
        ]
    );
    assert_eq!(
        app.count("SELECT count(*) FROM webhooks.deliveries").await,
        2
    );
    assert_eq!(
        app.count("SELECT count(*) FROM webhooks.attempts WHERE webhook_id <> 'msg_old_pending'")
            .await,
        0,
        "the pruned deliveries' attempts went with them"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM webhooks.attempts").await,
        1,
        "the pending delivery keeps its attempt"
    );
    let second = pruner.pass().await.expect("a second pass runs");
    assert_eq!(second.webhooks, 0);
}
