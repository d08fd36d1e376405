use serde::{Deserialize, Serialize};

/// How many units of one SKU a line holds: 1 to 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i32")]
pub struct Quantity(i32);

/// Why a number is not a quantity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("qty must be an integer from 1 to {max}", max = Quantity::MAX)]
pub struct QuantityError;

impl Quantity {
    /// The most units of one SKU a cart line may hold.
    pub const MAX: i32 = 1000;

    /// Parses a quantity.
    pub fn new(value: i64) -> Result<Self, QuantityError> {
        if (1..=i64::from(Self::MAX)).contains(&value) {
            // In range, so it fits.
            Ok(Self(value as i32))
        } else {
            Err(QuantityError)
        }
    }

    /// The quantity as stored in PostgreSQL.
    pub fn get(self) -> i32 {
        self.0
    }
}

impl TryFrom<i64> for Quantity {
    type Error = QuantityError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Quantity> for i32 {
    fn from(value: Quantity) -> Self {
        value.0
    }
}

/// Stored as an `integer` (the column's CHECK holds the same bounds).
impl sqlx::Type<sqlx::Postgres> for Quantity {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <i32 as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for Quantity {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <i32 as sqlx::Encode<sqlx::Postgres>>::encode(self.0, buf)
    }
}

impl sqlx::postgres::PgHasArrayType for Quantity {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        <i32 as sqlx::postgres::PgHasArrayType>::array_type_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive() {
        assert!(Quantity::new(1).is_ok());
        assert!(Quantity::new(1000).is_ok());
        assert_eq!(Quantity::new(0), Err(QuantityError));
        assert_eq!(Quantity::new(1001), Err(QuantityError));
        assert_eq!(Quantity::new(-3), Err(QuantityError));
    }
}
