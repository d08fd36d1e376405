//! Orders: created when the saga settles, confirmed by the order step or failed by
//! compensation; read by the edge.

mod confirm;
mod lifecycle;
mod record;

pub use confirm::OrderStep;
pub use lifecycle::{finish_cancel, request_action, Action, ActionRequest, LifecycleStep};
pub use record::{get_order, insert_failed, is_failed, OrderItem, OrderRecord};
