//! An event ready to publish: what a step, the edge's outbox and the watchdog hand to the
//! bus, with the saga's headers. The bus publishes anything `Publishable` and knows no saga.

use uuid::Uuid;

use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;

use crate::bus::Publishable;
use crate::saga::events::{Event, EventKind, SCHEMA_VERSION};
use crate::saga::subjects::{
    event_subject, HEADER_EVENT, HEADER_ORDER_ID, HEADER_SCHEMA, HEADER_TRACEPARENT,
};
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

impl Publishable for Outgoing {
    fn subject(&self) -> &str {
        &self.subject
    }

    fn message(&self) -> PublishMessage {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_EVENT, self.kind.as_str());
        headers.insert(HEADER_ORDER_ID, self.order_id.to_string().as_str());
        headers.insert(HEADER_SCHEMA, SCHEMA_VERSION.to_string().as_str());
        if let Some(tp) = &self.traceparent {
            headers.insert(HEADER_TRACEPARENT, tp.as_str());
        }
        PublishMessage::build()
            .payload(self.payload.clone().into())
            .headers(headers)
            .message_id(&self.msg_id)
    }
}
