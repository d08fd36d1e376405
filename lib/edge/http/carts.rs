//! Cart routes: the caller's open cart.

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{parse_destination, parse_sku, ApiJson, Caller};
use super::views::CartJson;
use super::AppState;
use crate::catalog::Product;
use crate::domain::Address;
use crate::domain::{Quantity, Sku};
use crate::edge::cart;

/// `POST /api/cart/items` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddBody {
    sku: String,
    /// 1 to 1000.
    #[schema(value_type = i64, minimum = 1, maximum = 1000)]
    qty: serde_json::Value,
}

/// `PUT /api/cart/items/{sku}` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetBody {
    /// 0 (removes the line) to 1000.
    #[schema(value_type = i64, minimum = 0, maximum = 1000)]
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
    state
        .catalog
        .get(sku)
        .await?
        .ok_or_else(|| ApiError::not_found("unknown_sku", format!("no product with sku {sku}")))
}

/// The caller's open cart, priced now.
#[utoipa::path(get, path = "/api/cart", tag = "cart", security(("bearer" = [])),
    responses((status = 200, description = "the cart", body = CartJson)))]
pub async fn get_cart(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Result<Json<CartJson>, ApiError> {
    Ok(Json(
        cart::current(&state.pool, &caller.user_id, &state.catalog)
            .await?
            .into(),
    ))
}

/// Adds units of a product to the caller's open cart (creating it if needed).
#[utoipa::path(post, path = "/api/cart/items", tag = "cart", security(("bearer" = [])),
    request_body = AddBody,
    responses((status = 200, description = "the cart", body = CartJson)))]
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
    if state.sold_out.refuses(sku.as_str(), i64::from(qty.get())) {
        return Err(super::error::out_of_stock(format!("{sku} is sold out")));
    }
    let _slot = state.admission.enter().await?;
    let product = product(&state, &sku).await?;
    Ok(Json(
        cart::add_item(
            &state.lines,
            &caller.user_id,
            &product,
            qty,
            &state.cart_limits,
            &state.catalog,
        )
        .await?
        .into(),
    ))
}

/// Sets a line's quantity (0 removes it).
#[utoipa::path(put, path = "/api/cart/items/{sku}", tag = "cart", security(("bearer" = [])),
    params(("sku" = String, Path, description = "the product", pattern = r"^[A-Za-z0-9._-]{1,64}$")),
    request_body = SetBody,
    responses((status = 200, description = "the cart", body = CartJson)))]
pub async fn set_item(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(sku): Path<String>,
    ApiJson(body): ApiJson<SetBody>,
) -> Result<Json<CartJson>, ApiError> {
    let sku = parse_sku(&sku)?;
    let qty = quantity(&body.qty, true)?;
    if let Some(qty) = qty {
        if state.sold_out.refuses(sku.as_str(), i64::from(qty.get())) {
            return Err(super::error::out_of_stock(format!("{sku} is sold out")));
        }
    }
    let product = product(&state, &sku).await?;
    Ok(Json(
        cart::set_item(
            &state.lines,
            &caller.user_id,
            &product,
            qty,
            &state.cart_limits,
            &state.catalog,
        )
        .await?
        .into(),
    ))
}

/// Removes a line.
#[utoipa::path(delete, path = "/api/cart/items/{sku}", tag = "cart", security(("bearer" = [])),
    params(("sku" = String, Path, description = "the product", pattern = r"^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "the cart", body = CartJson)))]
pub async fn remove_item(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(sku): Path<String>,
) -> Result<Json<CartJson>, ApiError> {
    let sku = parse_sku(&sku)?;
    Ok(Json(
        cart::remove_item(&state.lines, &caller.user_id, &sku, &state.catalog)
            .await?
            .into(),
    ))
}

/// `POST /api/cart/promo` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoBody {
    code: String,
}

/// Applies a promotion code to the cart (replacing any other).
#[utoipa::path(post, path = "/api/cart/promo", tag = "cart", security(("bearer" = [])),
    request_body = PromoBody,
    responses((status = 200, description = "the cart", body = CartJson)))]
pub async fn apply_promo(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiJson(body): ApiJson<PromoBody>,
) -> Result<Json<CartJson>, ApiError> {
    let code = body.code.trim();
    if code.is_empty() || code.len() > 64 || !crate::domain::is_clean_text(code) {
        return Err(ApiError::unprocessable(
            "promo_not_found",
            "no such promotion code",
        ));
    }
    Ok(Json(
        cart::apply_promo(&state.lines, &caller.user_id, code, &state.catalog)
            .await?
            .into(),
    ))
}

/// Removes the cart's promotion code.
#[utoipa::path(delete, path = "/api/cart/promo", tag = "cart", security(("bearer" = [])),
    responses((status = 200, description = "the cart", body = CartJson)))]
pub async fn remove_promo(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Result<Json<CartJson>, ApiError> {
    Ok(Json(
        cart::remove_promo(&state.lines, &caller.user_id, &state.catalog)
            .await?
            .into(),
    ))
}

/// `POST /api/cart/quote` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuoteBody {
    address: Address,
    #[serde(default)]
    shipping_method: Option<String>,
}

/// Prices the cart for a destination and shipping method (tax and shipping included).
#[utoipa::path(post, path = "/api/cart/quote", tag = "cart", security(("bearer" = [])),
    request_body = QuoteBody,
    responses((status = 200, description = "the priced cart", body = CartJson)))]
pub async fn quote(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiJson(body): ApiJson<QuoteBody>,
) -> Result<Json<CartJson>, ApiError> {
    let (address, method) = parse_destination(body.address, body.shipping_method)?;
    let rates = state
        .rates
        .get(&address.country, address.region.as_deref())
        .await?;
    let ship_to = cart::ShipTo {
        rates: &rates,
        method: &method,
    };
    let view = cart::quote(&state.pool, &caller.user_id, &state.catalog, ship_to).await?;
    let mut json: CartJson = view.into();
    json.shipping_method = Some(method);
    Ok(Json(json))
}
