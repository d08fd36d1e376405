//! Tax rates and shipping zones: admin-managed tables, looked up through a short-TTL cache.

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::{Band, ShippingRate, TaxRates};

/// A shipping method's bands as stored (JSON) and accepted by the admin API.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MethodJson {
    pub bands: Vec<BandJson>,
    /// Orders above this subtotal ship free (a decimal string).
    #[serde(default, with = "rust_decimal::serde::str_option")]
    #[schema(value_type = Option<String>, example = "75.00")]
    pub free_over: Option<Decimal>,
}

/// One weight band as stored.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BandJson {
    pub max_grams: i64,
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String, example = "4.99")]
    pub price: Decimal,
}

/// Everything a destination's quote needs, cached per (country, region).
#[derive(Debug, Clone)]
pub struct DestinationRates {
    pub tax: TaxRates,
    /// The zone covering the country: its currency and methods.
    pub zone: Option<(String, std::collections::HashMap<String, MethodJson>)>,
}

impl DestinationRates {
    /// The price list of a method, if the zone ships it in `currency`.
    pub fn shipping(&self, method: &str, currency: &str) -> Option<ShippingRate> {
        let (zone_currency, methods) = self.zone.as_ref()?;
        if zone_currency.trim() != currency {
            return None;
        }
        let m = methods.get(method)?;
        Some(ShippingRate {
            bands: m
                .bands
                .iter()
                .map(|b| Band {
                    max_grams: b.max_grams,
                    price: b.price,
                })
                .collect(),
            free_over: m.free_over,
        })
    }
}

/// Short-TTL cache of destination rates (tax and shipping quotes change rarely).
#[derive(Clone)]
pub struct RatesCache {
    pool: PgPool,
    cache: Cache<(String, String), Arc<DestinationRates>>,
}

impl RatesCache {
    /// A cache whose entries live `ttl`.
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        Self {
            pool,
            cache: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Rates for a country (upper case) and region.
    pub async fn get(
        &self,
        country: &str,
        region: Option<&str>,
    ) -> Result<Arc<DestinationRates>, sqlx::Error> {
        let key = (
            country.to_owned(),
            region.unwrap_or("").to_ascii_uppercase(),
        );
        let pool = self.pool.clone();
        self.cache
            .try_get_with(key.clone(), async move {
                load(&pool, &key.0, &key.1).await.map(Arc::new)
            })
            .await
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))
    }

    /// Forgets everything (after an admin change).
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }
}

async fn load(pool: &PgPool, country: &str, region: &str) -> Result<DestinationRates, sqlx::Error> {
    let rates: Option<(Decimal, Decimal)> = sqlx::query_as(
        "SELECT standard, reduced FROM pricing.tax_rates
         WHERE country = $1 AND region IN ($2, '') ORDER BY region DESC LIMIT 1",
    )
    .bind(country)
    .bind(region)
    .fetch_optional(pool)
    .await?;
    let (standard, reduced) = rates.unwrap_or((Decimal::ZERO, Decimal::ZERO));
    let zone: Option<(
        String,
        sqlx::types::Json<std::collections::HashMap<String, MethodJson>>,
    )> = sqlx::query_as(
        "SELECT currency, methods FROM pricing.shipping_zones WHERE $1 = ANY(countries)
             ORDER BY zone LIMIT 1",
    )
    .bind(country)
    .fetch_optional(pool)
    .await?;
    Ok(DestinationRates {
        tax: TaxRates { standard, reduced },
        zone: zone.map(|(c, m)| (c, m.0)),
    })
}

/// Sets a country's (or region's) rates.
pub async fn put_tax_rates(
    pool: &PgPool,
    country: &str,
    region: Option<&str>,
    rates: TaxRates,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO pricing.tax_rates (country, region, standard, reduced) VALUES ($1, $2, $3, $4)
         ON CONFLICT (country, region) DO UPDATE SET standard = EXCLUDED.standard, reduced = EXCLUDED.reduced",
    )
    .bind(country)
    .bind(region.unwrap_or("").to_ascii_uppercase())
    .bind(rates.standard)
    .bind(rates.reduced)
    .execute(pool)
    .await?;
    Ok(())
}

/// Creates or replaces a shipping zone.
pub async fn put_zone(
    pool: &PgPool,
    zone: &str,
    countries: &[String],
    currency: &str,
    methods: &std::collections::HashMap<String, MethodJson, impl std::hash::BuildHasher>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO pricing.shipping_zones (zone, countries, currency, methods) VALUES ($1, $2, $3, $4)
         ON CONFLICT (zone) DO UPDATE SET countries = EXCLUDED.countries, currency = EXCLUDED.currency,
             methods = EXCLUDED.methods, updated_at = now()",
    )
    .bind(zone)
    .bind(countries)
    .bind(currency)
    .bind(sqlx::types::Json(methods))
    .execute(pool)
    .await?;
    Ok(())
}
