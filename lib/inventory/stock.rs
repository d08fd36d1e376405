//! Stock levels and the admin's corrections to them.

use std::collections::BTreeSet;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::Sku;
use crate::saga::events::Checkout;

/// One SKU's stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stock {
    pub on_hand: i32,
    pub reserved: i32,
    /// The row's version (every change bumps it; see `soldout`).
    pub version: i64,
}

impl Stock {
    /// What can still be reserved.
    pub fn available(self) -> i32 {
        self.on_hand - self.reserved
    }
}

/// Why a stock change was refused.
#[derive(Debug, thiserror::Error)]
pub enum StockError {
    #[error("on_hand {on_hand} is below the {reserved} units reserved")]
    BelowReserved { on_hand: i32, reserved: i32 },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A SKU's stock; a SKU never stocked has none.
pub async fn get_stock(pool: &PgPool, sku: &Sku) -> Result<Stock, sqlx::Error> {
    let row: Option<(i32, i32, i64)> =
        sqlx::query_as("SELECT on_hand, reserved, version FROM inventory.stock WHERE sku = $1")
            .bind(sku.as_str())
            .fetch_optional(pool)
            .await?;
    Ok(row.map_or(
        Stock {
            on_hand: 0,
            reserved: 0,
            version: 0,
        },
        |(on_hand, reserved, version)| Stock {
            on_hand,
            reserved,
            version,
        },
    ))
}

/// Sets `on_hand` (a restock or a count correction), recording the difference as an
/// `adjust` movement. Refused below what is reserved, so no held unit disappears.
pub async fn set_on_hand(pool: &PgPool, sku: &Sku, on_hand: i32) -> Result<Stock, StockError> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO inventory.stock (sku, on_hand) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(sku.as_str())
        .execute(&mut *tx)
        .await?;
    let (before, reserved): (i32, i32) =
        sqlx::query_as("SELECT on_hand, reserved FROM inventory.stock WHERE sku = $1 FOR UPDATE")
            .bind(sku.as_str())
            .fetch_one(&mut *tx)
            .await?;
    if on_hand < reserved {
        return Err(StockError::BelowReserved { on_hand, reserved });
    }
    let (version,): (i64,) = sqlx::query_as(
        "UPDATE inventory.stock SET on_hand = $2, updated_at = now() WHERE sku = $1
         RETURNING version",
    )
    .bind(sku.as_str())
    .bind(on_hand)
    .fetch_one(&mut *tx)
    .await?;
    if on_hand != before {
        sqlx::query(
            "INSERT INTO inventory.stock_movements (sku, kind, on_hand_delta, reserved_delta)
             VALUES ($1, 'adjust', $2, 0)",
        )
        .bind(sku.as_str())
        .bind(on_hand - before)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Stock {
        on_hand,
        reserved,
        version,
    })
}

/// The state of an order's reservations: `held`, `committed`, `released`, `expired`, or
/// `None` if reserve has not handled the order yet.
pub async fn reservation_status(
    pool: &PgPool,
    order_id: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT status FROM inventory.inventory_reservations WHERE order_id = $1 LIMIT 1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(s,)| s))
}

/// Locks the stock row of every SKU a batch of checkouts touches, in SKU order (the order every
/// writer of stock takes them in, so two batches never deadlock), and reads them.
pub(crate) async fn lock_rows(
    conn: &mut PgConnection,
    checkouts: &[&Checkout],
) -> Result<Vec<(String, Stock)>, sqlx::Error> {
    let skus: BTreeSet<&str> = checkouts
        .iter()
        .flat_map(|c| c.items.iter().map(|l| l.sku.as_str()))
        .collect();
    let skus: Vec<&str> = skus.into_iter().collect();
    let rows: Vec<(String, i32, i32, i64)> = sqlx::query_as(
        "SELECT sku, on_hand, reserved, version FROM inventory.stock
         WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
    )
    .bind(&skus)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(sku, on_hand, reserved, version)| {
            (
                sku,
                Stock {
                    on_hand,
                    reserved,
                    version,
                },
            )
        })
        .collect())
}
