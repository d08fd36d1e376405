//! Admin: products (every edge's catalog cache drops a changed one at once).

use axum::extract::{Path, State};
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::catalog::{self, Product};
use crate::domain::{is_clean_text, Currency, Money};
use crate::edge::http::error::ApiError;
use crate::edge::http::extract::{parse_sku, Admin, ApiJson};
use crate::edge::http::views::money;
use crate::edge::http::AppState;
use crate::pricing::TaxCode;

/// `PUT /api/admin/products/{sku}` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductBody {
    name: String,
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String, example = "12.50")]
    price: Decimal,
    currency: String,
    weight_grams: i64,
    #[serde(default)]
    tax_code: Option<String>,
    #[serde(default)]
    active: Option<bool>,
}

/// A product as the API shows it.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductJson {
    sku: String,
    name: String,
    price: String,
    currency: String,
    weight_grams: i32,
    tax_code: &'static str,
    active: bool,
}

/// Creates or replaces a product (every edge's cache drops it at once).
#[utoipa::path(put, path = "/api/admin/products/{sku}", tag = "admin", security(("bearer" = [])),
    params(("sku" = String, Path, description = "1 to 64 of [A-Za-z0-9._-]", pattern = r"^[A-Za-z0-9._-]{1,64}$")),
    request_body = ProductBody,
    responses((status = 200, description = "the product", body = ProductJson)))]
pub async fn put_product(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(sku): Path<String>,
    ApiJson(body): ApiJson<ProductBody>,
) -> Result<Json<ProductJson>, ApiError> {
    let sku = parse_sku(&sku)?;
    tracing::info!(admin = %admin.user_id, %sku, "product changed");
    let name = body.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 200 || !is_clean_text(&name) {
        return Err(ApiError::unprocessable(
            "invalid_name",
            "name must be 1 to 200 characters",
        ));
    }
    let currency = Currency::parse(&body.currency)
        .map_err(|e| ApiError::unprocessable("invalid_currency", e.to_string()))?;
    let price = Money::exact(body.price, currency)
        .filter(|m| m.amount() <= Decimal::from(1_000_000_000i64))
        .ok_or_else(|| {
            ApiError::unprocessable(
                "invalid_price",
                format!(
                    "price must be between 0 and 1000000000 with at most {} decimals",
                    currency.minor_units()
                ),
            )
        })?;
    let weight_grams = i32::try_from(body.weight_grams)
        .ok()
        .filter(|w| (0..=1_000_000).contains(w))
        .ok_or_else(|| {
            ApiError::unprocessable("invalid_weight", "weightGrams must be 0 to 1000000")
        })?;
    let tax_code = match body.tax_code.as_deref() {
        None => TaxCode::Standard,
        Some(code) => TaxCode::parse(code).ok_or_else(|| {
            ApiError::unprocessable(
                "invalid_tax_code",
                "taxCode must be standard, reduced or exempt",
            )
        })?,
    };
    let product = Product {
        sku,
        name,
        price,
        weight_grams,
        tax_code,
        active: body.active.unwrap_or(true),
    };
    catalog::upsert(&state.pool, &product).await?;
    // This instance at once, every other one through NATS.
    state.catalog.invalidate(product.sku.as_str()).await;
    catalog::announce_change(state.bus.client(), &product.sku).await;
    Ok(Json(ProductJson {
        sku: product.sku.to_string(),
        name: product.name,
        price: money(price.amount(), currency.code()),
        currency: currency.code().to_owned(),
        weight_grams,
        tax_code: tax_code.as_str(),
        active: product.active,
    }))
}
