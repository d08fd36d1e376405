//! Giving an order's units back: held units to available (a failed checkout), committed
//! units to on-hand stock (a cancelled order, or one refused after its stock was taken).

use sqlx::PgPool;
use uuid::Uuid;

/// Which units go back, and where.
#[derive(Clone, Copy)]
enum GiveBack {
    /// `held` -> `released`: `reserved -= qty`.
    Held,
    /// `committed` -> `released`: `on_hand += qty`.
    Committed,
}

/// Releases every held reservation of an order. Idempotent: only `held` rows move, so a
/// second call releases nothing. Returns how many units were released.
pub async fn release_for_order(pool: &PgPool, order_id: Uuid) -> Result<i64, sqlx::Error> {
    give_back(pool, order_id, GiveBack::Held).await
}

/// Returns an order's committed units to stock. Idempotent: only `committed` rows move.
pub async fn restock_for_order(pool: &PgPool, order_id: Uuid) -> Result<i64, sqlx::Error> {
    give_back(pool, order_id, GiveBack::Committed).await
}

async fn give_back(pool: &PgPool, order_id: Uuid, what: GiveBack) -> Result<i64, sqlx::Error> {
    let (from, stock_update) = match what {
        GiveBack::Held => (
            "held",
            "UPDATE inventory.stock SET reserved = reserved - $2, updated_at = now() WHERE sku = $1",
        ),
        GiveBack::Committed => (
            "committed",
            "UPDATE inventory.stock SET on_hand = on_hand + $2, updated_at = now() WHERE sku = $1",
        ),
    };
    let mut tx = pool.begin().await?;
    let mut units: Vec<(String, i32)> = sqlx::query_as(
        "UPDATE inventory.inventory_reservations SET status = 'released', updated_at = now()
         WHERE order_id = $1 AND status = $2 RETURNING sku, qty",
    )
    .bind(order_id)
    .bind(from)
    .fetch_all(&mut *tx)
    .await?;
    if units.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    // Stock rows in SKU order, like every other writer.
    units.sort();
    for (sku, qty) in &units {
        sqlx::query(stock_update)
            .bind(sku)
            .bind(qty)
            .execute(&mut *tx)
            .await?;
        let (on_hand_delta, reserved_delta) = match what {
            GiveBack::Held => (0, -qty),
            GiveBack::Committed => (*qty, 0),
        };
        sqlx::query(
            "INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
             VALUES ($1, 'release', $2, $3, $4)",
        )
        .bind(sku)
        .bind(order_id)
        .bind(on_hand_delta)
        .bind(reserved_delta)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(units.iter().map(|(_, q)| i64::from(*q)).sum())
}
