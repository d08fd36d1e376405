//! The delivery log of an endpoint, and replay: sending again what the shop missed.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// One delivery as the log shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRecord {
    pub webhook_id: String,
    pub event_type: String,
    pub order_id: Uuid,
    pub status: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub last_latency_ms: Option<i32>,
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// Delivered at its first attempt in a batch (`webhooks.sent`): no delivery row, and its
    /// one attempt is what the batch recorded.
    pub in_batch: bool,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRecord {
    pub webhook_id: String,
    pub attempt: i32,
    pub at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub latency_ms: i32,
}

/// An endpoint's latest deliveries (newest first) and their attempts.
pub async fn deliveries(
    pool: &PgPool,
    endpoint_id: Uuid,
    limit: i64,
) -> Result<(Vec<DeliveryRecord>, Vec<AttemptRecord>), sqlx::Error> {
    let deliveries: Vec<DeliveryRecord> = sqlx::query_as(
        // Newest messages first (in the log's order, which the cursors read by), each looked
        // up in the endpoint's deliveries, and if it has none there, in the batch that moved
        // the cursor past it (the first at or after its place in the log). A message past
        // the cursor of an enabled endpoint that asked for its type is pending, never tried.
        "SELECT m.webhook_id, m.event_type, m.order_id,
                coalesce(d.status, CASE WHEN s.found THEN 'delivered' ELSE 'pending' END)
                    AS status,
                coalesce(d.attempts, CASE WHEN s.found THEN 1 ELSE 0 END) AS attempts,
                coalesce(d.last_status, s.code) AS last_status, d.last_error,
                coalesce(d.last_latency_ms, s.latency) AS last_latency_ms,
                coalesce(greatest(d.next_attempt_at, d.leased_until), s.at, m.created_at)
                    AS next_attempt_at,
                coalesce(d.created_at, s.at, m.created_at) AS created_at,
                coalesce(d.delivered_at, s.at) AS delivered_at,
                coalesce(s.found, false) AS in_batch
         FROM webhooks.endpoints e
         JOIN webhooks.messages m ON true
         LEFT JOIN webhooks.deliveries d
                ON d.endpoint_id = e.endpoint_id AND d.webhook_id = m.webhook_id
         LEFT JOIN LATERAL (
             SELECT true AS found, b.at, b.codes[b.i] AS code, b.latencies[b.i] AS latency
             FROM (SELECT s.at, s.codes, s.latencies, array_position(s.ids, m.webhook_id) AS i
                   FROM webhooks.sent s
                   WHERE d.webhook_id IS NULL AND s.endpoint_id = e.endpoint_id
                     AND (s.last_tx, s.last_id) >= (m.tx, m.webhook_id)
                   ORDER BY s.last_tx, s.last_id LIMIT 1) b
             WHERE b.i IS NOT NULL) s ON true
         WHERE e.endpoint_id = $1
           AND (d.webhook_id IS NOT NULL OR s.found
                OR (e.status = 'enabled' AND m.event_type = ANY(e.events)
                    AND (m.tx, m.webhook_id) > (e.cursor_tx, e.cursor_id)))
         ORDER BY m.tx DESC, m.webhook_id DESC LIMIT $2",
    )
    .bind(endpoint_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let ids: Vec<&str> = deliveries
        .iter()
        .filter(|d| !d.in_batch)
        .map(|d| d.webhook_id.as_str())
        .collect();
    // Failed attempts have rows; a delivered message's last attempt is its delivery row.
    let mut attempts: Vec<AttemptRecord> = sqlx::query_as(
        "SELECT webhook_id, attempt, at, status_code, error, latency_ms FROM (
             SELECT webhook_id, attempt, at, status_code, error, latency_ms
             FROM webhooks.attempts WHERE endpoint_id = $1 AND webhook_id = ANY($2)
             UNION ALL
             SELECT webhook_id, attempts, delivered_at, last_status, NULL,
                    coalesce(last_latency_ms, 0)
             FROM webhooks.deliveries
             WHERE endpoint_id = $1 AND webhook_id = ANY($2) AND status = 'delivered') a
         ORDER BY webhook_id, attempt",
    )
    .bind(endpoint_id)
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    // A batch's message was tried once, and that attempt is the batch's record of it.
    attempts.extend(
        deliveries
            .iter()
            .filter(|d| d.in_batch)
            .map(|d| AttemptRecord {
                webhook_id: d.webhook_id.clone(),
                attempt: 1,
                at: d.delivered_at.unwrap_or(d.created_at),
                status_code: d.last_status,
                error: None,
                latency_ms: d.last_latency_ms.unwrap_or(0),
            }),
    );
    Ok((deliveries, attempts))
}

/// Queues again every message the endpoint was sent (or tried) since `since`, and every one
/// of its types it never got since then (while it was disabled), with the same `webhook-id`s
/// and a fresh retry period; answers how many. Never one from before the endpoint existed.
pub async fn replay(
    pool: &PgPool,
    endpoint_id: Uuid,
    since: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // The successes being sent again leave their delivery row's record in the attempt log.
    sqlx::query(
        "INSERT INTO webhooks.attempts (endpoint_id, webhook_id, attempt, at, status_code,
                                        latency_ms)
         SELECT endpoint_id, webhook_id, attempts, delivered_at, last_status,
                coalesce(last_latency_ms, 0)
         FROM webhooks.deliveries
         WHERE endpoint_id = $1 AND status = 'delivered' AND webhook_id IN (
             SELECT webhook_id FROM webhooks.messages WHERE created_at >= $2)
         ON CONFLICT DO NOTHING",
    )
    .bind(endpoint_id)
    .bind(since)
    .execute(&mut *tx)
    .await?;
    let done = sqlx::query(
        "UPDATE webhooks.deliveries SET status = 'pending', next_attempt_at = now(),
             leased_until = NULL, queued_at = now(), delivered_at = NULL
         WHERE endpoint_id = $1 AND webhook_id IN (
             SELECT webhook_id FROM webhooks.messages WHERE created_at >= $2)",
    )
    .bind(endpoint_id)
    .bind(since)
    .execute(&mut *tx)
    .await?;
    // Those delivered in a batch at their first attempt get a delivery row, the batch's
    // record of that attempt kept in the attempt log. (A batch is recorded after its
    // messages were queued, so one that holds a message since `since` was recorded since.)
    let batched = sqlx::query(
        "WITH batched AS (
             SELECT s.endpoint_id, u.webhook_id, s.at, u.code, u.latency
             FROM webhooks.sent s
             CROSS JOIN LATERAL unnest(s.ids, s.codes, s.latencies)
                 AS u(webhook_id, code, latency)
             JOIN webhooks.messages m ON m.webhook_id = u.webhook_id AND m.created_at >= $2
             WHERE s.endpoint_id = $1 AND s.at >= $2),
         kept AS (
             INSERT INTO webhooks.attempts (endpoint_id, webhook_id, attempt, at, status_code,
                                            latency_ms)
             SELECT endpoint_id, webhook_id, 1, at, code, coalesce(latency, 0) FROM batched
             ON CONFLICT DO NOTHING)
         INSERT INTO webhooks.deliveries (endpoint_id, webhook_id, status, attempts,
                                          next_attempt_at, queued_at)
         SELECT endpoint_id, webhook_id, 'pending', 1, now(), now() FROM batched
         ON CONFLICT DO NOTHING",
    )
    .bind(endpoint_id)
    .bind(since)
    .execute(&mut *tx)
    .await?;
    // Behind its cursor without a row: passed over while it was disabled. (Past the cursor,
    // a message is on its way anyway.)
    let missed = sqlx::query(
        "INSERT INTO webhooks.deliveries (endpoint_id, webhook_id, status, attempts,
                                         next_attempt_at, queued_at)
         SELECT e.endpoint_id, m.webhook_id, 'pending', 0, now(), now()
         FROM webhooks.endpoints e
         JOIN webhooks.messages m
           ON m.created_at >= greatest($2, e.created_at) AND m.event_type = ANY(e.events)
          AND (m.tx, m.webhook_id) <= (e.cursor_tx, e.cursor_id)
         WHERE e.endpoint_id = $1 AND e.deleted_at IS NULL
         ON CONFLICT DO NOTHING",
    )
    .bind(endpoint_id)
    .bind(since)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected() + batched.rows_affected() + missed.rows_affected())
}
