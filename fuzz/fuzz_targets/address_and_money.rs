//! Untrusted request fields: addresses, SKUs, currencies and amounts parse or refuse, never
//! panic; what an address validation accepts is within the limits it promises.
#![no_main]

use checkout::domain::{Address, Currency, Money, Sku};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(address) = serde_json::from_str::<Address>(text) {
        if let Ok(valid) = address.validated() {
            assert!(valid.name.chars().count() <= 200 && !valid.name.is_empty());
            assert_eq!(valid.country.len(), 2);
        }
    }
    let _ = Sku::parse(text);
    if let Ok(currency) = Currency::parse(text.get(..3).unwrap_or(text)) {
        if let Ok(amount) = text.get(3..).unwrap_or("").parse::<rust_decimal::Decimal>() {
            let _ = Money::exact(amount, currency);
            let _ = Money::rounded(amount, currency);
        }
    }
});
