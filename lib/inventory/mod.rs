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

pub use expiry::{expire_due, extend_holds, run_sweeper};
pub use release::{release_for_order, restock_for_order, return_units, GivenBack};
pub use reserve::ReserveStep;
pub use stock::{get_stock, reservation_status, set_on_hand, Stock, StockError};

/// What the reserve role runs: the reserve step and the sweeper of expired holds.
pub fn start(
    tasks: &mut crate::tasks::Tasks,
    consuming: &crate::tasks::Consuming,
    leases: &crate::db::Leases,
    settings: &crate::config::InventorySettings,
) {
    let notices = consuming.bus.client().clone();
    tasks.step(
        consuming,
        ReserveStep {
            leases: leases.clone(),
            ttl: settings.reservation_ttl,
            notices: Some(notices.clone()),
        },
    );
    let (pool, every, batch) = (
        leases.pool().clone(),
        settings.expiry_interval,
        settings.expiry_batch,
    );
    tasks.until_shutdown("reservation-expiry", move |token| {
        run_sweeper(pool, every, batch, notices, token)
    });
}
