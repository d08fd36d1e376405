//! Releasing an order's money (compensation), decided from our recorded state and, when that
//! is unknown (we gave up on the provider, or the order was abandoned while a call was in
//! flight), from the provider's own records.

use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use super::provider::{PaymentProvider, ProviderError};
use super::{idempotency_key, payment_id_for, PaymentStatus};
use crate::saga::events::Checkout;

/// Why a void did not complete (retry later).
#[derive(Debug, thiserror::Error)]
pub enum VoidError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// What a void did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoidOutcome {
    /// The order holds nothing at the provider.
    Nothing,
    /// Its authorization is voided (now, or before).
    Voided,
    /// The provider refused, and its records say the authorization still stands.
    Refused(String),
}

/// Voids what the order holds at the provider. Idempotent: provider calls carry per-order
/// keys and statuses move only forward.
pub async fn void_for_order(
    pool: &PgPool,
    provider: &dyn PaymentProvider,
    order_id: Uuid,
) -> Result<VoidOutcome, VoidError> {
    let row: Option<(PaymentStatus, Option<String>)> =
        sqlx::query_as("SELECT status, auth_id FROM payments.payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    match row {
        Some((PaymentStatus::Authorized, Some(auth_id))) => {
            match provider
                .void(&auth_id, &idempotency_key(order_id, "void"))
                .await
            {
                Ok(()) => {}
                // Refused: decide from the provider's actual state. Already voided there
                // (by someone else) is what we wanted; anything else stands.
                Err(ProviderError::Rejected(detail)) => {
                    let theirs = provider.authorizations_for(order_id).await?;
                    let already_void = theirs
                        .iter()
                        .any(|a| a.auth_id == auth_id && a.status == "voided");
                    if !already_void {
                        return Ok(VoidOutcome::Refused(detail));
                    }
                }
                Err(other) => return Err(other.into()),
            }
            // The status and the ledger's movement together: a void is recorded once.
            sqlx::query(
                "WITH p AS (
                     UPDATE payments.payments SET status = 'voided', updated_at = now()
                     WHERE order_id = $1 AND status = 'authorized'
                     RETURNING order_id, amount, provider)
                 INSERT INTO payments.movements (order_id, kind, key, amount, provider)
                 SELECT order_id, 'void', 'whole', amount, provider FROM p
                 ON CONFLICT DO NOTHING",
            )
            .bind(order_id)
            .execute(pool)
            .await?;
            Ok(VoidOutcome::Voided)
        }
        Some((PaymentStatus::Voided, _)) => Ok(VoidOutcome::Voided),
        // The outcome is unknown: whatever the provider holds for the order is voided.
        Some((PaymentStatus::Failed | PaymentStatus::Abandoned, _)) => {
            void_what_the_provider_holds(provider, order_id).await
        }
        _ => Ok(VoidOutcome::Nothing),
    }
}

/// Asks the provider what it holds for the order and voids every live authorization.
pub async fn void_what_the_provider_holds(
    provider: &dyn PaymentProvider,
    order_id: Uuid,
) -> Result<VoidOutcome, VoidError> {
    let mut outcome = VoidOutcome::Nothing;
    for found in provider.authorizations_for(order_id).await? {
        if found.status != "authorized" {
            continue;
        }
        let key = idempotency_key(order_id, &format!("void:{}", found.auth_id));
        match provider.void(&found.auth_id, &key).await {
            Ok(()) => {
                tracing::warn!(%order_id, auth_id = %found.auth_id,
                    "voided an authorization the order was not recorded with");
                outcome = VoidOutcome::Voided;
            }
            Err(ProviderError::Rejected(detail)) => return Ok(VoidOutcome::Refused(detail)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(outcome)
}

/// Marks an order's payment as abandoned (the order was failed before any authorization was
/// recorded), so that the authorize step never starts one and voids one that completes late.
/// Does nothing if the order already has a payment.
pub async fn abandon(
    pool: &PgPool,
    provider: &dyn PaymentProvider,
    checkout: &Checkout,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payments.payments (payment_id, order_id, provider, status, amount, currency)
         VALUES ($1, $2, $3, 'abandoned', $4, $5) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(payment_id_for(checkout.order_id))
    .bind(checkout.order_id)
    .bind(provider.name())
    .bind(checkout.total)
    .bind(checkout.currency)
    .execute(pool)
    .await?;
    Ok(())
}

/// Releases what the order's authorization holds beyond its captures (the unshipped rest of
/// an order cancelled after it shipped in part), recorded once as a `void` movement of that
/// amount. Idempotent: the provider call carries the order's key and the movement is kept.
pub async fn void_rest(
    pool: &PgPool,
    provider: &dyn PaymentProvider,
    order_id: Uuid,
) -> Result<VoidOutcome, VoidError> {
    let row: Option<(Option<String>, Decimal, String, Decimal, bool)> = sqlx::query_as(
        "SELECT p.auth_id, p.amount, p.provider,
                coalesce((SELECT sum(amount) FROM payments.movements m
                          WHERE m.order_id = p.order_id AND m.kind = 'capture'), 0),
                EXISTS (SELECT 1 FROM payments.movements m
                        WHERE m.order_id = p.order_id AND m.kind = 'void')
         FROM payments.payments p WHERE p.order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    let Some((Some(auth_id), amount, holder, captured, voided)) = row else {
        return Ok(VoidOutcome::Nothing);
    };
    let rest = amount - captured;
    if voided {
        return Ok(VoidOutcome::Voided);
    }
    if rest <= Decimal::ZERO {
        return Ok(VoidOutcome::Nothing);
    }
    match provider
        .void(&auth_id, &idempotency_key(order_id, "void:rest"))
        .await
    {
        Ok(()) => {}
        Err(ProviderError::Rejected(detail)) => {
            let theirs = provider.authorizations_for(order_id).await?;
            let released = theirs
                .iter()
                .any(|a| a.auth_id == auth_id && a.voided > Decimal::ZERO);
            if !released {
                return Ok(VoidOutcome::Refused(detail));
            }
        }
        Err(other) => return Err(other.into()),
    }
    sqlx::query(
        "INSERT INTO payments.movements (order_id, kind, key, amount, provider)
         VALUES ($1, 'void', 'rest', $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(order_id)
    .bind(rest)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(VoidOutcome::Voided)
}
