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
use crate::pricing::destination::{self, MethodJson};
use crate::pricing::{countries, promo, Promo, PromoKind, TaxCode, TaxRates};

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

pub(super) fn parse_sku(raw: &str) -> Result<Sku, ApiError> {
    Sku::parse(raw).map_err(|e| ApiError::unprocessable("invalid_sku", e.to_string()))
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
    // A restock clears every edge's sold-out memory of the SKU at once.
    inventory::soldout::announce_available(state.bus.client(), sku.as_str());
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

/// `PUT /api/admin/promos/{code}` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = AdminPromoBody)]
pub struct PromoBody {
    kind: String,
    /// Percent (0, 100] or a fixed amount, as a decimal string.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    #[schema(value_type = Option<String>, example = "10")]
    value: Option<Decimal>,
    #[serde(default, with = "rust_decimal::serde::str_option")]
    #[schema(value_type = Option<String>, example = "50.00")]
    min_subtotal: Option<Decimal>,
    #[serde(default)]
    starts_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    ends_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    usage_limit: Option<i32>,
    #[serde(default)]
    per_customer_limit: Option<i32>,
    #[serde(default)]
    skus: Option<Vec<String>>,
}

/// A promotion as saved.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PromoSaved {
    code: String,
    kind: &'static str,
}

/// Creates or replaces a promotion code (its usage count is kept).
#[utoipa::path(put, path = "/api/admin/promos/{code}", tag = "admin", security(("bearer" = [])),
    params(("code" = String, Path, description = "1 to 64 letters, digits, - or _", pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    request_body = PromoBody,
    responses((status = 200, description = "saved", body = PromoSaved)))]
pub async fn put_promo(
    State(state): State<AppState>,
    Admin(_admin): Admin,
    Path(code): Path<String>,
    ApiJson(body): ApiJson<PromoBody>,
) -> Result<Json<PromoSaved>, ApiError> {
    let invalid = |m: &str| ApiError::unprocessable("invalid_promo", m.to_owned());
    let code = code.to_ascii_lowercase();
    if code.is_empty()
        || code.len() > 64
        || !code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid("code must be 1 to 64 letters, digits, '-' or '_'"));
    }
    let kind = PromoKind::parse(&body.kind)
        .ok_or_else(|| invalid("kind must be percent, fixed or free_shipping"))?;
    match (kind, body.value) {
        (PromoKind::Percent, Some(v)) if v > Decimal::ZERO && v <= Decimal::ONE_HUNDRED => {}
        (PromoKind::Percent, _) => {
            return Err(invalid("a percent promo needs a value in (0, 100]"))
        }
        (PromoKind::Fixed, Some(v)) if v > Decimal::ZERO && v.scale() <= 4 => {}
        (PromoKind::Fixed, _) => return Err(invalid("a fixed promo needs a positive value")),
        (PromoKind::FreeShipping, _) => {}
    }
    if body.min_subtotal.is_some_and(|m| m < Decimal::ZERO) {
        return Err(invalid("minSubtotal cannot be negative"));
    }
    if let (Some(s), Some(e)) = (body.starts_at, body.ends_at) {
        if e <= s {
            return Err(invalid("endsAt must be after startsAt"));
        }
    }
    if body.usage_limit.is_some_and(|n| n < 0) || body.per_customer_limit.is_some_and(|n| n < 0) {
        return Err(invalid("limits cannot be negative"));
    }
    let skus = match body.skus {
        None => None,
        Some(skus) => Some(
            skus.iter()
                .map(|s| parse_sku(s).map(|s| s.to_string()))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let promo = Promo {
        code: code.clone(),
        kind,
        value: body.value,
        min_subtotal: body.min_subtotal,
        starts_at: body.starts_at,
        ends_at: body.ends_at,
        usage_limit: body.usage_limit,
        per_customer_limit: body.per_customer_limit,
        skus,
        used: 0,
    };
    if let (Some(limit), Some(existing)) = (
        promo.usage_limit,
        promo::get(&mut *state.pool.acquire().await?, &code).await?,
    ) {
        if limit < existing.used {
            return Err(ApiError::unprocessable(
                "usage_limit_below_used",
                format!(
                    "usageLimit {limit} is below the {} times the code was already used",
                    existing.used
                ),
            ));
        }
    }
    promo::upsert(&state.pool, &promo).await?;
    Ok(Json(PromoSaved {
        code,
        kind: kind.as_str(),
    }))
}

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

fn parse_country(raw: &str) -> Result<String, ApiError> {
    let country = raw.to_ascii_uppercase();
    if countries::is_known(&country) {
        Ok(country)
    } else {
        Err(ApiError::unprocessable(
            "invalid_country",
            "not an ISO 3166-1 alpha-2 country code",
        ))
    }
}

async fn rates_changed(state: &AppState) {
    state.rates.invalidate_all();
    let _ = state
        .bus
        .client()
        .publish(catalog::RATES_CHANGED, bytes::Bytes::new())
        .await;
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
