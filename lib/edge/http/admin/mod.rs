//! Admin routes, one module per resource: products, stock, promotions, tax rates, shipping
//! rates and webhook endpoints (with their delivery log). Every route needs an admin token (the `Admin` extractor).

mod products;
mod promos;
mod shipping_rates;
mod stock;
mod tax_rates;
mod webhook_log;
mod webhooks;

pub use products::*;
pub use promos::*;
pub use shipping_rates::*;
pub use stock::*;
pub use tax_rates::*;
pub use webhook_log::*;
pub use webhooks::*;

use super::error::ApiError;
use super::AppState;
use crate::catalog;
use crate::pricing::countries;

/// A country code from a path, upper-cased, if ISO 3166-1 knows it.
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

/// Tax or shipping rates changed: drop this edge's cache and tell the others.
async fn rates_changed(state: &AppState) {
    state.rates.invalidate_all();
    catalog::announce_rates_change(state.bus.client()).await;
}
