//! One shape for every saga step. A step says what it needs from an event (`input`), may do
//! outside work for it before any transaction (`prepare`: a provider call, an idempotent
//! write of another service), then writes only its own effects in the runner's transaction
//! (`apply`) and returns the events each input emits. The runner (`saga::apply`) owns the
//! rest, for every step alike: decoding, the inbox (the record that an event was handled, and
//! what it emitted, written in the same transaction as the effects), the commit, publishing,
//! acks, retries and dead letters.
//!
//! How inputs share a transaction is the step's [`Shape`]: a step without outside work
//! handles everything one pull delivered together (`Batch`); a step with outside work
//! prepares each message on its own, so one slow provider call holds up nobody else, and the
//! inputs that are ready commit together (`Prepared`, group commit).

use std::future::Future;

use sqlx::PgConnection;

use super::events::{Event, EventKind};
use super::inbox::InboxTable;
use super::runner::StepError;
use super::trace::TraceParent;
use crate::db::Leases;

/// What a delivery tells a step besides the event.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The event's identity (its `Nats-Msg-Id`), the inbox key.
    pub event_id: String,
    /// 1 on the first delivery.
    pub delivered: i64,
    pub trace: TraceParent,
}

/// How a step's inputs share transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Everything one pull delivered together, in one transaction.
    Batch,
    /// Each message prepared on its own; those ready commit together.
    Prepared,
}

/// The runner's transaction, as a step's `apply` sees it: the connection, and what must
/// happen once the transaction has committed (counters that must not count a rollback).
pub struct Tx<'c> {
    pub conn: &'c mut PgConnection,
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
}

impl<'c> Tx<'c> {
    /// A transaction on `conn` (begun by the runner).
    pub(crate) fn new(conn: &'c mut PgConnection) -> Self {
        Self {
            conn,
            after_commit: Vec::new(),
        }
    }

    /// Runs `effect` once this transaction has committed, never if it rolls back.
    pub fn after_commit(&mut self, effect: impl FnOnce() + Send + 'static) {
        self.after_commit.push(Box::new(effect));
    }

    /// What to run now that the transaction committed.
    pub(crate) fn committed(self) -> Vec<Box<dyn FnOnce() + Send>> {
        self.after_commit
    }
}

/// One step of the saga.
pub trait Step: Send + Sync + 'static {
    /// The durable consumer's name; every instance of the role shares it.
    const DURABLE: &'static str;
    /// The inbox of the service whose tables the step writes.
    const INBOX: InboxTable;
    /// How its inputs share transactions.
    const SHAPE: Shape;
    /// What the step needs from an event it consumes.
    type Input: Send + Sync + 'static;
    /// What its outside work found (`()` for a step without any).
    type Found: Send + Sync + 'static;

    /// The event kinds this step consumes.
    fn consumes(&self) -> Vec<EventKind>;
    /// The service's database connections.
    fn leases(&self) -> &Leases;
    /// The step's input from an event it consumes; an error dead-letters the message.
    fn input(&self, event: Event) -> Result<Self::Input, String>;

    /// Outside work for an input the inbox has not seen, before the transaction. It must be
    /// idempotent: a redelivery after a crash, or a concurrent delivery, runs it again.
    fn prepare(
        &self,
        input: &Self::Input,
        delivery: &Delivery,
    ) -> impl Future<Output = Result<Self::Found, StepError>> + Send;

    /// Writes the effects of `items` (never handled before) in the runner's transaction and
    /// returns the events each one emits, in order.
    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx<'_>,
        items: &'a [(&'a Self::Input, &'a Self::Found)],
    ) -> impl Future<Output = Result<Vec<Vec<Event>>, StepError>> + Send + 'a;

    /// Another delivery of the same event recorded first, after this one's outside work ran:
    /// undo what only this one did (an authorization the recorded one does not hold).
    fn superseded(
        &self,
        _input: &Self::Input,
        _found: &Self::Found,
    ) -> impl Future<Output = Result<(), StepError>> + Send {
        async { Ok(()) }
    }
}
