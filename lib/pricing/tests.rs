use std::str::FromStr;

use proptest::prelude::*;
use rust_decimal::Decimal;

use super::*;

fn usd() -> Currency {
    Currency::parse("USD").expect("usd")
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal")
}

fn line(sku: &str, qty: i64, price: &str, tax_code: TaxCode) -> LineInput {
    LineInput {
        sku: Sku::parse(sku).expect("sku"),
        qty: Quantity::new(qty).expect("qty"),
        unit_price: Money::exact(d(price), usd()).expect("price"),
        tax_code,
        weight_grams: 250,
    }
}

fn promo(kind: PromoKind, value: Option<&str>) -> Promo {
    Promo {
        code: "save".into(),
        kind,
        value: value.map(d),
        min_subtotal: None,
        starts_at: None,
        ends_at: None,
        usage_limit: None,
        per_customer_limit: None,
        skus: None,
        used: 0,
    }
}

fn germany() -> Destination {
    Destination {
        tax: TaxRates {
            standard: d("0.19"),
            reduced: d("0.07"),
        },
        shipping: ShippingRate {
            bands: vec![
                Band {
                    max_grams: 1000,
                    price: d("4.99"),
                },
                Band {
                    max_grams: 5000,
                    price: d("9.99"),
                },
            ],
            free_over: Some(d("100.00")),
        },
    }
}

#[test]
fn tax_is_per_line_on_discounted_amounts_and_on_shipping() {
    let lines = vec![
        line("BOOK", 1, "20.00", TaxCode::Reduced),
        line("TEE", 2, "15.00", TaxCode::Standard),
        line("GIFT", 1, "5.00", TaxCode::Exempt),
    ];
    let p = price(
        usd(),
        lines,
        Some(&promo(PromoKind::Percent, Some("10"))),
        Some(&germany()),
    )
    .expect("priced");
    assert_eq!(p.subtotal.amount(), d("55.00"));
    assert_eq!(p.discount.amount(), d("5.50"));
    // 18.00 × 7 % = 1.26; 27.00 × 19 % = 5.13; exempt 0; shipping 4.99 × 19 % = 0.9481 -> 0.95.
    assert_eq!(p.shipping.amount(), d("4.99"));
    assert_eq!(p.tax.amount(), d("7.34"));
    assert_eq!(p.total.amount(), d("61.83"));
}

#[test]
fn rounding_is_half_to_even() {
    // 0.25 × 10 % = 0.025 -> 0.02 (even); 0.35 × 10 % = 0.035 -> 0.04 (even).
    let dest = Destination {
        tax: TaxRates {
            standard: d("0.10"),
            reduced: d("0"),
        },
        shipping: ShippingRate {
            bands: vec![Band {
                max_grams: 100_000,
                price: d("0"),
            }],
            free_over: None,
        },
    };
    let p = price(
        usd(),
        vec![line("A", 1, "0.25", TaxCode::Standard)],
        None,
        Some(&dest),
    )
    .expect("p");
    assert_eq!(p.tax.amount(), d("0.02"));
    let p = price(
        usd(),
        vec![line("A", 1, "0.35", TaxCode::Standard)],
        None,
        Some(&dest),
    )
    .expect("p");
    assert_eq!(p.tax.amount(), d("0.04"));
}

#[test]
fn free_shipping_and_thresholds() {
    let lines = || vec![line("TEE", 1, "30.00", TaxCode::Standard)];
    let p = price(
        usd(),
        lines(),
        Some(&promo(PromoKind::FreeShipping, None)),
        Some(&germany()),
    )
    .expect("p");
    assert_eq!(p.shipping.amount(), d("0.00"));
    let p = price(
        usd(),
        vec![line("TEE", 4, "30.00", TaxCode::Standard)],
        None,
        Some(&germany()),
    )
    .expect("p");
    assert_eq!(
        p.shipping.amount(),
        d("0.00"),
        "over the free-shipping threshold"
    );
    let heavy = vec![line("TEE", 21, "1.00", TaxCode::Standard)];
    assert_eq!(
        price(usd(), heavy, None, Some(&germany())),
        Err(PricingError::TooHeavy(5250))
    );
}

#[test]
fn a_promo_that_stops_qualifying_says_why() {
    let mut p10 = promo(PromoKind::Percent, Some("10"));
    p10.min_subtotal = Some(d("50"));
    let p = price(
        usd(),
        vec![line("TEE", 1, "30.00", TaxCode::Standard)],
        Some(&p10),
        None,
    )
    .expect("p");
    assert_eq!(p.discount.amount(), d("0.00"));
    let outcome = p.promo.expect("promo outcome");
    assert!(!outcome.applied);
    assert_eq!(outcome.reason, Some("promo_min_subtotal"));
    p10.min_subtotal = None;
    p10.skus = Some(vec!["MUG".into()]);
    let p = price(
        usd(),
        vec![line("TEE", 1, "30.00", TaxCode::Standard)],
        Some(&p10),
        None,
    )
    .expect("p");
    assert_eq!(
        p.promo.expect("outcome").reason,
        Some("promo_not_applicable")
    );
}

#[test]
fn fixed_discounts_spread_over_eligible_lines_only() {
    let mut off = promo(PromoKind::Fixed, Some("10.00"));
    off.skus = Some(vec!["A".into(), "B".into()]);
    let lines = vec![
        line("A", 1, "3.00", TaxCode::Standard),
        line("B", 1, "6.00", TaxCode::Standard),
        line("C", 1, "50.00", TaxCode::Standard),
    ];
    let p = price(usd(), lines, Some(&off), None).expect("p");
    // Only 9.00 is eligible: the discount stops there, and line C is untouched.
    assert_eq!(p.discount.amount(), d("9.00"));
    assert_eq!(p.lines[2].discount.amount(), d("0.00"));
    assert!(p
        .lines
        .iter()
        .all(|l| l.discount.amount() <= l.line_total.amount()));
}

fn arb_lines() -> impl Strategy<Value = Vec<(i64, i64, u8)>> {
    // (qty, price in cents, tax code)
    prop::collection::vec((1i64..=20, 0i64..=100_000, 0u8..3), 1..6)
}

fn arb_promo() -> impl Strategy<Value = Option<Promo>> {
    prop_oneof![
        Just(None),
        (1i64..=100).prop_map(|p| Some(promo(PromoKind::Percent, Some(&p.to_string())))),
        (0i64..=200_000).prop_map(|c| Some(promo(
            PromoKind::Fixed,
            Some(&(Decimal::new(c, 2)).to_string())
        ))),
        Just(Some(promo(PromoKind::FreeShipping, None))),
    ]
}

proptest! {
    #[test]
    fn totals_add_up_and_nothing_is_negative(lines in arb_lines(), promo in arb_promo(), taxed in any::<bool>()) {
        let inputs: Vec<LineInput> = lines
            .iter()
            .enumerate()
            .map(|(i, (qty, cents, code))| LineInput {
                sku: Sku::parse(&format!("S{i}")).expect("sku"),
                qty: Quantity::new(*qty).expect("qty"),
                unit_price: Money::rounded(Decimal::new(*cents, 2), usd()),
                tax_code: [TaxCode::Standard, TaxCode::Reduced, TaxCode::Exempt][usize::from(*code)],
                weight_grams: 10,
            })
            .collect();
        let dest = germany();
        let p = price(usd(), inputs, promo.as_ref(), taxed.then_some(&dest)).expect("priced");
        let sum = |f: fn(&PricedLine) -> Decimal| p.lines.iter().map(f).sum::<Decimal>();
        prop_assert_eq!(p.total.amount(), p.subtotal.amount() - p.discount.amount() + p.shipping.amount() + p.tax.amount());
        prop_assert_eq!(p.subtotal.amount(), sum(|l| l.line_total.amount()));
        prop_assert_eq!(p.discount.amount(), sum(|l| l.discount.amount()));
        for amount in [p.subtotal, p.discount, p.tax, p.shipping, p.total] {
            prop_assert!(amount.amount() >= Decimal::ZERO);
            prop_assert_eq!(amount.amount().scale(), 2, "exact to the cent");
        }
        prop_assert!(p.discount.amount() <= p.subtotal.amount());
        for l in &p.lines {
            prop_assert!(l.discount.amount() >= Decimal::ZERO && l.discount.amount() <= l.line_total.amount());
        }
    }
}
