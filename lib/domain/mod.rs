//! Value types that cannot hold an invalid value: parse at the edge, trust everywhere else.

mod address;
pub mod money;
mod quantity;
mod sku;
mod text_enum;

pub use address::{Address, AddressError};
pub use money::{Currency, CurrencyError, Money};
pub use quantity::{Quantity, QuantityError};
pub use sku::{Sku, SkuError};
pub use text_enum::UnknownState;

/// Whether text is free of control characters (PostgreSQL refuses NUL in text, and no
/// name, address or token needs a control character).
pub fn is_clean_text(value: &str) -> bool {
    !value.chars().any(char::is_control)
}
