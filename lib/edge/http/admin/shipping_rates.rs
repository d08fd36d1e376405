//! Admin: shipping zones, methods and weight bands.

use axum::extract::{Path, State};
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{parse_country, rates_changed};
use crate::domain::{Currency, Money};
use crate::edge::http::error::ApiError;
use crate::edge::http::extract::{Admin, ApiJson};
use crate::edge::http::AppState;
use crate::pricing::destination::{self, MethodJson};

/// `PUT /api/admin/shipping-rates/{zone}` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneBody {
    countries: Vec<String>,
    currency: String,
    methods: std::collections::HashMap<String, MethodJson>,
}

/// A shipping zone as saved.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ZoneSaved {
    zone: String,
    countries: Vec<String>,
    currency: String,
}

/// Creates or replaces a shipping zone with its methods and weight bands.
#[utoipa::path(put, path = "/api/admin/shipping-rates/{zone}", tag = "admin", security(("bearer" = [])),
    params(("zone" = String, Path, description = "1 to 64 letters, digits, - or _", pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    request_body = ZoneBody,
    responses((status = 200, description = "saved", body = ZoneSaved)))]
pub async fn put_shipping_rates(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    Path(zone): Path<String>,
    ApiJson(body): ApiJson<ZoneBody>,
) -> Result<Json<ZoneSaved>, ApiError> {
    let invalid = |m: &str| ApiError::unprocessable("invalid_shipping_rates", m.to_owned());
    if zone.is_empty()
        || zone.len() > 64
        || !zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid("zone must be 1 to 64 letters, digits, '-' or '_'"));
    }
    let countries = body
        .countries
        .iter()
        .map(|c| parse_country(c))
        .collect::<Result<Vec<_>, _>>()?;
    if countries.is_empty() {
        return Err(invalid("a zone needs at least one country"));
    }
    let currency = Currency::parse(&body.currency)
        .map_err(|e| ApiError::unprocessable("invalid_currency", e.to_string()))?;
    if body.methods.is_empty() {
        return Err(invalid("a zone needs at least one method"));
    }
    for (name, method) in &body.methods {
        if name != "standard" && name != "express" {
            return Err(invalid("methods are standard and express"));
        }
        let bad_band = method
            .bands
            .iter()
            .any(|b| b.max_grams <= 0 || Money::exact(b.price, currency).is_none());
        if method.bands.is_empty() || bad_band {
            return Err(invalid(
                "each method needs bands with maxGrams > 0 and a price in the zone's currency",
            ));
        }
        if method.free_over.is_some_and(|f| f < Decimal::ZERO) {
            return Err(invalid("freeOver cannot be negative"));
        }
    }
    destination::put_zone(
        &state.pool,
        &zone,
        &countries,
        currency.code(),
        &body.methods,
    )
    .await?;
    rates_changed(&state).await;
    Ok(Json(ZoneSaved {
        zone,
        countries,
        currency: currency.code().to_owned(),
    }))
}
