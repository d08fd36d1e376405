//! Runs one saga step as a durable pull consumer: decode, handle, publish what the step
//! emitted (awaiting PublishAcks), then double-ack. Transient failures nak with a growing
//! delay; undecodable or impossible messages are dead-lettered and terminated, never looped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};
use uuid::Uuid;

use crate::bus::{Bus, BusError, ConsumerSpec};
use crate::config::{ConsumerSettings, Redeliver};
use crate::saga::events::{Event, EventKind};
use crate::saga::inbox::InboxError;
use crate::saga::subjects::{
    deadletter_msg_id, deadletter_subject, event_msg_id, event_subject, HEADER_TRACEPARENT,
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
            msg_id: event_msg_id(kind, order_id),
            payload: event.encode()?,
            traceparent: trace.map(TraceParent::header_value),
        })
    }
}

/// How a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Worth retrying later (database or provider unavailable).
    #[error("transient: {0}")]
    Transient(String),
    /// Retrying cannot help (an event this step cannot act on).
    #[error("permanent: {0}")]
    Permanent(String),
    /// Not attempted (breaker open, rate limit spent): try again after this delay.
    #[error("deferred for {0:?}")]
    RetryAfter(Duration),
}

impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> Self {
        Self::Transient(format!("database: {e}"))
    }
}

impl From<InboxError> for StepError {
    fn from(e: InboxError) -> Self {
        match e {
            InboxError::Database(e) => e.into(),
            other => Self::Permanent(other.to_string()),
        }
    }
}

/// What a delivery tells a step besides the event.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The event's identity, `<order_id>.<event>`, the inbox key.
    pub event_id: String,
    /// 1 on the first delivery.
    pub delivered: i64,
    pub trace: TraceParent,
}

/// One step of the saga: which events it consumes and what it does with them.
pub trait Step: Send + Sync + 'static {
    /// The durable consumer's name; every instance of the role shares it.
    fn durable(&self) -> &'static str;
    /// The event kinds this step consumes.
    fn consumes(&self) -> Vec<EventKind>;
    /// Overrides `nats.max_deliver` for this durable (`-1`: unlimited).
    fn max_deliver(&self) -> Option<i64> {
        None
    }
    /// Does the step's work idempotently and returns the events to emit.
    fn handle(
        &self,
        event: Event,
        delivery: &Delivery,
    ) -> impl Future<Output = Result<Vec<Event>, StepError>> + Send;
}

/// Runs a step until `shutdown` is cancelled, then finishes in-flight messages.
pub async fn run<S: Step>(
    step: Arc<S>,
    bus: Bus,
    settings: ConsumerSettings,
    chaos: Redeliver,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let spec = ConsumerSpec {
        durable: step.durable().to_owned(),
        filter_subjects: step
            .consumes()
            .into_iter()
            .map(crate::saga::subjects::event_filter)
            .collect(),
        max_deliver: step.max_deliver(),
    };
    let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let max_deliver = spec.max_deliver.unwrap_or(bus.settings().max_deliver);
    info!(consumer = spec.durable, "consumer started");
    'outer: while !shutdown.is_cancelled() {
        let consumer = match bus.ensure_consumer(&spec).await {
            Ok(c) => c,
            Err(e) => {
                warn!(consumer = spec.durable, error = %e, "consumer unavailable, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(settings.batch.max(1))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                warn!(consumer = spec.durable, error = %e, "pull failed, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    warn!(consumer = spec.durable, error = %e, "pull stream error");
                    // Missing heartbeats recover by themselves; a deleted consumer needs a
                    // new pull, which the outer loop provides.
                    if e.to_string().contains("deleted") {
                        break;
                    }
                    continue;
                }
                None => break,
            };
            while tasks.try_join_next().is_some() {}
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break 'outer;
            };
            let step = step.clone();
            let bus = bus.clone();
            let settings = settings.clone();
            let durable = spec.durable.clone();
            tasks.spawn(async move {
                process(
                    &*step,
                    &bus,
                    &settings,
                    chaos,
                    max_deliver,
                    &durable,
                    message,
                )
                .await;
                drop(permit);
            });
        }
    }
    // Finish what was pulled, then make sure every ack has left the client.
    while tasks.join_next().await.is_some() {}
    let _ = bus.client().flush().await;
    info!(consumer = spec.durable, "consumer stopped");
    Ok(())
}

async fn process<S: Step>(
    step: &S,
    bus: &Bus,
    settings: &ConsumerSettings,
    chaos: Redeliver,
    max_deliver: i64,
    durable: &str,
    message: jetstream::Message,
) {
    let (delivered, stream_seq) = match message.info() {
        Ok(info) => (info.delivered, info.stream_sequence),
        Err(_) => (1, 0),
    };
    let trace = message
        .headers
        .as_ref()
        .and_then(|h| h.get(HEADER_TRACEPARENT))
        .and_then(|v| TraceParent::parse(v.as_str()))
        .unwrap_or_else(TraceParent::new_root);
    let hop = trace.child();
    let span = info_span!(
        "saga_step",
        consumer = durable,
        subject = %message.subject,
        stream_seq,
        delivered,
        trace_id = %hop.trace_id,
        span_id = %hop.parent_id,
        parent_span_id = %trace.parent_id,
        order_id = tracing::field::Empty,
    );
    async {
        let event = match Event::decode(&message.payload) {
            Ok(event) => event,
            Err(e) => {
                dead_letter(
                    bus,
                    durable,
                    &message,
                    stream_seq,
                    delivered,
                    &e.to_string(),
                )
                .await;
                return;
            }
        };
        let order_id = event.checkout().order_id;
        tracing::Span::current().record("order_id", tracing::field::display(order_id));
        let delivery = Delivery {
            event_id: event_msg_id(event.kind(), order_id),
            delivered,
            trace: hop.clone(),
        };
        match step.handle(event, &delivery).await {
            Ok(outputs) => {
                let first = delivered == 1;
                if chaos == Redeliver::BeforePublish && first {
                    warn!("chaos: dying after commit, before publish");
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    return;
                }
                for event in &outputs {
                    let out = match Outgoing::new(event, Some(&hop)) {
                        Ok(out) => out,
                        Err(e) => {
                            error!(error = %e, "cannot encode an output event");
                            nak(&message, settings, delivered).await;
                            return;
                        }
                    };
                    if let Err(e) = bus.publish(&out).await {
                        // Effects are committed; the redelivery republishes from the inbox.
                        warn!(error = %e, "publish failed, will redeliver");
                        nak(&message, settings, delivered).await;
                        return;
                    }
                }
                if chaos == Redeliver::AfterPublish && first {
                    warn!("chaos: dying after publish, before ack");
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    return;
                }
                if let Err(e) = message.double_ack().await {
                    // The server will redeliver after ack_wait; the inbox makes that harmless.
                    warn!(error = %e, "ack not confirmed");
                }
            }
            Err(StepError::RetryAfter(delay)) => {
                tracing::debug!(?delay, "step deferred");
                let delay = delay.max(Duration::from_millis(10));
                if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
                    warn!(error = %e, "nak failed; the server redelivers after ack_wait");
                }
            }
            Err(StepError::Transient(reason)) if delivered < max_deliver || max_deliver < 1 => {
                warn!(%reason, "step failed, will retry");
                nak(&message, settings, delivered).await;
            }
            Err(StepError::Transient(reason)) => {
                let reason = format!("gave up after {delivered} deliveries: {reason}");
                dead_letter(bus, durable, &message, stream_seq, delivered, &reason).await;
            }
            Err(StepError::Permanent(reason)) => {
                dead_letter(bus, durable, &message, stream_seq, delivered, &reason).await;
            }
        }
    }
    .instrument(span)
    .await;
}

async fn nak(message: &jetstream::Message, settings: &ConsumerSettings, delivered: i64) {
    let exponent = u32::try_from(delivered.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    let delay = settings
        .nak_base_delay
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(settings.nak_max_delay);
    if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
        warn!(error = %e, "nak failed; the server redelivers after ack_wait");
    }
}

/// Records the message on `deadletter.<consumer>` with why, then terminates it.
async fn dead_letter(
    bus: &Bus,
    durable: &str,
    message: &jetstream::Message,
    stream_seq: u64,
    delivered: i64,
    reason: &str,
) {
    error!(%reason, "dead-lettering message");
    let mut headers = message.headers.clone().unwrap_or_default();
    headers.insert("Checkout-Dead-Consumer", durable);
    headers.insert("Checkout-Dead-Subject", message.subject.as_str());
    headers.insert("Checkout-Dead-Stream-Seq", stream_seq.to_string().as_str());
    headers.insert("Checkout-Dead-Delivered", delivered.to_string().as_str());
    headers.insert("Checkout-Dead-Reason", truncate(reason, 512));
    let publish = jetstream::message::PublishMessage::build()
        .payload(message.payload.clone())
        .headers(headers)
        .message_id(deadletter_msg_id(durable, stream_seq));
    if let Err(e) = bus
        .publish_message(&deadletter_subject(durable), publish)
        .await
    {
        // Not recorded yet: leave the message to be redelivered rather than lose it.
        warn!(error = %e, "dead letter not stored, will redeliver");
        let _ = message
            .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
            .await;
        return;
    }
    if let Err(e) = message.double_ack_with(AckKind::Term).await {
        warn!(error = %e, "term not confirmed");
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
