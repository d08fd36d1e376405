//! The pull loops of every saga step's durable consumer, and what they share with the
//! handling of what a pull delivered (`saga::apply`): how a step fails, when a message is
//! naked, handed back or dead-lettered.
//!
//! The retry rules (subjects.md, "Retries and dead letters"):
//! - A pull never asks for more messages than there are free handler slots, so a message is
//!   never parked inside the process while its `ack_wait` runs out.
//! - While a handler runs (waiting on the pool, the rate limit, the provider) the runner sends
//!   progress acks, so the server never redelivers a message that is still being worked on.
//! - Transient failures nak with a delay that doubles up to `consumer.nak_max_delay`, forever:
//!   an accepted checkout is never given up because a database or provider was away.
//! - `RetryAfter` (breaker open, rate limit spent) naks with the step's delay.
//! - Permanent failures, undecodable payloads and panics are dead-lettered and terminated.
//! - A message from a newer schema is handed back with a delay, not dead-lettered.
//! - With a finite `max_deliver`, the runner dead-letters a message itself rather than letting
//!   the server drop it silently.
//! - On shutdown the runner stops pulling, hands back what arrives with an immediate nak,
//!   and gives in-flight handlers `consumer.drain_timeout` to finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::bus::{Bus, BusError, ConsumerSpec};
use crate::config::{ConsumerSettings, Redeliver};
use crate::saga::events::{Event, EventKind, SCHEMA_VERSION};
use crate::saga::subjects::{deadletter_msg_id, deadletter_subject, HEADER_EVENT, HEADER_SCHEMA};

/// A failure's cause: the typed error where there is one (a database error stays a
/// `sqlx::Error` behind `source()`), or words.
pub use crate::bus::Cause;

/// How a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Worth retrying later (database or provider unavailable); the cause is kept.
    #[error("transient: {0}")]
    Transient(#[source] Cause),
    /// Retrying cannot help (an event this step cannot act on, data the database refuses):
    /// the message is dead-lettered with the reason and its cause.
    #[error("permanent: {reason}")]
    Permanent {
        reason: String,
        #[source]
        cause: Option<Cause>,
    },
    /// Not attempted (breaker open, rate limit spent): try again after this delay.
    #[error("deferred for {0:?}")]
    RetryAfter(Duration),
}

impl StepError {
    /// A transient failure with its cause.
    pub fn transient(cause: impl Into<Cause>) -> Self {
        Self::Transient(cause.into())
    }

    /// A permanent failure of the message itself, with no underlying error.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent {
            reason: reason.into(),
            cause: None,
        }
    }

    /// A permanent failure caused by `cause` (kept as the error's source).
    pub fn refused(reason: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self::Permanent {
            reason: reason.into(),
            cause: Some(cause.into()),
        }
    }

    /// What a dead letter says: the reason and its cause (our errors' messages include
    /// their own causes, so the immediate one says it all).
    pub fn dead_reason(&self) -> String {
        match self {
            Self::Permanent {
                reason,
                cause: Some(cause),
            } => format!("{reason}: {cause}"),
            Self::Permanent {
                reason,
                cause: None,
            } => reason.clone(),
            other => other.to_string(),
        }
    }
}

impl From<sqlx::Error> for StepError {
    /// A data exception or an integrity violation (other than a unique violation, which a
    /// concurrent delivery can cause) is the message's own fault: retrying cannot help.
    /// Everything else (connections, deadlocks, serialization) is worth retrying.
    fn from(e: sqlx::Error) -> Self {
        let code = e
            .as_database_error()
            .and_then(sqlx::error::DatabaseError::code)
            .unwrap_or_default();
        let permanent = code.starts_with("22") || (code.starts_with("23") && code != "23505");
        if permanent {
            Self::refused("the database refused the data", e)
        } else {
            Self::transient(e)
        }
    }
}

/// What the runner needs besides the step: where it pulls, how it retries.
#[derive(Clone)]
pub(crate) struct Policy {
    pub durable: String,
    pub settings: ConsumerSettings,
    pub chaos: Redeliver,
    /// The runner's limit (`-1`: unlimited); the server is told one more.
    pub max_deliver: i64,
    /// How often a running handler tells the server it is still working.
    pub progress_every: Duration,
}

/// A message pulled for this process, with the handler slot it occupies.
pub(crate) struct Pulled {
    pub message: jetstream::Message,
    /// The handler slot, held until the message is finished (acked, naked or dead-lettered)
    /// and freed when it is dropped.
    pub _slot: OwnedSemaphorePermit,
}

/// Work for one group of pulled messages.
pub(crate) type Work = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Turns a group of pulled messages (those that arrived together) into work.
pub(crate) trait Dispatch: Send + Sync + 'static {
    /// The durable consumer's name.
    fn durable(&self) -> &'static str;
    /// The event kinds it consumes.
    fn consumes(&self) -> Vec<EventKind>;
    /// Whether a group is handled as one transaction (a `Batch` step), so a bigger group is
    /// cheaper.
    fn batches(&self) -> bool {
        false
    }
    /// Handles the group; every message is acked, naked or dead-lettered by the end.
    fn dispatch(self: Arc<Self>, bus: Bus, policy: Arc<Policy>, group: Vec<Pulled>) -> Work;
}

/// The pull loops shared by every kind of step: one per partition this process owns, each with
/// its own `consumer.concurrency`.
pub(crate) async fn consume(
    handler: Arc<dyn Dispatch>,
    bus: Bus,
    settings: ConsumerSettings,
    chaos: Redeliver,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let loops = bus.owned_streams().into_iter().map(|stream| {
        consume_stream(
            handler.clone(),
            bus.clone(),
            settings.clone(),
            chaos,
            shutdown.clone(),
            stream,
        )
    });
    futures::future::join_all(loops)
        .await
        .into_iter()
        .collect::<Result<Vec<()>, BusError>>()
        .map(|_| ())
}

/// One partition's pull loop.
async fn consume_stream(
    handler: Arc<dyn Dispatch>,
    bus: Bus,
    settings: ConsumerSettings,
    chaos: Redeliver,
    shutdown: CancellationToken,
    stream: String,
) -> Result<(), BusError> {
    let (spec, policy) = declare(&*handler, &bus, &settings, chaos, stream);
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    info!(consumer = spec.durable, "consumer started");
    'outer: while !shutdown.is_cancelled() {
        let consumer = match bus.ensure_consumer(&spec).await {
            Ok(c) => c,
            // Waiting cannot make the server newer, nor grant a permission: stop the process,
            // saying why.
            Err(e @ (BusError::ServerTooOld { .. } | BusError::Denied { .. })) => return Err(e),
            Err(e) => {
                warn!(consumer = spec.durable, error = %e, "consumer unavailable, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            while tasks.try_join_next().is_some() {}
            let Some(mut permits) = free_slots(&slots, settings.batch, &shutdown).await else {
                break 'outer;
            };
            let pull = consumer
                .batch()
                .max_messages(permits.len())
                .expires(settings.pull_expires)
                .messages()
                .await;
            let mut batch = match pull {
                Ok(b) => b,
                Err(e) => {
                    warn!(consumer = spec.durable, error = %e, "pull failed, retrying");
                    drop(permits);
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'outer,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue 'outer,
                    }
                }
            };
            // The server ends a pull at its expiry. A pull that outlives it by a second went
            // to a consumer leader that died: the client would wait 5 s more, and a saga on a
            // cluster would stall that long after every election, so pull anew instead. (A
            // message in flight to the lost pull is redelivered after ack_wait.)
            let lost_after = tokio::time::sleep(settings.pull_expires + Duration::from_secs(1));
            tokio::pin!(lost_after);
            while let Some(first) = tokio::select! {
                _ = shutdown.cancelled() => {
                    hand_back(&mut batch, settings.pull_expires).await;
                    break 'outer;
                }
                _ = &mut lost_after => {
                    warn!(consumer = spec.durable, "pull got no answer past its expiry (consumer leader lost?); pulling anew");
                    continue 'outer;
                }
                next = batch.next() => next,
            } {
                // Nagle's rule for transactions: with no group in flight the database is
                // idle for this step, so a lone message goes at once; with one in flight, the
                // next group waits (up to the linger) for company, costing one commit for all.
                while tasks.try_join_next().is_some() {}
                let linger = if handler.batches() && !tasks.is_empty() {
                    settings.linger
                } else {
                    Duration::ZERO
                };
                let (group, interrupted) =
                    gather(first, &mut batch, &mut permits, linger, &spec.durable).await;
                if !group.is_empty() {
                    let work = handler.clone().dispatch(bus.clone(), policy.clone(), group);
                    tasks.spawn(work);
                }
                if interrupted {
                    // A deleted consumer, a leader change or a lost pull: pull anew,
                    // re-declaring the consumer (cheap, idempotent).
                    continue 'outer;
                }
            }
        }
    }
    drain(&mut tasks, settings.drain_timeout, &spec.durable).await;
    flush_acks(&bus, settings.drain_timeout, &spec.durable).await;
    info!(consumer = spec.durable, "consumer stopped");
    Ok(())
}

/// Pushes out the acks still buffered. The flush waits for the server, so with NATS down it
/// would never return: bounded, an ack it could not send only means a redelivery.
async fn flush_acks(bus: &Bus, within: Duration, durable: &str) {
    if tokio::time::timeout(within, bus.client().flush())
        .await
        .is_err()
    {
        warn!(
            consumer = durable,
            "acks not flushed (NATS unreachable); they will be redelivered"
        );
    }
}

/// The durable consumer a step binds on `stream`, and how its messages are retried.
fn declare(
    handler: &dyn Dispatch,
    bus: &Bus,
    settings: &ConsumerSettings,
    chaos: Redeliver,
    stream: String,
) -> (ConsumerSpec, Arc<Policy>) {
    let max_deliver = bus.settings().max_deliver;
    let spec = ConsumerSpec {
        stream,
        durable: handler.durable().to_owned(),
        filter_subjects: handler
            .consumes()
            .into_iter()
            .map(crate::saga::subjects::event_filter)
            .collect(),
        // One more than the runner's limit: the runner dead-letters at its limit, so the
        // server's own (silent) limit is only reached if the last delivery's process died.
        max_deliver: if max_deliver > 0 { max_deliver + 1 } else { -1 },
    };
    let policy = Arc::new(Policy {
        durable: spec.durable.clone(),
        settings: settings.clone(),
        chaos,
        max_deliver,
        progress_every: (bus.settings().ack_wait / 3).max(Duration::from_millis(100)),
    });
    (spec, policy)
}

/// Waits for one free handler slot, then takes every other free one (up to a batch); `None`
/// at shutdown.
async fn free_slots(
    slots: &Arc<Semaphore>,
    batch: usize,
    shutdown: &CancellationToken,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        () = shutdown.cancelled() => return None,
        permit = slots.clone().acquire_owned() => permit.ok()?,
    };
    let mut permits = vec![first];
    while permits.len() < batch.max(1) {
        match slots.clone().try_acquire_owned() {
            Ok(p) => permits.push(p),
            Err(_) => break,
        }
    }
    Some(permits)
}

/// `first` and every message already received with it (up to `linger` more for company),
/// each with a slot: handled together (one transaction for a `Batch` step). True if the pull
/// was interrupted (a deleted consumer, a leader change).
async fn gather(
    first: Result<jetstream::Message, Box<dyn std::error::Error + Send + Sync>>,
    batch: &mut jetstream::consumer::pull::Batch,
    permits: &mut Vec<OwnedSemaphorePermit>,
    linger: Duration,
    durable: &str,
) -> (Vec<Pulled>, bool) {
    let mut group = Vec::new();
    let group_until = tokio::time::Instant::now() + linger;
    let mut next = Some(first);
    while let Some(item) = next.take() {
        match item {
            Ok(message) => match permits.pop() {
                Some(slot) => group.push(Pulled {
                    message,
                    _slot: slot,
                }),
                // The pull asked for exactly as many messages as permits.
                None => {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
            },
            Err(e) => {
                warn!(consumer = durable, error = %e, "pull interrupted");
                return (group, true);
            }
        }
        next = batch.next().now_or_never().flatten();
        if next.is_none() && !permits.is_empty() && !linger.is_zero() {
            next = tokio::time::timeout_at(group_until, batch.next())
                .await
                .ok()
                .flatten();
        }
    }
    (group, false)
}

/// Messages that arrive after shutdown began go straight back to the server.
async fn hand_back(batch: &mut jetstream::consumer::pull::Batch, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, batch.next()).await {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

/// Waits for in-flight handlers; after `timeout` the rest are abandoned (their messages are
/// redelivered after ack_wait, and every handler is idempotent).
async fn drain(tasks: &mut JoinSet<()>, timeout: Duration, durable: &str) {
    let finished = tokio::time::timeout(timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(
            consumer = durable,
            abandoned = tasks.len(),
            "handlers still running at the drain deadline; their messages will be redelivered"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// The verdict on one delivery before its step runs.
pub(crate) enum Admission {
    Handle(Box<Event>),
    /// Published by a newer version of us: leave it for one that understands it.
    Later(String),
    /// Can never be handled.
    Dead(String),
}

pub(crate) fn admit(message: &jetstream::Message) -> Admission {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    if let Some(schema) = header(HEADER_SCHEMA).and_then(|v| v.parse::<u32>().ok()) {
        if schema > SCHEMA_VERSION {
            return Admission::Later(format!(
                "payload schema {schema} is newer than this process's {SCHEMA_VERSION}"
            ));
        }
    }
    match Event::decode(&message.payload) {
        Ok(event) => Admission::Handle(Box::new(event)),
        Err(e) => match header(HEADER_EVENT) {
            Some(kind) if EventKind::parse(&kind).is_none() => {
                Admission::Later(format!("event kind {kind} is unknown to this version"))
            }
            _ => Admission::Dead(e.to_string()),
        },
    }
}

/// How long a step keeps retrying the publish of its committed outputs before it naks: a
/// third of `ack_wait`, so the message is still ours (no progress acks needed) and a leader
/// election (seconds) is ridden out in-process.
pub(crate) fn publish_budget(bus: &Bus) -> Duration {
    bus.settings().ack_wait / 3
}

/// The nak delay after `delivered` deliveries: doubling from the base, capped, forever.
pub(crate) fn backoff(settings: &ConsumerSettings, delivered: i64) -> Duration {
    let exponent = u32::try_from(delivered.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    settings
        .nak_base_delay
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(settings.nak_max_delay)
}

pub(crate) async fn nak_after(message: &jetstream::Message, delay: Duration) {
    if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
        warn!(error = %e, "nak failed; the server redelivers after ack_wait");
    }
}

/// Where a message that cannot be handled goes.
pub(crate) struct DeadLetter<'a> {
    pub bus: &'a Bus,
    pub durable: &'a str,
    pub message: &'a jetstream::Message,
    pub stream_seq: u64,
    pub delivered: i64,
}

impl DeadLetter<'_> {
    /// Records the message on `deadletter.<consumer>` with why, then terminates it.
    pub(crate) async fn send(&self, reason: &str) {
        error!(%reason, "dead-lettering message");
        let message = self.message;
        let mut headers = message.headers.clone().unwrap_or_default();
        let stream = message
            .info()
            .map(|i| i.stream.to_owned())
            .unwrap_or_default();
        headers.insert("Checkout-Dead-Stream", stream.as_str());
        headers.insert("Checkout-Dead-Consumer", self.durable);
        headers.insert("Checkout-Dead-Subject", message.subject.as_str());
        headers.insert(
            "Checkout-Dead-Stream-Seq",
            self.stream_seq.to_string().as_str(),
        );
        headers.insert(
            "Checkout-Dead-Delivered",
            self.delivered.to_string().as_str(),
        );
        headers.insert("Checkout-Dead-Reason", truncate(reason, 512));
        let publish = jetstream::message::PublishMessage::build()
            .payload(message.payload.clone())
            .headers(headers)
            .message_id(deadletter_msg_id(&stream, self.durable, self.stream_seq));
        if let Err(e) = self
            .bus
            .publish_message(&deadletter_subject(self.durable), publish)
            .await
        {
            // Not recorded yet: leave the message to be redelivered rather than lose it.
            warn!(error = %e, "dead letter not stored, will redeliver");
            nak_after(message, Duration::from_secs(5)).await;
            return;
        }
        if let Err(e) = message.double_ack_with(AckKind::Term).await {
            warn!(error = %e, "term not confirmed");
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_backoff_doubles_and_stays_at_its_cap() {
        let settings = ConsumerSettings {
            concurrency: 1,
            batch: 1,
            linger: Duration::ZERO,
            pull_expires: Duration::from_secs(2),
            nak_base_delay: Duration::from_millis(250),
            nak_max_delay: Duration::from_secs(30),
            newer_schema_delay: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(5),
        };
        assert_eq!(backoff(&settings, 1), Duration::from_millis(250));
        assert_eq!(backoff(&settings, 3), Duration::from_secs(1));
        assert_eq!(backoff(&settings, 50), Duration::from_secs(30));
        assert_eq!(backoff(&settings, 5_000), Duration::from_secs(30));
    }
}
