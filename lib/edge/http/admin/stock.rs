//! Admin: stock levels (restocks and count corrections).

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::catalog;
use crate::domain::Sku;
use crate::edge::http::error::ApiError;
use crate::edge::http::extract::{parse_sku, Admin, ApiJson};
use crate::edge::http::AppState;
use crate::inventory::{self, Stock};

/// Stock as the API shows it.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StockJson {
    sku: String,
    on_hand: i32,
    reserved: i32,
    available: i32,
}

/// `PUT /api/admin/stock/{sku}` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StockBody {
    on_hand: i64,
}

fn stock_json(sku: &Sku, stock: Stock) -> Json<StockJson> {
    Json(StockJson {
        sku: sku.to_string(),
        on_hand: stock.on_hand,
        reserved: stock.reserved,
        available: stock.available(),
    })
}

/// Sets a SKU's on-hand stock (a restock or a count correction).
#[utoipa::path(put, path = "/api/admin/stock/{sku}", tag = "admin", security(("bearer" = [])),
    params(("sku" = String, Path, description = "the product", pattern = r"^[A-Za-z0-9._-]{1,64}$")),
    request_body = StockBody,
    responses((status = 200, description = "the stock", body = StockJson)))]
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
    // A restock clears every edge's sold-out memory of the SKU: this edge's before it answers
    // (its own notice comes back later, if at all), the others' by the notice.
    state.sold_out.available(sku.as_str(), Some(stock.version));
    inventory::soldout::announce_available(state.bus.client(), sku.as_str(), stock.version);
    Ok(stock_json(&sku, stock))
}

/// A SKU's stock.
#[utoipa::path(get, path = "/api/admin/stock/{sku}", tag = "admin", security(("bearer" = [])),
    params(("sku" = String, Path, description = "the product", pattern = r"^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "the stock", body = StockJson)))]
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
