//! Voiding an order's authorization (compensation), decided from our recorded state.

use sqlx::PgPool;
use uuid::Uuid;

use super::idempotency_key;
use super::provider::PaymentProvider;

/// Why a void did not complete.
#[derive(Debug, thiserror::Error)]
pub enum VoidError {
    #[error(transparent)]
    Provider(#[from] super::ProviderError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Voids the order's authorization if one is held; does nothing otherwise. Idempotent:
/// the provider call carries a per-order key and the status moves only from `authorized`.
pub async fn void_for_order(
    pool: &PgPool,
    provider: &dyn PaymentProvider,
    order_id: Uuid,
) -> Result<bool, VoidError> {
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT status, auth_id FROM payments.payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    let Some((status, Some(auth_id))) = row else {
        return Ok(false);
    };
    if status != "authorized" {
        return Ok(false);
    }
    provider
        .void(&auth_id, &idempotency_key(order_id, "void"))
        .await?;
    sqlx::query(
        "UPDATE payments.payments SET status = 'voided', updated_at = now()
         WHERE order_id = $1 AND status = 'authorized'",
    )
    .bind(order_id)
    .execute(pool)
    .await?;
    Ok(true)
}
