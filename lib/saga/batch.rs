//! Batch-native steps: a step whose effects are database writes only declares its input and
//! writes its effects for a whole batch of inputs inside one transaction. The runner owns the
//! rest: decoding, the inbox (one read for the batch, one insert of its outputs), the
//! commit, pipelined publishing, acks, retries and dead letters.
//!
//! A batch is what one pull delivered together, so under load one transaction (and one fsync)
//! serves many messages, and at low load a batch is one message and nothing waits. If a batch
//! fails, its messages are retried one by one, each in its own transaction, so one bad message
//! never fails its neighbours.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use async_nats::jetstream::{self, AckKind};
use futures::FutureExt;
use sqlx::{Connection, PgConnection};
use tracing::{debug, debug_span, info_span, warn, Instrument};

use crate::bus::{Bus, BusError};
use crate::config::{ConsumerSettings, Redeliver};
use crate::db::Leases;
use crate::saga::events::{Event, EventKind};
use crate::saga::inbox::InboxTable;
use crate::saga::outgoing::Outgoing;
use crate::saga::runner::{
    admit, backoff, consume, nak_after, publish_budget, Admission, DeadLetter, Dispatch, Policy,
    Pulled, StepError, Work,
};
use crate::saga::subjects::HEADER_TRACEPARENT;
use crate::saga::trace::TraceParent;

/// One step of the saga whose work is a transaction: it turns a batch of inputs into effects
/// and the events each input emits.
pub trait BatchStep: Send + Sync + 'static {
    /// What the step needs from an event it consumes.
    type Input: Send + Sync + 'static;

    /// The durable consumer's name; every instance of the role shares it.
    const DURABLE: &'static str;
    /// The event kinds this step consumes.
    fn consumes(&self) -> Vec<EventKind>;
    /// The inbox of the service this step writes.
    fn inbox(&self) -> InboxTable;
    /// The service's database connections.
    fn leases(&self) -> &Leases;
    /// The step's input from an event it consumes; an error dead-letters the message.
    fn input(&self, event: Event) -> Result<Self::Input, String>;
    /// Called after the commit with the outputs of the inputs handled for the first time (not
    /// those replayed from the inbox): where counters that must not double are counted.
    fn committed(&self, _outputs: &[Vec<Event>]) {}
    /// Writes the effects of `inputs` (never handled before) in the caller's transaction and
    /// returns the events each one emits, in order.
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        inputs: &'a [&'a Self::Input],
    ) -> impl Future<Output = Result<Vec<Vec<Event>>, StepError>> + Send + 'a;
}

/// Runs a batch step until `shutdown` is cancelled, then finishes in-flight batches.
pub async fn run<S: BatchStep>(
    step: Arc<S>,
    bus: Bus,
    settings: ConsumerSettings,
    chaos: Redeliver,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), BusError> {
    consume(Arc::new(Batched(step)), bus, settings, chaos, shutdown).await
}

struct Batched<S>(Arc<S>);

impl<S: BatchStep> Dispatch for Batched<S> {
    fn durable(&self) -> &'static str {
        S::DURABLE
    }

    fn consumes(&self) -> Vec<EventKind> {
        self.0.consumes()
    }

    fn batches(&self) -> bool {
        true
    }

    fn dispatch(self: Arc<Self>, bus: Bus, policy: Arc<Policy>, group: Vec<Pulled>) -> Work {
        // Each message has its own span in its own trace (below); the batch is a debug span.
        let span = debug_span!("saga_batch", consumer = policy.durable, size = group.len());
        Box::pin(
            async move {
                let items = admit_all(&*self.0, &bus, &policy, group).await;
                if !items.is_empty() {
                    handle(&*self.0, &bus, &policy, items).await;
                }
            }
            .instrument(span),
        )
    }
}

/// A message admitted to a batch.
struct Item<I> {
    pulled: Pulled,
    input: I,
    event_id: String,
    delivered: i64,
    stream_seq: u64,
    /// This hop of the message's trace (outputs continue it).
    hop: TraceParent,
    /// The message's span in its trace, open until the batch is finished.
    span: tracing::Span,
}

impl<I> Item<I> {
    fn message(&self) -> &jetstream::Message {
        &self.pulled.message
    }

    fn dead_letter<'a>(&'a self, bus: &'a Bus, policy: &'a Policy) -> DeadLetter<'a> {
        DeadLetter {
            bus,
            durable: &policy.durable,
            message: &self.pulled.message,
            stream_seq: self.stream_seq,
            delivered: self.delivered,
        }
    }
}

/// Decodes every message; those that cannot be handled are handed back or dead-lettered here.
async fn admit_all<S: BatchStep>(
    step: &S,
    bus: &Bus,
    policy: &Policy,
    group: Vec<Pulled>,
) -> Vec<Item<S::Input>> {
    let mut items = Vec::with_capacity(group.len());
    for pulled in group {
        let message = &pulled.message;
        let (delivered, stream_seq) = message
            .info()
            .map_or((1, 0), |i| (i.delivered, i.stream_sequence));
        let letter = DeadLetter {
            bus,
            durable: &policy.durable,
            message,
            stream_seq,
            delivered,
        };
        if policy.max_deliver > 0 && delivered > policy.max_deliver {
            let reason = format!(
                "delivered {delivered} times (max_deliver {}); the last attempts ended without a verdict",
                policy.max_deliver
            );
            letter.send(&reason).await;
            continue;
        }
        let event = match admit(message) {
            Admission::Handle(event) => *event,
            Admission::Later(why) => {
                warn!(%why, "handing the message back for a newer version of this consumer");
                nak_after(message, policy.settings.newer_schema_delay).await;
                continue;
            }
            Admission::Dead(why) => {
                letter.send(&why).await;
                continue;
            }
        };
        let event_id = event.msg_id();
        let trace = message
            .headers
            .as_ref()
            .and_then(|h| h.get(HEADER_TRACEPARENT))
            .and_then(|v| TraceParent::parse(v.as_str()))
            .unwrap_or_else(TraceParent::new_root);
        let span = info_span!(
            "saga_step",
            consumer = policy.durable,
            subject = %message.subject,
            stream_seq,
            delivered,
            order_id = %event.checkout().order_id,
            trace_id = %trace.trace_id,
            parent_span_id = %trace.parent_id,
        );
        trace.adopt(&span);
        let hop = TraceParent::of_span(&span, &trace);
        let input = match step.input(event) {
            Ok(input) => input,
            Err(why) => {
                letter.send(&why).await;
                continue;
            }
        };
        items.push(Item {
            pulled,
            input,
            event_id,
            delivered,
            stream_seq,
            hop,
            span,
        });
    }
    items
}

/// Runs the batch in one transaction; if that fails, each message alone.
async fn handle<S: BatchStep>(step: &S, bus: &Bus, policy: &Policy, items: Vec<Item<S::Input>>) {
    let messages: Vec<&jetstream::Message> = items.iter().map(Item::message).collect();
    let started = std::time::Instant::now();
    let outcome = with_progress(&messages, policy, attempt(step, &items)).await;
    for _ in &items {
        crate::metrics::step_duration(S::DURABLE, started.elapsed());
    }
    match outcome {
        Some(Ok(outputs)) => finish(bus, policy, items.iter().zip(outputs).collect()).await,
        Some(Err(e)) if items.len() > 1 => {
            warn!(error = %e, size = items.len(), "batch failed; retrying its messages one by one");
            let mut done = Vec::new();
            for item in &items {
                let one = std::slice::from_ref(item);
                let outcome = with_progress(&[item.message()], policy, attempt(step, one)).await;
                match outcome {
                    Some(Ok(mut outputs)) => done.push((item, outputs.pop().unwrap_or_default())),
                    Some(Err(e)) => fail(bus, policy, item, e).await,
                    None => fail(bus, policy, item, timed_out(policy)).await,
                }
            }
            finish(bus, policy, done).await;
        }
        // A batch of one: its error is its own (a permanent one dead-letters it; turning it
        // into a transient one would redeliver a poison message forever).
        Some(Err(e)) => {
            if let Some(item) = items.first() {
                fail(bus, policy, item, e).await;
            }
        }
        None => {
            for item in &items {
                fail(bus, policy, item, timed_out(policy)).await;
            }
        }
    }
}

fn timed_out(policy: &Policy) -> StepError {
    StepError::transient(format!(
        "the batch ran longer than {:?}",
        policy.settings.handler_timeout
    ))
}

/// One transaction: apply the items not handled before and record them in the inbox with
/// their outputs; what was handled before returns what it emitted then.
///
/// A first delivery was almost never handled before (a handled message is acked, so a
/// redelivery counts two or more), so a batch of first deliveries skips the inbox look-up.
/// The inbox insert still catches the rare exception (a replay, or a republish after the
/// dedup window): that attempt rolls back and the batch runs again with the look-up. The
/// look-up is a round trip per batch, and PostgreSQL plans `event_id = ANY($2)` anew on
/// every call (~70 µs).
async fn attempt<S: BatchStep>(
    step: &S,
    items: &[Item<S::Input>],
) -> Result<Vec<Vec<Event>>, StepError> {
    if items.iter().all(|i| i.delivered == 1) {
        match attempt_with(step, items, false).await {
            Ok(Some(outputs)) => return Ok(outputs),
            Ok(None) => {}
            // Applying a message handled before may fail where its stored outputs would
            // not (a key or a check refuses the repeat): the look-up decides, at once.
            Err(e) if may_be_a_repeat(&e) => {
                debug!(error = %e, "first-delivery attempt refused; again with the inbox look-up");
            }
            // Anything else (a connection, a timeout, a deadlock) is retried later, as any
            // failure is, rather than doubled at once under load.
            Err(e) => return Err(e),
        }
    }
    attempt_with(step, items, true).await?.ok_or_else(|| {
        StepError::transient("a concurrent delivery handled part of this batch first")
    })
}

/// Whether a failed first-delivery attempt may have failed because one of its messages
/// was handled before: the database refused the data (a unique key, or a check such as stock
/// going negative), or the step refused it.
fn may_be_a_repeat(e: &StepError) -> bool {
    match e {
        StepError::Permanent { .. } => true,
        StepError::Transient(cause) => cause
            .downcast_ref::<sqlx::Error>()
            .and_then(sqlx::Error::as_database_error)
            .and_then(sqlx::error::DatabaseError::code)
            .is_some_and(|code| code.starts_with("23")),
        StepError::RetryAfter(_) => false,
    }
}

/// A batch's transaction keeps one plan per statement. Its statements take their rows as
/// arrays (`= ANY($1)`, `unnest`); the plan cache prices a generic plan for ten array
/// elements against a custom plan for the two or three a batch has, so it planned most of
/// them anew on every execution (seen in `pg_stat_statements.plans`). Their plans are key
/// look-ups whatever the array's length, so the generic plan is the same plan without the
/// planning. `SET LOCAL` ends with the transaction, and sent with the `BEGIN` it costs no
/// round trip.
const BEGIN: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";

/// One transaction: with `look_up`, first read which items were handled before (and what
/// they emitted); apply the rest, and record them in the inbox with their outputs in one
/// statement. `None` (rolled back) if the insert found an item recorded already: without the
/// look-up, one handled before; with it, a concurrent delivery that committed first (the
/// caller retries, and then reads what the other one emitted).
async fn attempt_with<S: BatchStep>(
    step: &S,
    items: &[Item<S::Input>],
    look_up: bool,
) -> Result<Option<Vec<Vec<Event>>>, StepError> {
    let table = step.inbox().name();
    let durable = S::DURABLE;
    let mut lease = step.leases().acquire().await?;
    let mut tx = lease.begin_with(BEGIN).await?;
    let mut stored: HashMap<String, Vec<Event>> = HashMap::new();
    if look_up {
        let ids: Vec<&str> = items.iter().map(|i| i.event_id.as_str()).collect();
        let rows: Vec<(String, Option<Vec<u8>>)> = sqlx::query_as(&format!(
            "SELECT event_id, outputs FROM {table} WHERE consumer = $1 AND event_id = ANY($2)"
        ))
        .bind(durable)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        for (id, bytes) in rows {
            let events = match bytes {
                None => Vec::new(),
                Some(b) => rmp_serde::from_slice(&b)
                    .map_err(|e| StepError::refused("stored outputs", e))?,
            };
            stored.insert(id, events);
        }
    }
    // A duplicate inside one batch is handled once: its first occurrence does the work.
    let mut seen = HashSet::new();
    let todo: Vec<&Item<S::Input>> = items
        .iter()
        .filter(|i| !stored.contains_key(&i.event_id) && seen.insert(i.event_id.as_str()))
        .collect();
    let mut fresh_outputs = Vec::new();
    if !todo.is_empty() {
        let inputs: Vec<&S::Input> = todo.iter().map(|i| &i.input).collect();
        let outputs = step.apply(&mut tx, &inputs).await?;
        if outputs.len() != todo.len() {
            return Err(StepError::permanent(format!(
                "{durable} returned {} outputs for {} inputs",
                outputs.len(),
                todo.len()
            )));
        }
        let mut encoded = Vec::with_capacity(outputs.len());
        for events in &outputs {
            encoded.push(
                rmp_serde::to_vec_named(events)
                    .map_err(|e| StepError::refused("outputs do not encode", e))?,
            );
        }
        let todo_ids: Vec<&str> = todo.iter().map(|i| i.event_id.as_str()).collect();
        let recorded: Vec<String> = sqlx::query_scalar(&format!(
            "INSERT INTO {table} (consumer, event_id, outputs)
             SELECT $1, event_id, outputs FROM unnest($2::text[], $3::bytea[]) AS o(event_id, outputs)
             ON CONFLICT DO NOTHING RETURNING event_id"
        ))
        .bind(durable)
        .bind(&todo_ids)
        .bind(&encoded)
        .fetch_all(&mut *tx)
        .await?;
        if recorded.len() != todo.len() {
            tx.rollback().await?;
            return Ok(None);
        }
        for (item, events) in todo.iter().zip(outputs) {
            stored.insert(item.event_id.clone(), events.clone());
            fresh_outputs.push(events);
        }
    }
    tx.commit().await?;
    lease.park();
    step.committed(&fresh_outputs);
    Ok(Some(
        items
            .iter()
            .map(|i| stored.get(&i.event_id).cloned().unwrap_or_default())
            .collect(),
    ))
}

/// Runs `work`, telling the server every `progress_every` that these messages are still
/// being worked on. `None` if it ran past the handler timeout.
async fn with_progress<T>(
    messages: &[&jetstream::Message],
    policy: &Policy,
    work: impl Future<Output = T>,
) -> Option<T> {
    let deadline = tokio::time::sleep(policy.settings.handler_timeout);
    let work = std::panic::AssertUnwindSafe(work).catch_unwind();
    tokio::pin!(work, deadline);
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + policy.progress_every,
        policy.progress_every,
    );
    loop {
        tokio::select! {
            result = &mut work => return result.ok(),
            _ = &mut deadline => return None,
            _ = ticker.tick() => {
                for message in messages {
                    if let Err(e) = message.ack_with(AckKind::Progress).await {
                        warn!(error = %e, "progress ack not sent");
                    }
                }
            }
        }
    }
}

/// A message that could not be handled: retried later, or dead-lettered.
async fn fail<I>(bus: &Bus, policy: &Policy, item: &Item<I>, error: StepError) {
    async { fail_in_span(bus, policy, item, error).await }
        .instrument(item.span.clone())
        .await;
}

async fn fail_in_span<I>(bus: &Bus, policy: &Policy, item: &Item<I>, error: StepError) {
    let last_chance = policy.max_deliver > 0 && item.delivered >= policy.max_deliver;
    match error {
        e @ StepError::Permanent { .. } => {
            item.dead_letter(bus, policy).send(&e.dead_reason()).await;
        }
        e @ (StepError::Transient(_) | StepError::RetryAfter(_)) if last_chance => {
            let reason = format!("gave up after {} deliveries: {e}", item.delivered);
            item.dead_letter(bus, policy).send(&reason).await;
        }
        StepError::RetryAfter(delay) => nak_after(item.message(), delay).await,
        StepError::Transient(reason) => {
            let delay = backoff(&policy.settings, item.delivered);
            warn!(event_id = %item.event_id, %reason, ?delay, "step failed, will retry");
            nak_after(item.message(), delay).await;
        }
    }
}

/// Publishes every item's outputs pipelined, then acks each item whose outputs are stored.
async fn finish<I>(bus: &Bus, policy: &Policy, done: Vec<(&Item<I>, Vec<Event>)>) {
    let mut outgoing = Vec::new();
    let mut owner = Vec::new();
    let mut broken = HashSet::new();
    for (n, (item, events)) in done.iter().enumerate() {
        if policy.chaos == Redeliver::BeforePublish && item.delivered == 1 {
            warn!("chaos: dying after commit, before publish");
            broken.insert(n);
            let _ = item.message().ack_with(AckKind::Nak(None)).await;
            continue;
        }
        for event in events {
            match Outgoing::new(event, Some(&item.hop)) {
                Ok(out) => {
                    outgoing.push(out);
                    owner.push(n);
                }
                Err(e) => {
                    warn!(error = %e, "cannot encode an output event");
                    broken.insert(n);
                }
            }
        }
    }
    let results = bus
        .publish_all_retrying(&outgoing, publish_budget(bus))
        .await;
    for (result, n) in results.into_iter().zip(owner) {
        if let Err(e) = result {
            warn!(error = %e, "publish failed, will redeliver");
            broken.insert(n);
        }
    }
    for (n, (item, _)) in done.iter().enumerate() {
        if broken.contains(&n) {
            if !(policy.chaos == Redeliver::BeforePublish && item.delivered == 1) {
                nak_after(item.message(), backoff(&policy.settings, item.delivered)).await;
            }
            continue;
        }
        if policy.chaos == Redeliver::AfterPublish && item.delivered == 1 {
            warn!("chaos: dying after publish, before ack");
            let _ = item.message().ack_with(AckKind::Nak(None)).await;
            continue;
        }
        // A plain ack: see `runner::finish` for why that is safe.
        if let Err(e) = item.message().ack().await {
            warn!(error = %e, "ack not sent");
        }
    }
}
