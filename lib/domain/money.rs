use std::fmt;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

/// An ISO 4217 currency we sell in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "String")]
pub struct Currency(&'static str, u32);

// By hand: a derived impl would inherit the `&'static str` field's lifetime and only
// deserialize from 'static input.
impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&code).map_err(serde::de::Error::custom)
    }
}

/// Why a string is not a currency we sell in.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("currency must be one of {KNOWN_LIST}")]
pub struct CurrencyError;

/// Currencies with their minor-unit exponent.
const KNOWN: &[(&str, u32)] = &[
    ("USD", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("CAD", 2),
    ("AUD", 2),
    ("CHF", 2),
    ("SEK", 2),
    ("JPY", 0),
];
const KNOWN_LIST: &str = "USD, EUR, GBP, CAD, AUD, CHF, SEK, JPY";

impl Currency {
    /// Parses an upper-case ISO code.
    pub fn parse(code: &str) -> Result<Self, CurrencyError> {
        KNOWN
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(c, minor)| Self(c, *minor))
            .ok_or(CurrencyError)
    }

    /// The ISO code.
    pub fn code(self) -> &'static str {
        self.0
    }

    /// Digits after the decimal point in this currency's minor unit.
    pub fn minor_units(self) -> u32 {
        self.1
    }
}

impl TryFrom<String> for Currency {
    type Error = CurrencyError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Currency> for String {
    fn from(value: Currency) -> Self {
        value.0.to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Stored as its ISO code (`char(3)` or `text` columns).
impl sqlx::Type<sqlx::Postgres> for Currency {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <&str as sqlx::Type<sqlx::Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for Currency {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.0, buf)
    }
}

/// An amount in one currency, exact to its minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money {
    amount: Decimal,
    currency: Currency,
}

impl Money {
    /// An exact amount; `None` if it has more digits than the currency's minor unit or is negative.
    pub fn exact(amount: Decimal, currency: Currency) -> Option<Self> {
        let normalized = amount.normalize();
        if normalized.is_sign_negative() && !normalized.is_zero() {
            return None;
        }
        if normalized.scale() > currency.minor_units() {
            return None;
        }
        Some(Self::rounded(amount, currency))
    }

    /// Rounds half-to-even to the currency's minor unit (banker's rounding, as ledgers do).
    pub fn rounded(amount: Decimal, currency: Currency) -> Self {
        let mut amount = amount.round_dp_with_strategy(
            currency.minor_units(),
            RoundingStrategy::MidpointNearestEven,
        );
        amount.rescale(currency.minor_units());
        Self { amount, currency }
    }

    /// Zero in a currency.
    pub fn zero(currency: Currency) -> Self {
        Self::rounded(Decimal::ZERO, currency)
    }

    /// The amount, scaled to the minor unit.
    pub fn amount(self) -> Decimal {
        self.amount
    }

    /// The currency.
    pub fn currency(self) -> Currency {
        self.currency
    }
}

/// Formats a decimal amount for JSON: a string with exactly the currency's minor digits.
pub fn format_amount(amount: Decimal, currency: Currency) -> String {
    Money::rounded(amount, currency).amount.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).expect("test decimal")
    }

    #[test]
    fn exact_refuses_sub_minor_digits_and_negatives() {
        let usd = Currency::parse("USD").expect("usd");
        assert!(Money::exact(d("12.5"), usd).is_some());
        assert!(Money::exact(d("12.500"), usd).is_some());
        assert!(Money::exact(d("12.505"), usd).is_none());
        assert!(Money::exact(d("-1"), usd).is_none());
        let jpy = Currency::parse("JPY").expect("jpy");
        assert!(Money::exact(d("12.5"), jpy).is_none());
    }

    #[test]
    fn formats_with_minor_digits() {
        let usd = Currency::parse("USD").expect("usd");
        assert_eq!(format_amount(d("12.5"), usd), "12.50");
        assert_eq!(format_amount(d("0.125"), usd), "0.12");
        assert_eq!(format_amount(d("0.135"), usd), "0.14");
    }

    #[test]
    fn unknown_currencies_are_refused() {
        assert_eq!(Currency::parse("usd"), Err(CurrencyError));
        assert_eq!(Currency::parse("XXX"), Err(CurrencyError));
    }
}
