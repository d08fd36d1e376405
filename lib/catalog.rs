//! The catalog: products and their current prices (owned by the edge), and the in-process
//! cache every edge keeps of them. An admin change publishes `catalog.changed.<sku>` on NATS
//! (core pub/sub: every edge instance hears it) and each instance drops that product, so a
//! new price shows in the next cart read everywhere, not after the TTL.

use std::time::Duration;

use futures::StreamExt;
use moka::future::Cache;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::domain::{Currency, Money, Sku};
use crate::pricing::TaxCode;

/// Subject prefix of catalog change notices: `catalog.changed.<sku token>`.
pub const CHANGED_PREFIX: &str = "catalog.changed";

/// A SKU as one subject token. SKUs may contain `.`, the subject separator (and `..` or a
/// leading dot would make an invalid subject), so dots travel as `~`, which SKUs never hold.
pub fn sku_token(sku: &Sku) -> String {
    sku.as_str().replace('.', "~")
}

/// The SKU a subject token names.
pub fn sku_from_token(token: &str) -> String {
    token.replace('~', ".")
}
/// Subject of tax or shipping changes.
pub const RATES_CHANGED: &str = "pricing.changed";

/// A product as sold now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub sku: Sku,
    pub name: String,
    pub price: Money,
    pub weight_grams: i32,
    pub tax_code: TaxCode,
    /// Inactive products stay in carts but cannot be added or checked out.
    pub active: bool,
}

/// A `catalog.products` row as read, by this module or by a statement of another service
/// that joins `catalog.product(sku)`.
#[derive(sqlx::FromRow)]
pub(crate) struct ProductRow {
    pub sku: String,
    pub name: String,
    pub price: Decimal,
    pub currency: String,
    pub weight_grams: i32,
    pub tax_code: String,
    pub active: bool,
}

impl ProductRow {
    /// The product, or `None` if the row holds what no product can (an unknown currency).
    pub fn into_product(self) -> Option<Product> {
        let currency = Currency::parse(self.currency.trim()).ok()?;
        Some(Product {
            sku: Sku::parse(&self.sku).ok()?,
            name: self.name,
            price: Money::rounded(self.price, currency),
            weight_grams: self.weight_grams,
            tax_code: TaxCode::parse(&self.tax_code).unwrap_or(TaxCode::Standard),
            active: self.active,
        })
    }
}

const SELECT: &str =
    "SELECT sku, name, price, currency, weight_grams, tax_code, active FROM catalog.products";

/// Creates or replaces a product.
pub async fn upsert(pool: &PgPool, product: &Product) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO catalog.products (sku, name, price, currency, weight_grams, tax_code, active)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name, price = EXCLUDED.price,
             currency = EXCLUDED.currency, weight_grams = EXCLUDED.weight_grams,
             tax_code = EXCLUDED.tax_code, active = EXCLUDED.active, updated_at = now()",
    )
    .bind(product.sku.as_str())
    .bind(&product.name)
    .bind(product.price.amount())
    .bind(product.price.currency().code())
    .bind(product.weight_grams)
    .bind(product.tax_code.as_str())
    .bind(product.active)
    .execute(pool)
    .await?;
    Ok(())
}

/// One product, from the database.
pub async fn get(pool: &PgPool, sku: &Sku) -> Result<Option<Product>, sqlx::Error> {
    let row: Option<ProductRow> = sqlx::query_as(&format!("{SELECT} WHERE sku = $1"))
        .bind(sku.as_str())
        .fetch_optional(pool)
        .await?;
    Ok(row.and_then(ProductRow::into_product))
}

/// The edge's bounded, expiring cache of products (absent ones too).
#[derive(Clone)]
pub struct CatalogCache {
    pool: PgPool,
    cache: Cache<String, Option<Product>>,
}

impl CatalogCache {
    /// A cache of at most `capacity` products, each kept at most `ttl`.
    pub fn new(pool: PgPool, capacity: u64, ttl: Duration) -> Self {
        Self {
            pool,
            cache: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// One product.
    pub async fn get(&self, sku: &Sku) -> Result<Option<Product>, sqlx::Error> {
        let pool = self.pool.clone();
        let sku2 = sku.clone();
        self.cache
            .try_get_with(sku.to_string(), async move { get(&pool, &sku2).await })
            .await
            .map_err(owned)
    }

    /// The products among `skus` that exist.
    pub async fn get_many(&self, skus: &[String]) -> Result<Vec<Product>, sqlx::Error> {
        let mut out = Vec::with_capacity(skus.len());
        for raw in skus {
            if let Ok(sku) = Sku::parse(raw) {
                if let Some(p) = self.get(&sku).await? {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }

    /// Drops one product (after a change).
    pub async fn invalidate(&self, sku: &str) {
        self.cache.invalidate(sku).await;
    }
}

/// The cache shares one error between every caller that waited on the same read; each gets an
/// owned one that keeps what its answer depends on: a transient failure (the database away, a
/// cancelled statement, a serialization failure) stays transient, a 503 and not a 500, with
/// the shared error as its cause.
fn owned(shared: std::sync::Arc<sqlx::Error>) -> sqlx::Error {
    if crate::db::is_transient(&shared) {
        sqlx::Error::Io(std::io::Error::other(shared))
    } else {
        sqlx::Error::Protocol(shared.to_string())
    }
}

/// How long an admin change waits for NATS to take its notice. Bounded, because a change
/// is committed before it is announced and must be answered during a NATS outage too: a
/// notice that cannot go out only means the other edges see the change when their caches
/// expire (the TTL), as they would have before notices existed.
const ANNOUNCE_WITHIN: Duration = Duration::from_secs(2);

/// Announces a product change to every edge instance.
pub async fn announce_change(client: &async_nats::Client, sku: &Sku) {
    announce(client, format!("{CHANGED_PREFIX}.{}", sku_token(sku))).await;
}

/// Announces a tax or shipping change to every edge instance.
pub async fn announce_rates_change(client: &async_nats::Client) {
    announce(client, RATES_CHANGED.to_owned()).await;
}

/// Publishes an empty notice and waits, at most [`ANNOUNCE_WITHIN`], until the server has it.
async fn announce(client: &async_nats::Client, subject: String) {
    let sent = tokio::time::timeout(ANNOUNCE_WITHIN, async {
        client.publish(subject.clone(), bytes::Bytes::new()).await?;
        client.flush().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await;
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, %subject, "change not announced; caches expire by TTL");
        }
        Err(_) => tracing::warn!(
            %subject,
            "change not announced (NATS unreachable); caches expire by TTL"
        ),
    }
}

/// Drops cached products and rates when any instance announces a change, until shutdown.
pub async fn run_invalidation(
    client: async_nats::Client,
    products: CatalogCache,
    rates: crate::pricing::destination::RatesCache,
    shutdown: CancellationToken,
) {
    let subs = tokio::try_join!(
        client.subscribe(format!("{CHANGED_PREFIX}.*")),
        client.subscribe(RATES_CHANGED)
    );
    let (mut changed, mut rates_changed) = match subs {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to catalog changes; relying on TTLs");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(msg) = changed.next() => {
                if let Some(token) = msg.subject.strip_prefix(&format!("{CHANGED_PREFIX}.")) {
                    products.invalidate(&sku_from_token(token)).await;
                }
            }
            Some(_) = rates_changed.next() => rates.invalidate_all(),
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_skus_travel_as_one_subject_token() {
        for raw in ["TEE", "TEE.RED.L", "..x", "a.b-c_d."] {
            let sku = Sku::parse(raw).expect("sku");
            let token = sku_token(&sku);
            assert!(!token.contains('.') && !token.is_empty(), "{token}");
            assert_eq!(sku_from_token(&token), raw);
        }
    }
}
