//! The inbox: a step's record that it handled an event, committed in the same transaction
//! as the step's effects, together with the events it emitted. A redelivery finds the record,
//! does nothing again and re-emits the same events (which JetStream dedup then drops). Only
//! the runner (`saga::apply`) reads and writes it.

use std::collections::HashMap;

use sqlx::PgConnection;

use super::events::Event;
use super::runner::StepError;

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

/// The events a handled event emitted, or `None` if it was never handled.
pub(crate) async fn lookup(
    conn: &mut PgConnection,
    table: InboxTable,
    consumer: &str,
    event_id: &str,
) -> Result<Option<Vec<Event>>, StepError> {
    let mut found = lookup_many(conn, table, consumer, &[event_id]).await?;
    Ok(found.remove(event_id))
}

/// What each of `event_ids` emitted, for those handled before.
pub(crate) async fn lookup_many(
    conn: &mut PgConnection,
    table: InboxTable,
    consumer: &str,
    event_ids: &[&str],
) -> Result<HashMap<String, Vec<Event>>, StepError> {
    let rows: Vec<(String, Option<Vec<u8>>)> = sqlx::query_as(&format!(
        "SELECT event_id, outputs FROM {} WHERE consumer = $1 AND event_id = ANY($2)",
        table.name()
    ))
    .bind(consumer)
    .bind(event_ids)
    .fetch_all(conn)
    .await?;
    let mut found = HashMap::with_capacity(rows.len());
    for (id, bytes) in rows {
        let events = match bytes {
            None => Vec::new(),
            Some(b) => {
                rmp_serde::from_slice(&b).map_err(|e| StepError::refused("stored outputs", e))?
            }
        };
        found.insert(id, events);
    }
    Ok(found)
}

/// Records `event_ids` as handled with their `outputs`, in one statement; false if any was
/// recorded already (then the caller rolls back).
pub(crate) async fn record(
    conn: &mut PgConnection,
    table: InboxTable,
    consumer: &str,
    event_ids: &[&str],
    outputs: &[Vec<Event>],
) -> Result<bool, StepError> {
    let mut encoded = Vec::with_capacity(outputs.len());
    for events in outputs {
        encoded.push(
            rmp_serde::to_vec_named(events)
                .map_err(|e| StepError::refused("outputs do not encode", e))?,
        );
    }
    let recorded: Vec<String> = sqlx::query_scalar(&format!(
        "INSERT INTO {} (consumer, event_id, outputs)
         SELECT $1, event_id, outputs FROM unnest($2::text[], $3::bytea[]) AS o(event_id, outputs)
         ON CONFLICT DO NOTHING RETURNING event_id",
        table.name()
    ))
    .bind(consumer)
    .bind(event_ids)
    .bind(&encoded)
    .fetch_all(conn)
    .await?;
    Ok(recorded.len() == event_ids.len())
}
