//! The `orders` and `order_items` rows.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::status::{Action, OrderStatus};
use crate::saga::events::{Checkout, FailureReason};

/// An order as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrderRecord {
    pub order_id: Uuid,
    pub user_id: String,
    pub status: OrderStatus,
    pub reason: Option<String>,
    pub subtotal: Decimal,
    pub discount: Decimal,
    pub tax: Decimal,
    pub shipping: Decimal,
    pub total: Decimal,
    pub currency: String,
    pub created_at: DateTime<Utc>,
    pub pending_action: Option<Action>,
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
    status: OrderStatus,
    reason: Option<FailureReason>,
) -> Result<bool, sqlx::Error> {
    let skus: Vec<&str> = checkout.items.iter().map(|l| l.sku.as_str()).collect();
    let qtys: Vec<i32> = checkout.items.iter().map(|l| l.qty.get()).collect();
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
    .bind(checkout.currency)
    .bind(&skus)
    .bind(&qtys)
    .bind(&prices)
    .fetch_one(&mut *conn)
    .await?;
    Ok(inserted)
}

/// Inserts confirmed orders and their items in one statement; returns the ids inserted (an
/// order that already exists, e.g. failed by the watchdog, is left as it is).
pub(crate) async fn insert_confirmed_many(
    conn: &mut PgConnection,
    checkouts: &[&Checkout],
) -> Result<Vec<Uuid>, sqlx::Error> {
    if checkouts.is_empty() {
        return Ok(Vec::new());
    }
    let col = |f: fn(&Checkout) -> Decimal| checkouts.iter().map(|c| f(c)).collect::<Vec<_>>();
    let ids: Vec<Uuid> = checkouts.iter().map(|c| c.order_id).collect();
    let users: Vec<&str> = checkouts.iter().map(|c| c.user_id.as_str()).collect();
    let currencies: Vec<&str> = checkouts.iter().map(|c| c.currency.code()).collect();
    let lines = checkouts
        .iter()
        .flat_map(|c| c.items.iter().map(move |l| (c.order_id, l)));
    let (mut item_orders, mut skus, mut qtys, mut prices) = (vec![], vec![], vec![], vec![]);
    for (order_id, line) in lines {
        item_orders.push(order_id);
        skus.push(line.sku.as_str());
        qtys.push(line.qty);
        prices.push(line.unit_price);
    }
    sqlx::query_scalar(
        "WITH o AS (
             INSERT INTO orders.orders
                 (order_id, user_id, status, subtotal, discount, tax, shipping, total, currency)
             SELECT order_id, user_id, 'confirmed', subtotal, discount, tax, shipping, total, currency
             FROM unnest($1::uuid[], $2::text[], $3::numeric[], $4::numeric[], $5::numeric[],
                         $6::numeric[], $7::numeric[], $8::text[])
                  AS o(order_id, user_id, subtotal, discount, tax, shipping, total, currency)
             ON CONFLICT (order_id) DO NOTHING
             RETURNING order_id),
         i AS (
             INSERT INTO orders.order_items (order_id, sku, qty, price)
             SELECT i.order_id, i.sku, i.qty, i.price
             FROM unnest($9::uuid[], $10::text[], $11::int[], $12::numeric[])
                  AS i(order_id, sku, qty, price)
             JOIN o USING (order_id))
         SELECT order_id FROM o",
    )
    .bind(&ids)
    .bind(&users)
    .bind(col(|c| c.subtotal))
    .bind(col(|c| c.discount))
    .bind(col(|c| c.tax))
    .bind(col(|c| c.shipping))
    .bind(col(|c| c.total))
    .bind(&currencies)
    .bind(&item_orders)
    .bind(&skus)
    .bind(&qtys)
    .bind(&prices)
    .fetch_all(conn)
    .await
}

/// Records a failed order with its reason (compensation's last step).
pub async fn insert_failed(
    conn: &mut PgConnection,
    checkout: &Checkout,
    reason: FailureReason,
) -> Result<bool, sqlx::Error> {
    insert(conn, checkout, OrderStatus::Failed, Some(reason)).await
}

/// Whether the watchdog may unwind an order.
#[derive(Debug, PartialEq, Eq)]
pub enum Fence {
    /// The order is failed with `timed_out` (`new`: by this call): unwind it.
    Fenced { new: bool },
    /// It settled first (confirmed, or failed for another reason): leave it.
    Settled(OrderStatus),
}

/// Records a pending order as failed with `timed_out`, unless it settled first. Once this
/// row exists the order step cannot confirm the order (its insert finds the row).
pub async fn fence_timed_out(pool: &PgPool, checkout: &Checkout) -> Result<Fence, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    if insert(
        &mut conn,
        checkout,
        OrderStatus::Failed,
        Some(FailureReason::TimedOut),
    )
    .await?
    {
        return Ok(Fence::Fenced { new: true });
    }
    let (status, reason): (OrderStatus, Option<String>) =
        sqlx::query_as("SELECT status, reason FROM orders.orders WHERE order_id = $1")
            .bind(checkout.order_id)
            .fetch_one(&mut *conn)
            .await?;
    if status == OrderStatus::Failed && reason.as_deref() == Some(FailureReason::TimedOut.as_str())
    {
        return Ok(Fence::Fenced { new: false });
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
