//! How an order's total is shared among its shipments (and among refunds of its lines).
//!
//! Each unit weighs what its line costs the buyer: `(line_total - discount + tax) / qty`. What
//! the total holds beyond the lines (shipping, the tax on it, rounding) is shared in the same
//! proportion, so a shipment pays for its units, their part of the discount and of the tax,
//! and a share of the shipping by value. The share of a set of units `S` is
//! `total × weight(S) / weight(all)`, rounded half to even to the currency's minor unit; every
//! unit together is exactly the total.
//!
//! A shipment takes `share(shipped before ∪ its units) − captured before`. The shares are
//! cumulative, so the shipments of an order telescope to its total to the cent whatever the
//! split, and the last one takes the rounding remainder. Refunds of lines work the same way
//! over the units refunded so far. With every weight zero (an order whose lines are free),
//! units count instead.

use std::collections::BTreeMap;

use rust_decimal::{Decimal, RoundingStrategy};

use crate::domain::Currency;
use crate::saga::events::Line;

/// Units per SKU.
pub type Units = BTreeMap<String, i64>;

/// Why a set of units cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitsError {
    #[error("the order has no line {0}")]
    UnknownSku(String),
    #[error("{sku}: {asked} asked, {left} left")]
    TooMany { sku: String, asked: i64, left: i64 },
    #[error("no units asked for")]
    Empty,
}

/// The order's lines and total, frozen at checkout.
pub struct Allocation<'a> {
    lines: &'a [Line],
    total: Decimal,
    currency: Currency,
}

impl<'a> Allocation<'a> {
    /// The allocation of an order's `total` over its `lines`.
    pub fn new(lines: &'a [Line], total: Decimal, currency: Currency) -> Self {
        Self {
            lines,
            total,
            currency,
        }
    }

    /// Every unit of the order.
    pub fn all(&self) -> Units {
        let mut units = Units::new();
        for line in self.lines {
            *units.entry(line.sku.to_string()).or_default() += i64::from(line.qty.get());
        }
        units
    }

    /// The share of the total that `units` carry (see the module's rule).
    pub fn share(&self, units: &Units) -> Decimal {
        let all = self.all();
        if covers(units, &all) {
            return self.total;
        }
        let by_value = self.lines.iter().any(|l| weight(l) > Decimal::ZERO);
        let (mut part, mut whole) = (Decimal::ZERO, Decimal::ZERO);
        for line in self.lines {
            let qty = Decimal::from(line.qty.get());
            let taken = Decimal::from(units.get(line.sku.as_str()).copied().unwrap_or(0));
            let line_weight = if by_value { weight(line) } else { qty };
            whole += line_weight;
            if qty > Decimal::ZERO {
                part += line_weight * taken / qty;
            }
        }
        if whole <= Decimal::ZERO {
            return Decimal::ZERO;
        }
        (self.total * part / whole).round_dp_with_strategy(
            self.currency.minor_units(),
            RoundingStrategy::MidpointNearestEven,
        )
    }

    /// What a new part of `units` adds to the parts taken before (`before`, which took
    /// `taken` between them): the cumulative share's increase, never negative.
    pub fn next(&self, before: &Units, units: &Units, taken: Decimal) -> Decimal {
        (self.share(&sum(before, units)) - taken).max(Decimal::ZERO)
    }
}

/// Each line's weight: what it costs the buyer.
fn weight(line: &Line) -> Decimal {
    (line.line_total - line.discount + line.tax).max(Decimal::ZERO)
}

/// Whether `units` take every unit of `all`.
fn covers(units: &Units, all: &Units) -> bool {
    all.iter()
        .all(|(sku, qty)| units.get(sku).copied().unwrap_or(0) >= *qty)
}

/// Two sets of units together.
pub fn sum(a: &Units, b: &Units) -> Units {
    let mut out = a.clone();
    for (sku, qty) in b {
        *out.entry(sku.clone()).or_default() += qty;
    }
    out
}

/// What is left of `of` after `taken`.
pub fn left(of: &Units, taken: &Units) -> Units {
    of.iter()
        .map(|(sku, qty)| {
            let rest = qty - taken.get(sku).copied().unwrap_or(0);
            (sku.clone(), rest.max(0))
        })
        .filter(|(_, qty)| *qty > 0)
        .collect()
}

/// Checks that `asked` is a non-empty set of units within `available`.
pub fn check_within(asked: &Units, available: &Units, order: &Units) -> Result<(), UnitsError> {
    if asked.values().all(|q| *q <= 0) {
        return Err(UnitsError::Empty);
    }
    for (sku, qty) in asked {
        if !order.contains_key(sku) {
            return Err(UnitsError::UnknownSku(sku.clone()));
        }
        let left = available.get(sku).copied().unwrap_or(0);
        if *qty > left {
            return Err(UnitsError::TooMany {
                sku: sku.clone(),
                asked: *qty,
                left,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Quantity, Sku};
    use proptest::prelude::*;

    fn line(sku: &str, qty: u32, unit: i64, discount: i64, tax: i64) -> Line {
        let unit_price = Decimal::new(unit, 2);
        Line {
            sku: Sku::parse(sku).expect("sku"),
            qty: Quantity::new(i64::from(qty)).expect("qty"),
            unit_price,
            line_total: unit_price * Decimal::from(qty),
            discount: Decimal::new(discount, 2),
            tax: Decimal::new(tax, 2),
        }
    }

    fn usd() -> Currency {
        Currency::parse("USD").expect("usd")
    }

    fn units(pairs: &[(&str, i64)]) -> Units {
        pairs.iter().map(|(s, q)| ((*s).to_owned(), *q)).collect()
    }

    #[test]
    fn five_lines_in_three_shipments_add_up_to_the_total_with_a_promotion_and_taxed_shipping() {
        // 10 % off, 20 % tax, 5.00 shipping taxed to 6.00.
        let lines = vec![
            line("A", 2, 1999, 400, 719),
            line("B", 1, 4999, 500, 900),
            line("C", 3, 333, 100, 180),
            line("D", 1, 1000, 100, 180),
            line("E", 4, 250, 100, 180),
        ];
        let net: Decimal = lines.iter().map(weight).sum();
        let total = net + Decimal::new(600, 2);
        let a = Allocation::new(&lines, total, usd());
        let first = units(&[("A", 1), ("C", 2)]);
        let second = units(&[("B", 1), ("E", 4)]);
        let third = units(&[("A", 1), ("C", 1), ("D", 1)]);
        let s1 = a.next(&Units::new(), &first, Decimal::ZERO);
        let s2 = a.next(&first, &second, s1);
        let s3 = a.next(&sum(&first, &second), &third, s1 + s2);
        assert_eq!(s1 + s2 + s3, total);
        assert_eq!(s1.scale(), 2);
        // The first parcel pays for its units (A: 19.99 - 2.00 + 3.595 ...) and a share of
        // shipping by value, no more.
        assert!(s1 > Decimal::new(1999 + 666, 2) && s1 < total / Decimal::TWO);
    }

    #[test]
    fn a_free_order_shares_its_shipping_by_units() {
        let lines = vec![line("A", 1, 0, 0, 0), line("B", 3, 0, 0, 0)];
        let a = Allocation::new(&lines, Decimal::new(1000, 2), usd());
        assert_eq!(a.share(&units(&[("A", 1)])), Decimal::new(250, 2));
    }

    #[test]
    fn units_beyond_what_is_left_or_of_no_line_are_refused() {
        let order = units(&[("A", 2)]);
        let left_now = units(&[("A", 1)]);
        assert_eq!(
            check_within(&units(&[("A", 2)]), &left_now, &order),
            Err(UnitsError::TooMany {
                sku: "A".into(),
                asked: 2,
                left: 1
            })
        );
        assert!(matches!(
            check_within(&units(&[("Z", 1)]), &left_now, &order),
            Err(UnitsError::UnknownSku(_))
        ));
        assert_eq!(
            check_within(&units(&[("A", 0)]), &left_now, &order),
            Err(UnitsError::Empty)
        );
    }

    fn order() -> impl Strategy<Value = (Vec<Line>, Decimal)> {
        prop::collection::vec((1u32..6, 0i64..100_000, 0i64..30, 0i64..25), 1..7).prop_flat_map(
            |specs| {
                let lines: Vec<Line> = specs
                    .iter()
                    .enumerate()
                    .map(|(i, (qty, unit, off, rate))| {
                        let gross = unit * i64::from(*qty);
                        let discount = gross * off / 100;
                        let tax = (gross - discount) * rate / 100;
                        line(&format!("SKU{i}"), *qty, *unit, discount, tax)
                    })
                    .collect();
                let net: Decimal = lines.iter().map(weight).sum();
                (
                    Just(lines),
                    (0i64..5_000).prop_map(move |s| net + Decimal::new(s, 2)),
                )
            },
        )
    }

    proptest! {
        #[test]
        fn any_split_of_any_order_adds_up_to_its_total(
            (lines, total) in order(),
            cuts in prop::collection::vec(0usize..1000, 0..12),
        ) {
            let a = Allocation::new(&lines, total, usd());
            // Hand the units out one at a time into shipments cut at the given points.
            let all: Vec<String> = a.all().iter()
                .flat_map(|(sku, qty)| std::iter::repeat_n(sku.clone(), usize::try_from(*qty).unwrap_or(0)))
                .collect();
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (all.len() + 1)).collect();
            bounds.push(all.len());
            bounds.sort_unstable();
            let (mut shipped, mut taken, mut start) = (Units::new(), Decimal::ZERO, 0);
            for end in bounds {
                let mut parcel = Units::new();
                for sku in &all[start..end] {
                    *parcel.entry(sku.clone()).or_default() += 1;
                }
                start = end;
                let amount = a.next(&shipped, &parcel, taken);
                prop_assert!(amount >= Decimal::ZERO);
                prop_assert!(amount.scale() <= 2);
                taken += amount;
                shipped = sum(&shipped, &parcel);
            }
            prop_assert_eq!(taken, total);
        }
    }
}
