//! Cart routes: the caller's open cart.

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;

use super::admin::parse_sku;
use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::views::CartJson;
use super::AppState;
use crate::cart;
use crate::catalog::{self, Product};
use crate::domain::{Quantity, Sku};

/// `POST /api/cart/items` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBody {
    sku: String,
    qty: serde_json::Value,
}

/// `PUT /api/cart/items/{sku}` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetBody {
    qty: serde_json::Value,
}

/// An integer quantity, or `invalid_quantity` (1.5, "2", -1 and 1001 alike).
fn quantity(value: &serde_json::Value, allow_zero: bool) -> Result<Option<Quantity>, ApiError> {
    let invalid = || {
        ApiError::unprocessable(
            "invalid_quantity",
            format!("qty must be an integer from 1 to {}", Quantity::MAX),
        )
    };
    let n = value.as_i64().ok_or_else(invalid)?;
    if allow_zero && n == 0 {
        return Ok(None);
    }
    Quantity::new(n).map(Some).map_err(|_| invalid())
}

async fn product(state: &AppState, sku: &Sku) -> Result<Product, ApiError> {
    catalog::get(&state.pool, sku)
        .await?
        .ok_or_else(|| ApiError::not_found("unknown_sku", format!("no product with sku {sku}")))
}

pub async fn get_cart(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Result<Json<CartJson>, ApiError> {
    Ok(Json(
        cart::current(&state.pool, &caller.user_id).await?.into(),
    ))
}

pub async fn add_item(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiJson(body): ApiJson<AddBody>,
) -> Result<Json<CartJson>, ApiError> {
    let sku = Sku::parse(&body.sku).map_err(|_| {
        ApiError::not_found("unknown_sku", format!("no product with sku {}", body.sku))
    })?;
    let qty = quantity(&body.qty, false)?.ok_or_else(|| {
        ApiError::unprocessable("invalid_quantity", "qty must be an integer from 1 to 1000")
    })?;
    let product = product(&state, &sku).await?;
    Ok(Json(
        cart::add_item(&state.pool, &caller.user_id, &product, qty)
            .await?
            .into(),
    ))
}

pub async fn set_item(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(sku): Path<String>,
    ApiJson(body): ApiJson<SetBody>,
) -> Result<Json<CartJson>, ApiError> {
    let sku = parse_sku(&sku)?;
    let qty = quantity(&body.qty, true)?;
    let product = product(&state, &sku).await?;
    Ok(Json(
        cart::set_item(&state.pool, &caller.user_id, &product, qty)
            .await?
            .into(),
    ))
}

pub async fn remove_item(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(sku): Path<String>,
) -> Result<Json<CartJson>, ApiError> {
    let sku = parse_sku(&sku)?;
    Ok(Json(
        cart::remove_item(&state.pool, &caller.user_id, &sku)
            .await?
            .into(),
    ))
}
