//! Untrusted bytes from NATS: decoding a saga payload never panics, and whatever decodes
//! re-encodes and decodes to the same event.
#![no_main]

use checkout::saga::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = Event::decode(data) {
        let bytes = event.encode().expect("a decoded event encodes");
        assert_eq!(Event::decode(&bytes).expect("and decodes again"), event);
    }
});
