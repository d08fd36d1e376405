//! The `orders` and `order_items` rows.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::saga::events::{Checkout, FailureReason};

/// An order as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrderRecord {
    pub order_id: Uuid,
    pub user_id: String,
    pub status: String,
    pub reason: Option<String>,
    pub subtotal: Decimal,
    pub discount: Decimal,
    pub tax: Decimal,
    pub shipping: Decimal,
    pub total: Decimal,
    pub currency: String,
    pub created_at: DateTime<Utc>,
    pub pending_action: Option<String>,
    #[sqlx(skip)]
    pub items: Vec<OrderItem>,
}

/// One line of an order, at the price it was bought for.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrderItem {
    pub sku: String,
    pub qty: i32,
    pub price: Decimal,
}

/// Inserts the order and its items from the checkout snapshot; a second insert is a no-op.
pub(crate) async fn insert(
    conn: &mut PgConnection,
    checkout: &Checkout,
    status: &str,
    reason: Option<FailureReason>,
) -> Result<bool, sqlx::Error> {
    let skus: Vec<&str> = checkout.items.iter().map(|l| l.sku.as_str()).collect();
    let qtys: Vec<i32> = checkout.items.iter().map(|l| l.qty).collect();
    let prices: Vec<Decimal> = checkout.items.iter().map(|l| l.unit_price).collect();
    // The order and its items in one statement (one round trip); a repeat inserts neither.
    let (inserted,): (bool,) = sqlx::query_as(
        "WITH o AS (
             INSERT INTO orders.orders
                 (order_id, user_id, status, reason, subtotal, discount, tax, shipping, total, currency)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (order_id) DO NOTHING
             RETURNING order_id),
         i AS (
             INSERT INTO orders.order_items (order_id, sku, qty, price)
             SELECT o.order_id, sku, qty, price
             FROM o, unnest($11::text[], $12::int[], $13::numeric[]) AS i(sku, qty, price))
         SELECT EXISTS (SELECT 1 FROM o)",
    )
    .bind(checkout.order_id)
    .bind(&checkout.user_id)
    .bind(status)
    .bind(reason.map(FailureReason::as_str))
    .bind(checkout.subtotal)
    .bind(checkout.discount)
    .bind(checkout.tax)
    .bind(checkout.shipping)
    .bind(checkout.total)
    .bind(&checkout.currency)
    .bind(&skus)
    .bind(&qtys)
    .bind(&prices)
    .fetch_one(&mut *conn)
    .await?;
    Ok(inserted)
}

/// Records a failed order with its reason (compensation's last step).
pub async fn insert_failed(
    conn: &mut PgConnection,
    checkout: &Checkout,
    reason: FailureReason,
) -> Result<bool, sqlx::Error> {
    insert(conn, checkout, "failed", Some(reason)).await
}

/// Whether the watchdog may unwind an order.
#[derive(Debug, PartialEq, Eq)]
pub enum Fence {
    /// The order is now (or was already) failed with `timed_out`: unwind it.
    Fenced,
    /// It settled first (confirmed, or failed for another reason): leave it.
    Settled(String),
}

/// Records a pending order as failed with `timed_out`, unless it settled first. Once this
/// row exists the order step cannot confirm the order (its insert finds the row).
pub async fn fence_timed_out(pool: &PgPool, checkout: &Checkout) -> Result<Fence, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    if insert(&mut conn, checkout, "failed", Some(FailureReason::TimedOut)).await? {
        return Ok(Fence::Fenced);
    }
    let (status, reason): (String, Option<String>) =
        sqlx::query_as("SELECT status, reason FROM orders.orders WHERE order_id = $1")
            .bind(checkout.order_id)
            .fetch_one(&mut *conn)
            .await?;
    if status == "failed" && reason.as_deref() == Some(FailureReason::TimedOut.as_str()) {
        return Ok(Fence::Fenced);
    }
    Ok(Fence::Settled(status))
}

/// An order with its items.
pub async fn get_order(pool: &PgPool, order_id: Uuid) -> Result<Option<OrderRecord>, sqlx::Error> {
    let order: Option<OrderRecord> = sqlx::query_as(
        "SELECT order_id, user_id, status, reason, subtotal, discount, tax, shipping, total,
                currency, created_at, pending_action
         FROM orders.orders WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    let Some(mut order) = order else {
        return Ok(None);
    };
    order.items = sqlx::query_as(
        "SELECT sku, qty, price FROM orders.order_items WHERE order_id = $1 ORDER BY sku",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    Ok(Some(order))
}

/// Whether an order exists and failed (its cart may be checked out again).
pub async fn is_failed(conn: &mut PgConnection, order_id: Uuid) -> Result<bool, sqlx::Error> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT status FROM orders.orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(conn)
            .await?;
    Ok(matches!(row, Some((s,)) if s == "failed"))
}
