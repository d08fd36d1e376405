//! The saga's contract and plumbing: events, subjects, the inbox that makes handlers
//! idempotent, the outgoing events, and the runner that turns a JetStream message into ack,
//! nak or term.

pub mod apply;
pub mod events;
pub mod inbox;
pub mod kind;
pub mod outgoing;
pub mod runner;
pub mod step;
pub mod streams;
pub mod subjects;
pub mod trace;

pub use events::{Checkout, Event, EventKind, FailureReason, Line};
pub use outgoing::Outgoing;
pub use runner::StepError;
pub use step::{Delivery, Shape, Step, Tx};
