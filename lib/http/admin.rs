//! Admin routes: products and stock.

use axum::extract::{Path, State};
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{Admin, ApiJson};
use super::views::money;
use super::AppState;
use crate::catalog::{self, Product};
use crate::domain::{is_clean_text, Currency, Money, Sku};
use crate::inventory::{self, Stock};

/// `PUT /api/admin/products/{sku}` body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductBody {
    name: String,
    #[serde(with = "rust_decimal::serde::str")]
    price: Decimal,
    currency: String,
    weight_grams: i64,
}

/// A product as the API shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductJson {
    sku: String,
    name: String,
    price: String,
    currency: String,
    weight_grams: i32,
}

/// Stock as the API shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StockJson {
    sku: String,
    on_hand: i32,
    reserved: i32,
    available: i32,
}

/// `PUT /api/admin/stock/{sku}` body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StockBody {
    on_hand: i64,
}

pub(super) fn parse_sku(raw: &str) -> Result<Sku, ApiError> {
    Sku::parse(raw).map_err(|e| ApiError::unprocessable("invalid_sku", e.to_string()))
}

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
    let product = Product {
        sku,
        name,
        price,
        weight_grams,
    };
    catalog::upsert(&state.pool, &product).await?;
    Ok(Json(ProductJson {
        sku: product.sku.to_string(),
        name: product.name,
        price: money(price.amount(), currency.code()),
        currency: currency.code().to_owned(),
        weight_grams,
    }))
}

fn stock_json(sku: &Sku, stock: Stock) -> Json<StockJson> {
    Json(StockJson {
        sku: sku.to_string(),
        on_hand: stock.on_hand,
        reserved: stock.reserved,
        available: stock.available(),
    })
}

pub async fn put_stock(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(sku): Path<String>,
    ApiJson(body): ApiJson<StockBody>,
) -> Result<Json<StockJson>, ApiError> {
    let sku = parse_sku(&sku)?;
    tracing::info!(admin = %admin.user_id, %sku, on_hand = body.on_hand, "stock set");
    let on_hand = i32::try_from(body.on_hand)
        .ok()
        .filter(|n| (0..=1_000_000_000).contains(n))
        .ok_or_else(|| {
            ApiError::unprocessable("invalid_stock", "onHand must be 0 to 1000000000")
        })?;
    if catalog::get(&state.pool, &sku).await?.is_none() {
        return Err(ApiError::not_found(
            "unknown_sku",
            format!("no product with sku {sku}"),
        ));
    }
    let stock = inventory::set_on_hand(&state.pool, &sku, on_hand).await?;
    Ok(stock_json(&sku, stock))
}

pub async fn get_stock(
    State(state): State<AppState>,
    _admin: Admin,
    Path(sku): Path<String>,
) -> Result<Json<StockJson>, ApiError> {
    let sku = parse_sku(&sku)?;
    if catalog::get(&state.pool, &sku).await?.is_none() {
        return Err(ApiError::not_found(
            "unknown_sku",
            format!("no product with sku {sku}"),
        ));
    }
    let stock = inventory::get_stock(&state.pool, &sku).await?;
    Ok(stock_json(&sku, stock))
}
