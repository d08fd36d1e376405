//! A cart's lines: add, set and remove. Adding or setting is one round trip
//! (`edge.write_line`: the cart's lock, then the line's change within the cart's limits,
//! returning the lines to price), shared with other buyers' under load (`db::group`);
//! removing is a transaction of the lock and the delete.

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use super::pricing::{self, Item, Products};
use super::seen::{SeenCart, SeenCarts};
use super::{contended, open_cart_for_update, CartError, CartView};
use crate::catalog::{CatalogCache, Product};
use crate::db::group::{Group, Writes};
use crate::db::Leases;
use crate::domain::{Quantity, Sku};

/// How big a cart may grow. Quantities are capped by [`Quantity::MAX`]; the number of lines
/// is capped so that a checkout's saga events stay far below NATS's `max_payload`.
#[derive(Debug, Clone, Copy)]
pub struct CartLimits {
    pub max_lines: i64,
}

/// Where cart lines are added and set: many buyers' changes per statement under load.
#[derive(Clone)]
pub struct Lines {
    leases: Leases,
    writes: Group<LineWrites>,
    /// What each write left in its cart, for the checkout that follows.
    seen: SeenCarts,
}

impl Lines {
    /// Line changes over `leases`, group-committed with `group_linger` (`database.group_linger`);
    /// each write's outcome is remembered in `seen`.
    pub fn new(leases: Leases, group_linger: std::time::Duration, seen: SeenCarts) -> Self {
        Self {
            writes: Group::new(LineWrites, leases.clone(), group_linger),
            leases,
            seen,
        }
    }

    /// The memory of carts written here (changes made elsewhere must forget theirs).
    pub fn seen(&self) -> &SeenCarts {
        &self.seen
    }

    /// The pool for cart changes that are transactions of their own.
    pub(super) fn pool(&self) -> &PgPool {
        self.leases.pool()
    }
}

/// One buyer's line change: the arguments of `edge.write_line`.
pub struct LineWrite {
    user_id: String,
    new_cart: Uuid,
    sku: String,
    qty: i32,
    sum: bool,
    max_lines: i64,
    currency: &'static str,
}

/// Changes lines of different buyers in one statement ([`Group`]), each answered with the
/// rows `edge.write_line` returns for it. The buyer is the key: `write_line` locks the
/// buyer's cart, so statements lock carts in buyer order.
pub struct LineWrites;

/// One statement: `edge.write_line` per row, its rows tagged with the row's position.
const WRITE_ALL: &str = "SELECT r.n, w.cart, w.promo, w.item_sku AS sku, w.item_qty AS qty,
        w.item_currency AS currency, w.item_added_at AS added_at, w.changed
    FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int[], $5::bool[], $6::bigint[],
                $7::text[])
        WITH ORDINALITY AS r(user_id, new_cart, sku, qty, sum, max_lines, currency, n)
    CROSS JOIN LATERAL edge.write_line(r.user_id, r.new_cart, r.sku, r.qty, r.sum, $8,
                                       r.max_lines, r.currency) AS w
    ORDER BY r.n";

/// A row of [`WRITE_ALL`]: whose it is, and what `edge.write_line` returned.
#[derive(sqlx::FromRow)]
struct TaggedRow {
    n: i64,
    #[sqlx(flatten)]
    row: LineRow,
}

impl Writes for LineWrites {
    type Row = LineWrite;
    type Answer = Vec<LineRow>;
    type Key = String;

    fn key(row: &LineWrite) -> String {
        row.user_id.clone()
    }

    async fn write(
        &self,
        conn: &mut PgConnection,
        rows: &[LineWrite],
    ) -> Result<Vec<Vec<LineRow>>, sqlx::Error> {
        let tagged: Vec<TaggedRow> = sqlx::query_as(WRITE_ALL)
            .bind(rows.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.new_cart).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.sku.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.qty).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.sum).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.max_lines).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.currency).collect::<Vec<_>>())
            .bind(Quantity::MAX)
            .fetch_all(&mut *conn)
            .await?;
        let mut answers: Vec<Vec<LineRow>> = rows.iter().map(|_| Vec::new()).collect();
        for TaggedRow { n, row } in tagged {
            // WITH ORDINALITY counts from 1.
            let slot = usize::try_from(n - 1)
                .ok()
                .and_then(|i| answers.get_mut(i))
                .ok_or_else(|| {
                    sqlx::Error::Protocol(format!("write_line row {n} of {}", rows.len()))
                })?;
            slot.push(row);
        }
        Ok(answers)
    }
}

/// One row of `edge.write_line`: a line of the cart before the change, or the changed line.
#[derive(sqlx::FromRow)]
pub struct LineRow {
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
    lines: &Lines,
    user_id: &str,
    product: &Product,
    qty: Quantity,
    limits: &CartLimits,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    if !product.active {
        return Err(CartError::Inactive(product.sku.to_string()));
    }
    write_line(lines, user_id, product, qty, limits, catalog, true).await
}

/// Sets a line's quantity; `None` removes the line.
pub async fn set_item(
    lines: &Lines,
    user_id: &str,
    product: &Product,
    qty: Option<Quantity>,
    limits: &CartLimits,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    match qty {
        Some(qty) => write_line(lines, user_id, product, qty, limits, catalog, false).await,
        None => remove(lines, user_id, &product.sku, catalog, false).await,
    }
}

/// Removes a line; removing a line that is not there is an error the caller can see.
pub async fn remove_item(
    lines: &Lines,
    user_id: &str,
    sku: &Sku,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    remove(lines, user_id, sku, catalog, true).await
}

/// Inserts the line (`sum`: adds to the line already there) or sets its quantity, within
/// the cart's limits, then prices the cart from the edge's catalog cache.
async fn write_line(
    lines: &Lines,
    user_id: &str,
    product: &Product,
    qty: Quantity,
    limits: &CartLimits,
    catalog: &CatalogCache,
    sum: bool,
) -> Result<CartView, CartError> {
    let rows = lines
        .writes
        .write(LineWrite {
            user_id: user_id.to_owned(),
            new_cart: Uuid::now_v7(),
            sku: product.sku.to_string(),
            qty: qty.get(),
            sum,
            max_lines: limits.max_lines,
            currency: product.price.currency().code(),
        })
        .await
        .map_err(contended)?;
    let Some((cart_id, promo_code)) = rows.first().map(|r| (r.cart, r.promo.clone())) else {
        // Nothing written and no lines: only a cart limit of zero lines refuses an empty cart.
        return Err(CartError::TooManyLines {
            max: limits.max_lines,
        });
    };
    let items = outcome(rows, product, *limits)?;
    lines
        .seen
        .remember(
            cart_id,
            SeenCart {
                user_id: user_id.to_owned(),
                promo_code: promo_code.clone(),
                items: items.clone(),
            },
        )
        .await;
    // Pricing reads the database only for a promotion code: no connection held for it.
    let priced = pricing::price_lines(
        lines.leases.pool(),
        promo_code,
        items,
        Products::Cache(catalog),
        None,
    )
    .await?;
    Ok(CartView { cart_id, priced })
}

/// Deletes a line; `must_exist` makes a missing line an error.
async fn remove(
    lines: &Lines,
    user_id: &str,
    sku: &Sku,
    catalog: &CatalogCache,
    must_exist: bool,
) -> Result<CartView, CartError> {
    let mut conn = lines.pool().acquire().await?;
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
    lines.seen.forget(cart_id).await;
    pricing::view(&mut conn, cart_id, catalog, None).await
}
