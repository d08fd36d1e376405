use std::fmt;

use serde::{Deserialize, Serialize};

/// A stock-keeping unit: 1 to 64 characters from `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

/// Why a string is not a SKU.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a sku is 1 to 64 characters of letters, digits, '.', '_' or '-'")]
pub struct SkuError;

impl Sku {
    /// Parses a SKU.
    pub fn parse(value: &str) -> Result<Self, SkuError> {
        let valid = !value.is_empty()
            && value.len() <= 64
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(SkuError)
        }
    }

    /// The SKU as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sku {
    type Error = SkuError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Sku> for String {
    fn from(value: Sku) -> Self {
        value.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_skus() {
        assert!(Sku::parse("TSHIRT-RED_L.2").is_ok());
    }

    #[test]
    fn rejects_empty_long_and_odd_characters() {
        assert_eq!(Sku::parse(""), Err(SkuError));
        assert_eq!(Sku::parse(&"a".repeat(65)), Err(SkuError));
        assert_eq!(Sku::parse("a b"), Err(SkuError));
        assert_eq!(Sku::parse("a/b"), Err(SkuError));
        assert_eq!(Sku::parse("a.>"), Err(SkuError));
    }
}
