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

/// Units an order gave back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GivenBack {
    pub units: i64,
    /// Each SKU that got units back, with its stock row's version after (for the notices).
    pub skus: Vec<(String, i64)>,
}

impl GivenBack {
    /// Both give-backs of one order together.
    pub fn and(mut self, other: GivenBack) -> GivenBack {
        self.units += other.units;
        self.skus.extend(other.skus);
        self
    }
}

/// Releases every held reservation of an order. Idempotent: only `held` rows move, so a
/// second call releases nothing.
pub async fn release_for_order(pool: &PgPool, order_id: Uuid) -> Result<GivenBack, sqlx::Error> {
    give_back(pool, order_id, GiveBack::Held).await
}

/// Returns an order's committed units to stock. Idempotent: only `committed` rows move.
pub async fn restock_for_order(pool: &PgPool, order_id: Uuid) -> Result<GivenBack, sqlx::Error> {
    give_back(pool, order_id, GiveBack::Committed).await
}

async fn give_back(
    pool: &PgPool,
    order_id: Uuid,
    what: GiveBack,
) -> Result<GivenBack, sqlx::Error> {
    let (from, stock_update) = match what {
        GiveBack::Held => (
            "held",
            "UPDATE inventory.stock SET reserved = reserved - $2, updated_at = now()
             WHERE sku = $1 RETURNING version",
        ),
        GiveBack::Committed => (
            "committed",
            "UPDATE inventory.stock SET on_hand = on_hand + $2, updated_at = now()
             WHERE sku = $1 RETURNING version",
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
        return Ok(GivenBack::default());
    }
    // Stock rows in SKU order, like every other writer.
    units.sort();
    let mut given = GivenBack::default();
    for (sku, qty) in &units {
        let (version,): (i64,) = sqlx::query_as(stock_update)
            .bind(sku)
            .bind(qty)
            .fetch_one(&mut *tx)
            .await?;
        given.units += i64::from(*qty);
        given.skus.push((sku.clone(), version));
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
    Ok(given)
}

/// Puts units of an order back on hand after part of it shipped (the unshipped rest of a
/// cancelled order, a refund's returned lines), once per `key`: a repeat returns nothing.
/// Runs in the caller's transaction.
pub async fn return_units(
    conn: &mut sqlx::PgConnection,
    order_id: Uuid,
    key: &str,
    units: &[(String, i64)],
) -> Result<GivenBack, sqlx::Error> {
    let mut units: Vec<(String, i64)> = units.iter().filter(|(_, q)| *q > 0).cloned().collect();
    // Stock rows in SKU order, like every other writer.
    units.sort();
    let mut given = GivenBack::default();
    for (sku, qty) in &units {
        let qty32 = i32::try_from(*qty).unwrap_or(i32::MAX);
        let fresh = sqlx::query(
            "INSERT INTO inventory.returns (order_id, key, sku, qty) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .bind(order_id)
        .bind(key)
        .bind(sku)
        .bind(qty32)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if fresh == 0 {
            continue;
        }
        let (version,): (i64,) = sqlx::query_as(
            "UPDATE inventory.stock SET on_hand = on_hand + $2, updated_at = now()
             WHERE sku = $1 RETURNING version",
        )
        .bind(sku)
        .bind(qty32)
        .fetch_one(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
             VALUES ($1, 'return', $2, $3, 0)",
        )
        .bind(sku)
        .bind(order_id)
        .bind(qty32)
        .execute(&mut *conn)
        .await?;
        given.units += qty;
        given.skus.push((sku.clone(), version));
    }
    Ok(given)
}
