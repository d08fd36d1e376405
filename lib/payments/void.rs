//! Voiding an order's authorization (compensation), decided from our recorded state and,
//! when that is unknown (the provider timed out), from the provider's own records.

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

/// Voids what the order holds at the provider; does nothing if it holds nothing.
/// Idempotent: provider calls carry per-order keys, statuses move only forward.
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
    match row {
        Some((status, Some(auth_id))) if status == "authorized" => {
            match provider
                .void(&auth_id, &idempotency_key(order_id, "void"))
                .await
            {
                Ok(()) => {}
                // Refused: decide from the provider's actual state. Already voided there
                // (by someone else) is what we wanted; anything else is for a person.
                Err(super::ProviderError::Rejected(detail)) => {
                    let theirs = provider.authorizations_for(order_id).await?;
                    let already_void = theirs
                        .iter()
                        .any(|a| a.auth_id == auth_id && a.status == "voided");
                    if !already_void {
                        return Err(super::ProviderError::Rejected(detail).into());
                    }
                }
                Err(other) => return Err(other.into()),
            }
            sqlx::query(
                "UPDATE payments.payments SET status = 'voided', updated_at = now()
                 WHERE order_id = $1 AND status = 'authorized'",
            )
            .bind(order_id)
            .execute(pool)
            .await?;
            Ok(true)
        }
        // We gave up on an answer that never came: the provider may hold an authorization.
        Some((status, _)) if status == "failed" => {
            let mut voided = false;
            for found in provider.authorizations_for(order_id).await? {
                if found.status == "authorized" {
                    let key = idempotency_key(order_id, &format!("void:{}", found.auth_id));
                    provider.void(&found.auth_id, &key).await?;
                    voided = true;
                }
            }
            Ok(voided)
        }
        _ => Ok(false),
    }
}
