//! A cart this edge wrote moments ago, priced from its memory (`SeenCarts`) and its product
//! cache instead of a read. Neither is trusted for what gets charged: the acceptance checks
//! the lines and each product as priced under the cart's lock, and any difference sends the
//! checkout back to the read.

use super::{CheckoutError, Snapshot, Source};
use crate::catalog::CatalogCache;
use crate::edge::cart::SeenCart;

/// The remembered cart with its products as the cache has them.
pub(super) async fn snapshot(
    catalog: &CatalogCache,
    seen: &SeenCart,
) -> Result<Snapshot, CheckoutError> {
    let skus: Vec<String> = seen.items.iter().map(|(sku, _)| sku.clone()).collect();
    let products = catalog
        .get_many(&skus)
        .await?
        .into_iter()
        .map(|p| (p.sku.to_string(), p))
        .collect();
    Ok(Snapshot {
        code: seen.promo_code.clone(),
        items: seen.items.clone(),
        products,
        source: Source::Remembered,
    })
}
