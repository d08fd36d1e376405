//! Orders: created when the saga settles, confirmed by the order step or failed by
//! compensation; read by the edge.

mod confirm;
mod record;

pub use confirm::OrderStep;
pub use record::{get_order, insert_failed, is_failed, OrderItem, OrderRecord};
