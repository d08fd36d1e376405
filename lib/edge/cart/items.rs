//! A cart's lines: add, set and remove. Adding or setting is one round trip
//! (`edge.write_line`: the cart's lock, then the line's change within the cart's limits,
//! returning the lines to price); removing is a transaction of the lock and the delete.

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgPool};
use uuid::Uuid;

use super::pricing::{self, Item, Products};
use super::{contended, open_cart_for_update, CartError, CartView};
use crate::catalog::{CatalogCache, Product};
use crate::db::Leases;
use crate::domain::{Quantity, Sku};

/// How big a cart may grow. Quantities are capped by [`Quantity::MAX`]; the number of lines
/// is capped so that a checkout's saga events stay far below NATS's `max_payload`.
#[derive(Debug, Clone, Copy)]
pub struct CartLimits {
    pub max_lines: i64,
}

/// One row of `edge.write_line`: a line of the cart before the change, or the changed line.
#[derive(sqlx::FromRow)]
struct LineRow {
    cart: Uuid,
    promo: Option<String>,
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
    leases: &Leases,
    user_id: &str,
    product: &Product,
    qty: Quantity,
    limits: &CartLimits,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    if !product.active {
        return Err(CartError::Inactive(product.sku.to_string()));
    }
    write_line(leases, user_id, product, qty, limits, catalog, true).await
}

/// Sets a line's quantity; `None` removes the line.
pub async fn set_item(
    leases: &Leases,
    user_id: &str,
    product: &Product,
    qty: Option<Quantity>,
    limits: &CartLimits,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    match qty {
        Some(qty) => write_line(leases, user_id, product, qty, limits, catalog, false).await,
        None => remove(leases.pool(), user_id, &product.sku, catalog, false).await,
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

/// Inserts the line (`sum`: adds to the line already there) or sets its quantity, within
/// the cart's limits, then prices the cart from the edge's catalog cache.
async fn write_line(
    leases: &Leases,
    user_id: &str,
    product: &Product,
    qty: Quantity,
    limits: &CartLimits,
    catalog: &CatalogCache,
    sum: bool,
) -> Result<CartView, CartError> {
    let mut conn = leases.acquire().await?;
    let rows: Vec<LineRow> = sqlx::query_as(
        "SELECT cart, promo, item_sku AS sku, item_qty AS qty, item_currency AS currency,
                item_added_at AS added_at, changed
         FROM edge.write_line($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(user_id)
    .bind(Uuid::now_v7())
    .bind(product.sku.as_str())
    .bind(qty.get())
    .bind(sum)
    .bind(Quantity::MAX)
    .bind(limits.max_lines)
    .bind(product.price.currency().code())
    .fetch_all(&mut *conn)
    .await
    .map_err(contended)?;
    let Some((cart_id, promo_code)) = rows.first().map(|r| (r.cart, r.promo.clone())) else {
        // Nothing written and no lines: only a cart limit of zero lines refuses an empty cart.
        return Err(CartError::TooManyLines {
            max: limits.max_lines,
        });
    };
    let items = outcome(rows, product, *limits)?;
    let priced =
        pricing::price_lines(&mut conn, promo_code, items, Products::Cache(catalog), None).await?;
    conn.park();
    Ok(CartView { cart_id, priced })
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
    let cart_id = open_cart_for_update(&mut tx, user_id).await?;
    let removed = sqlx::query("DELETE FROM edge.cart_items WHERE cart_id = $1 AND sku = $2")
        .bind(cart_id)
        .bind(sku.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if must_exist && removed == 0 {
        return Err(CartError::NotInCart(sku.to_string()));
    }
    tx.commit().await?;
    pricing::view(&mut conn, cart_id, catalog, None).await
}
