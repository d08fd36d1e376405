//! The checkout's read: the Idempotency-Key's request, the cart and its products, in one
//! statement, sorted into a replay of an earlier request or a cart to price.

use std::collections::HashMap;

use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{CheckoutError, Snapshot, Source};
use crate::catalog::{Product, ProductRow};

/// The checkout's one read: the request already recorded under the Idempotency-Key (if
/// any), whether the cart may be checked out, its promotion code, and its lines joined to
/// the catalog's current products. A row per line, or one row of nulls for an empty cart.
const READ: &str = "SELECT k.request_hash, k.order_id, c.checkable, c.promo_code, i.sku, i.qty,
        p.name, p.price, p.currency, p.weight_grams, p.tax_code, p.active
    FROM (SELECT 1) AS one
    LEFT JOIN edge.checkouts k ON k.user_id = $1 AND k.idempotency_key = $2
    LEFT JOIN (SELECT cart_id, promo_code,
                      status = 'open' OR order_id IS NULL OR orders.has_failed(order_id) AS checkable
               FROM edge.carts WHERE cart_id = $3 AND user_id = $1) AS c ON true
    LEFT JOIN edge.cart_items i ON i.cart_id = c.cart_id
    LEFT JOIN LATERAL catalog.product(i.sku) AS p ON true
    ORDER BY i.added_at, i.sku";

/// One row of [`READ`].
#[derive(sqlx::FromRow)]
struct ReadRow {
    request_hash: Option<Vec<u8>>,
    order_id: Option<Uuid>,
    checkable: Option<bool>,
    promo_code: Option<String>,
    sku: Option<String>,
    qty: Option<i32>,
    name: Option<String>,
    price: Option<Decimal>,
    currency: Option<String>,
    weight_grams: Option<i32>,
    tax_code: Option<String>,
    active: Option<bool>,
}

impl ReadRow {
    /// The line's product as the catalog has it now (`None`: no such product).
    fn product(&mut self) -> Option<Product> {
        ProductRow {
            sku: self.sku.clone()?,
            name: self.name.take()?,
            price: self.price?,
            currency: self.currency.take()?,
            weight_grams: self.weight_grams?,
            tax_code: self.tax_code.take()?,
            active: self.active?,
        }
        .into_product()
    }
}

/// What the read found.
pub(super) enum Found {
    /// The key was used before: its order, or a refusal if the request differs.
    Replay(Result<Uuid, CheckoutError>),
    /// A cart to price: its promotion code, its lines and their products.
    Cart(Snapshot),
}

/// Reads the key's request and the cart (see [`READ`]).
pub(super) async fn read(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
    cart_id: Uuid,
    hash: &[u8],
) -> Result<Found, CheckoutError> {
    let rows: Vec<ReadRow> = sqlx::query_as(READ)
        .bind(user_id)
        .bind(key)
        .bind(cart_id)
        .fetch_all(conn)
        .await?;
    found(rows, hash)
}

/// Sorts the read's rows into a replay or a cart (or a refusal).
fn found(mut rows: Vec<ReadRow>, hash: &[u8]) -> Result<Found, CheckoutError> {
    if let Some((stored_hash, order_id)) = rows
        .first()
        .and_then(|r| Some((r.request_hash.as_ref()?, r.order_id?)))
    {
        // If its publish has not gone out yet, the outbox sweeper owes it.
        return Ok(Found::Replay(if stored_hash.as_slice() == hash {
            Ok(order_id)
        } else {
            Err(CheckoutError::KeyReused)
        }));
    }
    match rows.first().and_then(|r| r.checkable) {
        None => return Err(CheckoutError::CartNotFound),
        Some(false) => return Err(CheckoutError::AlreadyCheckedOut),
        Some(true) => {}
    }
    let code = rows.first().and_then(|r| r.promo_code.clone());
    let mut items = Vec::with_capacity(rows.len());
    let mut products = HashMap::with_capacity(rows.len());
    for row in &mut rows {
        let product = row.product();
        let (Some(sku), Some(qty)) = (row.sku.take(), row.qty) else {
            continue;
        };
        if let Some(product) = product {
            products.insert(sku.clone(), product);
        }
        items.push((sku, qty));
    }
    Ok(Found::Cart(Snapshot {
        code,
        items,
        products,
        source: Source::ReadNow,
    }))
}
