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
