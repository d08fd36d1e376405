//! A promotion code on the cart: applied after checking it can be used now, by this
//! customer, on this cart; removed on request.

use sqlx::Connection;

use super::pricing::{self, price_cart};
use super::{open_cart_for_update, CartError, CartView, Lines};
use crate::catalog::CatalogCache;
use crate::pricing::promo;

/// Applies a promotion code to the caller's cart (replacing any other), after checking that
/// it can be used now, by this customer, on this cart.
pub async fn apply_promo(
    lines: &Lines,
    user_id: &str,
    code: &str,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    let refuse = |code: &'static str, message: &str| CartError::Promo {
        code,
        message: message.to_owned(),
    };
    let mut tx = lines.pool().begin().await?;
    let cart_id = open_cart_for_update(&mut tx, user_id).await?;
    let promo = promo::get(&mut *tx, code)
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
    let priced = price_cart(&mut tx, cart_id, catalog, None).await?;
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
    lines.seen().forget(cart_id).await;
    Ok(CartView { cart_id, priced })
}

/// Removes the promotion code from the caller's cart.
pub async fn remove_promo(
    lines: &Lines,
    user_id: &str,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    let mut conn = lines.pool().acquire().await?;
    let mut tx = conn.begin().await?;
    let cart_id = open_cart_for_update(&mut tx, user_id).await?;
    sqlx::query("UPDATE edge.carts SET promo_code = NULL, updated_at = now() WHERE cart_id = $1")
        .bind(cart_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    lines.seen().forget(cart_id).await;
    pricing::view(&mut conn, cart_id, catalog, None).await
}
