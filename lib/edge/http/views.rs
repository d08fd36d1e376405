//! JSON shapes of the API's answers; money is a decimal string with the currency's digits.

use rust_decimal::Decimal;
use serde::Serialize;

use crate::domain::{money::format_amount, Currency};
use crate::edge::cart::CartView;

/// Formats an amount in a currency code (stored codes are always known ones).
pub fn money(amount: Decimal, currency: &str) -> String {
    match Currency::parse(currency.trim()) {
        Ok(c) => format_amount(amount, c),
        Err(_) => amount.to_string(),
    }
}

/// A cart line.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CartLineJson {
    pub sku: String,
    pub qty: i32,
    pub unit_price: String,
    pub line_total: String,
}

/// The cart's promotion: applied, or why not.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PromoJson {
    pub code: String,
    pub applied: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// A cart.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CartJson {
    pub cart_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promo: Option<PromoJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shipping_method: Option<String>,
    pub items: Vec<CartLineJson>,
    pub subtotal: String,
    pub discount: String,
    pub tax: String,
    pub shipping: String,
    pub total: String,
    pub currency: Option<String>,
}

impl From<CartView> for CartJson {
    fn from(view: CartView) -> Self {
        let cart_id = view.cart_id.to_string();
        match view.priced {
            None => Self {
                cart_id,
                promo: None,
                shipping_method: None,
                items: Vec::new(),
                subtotal: "0.00".into(),
                discount: "0.00".into(),
                tax: "0.00".into(),
                shipping: "0.00".into(),
                total: "0.00".into(),
                currency: None,
            },
            Some(p) => Self {
                cart_id,
                promo: p.promo.as_ref().map(|o| PromoJson {
                    code: o.code.clone(),
                    applied: o.applied,
                    reason: o.reason,
                }),
                shipping_method: None,
                items: p
                    .lines
                    .iter()
                    .map(|l| CartLineJson {
                        sku: l.sku.to_string(),
                        qty: l.qty.get(),
                        unit_price: l.unit_price.amount().to_string(),
                        line_total: l.line_total.amount().to_string(),
                    })
                    .collect(),
                subtotal: p.subtotal.amount().to_string(),
                discount: p.discount.amount().to_string(),
                tax: p.tax.amount().to_string(),
                shipping: p.shipping.amount().to_string(),
                total: p.total.amount().to_string(),
                currency: Some(p.currency.code().to_owned()),
            },
        }
    }
}
