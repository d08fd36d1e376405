//! Orders: created when the saga settles, confirmed by the order step or failed by
//! compensation; read by the edge.

mod confirm;
mod lifecycle;
mod record;
mod status;
pub mod watchdog;

pub use confirm::OrderStep;
pub use lifecycle::{finish_cancel, release_action, request_action, ActionRequest, LifecycleStep};
pub use record::{fence_timed_out, get_order, insert_failed, Fence, OrderItem, OrderRecord};
pub use status::{Action, OrderStatus};
