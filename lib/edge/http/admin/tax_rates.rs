//! Admin: tax rates per country or region.

use axum::extract::{Path, State};
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{parse_country, rates_changed};
use crate::edge::http::error::ApiError;
use crate::edge::http::extract::{Admin, ApiJson};
use crate::edge::http::AppState;
use crate::pricing::destination;
use crate::pricing::TaxRates;

/// `PUT /api/admin/tax-rates/{country}` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaxRatesBody {
    #[serde(default)]
    region: Option<String>,
    rates: RatesBody,
}

/// Rates as decimal strings, fractions of one (`"0.19"`).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RatesBody {
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String, example = "0.19")]
    standard: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String, example = "0.07")]
    reduced: Decimal,
}

/// A country's (or region's) tax rates as saved.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TaxRatesSaved {
    country: String,
    region: Option<String>,
    rates: RatesSaved,
}

/// Rates as decimal strings.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RatesSaved {
    standard: String,
    reduced: String,
}

/// Sets a country's tax rates (or a region's, e.g. a US state).
#[utoipa::path(put, path = "/api/admin/tax-rates/{country}", tag = "admin", security(("bearer" = [])),
    params(("country" = String, Path, description = "ISO 3166-1 alpha-2", pattern = r"^[A-Za-z]{2}$")),
    request_body = TaxRatesBody,
    responses((status = 200, description = "saved", body = TaxRatesSaved)))]
pub async fn put_tax_rates(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    Path(country): Path<String>,
    ApiJson(body): ApiJson<TaxRatesBody>,
) -> Result<Json<TaxRatesSaved>, ApiError> {
    let country = parse_country(&country)?;
    let valid = |r: Decimal| r >= Decimal::ZERO && r < Decimal::ONE;
    if !valid(body.rates.standard) || !valid(body.rates.reduced) {
        return Err(ApiError::unprocessable(
            "invalid_rate",
            "rates are fractions in [0, 1), e.g. \"0.19\"",
        ));
    }
    let region = body
        .region
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty());
    if region.is_some_and(|r| r.len() > 10 || !r.bytes().all(|b| b.is_ascii_alphanumeric())) {
        return Err(ApiError::unprocessable(
            "invalid_region",
            "region is a short code such as CA",
        ));
    }
    let rates = TaxRates {
        standard: body.rates.standard,
        reduced: body.rates.reduced,
    };
    destination::put_tax_rates(&state.pool, &country, region, rates).await?;
    rates_changed(&state).await;
    Ok(Json(TaxRatesSaved {
        region: region.map(str::to_owned),
        country,
        rates: RatesSaved {
            standard: rates.standard.to_string(),
            reduced: rates.reduced.to_string(),
        },
    }))
}
