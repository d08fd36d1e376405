//! Carts (owned by the edge): one open cart per user, locked to an order at checkout and
//! unlocked again if that order fails.
//!
//! - [`items`]: adding, changing and removing lines.
//! - [`promo`]: a promotion code on the cart.
//! - [`pricing`]: a cart's lines at current prices, with its promotion, tax and shipping.

pub mod items;
pub mod pricing;
pub mod promo;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::catalog::CatalogCache;
use crate::domain::Quantity;
use crate::pricing::Priced;

pub use items::{add_item, remove_item, set_item, CartLimits};
pub use pricing::{quote, ShipTo};
pub use promo::{apply_promo, remove_promo};

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
    #[error("this cart is being changed by another request; try again")]
    Contended,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The caller's open cart, locked for the rest of the transaction.
pub(crate) struct OpenCart {
    pub cart_id: Uuid,
    pub promo_code: Option<String>,
}

/// How often a buyer's first request retries after losing the race to create the cart to a
/// concurrent request of the same buyer (each retry finds the winner's cart).
const OPEN_ATTEMPTS: usize = 3;

/// The caller's open cart, created or reopened as needed, locked for this transaction.
///
/// One statement in the common cases. It locks the buyer's latest cart first, so one buyer's
/// cart changes and checkout are serialized on that row; when there is no cart to lock, the
/// partial unique index "one open cart per user" decides which of two first requests makes it.
async fn open_cart_for_update(
    conn: &mut PgConnection,
    user_id: &str,
) -> Result<OpenCart, CartError> {
    for _ in 0..OPEN_ATTEMPTS {
        // A checked-out cart whose order failed is the buyer's cart again; whether it failed
        // is the orders service's to say (`orders.has_failed`).
        let rows: Vec<(Uuid, String, Option<String>, bool)> = sqlx::query_as(
            "WITH latest AS (
                 SELECT cart_id, status, promo_code,
                        status <> 'open' AND order_id IS NOT NULL
                            AND orders.has_failed(order_id) AS failed
                 FROM edge.carts WHERE user_id = $1
                 ORDER BY created_at DESC LIMIT 1 FOR UPDATE),
             made AS (
                 INSERT INTO edge.carts (cart_id, user_id, status)
                 SELECT $2, $1, 'open'
                 WHERE NOT EXISTS (SELECT 1 FROM latest WHERE status = 'open' OR failed)
                 ON CONFLICT (user_id) WHERE status = 'open' DO NOTHING
                 RETURNING cart_id)
             SELECT cart_id, status, promo_code, failed FROM latest
             UNION ALL SELECT cart_id, 'new', NULL, false FROM made",
        )
        .bind(user_id)
        .bind(Uuid::now_v7())
        .fetch_all(&mut *conn)
        .await?;
        if let Some((cart_id, _, _, _)) = rows.iter().find(|r| r.1 == "new") {
            return Ok(OpenCart {
                cart_id: *cart_id,
                promo_code: None,
            });
        }
        match rows.into_iter().next() {
            Some((cart_id, status, promo_code, _)) if status == "open" => {
                return Ok(OpenCart {
                    cart_id,
                    promo_code,
                })
            }
            Some((cart_id, _, promo_code, true)) => {
                reopen(conn, cart_id).await?;
                return Ok(OpenCart {
                    cart_id,
                    promo_code,
                });
            }
            // Another request of this buyer made the open cart after this statement's
            // snapshot: the next attempt finds it.
            _ => {}
        }
    }
    Err(CartError::Contended)
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

/// The caller's open cart (created empty if there is none).
pub async fn current(
    pool: &PgPool,
    user_id: &str,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    pricing::open_and_view(pool, user_id, catalog, None).await
}
