//! An event ready to publish: what a step, the edge's outbox and the watchdog hand to the
//! bus. It lives apart from the runner so that the bus depends on the saga's vocabulary
//! (events, subjects) and the runner on the bus, never the other way round.

use uuid::Uuid;

use crate::saga::events::{Event, EventKind};
use crate::saga::subjects::event_subject;
use crate::saga::trace::TraceParent;

/// An event ready to publish: subject, dedup id and encoded payload.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub kind: EventKind,
    pub order_id: Uuid,
    pub subject: String,
    pub msg_id: String,
    pub payload: Vec<u8>,
    pub traceparent: Option<String>,
}

impl Outgoing {
    /// Encodes an event with its deterministic subject and `Nats-Msg-Id`.
    pub fn new(
        event: &Event,
        trace: Option<&TraceParent>,
    ) -> Result<Self, crate::saga::events::EncodeError> {
        let order_id = event.checkout().order_id;
        let kind = event.kind();
        Ok(Self {
            kind,
            order_id,
            subject: event_subject(kind, order_id),
            msg_id: event.msg_id(),
            payload: event.encode()?,
            traceparent: trace.map(TraceParent::header_value),
        })
    }
}
