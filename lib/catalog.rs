//! The catalog: products and their current prices (owned by the edge).

use rust_decimal::Decimal;
use sqlx::PgPool;

use crate::domain::{Currency, Money, Sku};

/// A product as sold now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub sku: Sku,
    pub name: String,
    pub price: Money,
    pub weight_grams: i32,
}

#[derive(sqlx::FromRow)]
struct ProductRow {
    sku: String,
    name: String,
    price: Decimal,
    currency: String,
    weight_grams: i32,
}

impl ProductRow {
    fn into_product(self) -> Option<Product> {
        let currency = Currency::parse(self.currency.trim()).ok()?;
        Some(Product {
            sku: Sku::parse(&self.sku).ok()?,
            name: self.name,
            price: Money::rounded(self.price, currency),
            weight_grams: self.weight_grams,
        })
    }
}

/// Creates or replaces a product.
pub async fn upsert(pool: &PgPool, product: &Product) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO catalog.products (sku, name, price, currency, weight_grams)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name, price = EXCLUDED.price,
             currency = EXCLUDED.currency, weight_grams = EXCLUDED.weight_grams, updated_at = now()",
    )
    .bind(product.sku.as_str())
    .bind(&product.name)
    .bind(product.price.amount())
    .bind(product.price.currency().code())
    .bind(product.weight_grams)
    .execute(pool)
    .await?;
    Ok(())
}

/// One product, if it exists.
pub async fn get(pool: &PgPool, sku: &Sku) -> Result<Option<Product>, sqlx::Error> {
    let row: Option<ProductRow> = sqlx::query_as(
        "SELECT sku, name, price, currency, weight_grams FROM catalog.products WHERE sku = $1",
    )
    .bind(sku.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(ProductRow::into_product))
}

/// The products among `skus` that exist.
pub async fn get_many_in(
    conn: &mut sqlx::PgConnection,
    skus: &[String],
) -> Result<Vec<Product>, sqlx::Error> {
    let rows: Vec<ProductRow> = sqlx::query_as(
        "SELECT sku, name, price, currency, weight_grams FROM catalog.products
         WHERE sku = ANY($1)",
    )
    .bind(skus)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(ProductRow::into_product)
        .collect())
}
