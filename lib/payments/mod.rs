//! Payments: the provider adapter, the authorize step, and voids for compensation.

mod authorize;
pub mod provider;
pub mod sandbox;
mod void;

pub use authorize::AuthorizeStep;
pub use provider::{PaymentProvider, ProviderError};
pub use void::void_for_order;

use sqlx::PgPool;
use uuid::Uuid;

/// An order's payment status (`authorized`, `declined`, `voided`, ...), if one exists.
pub async fn payment_status(pool: &PgPool, order_id: Uuid) -> Result<Option<String>, sqlx::Error> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT status FROM payments.payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(s,)| s))
}

/// The payment id of an order: deterministic, so a retried step names the same payment.
pub fn payment_id_for(order_id: Uuid) -> Uuid {
    Uuid::new_v5(&order_id, b"payment")
}

/// The idempotency key sent to the provider for one operation on one order.
pub fn idempotency_key(order_id: Uuid, operation: &str) -> String {
    format!("{order_id}:{operation}")
}
