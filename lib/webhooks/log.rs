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
        // up in the endpoint's deliveries. A message past the cursor of an
        // enabled endpoint that asked for its type has no row yet: it is pending, never tried.
        "SELECT m.webhook_id, m.event_type, m.order_id, coalesce(d.status, 'pending') AS status,
                coalesce(d.attempts, 0) AS attempts, d.last_status, d.last_error,
                d.last_latency_ms,
                coalesce(greatest(d.next_attempt_at, d.leased_until), m.created_at)
                    AS next_attempt_at,
                coalesce(d.created_at, m.created_at) AS created_at, d.delivered_at
         FROM webhooks.endpoints e
         JOIN webhooks.messages m ON true
         LEFT JOIN webhooks.deliveries d
                ON d.endpoint_id = e.endpoint_id AND d.webhook_id = m.webhook_id
         WHERE e.endpoint_id = $1
           AND (d.webhook_id IS NOT NULL
                OR (e.status = 'enabled' AND m.event_type = ANY(e.events)
                    AND (m.tx, m.webhook_id) > (e.cursor_tx, e.cursor_id)))
         ORDER BY m.tx DESC, m.webhook_id DESC LIMIT $2",
    )
    .bind(endpoint_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let ids: Vec<&str> = deliveries.iter().map(|d| d.webhook_id.as_str()).collect();
    // Failed attempts have rows; a delivered message's last attempt is its delivery row.
    let attempts: Vec<AttemptRecord> = sqlx::query_as(
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
    Ok(done.rows_affected() + missed.rows_affected())
}
