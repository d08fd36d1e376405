//! The edge: the one HTTP service buyers and admins talk to. It owns carts and accepted
//! checkouts (the `edge` schema), prices a cart through `pricing`, publishes
//! `checkout.requested` through its outbox, and reads other services only through their query
//! functions.
//!
//! - [`http`]: routes, extractors, errors, the OpenAPI document, health and the timeline.
//! - [`cart`]: carts and their items.
//! - [`checkout`]: accepting a checkout under an Idempotency-Key.
//! - [`outbox`]: what the edge owes JetStream, and the relay that publishes it.
//! - [`start`]: what the edge role runs.

pub mod cart;
pub mod checkout;
pub mod http;
pub mod outbox;
pub mod start;

pub use start::Edge;
