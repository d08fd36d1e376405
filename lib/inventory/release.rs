//! Releasing an order's held units back to available stock (compensation).

use sqlx::PgPool;
use uuid::Uuid;

/// Releases every held reservation of an order. Idempotent: only `held` rows move, so a
/// second call releases nothing. Returns how many units were released.
pub async fn release_for_order(pool: &PgPool, order_id: Uuid) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut held: Vec<(String, i32)> = sqlx::query_as(
        "UPDATE inventory.inventory_reservations SET status = 'released', updated_at = now()
         WHERE order_id = $1 AND status = 'held' RETURNING sku, qty",
    )
    .bind(order_id)
    .fetch_all(&mut *tx)
    .await?;
    held.sort();
    let mut units = 0i64;
    for (sku, qty) in &held {
        sqlx::query(
            "UPDATE inventory.stock SET reserved = reserved - $2, updated_at = now() WHERE sku = $1",
        )
        .bind(sku)
        .bind(qty)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
             VALUES ($1, 'release', $2, 0, -$3)",
        )
        .bind(sku)
        .bind(order_id)
        .bind(qty)
        .execute(&mut *tx)
        .await?;
        units += i64::from(*qty);
    }
    tx.commit().await?;
    Ok(units)
}

/// Returns a cancelled order's committed units to stock (`on_hand += qty`). Idempotent: only
/// `committed` rows move, to `released`.
pub async fn restock_for_order(pool: &PgPool, order_id: Uuid) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut committed: Vec<(String, i32)> = sqlx::query_as(
        "UPDATE inventory.inventory_reservations SET status = 'released', updated_at = now()
         WHERE order_id = $1 AND status = 'committed' RETURNING sku, qty",
    )
    .bind(order_id)
    .fetch_all(&mut *tx)
    .await?;
    committed.sort();
    let mut units = 0i64;
    for (sku, qty) in &committed {
        sqlx::query(
            "UPDATE inventory.stock SET on_hand = on_hand + $2, updated_at = now() WHERE sku = $1",
        )
        .bind(sku)
        .bind(qty)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
             VALUES ($1, 'release', $2, $3, 0)",
        )
        .bind(sku)
        .bind(order_id)
        .bind(qty)
        .execute(&mut *tx)
        .await?;
        units += i64::from(*qty);
    }
    tx.commit().await?;
    Ok(units)
}
