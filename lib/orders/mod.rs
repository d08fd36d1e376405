//! Orders: created when the saga settles, confirmed by the order step or failed by
//! compensation; shipped and refunded in parts afterwards; read by the edge.

pub mod allocation;
mod confirm;
mod lifecycle;
pub mod parts;
mod record;
mod status;
pub mod watchdog;

pub use confirm::OrderStep;
pub use lifecycle::{finish_cancel, release_action, request_action, ActionRequest, LifecycleStep};
pub use record::{fence_timed_out, get_order, insert_failed, Fence, OrderItem, OrderRecord};
pub use status::{Action, OrderStatus};

/// What the order role runs: the order step (stock out, order in) and the order-lifecycle
/// step (ship, cancel and refund outcomes).
pub fn start(
    tasks: &mut crate::tasks::Tasks,
    consuming: &crate::tasks::Consuming,
    leases: &crate::db::Leases,
) {
    tasks.step(
        consuming,
        OrderStep {
            leases: leases.clone(),
        },
    );
    tasks.step(
        consuming,
        LifecycleStep {
            leases: leases.clone(),
            notices: Some(consuming.bus.client().clone()),
        },
    );
}
