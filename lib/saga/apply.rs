//! The runner's half that handles what a pull delivered, for every [`Step`]: decode each
//! message into the step's input, run the step's outside work, then one transaction that
//! writes the step's effects and its inbox rows (the record that an event was handled, with
//! the events it emitted), publish those events pipelined, and ack.
//!
//! - `Batch` steps: what one pull delivered together is one transaction, so under load one
//!   commit (and one fsync) serves many messages, and at low load a batch is one message and
//!   nothing waits.
//! - `Prepared` steps: each message is prepared on its own (a provider call may take a
//!   second); the ready ones commit together through a group commit (`db::group`).
//!
//! If a transaction of several inputs fails, each input is tried again alone, so one bad
//! message never fails its neighbours. The inbox is written here and nowhere else.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::FutureExt;
use sqlx::{Connection, PgConnection};
use tracing::{debug, debug_span, info_span, warn, Instrument};

use super::events::{Event, EventKind};
use super::inbox;
use super::outgoing::Outgoing;
use super::runner::{
    admit, backoff, consume, nak_after, publish_budget, Admission, DeadLetter, Dispatch, Policy,
    Pulled, StepError, Work,
};
use super::step::{Delivery, Shape, Step, Tx};
use super::subjects::HEADER_TRACEPARENT;
use super::trace::TraceParent;
use crate::bus::{Bus, BusError};
use crate::config::{ConsumerSettings, Redeliver};
use crate::db::group::{Group, Writes};

/// Runs a step until `shutdown` is cancelled, then finishes what is in flight. `group_linger`
/// is how long a `Prepared` step's commit waits for company while another is in flight.
pub async fn run<S: Step>(
    step: Arc<S>,
    bus: Bus,
    settings: ConsumerSettings,
    chaos: Redeliver,
    group_linger: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), BusError> {
    let commits = Group::new(Commits(step.clone()), step.leases().clone(), group_linger);
    consume(
        Arc::new(Runs { step, commits }),
        bus,
        settings,
        chaos,
        shutdown,
    )
    .await
}

/// A step with its group commit (used by `Prepared` steps).
struct Runs<S: Step> {
    step: Arc<S>,
    commits: Group<Commits<S>>,
}

impl<S: Step> Dispatch for Runs<S> {
    fn durable(&self) -> &'static str {
        S::DURABLE
    }

    fn consumes(&self) -> Vec<EventKind> {
        self.step.consumes()
    }

    fn batches(&self) -> bool {
        S::SHAPE == Shape::Batch
    }

    fn dispatch(self: Arc<Self>, bus: Bus, policy: Arc<Policy>, group: Vec<Pulled>) -> Work {
        // Each message has its own span in its own trace (below); the group is a debug span.
        let span = debug_span!("saga_batch", consumer = policy.durable, size = group.len());
        Box::pin(
            async move {
                let items = admit_all(&*self.step, &bus, &policy, group).await;
                match S::SHAPE {
                    Shape::Batch if !items.is_empty() => {
                        handle_batch(&*self.step, &bus, &policy, items).await;
                    }
                    Shape::Batch => {}
                    Shape::Prepared => {
                        let alone = items
                            .into_iter()
                            .map(|item| handle_prepared(&self, &bus, &policy, item));
                        futures::future::join_all(alone).await;
                    }
                }
            }
            .instrument(span),
        )
    }
}

/// A message admitted for handling.
struct Item<I> {
    pulled: Pulled,
    input: Arc<I>,
    delivery: Delivery,
    stream_seq: u64,
    /// The message's span in its trace, open until it is finished.
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
            delivered: self.delivery.delivered,
        }
    }
}

/// Decodes every message; those that cannot be handled are handed back or dead-lettered here.
async fn admit_all<S: Step>(
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
        let delivery = Delivery {
            event_id: event.msg_id(),
            delivered,
            // What this step sends onwards continues the trace as a child of its span.
            trace: TraceParent::of_span(&span, &trace),
        };
        let input = match step.input(event) {
            Ok(input) => input,
            Err(why) => {
                letter.send(&why).await;
                continue;
            }
        };
        items.push(Item {
            pulled,
            input: Arc::new(input),
            delivery,
            stream_seq,
            span,
        });
    }
    items
}

/// A `Batch` step: prepare every item, then one transaction for all; if that fails, each
/// item alone.
async fn handle_batch<S: Step>(step: &S, bus: &Bus, policy: &Policy, items: Vec<Item<S::Input>>) {
    let messages: Vec<&jetstream::Message> = items.iter().map(Item::message).collect();
    let started = std::time::Instant::now();
    let work = async {
        let mut ready = Vec::with_capacity(items.len());
        for item in &items {
            ready.push(Ready {
                input: item.input.clone(),
                found: step.prepare(&item.input, &item.delivery).await?,
                event_id: item.delivery.event_id.clone(),
                delivered: item.delivery.delivered,
            });
        }
        Ok::<_, StepError>(ready)
    };
    let ready = match with_progress(&messages, policy, work).await {
        Some(Ok(ready)) => ready,
        Some(Err(e)) => {
            for item in &items {
                fail(bus, policy, item, clone_error(&e)).await;
            }
            return;
        }
        None => {
            for item in &items {
                fail(bus, policy, item, timed_out(policy)).await;
            }
            return;
        }
    };
    let outcome = with_progress(&messages, policy, commit_alone(step, &ready)).await;
    for _ in &items {
        crate::metrics::step_duration(S::DURABLE, started.elapsed());
    }
    match outcome {
        Some(Ok(outputs)) => finish(bus, policy, items.iter().zip(outputs).collect()).await,
        Some(Err(e)) if items.len() > 1 => {
            warn!(error = %e, size = items.len(), "batch failed; retrying its messages one by one");
            let mut done = Vec::new();
            for (item, one) in items.iter().zip(&ready) {
                let one = std::slice::from_ref(one);
                let message = [item.message()];
                match with_progress(&message, policy, commit_alone(step, one)).await {
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

/// One transaction on a lease of the step's own (a `Batch` step's group).
async fn commit_alone<S: Step>(
    step: &S,
    ready: &[Ready<S::Input, S::Found>],
) -> Result<Vec<Vec<Event>>, StepError> {
    let mut lease = step.leases().acquire().await?;
    let outputs = attempt(step, &mut lease, ready).await?;
    lease.park();
    Ok(outputs
        .into_iter()
        .map(|answer| match answer {
            Answer::Recorded(events) | Answer::Handled(events) => events,
        })
        .collect())
}

/// A `Prepared` step, one message: the inbox first (a redelivery of a handled event does not
/// even reach the outside work), the outside work, then the group commit.
async fn handle_prepared<S: Step>(
    runs: &Runs<S>,
    bus: &Bus,
    policy: &Policy,
    item: Item<S::Input>,
) {
    let started = std::time::Instant::now();
    let step = &*runs.step;
    let work = async {
        if item.delivery.delivered > 1 {
            let mut lease = step.leases().acquire().await?;
            let stored =
                inbox::lookup(&mut lease, S::INBOX, S::DURABLE, &item.delivery.event_id).await?;
            lease.park();
            if let Some(events) = stored {
                return Ok(events);
            }
        }
        let found = step.prepare(&item.input, &item.delivery).await?;
        let ready = Arc::new(Ready {
            input: item.input.clone(),
            found,
            event_id: item.delivery.event_id.clone(),
            delivered: item.delivery.delivered,
        });
        match runs.commits.write(ready.clone()).await? {
            Ok(Answer::Recorded(events)) => Ok(events),
            Ok(Answer::Handled(events)) => {
                // Another delivery recorded first: emit what it recorded, and undo what only
                // this one's outside work did.
                step.superseded(&ready.input, &ready.found).await?;
                Ok(events)
            }
            Err(e) => Err(e),
        }
    };
    let message = [item.message()];
    let outcome = with_progress(&message, policy, work.instrument(item.span.clone()));
    let outcome = outcome.await;
    crate::metrics::step_duration(S::DURABLE, started.elapsed());
    match outcome {
        Some(Ok(events)) => finish(bus, policy, vec![(&item, events)]).await,
        Some(Err(e)) => fail(bus, policy, &item, e).await,
        None => fail(bus, policy, &item, timed_out(policy)).await,
    }
}

/// An input whose outside work is done, ready for the transaction.
struct Ready<I, F> {
    input: Arc<I>,
    found: F,
    event_id: String,
    delivered: i64,
}

/// What the transaction made of one input.
enum Answer {
    /// Handled now: these events.
    Recorded(Vec<Event>),
    /// Handled before (or by a concurrent delivery): what it emitted then.
    Handled(Vec<Event>),
}

/// A `Prepared` step's commits, many inputs per transaction under load ([`Group`]).
struct Commits<S>(Arc<S>);

impl<S: Step> Writes for Commits<S> {
    type Row = Arc<Ready<S::Input, S::Found>>;
    /// A step's own refusal (a permanent error) is one input's, so each input's answer carries
    /// its own; a failure of the database fails the statement (then each input alone).
    type Answer = Result<Answer, StepError>;
    type Key = String;

    fn key(row: &Self::Row) -> String {
        row.event_id.clone()
    }

    async fn write(
        &self,
        conn: &mut PgConnection,
        rows: &[Self::Row],
    ) -> Result<Vec<Self::Answer>, sqlx::Error> {
        let ready: Vec<&Ready<S::Input, S::Found>> = rows.iter().map(AsRef::as_ref).collect();
        match attempt_refs(&*self.0, conn, &ready).await {
            Ok(answers) => Ok(answers.into_iter().map(Ok).collect()),
            // One input's refusal must not fail the others: each again alone.
            Err(_) if ready.len() > 1 => {
                let mut answers = Vec::with_capacity(ready.len());
                for one in &ready {
                    let answer = attempt_refs(&*self.0, conn, std::slice::from_ref(one))
                        .await
                        .map(|mut a| a.pop().unwrap_or(Answer::Handled(Vec::new())));
                    answers.push(answer);
                }
                Ok(answers)
            }
            Err(e) => match e {
                StepError::Transient(cause) => match cause.downcast::<sqlx::Error>() {
                    Ok(db) => Err(*db),
                    Err(other) => Ok(vec![Err(StepError::Transient(other))]),
                },
                other => Ok(vec![Err(other)]),
            },
        }
    }
}

/// One transaction for `ready` (see [`attempt_refs`]).
async fn attempt<S: Step>(
    step: &S,
    conn: &mut PgConnection,
    ready: &[Ready<S::Input, S::Found>],
) -> Result<Vec<Answer>, StepError> {
    let refs: Vec<&Ready<S::Input, S::Found>> = ready.iter().collect();
    attempt_refs(step, conn, &refs).await
}

/// One transaction: apply the inputs not handled before and record them in the inbox with
/// their outputs; what was handled before answers what it emitted then.
///
/// A first delivery was almost never handled before (a handled message is acked, so a
/// redelivery counts two or more), so a group of first deliveries skips the inbox look-up.
/// The inbox insert still catches the rare exception (a replay, a concurrent delivery, or a
/// republish after the dedup window): that attempt rolls back and runs again with the look-up.
/// The look-up is a round trip per group, and PostgreSQL plans `event_id = ANY($2)` anew on
/// every call (~70 µs).
async fn attempt_refs<S: Step>(
    step: &S,
    conn: &mut PgConnection,
    ready: &[&Ready<S::Input, S::Found>],
) -> Result<Vec<Answer>, StepError> {
    if ready.iter().all(|r| r.delivered == 1) {
        match attempt_with(step, conn, ready, false).await {
            Ok(Some(answers)) => return Ok(answers),
            Ok(None) => {}
            // Applying an input handled before may fail where its stored outputs would not
            // (a key or a check refuses the repeat): the look-up decides, at once.
            Err(e) if may_be_a_repeat(&e) => {
                debug!(error = %e, "first-delivery attempt refused; again with the inbox look-up");
            }
            // Anything else (a connection, a timeout, a deadlock) is retried later, as any
            // failure is, rather than doubled at once under load.
            Err(e) => return Err(e),
        }
    }
    attempt_with(step, conn, ready, true).await?.ok_or_else(|| {
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

/// A transaction keeps one plan per statement. Its statements take their rows as arrays
/// (`= ANY($1)`, `unnest`); the plan cache prices a generic plan for ten array elements
/// against a custom plan for the two or three a batch has, so it planned most of them anew on
/// every execution (seen in `pg_stat_statements.plans`). Their plans are key look-ups whatever
/// the array's length, so the generic plan is the same plan without the planning. `SET LOCAL`
/// ends with the transaction, and sent with the `BEGIN` it costs no round trip.
const BEGIN: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";

/// One transaction: with `look_up`, first read which inputs were handled before (and what
/// they emitted); apply the rest, and record them in the inbox with their outputs in one
/// statement. `None` (rolled back) if the insert found an input recorded already: without the
/// look-up, one handled before; with it, a concurrent delivery that committed first (the
/// caller retries, and then reads what the other one emitted).
async fn attempt_with<S: Step>(
    step: &S,
    conn: &mut PgConnection,
    ready: &[&Ready<S::Input, S::Found>],
    look_up: bool,
) -> Result<Option<Vec<Answer>>, StepError> {
    let table = S::INBOX;
    let mut tx = conn.begin_with(BEGIN).await?;
    let mut stored: HashMap<String, Vec<Event>> = HashMap::new();
    if look_up {
        let ids: Vec<&str> = ready.iter().map(|r| r.event_id.as_str()).collect();
        stored = inbox::lookup_many(&mut tx, table, S::DURABLE, &ids).await?;
    }
    // A duplicate inside one group is handled once: its first occurrence does the work.
    let mut seen = HashSet::new();
    let todo: Vec<&&Ready<S::Input, S::Found>> = ready
        .iter()
        .filter(|r| !stored.contains_key(&r.event_id) && seen.insert(r.event_id.as_str()))
        .collect();
    let mut fresh: HashMap<String, Vec<Event>> = HashMap::new();
    let mut effects = Vec::new();
    if !todo.is_empty() {
        let items: Vec<(&S::Input, &S::Found)> =
            todo.iter().map(|r| (&*r.input, &r.found)).collect();
        let mut step_tx = Tx::new(&mut tx);
        let outputs = step.apply(&mut step_tx, &items).await?;
        effects = step_tx.committed();
        if outputs.len() != todo.len() {
            return Err(StepError::permanent(format!(
                "{} returned {} outputs for {} inputs",
                S::DURABLE,
                outputs.len(),
                todo.len()
            )));
        }
        let ids: Vec<&str> = todo.iter().map(|r| r.event_id.as_str()).collect();
        if !inbox::record(&mut tx, table, S::DURABLE, &ids, &outputs).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        for (r, events) in todo.iter().zip(outputs) {
            fresh.insert(r.event_id.clone(), events);
        }
    }
    tx.commit().await?;
    for effect in effects {
        effect();
    }
    Ok(Some(
        ready
            .iter()
            .map(|r| match fresh.get(&r.event_id) {
                Some(events) if !stored.contains_key(&r.event_id) => {
                    Answer::Recorded(events.clone())
                }
                _ => Answer::Handled(stored.get(&r.event_id).cloned().unwrap_or_default()),
            })
            .collect(),
    ))
}

fn timed_out(policy: &Policy) -> StepError {
    StepError::transient(format!(
        "the step ran longer than {:?}",
        policy.settings.handler_timeout
    ))
}

/// The same verdict for another input of a batch whose outside work failed.
fn clone_error(e: &StepError) -> StepError {
    match e {
        StepError::Transient(cause) => StepError::transient(cause.to_string()),
        StepError::Permanent { .. } => StepError::permanent(e.dead_reason()),
        StepError::RetryAfter(delay) => StepError::RetryAfter(*delay),
    }
}

/// Runs `work`, telling the server every `progress_every` that these messages are still
/// being worked on. `None` if it ran past the handler timeout or panicked.
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
    let delivered = item.delivery.delivered;
    let last_chance = policy.max_deliver > 0 && delivered >= policy.max_deliver;
    match error {
        e @ StepError::Permanent { .. } => {
            item.dead_letter(bus, policy).send(&e.dead_reason()).await;
        }
        e @ (StepError::Transient(_) | StepError::RetryAfter(_)) if last_chance => {
            let reason = format!("gave up after {delivered} deliveries: {e}");
            item.dead_letter(bus, policy).send(&reason).await;
        }
        StepError::RetryAfter(delay) => {
            debug!(?delay, "step deferred");
            nak_after(item.message(), delay.max(Duration::from_millis(10))).await;
        }
        StepError::Transient(reason) => {
            let delay = backoff(&policy.settings, delivered);
            warn!(event_id = %item.delivery.event_id, %reason, ?delay, "step failed, will retry");
            nak_after(item.message(), delay).await;
        }
    }
}

/// Publishes every item's outputs pipelined, then acks each item whose outputs are stored.
/// Effects are committed: on any failure here the redelivery finds them in the inbox and
/// republishes the same events.
async fn finish<I>(bus: &Bus, policy: &Policy, done: Vec<(&Item<I>, Vec<Event>)>) {
    let mut outgoing = Vec::new();
    let mut owner = Vec::new();
    let mut broken = HashSet::new();
    let chaos =
        |item: &Item<I>, when: Redeliver| policy.chaos == when && item.delivery.delivered == 1;
    for (n, (item, events)) in done.iter().enumerate() {
        if chaos(item, Redeliver::BeforePublish) {
            warn!("chaos: dying after commit, before publish");
            broken.insert(n);
            let _ = item.message().ack_with(AckKind::Nak(None)).await;
            continue;
        }
        for event in events {
            match Outgoing::new(event, Some(&item.delivery.trace)) {
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
        let delivered = item.delivery.delivered;
        if broken.contains(&n) {
            if !chaos(item, Redeliver::BeforePublish) {
                nak_after(item.message(), backoff(&policy.settings, delivered)).await;
            }
            continue;
        }
        if chaos(item, Redeliver::AfterPublish) {
            warn!("chaos: dying after publish, before ack");
            let _ = item.message().ack_with(AckKind::Nak(None)).await;
            continue;
        }
        // A plain ack, not a double ack: the effects are committed and the outputs stored by
        // JetStream, so an ack lost on the way only means a redelivery after ack_wait, which
        // the inbox turns into a republish of the same events (deduplicated).
        if let Err(e) = item.message().ack().await {
            warn!(error = %e, "ack not sent");
        }
    }
}
