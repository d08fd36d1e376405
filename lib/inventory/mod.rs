//! Inventory: stock levels, reservations with an expiry, and the movement ledger.
//!
//! `available = on_hand - reserved`. Reserving raises `reserved` with a conditional update
//! (never below zero available); committing lowers both; releasing lowers `reserved`.

mod commit;
mod release;
mod reserve;
mod stock;

pub use commit::CommitStep;
pub use release::release_for_order;
pub use reserve::ReserveStep;
pub use stock::{get_stock, reservation_status, set_on_hand, Stock, StockError};
