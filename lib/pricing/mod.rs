//! Pricing: a pure function from lines, a promotion and a destination to exact totals, plus
//! the I/O around it (promotions, tax rates, shipping zones, and their caches).
//!
//! Rules, all rounded half-to-even to the currency's minor unit:
//! - `line_total = unit_price × qty`; `subtotal = Σ line_total`.
//! - Discounts apply per eligible line (the promo's SKUs, or every line): `percent` takes that
//!   share of each line; `fixed` takes `min(value, eligible subtotal)` spread over the eligible
//!   lines in proportion to their totals, never below zero on any line; `free_shipping` zeroes
//!   shipping.
//! - Tax is computed per line on `line_total - line_discount` at the line's tax code rate
//!   (`standard`, `reduced`, `exempt` = 0), and on shipping at the standard rate.
//! - `total = subtotal - discount + shipping + tax`, exactly.

pub mod countries;
pub mod destination;
pub mod promo;

use rust_decimal::Decimal;

use crate::domain::{Currency, Money, Quantity, Sku};
pub use promo::{Promo, PromoKind};

/// A product's tax class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaxCode {
    Standard,
    Reduced,
    Exempt,
}

impl TaxCode {
    /// Parses `standard`, `reduced` or `exempt`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "standard" => Some(Self::Standard),
            "reduced" => Some(Self::Reduced),
            "exempt" => Some(Self::Exempt),
            _ => None,
        }
    }

    /// The code as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Reduced => "reduced",
            Self::Exempt => "exempt",
        }
    }
}

/// Tax rates of a destination, as fractions (0.19 = 19 %).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaxRates {
    pub standard: Decimal,
    pub reduced: Decimal,
}

impl TaxRates {
    fn rate(self, code: TaxCode) -> Decimal {
        match code {
            TaxCode::Standard => self.standard,
            TaxCode::Reduced => self.reduced,
            TaxCode::Exempt => Decimal::ZERO,
        }
    }
}

/// One weight band of a shipping method: parcels up to `max_grams` cost `price`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Band {
    pub max_grams: i64,
    pub price: Decimal,
}

/// A shipping method's price list for one zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShippingRate {
    pub bands: Vec<Band>,
    /// Orders whose discounted subtotal reaches this ship free.
    pub free_over: Option<Decimal>,
}

/// Where the cart goes: its taxes and its shipping price list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub tax: TaxRates,
    pub shipping: ShippingRate,
}

/// One cart line with what pricing needs to know of its product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineInput {
    pub sku: Sku,
    pub qty: Quantity,
    pub unit_price: Money,
    pub tax_code: TaxCode,
    pub weight_grams: i32,
}

/// A priced line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedLine {
    pub sku: Sku,
    pub qty: Quantity,
    pub unit_price: Money,
    pub line_total: Money,
    pub discount: Money,
    pub tax: Money,
}

/// Whether the cart's promotion applied, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromoOutcome {
    pub code: String,
    pub applied: bool,
    pub reason: Option<&'static str>,
}

/// A priced cart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub currency: Currency,
    pub lines: Vec<PricedLine>,
    pub subtotal: Money,
    pub discount: Money,
    pub tax: Money,
    pub shipping: Money,
    pub total: Money,
    pub promo: Option<PromoOutcome>,
    pub weight_grams: i64,
}

/// Why a cart cannot be priced for a destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("no shipping band takes {0} g")]
    TooHeavy(i64),
}

/// Each line's share of the promotion's discount, what the promotion did, and whether it
/// ships for free.
fn discounts(
    lines: &[LineInput],
    totals: &[Decimal],
    promo: Option<&Promo>,
    round: impl Fn(Decimal) -> Decimal,
) -> (Vec<Decimal>, Option<PromoOutcome>, bool) {
    let Some(promo) = promo else {
        return (vec![Decimal::ZERO; lines.len()], None, false);
    };
    let eligible: Vec<bool> = lines.iter().map(|l| promo.covers(&l.sku)).collect();
    let refusal = promo.refusal(totals.iter().copied().sum(), eligible.iter().any(|e| *e));
    let outcome = PromoOutcome {
        code: promo.code.clone(),
        applied: refusal.is_none(),
        reason: refusal,
    };
    if refusal.is_some() {
        return (vec![Decimal::ZERO; lines.len()], Some(outcome), false);
    }
    let discounts = promo.line_discounts(totals, &eligible, round);
    (
        discounts,
        Some(outcome),
        promo.kind == PromoKind::FreeShipping,
    )
}

/// Shipping for the order's weight: the smallest band that takes it, free with a promotion or
/// over the zone's threshold (after the discount).
fn shipping(
    destination: &Destination,
    weight_grams: i64,
    free_shipping: bool,
    discounted: Decimal,
    round: impl Fn(Decimal) -> Decimal,
) -> Result<Decimal, PricingError> {
    let band = destination
        .shipping
        .bands
        .iter()
        .filter(|b| b.max_grams >= weight_grams)
        .min_by_key(|b| b.max_grams)
        .ok_or(PricingError::TooHeavy(weight_grams))?;
    let free = free_shipping
        || destination
            .shipping
            .free_over
            .is_some_and(|over| discounted >= over);
    Ok(if free {
        Decimal::ZERO
    } else {
        round(band.price)
    })
}

/// Prices lines in one currency; `destination` adds tax and shipping (zero without one).
pub fn price(
    currency: Currency,
    lines: Vec<LineInput>,
    promo: Option<&Promo>,
    destination: Option<&Destination>,
) -> Result<Priced, PricingError> {
    let round = |d: Decimal| Money::rounded(d, currency).amount();
    let totals: Vec<Decimal> = lines
        .iter()
        .map(|l| round(l.unit_price.amount() * Decimal::from(l.qty.get())))
        .collect();
    let subtotal: Decimal = totals.iter().copied().sum();
    let weight_grams: i64 = lines
        .iter()
        .map(|l| i64::from(l.weight_grams) * i64::from(l.qty.get()))
        .sum();

    let (discounts, promo_outcome, free_shipping) = discounts(&lines, &totals, promo, round);
    let discount: Decimal = discounts.iter().copied().sum();

    let shipping = match destination {
        None => Decimal::ZERO,
        Some(d) => shipping(d, weight_grams, free_shipping, subtotal - discount, round)?,
    };
    let line_taxes: Vec<Decimal> = lines
        .iter()
        .zip(totals.iter().zip(&discounts))
        .map(|(l, (total, disc))| match destination {
            Some(d) => round((*total - *disc) * d.tax.rate(l.tax_code)),
            None => Decimal::ZERO,
        })
        .collect();
    let shipping_tax = destination.map_or(Decimal::ZERO, |d| round(shipping * d.tax.standard));
    let tax: Decimal = line_taxes.iter().copied().sum::<Decimal>() + shipping_tax;
    let money = |d: Decimal| Money::rounded(d, currency);
    let priced_lines = lines
        .into_iter()
        .zip(totals.iter().zip(discounts.iter().zip(&line_taxes)))
        .map(|(l, (total, (disc, tax)))| PricedLine {
            sku: l.sku,
            qty: l.qty,
            unit_price: l.unit_price,
            line_total: money(*total),
            discount: money(*disc),
            tax: money(*tax),
        })
        .collect();
    Ok(Priced {
        currency,
        lines: priced_lines,
        subtotal: money(subtotal),
        discount: money(discount),
        tax: money(tax),
        shipping: money(shipping),
        total: money(subtotal - discount + shipping + tax),
        promo: promo_outcome,
        weight_grams,
    })
}

#[cfg(test)]
mod tests;
