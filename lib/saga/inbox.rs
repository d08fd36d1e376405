//! The inbox: a step's record that it handled an event, committed in the same transaction
//! as the step's effects, together with the events it emitted. A redelivery finds the record,
//! does nothing again and re-emits the same events (which JetStream dedup then drops).

use sqlx::{PgPool, Postgres, Transaction};

use super::events::Event;

/// Inbox tables, one per service schema, so each service keeps its own records.
#[derive(Debug, Clone, Copy)]
pub enum InboxTable {
    Inventory,
    Payments,
    Orders,
}

impl InboxTable {
    /// The table's qualified name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inventory => "inventory.inbox",
            Self::Payments => "payments.inbox",
            Self::Orders => "orders.inbox",
        }
    }
}

/// Failures reading or writing the inbox.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("stored outputs do not decode: {0}")]
    Corrupt(#[from] rmp_serde::decode::Error),
    #[error("outputs do not encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

/// The result of claiming an event.
pub enum Claim {
    /// First time: do the work in this transaction, then commit it.
    Fresh(Transaction<'static, Postgres>),
    /// Handled before: these are the events it emitted.
    Done(Vec<Event>),
}

/// Claims `(consumer, event_id)` together with the events the step will emit if its work
/// succeeds, so the happy path costs one statement. A concurrent claim of the same event
/// waits on the row lock until the first commits (then sees `Done`) or rolls back (then gets
/// `Fresh`). A step that ends up emitting something else calls [`set_outputs`] or, after
/// rolling back, [`record_alone`].
pub async fn claim(
    pool: &PgPool,
    table: InboxTable,
    consumer: &str,
    event_id: &str,
    outputs: &[Event],
) -> Result<Claim, InboxError> {
    let bytes = rmp_serde::to_vec_named(outputs)?;
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(&format!(
        "INSERT INTO {} (consumer, event_id, outputs) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        table.name()
    ))
    .bind(consumer)
    .bind(event_id)
    .bind(bytes)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(Claim::Fresh(tx));
    }
    tx.rollback().await?;
    Ok(Claim::Done(
        lookup(pool, table, consumer, event_id)
            .await?
            .unwrap_or_default(),
    ))
}

/// The events a handled event emitted, or `None` if it was never handled.
pub async fn lookup(
    pool: &PgPool,
    table: InboxTable,
    consumer: &str,
    event_id: &str,
) -> Result<Option<Vec<Event>>, InboxError> {
    let row: Option<(Option<Vec<u8>>,)> = sqlx::query_as(&format!(
        "SELECT outputs FROM {} WHERE consumer = $1 AND event_id = $2",
        table.name()
    ))
    .bind(consumer)
    .bind(event_id)
    .fetch_optional(pool)
    .await?;
    outputs_of(row.map(|(outputs,)| outputs))
}

/// The events an inbox row recorded: `None` without a row, none for a row without outputs.
/// For steps that read their inbox row inside a statement of their own.
pub fn outputs_of(row: Option<Option<Vec<u8>>>) -> Result<Option<Vec<Event>>, InboxError> {
    match row {
        None => Ok(None),
        Some(None) => Ok(Some(Vec::new())),
        Some(Some(bytes)) => Ok(Some(rmp_serde::from_slice(&bytes)?)),
    }
}

/// Replaces the claimed outputs inside the claim's transaction.
pub async fn set_outputs(
    tx: &mut Transaction<'static, Postgres>,
    table: InboxTable,
    consumer: &str,
    event_id: &str,
    outputs: &[Event],
) -> Result<(), InboxError> {
    let bytes = rmp_serde::to_vec_named(outputs)?;
    sqlx::query(&format!(
        "UPDATE {} SET outputs = $3 WHERE consumer = $1 AND event_id = $2",
        table.name()
    ))
    .bind(consumer)
    .bind(event_id)
    .bind(bytes)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Records an outcome without other effects (a step whose work was rolled back, e.g. out of
/// stock). Returns what is recorded now: these outputs, or the ones a concurrent delivery
/// recorded first.
pub async fn record_alone(
    pool: &PgPool,
    table: InboxTable,
    consumer: &str,
    event_id: &str,
    outputs: Vec<Event>,
) -> Result<Vec<Event>, InboxError> {
    match claim(pool, table, consumer, event_id, &outputs).await? {
        Claim::Fresh(tx) => {
            tx.commit().await?;
            Ok(outputs)
        }
        Claim::Done(stored) => Ok(stored),
    }
}
