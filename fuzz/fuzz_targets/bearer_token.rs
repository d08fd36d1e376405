//! Untrusted bearer tokens: verification never panics, and never accepts a token it did not
//! sign (the fuzzer cannot forge an HMAC).
#![no_main]

use std::sync::OnceLock;

use checkout::auth::Verifier;
use checkout::config::{AuthSettings, Secret};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        Verifier::from_settings(&AuthSettings {
            jwt_secret: Secret::new("fuzz-secret-of-at-least-32-bytes!"),
            jwks_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
        })
        .expect("verifier")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        assert!(verifier().verify(token).is_err());
    }
});
