//! Inventory: stock levels, reservations with an expiry, and the movement ledger.
//!
//! `available = on_hand - reserved`. Reserving raises `reserved` with a conditional update
//! (never below zero available); committing lowers both; releasing and expiring lower
//! `reserved`. Every change is a row in `stock_movements`, so stock can be audited.

pub(crate) mod commit;
mod expiry;
mod release;
mod reserve;
pub mod soldout;
mod stock;

pub use expiry::{expire_due, run_sweeper};
pub use release::{release_for_order, restock_for_order, GivenBack};
pub use reserve::ReserveStep;
pub use stock::{get_stock, reservation_status, set_on_hand, Stock, StockError};
