//! Pricing: a pure function from priced lines to a cart's totals.
//!
//! The identity `total = subtotal - discount + shipping + tax` holds exactly, every field is
//! non-negative and rounded half-to-even to the currency's minor unit. Promotions, tax and
//! shipping quotes plug in here (their inputs are zero until those rules exist).

use rust_decimal::Decimal;

use crate::domain::{Currency, Money, Quantity, Sku};

/// One cart line with the unit price it is sold at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineInput {
    pub sku: Sku,
    pub qty: Quantity,
    pub unit_price: Money,
}

/// A priced line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedLine {
    pub sku: Sku,
    pub qty: Quantity,
    pub unit_price: Money,
    pub line_total: Money,
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
}

/// Prices lines in one currency.
pub fn price(currency: Currency, lines: Vec<LineInput>) -> Priced {
    let lines: Vec<PricedLine> = lines
        .into_iter()
        .map(|line| {
            let total = line.unit_price.amount() * Decimal::from(line.qty.get());
            PricedLine {
                line_total: Money::rounded(total, currency),
                sku: line.sku,
                qty: line.qty,
                unit_price: line.unit_price,
            }
        })
        .collect();
    let subtotal: Decimal = lines.iter().map(|l| l.line_total.amount()).sum();
    let subtotal = Money::rounded(subtotal, currency);
    let discount = Money::zero(currency);
    let tax = Money::zero(currency);
    let shipping = Money::zero(currency);
    let total = Money::rounded(
        subtotal.amount() - discount.amount() + shipping.amount() + tax.amount(),
        currency,
    );
    Priced {
        currency,
        lines,
        subtotal,
        discount,
        tax,
        shipping,
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn totals_add_up_exactly() {
        let usd = Currency::parse("USD").expect("usd");
        let line = |sku: &str, qty: i64, price: &str| LineInput {
            sku: Sku::parse(sku).expect("sku"),
            qty: Quantity::new(qty).expect("qty"),
            unit_price: Money::exact(Decimal::from_str(price).expect("price"), usd).expect("money"),
        };
        let priced = price(usd, vec![line("A", 3, "0.10"), line("B", 1, "19.99")]);
        assert_eq!(priced.subtotal.amount().to_string(), "20.29");
        assert_eq!(priced.lines[0].line_total.amount().to_string(), "0.30");
        assert_eq!(
            priced.total.amount(),
            priced.subtotal.amount() - priced.discount.amount()
                + priced.shipping.amount()
                + priced.tax.amount()
        );
    }
}
