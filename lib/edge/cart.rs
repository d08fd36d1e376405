//! Carts (owned by the edge): one open cart per user, locked to an order at checkout and
//! unlocked again if that order fails.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::catalog::{self, CatalogCache, Product};
use crate::domain::{Currency, Quantity, Sku};
use crate::orders;
use crate::pricing::destination::DestinationRates;
use crate::pricing::{self, promo, Destination, LineInput, Priced, PromoOutcome};

/// A cart with its current prices.
#[derive(Debug, Clone)]
pub struct CartView {
    pub cart_id: Uuid,
    /// `None` while the cart is empty.
    pub priced: Option<Priced>,
}

/// Why a cart change was refused.
#[derive(Debug, thiserror::Error)]
pub enum CartError {
    #[error("no product with sku {0}")]
    UnknownSku(String),
    #[error("the cart would hold more than {max} of {sku}", max = Quantity::MAX)]
    TooMany { sku: String },
    #[error("the cart is priced in {cart}; {sku} is sold in {product}")]
    CurrencyMismatch {
        sku: String,
        cart: String,
        product: String,
    },
    #[error("a cart holds at most {max} different products")]
    TooManyLines { max: i64 },
    #[error("{0} is not in the cart")]
    NotInCart(String),
    #[error("{0} is not sold any more")]
    Inactive(String),
    #[error("we do not ship there: {0}")]
    ShippingUnavailable(String),
    #[error("{message}")]
    Promo { code: &'static str, message: String },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// How big a cart may grow. Quantities are capped by [`Quantity::MAX`]; the number of lines
/// is capped so that a checkout's saga events stay far below NATS's `max_payload`.
#[derive(Debug, Clone, Copy)]
pub struct CartLimits {
    pub max_lines: i64,
}

/// The line exists already, or the cart has room for another (`$1` cart, `$2` sku, `$5` max).
const ROOM_FOR_LINE: &str = "EXISTS (SELECT 1 FROM edge.cart_items WHERE cart_id = $1 AND sku = $2)
    OR (SELECT count(*) FROM edge.cart_items WHERE cart_id = $1) < $5";

/// Why an insert of a line did nothing: too many lines, or too many of this SKU.
async fn refusal(
    conn: &mut PgConnection,
    cart_id: Uuid,
    product: &Product,
    limits: &CartLimits,
) -> Result<CartError, sqlx::Error> {
    let (lines, has_line): (i64, bool) = sqlx::query_as(
        "SELECT count(*), coalesce(bool_or(sku = $2), false) FROM edge.cart_items WHERE cart_id = $1",
    )
    .bind(cart_id)
    .bind(product.sku.as_str())
    .fetch_one(conn)
    .await?;
    Ok(if !has_line && lines >= limits.max_lines {
        CartError::TooManyLines {
            max: limits.max_lines,
        }
    } else {
        CartError::TooMany {
            sku: product.sku.to_string(),
        }
    })
}

/// The caller's open cart, created or reopened as needed, locked for this transaction.
async fn open_cart_for_update(conn: &mut PgConnection, user_id: &str) -> Result<Uuid, sqlx::Error> {
    // One user's cart changes are serialized, so two first requests make one cart.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('cart:' || $1, 0))")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    let latest: Option<(Uuid, String, Option<Uuid>)> = sqlx::query_as(
        "SELECT cart_id, status, order_id FROM edge.carts
         WHERE user_id = $1 ORDER BY created_at DESC LIMIT 1 FOR UPDATE",
    )
    .bind(user_id)
    .fetch_optional(&mut *conn)
    .await?;
    // A checked-out cart whose order failed is the buyer's cart again; whether it failed is
    // the orders service's to say (one more round trip, once per order at most).
    let failed = match &latest {
        Some((_, status, Some(order_id))) if status != "open" => {
            orders::is_failed(&mut *conn, *order_id).await?
        }
        _ => false,
    };
    match latest {
        Some((cart_id, status, _)) if status == "open" => Ok(cart_id),
        Some((cart_id, _, _)) if failed => {
            reopen(conn, cart_id).await?;
            Ok(cart_id)
        }
        _ => {
            let cart_id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO edge.carts (cart_id, user_id, status) VALUES ($1, $2, 'open')",
            )
            .bind(cart_id)
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
            Ok(cart_id)
        }
    }
}

/// Unlocks a cart whose order failed: a decline must never strand the cart.
pub(crate) async fn reopen(conn: &mut PgConnection, cart_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE edge.carts SET status = 'open', order_id = NULL, updated_at = now() WHERE cart_id = $1",
    )
    .bind(cart_id)
    .execute(conn)
    .await?;
    Ok(())
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
    let mut tx = pool.begin().await?;
    let cart_id = open_cart_for_update(&mut tx, user_id).await?;
    check_currency(&mut tx, cart_id, product, catalog).await?;
    let updated = sqlx::query(&format!(
        "INSERT INTO edge.cart_items (cart_id, sku, qty) SELECT $1, $2, $3 WHERE {ROOM_FOR_LINE}
         ON CONFLICT (cart_id, sku) DO UPDATE SET qty = edge.cart_items.qty + EXCLUDED.qty
         WHERE edge.cart_items.qty + EXCLUDED.qty <= $4"
    ))
    .bind(cart_id)
    .bind(product.sku.as_str())
    .bind(qty.get())
    .bind(Quantity::MAX)
    .bind(limits.max_lines)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Err(refusal(&mut tx, cart_id, product, limits).await?);
    }
    tx.commit().await?;
    view(pool, cart_id, catalog, None).await
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
    let mut tx = pool.begin().await?;
    let cart_id = open_cart_for_update(&mut tx, user_id).await?;
    match qty {
        Some(qty) => {
            check_currency(&mut tx, cart_id, product, catalog).await?;
            let updated = sqlx::query(&format!(
                "INSERT INTO edge.cart_items (cart_id, sku, qty) SELECT $1, $2, $3 WHERE {ROOM_FOR_LINE}
                 ON CONFLICT (cart_id, sku) DO UPDATE SET qty = EXCLUDED.qty"
            ))
            .bind(cart_id)
            .bind(product.sku.as_str())
            .bind(qty.get())
            .bind(Quantity::MAX)
            .bind(limits.max_lines)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 0 {
                return Err(refusal(&mut tx, cart_id, product, limits).await?);
            }
        }
        None => {
            sqlx::query("DELETE FROM edge.cart_items WHERE cart_id = $1 AND sku = $2")
                .bind(cart_id)
                .bind(product.sku.as_str())
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    view(pool, cart_id, catalog, None).await
}

/// Removes a line; removing a line that is not there is an error the caller can see.
pub async fn remove_item(
    pool: &PgPool,
    user_id: &str,
    sku: &Sku,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    let mut tx = pool.begin().await?;
    let cart_id = open_cart_for_update(&mut tx, user_id).await?;
    let removed = sqlx::query("DELETE FROM edge.cart_items WHERE cart_id = $1 AND sku = $2")
        .bind(cart_id)
        .bind(sku.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if removed == 0 {
        return Err(CartError::NotInCart(sku.to_string()));
    }
    tx.commit().await?;
    view(pool, cart_id, catalog, None).await
}

/// The caller's open cart (created empty if there is none).
pub async fn current(
    pool: &PgPool,
    user_id: &str,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    let mut tx = pool.begin().await?;
    let cart_id = open_cart_for_update(&mut tx, user_id).await?;
    tx.commit().await?;
    view(pool, cart_id, catalog, None).await
}

/// A cart holds one currency: the other lines' prices come from the catalog (its cache).
async fn check_currency(
    conn: &mut PgConnection,
    cart_id: Uuid,
    product: &Product,
    catalog: &CatalogCache,
) -> Result<(), CartError> {
    let others: Vec<(String,)> =
        sqlx::query_as("SELECT sku FROM edge.cart_items WHERE cart_id = $1 AND sku <> $2")
            .bind(cart_id)
            .bind(product.sku.as_str())
            .fetch_all(conn)
            .await?;
    let skus: Vec<String> = others.into_iter().map(|(sku,)| sku).collect();
    let wanted = product.price.currency();
    let other = catalog
        .get_many(&skus)
        .await?
        .into_iter()
        .map(|p| p.price.currency())
        .find(|c| *c != wanted);
    match other {
        Some(cart) => Err(CartError::CurrencyMismatch {
            sku: product.sku.to_string(),
            cart: cart.code().to_owned(),
            product: wanted.code().to_owned(),
        }),
        None => Ok(()),
    }
}

/// Where a quote or a checkout ships to.
pub struct ShipTo<'a> {
    pub rates: &'a DestinationRates,
    pub method: &'a str,
}

/// Prices a cart at current catalog prices (from the cache when given, else the database),
/// with its promotion and, for a quote or a checkout, the destination's tax and shipping.
pub(crate) async fn price_cart(
    conn: &mut PgConnection,
    cart_id: Uuid,
    catalog: Option<&CatalogCache>,
    ship_to: Option<ShipTo<'_>>,
) -> Result<Option<Priced>, CartError> {
    // The promo code rides along with the lines: one round trip for both.
    let rows: Vec<(Option<String>, Option<String>, Option<i32>)> = sqlx::query_as(
        "SELECT c.promo_code, i.sku, i.qty FROM edge.carts c
         LEFT JOIN edge.cart_items i ON i.cart_id = c.cart_id
         WHERE c.cart_id = $1 ORDER BY i.added_at, i.sku",
    )
    .bind(cart_id)
    .fetch_all(&mut *conn)
    .await?;
    let code = rows.first().and_then(|(code, _, _)| code.clone());
    let items: Vec<(String, i32)> = rows
        .into_iter()
        .filter_map(|(_, sku, qty)| Some((sku?, qty?)))
        .collect();
    if items.is_empty() {
        return Ok(None);
    }
    let skus: Vec<String> = items.iter().map(|(s, _)| s.clone()).collect();
    let found = match catalog {
        Some(cache) => cache.get_many(&skus).await?,
        None => catalog::get_many_in(conn, &skus).await?,
    };
    let products: HashMap<String, Product> =
        found.into_iter().map(|p| (p.sku.to_string(), p)).collect();
    let mut currency: Option<Currency> = None;
    let mut lines = Vec::with_capacity(items.len());
    for (sku, qty) in items {
        let product = products
            .get(&sku)
            .ok_or(CartError::UnknownSku(sku.clone()))?;
        let this = product.price.currency();
        match currency {
            Some(c) if c != this => {
                return Err(CartError::CurrencyMismatch {
                    sku,
                    cart: c.code().to_owned(),
                    product: this.code().to_owned(),
                })
            }
            _ => currency = Some(this),
        }
        let qty =
            Quantity::new(i64::from(qty)).map_err(|_| CartError::TooMany { sku: sku.clone() })?;
        lines.push(LineInput {
            sku: product.sku.clone(),
            qty,
            unit_price: product.price,
            tax_code: product.tax_code,
            weight_grams: product.weight_grams,
        });
    }
    let Some(currency) = currency else {
        return Ok(None);
    };
    let mut unusable = None;
    let promo = match code {
        None => None,
        Some(code) => match promo::get(conn, &code).await? {
            None => {
                unusable = Some(PromoOutcome {
                    code,
                    applied: false,
                    reason: Some("promo_not_found"),
                });
                None
            }
            Some(p) => match p.unusable_at(chrono::Utc::now()) {
                Some(reason) => {
                    unusable = Some(PromoOutcome {
                        code: p.code,
                        applied: false,
                        reason: Some(reason),
                    });
                    None
                }
                None => Some(p),
            },
        },
    };
    let destination = match ship_to {
        None => None,
        Some(ship_to) => {
            let shipping = ship_to
                .rates
                .shipping(ship_to.method, currency.code())
                .ok_or_else(|| {
                    CartError::ShippingUnavailable(format!(
                        "no {} shipping in {} to this address",
                        ship_to.method,
                        currency.code()
                    ))
                })?;
            Some(Destination {
                tax: ship_to.rates.tax,
                shipping,
            })
        }
    };
    let mut priced = pricing::price(currency, lines, promo.as_ref(), destination.as_ref())
        .map_err(|e| CartError::ShippingUnavailable(e.to_string()))?;
    if unusable.is_some() {
        priced.promo = unusable;
    }
    Ok(Some(priced))
}

async fn view(
    pool: &PgPool,
    cart_id: Uuid,
    catalog: &CatalogCache,
    ship_to: Option<ShipTo<'_>>,
) -> Result<CartView, CartError> {
    let mut conn = pool.acquire().await?;
    Ok(CartView {
        cart_id,
        priced: price_cart(&mut conn, cart_id, Some(catalog), ship_to).await?,
    })
}

/// The caller's open cart priced for a destination.
pub async fn quote(
    pool: &PgPool,
    user_id: &str,
    catalog: &CatalogCache,
    ship_to: ShipTo<'_>,
) -> Result<CartView, CartError> {
    let mut tx = pool.begin().await?;
    let cart_id = open_cart_for_update(&mut tx, user_id).await?;
    tx.commit().await?;
    view(pool, cart_id, catalog, Some(ship_to)).await
}

/// Applies a promotion code to the caller's cart (replacing any other), after checking that
/// it can be used now, by this customer, on this cart.
pub async fn apply_promo(
    pool: &PgPool,
    user_id: &str,
    code: &str,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    let refuse = |code: &'static str, message: &str| CartError::Promo {
        code,
        message: message.to_owned(),
    };
    let mut tx = pool.begin().await?;
    let cart_id = open_cart_for_update(&mut tx, user_id).await?;
    let promo = promo::get(&mut tx, code)
        .await?
        .ok_or_else(|| refuse("promo_not_found", "no such promotion code"))?;
    match promo.unusable_at(chrono::Utc::now()) {
        Some("promo_not_started") => {
            return Err(refuse(
                "promo_not_started",
                "this promotion has not started yet",
            ))
        }
        Some("promo_expired") => return Err(refuse("promo_expired", "this promotion has ended")),
        Some(_) => return Err(refuse("promo_exhausted", "this promotion has been used up")),
        None => {}
    }
    if let Some(limit) = promo.per_customer_limit {
        if promo::customer_uses(&mut tx, &promo.code, user_id).await? >= i64::from(limit) {
            return Err(refuse(
                "promo_limit_reached",
                "you have used this promotion as often as allowed",
            ));
        }
    }
    sqlx::query("UPDATE edge.carts SET promo_code = $2, updated_at = now() WHERE cart_id = $1")
        .bind(cart_id)
        .bind(&promo.code)
        .execute(&mut *tx)
        .await?;
    let priced = price_cart(&mut tx, cart_id, Some(catalog), None).await?;
    // An empty cart has nothing eligible yet.
    let reason = match &priced {
        None => Some("promo_not_applicable"),
        Some(p) => p.promo.as_ref().and_then(|o| o.reason),
    };
    match reason {
        Some("promo_min_subtotal") => {
            return Err(refuse(
                "promo_min_subtotal",
                "the cart is below this promotion's minimum subtotal",
            ))
        }
        Some("promo_not_applicable") => {
            return Err(refuse(
                "promo_not_applicable",
                "nothing in the cart is eligible",
            ))
        }
        _ => {}
    }
    tx.commit().await?;
    Ok(CartView { cart_id, priced })
}

/// Removes the promotion code from the caller's cart.
pub async fn remove_promo(
    pool: &PgPool,
    user_id: &str,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    let mut tx = pool.begin().await?;
    let cart_id = open_cart_for_update(&mut tx, user_id).await?;
    sqlx::query("UPDATE edge.carts SET promo_code = NULL, updated_at = now() WHERE cart_id = $1")
        .bind(cart_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    view(pool, cart_id, catalog, None).await
}
