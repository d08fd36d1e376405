//! A cart at current prices: its lines through the catalog, its promotion, and for a quote or
//! a checkout the destination's tax and shipping.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{open_cart_for_update, CartError, CartView};
use crate::catalog::{CatalogCache, Product};
use crate::domain::{Currency, Quantity};
use crate::pricing::destination::DestinationRates;
use crate::pricing::{self as prices, promo, Destination, LineInput, Priced, PromoOutcome};

/// A cart line as stored: SKU and quantity.
pub(crate) type Item = (String, i32);

/// Where the prices of a cart's products come from.
pub(crate) enum Products<'a> {
    /// The edge's catalog cache: for showing a cart.
    Cache(&'a CatalogCache),
    /// Read from the database with the lines: what a checkout charges.
    Read(HashMap<String, Product>),
}

/// Where a quote or a checkout ships to.
pub struct ShipTo<'a> {
    pub rates: &'a DestinationRates,
    pub method: &'a str,
}

/// Prices a cart at the catalog cache's prices, with its promotion and, for a quote, the
/// destination's tax and shipping.
pub(crate) async fn price_cart(
    conn: &mut PgConnection,
    cart_id: Uuid,
    catalog: &CatalogCache,
    ship_to: Option<ShipTo<'_>>,
) -> Result<Option<Priced>, CartError> {
    let (code, items) = lines(conn, cart_id).await?;
    price_lines(conn, code, items, Products::Cache(catalog), ship_to).await
}

/// The cart's promotion code and lines, in the order they were added (one round trip).
pub(crate) async fn lines(
    conn: &mut PgConnection,
    cart_id: Uuid,
) -> Result<(Option<String>, Vec<Item>), sqlx::Error> {
    let rows: Vec<(Option<String>, Option<String>, Option<i32>)> = sqlx::query_as(
        "SELECT c.promo_code, i.sku, i.qty FROM edge.carts c
         LEFT JOIN edge.cart_items i ON i.cart_id = c.cart_id
         WHERE c.cart_id = $1 ORDER BY i.added_at, i.sku",
    )
    .bind(cart_id)
    .fetch_all(&mut *conn)
    .await?;
    let code = rows.first().and_then(|(code, _, _)| code.clone());
    let items = rows
        .into_iter()
        .filter_map(|(_, sku, qty)| Some((sku?, qty?)))
        .collect();
    Ok((code, items))
}

/// Prices lines already read (see [`price_cart`]); `db` is read only for a promotion code.
pub(crate) async fn price_lines(
    db: impl sqlx::PgExecutor<'_>,
    code: Option<String>,
    items: Vec<Item>,
    products: Products<'_>,
    ship_to: Option<ShipTo<'_>>,
) -> Result<Option<Priced>, CartError> {
    if items.is_empty() {
        return Ok(None);
    }
    let products: HashMap<String, Product> = match products {
        Products::Cache(cache) => {
            let skus: Vec<String> = items.iter().map(|(s, _)| s.clone()).collect();
            cache
                .get_many(&skus)
                .await?
                .into_iter()
                .map(|p| (p.sku.to_string(), p))
                .collect()
        }
        Products::Read(read) => read,
    };
    let Some((currency, lines)) = line_inputs(items, &products)? else {
        return Ok(None);
    };
    let (promo, unusable) = promotion(db, code).await?;
    let destination = ship_to
        .as_ref()
        .map(|to| destination(to, currency))
        .transpose()?;
    let mut priced = prices::price(currency, lines, promo.as_ref(), destination.as_ref())
        .map_err(|e| CartError::ShippingUnavailable(e.to_string()))?;
    if unusable.is_some() {
        priced.promo = unusable;
    }
    Ok(Some(priced))
}

/// Each line with its product as sold now, in the cart's one currency; `None` for no lines.
fn line_inputs(
    items: Vec<Item>,
    products: &HashMap<String, Product>,
) -> Result<Option<(Currency, Vec<LineInput>)>, CartError> {
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
    Ok(currency.map(|c| (c, lines)))
}

/// The cart's promotion if it can be used now; otherwise why not, for the cart to show.
async fn promotion(
    db: impl sqlx::PgExecutor<'_>,
    code: Option<String>,
) -> Result<(Option<promo::Promo>, Option<PromoOutcome>), CartError> {
    let Some(code) = code else {
        return Ok((None, None));
    };
    let unusable = |code, reason| PromoOutcome {
        code,
        applied: false,
        reason: Some(reason),
    };
    Ok(match promo::get(db, &code).await? {
        None => (None, Some(unusable(code, "promo_not_found"))),
        Some(p) => match p.unusable_at(chrono::Utc::now()) {
            Some(reason) => (None, Some(unusable(p.code, reason))),
            None => (Some(p), None),
        },
    })
}

/// Tax and shipping for where the order goes, in the cart's currency.
fn destination(ship_to: &ShipTo<'_>, currency: Currency) -> Result<Destination, CartError> {
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
    Ok(Destination {
        tax: ship_to.rates.tax,
        shipping,
    })
}

/// The cart priced now, from the edge's catalog cache.
pub(super) async fn view(
    conn: &mut PgConnection,
    cart_id: Uuid,
    catalog: &CatalogCache,
    ship_to: Option<ShipTo<'_>>,
) -> Result<CartView, CartError> {
    Ok(CartView {
        cart_id,
        priced: price_cart(conn, cart_id, catalog, ship_to).await?,
    })
}

/// The caller's open cart priced for a destination.
pub async fn quote(
    pool: &PgPool,
    user_id: &str,
    catalog: &CatalogCache,
    ship_to: ShipTo<'_>,
) -> Result<CartView, CartError> {
    open_and_view(pool, user_id, catalog, Some(ship_to)).await
}

/// The caller's open cart (made if there is none), priced, for a destination if given.
pub(super) async fn open_and_view(
    pool: &PgPool,
    user_id: &str,
    catalog: &CatalogCache,
    ship_to: Option<ShipTo<'_>>,
) -> Result<CartView, CartError> {
    let mut conn = pool.acquire().await?;
    // One statement on its own: the cart's lock lasts only while it is found or made.
    let cart_id = open_cart_for_update(&mut conn, user_id).await?;
    view(&mut conn, cart_id, catalog, ship_to).await
}
