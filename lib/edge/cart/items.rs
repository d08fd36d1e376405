//! A cart's lines: add, set and remove, each one transaction of two statements (the cart's
//! lock and the line's change, which also returns the lines to price).

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgPool};

use super::pricing::{self, Item};
use super::{open_cart_for_update, CartError, CartView};
use crate::catalog::{CatalogCache, Product};
use crate::domain::{Quantity, Sku};

/// How big a cart may grow. Quantities are capped by [`Quantity::MAX`]; the number of lines
/// is capped so that a checkout's saga events stay far below NATS's `max_payload`.
#[derive(Debug, Clone, Copy)]
pub struct CartLimits {
    pub max_lines: i64,
}

/// Whether the line may be written (`$1` cart, `$2` sku, `$5` max lines, `$6` currency): it
/// exists already or the cart has room for another, and no other line is in another
/// currency. The cart row is locked, so these reads cannot race another change of this cart.
const MAY_WRITE: &str = "(EXISTS (SELECT 1 FROM edge.cart_items WHERE cart_id = $1 AND sku = $2)
        OR (SELECT count(*) FROM edge.cart_items WHERE cart_id = $1) < $5)
    AND NOT EXISTS (SELECT 1 FROM edge.cart_items
                    WHERE cart_id = $1 AND sku <> $2 AND currency <> $6)";

/// The cart's lines as they were before the change, plus the changed line (`changed`): a
/// data-modifying CTE's rows are not visible to the rest of its statement, so the caller
/// merges them.
const LINES_AFTER: &str = "SELECT sku, qty, currency, added_at, true AS changed FROM up
    UNION ALL
    SELECT sku, qty, currency, added_at, false FROM edge.cart_items WHERE cart_id = $1";

/// One row of [`LINES_AFTER`].
#[derive(sqlx::FromRow)]
struct LineRow {
    sku: String,
    qty: i32,
    currency: Option<String>,
    added_at: DateTime<Utc>,
    changed: bool,
}

/// How a line change went: the lines after it, or why the database wrote nothing.
fn outcome(
    rows: Vec<LineRow>,
    product: &Product,
    limits: CartLimits,
) -> Result<Vec<Item>, CartError> {
    let sku = product.sku.as_str();
    if !rows.iter().any(|r| r.changed) {
        let wanted = product.price.currency();
        if let Some(other) = rows
            .iter()
            .find(|r| r.sku != sku && r.currency.as_deref().is_some_and(|c| c != wanted.code()))
        {
            return Err(CartError::CurrencyMismatch {
                sku: sku.to_owned(),
                cart: other.currency.clone().unwrap_or_default(),
                product: wanted.code().to_owned(),
            });
        }
        let has_line = rows.iter().any(|r| r.sku == sku);
        let lines = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        return Err(if !has_line && lines >= limits.max_lines {
            CartError::TooManyLines {
                max: limits.max_lines,
            }
        } else {
            CartError::TooMany {
                sku: sku.to_owned(),
            }
        });
    }
    let mut items: Vec<(DateTime<Utc>, Item)> = rows
        .into_iter()
        .filter(|r| r.changed || r.sku != sku)
        .map(|r| (r.added_at, (r.sku, r.qty)))
        .collect();
    items.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1 .0.cmp(&b.1 .0)));
    Ok(items.into_iter().map(|(_, item)| item).collect())
}

/// Adds `qty` of a product to the caller's open cart (summing with what is there).
pub async fn add_item(
    pool: &PgPool,
    user_id: &str,
    product: &Product,
    qty: Quantity,
    limits: &CartLimits,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    if !product.active {
        return Err(CartError::Inactive(product.sku.to_string()));
    }
    write_line(
        pool,
        user_id,
        product,
        qty,
        limits,
        catalog,
        "edge.cart_items.qty + EXCLUDED.qty",
    )
    .await
}

/// Sets a line's quantity; `None` removes the line.
pub async fn set_item(
    pool: &PgPool,
    user_id: &str,
    product: &Product,
    qty: Option<Quantity>,
    limits: &CartLimits,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    match qty {
        Some(qty) => write_line(pool, user_id, product, qty, limits, catalog, "EXCLUDED.qty").await,
        None => remove(pool, user_id, &product.sku, catalog, false).await,
    }
}

/// Removes a line; removing a line that is not there is an error the caller can see.
pub async fn remove_item(
    pool: &PgPool,
    user_id: &str,
    sku: &Sku,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    remove(pool, user_id, sku, catalog, true).await
}

/// Inserts the line or sets its quantity to `new_qty` (an expression over the existing row
/// and `EXCLUDED`), within the cart's limits.
async fn write_line(
    pool: &PgPool,
    user_id: &str,
    product: &Product,
    qty: Quantity,
    limits: &CartLimits,
    catalog: &CatalogCache,
    new_qty: &str,
) -> Result<CartView, CartError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let cart = open_cart_for_update(&mut tx, user_id).await?;
    let rows: Vec<LineRow> = sqlx::query_as(&format!(
        "WITH up AS (
             INSERT INTO edge.cart_items (cart_id, sku, qty, currency)
             SELECT $1, $2, $3, $6 WHERE {MAY_WRITE}
             ON CONFLICT (cart_id, sku) DO UPDATE SET qty = {new_qty}
             WHERE {new_qty} <= $4
             RETURNING sku, qty, currency, added_at)
         {LINES_AFTER}"
    ))
    .bind(cart.cart_id)
    .bind(product.sku.as_str())
    .bind(qty.get())
    .bind(Quantity::MAX)
    .bind(limits.max_lines)
    .bind(product.price.currency().code())
    .fetch_all(&mut *tx)
    .await?;
    let items = outcome(rows, product, *limits)?;
    tx.commit().await?;
    let priced =
        pricing::price_lines(&mut conn, cart.promo_code, items, Some(catalog), None).await?;
    Ok(CartView {
        cart_id: cart.cart_id,
        priced,
    })
}

/// Deletes a line; `must_exist` makes a missing line an error.
async fn remove(
    pool: &PgPool,
    user_id: &str,
    sku: &Sku,
    catalog: &CatalogCache,
    must_exist: bool,
) -> Result<CartView, CartError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let cart = open_cart_for_update(&mut tx, user_id).await?;
    let removed = sqlx::query("DELETE FROM edge.cart_items WHERE cart_id = $1 AND sku = $2")
        .bind(cart.cart_id)
        .bind(sku.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if must_exist && removed == 0 {
        return Err(CartError::NotInCart(sku.to_string()));
    }
    tx.commit().await?;
    pricing::view(&mut conn, cart.cart_id, catalog, None).await
}
