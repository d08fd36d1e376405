//! Carts (owned by the edge): one open cart per user, locked to an order at checkout and
//! unlocked again if that order fails.
//!
//! - [`items`]: adding, changing and removing lines.
//! - [`promo`]: a promotion code on the cart.
//! - [`pricing`]: a cart's lines at current prices, with its promotion, tax and shipping.
//! - [`seen`]: what this edge last wrote to each cart, so a checkout can skip reading it.

pub mod items;
pub mod pricing;
pub mod promo;
pub mod seen;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::catalog::CatalogCache;
use crate::domain::Quantity;
use crate::pricing::Priced;

pub use items::{add_item, remove_item, set_item, CartLimits, Lines};
pub use pricing::{quote, ShipTo};
pub use promo::{apply_promo, remove_promo};
pub use seen::{SeenCart, SeenCarts};

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

/// The caller's open cart's id, created or reopened as needed, locked for this transaction.
///
/// One round trip: `edge.open_cart` (migration `20261126000004`) locks the buyer's latest
/// cart first, so one buyer's cart changes and checkout are serialized on that row; when
/// there is no cart to lock, the partial unique index "one open cart per user" decides which
/// of two first requests makes it, and the loser finds the winner's cart.
async fn open_cart_for_update(conn: &mut PgConnection, user_id: &str) -> Result<Uuid, CartError> {
    sqlx::query_scalar("SELECT cart FROM edge.open_cart($1, $2)")
        .bind(user_id)
        .bind(Uuid::now_v7())
        .fetch_one(&mut *conn)
        .await
        .map_err(contended)
}

/// A cart function's `serialization_failure` is a concurrent request of the same buyer that
/// kept winning: the caller may try again.
fn contended(e: sqlx::Error) -> CartError {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("40001") => CartError::Contended,
        _ => CartError::Database(e),
    }
}

/// The caller's open cart (created empty if there is none).
pub async fn current(
    pool: &PgPool,
    user_id: &str,
    catalog: &CatalogCache,
) -> Result<CartView, CartError> {
    pricing::open_and_view(pool, user_id, catalog, None).await
}
