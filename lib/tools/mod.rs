//! Development and operations tooling that ships in the binary but is not part of the
//! pipeline: the benchmark (`checkout bench`) and the sandbox PSP server that stands in for a
//! real payment provider (`checkout run psp`; our client for it is `payments::sandbox_client`).

pub mod bench;
pub mod sandbox_psp;
