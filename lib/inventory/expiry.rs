//! Reservation expiry: a sweeper in every reserve process releases holds whose time is up.
//!
//! Why a sweeper over PostgreSQL rather than JetStream delayed redelivery or scheduled
//! messages: the reservation rows are the truth, so expiry is one transaction over them;
//! `FOR UPDATE SKIP LOCKED` lets any number of instances share the work without waiting on
//! each other; nothing is lost on restart (a hold that came due while every instance was
//! down is released at the next sweep); and there is no second copy of the deadline to keep
//! in step with the database.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Expires at most `batch` due holds; returns how many, and the SKUs whose units came back
/// with their stock row's version after.
pub async fn expire_due(
    pool: &PgPool,
    batch: i64,
) -> Result<(usize, Vec<(String, i64)>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut due: Vec<(String, i32, uuid::Uuid)> = sqlx::query_as(
        "WITH due AS (
             SELECT reservation_id FROM inventory.inventory_reservations
             WHERE status = 'held' AND expires_at <= now()
             ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
         UPDATE inventory.inventory_reservations r SET status = 'expired', updated_at = now()
         FROM due WHERE r.reservation_id = due.reservation_id
         RETURNING r.sku, r.qty, r.order_id",
    )
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    if due.is_empty() {
        tx.rollback().await?;
        return Ok((0, Vec::new()));
    }
    // Stock rows in SKU order, like every other writer, so sweeps and steps never deadlock.
    due.sort();
    let mut per_sku: Vec<(String, i32)> = Vec::new();
    for (sku, qty, _) in &due {
        match per_sku.last_mut() {
            Some((last, total)) if last == sku => *total += qty,
            _ => per_sku.push((sku.clone(), *qty)),
        }
    }
    let mut versions = Vec::with_capacity(per_sku.len());
    for (sku, qty) in &per_sku {
        let (version,): (i64,) = sqlx::query_as(
            "UPDATE inventory.stock SET reserved = reserved - $2, updated_at = now()
             WHERE sku = $1 RETURNING version",
        )
        .bind(sku)
        .bind(qty)
        .fetch_one(&mut *tx)
        .await?;
        versions.push((sku.clone(), version));
    }
    let skus: Vec<&str> = due.iter().map(|(s, _, _)| s.as_str()).collect();
    let qtys: Vec<i32> = due.iter().map(|(_, q, _)| -q).collect();
    let orders: Vec<uuid::Uuid> = due.iter().map(|(_, _, o)| *o).collect();
    sqlx::query(
        "INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
         SELECT sku, 'expire', order_id, 0, qty
         FROM unnest($1::text[], $2::int[], $3::uuid[]) AS m(sku, qty, order_id)",
    )
    .bind(&skus)
    .bind(&qtys)
    .bind(&orders)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(count = due.len(), "reservations expired");
    Ok((due.len(), versions))
}

/// Sweeps every `interval` until shutdown; a full batch sweeps again at once.
pub async fn run_sweeper(
    pool: PgPool,
    interval: Duration,
    batch: i64,
    notices: async_nats::Client,
    shutdown: CancellationToken,
) {
    loop {
        let swept = match expire_due(&pool, batch).await {
            Ok((holds, skus)) => {
                for (sku, version) in &skus {
                    super::soldout::announce_available(&notices, sku, *version);
                }
                holds
            }
            Err(e) => {
                tracing::warn!(error = %e, "expiry sweep failed");
                0
            }
        };
        if i64::try_from(swept).unwrap_or(i64::MAX) >= batch {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Extends the orders' holds to last at least `by` from now: a checkout waiting for the
/// buyer's payment challenge (3-D Secure) keeps its stock for as long as the challenge may
/// take, while every other checkout keeps the short `reservation_ttl`.
pub async fn extend_holds(
    conn: &mut sqlx::PgConnection,
    order_ids: &[uuid::Uuid],
    by: Duration,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE inventory.inventory_reservations
         SET expires_at = greatest(expires_at, now() + $2::interval), updated_at = now()
         WHERE order_id = ANY($1) AND status = 'held'",
    )
    .bind(order_ids)
    .bind(format!("{} milliseconds", by.as_millis()))
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
